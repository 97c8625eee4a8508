"""The inference gap and its parts (``pyro_vae.gaps``) against the closed forms of a linear-Gaussian VAE.

With x = W z + b + s eps and a W whose columns are *not* orthogonal, the posterior N(mu(x), Lambda^-1),
Lambda = I + W^T W / s^2, is correlated. The best diagonal Gaussian in KL(q || p) has precisions diag(Lambda)
and mean mu(x), so the approximation gap is the same for every x,

    KL(q* || p(z|x)) = 1/2 (sum_i log Lambda_ii - log det Lambda),

and the amortization gap of a guide q_phi is KL(q_phi || p(z|x)) - KL(q* || p(z|x)), both exact. A low-rank
guide of rank z_dim expresses the posterior: its approximation gap is 0.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from linear_gaussian import DTYPE, LinearGaussian, set_guide
from mc_stats import assert_within_se

from pyro_vae import cli
from pyro_vae.gaps import inference_gaps, untrustworthy_nll
from pyro_vae.local_fit import LocalFit
from pyro_vae.model import VAE

FIT = LocalFit(steps=1000, lr=0.05, particles=4000, step_particles=8)


@pytest.fixture(scope="module")
def correlated() -> LinearGaussian:
    g = torch.Generator().manual_seed(0)
    return LinearGaussian(W=torch.randn(6, 3, dtype=DTYPE, generator=g), b=0.3 * torch.randn(6, dtype=DTYPE), s=0.5)


def _precision(lg: LinearGaussian) -> torch.Tensor:
    return torch.eye(lg.z_dim, dtype=DTYPE) + lg.W.T @ lg.W / lg.s**2


def _off_guide(lg: LinearGaussian) -> VAE:
    """A diagonal guide about a nat from q*: shrunk mean, shifted, scales 1.3x q*'s."""
    vae = lg.build_vae(exact_posterior=False)
    gain = lg.posterior_gain()
    shift = torch.linspace(-0.3, 0.3, lg.z_dim, dtype=DTYPE)
    set_guide(vae, 0.9 * gain, -0.9 * gain @ lg.b + shift, 1.3 * _precision(lg).diagonal().rsqrt())
    return vae


def test_gaps_of_a_diagonal_guide_are_the_closed_forms(correlated):
    lg = correlated
    vae = _off_guide(lg)
    x = lg.sample(6, generator=torch.Generator().manual_seed(1))
    precision = _precision(lg)
    approximation = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision))
    assert approximation > 0.1  # the posterior's correlations are what a diagonal q cannot express
    amortization = lg.kl_to_posterior(vae, x).detach() - approximation
    assert (amortization > 0.3).all(), "the guide should be far from q*, or the test checks nothing"
    pyro.set_rng_seed(0)
    gaps = inference_gaps(vae, x, nll="is(samples=50000)", fit=FIT)
    assert_within_se("log p-hat(x)", gaps.log_px, lg.log_px(x), gaps.log_px_se, 4)
    assert_within_se(
        "L[q_phi]", gaps.amortized, lg.log_px(x) - lg.kl_to_posterior(vae, x).detach(), gaps.elbos.amortized_se, 4
    )
    assert_within_se("approximation gap", gaps.approximation, approximation.expand(6), gaps.approximation_mc_se, 4)
    assert_within_se("amortization gap", gaps.amortization, amortization, gaps.elbos.difference_se, 4)
    torch.testing.assert_close(gaps.inference, gaps.approximation + gaps.amortization)
    summary = gaps.summary()
    assert summary["num_examples"] == 6
    assert summary["approximation"] == pytest.approx(float(gaps.approximation.mean()))
    assert summary["amortization_se"] == pytest.approx(float(gaps.amortization.std() / math.sqrt(6)))


def _on_the_model(lg: LinearGaussian, guide: str) -> VAE:
    """A float64 VAE with ``lg``'s linear decoder and an untrained linear encoder of the ``guide`` family."""
    vae = VAE(x_dim=lg.x_dim, z_dim=lg.z_dim, hidden_dims=(), likelihood=f"gaussian(scale={lg.s!r})", guide=guide)
    vae = vae.to(DTYPE)
    with torch.no_grad():
        vae.decoder.head.weight.copy_(lg.W)
        vae.decoder.head.bias.copy_(lg.b)
    return vae


def test_a_full_rank_low_rank_guide_has_no_approximation_gap(correlated):
    """q* of lowrank(rank=z_dim) is the exact posterior: L[q*] = log p(x) within the Monte Carlo error."""
    lg = correlated
    vae = _on_the_model(lg, "lowrank(rank=3)")
    x = lg.sample(4, generator=torch.Generator().manual_seed(2))
    pyro.set_rng_seed(0)
    gaps = inference_gaps(vae, x, nll="is(samples=20000)", fit=LocalFit(steps=1500, particles=4000, step_particles=8))
    exact = lg.log_px(x)
    assert_within_se("L[q*] of the full-rank guide", gaps.local, exact, gaps.elbos.local_se + 1e-3, 5)
    assert (gaps.amortization > 0.5).all()  # the untrained encoder is far from it


def test_gaps_command_reports_and_refuses_in_one_line(tiny_run, capsys):
    assert (
        cli.main(["gaps", "--run", str(tiny_run), "--num", "5", "--nll", "is(samples=50)", "--steps", "5", "--json"])
        == 0
    )
    import json

    result = json.loads(capsys.readouterr().out)
    assert result["num_examples"] == 5 and result["nll_method"].startswith("is(")
    assert result["local_fit"]["steps"] == 5
    assert result["inference"] == pytest.approx(result["approximation"] + result["amortization"], abs=1e-9)
    assert cli.main(["gaps", "--run", str(tiny_run), "--nll", "exact"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown NLL method 'exact'" in err


def test_an_iaf_guide_moves_only_its_per_example_inputs(correlated):
    """For iaf the local fit moves the base loc, scale and context; the flow's MADE weights stay as they are."""
    lg = correlated
    vae = _on_the_model(lg, "iaf(flows=1)")
    flow = [p.detach().clone() for p in vae.encoder.flows.parameters()]
    x = lg.sample(3, generator=torch.Generator().manual_seed(3))
    pyro.set_rng_seed(0)
    gaps = inference_gaps(vae, x, nll="is(samples=5000)", fit=LocalFit(steps=300, particles=2000, step_particles=4))
    assert all(torch.equal(a, b) for a, b in zip(flow, vae.encoder.flows.parameters(), strict=True))
    assert (gaps.amortization > 1.0).all() and (gaps.amortization > 10 * gaps.elbos.difference_se).all()
    # L[q*] never beats the exact log p(x) beyond its noise. (IS with this untrained guide can land far below
    # log p(x) on some example, which is why gaps_run warns when L[q*] beats the estimate.)
    assert (gaps.local < lg.log_px(x) + 4 * gaps.elbos.local_se).all()


def test_a_log_likelihood_below_the_local_elbo_is_flagged():
    summary = {"approximation": -0.5, "approximation_se": 0.05, "approximation_mc_se": 0.05}
    assert "is(samples=10) is not a trustworthy log p(x)" in untrustworthy_nll(summary, "is(samples=10)")
    summary["approximation"] = -0.2  # within 4 of its SEs (0.07): noise, not a broken estimate
    assert untrustworthy_nll(summary, "is(samples=10)") is None
