"""The ``pyro-vae`` command: end to end through ``python -m pyro_vae``, and every error path in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyro_vae import cli
from pyro_vae.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]

TINY_SETS = [
    "model.z_dim=2",
    "model.hidden_dims=[16]",
    "train.epochs=2",
    "train.batch_size=100",
    "train.nll_samples=10",
    "train.device=cpu",
]


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def pyro_vae(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m pyro_vae ARGS`` in a subprocess; stderr is not a terminal, so no progress bar."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "pyro_vae", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text('[data]\nname = "synthetic(num_train=500, num_test=200)"\n\n[train]\nseed = 3\n')
    return path


def test_end_to_end_on_synthetic(tmp_path, config_file):
    out = tmp_path / "run"
    done = pyro_vae("train", "--config", str(config_file), "--out", str(out), *_sets(*TINY_SETS), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    lines = [line for line in done.stderr.splitlines() if line.startswith("epoch")]
    assert len(lines) == 2 and "\r" not in done.stderr  # plain lines, no bar, off a terminal
    for name in ("config.toml", "metrics.jsonl", "checkpoint.pt", "best.pt", "evaluation.json", "train.log"):
        assert (out / name).is_file(), name
    assert {p.name for p in out.glob("*.png")} >= {"learning_curves.png", "samples.png", "reconstructions.png"}
    assert load_checkpoint(out / "checkpoint.pt")["config"]["train"]["seed"] == 3

    done = pyro_vae("evaluate", "--run", str(out), "--nll-samples", "20", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(cli.CONTRACT_KEYS) <= set(result)
    assert result["num_examples"] == 200 and result["test_nll"] > 0 > result["test_elbo"]
    assert result["test_nll_se"] > 0 and result["bits_per_dim"] == pytest.approx(
        result["test_nll"] / (64 * 0.6931471805599453)
    )

    # The other commands in-process (each subprocess costs an interpreter start-up importing torch and Pyro).
    assert cli.main(["sample", "--run", str(out), "--num", "9", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0
    (out / "samples.png").unlink()
    assert cli.main(["plot", "--run", str(out)]) == 0
    assert (out / "samples.png").is_file()


def test_end_to_end_on_an_mnist_subset(tmp_path, data_root, capsys):
    out = tmp_path / "mnist"
    sets = _sets(*TINY_SETS, "data.name=mnist", "data.subset=300", "train.epochs=1")
    done = pyro_vae(
        "train",
        "--out",
        str(out),
        "--data-dir",
        str(data_root),
        "--config",
        _mnist_config(tmp_path),
        *sets,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["epoch"] == 1 and record["steps"] == 3 and record["test_elbo"] < 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["num_examples"] == 300 and evaluation["x_dim"] == 784
    assert "not a likelihood" in evaluation["warning"]  # Bernoulli on grey levels is flagged

    assert cli.main(["evaluate", "--run", str(out), "--data-dir", str(data_root), "--nll-samples", "0"]) == 0
    printed = capsys.readouterr().out
    assert all(key in printed for key in cli.CONTRACT_KEYS)

    subset = ["evaluate", "--run", str(out), "--data-dir", str(data_root), "--nll-samples", "0", "--subset", "7"]
    assert cli.main([*subset, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_examples"] == 7


def _mnist_config(tmp_path: Path) -> str:
    path = tmp_path / "mnist_tiny.toml"
    path.write_text('[data]\nname = "mnist"\n')
    return str(path)


def test_resume_through_the_command(tmp_path, config_file, capsys):
    out = tmp_path / "run"
    sets = [*_sets(*TINY_SETS, "train.epochs=1", "train.nll_samples=0", "train.plots=false")]
    assert cli.main(["train", "--config", str(config_file), "--out", str(out), "--no-progress", *sets]) == 0
    assert cli.main(["train", "--resume", "--out", str(out), "--set", "train.epochs=2", "--no-progress"]) == 0
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert "resuming" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["train", "--out", "{out}", "--config", "{cfg}", "--set", "model.zdim=3"],
            "unknown key 'zdim' in [model] (did you mean \"z_dim\"?); valid keys: z_dim",
        ),
        (["train", "--out", "{out}", "--config", "{cfg}", "--set", "model.prior=gausian"], "unknown prior 'gausian'"),
        (
            ["train", "--out", "{out}", "--config", "{cfg}", "--set", "train.estimator=iwea(k=5)"],
            "unknown estimator 'iwea'",
        ),
        (["train", "--out", "{out}", "--config", "{cfg}", "--set", "train.optimizer=adan"], "unknown optimizer 'adan'"),
        (["train", "--out", "{out}", "--config", "{cfg}", "--set", "train.epochs=many"], "train.epochs"),
        (["train", "--out", "{out}", "--config", "{cfg}", "--set", "epochs=3"], "--set expects section.key=value"),
        (["train", "--out", "{out}", "--config", "{tmp}/missing.toml"], "missing.toml does not exist"),
        (["train"], "train needs --config FILE"),
        (["train", "--resume"], "--resume needs --out DIR"),
        (["train", "--resume", "--out", "{tmp}/nowhere"], "nothing to resume"),
        (
            ["train", "--out", "{out}", "--config", "{cfg}", "--set", "data.name=mnist", "--data-dir", "{tmp}/empty"],
            "dataset 'mnist' not found",
        ),
        (["train", "--out", "{out}", "--config", "{cfg}", "--device", "cuda:7"], "cuda"),
        (["evaluate", "--run", "{tmp}/nowhere"], "run folder"),
        (["sample", "--run", "{tmp}", "--out", "{tmp}/x.png"], "no checkpoint in"),
        (["compare", "--run", "{tmp}", "--estimators", ","], "--estimators is empty"),
    ],
)
def test_errors_are_one_clean_message(tmp_path, config_file, capsys, argv, message):
    argv = [a.format(cfg=config_file, tmp=tmp_path, out=tmp_path / "out") for a in argv]
    (tmp_path / "empty").mkdir()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith(f"pyro-vae {argv[0]}: error: ") and "Traceback" not in err


def test_unknown_prior_lists_the_valid_ones(config_file, capsys, tmp_path):
    from pyro_vae.priors import PRIORS

    assert (
        cli.main(["train", "--config", str(config_file), "--out", str(tmp_path / "o"), "--set", "model.prior=nromal"])
        == 2
    )
    err = capsys.readouterr().err
    assert 'did you mean "normal"' in err
    assert all(name in err for name in PRIORS.names())


def test_existing_run_is_not_overwritten(tmp_path, config_file, capsys):
    out = tmp_path / "run"
    sets = _sets(*TINY_SETS, "train.epochs=1", "train.nll_samples=0", "train.plots=false")
    assert cli.main(["train", "--config", str(config_file), "--out", str(out), *sets]) == 0
    assert cli.main(["train", "--config", str(config_file), "--out", str(out), *sets]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_help_lists_commands_with_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in cli.SUBCOMMANDS:
        assert name in text
    assert "examples:" in text and "pyro-vae train --config configs/mnist.toml" in text
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--resume" in text and "--set KEY=VALUE" in text and "examples:" in text


def test_default_out_dir_is_named_after_the_config():
    path = cli.default_out_dir(Path("configs/mnist.toml"), now=0)
    assert (
        path.parent == Path("runs")
        and path.name.startswith("mnist-")
        and len(path.name) == len("mnist-19700101-000000")
    )
