"""The plain VAE (Kingma & Welling 2014): one latent site ``"z"``, one observed site ``"x"``.

    model:  z ~ p(z),  x ~ p(x|z) = likelihood(decoder(z))        (``poutine.scale(beta)`` on z)
    guide:  z ~ q(z|x) = guide(encoder_body(x))

Prior, likelihood and guide are chosen by spec (``priors.py``, ``likelihoods.py``, ``guides.py``),
the encoder and decoder bodies by network spec (``networks.py``); the Pyro code is the same for
all of them. The decoder is its body followed by the head the likelihood asks for
(``Likelihood.head``); the guide adds its own head to the encoder body.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_vae.guides import build_guide
from pyro_vae.likelihoods import build_likelihood
from pyro_vae.networks import Decoder, build_network, initialize
from pyro_vae.priors import build_prior
from pyro_vae.structures.base import Structure, data_plate, kl_scale, register

# Draws for the posterior mean of guides without an analytic mean (flows): the Monte Carlo error
# adds about Var_q / 1000 <= 1e-3 to a unit's variance over the data, ten times below the 0.01 of
# Burda et al.'s active-unit test (pyro_vae.evaluate.active_units).
MEAN_SAMPLES = 1000


class PlainVAE(Structure):
    """p(z) p(x|z) with an amortized q(z|x); the structure ``"vae"``.

    Args:
        x_shape: the event shape of one observation (``(784,)``; a conv body takes ``(1, 28, 28)``).
        z_dim: size of the latent code.
        encoder, decoder: network specs of the bodies (``"mlp(hidden=[400])"``).
        prior, likelihood, guide: family specs or already built modules.
        init: initialization of the encoder's and decoder's linear layers (``networks.INITIALIZERS``).
    """

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
        super().__init__()
        self.x_shape = tuple(int(d) for d in x_shape)
        self.x_dim, self.z_dim = math.prod(self.x_shape), z_dim
        self.likelihood = build_likelihood(likelihood, x_dim=self.x_dim)
        self.encoder = _guide_on_body(guide, encoder, self.x_shape, z_dim)
        body = build_network(decoder, (z_dim,))
        self.decoder = Decoder(body, self.likelihood.head(body.out_features))
        self.prior = build_prior(prior, z_dim=z_dim, x_shape=self.x_shape)
        self.init = init
        # The encoder network and the decoder only: a guide's flow layers and the prior keep their own
        # (a guide built elsewhere, without an encoder ``net``, has all its linear layers initialized).
        initialize((getattr(self.encoder, "net", self.encoder), self.decoder), init)

    # -- Pyro programs ------------------------------------------------------------------
    def model(self, x: torch.Tensor, beta: float | torch.Tensor = 1.0) -> torch.Tensor:
        """p(z) p(x|z) over a batch; ``beta`` scales the latent site (KL warm-up)."""
        register("decoder", self.decoder)
        register("likelihood", self.likelihood)
        register("prior", self.prior)
        x = x.reshape(x.shape[0], -1)
        with data_plate(x):
            with kl_scale(beta):
                z = pyro.sample("z", self.prior_distribution())
            pyro.sample("x", self.decode(z), obs=self.likelihood.prepare(x))
        return z

    def guide(self, x: torch.Tensor, beta: float | torch.Tensor = 1.0) -> torch.Tensor:
        """q(z|x) over a batch, amortized by the encoder."""
        register("encoder", self.encoder)
        with data_plate(x), kl_scale(beta):
            return pyro.sample("z", self.posterior(x))

    def check_data(self, x: torch.Tensor, name: str) -> None:
        """The likelihood's check: e.g. a Bernoulli needs values in [0, 1], a categorical 8-bit pixels."""
        self.likelihood.check(x, name=name)

    @property
    def needs_warmup(self) -> str:
        return getattr(self.prior, "needs_warmup", "")

    # -- plain-torch conveniences ---------------------------------------------------------
    def _event(self, x: torch.Tensor) -> torch.Tensor:
        """x as ``(batch, *x_shape)``: flat rows and images alike reach the encoder body in its shape."""
        return x.reshape(x.shape[0], *self.x_shape)

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """q(z|x) as a distribution (batch shape ``(batch,)``)."""
        return self.encoder(self._event(x))

    def prior_distribution(self) -> dist.Distribution:
        """p(z)."""
        return self.prior(self.encoder)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of a diagonal-Gaussian q(z|x)."""
        return self.encoder.gaussian_params(self._event(x))

    def decode(self, z: torch.Tensor) -> dist.Distribution:
        """p(x|z)."""
        return self.likelihood(self.decoder(z))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, sample_z: bool = False) -> torch.Tensor:
        """E[x|z] at the posterior mean of z (or at a sample of q(z|x)), in data units."""
        q = self.posterior(x)
        z = q.sample() if sample_z else posterior_mean(q)
        return self.likelihood.mean(self.decoder(z))

    @torch.no_grad()
    def sample(self, num: int) -> torch.Tensor:
        """E[x|z] for ``num`` draws z ~ p(z), shape ``(num, x_dim)``."""
        z = self.prior_distribution().sample((num,))
        return self.likelihood.mean(self.decoder(z))


def _guide_on_body(guide, encoder, x_shape: tuple[int, ...], z_dim: int) -> nn.Module:
    """The guide a spec names, on the encoder body ``encoder`` names; a guide passed built is used as it is."""
    if isinstance(guide, nn.Module):
        return guide
    return build_guide(guide, body=build_network(encoder, x_shape), z_dim=z_dim)


def posterior_mean(q: dist.Distribution, num_samples: int = MEAN_SAMPLES) -> torch.Tensor:
    """E_q[z]: analytic where the distribution has it, else the mean of ``num_samples`` draws (flows)."""
    try:
        return q.mean
    except NotImplementedError:
        return q.sample((num_samples,)).mean(0)
