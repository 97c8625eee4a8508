"""Every damaged data file is one line naming the file (``DataFileError``), through the library and the
command line (exit 2, no traceback): corrupt, truncated or non-gzip IDX files, images and labels
that disagree, a broken npz or amat, refused / truncated / malformed CIFAR-10 pickles, NaN pixels,
labels out of range. Each file is written small in tmp_path, in the real layout."""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pyro_vae import cli
from pyro_vae.data import DataFileError, load_dataset

N_TRAIN, N_TEST = 30, 7
RNG = np.random.default_rng(0)


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(root: Path, gz: bool = False) -> dict[str, Path]:
    """A tiny MNIST in torchvision's layout; returns its four files by role (``train-images``, ...)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    files = {}
    for prefix, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        for kind, array in (("images-idx3", RNG.integers(0, 256, (n, 28, 28))), ("labels-idx1", np.arange(n) % 10)):
            path = raw / f"{prefix}-{kind}-ubyte{'.gz' if gz else ''}"
            content = _idx_bytes(array)
            path.write_bytes(gzip.compress(content) if gz else content)
            files[f"{prefix}-{kind.split('-')[0]}"] = path
    return files


def _write_static(root: Path, arrays: dict[str, np.ndarray] | None = None) -> Path:
    folder = root / "binarized_mnist"
    folder.mkdir(parents=True)
    if arrays is None:
        arrays = {
            s: RNG.integers(0, 2, (n, 784)).astype(np.uint8) for s, n in (("train", 9), ("valid", 3), ("test", 4))
        }
    np.savez(folder / "binarized_mnist.npz", **arrays)
    return folder / "binarized_mnist.npz"


def _cifar_batch(n: int = 4) -> dict:
    return {b"data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [int(v) for v in np.arange(n) % 10]}


def _write_cifar(root: Path, test_batch=None) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        content = test_batch if name == "test_batch" and test_batch is not None else _cifar_batch()
        (folder / name).write_bytes(content if isinstance(content, bytes) else pickle.dumps(content, protocol=2))
    return folder / "test_batch"


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo ran",))


# -- the damage, file by file: (dataset, damage(root) -> the damaged file, phrase of the message) ------------
def _mnist_file(role: str, content: Callable[[bytes], bytes], gz: bool = False):
    def damage(root: Path) -> Path:
        path = _write_mnist(root, gz)[role]
        path.write_bytes(content(path.read_bytes()))
        return path

    return damage


def _mnist_array(role: str, array: np.ndarray):
    return _mnist_file(role, lambda _: _idx_bytes(array))


def _static(**arrays):
    def damage(root: Path) -> Path:
        base = {s: RNG.integers(0, 2, (n, 784)).astype(np.uint8) for s, n in (("train", 9), ("valid", 3), ("test", 4))}
        base.update(arrays)
        return _write_static(root, {k: v for k, v in base.items() if v is not None})

    return damage


def _static_truncated(root: Path) -> Path:
    path = _write_static(root)
    path.write_bytes(path.read_bytes()[:-300])
    return path


def _amat(text: str):
    def damage(root: Path) -> Path:
        folder = root / "binarized_mnist"
        folder.mkdir(parents=True)
        row = " ".join(["1"] * 784) + "\n"
        for split in ("train", "valid", "test"):
            (folder / f"binarized_mnist_{split}.amat").write_text(text if split == "valid" else row * 2)
        return folder / "binarized_mnist_valid.amat"

    return damage


def _cifar(content):
    return lambda root: _write_cifar(root, test_batch=content)


def _pickled(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


NAN_PIXELS = np.ones((3, 784), dtype=np.float32)
NAN_PIXELS[1, 5] = np.nan

CASES = {
    "gz-corrupt": (
        "mnist",
        _mnist_file("train-images", lambda b: b[:20] + b"\xff" * 40 + b[60:], gz=True),
        "cannot be read",
    ),
    "gz-truncated": ("mnist", _mnist_file("train-labels", lambda b: b[: len(b) // 2], gz=True), "cannot be read"),
    "gz-not-gzip": ("mnist", _mnist_file("t10k-images", lambda b: gzip.decompress(b), gz=True), "Not a gzipped file"),
    "idx-truncated": ("mnist", _mnist_file("train-images", lambda b: b[:-100]), "header says (30, 28, 28)"),
    "idx-header-cut": ("mnist", _mnist_file("t10k-labels", lambda b: b[:6]), "header is cut short"),
    "idx-bad-magic": ("mnist", _mnist_file("train-labels", lambda b: b"\x01" + b[1:]), "bad magic number"),
    "idx-count-mismatch": ("mnist", _mnist_array("train-labels", np.arange(N_TRAIN - 5) % 10), "25 labels"),
    "idx-label-range": ("mnist", _mnist_array("t10k-labels", np.full(N_TEST, 12)), "labels must be in 0..9"),
    "idx-not-images": ("mnist", _mnist_array("t10k-images", np.zeros((N_TEST, 784))), "not 28x28 images"),
    "npz-truncated": ("mnist-static", _static_truncated, "cannot be read"),
    "npz-no-valid": ("mnist-static", _static(valid=None), "has no 'valid' array"),
    "npz-nan": ("mnist-static", _static(valid=NAN_PIXELS), "1 non-finite values"),
    "npz-not-binary": ("mnist-static", _static(test=np.full((4, 784), 0.5)), "fractional values"),
    "npz-wrong-width": ("mnist-static", _static(train=np.zeros((9, 100), dtype=np.uint8)), "not 784 pixels"),
    "amat-nan": ("mnist-static", _amat(" ".join(["nan"] * 784) + "\n"), "784 non-finite values"),
    "amat-ragged": ("mnist-static", _amat("1 0 1\n1 0\n"), "cannot be read"),
    "cifar-refused": ("cifar10", _cifar(_pickled({b"data": _Evil()})), "refusing to unpickle posix.system"),
    "cifar-truncated": ("cifar10", _cifar(_pickled(_cifar_batch())[:-500]), "cannot be read"),
    "cifar-not-a-dict": ("cifar10", _cifar(_pickled([1, 2, 3])), "holds a list, not a CIFAR-10 batch"),
    "cifar-no-labels": ("cifar10", _cifar(_pickled({b"data": _cifar_batch()[b"data"]})), "has no 'labels' entry"),
    "cifar-label-count": ("cifar10", _cifar(_pickled({**_cifar_batch(), b"labels": [1, 2]})), "holds 2 labels"),
    "cifar-label-range": ("cifar10", _cifar(_pickled({**_cifar_batch(), b"labels": [0, 1, 2, 10]})), "in 0..9"),
    "cifar-nan": ("cifar10", _cifar(_pickled({**_cifar_batch(), b"data": np.full((4, 3072), np.nan)})), "non-finite"),
    "cifar-wrong-width": ("cifar10", _cifar(_pickled({**_cifar_batch(), b"data": np.zeros((4, 10))})), "not (N, 3072)"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_damaged_file_is_one_line_naming_it(tmp_path, case):
    name, damage, phrase = CASES[case]
    path = damage(tmp_path)
    with pytest.raises(DataFileError) as info:
        load_dataset(name, root=tmp_path, val_size=2)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and phrase in message, message
    assert "\n" not in message and len(message) < 500


@pytest.mark.parametrize("case", ["gz-not-gzip", "idx-count-mismatch", "npz-no-valid", "cifar-refused", "amat-nan"])
def test_the_command_line_says_it_in_one_line_and_exits_2(tmp_path, capsys, case):
    name, damage, phrase = CASES[case]
    path = damage(tmp_path / "data")
    config = tmp_path / "c.toml"
    config.write_text(f'[data]\nname = "{name}"\n[train]\ndevice = "cpu"\nepochs = 1\n')
    argv = ["train", "--config", str(config), "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run")]
    assert cli.main([*argv, "--no-progress"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"pyro-vae train: error: {path}: ") and phrase in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_good_files_of_every_layout_still_load(tmp_path):
    _write_mnist(tmp_path / "gz", gz=True)
    assert len(load_dataset("mnist", root=tmp_path / "gz", val_size=5).train) == N_TRAIN - 5
    _write_static(tmp_path / "npz")
    assert len(load_dataset("mnist-static", root=tmp_path / "npz").val) == 3
    _write_cifar(tmp_path / "cifar")
    assert len(load_dataset("cifar10", root=tmp_path / "cifar", val_size=2).test) == 4


def test_the_cifar_payload_never_ran(tmp_path, capfd):
    _write_cifar(tmp_path, test_batch=_pickled({b"data": _Evil()}))
    with pytest.raises(DataFileError):
        load_dataset("cifar10", root=tmp_path, val_size=2)
    assert "ran" not in capfd.readouterr().out


def test_an_integral_float_npz_is_binary_pixels(tmp_path):
    # 0.0 and 1.0 are pixels; only NaN, fractions and values out of range are refused
    _write_static(tmp_path, {s: np.ones((3, 784), dtype=np.float64) for s in ("train", "valid", "test")})
    assert float(load_dataset("mnist-static", root=tmp_path).train.min()) == 1.0
