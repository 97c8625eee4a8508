"""Every example script runs end to end in smoke mode (a subprocess, as a user would run it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.py"))


def _run(script: Path, data_root: Path, out: Path) -> str:
    env = {**os.environ, "PYRO_VAE_DATA": str(data_root), "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out", str(out), "--device", "cpu"],
        env=env,
        cwd=out.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_every_example_is_tested():
    names = {p.name for p in SCRIPTS}
    assert {"mnist_vae.py", "mnist_dynamic_vae.py", "fashion_mnist_vae.py"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_example_runs_in_smoke_mode(script, data_root, tmp_path):
    out = tmp_path / "run"
    stdout = _run(script, data_root, out)
    assert "Traceback" not in stdout
    if script.stem == "mnist_vae":
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in records] == [1]
        assert records[0]["test_elbo"] < 0 and "test ELBO" in stdout
        assert (out / "samples.png").is_file() and (out / "reconstructions.png").is_file()
    elif script.stem == "compare_estimators":  # one run folder per estimator, and the NLL table beside them
        rows = json.loads((out / "nll.json").read_text())
        assert rows and all((Path(r["run_dir"]) / "checkpoint.pt").is_file() for r in rows)
    elif script.stem == "compare_priors":  # tested in process by tests/test_examples_priors.py
        assert (out / "priors.json").is_file() and (out / "samples.png").is_file()
    elif script.stem == "posterior_collapse_probe":  # a probe every 10 steps, the plateau printed first
        rows = json.loads((out / "probe.json").read_text())["rows"]
        assert [r["step"] for r in rows] == [0, 10, 20] and "plateau" in stdout
        assert all(r["kl"] > -1 and r["posterior_scale"] > 0 for r in rows)
    elif script.stem == "cvae_quadrants":  # the baseline and the CVAE side by side, and the model printed
        for structure in ("cvae_baseline", "cvae"):
            assert json.loads((out / "q1" / structure / "evaluation.json").read_text())["test_elbo"] < 0
        assert 'pyro.sample("z"' in stdout and "NN (baseline)" in stdout and "(Pyro  71.8)" in stdout
    elif script.stem == "m2_semi_supervised":  # its own SVI loop: metrics with accuracies, printed
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in records] == [1] and 0 <= records[0]["test_accuracy"] <= 1
        assert "test accuracy" in stdout
    else:
        assert (out / "config.toml").is_file() and (out / "checkpoint.pt").is_file()
    if script.stem == "mnist_dynamic_vae":
        assert "test NLL" in stdout and "k=10" in stdout
    if script.stem == "two_layer_vae":
        assert "test NLL" in stdout and "two layers: VAE 85.33, IWAE k=50 82.90" in stdout
