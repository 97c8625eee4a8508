"""Every shipped config swaps to every data set with one --set data.name=...: the config loads, the data
set loads under it, and the model builds and accepts the data (docs/config.md, "Swapping the data set")."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from pyro_vae import checks, cli
from pyro_vae.data import DATASETS, FIXED_SPLITS, has_fixed_splits, load_dataset
from pyro_vae.runs import build_vae, load_dataset_for

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.toml"))
FILE_DATASETS = {"mnist", "mnist-dynamic", "mnist-static", "fashion-mnist"}  # in ../shared/data


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    """A CIFAR-10 in torchvision's layout: room for 10000 validation examples and 1000 to train on."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 2200) for i in range(1, 6)] + [("test_batch", 10)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [i % 10 for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return root


def test_every_data_set_is_covered_here():
    assert set(DATASETS.names()) == FILE_DATASETS | {"cifar10", "synthetic"}


# A swap that fails must say why in one line, and either be fixed by the one --set named here (a
# config's val_size larger than a small data set) or be impossible whatever the config says (a
# semi-supervised structure on a data set without labels).
FIXED_BY_ONE_SET = {"val_size must be an integer in": "data.val_size=none"}
IMPOSSIBLE = ("has no labels",)


def _swap(config: Path, overrides: list[str], root: Path | None) -> None:
    cfg = checks.load_config(config, overrides)
    dataset = load_dataset_for(cfg, data_dir=root)
    vae = build_vae(cfg.model, x_dim=dataset.x_dim, x_shape=dataset.image_shape)
    vae.check_data(dataset.train, name=dataset.name)
    assert bool(dataset.notes) == (dataset.name in FIXED_SPLITS and cfg.data.val_size is not None)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.stem)
@pytest.mark.parametrize("name", sorted(DATASETS.names()))
def test_a_shipped_config_swaps_to_every_data_set(config, name, data_root, cifar_root):
    root = {"cifar10": cifar_root, "synthetic": None}.get(name, data_root)
    overrides = [f"data.name={name}", "data.subset=500"]
    try:
        _swap(config, overrides, root)
    except ValueError as err:
        message = str(err)
        assert "\n" not in message, message
        if any(reason in message for reason in IMPOSSIBLE):
            return
        fix = next((fix for phrase, fix in FIXED_BY_ONE_SET.items() if phrase in message), None)
        assert fix is not None, f"{config.name} with data.name={name}: {message}"
        _swap(config, [*overrides, fix], root)


def test_fixed_splits_are_the_variants_whose_files_hold_a_validation_set(data_root):
    for name in FILE_DATASETS:
        splits = DATASETS.build(name, root=data_root, download=False)  # what the loader read, before any hold-out
        assert has_fixed_splits(name) == (splits.val is not None)
    assert has_fixed_splits("mnist-static") and not has_fixed_splits("synthetic(side=4)")


def test_the_tutorial_config_trains_on_static_mnist_with_one_set(tmp_path, data_root, capsys):
    out = tmp_path / "run"
    sets = ["data.name=mnist-static", "data.subset=100", "model.z_dim=2", "model.hidden_dims=[16]"]
    sets += ["train.epochs=1", "train.nll_samples=0", "train.plots=false", "train.device=cpu"]
    argv = ["train", "--config", str(REPO / "configs" / "mnist.toml"), "--data-dir", str(data_root), "--out", str(out)]
    assert cli.main([*argv, *(arg for s in sets for arg in ("--set", s)), "--no-progress"]) == 0
    note = "data.val_size=0 is ignored: mnist-static has fixed splits, its own validation set of 100 examples"
    assert note in (out / "train.log").read_text() and note in capsys.readouterr().err
    # the library itself stays strict: a val_size passed to load_dataset is a request, not a config default
    with pytest.raises(ValueError, match="its own validation set"):
        load_dataset("mnist-static", root=data_root, val_size=0)
