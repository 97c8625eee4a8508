"""Evaluation protocols and the paired comparison of runs (``pyro_vae.protocol``, ``pyro-vae compare-runs``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_cli import TINY_SETS, _sets

from pyro_vae import cli
from pyro_vae.protocol import compare_runs, differences, paired


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two tiny runs on the same synthetic data (other seeds), each evaluated and saved with K = 20."""
    root = tmp_path_factory.mktemp("runs")
    config = root / "tiny.toml"
    config.write_text('[data]\nname = "synthetic(num_train=300, num_test=60)"\n')
    runs = []
    for seed in (1, 2):
        out = root / f"run{seed}"
        args = ["train", "--config", str(config), "--out", str(out), "--seed", str(seed), "--no-progress"]
        assert cli.main([*args, *_sets(*TINY_SETS)]) == 0
        assert cli.main(["evaluate", "--run", str(out), "--nll-samples", "20", "--save"]) == 0
        runs.append(out)
    return runs


def test_training_saves_the_per_example_numbers_beside_the_evaluation(two_runs):
    result = json.loads((two_runs[0] / "evaluation.json").read_text())
    examples = np.load(two_runs[0] / "evaluation.npz")
    assert examples["log_px"].shape == (60,) and result["protocol"]["num_examples"] == 60
    np.testing.assert_allclose(-examples["log_px"].mean(), result["test_nll"], rtol=1e-12)


def test_paired_differences_are_the_mean_and_se_of_per_example_differences(two_runs, capsys):
    rows = compare_runs(two_runs)
    a, b = (np.load(run / "evaluation.npz") for run in two_runs)
    d = b["log_px"] - a["log_px"]
    assert rows[1]["nll_diff"] == pytest.approx(-d.mean(), rel=1e-12)
    assert rows[1]["nll_diff_se"] == pytest.approx(d.std(ddof=1) / math.sqrt(60), rel=1e-12)
    e = b["elbo"] - a["elbo"]
    assert rows[1]["elbo_diff"] == pytest.approx(e.mean(), rel=1e-12)
    assert "nll_diff" not in rows[0] and rows[0]["nll"] == pytest.approx(-a["log_px"].mean(), rel=1e-12)

    assert cli.main(["compare-runs", *map(str, two_runs)]) == 0
    table = capsys.readouterr().out
    assert table.count("\n") == 4 and f"{rows[1]['nll_diff']:+.3f} ± {rows[1]['nll_diff_se']:.3f}" in table
    assert cli.main(["compare-runs", *map(str, two_runs), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(rows))


def test_paired_is_plain_arithmetic():
    mean, se = paired(np.array([1.0, 2.0, 4.0]), np.array([0.0, 0.0, 1.0]))
    assert mean == pytest.approx(2.0) and se == pytest.approx(math.sqrt(1.0 / 3))
    assert math.isnan(paired(np.array([1.0]), np.array([0.0]))[1])


def test_runs_measured_under_other_protocols_are_refused_in_one_line(two_runs, tmp_path, capsys):
    other = tmp_path / "k30.json"
    assert cli.main(["evaluate", "--run", str(two_runs[1]), "--nll-samples", "30", "--json"]) == 0
    other.write_text(capsys.readouterr().out)
    assert cli.main(["compare-runs", str(two_runs[0]), str(other)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nll_settings" in err and '"samples": 20' in err and '"samples": 30' in err

    assert cli.main(["evaluate", "--run", str(two_runs[1]), "--nll-samples", "20", "--subset", "50", "--json"]) == 0
    other.write_text(capsys.readouterr().out)
    with pytest.raises(ValueError, match=r"num_examples \(60 vs 50\); examples_sha256"):
        compare_runs([two_runs[0], other])


def test_what_cannot_be_compared_says_why(two_runs, tmp_path, capsys):
    cases = []
    old = tmp_path / "old"
    old.mkdir()
    (old / "evaluation.json").write_text(json.dumps({"test_nll": 90.0}))
    cases.append(([str(two_runs[0]), str(old)], "records no protocol"))
    cases.append(([str(two_runs[0])], "needs at least two runs"))
    cases.append(([str(two_runs[0]), str(tmp_path / "nowhere")], "does not exist"))
    no_npz = tmp_path / "no_npz.json"
    no_npz.write_text((two_runs[1] / "evaluation.json").read_text())
    cases.append(([str(two_runs[0]), str(no_npz)], "no_npz.npz is missing"))
    (tmp_path / "bad.json").write_text("{")
    cases.append(([str(two_runs[0]), str(tmp_path / "bad.json")], "not an evaluation JSON file"))
    for args, phrase in cases:
        assert cli.main(["compare-runs", *args]) == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and phrase in err, err


def test_differences_names_each_protocol_entry():
    a = {"data_variant": "mnist", "split": "test", "examples_sha256": "ab" * 32}
    b = {"data_variant": "mnist-dynamic", "split": "test", "examples_sha256": "cd" * 32}
    found = differences(a, b)
    assert found[0] == "data_variant (mnist vs mnist-dynamic)"
    assert found[1] == "examples_sha256 (abababababab... vs cdcdcdcdcdcd...)"
