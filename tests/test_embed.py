"""Latent codes: posterior moments of each guide family, the .npz that ``pyro-vae embed`` writes (keys,
shapes, labels), the probe table, and its one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pyro.distributions as dist
import pytest
import torch

from pyro_vae import cli
from pyro_vae.embed import encode, posterior_moments
from pyro_vae.model import VAE
from pyro_vae.runs import load_run


def test_moments_are_analytic_for_normal_and_lowrank_and_sampled_for_a_flow():
    loc, scale = torch.randn(4, 3), torch.rand(4, 3) + 0.5
    mean, sd, kind = posterior_moments(dist.Normal(loc, scale).to_event(1))
    assert kind == "analytic" and torch.equal(mean, loc) and torch.equal(sd, scale)
    factor = torch.randn(4, 3, 2)
    _, sd, kind = posterior_moments(dist.LowRankMultivariateNormal(loc, factor, scale.square()))
    marginal = (factor.square().sum(-1) + scale.square()).sqrt()  # sqrt(diag(F F^T + D))
    assert kind == "analytic"
    torch.testing.assert_close(sd, marginal)
    shifted = dist.TransformedDistribution(
        dist.Normal(loc, scale).to_event(1), [dist.transforms.AffineTransform(2.0, 3.0)]
    )
    mean, sd, kind = posterior_moments(shifted, num_samples=20000)
    assert kind == "sampled (20000 draws)"
    torch.testing.assert_close(mean, 2 + 3 * loc, atol=0.15, rtol=0)
    torch.testing.assert_close(sd, 3 * scale, atol=0.1, rtol=0.05)


def test_encode_gives_the_guides_own_loc_and_scale_in_batches():
    vae = VAE(x_dim=6, z_dim=2, hidden_dims=(5,))
    x = torch.rand(7, 6)
    loc, scale, kind = encode(vae, x, batch_size=3)
    expected_loc, expected_scale = vae.encode(x)
    torch.testing.assert_close(loc, expected_loc.detach())
    torch.testing.assert_close(scale, expected_scale.detach())
    assert kind == "analytic" and not loc.requires_grad


def test_a_model_without_q_of_x_alone_is_refused():
    m2 = VAE(x_dim=6, z_dim=2, hidden_dims=(5,), structure="m2(classes=3)")
    with pytest.raises(ValueError, match="embed reads q\\(z\\|x\\) of x alone"):
        encode(m2, torch.rand(4, 6))


def test_embed_writes_the_documented_npz(tiny_run, tmp_path, capsys):
    out = tmp_path / "codes"  # no suffix: written at exactly this path
    assert cli.main(["embed", "--run", str(tiny_run), "--out", str(out), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    with np.load(out) as f:  # no pickles needed
        arrays = {key: f[key] for key in f.files}
    expected = {"train_loc", "train_scale", "train_labels", "test_loc", "test_scale", "test_labels"}
    assert set(arrays) == expected | {"scale_kind", "data_variant", "run"}
    assert arrays["train_loc"].shape == arrays["train_scale"].shape == (400, 2)  # 500 - 100 for validation
    assert arrays["test_loc"].shape == (200, 2) and arrays["test_labels"].dtype == np.int64
    assert str(arrays["scale_kind"]) == "analytic" and (arrays["test_scale"] > 0).all()
    run = load_run(tiny_run, device="cpu")
    assert np.array_equal(arrays["test_labels"], run.dataset.test_labels.numpy())
    loc, _ = run.vae.encode(run.dataset.test)
    np.testing.assert_allclose(arrays["test_loc"], loc.detach().numpy(), rtol=1e-6, atol=1e-6)


def test_embed_probe_table_and_json(tiny_run, tmp_path, capsys):
    args = ["embed", "--run", str(tiny_run), "--out", str(tmp_path / "c.npz"), "--device", "cpu", "--probe"]
    assert cli.main([*args, "--labels", "50,all"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["probe", "labels", "test", "accuracy", "n", "test"] and len(table) == 5
    assert (
        cli.main(
            [
                *args,
                "--probes",
                "knn(k=3)",
                "--labels",
                "20",
                "--json",
                "--split",
                "val",
                "--split",
                "train",
                "--split",
                "test",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    (record,) = report["probes"]
    assert record["probe"] == "knn(k=3)" and record["labels"] == 20 and record["num_test"] == 200
    with np.load(tmp_path / "c.npz") as f:
        assert "val_loc" in f.files


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--probe", "--split", "test"], "--probe trains on the train codes and tests on the test codes"),
        (["--probe", "--labels", "10,x"], "--labels takes positive counts or 'all'"),
        (["--probe", "--probes", "knn(q=1)"], "probe 'knn' has no argument 'q'"),
    ],
)
def test_embed_mistakes_are_one_line(tiny_run, tmp_path, capsys, extra, message):
    args = ["embed", "--run", str(tiny_run), "--out", str(tmp_path / "c.npz"), "--device", "cpu", *extra]
    assert cli.main(args) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c.npz").exists()  # refused before anything is encoded
