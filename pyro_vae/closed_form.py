"""The hand-written ELBO: Monte Carlo reconstruction term plus analytic KL, plain torch, no Pyro.

For a diagonal Gaussian guide q(z|x) = N(mu, diag(sigma^2)) and the standard normal prior,

    ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)),
    KL(N(mu, sigma^2) || N(0, I)) = 1/2 sum_j (sigma_j^2 + mu_j^2 - 1 - log sigma_j^2)

(Kingma & Welling 2014, Appendix B). The expectation is estimated with the reparameterization
z = mu + sigma * eps, eps ~ N(0, I), averaged over ``num_samples`` draws. This is the
reference the Pyro estimators are checked against.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

# Closed-form KL(q || p) for (guide name, prior name) pairs: fn(vae, x, loc, scale) -> (batch,).
CLOSED_FORM_KL: dict[tuple[str, str], Callable[..., torch.Tensor]] = {}


def gaussian_kl_standard_normal(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """KL(N(loc, diag(scale^2)) || N(0, I)) = 1/2 sum(scale^2 + loc^2 - 1 - log scale^2), over the last dim."""
    return 0.5 * (scale.square() + loc.square() - 1.0 - 2.0 * scale.log()).sum(-1)


CLOSED_FORM_KL[("normal", "normal")] = lambda vae, x, loc, scale: gaussian_kl_standard_normal(loc, scale)


class ELBOTerms(NamedTuple):
    """Per-example terms, each of shape ``(batch,)``: ``elbo = reconstruction - kl``."""

    reconstruction: torch.Tensor
    kl: torch.Tensor

    @property
    def elbo(self) -> torch.Tensor:
        return self.reconstruction - self.kl


def _pair(vae) -> tuple[str, str]:
    return getattr(vae.encoder, "spec_name", type(vae.encoder).__name__), getattr(
        vae.prior, "spec_name", type(vae.prior).__name__
    )


def has_closed_form(vae) -> bool:
    """Whether the (guide, prior) pair of ``vae`` has an analytic KL here."""
    return _pair(vae) in CLOSED_FORM_KL


def closed_form_terms(vae, x: torch.Tensor, num_samples: int = 1) -> ELBOTerms:
    """Reconstruction E_q[log p(x|z)] (Monte Carlo, ``num_samples`` draws) and analytic KL."""
    pair = _pair(vae)
    if pair not in CLOSED_FORM_KL:
        raise ValueError(
            f"no closed-form KL for guide {getattr(vae.encoder, 'spec', pair[0])!r} with prior "
            f"{getattr(vae.prior, 'spec', pair[1])!r}; pairs with one: "
            + ", ".join(f"guide={g} prior={p}" for g, p in sorted(CLOSED_FORM_KL))
            + " (use a Monte Carlo estimator such as 'trace' instead)"
        )
    x = x.reshape(x.shape[0], -1)
    loc, scale = vae.encode(x)
    eps = torch.randn((num_samples, *loc.shape), dtype=loc.dtype, device=loc.device)
    z = loc + scale * eps
    log_px = vae.decode(z).log_prob(vae.likelihood.prepare(x))  # (num_samples, batch)
    return ELBOTerms(reconstruction=log_px.mean(0), kl=CLOSED_FORM_KL[pair](vae, x, loc, scale))


def closed_form_elbo(vae, x: torch.Tensor, num_samples: int = 1) -> torch.Tensor:
    """Per-example ELBO, shape ``(batch,)``, in nats: MC reconstruction minus analytic KL."""
    return closed_form_terms(vae, x, num_samples).elbo
