"""compare(): its statistics on the exactly tractable linear-Gaussian VAE, its reports, and `pyro-vae compare`."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from pyro_vae.cli import main
from pyro_vae.closed_form import gaussian_kl_standard_normal
from pyro_vae.compare import OUTPUT_FILES, _group_stats, compare, markdown_table, parameter_groups, write_reports
from pyro_vae.specs import SpecError

TINY_CONFIG = """\
[model]
z_dim = 2
hidden_dims = [8]

[data]
name = "synthetic(side=4, num_train=64, num_test=32)"

[train]
epochs = 1
batch_size = 16
nll_samples = 0
plots = false
device = "cpu"
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder trained one epoch on a small synthetic dataset through ``pyro-vae train``."""
    root = tmp_path_factory.mktemp("compare_run")
    config = root / "tiny.toml"
    config.write_text(TINY_CONFIG)
    assert main(["train", "--config", str(config), "--out", str(root / "run"), "--set", "train.seed=1"]) == 0
    return root / "run"


def test_results_are_keyed_by_the_specs_as_given(lg, x):
    specs = ["trace", "renyi(alpha=0.5, k=3)", "iwae( k = 3 )"]
    results = compare(lg.build_vae(exact_posterior=False), x, specs, repeats=4, progress=False)
    assert list(results) == specs
    for spec, r in results.items():
        for key in ("bound_mean", "bound_se", "bound_var", "ms_per_eval", "peak_mem_mb"):
            assert math.isfinite(r[key]), (spec, key, r[key])
        assert r["bound_se"] > 0 and r["ms_per_eval"] > 0 and r["peak_mem_mb"] > 0
        # the linear-Gaussian VAE's prior and likelihood have no trainable parameters
        assert set(r["grad_snr"]) == set(r["grad_var"]) == {"encoder", "decoder"}
        assert r["repeats"] == 4 and r["batch"] == len(x)
    assert results["iwae( k = 3 )"]["bound_name"] == "IWAE bound (k=3)"


def test_at_the_exact_posterior_every_bound_is_log_px_with_zero_variance(lg, x):
    results = compare(lg.build_vae(exact_posterior=True), x, ["iwae(k=4)", "dreg(k=4)", "stl"], repeats=3)
    exact = lg.log_px(x).mean().item()
    for spec, r in results.items():
        assert r["bound_mean"] == pytest.approx(exact, abs=1e-9), spec
        assert r["bound_se"] < 1e-9 and r["bound_var"] < 1e-18, spec


def test_bound_statistics_agree_with_each_other_and_the_exact_elbo(lg, x):
    """bound_mean is the ELBO within 4 SE; SE^2 ~ bound_var / (batch * repeats) as draws are independent."""
    vae = lg.build_vae(exact_posterior=False)
    repeats = 60
    r = compare(vae, x, ["closed_form"], repeats=repeats, seed=4)["closed_form"]
    elbo = (lg.expected_log_lik(vae, x) - gaussian_kl_standard_normal(*vae.encode(x))).mean().item()
    print(f"[stat] compare closed_form bound {r['bound_mean']:.4f} +- {r['bound_se']:.4f}, exact ELBO {elbo:.4f}")
    assert abs(r["bound_mean"] - elbo) <= 4 * r["bound_se"]
    predicted_se = math.sqrt(r["bound_var"] / (len(x) * repeats))
    # the SE of an SE from R = 60 repeats is about 1/sqrt(2R) = 9% relative; 0.6-1.6 is more than 4 of those
    assert 0.6 < r["bound_se"] / predicted_se < 1.6


def test_group_statistics_follow_the_definition():
    """SNR_p = |mean| / std per parameter, averaged; var is the mean per-parameter variance; dead parameters skipped."""
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(4000, 3, dtype=torch.float64, generator=gen)
    samples = torch.stack(
        [2.0 + 1.0 * noise[:, 0], -1.0 + 2.0 * noise[:, 1], torch.zeros(4000, dtype=torch.float64)], 1
    )
    samples[:, 2] = 0.0  # a parameter the loss never touches
    var, snr = _group_stats(samples)
    assert snr == pytest.approx((2.0 / 1.0 + 1.0 / 2.0) / 2, rel=0.05)
    assert var == pytest.approx((1.0 + 4.0 + 0.0) / 3, rel=0.08)
    assert math.isnan(_group_stats(torch.zeros(10, 2))[1])


def test_analytic_kl_shows_up_as_lower_encoder_gradient_variance(lg, x):
    results = compare(lg.build_vae(exact_posterior=False), x, ["trace", "closed_form", "tracegraph"], repeats=60)
    assert results["closed_form"]["grad_var"]["encoder"] < results["trace"]["grad_var"]["encoder"]
    assert results["tracegraph"]["grad_var"]["encoder"] > 3 * results["trace"]["grad_var"]["encoder"]


def test_bad_estimator_lists_fail_before_any_work(lg, x):
    vae = lg.build_vae()
    with pytest.raises(SpecError, match="valid estimators"):
        compare(vae, x, ["trace", "nope"], repeats=2)
    with pytest.raises(ValueError, match="duplicate"):
        compare(vae, x, ["trace", "trace"], repeats=2)
    with pytest.raises(TypeError, match="split_specs"):
        compare(vae, x, "trace,iwae(k=2)", repeats=2)
    with pytest.raises(ValueError, match="repeats must be at least 2"):
        compare(vae, x, ["trace"], repeats=1)


def test_parameter_groups_are_the_vae_submodules():
    from pyro_vae import VAE

    vae = VAE(x_dim=12, z_dim=2, hidden_dims=(4,), prior="learned_normal")
    groups = parameter_groups(vae)
    assert list(groups) == ["encoder", "decoder", "prior"]
    assert sum(p.numel() for ps in groups.values() for p in ps) == sum(p.numel() for p in vae.parameters())


def test_reports_hold_the_same_numbers(lg, x, tmp_path):
    specs = ["trace", "iwae(k=2)", "iwae(k=4)", "dreg(k=4)"]
    results = compare(lg.build_vae(exact_posterior=False), x, specs, repeats=3)
    paths = write_reports(results, tmp_path)
    assert [p.name for p in paths] == list(OUTPUT_FILES) and all(p.is_file() and p.stat().st_size > 0 for p in paths)
    assert json.loads((tmp_path / "compare.json").read_text()) == results
    with open(tmp_path / "compare.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["estimator"] for row in rows] == specs
    assert float(rows[1]["grad_snr_encoder"]) == pytest.approx(results["iwae(k=2)"]["grad_snr"]["encoder"])
    table = markdown_table(results)
    for spec in specs:
        assert f"`{spec}`" in table
    assert f"{results['trace']['bound_mean']:.3f} ± {results['trace']['bound_se']:.3f}" in table


def test_pyro_vae_compare_on_a_trained_run(tiny_run, capsys):
    specs = "trace,meanfield,iwae(k=3),dreg(k=3)"
    assert main(["compare", "--run", str(tiny_run), "--estimators", specs, "--repeats", "3", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == ["trace", "meanfield", "iwae(k=3)", "dreg(k=3)"]
    for r in printed.values():
        assert {"bound_mean", "bound_se", "grad_snr", "ms_per_eval"} <= set(r)
        assert r["bound_mean"] < 0 and r["batch"] == 32  # the whole synthetic test set (32 < the default 100)
    for name in OUTPUT_FILES:
        assert (tiny_run / name).is_file()
    assert main(["compare", "--run", str(tiny_run), "--estimators", "closed_form", "--repeats", "2"]) == 0
    assert "| `closed_form` |" in capsys.readouterr().out


def test_pyro_vae_compare_names_a_bad_spec(tiny_run, capsys):
    assert main(["compare", "--run", str(tiny_run), "--estimators", "trace,iwea(k=3)", "--repeats", "2"]) == 2
    assert 'did you mean "iwae"' in capsys.readouterr().err


# -- the gradient SNR at the papers' protocol (issue 16 part 5) ----------------------------------------
def _by_hand(rows: list[list[float]]) -> dict[str, float]:
    """The four SNR aggregates of draws ``rows`` (R lists of P numbers), with the statistics module."""
    import statistics

    repeats, columns = len(rows), list(zip(*rows, strict=True))
    means = [statistics.fmean(c) for c in columns]
    variances = [statistics.variance(c) for c in columns]
    per = [abs(m) / math.sqrt(v) for m, v in zip(means, variances, strict=True) if v > 0]
    corrected = [s * s * (repeats - 3) / (repeats - 1) - 1 / repeats for s in per]
    signal = sum(m * m for m in means) - sum(variances) / repeats
    return {
        "mean": statistics.fmean(per),
        "median": statistics.median(per),
        "rms": math.sqrt(max(statistics.fmean(corrected), 0.0)),
        "norm": math.sqrt(max(signal, 0.0) / sum(variances)),
    }


def test_snr_aggregates_equal_a_hand_computation():
    from pyro_vae.compare import SNR_AGGREGATES, snr_statistics

    rows = [
        [1.0, -2.0, 0.0, 5.0, 0.3],
        [2.0, -1.0, 0.0, 4.0, -0.2],
        [0.5, -3.0, 0.0, 6.5, 0.1],
        [1.5, -2.5, 0.0, 5.5, 0.0],
        [3.0, -0.5, 0.0, 4.5, -0.4],
        [1.2, -1.8, 0.0, 5.1, 0.25],
    ]  # the third parameter never moves: no per-parameter SNR, nothing in the norm
    got = snr_statistics(torch.tensor(rows, dtype=torch.float64))
    expected = _by_hand(rows)
    assert set(got) == set(SNR_AGGREGATES)
    for name in SNR_AGGREGATES:
        assert got[name] == pytest.approx(expected[name], rel=1e-12), name
    # an even number of live parameters: the median is the mean of the two middle ones
    even = [r[:2] + r[3:4] + [r[0] + r[4]] for r in rows]
    assert snr_statistics(torch.tensor(even))["median"] == pytest.approx(_by_hand(even)["median"], rel=1e-6)


def test_bias_corrected_aggregates_remove_the_noise_floor():
    """|m| / s of a parameter with mean 0 is about sqrt(2 / (pi R)); rms and norm correct the squares."""
    from pyro_vae.compare import snr_statistics

    gen = torch.Generator().manual_seed(3)
    repeats, params = 100, 4000
    noise = torch.randn(repeats, params, dtype=torch.float64, generator=gen)
    zero = snr_statistics(noise)
    floor = math.sqrt(2 / (math.pi * repeats))
    print(f"[stat] SNR of pure noise, R={repeats}: mean {zero['mean']:.4f} (floor {floor:.4f}), rms {zero['rms']:.4f}")
    # the mean of 4000 |m|/s: SE about 0.06 / sqrt(4000) = 0.001
    assert zero["mean"] == pytest.approx(floor, abs=0.005)
    assert zero["median"] == pytest.approx(floor * 0.6745 / math.sqrt(2 / math.pi), abs=0.006)  # median of |N(0,1)|
    # rms: sqrt of a mean of 4000 terms with sd ~ 1.4 / R: |mean| <~ 4 * 1.4 / (100 * 63) = 0.0009, sqrt ~ 0.03
    assert zero["rms"] < 0.035 and zero["norm"] < 0.035
    signal = snr_statistics(0.3 + noise)  # every parameter's SNR is 0.3
    print(f"[stat] SNR 0.3, R={repeats}: mean {signal['mean']:.4f}, rms {signal['rms']:.4f}, norm {signal['norm']:.4f}")
    assert signal["rms"] == pytest.approx(0.3, abs=0.01) and signal["norm"] == pytest.approx(0.3, abs=0.01)
    assert signal["mean"] > 0.3  # |m| / s is biased up


class _ScriptedEstimator:
    """An estimator whose gradient is known: call c of ``loss`` has gradient -(batch) * d_c on the parameters, so
    the gradient of minus the batch-mean bound, summed over chunks of sizes b_j, is sum_j (b_j / batch) d_c(j)."""

    bound_name = "scripted"

    def __init__(self, vae, calls: int, seed: int = 0, constant: bool = False):
        gen = torch.Generator().manual_seed(seed)
        params = list(vae.parameters())
        self.draws = [[torch.randn(p.shape, dtype=p.dtype, generator=gen) + 0.5 for p in params] for _ in range(calls)]
        if constant:
            self.draws = [self.draws[0]] * calls
        self.params, self.calls, self.shapes = params, 0, []

    def flat(self, call: int, group_params) -> torch.Tensor:
        ids = {id(p): i for i, p in enumerate(self.params)}
        return torch.cat([self.draws[call][ids[id(p)]].flatten() for p in group_params])

    def loss(self, vae, x):
        d = self.draws[self.calls]
        self.calls += 1
        self.shapes.append(x.shape[0])
        return -x.shape[0] * sum((p * dp).sum() for p, dp in zip(self.params, d, strict=True))

    def bound(self, vae, x):
        return torch.zeros(x.shape[0], dtype=x.dtype)


def test_per_example_snr_equals_a_hand_computation_on_known_gradient_draws(lg, x):
    """Per example: a warm-up call, then R draws of that example's gradient; the result is each example's SNR
    of those draws, their mean over the examples and the SE std / sqrt(N)."""
    from pyro_vae.compare import SNR_AGGREGATES, measure, snr_statistics

    vae = lg.build_vae(exact_posterior=False)
    groups = parameter_groups(vae)
    examples, repeats = 3, 5
    scripted = _ScriptedEstimator(vae, calls=examples * (repeats + 1) + 1)
    r = measure(scripted, vae, x[:examples], repeats, per_example=True, snr_aggregate="median")
    assert scripted.shapes == [1] * (examples * (repeats + 1)) + [1]  # the last call measures memory
    assert r["protocol"] == "per_example" and r["snr_aggregate"] == "median" and r["batch"] == examples
    for name in SNR_AGGREGATES:
        for group, params in groups.items():
            per_example = []
            for n in range(examples):
                calls = range(n * (repeats + 1) + 1, (n + 1) * (repeats + 1))  # after the example's warm-up call
                draws = torch.stack([scripted.flat(c, params) for c in calls])
                per_example.append(snr_statistics(draws)[name])
            assert r["grad_snr_examples"][name][group] == pytest.approx(per_example, rel=1e-9), (name, group)
            values = torch.tensor(per_example, dtype=torch.float64)
            entry = r["grad_snr_by_aggregate"][name][group]
            assert entry["snr"] == pytest.approx(values.mean().item(), rel=1e-9)
            assert entry["se"] == pytest.approx(values.std().item() / math.sqrt(examples), rel=1e-9)
    assert r["grad_snr"] == {g: v["snr"] for g, v in r["grad_snr_by_aggregate"]["median"].items()}
    assert r["grad_snr_se"] == {g: v["se"] for g, v in r["grad_snr_by_aggregate"]["median"].items()}
    assert r["ess"] is None and r["k"] is None  # not an importance-weighted estimator


def test_chunks_add_up_to_the_batch_mean_gradient(lg, x):
    from pyro_vae.compare import measure

    vae = lg.build_vae(exact_posterior=False)
    scripted = _ScriptedEstimator(vae, calls=40, constant=True)  # the same d at every call: every draw is d
    r = measure(scripted, vae, x[:7], 4, chunk=3, snr_aggregate="norm")
    assert scripted.shapes[:4] == [3, 3, 3, 1]  # warm-up on the first chunk, then chunks of 3, 3, 1
    assert r["chunk"] == 3 and r["protocol"] == "batch_mean"
    # constant draws: every parameter's variance is 0 (the per-parameter SNRs undefined), the mean is d
    assert all(v == pytest.approx(0.0, abs=1e-20) for v in r["grad_var"].values())
    assert all(math.isnan(v["snr"]) for v in r["grad_snr_by_aggregate"]["mean"].values())


def test_per_example_on_one_example_is_the_batch_protocol_on_it(lg, x):
    specs = ["iwae(k=5)", "dreg(k=5)"]
    vae = lg.build_vae(exact_posterior=False)
    one = compare(vae, x[:1], specs, repeats=8, seed=2, per_example=True)
    batch = compare(vae, x[:1], specs, repeats=8, seed=2)
    for spec in specs:
        for name, groups in one[spec]["grad_snr_by_aggregate"].items():
            for group, entry in groups.items():
                assert entry["snr"] == pytest.approx(batch[spec]["grad_snr_by_aggregate"][name][group]["snr"])
        assert one[spec]["bound_mean"] == pytest.approx(batch[spec]["bound_mean"])
        assert one[spec]["ess"] == pytest.approx(batch[spec]["ess"])
        assert 1 <= one[spec]["ess"] <= 5 and len(one[spec]["weight_moment_ratio"]) == 1


def test_per_example_shapes_and_option_checks(lg, x):
    specs = ["trace", "iwae(k=4)"]
    vae = lg.build_vae(exact_posterior=False)
    results = compare(vae, x[:3], specs, repeats=6, per_example=True, snr_aggregate="rms")
    for r in results.values():
        assert r["protocol"] == "per_example" and r["batch"] == 3 and r["repeats"] == 6
        for name in ("mean", "median", "rms", "norm"):
            assert set(r["grad_snr_examples"][name]) == {"encoder", "decoder"}
            assert all(len(v) == 3 for v in r["grad_snr_examples"][name].values())
        assert r["grad_snr"]["encoder"] == r["grad_snr_by_aggregate"]["rms"]["encoder"]["snr"]
    assert results["iwae(k=4)"]["k"] == 4 and len(results["iwae(k=4)"]["weight_moment_ratio"]) == 3
    from pyro_vae.compare import snr_slopes, with_aggregate

    median = with_aggregate(results, "median")
    assert (
        median["iwae(k=4)"]["grad_snr"]["decoder"]
        == results["iwae(k=4)"]["grad_snr_by_aggregate"]["median"]["decoder"]["snr"]
    )
    assert median["trace"]["snr_aggregate"] == "median" and results["trace"]["snr_aggregate"] == "rms"
    assert snr_slopes(median, k_min=1) == []  # one k value
    with pytest.raises(ValueError, match="snr_aggregate"):
        compare(vae, x[:2], ["trace"], repeats=4, snr_aggregate="max")
    with pytest.raises(ValueError, match="at least 4 repeats"):
        compare(vae, x[:2], ["trace"], repeats=3, snr_aggregate="rms")
    with pytest.raises(ValueError, match="chunk"):
        compare(vae, x[:2], ["trace"], repeats=3, chunk=0)


def test_jackknife_se_matches_the_spread_of_independent_measurements(lg, x):
    """The batch protocol's SNR SE (delete-a-group jackknife over repeats) against the std of the SNR over
    independent measurements with other seeds; the SD of 24 replicates is itself uncertain by ~15%."""
    vae = lg.build_vae(exact_posterior=False)
    values, ses = [], []
    for seed in range(24):
        r = compare(vae, x[:2], ["iwae(k=10)"], repeats=40, seed=100 + seed, snr_aggregate="rms")["iwae(k=10)"]
        values.append(r["grad_snr"]["decoder"])
        ses.append(r["grad_snr_se"]["decoder"])
    spread = torch.tensor(values).std().item()
    mean_se = sum(ses) / len(ses)
    print(f"[stat] jackknife SE {mean_se:.4f} vs spread over 24 seeds {spread:.4f} (SNR {sum(values) / 24:.3f})")
    assert 0.6 < mean_se / spread < 1.6


def test_iwae_encoder_snr_falls_with_k_and_dregs_does_not(lg, x):
    """Rainforth et al. (2018, Theorem 1): per datapoint, the IWAE gradient's SNR for the inference network
    falls like k^-1/2 and the generative network's rises like k^1/2; DReG's inference SNR rises (Tucker
    et al. 2019). On the linear-Gaussian model E[w^2]/E[w]^2 is small, so the rates show by k = 10..1000."""
    vae = lg.build_vae(exact_posterior=False)
    specs = ["iwae(k=10)", "iwae(k=1000)", "dreg(k=10)", "dreg(k=1000)"]
    r = compare(vae, x[:1], specs, repeats=200, seed=0)  # one datapoint's own gradient

    def change(spec_a, spec_b, group):
        a, b = r[spec_a], r[spec_b]
        diff = b["grad_snr"][group] - a["grad_snr"][group]
        se = math.hypot(a["grad_snr_se"][group], b["grad_snr_se"][group])
        print(
            f"[stat] {group} SNR {spec_a} {a['grad_snr'][group]:.3f} -> {spec_b} {b['grad_snr'][group]:.3f}: "
            f"{diff:+.3f} +- {se:.3f} (SE)"
        )
        return diff, se

    diff, se = change("iwae(k=10)", "iwae(k=1000)", "encoder")
    assert diff < -4 * se
    diff, se = change("dreg(k=10)", "dreg(k=1000)", "encoder")
    assert diff > 4 * se
    diff, se = change("iwae(k=10)", "iwae(k=1000)", "decoder")
    assert diff > 4 * se
    assert r["iwae(k=1000)"]["ess"] > 50  # the regime of the asymptotics: many effective draws


def test_slopes_of_exact_power_laws():
    from pyro_vae.compare import snr_slopes

    def result(k, values, se=None):
        per = {"encoder": [c * k**-0.5 for c in values], "decoder": [c * k**0.5 for c in values]}
        mean = {g: sum(v) / len(v) for g, v in per.items()}
        r = {"grad_snr": mean, "grad_snr_se": {g: se for g in per}, "snr_aggregate": "mean"}
        if se is None:
            r["grad_snr_examples"] = {"mean": per}
        return r

    per_example = {f"iwae(k={k})": result(k, [0.5, 1.0, 2.0]) for k in (1, 10, 100, 1000)}
    slopes = {s["group"]: s for s in snr_slopes(per_example, k_min=10)}
    assert slopes["encoder"]["slope"] == pytest.approx(-0.5) and slopes["decoder"]["slope"] == pytest.approx(0.5)
    assert slopes["encoder"]["ks"] == [10, 100, 1000] and slopes["encoder"]["fit"] == "per-example"
    assert slopes["encoder"]["se"] == pytest.approx(0.0, abs=1e-12)
    for key in per_example.values():  # SEs of the example means, for the fit on the aggregate
        key["grad_snr_se"] = {"encoder": 0.01, "decoder": 0.01}
    slopes = {s["group"]: s for s in snr_slopes(per_example, k_min=10, fit="aggregate")}
    assert slopes["encoder"]["slope"] == pytest.approx(-0.5) and slopes["encoder"]["fit"] == "weighted"
    with pytest.raises(ValueError, match="fit must be"):
        snr_slopes(per_example, fit="pooled")
    batch = {f"dreg(k={k})": result(k, [1.0], se=0.01) for k in (3, 30, 300)}
    slopes = {s["group"]: s for s in snr_slopes(batch, k_min=1)}
    assert slopes["encoder"]["slope"] == pytest.approx(-0.5) and slopes["encoder"]["fit"] == "weighted"
    assert slopes["encoder"]["estimator"] == "dreg" and slopes["encoder"]["se"] > 0
    assert snr_slopes(batch, k_min=100) == []  # one k value: no slope


def test_snr_figures_are_written(lg, x, tmp_path):
    from pyro_vae.compare import write_snr_figure

    vae = lg.build_vae(exact_posterior=False)
    specs = ["iwae(k=1)", "iwae(k=10)", "dreg(k=1)", "dreg(k=10)"]
    a = compare(vae, x[:2], specs, repeats=5, per_example=True)
    b = compare(vae, x[:2], specs, repeats=5)
    path = write_snr_figure({"per example": a, "batch mean": b}, tmp_path / "snr.png")
    assert path.is_file() and path.stat().st_size > 1000
    grid = write_snr_figure({"a": a, "b": b, "c": a}, tmp_path / "grid.png", columns=2)  # a hidden fourth axis
    assert grid.is_file()
    write_reports(a, tmp_path / "reports", slope_k_min=1)
    table = (tmp_path / "reports" / "compare.md").read_text()
    assert "| iwae | encoder | 1, 10 |" in table and "per-example" in table


def test_pyro_vae_compare_per_example_options(tiny_run, tmp_path, capsys):
    out = tmp_path / "snr"
    argv = ["compare", "--run", str(tiny_run), "--estimators", "iwae(k=1),iwae(k=3)", "--repeats", "4"]
    argv += ["--per-example", "--batch", "3", "--snr-aggregate", "median", "--weights", "initial", "--out", str(out)]
    assert main([*argv, "--json", "--seed", "5"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads((out / "compare.json").read_text()) == printed
    for r in printed.values():
        assert r["protocol"] == "per_example" and r["snr_aggregate"] == "median" and r["batch"] == 3
    assert main([*argv, "--slope-k-min", "1"]) == 0
    assert "Log-log slope of the SNR against k, fitted over k >= 1" in capsys.readouterr().out


def test_initial_weights_are_the_seeded_untrained_model(tiny_run, monkeypatch):
    import pyro

    from pyro_vae import compare as compare_module
    from pyro_vae.runs import build_vae, load_run

    seen = {}

    def capture(vae, x, estimators, **kwargs):
        seen["vae"] = vae
        return {}

    monkeypatch.setattr(compare_module, "write_reports", lambda *a, **k: [])
    monkeypatch.setattr(compare_module, "compare", capture)
    compare_module.compare_run(tiny_run, ["trace"], weights="initial", device="cpu")
    run = load_run(tiny_run, device="cpu")
    pyro.set_rng_seed(run.config.train.seed)
    fresh = build_vae(run.config.model, x_dim=run.dataset.x_dim, x_shape=run.image_shape)
    got, trained = seen["vae"].state_dict(), run.vae.state_dict()
    assert all(torch.equal(got[name], fresh.state_dict()[name]) for name in got)
    assert not all(torch.equal(got[name], trained[name]) for name in got)
    with pytest.raises(ValueError, match="weights must be one of"):
        compare_module.compare_run(tiny_run, ["trace"], weights="random")
