"""Estimator comparison: bound, its spread, gradient variance and signal-to-noise, time and memory.

For each estimator spec, ``compare`` evaluates ``loss`` + ``backward`` and ``bound`` ``repeats``
times on one fixed batch x (fresh Monte Carlo draws each time, the same parameters) and reports:

- ``bound_mean``: the mean over repeats of the batch-mean bound, nats per example (``bound_name``
  says which bound: ELBO, IWAE bound with k draws, ...);
- ``bound_se``: the standard error of ``bound_mean`` (std over repeats of the batch mean / sqrt(R));
- ``bound_var``: the variance of one per-example estimate (variance over repeats for each example,
  averaged over the examples), nats^2;
- ``grad_var`` and ``grad_snr`` (with ``grad_snr_se``), per parameter group (``encoder``,
  ``decoder``, ``prior``, ``likelihood``: the VAE's submodules that have trainable parameters).
  Per scalar parameter p: var_p = Var_R(g_p) (unbiased), SNR_p = |mean_R(g_p)| / std_R(g_p)
  (Rainforth et al. 2018, eq. 6). A group reports the mean of var_p and one aggregate of the SNR
  (``snr_aggregate``; every aggregate is in ``grad_snr_by_aggregate``, see :func:`snr_statistics`):
  the ``mean`` of SNR_p over its parameters (the default), their ``median``, their bias-corrected
  root mean square ``rms``, or ``norm``, the bias-corrected SNR of the group's gradient vector.
  Parameters whose gradient does not vary over the repeats (std 0) have no SNR_p.
- the gradient is one of two protocols (``protocol``):

  * ``batch_mean`` (the default): g is the gradient of the batch-mean bound (1/B) sum_n L(x_n),
    the quantity a training step uses; the SE of each SNR aggregate is a delete-a-group jackknife
    over the repeats (:func:`_jackknife_snr`);
  * ``per_example``: the protocol of Rainforth et al. (2018), whose Theorem 1 is per datapoint:
    for each example x_n on its own, R draws of the gradient of L(x_n); each example's SNR
    aggregate (``grad_snr_examples``), then the mean over the examples with the SE
    std_n / sqrt(N). Averaging B examples' gradients before taking the SNR mixes examples whose
    signals point different ways and whose noise differs by orders of magnitude;
- ``k``, ``ess`` and ``weight_moment_ratio`` for importance-weighted estimators: the mean effective
  sample size (sum w)^2 / sum w^2 of one draw's k weights, and per example E[w^2] / E[w]^2 pooled
  over all R x k weights. The asymptotic rates in k (SNR ~ k^-1/2 for IWAE's inference network,
  k^1/2 for its generative network and for DReG's inference network) hold once k is well beyond
  E[w^2] / E[w]^2;
- ``ms_per_eval``: the median wall time of one ``loss`` + ``backward`` (of the whole batch, or of one
  example with ``per_example``; milliseconds; CUDA is synchronized around it);
- ``peak_mem_mb``: on CUDA, ``torch.cuda.max_memory_allocated`` during one loss + backward minus
  the memory allocated before it; on CPU, the memory of the tensors autograd saves for the backward
  pass (distinct storages, through ``torch.autograd.graph.saved_tensors_hooks``) — the activation
  memory that dominates an estimator's footprint. ``peak_mem_kind`` says which; JIT-compiled
  estimators save tensors inside the compiled graph, so on CPU their number is a lower bound.
  With ``chunk`` (the batch evaluated ``chunk`` examples at a time, gradients summed: exact, since
  the bound is a sum over examples) it is the memory of one chunk.

``snr_slopes`` fits the log-log slope of SNR against k with its SE. ``compare_run`` does all this
on a trained run folder's test batch (or its untrained model, ``weights="initial"``) and writes
``compare.md``, ``compare.csv``, ``compare.json`` and ``compare.png`` (bound with error bars;
gradient SNR vs k, ±2 SE, with reference slopes ±1/2, for the estimators that take ``k``).

References: T. Rainforth, A. Kosiorek, T. A. Le, C. Maddison, M. Igl, F. Wood, Y. W. Teh, "Tighter
variational bounds are not necessarily better", ICML 2018. G. Tucker, D. Lawson, S. Gu, C. Maddison,
"Doubly reparameterized gradient estimators for Monte Carlo objectives", ICLR 2019.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyro
import torch

from pyro_vae import estimators as estimators_module
from pyro_vae.specs import parse_spec
from pyro_vae.traces import log_weights

GROUPS = ("encoder", "decoder", "prior", "likelihood")
SNR_AGGREGATES = ("mean", "median", "rms", "norm")
JACKKNIFE_GROUPS = 20
OUTPUT_FILES = ("compare.md", "compare.csv", "compare.json", "compare.png")


def parameter_groups(vae) -> dict[str, list[torch.nn.Parameter]]:
    """Trainable parameters by submodule (encoder, decoder, prior, likelihood); empty groups are left out."""
    groups = {}
    for name in GROUPS:
        module = getattr(vae, name, None)
        params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
        if params:
            groups[name] = params
    return groups


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory_mb(estimator, vae, x: torch.Tensor) -> tuple[float, str]:
    """Memory of one loss + backward (see the module docstring for what it means on CPU and CUDA)."""
    if x.device.type == "cuda":
        _sync(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        before = torch.cuda.memory_allocated(x.device)
        estimator.loss(vae, x).backward()
        _sync(x.device)
        return (torch.cuda.max_memory_allocated(x.device) - before) / 2**20, "cuda_max_allocated"
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = estimator.loss(vae, x)
    loss.backward()
    return sum(storages.values()) / 2**20, "cpu_saved_for_backward"


def _group_stats(samples: torch.Tensor) -> tuple[float, float]:
    """(mean var_p, mean SNR_p) over the columns of ``samples`` (repeats, parameters)."""
    mean, std = samples.mean(0), samples.std(0, unbiased=True)
    live = std > 0
    snr = (mean[live].abs() / std[live]).mean().item() if live.any() else float("nan")
    return std.square().mean().item(), snr


# -- the signal-to-noise ratio of a group's gradient ----------------------------------------------
def _median(values: torch.Tensor) -> float:
    """The median, the mean of the two middle values for an even count."""
    ordered = values.sort().values
    n = ordered.numel()
    return ((ordered[(n - 1) // 2] + ordered[n // 2]) / 2).item()


def _aggregate_snr(mean: torch.Tensor, var: torch.Tensor, repeats: int, live: torch.Tensor) -> dict[str, float | None]:
    """The SNR aggregates (see :func:`snr_statistics`) from per-parameter means and variances over ``repeats`` draws.

    ``live`` marks the parameters whose draws vary (std > 0); the others have no per-parameter SNR.
    ``rms`` is None with fewer than 4 draws (its bias correction needs R > 3).
    """
    if not bool(live.any()):
        return dict.fromkeys(SNR_AGGREGATES, float("nan"))
    per_parameter = mean[live].abs() / var[live].sqrt()
    # E[m^2 / s^2] = (SNR^2 + 1/R) (R - 1) / (R - 3) for Gaussian draws (m and s^2 independent)
    squared = per_parameter.square() * (repeats - 3) / (repeats - 1) - 1 / repeats if repeats > 3 else None
    total = var.clamp(min=0).sum()
    signal = mean.square().sum() - total / repeats  # unbiased for ||E g||^2: E||mean||^2 = ||E g||^2 + tr Cov / R
    return {
        "mean": per_parameter.mean().item(),
        "median": _median(per_parameter),
        "rms": math.sqrt(max(squared.mean().item(), 0.0)) if squared is not None else None,
        "norm": math.sqrt(max(signal.item(), 0.0) / total.item()),
    }


def snr_statistics(samples: torch.Tensor) -> dict[str, float]:
    """The gradient SNR of one parameter group from R independent draws, ``samples`` of shape (R, P).

    Per scalar parameter p, with the sample mean m_p and the unbiased sample variance s_p^2 over the
    R draws, SNR_p = |m_p| / s_p (Rainforth et al. 2018, eq. 6: |E[g_p]| / sd[g_p], one number per
    parameter). Parameters whose draws do not vary (s_p = 0: a parameter the loss does not touch,
    such as a first-layer weight of a pixel that is 0 in every example used) have no SNR and are left
    out. Aggregates over the group:

    - ``mean``: the mean of SNR_p over the parameters (what ``compare`` has always reported);
    - ``median``: their median, which a few parameters with a large SNR cannot move;
    - ``rms``: the root mean square of SNR_p over the parameters, each SNR_p^2 corrected for its
      bias, sqrt(mean_p [(R - 3) / (R - 1) m_p^2 / s_p^2 - 1 / R]) (exact for Gaussian draws:
      E[m^2 / s^2] = (SNR^2 + 1/R)(R - 1)/(R - 3)), set to 0 when the mean is negative;
    - ``norm``: the SNR of the gradient as a vector, ||E g|| / sqrt(E||g - E g||^2), with
      ||E g||^2 estimated without bias by ||m||^2 - sum_p s_p^2 / R (E||m||^2 = ||E g||^2 + tr Cov / R)
      and set to 0 when that is negative. It is dominated by the parameters with the largest variance.

    ``mean`` and ``median`` are averages of |m_p| / s_p, which has an upward bias when the SNR is
    small: a parameter whose true mean is 0 shows |m_p| / s_p of about sqrt(2 / (pi R)) (0.080 at
    R = 100), a floor under which a falling SNR cannot be followed. ``rms`` and ``norm`` remove the
    bias of the squares (their estimates are noisier where the SNR is below 1 / sqrt(R)).
    """
    mean, var = _moments(samples)
    return _aggregate_snr(mean, var, samples.shape[0], var > 0)


def _moments(samples: torch.Tensor, block: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and unbiased variance of ``samples`` (R, P) in float64 (two passes over blocks of
    ``block`` columns, which stay in cache)."""
    mean = torch.empty(samples.shape[1], dtype=torch.float64, device=samples.device)
    var = torch.empty_like(mean)
    for start in range(0, samples.shape[1], block):
        piece = samples[:, start : start + block].double()
        m = piece.mean(0)
        mean[start : start + block] = m
        var[start : start + block] = (piece - m).square_().sum(0) / (samples.shape[0] - 1)
    return mean, var


def _jackknife_snr(samples: torch.Tensor, groups: int = JACKKNIFE_GROUPS) -> dict[str, tuple[float, float]]:
    """Each SNR aggregate of ``samples`` (R, P) and its delete-a-group jackknife standard error.

    The R draws are dealt into G = min(groups, R) groups (draw r into group r mod G); each group in
    turn is left out and the aggregate recomputed from the rest; SE^2 = (G - 1) / G sum_g (a_(-g) - a_bar)^2
    (Efron & Tibshirani 1993, ch. 11). The left-out statistics come from per-group sums, one pass
    over the draws. The SE is NaN with fewer than 4 draws.
    """
    repeats = samples.shape[0]
    mean, var = _moments(samples)
    live = var > 0
    estimate = _aggregate_snr(mean, var, repeats, live)
    count = min(groups, repeats)
    if repeats < 4:
        return {name: (value, None) for name, value in estimate.items()}
    ids = torch.arange(repeats, device=samples.device) % count
    sums = torch.zeros(count, samples.shape[1], dtype=torch.float64, device=samples.device)
    squares = torch.zeros_like(sums)
    for start in range(0, samples.shape[1], 4096):
        piece = samples[:, start : start + 4096].double()
        sums[:, start : start + 4096].index_add_(0, ids, piece)
        squares[:, start : start + 4096].index_add_(0, ids, piece.square())
    sizes = torch.bincount(ids, minlength=count)
    total, total_squares = sums.sum(0), squares.sum(0)
    left_out: dict[str, list[float | None]] = {name: [] for name in SNR_AGGREGATES}
    for g in range(count):
        n = repeats - int(sizes[g])
        m = (total - sums[g]) / n
        v = ((total_squares - squares[g]) - n * m.square()).clamp(min=0) / (n - 1)
        for name, value in _aggregate_snr(m, v, n, live & (v > 0)).items():
            left_out[name].append(value)
    result: dict[str, tuple[float | None, float | None]] = {}
    for name, value in estimate.items():
        if value is None or any(v is None for v in left_out[name]):
            result[name] = (value, None)
            continue
        values = torch.tensor(left_out[name], dtype=torch.float64)
        se = math.sqrt((count - 1) / count * (values - values.mean()).square().sum().item())
        result[name] = (value, se)
    return result


def _chunks(x: torch.Tensor, chunk: int | None) -> list[torch.Tensor]:
    return [x] if chunk is None or chunk >= x.shape[0] else list(x.split(chunk))


def _draw(estimator, vae, x: torch.Tensor, repeats: int, groups, chunk: int | None, progress) -> dict[str, Any]:
    """``repeats`` independent draws of the gradient of the batch-mean bound on ``x`` (fresh Monte Carlo
    draws, the same parameters), with the per-example bound and, for importance-weighted estimators,
    the effective sample size of each draw's k weights. ``chunk`` examples at a time (gradients add up)."""
    batch = x.shape[0]
    pieces = _chunks(x, chunk)
    weighted = isinstance(estimator, estimators_module.ImportanceWeighted)
    # One evaluation outside the measurement: JIT compilation, the score-function baseline's start.
    vae.zero_grad(set_to_none=True)
    estimator.loss(vae, pieces[0]).backward()
    grads = {
        name: torch.empty(repeats, sum(p.numel() for p in params), dtype=params[0].dtype, device=x.device)
        for name, params in groups.items()
    }
    bounds, ess, times, pooled = [], [], [], []
    for r in range(repeats):
        vae.zero_grad(set_to_none=True)
        _sync(x.device)
        start = time.perf_counter()
        for piece in pieces:
            (estimator.loss(vae, piece) / batch).backward()  # the gradient of minus the batch-mean bound
        _sync(x.device)
        times.append(time.perf_counter() - start)
        for name, params in groups.items():
            flat = [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]
            torch.cat(flat, out=grads[name][r]).neg_()
        with torch.no_grad():
            if weighted:
                log_w = torch.cat([log_weights(vae, piece, estimator.k) for piece in pieces], 1)  # (k, batch)
                bounds.append(estimator.aggregate(log_w).detach())
                ess.append((2 * log_w.logsumexp(0) - (2 * log_w).logsumexp(0)).exp())
                pooled.append(torch.stack([log_w.logsumexp(0), (2 * log_w).logsumexp(0)]).double())
            else:
                bounds.append(torch.cat([estimator.bound(vae, piece).detach() for piece in pieces]))
        if progress is not None:
            progress.update(1)
    vae.zero_grad(set_to_none=True)
    rho = None
    if weighted:  # E[w^2] / E[w]^2 per example from all repeats x k weights: count * sum w^2 / (sum w)^2
        sums = torch.stack(pooled).logsumexp(0)  # (2, batch): log sum w, log sum w^2
        rho = (math.log(repeats * estimator.k) + sums[1] - 2 * sums[0]).exp()
    return {
        "grads": grads,
        "rho": rho,
        "bounds": torch.stack(bounds).double(),  # (repeats, batch)
        "ess": torch.stack(ess).double() if weighted else None,
        "times": times,
        "k": estimator.k if weighted else None,
    }


def _bound_stats(bounds: torch.Tensor) -> dict[str, float]:
    repeats = bounds.shape[0]
    batch_means = bounds.mean(1)
    return {
        "bound_mean": batch_means.mean().item(),
        "bound_se": (batch_means.std(unbiased=True) / math.sqrt(repeats)).item(),
        "bound_var": bounds.var(0, unbiased=True).mean().item(),
    }


def _over_examples(values: list[float | None]) -> tuple[float, float | None]:
    """Mean over the examples (those with a finite value) and its standard error std / sqrt(N) (None for one)."""
    t = torch.tensor([v for v in values if v is not None], dtype=torch.float64)
    t = t[torch.isfinite(t)]
    if t.numel() == 0:
        return float("nan"), None
    se = (t.std(unbiased=True) / math.sqrt(t.numel())).item() if t.numel() > 1 else None
    return t.mean().item(), se


def _check_measure_args(repeats: int, snr_aggregate: str, chunk: int | None) -> None:
    """One-line ``ValueError`` for settings :func:`measure` cannot work with."""
    if repeats < 2:
        raise ValueError(f"repeats must be at least 2 for standard errors and variances, got {repeats}")
    if snr_aggregate not in SNR_AGGREGATES:
        raise ValueError(f"snr_aggregate must be one of {', '.join(SNR_AGGREGATES)}, got {snr_aggregate!r}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be a positive number of examples, got {chunk}")
    if snr_aggregate == "rms" and repeats < 4:
        raise ValueError(f"snr_aggregate 'rms' needs at least 4 repeats for its bias correction, got {repeats}")


def _per_example_draws(estimator, vae, x, repeats, groups, chunk, progress) -> dict[str, Any]:
    """The per-example protocol: each example's own R gradient draws, its SNR aggregates, then the mean over the
    examples with its SE (:func:`_over_examples`)."""
    bounds, ess, times, rho = [], [], [], []
    examples: dict[str, dict[str, list[float]]] = {name: {g: [] for g in groups} for name in SNR_AGGREGATES}
    variances: dict[str, list[float]] = {g: [] for g in groups}
    for n in range(x.shape[0]):
        drawn = _draw(estimator, vae, x[n : n + 1], repeats, groups, None, progress)
        bounds.append(drawn["bounds"])
        times += drawn["times"]
        if drawn["ess"] is not None:
            ess.append(drawn["ess"])
            rho.append(drawn["rho"])
        for g, samples in drawn.pop("grads").items():
            mean, var = _moments(samples)
            for name, value in _aggregate_snr(mean, var, repeats, var > 0).items():
                examples[name][g].append(value)
            variances[g].append(var.mean().item())
    by_aggregate = {
        name: {g: dict(zip(("snr", "se"), _over_examples(examples[name][g]), strict=True)) for g in groups}
        for name in SNR_AGGREGATES
    }
    return {
        "by_aggregate": by_aggregate,
        "grad_var": {g: _over_examples(v)[0] for g, v in variances.items()},
        "bounds": torch.cat(bounds, 1),
        "ess": torch.cat(ess, 1) if ess else None,
        "rho": torch.cat(rho) if rho else None,
        "times": times,
        "extra": {"grad_snr_examples": examples},
    }


def _batch_mean_draws(estimator, vae, x, repeats, groups, chunk, progress) -> dict[str, Any]:
    """The batch-mean protocol: R draws of the gradient of the batch-mean bound, each SNR aggregate with its
    jackknife SE over the repeats (:func:`_jackknife_snr`)."""
    drawn = _draw(estimator, vae, x, repeats, groups, chunk, progress)
    by_aggregate: dict[str, dict[str, dict[str, float]]] = {name: {} for name in SNR_AGGREGATES}
    grad_var: dict[str, float] = {}
    for g, samples in drawn.pop("grads").items():
        for name, (value, se) in _jackknife_snr(samples).items():
            by_aggregate[name][g] = {"snr": value, "se": se}
        grad_var[g] = _moments(samples)[1].mean().item()
        del samples
    return {**drawn, "by_aggregate": by_aggregate, "grad_var": grad_var, "extra": {}}


def measure(
    estimator,
    vae,
    x: torch.Tensor,
    repeats: int,
    progress=None,
    *,
    per_example: bool = False,
    snr_aggregate: str = "mean",
    chunk: int | None = None,
) -> dict[str, Any]:
    """The statistics of one estimator on one batch (see the module docstring); ``progress`` is a tqdm bar or None.

    ``per_example=False`` (the batch-mean protocol): R draws of the gradient of the batch-mean bound;
    each SNR aggregate with its jackknife SE over the repeats (:func:`_jackknife_snr`).
    ``per_example=True`` (the protocol of Rainforth et al. 2018): for each example x_n on its own,
    R draws of the gradient of its bound; the SNR aggregate of each example, then their mean over the
    examples with the SE std_n / sqrt(N) (which holds the Monte Carlo error and the spread between
    examples). ``snr_aggregate`` picks the aggregate reported as ``grad_snr``; all of them are in
    ``grad_snr_by_aggregate``.
    """
    _check_measure_args(repeats, snr_aggregate, chunk)
    groups = parameter_groups(vae)
    batch = x.shape[0]
    drawn = (_per_example_draws if per_example else _batch_mean_draws)(
        estimator, vae, x, repeats, groups, chunk, progress
    )
    by_aggregate, grad_var, extra = drawn["by_aggregate"], drawn["grad_var"], drawn["extra"]
    bound_draws, ess_draws, times, rho_examples = drawn["bounds"], drawn["ess"], drawn["times"], drawn["rho"]
    memory_x = x[:1] if per_example else _chunks(x, chunk)[0]
    memory, memory_kind = _memory_mb(estimator, vae, memory_x)
    vae.zero_grad(set_to_none=True)
    k = getattr(estimator, "k", None) if isinstance(estimator, estimators_module.ImportanceWeighted) else None
    return {
        "bound_name": estimator.bound_name,
        **_bound_stats(bound_draws),
        "grad_var": grad_var,
        "grad_snr": {g: v["snr"] for g, v in by_aggregate[snr_aggregate].items()},
        "grad_snr_se": {g: v["se"] for g, v in by_aggregate[snr_aggregate].items()},
        "grad_snr_by_aggregate": by_aggregate,
        "snr_aggregate": snr_aggregate,
        "protocol": "per_example" if per_example else "batch_mean",
        "k": k,
        # the effective sample size (sum w)^2 / sum w^2 of one draw's k weights, mean over draws and examples
        "ess": ess_draws.mean().item() if ess_draws is not None else None,
        # E[w^2] / E[w]^2 per example, pooled over the repeats x k weights: the asymptotic rates in k
        # (Rainforth et al. 2018) need k well beyond it; heavy-tailed weights make it an underestimate
        "weight_moment_ratio": rho_examples.tolist() if rho_examples is not None else None,
        "ms_per_eval": 1000 * statistics.median(times),
        "peak_mem_mb": memory,
        "peak_mem_kind": memory_kind,
        "repeats": repeats,
        "batch": batch,
        "chunk": chunk if not per_example else 1,
        **extra,
    }


def _progress_bar(total: int, enabled: bool | None):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="compare", unit="eval", file=sys.stderr)


def compare(
    vae,
    x: torch.Tensor,
    estimators: Sequence[str],
    repeats: int = 20,
    seed: int | None = 0,
    progress: bool | None = None,
    *,
    per_example: bool = False,
    snr_aggregate: str = "mean",
    chunk: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Compare estimators on ``vae`` and the batch ``x``: one result per spec, keyed by the spec as given.

    Every spec is built first, so a typo fails before any computation. ``seed`` fixes Pyro's RNG
    (torch, random, numpy). A progress bar over estimators x repeats (x examples with
    ``per_example``) is shown on a terminal (``progress=None``) or when asked. ``per_example``,
    ``snr_aggregate`` and ``chunk``: see :func:`measure` and the module docstring.
    """
    if isinstance(estimators, str):
        raise TypeError("estimators must be a list of specs; split a comma-separated string with specs.split_specs")
    if len(set(estimators)) != len(estimators):
        raise ValueError(f"duplicate estimator specs in {list(estimators)}")
    if snr_aggregate not in SNR_AGGREGATES:
        raise ValueError(f"snr_aggregate must be one of {', '.join(SNR_AGGREGATES)}, got {snr_aggregate!r}")
    built = {spec: estimators_module.get(spec) for spec in estimators}
    device = next(vae.parameters()).device
    x = x.to(device).reshape(x.shape[0], -1)
    if seed is not None:
        pyro.set_rng_seed(seed)
    bar = _progress_bar(len(built) * repeats * (x.shape[0] if per_example else 1), progress)
    try:
        results = {}
        for spec, estimator in built.items():
            if bar is not None:
                bar.set_postfix_str(spec)
            results[spec] = measure(
                estimator, vae, x, repeats, bar, per_example=per_example, snr_aggregate=snr_aggregate, chunk=chunk
            )
    finally:
        if bar is not None:
            bar.close()
    return results


# -- reports ----------------------------------------------------------------------------------------
COLUMNS = ("bound_mean", "bound_se", "bound_var", "ms_per_eval", "peak_mem_mb")


def _groups_in(results: dict[str, dict[str, Any]]) -> list[str]:
    present = {g for r in results.values() for g in r["grad_snr"]}
    return [g for g in GROUPS if g in present]


def flat_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat dict per estimator (``grad_snr_encoder``, ...), the rows of ``compare.csv``."""
    rows = []
    for spec, r in results.items():
        row = {"estimator": spec, "bound_name": r["bound_name"], **{c: r[c] for c in COLUMNS}}
        for g in _groups_in(results):
            row[f"grad_var_{g}"] = r["grad_var"].get(g, float("nan"))
            row[f"grad_snr_{g}"] = r["grad_snr"].get(g, float("nan"))
            row[f"grad_snr_se_{g}"] = r["grad_snr_se"].get(g)
        for key in ("snr_aggregate", "protocol", "k", "ess", "repeats", "batch", "peak_mem_kind"):
            row[key] = r.get(key)
        rows.append(row)
    return rows


def _pm(value: float, se: float | None, digits: int = 3) -> str:
    return f"{value:.{digits}g}" if se is None else f"{value:.{digits}g} ± {se:.2g}"


PROTOCOLS = {
    "batch_mean": "the gradient of the batch-mean bound; SNR SE: delete-a-group jackknife over the repeats",
    "per_example": (
        "each example's own gradient, its SNR averaged over the examples; SNR SE: std over examples / sqrt(N)"
    ),
}


def markdown_table(results: dict[str, dict[str, Any]], slope_k_min: int = 10) -> str:
    """The comparison as a Markdown table (nats per example; SNR ± SE and variance per parameter group),
    followed by the log-log slopes of SNR against k over k >= ``slope_k_min`` (:func:`snr_slopes`)."""
    groups = _groups_in(results)
    with_ess = any(r.get("ess") is not None for r in results.values())
    header = ["estimator", "bound", "mean ± SE (nats)", "var of one", "ms/eval", "mem (MB)"]
    header += ["ESS"] if with_ess else []
    header += [f"SNR {g}" for g in groups] + [f"grad var {g}" for g in groups]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for spec, r in results.items():
        cells = [
            f"`{spec}`",
            r["bound_name"],
            f"{r['bound_mean']:.3f} ± {r['bound_se']:.3f}",
            f"{r['bound_var']:.4g}",
            f"{r['ms_per_eval']:.1f}",
            f"{r['peak_mem_mb']:.1f}",
        ]
        if with_ess:
            cells.append("" if r.get("ess") is None else f"{r['ess']:.3g}")
        cells += [_pm(r["grad_snr"].get(g, float("nan")), r.get("grad_snr_se", {}).get(g)) for g in groups]
        cells += [f"{r['grad_var'].get(g, float('nan')):.3g}" for g in groups]
        lines.append("| " + " | ".join(cells) + " |")
    if results:
        first = next(iter(results.values()))
        protocol = first.get("protocol", "batch_mean")
        lines.append("")
        lines.append(
            f"{first['repeats']} repeats on {first['batch']} examples; bound SE over repeats of the batch mean; "
            f"gradient: {PROTOCOLS[protocol]}; SNR_p = |mean| / std per parameter, aggregated over the group by "
            f"{first.get('snr_aggregate', 'mean')}; ESS: (sum w)^2 / sum w^2 of one draw's k weights; "
            f"memory: {first['peak_mem_kind']}."
        )
        slopes = snr_slopes(results, k_min=slope_k_min)
        if slopes:
            lines += ["", f"Log-log slope of the SNR against k, fitted over k >= {slope_k_min}:", ""]
            lines += ["| estimator | group | k | slope ± SE | fit |", "|---|---|---|---|---|"]
            for s in slopes:
                ks = ", ".join(str(k) for k in s["ks"])
                lines.append(f"| {s['estimator']} | {s['group']} | {ks} | {_pm(s['slope'], s['se'], 2)} | {s['fit']} |")
    return "\n".join(lines) + "\n"


def _k_of(spec: str) -> tuple[str, int] | None:
    name, kwargs = parse_spec(spec)
    k = kwargs.get("k")
    if k is None:
        return None
    label = name + "".join(f", {key}={v}" for key, v in kwargs.items() if key != "k")
    return label, int(k)


def snr_series(results: dict[str, dict[str, Any]]) -> dict[tuple[str, str], list[tuple[int, float, float | None]]]:
    """Gradient SNR against k for the k-parametrized estimators: ``(estimator, group) -> [(k, snr, se)]``
    (``se`` None where the result has none)."""
    series: dict[tuple[str, str], list[tuple[int, float, float | None]]] = {}
    for spec, r in results.items():
        keyed = _k_of(spec)
        if keyed is None:
            continue
        for group, snr in r["grad_snr"].items():
            if math.isfinite(snr):
                se = r.get("grad_snr_se", {}).get(group)
                series.setdefault((keyed[0], group), []).append((keyed[1], snr, se))
    return {key: sorted(points, key=lambda p: p[0]) for key, points in sorted(series.items())}


def _least_squares(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> tuple[float, float | None]:
    """Slope of y on x by (weighted) least squares and its SE: 1 / sqrt(sum w (x - xbar)^2) with known
    weights w = 1 / Var(y_i); without weights, the ordinary SE from the residuals (None for 2 points)."""
    if w is None:
        xc = x - x.mean()
        slope = (xc * (y - y.mean())).sum() / xc.square().sum()
        if len(x) < 3:
            return slope.item(), None
        residual = y - y.mean() - slope * xc
        return slope.item(), math.sqrt(residual.square().sum().item() / (len(x) - 2) / xc.square().sum().item())
    xc = x - (w * x).sum() / w.sum()
    slope = (w * xc * y).sum() / (w * xc.square()).sum()
    return slope.item(), 1 / math.sqrt((w * xc.square()).sum().item())


def snr_slopes(
    results: dict[str, dict[str, Any]], k_min: int = 10, k_max: int | None = None, fit: str = "auto"
) -> list[dict[str, Any]]:
    """The slope b of log SNR = a + b log k over ``k_min <= k <= k_max``, per (estimator, group) with 2+ k values.

    Rainforth et al. (2018, Theorem 1) predict b -> -1/2 for the IWAE gradient of the inference
    network (encoder) and +1/2 for the generative network (decoder) as k grows; Tucker et al. (2019)
    +1/2 for DReG's encoder gradient. How it is fitted (``fit``):

    - ``per-example``: with results of the per-example protocol (``fit="auto"``), an ordinary
      least-squares slope for each example's SNR, then their mean over the examples and its SE
      std / sqrt(N) (the same examples at every k, so the spread between examples does not enter
      the slope twice);
    - ``weighted``: otherwise, or with ``fit="aggregate"``, weighted least squares on the log of the
      reported SNR (for per-example results, the mean over the examples) with weights
      1 / Var(log SNR) = (SNR / SE)^2, treating the k values as independent (true of the batch
      protocol's draws; with per-example results the same examples at every k make the SE approximate);
    - ``ordinary``: when some SE is missing, ordinary least squares with its residual SE.

    Points with SNR <= 0 cannot enter a log-log fit and are left out: a per-example ``rms`` or
    ``norm`` is 0 where the SNR is below what R draws resolve, and leaving those examples' points
    out biases a per-example fit towards flatter slopes; ``fit="aggregate"`` averages them in first.
    """
    if fit not in ("auto", "aggregate"):
        raise ValueError(f"fit must be 'auto' or 'aggregate', got {fit!r}")
    by_key: dict[tuple[str, str], list[tuple[int, dict[str, Any], str]]] = {}
    for spec, r in results.items():
        keyed = _k_of(spec)
        if keyed is None or keyed[1] < k_min or (k_max is not None and keyed[1] > k_max):
            continue
        for group in r["grad_snr"]:
            by_key.setdefault((keyed[0], group), []).append((keyed[1], r, group))
    slopes = []
    for (label, group), entries in sorted(by_key.items()):
        entries.sort(key=lambda e: e[0])
        per_example = fit == "auto" and all("grad_snr_examples" in r for _, r, _ in entries)
        if per_example:
            per_k = [
                [math.nan if v is None else v for v in r["grad_snr_examples"][r["snr_aggregate"]][group]]
                for _, r, _ in entries
            ]
            logk = torch.tensor([math.log(k) for k, _, _ in entries], dtype=torch.float64)
            values = torch.tensor(per_k, dtype=torch.float64)  # (k values, examples)
            fits = []
            for n in range(values.shape[1]):
                ok = torch.isfinite(values[:, n]) & (values[:, n] > 0)
                if int(ok.sum()) >= 2:
                    fits.append(_least_squares(logk[ok], values[ok, n].log())[0])
            if not fits:
                continue
            slope, se = _over_examples(fits)
            ks, method = [k for k, _, _ in entries], "per-example"
        else:
            points = [(k, r["grad_snr"][g], r.get("grad_snr_se", {}).get(g)) for k, r, g in entries]
            points = [p for p in points if math.isfinite(p[1]) and p[1] > 0]
            if len(points) < 2:
                continue
            x = torch.tensor([math.log(k) for k, _, _ in points], dtype=torch.float64)
            y = torch.tensor([math.log(v) for _, v, _ in points], dtype=torch.float64)
            if all(se is not None and se > 0 for _, _, se in points):
                w = torch.tensor([(v / se) ** 2 for _, v, se in points], dtype=torch.float64)
                (slope, se), method = _least_squares(x, y, w), "weighted"
            else:
                (slope, se), method = _least_squares(x, y), "ordinary"
            ks = [k for k, _, _ in points]
        slopes.append({"estimator": label, "group": group, "ks": ks, "slope": slope, "se": se, "fit": method})
    return slopes


def with_aggregate(results: dict[str, dict[str, Any]], name: str) -> dict[str, dict[str, Any]]:
    """The same results reported with another SNR aggregate (``grad_snr``, ``grad_snr_se``, ``snr_aggregate``),
    from the ``grad_snr_by_aggregate`` every result holds: no new draws."""
    if name not in SNR_AGGREGATES:
        raise ValueError(f"snr aggregate must be one of {', '.join(SNR_AGGREGATES)}, got {name!r}")
    out = {}
    for spec, r in results.items():
        chosen = r["grad_snr_by_aggregate"][name]
        out[spec] = {
            **r,
            "grad_snr": {g: v["snr"] for g, v in chosen.items()},
            "grad_snr_se": {g: v["se"] for g, v in chosen.items()},
            "snr_aggregate": name,
        }
    return out


def write_figure(results: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """``compare.png``: the bound with ±2 SE error bars per estimator; gradient SNR vs k (log-log, ±2 SE
    bars, reference slopes ±1/2)."""
    from pyro_vae.plots import estimator_comparison  # matplotlib loads only when a figure is drawn

    bounds = [(spec, r["bound_mean"], 2 * r["bound_se"]) for spec, r in results.items()]
    first = next(iter(results.values()), {})
    ylabel = f"gradient SNR ({first.get('snr_aggregate', 'mean')} over parameters"
    ylabel += ", mean over examples)" if first.get("protocol") == "per_example" else ")"
    return estimator_comparison(bounds, snr_series(results), GROUPS, path, snr_label=ylabel)


def write_snr_figure(
    panels: dict[str, dict[str, dict[str, Any]]], path: str | Path, columns: int | None = None
) -> Path:
    """One log-log panel of gradient SNR against k (±2 SE, reference slopes ±1/2) per ``title -> results``
    (say, per protocol or training stage), ``columns`` to a row, on a shared y axis."""
    from pyro_vae.plots import snr_against_k

    series = {title: snr_series(results) for title, results in panels.items()}
    return snr_against_k(series, GROUPS, path, columns=columns)


def write_reports(results: dict[str, dict[str, Any]], out_dir: str | Path, slope_k_min: int = 10) -> list[Path]:
    """Write compare.md, compare.csv, compare.json and compare.png into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.md").write_text(markdown_table(results, slope_k_min=slope_k_min))
    rows = flat_rows(results)
    with open(out_dir / "compare.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["estimator"])
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "compare.json").write_text(json.dumps(results, indent=2) + "\n")
    write_figure(results, out_dir / "compare.png")
    return [out_dir / name for name in OUTPUT_FILES]


WEIGHTS = ("best", "last", "initial")


def compare_run(
    run_dir: str | Path,
    estimators: Sequence[str],
    repeats: int = 100,
    batch_size: int = 100,
    device: str | torch.device = "auto",
    data_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    seed: int | None = 0,
    progress: bool | None = None,
    *,
    per_example: bool = False,
    snr_aggregate: str = "mean",
    chunk: int | None = None,
    weights: str = "best",
    slope_k_min: int = 10,
) -> dict[str, dict[str, Any]]:
    """``compare`` on the first ``batch_size`` test examples of a run folder; writes the reports.

    ``weights``: ``best`` (``best.pt``, else the last checkpoint), ``last`` (``checkpoint.pt``), or
    ``initial``: the untrained VAE of the run's config, its weights drawn after seeding with the
    run's ``train.seed`` (the training stage matters for the gradient SNR; this is the
    initialization the run started from when nothing else drew from the RNG between the seed and
    the model's construction, as in ``pyro-vae train``). The reports go to ``out_dir`` (default: the
    run folder). Returns the results keyed by the specs as given (what ``pyro-vae compare --json`` prints).
    """
    from pyro_vae.runs import build_vae, load_run

    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    run = load_run(run_dir, device=device, data_dir=data_dir, which="last" if weights == "last" else "best")
    vae = run.vae
    if weights == "initial":
        pyro.set_rng_seed(run.config.train.seed)
        vae = build_vae(run.config.model, x_dim=run.dataset.x_dim, x_shape=run.image_shape).to(run.device).eval()
    if vae.consumes:  # the comparison passes x alone to the estimators
        raise ValueError(
            f"compare passes x alone, but this run's model consumes {', '.join(vae.consumes)}; "
            "compare estimators on it in Python with estimator.bound(vae, x, **fields)"
        )
    test = run.dataset.test
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    x = test[: min(batch_size, len(test))]
    results = compare(
        vae,
        x,
        estimators,
        repeats=repeats,
        seed=seed,
        progress=progress,
        per_example=per_example,
        snr_aggregate=snr_aggregate,
        chunk=chunk,
    )
    write_reports(results, run_dir if out_dir is None else out_dir, slope_k_min=slope_k_min)
    return results
