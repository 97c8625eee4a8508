"""Likelihoods p(x|z) (pyro_vae/likelihoods.py): log_prob against reference formulas, support checks.

References are written here in float64 numpy/scipy, independent of the library's code: scipy.stats
for Bernoulli, normal, Laplace and Beta; the continuous Bernoulli normalizer in its lambda form
2 artanh(1 - 2 lambda) / (1 - 2 lambda) (and the density's integral by quadrature); the
discretized logistic as differences of sigmoids over the bins of width 1/255 with open end bins.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyro
import pytest
import torch
from mc_stats import assert_within_se, mean_se
from pyro.infer import Trace_ELBO
from scipy import integrate, special, stats

from pyro_vae import VAE
from pyro_vae.likelihoods import (
    CB_TAYLOR_LOGIT,
    LIKELIHOODS,
    ContinuousBernoulli,
    DiscretizedLogisticMixture,
    IndependentBernoulli,
    bernoulli_log_density,
    build_likelihood,
    continuous_bernoulli_log_norm,
)
from pyro_vae.specs import SpecError, parse_spec

X_DIM = 6
LIKELIHOOD_SPECS = [
    "bernoulli",
    "continuous_bernoulli",
    "gaussian(scale=0.3)",
    "gaussian(scale='learned')",
    "gaussian(scale='learned', per_pixel=True)",
    "laplace(scale=0.2)",
    "laplace(scale='learned', per_pixel=True)",
    "beta",
    "discretized_logistic(mixtures=3)",
    "categorical",
]


def test_every_registered_likelihood_is_tested():
    assert {parse_spec(s)[0] for s in LIKELIHOOD_SPECS} == set(LIKELIHOODS.names())


def grey_levels(n: int = 50, seed: int = 0) -> torch.Tensor:
    """8-bit data k/255 with both ends present (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, X_DIM), generator=g).double() / 255
    x[0, :3], x[1, :3] = 0.0, 1.0
    return x


def decoder_output(lik, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 1.5 * torch.randn(n, lik.out_dim, generator=g, dtype=torch.float64)


def built(spec: str):
    lik = build_likelihood(spec, x_dim=X_DIM).double()
    with torch.no_grad():  # learned scales away from their initial value
        for p in lik.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return lik


# -- reference log-densities ---------------------------------------------------------------------
def cb_log_norm_reference(lam: np.ndarray) -> np.ndarray:
    """log C(lambda) = log(2 artanh(1 - 2 lambda) / (1 - 2 lambda)) (Loaiza-Ganem & Cunningham 2019, eq. 7)."""
    u = 1 - 2 * lam
    return np.log(2 * np.arctanh(u) / u)


def reference_log_prob(spec: str, lik, params: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """sum_d log p(x_d | params) in float64 numpy."""
    name = parse_spec(spec)[0]
    P, X = params.detach().numpy(), x.numpy()
    if name == "bernoulli":
        return stats.bernoulli.logpmf(X, special.expit(P)).sum(-1) if np.isin(X, [0, 1]).all() else None
    if name == "continuous_bernoulli":
        lam = special.expit(P)
        return (X * np.log(lam) + (1 - X) * np.log1p(-lam) + cb_log_norm_reference(lam)).sum(-1)
    if name in ("gaussian", "laplace"):
        scale = lik.scale.detach().numpy()
        family = stats.norm if name == "gaussian" else stats.laplace
        return family.logpdf(X, P, scale).sum(-1)
    if name == "beta":
        a, b = np.logaddexp(0, P[:, :X_DIM]) + 1e-4, np.logaddexp(0, P[:, X_DIM:]) + 1e-4
        return stats.beta.logpdf(np.clip(X, 1e-3, 1 - 1e-3), a, b).sum(-1)
    if name == "discretized_logistic":
        m = lik.mixtures
        logits, locs, log_scales = P.reshape(len(P), 3, m, X_DIM).transpose(1, 0, 3, 2)  # each (n, X_DIM, M)
        s = np.exp(np.maximum(log_scales, -7.0))
        xv = X[..., None]
        upper = np.where(xv >= 1, 1.0, special.expit((xv + 1 / 510 - locs) / s))
        lower = np.where(xv <= 0, 0.0, special.expit((xv - 1 / 510 - locs) / s))
        weights = special.softmax(logits, -1)
        return np.log((weights * (upper - lower)).sum(-1)).sum(-1)
    if name == "categorical":
        logits = P.reshape(len(P), 256, X_DIM).transpose(0, 2, 1)
        levels = np.rint(X * 255).astype(int)
        return np.take_along_axis(special.log_softmax(logits, -1), levels[..., None], -1)[..., 0].sum(-1)
    raise AssertionError(f"no reference for {spec}")


@pytest.mark.parametrize("spec", LIKELIHOOD_SPECS)
def test_log_prob_matches_reference(spec):
    lik = built(spec)
    x = torch.bernoulli(torch.full((40, X_DIM), 0.5)).double() if spec == "bernoulli" else grey_levels(40)
    params = decoder_output(lik, len(x))
    ours = lik(params).log_prob(lik.prepare(x))
    assert ours.shape == (len(x),)
    torch.testing.assert_close(ours.detach(), torch.from_numpy(reference_log_prob(spec, lik, params, x)))


@pytest.mark.parametrize("spec", LIKELIHOOD_SPECS)
def test_shapes_mean_and_vae_samples(spec):
    """Decoder width, batch/event shapes (with a particle dim), E[x|z] in [0, 1], VAE samples."""
    lik = built(spec)
    params = decoder_output(lik, 8).reshape(2, 4, -1)  # (particles, batch, out_dim)
    d = lik(params)
    assert d.batch_shape == (2, 4) and d.event_shape == (X_DIM,)
    mean = lik.mean(params)
    assert mean.shape == (2, 4, X_DIM) and mean.min() >= 0 and mean.max() <= 1
    vae = VAE(x_dim=X_DIM, z_dim=2, hidden_dims=(8,), likelihood=spec)
    assert vae.decoder(torch.zeros(1, 2)).shape == (1, lik.out_dim)
    samples = vae.sample(5)
    assert samples.shape == (5, X_DIM) and samples.min() >= 0 and samples.max() <= 1


@pytest.mark.parametrize("spec", LIKELIHOOD_SPECS)
def test_trains_in_the_pyro_model(spec):
    """A vectorized Trace_ELBO backward is finite and reaches the decoder and any learned scale."""
    vae = VAE(x_dim=X_DIM, z_dim=2, hidden_dims=(8,), likelihood=spec)
    x = grey_levels(5).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bernoulli on grey levels
        vae.likelihood.check(x)
    loss = Trace_ELBO(num_particles=3, vectorize_particles=True).differentiable_loss(vae.model, vae.guide, x)
    loss.backward()
    assert torch.isfinite(loss)
    for p in [*vae.decoder.parameters(), *vae.likelihood.parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    if "learned" in spec:
        expected = (X_DIM,) if "per_pixel" in spec else ()
        assert vae.likelihood.raw_scale.shape == expected
        assert "likelihood$$$raw_scale" in pyro.get_param_store()


# -- continuous Bernoulli --------------------------------------------------------------------------
@pytest.mark.parametrize("lam", [1e-6, 0.02, 0.3, 0.5 - 1e-3, 0.5 - 1e-7, 0.5, 0.5 + 1e-5, 0.7, 0.999, 1 - 1e-6])
def test_continuous_bernoulli_integrates_to_one_and_mean(lam):
    """Quadrature of the library's density over [0, 1]: integral 1 and mean E[x], to 1e-8."""
    logit = torch.tensor(math.log(lam) - math.log1p(-lam), dtype=torch.float64)
    d = ContinuousBernoulli(logits=logit)

    def density(x: float) -> float:
        return math.exp(d.log_prob(torch.tensor(x, dtype=torch.float64)).item())

    total, _ = integrate.quad(density, 0, 1, epsabs=1e-12, epsrel=1e-12)
    first, _ = integrate.quad(lambda x: x * density(x), 0, 1, epsabs=1e-12, epsrel=1e-12)
    assert total == pytest.approx(1.0, abs=1e-8)
    assert d.mean.item() == pytest.approx(first, abs=1e-8)


def test_continuous_bernoulli_stable_near_one_half():
    """Taylor branch vs the exact formula at the switch; log C(0) = log 2 with a zero, finite gradient;
    agreement with torch's own implementation in float64."""
    eta = torch.tensor([-CB_TAYLOR_LOGIT * 0.999, CB_TAYLOR_LOGIT * 1.001, 0.0], dtype=torch.float64)
    lam = torch.sigmoid(eta).numpy()
    torch.testing.assert_close(
        continuous_bernoulli_log_norm(eta[:2]), torch.from_numpy(cb_log_norm_reference(lam[:2])), rtol=0, atol=1e-12
    )
    zero = torch.zeros((), dtype=torch.float64, requires_grad=True)
    value = continuous_bernoulli_log_norm(zero)
    value.backward()
    assert value.item() == math.log(2) and zero.grad.item() == 0.0
    # float32 is finite and continuous across the switch (no 0/0 at lambda = 1/2).
    grid = torch.linspace(-0.05, 0.05, 1001)
    vals = continuous_bernoulli_log_norm(grid)
    assert torch.isfinite(vals).all() and (vals.diff().abs() < 1e-5).all()
    logits = torch.linspace(-20, 20, 81, dtype=torch.float64)
    x = torch.rand(81, dtype=torch.float64)
    torch.testing.assert_close(
        ContinuousBernoulli(logits=logits).log_prob(x),
        torch.distributions.ContinuousBernoulli(logits=logits).log_prob(x),
        rtol=1e-6,
        atol=1e-6,
    )


# -- discretized logistic --------------------------------------------------------------------------
def _dlm(n: int = 4, m: int = 3, seed: int = 0) -> DiscretizedLogisticMixture:
    g = torch.Generator().manual_seed(seed)
    return DiscretizedLogisticMixture(
        torch.randn(n, m, generator=g, dtype=torch.float64),
        torch.rand(n, m, generator=g, dtype=torch.float64),
        -1.5 - 2 * torch.rand(n, m, generator=g, dtype=torch.float64),
    )


def test_discretized_logistic_sums_to_one_and_mean():
    d = _dlm()
    levels = torch.arange(256, dtype=torch.float64) / 255
    log_p = d.log_prob(levels.unsqueeze(-1).expand(256, 4))  # (256, n)
    torch.testing.assert_close(log_p.exp().sum(0), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(d.mean, (log_p.exp() * levels.unsqueeze(-1)).sum(0), rtol=0, atol=1e-12)
    # The sharpest component (scale e^-7) in float32: its own level has mass 2 sigmoid(h) - 1, h = (1/510) e^7;
    # a level 100 bins away has mass sigmoid(a) - sigmoid(b) ~ e^-b (1 - e^(b - a)) ~ e^-430, which the naive
    # difference of float32 sigmoids rounds to 0 (log = -inf).
    sharp = DiscretizedLogisticMixture(torch.zeros(1, 1), torch.tensor([[100 / 255]]), torch.tensor([[-7.0]]))
    h = math.exp(7.0) / 510
    assert sharp.log_prob(torch.tensor([100 / 255])).item() == pytest.approx(math.log(2 * special.expit(h) - 1))
    a, b = (200 / 255 + 1 / 510 - 100 / 255) * math.exp(7.0), (200 / 255 - 1 / 510 - 100 / 255) * math.exp(7.0)
    far = sharp.log_prob(torch.tensor([200 / 255])).item()
    assert far == pytest.approx(-b + math.log(-math.expm1(b - a)), rel=1e-5)


def test_discretized_logistic_samples_follow_log_prob():
    """Samples lie on the 8-bit grid, and their mean is within 5 SE of the exact mean."""
    d = _dlm()
    draws = d.sample((20_000,))
    assert draws.shape == (20_000, 4)
    assert torch.allclose(draws * 255, (draws * 255).round(), atol=1e-9)
    mc, se = mean_se(draws)
    assert_within_se("discretized logistic: sample mean vs exact mean", mc, d.mean, se, n_se=5)


# -- support checks --------------------------------------------------------------------------------
BINARY = torch.bernoulli(torch.full((4, X_DIM), 0.5), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("spec", LIKELIHOOD_SPECS)
def test_check_rejects_bad_shapes_dtypes_and_nan(spec):
    lik = build_likelihood(spec, x_dim=X_DIM)
    lik.check(BINARY)  # binary data fit every likelihood
    with pytest.raises(ValueError, match=rf"has shape \(4, 5\); likelihood .* accepts .* shape \(batch, {X_DIM}\)"):
        lik.check(BINARY[:, :5])
    with pytest.raises(ValueError, match=r"has dtype torch\.uint8; likelihood"):
        lik.check(BINARY.to(torch.uint8))
    bad = BINARY.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        lik.check(bad)


@pytest.mark.parametrize("spec", [s for s in LIKELIHOOD_SPECS if not s.startswith(("gaussian", "laplace"))])
def test_check_rejects_values_outside_unit_interval(spec):
    with pytest.raises(ValueError, match=r"has values in \[-0.5, 1\]; likelihood .* accepts"):
        build_likelihood(spec, x_dim=X_DIM).check(torch.cat([BINARY, torch.full((1, X_DIM), -0.5)]))


@pytest.mark.parametrize("spec", ["gaussian(scale=0.3)", "laplace(scale='learned')"])
def test_location_scale_likelihoods_accept_real_data(spec):
    build_likelihood(spec, x_dim=X_DIM).check(torch.randn(4, X_DIM) * 3)


def test_bernoulli_warns_on_grey_levels_only():
    lik = build_likelihood("bernoulli", x_dim=X_DIM)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lik.check(BINARY)
    with pytest.warns(UserWarning, match="not binary.*not a log-likelihood"):
        lik.check(grey_levels(4).float())


@pytest.mark.parametrize("spec", ["discretized_logistic", "categorical"])
def test_eight_bit_likelihoods_need_the_grid(spec):
    lik = build_likelihood(spec, x_dim=X_DIM)
    lik.check(grey_levels(4).float())  # k/255 in float32 passes
    off = grey_levels(4).float()
    off[2, 2] = 0.5  # 127.5 / 255: between two levels
    with pytest.raises(ValueError, match=r"not on the 8-bit grid .* accepts 8-bit grey levels k/255"):
        lik.check(off)


def test_prepare_maps_data_to_observations():
    x = grey_levels(4)
    cat = build_likelihood("categorical", x_dim=X_DIM)
    levels = cat.prepare(x)
    assert levels.dtype == torch.int64 and torch.equal(levels, (x * 255).round().long())
    beta = build_likelihood("beta", x_dim=X_DIM)
    squeezed = beta.prepare(x)
    assert squeezed.min() == 1e-3 and squeezed.max() == 1 - 1e-3
    interior = (x > 0) & (x < 1)
    assert torch.equal(squeezed[interior], x[interior])  # only the ends move (eps is a quarter of a level)
    assert torch.isfinite(beta(torch.zeros(4, 2 * X_DIM, dtype=torch.float64)).log_prob(squeezed)).all()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gaussian(scale=-1.0)", "scale must be a positive number or 'learned', got -1.0"),
        ("gaussian(scale='lerned')", "scale must be a positive number or 'learned', got 'lerned'"),
        ("laplace(scale=0.1, per_pixel=True)", "per_pixel applies to scale='learned' only"),
        ("beta(eps=0.6)", r"eps must lie in \(0, 0.5\)"),
        ("discretized_logistic(mixtures=0)", "mixtures must be a positive integer"),
        ("gaussian(sigma=1.0)", "likelihood 'gaussian' has no argument 'sigma'"),
        ("poisson", "unknown likelihood 'poisson'.*valid likelihoods: bernoulli, beta, categorical"),
    ],
)
def test_bad_specs_are_clear_errors(spec, message):
    with pytest.raises(SpecError, match=message):
        build_likelihood(spec, x_dim=X_DIM)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bernoulli_log_density_against_float64_log1p_at_extreme_logits(dtype):
    """The CPU Bernoulli density (``likelihoods.bernoulli_log_density``) against x l - softplus(l) in
    float64 with log1p, over logits from -100 to 100 (beyond |l| = 17 in float32, 1 + e^-|l| rounds to 1):
    each pixel within an ulp of 1 plus the ulp of its value; the gradient passes gradcheck in float64."""
    logits = torch.linspace(-100, 100, 4001, dtype=torch.float64).to(dtype).reshape(-1, 1)  # one pixel a row
    x = (torch.arange(4001) % 2).to(dtype).reshape(-1, 1)
    ld, xd = logits.double(), x.double()
    exact = ((xd * ld - ld.clamp(min=0)) - torch.log1p(torch.exp(-ld.abs()))).squeeze(-1)  # no cancellation
    error = (bernoulli_log_density(logits, x).double() - exact).abs()
    assert (error <= torch.finfo(dtype).eps * (1 + exact.abs())).all(), error.max()
    g = torch.Generator().manual_seed(0)
    small = torch.randn(3, 7, dtype=torch.float64, generator=g).requires_grad_()
    data = torch.bernoulli(torch.full((3, 7), 0.5, dtype=torch.float64), generator=g).requires_grad_()
    assert torch.autograd.gradcheck(bernoulli_log_density, (small, data))


def test_independent_bernoulli_is_bernoulli_to_event():
    """The Bernoulli likelihood's distribution: the values of ``Bernoulli(logits).to_event(1)`` to
    float32 rounding (its CPU density takes log(1 + u) where torch takes log1p(u)), the same
    gradients, broadcasting, shapes and samples."""
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(4, 5, X_DIM, generator=g)).requires_grad_()
    x = torch.bernoulli(torch.full((5, X_DIM), 0.5), generator=g)  # broadcasts against the leading 4
    ours, torchs = IndependentBernoulli(logits), pyro.distributions.Bernoulli(logits=logits).to_event(1)
    assert (ours.batch_shape, ours.event_shape) == (torchs.batch_shape, torchs.event_shape) == ((4, 5), (X_DIM,))
    got, expected = ours.log_prob(x), torchs.log_prob(x)
    assert got.shape == (4, 5)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    (g_ours,) = torch.autograd.grad(got.sum(), logits)
    (g_torch,) = torch.autograd.grad(expected.sum(), logits)
    torch.testing.assert_close(g_ours, g_torch, rtol=1e-6, atol=1e-7)
    wide = ours.expand((3, 4, 5))
    assert type(wide) is IndependentBernoulli and torch.equal(wide.log_prob(x)[2], got.detach())
    torch.testing.assert_close(ours.mean, torch.sigmoid(logits))
    assert ours.sample((2,)).shape == (2, 4, 5, X_DIM)
    with pytest.raises(ValueError):  # validated like torch's: a grey level is not a Bernoulli value
        IndependentBernoulli(logits, validate_args=True).log_prob(torch.full((5, X_DIM), 0.5))
