"""AUROC, its DeLong SE and average precision: hand-computed cases, brute-force pair counts with ties, errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from pyro_vae.ranking import auroc, auroc_se, average_precision, midranks

# (positives, negatives, AUROC, AP), each worked out by hand in the comments.
HAND = [
    ([3, 4], [1, 2], 1.0, 1.0),  # perfectly separated
    ([1], [2], 0.0, 0.5),  # inverted: at t=2 no positive (gain 0); at t=1 precision 1/2, recall 1
    ([5, 5], [5], 0.5, 2 / 3),  # all tied: one threshold flags everything, precision 2/3
    # pairs: 0.8>0.6, 0.8>0.2, 0.4<0.6, 0.4>0.2 -> 3/4; AP: t=.8 P=1 R=1/2, t=.6 no gain, t=.4 P=2/3 R=1
    ([0.8, 0.4], [0.6, 0.2], 0.75, 0.5 * 1 + 0.5 * 2 / 3),
    # pairs (1,2)=0 (1,3)=0 (2,2)=1/2 (2,3)=0 -> 1/8; AP: t=3 no positive, t=2 flags 3 with 1 positive
    # (P=1/3, R=1/2), t=1 flags all 4 (P=1/2, R=1) -> 1/6 + 1/4
    ([1, 2], [2, 3], 0.125, 1 / 6 + 1 / 4),
]


@pytest.mark.parametrize(("pos", "neg", "area", "ap"), HAND)
def test_hand_computed_examples(pos, neg, area, ap):
    assert auroc(pos, neg) == pytest.approx(area, abs=1e-12)
    assert average_precision(pos, neg) == pytest.approx(ap, abs=1e-12)


def test_midranks_average_over_ties():
    assert midranks(np.array([10.0, 20.0, 10.0, 30.0, 10.0])).tolist() == [2.0, 4.0, 2.0, 5.0, 2.0]


def _psi(a: float, b: float) -> float:
    return 1.0 if a > b else 0.5 if a == b else 0.0


def _brute_auroc(pos, neg) -> float:
    return sum(_psi(a, b) for a, b in itertools.product(pos, neg)) / (len(pos) * len(neg))


def _brute_delong_se(pos, neg) -> float:
    v10 = np.array([np.mean([_psi(a, b) for b in neg]) for a in pos])
    v01 = np.array([np.mean([_psi(a, b) for a in pos]) for b in neg])
    return math.sqrt(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg))


def _brute_ap(pos, neg) -> float:
    scores = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    total, previous_recall = 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        flagged = scores >= t
        tp = labels[flagged].sum()
        recall = tp / len(pos)
        total += (recall - previous_recall) * tp / flagged.sum()
        previous_recall = recall
    return total


@pytest.mark.parametrize("seed", range(8))
def test_against_brute_force_with_ties(seed):
    """Random sizes and small integer scores (many ties), shifted so the sets overlap partly."""
    rng = np.random.default_rng(seed)
    m, n = rng.integers(2, 40, size=2)
    pos = rng.integers(0, 6, size=m) + rng.integers(0, 3)
    neg = rng.integers(0, 6, size=n)
    assert auroc(pos, neg) == pytest.approx(_brute_auroc(pos, neg), abs=1e-12)
    assert auroc_se(pos, neg) == pytest.approx(_brute_delong_se(pos, neg), abs=1e-12)
    assert average_precision(pos, neg) == pytest.approx(_brute_ap(pos, neg), abs=1e-12)


def test_continuous_scores_tensor_input_and_symmetry():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(30, generator=g) + 1, torch.randn(50, generator=g)
    assert auroc(pos, neg) == pytest.approx(_brute_auroc(pos.tolist(), neg.tolist()), abs=1e-12)
    assert auroc(pos, neg) + auroc(neg, pos) == pytest.approx(1.0, abs=1e-12)
    assert average_precision(pos, neg) == pytest.approx(_brute_ap(pos.numpy(), neg.numpy()), abs=1e-12)


def test_delong_se_matches_the_spread_of_repeated_aurocs():
    """400 repeats of m = n = 60 draws, shift 1: the sd of the AUROCs (relative SE ~ 3.5%) and the mean
    DeLong SE agree within 15%."""
    rng = np.random.default_rng(1)
    areas, ses = [], []
    for _ in range(400):
        pos, neg = rng.normal(1.0, 1.0, 60), rng.normal(0.0, 1.0, 60)
        areas.append(auroc(pos, neg))
        ses.append(auroc_se(pos, neg))
    assert np.mean(ses) == pytest.approx(np.std(areas, ddof=1), rel=0.15)


def test_chance_levels():
    """Identical distributions: AUROC near 1/2, AP near the fraction of positives (1/5 here)."""
    rng = np.random.default_rng(2)
    pos, neg = rng.normal(size=2000), rng.normal(size=8000)
    assert auroc(pos, neg) == pytest.approx(0.5, abs=4 * auroc_se(pos, neg))
    assert average_precision(pos, neg) == pytest.approx(0.2, abs=0.03)


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ValueError, match="positive set is empty"):
        auroc([], [1.0])
    with pytest.raises(ValueError, match="1 of the 2 negative scores are not finite"):
        average_precision([1.0], [0.0, math.nan])
    assert math.isnan(auroc_se([1.0], [0.0, 2.0]))
