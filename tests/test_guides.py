"""Guides q(z|x) (pyro_vae/guides.py): densities, entropies, and the ELBO as a bound on exact log p(x).

- lowrank: log_prob against the dense MultivariateNormal with covariance F F^T + diag(sigma^2);
  at initialization F F^T is small next to diag(sigma^2) (an O(1) factor collapsed most units);
- every guide: the Monte Carlo entropy -E_q[log q] matches the analytic entropy (where there is
  one), the density integrates to 1 (2-D importance sampling) and its samples agree with it;
- iaf: the cached log-density of a sample equals the log-density through the sequential inverse;
- on the linear-Gaussian model (tests/linear_gaussian.py): the ELBO is below the exact log p(x)
  (and equals log p(x) - KL(q || p(z|x)) where that KL is exact), and the importance-sampled
  log p(x) with the guide as proposal converges to the exact value, which fails if log q is off;
- TraceMeanField_ELBO (analytic KL where torch registers one, Monte Carlo otherwise) agrees with
  Trace_ELBO for every (guide, prior) pair.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from linear_gaussian import DTYPE, inverse_softplus, linear_gaussian
from mc_stats import assert_within_se, batch_means, mean_se, report
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from test_priors import PRIOR_SPECS, defensive_proposal
from torch.distributions import MultivariateNormal, kl_divergence

from pyro_vae import VAE, closed_form_terms
from pyro_vae.closed_form import CLOSED_FORM_KL
from pyro_vae.estimators import log_weights
from pyro_vae.guides import GUIDES, LowRankGuide
from pyro_vae.networks import MIN_SCALE
from pyro_vae.specs import SpecError, parse_spec

GUIDE_SPECS = ["normal", "lowrank(rank=2)", "iaf(flows=2, hidden=[12])"]
X_DIM, Z_DIM = 6, 2


def test_every_registered_guide_is_tested():
    assert {parse_spec(s)[0] for s in GUIDE_SPECS} == set(GUIDES.names())


def make_vae(guide: str, prior: str = "normal", dtype=torch.float64, z_dim: int = Z_DIM) -> VAE:
    pyro.set_rng_seed(0)
    torch.set_default_dtype(dtype)
    return VAE(x_dim=X_DIM, z_dim=z_dim, hidden_dims=(8,), guide=guide, prior=prior).to(dtype)


def data(n: int = 3) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, X_DIM), 0.4), generator=torch.Generator().manual_seed(3)).to(DTYPE)


def test_lowrank_log_prob_is_the_dense_gaussian():
    vae, x = make_vae("lowrank(rank=2)", z_dim=4), data(5)
    q = vae.posterior(x)
    loc, scale, extra = vae.encoder.net(x)
    factor = LowRankGuide.FACTOR_SCALE * extra.reshape(5, 4, 2)
    dense = MultivariateNormal(loc, factor @ factor.transpose(-1, -2) + torch.diag_embed(scale.square()))
    z = q.sample((7,))
    assert z.shape == (7, 5, 4) and q.batch_shape == (5,) and q.event_shape == (4,)
    torch.testing.assert_close(q.log_prob(z), dense.log_prob(z), rtol=1e-12, atol=1e-12)


@torch.no_grad()
@pytest.mark.parametrize("init", ["torch", "he", "glorot"])
def test_lowrank_starts_close_to_the_diagonal_guide(init):
    """At every initialization the factor's share of q's variance, diag(F F^T) / diag(Sigma), is under 0.1:
    with the raw head outputs as F it was 0.70 under He init and 0.40 under Glorot on a tanh body, and the model
    collapsed most units (guides.LowRankGuide)."""
    pyro.set_rng_seed(0)
    vae = VAE(x_dim=784, z_dim=50, hidden_dims=(200, 200), activation="tanh", init=init, guide="lowrank(rank=4)")
    x = torch.bernoulli(torch.full((500, 784), 0.13), generator=torch.Generator().manual_seed(0))
    q = vae.posterior(x)
    factor_var = q.cov_factor.square().sum(-1)
    share = (factor_var / (factor_var + q.cov_diag)).mean().item()
    assert share < 0.1, f"{init}: the factor holds {share:.2f} of q's variance at initialization"


@torch.no_grad()
@pytest.mark.parametrize("spec", GUIDE_SPECS)
def test_entropy_normalization_and_samples(spec):
    """For one x: MC entropy vs analytic (5 SE); integral of q = 1 (5 SE); E[z], E[z^2] samples vs density (5 SE)."""
    vae = make_vae(spec)
    q = vae.posterior(data(1))  # batch shape (1,)
    n = 20_000
    z = q.sample((n,))
    log_q = q.log_prob(z)[:, 0]
    mc_entropy, se = mean_se(-log_q)
    try:
        analytic = q.entropy()[0]
    except NotImplementedError:  # a flow: no analytic entropy, the checks below carry the test
        report(f"{spec}: MC entropy (no analytic value)", mc_entropy, se)
    else:
        assert_within_se(f"{spec}: entropy, MC vs analytic", mc_entropy, analytic, se, n_se=5)

    single = vae.posterior(data(1))
    if spec.startswith("iaf"):
        # The density through the sequential inverse (a fresh tensor misses the transform cache).
        torch.testing.assert_close(single.log_prob(z[:200].clone()), q.log_prob(z[:200]), rtol=1e-9, atol=1e-9)

    p1 = _SingleExample(single)
    r = defensive_proposal(p1)
    zr = r.sample((40_000,))
    ratio = (p1.log_prob(zr) - r.log_prob(zr)).exp()
    integral, se = mean_se(ratio)
    assert_within_se(f"{spec}: integral of q(z|x)", integral, 1.0, se, n_se=5)
    features = torch.cat([z[:, 0], z[:, 0].square()], -1)
    sample_mean, sample_se = mean_se(features)
    is_mean, is_se = mean_se(ratio.unsqueeze(-1) * torch.cat([zr, zr.square()], -1))
    diff, diff_se = sample_mean - is_mean, (sample_se.square() + is_se.square()).sqrt()
    assert_within_se(f"{spec}: E[z], E[z^2] samples - density", diff, torch.zeros_like(diff), diff_se, n_se=5)


class _SingleExample:
    """q(z|x) for one x viewed as a distribution with batch shape () (sample/log_prob only)."""

    def __init__(self, q):
        self.q = q

    def sample(self, shape):
        return self.q.sample(shape)[..., 0, :]

    def log_prob(self, z):
        return self.q.log_prob(z.unsqueeze(-2))[..., 0]


# -- the linear-Gaussian model ----------------------------------------------------------------------
def linear_gaussian_vae(spec: str, lg, near_posterior: bool) -> VAE:
    """The linear-Gaussian VAE with guide ``spec`` and decoder W z + b.

    ``near_posterior``: q(z|x) is the exact posterior, up to the low-rank factor (from small random
    weights). For the IAF, the flows' output layers are zeroed, so each flow is z = sigmoid(2) y (the
    stable IAF's gate bias), and the base Gaussian is the posterior scaled by 1 / sigmoid(2)^flows: q is
    then exactly p(z|x) *through* the flow's log-determinant. Otherwise the loc and scale are shrunk,
    shifted and widened, and the extra outputs (factor, IAF context) come from small random weights.
    """
    pyro.set_rng_seed(1)
    torch.set_default_dtype(DTYPE)
    vae = VAE(x_dim=lg.x_dim, z_dim=lg.z_dim, hidden_dims=(), likelihood=f"gaussian(scale={lg.s!r})", guide=spec)
    vae = vae.to(DTYPE)
    k = lg.z_dim
    gain, scale, shift = lg.posterior_gain(), lg.posterior_cov().diagonal().sqrt(), 0.0
    if not near_posterior:
        gain, scale, shift = 0.7 * gain, 1.6 * scale, 0.3
    with torch.no_grad():
        if near_posterior and spec.startswith("iaf"):
            for flow in vae.encoder.flows:
                flow.nn.layers[-1].weight.zero_()
                flow.nn.layers[-1].bias.zero_()
            contraction = torch.sigmoid(torch.tensor(2.0, dtype=DTYPE)) ** len(vae.encoder.flows)
            gain, scale = gain / contraction, scale / contraction
        vae.decoder.head.weight.copy_(lg.W)
        vae.decoder.head.bias.copy_(lg.b)
        linear = vae.encoder.net.head
        linear.weight.mul_(0.1)
        linear.bias.mul_(0.1)
        linear.weight[: 2 * k].zero_()
        linear.weight[:k].copy_(gain)
        linear.bias[:k].copy_(-gain @ lg.b + shift)
        linear.bias[k : 2 * k].copy_(inverse_softplus(scale - MIN_SCALE))
    return vae


@pytest.fixture(scope="module")
def lg():
    return linear_gaussian(x_dim=6, z_dim=3, s=0.5, seed=0)


@torch.no_grad()
@pytest.mark.parametrize("spec", GUIDE_SPECS)
def test_elbo_is_a_bound_on_exact_log_px(spec, lg):
    """ELBO <= log p(x) + 4 SE for each x; where KL(q || p(z|x)) is exact, ELBO = log p(x) - KL within 4 SE."""
    x = lg.sample(4, torch.Generator().manual_seed(2))
    vae = linear_gaussian_vae(spec, lg, near_posterior=False)
    lw = log_weights(vae, x, k=20_000)  # (k, batch)
    elbo, se = mean_se(lw)
    log_px = lg.log_px(x)
    gap = log_px - elbo
    report(f"{spec}: log p(x) - ELBO (nats)", gap, se)
    assert (elbo <= log_px + 4 * se).all()
    assert (gap > 10 * se).all()  # the guide is far from the posterior: the bound is strict
    if not spec.startswith("iaf"):
        q = vae.posterior(x)
        dense = MultivariateNormal(q.mean, covariance_matrix=_covariance(q))
        assert_within_se(
            f"{spec}: ELBO vs log p(x) - KL(q||p(z|x))", elbo, log_px - kl_divergence(dense, lg.posterior(x)), se
        )


def _covariance(q):
    try:
        return q.covariance_matrix
    except AttributeError:  # Independent(Normal)
        return torch.diag_embed(q.base_dist.scale.square())


@torch.no_grad()
@pytest.mark.parametrize("spec", GUIDE_SPECS)
def test_importance_sampling_with_the_guide_recovers_log_px(spec, lg):
    """log mean_k w_k over 20,000 draws near the posterior is within 5 delta-method SE (+ its O(1/K) bias
    bound) of the exact log p(x): a log q off by a constant or a wrong Jacobian fails."""
    x = lg.sample(4, torch.Generator().manual_seed(3))
    vae = linear_gaussian_vae(spec, lg, near_posterior=True)
    k = 20_000
    lw = log_weights(vae, x, k=k)
    estimate = torch.logsumexp(lw, 0) - math.log(k)
    w = (lw - lw.max(0).values).exp()
    rel_var = w.var(0) / w.mean(0).square()  # var(w) / E[w]^2
    # At the exact posterior (the normal guide here) w is constant: floor the SE at float64 rounding.
    se = (rel_var / k).sqrt().clamp_min(1e-10)
    # E[log mean w] = log p(x) - rel_var / (2K) + ...: allow the bias on top of the SE.
    assert_within_se(
        f"{spec}: log-mean-exp of log w vs exact log p(x)", estimate + rel_var / (2 * k), lg.log_px(x), se, 5
    )
    if spec.startswith(("normal", "iaf")):  # q = p(z|x) exactly: every log-weight is log p(x)
        torch.testing.assert_close(lw, lg.log_px(x).expand_as(lw), rtol=0, atol=1e-9)


@pytest.mark.parametrize("prior", ["normal", "learned_normal"])
def test_lowrank_closed_form_kl_matches_monte_carlo(prior):
    vae, x = make_vae("lowrank(rank=2)", prior=prior, z_dim=3), data(4)
    with torch.no_grad():
        for p in vae.prior.parameters():
            p.add_(0.3 * torch.randn_like(p))
    kl = closed_form_terms(vae, x).kl.detach()
    q, p = vae.posterior(x), vae.prior_distribution()
    with torch.no_grad():
        z = q.sample((40_000,))
        mc, se = mean_se(q.log_prob(z) - p.log_prob(z))
    assert_within_se(f"lowrank vs {prior}: analytic KL vs Monte Carlo", mc, kl, se)


def test_iaf_has_no_closed_form():
    vae = make_vae("iaf(flows=2, hidden=[12])")
    with pytest.raises(
        ValueError, match=r"no closed-form KL for guide 'iaf\(flows=2, hidden=\[12\]\)' with prior 'normal'"
    ):
        closed_form_terms(vae, data(2))


def test_iaf_uses_the_encoder_context_and_registers_its_flows():
    vae, x = make_vae("iaf(flows=2, hidden=[12])"), data(4)
    assert vae.encoder.net.extra_dim == vae.encoder.context_dim == 2 * Z_DIM
    loc, scale, context = vae.encoder.net(x)
    e = torch.randn(5, 4, Z_DIM, dtype=DTYPE)
    z_context = vae.encoder.distribution(loc, scale, context).transforms[0](e)
    z_other = vae.encoder.distribution(loc, scale, context + 1.0).transforms[0](e)
    assert not torch.allclose(z_context, z_other)  # the flow is conditioned on h(x)
    Trace_ELBO().differentiable_loss(vae.model, vae.guide, x).backward()
    names = set(pyro.get_param_store().keys())
    flow_params = dict(vae.encoder.flows.named_parameters())
    assert flow_params and all(f"encoder$$$flows.{n}" in names for n in flow_params)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in flow_params.values())
    assert vae.reconstruct(x).shape == x.shape  # posterior mean by sampling: no closed form for a flow


# -- meanfield for every pair -----------------------------------------------------------------------
PAIRS = [(g, p) for g in GUIDE_SPECS for p in PRIOR_SPECS if not (p.startswith("vamp") and g != "normal")]


@pytest.mark.parametrize(("guide", "prior"), PAIRS)
def test_meanfield_agrees_with_trace_for_every_pair(guide, prior):
    """TraceMeanField_ELBO and Trace_ELBO estimate the same -ELBO: equal within 5 SE (float32, tiny nets).

    Pairs with a KL registered in torch use it analytically -- exactly the pairs of CLOSED_FORM_KL,
    the low-rank guide's through the KL pyro_vae.closed_form registers -- the others fall back to
    Monte Carlo.
    """
    vae, x = make_vae(guide, prior, dtype=torch.float32), data(3).float()
    q, p = vae.posterior(x), vae.prior_distribution()
    try:
        kl_divergence(q, p)
        analytic = True
    except NotImplementedError:
        analytic = False
    assert analytic == ((parse_spec(guide)[0], parse_spec(prior)[0]) in CLOSED_FORM_KL)
    with torch.no_grad():
        trace_mean, trace_se = mean_se(-log_weights(vae, x, k=4000).sum(-1))
        meanfield = TraceMeanField_ELBO(num_particles=500, vectorize_particles=True)
        mf_mean, mf_se = batch_means(lambda: torch.as_tensor(meanfield.loss(vae.model, vae.guide, x)), 8)
    se = (trace_se.square() + mf_se.square()).sqrt()
    assert_within_se(
        f"{guide} x {prior}: meanfield - trace (analytic KL: {analytic})", mf_mean - trace_mean, 0.0, se, 5
    )


@pytest.mark.parametrize(
    ("spec", "z_dim", "message"),
    [
        ("lowrank(rank=0)", 2, "rank must be a positive integer"),
        ("iaf(flows=0)", 2, "flows must be a positive integer"),
        ("iaf", 1, "needs z_dim >= 2"),
        ("iaf(flow=2)", 2, "guide 'iaf' has no argument 'flow'.*did you mean \"flows\""),
        ("full", 2, "unknown guide 'full'.*valid guides: iaf, lowrank, normal"),
    ],
)
def test_bad_specs_are_clear_errors(spec, z_dim, message):
    with pytest.raises(SpecError, match=message):
        VAE(x_dim=X_DIM, z_dim=z_dim, hidden_dims=(8,), guide=spec)


@pytest.mark.parametrize(
    ("link", "expected"),
    [("softplus", F.softplus), ("log_variance", lambda r: torch.exp(r / 2)), ("log_scale", torch.exp)],
)
def test_the_scale_link_maps_the_head_output_to_sigma(link, expected):
    torch.manual_seed(0)
    vae = VAE(x_dim=6, z_dim=2, hidden_dims=(5,), guide=f"normal(scale='{link}')")
    x = torch.rand(4, 6)
    encoder = vae.encoder.net
    raw = encoder.raw(x)
    _, scale = vae.encoder.gaussian_params(x)
    torch.testing.assert_close(scale, expected(raw[..., 2:4]) + MIN_SCALE)


def test_an_unknown_scale_link_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown scale 'exp'.*valid: softplus, log_variance, log_scale"):
        VAE(x_dim=6, z_dim=2, hidden_dims=(5,), guide="normal(scale='exp')")
