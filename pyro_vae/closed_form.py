"""The hand-written ELBO: Monte Carlo reconstruction term plus analytic KL, plain torch, no Pyro.

For a diagonal Gaussian guide q(z|x) = N(mu, diag(sigma^2)) and the standard normal prior,

    ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)),
    KL(N(mu, sigma^2) || N(0, I)) = 1/2 sum_j (sigma_j^2 + mu_j^2 - 1 - log sigma_j^2)

(Kingma & Welling 2014, Appendix B). The expectation is estimated with the reparameterization
z = mu + sigma * eps, eps ~ N(0, I) (``q.rsample``), averaged over ``num_samples`` draws. This is
the reference the Pyro estimators are checked against.

``CLOSED_FORM_KL`` holds the analytic KL of every (guide, prior) pair that has one, keyed by
the families' registry names; each entry maps the two distributions (q with batch shape
``(batch,)``, p with batch shape ``()``) to the KL per example. Other pairs (mixtures, flows)
have no closed form: ``closed_form_elbo`` raises a ``ValueError`` naming the pair, and the Monte
Carlo estimators (``trace``, ``meanfield``, which falls back to Monte Carlo by itself) apply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.distributions import Distribution, Independent, LowRankMultivariateNormal, Normal, kl_divergence, register_kl

# Closed-form KL(q || p) for (guide name, prior name) pairs: fn(q, p) -> (batch,).
CLOSED_FORM_KL: dict[tuple[str, str], Callable[[Distribution, Distribution], torch.Tensor]] = {}


def gaussian_kl_standard_normal(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """KL(N(loc, diag(scale^2)) || N(0, I)) = 1/2 sum(scale^2 + loc^2 - 1 - log scale^2), over the last dim."""
    return 0.5 * (scale.square() + loc.square() - 1.0 - 2.0 * scale.log()).sum(-1)


def gaussian_kl_diagonal(
    loc: torch.Tensor, scale: torch.Tensor, prior_loc: torch.Tensor, prior_scale: torch.Tensor
) -> torch.Tensor:
    """KL(N(m, diag(s^2)) || N(m0, diag(s0^2))), summed over the last dim:

    1/2 sum_j [(s_j^2 + (m_j - m0_j)^2) / s0_j^2 - 1 - log s_j^2 + log s0_j^2].
    """
    ratio = (scale / prior_scale).square()
    return 0.5 * (ratio + ((loc - prior_loc) / prior_scale).square() - 1.0 - ratio.log()).sum(-1)


def _diagonal(d: Distribution) -> tuple[torch.Tensor, torch.Tensor]:
    """(loc, scale) of a diagonal Gaussian ``Normal(loc, scale).to_event(1)``."""
    return d.base_dist.loc, d.base_dist.scale


def _as_low_rank(d: Distribution) -> LowRankMultivariateNormal:
    """A diagonal Gaussian as a ``LowRankMultivariateNormal`` with a zero factor, for torch's registered KL."""
    loc, scale = _diagonal(d)
    factor = torch.zeros((*loc.shape, 1), dtype=loc.dtype, device=loc.device)
    return LowRankMultivariateNormal(loc, factor, scale.square())


@register_kl(LowRankMultivariateNormal, Independent)
def _kl_low_rank_diagonal(q: LowRankMultivariateNormal, p: Independent) -> torch.Tensor:
    """KL(low-rank Gaussian || ``Normal(loc, scale).to_event(1)``), which torch lacks (it has the
    pair with a low-rank p only): the diagonal Gaussian is a low-rank one with a zero factor.

    Registered with torch so that every ``kl_divergence`` caller finds it: ``meanfield``
    (Pyro's ``TraceMeanField_ELBO`` and the lean loss) takes the analytic KL for the ``lowrank``
    guide against ``normal`` and ``learned_normal`` instead of falling back to Monte Carlo.
    Any other ``Independent`` p raises ``NotImplementedError``, which those callers expect.
    """
    if p.reinterpreted_batch_ndims != 1 or not isinstance(p.base_dist, Normal):
        raise NotImplementedError
    return kl_divergence(q, _as_low_rank(p))


CLOSED_FORM_KL[("normal", "normal")] = lambda q, p: gaussian_kl_standard_normal(*_diagonal(q))
CLOSED_FORM_KL[("normal", "learned_normal")] = lambda q, p: gaussian_kl_diagonal(*_diagonal(q), *_diagonal(p))
# Full-covariance Gaussian against a diagonal one: torch's registered KL
# 1/2 [tr(S0^-1 S) + (m0 - m)^T S0^-1 (m0 - m) - d + log det S0 - log det S], with S low rank + diagonal.
CLOSED_FORM_KL[("lowrank", "normal")] = lambda q, p: kl_divergence(q, p)  # _kl_low_rank_diagonal
CLOSED_FORM_KL[("lowrank", "learned_normal")] = CLOSED_FORM_KL[("lowrank", "normal")]


class ELBOTerms(NamedTuple):
    """Per-example terms, each of shape ``(batch,)``: ``elbo = reconstruction - kl``."""

    reconstruction: torch.Tensor
    kl: torch.Tensor

    @property
    def elbo(self) -> torch.Tensor:
        return self.reconstruction - self.kl


def _pair(vae) -> tuple[str, str]:
    """(guide name, prior name) of a plain VAE; a ``ValueError`` for a model without one encoder and one prior.

    A model structure says itself whether this applies (``Structure.closed_form_refusal``, "" when
    it does); an object without that attribute is judged by its parts.
    """
    refusal = getattr(vae, "closed_form_refusal", "")
    if refusal:
        raise ValueError(f"{refusal}; use a Monte Carlo estimator: trace, meanfield, iwae, renyi, stl or dreg")
    if not all(hasattr(vae, part) for part in ("encoder", "prior", "posterior", "decode")):
        raise ValueError(
            f"the closed-form ELBO is written for the plain VAE (one latent z, structure 'vae'), not for "
            f"{type(getattr(vae, 'structure', vae)).__name__}; use a Monte Carlo estimator such as 'trace'"
        )
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
    q = vae.posterior(x)
    z = q.rsample((num_samples,))  # loc + scale * eps for the diagonal guide
    log_px = vae.decode(z).log_prob(vae.likelihood.prepare(x))  # (num_samples, batch)
    return ELBOTerms(reconstruction=log_px.mean(0), kl=CLOSED_FORM_KL[pair](q, vae.prior_distribution()))


def closed_form_elbo(vae, x: torch.Tensor, num_samples: int = 1) -> torch.Tensor:
    """Per-example ELBO, shape ``(batch,)``, in nats: MC reconstruction minus analytic KL."""
    return closed_form_terms(vae, x, num_samples).elbo
