"""Probes on codes: k-NN against a brute-force vote, both probes near 100% on separated clusters and at
chance on random labels (binomial band), logistic regression at its known optimum, the records."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from pyro_vae.probe import PROBES, accuracy, fit_logistic, knn_predict, probe_codes
from pyro_vae.specs import SpecError


def _brute_knn(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int) -> list[int]:
    """The rule written out: the k nearest by Euclidean distance vote; a tie goes to the tied class
    whose member comes first in the order of distance."""
    predicted = []
    for point in test_x:
        order = np.argsort(np.sqrt(((train_x - point) ** 2).sum(1)), kind="stable")[:k]
        votes = Counter(train_y[order].tolist())
        most = max(votes.values())
        predicted.append(next(int(train_y[i]) for i in order if votes[int(train_y[i])] == most))
    return predicted


@pytest.mark.parametrize(("k", "seed"), [(1, 0), (4, 1), (5, 2), (6, 3)])
def test_knn_matches_a_brute_force_vote_ties_included(k, seed):
    rng = np.random.default_rng(seed)
    train_x, test_x = rng.normal(size=(70, 3)), rng.normal(size=(45, 3))
    train_y = rng.integers(0, 3, size=70)  # 3 classes and even k: tied votes happen
    expected = _brute_knn(train_x, train_y, test_x, k)
    got = knn_predict(torch.tensor(train_x), torch.tensor(train_y), torch.tensor(test_x), k=k, batch_size=16)
    assert got.tolist() == expected


def _clusters(n: int, classes: int, dim: int, seed: int, separation: float = 10.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    centres = separation * torch.eye(classes, dim)
    return centres[y] + torch.randn(n, dim, generator=g), y


@pytest.mark.parametrize("spec", ["knn", "logistic"])
def test_separable_clusters_are_classified_perfectly(spec):
    train_x, train_y = _clusters(500, 5, 8, seed=0)
    test_x, test_y = _clusters(400, 5, 8, seed=1)
    predicted = PROBES.build(spec).predict(train_x[:25], train_y[:25], test_x)  # 5 labels per class
    assert accuracy(predicted, test_y)[0] >= 0.99


@pytest.mark.parametrize("spec", ["knn", "logistic(l2=0.01)"])
def test_random_labels_give_chance_accuracy_within_the_binomial_band(spec):
    g = torch.Generator().manual_seed(2)
    train_x, test_x = torch.randn(1000, 4, generator=g), torch.randn(2000, 4, generator=g)
    train_y, test_y = torch.randint(4, (1000,), generator=g), torch.randint(4, (2000,), generator=g)
    a, se = accuracy(PROBES.build(spec).predict(train_x, train_y, test_x), test_y)
    chance_se = math.sqrt(0.25 * 0.75 / 2000)
    assert abs(a - 0.25) < 4 * chance_se and se == pytest.approx(math.sqrt(a * (1 - a) / 2000))


def test_logistic_regression_reaches_the_maximum_likelihood_fit():
    """Two inputs, -1 with 30% class 1 and +1 with 80% class 1: two parameters fit both exactly, so
    without a penalty the fitted probabilities are the empirical ones."""
    x = torch.tensor([-1.0] * 10 + [1.0] * 10)[:, None]
    y = torch.tensor([1] * 3 + [0] * 7 + [1] * 8 + [0] * 2)
    logits = fit_logistic(x, y, classes=2, l2=0.0)(torch.tensor([[-1.0], [1.0]]))
    expected = torch.tensor([0.3, 0.8], dtype=torch.float64)
    torch.testing.assert_close(logits.softmax(-1)[:, 1], expected, atol=1e-5, rtol=0)
    shrunk = fit_logistic(x, y, classes=2, l2=10.0)(torch.tensor([[-1.0], [1.0]])).softmax(-1)[:, 1]
    assert (shrunk[1] - shrunk[0]) < 0.5 - 0.1  # the penalty pulls the two toward each other


def test_probe_codes_records_per_probe_and_label_count():
    train_x, train_y = _clusters(300, 3, 4, seed=0)
    test_x, test_y = _clusters(90, 3, 4, seed=1)
    codes = {"train_loc": train_x.numpy(), "train_labels": train_y.numpy(), "test_loc": test_x, "test_labels": test_y}
    records = probe_codes(codes, ["knn(k=3)", "logistic"], sizes=[30, 1000, None], seed=0)
    assert [(r["probe"], r["labels"]) for r in records] == [
        ("knn(k=3)", 30),
        ("logistic", 30),
        ("knn(k=3)", 300),
        ("logistic", 300),
    ]  # 1000 > 300 examples is the same as all
    assert all(r["accuracy"] == 1.0 and r["se"] == 0.0 and r["num_test"] == 90 for r in records)
    rare = {**codes, "train_labels": np.where(np.arange(300) < 5, 2, np.arange(300) % 2)}  # class 2: 5 of 300
    with pytest.raises(ValueError, match=r"probes on 30 balanced training labels: .* class 2, which has 5"):
        probe_codes(rare, ["knn"], sizes=[30])
    with pytest.raises(ValueError, match="missing test_labels"):
        probe_codes({k: v for k, v in codes.items() if k != "test_labels"})
    with pytest.raises(SpecError, match=r"unknown probe 'kn' \(did you mean \"knn\"\?\)"):
        probe_codes(codes, ["kn"])
    with pytest.raises(SpecError, match="k must be a positive integer"):
        probe_codes(codes, ["knn(k=0)"])
