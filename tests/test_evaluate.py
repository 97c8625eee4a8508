"""Evaluation: importance-sampled log p(x) against the exact linear-Gaussian value, its SE, chunking,
the memory bound, active units with known dead dimensions, KL per dimension, bits/dim, the report dict."""

from __future__ import annotations

import json
import math
import sys
import types
from types import SimpleNamespace

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import DTYPE, LinearGaussian, linear_gaussian, set_guide
from mc_stats import assert_within_se, report
from torch import nn

from pyro_vae import evaluate as ev
from pyro_vae.closed_form import closed_form_terms, gaussian_kl_standard_normal
from pyro_vae.model import VAE
from pyro_vae.traces import log_weights as pyro_log_weights


def _model(exact: bool, n: int = 5, seed: int = 0) -> tuple[LinearGaussian, VAE, torch.Tensor]:
    lg = linear_gaussian(x_dim=6, z_dim=3, s=0.5, seed=seed)
    x = lg.sample(n, generator=torch.Generator().manual_seed(seed + 1))
    # Frozen: the tests' own reference computations (encode, closed forms) then need no detach.
    return lg, lg.build_vae(exact_posterior=exact).requires_grad_(False), x


# -- log-likelihood ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("chunk_size", "batch_size"), [(None, None), (3, 2), (1, 1), (7, 5)])
def test_exact_guide_gives_exact_log_px_for_every_chunking(chunk_size, batch_size):
    """With q = p(z|x) every weight equals p(x): the estimate is exact and its SE is zero, whatever the
    chunks (10 samples in chunks of 3 leave an uneven last chunk; batches of 2 leave an uneven last batch)."""
    lg, vae, x = _model(exact=True)
    est, se = ev.log_likelihood_with_se(vae, x, num_samples=10, chunk_size=chunk_size, batch_size=batch_size)
    torch.testing.assert_close(est, lg.log_px(x), rtol=0, atol=1e-9)
    assert est.dtype == DTYPE and se.abs().max() < 1e-6


def test_log_likelihood_matches_exact_within_se():
    """A guide ~1 nat from the posterior: log p-hat(x) lies within 5 SE of the exact log N(x; b, W W^T + s^2 I)."""
    lg, vae, x = _model(exact=False)
    exact = lg.log_px(x)
    est, se = ev.log_likelihood_with_se(vae, x, num_samples=4000, chunk_size=500)
    gap = exact - ev.elbo_per_example(vae, x, num_samples=4000)
    report("ELBO gap of the generic guide (nats)", gap, torch.zeros_like(gap))
    assert (gap > 0.3).all(), "the guide should be far from the posterior, or the test checks nothing"
    assert (se > 1e-4).all()
    assert_within_se("log p-hat(x) vs exact", est, exact, se, n_se=5)
    assert torch.equal(ev.log_likelihood(vae, x, num_samples=1, chunk_size=1).isfinite(), torch.ones(5, dtype=bool))


def test_standard_error_matches_spread_of_repeated_estimates():
    """The delta-method SE agrees with the spread of independent estimates (R = 60 repeats).

    The sample sd of R estimates has relative SE 1/sqrt(2(R-1)) ~ 9%; we allow 4.5 of those.
    """
    _, vae, x = _model(exact=False)
    repeats, k = 60, 200
    runs = [ev.log_likelihood_with_se(vae, x, num_samples=k) for _ in range(repeats)]
    estimates = torch.stack([r[0] for r in runs])
    reported_se = torch.stack([r[1] for r in runs]).mean(0)
    ratio = estimates.std(0) / reported_se
    rel_se = 1 / math.sqrt(2 * (repeats - 1))
    assert_within_se(
        "empirical sd / delta-method SE", ratio, torch.ones_like(ratio), torch.full_like(ratio, rel_se), 4.5
    )


class _BankedPosterior(dist.TorchDistribution):
    """q(z|x) whose draws come in order from a fixed bank: the same z's whatever the chunk sizes.

    A Pyro distribution, so that it can stand at the guide's site: the particle plate expands it to
    batch shape ``(k, batch)`` and a draw takes the next ``k`` rows of the bank.
    """

    arg_constraints: dict = {}  # noqa: RUF012 - torch's attribute
    has_rsample = True

    def __init__(self, q, bank: torch.Tensor, batch_shape=None, state=None) -> None:
        self.q, self.bank, self.state = q, bank, state if state is not None else {"used": 0}
        super().__init__(torch.Size(batch_shape or q.batch_shape), q.event_shape, validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return _BankedPosterior(self.q, self.bank, batch_shape, self.state)

    def rsample(self, sample_shape=()):
        k, used = self.batch_shape[0], self.state["used"]
        self.state["used"] += k
        return self.bank[used : used + k]

    def log_prob(self, z):
        return self.q.log_prob(z)


def _plain_log_weights(vae, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(z) + log p(x|z) - log q(z|x) in plain torch, for draws ``z`` of shape ``(k, batch, z_dim)``."""
    q = vae.posterior(x)
    return vae.prior_distribution().log_prob(z) + vae.decode(z).log_prob(vae.likelihood.prepare(x)) - q.log_prob(z)


def test_chunking_is_exactly_the_unchunked_estimate(monkeypatch):
    """The streamed log-sum-exp over chunks equals the one-shot logsumexp over the same K draws."""
    _, vae, x = _model(exact=False)
    k = 257
    bank = vae.posterior(x).sample((k,)).detach()
    reference = _plain_log_weights(vae, bank, x).logsumexp(0) - math.log(k)
    original = vae.posterior
    for chunk in (1, 10, 64, 256, 257, 1000, None):
        # the structure's guide (run once per chunk) draws on through the bank, from its first row for every chunking
        state = {"used": 0}
        monkeypatch.setattr(
            vae.structure,
            "posterior",
            lambda xb, mask=None, state=state: _BankedPosterior(original(xb, mask), bank, state=state),
        )
        est = ev.log_likelihood(vae, x, num_samples=k, chunk_size=chunk, batch_size=x.shape[0])
        torch.testing.assert_close(est, reference, rtol=0, atol=1e-12)


def test_chunks_bound_the_largest_tensor(monkeypatch):
    """Memory bound: the decoder never sees more than chunk x batch latent codes, whatever num_samples."""
    _, vae, x = _model(exact=False, n=9)
    shapes = []
    decode = vae.decode
    monkeypatch.setattr(vae.structure, "decode", lambda z: shapes.append(tuple(z.shape)) or decode(z))
    ev.log_likelihood(vae, x, num_samples=1000, chunk_size=64, batch_size=4)
    assert max(s[0] for s in shapes) == 64 and max(s[1] for s in shapes) == 4
    assert sum(s[0] for s in shapes if s[1] == 4) == 2 * 1000 and len(shapes) == 3 * math.ceil(1000 / 64)

    # The default chunk follows the budget: (chunk, batch, width) <= MEMORY_BUDGET elements.
    shapes.clear()
    monkeypatch.setattr(ev, "MEMORY_BUDGET", 6 * 9 * 50)  # width 6 (x_dim), batch 9 -> chunk 50
    for num_samples in (100, 5000):
        shapes.clear()
        ev.log_likelihood(vae, x, num_samples=num_samples)
        assert max(s[0] for s in shapes) == 50
        assert max(s[0] * s[1] for s in shapes) * ev.widest_activation(vae) <= ev.MEMORY_BUDGET


def test_plain_torch_log_weights_equal_pyro_traces():
    """Plain-torch log-weights equal those of the Pyro model/guide traces (what evaluation uses) for the same draws."""
    _, vae, x = _model(exact=False)
    vae.requires_grad_(True)  # pyro.module registers only trainable parameters, and warns otherwise
    pyro.set_rng_seed(3)
    from_pyro = pyro_log_weights(vae, x, k=4)
    pyro.set_rng_seed(3)
    plain = _plain_log_weights(vae, vae.posterior(x).sample((4,)), x)
    torch.testing.assert_close(plain, from_pyro.detach(), rtol=1e-12, atol=1e-10)


def test_bad_arguments_are_clear():
    _, vae, x = _model(exact=True)
    with pytest.raises(ValueError, match="num_samples"):
        ev.log_likelihood(vae, x, num_samples=0)
    with pytest.raises(ValueError, match="chunk_size"):
        ev.log_likelihood(vae, x, num_samples=5, chunk_size=0)
    est, se = ev.log_likelihood_with_se(vae, x, num_samples=1)
    assert est.isfinite().all() and se.isnan().all()


# -- ELBO -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("analytic_kl", [True, False])
def test_elbo_matches_exact_linear_gaussian_elbo(analytic_kl):
    """Mean ELBO over the set = exact E_q[log p(x|z)] - KL(q || p), within 5 SE (per-example spread / sqrt(N))."""
    lg, vae, x = _model(exact=False, n=400)
    loc, scale = vae.encode(x)
    exact = (lg.expected_log_lik(vae, x) - gaussian_kl_standard_normal(loc, scale)).mean()
    per_example = ev.elbo_per_example(vae, x, batch_size=128, num_samples=4, analytic_kl=analytic_kl)
    noise = per_example - (lg.expected_log_lik(vae, x) - gaussian_kl_standard_normal(loc, scale))
    se = noise.std() / math.sqrt(x.shape[0])
    assert_within_se(f"mean ELBO (analytic_kl={analytic_kl})", per_example.mean(), exact, se, n_se=5)
    assert ev.elbo(vae, x, batch_size=128, analytic_kl=analytic_kl) < float(lg.log_px(x).mean())


# -- active units and KL per dimension -------------------------------------------------------------------
def test_active_units_counts_known_dead_dimensions():
    """Four latent units whose posterior means have data variance 1.0, 0.04 (active), 0.0025 and 0 (dead)."""
    d, z_dim, n = 8, 4, 2000
    vae = VAE(x_dim=d, z_dim=z_dim, hidden_dims=()).double()
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    x = (x - x.mean(0)) / x.std(0)  # unit sample variance per coordinate: var(c * x_0) = c^2 exactly
    gain = torch.zeros(z_dim, d, dtype=DTYPE)
    gain[0, 0], gain[1, 1], gain[2, 2] = 1.0, 0.2, 0.05
    set_guide(vae, gain, torch.tensor([0.5, -1.0, 2.0, 0.3], dtype=DTYPE), torch.full((z_dim,), 0.7, dtype=DTYPE))
    count, variances = ev.active_units(vae, x, batch_size=300)
    torch.testing.assert_close(variances, torch.tensor([1.0, 0.04, 0.0025, 0.0], dtype=DTYPE), rtol=1e-9, atol=1e-12)
    assert count == 2
    assert ev.active_units(vae, x, threshold=0.001)[0] == 3


def test_active_units_of_an_exact_posterior_are_the_informative_dimensions():
    lg, vae, _ = _model(exact=True)
    x = lg.sample(3000, generator=torch.Generator().manual_seed(5))
    count, variances = ev.active_units(vae, x)
    # Var_x(mu(x)) = A (W W^T + s^2 I) A^T for the exact gain A: diag = d^2 / (s^2 + d^2) here.
    gain = lg.posterior_gain()
    expected = (gain @ lg.marginal().covariance_matrix @ gain.T).diagonal()
    assert count == 3
    # The sample variance of 3000 Gaussian draws has relative SE sqrt(2 / 2999).
    assert_within_se("posterior-mean variances", variances, expected, expected * math.sqrt(2 / 2999), n_se=5)


def test_kl_per_dimension_sums_to_the_analytic_total():
    _, vae, x = _model(exact=False, n=50)
    per_dim = ev.kl_per_dimension(vae, x, batch_size=16)
    loc, scale = vae.encode(x)
    total = closed_form_terms(vae, x).kl.mean()
    expected = (0.5 * (scale.square() + loc.square() - 1 - 2 * scale.log())).mean(0)
    assert per_dim.shape == (3,)
    torch.testing.assert_close(per_dim, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(per_dim.sum(), total, rtol=1e-12, atol=1e-12)


def test_monte_carlo_kl_agrees_with_the_analytic_kl():
    """The fallback for factorized pairs without a registered KL, checked where the analytic value exists."""
    q = dist.Normal(torch.tensor([0.3, -1.0, 2.0], dtype=DTYPE), torch.tensor([0.5, 1.2, 0.1], dtype=DTYPE))
    p = dist.Normal(torch.zeros(3, dtype=DTYPE), torch.ones(3, dtype=DTYPE))
    draws = torch.stack([ev._mc_elementwise_kl(q, p, 200) for _ in range(50)])
    assert_within_se(
        "MC KL per dim", draws.mean(0), torch.distributions.kl_divergence(q, p), draws.std(0) / math.sqrt(50)
    )


class _StudentTPrior(nn.Module):
    """A factorized prior whose KL to a Normal torch does not register: the Monte Carlo path."""

    def forward(self, encoder=None):
        return dist.StudentT(4.0, torch.zeros(2, dtype=DTYPE), torch.ones(2, dtype=DTYPE)).to_event(1)


class _CorrelatedPrior(nn.Module):
    def forward(self, encoder=None):
        return dist.MultivariateNormal(torch.zeros(2, dtype=DTYPE), torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=DTYPE))


def test_kl_per_dimension_monte_carlo_for_factorized_priors_and_error_otherwise():
    x = torch.rand(20, 4, dtype=DTYPE)
    vae = VAE(x_dim=4, z_dim=2, hidden_dims=(8,), prior=_StudentTPrior()).double()
    per_dim = ev.kl_per_dimension(vae, x, num_samples=100)
    assert per_dim.shape == (2,) and per_dim.isfinite().all()
    vae = VAE(x_dim=4, z_dim=2, hidden_dims=(8,), prior=_CorrelatedPrior()).double()
    with pytest.raises(ValueError, match="factorize"):
        ev.kl_per_dimension(vae, x)
    # The estimators that need no factorization still work for this pair.
    assert ev.log_likelihood(vae, x, num_samples=8).isfinite().all()


# -- evaluate() ------------------------------------------------------------------------------------------
def _dataset(x: torch.Tensor, name: str = "synthetic", binary: bool | None = None) -> SimpleNamespace:
    return SimpleNamespace(name=name, test=x, val=x[:3], train=x, test_labels=None, is_binary=binary)


def test_evaluate_report_on_the_linear_gaussian():
    lg, vae, x = _model(exact=True, n=40)
    result = ev.evaluate(vae, _dataset(x), nll_samples=20, batch_size=16)
    exact_nll = float(-lg.log_px(x).mean())
    assert result["test_nll"] == pytest.approx(exact_nll, abs=1e-9)
    assert result["bits_per_dim"] == pytest.approx(exact_nll / (6 * math.log(2)), rel=1e-12)
    assert result["test_nll_se"] < 1e-6  # exact guide: no Monte Carlo error
    assert result["test_nll_data_se"] == pytest.approx(float(lg.log_px(x).std()) / math.sqrt(40), rel=1e-9)
    # At the exact posterior E[ELBO] = log p(x); the analytic-KL ELBO still has Monte Carlo noise in its
    # reconstruction term (only the full log-weight is constant), so compare within its SE.
    noise = ev.elbo_per_example(vae, x) - lg.log_px(x)
    assert_within_se(
        "test ELBO at the exact posterior", result["test_elbo"], -exact_nll, noise.std() / math.sqrt(40), 5
    )
    assert ev.elbo(vae, x, analytic_kl=False) == pytest.approx(-exact_nll, abs=1e-9)  # log-weights: no noise at all
    assert result["num_examples"] == 40 and result["data_variant"] == "synthetic" and result["x_dim"] == 6
    assert result["active_units"] == 3 and len(result["kl_per_dim"]) == 3
    assert sum(result["kl_per_dim"]) == pytest.approx(float(closed_form_terms(vae, x).kl.mean()), rel=1e-9)
    assert "warning" not in result
    assert ev.bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0)


def test_evaluate_nll_se_combines_per_example_errors():
    _, vae, x = _model(exact=False, n=8)
    pyro.set_rng_seed(11)
    result = ev.evaluate(vae, _dataset(x), nll_samples=50)
    pyro.set_rng_seed(11)
    ev.elbo(vae, x, batch_size=8)  # the same RNG draws as evaluate() makes before the NLL
    est, se = ev.log_likelihood_with_se(vae, x, num_samples=50, batch_size=8)
    assert result["test_nll"] == pytest.approx(float(-est.mean()), rel=1e-12)
    assert result["test_nll_se"] == pytest.approx(float(se.square().sum().sqrt() / 8), rel=1e-12)


def test_evaluate_skips_nll_and_names_the_split():
    _, vae, x = _model(exact=False, n=10)
    result = ev.evaluate(vae, _dataset(x), nll_samples=0, split="val")
    assert result["val_nll"] is None and result["bits_per_dim"] is None and result["num_examples"] == 3
    assert math.isfinite(result["val_elbo"])
    with pytest.raises(ValueError, match="valid splits: train, val, test"):
        ev.evaluate(vae, _dataset(x), split="tst")


def test_bernoulli_on_grey_levels_is_flagged_not_a_likelihood():
    vae = VAE(x_dim=4, z_dim=2, hidden_dims=(8,))
    grey = torch.rand(12, 4)
    result = ev.evaluate(vae, _dataset(grey, name="mnist", binary=False), nll_samples=5, subset=6)
    assert "not a likelihood" in result["warning"] and result["num_examples"] == 6
    binary = torch.bernoulli(grey)
    assert "warning" not in ev.evaluate(vae, _dataset(binary, name="mnist-static", binary=True), nll_samples=5)
    assert "warning" in ev.evaluate(vae, _dataset(grey, binary=None), nll_samples=0)  # detected from the data


def test_evaluate_run_uses_the_runs_loader(monkeypatch, tmp_path):
    """evaluate_run wires load_run to evaluate (the run loader is stubbed: training is tested elsewhere)."""
    lg, vae, x = _model(exact=True, n=6)
    calls = {}

    def load_run(run_dir, device="auto", data_dir=None):
        calls.update(run_dir=run_dir, device=device, data_dir=data_dir)
        return SimpleNamespace(vae=vae, dataset=_dataset(x), checkpoint="best.pt")

    monkeypatch.setitem(sys.modules, "pyro_vae.runs", types.SimpleNamespace(load_run=load_run))
    result = ev.evaluate_run(tmp_path, nll_samples=4, device="cpu", data_dir="d", subset=4)
    assert calls == {"run_dir": tmp_path, "device": "cpu", "data_dir": "d"}
    assert result["num_examples"] == 4 and result["run"] == str(tmp_path) and result["weights"] == "best.pt"
    assert result["test_nll"] == pytest.approx(float(-lg.log_px(x[[0, 1, 3, 4]]).mean()), abs=1e-9)  # 4 of 6, spread
    assert not (tmp_path / "evaluation.json").exists()  # written only when asked

    saved = ev.evaluate_run(tmp_path, nll_samples=4, device="cpu", subset=4, save=True)
    on_disk = json.loads((tmp_path / "evaluation.json").read_text())
    assert on_disk == json.loads(json.dumps(saved))
    examples = np.load(tmp_path / "evaluation.npz")
    np.testing.assert_allclose(-examples["log_px"].mean(), saved["test_nll"], rtol=1e-12)
    np.testing.assert_allclose(examples["elbo"].mean(), saved["test_elbo"], rtol=1e-6)
    assert examples["log_px"].shape == examples["log_px_se"].shape == examples["ess"].shape == (4,)


def test_the_protocol_says_what_was_measured_and_how():
    """Data, which examples (a hash of their values), estimator and settings, weights and versions."""
    _, vae, x = _model(exact=False, n=6)
    result = ev.evaluate(vae, _dataset(x, name="mnist-static", binary=False), nll_samples=20, subset=5, seed=7)
    protocol = result["protocol"]
    assert protocol["data_variant"] == "mnist-static" and protocol["split"] == "test"
    assert protocol["num_examples"] == 5 and protocol["examples"] == "5 evenly spaced rows of the split (i * size // 5)"
    assert protocol["nll_method"] == "is" and protocol["nll_settings"] == {"samples": 20, "se": "jackknife"}
    assert protocol["seed"] == 7 and protocol["elbo_samples"] == 1
    assert set(protocol["versions"]) == {"pyro_vae", "pyro", "torch"}
    other = ev.evaluate(vae, _dataset(x, name="mnist-static", binary=False), nll_samples=20, subset=4)["protocol"]
    assert other["examples_sha256"] != protocol["examples_sha256"]
    assert other["weights_sha256"] == protocol["weights_sha256"]
    with torch.no_grad():
        next(vae.parameters()).add_(1e-3)
    assert ev.evaluate(vae, _dataset(x), nll_samples=0)["protocol"]["weights_sha256"] != protocol["weights_sha256"]


def test_result_carries_the_ess_and_both_standard_errors():
    _, vae, x = _model(exact=False, n=6)
    result = ev.evaluate(vae, _dataset(x), nll_samples=50)
    assert 1 <= result["test_ess_min"] <= result["test_ess_median"] <= 50
    assert result["test_nll_se"] > 0 and result["test_nll_se_delta"] > 0
    assert "warning" not in result


def test_degenerate_weights_are_warned_about():
    """A median ESS under LOW_ESS and under K/10 is a warning that the number is rough; few samples asked for
    knowingly (K = 5, where the ESS cannot reach 10) are not."""

    def estimate(ess: float, n: int = 4) -> ev.ImportanceEstimate:
        zeros = torch.zeros(n)
        return ev.ImportanceEstimate(zeros, zeros, zeros, torch.full((n,), ess))

    assert "importance weights is 3.0 of K = 5000" in ev._ess_warning(estimate(3.0), 5000)
    assert ev._ess_warning(estimate(3.0), 5) is None
    assert ev._ess_warning(estimate(ev.LOW_ESS), 5000) is None


def test_ignore_z_baseline_is_the_best_z_independent_bernoulli_model():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(300, 20, generator=g) < torch.linspace(0.05, 0.9, 20)).float()
    best = ev.ignore_z_baseline(x)
    p = x.double().mean(0)
    assert best == pytest.approx(torch.distributions.Bernoulli(probs=p).log_prob(x.double()).sum(-1).mean().item())
    # Any other pixel probabilities score lower on x: the baseline is the maximum.
    for seed in range(5):
        other = (torch.rand(300, 20, generator=torch.Generator().manual_seed(seed + 1)) < 0.5).float()
        assert ev.ignore_z_baseline(x, fit=other) < best
    # Held-out use: probabilities from one set, scored on another; clamping keeps constant pixels finite.
    assert math.isfinite(ev.ignore_z_baseline(torch.ones(4, 3), fit=torch.zeros(4, 3)))


# -- standard errors that hold at small K ---------------------------------------------------------------
def _lognormal_log_weights(k: int, repeats: int, ratio: float = 17.0, seed: int = 0) -> torch.Tensor:
    """``(k, repeats)`` log weights with E[w] = 1 and E[w^2] / E[w]^2 = ``ratio`` (log-normal)."""
    s2 = math.log(ratio)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(k, repeats, generator=generator, dtype=torch.float64) * math.sqrt(s2) - s2 / 2


def _paired_z(estimates: torch.Tensor, se: torch.Tensor) -> float:
    """z of mean((L - mean L)^2 - se^2) over repeats: > 0 when the SE is optimistic."""
    diff = (estimates - estimates.mean()).square() - se.square()
    return float(diff.mean() / (diff.std() / math.sqrt(diff.numel())))


@pytest.mark.parametrize("k", [10, 100])
def test_jackknife_se_is_honest_where_the_delta_method_is_optimistic(k):
    """Heavy-tailed weights (E[w^2]/E[w]^2 = 17, as a guide narrower than the posterior gives) at small K.

    Over 4000 independent estimates, the mean of se^2 is compared with the variance of the estimates
    (paired z over repeats). The delta method's is too small by more than 4 SE at K = 10 and 100 (the
    failure the jackknife fixes); the jackknife's is not, and by Efron-Stein it may exceed the variance by
    at most about K/(K-1) (the variance of a (K-1)-draw estimate), within 4 SE.
    """
    log_w = _lognormal_log_weights(k, 4000)
    estimates = log_w.logsumexp(0) - math.log(k)
    assert _paired_z(estimates, ev.delta_method_se(log_w)) > 4
    jackknife = ev.jackknife_se(log_w)
    assert _paired_z(estimates, jackknife) < 4
    assert _paired_z(estimates * math.sqrt(k / (k - 1)), jackknife) > -4


def test_jackknife_se_is_the_brute_force_leave_one_out_formula():
    """Against leave-one-out estimates computed one by one, including a weight that is all but all the mass."""
    log_w = _lognormal_log_weights(7, 5, seed=1)
    log_w[:, 4] = torch.tensor([0.0, -40.0, -41.0, -45.0, -50.0, -60.0, -39.0], dtype=torch.float64)
    k = log_w.shape[0]
    loo = torch.stack(
        [torch.cat([log_w[:i], log_w[i + 1 :]]).logsumexp(0) - math.log(k - 1) for i in range(k)]
    )  # (K, batch)
    expected = ((k - 1) / k * (loo - loo.mean(0)).square().sum(0)).sqrt()
    torch.testing.assert_close(ev.jackknife_se(log_w), expected, rtol=1e-9, atol=0)
    assert ev.jackknife_se(log_w)[4] > 0  # the dominant weight's leave-one-out is not lost to rounding
    assert ev.jackknife_se(log_w[:1]).isnan().all() and ev.delta_method_se(log_w[:1]).isnan().all()


def test_effective_sample_size_runs_from_one_to_k():
    equal = torch.zeros(50, 3)
    one = torch.full((50, 3), -1e4)
    one[7] = 0.0
    torch.testing.assert_close(ev.effective_sample_size(equal), torch.full((3,), 50.0))
    torch.testing.assert_close(ev.effective_sample_size(one), torch.ones(3))


def test_importance_estimate_reports_both_errors_and_the_ess():
    """The one pass gives the estimate and both SEs of log_likelihood_with_se (same seed), and an ESS in [1, K]."""
    _, vae, x = _model(exact=False)
    pyro.set_rng_seed(3)
    report_ = ev.importance_estimate(vae, x, num_samples=300, chunk_size=70)
    for method, expected in (("jackknife", report_.se), ("delta", report_.se_delta)):
        pyro.set_rng_seed(3)
        estimate, se = ev.log_likelihood_with_se(vae, x, num_samples=300, chunk_size=70, se=method)
        torch.testing.assert_close(estimate, report_.log_px, rtol=0, atol=1e-12)
        torch.testing.assert_close(se, expected, rtol=0, atol=1e-12)
    assert ((report_.ess >= 1) & (report_.ess <= 300)).all()
    with pytest.raises(ValueError, match="unknown standard error 'boot'; valid: jackknife, delta"):
        ev.log_likelihood_with_se(vae, x, num_samples=3, se="boot")


def test_kept_weights_stay_under_their_budget(monkeypatch):
    """Blocks of examples shrink so that the (K, batch) log weights kept for the jackknife fit WEIGHTS_BUDGET."""
    _, vae, x = _model(exact=False, n=9)
    monkeypatch.setattr(ev, "WEIGHTS_BUDGET", 1000)
    blocks = list(ev._log_weight_batches(vae, x, num_samples=400, chunk_size=None, batch_size=None))
    assert [block.shape for block in blocks] == [(400, 2)] * 4 + [(400, 1)]
