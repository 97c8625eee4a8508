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
