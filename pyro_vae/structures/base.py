"""What a model structure is, and the small Pyro helpers every structure's programs share.

A structure (``model.structure``, ``VAE(structure=...)``) owns a generative model and its guide
as two Pyro programs with the same signature,

    model(x, beta=1.0, **data)      guide(x, beta=1.0, **data),

and declares what the rest of the library needs to know about them -- nothing else reads its
attribute names:

- ``latent_sites``: the names of the latent sample sites (``("z",)`` for the plain VAE);
- ``observed_sites``: the names of the observed sites (``("x",)``);
- ``consumes``: the extra data fields the programs take as keyword arguments besides ``x``
  (``()``; ``("labels",)`` for a semi-supervised model, ``("mask",)`` for missing data). The
  training step and the estimators pass them through untouched;
- ``check_data(x, name)`` and ``needs_warmup``: what the training loop asks before it starts;
- ``metrics(x, true_labels, **data)``: numbers per example beside the bound (M2's accuracy), which the
  training loop reports for the validation and test sets every epoch and ``evaluate`` reports too;
- ``figures(dataset)``: the figures a run of this structure draws (``pyro_vae.plots``).
- ``analytic_kl_sites``: the latent sites whose analytic KL may replace log p - log q in the
  ``meanfield`` bound (``None``: every site that has one);
- ``closed_form_refusal``: why the hand-written closed-form ELBO does not apply ("" when it does);
- ``observed_dim(x, **data)``: the values per example the observed sites score (for bits/dim);
- ``takes_mask``: whether ``model`` and ``guide`` take ``mask=`` (True on the observed pixels) and then
  score only those pixels of x, so that a trained model can be conditioned on part of an image
  (``pyro_vae.impute``); ``mask=None`` is the fully observed model.

Estimators and evaluation work from the programs' Pyro traces (``pyro_vae.traces``), site by
site, so a structure with several latent sites, or enumerated discrete ones, plugs in without
changing them. Its modules are registered with ``pyro.module`` inside the programs (:func:`register`);
``beta`` is the KL warm-up weight on the latent sites (:func:`kl_scale`).

A structure is an ``nn.Module`` whose parameters live in child modules (``encoder``,
``decoder``, ``prior``, ``likelihood`` for the plain VAE): the ``VAE`` facade adopts those
children as its own, so state-dict keys and ``vae.encoder`` stay what they were.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pyro_vae.guides import build_guide
from pyro_vae.likelihoods import build_likelihood, observe_pixels
from pyro_vae.networks import Decoder, build_network
from pyro_vae.specs import parse_spec

# Draws for the posterior mean of guides without an analytic mean (flows): the Monte Carlo error
# adds about Var_q / 1000 <= 1e-3 to a unit's variance over the data, ten times below the 0.01 of
# Burda et al.'s active-unit test (pyro_vae.evaluate.active_units).
MEAN_SAMPLES = 1000


class Structure(nn.Module):
    """Base class of the registered model structures (``pyro_vae.structures.STRUCTURES``)."""

    latent_sites: tuple[str, ...] = ("z",)
    observed_sites: tuple[str, ...] = ("x",)
    consumes: tuple[str, ...] = ()
    takes_mask: bool = False
    # The latent sites whose log p(z) - log q(z) the ``meanfield`` bound may replace by -KL(q || p)
    # (``pyro_vae.traces``); ``None``: every site whose pair torch has a KL for. That replacement
    # is exact only when the expectation over the site, given everything else the two densities
    # depend on, is the KL: when p's and q's parameters do not depend on the site's own draw
    # through another latent. A bottom-up guide breaks it: in q(z1|x) q(z2|z1) with p(z1|z2),
    # z2 is drawn given z1, so E_q[log p(z1|z2) - log q(z1|x)] is not -KL(q(z1|x) || p(z1|z2))
    # at the drawn z2; such a structure lists its safe sites (``("z2",)``).
    analytic_kl_sites: tuple[str, ...] | None = None

    @property
    def closed_form_refusal(self) -> str:
        """Why ``pyro_vae.closed_form`` (the hand-written ELBO of one latent z) does not apply to this
        structure, as the start of a one-line error; "" for a structure it does apply to."""
        name = type(self).__name__
        return f"the closed-form ELBO is written for the plain VAE (one latent z, structure 'vae'), not for {name}"

    def model(self, x: torch.Tensor, beta: float | torch.Tensor = 1.0, **data) -> torch.Tensor:
        """The generative model p(x, z) as a Pyro program over a batch."""
        raise NotImplementedError

    def guide(self, x: torch.Tensor, beta: float | torch.Tensor = 1.0, **data) -> torch.Tensor:
        """The guide q(z|x) as a Pyro program over a batch, with the model's latent sites."""
        raise NotImplementedError

    def check_data(self, x: torch.Tensor, name: str) -> None:
        """Refuse, with a one-line ``ValueError`` naming ``name``, data these programs cannot model
        (the training loop calls it once, before the first step). Nothing is refused by default."""

    @property
    def needs_warmup(self) -> str:
        """Why this model needs KL warm-up (the loop warns when ``train.warmup_epochs`` is 0); "" when it does not."""
        return ""

    def metrics(self, x: torch.Tensor, true_labels: torch.Tensor | None, **data) -> dict[str, torch.Tensor]:
        """Numbers per example beside the bound, name -> tensor of shape ``(batch,)`` (their mean is
        reported as ``{split}_{name}``); ``true_labels`` are the split's true labels (``None`` if it
        has none; not the ``labels`` field, which holds only the observed ones) and ``data`` the
        consumed fields as the bound sees them. None by default."""
        return {}

    def observed_dim(self, x: torch.Tensor, **data) -> float:
        """How many values per example the model's observed sites score (bits/dim divides by it): all of
        x by default; a conditional model's predicted pixels only."""
        return float(x[0].numel())

    def figures(self, dataset) -> dict[str, Callable[[Path], Path]]:
        """File name -> a function that draws that figure at a path, for a run on ``dataset``.

        By default the plain VAE's (``pyro_vae.plots.vae_figures``): reconstructions, samples,
        latent codes, interpolation, and the 2-d manifold; each calls the methods it needs
        (``reconstruct``, ``sample``, ``posterior``, ``decode``), so a structure that has them gets them.
        """
        from pyro_vae.plots import vae_figures  # matplotlib loads only when figures are drawn

        return vae_figures(self, dataset)


class ObservedLayer(Structure):
    """The data layer x <-> z shared by structures whose x depends on one latent z (the plain VAE's z,
    the two-layer VAE's z1): q(z|x) = guide(encoder body(x)), p(x|z) = likelihood(decoder(z)), the
    decoder being its body plus the head the likelihood asks for (``Likelihood.head``).

    With a ``mask`` (True on the observed pixels) the observed site scores the observed pixels only
    (:meth:`observe`, ``likelihoods.observe_pixels``) and the encoder reads x with zeros on the missing
    ones (:meth:`encoder_input`): a model trained on complete data conditioned on part of an image.

    :meth:`build_observed_layer` makes the children ``likelihood``, ``encoder`` and ``decoder`` (the
    names the figures and the latent diagnostics read); the rest are plain-torch conveniences.
    """

    def build_observed_layer(self, x_shape: Sequence[int], z_dim: int, encoder, decoder, likelihood, guide) -> None:
        """Build ``likelihood``, ``encoder`` (q(z|x), on inputs of :attr:`encoder_shape`) and ``decoder``
        (z -> the likelihood's parameters)."""
        self.x_shape = tuple(int(d) for d in x_shape)
        self.x_dim, self.z_dim = math.prod(self.x_shape), z_dim
        self.likelihood = build_likelihood(likelihood, x_dim=self.x_dim)
        self.encoder = guide_on_body(guide, encoder, self.encoder_shape, z_dim)
        self.decoder = likelihood_decoder(decoder, self.likelihood, (z_dim,), self.x_shape)

    @property
    def encoder_shape(self) -> tuple[int, ...]:
        """The event shape of what the encoder reads (:meth:`encoder_input`): x's own."""
        return self.x_shape

    def encoder_input(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """What q(z|x) reads, shape ``(batch, *encoder_shape)``: x, with zeros on the pixels ``mask`` says
        are missing (the values there never reach the encoder)."""
        if mask is not None:
            x = torch.where(mask, x.reshape(mask.shape), torch.zeros((), dtype=x.dtype, device=x.device))
        return self._event(x)

    def observe(self, z: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The observed site ``"x"``: the prepared x under p(x|z), scoring only the pixels where ``mask``
        is True (every pixel when it is None: the very distribution of the fully observed model)."""
        return pyro.sample("x", observe_pixels(self.decode(z), mask), obs=self.likelihood.prepare(x))

    def check_data(self, x: torch.Tensor, name: str) -> None:
        """The likelihood's check: e.g. a Bernoulli needs values in [0, 1], a categorical 8-bit pixels."""
        self.likelihood.check(x, name=name)

    def _event(self, x: torch.Tensor) -> torch.Tensor:
        """x as ``(batch, *x_shape)``: flat rows and images alike reach the encoder body in its shape."""
        return x.reshape(x.shape[0], *self.x_shape)

    def posterior(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dist.Distribution:
        """q(z|x) as a distribution (batch shape ``(batch,)``); with ``mask``, of the observed pixels."""
        return self.encoder(self.encoder_input(x, mask))

    def encode(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of a diagonal-Gaussian q(z|x)."""
        return self.encoder.gaussian_params(self.encoder_input(x, mask))

    def decode(self, z: torch.Tensor) -> dist.Distribution:
        """p(x|z)."""
        return self.likelihood(self.decoder(z))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, sample_z: bool = False) -> torch.Tensor:
        """E[x|z] at the posterior mean of z (or at a sample of q(z|x)), in data units."""
        q = self.posterior(x)
        z = q.sample() if sample_z else posterior_mean(q)
        return self.likelihood.mean(self.decoder(z))


def guide_on_body(guide, encoder, x_shape: Sequence[int], z_dim: int) -> nn.Module:
    """The guide a spec names, on the network body ``encoder`` names for inputs of event shape ``x_shape``;
    a guide passed built is used as it is."""
    if isinstance(guide, nn.Module):
        return guide
    return build_guide(guide, body=build_network(encoder, tuple(x_shape)), z_dim=z_dim)


def likelihood_decoder(decoder, likelihood: nn.Module, in_shape: Sequence[int], x_shape: Sequence[int]) -> Decoder:
    """The network body ``decoder`` names on inputs of event shape ``in_shape`` (``(z_dim,)``), then the head
    ``likelihood`` asks for, to the parameters of data of event shape ``x_shape`` (an image decoder body
    up-samples to it, ``pyro_vae.conv``)."""
    body = build_network(decoder, tuple(in_shape), out_shape=tuple(x_shape))
    return Decoder(body, likelihood.head(body, x_shape))


def posterior_mean(q: dist.Distribution, num_samples: int = MEAN_SAMPLES) -> torch.Tensor:
    """E_q[z]: analytic where the distribution has it, else the mean of ``num_samples`` draws (flows)."""
    try:
        return q.mean
    except NotImplementedError:
        return q.sample((num_samples,)).mean(0)


def require_family(structure: str, role: str, spec, name: str, why: str) -> None:
    """A one-line ``ValueError`` unless the family ``spec`` (a spec, or a module built from one) is ``name``.

    For a structure whose model fixes a family (M2's p(z) = N(0, I)); ``why`` says what fixes it.
    """
    found = getattr(spec, "spec_name", None) if isinstance(spec, nn.Module) else parse_spec(spec)[0]
    if found != name:
        raise ValueError(f"structure {structure!r} {why}: model.{role} must be {name!r}, got {spec!r}")


def is_unit_beta(beta: float | torch.Tensor) -> bool:
    """Whether ``beta`` is the number 1, for which the model has no scale at all (a tensor never is:
    a recorded loss takes a tensor ``beta`` as an input, ``pyro_vae.recorded``)."""
    return isinstance(beta, (int, float)) and beta == 1


def beta_tensor(beta: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``beta`` as a 0-d tensor of ``like``'s dtype on its device, for programs traced with a tensor
    ``beta`` (Pyro's JIT, ``pyro_vae.recorded``): a number is filled in on the device, so a
    training step makes no host-to-device copy for it."""
    if torch.is_tensor(beta):
        return beta.to(dtype=like.dtype, device=like.device)
    return like.new_full((), beta)


def kl_scale(beta: float | torch.Tensor):
    """``poutine.scale`` on the latent sites for KL warm-up; nothing at all at beta = 1."""
    if is_unit_beta(beta):
        return contextlib.nullcontext()
    return poutine.scale(scale=beta)


def data_plate(x: torch.Tensor) -> pyro.plate:
    """``pyro.plate("data", batch)`` on x's device.

    Naming the device spares Pyro's subsample site a ``torch.tensor(())`` per call to find the
    default one (a tenth of the plate's cost, and two dead nodes in a recorded loss).
    """
    return pyro.plate("data", x.shape[0], device=x.device)


# ``pyro.module`` walks a module's parameters through Pyro's param store on every call: about a
# tenth of a CPU training step. A training step that has registered them once turns it off on its
# hot path (pyro_vae.traces' lean loss), where the param store already holds these very tensors.
_REGISTER_MODULES = contextvars.ContextVar("pyro_vae_register_modules", default=True)


def register(name: str, module: nn.Module) -> None:
    """``pyro.module(name, module)``, unless :func:`module_registration` turned it off."""
    if _REGISTER_MODULES.get():
        pyro.module(name, module)


@contextlib.contextmanager
def module_registration(enabled: bool) -> Iterator[None]:
    """Within this block the structures' programs call ``pyro.module`` only when ``enabled``."""
    token = _REGISTER_MODULES.set(enabled)
    try:
        yield
    finally:
        _REGISTER_MODULES.reset(token)
