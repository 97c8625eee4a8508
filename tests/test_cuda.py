"""The core on a GPU: the same model, the same closed-form checks, everything on the module's device.

Skipped without CUDA. ``PYRO_VAE_TEST_DEVICE=cpu`` runs the same checks on the CPU (to check the
checks themselves on a machine without a GPU).
"""

from __future__ import annotations

import math
import os

import pyro
import pytest
import torch
from linear_gaussian import linear_gaussian
from mc_stats import assert_within_se, batch_means
from pyro import poutine
from pyro.infer import Trace_ELBO

from pyro_vae import VAE, closed_form_elbo
from pyro_vae.ais import ais_log_likelihood
from pyro_vae.estimators import log_weights
from pyro_vae.train import fit

DEVICE = torch.device(os.environ.get("PYRO_VAE_TEST_DEVICE", "cuda"))

pytestmark = pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(),
    reason="no CUDA device (torch.cuda.is_available() is False); set PYRO_VAE_TEST_DEVICE=cpu to run these on the CPU",
)

X_DIM, Z_DIM, BATCH = 40, 4, 8


def _same_device(t: torch.Tensor) -> bool:
    return t.device.type == DEVICE.type


@pytest.fixture
def vae():
    return VAE(x_dim=X_DIM, z_dim=Z_DIM, hidden_dims=(16,)).to(DEVICE)


@pytest.fixture
def x():
    cpu = torch.bernoulli(torch.full((BATCH, X_DIM), 0.5), generator=torch.Generator().manual_seed(0))
    return cpu.to(DEVICE)


def test_model_runs_on_the_device(vae, x):
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    assert _same_device(model_trace.nodes["z"]["value"]) and _same_device(model_trace.log_prob_sum())
    loc, scale = vae.encode(x)
    assert _same_device(loc) and _same_device(scale)
    assert _same_device(vae.reconstruct(x)) and _same_device(vae.sample(3))
    assert _same_device(closed_form_elbo(vae, x)) and closed_form_elbo(vae, x).shape == (BATCH,)
    assert all(_same_device(p) for p in pyro.get_param_store().values())


@torch.no_grad()
def test_trace_elbo_agrees_with_closed_form_on_the_device(vae, x):
    """Trace_ELBO loss (20 x 500 particles) vs -closed_form_elbo(...).sum() within 4 combined SE."""
    pyro.set_rng_seed(1)
    elbo = Trace_ELBO(num_particles=500, vectorize_particles=True, max_plate_nesting=1)
    pyro_mean, pyro_se = batch_means(
        lambda: torch.tensor(elbo.loss(vae.model, vae.guide, x), dtype=torch.float64), repeats=20
    )
    cf_mean, cf_se = batch_means(lambda: -closed_form_elbo(vae, x, num_samples=500).sum().double().cpu(), repeats=20)
    assert_within_se(f"{DEVICE.type}: Trace_ELBO vs closed form", pyro_mean, cf_mean, math.hypot(pyro_se, cf_se))


def test_closed_form_on_the_device_matches_cpu(vae, x):
    """The analytic KL term is deterministic: the device's value equals the CPU's to float32 precision."""
    from pyro_vae import closed_form_terms

    kl_device = closed_form_terms(vae, x).kl
    vae_cpu = VAE(x_dim=X_DIM, z_dim=Z_DIM, hidden_dims=(16,))
    vae_cpu.load_state_dict({k: v.cpu() for k, v in vae.state_dict().items()})
    kl_cpu = closed_form_terms(vae_cpu, x.cpu()).kl
    torch.testing.assert_close(kl_device.cpu(), kl_cpu, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_linear_gaussian_exact_on_the_device():
    """At the exact posterior, Pyro's log weights equal exact log p(x) on the device (float64)."""
    lg = linear_gaussian(x_dim=6, z_dim=3, s=0.5, seed=0).to(DEVICE)
    vae = lg.build_vae()
    x = lg.sample(BATCH, torch.Generator().manual_seed(1))
    assert _same_device(x) and _same_device(next(vae.parameters()))
    lw = log_weights(vae, x, k=32)
    torch.testing.assert_close(lw, lg.log_px(x).expand_as(lw), rtol=0, atol=1e-9)
    elbo, se = batch_means(lambda: closed_form_elbo(vae, x, num_samples=1000), repeats=20)
    assert_within_se(
        f"{DEVICE.type}: linear-Gaussian exact posterior, closed_form_elbo vs log p(x)", elbo, lg.log_px(x), se
    )


def test_fit_on_the_device(vae, x):
    """A few SVI steps with data on the device; parameters stay there and the ELBO is finite."""
    data = torch.bernoulli(torch.full((256, X_DIM), 0.3), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    history = fit(vae, data, data[:64], epochs=2, batch_size=64, seed=0)
    assert len(history) == 2 and all(math.isfinite(r["test_elbo"]) for r in history)
    assert all(_same_device(p) for p in vae.parameters())


def test_ais_on_the_device_reaches_log_px_with_its_fast_gradients():
    """AIS on the device (recorded graphs; TF32 leapfrog gradients on CUDA, bf16 on a CPU) reaches the exact
    log p(x) of a float32 linear-Gaussian model within 4 SE, and leaves torch's precision flags as they were."""
    lg = linear_gaussian(x_dim=32, z_dim=8, s=0.5, seed=3).to(DEVICE)
    vae = lg.build_vae(exact_posterior=False).float()
    x = lg.sample(BATCH, torch.Generator().manual_seed(2))
    precision = "tf32" if DEVICE.type == "cuda" else "bf16"
    backends = (
        (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
        if DEVICE.type == "cuda"
        else (torch.backends.mkldnn.matmul, torch.backends.mkldnn.conv)
    )
    before = [backend.fp32_precision for backend in backends]
    pyro.set_rng_seed(0)
    result = ais_log_likelihood(
        vae, x.float(), steps=1000, leapfrog=5, chains=32, step_size=0.1, gradient_precision=precision
    )
    assert _same_device(result.log_px) and [backend.fp32_precision for backend in backends] == before
    assert float(result.se.max()) < 0.3
    assert_within_se(f"{DEVICE.type}: AIS, {precision} gradients", result.log_px.double(), lg.log_px(x), result.se, 4)
