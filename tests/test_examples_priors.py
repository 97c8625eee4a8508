"""examples/compare_priors.py in smoke mode, in process: one run per variant, paired NLLs, reuse of finished runs.

(tests/test_examples.py also runs every example as a subprocess; this test checks what this one computes.)
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from example_scripts import load_example


def test_smoke_runs_pairs_with_normal_and_reuses_finished_runs(data_root, tmp_path, capsys):
    example = load_example("compare_priors")
    out = tmp_path / "priors"
    argv = ["--smoke", "--variants", "normal,vamp", "--out", str(out), "--device", "cpu", "--data-dir", str(data_root)]
    rows = example.main(argv)
    assert [r["variant"] for r in rows] == ["normal", "vamp"]
    normal, vamp = rows
    # The paired difference is the mean of the per-image differences of the cached NLLs.
    cached = {name: torch.load(out / name / "nll_per_image_k10_test20.pt") for name in ("normal", "vamp")}
    diff = cached["vamp"] - cached["normal"]
    assert vamp["nll_minus_normal"] == pytest.approx(float(diff.mean()))
    assert vamp["nll_minus_normal_se"] == pytest.approx(float(diff.std()) / math.sqrt(20))
    assert normal["test_nll"] == pytest.approx(float(cached["normal"].mean())) and "nll_minus_normal" not in normal
    assert all(math.isfinite(r["test_elbo"]) and r["test_nll"] > 0 for r in rows)
    assert json.loads((out / "priors.json").read_text()) == rows
    assert (out / "val_elbo.png").stat().st_size > 0 and (out / "samples.png").stat().st_size > 0
    assert "| vamp | `model.prior=vamp(components=500)` |" in (out / "priors.md").read_text()

    # Run again: nothing is retrained or re-evaluated, and the numbers are the same.
    mtime = (out / "vamp" / "checkpoint.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert example.main(argv) == rows
    assert "vamp (reused)" in capsys.readouterr().out
    assert (out / "vamp" / "checkpoint.pt").stat().st_mtime_ns == mtime

    # Another config in the same folder is refused, naming the key.
    with pytest.raises(SystemExit, match=r"another config \(train.lr differ\)"):
        example.main([*argv, "--set", "train.lr=0.01"])


def test_unknown_variant_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        load_example("compare_priors").main(["--variants", "normal,vampp"])
    assert "unknown variant(s) vampp; valid: normal, mixture, vamp, flow, iaf" in capsys.readouterr().err
