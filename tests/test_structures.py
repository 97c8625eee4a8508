"""Model structures as an extension point: the registry, the VAE facade, and a structure with two
latent sites that the estimators, the evaluation and the training step handle without knowing it.

The two-site structure is an exactly tractable linear-Gaussian model with a structured guide that
*is* its posterior: z1 ~ q(z1|x) (the posterior marginal), z2 ~ q(z2|z1, x) (the posterior
conditional). Then log p(x, z1, z2) - log q(z1, z2|x) = log p(x) for every draw, so every bound of
every estimator equals the closed-form log p(x) draw by draw: a check that cannot pass by luck.
"""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch import nn

from pyro_vae import estimators
from pyro_vae.evaluate import elbo_per_example, evaluate, log_likelihood
from pyro_vae.model import VAE
from pyro_vae.recorded import RecordedLoss
from pyro_vae.specs import SpecError
from pyro_vae.structures import STRUCTURES, PlainVAE, Structure
from pyro_vae.structures.base import data_plate, kl_scale, register
from pyro_vae.traces import log_weights, reparameterized_elbo_loss
from pyro_vae.train.step import TrainStep

DTYPE = torch.float64
D1, D2, X_DIM = 2, 1, 4


class _LinearGaussianNet(nn.Module):
    """x = W [z1; z2] + b + s eps, with (z1, z2) ~ N(0, I): its parameters and its exact posterior."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.W = nn.Parameter(torch.randn(X_DIM, D1 + D2, generator=generator, dtype=DTYPE))
        self.b = nn.Parameter(0.3 * torch.randn(X_DIM, generator=generator, dtype=DTYPE))
        self.s = 0.7

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``(batch, D1 + D2)`` and covariance ``(D1 + D2, D1 + D2)`` of p(z|x)."""
        precision = torch.eye(D1 + D2, dtype=DTYPE) + self.W.T @ self.W / self.s**2
        cov = torch.linalg.inv(precision)
        return (x - self.b) @ self.W @ cov / self.s**2, cov

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        cov = self.W @ self.W.T + self.s**2 * torch.eye(X_DIM, dtype=DTYPE)
        return dist.MultivariateNormal(self.b, cov).log_prob(x)


class TwoLatentSites(Structure):
    """p(z1) p(z2) p(x|z1, z2) with the exact structured guide q(z1|x) q(z2|z1, x)."""

    latent_sites = ("z1", "z2")

    def __init__(self) -> None:
        super().__init__()
        self.net = _LinearGaussianNet()

    def model(self, x, beta=1.0):
        register("net", self.net)
        unit = torch.zeros((), dtype=DTYPE)
        with data_plate(x):
            with kl_scale(beta):
                z1 = pyro.sample("z1", dist.Normal(unit, 1.0).expand([D1]).to_event(1))
                z2 = pyro.sample("z2", dist.Normal(unit, 1.0).expand([D2]).to_event(1))
            loc = torch.cat([z1, z2], -1) @ self.net.W.T + self.net.b
            pyro.sample("x", dist.Normal(loc, self.net.s).to_event(1), obs=x)

    def guide(self, x, beta=1.0):
        register("net", self.net)
        mean, cov = self.net.posterior(x)
        m1, m2 = mean[..., :D1], mean[..., D1:]
        c11, c12, c22 = cov[:D1, :D1], cov[:D1, D1:], cov[D1:, D1:]
        gain = torch.linalg.solve(c11, c12).T  # Sigma_21 Sigma_11^-1
        with data_plate(x), kl_scale(beta):
            z1 = pyro.sample("z1", dist.MultivariateNormal(m1, c11))
            pyro.sample("z2", dist.MultivariateNormal(m2 + (z1 - m1) @ gain.T, c22 - gain @ c12))


class ShiftedByData(Structure):
    """p(z) p(x|z, shift) with x = W z + b + shift + s eps: a structure that consumes a data field."""

    consumes = ("shift",)

    def __init__(self) -> None:
        super().__init__()
        self.net = _LinearGaussianNet()

    def model(self, x, beta=1.0, *, shift):
        register("net", self.net)
        with data_plate(x):
            with kl_scale(beta):
                z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=DTYPE), 1.0).expand([D1 + D2]).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.net.W.T + self.net.b + shift, self.net.s).to_event(1), obs=x)

    def guide(self, x, beta=1.0, *, shift):
        register("net", self.net)
        mean, cov = self.net.posterior(x - shift)
        with data_plate(x), kl_scale(beta):
            pyro.sample("z", dist.MultivariateNormal(mean, cov))


class MixtureOfLinearGaussians(Structure):
    """y ~ Cat(pi), z ~ N(0, I), x = W z + mu_y + s eps; the guide enumerates y from its exact posterior
    p(y|x) and draws z from the exact p(z|x, y). Then sum_y p(x, y, z_y) / q(z_y|x, y) = p(x) for every draw."""

    latent_sites = ("y", "z")

    def __init__(self) -> None:
        super().__init__()
        self.net = _LinearGaussianNet()
        generator = torch.Generator().manual_seed(2)
        self.mixture = nn.ParameterDict(
            {
                "means": nn.Parameter(2 * torch.randn(3, X_DIM, generator=generator, dtype=DTYPE)),
                "logits": nn.Parameter(torch.tensor([0.2, -0.5, 0.1], dtype=DTYPE)),
            }
        )

    def model(self, x, beta=1.0):
        register("net", self.net)
        register("mixture", self.mixture)
        with data_plate(x):
            y = pyro.sample("y", dist.Categorical(logits=self.mixture["logits"]))
            with kl_scale(beta):
                z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=DTYPE), 1.0).expand([D1 + D2]).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.net.W.T + self.mixture["means"][y], self.net.s).to_event(1), obs=x)

    def guide(self, x, beta=1.0):
        register("net", self.net)
        register("mixture", self.mixture)
        with data_plate(x):
            y = pyro.sample("y", dist.Categorical(logits=self.log_joint(x)), infer={"enumerate": "parallel"})
            mean, cov = self.net.posterior(x - self.mixture["means"][y] + self.net.b)
            with kl_scale(beta):
                pyro.sample("z", dist.MultivariateNormal(mean, cov))

    def log_joint(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x, y) for every y, shape ``(batch, 3)``."""
        shifted = x.unsqueeze(-2) - self.mixture["means"] + self.net.b  # log_marginal centres on b
        return self.net.log_marginal(shifted) + self.mixture["logits"].log_softmax(-1)


def _two_sites() -> tuple[VAE, torch.Tensor]:
    vae = VAE(structure=TwoLatentSites())
    x = torch.randn(6, X_DIM, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    return vae, x


def test_the_facade_adopts_the_structure_and_answers_for_it():
    vae, x = _two_sites()
    assert vae.latent_sites == ("z1", "z2") and vae.consumes == ()
    assert vae.needs_warmup == "" and vae.check_data(x, name="x") is None  # the base class's defaults
    plain = VAE(x_dim=6, z_dim=2, hidden_dims=(3,), prior="vamp(components=2)")
    assert "VampPrior" in plain.needs_warmup
    with pytest.raises(ValueError, match="bernoulli"):
        plain.check_data(torch.full((2, 6), 3.0), name="bad data")
    assert [name for name, _ in vae.named_children()] == ["net"]
    assert set(vae.state_dict()) == {"net.W", "net.b"}  # one tree: no "structure." copies
    assert "structure" not in dict(vae.named_modules())


def test_every_estimator_bound_is_the_exact_log_likelihood_for_the_exact_two_site_guide():
    vae, x = _two_sites()
    exact = vae.net.log_marginal(x).detach()
    pyro.set_rng_seed(0)
    weights = log_weights(vae, x, k=7).detach()
    assert weights.shape == (7, x.shape[0])
    torch.testing.assert_close(weights, exact.expand(7, -1), rtol=0, atol=1e-10)
    for spec in ("trace", "meanfield", "closed_form", "iwae(k=5)", "renyi(alpha=0.5, k=3)", "stl", "dreg(k=4)"):
        estimator = estimators.get(spec)
        if spec == "closed_form":  # the hand-written reference knows the plain VAE alone, and says so
            with pytest.raises(ValueError, match=r"written for the plain VAE.*not for TwoLatentSites"):
                estimator.bound(vae, x)
            continue
        torch.testing.assert_close(estimator.bound(vae, x), exact, rtol=0, atol=1e-10, msg=spec)
        loss = estimator.loss(vae, x)
        torch.testing.assert_close(loss.detach(), -exact.sum(), rtol=0, atol=1e-9, msg=spec)


def test_estimators_pass_the_data_a_structure_consumes_to_its_programs():
    vae, x = VAE(structure=ShiftedByData()), _two_sites()[1]
    shift = torch.linspace(-1, 1, X_DIM, dtype=DTYPE).expand(len(x), -1)
    exact = vae.net.log_marginal(x - shift).detach()
    assert vae.consumes == ("shift",)
    for spec in ("trace", "meanfield", "tracegraph", "iwae(k=5)", "renyi(alpha=0.5, k=3)", "stl(k=2)", "dreg(k=4)"):
        estimator = estimators.get(spec)
        torch.testing.assert_close(estimator.bound(vae, x, shift=shift), exact, rtol=0, atol=1e-10, msg=spec)
        torch.testing.assert_close(estimator.loss(vae, x, shift=shift).detach(), -exact.sum(), rtol=0, atol=1e-9)
    for spec in ("closed_form", "jit_trace"):
        with pytest.raises(ValueError, match=f"estimator {spec!r} takes x alone, but the model consumes shift"):
            estimators.get(spec).loss(vae, x, shift=shift)


def test_the_training_step_passes_the_data_a_structure_consumes():
    vae, x = VAE(structure=ShiftedByData()), _two_sites()[1]
    shift = torch.linspace(-1, 1, X_DIM, dtype=DTYPE).expand(len(x), -1)
    exact = vae.net.log_marginal(x - shift).detach()
    for spec in ("trace", "iwae(k=3)"):
        step = TrainStep(vae, estimators.get(spec), torch.optim.SGD(vae.parameters(), lr=0.0))
        for _ in range(3):
            torch.testing.assert_close(step(x, 1.0, shift=shift), -exact.sum(), rtol=0, atol=1e-9, msg=spec)
        # The fields are inputs of the recorded graph, like x: one replay for this signature.
        assert step.path == "fast" and [r is not None for r in step.recorded.replays.values()] == [True], spec
        lean = step.recorded.loss_fn is reparameterized_elbo_loss
        assert lean == (spec == "trace"), spec  # trace runs its lean loss, with the data passed through


def test_a_replay_reads_the_fields_it_is_given_not_those_it_was_recorded_with():
    vae, x = VAE(structure=ShiftedByData()), _two_sites()[1]
    recorded = RecordedLoss(reparameterized_elbo_loss, vae)
    for offset in (0.0, 0.5, -2.0):  # one signature: recorded once, replayed with each new shift
        shift = torch.linspace(-1, 1, X_DIM, dtype=DTYPE).expand(len(x), -1) + offset
        exact = vae.net.log_marginal(x - shift).detach()
        torch.testing.assert_close(recorded(vae, x, 1.0, shift=shift).detach(), -exact.sum(), rtol=0, atol=1e-9)
    assert len(recorded.replays) == 1 and None not in recorded.replays.values()


def test_enumerated_discrete_sites_are_summed_out_exactly():
    vae, x = VAE(structure=MixtureOfLinearGaussians()), _two_sites()[1]
    exact = vae.structure.log_joint(x).logsumexp(-1).detach()
    pyro.set_rng_seed(0)
    torch.testing.assert_close(log_weights(vae, x, k=5).detach(), exact.expand(5, -1), rtol=0, atol=1e-10)
    for spec in ("trace", "meanfield", "iwae(k=5)", "renyi(alpha=0.5, k=3)"):
        torch.testing.assert_close(estimators.get(spec).bound(vae, x), exact, rtol=0, atol=1e-10, msg=spec)
    torch.testing.assert_close(estimators.get("iwae(k=3)").loss(vae, x).detach(), -exact.sum(), rtol=0, atol=1e-9)
    torch.testing.assert_close(log_likelihood(vae, x, num_samples=7, chunk_size=3), exact, rtol=0, atol=1e-10)
    for spec in ("stl", "dreg(k=2)"):
        message = re.escape(f"estimator {spec!r} needs every latent site reparameterized") + ".*enumerates y"
        with pytest.raises(ValueError, match=message):
            estimators.get(spec).loss(vae, x)


def test_evaluation_reads_every_latent_site():
    vae, x = _two_sites()
    exact = vae.net.log_marginal(x).detach()
    report = evaluate(vae, SimpleNamespace(name="synthetic", test=x, is_binary=False), nll_samples=5)
    assert report["test_nll"] == pytest.approx(-float(exact.mean()), abs=1e-9)
    assert report["active_units"] is None and "not TwoLatentSites's sites" in report["kl_per_dim_error"]
    torch.testing.assert_close(log_likelihood(vae, x, num_samples=11, chunk_size=4), exact, rtol=0, atol=1e-10)
    torch.testing.assert_close(elbo_per_example(vae, x, num_samples=3), exact, rtol=0, atol=1e-10)


def test_the_training_step_runs_the_lean_recorded_loss_on_a_new_structure():
    vae, x = _two_sites()
    step = TrainStep(vae, estimators.get("trace"), torch.optim.SGD(vae.parameters(), lr=0.0))
    for _ in range(3):
        loss = step(x)
    assert step.path == "fast" and step.recorded is not None and step.recorded.all_replayed
    expected = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x).detach()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-9)


def test_structures_are_chosen_by_name_with_clear_errors():
    assert "vae" in STRUCTURES and STRUCTURES.factory("vae") is PlainVAE
    assert isinstance(VAE(x_dim=6, z_dim=2, hidden_dims=(3,)).structure, PlainVAE)
    # every registered structure is listed (alphabetically, others besides vae)
    valid = r"valid structures: (\w+, )*vae\b"
    with pytest.raises(SpecError, match=r"unknown structure 'vea' \(did you mean \"vae\"\?\); " + valid):
        VAE(x_dim=6, z_dim=2, structure="vea")


def test_a_structure_keeps_its_parameters_in_child_modules():
    class Loose(Structure):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(1))

    with pytest.raises(ValueError, match=r"keep its parameters and buffers in child modules.*weight"):
        VAE(structure=Loose())


def test_plain_vae_numbers_do_not_depend_on_how_x_is_shaped():
    torch.manual_seed(0)
    vae = VAE(x_dim=12, z_dim=2, hidden_dims=(5,), x_shape=(3, 4))
    x = torch.rand(7, 3, 4).round()
    pyro.set_rng_seed(1)
    flat = log_weights(vae, x.reshape(7, 12), k=2)
    pyro.set_rng_seed(1)
    shaped = log_weights(vae, x, k=2)
    assert torch.equal(flat, shaped) and math.isfinite(float(flat.detach().sum()))
