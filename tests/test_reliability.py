"""The divergence guard (no broken epoch reaches the run folder) and the one-writer lock on a run folder."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_train import STEPS_PER_EPOCH, _metrics, tiny

from pyro_vae import checkpoint as ckpt
from pyro_vae import cli
from pyro_vae.config import save_config
from pyro_vae.train import DivergenceError, NonFiniteLossError, RunFolderLockedError, TrainingError, train
from pyro_vae.train import loop as train_module
from pyro_vae.train.epoch import EpochSums, Progress, count_nonfinite, divergence_problem, state_problem

KEPT = ("checkpoint.pt", "best.pt", "metrics.jsonl")


class _BreakAt:
    """A TrainStep whose step number ``at`` (1-based, of this run) breaks the state *after* its loss.

    ``how(vae, optimizer)`` does the damage, as a huge update would: the loss the step returns is
    still finite, so only the end-of-epoch check can see it.
    """

    def __init__(self, at: int, how) -> None:
        self.at, self.how, self.calls = at, how, 0
        self.real = train_module.TrainStep

    def __call__(self, vae, estimator, optimizer, *args, **kwargs):
        inner = self.real(vae, estimator, optimizer, *args, **kwargs)

        def step(x, beta=1.0):
            loss = inner(x, beta)
            self.calls += 1
            if self.calls == self.at:
                with torch.no_grad():
                    self.how(vae, optimizer)
            return loss

        return step


def _inf_weight(vae, optimizer):
    next(vae.parameters()).view(-1)[0] = float("inf")


def _nan_optimizer_state(vae, optimizer):
    state = next(iter(optimizer.state.values()))
    state["exp_avg_sq"].view(-1)[0] = float("nan")


def _huge_decoder_bias(vae, optimizer):
    """Finite but absurd weights: the ELBO falls by about 1e6 nats and nothing is NaN."""
    bias = [p for name, p in vae.named_parameters() if name.startswith("decoder") and name.endswith("bias")][-1]
    bias += 1e5


def _bytes(run_dir):
    return {name: (run_dir / name).read_bytes() for name in KEPT}


def _one_good_epoch(tmp_path):
    run_dir = tmp_path / "run"
    train(tiny("train.epochs=1"), run_dir, progress=False)
    return run_dir, _bytes(run_dir)


@pytest.mark.parametrize(
    ("how", "what"),
    [(_inf_weight, "non-finite weights"), (_nan_optimizer_state, "non-finite optimizer state")],
)
def test_a_state_broken_after_the_last_loss_of_an_epoch_writes_nothing(tmp_path, monkeypatch, how, what):
    run_dir, before = _one_good_epoch(tmp_path)
    breaker = _BreakAt(STEPS_PER_EPOCH, how)  # the last step of epoch 2: no later loss sees it
    monkeypatch.setattr(train_module, "TrainStep", breaker)
    with pytest.raises(DivergenceError) as info:
        train(tiny("train.epochs=2"), run_dir, resume=True, progress=False)
    message = str(info.value)
    assert "\n" not in message and info.value.epoch == 2 and info.value.step == 2 * STEPS_PER_EPOCH
    assert f"training diverged at epoch 2 (global step {2 * STEPS_PER_EPOCH}): {what}" in message
    assert "checkpoint.pt (epoch 1) and best.pt (epoch 1) are untouched" in message
    assert f"pyro-vae train --resume --out {run_dir} --set train.lr=0.001" in message
    assert _bytes(run_dir) == before  # byte for byte: no checkpoint, no best.pt, no metrics line of epoch 2

    monkeypatch.setattr(train_module, "TrainStep", breaker.real)  # the advice works: the folder resumes
    result = train(tiny("train.epochs=2", "train.lr=0.001"), run_dir, resume=True, progress=False)
    assert result["epoch"] == 2 and [r["epoch"] for r in _metrics(run_dir)] == [1, 2]


def test_a_finite_explosion_is_caught_by_the_fall_of_the_elbo(tmp_path, monkeypatch):
    run_dir, before = _one_good_epoch(tmp_path)
    monkeypatch.setattr(train_module, "TrainStep", _BreakAt(STEPS_PER_EPOCH, _huge_decoder_bias))
    with pytest.raises(DivergenceError, match=r"at epoch 2 .*: val_elbo -\S+ fell \S+ nats per example below"):
        train(tiny("train.epochs=2"), run_dir, resume=True, progress=False)
    assert _bytes(run_dir) == before


def test_divergence_nats_0_turns_the_fall_check_off(tmp_path, monkeypatch):
    run_dir, _ = _one_good_epoch(tmp_path)
    monkeypatch.setattr(train_module, "TrainStep", _BreakAt(STEPS_PER_EPOCH, _huge_decoder_bias))
    result = train(tiny("train.epochs=2", "train.divergence_nats=0"), run_dir, resume=True, progress=False)
    assert result["epoch"] == 2 and result["metrics"]["val_elbo"] < -1e4


def test_the_fall_is_measured_from_the_best_train_elbo():
    record = {"train_elbo": -120.0, "val_elbo": None, "test_elbo": None}
    assert divergence_problem(record, Progress(best_train_elbo=-100.0), 50.0) is None
    assert "train_elbo -120 fell 20 nats" in divergence_problem(record, Progress(best_train_elbo=-100.0), 10.0)
    assert divergence_problem(record, Progress(best_train_elbo=-100.0), 0) is None
    # A first epoch has no best yet: its own train ELBO is the reference for its evaluation.
    first = {"train_elbo": -120.0, "val_elbo": -130.0, "test_elbo": -1e34}
    assert "test_elbo -1e+34 fell" in divergence_problem(first, Progress(), 1e4)


def test_state_problem_names_what_is_not_finite():
    record = {"train_elbo": -1.0, "val_elbo": float("nan"), "val_bound": float("nan"), "test_elbo": None}
    sums = EpochSums(loss=1.0, examples=1.0, nonfinite_weights=2.0)
    assert state_problem(sums, record) == "non-finite weights, val_elbo, val_bound"
    assert state_problem(EpochSums(loss=1.0, examples=1.0), {**record, "val_elbo": -1.0, "val_bound": -1.0}) is None


def test_count_nonfinite_stays_on_the_device_and_counts_tensors():
    tensors = [torch.zeros(3), torch.tensor([1.0, float("inf")]), torch.tensor([float("nan")]), torch.arange(3)]
    count = count_nonfinite(tensors, torch.device("cpu"))
    assert isinstance(count, torch.Tensor) and int(count) == 2
    assert count_nonfinite([], torch.device("cpu")) == 0


def test_the_best_train_elbo_is_checkpointed_and_an_older_checkpoint_without_it_resumes(tmp_path):
    run_dir, _ = _one_good_epoch(tmp_path)
    state = ckpt.load_checkpoint(run_dir / "checkpoint.pt")
    assert state["best_train_elbo"] == _metrics(run_dir)[0]["train_elbo"]
    del state["best_train_elbo"]  # as written before the divergence guard existed
    ckpt.save_checkpoint(state, run_dir / "checkpoint.pt")
    result = train(tiny("train.epochs=2"), run_dir, resume=True, progress=False)
    assert result["epoch"] == 2
    assert ckpt.load_checkpoint(run_dir / "checkpoint.pt")["best_train_elbo"] is not None


def test_the_cli_prints_one_line_and_exits_failed(tmp_path, monkeypatch, capsys):
    config_file = tmp_path / "tiny.toml"
    save_config(tiny("train.epochs=2"), config_file)
    monkeypatch.setattr(train_module, "TrainStep", _BreakAt(2 * STEPS_PER_EPOCH, _inf_weight))
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(config_file), "--out", str(out), "--no-progress"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pyro-vae train: training diverged at epoch 2") and "Traceback" not in "".join(err)
    assert ckpt.load_checkpoint(out / "checkpoint.pt")["epoch"] == 1


def test_a_nan_loss_is_still_named_by_its_step(tmp_path):
    with pytest.raises(NonFiniteLossError, match="non-finite loss at epoch 1"):
        train(tiny("train.epochs=2", "train.lr=1e30", "train.optimizer=sgd"), tmp_path / "run", progress=False)


# -- one writer per run folder -----------------------------------------------------------------------
HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("held", flush=True)
sys.stdin.read()
"""


def _hold_lock(run_dir):
    """Another process holding ``run_dir``'s lock, as a second ``pyro-vae train`` would."""
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir / ".lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_is_refused_with_the_holders_pid_until_it_is_gone(tmp_path):
    run_dir = tmp_path / "run"
    holder = _hold_lock(run_dir)
    try:
        with pytest.raises(RunFolderLockedError) as info:
            train(tiny("train.epochs=1"), run_dir, progress=False)
    finally:
        holder.kill()  # as kill -9: the kernel drops its lock, nothing stale is left
        holder.wait()
    message = str(info.value)
    assert "\n" not in message and str(run_dir) in message and f"PID {holder.pid}" in message
    assert not (run_dir / "config.toml").exists() and not (run_dir / "checkpoint.pt").exists()  # nothing written
    assert train(tiny("train.epochs=1"), run_dir, progress=False)["epoch"] == 1


def test_a_second_resume_is_refused_and_the_cli_says_so_in_one_line(tmp_path, capsys):
    run_dir, before = _one_good_epoch(tmp_path)
    config = (run_dir / "config.toml").read_bytes()
    holder = _hold_lock(run_dir)
    capsys.readouterr()  # the first epoch's lines
    try:
        status = cli.main(["train", "--resume", "--out", str(run_dir), "--set", "train.epochs=2", "--no-progress"])
    finally:
        holder.stdin.close()  # a clean exit this time
        holder.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert status == cli.EXIT_USAGE and len(err) == 1 and f"PID {holder.pid}" in err[0]
    assert _bytes(run_dir) == before and (run_dir / "config.toml").read_bytes() == config
    assert train(tiny("train.epochs=2"), run_dir, resume=True, progress=False)["epoch"] == 2


def test_the_lock_is_held_for_the_run_and_released_after(tmp_path, monkeypatch):
    seen = []
    real = train_module.train_epoch

    def train_epoch(run, epoch):  # a second writer arriving in the middle of the run
        seen.append(run.folder.lock(resume=True) is None)
        return real(run, epoch)

    monkeypatch.setattr(train_module, "train_epoch", train_epoch)
    run_dir = tmp_path / "run"
    train(tiny("train.epochs=1"), run_dir, progress=False)
    assert seen == [False]
    assert (run_dir / ".lock").is_file()  # left in place, unlocked: the next run takes the same file
    monkeypatch.setattr(train_module, "train_epoch", real)
    assert train(tiny("train.epochs=2"), run_dir, resume=True, progress=False)["epoch"] == 2


def test_stale_temporary_files_are_removed_on_start(tmp_path):
    run_dir, _ = _one_good_epoch(tmp_path)
    stale = [run_dir / ".checkpoint.pt.99999.tmp", run_dir / ".best.pt.99999.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    train(tiny("train.epochs=2"), run_dir, resume=True, progress=False)
    assert not any(path.exists() for path in stale)


def test_a_failed_resume_leaves_config_toml_byte_identical_and_the_folder_unlocked(tmp_path):
    run_dir, before = _one_good_epoch(tmp_path)
    config = (run_dir / "config.toml").read_bytes()
    with pytest.raises(TrainingError, match="different model"):
        train(tiny("train.epochs=2", "model.z_dim=3"), run_dir, resume=True, progress=False)
    assert (run_dir / "config.toml").read_bytes() == config and _bytes(run_dir) == before
    assert train(tiny("train.epochs=2"), run_dir, resume=True, progress=False)["epoch"] == 2


def test_kill_9_at_a_random_moment_then_resume_gives_the_uninterrupted_run(tmp_path):
    """SIGKILL at random moments of a tiny run's training (checkpoint writes included), then
    ``--resume``: the final checkpoint (weights, Adam moments, RNG states) and the metrics equal an
    uninterrupted run's (``benchmarks/reliability.py`` measures it over many kills)."""
    import importlib

    reliability = importlib.import_module("benchmarks.reliability")
    outcome = reliability.kills(3, tmp_path, seed=1)
    assert outcome["tried"] >= 1 and outcome.get("not exact", 0) == 0, outcome
