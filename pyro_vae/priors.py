"""Priors p(z), by name.

A prior is an ``nn.Module`` whose ``forward(encoder)`` returns a Pyro distribution over z with
event shape ``(z_dim,)``. The encoder (the guide's module) is passed in because some priors are
defined through it (the VampPrior mixes the encoder's posteriors at learned pseudo-inputs);
the others ignore it. Learnable parameters are ordinary module parameters: the model
registers the prior with ``pyro.module("prior", ...)`` so SVI learns them.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from pyro_vae.registry import Registry

PRIORS: Registry[nn.Module] = Registry("prior")


class Prior(nn.Module):
    """Base class: ``forward(encoder=None)`` returns p(z) with event shape ``(z_dim,)``."""

    def __init__(self, z_dim: int) -> None:
        super().__init__()
        self.z_dim = z_dim

    def forward(self, encoder: nn.Module | None = None) -> dist.Distribution:
        raise NotImplementedError


@PRIORS.register("normal")
class StandardNormal(Prior):
    """p(z) = N(0, I), the default (Kingma & Welling 2014)."""

    def __init__(self, z_dim: int) -> None:
        super().__init__(z_dim)
        # Buffers, not constants, so that ``vae.to(device)`` moves them.
        self.register_buffer("loc", torch.zeros(z_dim))
        self.register_buffer("scale", torch.ones(z_dim))

    def forward(self, encoder: nn.Module | None = None) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


def build_prior(spec, z_dim: int, x_dim: int) -> nn.Module:
    """Build a prior from a spec such as ``"normal"`` or ``"mixture(components=10)"``."""
    return PRIORS.build(spec, z_dim=z_dim, x_dim=x_dim)
