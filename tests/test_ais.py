"""Annealed importance sampling and BDMC (``pyro_vae.ais``), checked on exactly tractable models.

The linear-Gaussian VAE (``tests/linear_gaussian.py``: x_dim 6, z_dim 3, noise 0.5) and the two-layer
linear-Gaussian VAE (``tests/test_two_layer.py``) have exact log p(x). AIS from the prior must

- be plain importance sampling from its start distribution at one temperature, draw for draw;
- sit visibly below log p(x) with few temperatures (a stochastic lower bound);
- reach log p(x) within 4 standard errors with enough temperatures, its HMC acceptance rate near the target;

and BDMC's forward and reverse estimates must bracket log p(x), their gap shrinking as the schedule grows.
Statistical checks use fixed seeds and SEs computed from the draws (``pytest -s`` prints them).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
from unittest import mock

import pyro
import pytest
import torch
from linear_gaussian import linear_gaussian
from mc_stats import assert_within_se, mean_se, report
from pyro import poutine
from test_two_layer import TwoLayerLinearGaussian

from pyro_vae import ais, cli
from pyro_vae.ais import AISSettings, ais_log_likelihood, bdmc, temperatures
from pyro_vae.checks import load_config
from pyro_vae.evaluate import NLL_METHODS, describe, log_likelihood, nll_method
from pyro_vae.model import VAE
from pyro_vae.specs import SpecError
from pyro_vae.traces import log_weights
from pyro_vae.train import train

# Enough temperatures for the linear-Gaussian models: the bias of log p-hat is then far below its SE.
CONVERGED = {"steps": 300, "leapfrog": 5, "chains": 16, "step_size": 0.1}


@pytest.fixture(scope="module")
def vae(lg):
    """The linear-Gaussian VAE with a guide far from the posterior (only start='guide' reads it)."""
    return lg.build_vae(exact_posterior=False)


@pytest.fixture(scope="module")
def converged(vae, x):
    pyro.set_rng_seed(0)
    return ais_log_likelihood(vae, x[:8], **CONVERGED)


# -- one temperature is importance sampling ----------------------------------------------------------------
def test_one_temperature_from_the_guide_is_importance_sampling_draw_for_draw(vae, x):
    """steps = 1: no transition, log w = log p(x, z) - log q(z|x) at the guide's draws, the IWAE weights."""
    pyro.set_rng_seed(3)
    result = ais_log_likelihood(vae, x, steps=1, chains=7, start="guide")
    pyro.set_rng_seed(3)
    torch.testing.assert_close(result.log_weights, log_weights(vae, x, 7), rtol=0, atol=1e-10)
    pyro.set_rng_seed(3)
    torch.testing.assert_close(result.log_px, log_likelihood(vae, x, num_samples=7), rtol=0, atol=1e-10)
    assert result.acceptance.numel() == 0 and result.acceptance_rate is None


def test_one_temperature_from_the_prior_is_importance_sampling_draw_for_draw(lg, vae, x):
    """steps = 1 from the prior: log w = log p(x|z) at z ~ p(z), here computed by hand from the same draws."""
    pyro.set_rng_seed(4)
    result = ais_log_likelihood(vae, x, steps=1, chains=5, start="prior")
    pyro.set_rng_seed(4)
    with pyro.plate("particles", 5, dim=-2):
        z = poutine.trace(vae.model).get_trace(x).nodes["z"]["value"]  # (5, batch, 3), the prior's draws
    by_hand = torch.distributions.Normal(z @ lg.W.T + lg.b, lg.s).log_prob(x).sum(-1)
    torch.testing.assert_close(result.log_weights, by_hand, rtol=0, atol=1e-10)
    torch.testing.assert_close(result.log_px, by_hand.logsumexp(0) - math.log(5), rtol=0, atol=1e-10)


def test_the_schedules_run_from_zero_to_one():
    for kind in ("sigmoid", "linear"):
        assert temperatures(1, kind).tolist() == [0.0, 1.0]
        betas = temperatures(50, kind)
        assert betas[0] == 0 and betas[-1] == 1 and bool((betas.diff() > 0).all())
    sigmoid = temperatures(100)
    increments = sigmoid.diff()  # slow at the ends, fast in the middle, symmetric
    assert increments[0] < 0.2 * increments[50] and float(sigmoid[50]) == pytest.approx(0.5)


# -- a lower bound that converges ----------------------------------------------------------------------------
def test_few_temperatures_sit_below_log_px(lg, vae, x):
    """E[log w] < log p(x) (Jensen): with 5 temperatures from the prior and one chain the gap is plain to see."""
    pyro.set_rng_seed(1)
    many = x.repeat(50, 1)
    result = ais_log_likelihood(vae, many, steps=5, leapfrog=5, chains=1, step_size=0.1)
    mean, se = mean_se(result.log_px - lg.log_px(many))
    report("AIS(steps=5) - log p(x), mean over 800 runs", mean, se, 0.0)
    assert mean < -5 * se and mean < -0.2


def test_many_temperatures_reach_log_px_within_four_standard_errors(lg, x, converged):
    exact = lg.log_px(x[:8])
    assert float(converged.se.max()) < 0.3, "the test needs a precise estimate to mean anything"
    assert_within_se("AIS(steps=300) log p(x), per example", converged.log_px, exact, converged.se, n_se=4)
    mean_error = converged.se.square().sum().sqrt() / 8
    assert_within_se("AIS(steps=300) log p(x), mean", converged.log_px.mean(), exact.mean(), mean_error, n_se=4)


def test_step_sizes_adapt_to_the_target_acceptance_rate(converged):
    """From an initial 0.1 the step sizes grow or shrink by 2% per transition until the running acceptance
    rate sits at the target 0.65; over the second half of the schedule the mean is near it."""
    late = float(converged.acceptance[len(converged.acceptance) // 2 :].mean())
    print(f"[stat] acceptance rate over the second half of the schedule: {late:.3f} (target 0.65)")
    assert abs(late - 0.65) < 0.1
    assert float(converged.step_size.std()) > 0, "one step size per example and chain"
    diagnostics = converged.diagnostics("ais_")
    assert len(diagnostics["ais_acceptance_by_stage"]) == 10 and 0 < diagnostics["ais_acceptance_rate"] < 1


def test_the_two_layer_model_reaches_log_px_from_the_prior_and_from_the_guide():
    """Two latent sites (z2, z1) flattened into one vector per chain; exact log p(x) from the two-layer model."""
    model = TwoLayerLinearGaussian()
    vae = model.build_vae(gain_factor=0.7, scale_factor=1.5, shift=0.4)
    torch.manual_seed(1)
    x = model.marginal().sample((6,))
    for start, steps in (("prior", CONVERGED["steps"]), ("guide", 100)):  # the guide starts nearer the posterior
        pyro.set_rng_seed(0)
        result = ais_log_likelihood(vae, x, start=start, **{**CONVERGED, "steps": steps})
        assert float(result.se.max()) < 0.3
        assert_within_se(f"two-layer AIS from the {start}", result.log_px, model.log_px(x), result.se, n_se=4)
    pyro.set_rng_seed(5)
    one = ais_log_likelihood(vae, x, steps=1, chains=4, start="guide")
    pyro.set_rng_seed(5)
    torch.testing.assert_close(one.log_weights, log_weights(vae, x, 4), rtol=0, atol=1e-10)


# -- recorded graphs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "start"),
    [
        ({"prior": "vamp(components=3)"}, "prior"),
        ({"structure": "two_layer(z2_dim=2, hidden=[3])"}, "guide"),
        ({"likelihood": "categorical"}, "guide"),
        ({"structure": "cvae", "x_shape": (1, 2, 3)}, "prior"),
    ],
)
def test_the_recorded_graphs_replay_the_eager_evaluations(kwargs, start):
    """Recorded at one (z, beta), replayed at another: z, beta, x and the data fields are graph inputs, the
    parameters the very tensors; gradient and energies agree with the Pyro programs interpreted afresh."""
    torch.manual_seed(0)
    vae = VAE(x_dim=6, z_dim=2, hidden_dims=(5,), **kwargs)
    x = (torch.rand(3, 6) < 0.5).float()
    data = {"input_mask": torch.arange(6).expand(3, 6) < 3} if "x_shape" in kwargs else {}
    with ais._annealing(vae):
        path = ais.AnnealingPath(vae, x, 4, start, data)
        z = path.draw()
        assert path.record(z, torch.tensor(0.2)), path.fallback_reason
        assert set(path.replays) == {"gradient", "force", "terms"}
        z2, beta = z + 0.3 * torch.randn_like(z), torch.tensor(0.7)
        torch.testing.assert_close(path.gradient(z2, beta), path._eager_gradient(z2, beta))
        torch.testing.assert_close(path.force(z2, beta), path._eager_gradient(z2, beta)[2])
        spread = z2[:1].expand_as(z2)  # one chain's z for all: BDMC's reverse start, a stride-0 view
        torch.testing.assert_close(path.gradient(spread, beta), path._eager_gradient(spread, beta))
        torch.testing.assert_close(path.terms(spread), path._eager_terms(spread))
        torch.testing.assert_close(path.terms(z2), path._eager_terms(z2))


def test_the_leapfrog_force_graph_has_no_likelihood_density():
    """Between a transition's ends only the gradient is needed: the recorded force has the Bernoulli
    density's backward (sigmoid) but not the density, which the gradient graph keeps for the energy."""
    vae = VAE(x_dim=6, z_dim=2, hidden_dims=(5,))
    with ais._annealing(vae):
        path = ais.AnnealingPath(vae, (torch.rand(3, 6) < 0.5).float(), 4, "prior", {})
        assert path.record(path.draw(), torch.tensor(0.5)), path.fallback_reason
    density = torch.ops.pyro_vae.bernoulli_log_density_cpu.default
    targets = {name: [n.target for n in graph.graph.nodes] for name, graph in path.replays.items()}
    assert density in targets["gradient"] and density in targets["terms"] and density not in targets["force"]
    assert torch.ops.aten.sigmoid.default in targets["force"]


def test_recorded_and_interpreted_annealing_agree(vae, x):
    """record=True (the default) and record=False: the same chains from the same seed, to float64 rounding."""
    results = []
    for record in (True, False):
        pyro.set_rng_seed(8)
        results.append(ais_log_likelihood(vae, x[:4], steps=6, leapfrog=3, chains=3, record=record))
    torch.testing.assert_close(results[0].log_weights, results[1].log_weights, rtol=0, atol=1e-9)
    torch.testing.assert_close(results[0].acceptance, results[1].acceptance, rtol=0, atol=1e-9)


def test_a_program_that_cannot_be_recorded_runs_eagerly(caplog):
    """BDMC's model holds the simulated observations (tensors that are not parameters): recording is refused
    with the reason logged, and the sandwich is computed by the interpreted programs."""
    vae = VAE(x_dim=6, z_dim=2, hidden_dims=(5,))
    with caplog.at_level(logging.INFO, logger="pyro_vae.ais"):
        result = bdmc(vae, num=3, steps=3, leapfrog=2, chains=2)
    assert bool(torch.isfinite(result.gap).all())
    assert "runs eagerly (recording refused: FrozenTensorError" in caplog.text


# -- faster gradients, exact energies --------------------------------------------------------------------------
def _bf16_products() -> bool:
    """Whether this CPU's oneDNN multiplies float32 matrices on bfloat16 inputs when asked."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.fixture(scope="module")
def wide():
    """A float32 linear-Gaussian model wide enough (x_dim 32, z_dim 8) that oneDNN takes its products
    (torch sends a float32 product to oneDNN above 16^3 multiply-adds), with 8 examples from it."""
    model = linear_gaussian(x_dim=32, z_dim=8, s=0.5, seed=3)
    return model, model.build_vae(exact_posterior=False).float(), model.sample(8, torch.Generator().manual_seed(2))


@pytest.mark.skipif(not _bf16_products(), reason="this CPU's oneDNN has no bfloat16 products")
def test_bf16_gradients_still_reach_log_px(wide):
    """The surrogate-gradient argument: leapfrog with a less precise force is still volume-preserving and
    reversible, and the accept step and the weights use float32 energies at full precision, so AIS stays
    unbiased for p(x): the float32 linear-Gaussian model, bf16 gradients, within 4 SE of the exact value."""
    model, vae, x = wide
    pyro.set_rng_seed(0)
    settings = {**CONVERGED, "steps": 1000, "chains": 32}  # 8 latent dimensions: more temperatures than 3 need
    result = ais_log_likelihood(vae, x.float(), **settings, gradient_precision="bf16")
    assert float(result.se.max()) < 0.3
    exact, log_px, se = model.log_px(x), result.log_px.double(), result.se.double()
    assert_within_se("AIS(steps=1000, bf16 gradients) log p(x), per example", log_px, exact, se, n_se=4)
    mean_se = se.square().sum().sqrt() / len(se)
    assert_within_se("AIS(steps=1000, bf16 gradients) log p(x), mean", log_px.mean(), exact.mean(), mean_se, n_se=4)
    late = float(result.acceptance[len(result.acceptance) // 2 :].mean())
    assert abs(late - 0.65) < 0.1


@pytest.mark.skipif(not _bf16_products(), reason="this CPU's oneDNN has no bfloat16 products")
def test_bf16_changes_the_gradients_and_not_the_energies(wide):
    """The leapfrog gradients differ from float32's (the setting takes effect), the state a transition
    returns carries log p0 and r evaluated at full precision, and the flags are put back afterwards."""
    _, vae, x = wide
    before = torch.backends.mkldnn.matmul.fp32_precision
    with ais._annealing(vae):
        path = ais.AnnealingPath(vae, x.float(), 16, "prior", {})
        z, beta = path.draw(), torch.tensor(0.5)
        _, _, exact = path.gradient(z, beta)
        with ais.matmul_precision(z.device, "bf16"):
            _, _, fast = path.gradient(z, beta)
        assert not torch.equal(fast, exact) and torch.allclose(fast, exact, rtol=0.05, atol=0.05)
        state = ais.ChainState(z, *path.terms(z))
        step_size = torch.full_like(state.r, 0.05)
        with ais.matmul_precision(z.device, "bf16"):  # as a global setting: the energies must not follow it
            moved, _ = ais.hmc_transition(path, state, beta, step_size, 3, gradient_precision="bf16")
        assert not torch.equal(moved.z, z), "some proposal was accepted"
        log_p0, r = path.terms(moved.z)
    assert torch.equal(moved.log_p0, log_p0) and torch.equal(moved.r, r)
    assert torch.backends.mkldnn.matmul.fp32_precision == before


@pytest.mark.skipif(not _bf16_products(), reason="this CPU's oneDNN has no bfloat16 products")
def test_a_float64_model_is_untouched_by_the_gradient_precision(wide):
    """bf16 applies to float32 products only: the wide model in float64 (products oneDNN would take in
    float32) gives the same chains draw for draw (the extra full-precision energy draws no random numbers)."""
    _, vae, x = wide
    vae64, results = copy.deepcopy(vae).double(), []
    for precision in ("ieee", "bf16"):
        pyro.set_rng_seed(7)
        results.append(ais_log_likelihood(vae64, x[:4], steps=5, leapfrog=3, chains=8, gradient_precision=precision))
    torch.testing.assert_close(results[0].log_weights, results[1].log_weights, rtol=0, atol=0)


def test_bf16_on_a_cpu_without_it_says_so(monkeypatch):
    monkeypatch.setattr(ais, "_bf16_supported", lambda: False)
    with pytest.warns(UserWarning, match="this CPU has no bfloat16 products; AIS runs in float32"):
        ais.check_precision(torch.device("cpu"), "bf16")


def test_a_precision_the_device_lacks_is_refused_before_anything_runs(monkeypatch, vae, x):
    """Checked against the device up front: even steps = 1 (no transition, no gradient) refuses it."""
    monkeypatch.setitem(ais.GRADIENT_PRECISIONS, "cpu", ("ieee",))
    for run in (
        lambda: ais_log_likelihood(vae, x[:2], steps=1, gradient_precision="bf16"),
        lambda: bdmc(vae, num=2, steps=1, gradient_precision="bf16"),
    ):
        with pytest.raises(ValueError) as info:
            run()
        assert _one_line(info) == "gradient_precision 'bf16' is not available on cpu; valid there: 'ieee'"


def test_a_precision_the_device_lacks_is_one_line():
    with pytest.raises(ValueError) as info, ais.matmul_precision(torch.device("cuda"), "bf16"):
        pass
    assert _one_line(info) == "gradient_precision 'bf16' is not available on cuda; valid there: 'ieee', 'tf32'"
    before = torch.backends.mkldnn.matmul.fp32_precision
    with pytest.raises(RuntimeError, match="inside"), ais.matmul_precision(torch.device("cpu"), "bf16"):
        raise RuntimeError("inside")
    assert torch.backends.mkldnn.matmul.fp32_precision == before


HOST_READS = ("__bool__", "__float__", "__int__", "item", "tolist", "numpy")


@contextlib.contextmanager
def no_host_reads():
    """Every way Python reads a tensor's value (``if t:``, ``float(t)``, ``t.item()``, ...) raises in this block."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor was read on the host")

    with contextlib.ExitStack() as stack:
        for name in HOST_READS:
            stack.enter_context(mock.patch.object(torch.Tensor, name, refuse))
        yield


@pytest.mark.parametrize("structure", ["vae", "two_layer(z2_dim=2, hidden=[3])"])
@pytest.mark.parametrize("start", ["prior", "guide"])
def test_the_annealing_loop_never_reads_a_tensor_on_the_host(structure, start, monkeypatch):
    """No .item(), no Python branch on a tensor inside the loop (what a GPU would sync on): a CPU stand-in.
    The loop replays the recorded graphs (recorded, and checked on the host, once before it)."""
    loop, recorded = ais._anneal, []

    def guarded(path, *args, **kwargs):
        recorded.append(bool(path.replays))
        with no_host_reads():
            return loop(path, *args, **kwargs)

    monkeypatch.setattr(ais, "_anneal", guarded)
    vae = VAE(
        x_dim=6,
        z_dim=2,
        hidden_dims=(5,),
        prior="vamp(components=3)" if structure == "vae" else "normal",
        structure=structure,
    )
    result = ais_log_likelihood(vae, (torch.rand(3, 6) < 0.5).float(), steps=3, leapfrog=2, chains=2, start=start)
    assert bool(torch.isfinite(result.log_px).all()) and recorded == [True]
    with no_host_reads(), pytest.raises(AssertionError, match="read on the host"):
        bool(torch.ones(()))


def test_a_structure_with_data_fields_anneals_with_them():
    """The CVAE's p(z|x_in) p(y|z) with its input_mask: one temperature from the guide is its IWAE weights."""
    torch.manual_seed(0)
    vae = VAE(x_dim=16, z_dim=2, hidden_dims=(5,), structure="cvae", x_shape=(1, 4, 4))
    x, mask = (torch.rand(3, 16) < 0.5).float(), torch.arange(16).expand(3, 16) < 8
    pyro.set_rng_seed(6)
    one = ais_log_likelihood(vae, x, steps=1, chains=4, start="guide", input_mask=mask)
    pyro.set_rng_seed(6)
    torch.testing.assert_close(one.log_weights, log_weights(vae, x, 4, input_mask=mask), rtol=0, atol=1e-5)
    annealed = ais_log_likelihood(vae, x, steps=4, leapfrog=2, chains=2, input_mask=mask)
    assert bool(torch.isfinite(annealed.log_px).all()) and annealed.acceptance.shape == (3,)


# -- BDMC ----------------------------------------------------------------------------------------------------
def test_bdmc_brackets_log_px_and_its_gap_shrinks_with_the_schedule(lg, vae):
    gaps = {}
    for steps in (10, 200):
        pyro.set_rng_seed(2)
        result = bdmc(vae, num=12, steps=steps, leapfrog=5, chains=4, step_size=0.1)
        exact = lg.log_px(result.x)
        lower, upper = result.forward, result.reverse
        lower_se, upper_se = (run.se.square().sum().sqrt() / 12 for run in (lower, upper))
        report(f"BDMC(steps={steps}) forward - log p(x)", (lower.log_px - exact).mean(), lower_se, 0.0)
        report(f"BDMC(steps={steps}) reverse - log p(x)", (upper.log_px - exact).mean(), upper_se, 0.0)
        assert float((lower.log_px - exact).mean()) < 4 * float(lower_se), "forward AIS must not exceed log p(x)"
        assert float((upper.log_px - exact).mean()) > -4 * float(upper_se), "reverse AIS must not fall below it"
        gaps[steps] = float(result.gap.mean())
    assert gaps[10] > 0.5 and gaps[200] < 0.25 * gaps[10], gaps
    summary = result.summary()
    assert summary["gap"] == pytest.approx(gaps[200]) and len(summary["per_example"]["gap"]) == 12


def test_bdmc_simulates_from_the_model_with_every_likelihood_and_start():
    """Categorical observations are integer levels: the data handed to the guide is k / 255 (``unprepare``)."""
    for likelihood in ("bernoulli", "categorical"):
        vae = VAE(x_dim=6, z_dim=2, hidden_dims=(5,), likelihood=likelihood)
        for start in ("prior", "guide"):
            result = bdmc(vae, num=3, steps=3, leapfrog=2, chains=2, start=start)
            assert result.x.shape == (3, 6) and bool(torch.isfinite(result.gap).all())
            assert bool(((result.x >= 0) & (result.x <= 1)).all())


# -- refusals and settings --------------------------------------------------------------------------------------
def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_m2_is_refused_in_one_line():
    torch.manual_seed(0)
    vae = VAE(x_dim=6, z_dim=2, hidden_dims=(5,), structure="m2(classes=3)")
    x, labels = (torch.rand(4, 6) < 0.5).float(), torch.full((4,), -1)
    for start in ("prior", "guide"):
        with pytest.raises(ValueError) as info:
            ais_log_likelihood(vae, x, steps=2, start=start, labels=labels)
        assert "AIS needs real-valued latent sites; site 'y_unobserved' of structure M2" in _one_line(info)
    with pytest.raises(ValueError) as info:
        bdmc(vae, num=2, steps=2)
    assert "BDMC simulates data from the model alone; structure M2 also consumes labels" in _one_line(info)


@pytest.mark.parametrize(
    ("spec", "phrase"),
    [
        ("ais(steps=0)", "steps must be a positive integer, got 0"),
        ("ais(start='posterior')", "start must be one of 'prior', 'guide', got 'posterior'"),
        ("ais(schedule='cosine')", "schedule must be one of 'sigmoid', 'linear'"),
        ("ais(target_accept=1.5)", "target_accept must be a finite number in (0, 1)"),
        ("ais(gradient_precision='fp16')", "gradient_precision must be one of 'ieee', 'bf16', 'tf32', got 'fp16'"),
        ("ais(stepz=3)", "NLL method 'ais' has no argument 'stepz' (did you mean \"steps\"?)"),
        ("is(samples=0)", "samples must be a positive integer, got 0"),
        ("ais(steps=", "cannot parse spec"),
        ("annealed", "unknown NLL method 'annealed'; valid NLL methods: ais, is"),
    ],
)
def test_bad_nll_specs_are_one_line_errors_that_name_the_methods(spec, phrase):
    with pytest.raises(SpecError) as info:
        nll_method(spec)
    text = _one_line(info)
    assert phrase in text and ("NLL methods: is(samples=K), ais(" in text or "valid NLL methods: ais, is" in text)


def test_the_nll_methods_and_their_defaults():
    assert NLL_METHODS.names() == ["ais", "is"]
    assert nll_method("is").samples == 5000
    assert nll_method("ais(steps=20)") == AISSettings(steps=20, leapfrog=10, chains=16, start="prior")
    # record changes how AIS computes, not what: it stays out of the protocol, so two runs compare
    interpreted, recorded = (describe(nll_method(spec)) for spec in ("ais(record=False)", "ais"))
    assert interpreted == recorded and "record" not in recorded[1] and recorded[1]["gradient_precision"] == "ieee"
    with pytest.raises(SpecError, match="record must be True or False, got 'yes'"):
        nll_method("ais(record='yes')")


# -- the command line ------------------------------------------------------------------------------------------
TINY_RUN = [
    "data.name=synthetic(num_train=100, num_test=20, side=3, components=2)",
    "model.z_dim=2",
    "model.hidden_dims=[6]",
    "train.epochs=1",
    "train.batch_size=50",
    "train.nll_samples=0",
    "train.device=cpu",
]
AIS_SPEC = "ais(steps=4, leapfrog=2, chains=3)"


def _evaluate(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["evaluate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_command_line_reports_ais_and_bdmc(tmp_path, capsys):
    run = tmp_path / "run"
    train(load_config(None, TINY_RUN), run)
    capsys.readouterr()
    code, out, _ = _evaluate(capsys, "--run", str(run), "--nll", AIS_SPEC, "--subset", "5", "--json")
    result = json.loads(out)
    assert code == 0 and result["num_examples"] == 5 and result["test_nll"] > 0 and result["nll_samples"] is None
    assert result["nll_method"].startswith("ais(steps=4, leapfrog=2, chains=3, start='prior'")
    assert result["nll_settings"]["schedule"] == "sigmoid" and 0 <= result["ais_acceptance_rate"] <= 1
    # --nll 'is(samples=K)' is --nll-samples K
    runs = [
        _evaluate(capsys, "--run", str(run), *how, "--subset", "5", "--json")
        for how in (("--nll", "is(samples=7)"), ("--nll-samples", "7"))
    ]
    assert json.loads(runs[0][1])["test_nll"] == json.loads(runs[1][1])["test_nll"]
    assert json.loads(runs[1][1])["nll_method"] == "is(samples=7)"
    code, out, _ = _evaluate(capsys, "--run", str(run), "--bdmc", "4", "--nll", AIS_SPEC, "--json")
    result = json.loads(out)
    assert code == 0 and result["bdmc_num"] == 4 and result["ais_method"].startswith("ais(steps=4")
    assert result["gap"] == pytest.approx(result["reverse_log_px"] - result["forward_log_px"])
    assert len(result["per_example"]["forward_log_px"]) == 4
    code, out, _ = _evaluate(capsys, "--run", str(run), "--bdmc", "2", "--nll", AIS_SPEC)
    assert code == 0 and "forward_log_px" in out and "gap" in out
    for args, phrase in (
        (("--nll", "annealed"), "unknown NLL method 'annealed'; valid NLL methods: ais, is"),
        (("--nll", "is(samples=3)", "--nll-samples", "3"), "give --nll or --nll-samples, not both"),
        (("--bdmc", "2", "--nll", "is(samples=3)"), "BDMC runs AIS: its settings must be an ais(...) spec"),
    ):
        code, _, err = _evaluate(capsys, "--run", str(run), *args)
        assert code == 2 and phrase in err and err.count("\n") == 1, err
