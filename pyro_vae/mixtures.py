"""A mixture of diagonal Gaussians whose density is two matrix products: the VampPrior's and the
learned mixture prior's p(z).

For K components with locations m_k, scales s_k (each (D,)) and weights pi = softmax(logits),

    log p(z) = logsumexp_k [ log pi_k - 1/2 sum_d (z_d - m_kd)^2 / s_kd^2 - sum_d log s_kd ] - D/2 log 2 pi.

With a_kd = 1/s_kd^2 the quadratic form expands into

    sum_d a_kd (z_d - m_kd)^2 = (z^2) . a_k - 2 z . (m_k a_k) + sum_d m_kd^2 a_kd,

two (N, D) x (D, K) matrix products and a per-component constant, where ``MixtureSameFamily``
materializes (N, K, D) differences, squares and quotients, forward and backward: for a batch of 100,
K = 500 and D = 50 that is 2.5 million elements through a dozen element-wise kernels per step, most
of a VampPrior step's time (docs/results/priors.md measures the difference). The expansion
cancels large terms when a scale is small (a_kd up to 1e8 at the encoder's scale floor), so it is
computed in float64, which costs nothing next to the encoder: the products are N x K x D
multiply-adds, a hundredth of one encoder layer on the K pseudo-inputs.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch


class DiagonalGaussianMixture(dist.MixtureSameFamily):
    """sum_k softmax(logits)_k N(z; loc_k, diag(scale_k^2)) with ``loc``, ``scale`` of shape (K, D).

    Sampling, mean and variance are ``MixtureSameFamily``'s; only :meth:`log_prob` differs, by the
    matrix-product form in this module's docstring (equal to float64 rounding, gradients included).
    """

    def __init__(self, logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, validate_args=None) -> None:
        if loc.dim() != 2 or scale.shape != loc.shape or logits.shape != loc.shape[:1]:
            raise ValueError(
                f"a diagonal Gaussian mixture takes loc and scale of shape (K, D) and logits (K,), got "
                f"{tuple(loc.shape)}, {tuple(scale.shape)} and {tuple(logits.shape)}"
            )
        super().__init__(dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1), validate_args)
        self.loc, self.scale, self.logits = loc, scale, logits

    def expand(self, batch_shape, _instance=None) -> DiagonalGaussianMixture:
        """The same mixture with batch shape ``batch_shape`` (a plate's): the (K, D) parameters are shared."""
        new = self._get_checked_instance(DiagonalGaussianMixture, _instance)
        batch_shape = torch.Size(batch_shape)
        mixture = self._mixture_distribution.expand(batch_shape)
        components = self._component_distribution.expand(batch_shape + self.loc.shape[:1])
        dist.MixtureSameFamily.__init__(new, mixture, components, validate_args=False)
        new.loc, new.scale, new.logits = self.loc, self.scale, self.logits
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        z_dim = self.loc.shape[-1]
        z = value.reshape(-1, z_dim).double()
        loc, scale = self.loc.double(), self.scale.double()
        precision = scale.pow(-2)
        quadratic = (z * z) @ precision.T - 2 * z @ (loc * precision).T + (loc * loc * precision).sum(-1)
        log_norm = scale.log().sum(-1) + 0.5 * z_dim * math.log(2 * math.pi)
        log_weights = torch.log_softmax(self.logits.double(), -1)
        log_p = torch.logsumexp(log_weights - log_norm - 0.5 * quadratic, dim=-1)
        log_p = log_p.to(value.dtype).reshape(value.shape[:-1])
        return log_p.expand(torch.broadcast_shapes(log_p.shape, self.batch_shape))
