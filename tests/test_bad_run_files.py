"""Damaged checkpoints and run folders are one line naming the file, the entry and what to do, from
evaluate, sample, plot and train --resume; and a Ctrl-C during a checkpoint write finishes or abandons
it atomically, the interruption reporting the epoch that checkpoint.pt really holds."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from test_train import STEPS_PER_EPOCH, _assert_same_state, _metrics, tiny

from pyro_vae import checkpoint as ckpt
from pyro_vae import cli
from pyro_vae.runs import RunFolderError, RunFolderWarning, load_run, read_metrics
from pyro_vae.train import TrainingError, train

DEVICE = ["--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-epoch tiny run; tests copy it before damaging it."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train(tiny("train.epochs=2"), run_dir, progress=False)
    return run_dir


@pytest.fixture
def run_dir(trained, tmp_path):
    copy = tmp_path / "run"
    copy.mkdir()
    for path in trained.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    return copy


def _edit(path, edit) -> None:
    state = ckpt.load_checkpoint(path)
    edit(state)
    ckpt.save_checkpoint(state, path)


def _cli(capsys, *argv: str) -> tuple[int, list[str]]:
    status = cli.main(list(argv))
    return status, capsys.readouterr().err.strip().splitlines()


COMMANDS = {
    "evaluate": lambda run: ["evaluate", "--run", str(run), "--nll-samples", "0", *DEVICE],
    "sample": lambda run: ["sample", "--run", str(run), "--num", "4", "--out", str(run / "s.png"), *DEVICE],
    "plot": lambda run: ["plot", "--run", str(run), *DEVICE],
    "resume": lambda run: ["train", "--resume", "--out", str(run), "--set", "train.epochs=3", "--no-progress"],
}


def _drop(entry):
    return lambda state: state.pop(entry)


def _misshape(state):
    key = next(iter(state["model"]))
    state["model"][key] = torch.zeros(3, 3)


@pytest.mark.parametrize(
    ("command", "edit", "phrase"),
    [
        ("evaluate", _drop("model"), "has no 'model' entry"),
        ("sample", _drop("x_dim"), "has no 'x_dim' entry"),
        ("plot", _misshape, "the 'model' entry of {path} does not fit the VAE its config describes (size mismatch"),
        ("resume", _drop("rng"), "has no 'rng' entry"),
        ("resume", _drop("optimizer"), "has no 'optimizer' entry"),
        ("resume", _misshape, "the 'model' entry of {path} does not fit"),
    ],
)
def test_a_damaged_checkpoint_is_one_line_naming_the_file_and_entry(run_dir, capsys, command, edit, phrase):
    names = ["checkpoint.pt"] if command == "resume" else ["best.pt", "checkpoint.pt"]
    for name in names:
        _edit(run_dir / name, edit)
    path = run_dir / names[0]
    status, err = _cli(capsys, *COMMANDS[command](run_dir))
    assert status == cli.EXIT_USAGE and len(err) == 1 and "Traceback" not in err[0], err
    assert phrase.format(path=path) in err[0] and str(path) in err[0]
    assert "train the run again" in err[0]  # what to do


def test_a_checkpoint_whose_config_disagrees_with_its_tensors(run_dir):
    _edit(run_dir / "best.pt", lambda state: state["config"]["model"].update(z_dim=3))
    with pytest.warns(RunFolderWarning), pytest.raises(ckpt.CheckpointError, match=r"'model' entry of .*best\.pt"):
        load_run(run_dir, device="cpu", load_data=False)


def test_a_pickled_payload_is_refused_in_the_projects_words(run_dir, capsys):
    class Payload:
        def __reduce__(self):
            return (os.getcwd, ())

    torch.save({"format": ckpt.FORMAT, "version": ckpt.VERSION, "model": Payload()}, run_dir / "best.pt")
    status, err = _cli(capsys, *COMMANDS["evaluate"](run_dir))
    assert status == cli.EXIT_USAGE and len(err) == 1
    assert f"refusing to load {run_dir / 'best.pt'}: it contains a pickled object (posix.getcwd)" in err[0]
    assert "weights_only" not in err[0] and "documentation" not in err[0]  # not torch's advice to turn it off


def test_resume_with_another_optimizer_is_one_line(run_dir, capsys):
    before = (run_dir / "config.toml").read_bytes()
    status, err = _cli(capsys, *COMMANDS["resume"](run_dir), "--set", "train.optimizer=sgd")
    assert status == cli.EXIT_USAGE and len(err) == 1, err
    assert "cannot resume" in err[0] and "train.optimizer=sgd" in err[0] and "the state of adam" in err[0]
    assert "drop that --set" in err[0]
    assert (run_dir / "config.toml").read_bytes() == before
    with pytest.raises(TrainingError, match=r"adam\(eps=0.1\)"):  # arguments too: torch would keep the old ones
        train(tiny("train.epochs=3", "train.optimizer=adam(eps=0.1)"), run_dir, resume=True, progress=False)
    assert train(tiny("train.epochs=3", "train.lr=0.005"), run_dir, resume=True, progress=False)["epoch"] == 3


def test_evaluate_says_when_config_toml_no_longer_describes_the_checkpoint(run_dir, capsys):
    text = (run_dir / "config.toml").read_text()
    (run_dir / "config.toml").write_text(text.replace("z_dim = 2", "z_dim = 7"))
    status, err = _cli(capsys, *COMMANDS["sample"](run_dir))
    assert status == 0 and len(err) == 1, err
    assert err[0].startswith(f"pyro-vae sample: warning: {run_dir / 'config.toml'} differs from the config saved in")
    assert "model.z_dim: 2 -> 7" in err[0] and "using the checkpoint's" in err[0]
    with pytest.warns(RunFolderWarning, match="z_dim"):
        assert load_run(run_dir, device="cpu", load_data=False).config.model.z_dim == 2


# -- metrics.jsonl --------------------------------------------------------------------------------------
def test_a_bad_metrics_line_names_the_file_and_line(run_dir, capsys):
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n{not json\n" + lines[1] + "\n")
    with pytest.raises(RunFolderError, match=rf"{path} line 2 is not a metrics record"):
        read_metrics(run_dir)
    status, err = _cli(capsys, *COMMANDS["plot"](run_dir))
    assert status == cli.EXIT_USAGE and len(err) == 1 and f"{path} line 2" in err[0]
    status, err = _cli(capsys, *COMMANDS["resume"](run_dir))
    assert status == cli.EXIT_USAGE and f"{path} line 2" in err[-1]


def test_a_torn_last_metrics_line_is_dropped_on_resume(run_dir):
    # kill -9 in the middle of appending epoch 3's line: no checkpoint holds epoch 3
    path = run_dir / "metrics.jsonl"
    path.write_text(path.read_text() + '{"epoch": 3, "train_el')
    with pytest.raises(RunFolderError, match="line 3"):
        read_metrics(run_dir)
    assert train(tiny("train.epochs=3"), run_dir, resume=True, progress=False)["epoch"] == 3
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1, 2, 3]


# -- Ctrl-C during a checkpoint write ---------------------------------------------------------------------
def _cut_short(real, how: str):
    """A ``torch.save`` that is interrupted while writing epoch 2's checkpoint.pt.

    ``raise``: a KeyboardInterrupt out of torch.save itself; ``inside``: out of a write torch.save makes,
    which torch's zip writer turns into a RuntimeError while cleaning up (what a real Ctrl-C does)."""

    def save(obj, handle, *args, **kwargs):
        if obj.get("epoch") != 2 or ".checkpoint.pt." not in handle.name:
            return real(obj, handle, *args, **kwargs)
        if how == "raise":
            handle.write(b"half a checkpoint")
            raise KeyboardInterrupt

        class Cut:
            writes = 0

            def write(self, data):
                Cut.writes += 1
                if Cut.writes == 3:
                    raise KeyboardInterrupt
                return handle.write(data)

            def flush(self):
                handle.flush()

        return real(obj, Cut(), *args, **kwargs)

    return save


@pytest.mark.parametrize("how", ["raise", "inside"])
def test_ctrl_c_during_a_save_abandons_it_and_names_the_epoch_the_file_holds(tmp_path, monkeypatch, capsys, how):
    full = tmp_path / "full"
    train(tiny("train.epochs=3"), full, progress=False)
    run_dir = tmp_path / "run"
    train(tiny("train.epochs=1"), run_dir, progress=False)
    before = (run_dir / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(torch, "save", _cut_short(torch.save, how))
    capsys.readouterr()
    status, err = _cli(capsys, "train", "--resume", "--out", str(run_dir), "--set", "train.epochs=3", "--no-progress")
    monkeypatch.undo()
    assert status == cli.EXIT_INTERRUPTED and "Traceback" not in "\n".join(err), err
    assert err[-1].startswith("interrupted during epoch 2; ")
    assert f"{run_dir / 'checkpoint.pt'} holds epoch 1 (step {STEPS_PER_EPOCH})" in err[-1]
    assert (run_dir / "checkpoint.pt").read_bytes() == before  # byte for byte the epoch-1 checkpoint
    assert not list(run_dir.glob(".*.tmp"))
    # the resume goes on from epoch 1 and ends where the uninterrupted run ended
    assert train(tiny("train.epochs=3"), run_dir, resume=True, progress=False)["epoch"] == 3
    _assert_same_state(ckpt.load_checkpoint(full / "checkpoint.pt"), ckpt.load_checkpoint(run_dir / "checkpoint.pt"))
    assert _metrics(full) == _metrics(run_dir)


def test_a_real_ctrl_c_during_a_save_lets_it_finish_then_stops(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real = ckpt.save_checkpoint

    def save(state, path):
        if state["epoch"] == 2 and path.name == "checkpoint.pt":
            os.kill(os.getpid(), signal.SIGINT)  # arrives while the file is being written
        return real(state, path)

    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    result = train(tiny("train.epochs=3"), run_dir, progress=False)
    assert result["status"] == "interrupted" and result["epoch"] == 2
    assert ckpt.load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == 2
    assert f"checkpoint.pt holds epoch 2 (step {2 * STEPS_PER_EPOCH})" in (run_dir / "train.log").read_text()


def test_deferred_interrupt_waits_for_its_block_and_a_second_ctrl_c_does_not():
    done = []
    with pytest.raises(KeyboardInterrupt), ckpt.deferred_interrupt():
        os.kill(os.getpid(), signal.SIGINT)
        done.append("finished")
    assert done == ["finished"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt), ckpt.deferred_interrupt():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        done.append("not reached")
    assert done == ["finished"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
