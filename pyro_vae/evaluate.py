"""Evaluation of a trained VAE: test ELBO, importance-sampled log-likelihood, bits/dim, active units.

All numbers are in nats per example (bits/dim excepted) and always at beta = 1. The ELBO and the
importance-sampled NLL read their log weights log p(x, z) - log q(z|x) from the structure's Pyro
programs (``pyro_vae.traces.log_weights``: every latent site, every prior, guide and likelihood),
the same mechanism the estimators train with; the latent diagnostics (active units, KL per
dimension) read the plain VAE's ``vae.posterior(x)`` and ``vae.prior_distribution()``. The
formulas, their standard errors and the references are written out in ``docs/evaluation.md``.

- :func:`log_likelihood`: log p(x) ~ log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x)
  (Burda et al. 2015, "Importance Weighted Autoencoders", K = 5000), streamed over chunks of
  samples so that memory does not grow with K.
- :func:`log_likelihood_with_se`: the same plus its Monte Carlo standard error (delta method).
- :func:`elbo`: the mean ELBO over a whole set.
- :func:`active_units`: Burda et al.'s A_u = Cov_x(E_{q(z|x)}[u]) > 0.01.
- :func:`kl_per_dimension`: E_x KL(q(z_j|x) || p(z_j)) for factorized pairs.
- :func:`evaluate` / :func:`evaluate_run`: all of them on a dataset split / a run folder.
- :data:`NLL_METHODS`: the log-likelihood estimators by spec, ``is(samples=5000)`` (the default) and
  ``ais(steps=..., leapfrog=..., chains=...)`` (annealed importance sampling, ``pyro_vae.ais``, which
  registers itself there when the package is imported).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributions as tdist

from pyro_vae import protocol
from pyro_vae.data import spread_rows
from pyro_vae.fields import split_fields
from pyro_vae.model import posterior_mean
from pyro_vae.registry import Registry
from pyro_vae.specs import Spec, SpecError, format_spec, integer_arg
from pyro_vae.traces import elbo_particles, log_weights

# Upper bound on the elements of the widest activation of one chunk, (chunk, batch, width):
# 2**25 elements are 128 MiB in float32. The default chunk of samples is chosen so that the
# decoder's largest layer (and the log-density of x, of the same size) stays under it.
MEMORY_BUDGET = 2**25
# Upper bound on the log weights kept per block of examples, (K, batch), for their jackknife: 2**25
# float32 numbers are 128 MiB; beyond K = 2**25 / DEFAULT_BATCH_SIZE = 67 108 the blocks shrink.
WEIGHTS_BUDGET = 2**25
# Examples per batch when none is given: large enough to keep a GPU busy, small enough that a
# chunk still holds several samples under MEMORY_BUDGET for 3072-pixel data.
DEFAULT_BATCH_SIZE = 500
# Below this median effective sample size (and below K/10) the IS estimate is dominated by a few weights:
# its bias (about half its variance, low) and its SE are then rough, and evaluate warns. On log-normal weights at
# ESS ~ 3.5 (K = 10) the bias is 0.3 nats; at ESS ~ 16 (K = 100), 0.05 (docs/evaluation.md).
LOW_ESS = 10.0
# Burda et al. (2015): a unit is active when the variance over the data of its posterior mean exceeds 0.01.
ACTIVE_THRESHOLD = 0.01


# -- helpers ---------------------------------------------------------------------------------------
def model_device(vae) -> torch.device:
    return next(vae.parameters()).device


@contextlib.contextmanager
def evaluating(vae) -> Iterator[None]:
    """Eval mode and no autograd for the duration; the module's previous mode is restored."""
    was_training = vae.training
    vae.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        vae.train(was_training)


def flat_on_device(vae, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).to(model_device(vae))


def chunks(
    x: torch.Tensor, data: dict[str, torch.Tensor], batch_size: int
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Consecutive blocks of ``batch_size`` rows of ``x`` and, row for row, of each field in ``data``."""
    for xb, start in zip(_batches(x, batch_size), range(0, x.shape[0], batch_size), strict=True):
        rows = slice(start, start + batch_size)
        yield xb, {name: value[rows] for name, value in data.items()}


def fields_on_device(vae, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.to(model_device(vae)) for name, value in data.items()}


def metric_sums(
    vae, x: torch.Tensor, labels, data: dict[str, torch.Tensor], batch_size: int
) -> dict[str, torch.Tensor]:
    """The structure's metrics (``Structure.metrics``) summed over ``x``, name -> device scalar (no host read)."""
    if not hasattr(vae, "metrics"):
        return {}
    totals: dict[str, torch.Tensor] = {}
    for start, (xb, db) in zip(range(0, x.shape[0], batch_size), chunks(x, data, batch_size), strict=True):
        true_labels = None if labels is None else labels[start : start + batch_size]
        for name, values in vae.metrics(xb, true_labels, **db).items():
            totals[name] = totals.get(name, 0) + values.sum()
    return totals


def _batches(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, x.shape[0], batch_size):
        yield x[start : start + batch_size]


def widest_activation(vae) -> int:
    """The widest per-sample activation: x itself, z, the output of any linear layer (hidden or head), or
    what a module declares as its ``activation_width`` (an image body's widest feature map, a pixel head)."""
    linear = (m.out_features for m in vae.modules() if isinstance(m, torch.nn.Linear))
    declared = (m.activation_width for m in vae.modules() if hasattr(m, "activation_width"))
    return max(getattr(vae, "x_dim", 1), getattr(vae, "z_dim", 1), *linear, *declared)


def default_chunk_size(vae, batch: int, budget: int | None = None) -> int:
    """Samples per chunk so that a ``(chunk, batch, width)`` activation stays under ``budget`` elements.

    ``budget`` defaults to ``MEMORY_BUDGET`` (2**25 elements, 128 MiB in float32); at least one sample.
    """
    return max(1, (budget or MEMORY_BUDGET) // (batch * widest_activation(vae)))


def progress_bar(total: int, enabled: bool | None, desc: str, unit: str = "ex"):
    """A tqdm bar of ``total`` ``unit`` when ``enabled`` (``None``: only on a terminal); otherwise a no-op."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return contextlib.nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False)


def _log_weight_batches(
    vae,
    x: torch.Tensor,
    num_samples: int,
    chunk_size: int | None,
    batch_size: int | None,
    progress: bool | None = False,
    **data,
) -> Iterator[torch.Tensor]:
    """The log weights log w_k = log p(x, z_k) - log q(z_k|x), z_k ~ q(z|x), block by block of examples:
    one tensor of shape ``(num_samples, batch)`` per block.

    Per block, chunks of at most ``chunk_size`` samples are drawn and their log weights kept, so the
    decoder's activations are alive for one chunk at a time, O(chunk * batch * width); the kept
    weights are O(num_samples * batch) numbers, and blocks shrink so that they stay under
    ``WEIGHTS_BUDGET`` however large K is.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    x, data = flat_on_device(vae, x), fields_on_device(vae, data)
    batch_size = batch_size or min(x.shape[0], DEFAULT_BATCH_SIZE) or 1
    batch_size = max(1, min(batch_size, WEIGHTS_BUDGET // num_samples))
    with evaluating(vae), progress_bar(x.shape[0], progress, f"log p(x), K={num_samples}") as bar:
        for xb, db in chunks(x, data, batch_size):
            chunk = chunk_size or default_chunk_size(vae, xb.shape[0])
            sizes = [min(chunk, num_samples - start) for start in range(0, num_samples, chunk)]
            yield torch.cat([log_weights(vae, xb, size, **db) for size in sizes])
            if bar is not None:
                bar.update(xb.shape[0])


@dataclass
class ImportanceEstimate:
    """The importance-sampled log p(x) of each example with its Monte Carlo uncertainty (each ``(N,)``).

    - ``log_px``: log (1/K) sum_k w_k;
    - ``se``: the jackknife standard error over the K draws (:func:`jackknife_se`), honest at small K;
    - ``se_delta``: the delta-method standard error sd(w) / (sqrt(K) mean(w)), optimistic at small K;
    - ``ess``: the effective sample size (sum_k w_k)^2 / sum_k w_k^2, between 1 and K (Kong 1992).
    """

    log_px: torch.Tensor
    se: torch.Tensor
    se_delta: torch.Tensor
    ess: torch.Tensor


def delta_method_se(log_w: torch.Tensor) -> torch.Tensor:
    """sd(w) / (sqrt(K) mean(w)) for log weights of shape ``(K, batch)``, in log space; ``nan`` for K = 1.

    With m1 = sum_k w_k, m2 = sum_k w_k^2 and the unbiased variance, se^2 = (K m2 / m1^2 - 1) / (K - 1),
    evaluated as ``expm1(log K + logsumexp(2 log w) - 2 logsumexp(log w))`` so that nothing overflows.
    """
    k = log_w.shape[0]
    if k < 2:
        return torch.full_like(log_w[0], math.nan)
    # K m2 / m1^2 - 1 >= 0 up to rounding (Cauchy-Schwarz).
    excess = torch.expm1(math.log(k) + (2 * log_w).logsumexp(0) - 2 * log_w.logsumexp(0)).clamp_min(0)
    return (excess / (k - 1)).sqrt()


def jackknife_se(log_w: torch.Tensor) -> torch.Tensor:
    """The jackknife standard error of log (1/K) sum_k w_k over its K draws, for ``(K, batch)`` log weights.

    With the leave-one-out estimates L_(i) = log (S - w_i) - log (K - 1), S = sum_k w_k,

        se^2 = (K - 1)/K sum_i (L_(i) - mean_j L_(j))^2.

    By the Efron-Stein inequality its expectation is at least the variance of the estimate from K - 1
    draws, so it is not optimistic even when the weights are heavy-tailed and K is small, where the
    delta method's is (on log-normal weights with E[w^2]/E[w]^2 = 17 at K = 10: sd / rms SE is 1.5 for the
    delta method, 0.97 for the jackknife; ``tests/test_evaluate.py``). The differences
    L_(i) - log p-hat = log1p(-w_i / S) + log(K / (K - 1)) are formed in float64 without cancellation;
    the largest weight's, where w_i / S may round to 1, from the sum of the others. ``nan`` for K = 1.
    """
    k = log_w.shape[0]
    if k < 2:
        return torch.full_like(log_w[0], math.nan)
    dtype, log_w = log_w.dtype, log_w.double()
    total = log_w.logsumexp(0)
    share = (log_w - total).exp()  # w_i / S
    leave_out = torch.log1p(-share.clamp_max(0.5))
    top = log_w.argmax(0, keepdim=True)
    others = log_w.scatter(0, top, -math.inf).logsumexp(0, keepdim=True) - total
    leave_out = leave_out.scatter(0, top, others)  # log1p(-w_max / S) = log(S - w_max) - log S
    variance = (k - 1) / k * (leave_out - leave_out.mean(0)).square().sum(0)
    return variance.sqrt().to(dtype)


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """(sum_k w_k)^2 / sum_k w_k^2 for ``(K, batch)`` log weights: K for equal weights, 1 when one dominates."""
    return (2 * log_w.logsumexp(0) - (2 * log_w).logsumexp(0)).exp()


def weights_estimate(log_w: torch.Tensor) -> ImportanceEstimate:
    """log (1/K) sum_k w_k per example with both standard errors and the ESS, from ``(K, batch)`` log weights
    of i.i.d. weights with E[w] = p(x) (importance samples here, AIS chains in ``pyro_vae.ais``)."""
    k = log_w.shape[0]
    return ImportanceEstimate(
        log_w.logsumexp(0) - math.log(k), jackknife_se(log_w), delta_method_se(log_w), effective_sample_size(log_w)
    )


def importance_estimate(
    vae,
    x: torch.Tensor,
    num_samples: int = 5000,
    chunk_size: int | None = None,
    batch_size: int | None = None,
    progress: bool | None = False,
    **data,
) -> ImportanceEstimate:
    """:func:`log_likelihood` per example with its jackknife and delta-method SEs and effective sample size."""
    blocks = [
        weights_estimate(lw)
        for lw in _log_weight_batches(vae, x, num_samples, chunk_size, batch_size, progress, **data)
    ]
    return ImportanceEstimate(
        *(torch.cat([getattr(b, name) for b in blocks]).to(x.dtype) for name in ("log_px", "se", "se_delta", "ess"))
    )


# -- log-likelihood ----------------------------------------------------------------------------------
def log_likelihood(
    vae,
    x: torch.Tensor,
    num_samples: int = 5000,
    chunk_size: int | None = None,
    batch_size: int | None = None,
    progress: bool | None = False,
    **data,
) -> torch.Tensor:
    """Importance-sampled log p(x) per example, shape ``(batch,)``, in nats.

        log p(x) ~ logsumexp_k [log p(x, z_k) - log q(z_k|x)] - log K,   z_k ~ q(z|x),

    the estimator of Burda et al. (2015) with K = ``num_samples`` (5000 in their Table 1). It is a
    stochastic lower bound (E[log p-hat] <= log p(x)) that tightens as K grows, and exact for any K
    when q(z|x) is the true posterior.

    Args:
        vae: a :class:`pyro_vae.VAE` (any prior, guide and likelihood).
        x: data, shape ``(N, ...)``, flattened to ``(N, x_dim)`` and moved to the module's device.
        num_samples: K, importance samples per example.
        chunk_size: samples drawn at once. ``None`` picks the largest chunk whose
            ``(chunk, batch, width)`` activation stays under ``MEMORY_BUDGET`` elements (width: the
            decoder's widest layer). The decoder's memory grows with the chunk, never with ``num_samples``.
        batch_size: examples evaluated at once (``None``: ``DEFAULT_BATCH_SIZE``).
        progress: a tqdm bar over examples (``None``: only on a terminal).
        data: the fields the model structure consumes (``vae.consumes``), one row per example of ``x``.
    """
    blocks = _log_weight_batches(vae, x, num_samples, chunk_size, batch_size, progress, **data)
    return torch.cat([lw.logsumexp(0) for lw in blocks]) - math.log(num_samples)


SE_METHODS = {"jackknife": jackknife_se, "delta": delta_method_se}


def log_likelihood_with_se(
    vae,
    x: torch.Tensor,
    num_samples: int = 5000,
    chunk_size: int | None = None,
    batch_size: int | None = None,
    progress: bool | None = False,
    se: str = "jackknife",
    **data,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p-hat(x), se)``, each of shape ``(batch,)``: :func:`log_likelihood` and its standard error.

    ``se`` is ``"jackknife"`` (:func:`jackknife_se`, the default: it stays honest at small K) or
    ``"delta"`` (:func:`delta_method_se`, optimistic when K is not much larger than E[w^2]/E[w]^2).
    It is the Monte Carlo error of the estimate for a fixed x (zero when q is the exact posterior),
    not the spread of log p(x) over examples; ``nan`` for K = 1.
    """
    if se not in SE_METHODS:
        raise ValueError(f"unknown standard error {se!r}; valid: {', '.join(SE_METHODS)}")
    blocks = _log_weight_batches(vae, x, num_samples, chunk_size, batch_size, progress, **data)
    parts = [(lw.logsumexp(0) - math.log(num_samples), SE_METHODS[se](lw)) for lw in blocks]
    estimate, error = (torch.cat(column) for column in zip(*parts, strict=True))
    return estimate, error.to(estimate.dtype)


# -- log-likelihood methods by name (``evaluate(nll=...)``, ``pyro-vae evaluate --nll``) -----------------
# Each entry is a dataclass of its settings with ``estimate(vae, x, batch_size, progress, **data)`` returning
# ``(ImportanceEstimate, extra JSON-ready numbers)``: per example, log p-hat(x) = log mean_k w_k over the method's
# i.i.d. weights with E[w] = p(x) (importance samples, AIS chains), their jackknife and delta-method SEs and ESS.
NLL_METHODS: Registry = Registry("NLL method")
NLL_USAGE = "is(samples=K), ais(steps=T, leapfrog=L, chains=C, start='prior'|'guide', schedule='sigmoid'|'linear')"


@NLL_METHODS.register("is")
@dataclass
class ImportanceSampling:
    """``is(samples=K)``: :func:`log_likelihood_with_se` with K importance samples from q(z|x) (Burda et al. 2015)."""

    samples: int = 5000

    def __post_init__(self) -> None:
        self.samples = integer_arg("samples", self.samples)

    def estimate(
        self, vae, x: torch.Tensor, batch_size: int | None = None, progress: bool | None = False, **data
    ) -> tuple[ImportanceEstimate, dict[str, Any]]:
        return importance_estimate(vae, x, self.samples, batch_size=batch_size, progress=progress, **data), {}


def nll_method(spec: Spec | object):
    """The NLL method a spec names (``"is(samples=5000)"``, ``"ais(steps=1000)"``); a built one as it is.

    A bad spec is a one-line :class:`SpecError` that names the valid methods.
    """
    try:
        return NLL_METHODS.build(spec)
    except SpecError as err:
        if "valid NLL methods" in str(err):
            raise
        raise SpecError(f"{err}; NLL methods: {NLL_USAGE}") from err


def describe(method) -> tuple[str, dict[str, Any]]:
    """``(full spec, settings)`` of an NLL method: every setting, defaults included, for the record, except
    those that change how it is computed and not what (``field(metadata={"protocol": False})``: AIS's
    ``record``), so that the protocol of two numbers does not differ by them (``pyro_vae.protocol``)."""
    settings = {f.name: getattr(method, f.name) for f in fields(method) if f.metadata.get("protocol", True)}
    return format_spec(method.spec_name, settings), settings


# -- ELBO --------------------------------------------------------------------------------------------
def elbo_per_example(
    vae, x: torch.Tensor, batch_size: int = 1000, num_samples: int = 1, analytic_kl: bool = True, **data
) -> torch.Tensor:
    """Per-example ELBO at beta = 1, shape ``(N,)``, in nats: see :func:`elbo`."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    x, data = flat_on_device(vae, x), fields_on_device(vae, data)
    with evaluating(vae):
        return torch.cat(
            [
                elbo_particles(vae, xb, num_samples, analytic_kl=analytic_kl, **db).mean(0)
                for xb, db in chunks(x, data, batch_size)
            ]
        )


def elbo(vae, x: torch.Tensor, batch_size: int = 1000, num_samples: int = 1, analytic_kl: bool = True, **data) -> float:
    """Mean ELBO per example over a whole set, at beta = 1, in nats (negative; higher is better).

        ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)) = E_q[log p(x, z) - log q(z|x)].

    With ``analytic_kl`` (the default), every latent site whose (guide, prior) pair has a KL that
    torch registers (``traces.log_weights(..., analytic_kl=True)``) contributes the exact KL and the
    rest is a Monte Carlo average of ``num_samples`` draws: the same expectation, usually with lower
    variance. Other sites (or ``analytic_kl=False``) take the plain Monte Carlo log-weight, which
    works for every family. Both are unbiased for the same
    number. (Near the exact posterior the log-weight is nearly constant and the plain Monte Carlo
    ELBO is the one with less variance; over a test set of thousands the difference is negligible.)
    Enumerated discrete sites (M2's class) are averaged over exactly, weighted by q (``traces.elbo_particles``).
    """
    return float(elbo_per_example(vae, x, batch_size, num_samples, analytic_kl, **data).mean())


# -- latent diagnostics ------------------------------------------------------------------------------
def active_units(
    vae, x: torch.Tensor, threshold: float = ACTIVE_THRESHOLD, batch_size: int = 1000, **data
) -> tuple[int, torch.Tensor]:
    """Burda et al. (2015), Section 5.2: ``(count, variances)`` of the active latent units.

    A unit u is active when A_u = Cov_x(E_{q(z|x)}[u]) > ``threshold`` (0.01): the variance over
    the data of the posterior mean of that dimension. A unit whose posterior mean does not depend
    on x carries no information about x. ``variances`` has shape ``(z_dim,)`` (unbiased, over x).
    ``data``: the fields q(z|x) reads besides x (the ``mask`` of missing data), one row per example.
    """
    x, data = flat_on_device(vae, x), fields_on_device(vae, data)
    if x.shape[0] < 2:
        raise ValueError(f"active units need at least 2 examples to compute a variance, got {x.shape[0]}")
    with evaluating(vae):
        means = torch.cat([posterior_mean(vae.posterior(xb, **db)) for xb, db in chunks(x, data, batch_size)])
    variances = means.double().var(dim=0).to(means.dtype)
    return int((variances > threshold).sum()), variances


def ignore_z_baseline(x: torch.Tensor, fit: torch.Tensor | None = None, eps: float = 1e-6) -> float:
    """Mean log-likelihood (nats per example) of binary ``x`` under independent Bernoulli pixels
    whose probabilities are the pixel means of ``fit`` (default: ``x`` itself), clamped to
    [eps, 1 - eps]:

        (1/N) sum_n sum_d [x_nd log p_d + (1 - x_nd) log(1 - p_d)],   p_d = mean of fit[:, d].

    With ``fit = x`` this is the best that *any* decoder which ignores z can score on ``x`` (the
    maximum-likelihood z-independent Bernoulli model), so a Bernoulli VAE whose reconstruction term
    sits here with KL near 0 has collapsed (docs/families.md). ``fit`` = the training set gives the
    held-out score of that model.
    """
    x = x.reshape(x.shape[0], -1)
    fit = x if fit is None else fit.reshape(fit.shape[0], -1)
    p = fit.double().mean(0).clamp(eps, 1 - eps)
    x = x.double()
    return float((x * p.log() + (1 - x) * (1 - p).log()).sum(-1).mean())


def _factors(d: tdist.Distribution, z_dim: int) -> tdist.Distribution | None:
    """The univariate factors of a distribution that factorizes over z's dimensions, else ``None``."""
    if (
        isinstance(d, tdist.Independent)
        and d.reinterpreted_batch_ndims == 1
        and d.base_dist.event_shape == ()
        and d.base_dist.batch_shape[-1:] in (torch.Size([z_dim]), torch.Size([1]))
    ):
        return d.base_dist
    return None


def _mc_elementwise_kl(q: tdist.Distribution, p: tdist.Distribution, num_samples: int) -> torch.Tensor:
    """E_q[log q(z) - log p(z)] elementwise, by ``num_samples`` draws; shape ``q.batch_shape``."""
    z = q.sample((num_samples,))
    return (q.log_prob(z) - p.log_prob(z)).mean(0)


def kl_per_dimension(vae, x: torch.Tensor, batch_size: int = 1000, num_samples: int = 1000, **data) -> torch.Tensor:
    """Mean over the data of KL(q(z_j|x) || p(z_j)) for each latent dimension j, shape ``(z_dim,)``, nats.

    Defined when q(z|x) and p(z) both factorize over dimensions (diagonal Gaussian guide with the
    normal prior: ``KL_j = 1/2 (sigma_j^2 + mu_j^2 - 1 - log sigma_j^2)``, Kingma & Welling 2014,
    Appendix B); the per-dimension terms then sum to the total KL. Each term is analytic where
    torch registers a KL for the pair of univariate families, else a Monte Carlo average of
    ``num_samples`` draws. For pairs that do not factorize (mixture or VampPrior priors, flow or
    full-covariance guides) the KL has no per-dimension split and a ``ValueError`` says so.
    ``data``: the fields q(z|x) reads besides x (the ``mask`` of missing data), one row per example.
    """
    x, data = flat_on_device(vae, x), fields_on_device(vae, data)
    total = None
    with evaluating(vae):
        p = _factors(vae.prior_distribution(), vae.z_dim)
        for xb, db in chunks(x, data, batch_size):
            q_full = vae.posterior(xb, **db)
            q = _factors(q_full, vae.z_dim)
            if p is None or q is None:
                raise ValueError(
                    f"KL per dimension needs a guide and a prior that factorize over z's dimensions; got "
                    f"guide {getattr(vae.encoder, 'spec', type(vae.encoder).__name__)!r} "
                    f"({type(q_full).__name__}) with prior {getattr(vae.prior, 'spec', type(vae.prior).__name__)!r} "
                    f"({type(vae.prior_distribution()).__name__}); use the total KL instead"
                )
            try:
                kl = tdist.kl_divergence(q, p)
            except NotImplementedError:
                kl = _mc_elementwise_kl(q, p, num_samples)
            kl = kl.expand(xb.shape[0], vae.z_dim).sum(0)
            total = kl if total is None else total + kl
    return total / x.shape[0]


# -- whole datasets and runs -------------------------------------------------------------------------
def _is_binary(dataset, x: torch.Tensor) -> bool:
    flag = getattr(dataset, "is_binary", None)
    return bool(flag) if flag is not None else bool(((x == 0) | (x == 1)).all())


def likelihood_warning(vae, dataset, x: torch.Tensor) -> str | None:
    name = getattr(getattr(vae, "likelihood", None), "spec_name", None)
    if name == "bernoulli" and not _is_binary(dataset, x):
        return (
            f"Bernoulli likelihood on non-binary data ({getattr(dataset, 'name', 'data')}): the ELBO and NLL "
            "are cross-entropies, not a likelihood; use mnist-dynamic or mnist-static for likelihood numbers"
        )
    return None


def evaluate(
    vae,
    dataset,
    nll_samples: int = 5000,
    batch_size: int | None = None,
    split: str = "test",
    progress: bool | None = False,
    subset: int | None = None,
    elbo_samples: int = 1,
    seed: int | None = None,
    nll: Spec | object | None = None,
) -> dict[str, Any]:
    """Every evaluation number of ``vae`` on one split of ``dataset``, as a JSON-ready dict
    (:func:`evaluate_examples` without the per-example numbers)."""
    return evaluate_examples(vae, dataset, nll_samples, batch_size, split, progress, subset, elbo_samples, seed, nll)[0]


def evaluate_examples(
    vae,
    dataset,
    nll_samples: int = 5000,
    batch_size: int | None = None,
    split: str = "test",
    progress: bool | None = False,
    subset: int | None = None,
    elbo_samples: int = 1,
    seed: int | None = None,
    nll: Spec | object | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(result, examples)``: the evaluation of ``vae`` on one split and its numbers per example.

    The log-likelihood is estimated by the method ``nll`` names (:data:`NLL_METHODS`: ``"is(samples=K)"``
    or ``"ais(steps=T, ...)"``); without it by importance sampling with ``nll_samples`` samples, and
    not at all when ``nll_samples`` is 0.

    ``result`` keys (``{split}`` is ``test`` by default, giving the public contract's names):

    - ``{split}_elbo``: mean ELBO (nats, negative), see :func:`elbo`;
    - ``{split}_nll``: mean of -log p-hat(x) by the NLL method (nats, positive); ``None`` when
      ``nll_samples`` is 0 and no method is given (skipped), as are the next ones;
    - ``{split}_nll_se``: Monte Carlo standard error of that mean, sqrt(sum_i se_i^2) / N with the
      jackknife se_i (:func:`jackknife_se`): how far the number may move with other importance samples
      of the same examples; ``{split}_nll_se_delta`` the same with the delta method's se_i;
    - ``{split}_nll_data_se``: sd_i(-log p-hat(x_i)) / sqrt(N): the sampling error of the mean over
      examples as an estimate of the expected NLL of the data distribution (usually far larger);
    - ``{split}_ess_median``, ``{split}_ess_min``: the effective sample size of the importance weights
      over examples (:func:`effective_sample_size`), with a ``warning`` when the median is below
      :data:`LOW_ESS` and below K/10;
    - ``bits_per_dim``: NLL / (D ln 2), D the values the model scores (``Structure.observed_dim``:
      all of x, or a conditional model's predicted pixels);
    - ``active_units`` (threshold 0.01), ``kl_per_dim`` (list, or ``None`` with ``kl_per_dim_error``
      for pairs that do not factorize);
    - ``{split}_{name}`` for each of the structure's own metrics (``Structure.metrics``: M2's
      ``accuracy``), the mean over the split's examples;
    - ``nll_method`` (the method's full spec, every setting included, or ``None``) and ``nll_settings``
      (the same as a dict); ``nll_samples`` (K of importance sampling, else ``None``); the method's own
      numbers (AIS: ``ais_acceptance_rate``, ...);
    - ``num_examples``, ``x_dim``, ``split``, ``data_variant`` (``dataset.name``), ``seconds``,
      ``protocol`` (``pyro_vae.protocol.describe``: data, examples, estimator, weights, versions), and
      ``warning`` (when the numbers are not likelihoods, or the weights are degenerate).

    ``examples`` holds, row for row over the evaluated examples, ``elbo`` and, when the NLL is computed,
    ``log_px``, ``log_px_se`` (jackknife) and ``ess`` (float64 arrays), for paired comparisons
    (``pyro_vae.protocol``). ``seed`` is only recorded (the caller seeds). The fields the structure
    consumes (``vae.consumes``) come from ``dataset.fields`` (``pyro_vae.fields``).
    """
    method = nll_method(nll if nll is not None else f"is(samples={nll_samples})") if nll or nll_samples else None
    x, labels, data = split_rows(vae, dataset, split, subset)
    start = time.perf_counter()
    batch = batch_size or min(x.shape[0], DEFAULT_BATCH_SIZE)
    result, examples = _elbo_and_metrics(vae, dataset, split, x, labels, data, batch, elbo_samples)
    warnings_ = [w for w in (likelihood_warning(vae, dataset, x),) if w]
    result.update(dict.fromkeys((f"{split}_nll", f"{split}_nll_se", f"{split}_nll_data_se", "bits_per_dim")))
    result.update(nll_method=None, nll_settings=None, nll_samples=0)
    nll_protocol: dict[str, Any] = {}
    if method is not None:
        nll_result, nll_examples, warning = _log_likelihood_part(method, vae, x, split, batch_size, progress, data)
        result.update(nll_result)
        examples.update(nll_examples)
        warnings_ += [warning] if warning else []
        nll_protocol = {"method": method.spec_name, **result["nll_settings"], "se": "jackknife"}
    result.update(latent_diagnostics(vae, x, batch, **data))
    result["seconds"] = time.perf_counter() - start
    result["protocol"] = protocol.describe(vae, dataset, split, x, subset, nll_protocol, elbo_samples, seed)
    if warnings_:
        result["warning"] = "; ".join(warnings_)
    return result, examples


def _elbo_and_metrics(vae, dataset, split: str, x, labels, data: dict, batch: int, elbo_samples: int):
    """What :func:`evaluate_examples` reports before the NLL: the data, the mean ELBO and the structure's metrics,
    with the per-example ELBOs."""
    n = x.shape[0]
    elbos = elbo_per_example(vae, x, batch_size=batch, num_samples=elbo_samples, **data)
    result: dict[str, Any] = {
        "data_variant": getattr(dataset, "name", None),
        "split": split,
        "num_examples": n,
        "x_dim": x.shape[1],
        f"{split}_elbo": float(elbos.mean()),
    }
    with evaluating(vae):
        totals = metric_sums(vae, x, None if labels is None else labels.to(x.device), data, batch)
    result.update({f"{split}_{name}": float(total) / n for name, total in totals.items()})
    return result, {"elbo": elbos.double().cpu().numpy()}


def _log_likelihood_part(
    method, vae, x: torch.Tensor, split: str, batch_size: int | None, progress: bool | None, data: dict
) -> tuple[dict[str, Any], dict[str, np.ndarray], str | None]:
    """The NLL numbers of :func:`evaluate_examples` by ``method``: the summary keys, the per-example arrays, and
    a warning when the weights are degenerate (``None`` otherwise)."""
    spec, settings = describe(method)
    result: dict[str, Any] = {
        "nll_method": spec,
        "nll_settings": settings,
        "nll_samples": getattr(method, "samples", None),
    }
    estimate, extra = method.estimate(vae, x, batch_size=batch_size, progress=progress, **data)
    result.update(_nll_summary(estimate, split, _observed_dim(vae, x, data)))
    result.update(extra)
    return result, _nll_examples(estimate), _ess_warning(estimate, _draws(method))


def split_rows(vae, dataset, split: str, subset: int | None):
    """``(x, labels, fields)`` of a split (``subset`` evenly spaced rows of it: ``data.spread_rows``), x flat on
    the model's device."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}; valid splits: train, val, test")
    x = getattr(dataset, split)
    if x is None or x.shape[0] == 0:
        raise ValueError(f"dataset {getattr(dataset, 'name', '?')!r} has no {split} examples")
    data = split_fields(dataset, split, getattr(vae, "consumes", ()))
    labels = getattr(dataset, f"{split}_labels", None)
    rows = spread_rows(x.shape[0], subset)
    x, labels = x[rows], None if labels is None else labels[rows]
    data = {name: value[rows] for name, value in data.items()}
    return flat_on_device(vae, x), labels, fields_on_device(vae, data)


def _nll_summary(estimate: ImportanceEstimate, split: str, observed_dim: float) -> dict[str, Any]:
    """The dataset-level NLL numbers of :func:`evaluate_examples` from the per-example estimate."""
    nll, n = -estimate.log_px.double(), estimate.log_px.numel()

    def combined(se: torch.Tensor) -> float | None:  # nan for K = 1: no Monte Carlo error to report
        value = float(se.double().square().sum().sqrt() / n)
        return None if math.isnan(value) else value

    return {
        f"{split}_nll": float(nll.mean()),
        f"{split}_nll_se": combined(estimate.se),
        f"{split}_nll_se_delta": combined(estimate.se_delta),
        f"{split}_nll_data_se": float(nll.std() / math.sqrt(n)) if n > 1 else None,
        f"{split}_ess_median": float(estimate.ess.double().median()),
        f"{split}_ess_min": float(estimate.ess.min()),
        "bits_per_dim": bits_per_dim(float(nll.mean()), observed_dim),
    }


def _nll_examples(estimate: ImportanceEstimate) -> dict[str, np.ndarray]:
    return {
        "log_px": estimate.log_px.double().cpu().numpy(),
        "log_px_se": estimate.se.double().cpu().numpy(),
        "ess": estimate.ess.double().cpu().numpy(),
    }


def _draws(method) -> int:
    """The i.i.d. weights per example an NLL method averages: importance samples, or AIS chains."""
    return getattr(method, "samples", None) or method.chains


def _ess_warning(estimate: ImportanceEstimate, num_samples: int) -> str | None:
    median = float(estimate.ess.double().median())
    if median >= min(LOW_ESS, num_samples / 10):  # few samples asked for knowingly are not degenerate weights
        return None
    return (
        f"the median effective sample size of the importance weights is {median:.1f} of K = {num_samples}: "
        "the estimate is biased low (by about half its squared SE) and its SE is rough; raise the number of samples"
    )


def _observed_dim(vae, x: torch.Tensor, data: dict[str, torch.Tensor]) -> float:
    """The values per example the NLL scores: all of x, or what the structure says (a CVAE: the predicted pixels)."""
    return vae.observed_dim(x, **data) if hasattr(vae, "observed_dim") else float(x.shape[1])


def latent_diagnostics(vae, x: torch.Tensor, batch_size: int, **data) -> dict[str, Any]:
    """``active_units`` (with ``active_unit_variances``) and ``kl_per_dim`` of a model with one latent z.

    Both read the plain VAE's q(z|x) and p(z) (``vae.posterior``, ``vae.prior_distribution``); a
    structure without them gets ``None`` for each and ``kl_per_dim_error`` saying why. ``data`` are
    the consumed fields, which q(z|x) reads too (MIWAE's ``mask``: q(z|x_obs)).
    """
    if not all(hasattr(vae, name) for name in ("posterior", "prior_distribution")):
        structure = type(getattr(vae, "structure", vae)).__name__
        why = f"active units and KL per dimension read one latent z (structure 'vae'), not {structure}'s sites"
        return {"active_units": None, "kl_per_dim": None, "kl_per_dim_error": why}
    result: dict[str, Any] = {}
    if x.shape[0] > 1:
        count, variances = active_units(vae, x, batch_size=batch_size, **data)
        result["active_units"] = count
        result["active_unit_variances"] = variances.tolist()
    try:
        result["kl_per_dim"] = kl_per_dimension(vae, x, batch_size=batch_size, **data).tolist()
    except ValueError as err:
        result["kl_per_dim"] = None
        result["kl_per_dim_error"] = str(err)
    return result


def bits_per_dim(nll: float, x_dim: float) -> float:
    """NLL in nats per example -> bits per dimension: NLL / (D ln 2)."""
    return nll / (x_dim * math.log(2))


def evaluate_run(
    run_dir: str | Path,
    nll_samples: int = 5000,
    device: str = "auto",
    data_dir: str | Path | None = None,
    split: str = "test",
    subset: int | None = None,
    seed: int | None = 0,
    progress: bool | None = None,
    save: bool = False,
    nll: Spec | object | None = None,
) -> dict[str, Any]:
    """:func:`evaluate` on a run folder's model and dataset (``pyro_vae.runs.load_run``); ``nll`` as there.

    ``seed`` (default 0) seeds torch and Pyro first so that two evaluations of one run give the
    same numbers; ``None`` leaves the global RNG alone. ``subset`` keeps N evenly spaced examples. With
    ``save``, the result replaces the run's ``evaluation.json`` and its per-example numbers its
    ``evaluation.npz`` (``pyro_vae.protocol.save``), for ``pyro-vae compare-runs``.
    """
    from pyro_vae.protocol import save as save_evaluation
    from pyro_vae.runs import load_run  # train -> runs -> evaluate would otherwise be circular

    method = nll_method(nll) if nll is not None else None  # a bad spec fails before the run is loaded
    if seed is not None:
        import pyro

        pyro.set_rng_seed(seed)
    run = load_run(run_dir, device=device, data_dir=data_dir)
    result, examples = evaluate_examples(
        run.vae,
        run.dataset,
        nll_samples=nll_samples,
        split=split,
        progress=progress,
        subset=subset,
        seed=seed,
        nll=method,
    )
    result["weights"] = run.checkpoint
    result["run"] = str(run_dir)
    if save:
        save_evaluation(Path(run_dir), result, examples)
    return result
