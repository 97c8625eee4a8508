"""What an evaluation number was measured under, and the paired comparison of runs measured under one.

A log-likelihood means something only with its protocol: which data (variant, split, binarization,
which examples), which estimator and its settings, which weights, which code. ``evaluation.json``
records it under ``"protocol"`` (:func:`describe`), and ``evaluation.npz`` beside it holds the
per-example numbers, so two runs scored on the same examples compare *paired*:

    d_i = NLL_A(x_i) - NLL_B(x_i),   mean d,   se = sd_i(d_i) / sqrt(N),

which cancels the between-example spread that both share (on MNIST's test set ``test_nll_data_se``
is a few tenths of a nat, while paired differences of similar models have SEs of hundredths).
:func:`compare_runs` refuses, in one line naming the difference, numbers whose protocols differ.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

EVALUATION = "evaluation.json"
EXAMPLES = "evaluation.npz"  # per-example numbers beside evaluation.json, row for row

# The protocol entries two numbers must share to be compared; the rest (weights, seed, versions) may differ.
COMPARABLE = ("data_variant", "split", "num_examples", "examples_sha256", "nll_method", "nll_settings", "elbo_samples")


def tensor_sha256(x: torch.Tensor) -> str:
    """sha256 of a tensor's float32 values in row-major order: which examples, binarized how."""
    return hashlib.sha256(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names and float32 values, in key order): which weights were scored."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def versions() -> dict[str, str]:
    """The versions of the code that computed a number."""
    import pyro

    from pyro_vae import __version__

    return {"pyro_vae": __version__, "pyro": pyro.__version__, "torch": torch.__version__}


def binarization(dataset) -> str:
    """How the evaluated split's pixels were made binary, in words."""
    from pyro_vae.data import EVAL_BINARIZATION_SEED

    if getattr(dataset, "dynamic", False):
        return f"drawn once from the grey levels with seed {EVAL_BINARIZATION_SEED} (on the CPU)"
    return "fixed by the data set" if getattr(dataset, "is_binary", False) else "none (grey levels)"


def describe(
    vae,
    dataset,
    split: str,
    x: torch.Tensor,
    subset: int | None,
    nll: dict[str, Any],
    elbo_samples: int,
    seed: int | None,
) -> dict[str, Any]:
    """The protocol of one evaluation of ``vae`` on the rows ``x`` of ``dataset``'s ``split``.

    ``nll`` is the log-likelihood estimator's name and settings, ``{"method": "is", "samples": 5000,
    "se": "jackknife"}`` (``{}`` when skipped); ``seed`` the seed set before evaluating (``None``: the
    generator's state was left as it was, as at the end of training).
    """
    return {
        "data_variant": getattr(dataset, "name", None),
        "split": split,
        "num_examples": int(x.shape[0]),
        "examples": _which(x.shape[0], subset),
        "examples_sha256": tensor_sha256(x),
        "binarization": binarization(dataset),
        "nll_method": nll.get("method"),
        "nll_settings": {key: value for key, value in nll.items() if key != "method"},
        "elbo_samples": elbo_samples,
        "seed": seed,
        "weights_sha256": weights_sha256(vae),
        "versions": versions(),
    }


def _which(num: int, subset: int | None) -> str:
    """Which rows were evaluated, in words (``pyro_vae.data.spread_rows``)."""
    if subset is None:
        return "the whole split"
    return f"{num} evenly spaced rows of the split (i * size // {num})"


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The :data:`COMPARABLE` protocol entries on which ``a`` and ``b`` differ, as ``"key (A vs B)"``."""
    found = []
    for key in COMPARABLE:
        if a.get(key) != b.get(key):
            left, right = (_short(p.get(key)) for p in (a, b))
            found.append(f"{key} ({left} vs {right})")
    return found


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)
    return text[:12] + "..." if len(text) > 16 and all(c in "0123456789abcdef" for c in text) else text


# -- reading evaluations back --------------------------------------------------------------------------
@dataclass
class Evaluation:
    """One saved evaluation: its JSON (with ``protocol``) and its per-example numbers (``None`` if not saved)."""

    source: Path
    result: dict[str, Any]
    examples: dict[str, np.ndarray] | None

    @property
    def protocol(self) -> dict[str, Any]:
        return self.result["protocol"]


def save(folder: Path, result: dict[str, Any], examples: dict[str, np.ndarray]) -> tuple[Path, Path]:
    """Write ``evaluation.json`` and ``evaluation.npz`` into ``folder``, each atomically (a temporary file, then
    a rename): an interrupted save leaves the old pair or the new one, never a torn file."""
    from pyro_vae.checkpoint import atomic_write  # checkpoint holds the project's atomic file writes

    json_path, npz_path = folder / EVALUATION, folder / EXAMPLES
    atomic_write(npz_path, lambda handle: np.savez(handle, **examples))
    atomic_write(json_path, lambda handle: handle.write((json.dumps(result, indent=2) + "\n").encode()))
    return json_path, npz_path


def load(path: str | Path) -> Evaluation:
    """A run folder's ``evaluation.json`` (+ ``evaluation.npz``), or an evaluation JSON file given by path."""
    path = Path(path)
    json_path = path / EVALUATION if path.is_dir() else path
    if not json_path.is_file():
        raise FileNotFoundError(f"{json_path} does not exist: evaluate the run first (pyro-vae evaluate --run DIR)")
    try:
        result = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{json_path} is not an evaluation JSON file: {err}") from None
    if not isinstance(result, dict) or "protocol" not in result:
        raise ValueError(
            f"{json_path} records no protocol (written before protocols were recorded); redo it with "
            f"pyro-vae evaluate --run {json_path.parent} --save"
        )
    npz_path = json_path.with_suffix(".npz")
    examples = dict(np.load(npz_path)) if npz_path.is_file() else None
    return Evaluation(json_path, result, examples)


# -- paired comparison ---------------------------------------------------------------------------------
def check_comparable(evaluations: list[Evaluation]) -> None:
    """A one-line ``ValueError`` naming the first protocol difference between the first evaluation and another."""
    first = evaluations[0]
    for other in evaluations[1:]:
        found = differences(first.protocol, other.protocol)
        if found:
            raise ValueError(
                f"cannot compare {first.source} with {other.source}: their protocols differ in {'; '.join(found)}"
            )


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """``(mean d, sd(d) / sqrt(N))`` of the per-example differences d = a - b (``nan`` SE for one example)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.nan
    return float(d.mean()), se


def compare_runs(paths: list[str | Path]) -> list[dict[str, Any]]:
    """One row per evaluation: its test ELBO and NLL with their SEs, and, from the second on, the paired
    differences to the first (``elbo_diff``, ``nll_diff`` with ``*_diff_se``; positive = better than the first
    for the ELBO, worse for the NLL), computed from the per-example numbers of ``evaluation.npz``."""
    if len(paths) < 2:
        raise ValueError(f"compare-runs needs at least two runs, got {len(paths)}")
    evaluations = [load(path) for path in paths]
    check_comparable(evaluations)
    split = evaluations[0].protocol["split"]
    rows = []
    for evaluation in evaluations:
        r = evaluation.result
        row = {
            "run": str(evaluation.source.parent if evaluation.source.name == EVALUATION else evaluation.source),
            "elbo": r.get(f"{split}_elbo"),
            "nll": r.get(f"{split}_nll"),
            "nll_se": r.get(f"{split}_nll_se"),
            "nll_data_se": r.get(f"{split}_nll_data_se"),
        }
        row.update(_paired_to_first(evaluations[0], evaluation))
        rows.append(row)
    return rows


def _paired_to_first(first: Evaluation, other: Evaluation) -> dict[str, Any]:
    if other is first:
        return {}
    if first.examples is None or other.examples is None:
        missing = first.source if first.examples is None else other.source
        raise ValueError(
            f"{missing.with_suffix('.npz')} is missing: paired differences need the per-example numbers "
            f"(redo with pyro-vae evaluate --run DIR --save)"
        )
    row: dict[str, Any] = {}
    for key, sign in (("elbo", 1.0), ("nll", -1.0)):
        column = "log_px" if key == "nll" else "elbo"
        if column in first.examples and column in other.examples:
            mean, se = paired(other.examples[column], first.examples[column])
            row[f"{key}_diff"], row[f"{key}_diff_se"] = sign * mean, se
    return row
