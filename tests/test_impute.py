"""Imputation (pyro_vae.impute): SNIS and SIR against the exact conditional of the linear-Gaussian model, the
one log-weight mechanism, the errors and the mean-imputation baseline, and ``pyro-vae impute`` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyro
import pytest
import torch
from linear_gaussian import DTYPE, linear_gaussian, set_guide
from mc_stats import assert_within_se, mean_se

from pyro_vae import cli
from pyro_vae.evaluate import log_likelihood
from pyro_vae.impute import check_imputable, imputation_errors, impute, mean_imputation, observed_means, summarize
from pyro_vae.masks import draw_masks
from pyro_vae.model import VAE


@pytest.fixture(scope="module")
def lg():
    return linear_gaussian(x_dim=6, z_dim=3, s=0.5, seed=0)


OBSERVED = torch.tensor([True, False, True, True, False, True])


@pytest.fixture(scope="module")
def conditioned(lg):
    """The linear-Gaussian VAE with q(z|x) the exact posterior given x_obs = the pixels of :data:`OBSERVED`,
    N(Sigma_o W_o^T (x_o - b_o) / s^2, Sigma_o) with Sigma_o = (I + W_o^T W_o / s^2)^{-1}, its covariance
    replaced by 1.3^2 times its diagonal (the guide is diagonal; the wider proposal keeps the weights
    well behaved); 6 examples, all with that mask."""
    vae = lg.build_vae()
    w_obs, b_obs = lg.W[OBSERVED], lg.b[OBSERVED]
    cov = torch.linalg.inv(torch.eye(3, dtype=DTYPE) + w_obs.T @ w_obs / lg.s**2)
    gain = torch.zeros(3, 6, dtype=DTYPE)
    gain[:, OBSERVED] = cov @ w_obs.T / lg.s**2  # the encoder reads zeros on the missing pixels
    set_guide(vae, gain, -gain[:, OBSERVED] @ b_obs, 1.3 * cov.diagonal().sqrt())
    x = lg.sample(6, torch.Generator().manual_seed(1))
    return vae, x, OBSERVED.expand(6, -1)


def exact_conditional(lg, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of p(x_miss | x_obs) for x ~ N(b, C), C = W W^T + s^2 I:
    b_m + C_mo C_oo^{-1} (x_o - b_o) and C_mm - C_mo C_oo^{-1} C_om."""
    cov = lg.W @ lg.W.T + lg.s**2 * torch.eye(lg.x_dim, dtype=DTYPE)
    o, m = mask, ~mask
    gain = cov[m][:, o] @ torch.linalg.inv(cov[o][:, o])
    return lg.b[m] + gain @ (x[o] - lg.b[o]), cov[m][:, m] - gain @ cov[o][:, m]


def test_snis_imputation_is_the_exact_conditional_mean(lg, conditioned):
    vae, x, mask = conditioned
    replicas = 64  # independent SNIS estimates of each example, for a standard error over replicas
    pyro.set_rng_seed(0)
    done = impute(vae, x.repeat(replicas, 1), mask.repeat(replicas, 1), num_samples=2000)
    estimates = done.mean.reshape(replicas, *x.shape)
    for i in range(x.shape[0]):
        mean, se = mean_se(estimates[:, i][:, ~mask[i]])
        assert_within_se(f"E[x_miss | x_obs], example {i}", mean, exact_conditional(lg, x[i], mask[i])[0], se)
    assert torch.equal(done.mean[mask.repeat(replicas, 1)], x.repeat(replicas, 1)[mask.repeat(replicas, 1)])


def test_sir_draws_have_the_moments_of_the_exact_conditional(lg, conditioned):
    vae, x, mask = conditioned
    n, i = 2000, 0
    pyro.set_rng_seed(0)
    # Each row draws its own 1000 particles in chunks of 142: the reservoir over chunks is exercised.
    done = impute(vae, x[i].repeat(n, 1), mask[i].repeat(n, 1), num_samples=1000, draws=2, chunk_size=142)
    assert done.draws.shape == (2, n, 6)
    mean, cov = exact_conditional(lg, x[i], mask[i])
    for draws in done.draws:
        missing = draws[:, ~mask[i]]
        sample_mean, se = mean_se(missing)
        assert_within_se("SIR mean of x_miss", sample_mean, mean, se)
        # The variance of a Gaussian's sample variance is 2 sigma^4 / (n - 1).
        variance = missing.var(0)
        assert_within_se("SIR variance of x_miss", variance, cov.diagonal(), cov.diagonal() * math.sqrt(2 / (n - 1)))
        assert torch.equal(draws[:, mask[i]], x[i].repeat(n, 1)[:, mask[i]])


def test_the_log_weights_are_those_of_the_nll(conditioned):
    """One log-weight mechanism: with no draws, imputation consumes the random stream as the NLL does, chunk by
    chunk, and its log p(x_obs) is the NLL's to rounding."""
    vae, x, mask = conditioned
    pyro.set_rng_seed(3)
    done = impute(vae, x, mask, num_samples=50, chunk_size=7)
    pyro.set_rng_seed(3)
    torch.testing.assert_close(done.log_px, log_likelihood(vae, x, 50, chunk_size=7, mask=mask))
    assert ((done.ess >= 1 - 1e-9) & (done.ess <= 50 + 1e-9)).all()


@pytest.mark.parametrize("likelihood", ["bernoulli", "categorical", "gaussian(scale=0.2)"])
def test_imputations_are_in_data_units_for_every_kind_of_likelihood(likelihood):
    torch.manual_seed(0)
    vae = VAE(x_dim=16, z_dim=2, hidden_dims=(5,), likelihood=likelihood, x_shape=(1, 4, 4), structure="miwae")
    x = (torch.rand(5, 16, generator=torch.Generator().manual_seed(1)) * 255).round() / 255
    mask = draw_masks("squares(size=2)", (1, 4, 4), 5, seed=0)
    done = impute(vae, x, mask, num_samples=20, draws=2)
    assert done.mean.shape == (5, 16) and done.draws.shape == (2, 5, 16) and done.log_px.shape == (5,)
    if likelihood != "gaussian(scale=0.2)":
        assert (done.mean >= 0).all() and (done.mean <= 1).all() and (done.draws >= 0).all() and (done.draws <= 1).all()
    if likelihood == "bernoulli":
        assert set(done.draws[:, ~mask].unique().tolist()) <= {0.0, 1.0}


def test_errors_and_mean_imputation_by_hand():
    x = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, False, False, True], [True, True, False, True], [True, True, True, True]])
    imputed = torch.tensor([[1.0, 0.2, 0.7, 0.0], [0.0, 0.0, 0.4, 1.0], [1.0, 1.0, 1.0, 1.0]])
    errors = imputation_errors(x, mask, imputed, binary=True)
    torch.testing.assert_close(errors["mse"][:2], torch.tensor([(0.04 + 0.09) / 2, 0.36], dtype=torch.float64))
    bce = torch.tensor([-(math.log(0.8) + math.log(0.7)) / 2, -math.log(0.4)], dtype=torch.float64)
    torch.testing.assert_close(errors["bce"][:2], bce)
    torch.testing.assert_close(errors["accuracy"][:2], torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert errors["mse"][2].isnan()  # nothing missing: no error to count
    summary = summarize(errors)
    assert summary["accuracy"] == 0.5 and summary["accuracy_se"] == pytest.approx(0.5)
    assert set(imputation_errors(x, mask, imputed, binary=False)) == {"mse"}
    means = observed_means(x, mask)
    torch.testing.assert_close(means, torch.tensor([2 / 3, 0.5, 1.0, 2 / 3], dtype=torch.float64))
    never = observed_means(x[:1], torch.tensor([[True, False, True, True]]))
    assert never[1] == pytest.approx(2 / 3)  # a pixel never observed: the mean of every observed value
    filled = mean_imputation(x, mask, means)
    assert filled[0, 1] == pytest.approx(0.5) and filled[0, 0] == 1.0


def test_a_structure_without_a_mask_cannot_impute():
    cvae = VAE(x_dim=16, z_dim=2, hidden_dims=(5,), structure="cvae", x_shape=(1, 4, 4))
    with pytest.raises(ValueError, match=r"CVAE cannot be conditioned.*structures miwae, two_layer, vae") as caught:
        check_imputable(cvae)
    assert "\n" not in str(caught.value)
    two_layer = VAE(x_dim=16, z_dim=2, hidden_dims=(5,), structure="two_layer(z2_dim=2, hidden=[4])")
    mask = draw_masks("mcar(rate=0.5)", (1, 4, 4), 3, seed=0)
    assert impute(two_layer, torch.rand(3, 16).round(), mask, num_samples=4).mean.shape == (3, 16)


# -- the command ------------------------------------------------------------------------------------------
SETS = ["model.z_dim=2", "model.hidden_dims=[8]", "train.epochs=1", "train.batch_size=25", "train.nll_samples=2"]


def _run(tmp_path: Path, name: str, *sets: str) -> Path:
    out, config = tmp_path / name, tmp_path / "tiny.toml"
    config.write_text('[data]\nname = "synthetic(side=4, num_train=100, num_test=30)"\n[train]\ndevice = "cpu"\n')
    argv = ["train", "--config", str(config), "--out", str(out), "--no-progress", "--set", "train.plots=false"]
    assert cli.main([*argv, *(item for s in [*SETS, *sets] for item in ("--set", s))]) == 0
    return out


def test_impute_end_to_end_on_a_miwae_run_and_a_plain_one(tmp_path, capsys):
    miwae = _run(tmp_path, "miwae", "model.structure=miwae", "data.missing=mcar(rate=0.5)")
    capsys.readouterr()  # the run folder's name, printed by train
    figure = tmp_path / "imputations.png"
    argv = ["impute", "--run", str(miwae), "--samples", "20", "--num", "12", "--out", str(figure), "--json"]
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["missing"] == "mcar(rate=0.5)" and result["samples"] == 20 and result["split"] == "test"
    assert 0 < result["num_examples"] <= 12 and figure.stat().st_size > 0
    for who in ("model", "mean_imputation"):
        assert set(result[who]) == {"mse", "mse_se", "bce", "bce_se", "accuracy", "accuracy_se"}
        assert 0 <= result[who]["accuracy"] <= 1 and result[who]["mse_se"] > 0
    assert result["nll_observed"] > 0 and 1 <= result["ess"] <= 20

    plain = _run(tmp_path, "plain")
    capsys.readouterr()
    assert cli.main(["impute", "--run", str(plain), "--out", str(figure)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "without data.missing" in err and "--missing SPEC" in err
    argv = ["impute", "--run", str(plain), "--missing", "squares(size=2)", "--samples", "10", "--out", str(figure)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "mean imputation" in printed and "accuracy" in printed and str(figure) in printed
    for bad, message in [
        ("squares(size=7)", "--missing = 'squares(size=7)': mask squares(size=7) does not fit"),
        ("holes", "unknown mask 'holes'"),
    ]:
        assert cli.main(["impute", "--run", str(plain), "--missing", bad, "--out", str(figure)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, err
