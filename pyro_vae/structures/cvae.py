"""The conditional VAE of Sohn, Lee & Yan (2015) and its deterministic baseline, on Pyro's quadrant task.

Sohn, Lee & Yan, "Learning Structured Output Representation using Deep Conditional Generative
Models", NeurIPS 2015; Pyro's ``examples/cvae`` and its tutorial reproduce their MNIST experiment.
Each image x is split by the data field ``input_mask`` (True on the given pixels; ``data.quadrants``,
``pyro_vae.fields``) into the input x_in (the given quadrants) and the output y (the rest):

    cvae           model:  z ~ p(z|x_in) = N(mu(x_in), diag sigma(x_in)^2)   (prior network; beta scales z)
                           y ~ p(y|z)     = likelihood(generation(z)), on the predicted pixels only
                   guide:  z ~ q(z|x_in, y) = guide(recognition(x))         (sees the whole image)

    cvae_baseline  model:  y ~ p(y|x_in) = likelihood(baseline(x_in)), on the predicted pixels only
                   guide:  nothing (no latent: its every bound is log p(y|x_in) itself)

Latent site ``"z"``, observed site ``"y"``. The observed value is the whole (prepared) image, with the
given pixels masked out of the likelihood, so they contribute nothing; the networks see x_in as Pyro's
example encodes it, the given pixels with -1 on the predicted ones (:func:`given_pixels`). The ELBO is
then a bound on the conditional log-likelihood log p(y|x_in), and the importance-sampled NLL of
``pyro_vae.evaluate`` estimates -log p(y|x_in), with q(z|x_in, y) as the proposal.

Unlike Pyro's example, the prior network does not also receive the prediction y_hat of a separately
pretrained (frozen) baseline: here the CVAE is one model trained from scratch (``docs/structures.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import kl_divergence

from pyro_vae.guides import build_guide
from pyro_vae.likelihoods import build_likelihood, observe_pixels
from pyro_vae.networks import build_network, initialize
from pyro_vae.structures.base import Structure, data_plate, kl_scale, likelihood_decoder, register, require_family

# The value of a predicted pixel in the networks' input: outside every likelihood's [0, 1] data, so a
# black given pixel (0) and an unknown one differ (Pyro's examples/cvae masks with -1 too).
UNKNOWN = -1.0
# Completions drawn per test digit in completions.png.
FIGURE_SAMPLES = 5


def given_pixels(x: torch.Tensor, input_mask: torch.Tensor) -> torch.Tensor:
    """x_in as the networks see it: the given pixels of the flat ``x``, :data:`UNKNOWN` on the predicted ones."""
    return torch.where(input_mask, x, x.new_full((), UNKNOWN))


def predicted_pixels_only(pixels: dist.Distribution, input_mask: torch.Tensor) -> dist.Distribution:
    """``pixels`` (independent pixels, event shape ``(D,)``) counting only the pixels that ``input_mask`` leaves out:

        log p(y) = sum_{d : not input_mask_d} log p_d(y_d),

    so the value at a given pixel never matters: the library's one masking mechanism
    (``pyro_vae.likelihoods.observe_pixels``) with the predicted pixels as the observed ones.
    """
    return observe_pixels(pixels, ~input_mask)


class Conditional(Structure):
    """What the CVAE and its baseline share: the split of x by ``input_mask``, the masked observed site
    ``"y"``, the data check and the completions figure. Subclasses give the likelihood's parameters of the
    predicted pixels (:meth:`prediction_params`) and their programs."""

    observed_sites = ("y",)
    consumes = ("input_mask",)
    figure_samples = 1  # completions per digit in the figure

    def __init__(self, x_shape: Sequence[int], likelihood) -> None:
        super().__init__()
        self.x_shape = tuple(int(d) for d in x_shape)
        self.x_dim = math.prod(self.x_shape)
        self.likelihood = build_likelihood(likelihood, x_dim=self.x_dim)

    def _event(self, x: torch.Tensor) -> torch.Tensor:
        """Flat rows ``(batch, D)`` as ``(batch, *x_shape)``, the shape the network bodies take."""
        return x.reshape(x.shape[0], *self.x_shape)

    def _network_input(self, x: torch.Tensor, input_mask: torch.Tensor) -> torch.Tensor:
        return self._event(given_pixels(x, input_mask))

    def observe(self, params: torch.Tensor, x: torch.Tensor, input_mask: torch.Tensor) -> torch.Tensor:
        """The observed site ``"y"``: the predicted pixels of ``x`` under the likelihood with ``params``."""
        pixels = predicted_pixels_only(self.likelihood(params), input_mask)
        return pyro.sample("y", pixels, obs=self.likelihood.prepare(x))

    def observed_dim(self, x: torch.Tensor, *, input_mask: torch.Tensor) -> float:
        """The predicted pixels per example (on average over the batch): the dimension of y."""
        return float((~input_mask).sum(-1).double().mean())

    def check_data(self, x: torch.Tensor, name: str) -> None:
        """The likelihood's check (a Bernoulli needs values in [0, 1])."""
        self.likelihood.check(x, name=name)

    def prediction_params(self, x: torch.Tensor, input_mask: torch.Tensor, num: int) -> torch.Tensor:
        """The likelihood's parameters for ``num`` predictions of y given x_in, shape ``(num, batch, out_dim)``."""
        raise NotImplementedError

    def sample(self, num: int) -> torch.Tensor:
        """Refused: the model draws y given x_in, not images from nothing (``pyro-vae sample``)."""
        raise ValueError(
            "a conditional model completes given pixels rather than sampling whole images: see completions.png "
            "(pyro-vae plot --run DIR)"
        )

    @torch.no_grad()
    def complete(self, x: torch.Tensor, input_mask: torch.Tensor, num: int = FIGURE_SAMPLES) -> torch.Tensor:
        """``num`` completions of each image, shape ``(num, batch, D)``: the given pixels of x, and
        E[y | ...] of each prediction (:meth:`prediction_params`) on the predicted ones."""
        x = x.reshape(x.shape[0], -1)
        mean = self.likelihood.mean(self.prediction_params(x, input_mask, num))
        return torch.where(input_mask, x, mean.to(x.dtype))

    def figures(self, dataset) -> dict[str, Callable[[Path], Path]]:
        """``completions.png`` (``pyro_vae.plots.completions``) on the test set: the plain VAE's figures
        (reconstructions, samples from p(z)) have no meaning for a conditional model."""
        from pyro_vae.plots import completions  # matplotlib loads only when figures are drawn

        mask = dataset.fields["input_mask"]["test"]
        shape = getattr(dataset, "image_shape", None)
        return {"completions.png": lambda p: completions(self, dataset.test, mask, shape, p, self.figure_samples)}


class CVAE(Conditional):
    """p(z|x_in) p(y|z) with the recognition network q(z|x_in, y); the structure ``"cvae"``.

    Networks (as in Pyro's example, whose 784-500-500-200 ReLU nets ``configs/mnist_cvae.toml`` uses):
    the recognition network is the ``guide`` family on an ``encoder`` body over the whole image; the
    prior network a diagonal-Gaussian head on another ``encoder`` body over x_in (:func:`given_pixels`);
    the generation network a ``decoder`` body over z with the likelihood's head. ``prior`` must stay
    ``"normal"``: the prior of this model is the prior network.
    """

    latent_sites = ("z",)
    figure_samples = FIGURE_SAMPLES

    def __init__(
        self,
        x_shape: Sequence[int],
        z_dim: int,
        encoder,
        decoder,
        prior="normal",
        likelihood="bernoulli",
        guide="normal",
        init: str = "torch",
    ) -> None:
        super().__init__(x_shape, likelihood)
        require_family("cvae", "prior", prior, "normal", "has the conditional prior p(z|x_in) of its prior network")
        self.z_dim = z_dim
        self.recognition = build_guide(guide, body=build_network(encoder, self.x_shape), z_dim=z_dim)
        self.prior_net = build_guide("normal", body=build_network(encoder, self.x_shape), z_dim=z_dim)
        self.generation = likelihood_decoder(decoder, self.likelihood, (z_dim,), self.x_shape)
        # The networks' linear layers only: a flow guide's own layers keep their initialization.
        initialize((getattr(self.recognition, "net", self.recognition), self.prior_net, self.generation), init)

    def model(self, x: torch.Tensor, beta: float | torch.Tensor = 1.0, *, input_mask: torch.Tensor) -> torch.Tensor:
        """p(z|x_in) p(y|z) over a batch; ``beta`` scales the latent site (KL warm-up)."""
        register("prior_net", self.prior_net)
        register("generation", self.generation)
        register("likelihood", self.likelihood)
        x = x.reshape(x.shape[0], -1)
        with data_plate(x):
            with kl_scale(beta):
                z = pyro.sample("z", self.conditional_prior(x, input_mask))
            self.observe(self.generation(z), x, input_mask)
        return z

    def guide(self, x: torch.Tensor, beta: float | torch.Tensor = 1.0, *, input_mask: torch.Tensor) -> torch.Tensor:
        """q(z|x_in, y) over a batch: the recognition network sees the whole image."""
        register("recognition", self.recognition)
        with data_plate(x), kl_scale(beta):
            return pyro.sample("z", self.recognition_distribution(x))

    def conditional_prior(self, x: torch.Tensor, input_mask: torch.Tensor) -> dist.Distribution:
        """p(z|x_in) (batch shape ``(batch,)``); the predicted pixels of ``x`` are never read."""
        return self.prior_net(self._network_input(x.reshape(x.shape[0], -1), input_mask))

    def recognition_distribution(self, x: torch.Tensor) -> dist.Distribution:
        """q(z|x_in, y) (batch shape ``(batch,)``)."""
        return self.recognition(self._event(x))

    def prediction_params(self, x: torch.Tensor, input_mask: torch.Tensor, num: int) -> torch.Tensor:
        """The generation network at ``num`` draws z ~ p(z|x_in) per example."""
        return self.generation(self.conditional_prior(x, input_mask).sample((num,)))

    def metrics(self, x: torch.Tensor, labels, *, input_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """``kl``: KL(q(z|x_in, y) || p(z|x_in)) per example, the nats z carries about y beyond x_in
        (near 0: the CVAE has collapsed onto a deterministic predictor). One draw where no closed form exists."""
        q, p = self.recognition_distribution(x), self.conditional_prior(x, input_mask)
        try:
            kl = kl_divergence(q, p)
        except NotImplementedError:
            z = q.sample()
            kl = q.log_prob(z) - p.log_prob(z)
        return {"kl": kl}


class Baseline(Conditional):
    """The deterministic network x_in -> y_hat with the masked likelihood, Sohn et al.'s baseline ("NN" in
    Pyro's table); the structure ``"cvae_baseline"``. No latent site: its ELBO, every estimator's bound
    and the importance-sampled log-likelihood are all log p(y|x_in) exactly (for a Bernoulli, minus
    Pyro's ``MaskedBCELoss``). The network is an ``encoder`` body over x_in with the likelihood's head
    (Pyro's ``BaselineNet``: 784-500-500-784 with ReLU, the same hidden widths as the CVAE)."""

    latent_sites = ()

    def __init__(self, x_shape: Sequence[int], encoder, likelihood="bernoulli", init: str = "torch") -> None:
        super().__init__(x_shape, likelihood)
        self.baseline = likelihood_decoder(encoder, self.likelihood, self.x_shape, self.x_shape)
        initialize((self.baseline,), init)

    def model(self, x: torch.Tensor, beta: float | torch.Tensor = 1.0, *, input_mask: torch.Tensor) -> None:
        """p(y|x_in) over a batch (``beta`` has no latent site to scale)."""
        register("baseline", self.baseline)
        register("likelihood", self.likelihood)
        x = x.reshape(x.shape[0], -1)
        with data_plate(x):
            self.observe(self.baseline(self._network_input(x, input_mask)), x, input_mask)

    def guide(self, x: torch.Tensor, beta: float | torch.Tensor = 1.0, *, input_mask: torch.Tensor) -> None:
        """Nothing to infer: the model has no latent site."""

    def prediction_params(self, x: torch.Tensor, input_mask: torch.Tensor, num: int) -> torch.Tensor:
        """The one prediction, repeated ``num`` times."""
        params = self.baseline(self._network_input(x, input_mask))
        return params.expand(num, *params.shape)
