"""Bounds and gradient estimators, by name.

An estimator has two methods:

- ``loss(vae, x, beta=1.0)``: a differentiable scalar whose gradient is the estimator's gradient
  of the negative bound summed over the batch (nats). This is the training objective.
- ``bound(vae, x)``: the per-example bound estimate, shape ``(batch,)``, in nats (higher is better).

``get(spec)`` builds one from a spec such as ``"trace"`` or ``"iwae(k=50)"``.
"""

from __future__ import annotations

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_vae.closed_form import closed_form_elbo
from pyro_vae.registry import Registry

ESTIMATORS: Registry = Registry("estimator")


def log_weights(vae, x: torch.Tensor, k: int = 1, beta: float = 1.0) -> torch.Tensor:
    """log w = log p(x, z) - log q(z|x) for ``k`` draws z ~ q(z|x) per example, shape ``(k, batch)``.

    Computed from Pyro traces of ``vae.guide`` and ``vae.model`` (replayed on the guide's z),
    vectorized over a particle plate at dim -2. Each site's log-density is multiplied by its
    ``poutine.scale`` (the KL warm-up ``beta`` on ``"z"``).
    """
    with pyro.plate("particles", k, dim=-2):
        guide_trace = poutine.trace(vae.guide).get_trace(x, beta)
        model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x, beta)
    return _trace_log_density(model_trace) - _trace_log_density(guide_trace)


def _trace_log_density(trace) -> torch.Tensor:
    total = 0.0
    for site in trace.nodes.values():
        if site["type"] == "sample":
            total = total + site["fn"].log_prob(site["value"]) * site["scale"]
    return total


class Estimator:
    """Base class; subclasses implement ``loss`` and ``bound``."""

    def loss(self, vae, x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        raise NotImplementedError

    def bound(self, vae, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _PyroELBO(Estimator):
    """An estimator backed by a Pyro ELBO class's ``differentiable_loss``."""

    elbo_class: type = Trace_ELBO

    def __init__(self) -> None:
        self.elbo = self.elbo_class()

    def loss(self, vae, x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        return self.elbo.differentiable_loss(vae.model, vae.guide, x, beta)

    def bound(self, vae, x: torch.Tensor) -> torch.Tensor:
        return log_weights(vae, x, k=1)[0]


@ESTIMATORS.register("trace")
class TraceELBO(_PyroELBO):
    """Pyro's ``Trace_ELBO``: E_q[log p(x,z) - log q(z|x)] with one reparameterized draw (MC KL)."""

    elbo_class = Trace_ELBO


@ESTIMATORS.register("meanfield")
class MeanFieldELBO(_PyroELBO):
    """Pyro's ``TraceMeanField_ELBO``: MC reconstruction, analytic KL where registered."""

    elbo_class = TraceMeanField_ELBO


@ESTIMATORS.register("closed_form")
class ClosedFormELBO(Estimator):
    """The hand-written reference ``closed_form_elbo`` (plain torch, analytic KL)."""

    def loss(self, vae, x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        from pyro_vae.closed_form import closed_form_terms

        terms = closed_form_terms(vae, x)
        return -(terms.reconstruction - beta * terms.kl).sum()

    def bound(self, vae, x: torch.Tensor) -> torch.Tensor:
        return closed_form_elbo(vae, x)


def get(spec) -> Estimator:
    """An estimator from a spec, e.g. ``get("iwae(k=50)")``; an unknown name lists the valid ones."""
    return ESTIMATORS.build(spec)


def names() -> list[str]:
    return ESTIMATORS.names()
