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
- ``metrics(x, labels, **data)``: numbers per example beside the bound (M2's accuracy), which the
  training loop reports for the validation and test sets every epoch and ``evaluate`` reports too;
- ``figures(dataset)``: the figures a run of this structure draws (``pyro_vae.plots``);
- ``observed_dim(x, **data)``: the values per example the observed sites score (for bits/dim).

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
from collections.abc import Callable, Iterator
from pathlib import Path

import pyro
import torch
from pyro import poutine
from torch import nn


class Structure(nn.Module):
    """Base class of the registered model structures (``pyro_vae.structures.STRUCTURES``)."""

    latent_sites: tuple[str, ...] = ("z",)
    observed_sites: tuple[str, ...] = ("x",)
    consumes: tuple[str, ...] = ()

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

    def metrics(self, x: torch.Tensor, labels: torch.Tensor | None, **data) -> dict[str, torch.Tensor]:
        """Numbers per example beside the bound, name -> tensor of shape ``(batch,)`` (their mean is
        reported as ``{split}_{name}``); ``labels`` are the true labels of the split (``None`` if it
        has none) and ``data`` the consumed fields as the bound sees them. None by default."""
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


def is_unit_beta(beta: float | torch.Tensor) -> bool:
    """Whether ``beta`` is the number 1, for which the model has no scale at all (a tensor never is:
    a recorded loss takes a tensor ``beta`` as an input, ``pyro_vae.train.recorded``)."""
    return isinstance(beta, (int, float)) and beta == 1


def beta_tensor(beta: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``beta`` as a 0-d tensor of ``like``'s dtype on its device, for programs traced with a tensor
    ``beta`` (Pyro's JIT, ``pyro_vae.train.recorded``): a number is filled in on the device, so a
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
