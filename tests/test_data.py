"""Data variants: shapes, ranges, splits, dynamic binarization, the data root and its errors, batching."""

from __future__ import annotations

import gzip
import math
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from pyro_vae import data
from pyro_vae.data import DatasetNotFoundError, batches, load_dataset, make_generator, read_idx, resolve_data_root
from pyro_vae.specs import SpecError

GREY = ["mnist", "fashion-mnist"]


def _is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


def _check_common(ds, n_train, n_val, n_test, shape):
    assert ds.image_shape == shape
    assert ds.x_dim == math.prod(shape)
    for x, n in ((ds.train, n_train), (ds.val, n_val), (ds.test, n_test)):
        assert x.shape == (n, ds.x_dim)
        assert x.dtype == torch.float32
        assert x.device.type == "cpu"
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    for name in ("train", "val", "test"):
        x, y = ds.split(name)
        if y is not None:
            assert y.dtype == torch.int64 and y.shape == (len(x),) and y.device.type == "cpu"
    assert ds.is_binary == all(_is_binary(x) for x in (ds.train, ds.val, ds.test))


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_grey_variants_are_the_idx_files_split_50k_10k(data_root, name, folder):
    ds = load_dataset(name, root=data_root)
    _check_common(ds, 50_000, 10_000, 10_000, (1, 28, 28))
    assert not ds.is_binary
    raw = read_idx(data_root / folder / "raw" / "train-images-idx3-ubyte").reshape(60_000, -1)
    labels = read_idx(data_root / folder / "raw" / "train-labels-idx1-ubyte")
    # Validation = the last 10k of the official training set, train = the first 50k: disjoint by index.
    assert torch.equal(ds.train, torch.from_numpy(raw[:50_000]).float() / 255)
    assert torch.equal(ds.val, torch.from_numpy(raw[50_000:]).float() / 255)
    assert torch.equal(ds.val_labels, torch.from_numpy(labels[50_000:].astype(np.int64)))
    test = read_idx(data_root / folder / "raw" / "t10k-images-idx3-ubyte").reshape(10_000, -1)
    assert torch.equal(ds.test, torch.from_numpy(test).float() / 255)
    assert sorted(ds.test_labels.unique().tolist()) == list(range(10))


def test_mnist_first_labels_and_class_counts(data_root):
    # Published facts about MNIST (shared/data/README.md): first labels 5,0,4,1,9; class counts of the 60k.
    ds = load_dataset("mnist", root=data_root, val_size=0)
    assert ds.train_labels[:5].tolist() == [5, 0, 4, 1, 9]
    counts = torch.bincount(ds.train_labels).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert len(ds.val) == 0 and ds.val.shape == (0, 784)


def test_val_size_is_configurable_and_checked(data_root):
    ds = load_dataset("mnist", root=data_root, val_size=5000)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (55_000, 5_000, 10_000)
    for bad in (-1, 60_000, 1.5):
        with pytest.raises(ValueError, match="val_size must be an integer"):
            load_dataset("mnist", root=data_root, val_size=bad)


def test_static_mnist_is_larochelle_50k_10k_10k(data_root):
    ds = load_dataset("mnist-static", root=data_root)
    _check_common(ds, 50_000, 10_000, 10_000, (1, 28, 28))
    assert ds.is_binary and not ds.dynamic
    # Sums of ones published with the files (shared/data/README.md).
    assert [int(x.sum()) for x in (ds.train, ds.val, ds.test)] == [5_118_041, 1_028_036, 1_038_896]
    assert ds.train_labels is None and ds.test_labels is None
    assert torch.equal(ds.train_epoch(3), ds.train)
    with pytest.raises(ValueError, match="its own validation set"):
        load_dataset("mnist-static", root=data_root, val_size=5000)


def test_static_mnist_amat_rows_equal_the_npz(data_root):
    with gzip.open(data_root / "binarized_mnist" / "binarized_mnist_test.amat.gz", "rt") as f:
        rows = np.array([[int(v) for v in next(f).split()] for _ in range(50)])
    ds = load_dataset("mnist-static", root=data_root, subset=50)
    assert torch.equal(ds.test, torch.from_numpy(rows).float())


def test_static_mnist_falls_back_to_amat_files(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "binarized_mnist"
    folder.mkdir()
    arrays = {}
    for split, n in (("train", 5), ("valid", 3), ("test", 4)):
        arrays[split] = rng.integers(0, 2, size=(n, 784))
        text = "".join(" ".join(map(str, row)) + "\n" for row in arrays[split])
        opener, suffix = (gzip.open, ".amat.gz") if split != "valid" else (open, ".amat")
        with opener(folder / f"binarized_mnist_{split}{suffix}", "wt") as f:
            f.write(text)
    ds = load_dataset("mnist-static", root=tmp_path)
    assert torch.equal(ds.train, torch.from_numpy(arrays["train"]).float())
    assert torch.equal(ds.val, torch.from_numpy(arrays["valid"]).float())
    assert torch.equal(ds.test, torch.from_numpy(arrays["test"]).float())


def test_dynamic_binarization_resamples_each_epoch_and_is_reproducible(data_root):
    ds = load_dataset("mnist-dynamic", root=data_root, subset=500, seed=3)
    _check_common(ds, 500, 500, 500, (1, 28, 28))
    assert ds.is_binary and ds.dynamic
    e1, e2 = ds.train_epoch(1), ds.train_epoch(2)
    assert _is_binary(e1) and e1.device.type == "cpu"
    assert not torch.equal(e1, e2)
    assert torch.equal(e1, ds.train_epoch(1))  # same seed + epoch -> same draw
    assert torch.equal(ds.train, ds.train_epoch(0))
    other_seed = load_dataset("mnist-dynamic", root=data_root, subset=500, seed=4)
    assert not torch.equal(other_seed.train_epoch(1), e1)
    assert torch.equal(other_seed.train_probs, ds.train_probs)
    # An explicit generator on the data's device gives its own reproducible stream.
    g1, g2 = make_generator(7), make_generator(7)
    assert torch.equal(ds.train_epoch(1, generator=g1), ds.train_epoch(1, generator=g2))
    # Pixels that are exactly 0 or 1 in grey level never change.
    probs = ds.train_probs
    assert bool((e1[probs == 0] == 0).all()) and bool((e1[probs == 1] == 1).all())
    mnist = load_dataset("mnist", root=data_root, subset=500)
    assert torch.equal(probs, mnist.train)


def test_dynamic_binarization_keeps_the_mean(data_root):
    ds = load_dataset("mnist-dynamic", root=data_root, subset=200)
    epochs = 40
    p = ds.train_probs.double()
    draws = torch.stack([ds.train_epoch(e).double() for e in range(epochs)])  # (E, N, D)
    n = epochs * p.shape[0]
    # Per pixel position: mean over examples and epochs against the mean grey level, its SE
    # from the Bernoulli variances sum p(1-p) / n^2 (the grey levels are fixed).
    mean = draws.mean(dim=(0, 1))
    target = p.mean(dim=0)
    se = torch.sqrt(epochs * (p * (1 - p)).sum(dim=0)) / n
    varying = se > 0
    z = (mean[varying] - target[varying]) / se[varying]
    assert float(z.abs().max()) < 5.0, float(z.abs().max())  # 784 positions, Bonferroni-safe at 5 SE
    assert torch.equal(mean[~varying], target[~varying])  # pixels at exactly 0 or 1 are deterministic
    overall_z = (draws.mean() - p.mean()) / (torch.sqrt(epochs * (p * (1 - p)).sum()) / (n * p.shape[1]))
    assert abs(float(overall_z)) < 4.0, float(overall_z)
    # Each epoch differs from the previous one in many pixels.
    assert all(not torch.equal(draws[e], draws[e + 1]) for e in range(epochs - 1))


def test_dynamic_eval_sets_are_binarized_once_with_a_fixed_seed(data_root):
    a = load_dataset("mnist-dynamic", root=data_root, subset=300, seed=0)
    b = load_dataset("mnist-dynamic", root=data_root, subset=300, seed=11)
    assert torch.equal(a.test, b.test) and torch.equal(a.val, b.val)
    grey = load_dataset("mnist", root=data_root, subset=300)
    p = grey.test.double()
    z = (a.test.double().sum() - p.sum()) / torch.sqrt((p * (1 - p)).sum())
    assert abs(float(z)) < 4.0
    assert bool((a.test[p == 0] == 0).all())


def test_subset_keeps_the_first_examples_of_each_split(data_root):
    full = load_dataset("fashion-mnist", root=data_root)
    small = load_dataset("fashion-mnist", root=data_root, subset=123)
    for name in ("train", "val", "test"):
        (x, y), (xf, yf) = small.split(name), full.split(name)
        assert len(x) == 123 and torch.equal(x, xf[:123]) and torch.equal(y, yf[:123])
    huge = load_dataset("synthetic", subset=10**9)
    assert len(huge.train) == 1600
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="subset must be a positive integer"):
            load_dataset("synthetic", subset=bad)


def test_synthetic_is_fixed_binary_patterns_with_flips():
    ds = load_dataset("synthetic")
    _check_common(ds, 1600, 400, 500, (1, 8, 8))
    assert ds.is_binary and sorted(ds.train_labels.unique().tolist()) == list(range(10))
    assert torch.equal(ds.train, load_dataset("synthetic").train)  # generated from a fixed data seed
    assert not torch.equal(ds.train, load_dataset("synthetic(data_seed=1)").train)
    # Flip rate: each component's pattern is its per-pixel majority; mismatches are the flips.
    x = torch.cat([ds.train, ds.val]).double()
    y = torch.cat([ds.train_labels, ds.val_labels])
    flips = sum(float((x[y == k] != (x[y == k].mean(0) > 0.5).double()).sum()) for k in range(10))
    rate, count = flips / x.numel(), x.numel()
    assert abs(rate - 0.05) < 4.5 * math.sqrt(0.05 * 0.95 / count), rate
    small = load_dataset("synthetic(side=4, components=3, num_train=50, num_test=20)", val_size=10)
    _check_common(small, 40, 10, 20, (1, 4, 4))
    with pytest.raises(SpecError, match='did you mean "side"'):
        load_dataset("synthetic(sid=4)")


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(SpecError, match=r'did you mean "mnist-dynamic"\?\); valid datasets: cifar10, fashion-mnist'):
        load_dataset("mnist-dinamic")


# -- CIFAR-10 on tiny pickle batches written here ------------------------------------------


def _write_cifar(root, per_batch=4, test=3):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[name] = batch
    return written


def test_cifar10_from_python_batches(tmp_path):
    written = _write_cifar(tmp_path)
    ds = load_dataset("cifar10", root=tmp_path, val_size=6)
    _check_common(ds, 14, 6, 3, (3, 32, 32))
    train_all = np.concatenate([written[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    labels_all = [y for i in range(1, 6) for y in written[f"data_batch_{i}"][b"labels"]]
    assert torch.equal(ds.train, torch.from_numpy(train_all[:14]).float() / 255)
    assert torch.equal(ds.val, torch.from_numpy(train_all[14:]).float() / 255)
    assert ds.train_labels.tolist() == labels_all[:14] and ds.val_labels.tolist() == labels_all[14:]
    assert torch.equal(ds.test, torch.from_numpy(written["test_batch"][b"data"]).float() / 255)
    # Channel-first layout: reshaping a row to image_shape gives the red plane first.
    first = written["data_batch_1"][b"data"][0]
    assert torch.equal(ds.train[0].reshape(ds.image_shape)[0].flatten() * 255, torch.from_numpy(first[:1024]).float())
    with pytest.raises(ValueError, match="val_size must be an integer in"):
        load_dataset("cifar10", root=tmp_path)  # the default 5000 does not fit 20 examples


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar10_batches_cannot_run_code(tmp_path):
    _write_cifar(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f)
    with pytest.raises(data.DataFileError, match=r"test_batch: cannot be read \(refusing to unpickle posix.getcwd"):
        load_dataset("cifar10", root=tmp_path, val_size=2)


# -- data root, missing data, download ---------------------------------------------------------


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("PYRO_VAE_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_root() == tmp_path / "home" / ".cache" / "pyro_vae" / "data"
    monkeypatch.setenv("PYRO_VAE_DATA", str(tmp_path / "env"))
    assert resolve_data_root() == tmp_path / "env"
    assert resolve_data_root(tmp_path / "flag") == tmp_path / "flag"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("mnist", ["MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/t10k-labels-idx1-ubyte.gz"]),
        ("fashion-mnist", ["FashionMNIST/raw/train-images-idx3-ubyte", "FashionMNIST/raw/t10k-images-idx3-ubyte"]),
        ("mnist-static", ["binarized_mnist/binarized_mnist.npz", "binarized_mnist/binarized_mnist_valid.amat.gz"]),
        ("cifar10", ["cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/test_batch"]),
    ],
)
def test_missing_dataset_is_one_clear_error(tmp_path, name, expected):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, root=tmp_path)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for path in expected:
        assert str(tmp_path / path) in message
    for fix in ("--data-dir", "PYRO_VAE_DATA", "--download"):
        assert fix in message


def test_missing_dataset_names_where_the_root_came_from(tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_VAE_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError, match=r"(?s)nowhere/MNIST/raw.*from \$PYRO_VAE_DATA"):
        load_dataset("mnist")


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_download_uses_torchvision_only_when_asked(tmp_path, monkeypatch):
    calls = []

    def fake_mnist(root, train, download):
        calls.append((root, train, download))
        raw = os.path.join(root, "MNIST", "raw")
        os.makedirs(raw, exist_ok=True)
        prefix = "train" if train else "t10k"
        n = 30 if train else 7
        images = np.arange(n * 784).reshape(n, 28, 28) % 256
        _write_idx(data.Path(raw) / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(data.Path(raw) / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)

    monkeypatch.setitem(sys.modules, "torchvision.datasets", types.SimpleNamespace(MNIST=fake_mnist))
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(datasets=sys.modules["torchvision.datasets"]))
    with pytest.raises(DatasetNotFoundError):
        load_dataset("mnist", root=tmp_path)
    assert calls == []
    ds = load_dataset("mnist", root=tmp_path, download=True, val_size=5)
    assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]
    _check_common(ds, 25, 5, 7, (1, 28, 28))
    assert ds.train_labels[:3].tolist() == [0, 1, 2]


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="bad magic number"):
        read_idx(tmp_path / "bad")
    _write_idx(tmp_path / "short", np.zeros(5))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "short")


# -- batching ------------------------------------------------------------------------------


def test_batches_permute_on_the_device_and_cover_every_example():
    x = torch.arange(10.0).unsqueeze(1)
    out = list(batches(x, 4, make_generator(0)))
    assert [len(b) for b in out] == [4, 4, 2]
    assert all(b.device == x.device for b in out)
    assert sorted(torch.cat(out).squeeze(1).tolist()) == list(range(10))
    again = list(batches(x, 4, make_generator(0)))
    assert all(torch.equal(a, b) for a, b in zip(out, again, strict=True))
    other = torch.cat(list(batches(x, 4, make_generator(1))))
    assert not torch.equal(torch.cat(out), other)
    assert [len(b) for b in batches(x, 4, make_generator(0), drop_last=True)] == [4, 4]
    assert data.num_batches(10, 4) == 3 and data.num_batches(10, 4, drop_last=True) == 2
    with pytest.raises(ValueError, match="batch_size must be positive"):
        next(batches(x, 0))


def test_device_argument():
    ds = load_dataset("synthetic", device="cpu")
    assert ds.device == torch.device("cpu") and ds.train_labels.device.type == "cpu"
    assert data.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dataset_stays_on_cuda(data_root):
    ds = load_dataset("mnist-dynamic", root=data_root, subset=100, device="cuda")
    assert ds.train.is_cuda and ds.test.is_cuda and ds.train_epoch(2).is_cuda
    gen = make_generator(0, "cuda")
    assert all(b.is_cuda for b in batches(ds.train, 32, gen))
    with pytest.raises(ValueError, match="generator is on"):
        next(batches(ds.train, 32, make_generator(0)))


def test_spread_rows_cover_a_class_sorted_split_evenly():
    """N evenly spaced rows i * count // N: every block of a sorted split in proportion, the same rows every time."""
    from pyro_vae.data import spread_rows

    rows = spread_rows(10_000, 100)
    assert rows.tolist() == list(range(0, 10_000, 100))
    classes = torch.arange(10).repeat_interleave(1000)  # a test set stored sorted by class, as mnist-static's
    assert torch.bincount(classes[spread_rows(10_000, 50)]).tolist() == [5] * 10
    assert spread_rows(6, 4).tolist() == [0, 1, 3, 4]
    assert spread_rows(5, None) == slice(None) and spread_rows(5, 5) == slice(None) and spread_rows(5, 9) == slice(None)
