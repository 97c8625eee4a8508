"""The Pyro VAE (pyro_vae/model.py): structure, shapes, and agreement with the hand-written ELBO.

The statistical tests compare Pyro's estimators with ``closed_form_elbo`` by the method of batch
means: repeat r = 1..R draws one Pyro estimate (M vectorized particles) and one independent
closed-form estimate (M draws). The spread of the R repeats gives each side's standard error with
no assumption on the per-particle distribution beyond the CLT over M particles. For gradients the
R differences D_r are i.i.d. with mean (Trace_ELBO gradient) - (closed-form gradient), which is 0
when both are right, so mean(D) / SE(D) is a one-sample t statistic with R - 1 degrees of freedom.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from mc_stats import assert_within_se, mean_se, report
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from scipy import stats

from pyro_vae import VAE, closed_form_elbo
from pyro_vae.estimators import log_weights

X_DIM, Z_DIM, HIDDEN, BATCH = 40, 4, (16,), 8
REPEATS, PARTICLES = 40, 250  # losses: 10^4 particles per estimator in all
GRAD_REPEATS, GRAD_PARTICLES = 30, 100  # gradients: 3000 particles per estimator (the SNR is still ~200)
# The statistical checks do not depend on the network: they run on the MLP and on a conv body (x as a
# 1 x 4 x 10 image, halved once).
BODIES = {
    "mlp": {"hidden_dims": HIDDEN},
    "conv": {"x_shape": (1, 4, 10), "encoder": "conv(channels=4, depth=1)", "decoder": "conv(channels=4, depth=1)"},
}


def make_vae(body: str = "mlp") -> VAE:
    return VAE(x_dim=X_DIM, z_dim=Z_DIM, **BODIES[body])


# -- structure ---------------------------------------------------------------------------
def test_default_vae_builds_and_runs():
    """VAE(x_dim=784, z_dim=10) works with defaults: Pyro's tutorial net 784-400-(10+10), softplus."""
    vae = VAE(x_dim=784, z_dim=10)
    shapes = [tuple(p.shape) for p in vae.encoder.parameters()]
    assert shapes == [(400, 784), (400,), (20, 400), (20,)]
    shapes = [tuple(p.shape) for p in vae.decoder.parameters()]
    assert shapes == [(400, 10), (400,), (784, 400), (784,)]
    x = torch.bernoulli(torch.full((3, 784), 0.3))
    loss = Trace_ELBO().loss(vae.model, vae.guide, x)
    assert math.isfinite(loss) and loss > 0


def test_iwae_paper_network_is_expressible():
    vae = VAE(x_dim=784, z_dim=50, hidden_dims=(200, 200), activation="tanh")
    layers = [m for m in vae.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in layers] == [(784, 200), (200, 200), (200, 100)]
    assert any(isinstance(m, torch.nn.Tanh) for m in vae.decoder.modules())


@pytest.fixture
def vae():
    return make_vae("mlp")


@pytest.fixture
def x():
    return torch.bernoulli(torch.full((BATCH, X_DIM), 0.5), generator=torch.Generator().manual_seed(0))


def test_traces_have_latent_z_and_observed_x(vae, x):
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    z_site, x_site = model_trace.nodes["z"], model_trace.nodes["x"]
    assert z_site["type"] == x_site["type"] == "sample"
    assert not z_site["is_observed"] and x_site["is_observed"]
    assert torch.equal(x_site["value"], x)
    assert torch.equal(z_site["value"], guide_trace.nodes["z"]["value"])  # replayed from the guide
    assert guide_trace.nodes["z"]["value"].shape == (BATCH, Z_DIM)
    assert guide_trace.nodes["z"]["fn"].event_shape == (Z_DIM,)
    assert [n for n, s in guide_trace.nodes.items() if s["type"] == "sample"] == ["data", "z"]
    # One plate over the batch; per-example log-densities.
    model_trace.compute_log_prob()
    assert z_site["log_prob"].shape == x_site["log_prob"].shape == (BATCH,)
    assert [f.name for f in x_site["cond_indep_stack"]] == ["data"]
    # The prior is N(0, I).
    prior = z_site["fn"]
    assert (prior.mean == 0).all() and (prior.variance == 1).all() and prior.event_shape == (Z_DIM,)


def test_networks_registered_with_pyro_module(vae, x):
    poutine.trace(vae.guide).get_trace(x)
    poutine.trace(vae.model).get_trace(x)
    store = dict(pyro.get_param_store().named_parameters())
    encoder = {f"encoder$$${n}" for n, _ in vae.encoder.named_parameters()}
    decoder = {f"decoder$$${n}" for n, _ in vae.decoder.named_parameters()}
    assert encoder and decoder and encoder | decoder <= set(store)
    # The param store holds the module's own tensors, so SVI's optimizer updates the module.
    for name, p in vae.encoder.named_parameters():
        assert store[f"encoder$$${name}"] is p


def test_beta_scales_the_latent_site_only(vae, x):
    guide_trace = poutine.trace(vae.guide).get_trace(x, 0.25)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x, 0.25)
    assert guide_trace.nodes["z"]["scale"] == model_trace.nodes["z"]["scale"] == 0.25
    assert model_trace.nodes["x"]["scale"] == 1.0


def test_encode_reconstruct_sample_shapes_and_ranges(vae, x):
    loc, scale = vae.encode(x)
    assert loc.shape == scale.shape == (BATCH, Z_DIM) and (scale > 0).all()
    q = vae.posterior(x)
    assert q.batch_shape == (BATCH,) and q.event_shape == (Z_DIM,)
    torch.testing.assert_close(q.mean, loc)
    for recon in (vae.reconstruct(x), vae.reconstruct(x, sample_z=True), vae.reconstruct(x.reshape(BATCH, 4, 10))):
        assert recon.shape == (BATCH, X_DIM) and ((recon >= 0) & (recon <= 1)).all()
        assert not recon.requires_grad
    samples = vae.sample(6)
    assert samples.shape == (6, X_DIM) and ((samples >= 0) & (samples <= 1)).all()
    p = vae.decode(torch.zeros(2, Z_DIM))
    assert p.batch_shape == (2,) and p.event_shape == (X_DIM,)


def test_module_device_and_dtype_decide(vae, x):
    """Nothing is hard-coded: a float64 module gives float64 results (the same holds for cuda, see test_cuda)."""
    vae = vae.double()
    assert closed_form_elbo(vae, x.double()).dtype == torch.float64
    assert vae.sample(2).dtype == torch.float64
    z = poutine.trace(vae.guide).get_trace(x.double()).nodes["z"]["value"]
    assert z.dtype == torch.float64 and z.device == x.device


# -- statistical agreement with the closed form ---------------------------------------------
@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("elbo_class", [Trace_ELBO, TraceMeanField_ELBO])
@torch.no_grad()
def test_pyro_loss_agrees_with_closed_form(x, elbo_class, body):
    """Pyro's loss with R x M vectorized particles equals -closed_form_elbo(...).sum() within 4 SE.

    SE of each side from R = 40 independent estimates (batch means); the two sides are independent,
    so the SE of the difference is sqrt(SE_pyro^2 + SE_closed^2), and |difference| <= 4 of those
    (a Welch t with about 2(R - 1) d.o.f.: P(|t| > 4) ~ 1e-4).
    """
    vae = make_vae(body)
    pyro.set_rng_seed(1)
    elbo = elbo_class(num_particles=PARTICLES, vectorize_particles=True, max_plate_nesting=1)
    pyro_losses = torch.tensor([elbo.loss(vae.model, vae.guide, x) for _ in range(REPEATS)], dtype=torch.float64)
    cf_losses = torch.stack([-closed_form_elbo(vae, x, num_samples=PARTICLES).sum().double() for _ in range(REPEATS)])
    pyro_mean, pyro_se = mean_se(pyro_losses)
    cf_mean, cf_se = mean_se(cf_losses)
    report(f"{elbo_class.__name__} loss (batch of {BATCH}, {REPEATS * PARTICLES} particles)", pyro_mean, pyro_se)
    report(f"-closed_form_elbo.sum() ({REPEATS * PARTICLES} draws)", cf_mean, cf_se)
    assert_within_se(
        f"{elbo_class.__name__} vs closed form (independent SEs combined)",
        pyro_mean,
        cf_mean,
        math.hypot(pyro_se.item(), cf_se.item()),
    )
    # A broken KL term moves the batch's loss by nats; the test resolves 4 x 0.1 nats or better.
    assert math.hypot(pyro_se.item(), cf_se.item()) < 0.1


@torch.no_grad()
def test_log_weights_match_trace_elbo_particles(vae, x):
    """Per-particle Trace_ELBO values from ``estimators.log_weights``: their mean is the closed-form ELBO (4 SE)."""
    pyro.set_rng_seed(2)
    lw = log_weights(vae, x, k=REPEATS * PARTICLES)
    assert lw.shape == (REPEATS * PARTICLES, BATCH)
    per_particle_elbo = lw.sum(1).double()  # the Trace_ELBO objective of one particle, summed over the batch
    mean, se = mean_se(per_particle_elbo)
    cf, cf_se = mean_se(
        torch.stack([closed_form_elbo(vae, x, num_samples=PARTICLES).sum().double() for _ in range(REPEATS)])
    )
    assert_within_se("log_weights ELBO sum vs closed form", mean, cf, math.hypot(se.item(), cf_se.item()))


def _flat_grad(loss, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double()


@pytest.fixture(scope="module", params=list(BODIES))
def gradient_repeats(request):
    """R paired gradient estimates (Trace_ELBO with M particles; closed form with M draws), plus a
    Trace_ELBO run at beta = 0.5 (KL halved) that the tests must tell apart from the closed form;
    one set per network body.
    """
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    vae = make_vae(request.param)
    x = torch.bernoulli(torch.full((BATCH, X_DIM), 0.5), generator=torch.Generator().manual_seed(0))
    params = [*vae.encoder.parameters(), *vae.decoder.parameters()]
    n_encoder = sum(p.numel() for p in vae.encoder.parameters())
    elbo = Trace_ELBO(num_particles=GRAD_PARTICLES, vectorize_particles=True, max_plate_nesting=1)

    def trace(beta=1.0):
        return _flat_grad(elbo.differentiable_loss(vae.model, vae.guide, x, beta), params)

    def closed():
        return _flat_grad(-closed_form_elbo(vae, x, num_samples=GRAD_PARTICLES).sum(), params)

    result = {
        "trace": torch.stack([trace() for _ in range(GRAD_REPEATS)]),
        "closed": torch.stack([closed() for _ in range(GRAD_REPEATS)]),
        "trace_half_kl": torch.stack([trace(0.5) for _ in range(GRAD_REPEATS)]),
        # An independent pilot estimate of the true gradient: a test direction chosen before looking at the data.
        "pilot": torch.stack([closed() for _ in range(GRAD_REPEATS)]).mean(0),
        "groups": {"encoder": slice(0, n_encoder), "decoder": slice(n_encoder, None)},
    }
    pyro.clear_param_store()
    return result


def _coordinate_t(a: torch.Tensor, b: torch.Tensor):
    """Per-coordinate paired t statistics; coordinates that are identically zero in both are checked exactly."""
    diff, se = mean_se(a - b, 0)
    zero = (se == 0) & (a.abs().amax(0) == 0) & (b.abs().amax(0) == 0)
    return diff, se, torch.where(zero, torch.zeros_like(diff), diff / se), zero


def test_trace_elbo_gradient_agrees_per_coordinate(gradient_repeats):
    """Every gradient coordinate of Trace_ELBO agrees with the closed form's, Bonferroni-corrected.

    For each of the P coordinates, t_i = mean(D_i) / SE(D_i) over R paired repeats is Student-t with
    R - 1 d.o.f. under "both gradients are unbiased for the same objective". The union bound makes
    P(max_i |t_i| > c) <= alpha for c = t_{R-1}^{-1}(1 - alpha / (2P)), whatever the correlations
    between coordinates; alpha = 1e-3. Coordinates whose gradient is exactly zero in every repeat (an
    input pixel that is 0 in the whole batch) must be zero in both.
    """
    trace, closed = gradient_repeats["trace"], gradient_repeats["closed"]
    _, _, t, zero = _coordinate_t(trace, closed)
    assert not torch.isnan(t).any(), "a coordinate has zero variance in one estimator but not the other"
    n = int((~zero).sum())
    critical = stats.t.ppf(1 - 1e-3 / (2 * n), GRAD_REPEATS - 1)
    worst = t.abs().max().item()
    snr = (closed.mean(0).abs() / mean_se(closed, 0)[1])[~zero]
    print(
        f"[stat] Trace_ELBO vs closed-form gradient: {n} coordinates, max |t| = {worst:.2f} "
        f"(Bonferroni critical value {critical:.2f}), mean t^2 = {t[~zero].square().mean():.3f} "
        f"(not asserted: the coordinates are strongly correlated), median |grad|/SE = {snr.median():.1f}, "
        f"coordinates with |grad| > 5 SE: {(snr > 5).float().mean():.0%}"
    )
    assert worst <= critical
    # The test has power: most coordinates of the gradient are far from zero relative to their SE.
    assert (snr > 5).float().mean() > 0.5


def _hotelling(d: torch.Tensor) -> tuple[float, float]:
    """Hotelling's T^2 for mean(d) = 0 from R i.i.d. rows of d (R, q): returns (F statistic, p-value).

    (R - q) / (q (R - 1)) * T^2 ~ F(q, R - q) when the rows are Gaussian (CLT over M particles).
    """
    r, q = d.shape
    mean, cov = d.mean(0), torch.cov(d.T).reshape(q, q)
    t2 = r * mean @ torch.linalg.solve(cov, mean)
    f = float((r - q) / (q * (r - 1)) * t2)
    return f, float(stats.f.sf(f, q, r - q))


def _directions(gradient_repeats) -> torch.Tensor:
    """Per parameter group: the (independent) pilot gradient and 3 fixed random directions; (P, 8)."""
    pilot, groups = gradient_repeats["pilot"], gradient_repeats["groups"]
    g = torch.Generator().manual_seed(4)
    columns = []
    for part in groups.values():
        for k in range(4):
            u = torch.zeros_like(pilot)
            u[part] = pilot[part] if k == 0 else torch.randn(pilot[part].shape, generator=g, dtype=pilot.dtype)
            columns.append(u / u.norm())
    return torch.stack(columns, 1)


def test_trace_elbo_gradient_agrees_in_aggregate(gradient_repeats):
    """Hotelling T^2 on 8 projections of the paired gradient differences: p-value > 1e-3.

    The projections are onto directions fixed before the test's draws (an independent pilot gradient
    and random directions, per encoder and decoder), so T^2 is exactly F-distributed under the null
    up to the CLT; unlike summing t_i^2 it stays valid with correlated coordinates. The same
    statistic must reject a wrong gradient: Trace_ELBO with the KL halved (beta = 0.5).
    """
    directions = _directions(gradient_repeats)
    closed = gradient_repeats["closed"] @ directions
    f, p = _hotelling(gradient_repeats["trace"] @ directions - closed)
    f_bad, p_bad = _hotelling(gradient_repeats["trace_half_kl"] @ directions - closed)
    proj_mean, proj_se = mean_se(gradient_repeats["trace"] @ directions - closed, 0)
    report(
        "gradient projections (encoder pilot, 3 random; decoder pilot, 3 random): trace - closed",
        proj_mean,
        proj_se,
        0.0,
    )
    print(f"[stat] Hotelling F = {f:.3f}, p = {p:.3g}; with the KL halved: F = {f_bad:.1f}, p = {p_bad:.3g}")
    assert p > 1e-3
    assert p_bad < 1e-6
