"""How much of the labels the latent codes carry: simple classifiers trained on the codes (probes).

A probe is fitted on the codes of a labelled subset of the training set and scored by its accuracy
on the test set, with the binomial standard error sqrt(a (1 - a) / n) of an accuracy a over n test
examples. The labelled subsets hold the first 100, 1000, or all training labels, balanced over the
classes and drawn with a seed (``fields.observed_labels``, as M2's labelled subset is), so a probe
with 100 labels reads the same examples in every run with that seed. Probes, by name (:data:`PROBES`):

- ``knn(k=5)``: the k nearest training codes in Euclidean distance (``torch.cdist``, in batches of
  test codes) vote; a tied vote goes to the tied class with the nearest member among the k.
- ``logistic(l2=0.001, max_iter=500)``: multinomial logistic regression, p(y = c | z) = softmax(W^T z~ + b)_c
  on features z~ standardized by the labelled subset's mean and sd, fitted by L-BFGS (strong Wolfe
  line search) on the full subset to the mean cross-entropy + l2/2 ||W||^2 (the bias is not penalized).

Kingma et al. (2014), "Semi-supervised learning with deep generative models" (their M1 + TSVM), and
Locatello et al. (2019) use probes of this kind to say what a representation holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pyro_vae.fields import HIDDEN, observed_labels
from pyro_vae.registry import Registry
from pyro_vae.specs import Spec, format_spec, integer_arg, number_arg

DEFAULT_PROBES = ("knn", "logistic")
DEFAULT_SIZES: tuple[int | None, ...] = (100, 1000, None)  # None: every training label


class Probe:
    """Base class of :data:`PROBES`: ``predict`` fits on ``(train_x, train_y)`` and labels ``test_x``."""

    def predict(self, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


PROBES: Registry[Probe] = Registry("probe")


@PROBES.register("knn")
class NearestNeighbours(Probe):
    """k-nearest-neighbour vote in Euclidean distance (:func:`knn_predict`)."""

    def __init__(self, k: int = 5, batch_size: int = 1024) -> None:
        self.k = integer_arg("k", k)
        self.batch_size = integer_arg("batch_size", batch_size)

    def predict(self, train_x, train_y, test_x) -> torch.Tensor:
        return knn_predict(train_x, train_y, test_x, self.k, self.batch_size)


@PROBES.register("logistic")
class Logistic(Probe):
    """Multinomial logistic regression on standardized codes (:func:`fit_logistic`)."""

    def __init__(self, l2: float = 1e-3, max_iter: int = 500) -> None:
        self.l2 = number_arg("l2", l2, 0)
        self.max_iter = integer_arg("max_iter", max_iter)

    def predict(self, train_x, train_y, test_x) -> torch.Tensor:
        classes = int(train_y.max()) + 1
        return fit_logistic(train_x, train_y, classes, self.l2, self.max_iter)(test_x).argmax(-1)


def knn_predict(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, k: int = 5, batch_size: int = 1024
) -> torch.Tensor:
    """The majority label of the ``k`` nearest rows of ``train_x`` for each row of ``test_x``, shape ``(M,)``.

    A tie between classes goes to the tied class whose member comes first in the order of distance.
    ``k`` larger than the training set uses the whole set.
    """
    k = min(k, len(train_x))
    classes = int(train_y.max()) + 1
    predictions = []
    for start in range(0, len(test_x), batch_size):
        distances = torch.cdist(test_x[start : start + batch_size].double(), train_x.double())
        neighbours = train_y[distances.topk(k, largest=False).indices]  # (batch, k), nearest first
        votes = F.one_hot(neighbours, classes).sum(1)
        tied = votes == votes.max(-1, keepdim=True).values  # the classes with the most votes
        first = tied.gather(1, neighbours).int().argmax(-1)  # the nearest neighbour of a tied class
        predictions.append(neighbours.gather(1, first[:, None]).squeeze(1))
    return torch.cat(predictions)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float = 1e-3, max_iter: int = 500):
    """Fit p(y | z) = softmax(W^T (z - m) / s + b) by L-BFGS on mean cross-entropy + l2/2 ||W||^2 (float64,
    full batch; m, s the mean and sd of ``x``'s columns); returns a function from codes to logits."""
    x = x.double()
    mean, sd = x.mean(0), x.std(0).clamp_min(1e-8) if len(x) > 1 else torch.ones(x.shape[1], dtype=x.dtype)
    features = (x - mean) / sd
    weight = torch.zeros(x.shape[1], classes, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight + bias, y) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()
    return lambda z: ((z.double() - mean) / sd) @ weight + bias


def accuracy(predicted: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """``(a, se)``: the fraction of ``predicted`` equal to ``truth`` and its binomial SE sqrt(a (1 - a) / n)."""
    n = len(truth)
    a = float((predicted.cpu() == truth.cpu()).double().mean())
    return a, math.sqrt(a * (1 - a) / n)


def _tensor(array: Any) -> torch.Tensor:
    return array if isinstance(array, torch.Tensor) else torch.as_tensor(np.asarray(array))


def probe_codes(
    codes: Mapping[str, Any],
    probes: Sequence[Spec] = DEFAULT_PROBES,
    sizes: Sequence[int | None] = DEFAULT_SIZES,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Test accuracy of each probe trained on each labelled subset of the training codes.

    ``codes`` holds ``train_loc``, ``train_labels``, ``test_loc``, ``test_labels`` (arrays or tensors,
    as :mod:`pyro_vae.embed` writes them). ``sizes`` are the numbers of training labels (``None``: all);
    a size at or above the training set's is the same as all and is left out. One record per (probe,
    size): ``probe``, ``labels``, ``accuracy``, ``se``, ``num_test``.
    """
    missing = [key for key in ("train_loc", "train_labels", "test_loc", "test_labels") if key not in codes]
    if missing:
        raise ValueError(f"probes need the train and test codes with their labels; missing {', '.join(missing)}")
    train_x, train_y = _tensor(codes["train_loc"]), _tensor(codes["train_labels"]).long()
    test_x, test_y = _tensor(codes["test_loc"]), _tensor(codes["test_labels"]).long()
    built = {format_spec(*PROBES.check(spec)): PROBES.build(spec) for spec in probes}
    counts = sorted({min(size, len(train_y)) if size is not None else len(train_y) for size in sizes})
    records = []
    for count in counts:
        try:
            keep = observed_labels(train_y, None if count == len(train_y) else count, seed) != HIDDEN
        except ValueError as err:  # a class with fewer members than its share of the count
            raise ValueError(f"probes on {count} balanced training labels: {err}") from None
        for spec, probe in built.items():
            a, se = accuracy(probe.predict(train_x[keep], train_y[keep], test_x), test_y)
            records.append({"probe": spec, "labels": count, "accuracy": a, "se": se, "num_test": len(test_y)})
    return records


def probe_table(records: list[dict[str, Any]]) -> str:
    """One line per (probe, labels): the test accuracy with its binomial SE."""
    width = max(len("probe"), *(len(r["probe"]) for r in records))
    lines = [f"{'probe':<{width}}  {'labels':>7}  {'test accuracy':>17}  {'n test':>6}"]
    for r in records:
        lines.append(
            f"{r['probe']:<{width}}  {r['labels']:>7}  {r['accuracy']:>8.4f} ± {r['se']:.4f}  {r['num_test']:>6}"
        )
    return "\n".join(lines)
