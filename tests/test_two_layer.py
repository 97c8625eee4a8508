"""The two-stochastic-layer VAE (Burda et al. 2015, section 5), structure ``two_layer``, checked on an
exactly tractable instance: the two-layer linear-Gaussian model

    z2 ~ N(0, I_K2),   z1 | z2 ~ N(A z2 + a, diag(sigma1^2)),   x | z1 ~ N(W z1 + b, s^2 I_D),

built as ``two_layer(hidden=[])`` with ``hidden_dims=()`` (every network one linear map) and a
fixed-scale Gaussian likelihood. Marginally z1 ~ N(a, C1), C1 = A A^T + diag(sigma1^2), and

    p(x)        = N(W a + b, W C1 W^T + s^2 I),
    p(z1 | x)   = N(S1 (C1^-1 a + W^T (x - b) / s^2), S1),   S1 = (C1^-1 + W^T W / s^2)^-1,
    p(z2 | z1, x) = p(z2 | z1) = N(S2 A^T P (z1 - a), S2),   S2 = (I + A^T P A)^-1,  P = diag(sigma1^-2),

z2 being independent of x given z1. With A's rows and columns orthogonal (a scaled permutation
embedding) and W's columns orthogonal, C1, S1 and S2 are diagonal, so the exact posterior
p(z1|x) p(z2|z1) is the structure's guide q(z1|x) q(z2|z1) at some weights: then every log
weight is log p(x) draw by draw. Statistical checks use a guide away from it, fixed seeds, and
tolerances of 4-5 standard errors computed from the draws (``pytest -s`` prints them).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import pyro
import pytest
import torch
from linear_gaussian import inverse_softplus
from mc_stats import assert_within_se, mean_se, report
from torch.distributions import MultivariateNormal

from pyro_vae import cli, estimators
from pyro_vae.checks import load_config
from pyro_vae.config import ConfigError
from pyro_vae.evaluate import latent_diagnostics, log_likelihood_with_se
from pyro_vae.model import VAE
from pyro_vae.networks import MIN_SCALE
from pyro_vae.specs import SpecError
from pyro_vae.structures import TwoLayerVAE
from pyro_vae.traces import log_weights, meanfield_elbo_loss
from pyro_vae.train import train
from pyro_vae.train.step import TrainStep

DTYPE = torch.float64
D, K1, K2, S = 6, 3, 2, 0.5
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ("encoder", "decoder", "z2_encoder", "z1_decoder")  # q(z1|x), p(x|z1), q(z2|z1), p(z1|z2)


class TwoLayerLinearGaussian:
    """The model's weights (set by hand), its exact marginal and posterior, and the VAE that holds them."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(D, K1, dtype=DTYPE, generator=g))
        self.W = q * torch.tensor([0.6, 1.3, 2.0], dtype=DTYPE)  # orthogonal columns: W^T W diagonal
        self.b = 0.3 * torch.randn(D, dtype=DTYPE, generator=g)
        # Rows and columns orthogonal: z2_2 drives z1_1, z2_1 drives z1_2, z1_3 has no parent.
        self.A = torch.tensor([[0.0, 1.2], [0.7, 0.0], [0.0, 0.0]], dtype=DTYPE)
        self.a = torch.tensor([0.2, -0.1, 0.3], dtype=DTYPE)
        self.sigma1 = torch.tensor([0.6, 0.8, 1.1], dtype=DTYPE)

    def marginal(self) -> MultivariateNormal:
        c1 = self.A @ self.A.T + torch.diag(self.sigma1.square())
        return MultivariateNormal(self.W @ self.a + self.b, self.W @ c1 @ self.W.T + S**2 * torch.eye(D, dtype=DTYPE))

    def log_px(self, x: torch.Tensor) -> torch.Tensor:
        return self.marginal().log_prob(x)

    def posterior_z1(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gain G, offset g, cov S1) with E[z1|x] = G x + g."""
        c1_inv = torch.linalg.inv(self.A @ self.A.T + torch.diag(self.sigma1.square()))
        cov = torch.linalg.inv(c1_inv + self.W.T @ self.W / S**2)
        gain = cov @ self.W.T / S**2
        return gain, cov @ c1_inv @ self.a - gain @ self.b, cov

    def posterior_z2(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gain H, offset h, cov S2) with E[z2|z1] = H z1 + h."""
        precision = torch.diag(self.sigma1.square().reciprocal())
        cov = torch.linalg.inv(torch.eye(K2, dtype=DTYPE) + self.A.T @ precision @ self.A)
        gain = cov @ self.A.T @ precision
        return gain, -gain @ self.a, cov

    def build_vae(self, gain_factor: float = 1.0, scale_factor: float = 1.0, shift: float = 0.0) -> VAE:
        """The float64 VAE with this model's weights; the guide is the exact posterior at factors 1 and shift 0."""
        vae = VAE(
            D, K1, hidden_dims=(), likelihood=f"gaussian(scale={S})", structure=f"two_layer(z2_dim={K2}, hidden=[])"
        )
        vae = vae.double()
        with torch.no_grad():
            vae.decoder.head.weight.copy_(self.W)
            vae.decoder.head.bias.copy_(self.b)
        set_gaussian(vae.z1_decoder, self.A, self.a, self.sigma1)
        for module, (gain, offset, cov) in ((vae.encoder, self.posterior_z1()), (vae.z2_encoder, self.posterior_z2())):
            assert (cov - torch.diag(cov.diagonal())).abs().max() < 1e-15, "the exact posterior must be diagonal"
            offset = offset + shift * torch.linspace(-1, 1, len(offset), dtype=DTYPE)
            set_gaussian(module, gain_factor * gain, offset, scale_factor * cov.diagonal().sqrt())
        return vae


def set_gaussian(module, gain: torch.Tensor, offset: torch.Tensor, scale: torch.Tensor) -> None:
    """Make a linear diagonal-Gaussian network (``networks.GaussianEncoder`` with no hidden layer) output
    N(gain @ input + offset, diag(scale^2)): scale = softplus(raw) + MIN_SCALE with a constant raw."""
    head, k = module.net.head, len(offset)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[:k].copy_(gain)
        head.bias[:k].copy_(offset)
        head.bias[k:].copy_(inverse_softplus(scale - MIN_SCALE))


@pytest.fixture(scope="module")
def lg() -> TwoLayerLinearGaussian:
    return TwoLayerLinearGaussian()


@pytest.fixture(scope="module")
def x(lg) -> torch.Tensor:
    torch.manual_seed(1)
    return lg.marginal().sample((8,))


def bound_means(vae, x, spec: str, repeats: int) -> torch.Tensor:
    """(repeats, batch): per-example bounds with fresh draws."""
    estimator = estimators.get(spec)
    return torch.stack([estimator.bound(vae, x) for _ in range(repeats)])


# -- exact guide: every bound is log p(x), draw by draw ------------------------------------------------
def test_at_the_exact_posterior_every_bound_is_log_px_draw_by_draw(lg, x):
    vae, exact = lg.build_vae(), lg.log_px(x)
    pyro.set_rng_seed(0)
    torch.testing.assert_close(log_weights(vae, x, k=7).detach(), exact.expand(7, -1), rtol=0, atol=1e-9)
    for spec in ("trace", "tracegraph", "jit_trace", "iwae(k=5)", "renyi(alpha=0.5, k=3)", "stl", "dreg(k=4)"):
        estimator = estimators.get(spec)
        torch.testing.assert_close(estimator.bound(vae, x), exact, rtol=0, atol=1e-9, msg=spec)
        torch.testing.assert_close(estimator.loss(vae, x).detach(), -exact.sum(), rtol=0, atol=1e-8, msg=spec)
    # meanfield replaces z2's log-ratio by its expectation given z1, so only its mean is log p(x) here
    meanfield = log_weights(vae, x.repeat(400, 1), 1, analytic_kl=True)[0].reshape(400, -1).detach()
    assert float(meanfield.std(0).min()) > 1e-3
    mean, se = mean_se(meanfield)
    assert_within_se("meanfield at the exact posterior", mean, exact, se, n_se=4.5)
    estimate, se = log_likelihood_with_se(vae, x, num_samples=50, chunk_size=20)
    torch.testing.assert_close(estimate, exact, rtol=0, atol=1e-9)
    assert float(se.max()) < 1e-6


def test_stl_and_dreg_guide_gradients_vanish_at_the_exact_posterior(lg, x):
    """Roeder et al. 2017, Tucker et al. 2019: at q = p(z1, z2|x) the log weight is constant in (z1, z2), so the
    path-only guide gradients are zero for every draw -- for both guide layers -- while trace's score term is not."""
    vae = lg.build_vae()
    guide_params = [p for name in ("encoder", "z2_encoder") for p in getattr(vae, name).parameters()]
    for seed, spec in itertools.product(range(3), ("stl", "stl(k=4)", "dreg(k=4)", "trace")):
        pyro.set_rng_seed(seed)
        vae.zero_grad(set_to_none=True)
        estimators.get(spec).loss(vae, x).backward()
        largest = max(float(p.grad.abs().max()) for p in guide_params)
        if spec == "trace":
            assert largest > 1e-2, "trace's guide gradient keeps its score term at the exact posterior"
        else:
            assert largest < 1e-9, f"{spec}: guide gradient {largest:.3g} at the exact posterior"


# -- a guide away from the posterior: bounds, their order and their gradients ----------------------------
def test_elbo_is_below_log_px_and_iwae_rises_with_k_towards_it(lg, x):
    """Burda et al. 2015, Theorem 1: E[L_1] <= E[L_10] <= E[L_100] <= log p(x), the gap shrinking with k."""
    vae, exact = lg.build_vae(gain_factor=0.7, scale_factor=1.5, shift=0.4), lg.log_px(x).mean()
    pyro.set_rng_seed(0)
    stats = {spec: mean_se(bound_means(vae, x, spec, 200).mean(1)) for spec in ("trace", "meanfield")}
    stats |= {f"iwae(k={k})": mean_se(bound_means(vae, x, f"iwae(k={k})", 60).mean(1)) for k in (1, 10, 100)}
    for key, (mean, se) in stats.items():
        report(f"{key} batch-mean bound", mean, se, exact)
    for spec in ("trace", "meanfield"):
        mean, se = stats[spec]
        assert exact - mean > 5 * se and exact - mean > 0.5, f"{spec}: the ELBO must sit visibly below log p(x)"
    for a, b in itertools.pairwise(("iwae(k=1)", "iwae(k=10)", "iwae(k=100)")):
        (ma, sa), (mb, sb) = stats[a], stats[b]
        assert mb - ma > 5 * math.hypot(sa, sb), f"{b} is not above {a}"
    mean, se = stats["iwae(k=100)"]
    assert exact - mean >= -4 * se, "iwae(k=100) exceeds log p(x): not a lower bound"
    assert exact - mean < 0.25 * (exact - stats["iwae(k=1)"][0]), "the IWAE gap shrinks too little from k = 1 to 100"


DRAWS = 4000


def test_meanfield_is_unbiased_and_the_analytic_kl_of_z1_would_not_be(lg, x, monkeypatch):
    """meanfield takes KL(q(z2|z1) || p(z2)) analytically, the exact expectation over z2 given z1: its mean is
    trace's. Taking KL(q(z1|x) || p(z1|z2)) at the drawn z2 too (Pyro's TraceMeanField_ELBO would) is biased."""
    vae = lg.build_vae(gain_factor=0.7, scale_factor=1.5, shift=0.4)
    pyro.set_rng_seed(1)
    x_many = x.repeat(DRAWS, 1)  # DRAWS draws per example, in one call
    trace = log_weights(vae, x_many, 1)[0].reshape(DRAWS, -1).detach()
    meanfield = log_weights(vae, x_many, 1, analytic_kl=True)[0].reshape(DRAWS, -1).detach()
    (mt, st), (mm, sm) = mean_se(trace), mean_se(meanfield)
    assert_within_se("meanfield vs trace, per example", mm - mt, torch.zeros_like(mm), torch.hypot(st, sm), n_se=4.5)
    monkeypatch.setattr(TwoLayerVAE, "analytic_kl_sites", None)  # what a structure without the restriction gets
    biased = log_weights(vae, x_many, 1, analytic_kl=True)[0].reshape(DRAWS, -1).detach()
    mb, sb = mean_se(biased)
    z = ((mb - mt) / torch.hypot(sb, st)).abs().max()
    report("KL of z1 at the drawn z2 vs trace (must differ)", mb - mt, torch.hypot(sb, st), torch.zeros_like(mb))
    assert z > 8, "the test cannot tell the biased bound from the right one"


def test_meanfield_lean_loss_is_the_trace_based_loss(lg, x):
    """The training step's lean meanfield loss and MeanFieldELBO.loss (from log_weights) agree in value and
    gradient on the same draws, and neither is Pyro's TraceMeanField_ELBO for this structure."""
    vae = lg.build_vae(gain_factor=0.7, scale_factor=1.5, shift=0.4)
    results = []
    for loss_fn in (meanfield_elbo_loss, estimators.get("meanfield").loss):
        pyro.set_rng_seed(3)
        vae.zero_grad(set_to_none=True)
        loss = loss_fn(vae, x, 0.7)
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in vae.parameters()])))
    (lean, lean_grad), (traced, traced_grad) = results
    torch.testing.assert_close(lean, traced, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(lean_grad, traced_grad, rtol=1e-9, atol=1e-9)
    step = TrainStep(vae, estimators.get("meanfield"), torch.optim.SGD(vae.parameters(), lr=0.0))
    for _ in range(2):
        assert torch.isfinite(step(x))


def test_importance_sampled_nll_matches_the_exact_log_likelihood(lg, x):
    """k = 5000 with a guide near the posterior: the estimate's bias (about Var(w) / (2k) nats) is far below
    its standard error, so it must sit within 5 SE of log p(x), example by example and on average."""
    vae, exact = lg.build_vae(gain_factor=0.9, scale_factor=1.2, shift=0.1), lg.log_px(x)
    pyro.set_rng_seed(2)
    estimate, se = log_likelihood_with_se(vae, x, num_samples=5000, chunk_size=1000)
    assert float(se.min()) > 1e-4, "the guide must not be exact here, or the test proves nothing"
    assert_within_se("IS log p(x), per example", estimate, exact, se, n_se=5)
    assert_within_se("IS log p(x), mean", estimate.mean(), exact.mean(), se.square().sum().sqrt() / len(se), n_se=5)


# -- estimators, errors, training ------------------------------------------------------------------------
def test_every_estimator_trains_both_layers_or_refuses_in_one_line(lg, x):
    vae = lg.build_vae(gain_factor=0.7, scale_factor=1.5, shift=0.4)
    refused = {
        "closed_form": re.escape("no closed form for KL(q(z1|x) || p(z1|z2)) under q(z2|z1)") + ".*trace, meanfield",
        "jit_meanfield": "^estimator 'jit_meanfield' takes the analytic KL at every latent site.*z2 only; use mean",
    }
    for name in estimators.names():
        estimator = estimators.get(name)
        if name in refused:  # closed_form has no bound either; jit_meanfield's bound is meanfield's
            for call in (estimator.loss, estimator.bound) if name == "closed_form" else (estimator.loss,):
                with pytest.raises(ValueError, match=refused[name]) as info:
                    call(vae, x)
                assert "\n" not in str(info.value)
            continue
        vae.zero_grad(set_to_none=True)
        loss = estimator.loss(vae, x)
        loss.backward()
        assert torch.isfinite(loss), name
        for group in GROUPS:
            grads = [p.grad for p in getattr(vae, group).parameters()]
            assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0, (name, group)


def test_the_structure_and_its_conveniences(lg, x, monkeypatch):
    vae = lg.build_vae()
    assert vae.latent_sites == ("z1", "z2") and vae.analytic_kl_sites == ("z2",)
    assert [name for name, _ in vae.named_children()] == [
        "likelihood",
        "encoder",
        "decoder",
        "z2_encoder",
        "z1_decoder",
        "prior",
    ]
    assert not hasattr(vae, "prior_distribution")
    loc, scale = vae.encode(x)
    gain, offset, cov = lg.posterior_z1()
    torch.testing.assert_close(loc, x @ gain.T + offset)
    torch.testing.assert_close(scale, cov.diagonal().sqrt().expand_as(scale))
    torch.testing.assert_close(vae.posterior(x).mean, loc)
    # E[x|z1] at the posterior mean of z1 (the Gaussian likelihood's mean is clamped to data units)
    torch.testing.assert_close(vae.reconstruct(x), (loc @ lg.W.T + lg.b).clamp(0, 1))
    # Ancestral samples z2 ~ p(z2), z1 ~ p(z1|z2): unclamped, E[x|z1] = W z1 + b has mean W a + b, covariance W C1 W^T
    monkeypatch.setattr(type(vae.likelihood), "mean", lambda self, params: params)
    torch.manual_seed(0)
    samples = vae.sample(20000)
    mean, se = mean_se(samples)
    assert_within_se("E[x|z1] of ancestral samples, mean", mean, lg.W @ lg.a + lg.b, se, n_se=5)
    c1 = lg.A @ lg.A.T + torch.diag(lg.sigma1.square())
    variance = (samples - lg.W @ lg.a - lg.b).square()  # unbiased for the variance, the mean being exact
    mean, se = mean_se(variance)
    assert_within_se("E[x|z1] of ancestral samples, variance", mean, (lg.W @ c1 @ lg.W.T).diagonal(), se, n_se=5)
    diagnostics = latent_diagnostics(vae, x, batch_size=8)
    assert diagnostics["active_units"] is None and "not TwoLayerVAE's sites" in diagnostics["kl_per_dim_error"]


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"structure": "two_layer(z2_dim=0)"}, "z2_dim must be a positive integer, got 0"),
        ({"structure": "two_layer(hidden=[0])"}, "hidden[0] must be a positive integer, got 0"),
        ({"structure": "two_layer(activation='swish')"}, "unknown activation 'swish'"),
        ({"structure": "two_layer", "prior": "vamp(components=2)"}, "model.prior must be 'normal'"),
        ({"structure": "two_layer", "guide": "iaf"}, "model.guide must be 'normal', got 'iaf'"),
    ],
)
def test_bad_structure_arguments_are_one_line_errors(kwargs, phrase):
    with pytest.raises(SpecError) as info:
        VAE(x_dim=4, z_dim=2, hidden_dims=[4], **kwargs)
    assert phrase in str(info.value) and "\n" not in str(info.value)


def test_config_and_command_line_refuse_bad_structure_arguments(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"model.structure: structure 'two_layer' has no argument 'z3_dim'"):
        load_config(None, ["model.structure=two_layer(z3_dim=2)"])
    config = tmp_path / "tiny.toml"
    config.write_text('[model]\nstructure = "two_layer(z2_dim=0)"\n\n[data]\nname = "synthetic"\n')
    assert (
        cli.main(["train", "--config", str(config), "--out", str(tmp_path / "run"), "--set", "train.device=cpu"]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert "z2_dim must be a positive integer, got 0" in err and "\n" not in err and "Traceback" not in err


def test_a_short_training_run_writes_metrics_checkpoint_evaluation_and_figures(tmp_path, capsys):
    cfg = load_config(
        None,
        [
            "data.name=synthetic(num_train=200, num_test=60, side=4, components=3)",
            "model.z_dim=3",
            "model.hidden_dims=[8]",
            "model.structure=two_layer(z2_dim=2, hidden=[6])",
            "train.estimator=iwae(k=3)",
            "train.epochs=2",
            "train.batch_size=40",
            "train.lr=0.01",
            "train.nll_samples=20",
            "train.device=cpu",
        ],
    )
    out = tmp_path / "run"
    train(cfg, out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and all(r["test_elbo"] < 0 for r in records)
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["test_nll"] > 0 and evaluation["active_units"] is None
    for name in ("checkpoint.pt", "samples.png", "reconstructions.png", "latent_codes.png", "interpolation.png"):
        assert (out / name).is_file(), name
    assert cli.main(["evaluate", "--run", str(out), "--nll-samples", "10", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test_nll"] > 0 > result["test_elbo"]
    (out / "samples.png").unlink()
    assert cli.main(["plot", "--run", str(out)]) == 0 and (out / "samples.png").is_file()


def test_the_shipped_config_is_the_papers_two_layer_model():
    from pyro_vae.runs import build_vae

    cfg = load_config(CONFIGS / "mnist_dynamic_2layer.toml")
    assert (cfg.data.name, cfg.train.nll_samples, cfg.model.hidden_dims) == ("mnist-dynamic", 5000, [200, 200])
    vae = build_vae(cfg.model, x_dim=784)
    widths = {
        name: [m.out_features for m in getattr(vae, name).modules() if isinstance(m, torch.nn.Linear)]
        for name in GROUPS
    }
    # 784-(200-200)-100-(100-100)-50 with Gaussian heads (loc and scale: twice the latent size)
    assert widths == {
        "encoder": [200, 200, 200],
        "decoder": [200, 200, 784],
        "z2_encoder": [100, 100, 100],
        "z1_decoder": [100, 100, 200],
    }
    assert vae.z_dim == 100 and vae.z2_dim == 50 and isinstance(vae.encoder.net.body.layers[1], torch.nn.Tanh)
