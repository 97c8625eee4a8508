"""The ELBO against exact log p(x) on the linear-Gaussian VAE (tests/linear_gaussian.py).

log p(x) = ELBO(x) + KL(q(z|x) || p(z|x)): the ELBO lies below log p(x) by exactly the KL from the
guide to the true posterior, and equals log p(x) when the guide is the exact posterior.
"""

from __future__ import annotations

import pyro
import pytest
import torch
from linear_gaussian import linear_gaussian
from mc_stats import assert_within_se, batch_means, report
from pyro.infer import Trace_ELBO

from pyro_vae import closed_form_elbo, closed_form_terms
from pyro_vae.estimators import log_weights

BATCH = 8
# closed_form_elbo draws: REPEATS independent estimates of SAMPLES draws each (2 * 10^4 in all).
REPEATS, SAMPLES = 20, 1000


@pytest.fixture
def lg():
    return linear_gaussian(x_dim=6, z_dim=3, s=0.5, seed=0)


@pytest.fixture
def x(lg):
    return lg.sample(BATCH, torch.Generator().manual_seed(1))


def test_exact_posterior_matches_the_model(lg, x):
    """The builder's encoder reproduces mu(x) and diag Sigma exactly (the guide family contains p(z|x))."""
    vae = lg.build_vae()
    loc, scale = vae.encode(x)
    torch.testing.assert_close(loc, lg.posterior_mean(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(scale.square(), lg.posterior_cov().diagonal().expand_as(scale), rtol=0, atol=1e-12)
    # Sigma really is diagonal: W has orthogonal columns.
    cov = lg.posterior_cov()
    assert (cov - torch.diag(cov.diagonal())).abs().max() < 1e-12


@torch.no_grad()
def test_elbo_below_log_px_for_a_generic_guide(lg, x):
    """ELBO < log p(x) by more than 5 SE, and the gap is the exact KL(q || p(z|x)) within 4 SE."""
    vae = lg.build_vae(exact_posterior=False)
    log_px = lg.log_px(x)
    gap = lg.kl_to_posterior(vae, x)
    elbo, se = batch_means(lambda: closed_form_elbo(vae, x, num_samples=SAMPLES), REPEATS)
    report("linear-Gaussian generic guide: log p(x) - ELBO (closed_form_elbo)", log_px - elbo, se)
    assert ((log_px - elbo) > 5 * se).all(), "the ELBO of a generic guide must lie clearly below log p(x)"
    assert_within_se("linear-Gaussian generic guide: ELBO vs log p(x) - KL(q||p(z|x))", elbo, log_px - gap, se)


@torch.no_grad()
def test_reconstruction_term_matches_its_exact_expectation(lg, x):
    """closed_form_terms' Monte Carlo E_q[log p(x|z)] within 4 SE of its exact value; its KL term is exact."""
    vae = lg.build_vae(exact_posterior=False)
    recon, se = batch_means(lambda: closed_form_terms(vae, x, num_samples=SAMPLES).reconstruction, REPEATS)
    assert_within_se("linear-Gaussian E_q[log p(x|z)]", recon, lg.expected_log_lik(vae, x), se)
    # Exact identity: E_q[log p(x|z)] - KL(q || p(z)) = log p(x) - KL(q || p(z|x)).
    kl = closed_form_terms(vae, x).kl
    torch.testing.assert_close(
        lg.expected_log_lik(vae, x) - kl, lg.log_px(x) - lg.kl_to_posterior(vae, x), rtol=0, atol=1e-10
    )


@torch.no_grad()
def test_elbo_equals_log_px_at_the_exact_posterior(lg, x):
    """At q = p(z|x) the gap vanishes.

    - Exactly: E_q[log p(x|z)] - KL(q || p(z)) = log p(x) (analytic expectation, to 1e-10).
    - closed_form_elbo estimates it with Monte Carlo noise in the reconstruction term (its KL is
      analytic, so single draws do vary): within 4 SE.
    """
    vae = lg.build_vae()
    log_px = lg.log_px(x)
    kl = closed_form_terms(vae, x).kl
    torch.testing.assert_close(lg.expected_log_lik(vae, x) - kl, log_px, rtol=0, atol=1e-10)
    torch.testing.assert_close(lg.kl_to_posterior(vae, x), torch.zeros_like(log_px), rtol=0, atol=1e-10)
    elbo, se = batch_means(lambda: closed_form_elbo(vae, x, num_samples=SAMPLES), REPEATS)
    assert_within_se("linear-Gaussian exact posterior: closed_form_elbo vs log p(x)", elbo, log_px, se)


@torch.no_grad()
def test_pyro_log_weights_are_exactly_log_px_at_the_exact_posterior(lg, x):
    """log p(x, z) - log q(z|x) = log p(x) for EVERY z when q = p(z|x): zero variance per example.

    Pyro's per-draw Trace_ELBO terms (``estimators.log_weights``) and the Trace_ELBO loss itself
    must therefore equal log p(x) to float64 rounding, whatever the number of particles.
    """
    vae = lg.build_vae()
    log_px = lg.log_px(x)
    lw = log_weights(vae, x, k=64)
    assert lw.shape == (64, BATCH)
    report("linear-Gaussian exact posterior: max |log w - log p(x)|", (lw - log_px).abs().max(), 0.0)
    torch.testing.assert_close(lw, log_px.expand_as(lw), rtol=0, atol=1e-9)
    loss = Trace_ELBO(num_particles=7, vectorize_particles=True, max_plate_nesting=1).loss(vae.model, vae.guide, x)
    assert abs(loss + log_px.sum().item()) < 1e-9
    # A generic guide has spread in its log weights (the zero variance above is not an accident).
    generic = lg.build_vae(exact_posterior=False)
    assert log_weights(generic, x, k=64).std(0).min() > 0.1


@torch.no_grad()
def test_pyro_log_weights_mean_is_the_elbo_for_a_generic_guide(lg, x):
    """The mean of Pyro's per-draw terms log p(x,z) - log q(z|x) is log p(x) - KL(q || p(z|x)), within 4 SE."""
    vae = lg.build_vae(exact_posterior=False)
    pyro.set_rng_seed(3)
    lw = log_weights(vae, x, k=20000)
    mean, se = lw.mean(0), lw.std(0) / lw.shape[0] ** 0.5
    assert_within_se(
        "linear-Gaussian generic guide: Pyro log-weight mean vs exact ELBO",
        mean,
        lg.log_px(x) - lg.kl_to_posterior(vae, x),
        se,
    )
