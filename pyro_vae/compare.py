"""Estimator comparison: bound, its spread, gradient variance and signal-to-noise, time and memory.

For each estimator spec, ``compare`` evaluates ``loss`` + ``backward`` and ``bound`` ``repeats``
times on one fixed batch x (fresh Monte Carlo draws each time, the same parameters) and reports:

- ``bound_mean``: the mean over repeats of the batch-mean bound, nats per example (``bound_name``
  says which bound: ELBO, IWAE bound with k draws, ...);
- ``bound_se``: the standard error of ``bound_mean`` (std over repeats of the batch mean / sqrt(R));
- ``bound_var``: the variance of one per-example estimate (variance over repeats for each example,
  averaged over the examples), nats^2;
- ``grad_var`` and ``grad_snr``, per parameter group (``encoder``, ``decoder``, ``prior``,
  ``likelihood``: the VAE's submodules that have trainable parameters), for the gradient of the
  batch-mean bound. Per scalar parameter p: var_p = Var_R(g_p) (unbiased), SNR_p = |mean_R(g_p)| / std_R(g_p)
  (Rainforth et al. 2018, eq. 6). A group reports the mean of var_p and the mean of SNR_p over its
  parameters; parameters whose gradient is identically zero over the repeats (std 0) are left out
  of the SNR mean (their SNR is undefined);
- ``ms_per_eval``: the median wall time of one ``loss`` + ``backward`` (milliseconds; CUDA is
  synchronized around it);
- ``peak_mem_mb``: on CUDA, ``torch.cuda.max_memory_allocated`` during one loss + backward minus
  the memory allocated before it; on CPU, the memory of the tensors autograd saves for the backward
  pass (distinct storages, through ``torch.autograd.graph.saved_tensors_hooks``) — the activation
  memory that dominates an estimator's footprint. ``peak_mem_kind`` says which; JIT-compiled
  estimators save tensors inside the compiled graph, so on CPU their number is a lower bound.

``compare_run`` does this on a trained run folder's test batch and writes ``compare.md``,
``compare.csv``, ``compare.json`` and ``compare.png`` (bound with error bars; gradient SNR vs k for
the estimators that take ``k``).
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

GROUPS = ("encoder", "decoder", "prior", "likelihood")
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


def measure(estimator, vae, x: torch.Tensor, repeats: int, progress=None) -> dict[str, Any]:
    """The statistics of one estimator on one batch (see the module docstring); ``progress`` is a tqdm bar or None."""
    if repeats < 2:
        raise ValueError(f"repeats must be at least 2 for standard errors and variances, got {repeats}")
    groups = parameter_groups(vae)
    batch = x.shape[0]
    # One evaluation outside the measurement: JIT compilation, the score-function baseline's start.
    vae.zero_grad(set_to_none=True)
    estimator.loss(vae, x).backward()
    bounds, times = [], []
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in groups}
    for _ in range(repeats):
        vae.zero_grad(set_to_none=True)
        _sync(x.device)
        start = time.perf_counter()
        (estimator.loss(vae, x) / batch).backward()  # the gradient of minus the batch-mean bound
        _sync(x.device)
        times.append(time.perf_counter() - start)
        for name, params in groups.items():
            grads[name].append(
                -torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
            )
        with torch.no_grad():
            bounds.append(estimator.bound(vae, x).detach())
        if progress is not None:
            progress.update(1)
    vae.zero_grad(set_to_none=True)
    memory, memory_kind = _memory_mb(estimator, vae, x)
    vae.zero_grad(set_to_none=True)

    per_example = torch.stack(bounds).double()  # (repeats, batch)
    batch_means = per_example.mean(1)
    grad_var, grad_snr = {}, {}
    for name, samples in grads.items():
        grad_var[name], grad_snr[name] = _group_stats(torch.stack(samples).double())
    return {
        "bound_name": estimator.bound_name,
        "bound_mean": batch_means.mean().item(),
        "bound_se": (batch_means.std(unbiased=True) / math.sqrt(repeats)).item(),
        "bound_var": per_example.var(0, unbiased=True).mean().item(),
        "grad_var": grad_var,
        "grad_snr": grad_snr,
        "ms_per_eval": 1000 * statistics.median(times),
        "peak_mem_mb": memory,
        "peak_mem_kind": memory_kind,
        "repeats": repeats,
        "batch": batch,
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
) -> dict[str, dict[str, Any]]:
    """Compare estimators on ``vae`` and the batch ``x``: one result per spec, keyed by the spec as given.

    Every spec is built first, so a typo fails before any computation. ``seed`` fixes Pyro's RNG
    (torch, random, numpy). A progress bar over estimators x repeats is shown on a terminal
    (``progress=None``) or when asked.
    """
    if isinstance(estimators, str):
        raise TypeError("estimators must be a list of specs; split a comma-separated string with specs.split_specs")
    if len(set(estimators)) != len(estimators):
        raise ValueError(f"duplicate estimator specs in {list(estimators)}")
    built = {spec: estimators_module.get(spec) for spec in estimators}
    device = next(vae.parameters()).device
    x = x.to(device).reshape(x.shape[0], -1)
    if seed is not None:
        pyro.set_rng_seed(seed)
    bar = _progress_bar(len(built) * repeats, progress)
    try:
        results = {}
        for spec, estimator in built.items():
            if bar is not None:
                bar.set_postfix_str(spec)
            results[spec] = measure(estimator, vae, x, repeats, bar)
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
        row["repeats"], row["batch"], row["peak_mem_kind"] = r["repeats"], r["batch"], r["peak_mem_kind"]
        rows.append(row)
    return rows


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """The comparison as a Markdown table (nats per example; SNR and variance per parameter group)."""
    groups = _groups_in(results)
    header = ["estimator", "bound", "mean ± SE (nats)", "var of one", "ms/eval", "mem (MB)"]
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
        cells += [f"{r['grad_snr'].get(g, float('nan')):.3g}" for g in groups]
        cells += [f"{r['grad_var'].get(g, float('nan')):.3g}" for g in groups]
        lines.append("| " + " | ".join(cells) + " |")
    if results:
        first = next(iter(results.values()))
        lines.append("")
        lines.append(
            f"{first['repeats']} repeats on a batch of {first['batch']}; SE over repeats of the batch mean; "
            f"SNR = |mean| / std per parameter, averaged over the group; memory: {first['peak_mem_kind']}."
        )
    return "\n".join(lines) + "\n"


def _k_of(spec: str) -> tuple[str, int] | None:
    name, kwargs = parse_spec(spec)
    k = kwargs.get("k")
    if k is None:
        return None
    label = name + "".join(f", {key}={v}" for key, v in kwargs.items() if key != "k")
    return label, int(k)


def snr_series(results: dict[str, dict[str, Any]]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """Gradient SNR against k for the k-parametrized estimators: ``(estimator, group) -> [(k, snr)]``."""
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for spec, r in results.items():
        keyed = _k_of(spec)
        if keyed is None:
            continue
        for group, snr in r["grad_snr"].items():
            if math.isfinite(snr):
                series.setdefault((keyed[0], group), []).append((keyed[1], snr))
    return {key: sorted(points) for key, points in sorted(series.items())}


def write_figure(results: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """``compare.png``: the bound with ±2 SE error bars per estimator; gradient SNR vs k (log-log)."""
    from pyro_vae.plots import estimator_comparison  # matplotlib loads only when a figure is drawn

    bounds = [(spec, r["bound_mean"], 2 * r["bound_se"]) for spec, r in results.items()]
    return estimator_comparison(bounds, snr_series(results), GROUPS, path)


def write_reports(results: dict[str, dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """Write compare.md, compare.csv, compare.json and compare.png into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.md").write_text(markdown_table(results))
    rows = flat_rows(results)
    with open(out_dir / "compare.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["estimator"])
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "compare.json").write_text(json.dumps(results, indent=2) + "\n")
    write_figure(results, out_dir / "compare.png")
    return [out_dir / name for name in OUTPUT_FILES]


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
) -> dict[str, dict[str, Any]]:
    """``compare`` on the first ``batch_size`` test examples of a run folder; writes the reports.

    The reports go to ``out_dir`` (default: the run folder). Returns the results keyed by the
    specs as given (what ``pyro-vae compare --json`` prints).
    """
    from pyro_vae.runs import load_run

    run = load_run(run_dir, device=device, data_dir=data_dir)
    if run.vae.consumes:  # the comparison passes x alone to the estimators
        raise ValueError(
            f"compare passes x alone, but this run's model consumes {', '.join(run.vae.consumes)}; "
            "compare estimators on it in Python with estimator.bound(vae, x, **fields)"
        )
    test = run.dataset.test
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    x = test[: min(batch_size, len(test))]
    results = compare(run.vae, x, estimators, repeats=repeats, seed=seed, progress=progress)
    write_reports(results, run_dir if out_dir is None else out_dir)
    return results
