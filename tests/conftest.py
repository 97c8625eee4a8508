"""Shared fixtures. Tests that need ../shared/data fail loudly under CI=true when it is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pyro
import pytest
import torch
from linear_gaussian import linear_gaussian

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    env = os.environ.get("PYRO_VAE_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared data folder (``$PYRO_VAE_DATA`` or ``../shared/data``)."""
    root = _data_root()
    if not (root / "MNIST" / "raw").is_dir():
        message = f"shared data not found at {root} (set PYRO_VAE_DATA or put shared/ beside the repo)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(scope="module")
def lg():
    """The linear-Gaussian reference model of the estimator, compare and guide tests
    (``tests/linear_gaussian.py``: x_dim 6, z_dim 3, noise s = 0.5, seed 0), one per test module."""
    return linear_gaussian(x_dim=6, z_dim=3, s=0.5, seed=0)


@pytest.fixture(scope="module")
def x(lg):
    """16 examples drawn from ``lg`` (seed 1); a module may define its own ``x`` instead."""
    return lg.sample(16, torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """Every test starts with an empty param store and a fixed seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    torch.set_default_dtype(torch.float32)
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder of one epoch on ``synthetic(num_train=500, num_test=200)`` (8x8 binary, 10 classes),
    z_dim 2, one hidden layer of 16: seconds to train, for the commands that read a run (score, embed)."""
    from pyro_vae import cli

    folder = tmp_path_factory.mktemp("tiny")
    config = folder / "tiny.toml"
    config.write_text('[data]\nname = "synthetic(num_train=500, num_test=200)"\n\n[train]\nseed = 3\n')
    sets = ["model.z_dim=2", "model.hidden_dims=[16]", "train.epochs=1", "train.batch_size=100"]
    sets += ["train.nll_samples=0", "train.plots=false", "train.device=cpu"]
    args = ["train", "--config", str(config), "--out", str(folder / "run"), "--no-progress"]
    assert cli.main(args + [arg for item in sets for arg in ("--set", item)]) == 0
    return folder / "run"
