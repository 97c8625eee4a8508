"""Monte Carlo statistics for the statistical tests: means, standard errors, z-scores, a visible report.

Every statistical test compares an estimate with a reference within a number of standard errors
(SE) computed from the samples themselves. ``report`` prints each comparison on one line,
prefixed with ``[stat]``, so that ``pytest -s`` shows the numbers the tests saw.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def mean_se(samples: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample mean and its standard error std(ddof=1) / sqrt(n) along ``dim``."""
    n = samples.shape[dim]
    if n < 2:
        raise ValueError(f"need at least 2 samples for a standard error, got {n}")
    return samples.mean(dim), samples.std(dim, unbiased=True) / math.sqrt(n)


def batch_means(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and SE of ``repeats`` independent calls of ``fn`` (the method of batch means).

    Each call may itself average many draws; the spread of the call results then estimates the
    SE of their mean without any assumption about the per-draw distribution.
    """
    values = torch.stack([fn().detach() for _ in range(repeats)])
    return mean_se(values, 0)


def report(label: str, estimate, se, reference=None) -> float | None:
    """Print ``estimate +- se`` (and the reference and z-score when given); return the worst |z|.

    Tensors are reduced for printing: a scalar is shown as is, a vector by its first entries.
    """
    estimate, se = torch.as_tensor(estimate).double(), torch.as_tensor(se).double()
    line = f"[stat] {label}: estimate {_fmt(estimate)} +- {_fmt(se)} (SE)"
    worst = None
    if reference is not None:
        reference = torch.as_tensor(reference, dtype=torch.float64, device=estimate.device)
        z = (estimate - reference) / se
        worst = float(z.abs().max())
        line += f", reference {_fmt(reference)}, max |z| = {worst:.2f}"
    print(line)
    return worst


def assert_within_se(label: str, estimate, reference, se, n_se: float = 4.0) -> None:
    """Report, then assert |estimate - reference| <= n_se * se elementwise."""
    worst = report(label, estimate, se, reference)
    assert worst is not None and worst <= n_se, f"{label}: |z| = {worst:.2f} > {n_se} standard errors"


def _fmt(t: torch.Tensor) -> str:
    t = t.detach().cpu().flatten()
    if t.numel() == 1:
        return f"{t.item():.6g}"
    shown = ", ".join(f"{v:.6g}" for v in t[:8].tolist())
    return f"[{shown}{', ...' if t.numel() > 8 else ''}] ({t.numel()} values)"
