"""Missing data: the masks of ``data.missing`` (pyro_vae.masks, pyro_vae.fields), the masked observed site
(``likelihoods.observe_pixels``), the structure ``miwae`` and a plain VAE conditioned at test time, checked
against the hand-computed masked likelihood and the exact marginal of the observed coordinates of the
linear-Gaussian model; training end to end and the one-line refusals."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pyro
import pytest
import torch
from linear_gaussian import DTYPE, linear_gaussian, set_guide
from mc_stats import assert_within_se
from pyro import poutine
from torch.distributions import MultivariateNormal

from pyro_vae import cli, estimators
from pyro_vae.checks import load_config
from pyro_vae.config import ConfigError
from pyro_vae.data import load_dataset
from pyro_vae.evaluate import evaluate, log_likelihood_with_se
from pyro_vae.fields import attach_fields, check_provided
from pyro_vae.likelihoods import observe_pixels
from pyro_vae.masks import MASKS, draw_masks, split_seed
from pyro_vae.model import VAE
from pyro_vae.recorded import RecordedLoss
from pyro_vae.traces import log_weights, reparameterized_elbo_loss

SHAPE = (1, 4, 4)
D = 16


def _bits(n: int = 7, seed: int = 0) -> torch.Tensor:
    return (torch.rand(n, D, generator=torch.Generator().manual_seed(seed)) < 0.4).float()


def _mask(n: int = 7, seed: int = 1, rate: float = 0.4) -> torch.Tensor:
    return draw_masks(f"mcar(rate={rate})", SHAPE, n, seed)


# -- masks -----------------------------------------------------------------------------------------------
def test_masks_are_fixed_by_the_seed_and_differ_between_seeds_and_splits():
    for spec in ("mcar(rate=0.3)", "squares(size=2)"):
        first = draw_masks(spec, (3, 6, 5), 50, seed=4)
        assert first.shape == (50, 90) and first.dtype == torch.bool
        assert torch.equal(first, draw_masks(spec, (3, 6, 5), 50, seed=4))
        assert not torch.equal(first, draw_masks(spec, (3, 6, 5), 50, seed=5))
        channels = first.reshape(50, 3, 30)
        assert (channels == channels[:, :1]).all()  # every channel of a pixel shares its fate
    assert len({split_seed(0, split) for split in ("train", "val", "test")}) == 3
    assert split_seed(0, "test") != split_seed(1, "test")


def test_mcar_misses_each_pixel_with_probability_rate():
    rate, n = 0.3, 400
    masks = draw_masks(f"mcar(rate={rate})", (1, 8, 8), n, seed=0)
    missing = float((~masks).double().mean())
    se = math.sqrt(rate * (1 - rate) / masks.numel())
    assert abs(missing - rate) < 5 * se, (missing, rate, se)
    assert draw_masks("mcar(rate=0)", SHAPE, 5, seed=0).all()


def test_squares_are_one_square_of_the_size_inside_each_image():
    size, (c, h, w) = 3, (2, 7, 5)
    masks = draw_masks(f"squares(size={size})", (c, h, w), 200, seed=0).reshape(200, c, h, w)
    missing = ~masks[:, 0]
    assert (missing.sum((1, 2)) == size * size).all()
    rows, cols = missing.any(2), missing.any(1)  # (200, h), (200, w)
    assert (rows.sum(1) == size).all() and (cols.sum(1) == size).all()
    assert torch.equal(missing, rows[:, :, None] & cols[:, None, :])  # a full block, not scattered pixels
    tops = rows.float().argmax(1)
    assert set(tops.tolist()) == set(range(h - size + 1))  # every position inside the image occurs
    assert (masks[:, 1] == masks[:, 0]).all()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mcr(rate=0.5)", r"unknown mask 'mcr' \(did you mean \"mcar\"\?\); valid masks: mcar, squares"),
        ("mcar(rate=1)", r"rate must be a finite number in \[0, 1\), got 1"),
        ("mcar(rate=-0.1)", r"rate must be a finite number in \[0, 1\)"),
        ("mcar(rate='half')", "rate must be a finite number"),
        ("squares(size=0)", "size must be a positive integer, got 0"),
        ("squares(size=5)", "mask squares\\(size=5\\) does not fit 1x4x4 images: size must be at most 4"),
        ("squares(size=4)", "leave some pixel observed"),
        ("squares(side=4)", "mask 'squares' has no argument 'side'"),
    ],
)
def test_bad_mask_specs_are_one_line_errors(spec, message):
    with pytest.raises(ValueError, match=message) as caught:
        draw_masks(spec, SHAPE, 3, seed=0)
    assert "\n" not in str(caught.value)


def test_the_config_key_checks_the_name_before_any_data_loads():
    cfg = load_config(None, ['data.missing="squares(size=14)"'])
    assert cfg.data.missing == "squares(size=14)"
    assert load_config(None, []).data.missing is None
    with pytest.raises(ConfigError, match=r"data.missing: unknown mask 'holes'.*valid masks: mcar, squares"):
        load_config(None, ["data.missing=holes"])
    assert set(MASKS.names()) == {"mcar", "squares"}


def test_attach_fields_adds_one_mask_per_example_and_split():
    dataset = attach_fields(load_dataset("synthetic(side=4, num_train=60, num_test=30)"), seed=3, missing="mcar")
    masks = dataset.fields["mask"]
    for split in ("train", "val", "test"):
        x = getattr(dataset, split)
        assert masks[split].shape == x.shape and masks[split].dtype == torch.bool
        assert masks[split].device == x.device
    assert not torch.equal(masks["train"][:12], masks["val"])  # each split its own stream
    again = attach_fields(load_dataset("synthetic(side=4, num_train=60, num_test=30)"), seed=3, missing="mcar")
    assert torch.equal(again.fields["mask"]["test"], masks["test"])
    with pytest.raises(ValueError, match=r"^data.missing = 'squares\(size=9\)': mask squares\(size=9\) does not fit"):
        attach_fields(load_dataset("synthetic(side=4)"), missing="squares(size=9)")


def test_a_structure_that_ignores_the_mask_is_refused_and_miwae_needs_one():
    dataset = attach_fields(load_dataset("synthetic(side=4)"), missing="mcar(rate=0.2)")
    check_provided(dataset, ("mask",), structure="miwae")
    with pytest.raises(ValueError, match=r"structure 'vae' does not consume the data field 'mask'.*\"miwae\""):
        check_provided(dataset, (), structure="vae")
    with pytest.raises(ValueError, match=r"structure 'miwae' consumes the data field 'mask'.*set data.missing"):
        check_provided(load_dataset("synthetic(side=4)"), ("mask",), structure="miwae")


# -- the masked model ------------------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian(scale=0.3)", "continuous_bernoulli", "categorical"])
def test_an_all_observed_mask_is_the_fully_observed_model(likelihood):
    torch.manual_seed(0)
    vae = VAE(x_dim=D, z_dim=2, hidden_dims=(5,), likelihood=likelihood, x_shape=SHAPE)
    x, ones = _bits(), torch.ones(7, D, dtype=torch.bool)  # binary: on every likelihood's support
    pyro.set_rng_seed(3)
    full = log_weights(vae, x, 4)
    pyro.set_rng_seed(3)
    torch.testing.assert_close(log_weights(vae, x, 4, mask=ones), full, rtol=1e-6, atol=1e-5)
    for spec in ("trace", "iwae(k=3)"):
        estimator = estimators.get(spec)
        pyro.set_rng_seed(5)
        expected = estimator.loss(vae, x)
        pyro.set_rng_seed(5)
        torch.testing.assert_close(estimator.loss(vae, x, mask=ones), expected, rtol=1e-6, atol=1e-5)


def _miwae_like(vae: VAE) -> VAE:
    """A miwae whose decoder is ``vae``'s and whose encoder on [x * 1, 1] is ``vae``'s encoder on x: the mask's
    columns of the first layer folded into its bias."""
    miwae = VAE(x_dim=D, z_dim=2, hidden_dims=(5,), x_shape=SHAPE, structure="miwae")
    miwae.decoder.load_state_dict(vae.decoder.state_dict())
    plain, doubled = vae.encoder.net, miwae.encoder.net
    doubled.head.load_state_dict(plain.head.state_dict())
    first, wide = plain.body.layers[0], doubled.body.layers[0]
    with torch.no_grad():
        wide.weight.copy_(torch.cat([first.weight, torch.zeros_like(first.weight)], 1))
        wide.bias.copy_(first.bias)
        wide.weight[:, D:] = 0.25
        wide.bias.sub_(0.25 * D)  # the mask's columns add 0.25 per observed pixel: all observed, the bias cancels them
    return miwae


def test_miwae_on_an_all_observed_mask_is_the_plain_vae_and_its_encoder_reads_image_and_mask():
    torch.manual_seed(0)
    vae = VAE(x_dim=D, z_dim=2, hidden_dims=(5,), x_shape=SHAPE)
    miwae = _miwae_like(vae)
    assert miwae.consumes == ("mask",) and miwae.encoder.net.body.layers[0].in_features == 2 * D
    assert miwae.encoder_shape == (2, 4, 4) and vae.encoder_shape == SHAPE
    x, ones = _bits(), torch.ones(7, D, dtype=torch.bool)
    pyro.set_rng_seed(3)
    expected = log_weights(vae, x, 5)
    pyro.set_rng_seed(3)
    torch.testing.assert_close(log_weights(miwae, x, 5, mask=ones), expected, rtol=1e-6, atol=1e-5)
    half = _mask()
    pyro.set_rng_seed(3)
    assert not torch.allclose(log_weights(miwae, x, 5, mask=half), log_weights(vae, x, 5, mask=half))


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian(scale=0.3)", "beta", "categorical"])
def test_the_likelihood_term_is_the_sum_over_the_observed_pixels(likelihood):
    torch.manual_seed(0)
    vae = VAE(x_dim=D, z_dim=2, hidden_dims=(5,), likelihood=likelihood, x_shape=SHAPE, structure="miwae")
    x, mask = _bits(), _mask()
    z = torch.randn(7, 2)
    trace = poutine.trace(poutine.condition(vae.model, data={"z": z})).get_trace(x, mask=mask)
    site = trace.nodes["x"]
    got = site["fn"].log_prob(site["value"])
    per_pixel = vae.likelihood(vae.decoder(z)).base_dist.log_prob(vae.likelihood.prepare(x))  # (7, D)
    torch.testing.assert_close(got, (per_pixel * mask).sum(-1))
    if likelihood == "bernoulli":  # and by hand: sum over observed d of x log p + (1 - x) log(1 - p)
        p = torch.sigmoid(vae.decoder(z))
        by_hand = torch.where(mask, x * p.log() + (1 - x) * (1 - p).log(), 0.0).sum(-1)
        torch.testing.assert_close(got, by_hand, rtol=1e-5, atol=1e-5)


def test_the_values_at_missing_pixels_reach_neither_the_bound_nor_the_encoder():
    torch.manual_seed(0)
    vae = VAE(x_dim=D, z_dim=2, hidden_dims=(5,), x_shape=SHAPE, structure="miwae")
    x, mask = _bits(), _mask()
    other = torch.where(mask, x, 1 - x)  # every missing pixel flipped
    for lw in (
        lambda v: log_weights(vae, v, 6, mask=mask),
        lambda v: estimators.get("iwae(k=4)").loss(vae, v, mask=mask),
    ):
        pyro.set_rng_seed(1)
        expected = lw(x)
        pyro.set_rng_seed(1)
        assert torch.equal(lw(other), expected)
    grads = []
    for v in (x, other):
        vae.zero_grad()
        pyro.set_rng_seed(1)
        estimators.get("trace").loss(vae, v, mask=mask).backward()
        grads.append([p.grad.clone() for p in vae.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_observe_pixels_without_a_mask_is_the_distribution_itself():
    pixels = VAE(x_dim=D, z_dim=2, hidden_dims=(5,)).decode(torch.zeros(3, 2))
    assert observe_pixels(pixels, None) is pixels
    masked = observe_pixels(pixels, _mask(3))
    torch.testing.assert_close(masked.mean, pixels.mean)  # draws and means are of every pixel
    with pytest.raises(ValueError, match="needs a likelihood of independent pixels"):
        observe_pixels(pixels.base_dist, _mask(3))


def test_observed_dim_is_the_mean_observed_count_and_closed_form_refuses():
    vae = VAE(x_dim=D, z_dim=2, hidden_dims=(5,), x_shape=SHAPE, structure="miwae")
    mask = _mask(9)
    assert vae.observed_dim(_bits(9), mask=mask) == pytest.approx(float(mask.sum()) / 9)
    for spec in ("closed_form", "jit_trace", "jit_meanfield"):
        with pytest.raises(ValueError, match=f"estimator '{spec}' takes x alone, but the model consumes mask"):
            estimators.get(spec).loss(vae, _bits(), mask=mask)
    assert "observes only the observed ones" in vae.closed_form_refusal


def test_the_recorded_loss_takes_the_mask_as_an_input_and_replays_the_eager_loss():
    torch.manual_seed(0)
    vae = VAE(x_dim=D, z_dim=2, hidden_dims=(5,), x_shape=SHAPE, structure="miwae")
    recorded = RecordedLoss(reparameterized_elbo_loss, vae)
    x = _bits(6)
    for seed in (1, 2):  # the same graph for another mask: the mask is an input, not a constant
        mask = _mask(6, seed=seed)
        assert recorded.record(x, 1.0, mask=mask) is not None, recorded.fallback_reason
        pyro.set_rng_seed(7)
        replayed = recorded(vae, x, 1.0, mask=mask)
        pyro.set_rng_seed(7)
        assert torch.equal(replayed, reparameterized_elbo_loss(vae, x, 1.0, mask=mask))
    assert len(recorded.replays) == 1


# -- the linear-Gaussian model: the exact marginal of the observed coordinates --------------------------
def _wide_guide(vae: VAE, lg, scale: float = 1.2) -> None:
    """q(z|x) = N(0, scale^2 I), wider than p(z) = N(0, I): the weights p(x_obs, z) / q(z) are bounded, so
    their sample variance (and the standard error made of it) can be trusted."""
    set_guide(
        vae, torch.zeros(lg.z_dim, lg.x_dim, dtype=DTYPE), torch.zeros(lg.z_dim, dtype=DTYPE), torch.full((3,), scale)
    )


def test_the_importance_sampled_nll_of_the_observed_pixels_is_the_exact_marginal():
    lg = linear_gaussian(x_dim=6, z_dim=3, s=0.5, seed=0)
    vae = lg.build_vae()
    _wide_guide(vae, lg)
    x = lg.sample(12, torch.Generator().manual_seed(1))
    mask = torch.rand(12, 6, generator=torch.Generator().manual_seed(2)) > 0.4
    cov = lg.W @ lg.W.T + lg.s**2 * torch.eye(6, dtype=DTYPE)  # of x; of x_obs: its observed block
    exact = torch.stack(
        [MultivariateNormal(lg.b[m], cov[m][:, m]).log_prob(xi[m]) for xi, m in zip(x, mask, strict=True)]
    )
    pyro.set_rng_seed(0)
    estimate, se = log_likelihood_with_se(vae, x, 20000, mask=mask)
    assert_within_se("log p(x_obs), linear-Gaussian, per example", estimate, exact, se)
    # The same through the structure miwae: an encoder that ignores its input gives the very same weights.
    miwae = VAE(x_dim=6, z_dim=3, hidden_dims=(), likelihood="gaussian(scale=0.5)", structure="miwae").double()
    miwae.decoder.load_state_dict(vae.decoder.state_dict())
    with torch.no_grad():
        miwae.encoder.net.head.weight.zero_()
        miwae.encoder.net.head.bias.copy_(vae.encoder.net.head.bias)  # loc 0, scale 1.2
    pyro.set_rng_seed(4)
    expected = log_weights(vae, x, 10, mask=mask)
    pyro.set_rng_seed(4)
    torch.testing.assert_close(log_weights(miwae, x, 10, mask=mask), expected)


# -- training and evaluation end to end ---------------------------------------------------------------------
TINY = [
    "model.z_dim=2",
    "model.hidden_dims=[8]",
    "train.epochs=1",
    "train.batch_size=25",
    "train.nll_samples=4",
    "train.device=cpu",
]


def _train(tmp_path: Path, *sets: str) -> tuple[int, Path]:
    out, config = tmp_path / "run", tmp_path / "tiny.toml"
    config.write_text('[data]\nname = "synthetic(side=4, num_train=100, num_test=30)"\n')
    argv = ["train", "--config", str(config), "--out", str(out), "--no-progress"]
    argv += [item for s in [*TINY, *sets] for item in ("--set", s)]
    return cli.main(argv), out


def test_a_short_miwae_run_trains_the_observed_bound_and_evaluates_it(tmp_path, capsys):
    status, out = _train(tmp_path, "data.missing=squares(size=2)", "model.structure=miwae", "train.estimator=iwae(k=3)")
    assert status == 0, capsys.readouterr().err
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["test_elbo"] < 0 < evaluation["test_nll"]
    assert evaluation["bits_per_dim"] == pytest.approx(evaluation["test_nll"] / (12 * math.log(2)))  # 16 - 2 x 2
    assert {"samples.png", "imputations.png"} <= {p.name for p in out.glob("*.png")}


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["data.missing=mcar(rate=0.5)"], "structure 'vae' does not consume the data field 'mask'.*\"miwae\""),
        (
            ["data.missing=mcar(rate=0.5)", "model.structure=cvae", "data.quadrants=1"],
            "structure 'cvae' does not consume",
        ),
        (["model.structure=miwae"], "consumes the data field 'mask'.*set data.missing"),
        (["data.missing=mcar(rate=1.5)", "model.structure=miwae"], r"rate must be a finite number in \[0, 1\)"),
        (["data.missing=squares(size=9)", "model.structure=miwae"], "does not fit 1x4x4 images"),
        (["data.missing=mcar", "model.structure=miwae", "train.estimator=closed_form"], "takes x alone"),
        (["data.missing=mcar", "model.structure=miwae", "train.estimator=jit_trace"], "takes x alone"),
    ],
)
def test_bad_missing_data_settings_are_one_line_errors_before_any_checkpoint(tmp_path, capsys, sets, message):
    status, out = _train(tmp_path, *sets)
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(message, err), err
    assert not (out / "checkpoint.pt").exists()


def test_evaluate_reports_the_observed_bound_and_latent_diagnostics_of_q_given_the_mask():
    torch.manual_seed(0)
    vae = VAE(x_dim=D, z_dim=2, hidden_dims=(5,), x_shape=SHAPE, structure="miwae")
    x, mask = _bits(20), _mask(20)
    dataset = type("Data", (), {"name": "bits", "test": x, "is_binary": True, "fields": {"mask": {"test": mask}}})()
    result = evaluate(vae, dataset, nll_samples=3)
    assert result["bits_per_dim"] == pytest.approx(result["test_nll"] / (float(mask.sum()) / 20 * math.log(2)))
    assert result["active_units"] is not None and len(result["kl_per_dim"]) == 2
