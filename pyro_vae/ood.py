"""Out-of-distribution detection with a trained run: score its own split and another data set, then rank.

The in-distribution set is a split of the run's own data; the out-of-distribution set is the same
split of another data set (``--data NAME``), loaded with the run's ``[data]`` settings (``subset``;
the labels and masks its structure consumes). Each score of ``pyro_vae.scores`` (higher = more
anomalous) is computed on both, and :mod:`pyro_vae.ranking` says how well it separates them with the
**out-of-distribution examples as the positives**: AUROC (with DeLong's SE) and AUPRC (average
precision; chance is the fraction of positives).

Preprocessing, as far as it applies: a run trained on binary data (``mnist-dynamic``,
``mnist-static``, ``synthetic``) scores a grey-level set (``fashion-mnist``) on one fixed Bernoulli
binarization of it (:func:`pyro_vae.data.fixed_binarization`, as ``mnist-dynamic``'s own test set);
binary data scored by a grey-level run are used as they are (0 and 1 are grey levels). A set whose
images have another shape than the run's is refused in one line: nothing is resized.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pyro_vae.data import fixed_binarization, spread_rows
from pyro_vae.evaluate import likelihood_warning
from pyro_vae.fields import check_provided, split_fields
from pyro_vae.ranking import auroc, auroc_se, average_precision
from pyro_vae.runs import load_dataset_for, load_run
from pyro_vae.scores import SCORES
from pyro_vae.specs import Spec, format_spec

DEFAULT_SCORES = ("log_px", "elbo", "input_complexity")
CONVENTION = "higher score = more anomalous; the out-of-distribution examples are the positives"
SPLITS = ("train", "val", "test")


@dataclass
class Detection:
    """What :func:`score_run` found: the JSON-ready ``report`` and each score's per-example values,
    spec -> float64 tensor, for the in- and the out-of-distribution set."""

    report: dict[str, Any]
    scores_in: dict[str, torch.Tensor] = field(default_factory=dict)
    scores_out: dict[str, torch.Tensor] = field(default_factory=dict)


def separation(scores_in: torch.Tensor, scores_out: torch.Tensor) -> dict[str, float | int]:
    """AUROC (with its DeLong SE), AUPRC and its chance level, and each set's mean, sd and size."""
    n_in, n_out = len(scores_in), len(scores_out)

    def sd(s: torch.Tensor) -> float:
        return float(s.std()) if len(s) > 1 else math.nan

    return {
        "auroc": auroc(scores_out, scores_in),
        "auroc_se": auroc_se(scores_out, scores_in),
        "auprc": average_precision(scores_out, scores_in),
        "auprc_chance": n_out / (n_in + n_out),
        "mean_in": float(scores_in.mean()),
        "sd_in": sd(scores_in),
        "mean_out": float(scores_out.mean()),
        "sd_out": sd(scores_out),
        "num_in": n_in,
        "num_out": n_out,
    }


def with_samples(spec: Spec, samples: int | None) -> str:
    """The spec as a string, with ``samples=samples`` added where the score takes it and the spec leaves it unset."""
    name, kwargs = SCORES.check(spec)
    if samples is not None and "samples" in SCORES.user_keys(name) and "samples" not in kwargs:
        kwargs["samples"] = samples
    return format_spec(name, kwargs)


def detect(
    vae,
    x_in: torch.Tensor,
    x_out: torch.Tensor,
    scores: Sequence[Spec] = DEFAULT_SCORES,
    image_shape: Sequence[int] | None = None,
    data_in: dict[str, torch.Tensor] | None = None,
    data_out: dict[str, torch.Tensor] | None = None,
    progress: bool | None = False,
) -> Detection:
    """Every score of ``scores`` on ``x_in`` and ``x_out`` and its :func:`separation`; ``report["scores"]``
    maps each spec to its numbers (with ``units``). ``image_shape`` defaults to one row per example."""
    built = {format_spec(*SCORES.check(spec)): SCORES.build(spec) for spec in scores}  # every spec checked first
    shape = tuple(image_shape) if image_shape is not None else (1, 1, x_in[0].numel())
    detection = Detection(report={"convention": CONVENTION, "scores": {}})
    for spec, score in built.items():
        s_in = score(vae, x_in, image_shape=shape, progress=progress, **(data_in or {}))
        s_out = score(vae, x_out, image_shape=shape, progress=progress, **(data_out or {}))
        detection.scores_in[spec], detection.scores_out[spec] = s_in, s_out
        detection.report["scores"][spec] = {"units": score.units, **separation(s_in, s_out)}
    return detection


def _split(dataset, split: str, consumes: Sequence[str], num: int | None) -> tuple[torch.Tensor, dict]:
    """``num`` evenly spaced rows of a split (``data.spread_rows``) and of the fields the structure consumes."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    x = getattr(dataset, split)
    if x is None or len(x) == 0:
        raise ValueError(f"{dataset.name} has no {split} examples")
    data = split_fields(dataset, split, consumes)
    rows = spread_rows(x.shape[0], num)
    return x[rows], {name: value[rows] for name, value in data.items()}


def load_other(run, name: Spec, data_dir=None):
    """The data set ``name`` with the run's ``[data]`` settings where they apply (``subset``, the fields its
    structure consumes; its own default validation hold-out, since only the scored split matters), on
    the run's device. A set whose images have another shape than the run's is a one-line ``ValueError``."""
    section = dataclasses.replace(run.config.data, name=name, val_size=None, labels=None, labelled_repeats=1)
    other = load_dataset_for(dataclasses.replace(run.config, data=section), device=run.device, data_dir=data_dir)
    own = tuple(run.image_shape or run.dataset.image_shape)
    if tuple(other.image_shape) != own:
        raise ValueError(
            f"{other.name} has images of shape {_shape(other.image_shape)} but the run's data "
            f"{run.dataset.name} has {_shape(own)}; score needs data of the run's shape (nothing is resized)"
        )
    consumes = getattr(run.vae, "consumes", ())
    check_provided(other, consumes, type(getattr(run.vae, "structure", run.vae)).__name__)
    return other


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def matched_preprocessing(run_dataset, other, x: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """``x`` of ``other`` prepared as the run's data is: binarized once (fixed seed) for a run on binary data."""
    if run_dataset.is_binary and not other.is_binary:
        note = f"{other.name} is binarized once (x ~ Bernoulli(grey level), fixed seed) as the run's data is binary"
        return fixed_binarization(x), [note]
    return x, []


def score_run(
    run_dir: str | Path,
    data: Spec,
    scores: Sequence[Spec] = DEFAULT_SCORES,
    split: str = "test",
    num: int | None = None,
    samples: int | None = None,
    device: str = "auto",
    data_dir: str | Path | None = None,
    seed: int | None = 0,
    progress: bool | None = None,
) -> Detection:
    """:func:`detect` on a run folder: the run's ``split`` (``num`` evenly spaced examples) against the same split
    of the data set ``data``. ``samples`` sets the importance samples of every score that takes
    ``samples`` and whose spec does not. ``seed`` (default 0) seeds torch and Pyro first."""
    import pyro

    specs = [with_samples(spec, samples) for spec in scores]  # bad specs refused before any loading
    if not specs:
        raise ValueError(f"no scores given; valid scores: {', '.join(SCORES.names())}")
    if seed is not None:
        pyro.set_rng_seed(seed)
    start = time.perf_counter()
    run = load_run(run_dir, device=device, data_dir=data_dir)
    other = load_other(run, data, data_dir)
    consumes = getattr(run.vae, "consumes", ())
    x_in, data_in = _split(run.dataset, split, consumes, num)
    x_out, data_out = _split(other, split, consumes, num)
    x_out, notes = matched_preprocessing(run.dataset, other, x_out)
    if hasattr(run.vae, "check_data"):
        run.vae.check_data(x_out, other.name)
    warning = likelihood_warning(run.vae, run.dataset, x_in)
    shape = run.image_shape or run.dataset.image_shape
    detection = detect(run.vae, x_in, x_out, specs, shape, data_in, data_out, progress)
    detection.report = {
        "run": str(run_dir),
        "in": {"data": run.dataset.name, "split": split, "num_examples": len(x_in)},
        "out": {"data": other.name, "split": split, "num_examples": len(x_out)},
        **detection.report,
        "notes": notes + ([warning] if warning else []),
        "seconds": time.perf_counter() - start,
    }
    return detection


def score_table(report: dict[str, Any]) -> str:
    """The lines ``pyro-vae score`` prints: the two sets, the convention, one row per score, the notes."""
    lines = [
        f"{side:>3}: {report[side]['data']} {report[side]['split']}, {report[side]['num_examples']} examples"
        for side in ("in", "out")
    ]
    lines.append(f"({report['convention']})")
    width = max(len("score"), *(len(spec) for spec in report["scores"]))
    lines.append(f"{'score':<{width}}  {'AUROC':>15}  {'AUPRC (chance)':>14}  {'mean in':>10}  {'mean out':>10}  units")
    for spec, n in report["scores"].items():
        area = f"{n['auroc']:.4f} ± {n['auroc_se']:.4f}"
        precision = f"{n['auprc']:.4f} ({n['auprc_chance']:.2f})"
        lines.append(
            f"{spec:<{width}}  {area:>15}  {precision:>14}  {n['mean_in']:>10.2f}  {n['mean_out']:>10.2f}  {n['units']}"
        )
    lines += [f"note: {note}" for note in report.get("notes", [])]
    if report.get("figure"):
        lines.append(report["figure"])
    return "\n".join(lines)
