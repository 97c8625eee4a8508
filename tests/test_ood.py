"""Out-of-distribution detection: the separation numbers, spec defaults, matched preprocessing, and
``pyro-vae score`` end to end on a tiny synthetic run (table, JSON, figure, one-line errors)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from linear_gaussian import linear_gaussian

from pyro_vae import cli
from pyro_vae.data import fixed_binarization
from pyro_vae.ood import CONVENTION, detect, matched_preprocessing, separation, with_samples

OTHER = "synthetic(num_train=500, num_test=200, data_seed=1)"  # other patterns, the run's 8x8 shape


def test_separation_of_two_small_sets():
    numbers = separation(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.5, 4.0]))
    # pairs (out > in): 2.5 beats 1 and 2; 4 beats all three -> 5/6
    assert numbers["auroc"] == pytest.approx(5 / 6)
    assert numbers["auprc_chance"] == pytest.approx(2 / 5)
    assert numbers["mean_in"] == pytest.approx(2.0) and numbers["mean_out"] == pytest.approx(3.25)
    assert (numbers["num_in"], numbers["num_out"]) == (3, 2)


def test_with_samples_fills_only_the_scores_that_take_samples_and_leave_it_unset():
    assert with_samples("log_px", 50) == "log_px(samples=50)"
    assert with_samples("log_px(samples=7)", 50) == "log_px(samples=7)"
    assert with_samples("elbo", 50) == "elbo"
    assert with_samples("input_complexity(compressor='zlib')", None) == "input_complexity(compressor='zlib')"


def test_detect_flags_data_far_from_the_model():
    """Draws of the linear-Gaussian model against the same draws shifted by 3 in every coordinate: the
    exact -log p(x) ranks every shifted example above every draw."""
    lg = linear_gaussian(x_dim=6, z_dim=3, s=0.5, seed=0)
    x_in = lg.sample(40, generator=torch.Generator().manual_seed(1))
    x_out = lg.sample(30, generator=torch.Generator().manual_seed(2)) + 3.0
    found = detect(lg.build_vae(exact_posterior=True), x_in, x_out, ["log_px(samples=5)", "elbo"])
    assert found.report["convention"] == CONVENTION
    assert found.report["scores"]["log_px(samples=5)"]["auroc"] == 1.0
    assert found.report["scores"]["log_px(samples=5)"]["auprc"] == 1.0
    torch.testing.assert_close(found.scores_in["log_px(samples=5)"], -lg.log_px(x_in))
    assert found.scores_out["elbo"].shape == (30,)


def test_a_grey_level_set_is_binarized_once_for_a_run_on_binary_data():
    grey = torch.rand(50, 16, generator=torch.Generator().manual_seed(0))
    binary_run, grey_set = SimpleNamespace(is_binary=True), SimpleNamespace(is_binary=False, name="fashion-mnist")
    x, notes = matched_preprocessing(binary_run, grey_set, grey)
    assert set(x.unique().tolist()) <= {0.0, 1.0} and "binarized" in notes[0]
    assert torch.equal(x, fixed_binarization(grey))  # one fixed draw
    same, none = matched_preprocessing(SimpleNamespace(is_binary=False), grey_set, grey)
    assert same is grey and none == []


def test_score_end_to_end(tiny_run, tmp_path, capsys):
    figure = tmp_path / "ood.png"
    args = ["score", "--run", str(tiny_run), "--data", OTHER, "--device", "cpu", "--num", "60", "--samples", "8"]
    assert cli.main([*args, "--score", "log_px,elbo", "--score", "input_complexity", "--out", str(figure)]) == 0
    table = capsys.readouterr().out
    assert "higher score = more anomalous" in table and "input_complexity(samples=8)" in table
    assert figure.stat().st_size > 0
    assert cli.main([*args, "--score", "likelihood_regret(steps=2, particles=2)", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["in"] == {"data": "synthetic(num_train=500, num_test=200)", "split": "test", "num_examples": 60}
    assert report["out"]["data"] == OTHER and report["out"]["num_examples"] == 60
    numbers = report["scores"]["likelihood_regret(steps=2, particles=2)"]
    assert 0 <= numbers["auroc"] <= 1 and numbers["num_in"] == numbers["num_out"] == 60
    assert {"auroc_se", "auprc", "auprc_chance", "mean_in", "sd_in", "mean_out", "sd_out", "units"} <= set(numbers)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", OTHER, "--score", "log_p"], "unknown score 'log_p' (did you mean \"log_px\"?); valid scores: elbo"),
        (["--data", "synthetc"], "unknown dataset 'synthetc' (did you mean \"synthetic\"?); valid datasets: cifar10"),
        (["--data", "synthetic(side=6)"], "synthetic(side=6) has images of shape 1x6x6 but the run's data"),
        (["--data", OTHER, "--score", "log_px(samples=0)"], "samples must be a positive integer"),
    ],
)
def test_score_mistakes_are_one_line(tiny_run, capsys, extra, message):
    assert cli.main(["score", "--run", str(tiny_run), "--device", "cpu", *extra]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
