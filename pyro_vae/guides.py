"""Guides q(z|x), by name.

A guide is an ``nn.Module`` that owns the encoder network and returns, for a batch x, a Pyro
distribution over z with event shape ``(z_dim,)``. The guide is registered in Pyro's guide
with ``pyro.module("encoder", ...)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro.distributions as dist
import torch
from torch import nn

from pyro_vae.networks import GaussianEncoder
from pyro_vae.registry import Registry

GUIDES: Registry[nn.Module] = Registry("guide")


class Guide(nn.Module):
    """Base class: ``forward(x)`` returns q(z|x) with batch shape ``x.shape[:-1]``."""

    def __init__(self, x_dim: int, z_dim: int) -> None:
        super().__init__()
        self.x_dim, self.z_dim = x_dim, z_dim

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        raise NotImplementedError

    def gaussian_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of a diagonal Gaussian q(z|x); only diagonal-Gaussian guides have them."""
        raise ValueError(f"guide {getattr(self, 'spec', type(self).__name__)!r} is not a diagonal Gaussian")


@GUIDES.register("normal")
class DiagonalNormalGuide(Guide):
    """q(z|x) = N(mu(x), diag(sigma(x)^2)), the amortized mean-field Gaussian (Kingma & Welling 2014)."""

    def __init__(
        self, x_dim: int, z_dim: int, hidden_dims: Sequence[int] = (400,), activation: str = "softplus"
    ) -> None:
        super().__init__(x_dim, z_dim)
        self.net = GaussianEncoder(x_dim, z_dim, hidden_dims, activation)

    def gaussian_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, scale, _ = self.net(x)
        return loc, scale

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        loc, scale = self.gaussian_params(x)
        return dist.Normal(loc, scale).to_event(1)


def build_guide(spec, x_dim: int, z_dim: int, hidden_dims: Sequence[int], activation: str) -> nn.Module:
    """Build a guide from a spec such as ``"normal"`` or ``"iaf(flows=2)"``."""
    return GUIDES.build(spec, x_dim=x_dim, z_dim=z_dim, hidden_dims=hidden_dims, activation=activation)
