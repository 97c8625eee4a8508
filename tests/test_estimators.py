"""The estimators on the exactly tractable linear-Gaussian VAE (tests/linear_gaussian.py).

Every statistical check compares Monte Carlo means with a reference within a number of standard
errors computed from the samples; per-coordinate gradient checks use a Bonferroni threshold
(family-wise false-alarm rate 1e-3 over all coordinates). Seeds are fixed. ``pytest -s`` shows
the numbers each test saw (``[stat]`` lines).
"""

from __future__ import annotations

import itertools
import json
import math

import pyro
import pytest
import torch
from mc_stats import assert_within_se, mean_se, report
from scipy.stats import norm

from pyro_vae import estimators, traces
from pyro_vae.closed_form import gaussian_kl_standard_normal
from pyro_vae.specs import SpecError

ELBO_SPECS = ["trace", "meanfield", "closed_form", "jit_trace", "jit_meanfield", "tracegraph", "stl", "iwae(k=1)"]
ALL_SPECS = [*ELBO_SPECS, "iwae(k=5)", "renyi(alpha=0.5, k=5)", "stl(k=5)", "dreg(k=5)"]
FAMILY_ALPHA = 1e-3


def bonferroni(num_coordinates: int, alpha: float = FAMILY_ALPHA) -> float:
    """Two-sided z threshold with family-wise false-alarm rate ``alpha`` over ``num_coordinates`` tests."""
    return float(norm.isf(alpha / (2 * num_coordinates)))


def exact_elbo(vae, lg, x: torch.Tensor) -> torch.Tensor:
    """The exact ELBO per example, differentiable in the encoder and the (linear) decoder:

    E_q[log p(x|z)] = -D/2 log(2 pi s^2) - (||x - W m - b||^2 + sum_k ||W_k||^2 S_k^2) / (2 s^2),
    minus KL(q || N(0, I)).
    """
    loc, scale = vae.encode(x)
    linear = vae.decoder.head
    resid = x - loc @ linear.weight.T - linear.bias
    spread = (scale.square() * linear.weight.square().sum(0)).sum(-1)
    log_lik = -0.5 * lg.x_dim * math.log(2 * math.pi * lg.s**2) - (resid.square().sum(-1) + spread) / (2 * lg.s**2)
    return log_lik - gaussian_kl_standard_normal(loc, scale)


def flat_grad(vae, group: str | None = None) -> torch.Tensor:
    modules = [getattr(vae, group)] if group else [vae.encoder, vae.decoder]
    return torch.cat([p.grad.flatten() for m in modules for p in m.parameters()])


def gradients(vae, x, spec: str, seeds, group: str | None = None) -> torch.Tensor:
    """(repeats, parameters): the gradient of the batch-mean bound, one row per seed."""
    estimator = estimators.get(spec)
    rows = []
    for seed in seeds:
        pyro.set_rng_seed(seed)
        vae.zero_grad(set_to_none=True)
        (-estimator.loss(vae, x) / x.shape[0]).backward()
        rows.append(flat_grad(vae, group))
    return torch.stack(rows)


def bounds(vae, x, spec: str, repeats: int) -> torch.Tensor:
    """(repeats,): batch-mean bound estimates with fresh draws."""
    estimator = estimators.get(spec)
    return torch.stack([estimator.bound(vae, x).mean() for _ in range(repeats)])


# -- the registry -------------------------------------------------------------------------------
def test_every_estimator_is_registered():
    expected = {"trace", "meanfield", "closed_form", "iwae", "renyi", "stl", "dreg", "tracegraph"}
    assert expected | {"jit_trace", "jit_meanfield"} <= set(estimators.names())


def test_unknown_estimator_lists_the_valid_ones():
    with pytest.raises(SpecError, match=r"valid estimators: .*dreg.*iwae"):
        estimators.get("iwea(k=5)")
    with pytest.raises(SpecError, match='did you mean "iwae"'):
        estimators.get("iwea")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("iwae(k=0)", "k .*must be an integer >= 1"),
        ("dreg(k=2.5)", "k .*must be an integer >= 1"),
        ("renyi(alpha='a', k=2)", "alpha must be a finite number"),
        ("tracegraph(baseline_beta=1.5)", r"baseline_beta must be in \[0, 1\)"),
        ("iwae(n=5)", "has no argument 'n'.*its arguments: k"),
    ],
)
def test_bad_arguments_are_clear_errors(spec, message):
    with pytest.raises(SpecError, match=message):
        estimators.get(spec)


# -- values ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ALL_SPECS)
def test_loss_value_is_minus_the_bound_on_the_same_draws(lg, x, spec):
    """``loss`` is minus the summed bound (whatever gradient it carries); shapes are per example."""
    vae = lg.build_vae(exact_posterior=False)
    estimator = estimators.get(spec)
    estimator.loss(vae, x)  # JIT estimators compile (and draw) on their first call
    pyro.set_rng_seed(3)
    loss = estimator.loss(vae, x)
    pyro.set_rng_seed(3)
    bound = estimator.bound(vae, x)
    assert loss.shape == () and bound.shape == (x.shape[0],)
    torch.testing.assert_close(loss.detach(), -bound.sum(), rtol=1e-9, atol=1e-9)


def test_beta_tempers_the_latent_terms_the_same_way_everywhere(lg, x):
    """With the same draw, every k=1 estimator's loss at beta is -(log p(x|z) + beta (log p(z) - log q(z|x)))."""
    vae = lg.build_vae(exact_posterior=False)
    beta = 0.3
    pyro.set_rng_seed(5)
    guide_trace, model_trace = traces.particle_traces(vae, x, 1)
    z = guide_trace.nodes["z"]
    latent = model_trace.nodes["z"]["fn"].log_prob(z["value"]) - z["fn"].log_prob(z["value"])
    observed = model_trace.nodes["x"]["fn"].log_prob(model_trace.nodes["x"]["value"])
    expected = -(observed + beta * latent).sum()
    for spec in ["trace", "iwae(k=1)", "stl", "dreg(k=1)", "renyi(alpha=0.5, k=1)", "tracegraph"]:
        pyro.set_rng_seed(5)
        torch.testing.assert_close(estimators.get(spec).loss(vae, x, beta).detach(), expected, msg=spec)
    jit = estimators.get("jit_trace")
    jit.loss(vae, x, 0.2), jit.loss(vae, x, 0.7)
    assert len(jit._compiled) == 1, "a new beta must not recompile the JIT estimator"


def test_iwae_increases_with_k_towards_log_px(lg, x):
    """E[L_k] is non-decreasing in k and tends to log p(x) (Burda et al. 2015, Theorem 1)."""
    vae = lg.build_vae(exact_posterior=False)
    exact = lg.log_px(x).mean()
    ks, repeats = (1, 5, 50, 500), 60
    stats = {k: mean_se(bounds(vae, x, f"iwae(k={k})", repeats)) for k in ks}
    for k, (mean, se) in stats.items():
        report(f"iwae(k={k}) batch-mean bound", mean, se, exact)
    for a, b in itertools.pairwise(ks):
        (ma, sa), (mb, sb) = stats[a], stats[b]
        diff, se = mb - ma, math.hypot(sa, sb)
        assert diff >= -4 * se, f"iwae(k={b}) < iwae(k={a}) by {-diff:.4f} nats ({-diff / se:.1f} SE)"
    gap_1 = exact - stats[1][0]
    gap_500, se_500 = exact - stats[500][0], stats[500][1]
    assert gap_1 > 0.5, f"the test needs a visible ELBO gap, got {gap_1:.3f} nats"
    assert gap_500 >= -4 * se_500, "iwae(k=500) exceeds log p(x): not a lower bound"
    assert gap_500 < 0.1 * gap_1, f"the gap shrinks too little: {gap_1:.3f} -> {gap_500:.3f} nats"


@pytest.mark.parametrize("spec", ["iwae(k=1)", "closed_form", "meanfield", "trace"])
def test_one_draw_bounds_are_the_elbo_in_expectation(lg, x, spec):
    vae = lg.build_vae(exact_posterior=False)
    mean, se = mean_se(bounds(vae, x, spec, 200))
    assert_within_se(f"{spec} vs exact ELBO", mean, exact_elbo(vae, lg, x).mean().detach(), se)


def test_renyi_at_alpha_zero_is_iwae_on_the_same_draws(lg, x):
    vae = lg.build_vae(exact_posterior=False)
    values = {}
    for spec in ("iwae(k=7)", "renyi(alpha=0, k=7)", "renyi(alpha=0.0, k=7)"):
        pyro.set_rng_seed(11)
        values[spec] = (estimators.get(spec).bound(vae, x), estimators.get(spec).loss(vae, x))
    for spec in ("renyi(alpha=0, k=7)", "renyi(alpha=0.0, k=7)"):
        assert torch.equal(values[spec][0], values["iwae(k=7)"][0])
        assert torch.equal(values[spec][1], values["iwae(k=7)"][1])


def test_renyi_bound_is_monotone_in_alpha_and_continuous_at_one():
    """On fixed log weights, 1/(1-a) log mean w^(1-a) is non-increasing in a (power means); a -> 1 gives mean log w."""
    log_w = torch.randn(9, 20, dtype=torch.float64) * 3
    values = [estimators.get(f"renyi(alpha={a}, k=9)").aggregate(log_w) for a in (-2.0, -0.5, 0.0, 0.5, 1.0, 3.0)]
    for lower_alpha, higher_alpha in itertools.pairwise(values):
        assert (higher_alpha <= lower_alpha + 1e-12).all()
    torch.testing.assert_close(values[4], log_w.mean(0))
    near_one = estimators.get("renyi(alpha=0.999999, k=9)").aggregate(log_w)
    torch.testing.assert_close(near_one, log_w.mean(0), rtol=0, atol=1e-4)
    torch.testing.assert_close(values[2], torch.logsumexp(log_w, 0) - math.log(9))


def test_renyi_is_per_example_unlike_pyro_renyi_elbo(lg, x):
    """Each example's bound depends on its own weights only: changing one example changes only its entry."""
    vae = lg.build_vae(exact_posterior=False)
    estimator = estimators.get("renyi(alpha=0.5, k=4)")
    pyro.set_rng_seed(2)
    before = estimator.bound(vae, x)
    moved = x.clone()
    moved[0] += 3.0
    pyro.set_rng_seed(2)
    after = estimator.bound(vae, moved)
    assert not torch.isclose(before[0], after[0])
    torch.testing.assert_close(before[1:], after[1:])


# -- gradients ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ELBO_SPECS)
def test_elbo_gradients_are_unbiased(lg, x, spec):
    """The mean gradient over draws equals the exact ELBO gradient, coordinate by coordinate."""
    vae = lg.build_vae(exact_posterior=False)
    vae.zero_grad(set_to_none=True)
    exact_elbo(vae, lg, x).mean().backward()
    exact = flat_grad(vae)
    samples = gradients(vae, x, spec, range(200))
    mean, se = mean_se(samples)
    worst = report(f"{spec} gradient vs exact ELBO gradient", mean, se, exact)
    assert worst <= bonferroni(len(exact)), f"{spec}: |z| = {worst:.2f} over {len(exact)} coordinates"


def test_stl_guide_gradient_vanishes_at_the_exact_posterior(lg, x):
    """Roeder et al. 2017: at q = p(z|x), log p(x, z) - log q(z|x) = log p(x) for every z, so STL's guide
    gradient is zero for every draw, while the full pathwise gradient (``trace``) keeps the score term."""
    vae = lg.build_vae(exact_posterior=True)
    for seed in range(10):
        for spec in ("stl", "stl(k=4)", "dreg(k=4)"):
            grad = gradients(vae, x, spec, [seed], group="encoder")
            assert grad.abs().max() < 1e-9, f"{spec}: guide gradient {grad.abs().max():.3g} at the exact posterior"
        grad = gradients(vae, x, "trace", [seed], group="encoder")
        assert grad.abs().max() > 1e-2, "trace's guide gradient should be noisy at the exact posterior"
        # and every bound is log p(x) exactly, whatever the draw
        pyro.set_rng_seed(seed)
        torch.testing.assert_close(estimators.get("iwae(k=4)").bound(vae, x), lg.log_px(x))


def _paired(vae, x, spec_a: str, spec_b: str, repeats: int, group: str):
    """Gradients of two estimators on the same seeds (the same draws of z), shape (repeats, params) each."""
    return gradients(vae, x, spec_a, range(repeats), group), gradients(vae, x, spec_b, range(repeats), group)


def _total_variance_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean and SE of D_r = ||a_r - mean a||^2 - ||b_r - mean b||^2: the difference of total variances."""
    d = (a - a.mean(0)).square().sum(1) - (b - b.mean(0)).square().sum(1)
    mean, se = mean_se(d)
    return float(mean), float(se)


def test_dreg_matches_the_iwae_gradient_in_expectation_with_lower_variance(lg, x):
    """Tucker et al. 2019: DReG is unbiased for the IWAE gradient of the guide, with less variance; the model
    gets the IWAE gradient itself (identical on identical draws)."""
    vae = lg.build_vae(exact_posterior=False)
    repeats = 200
    iwae, dreg = _paired(vae, x, "iwae(k=5)", "dreg(k=5)", repeats, "encoder")
    diff_mean, diff_se = mean_se(dreg - iwae)
    worst = report("dreg(k=5) - iwae(k=5) guide gradient (paired)", diff_mean, diff_se, torch.zeros_like(diff_mean))
    assert worst <= bonferroni(iwae.shape[1])
    reduction, se = _total_variance_difference(iwae, dreg)
    report("total guide-gradient variance, iwae - dreg", reduction, se)
    assert reduction > 4 * se, "DReG should have a lower guide-gradient variance than IWAE"
    model_iwae, model_dreg = _paired(vae, x, "iwae(k=5)", "dreg(k=5)", 5, "decoder")
    torch.testing.assert_close(model_dreg, model_iwae, rtol=1e-10, atol=1e-12)


def test_the_paired_gradient_test_detects_stl_bias_for_k_above_one(lg, x):
    """The same test has the power to fail: STL with k > 1 is biased for the IWAE gradient (Tucker et al. 2019)."""
    vae = lg.build_vae(exact_posterior=False)
    iwae, stl = _paired(vae, x, "iwae(k=5)", "stl(k=5)", 100, "encoder")
    diff_mean, diff_se = mean_se(stl - iwae)
    worst = report("stl(k=5) - iwae(k=5) guide gradient (paired)", diff_mean, diff_se, torch.zeros_like(diff_mean))
    assert worst > bonferroni(iwae.shape[1])


@pytest.mark.parametrize("spec", ["meanfield", "closed_form"])
def test_analytic_kl_lowers_the_guide_gradient_variance(lg, x, spec):
    vae = lg.build_vae(exact_posterior=False)
    trace, analytic = _paired(vae, x, "trace", spec, 200, "encoder")
    reduction, se = _total_variance_difference(trace, analytic)
    report(f"total guide-gradient variance, trace - {spec}", reduction, se)
    assert reduction > 4 * se


def test_tracegraph_is_the_high_variance_score_function_estimator(lg, x):
    vae = lg.build_vae(exact_posterior=False)
    trace, score = _paired(vae, x, "trace", "tracegraph", 100, "encoder")
    ratio = score.var(0).sum() / trace.var(0).sum()
    print(f"[stat] guide-gradient variance ratio tracegraph / trace: {ratio:.3g}")
    assert ratio > 3, "without reparameterization the guide gradient should be much noisier"


# -- end to end ---------------------------------------------------------------------------------------
TINY_CONFIG = """\
[model]
z_dim = 2
hidden_dims = [8]

[data]
name = "synthetic(side=4, num_train=48, num_test=16)"

[train]
epochs = 1
batch_size = 16
warmup_epochs = 1
nll_samples = 0
plots = false
device = "cpu"
"""


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_every_estimator_trains_through_pyro_vae_train(tmp_path, spec):
    """A few steps of ``pyro-vae train`` with KL warm-up (beta < 1) and a smaller last batch."""
    from pyro_vae.cli import main

    config = tmp_path / "tiny.toml"
    config.write_text(TINY_CONFIG)
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run), "--set", f"train.estimator={spec}"]) == 0
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(record["train_elbo"]) and record["train_elbo"] < 0
