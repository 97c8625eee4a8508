"""The VAE with two stochastic layers of Burda, Grosse & Salakhutdinov (2015), "Importance Weighted
Autoencoders", section 5: the structure ``"two_layer"``.

    model:  z2 ~ p(z2) = N(0, I),   z1 ~ p(z1|z2) = N(mu_p(z2), diag(sigma_p(z2)^2)),   x ~ p(x|z1)
    guide:  z1 ~ q(z1|x) = N(mu_q(x), diag(sigma_q(x)^2)),   z2 ~ q(z2|z1) = N(mu_r(z1), diag(sigma_r(z1)^2))

    log w = log p(z2) + log p(z1|z2) + log p(x|z1) - log q(z1|x) - log q(z2|z1)

Sites ``"z1"`` (size ``model.z_dim``), ``"z2"`` (size ``z2_dim``) and ``"x"``. The x <-> z1
networks are the plain VAE's (``model.encoder``/``model.decoder`` or the ``hidden_dims`` shorthand,
the likelihood's head on the decoder: ``ObservedLayer``); the z1 <-> z2 networks are MLPs of widths
``hidden`` (q(z2|z1)) and reversed ``hidden`` (p(z1|z2)) with ``activation``, each with a diagonal
Gaussian head (``networks.GaussianEncoder``). The paper's MNIST model is
784-(200-200)-100-(100-100)-50 with tanh (``configs/mnist_dynamic_2layer.toml``).

The guide is bottom-up, so the ``meanfield`` bound may take KL(q(z2|z1) || p(z2)) analytically
(given z1 it is the exact expectation over z2) but not z1's: p(z1|z2) is evaluated at a z2 drawn
given z1, and E_q[log p(z1|z2) - log q(z1|x)] is not -KL(q(z1|x) || p(z1|z2)) at that z2
(``analytic_kl_sites``). For the same reason there is no closed-form ELBO.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import torch

from pyro_vae.networks import initialize, mlp_spec
from pyro_vae.priors import build_prior
from pyro_vae.specs import integer_arg, widths_arg
from pyro_vae.structures.base import ObservedLayer, data_plate, guide_on_body, kl_scale, register, require_family


class TwoLayerVAE(ObservedLayer):
    """p(z2) p(z1|z2) p(x|z1) with the guide q(z1|x) q(z2|z1); the structure ``"two_layer"``.

    Args:
        x_shape, z_dim, encoder, decoder, likelihood, init: as for the plain VAE; ``z_dim`` is z1's size
            and ``encoder``/``decoder`` are the x <-> z1 bodies.
        prior, guide: must be ``"normal"``: p(z2) = N(0, I) and diagonal-Gaussian q(z1|x) (the paper's).
        z2_dim: size of the top latent z2.
        hidden: hidden widths of the MLP of q(z2|z1); p(z1|z2)'s MLP mirrors them (``[]``: linear maps).
        activation: nonlinearity of those two MLPs.
    """

    latent_sites = ("z1", "z2")
    analytic_kl_sites = ("z2",)
    closed_form_refusal = "no closed form for KL(q(z1|x) || p(z1|z2)) under q(z2|z1) (structure 'two_layer')"
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
        z2_dim: int = 50,
        hidden: Sequence[int] = (100, 100),
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        for role, spec in (("prior", prior), ("guide", guide)):  # another family needs its own conditionals
            require_family("two_layer", role, spec, "normal", "is the paper's Gaussian model")
        self.z2_dim = integer_arg("z2_dim", z2_dim)
        hidden = widths_arg("hidden", hidden)
        self.build_observed_layer(x_shape, z_dim, encoder, decoder, likelihood, guide)
        # q(z2|z1) and p(z1|z2): an MLP body and a diagonal Gaussian head, as the default guide is.
        self.z2_encoder = guide_on_body("normal", mlp_spec(hidden, activation), (z_dim,), self.z2_dim)
        self.z1_decoder = guide_on_body("normal", mlp_spec(hidden[::-1], activation), (self.z2_dim,), z_dim)
        self.prior = build_prior("normal", z_dim=self.z2_dim, x_shape=self.x_shape)  # p(z2)
        self.init = init
        initialize((self.encoder, self.decoder, self.z2_encoder, self.z1_decoder), init)

    # -- Pyro programs ------------------------------------------------------------------
    def model(
        self, x: torch.Tensor, beta: float | torch.Tensor = 1.0, *, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """p(z2) p(z1|z2) p(x|z1) over a batch; ``beta`` scales both latent sites (KL warm-up); with ``mask``
        (True = observed), p(x_obs|z1) scores the observed pixels only."""
        register("decoder", self.decoder)
        register("likelihood", self.likelihood)
        register("z1_decoder", self.z1_decoder)
        register("prior", self.prior)
        x = x.reshape(x.shape[0], -1)
        with data_plate(x):
            with kl_scale(beta):
                z2 = pyro.sample("z2", self.prior(self.encoder))
                z1 = pyro.sample("z1", self.z1_decoder(z2))
            self.observe(z1, x, mask)
        return z1

    def guide(
        self, x: torch.Tensor, beta: float | torch.Tensor = 1.0, *, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """q(z1|x) q(z2|z1) over a batch: bottom-up, each layer amortized by its own network; with ``mask``,
        q(z1|x_obs) reads x with zeros on the missing pixels."""
        register("encoder", self.encoder)
        register("z2_encoder", self.z2_encoder)
        with data_plate(x), kl_scale(beta):
            z1 = pyro.sample("z1", self.posterior(x, mask))
            pyro.sample("z2", self.z2_encoder(z1))
        return z1

    # -- plain-torch conveniences (posterior, encode, decode, reconstruct: of z1, ObservedLayer's) ----
    @torch.no_grad()
    def sample(self, num: int) -> torch.Tensor:
        """E[x|z1] for ``num`` ancestral draws z2 ~ p(z2), z1 ~ p(z1|z2), shape ``(num, x_dim)``."""
        z2 = self.prior(self.encoder).sample((num,))
        z1 = self.z1_decoder(z2).sample()
        return self.likelihood.mean(self.decoder(z1))
