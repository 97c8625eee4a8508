"""The plain VAE (Kingma & Welling 2014): one latent site ``"z"``, one observed site ``"x"``.

    model:  z ~ p(z),  x ~ p(x|z) = likelihood(decoder(z))        (``poutine.scale(beta)`` on z)
    guide:  z ~ q(z|x) = guide(encoder_body(x))

Prior, likelihood and guide are chosen by spec (``priors.py``, ``likelihoods.py``, ``guides.py``),
the encoder and decoder bodies by network spec (``networks.py``); the Pyro code is the same for
all of them. The decoder is its body followed by the head the likelihood asks for
(``Likelihood.head``); the guide adds its own head to the encoder body.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch

from pyro_vae.networks import initialize
from pyro_vae.priors import build_prior
from pyro_vae.structures.base import MEAN_SAMPLES, ObservedLayer, data_plate, kl_scale, posterior_mean, register

__all__ = ["MEAN_SAMPLES", "PlainVAE", "posterior_mean"]


class PlainVAE(ObservedLayer):
    """p(z) p(x|z) with an amortized q(z|x); the structure ``"vae"``.

    Args:
        x_shape: the event shape of one observation (``(784,)``; a conv body takes ``(1, 28, 28)``).
        z_dim: size of the latent code.
        encoder, decoder: network specs of the bodies (``"mlp(hidden=[400])"``).
        prior, likelihood, guide: family specs or already built modules.
        init: initialization of the encoder's and decoder's linear layers (``networks.INITIALIZERS``).
    """

    closed_form_refusal = ""  # pyro_vae.closed_form is written for this structure
    takes_mask = True

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
        self.build_observed_layer(x_shape, z_dim, encoder, decoder, likelihood, guide)
        # A VampPrior's pseudo-inputs are inputs of the encoder (of x's shape here).
        self.prior = build_prior(prior, z_dim=z_dim, x_shape=self.encoder_shape)
        self.init = init
        # The encoder network and the decoder only: a guide's flow layers and the prior keep their own
        # (a guide built elsewhere, without an encoder ``net``, has all its linear layers initialized).
        initialize((getattr(self.encoder, "net", self.encoder), self.decoder), init)

    # -- Pyro programs ------------------------------------------------------------------
    def model(
        self, x: torch.Tensor, beta: float | torch.Tensor = 1.0, *, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """p(z) p(x|z) over a batch; ``beta`` scales the latent site (KL warm-up). With ``mask`` (``(batch, D)``
        bool, True = observed) only the observed pixels are scored: p(z) p(x_obs|z)."""
        register("decoder", self.decoder)
        register("likelihood", self.likelihood)
        register("prior", self.prior)
        x = x.reshape(x.shape[0], -1)
        with data_plate(x):
            with kl_scale(beta):
                z = pyro.sample("z", self.prior_distribution())
            self.observe(z, x, mask)
        return z

    def guide(
        self, x: torch.Tensor, beta: float | torch.Tensor = 1.0, *, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q(z|x) over a batch, amortized by the encoder; with ``mask``, q(z|x_obs) (:meth:`encoder_input`)."""
        register("encoder", self.encoder)
        with data_plate(x), kl_scale(beta):
            return pyro.sample("z", self.posterior(x, mask))

    @property
    def needs_warmup(self) -> str:
        return getattr(self.prior, "needs_warmup", "")

    # -- plain-torch conveniences (the others are ObservedLayer's) -------------------------
    def prior_distribution(self) -> dist.Distribution:
        """p(z)."""
        return self.prior(self.encoder)

    @torch.no_grad()
    def sample(self, num: int) -> torch.Tensor:
        """E[x|z] for ``num`` draws z ~ p(z), shape ``(num, x_dim)``."""
        z = self.prior_distribution().sample((num,))
        return self.likelihood.mean(self.decoder(z))
