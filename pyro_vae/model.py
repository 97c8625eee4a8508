"""The VAE as a pair of Pyro programs: the model p(z) p(x|z) and the guide q(z|x).

This is the one place that samples the latent site ``"z"`` and observes the data site ``"x"``.
Prior, likelihood and guide are chosen by spec (see ``priors.py``, ``likelihoods.py``,
``guides.py``); the Pyro code below is the same for all of them.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pyro_vae.guides import build_guide
from pyro_vae.likelihoods import build_likelihood
from pyro_vae.networks import Decoder, initialize
from pyro_vae.priors import build_prior

# Draws for the posterior mean of guides without an analytic mean (flows): the Monte Carlo error
# adds about Var_q / 1000 <= 1e-3 to a unit's variance over the data, ten times below the 0.01 of
# Burda et al.'s active-unit test (pyro_vae.evaluate.active_units).
MEAN_SAMPLES = 1000


def is_unit_beta(beta: float | torch.Tensor) -> bool:
    """Whether ``beta`` is the number 1, for which the model has no scale at all (a tensor never is:
    a recorded loss takes a tensor ``beta`` as an input, ``pyro_vae.recorded``)."""
    return isinstance(beta, (int, float)) and beta == 1


def beta_tensor(beta: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``beta`` as a 0-d tensor of ``like``'s dtype on its device, for programs traced with a tensor
    ``beta`` (Pyro's JIT, ``pyro_vae.recorded``): a number is filled in on the device, so a training
    step makes no host-to-device copy for it."""
    if torch.is_tensor(beta):
        return beta.to(dtype=like.dtype, device=like.device)
    return like.new_full((), beta)


def _kl_scale(beta: float | torch.Tensor):
    """``poutine.scale`` on the latent site for KL warm-up; nothing at all at beta = 1."""
    if is_unit_beta(beta):
        return contextlib.nullcontext()
    return poutine.scale(scale=beta)


def _data_plate(x: torch.Tensor) -> pyro.plate:
    """``pyro.plate("data", batch)`` on x's device.

    Naming the device spares Pyro's subsample site a ``torch.tensor(())`` per call to find the
    default one (a tenth of the plate's cost, and two dead nodes in a recorded loss).
    """
    return pyro.plate("data", x.shape[0], device=x.device)


# ``pyro.module`` walks a module's parameters through Pyro's param store on every call: about a
# tenth of a CPU training step. A training step that has registered them once turns it off on its
# hot path (pyro_vae.step), where the param store already holds these very tensors.
_REGISTER_MODULES = contextvars.ContextVar("pyro_vae_register_modules", default=True)


def _register(name: str, module: nn.Module) -> None:
    if _REGISTER_MODULES.get():
        pyro.module(name, module)


@contextlib.contextmanager
def module_registration(enabled: bool) -> Iterator[None]:
    """Within this block ``VAE.model``/``VAE.guide`` call ``pyro.module`` only when ``enabled``."""
    token = _REGISTER_MODULES.set(enabled)
    try:
        yield
    finally:
        _REGISTER_MODULES.reset(token)


class VAE(nn.Module):
    """Variational autoencoder with Pyro ``model`` and ``guide``.

    Args:
        x_dim: size of a flattened observation (784 for MNIST).
        z_dim: size of the latent code.
        hidden_dims: hidden widths of the encoder; the decoder mirrors them.
            ``(400,)`` is Pyro's tutorial net, ``(200, 200)`` the IWAE paper's.
        activation: nonlinearity between layers (``"softplus"``, ``"tanh"``, ...).
        prior, likelihood, guide: specs (``"vamp(components=500)"``, a TOML-style table) or
            already built modules.
        init: initialization of the encoder's and decoder's linear layers, a name from
            ``networks.INITIALIZERS``: ``"torch"`` (PyTorch's default, as in Pyro's tutorial),
            ``"glorot"`` or ``"he"``. Pyro's flow layers and the prior keep their own.

    The module's device decides where everything runs: ``vae.to("cuda")`` and feed CUDA tensors.
    """

    def __init__(
        self,
        x_dim: int = 784,
        z_dim: int = 10,
        hidden_dims: Sequence[int] = (400,),
        activation: str = "softplus",
        prior="normal",
        likelihood="bernoulli",
        guide="normal",
        init: str = "torch",
    ) -> None:
        super().__init__()
        self.x_dim, self.z_dim = x_dim, z_dim
        self.hidden_dims, self.activation = tuple(hidden_dims), activation
        self.likelihood = build_likelihood(likelihood, x_dim=x_dim)
        self.encoder = build_guide(guide, x_dim=x_dim, z_dim=z_dim, hidden_dims=hidden_dims, activation=activation)
        self.decoder = Decoder(z_dim, self.likelihood.out_dim, hidden_dims, activation)
        self.prior = build_prior(prior, z_dim=z_dim, x_dim=x_dim)
        self.init = init
        # The encoder network and the decoder only: a guide's flow layers and the prior keep their own
        # (a guide built elsewhere, without an encoder ``net``, has all its linear layers initialized).
        initialize((getattr(self.encoder, "net", self.encoder), self.decoder), init)

    # -- Pyro programs ------------------------------------------------------------------
    def model(self, x: torch.Tensor, beta: float | torch.Tensor = 1.0) -> torch.Tensor:
        """p(z) p(x|z) over a batch; ``beta`` scales the latent site (KL warm-up)."""
        _register("decoder", self.decoder)
        _register("likelihood", self.likelihood)
        _register("prior", self.prior)
        x = x.reshape(x.shape[0], -1)
        with _data_plate(x):
            with _kl_scale(beta):
                z = pyro.sample("z", self.prior_distribution())
            pyro.sample("x", self.decode(z), obs=self.likelihood.prepare(x))
        return z

    def guide(self, x: torch.Tensor, beta: float | torch.Tensor = 1.0) -> torch.Tensor:
        """q(z|x) over a batch, amortized by the encoder."""
        _register("encoder", self.encoder)
        x = x.reshape(x.shape[0], -1)
        with _data_plate(x), _kl_scale(beta):
            return pyro.sample("z", self.encoder(x))

    # -- plain-torch conveniences ---------------------------------------------------------
    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """q(z|x) as a distribution (batch shape ``(batch,)``)."""
        return self.encoder(x.reshape(x.shape[0], -1))

    def prior_distribution(self) -> dist.Distribution:
        """p(z)."""
        return self.prior(self.encoder)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of a diagonal-Gaussian q(z|x)."""
        return self.encoder.gaussian_params(x.reshape(x.shape[0], -1))

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


def posterior_mean(q: dist.Distribution, num_samples: int = MEAN_SAMPLES) -> torch.Tensor:
    """E_q[z]: analytic where the distribution has it, else the mean of ``num_samples`` draws (flows)."""
    try:
        return q.mean
    except NotImplementedError:
        return q.sample((num_samples,)).mean(0)
