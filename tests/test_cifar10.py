"""CIFAR-10 end to end through the command line, on small files written in the exact
``cifar-10-batches-py`` layout (the real data are not available offline): train -> evaluate -> sample
-> plot with a resnet and the discretized logistic mixture; and the image networks' bad inputs as one
line on stderr, no traceback."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from pyro_vae import cli

PER_BATCH = 24  # images per file: 5 training batches + 1 test batch


def _batch(label: str, n: int, rng: np.random.Generator) -> dict:
    """A batch as the CIFAR-10 python files hold it (pickled by Python 2: bytes keys, uint8 rows of
    1024 red, 1024 green, 1024 blue values): colour gradients per class, so channels differ."""
    labels = rng.integers(0, 10, n)
    ramp = np.linspace(0, 1, 32)[None, :] * np.ones((32, 1))
    rows = []
    for y in labels:
        rgb = [(ramp * (y + 1) / 10), ramp.T * (1 - y / 10), np.full((32, 32), y / 9)]
        image = np.stack(rgb) * 255 * rng.uniform(0.8, 1.0) + rng.normal(0, 8, (3, 32, 32))
        rows.append(image.clip(0, 255).astype(np.uint8).reshape(-1))
    return {
        b"batch_label": label.encode(),
        b"labels": [int(y) for y in labels],
        b"data": np.stack(rows),
        b"filenames": [f"image_{i}.png".encode() for i in range(n)],
    }


def write_cifar10(root: Path, per_batch: int = PER_BATCH, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py`` with data_batch_1..5, test_batch and batches.meta (protocol-2 pickles)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(1, 6):
        batch = _batch(f"training batch {i} of 5", per_batch, rng)
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "test_batch").write_bytes(pickle.dumps(_batch("testing batch 1 of 1", per_batch, rng), protocol=2))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    meta = {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


CIFAR_CONFIG = """\
[data]
name = "cifar10"
val_size = 24

[model]
z_dim = 4
encoder = "resnet(width=4)"
decoder = "resnet(width=4)"
likelihood = "discretized_logistic(mixtures=2)"

[train]
epochs = 1
batch_size = 40
nll_samples = 4
device = "cpu"
seed = 1
"""


def test_cifar10_train_evaluate_sample_plot(tmp_path, capsys):
    root = write_cifar10(tmp_path / "data")
    config = tmp_path / "cifar.toml"
    config.write_text(CIFAR_CONFIG)
    run = tmp_path / "run"
    train = ["train", "--config", str(config), "--out", str(run), "--data-dir", str(root), "--no-progress"]
    assert cli.main(train) == 0
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert record["epoch"] == 1 and record["steps"] == 3 and math.isfinite(record["test_elbo"])  # 96 / 40
    capsys.readouterr()

    evaluate = ["evaluate", "--run", str(run), "--data-dir", str(root), "--nll-samples", "8", "--json"]
    assert cli.main(evaluate) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_examples"] == PER_BATCH and result["x_dim"] == 3072
    assert result["bits_per_dim"] == pytest.approx(result["test_nll"] / (3072 * math.log(2)))
    assert result["bits_per_dim"] > 0  # a probability of discrete data: -log P >= 0

    sample = tmp_path / "samples.png"
    assert cli.main(["sample", "--run", str(run), "--num", "4", "--out", str(sample)]) == 0
    pixels = matplotlib.image.imread(sample)
    assert pixels.ndim == 3 and np.abs(pixels[..., 0] - pixels[..., 2]).max() > 0.05  # colour, not grey
    (run / "reconstructions.png").unlink()
    assert cli.main(["plot", "--run", str(run), "--data-dir", str(root)]) == 0
    assert (run / "reconstructions.png").is_file() and (run / "interpolation.png").is_file()

    # data with one channel for a model of three: one line naming both shapes
    score = ["score", "--run", str(run), "--data-dir", str(root), "--data", "synthetic(side=32)"]
    assert cli.main(score) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1x32x32" in err and "3x32x32" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("overrides", "phrase"),
    [
        (["model.encoder=resnet(levels=3)"], "H and W multiples of 8; the data's event shape is (1, 28, 28)"),
        (["model.decoder=conv(depth=3)"], "H and W multiples of 8; the data's event shape is (1, 28, 28)"),
        (["model.encoder=conv(norm='batchnorm')"], "unknown norm 'batchnorm'"),
    ],
)
def test_image_networks_that_do_not_fit_are_one_line_on_the_command_line(tmp_path, capsys, overrides, phrase):
    config = tmp_path / "c.toml"
    config.write_text('[data]\nname = "synthetic(side=28, num_train=20, num_test=10)"\n[train]\ndevice = "cpu"\n')
    sets = [arg for item in overrides for arg in ("--set", item)]
    assert cli.main(["train", "--config", str(config), "--out", str(tmp_path / "out"), "--no-progress", *sets]) == 2
    err = capsys.readouterr().err
    assert phrase in err and err.count("\n") == 1 and "Traceback" not in err
