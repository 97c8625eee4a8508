"""examples/compare_estimators.py in smoke mode, in process: one row per estimator beside the published numbers.

(tests/test_examples.py also runs every example as a subprocess; this test checks what this one writes.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from example_scripts import load_example


def test_slug_makes_folder_names():
    example = load_example("compare_estimators")
    assert example.slug("iwae(k=50)") == "iwae_k50"
    assert example.slug("renyi(alpha=0.5, k=5)") == "renyi_alpha0_5_k5"


def test_smoke_run_prints_the_table_beside_the_paper(data_root, tmp_path, capsys):
    example = load_example("compare_estimators")
    out = tmp_path / "runs"
    argv = ["--smoke", "--estimators", "trace,iwae(k=5)", "--out", str(out), "--device", "cpu"]
    rows = example.main([*argv, "--data-dir", str(data_root)])
    printed = capsys.readouterr().out
    assert [row["estimator"] for row in rows] == ["trace", "iwae(k=5)"]
    for row in rows:
        assert math.isfinite(row["nll"]) and row["nll"] > 0 and row["nll_se"] > 0
        assert (Path(row["run_dir"]) / "metrics.jsonl").is_file()
    assert "| `trace` | 1 |" in printed and "86.76 (Burda et al. 2015 (VAE))" in printed
    assert "85.54 (Burda et al. 2015)" in printed and "the paper: 3280 passes" in printed
    assert json.loads((out / "nll.json").read_text()) == rows
    per_image = json.loads((out / "log_px_per_image.json").read_text())
    assert list(per_image) == ["trace", "iwae(k=5)"]
    # The printed paired difference is recomputable from the per-image values it was made from.
    diff = sum(a - b for a, b in zip(per_image["trace"], per_image["iwae(k=5)"], strict=True)) / len(per_image["trace"])
    assert f"iwae(k=5) - trace: {diff:+.2f}" in printed
    assert math.isclose(-sum(per_image["trace"]) / len(per_image["trace"]), rows[0]["nll"], rel_tol=1e-6)
