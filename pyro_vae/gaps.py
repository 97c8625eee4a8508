"""The inference gap and its two parts (Cremer, Li & Duvenaud 2018, "Inference suboptimality in variational
autoencoders", ICML).

For an example x, a guide family Q and the amortized q_phi(z|x) in it,

    log p(x) - L[q_phi]  =  (log p(x) - L[q*])  +  (L[q*] - L[q_phi]),
     inference gap          approximation gap      amortization gap

where L[q] = E_q[log p(x, z) - log q(z)] is the ELBO of q and q* = argmax_{q in Q} L[q] the family's best
*local* fit for x alone: log p(x) - L[q*] = KL(q* || p(z|x)) is what the family cannot express, and
L[q*] - L[q_phi] what the encoder loses by sharing its weights over the data set.

- log p(x): an NLL method (``evaluate.NLL_METHODS``), AIS by default (Wu et al. 2017; ``pyro_vae.ais``), a
  stochastic lower bound with its Monte Carlo SE;
- L[q*]: ``pyro_vae.local_fit``: q's per-example parameters (the encoder head's output) optimized by Adam
  from phi(x), the model's weights fixed; L[q*] and L[q_phi] are estimated from the same draws of the
  noise (common random numbers), so their difference carries little Monte Carlo error.

For the ``normal`` and ``lowrank`` guides the local family is exactly the guide family. For ``iaf`` the
flow's MADE weights are shared model weights and stay fixed: q* ranges over the flow's per-example inputs
(base loc, scale and the context h), a subfamily of the one Cremer et al. optimize (all flow parameters per
example), so its approximation gap is an upper bound on theirs and its amortization gap a lower bound.

Every quantity is per example; the summary gives the means over the examples with the SE of each mean over
the examples (sd / sqrt(N)); the gaps are paired differences, so their SEs are those of the differences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pyro_vae.evaluate import describe, nll_method
from pyro_vae.local_fit import LocalElbos, LocalFit, local_elbos
from pyro_vae.specs import Spec

DEFAULT_NLL = "ais(steps=1000, leapfrog=10, chains=16)"
# Steps of the local fit when none are given: on a trained 784-200-200-50 MNIST model the local ELBO moves
# by under 0.05 nats per example between 500 and 1000 steps (docs/results/gaps.md).
DEFAULT_STEPS = 500


@dataclass
class Gaps:
    """Per-example log p-hat(x) (``log_px``, with its Monte Carlo ``log_px_se``) and the ELBOs of q_phi and q*
    with theirs (``elbos``: ``pyro_vae.local_fit.LocalElbos``), float64 CPU tensors ``(N,)`` in nats."""

    log_px: torch.Tensor
    log_px_se: torch.Tensor
    elbos: LocalElbos

    @property
    def amortized(self) -> torch.Tensor:
        """L[q_phi] per example."""
        return self.elbos.amortized

    @property
    def local(self) -> torch.Tensor:
        """L[q*] per example."""
        return self.elbos.local

    @property
    def approximation(self) -> torch.Tensor:
        """log p(x) - L[q*] per example."""
        return self.log_px - self.local

    @property
    def amortization(self) -> torch.Tensor:
        """L[q*] - L[q_phi] per example."""
        return self.local - self.amortized

    @property
    def inference(self) -> torch.Tensor:
        """log p(x) - L[q_phi] per example."""
        return self.log_px - self.amortized

    @property
    def approximation_mc_se(self) -> torch.Tensor:
        """The Monte Carlo SE of each example's approximation gap (the NLL's and L[q*]'s, independent)."""
        return (self.log_px_se.square() + self.elbos.local_se.square()).sqrt()

    def summary(self) -> dict[str, Any]:
        """Means over the examples with the SE of each mean over the examples (``*_se``), and the Monte Carlo SEs
        of the means (``*_mc_se``: how far they would move with other draws for the same examples)."""
        result: dict[str, Any] = {"num_examples": int(self.log_px.numel())}
        for name in ("log_px", "local", "amortized", "approximation", "amortization", "inference"):
            values = getattr(self, name)
            result[name], result[f"{name}_se"] = _mean_and_se(values)
        n = self.log_px.numel()
        result["log_px_mc_se"] = float(self.log_px_se.square().sum().sqrt() / n)
        result["amortization_mc_se"] = float(self.elbos.difference_se.square().sum().sqrt() / n)
        result["approximation_mc_se"] = float(self.approximation_mc_se.square().sum().sqrt() / n)
        return result


def _mean_and_se(values: torch.Tensor) -> tuple[float, float | None]:
    n = values.numel()
    return float(values.mean()), float(values.std() / math.sqrt(n)) if n > 1 else None


def inference_gaps(
    vae,
    x: torch.Tensor,
    nll: Spec | object = DEFAULT_NLL,
    fit: LocalFit | None = None,
    batch_size: int | None = None,
    progress: bool | None = False,
    **data,
) -> Gaps:
    """The gaps of ``vae`` on the rows ``x`` (``(N, D)``): log p(x) by the NLL method ``nll``, L[q*] and
    L[q_phi] by :func:`pyro_vae.local_fit.local_elbos` with ``fit`` (default: ``DEFAULT_STEPS`` steps).

    ``data`` are the fields the structure consumes, row for row. A structure without one amortized q(z|x) on
    an encoder network (M2, the CVAE) is refused in one line.
    """
    fit = fit or LocalFit(steps=DEFAULT_STEPS, particles=1000)
    elbos = local_elbos(vae, x, fit, progress=progress, what="the inference-gap decomposition", **data)
    estimate, _ = nll_method(nll).estimate(vae, x, batch_size=batch_size, progress=progress, **data)
    return Gaps(estimate.log_px.double().cpu(), estimate.se.double().cpu(), elbos)


# If L[q*] beats the log-likelihood estimate by more than this many SEs, the estimate is not a trustworthy
# log p(x) (AIS with too few steps, IS with too few samples): gaps.json says so.
NEGATIVE_GAP_SE = 4.0


def gaps_run(
    run_dir: str | Path,
    num: int = 100,
    split: str = "test",
    nll: Spec | object = DEFAULT_NLL,
    fit: LocalFit | None = None,
    device: str = "auto",
    data_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool | None = None,
) -> dict[str, Any]:
    """:func:`inference_gaps` on the first ``num`` examples of a run's ``split``, as a JSON-ready dict: the
    summary, the settings (NLL method, local fit) and a ``warning`` when the approximation gap is negative
    beyond its noise (the log-likelihood estimate then lies below L[q*] and is not to be trusted)."""
    import pyro

    from pyro_vae.evaluate import split_rows
    from pyro_vae.runs import load_run  # runs -> ... -> gaps would otherwise be circular

    method = nll_method(nll)  # a bad spec fails before the run is loaded
    fit = fit or LocalFit(steps=DEFAULT_STEPS, particles=1000)
    pyro.set_rng_seed(seed)
    run = load_run(run_dir, device=device, data_dir=data_dir)
    x, _, data = split_rows(run.vae, run.dataset, split, num)
    gaps = inference_gaps(run.vae, x, method, fit, progress=progress, **data)
    result = gaps.summary()
    spec, _ = describe(method)
    result.update(
        run=str(run_dir),
        split=split,
        nll_method=spec,
        local_fit={"steps": fit.steps, "lr": fit.lr, "particles": fit.particles, "step_particles": fit.step_particles},
        guide=getattr(run.vae.encoder, "spec", type(run.vae.encoder).__name__),
        seed=seed,
    )
    warning = untrustworthy_nll(result, spec)
    if warning:
        result["warning"] = warning
    return result


def untrustworthy_nll(summary: dict[str, Any], spec: str) -> str | None:
    """A warning when the mean approximation gap is negative by more than :data:`NEGATIVE_GAP_SE` of its SEs
    (over the examples and of the Monte Carlo): L[q*] <= log p(x) always, so the estimate is then too low."""
    se = math.hypot(summary["approximation_se"] or 0.0, summary["approximation_mc_se"])
    if summary["approximation"] >= -NEGATIVE_GAP_SE * se:
        return None
    return (
        f"L[q*] exceeds the log-likelihood estimate by {-summary['approximation']:.3f} nats on average: "
        f"{spec} is not a trustworthy log p(x) here; raise its steps (or samples)"
    )
