"""One epoch of training: the steps, the evaluation at beta = 1, and the epoch's sums.

KL warm-up (Bowman et al. 2016; Sønderby et al. 2016) multiplies the latent site's log-densities
by beta via ``poutine.scale``, so the bound a step maximizes is E_q[log p(x|z)] - beta KL(q || p);
beta rises linearly per step to 1 over ``train.warmup_epochs`` (:func:`warmup_beta`). Validation
and test always use beta = 1.

Model selection (``best.pt``) and early stopping follow ``val_bound``: the training estimator's
own bound (``estimator.bound``) averaged over the validation set. For the ELBO estimators
(``estimator.bound_is_elbo``) it is the validation ELBO, computed once; for ``iwae(k)``,
``dreg(k)``, ``renyi`` it is their k-sample bound, which can improve (with the NLL) while the ELBO
falls, as the guide stops fitting the ELBO.

A step makes no host sync: losses stay device scalars, and the index of the first step whose loss
is not finite is kept in a device tensor (``torch.where``). Everything an epoch reports is a sum
over examples or a step index (:class:`EpochSums`), added over ranks by the distributed context
in one collective and read to the host once per epoch. The divergence guard rides on that read:
after the steps, the count of weight and optimizer-state tensors holding a NaN or an infinity is
reduced on the device into the same vector (:func:`count_nonfinite`), and :func:`state_problem` and
:func:`divergence_problem` judge the numbers on the host before anything of the epoch is written.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from pyro_vae.evaluate import chunks, elbo_per_example, metric_sums
from pyro_vae.fields import split_fields
from pyro_vae.train.distributed import BatchSource, SingleProcess
from pyro_vae.train.errors import NonFiniteLossError

Number = torch.Tensor | float


def warmup_beta(step: int, warmup_steps: int) -> float:
    """KL weight of step ``step`` (0-based): ``min(1, (step + 1) / warmup_steps)``; 1 without warm-up.

    It starts at ``1 / warmup_steps`` rather than 0 because ``poutine.scale`` needs a positive
    scale; it reaches 1 at the last step of the warm-up and stays there.
    """
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def epoch_warmup_beta(step: int, warmup_steps: int, steps_per_epoch: int) -> float:
    """KL weight of step ``step`` (0-based) held for a whole epoch: ``min(1, e / W)`` in (1-based) epoch e
    of a warm-up of W epochs, as in Tomczak & Welling's VampPrior code (beta = 1/100 in the first of
    100 epochs, 1 from epoch 100 on); 1 without warm-up."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step // steps_per_epoch + 1) / (warmup_steps // steps_per_epoch))


# train.warmup_by: how beta rises over the train.warmup_epochs, as f(step, warmup_steps, steps_per_epoch).
WARMUPS: dict[str, Callable[[int, int, int], float]] = {
    "step": lambda step, warmup_steps, steps_per_epoch: warmup_beta(step, warmup_steps),
    "epoch": epoch_warmup_beta,
}


@dataclass
class EpochSums:
    """The epoch's numbers, by name: sums over examples, their counts, and one step index.

    While the epoch runs they are device tensors (or plain numbers for what is known on the host).
    :meth:`to_tensor` stacks them into the one float64 vector that the distributed context adds
    over ranks; :meth:`read_back` reads it back, the epoch's one host read. Each mean is a sum
    over a count added up the same way, so it is exact over shards of any size.
    """

    loss: Number  # the step losses summed: minus the training bound (beta-weighted), summed over examples
    examples: Number  # training examples the steps saw
    first_bad_step: Number = -1  # global index of the first step whose loss is not finite; -1: none
    val_elbo: Number = 0.0
    val_bound: Number = 0.0  # the training estimator's own bound
    val_examples: Number = 0  # 0 when the epoch was not evaluated or there is no validation set
    test_elbo: Number = 0.0
    test_examples: Number = 0  # 0 when the epoch was not evaluated
    # Tensors with a NaN or an infinity after the epoch's steps (summed over ranks: only 0 matters).
    nonfinite_weights: Number = 0
    nonfinite_optimizer: Number = 0
    # The structure's metrics (``Structure.metrics``) summed over a split, ``{split}_{name}`` -> sum;
    # their counts are the split's examples.
    extra: dict[str, Number] = field(default_factory=dict)

    # A step index, not a sum: over ranks it is the earliest one any rank reports.
    EARLIEST: ClassVar[tuple[str, ...]] = ("first_bad_step",)

    @classmethod
    def _names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "extra"]

    def to_tensor(self) -> torch.Tensor:
        """The entries, then the extra sums by name, as one float64 vector on the device of the tensor
        entries (no host copy)."""
        values = [getattr(self, name) for name in self._names()] + [self.extra[k] for k in sorted(self.extra)]
        like = next(v for v in values if isinstance(v, torch.Tensor))
        # new_full fills on the device from a kernel argument: a host number needs no copy.
        return torch.stack(
            [v.double() if isinstance(v, torch.Tensor) else like.new_full((), v, dtype=torch.float64) for v in values]
        )

    def read_back(self, vector: torch.Tensor) -> EpochSums:
        """The entries of a vector laid out as :meth:`to_tensor` lays out these sums, as Python numbers
        (one ``tolist``: a host read)."""
        numbers = vector.tolist()
        count = len(self._names())
        return EpochSums(*numbers[:count], extra=dict(zip(sorted(self.extra), numbers[count:], strict=True)))

    @classmethod
    def earliest_entries(cls) -> tuple[int, ...]:
        """Positions in the vector of the entries reduced by the earliest over ranks (:attr:`EARLIEST`)."""
        names = cls._names()
        return tuple(names.index(name) for name in cls.EARLIEST)

    def means(self) -> dict[str, float | None]:
        """Per-example means in nats; ``None`` for what the epoch did not evaluate."""
        counts = {"val": self.val_examples, "test": self.test_examples}
        extra = {name: total / counts[name.split("_", 1)[0]] for name, total in sorted(self.extra.items())}
        return {
            "train_elbo": -self.loss / self.examples,
            "val_elbo": self.val_elbo / self.val_examples if self.val_examples else None,
            "val_bound": self.val_bound / self.val_examples if self.val_examples else None,
            "test_elbo": self.test_elbo / self.test_examples if self.test_examples else None,
            **extra,
        }


@dataclass
class Progress:
    """Counters that a checkpoint carries: completed epochs and steps, early-stopping state.

    The best epoch is the one with the highest ``val_bound``; ``best_val_elbo`` is its ``val_elbo``.
    """

    epoch: int = 0
    step: int = 0
    best_val_bound: float | None = None
    best_val_elbo: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    # The highest train ELBO per example so far, what train.divergence_nats measures a fall from;
    # None before the first epoch and in checkpoints written before the guard existed.
    best_train_elbo: float | None = None

    def observe(self, record: dict[str, Any], warming_up: bool = False) -> bool:
        """Track the best ``val_bound`` (the training estimator's bound); True when this epoch is the new best.

        Epochs without an evaluation (``train.eval_every``) do not count; without a validation set
        there is no best epoch and ``best.pt`` is not written. An epoch of the KL warm-up
        (``warming_up``) can be the best but never counts against the patience: the objective is
        still changing under it (Tomczak & Welling's early stopping waits out the warm-up so).
        The best train ELBO is tracked on every epoch, evaluated or not: the divergence guard needs
        no validation set.
        """
        train = record.get("train_elbo")
        if train is not None and (self.best_train_elbo is None or train > self.best_train_elbo):
            self.best_train_elbo = train
        val = record["val_bound"]
        if val is None:
            return False
        if self.best_val_bound is None or val > self.best_val_bound:
            self.best_val_bound, self.best_val_elbo = val, record["val_elbo"]
            self.best_epoch, self.bad_epochs = record["epoch"], 0
            return True
        self.bad_epochs = 0 if warming_up else self.bad_epochs + 1
        return False


def has_validation(dataset) -> bool:
    """Whether ``dataset`` has a validation split (``data.val_size``): without one there is no best epoch."""
    return dataset.val is not None and len(dataset.val) > 0


def sum_elbo(vae, x: torch.Tensor, batch_size: int, **data) -> torch.Tensor:
    """Sum over ``x`` of the one-sample ELBO at beta = 1, as a device scalar (no host read)."""
    return elbo_per_example(vae, x, batch_size=batch_size, **data).sum()


def sum_bound(estimator, vae, x: torch.Tensor, batch_size: int, **data) -> torch.Tensor:
    """Sum over ``x`` of the training estimator's own bound (``estimator.bound``, beta = 1), a device scalar."""
    # k draws per example: k times fewer examples per chunk keep the memory of the one-draw ELBO's.
    chunk = max(1, batch_size // estimator.particles)
    with torch.no_grad():
        parts = (estimator.bound(vae, xb, **db).sum() for xb, db in chunks(x, data, chunk))
        return sum(parts, x.new_zeros(()))


def epoch_losses(losses: list[torch.Tensor], first_step: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the epoch's losses, global index of its first non-finite loss or -1), on the device, no host sync."""
    if not losses:
        return torch.zeros((), device=device), torch.full((), -1, dtype=torch.int64, device=device)
    stacked = torch.stack(losses)
    bad = ~torch.isfinite(stacked)
    first_bad = torch.where(bad.any(), bad.int().argmax() + first_step, -1)
    return stacked.sum(), first_bad


@dataclass
class Epoch:
    """One epoch of a run, set up once: the steps over the context's batches, then the evaluation."""

    vae: nn.Module
    estimator: Any  # the training estimator: its bound, its draws per example, whether its bound is the ELBO
    step: Callable[[torch.Tensor, float], torch.Tensor]  # x, beta -> detached loss (pyro_vae.train.step)
    batches: BatchSource
    generator: torch.Generator  # the data's own stream: permutations, dynamic binarization
    context: SingleProcess
    dataset: Any
    device: torch.device
    steps: int  # per epoch, on every rank
    warmup_steps: int
    eval_batch_size: int
    optimizer: torch.optim.Optimizer | None = None  # its state is checked for NaN / inf with the weights
    warmup_by: str = "step"  # a key of WARMUPS

    def run(self, epoch: int, first_step: int, evaluated: bool, reporter) -> tuple[EpochSums, int, float]:
        """Train epoch ``epoch`` from global step ``first_step``; evaluate it when ``evaluated``.

        Returns the epoch's sums added over ranks and read to the host, the global step after the
        epoch, and the beta of its last step.
        """
        self.vae.train()
        reporter.start_epoch(epoch, self.steps)
        losses: list[torch.Tensor] = []  # device scalars: the step itself adds no kernel to sum them
        examples, step, beta = 0, first_step, 1.0
        for x, data in self.batches(epoch, self.generator):
            beta = WARMUPS[self.warmup_by](step, self.warmup_steps, self.steps)
            losses.append(self.step(x, beta, **data))
            examples += x.shape[0]
            step += 1
            reporter.advance()
        reporter.end_epoch()
        loss, first_bad = epoch_losses(losses, first_step, self.device)
        sums = EpochSums(loss=loss, examples=examples, first_bad_step=first_bad)
        if evaluated:  # at beta = 1, whatever the warm-up
            self.vae.eval()
            self.evaluate(sums)
        # Once per epoch, on the device: it travels in the epoch's one read, no step waits for it.
        sums.nonfinite_weights = count_nonfinite(self.vae.parameters(), self.device)
        sums.nonfinite_optimizer = count_nonfinite(optimizer_tensors(self.optimizer), self.device)
        return self.context.reduce(sums), step, beta

    def evaluate(self, sums: EpochSums) -> None:
        """Add the validation and test sums of this rank's block of each split (the context adds the blocks)."""
        if has_validation(self.dataset):
            val, data = self._rows("val")
            sums.val_elbo = sum_elbo(self.vae, val, self.eval_batch_size, **data)
            # The ELBO estimators' bound is the validation ELBO just computed: no second pass.
            sums.val_bound = (
                sums.val_elbo
                if self.estimator.bound_is_elbo
                else sum_bound(self.estimator, self.vae, val, self.eval_batch_size, **data)
            )
            sums.val_examples = len(val)
            self._add_metrics(sums, "val", val, data)
        test, data = self._rows("test")
        sums.test_elbo = sum_elbo(self.vae, test, self.eval_batch_size, **data)
        sums.test_examples = len(test)
        self._add_metrics(sums, "test", test, data)

    def _rows(self, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's block of a split and of the fields the structure consumes."""
        data = split_fields(self.dataset, split, self.vae.consumes)
        return self.context.shard_rows(getattr(self.dataset, split)), {
            name: self.context.shard_rows(value) for name, value in data.items()
        }

    def _add_metrics(self, sums: EpochSums, split: str, x: torch.Tensor, data: dict[str, torch.Tensor]) -> None:
        """The structure's own numbers (``Structure.metrics``), summed over this rank's block of the split."""
        labels = getattr(self.dataset, f"{split}_labels", None)
        labels = None if labels is None else self.context.shard_rows(labels)
        with torch.no_grad():
            for name, values in metric_sums(self.vae, x, labels, data, self.eval_batch_size).items():
                sums.extra[f"{split}_{name}"] = values


def optimizer_tensors(optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    """The tensors of ``optimizer``'s state (Adam's moments, SGD's momentum...); none without an optimizer."""
    if optimizer is None:
        return []
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def count_nonfinite(tensors: Iterable[torch.Tensor], device: torch.device) -> Number:
    """How many of ``tensors`` hold a NaN or an infinity, as a device scalar (no host read).

    Only floating tensors on ``device``'s kind count: a CPU step counter next to CUDA weights
    would need a copy, and a counter cannot be NaN anyway.
    """
    flags = [
        torch.isfinite(t).all().logical_not()
        for t in tensors
        if t.is_floating_point() and t.device.type == torch.device(device).type
    ]
    return torch.stack(flags).sum() if flags else 0


def state_problem(sums: EpochSums, record: dict[str, Any]) -> str | None:
    """What was not finite at the end of an epoch whose losses were (weights, optimizer state, numbers), or None.

    A step can turn the weights into NaN while its own loss is still finite (the last step of an
    epoch does so unseen by any loss): the epoch's evaluation is then NaN and its checkpoint unusable.
    """
    bad = ["weights"] if sums.nonfinite_weights else []
    bad += ["optimizer state"] if sums.nonfinite_optimizer else []
    numbers = ("train_elbo", "val_elbo", "val_bound", "test_elbo")
    bad += [name for name in numbers if record[name] is not None and not math.isfinite(record[name])]
    return f"non-finite {', '.join(dict.fromkeys(bad))}" if bad else None


def divergence_problem(record: dict[str, Any], progress: Progress, limit: float) -> str | None:
    """How far the epoch's train, validation or test ELBO fell below the best train ELBO, when more than ``limit``.

    An optimizer can explode without a NaN (Adam at a huge lr reaches an ELBO of -1e34 and stays
    finite): the fall from the best train ELBO so far is the sign. The epoch's own train ELBO counts
    as a best too, so the evaluation after a first epoch whose last step exploded is caught as well
    (a model whose held-out ELBO is 1e4 nats below its train ELBO is not a model). ``limit`` 0
    turns the check off; None otherwise.
    """
    if not limit:
        return None
    best = max(v for v in (progress.best_train_elbo, record["train_elbo"]) if v is not None)
    for name in ("train_elbo", "val_elbo", "test_elbo"):
        value = record[name]
        if value is not None and best - value > limit:
            return (
                f"{name} {value:.4g} fell {best - value:.4g} nats per example below the best train_elbo {best:.4g} "
                f"(train.divergence_nats={limit:g})"
            )
    return None


def check_finite(sums: EpochSums, epoch: int, progress: Progress, checkpoint: Path) -> None:
    """Raise :class:`NonFiniteLossError` naming the first bad step, if the epoch had one.

    ``progress`` still holds the previous epoch, as does ``checkpoint``: that is what a fix resumes from.
    """
    if sums.first_bad_step < 0:
        return
    bad = int(sums.first_bad_step)
    raise NonFiniteLossError(
        f"non-finite loss at epoch {epoch}, step {bad - progress.step + 1} of the epoch "
        f"(global step {bad + 1}); {checkpoint} still holds epoch {progress.epoch}. "
        "Try a lower train.lr, train.clip_norm, or a longer train.warmup_epochs.",
        epoch=epoch,
        step=bad + 1,
    )


def epoch_record(epoch: int, sums: EpochSums, *, beta: float, lr: float, seconds: float, steps: int) -> dict[str, Any]:
    """The epoch's line of ``metrics.jsonl`` (keys in ``docs/training.md``)."""
    return {"epoch": epoch, **sums.means(), "beta": beta, "lr": lr, "seconds": seconds, "steps": steps}
