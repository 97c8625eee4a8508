"""The conditional VAE (``cvae``) and its deterministic baseline (``cvae_baseline``) on the quadrant task.

The CVAE checks run on a linear-Gaussian CVAE whose weights are set by hand (one linear layer per
network, a Gaussian likelihood with a fixed scale, float64, 4x2 "images" whose left half is given):

    z | x_in ~ N(A x_in' + a, diag s_p^2),    y | z ~ N(W_P z + b_P, sigma^2 I)   (predicted pixels P),

with x_in' the given pixels and -1 on the predicted ones. Then log p(y|x_in) is a Gaussian in closed
form, the exact posterior p(z|x_in, y) is Gaussian, and the recognition network is set to its mean
and WIDER times its marginal scales: a good but not exact guide, so every bound sits strictly below
log p(y|x_in) by a gap that is known too (the ELBO's gap is KL(q || posterior)).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from mc_stats import batch_means, report
from pyro import poutine

from pyro_vae import cli, estimators
from pyro_vae.config import load_config
from pyro_vae.evaluate import elbo_per_example, evaluate, log_likelihood_with_se
from pyro_vae.fields import quadrant_mask
from pyro_vae.model import VAE
from pyro_vae.networks import MIN_SCALE, inverse_softplus
from pyro_vae.structures.cvae import UNKNOWN
from pyro_vae.traces import log_weights
from pyro_vae.train import train

DTYPE = torch.float64
SHAPE, Z_DIM, SIGMA = (1, 4, 2), 2, 0.5
PRIOR_SCALES = torch.tensor([0.8, 1.3], dtype=DTYPE)
MASK = quadrant_mask(SHAPE, 2)  # the left column of the 4x2 image: pixels 0, 2, 4, 6
GIVEN, PREDICTED = MASK.nonzero().flatten(), (~MASK).nonzero().flatten()
N = 6
# The recognition network's scales are this multiple of the exact posterior's marginal ones: a proposal
# wider than the posterior (safe importance weights) that leaves a clear gap for the bounds to close.
WIDER = 1.5
CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "mnist_cvae.toml")


def _set_gaussian_head(head: torch.nn.Linear, weight: torch.Tensor, bias: torch.Tensor, scales: torch.Tensor) -> None:
    """A GaussianEncoder head with loc = weight @ input + bias and a constant scale."""
    with torch.no_grad():
        head.weight.zero_()
        head.weight[:Z_DIM] = weight
        head.bias[:Z_DIM] = bias
        head.bias[Z_DIM:] = torch.tensor([inverse_softplus(float(s) - MIN_SCALE) for s in scales], dtype=DTYPE)


class LinearCVAE:
    """The hand-set linear-Gaussian CVAE, its exact conditional likelihood and posterior."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.A = torch.randn(Z_DIM, 8, generator=g, dtype=DTYPE)
        self.a = 0.3 * torch.randn(Z_DIM, generator=g, dtype=DTYPE)
        self.W = torch.randn(8, Z_DIM, generator=g, dtype=DTYPE)
        self.b = 0.3 * torch.randn(8, generator=g, dtype=DTYPE)
        self.vae = VAE(
            x_dim=8, z_dim=Z_DIM, hidden_dims=(), likelihood=f"gaussian(scale={SIGMA})", structure="cvae", x_shape=SHAPE
        ).double()
        _set_gaussian_head(self.vae.prior_net.net.head, self.A, self.a, PRIOR_SCALES)
        with torch.no_grad():
            self.vae.generation.head.weight.copy_(self.W)
            self.vae.generation.head.bias.copy_(self.b)
        # The exact posterior's mean is linear in x: the recognition network can hold it.
        cov = self.posterior_cov()
        gain_prior, gain_y = cov @ torch.diag(PRIOR_SCALES**-2), cov @ self.W[PREDICTED].T / SIGMA**2
        weight = torch.zeros(Z_DIM, 8, dtype=DTYPE)
        weight[:, GIVEN], weight[:, PREDICTED] = gain_prior @ self.A[:, GIVEN], gain_y
        bias = gain_prior @ (self.a + UNKNOWN * self.A[:, PREDICTED].sum(1)) - gain_y @ self.b[PREDICTED]
        _set_gaussian_head(self.vae.recognition.net.head, weight, bias, WIDER * cov.diagonal().sqrt())

    def prior_loc(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(MASK, x, UNKNOWN) @ self.A.T + self.a

    def posterior_cov(self) -> torch.Tensor:
        w = self.W[PREDICTED]
        return torch.linalg.inv(torch.diag(PRIOR_SCALES**-2) + w.T @ w / SIGMA**2)

    def posterior_mean(self, x: torch.Tensor) -> torch.Tensor:
        w = self.W[PREDICTED]
        precision_mean = self.prior_loc(x) / PRIOR_SCALES**2 + (x[:, PREDICTED] - self.b[PREDICTED]) @ w / SIGMA**2
        return precision_mean @ self.posterior_cov()

    def log_p_y(self, x: torch.Tensor) -> torch.Tensor:
        """log p(y|x_in) exactly: y = x[P] ~ N(W_P mu(x_in) + b_P, W_P S W_P^T + sigma^2 I)."""
        w = self.W[PREDICTED]
        cov = w @ torch.diag(PRIOR_SCALES**2) @ w.T + SIGMA**2 * torch.eye(len(PREDICTED), dtype=DTYPE)
        return dist.MultivariateNormal(self.prior_loc(x) @ w.T + self.b[PREDICTED], cov).log_prob(x[:, PREDICTED])

    def elbo(self, x: torch.Tensor) -> torch.Tensor:
        """log p(y|x_in) - KL(q(z|x_in, y) || p(z|x_in, y)) exactly."""
        cov, mean = self.posterior_cov(), self.posterior_mean(x)
        q = dist.MultivariateNormal(mean, torch.diag(WIDER**2 * cov.diagonal()))
        return self.log_p_y(x) - torch.distributions.kl_divergence(q, dist.MultivariateNormal(mean, cov))

    def sample(self, n: int, seed: int = 1) -> torch.Tensor:
        """Images whose given pixels are random and whose predicted pixels come from the model."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 8, generator=g, dtype=DTYPE)
        z = self.prior_loc(x) + PRIOR_SCALES * torch.randn(n, Z_DIM, generator=g, dtype=DTYPE)
        y = z @ self.W.T + self.b + SIGMA * torch.randn(n, 8, generator=g, dtype=DTYPE)
        return torch.where(MASK, x, y)


@pytest.fixture(scope="module")
def lin() -> LinearCVAE:
    return LinearCVAE()


@pytest.fixture(scope="module")
def xs(lin) -> torch.Tensor:
    return lin.sample(N)


def _mask(n: int) -> torch.Tensor:
    return MASK.expand(n, -1)


def test_the_guide_is_close_but_not_exact_so_the_elbo_gap_is_known(lin, xs):
    exact, elbo = lin.log_p_y(xs), lin.elbo(xs)
    gap = exact - elbo
    assert bool((gap > 0.05).all()) and bool((gap < 2.0).all()), gap  # a wider, diagonal q of a correlated posterior
    # The traces' one-draw log weights average to that ELBO (Monte Carlo, within 5 SE)...
    lw = log_weights(lin.vae, xs, k=4000, input_mask=_mask(N)).detach()
    mean, se = lw.mean(0), lw.std(0) / math.sqrt(lw.shape[0])
    assert report("CVAE one-draw ELBO vs exact ELBO", mean, se, elbo) < 5
    # ...and evaluate's ELBO (analytic KL between the two diagonal Gaussians) is the same number.
    # Its Monte Carlo part is the reconstruction term alone, whose spread differs: batch means give its SE.
    analytic, se = batch_means(lambda: elbo_per_example(lin.vae, xs, num_samples=200, input_mask=_mask(N)), 20)
    assert report("evaluate's ELBO vs exact ELBO", analytic, se, elbo) < 5


def test_iwae_bounds_climb_towards_the_exact_conditional_log_likelihood(lin, xs):
    exact = lin.log_p_y(xs).mean()
    means = {}
    for k in (1, 8, 64):
        estimator = estimators.get(f"iwae(k={k})")
        mean, se = batch_means(lambda e=estimator: e.bound(lin.vae, xs, input_mask=_mask(N)).mean(), repeats=600)
        report(f"IWAE k={k} bound (exact log p(y|x_in) {float(exact):.4f})", mean, se)
        assert float(mean) < float(exact) + 4 * float(se)
        means[k] = (float(mean), float(se))
    for small, large in ((1, 8), (8, 64)):
        (m_s, se_s), (m_l, se_l) = means[small], means[large]
        assert m_l - m_s > 4 * math.hypot(se_s, se_l), (small, large, means)
    assert float(exact) - means[64][0] < (float(exact) - means[1][0]) / 10


def test_the_importance_sampled_conditional_nll_matches_the_exact_one(lin, xs):
    exact = lin.log_p_y(xs)
    estimate, se = log_likelihood_with_se(lin.vae, xs, num_samples=20000, chunk_size=5000, input_mask=_mask(N))
    assert report("IS log p(y|x_in), k=20000", estimate, se, exact) < 5
    dataset = SimpleNamespace(name="linear", test=xs, is_binary=False, fields={"input_mask": {"test": _mask(N)}})
    result = evaluate(lin.vae, dataset, nll_samples=5000)
    assert result["test_nll"] == pytest.approx(-float(exact.mean()), abs=5 * result["test_nll_se"] + 1e-9)
    assert result["test_elbo"] < -result["test_nll"]
    assert result["bits_per_dim"] == pytest.approx(result["test_nll"] / (4 * math.log(2)))  # 4 predicted pixels
    assert result["test_kl"] > 0 and result["active_units"] is None


def test_the_given_pixels_reach_the_model_only_through_the_prior_and_the_predicted_ones_only_through_y(lin, xs):
    def site_log_probs(x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = torch.zeros(N, Z_DIM, dtype=DTYPE)
        model = poutine.condition(lin.vae.model, data={"z": z})
        trace = poutine.trace(model).get_trace(x, input_mask=_mask(N))
        trace.compute_log_prob()
        return {name: trace.nodes[name]["log_prob"].detach() for name in ("z", "y")}

    base = site_log_probs(xs)
    at_given, at_predicted = xs.clone(), xs.clone()
    at_given[:, GIVEN] += 1.0
    at_predicted[:, PREDICTED] += 1.0
    moved_given, moved_predicted = site_log_probs(at_given), site_log_probs(at_predicted)
    torch.testing.assert_close(moved_given["y"], base["y"], rtol=0, atol=0)  # y scores predicted pixels only
    assert not torch.allclose(moved_given["z"], base["z"])  # ...while the prior reads the given ones
    torch.testing.assert_close(moved_predicted["z"], base["z"], rtol=0, atol=0)  # the prior never sees y
    assert not torch.allclose(moved_predicted["y"], base["y"])
    expected = dist.Normal(lin.b[PREDICTED], SIGMA).log_prob(xs[:, PREDICTED]).sum(-1)
    torch.testing.assert_close(base["y"], expected)  # at z = 0: the likelihood of the predicted pixels alone


def test_beta_scales_the_latent_site_only(lin, xs):
    # log w_beta = log p(y|z) + beta (log p(z|x_in) - log q(z|x_in, y)), the draws z not depending on beta.
    weights = {}
    for beta in (0.25, 0.5, 1.0):
        pyro.set_rng_seed(3)
        weights[beta] = log_weights(lin.vae, xs, k=3, beta=beta, input_mask=_mask(N)).detach()
    torch.testing.assert_close(weights[0.25], 1.5 * weights[0.5] - 0.5 * weights[1.0])  # linear in beta
    assert not torch.allclose(weights[0.5], weights[1.0])


def test_completions_keep_the_given_pixels_and_vary_only_for_the_cvae(lin, xs):
    filled = lin.vae.complete(xs, _mask(N), 4)
    assert filled.shape == (4, N, 8)
    torch.testing.assert_close(filled[..., GIVEN], xs[:, GIVEN].expand(4, -1, -1))
    assert not torch.allclose(filled[0, :, PREDICTED], filled[1, :, PREDICTED])
    torch.manual_seed(0)
    baseline = VAE(x_dim=16, z_dim=2, hidden_dims=(5,), structure="cvae_baseline", x_shape=(1, 4, 4))
    x = torch.rand(3, 16)
    mask = quadrant_mask((1, 4, 4), 1).expand(3, -1)
    done = baseline.complete(x, mask, 2)
    torch.testing.assert_close(done[0], done[1])
    torch.testing.assert_close(done[0][mask], x[mask])


# -- the deterministic baseline ---------------------------------------------------------------------
def _baseline_by_hand(vae, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Minus Pyro's MaskedBCELoss per example: the Bernoulli log-likelihood of the predicted pixels,
    with the 16-5-16 softplus network written out."""
    first, head = vae.baseline.body.layers[0], vae.baseline.head
    inputs = torch.where(mask, x, -1.0)
    probs = torch.sigmoid(F.softplus(inputs @ first.weight.T + first.bias) @ head.weight.T + head.bias)
    bce = F.binary_cross_entropy(probs, x, reduction="none")
    return -(bce * ~mask).sum(-1)


def test_the_baseline_bound_of_every_estimator_is_its_masked_bernoulli_log_likelihood():
    torch.manual_seed(0)
    vae = VAE(x_dim=16, z_dim=2, hidden_dims=(5,), structure="cvae_baseline", x_shape=(1, 4, 4))
    x = torch.rand(7, 16).round()
    mask = quadrant_mask((1, 4, 4), 1).expand(7, -1)
    by_hand = _baseline_by_hand(vae, x, mask).detach()
    assert vae.latent_sites == () and vae.observed_sites == ("y",) and vae.consumes == ("input_mask",)
    for spec in ("trace", "meanfield", "tracegraph", "iwae(k=4)", "renyi(alpha=0.5, k=3)", "stl", "dreg(k=2)"):
        estimator = estimators.get(spec)
        torch.testing.assert_close(estimator.bound(vae, x, input_mask=mask), by_hand, msg=spec)
        torch.testing.assert_close(estimator.loss(vae, x, input_mask=mask).detach(), -by_hand.sum(), msg=spec)
    # Training it is training Pyro's BaselineNet: the gradient is that of the masked cross-entropy.
    estimators.get("trace").loss(vae, x, input_mask=mask).backward()
    ours = [p.grad.clone() for p in vae.parameters()]
    vae.zero_grad()
    (-_baseline_by_hand(vae, x, mask).sum()).backward()
    for mine, theirs in zip(ours, [p.grad for p in vae.parameters()], strict=True):
        torch.testing.assert_close(mine, theirs)
    estimate, se = log_likelihood_with_se(vae, x, num_samples=5, input_mask=mask)
    torch.testing.assert_close(estimate, by_hand)
    assert float(se.max()) < 1e-3  # every weight is the same number: no Monte Carlo error but rounding
    dataset = SimpleNamespace(name="bits", test=x, is_binary=True, fields={"input_mask": {"test": mask}})
    result = evaluate(vae, dataset, nll_samples=3)
    assert result["test_elbo"] == pytest.approx(-result["test_nll"], abs=1e-4)
    assert result["test_nll"] == pytest.approx(-float(by_hand.mean()), abs=1e-4)


# -- training, the run folder and the command -------------------------------------------------------
TINY = [
    "data.name=synthetic(num_train=200, num_test=40, side=8, components=3)",
    "data.quadrants=1",
    "model.z_dim=3",
    "model.hidden_dims=[16]",
    "train.epochs=2",
    "train.batch_size=40",
    "train.lr=0.01",
    "train.nll_samples=10",
    "train.device=cpu",
]


@pytest.mark.parametrize("structure", ["cvae", "cvae_baseline"])
def test_a_short_run_writes_metrics_evaluation_and_completions(tmp_path, structure, capsys):
    out = tmp_path / structure
    cfg = load_config(CONFIG, [*TINY, f"model.structure={structure}"])
    train(cfg, out, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r["test_elbo"] < 0 for r in records)
    assert ("test_kl" in records[-1]) == (structure == "cvae")
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["test_elbo"] < 0 < evaluation["test_nll"]
    if structure == "cvae":
        assert -evaluation["test_nll"] > evaluation["test_elbo"] - 5 * evaluation["test_nll_se"]
    else:
        assert evaluation["test_nll"] == pytest.approx(-evaluation["test_elbo"], abs=1e-3)
    assert (out / "completions.png").is_file() and not (out / "samples.png").exists()
    assert cli.main(["evaluate", "--run", str(out), "--nll-samples", "7", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["nll_samples"] == 7 and printed["test_nll"] > 0
    for command in (["sample", "--run", str(out), "--out", str(tmp_path / "s.png")], ["compare", "--run", str(out)]):
        assert cli.main([*command, "--estimators", "trace"] if command[0] == "compare" else command) != 0
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    (out / "completions.png").unlink()
    assert cli.main(["plot", "--run", str(out)]) == 0
    assert (out / "completions.png").is_file()


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["data.quadrants=4"], "data.quadrants must be at most 3, got 4"),
        (["data.quadrants=None"], "consumes the data field 'input_mask'.*set data.quadrants = 1, 2 or 3"),
        (['model.prior="vamp(components=3)"'], "model.prior must be 'normal'"),
    ],
)
def test_bad_quadrant_settings_are_one_line_errors(tmp_path, capsys, sets, message):
    argv = ["train", "--config", CONFIG, "--out", str(tmp_path / "o"), "--no-progress"]
    argv += [item for s in [*TINY, *sets] for item in ("--set", s)]
    assert cli.main(argv) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(message, err), err
