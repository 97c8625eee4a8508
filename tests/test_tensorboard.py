"""``train.tensorboard``: the event files hold the epoch's numbers, KL per unit and gradient norms, and
a run with them trains exactly as one without."""

from __future__ import annotations

import builtins

import pyro
import pytest
import torch
from test_train import _metrics, tiny

from pyro_vae import cli
from pyro_vae.model import VAE
from pyro_vae.train import train
from pyro_vae.train.tensorboard import gradient_norms

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")


def read_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder)).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_event_files_hold_the_metrics_and_training_is_unchanged(tmp_path):
    train(tiny("train.epochs=2", "train.tensorboard=true"), tmp_path / "tb", progress=False)
    train(tiny("train.epochs=2"), tmp_path / "plain", progress=False)
    assert _metrics(tmp_path / "tb") == _metrics(tmp_path / "plain")  # same draws, same steps
    scalars = read_scalars(tmp_path / "tb" / "tensorboard")
    records = _metrics(tmp_path / "tb")
    for key, tag in (("train_elbo", "elbo/train"), ("val_elbo", "elbo/val"), ("lr", "lr"), ("beta", "beta")):
        assert [step for step, _ in scalars[tag]] == [1, 2]
        assert [value for _, value in scalars[tag]] == pytest.approx([r[key] for r in records], rel=1e-6)
    assert {"kl_per_unit/00", "kl_per_unit/01", "kl/active_units"} <= set(scalars)
    assert {"grad_norm/encoder", "grad_norm/decoder", "grad_norm/total"} <= set(scalars)
    assert not (tmp_path / "plain" / "tensorboard").exists()


def test_gradient_norms_are_the_norms_of_the_loss_gradient_per_module():
    torch.manual_seed(0)
    vae = VAE(x_dim=6, z_dim=2, hidden_dims=(5,))
    x = torch.rand(4, 6).round()
    from pyro_vae import estimators

    estimator = estimators.get("trace")
    pyro.set_rng_seed(1)
    norms = gradient_norms(vae, estimator, x, {}, rows=4)
    assert all(p.grad is None for p in vae.parameters())  # cleared after
    pyro.set_rng_seed(1)
    estimator.loss(vae, x, 1.0).backward()
    encoder = torch.cat([p.grad.flatten() for p in vae.encoder.parameters() if p.grad is not None])
    total = torch.cat([p.grad.flatten() for p in vae.parameters() if p.grad is not None])
    assert norms["encoder"] == pytest.approx(encoder.norm().item(), rel=1e-5)
    assert norms["total"] == pytest.approx(total.norm().item(), rel=1e-5)


def test_a_prior_without_per_unit_kl_logs_the_rest(tmp_path):
    cfg = tiny("train.epochs=1", "train.tensorboard=true", "model.prior=vamp(components=3)", "train.warmup_epochs=1")
    train(cfg, tmp_path / "run", progress=False)
    scalars = read_scalars(tmp_path / "run" / "tensorboard")
    assert "elbo/train" in scalars and "grad_norm/prior" in scalars
    assert not any(tag.startswith("kl_per_unit") for tag in scalars)


def test_without_the_package_the_run_refuses_in_one_line_before_writing(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    sets = [a for item in tiny_sets("train.tensorboard=true") for a in ("--set", item)]
    (tmp_path / "empty.toml").write_text("")
    assert cli.main(["train", "--config", str(tmp_path / "empty.toml"), *sets, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install "pyro-vae[tensorboard]"' in err[0]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def tiny_sets(*extra: str) -> list[str]:
    from test_train import TINY

    return [*TINY, "train.epochs=1", *extra]
