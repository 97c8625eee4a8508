"""How well a score separates two sets: AUROC (with its DeLong standard error) and average precision.

A leaf module (numpy only). The two sets are given apart: ``positive`` (the examples a high score
should flag, e.g. out-of-distribution inputs) and ``negative`` (e.g. the model's own test set).
The convention is **higher score = more positive**.

- :func:`auroc`: the area under the ROC curve, exactly, from ranks (the Mann-Whitney U statistic),

      AUROC = P(S+ > S-) + 1/2 P(S+ = S-) = U / (m n),   U = R+ - m (m + 1) / 2,

  with m positives, n negatives, R+ the sum of the positives' ranks in the pooled sample, tied
  values taking the mean of the ranks they span (so a tie counts one half). 1 separates perfectly,
  0.5 is chance, 0 separates perfectly the other way round (Hanley & McNeil 1982, "The meaning and
  use of the area under a ROC curve", Radiology 143).
- :func:`auroc_se`: its standard error by DeLong, DeLong & Clarke-Pearson (1988), "Comparing the
  areas under two or more correlated ROC curves", Biometrics 44: the variance of the two sets of
  placement values, ``var(V10) / m + var(V01) / n``.
- :func:`average_precision`: the area under the precision-recall curve as the step sum

      AP = sum_k (R_k - R_{k-1}) P_k

  over the distinct score values t_k from the highest down, P_k and R_k the precision and recall of
  "score >= t_k" (R_0 = 0); tied scores enter together, as one threshold. Chance level is the
  fraction of positives m / (m + n), not 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

Scores = torch.Tensor | np.ndarray | Sequence[float]


def _values(scores: Scores, what: str) -> np.ndarray:
    """``scores`` as a flat float64 array; empty or non-finite ones are a one-line ``ValueError``."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().double().numpy()
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError(f"the {what} set is empty: a ranking needs at least one example of each set")
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise ValueError(f"{bad} of the {values.size} {what} scores are not finite (NaN or inf); they cannot be ranked")
    return values


def midranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..N of ``values`` in increasing order, tied values sharing the mean of the ranks they span."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # the highest rank each distinct value reaches
    return (last - (counts - 1) / 2.0)[inverse.reshape(-1)]


def _placements(positive: Scores, negative: Scores) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's placement values: for each positive, the fraction of negatives below it (ties half);
    for each negative, the fraction of positives above it (ties half)."""
    pos, neg = _values(positive, "positive"), _values(negative, "negative")
    pooled = midranks(np.concatenate([pos, neg]))
    m = pos.size
    below = (pooled[:m] - midranks(pos)) / neg.size  # negatives ranked under each positive
    above = 1.0 - (pooled[m:] - midranks(neg)) / m  # positives ranked over each negative
    return below, above


def auroc(positive: Scores, negative: Scores) -> float:
    """P(S+ > S-) + 1/2 P(S+ = S-) over all (positive, negative) pairs: the Mann-Whitney U / (m n)."""
    below, _ = _placements(positive, negative)
    return float(below.mean())


def auroc_se(positive: Scores, negative: Scores) -> float:
    """DeLong's standard error of :func:`auroc`: sqrt(var(V10) / m + var(V01) / n), unbiased variances
    of the placement values; ``nan`` when a set has fewer than 2 examples."""
    below, above = _placements(positive, negative)
    if below.size < 2 or above.size < 2:
        return math.nan
    return float(math.sqrt(below.var(ddof=1) / below.size + above.var(ddof=1) / above.size))


def average_precision(positive: Scores, negative: Scores) -> float:
    """AP = sum_k (R_k - R_{k-1}) P_k over the distinct thresholds, highest first (the module docstring)."""
    pos, neg = _values(positive, "positive"), _values(negative, "negative")
    scores = np.concatenate([pos, neg])
    is_positive = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    order = np.argsort(-scores, kind="stable")
    scores, is_positive = scores[order], is_positive[order]
    # the last position of each run of equal scores: every tied example is flagged at once
    ends = np.flatnonzero(np.append(np.diff(scores) != 0, True))
    true_pos = np.cumsum(is_positive)[ends]
    precision = true_pos / (ends + 1)
    recall_gain = np.diff(np.concatenate([[0.0], true_pos])) / pos.size
    return float(np.sum(recall_gain * precision))
