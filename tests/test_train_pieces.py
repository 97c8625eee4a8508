"""The training loop's pieces on their own: the epoch and its sums, early stopping, the run folder.

``tests/test_train.py`` checks them together through ``train()``; the distributed context has its
own tests in ``tests/test_distributed.py``.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pyro_vae import checkpoint as ckpt
from pyro_vae.config import load_config
from pyro_vae.train import NonFiniteLossError, TrainingError
from pyro_vae.train.distributed import SingleProcess
from pyro_vae.train.epoch import Epoch, EpochSums, Progress, check_finite, epoch_record
from pyro_vae.train.run_folder import Reporter, RunFolder, format_record


def test_epoch_sums_travel_as_one_float64_vector_and_come_back_by_name():
    sums = EpochSums(
        loss=torch.tensor(-12.5),
        examples=5,
        first_bad_step=torch.tensor(-1),
        val_elbo=torch.tensor(-3.0),
        val_bound=torch.tensor(-2.5),
        val_examples=2,
    )
    vector = sums.to_tensor()
    assert vector.dtype == torch.float64 and vector.shape == (len(fields(EpochSums)) - 1,)  # no extra sums
    back = sums.read_back(vector)
    assert back == EpochSums(-12.5, 5.0, -1.0, -3.0, -2.5, 2.0, 0.0, 0.0)
    assert back.means() == {"train_elbo": 2.5, "val_elbo": -1.5, "val_bound": -1.25, "test_elbo": None}
    assert EpochSums.earliest_entries() == (2,) and vector[2] == -1


def test_epoch_sums_carry_a_structures_metrics_after_the_named_entries():
    sums = EpochSums(loss=-4.0, examples=2, test_examples=4, val_examples=2)
    sums.extra = {"val_accuracy": torch.tensor(1.0), "test_accuracy": torch.tensor(3.0)}
    vector = sums.to_tensor()
    assert vector.tolist()[-2:] == [3.0, 1.0]  # sorted by name: test_accuracy, val_accuracy
    back = sums.read_back(vector)
    assert back.extra == {"test_accuracy": 3.0, "val_accuracy": 1.0}
    means = back.means()
    assert means["test_accuracy"] == 0.75 and means["val_accuracy"] == 0.5


def test_epoch_record_has_the_metrics_keys_in_order():
    sums = EpochSums(loss=-20.0, examples=4.0, test_elbo=-9.0, test_examples=3.0)
    record = epoch_record(2, sums, beta=0.5, lr=0.01, seconds=1.5, steps=8)
    assert list(record) == [
        "epoch",
        "train_elbo",
        "val_elbo",
        "val_bound",
        "test_elbo",
        "beta",
        "lr",
        "seconds",
        "steps",
    ]
    assert (record["train_elbo"], record["val_elbo"], record["test_elbo"]) == (5.0, None, -3.0)
    line = format_record(record, epochs=3)
    assert line.startswith("epoch   2/3  train 5.00  test -3.00  beta 0.500  lr 0.01") and "val" not in line
    record["test_accuracy"] = 0.875  # a structure's own number is shown after the bounds
    assert "test -3.00  test accuracy 0.875  beta 0.500" in format_record(record, epochs=3)


def test_progress_keeps_the_best_bound_and_counts_evaluated_epochs_without_progress():
    def record(epoch, bound, elbo=None):
        return {"epoch": epoch, "val_bound": bound, "val_elbo": bound if elbo is None else elbo}

    progress = Progress()
    assert progress.observe(record(1, -5.0)) and progress.best_epoch == 1
    assert not progress.observe(record(2, None)) and progress.bad_epochs == 0  # not evaluated: does not count
    assert not progress.observe(record(3, -6.0)) and progress.bad_epochs == 1
    assert progress.observe(record(4, -4.0, -4.5))
    assert (progress.best_epoch, progress.best_val_bound, progress.best_val_elbo, progress.bad_epochs) == (
        4,
        -4.0,
        -4.5,
        0,
    )


def test_a_non_finite_step_is_named_with_the_checkpoint_that_still_holds_the_last_good_epoch(tmp_path):
    progress = Progress(epoch=2, step=8)
    check_finite(EpochSums(loss=0.0, examples=1.0, first_bad_step=-1.0), 3, progress, tmp_path / "checkpoint.pt")
    with pytest.raises(NonFiniteLossError, match=r"epoch 3, step 2 of the epoch \(global step 10\).* holds epoch 2"):
        check_finite(EpochSums(loss=0.0, examples=1.0, first_bad_step=9.0), 3, progress, tmp_path / "checkpoint.pt")


def _epoch(step, x: torch.Tensor, batch_size: int, warmup_steps: int) -> Epoch:
    dataset = SimpleNamespace(train_epoch=lambda epoch, generator: x, val=None, test=x)
    context = SingleProcess()
    return Epoch(
        vae=nn.Linear(1, 1),
        estimator=None,
        step=step,
        batches=context.batches(dataset, batch_size, seed=0),
        generator=torch.Generator().manual_seed(0),
        context=context,
        dataset=dataset,
        device=torch.device("cpu"),
        steps=context.steps_per_epoch(len(x), batch_size),
        warmup_steps=warmup_steps,
        eval_batch_size=4,
    )


def test_an_epoch_ramps_beta_per_global_step_and_sums_its_losses():
    calls = []

    def step(batch, beta):
        calls.append((len(batch), beta))
        return batch[:, 0].sum()

    x = torch.arange(5.0).unsqueeze(-1)
    epoch = _epoch(step, x, batch_size=2, warmup_steps=6)
    assert epoch.steps == 3
    quiet = Reporter(None, bar=False, active=False, epochs=2)
    sums, step_after, beta = epoch.run(2, first_step=3, evaluated=False, reporter=quiet)
    assert calls == [(2, 4 / 6), (2, 5 / 6), (1, 1.0)]  # the global step drives the ramp, not the epoch's
    assert (step_after, beta) == (6, 1.0)
    assert sums == EpochSums(loss=10.0, examples=5.0, first_bad_step=-1.0)


def test_an_epoch_finds_its_first_non_finite_step_without_reading_the_host_per_step():
    losses = iter([1.0, math.inf, math.nan])
    epoch = _epoch(lambda batch, beta: torch.tensor(next(losses)), torch.zeros(5, 1), batch_size=2, warmup_steps=0)
    sums, _, _ = epoch.run(1, first_step=10, evaluated=False, reporter=Reporter(None, False, False, 1))
    assert sums.first_bad_step == 11


def _tiny_config():
    return load_config(None, ["data.name=synthetic(num_train=20, num_test=10, side=2)", "train.device=cpu"])


def test_the_run_folder_writes_metrics_best_and_checkpoint_and_never_overwrites_a_run(tmp_path):
    cfg = _tiny_config()
    folder = RunFolder(tmp_path / "run", active=True)
    assert folder.open(cfg, resume=False) is None and (tmp_path / "run" / "config.toml").is_file()
    folder.write_epoch({"epoch": 1}, {"x": torch.zeros(1)}, improved=True)
    folder.write_epoch({"epoch": 2}, {"x": torch.ones(1)}, improved=False)
    assert ckpt.load_checkpoint(tmp_path / "run" / "best.pt")["x"].item() == 0
    assert ckpt.load_checkpoint(folder.checkpoint)["x"].item() == 1
    folder.truncate_metrics(1)  # as on resume from a checkpoint of epoch 1
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]
    with pytest.raises(TrainingError, match="already holds a run"):
        folder.open(cfg, resume=False)


def test_the_run_folder_of_a_rank_other_than_0_writes_nothing(tmp_path):
    cfg = _tiny_config()
    folder = RunFolder(tmp_path / "rank1", active=False)
    assert folder.open(cfg, resume=False) is None
    reporter = folder.reporter(bar=None, epochs=1)
    reporter.line("not printed")
    folder.save_checkpoint({"x": torch.zeros(1)})
    folder.write_epoch({"epoch": 1}, {"x": torch.zeros(1)}, improved=True)
    folder.truncate_metrics(0)
    assert folder.finish(cfg, None, None, reporter) is None
    reporter.close()
    assert not (tmp_path / "rank1").exists()
