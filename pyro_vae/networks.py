"""Encoder and decoder networks: plain torch, no Pyro.

Both are multilayer perceptrons with configurable widths, depth and activation:

- Pyro's VAE tutorial: ``hidden_dims=(400,)``, ``activation="softplus"``, ``z_dim=50``;
- the IWAE paper (Burda et al. 2015, one stochastic layer): ``hidden_dims=(200, 200)``,
  ``activation="tanh"``, ``z_dim=50``.

The encoder maps x to the location and a positive scale of a diagonal Gaussian (plus, for
richer guides, extra outputs); the decoder maps z to the likelihood's parameters. The
decoder mirrors the encoder's hidden widths.

Weight initialization is a choice of its own (:data:`INITIALIZERS`, ``VAE(init=...)``): with
PyTorch's default the tanh network of the IWAE paper starts as an encoder whose output hardly
depends on x, and a VampPrior then collapses before z carries any information
(docs/results/priors.md measures it); He initialization, as in the VampPrior authors' code, avoids it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pyro_vae.specs import closest

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
}

# Floor on the encoder's scale: keeps log q finite when a unit collapses (1e-4 nats of
# reconstruction are far below anything reported).
MIN_SCALE = 1e-4


def inverse_softplus(y: float) -> float:
    """x with softplus(x) = y > 0, for initializing a raw scale parameter."""
    return y + math.log(-math.expm1(-y))


def activation(name: str) -> nn.Module:
    """An activation module by name; an unknown name lists the valid ones."""
    if name not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {name!r}{closest(name, ACTIVATIONS)}; valid: {', '.join(sorted(ACTIVATIONS))}"
        )
    return ACTIVATIONS[name]()


def _glorot_uniform(layer: nn.Linear) -> None:
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)


def _he_normal(layer: nn.Linear) -> None:
    nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
    nn.init.zeros_(layer.bias)


# name -> what it does to one ``nn.Linear`` (None: keep the layer's own initialization).
INITIALIZERS: dict[str, Callable[[nn.Linear], None] | None] = {
    # PyTorch's nn.Linear default: W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)); what Pyro's VAE tutorial uses.
    "torch": None,
    # Glorot & Bengio 2010: W ~ U(-a, a), a = sqrt(6 / (fan_in + fan_out)); b = 0.
    "glorot": _glorot_uniform,
    # He et al. 2015: W ~ N(0, 2 / fan_in); b = 0. The VampPrior authors' code initializes its layers so.
    "he": _he_normal,
}


def initialize(modules: Iterable[nn.Module], scheme: str) -> None:
    """Re-initialize every ``nn.Linear`` inside ``modules`` by ``scheme`` (see :data:`INITIALIZERS`).

    Pass the networks this module builds (``mlp``s, :class:`GaussianEncoder`, :class:`Decoder`), not
    modules that also hold Pyro's flow layers: those keep the initialization their authors chose.
    """
    if scheme not in INITIALIZERS:
        raise ValueError(f"unknown init {scheme!r}{closest(scheme, INITIALIZERS)}; valid: {', '.join(INITIALIZERS)}")
    init = INITIALIZERS[scheme]
    if init is None:
        return
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                init(layer)


def mlp(in_dim: int, hidden_dims: Sequence[int], out_dim: int, act: str = "softplus") -> nn.Sequential:
    """Linear layers of widths ``in_dim -> *hidden_dims -> out_dim`` with ``act`` between them."""
    dims = [in_dim, *hidden_dims]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(dims):
        layers += [nn.Linear(a, b), activation(act)]
    layers.append(nn.Linear(dims[-1], out_dim))
    return nn.Sequential(*layers)


class GaussianEncoder(nn.Module):
    """x -> (loc, scale, extra) of a diagonal Gaussian q(z|x) = N(loc, diag(scale^2)).

    ``scale = softplus(raw) + MIN_SCALE`` is positive. ``extra_dim`` further outputs (e.g. the
    low-rank factor or an IAF context) are returned as ``extra`` (shape ``(..., 0)`` by default).
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        hidden_dims: Sequence[int] = (400,),
        activation: str = "softplus",
        extra_dim: int = 0,
    ) -> None:
        super().__init__()
        self.z_dim, self.extra_dim = z_dim, extra_dim
        self.net = mlp(x_dim, hidden_dims, 2 * z_dim + extra_dim, activation)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.net(x)
        loc, raw_scale, extra = out.split([self.z_dim, self.z_dim, self.extra_dim], dim=-1)
        return loc, F.softplus(raw_scale) + MIN_SCALE, extra


class Decoder(nn.Module):
    """z -> the likelihood's parameters, shape ``(..., out_dim)`` (e.g. Bernoulli logits)."""

    def __init__(
        self, z_dim: int, out_dim: int, hidden_dims: Sequence[int] = (400,), activation: str = "softplus"
    ) -> None:
        super().__init__()
        self.net = mlp(z_dim, list(reversed(hidden_dims)), out_dim, activation)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)
