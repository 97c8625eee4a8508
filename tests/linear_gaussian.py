"""An exactly tractable VAE: the linear-Gaussian model (probabilistic PCA, Tipping & Bishop 1999).

    z ~ N(0, I_K),   x | z ~ N(W z + b, s^2 I_D)

built as ``VAE(x_dim=D, z_dim=K, hidden_dims=(), likelihood="gaussian(scale=s)")``: with no
hidden layers the decoder is the single linear map z -> W z + b and the encoder is a linear map
x -> (loc, raw scale). Everything about this model is exact:

    log p(x)  = log N(x; b, W W^T + s^2 I)
    p(z | x)  = N(mu(x), Sigma),  Sigma = (I + W^T W / s^2)^{-1},  mu(x) = Sigma W^T (x - b) / s^2.

W is drawn with orthogonal columns, so W^T W = diag(d^2) and Sigma is diagonal: the exact posterior
is a member of the diagonal-Gaussian guide family, and the linear encoder can represent it exactly
(loc = A x + c with A = Sigma W^T / s^2, c = -A b; a constant scale). At the exact posterior the
ELBO equals log p(x) for every draw of z, because log p(x, z) - log q(z|x) = log p(x) identically.

Everything is float64 (``vae.double()`` and float64 data), because the tests compare to ~1e-6 nats.
Used by test_linear_gaussian.py, test_closed_form.py and the estimator and family tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.distributions import MultivariateNormal

from pyro_vae.model import VAE
from pyro_vae.networks import MIN_SCALE

DTYPE = torch.float64


@dataclass(frozen=True)
class LinearGaussian:
    """The model x = W z + b + s eps: ``W`` (D, K) with orthogonal columns, ``b`` (D,), noise ``s``."""

    W: torch.Tensor
    b: torch.Tensor
    s: float

    def to(self, device) -> LinearGaussian:
        """The same model with its tensors on ``device``."""
        return LinearGaussian(W=self.W.to(device), b=self.b.to(device), s=self.s)

    @property
    def x_dim(self) -> int:
        return self.W.shape[0]

    @property
    def z_dim(self) -> int:
        return self.W.shape[1]

    # -- exact quantities -------------------------------------------------------------------
    def marginal(self) -> MultivariateNormal:
        """p(x) = N(b, W W^T + s^2 I)."""
        cov = self.W @ self.W.T + self.s**2 * torch.eye(self.x_dim, dtype=DTYPE, device=self.W.device)
        return MultivariateNormal(self.b, covariance_matrix=cov)

    def log_px(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x), shape ``(batch,)``, nats."""
        return self.marginal().log_prob(x.to(DTYPE))

    def posterior_cov(self) -> torch.Tensor:
        """Sigma = (I + W^T W / s^2)^{-1}, shape (K, K); diagonal here because W's columns are orthogonal."""
        eye = torch.eye(self.z_dim, dtype=DTYPE, device=self.W.device)
        return torch.linalg.inv(eye + self.W.T @ self.W / self.s**2)

    def posterior_gain(self) -> torch.Tensor:
        """A = Sigma W^T / s^2, shape (K, D): the exact posterior mean is mu(x) = A (x - b)."""
        return self.posterior_cov() @ self.W.T / self.s**2

    def posterior_mean(self, x: torch.Tensor) -> torch.Tensor:
        """mu(x) = Sigma W^T (x - b) / s^2, shape ``(batch, K)``."""
        return (x.to(DTYPE) - self.b) @ self.posterior_gain().T

    def posterior(self, x: torch.Tensor) -> MultivariateNormal:
        """The exact posterior p(z | x) = N(mu(x), Sigma), batch shape ``(batch,)``."""
        return MultivariateNormal(self.posterior_mean(x), covariance_matrix=self.posterior_cov())

    def kl_to_posterior(self, vae: VAE, x: torch.Tensor) -> torch.Tensor:
        """Exact KL(q(z|x) || p(z|x)) for the diagonal-Gaussian guide of ``vae``, shape ``(batch,)``.

        The gap of the ELBO: log p(x) = ELBO(x) + KL(q(z|x) || p(z|x)).
        """
        loc, scale = vae.encode(x)
        q = MultivariateNormal(loc, covariance_matrix=torch.diag_embed(scale.square()))
        return torch.distributions.kl_divergence(q, self.posterior(x))

    def expected_log_lik(self, vae: VAE, x: torch.Tensor) -> torch.Tensor:
        """Exact E_q[log p(x|z)] for the diagonal-Gaussian guide of ``vae``, shape ``(batch,)``.

        With z = m + S eps: E||x - W z - b||^2 = ||x - W m - b||^2 + sum_k (W^T W)_kk S_k^2, so
        E_q[log p(x|z)] = -D/2 log(2 pi s^2) - (||x - W m - b||^2 + sum_k ||W_k||^2 S_k^2) / (2 s^2).
        """
        loc, scale = vae.encode(x)
        resid = x.to(DTYPE) - loc @ self.W.T - self.b
        trace_term = (scale.square() * self.W.square().sum(0)).sum(-1)
        return -0.5 * self.x_dim * math.log(2 * math.pi * self.s**2) - (resid.square().sum(-1) + trace_term) / (
            2 * self.s**2
        )

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws x ~ p(x), shape (n, D), float64."""
        z = torch.randn(n, self.z_dim, dtype=DTYPE, generator=generator).to(self.W.device)
        eps = torch.randn(n, self.x_dim, dtype=DTYPE, generator=generator).to(self.W.device)
        return z @ self.W.T + self.b + self.s * eps

    # -- the VAE ------------------------------------------------------------------------
    def build_vae(self, exact_posterior: bool = True) -> VAE:
        """The float64 ``VAE`` (on W's device) with this decoder and the exact-posterior encoder (or a generic one)."""
        vae = VAE(x_dim=self.x_dim, z_dim=self.z_dim, hidden_dims=(), likelihood=f"gaussian(scale={self.s!r})")
        vae = vae.to(device=self.W.device, dtype=DTYPE)
        decoder = vae.decoder.head
        with torch.no_grad():
            decoder.weight.copy_(self.W)
            decoder.bias.copy_(self.b)
        if exact_posterior:
            set_exact_posterior(vae, self)
        else:
            set_generic_guide(vae, self)
        return vae


def linear_gaussian(x_dim: int = 6, z_dim: int = 3, s: float = 0.5, seed: int = 0) -> LinearGaussian:
    """A random model with orthogonal columns of W (norms between 0.5 and 2) and a random bias."""
    g = torch.Generator().manual_seed(seed)
    if z_dim > x_dim:
        raise ValueError(f"need z_dim <= x_dim for orthogonal columns, got z_dim={z_dim}, x_dim={x_dim}")
    q, _ = torch.linalg.qr(torch.randn(x_dim, z_dim, dtype=DTYPE, generator=g))
    norms = torch.linspace(0.5, 2.0, z_dim, dtype=DTYPE)
    b = 0.3 * torch.randn(x_dim, dtype=DTYPE, generator=g)
    return LinearGaussian(W=q * norms, b=b, s=float(s))


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """x with softplus(x) = y, for y > 0: x = y + log(1 - exp(-y)) = y + log(-expm1(-y))."""
    return y + torch.log(-torch.expm1(-y))


def set_guide(vae: VAE, gain: torch.Tensor, offset: torch.Tensor, scale: torch.Tensor) -> None:
    """Make the linear encoder output loc = gain @ x + offset and the constant ``scale`` (shape (K,)).

    The encoder's scale is softplus(raw) + MIN_SCALE (networks.GaussianEncoder), so the scale rows
    get zero weights and the bias inverse_softplus(scale - MIN_SCALE).
    """
    linear = vae.encoder.net.head
    k = vae.z_dim
    with torch.no_grad():
        linear.weight.zero_()
        linear.weight[:k].copy_(gain)
        linear.bias[:k].copy_(offset)
        linear.bias[k:].copy_(inverse_softplus(scale.to(DTYPE) - MIN_SCALE))


def set_exact_posterior(vae: VAE, lg: LinearGaussian) -> None:
    """Set the encoder to the exact posterior: loc = A (x - b), scale = sqrt(diag Sigma)."""
    gain = lg.posterior_gain()
    set_guide(vae, gain, -gain @ lg.b, lg.posterior_cov().diagonal().sqrt())


def set_generic_guide(vae: VAE, lg: LinearGaussian) -> None:
    """A guide far from the exact posterior: shrunk and shifted mean, scales 1.6x too wide.

    Its gap KL(q || p(z|x)) is of order one nat per example, far above the Monte Carlo error of the tests.
    """
    gain = lg.posterior_gain()
    shift = torch.linspace(-0.4, 0.4, lg.z_dim, dtype=DTYPE, device=lg.W.device)
    set_guide(vae, 0.7 * gain, -0.7 * gain @ lg.b + shift, 1.6 * lg.posterior_cov().diagonal().sqrt())
