"""Likelihoods p(x|z), by name.

A likelihood is an ``nn.Module`` that turns the decoder's output into a Pyro distribution over
the flattened observation x with event shape ``(x_dim,)``. It declares how many decoder
outputs it needs per pixel (``params_per_pixel``), maps data in [0, 1] to what it observes
(``prepare``), and checks that data fits its support before anything trains (``check``).
"""

from __future__ import annotations

import warnings

import pyro.distributions as dist
import torch
from torch import nn

from pyro_vae.registry import Registry

LIKELIHOODS: Registry[nn.Module] = Registry("likelihood")


class Likelihood(nn.Module):
    """Base class. Subclasses set ``params_per_pixel`` and implement ``forward``."""

    params_per_pixel: int = 1

    def __init__(self, x_dim: int) -> None:
        super().__init__()
        self.x_dim = x_dim

    @property
    def out_dim(self) -> int:
        """Width of the decoder's output layer."""
        return self.x_dim * self.params_per_pixel

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        """p(x|z) from the decoder output ``params`` of shape ``(..., out_dim)``."""
        raise NotImplementedError

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The value observed at site ``"x"`` for data ``x`` in [0, 1]; identity by default."""
        return x

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """E[x|z] in data units ([0, 1]), for reconstructions and samples."""
        return self(params).mean

    def check(self, x: torch.Tensor, name: str = "data") -> None:
        """Raise ``ValueError`` when ``x`` cannot be modelled by this likelihood."""
        if x.dim() < 2 or x[0].numel() != self.x_dim:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}, but this model expects (batch, {self.x_dim})"
            )
        if not torch.is_floating_point(x):
            raise ValueError(f"{name} has dtype {x.dtype}; expected floating point values in [0, 1]")
        lo, hi = x.min().item(), x.max().item()
        if lo < 0 or hi > 1 or x.isnan().any():
            raise ValueError(f"{name} has values in [{lo:g}, {hi:g}]; expected values in [0, 1]")


@LIKELIHOODS.register("bernoulli")
class BernoulliLikelihood(Likelihood):
    """p(x|z) = prod_d Bernoulli(x_d; sigmoid(logits_d)), on logits for stability.

    On binary data this is a likelihood. On grey levels in [0, 1] the same formula is the
    negative binary cross-entropy (what Pyro's VAE tutorial optimizes); it is not a normalized
    density of grey levels, so the number is not a log-likelihood, and ``check`` warns.
    """

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        # validate_args=False: grey-level observations are allowed (and warned about in check).
        return dist.Bernoulli(logits=params, validate_args=False).to_event(1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params)

    def check(self, x: torch.Tensor, name: str = "data") -> None:
        super().check(x, name)
        if not ((x == 0) | (x == 1)).all():
            warnings.warn(
                f"{name} is not binary: a Bernoulli likelihood on grey levels gives a cross-entropy, "
                "not a log-likelihood (use mnist-dynamic or mnist-static for likelihood numbers)",
                stacklevel=2,
            )


def build_likelihood(spec, x_dim: int) -> nn.Module:
    """Build a likelihood from a spec such as ``"bernoulli"`` or ``"gaussian(scale=0.1)"``."""
    return LIKELIHOODS.build(spec, x_dim=x_dim)


@LIKELIHOODS.register("gaussian")
class GaussianLikelihood(Likelihood):
    """p(x|z) = prod_d N(x_d; mu_d(z), scale^2) with a fixed scale.

    With a linear decoder this is the linear-Gaussian model (probabilistic PCA, Tipping &
    Bishop 1999), whose log p(x) and posterior are exact: the tests' reference.
    """

    def __init__(self, x_dim: int, scale: float = 1.0) -> None:
        super().__init__(x_dim)
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale!r}")
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        return dist.Normal(params, self.scale).to_event(1)

    def check(self, x: torch.Tensor, name: str = "data") -> None:
        if x.dim() < 2 or x[0].numel() != self.x_dim:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, but this model expects (batch, {self.x_dim})")
