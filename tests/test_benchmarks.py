"""The benchmark scripts run and report the keys docs/results/speed.md relies on (tiny settings)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--z-dim", "4", "--hidden", "16", "--json"]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    return lambda name: importlib.import_module(f"benchmarks.{name}")


def test_step_time_reports_medians_and_ratios(bench, capsys):
    bench("step_time").main(
        ["--batch", "8,16", "--repeats", "3", "--block", "1", "--warmup", "2", "--estimators", "iwae(k=2)", *TINY]
    )
    out = json.loads(capsys.readouterr().out)
    assert set(out["batches"]) == {"8", "16"}
    for entry in out["batches"].values():
        assert set(entry["ms_per_step"]) == {
            "torch",
            "torch_foreach",
            "pyro_svi",
            "project",
            "project_unrecorded",
            "project_plain",
            "project_foreach",
            "project_meanfield",
            "est_iwae_k_2",
            "est_iwae_k_2_unrecorded",
        }
        iwae = entry["estimators"]["iwae(k=2)"]
        assert iwae["recorded"] and iwae["ratio_recorded_to_unrecorded"] == pytest.approx(
            iwae["ms_per_step"] / iwae["ms_per_step_unrecorded"]
        )
        assert all(v > 0 for v in entry["ms_per_step"].values())
        assert entry["ratio_project_to_torch"] == pytest.approx(
            entry["ms_per_step"]["project"] / entry["ms_per_step"]["torch"]
        )
        assert entry["ratio_pyro_to_torch"] > 0 and entry["project_path"] == "fast" and entry["project_recorded"]
    assert {"cpu", "torch", "pyro", "threads", "date"} <= set(out["machine"])


def test_step_time_on_the_conv_network_runs_the_reference_of_the_same_architecture(bench, capsys):
    module = bench("step_time")
    module.main(["--network", "conv", "--channels", "4", "--batch", "8", "--repeats", "2", "--block", "1", *TINY])
    out = json.loads(capsys.readouterr().out)
    entry = out["batches"]["8"]
    assert out["network"] == module.conv_spec(4) and entry["project_path"] == "fast" and entry["project_recorded"]
    assert entry["ratio_project_to_torch"] > 0
    # the hand-written reference has the project's architecture: the same parameter shapes, in the same order
    args = module.parse_args(["--network", "conv", "--channels", "4", "--z-dim", "4"])
    reference, project = (make(args) for make in module.NETWORK_PAIRS["conv"])
    shapes = [tuple(p.shape) for p in reference.parameters()]
    assert shapes == [tuple(p.shape) for p in project.parameters()] and len(shapes) == 14


def test_epoch_time_runs_every_variant_over_the_data(bench, capsys):
    bench("epoch_time").main(["--batch", "64", "--repeats", "1", "--subset", "256", *TINY])
    out = json.loads(capsys.readouterr().out)
    entry = out["batches"]["64"]
    assert out["examples"] == 256
    assert set(entry["seconds_per_epoch"]) == {"torch", "pyro_svi", "project"}
    # Every loop trained on the same data: per-example losses of the same order (nats, positive).
    losses = entry["last_epoch_loss_per_example"]
    assert all(0 < v < 1000 for v in losses.values())


def test_nll_throughput_reports_rate_and_memory(bench, capsys):
    bench("nll_throughput").main(["--subset", "3", "--samples", "50", *TINY])
    out = json.loads(capsys.readouterr().out)
    assert out["examples"] == 3 and out["num_samples"] == 50
    assert out["examples_x_samples_per_second"] == pytest.approx(150 / out["seconds"])
    assert out["peak_memory_bytes"] >= 0 and "ru_maxrss" in out["peak_memory_method"]
    assert out["nll_nats"] > 0


def test_behaviour_check_compares_every_number_within_the_tolerance(bench, capsys):
    check = bench("behaviour_check")
    before = {
        "run": {
            "epochs": [{"epoch": 1, "train_elbo": -100.0, "val_elbo": None, "val_bound": None, "test_elbo": -99.0}],
            "evaluation": {"test_elbo": -98.5, "test_nll": None},
        }
    }
    assert set(check.flatten(before)) == {
        "run.epoch1.train_elbo",
        "run.epoch1.val_elbo",
        "run.epoch1.val_bound",
        "run.epoch1.test_elbo",
        "run.evaluation.test_elbo",
        "run.evaluation.test_nll",
    }
    close = json.loads(json.dumps(before))
    close["run"]["epochs"][0]["test_elbo"] = -99.0 + 5e-5
    assert check.compare(before, close, tolerance=1e-4)
    moved = json.loads(json.dumps(before))
    moved["run"]["evaluation"]["test_elbo"] = -98.5 + 2e-4
    assert not check.compare(before, moved, tolerance=1e-4)
    assert "run.evaluation.test_elbo" in capsys.readouterr().out.split("<-- differs")[0].splitlines()[-1]
    missing = json.loads(json.dumps(before))
    missing["run"]["evaluation"]["test_nll"] = 188.0  # a number that appears where there was none
    assert not check.compare(before, missing, tolerance=1e-4)


def test_reliability_counts_the_in_process_cases(bench, tmp_path):
    reliability = bench("reliability")
    files = reliability.data_files(tmp_path)
    assert (
        files["tried"] == files["library: one line naming the file"] == files["cli: exit 2, one line naming the file"]
    )
    assert reliability.classify("train.epochs=3") == ("accepted", "")
    assert reliability.classify("model.z_dim=1000000000")[0] == "clean error"


def test_ais_throughput_reports_measured_and_extrapolated_seconds(bench, capsys):
    variants = "record=False; gradient_precision='bf16'"
    args = ["--steps", "3", "--subset", "2", "--chains", "2", "--leapfrog", "2", "--variants", variants]
    bench("ais_throughput").main([*args, *TINY])
    out = json.loads(capsys.readouterr().out)
    measured, extrapolated = out["measured"], out["extrapolated"]
    assert (measured["steps"], measured["examples"]) == (3, 2)
    by_variant = measured["by_variant"]
    assert list(by_variant) == ["record=False", "gradient_precision='bf16'"]
    for variant, one in by_variant.items():
        assert one["rows_per_gradient_evaluation"] == 4 and 0 <= one["acceptance_rate"] <= 1
        per_temperature = max(one["seconds"] - one["seconds_short"], 0) / (3 - 2)
        assert one["seconds_per_temperature"] == pytest.approx(per_temperature)
        expected = (one["fixed_seconds"] + per_temperature * 1000) * (1000 / 2)
        assert extrapolated["seconds"][variant] == pytest.approx(expected)
        ratio = extrapolated["seconds"]["record=False"] / extrapolated["seconds"][variant]
        assert out["speedup_over_first"][variant] == pytest.approx(ratio)
    assert "cpu" in out["machine"]


def test_ais_floor_times_every_way_at_both_precisions(bench, capsys):
    bench("ais_floor").main(["--rows", "32", "--repeats", "2", *TINY])
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] == 32
    assert set(out["ms_per_gradient_evaluation"]) == {"pyro_vae", "recorded", "force", "eager", "products"}
    for name, by in out["ms_per_gradient_evaluation"].items():
        assert set(by) == {"ieee", "bf16"} and all(t > 0 for t in by.values())
        minutes = out["protocol_minutes"][name]["ieee"]
        assert minutes == pytest.approx(by["ieee"] / 32 * 1000 * 11 * 16 * 1000 / 60000)
    assert out["speedup_over_pyro_vae_ieee"]["pyro_vae"]["ieee"] == 1


def test_snr_toy_shows_the_asymptotic_rates(bench, tmp_path, capsys):
    """The Gaussian toy of Rainforth et al. (2018): q is close to the posterior (E[w^2]/E[w]^2 ~ 2), so the
    decoder's SNR rises and DReG's encoder SNR rises from k = 10 to 1000 by many SEs."""
    assert bench("snr_toy").main(["--out", str(tmp_path), "--examples", "2", "--repeats", "30", "--ks", "10,1000"]) == 0
    results = json.loads((tmp_path / "compare.json").read_text())
    for spec in ("iwae(k=10)", "dreg(k=10)"):
        low, high = results[spec], results[spec.replace("k=10", "k=1000")]
        assert high["ess"] > 300  # ~ 1000 / 2: the asymptotic regime
        assert high["grad_snr"]["decoder"] > 5 * low["grad_snr"]["decoder"]
    assert results["dreg(k=1000)"]["grad_snr"]["encoder"] > 3 * results["dreg(k=10)"]["grad_snr"]["encoder"]
    assert "| dreg | encoder | 10, 1000 |" in capsys.readouterr().out


def test_se_small_k_shows_the_delta_method_optimistic_and_the_jackknife_not(bench, capsys):
    bench("se_small_k").main(["--repeats", "2000"])
    rows = {row["k"]: row for row in json.loads(capsys.readouterr().out)["rows"]}
    assert rows[10]["sd_over_se_delta"] > 1.3 and 0.85 < rows[10]["sd_over_se_jackknife"] < 1.15
    assert rows[10]["median_ess"] < rows[100]["median_ess"] < rows[1000]["median_ess"]


def test_vamp_epoch_times_both_densities_and_counts_the_flops(bench, capsys, tmp_path):
    common = """
[data]
name = "synthetic(num_train=64, num_test=16, side=4)"
[train]
batch_size = 16
warmup_epochs = 1
"""
    standard, vamp = tmp_path / "standard.toml", tmp_path / "vamp.toml"
    standard.write_text("[model]\nz_dim = 2\nhidden_dims = [8]\n" + common)
    vamp.write_text('[model]\nz_dim = 2\nhidden_dims = [8]\nprior = "vamp(components=5)"\n' + common)
    bench("vamp_epoch").main(["--configs", f"{standard},{vamp}", "--steps", "2", "--repeats", "1", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert set(out["ratio_to_standard"]) == {"standard", "vamp", "vamp_broadcast"}
    assert out["ratio_to_standard"]["standard"] == 1.0
    # the pseudo-inputs' encoder pass is extra arithmetic; the standard step's own is all in both
    assert out["flop_ratio"] > 1 and out["gflop_per_step"]["standard"] > 0


def test_bernoulli_log_density_compares_the_library_and_torch_in_one_run(bench, capsys):
    bench("bernoulli_log_density").main(["--rows", "32", "--pixels", "784", "--repeats", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert {"library_forward", "torch_bce_forward", "ais_gradient_library", "ais_gradient_torch_bce"} <= set(out["ms"])
    assert out["ratios"]["torch_bce_to_library_forward"] == pytest.approx(
        out["ms"]["torch_bce_forward"] / out["ms"]["library_forward"]
    )
