"""Datasets as device-resident tensors: loading, splits, dynamic binarization, batching.

Every variant is loaded once into float32 tensors of shape ``(N, D)`` with values in [0, 1] on
the training device; training batches are slices of a device-side permutation, so a step makes
no host-to-device copy and no host sync (no DataLoader, no workers).

Variants (the ``DATASETS`` registry; a name may carry arguments, e.g. ``synthetic(side=6)``):

- ``mnist``: MNIST grey levels x/255. Train 50k / val 10k (the last 10k of the official 60k
  training images) / test 10k.
- ``mnist-dynamic``: MNIST binarized by Bernoulli sampling from the grey levels, re-drawn
  for every epoch on the device (Burda et al. 2015, "Importance Weighted Autoencoders", sec. 5).
  The draw of epoch ``e`` depends only on ``(seed, e)`` and the device. Validation and test
  are binarized once, on the CPU with the fixed seed :data:`EVAL_BINARIZATION_SEED`, so every run
  on every device evaluates on the same binary test set.
- ``mnist-static``: the fixed binarization of Larochelle & Murray (2011), its own
  50k/10k/10k splits, from ``binarized_mnist/binarized_mnist.npz`` or the ``.amat(.gz)`` files.
  Its labels are unknown (the files hold none): ``*_labels`` are ``None``.
- ``fashion-mnist``: Fashion-MNIST grey levels, split like ``mnist``.
- ``cifar10``: CIFAR-10 from torchvision's python batches (``cifar-10-batches-py``), pixels/255
  flattened channel-first to 3072; train 45k / val 5k / test 10k.
- ``synthetic``: a mixture of random binary 8x8 patterns with flipped pixels; generated in
  memory from a fixed seed, no files (for tests and quick checks).

Data root: ``data_dir`` (``--data-dir``), else ``$PYRO_VAE_DATA``, else ``~/.cache/pyro_vae/data``.
Files are read in torchvision's layout (``MNIST/raw``, ``FashionMNIST/raw``,
``cifar-10-batches-py``), so ``download=True`` simply calls torchvision's downloader into the
root. Without it, a missing dataset raises :class:`DatasetNotFoundError` naming every path tried.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import pickle
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from pyro_vae.config import device_problem
from pyro_vae.registry import Registry
from pyro_vae.specs import Spec, SpecError, format_spec, parse_spec

DEFAULT_DATA_ROOT = Path("~/.cache/pyro_vae/data")
ENV_VAR = "PYRO_VAE_DATA"
# Validation and test sets of mnist-dynamic are binarized once with this seed (on the CPU), so the
# evaluation data is the same for every run, training seed and device.
EVAL_BINARIZATION_SEED = 1234

DATASETS: Registry[Splits] = Registry("dataset")
# Variants whose files hold their own validation split: a config's data.val_size does not apply to them.
FIXED_SPLITS = frozenset({"mnist-static"})


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not under the data root; the message says where it looked and how to fix it."""


class DataFileError(ValueError):
    """A data file that is there but cannot be used: corrupt, truncated, inconsistent, not finite.

    The message is one line naming the file; the command line prints it and exits with status 2.
    """


_REPLACE = "replace it with a good copy (or delete it and run with --download)"


def _bad_file(path: Path, problem: str) -> DataFileError:
    return DataFileError(f"{path}: {problem}; {_REPLACE}")


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Whatever a reader of ``path`` raises on a damaged file (zlib, zipfile, pickle, numpy errors,
    each with its own type and wording) becomes one :class:`DataFileError` naming the file."""
    try:
        yield
    except (DataFileError, DatasetNotFoundError):
        raise
    except (OSError, EOFError, ValueError, KeyError, IndexError, TypeError, zipfile.BadZipFile, zlib.error) as err:
        detail = " ".join(str(err).split()) or type(err).__name__
        raise _bad_file(path, f"cannot be read ({detail[:200]})") from None
    except pickle.UnpicklingError as err:
        raise _bad_file(path, f"cannot be read ({err})") from None


# ---------------------------------------------------------------------------------------------
# Data root


def has_fixed_splits(name: Spec) -> bool:
    """Whether the variant ``name`` brings its own validation set (``data.val_size`` cannot change it)."""
    return parse_spec(name)[0] in FIXED_SPLITS


def resolve_data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir`` if given, else ``$PYRO_VAE_DATA`` if set, else ``~/.cache/pyro_vae/data``."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return DEFAULT_DATA_ROOT.expanduser()


def _root_origin(data_dir: str | os.PathLike | None) -> str:
    if data_dir is not None and str(data_dir) != "":
        return "from --data-dir"
    if os.environ.get(ENV_VAR):
        return f"from ${ENV_VAR}"
    return f"the default; neither --data-dir nor ${ENV_VAR} is set"


def _not_found(dataset: str, root: Path, tried: list[Path], hint: str = "") -> DatasetNotFoundError:
    lines = [f"dataset {dataset!r} not found under the data root {root}. Looked for:"]
    lines += [f"  {p}" for p in tried]
    lines.append(
        "Fix: point --data-dir (or the PYRO_VAE_DATA environment variable) at the folder that holds it,"
        " or pass --download (data.download = true) to fetch it with torchvision."
    )
    if hint:
        lines.append(hint)
    return DatasetNotFoundError("\n".join(lines))


def _first_existing(candidates: list[Path]) -> Path | None:
    return next((p for p in candidates if p.is_file()), None)


# ---------------------------------------------------------------------------------------------
# What a loader returns: host tensors before splitting, subsetting and moving to the device


@dataclass
class Splits:
    """Raw splits from a loader: integer pixels (or floats) before scaling by ``max_value``.

    ``val`` is ``None`` when the dataset has no official validation set; it is then held out
    from the end of ``train`` (``default_val_size`` examples unless ``val_size`` says otherwise).
    """

    train: torch.Tensor
    test: torch.Tensor
    image_shape: tuple[int, int, int]
    train_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None
    val: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None
    max_value: float = 255.0
    default_val_size: int = 0
    is_binary: bool = False
    binarize_dynamically: bool = False


# ---------------------------------------------------------------------------------------------
# File formats, parsed with numpy (no torchvision needed to read)


def _read_bytes(path: Path) -> bytearray:
    # A bytearray, not bytes: numpy views of it are writable, so torch.from_numpy does not warn.
    opener = gzip.open if path.suffix == ".gz" else open
    with _reading(path), opener(path, "rb") as f:  # a corrupt, truncated or non-gzip .gz: one line
        return bytearray(f.read())


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format, optionally gzipped) as a uint8 array of its shape.

    Header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then
    each dimension as a big-endian int32. A file that does not fit its header is a :class:`DataFileError`.
    """
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise _bad_file(path, "not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise _bad_file(path, f"IDX type code {raw[2]:#x} is not unsigned byte (0x08)")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise _bad_file(path, f"its header is cut short ({len(raw)} bytes, {ndim} dimensions need {offset})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(raw) - offset != expected:
        raise _bad_file(path, f"header says {shape} ({expected} bytes) but the file holds {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def _idx_pair(root: Path, folder: str, prefix: str) -> tuple[np.ndarray, np.ndarray] | list[Path]:
    """Images and labels ``{prefix}-images-idx3-ubyte`` (or ``.gz``); the paths tried when missing.

    The two files must agree: 28x28 images, one label in 0..9 per image.
    """
    raw = root / folder / "raw"
    tried: list[Path] = []
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [raw / f"{prefix}-{kind}", raw / f"{prefix}-{kind}.gz"]
        tried += candidates
        found.append(_first_existing(candidates))
    if None in found:
        return tried
    images, labels = read_idx(found[0]), read_idx(found[1])
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise _bad_file(found[0], f"holds an array of shape {images.shape}, not 28x28 images")
    _check_labels(labels, len(images), found[1], found[0])
    return images, labels


def _check_labels(labels: np.ndarray, count: int, path: Path, images: Path | None = None, classes: int = 10) -> None:
    """Labels must be one per image (``count``, the number in ``images``), integers in ``[0, classes)``."""
    if labels.ndim != 1 or len(labels) != count:
        where = f"{images} holds {count}" if images is not None else f"it holds {count}"
        raise _bad_file(path, f"holds {labels.size} labels of shape {labels.shape} but {where} images")
    if labels.dtype.kind not in "iu":
        raise _bad_file(path, f"labels are {labels.dtype}, not integers")
    if count and not (labels.min() >= 0 and labels.max() < classes):
        raise _bad_file(path, f"labels must be in 0..{classes - 1}, found {labels.min()}..{labels.max()}")


def _pixels(array: Any, path: Path, what: str, max_value: int) -> np.ndarray:
    """``array`` as uint8 after checking it holds integers in ``[0, max_value]``: a NaN or a 0.5 is
    refused rather than cast (a cast would turn NaN into 0 and 0.5 into 0 without a word)."""
    a = np.asarray(array)
    if a.dtype.kind not in "biuf":
        raise _bad_file(path, f"{what} is not numeric (dtype {a.dtype})")
    if a.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(a)))
        if bad:
            raise _bad_file(path, f"{what} holds {bad} non-finite values (NaN or inf)")
        if a.size and not np.array_equal(a, np.round(a)):
            raise _bad_file(path, f"{what} holds fractional values; expected integers in [0, {max_value}]")
    if a.size and (a.min() < 0 or a.max() > max_value):
        raise _bad_file(path, f"{what} values must be in [0, {max_value}], found {a.min()}..{a.max()}")
    return a.astype(np.uint8)


def _load_idx_dataset(root: Path, download: bool, folder: str, name: str, tv_class: str) -> Splits:
    if download:
        _torchvision_download(tv_class, root)
    parts = [_idx_pair(root, folder, prefix) for prefix in ("train", "t10k")]
    tried = [p for part in parts if isinstance(part, list) for p in part]
    if tried:
        raise _not_found(name, root, tried)
    (train_x, train_y), (test_x, test_y) = parts  # type: ignore[misc]
    return Splits(
        train=torch.from_numpy(train_x.reshape(len(train_x), -1)),
        test=torch.from_numpy(test_x.reshape(len(test_x), -1)),
        train_labels=torch.from_numpy(train_y.astype(np.int64)),
        test_labels=torch.from_numpy(test_y.astype(np.int64)),
        image_shape=(1, 28, 28),
        default_val_size=10_000,
    )


def _torchvision_download(class_name: str, root: Path) -> None:
    """Fetch a dataset with torchvision into ``root`` (torchvision's own folder layout)."""
    import torchvision.datasets  # only imported when a download is asked for

    root.mkdir(parents=True, exist_ok=True)
    dataset_class = getattr(torchvision.datasets, class_name)
    for train in (True, False):
        dataset_class(root=str(root), train=train, download=True)


def _read_amat(path: Path) -> np.ndarray:
    """Larochelle's text format: one example per line, 784 values '0'/'1' separated by spaces."""
    text = _read_bytes(path)
    with _reading(path):  # ragged rows or words that are not numbers
        values = np.loadtxt(io.BytesIO(text), dtype=np.float32, ndmin=2)
    return _pixels(values, path, "its values", max_value=1)


def _read_npz(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays ``names`` of an ``.npz`` as binary uint8 pixels; a truncated file, a missing
    array or values other than 0 and 1 are a :class:`DataFileError` naming the file."""
    with _reading(path), np.load(path) as f:  # allow_pickle=False: an object array is refused
        missing = [s for s in names if s not in f.files]
        if missing:
            raise _bad_file(
                path, f"has no {', '.join(map(repr, missing))} array (it has {', '.join(f.files) or 'none'})"
            )
        return {s: _pixels(f[s], path, f"the {s!r} array", max_value=1) for s in names}


# Larochelle & Murray's original files; used only when download=True.
_BINARIZED_MNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/binarized_mnist_{}.amat"


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR-10 batches (dicts, lists, numpy arrays) and nothing that could run code."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: a CIFAR-10 batch holds only arrays")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: ``(data uint8 (N, 3072) channel-first, labels int64 (N,))``.

    A refused pickle (anything but arrays), a truncated file, or one that is not a dict with
    ``data`` and ``labels`` of one length is a :class:`DataFileError` naming the file.
    """
    with _reading(path), open(path, "rb") as f:
        batch = _RestrictedUnpickler(f, encoding="bytes").load()
    if not isinstance(batch, dict):
        raise _bad_file(path, f"holds a {type(batch).__name__}, not a CIFAR-10 batch (a dict)")
    batch = {k.decode(errors="replace") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    missing = [key for key in ("data", "labels") if key not in batch]
    if missing:
        raise _bad_file(path, f"has no {' or '.join(map(repr, missing))} entry (a CIFAR-10 batch has data and labels)")
    with _reading(path):  # ragged lists, strings where numbers belong
        data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise _bad_file(path, f"data has shape {data.shape}, not (N, 3072)")
    data = _pixels(data, path, "data", max_value=255)
    _check_labels(labels, len(data), path)
    return data, labels.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Loaders (registered by name). Each takes the data root and returns host-side Splits.


@DATASETS.register("mnist")
def load_mnist(root: Path, download: bool = False) -> Splits:
    """MNIST grey levels (LeCun et al. 1998)."""
    return _load_idx_dataset(root, download, "MNIST", "mnist", "MNIST")


@DATASETS.register("mnist-dynamic")
def load_mnist_dynamic(root: Path, download: bool = False) -> Splits:
    """MNIST re-binarized every epoch: x ~ Bernoulli(grey level) (Burda et al. 2015)."""
    splits = _load_idx_dataset(root, download, "MNIST", "mnist-dynamic", "MNIST")
    splits.is_binary = splits.binarize_dynamically = True
    return splits


@DATASETS.register("fashion-mnist")
def load_fashion_mnist(root: Path, download: bool = False) -> Splits:
    """Fashion-MNIST grey levels (Xiao et al. 2017)."""
    return _load_idx_dataset(root, download, "FashionMNIST", "fashion-mnist", "FashionMNIST")


@DATASETS.register("mnist-static")
def load_mnist_static(root: Path, download: bool = False) -> Splits:
    """Statically binarized MNIST of Larochelle & Murray (2011), 50k/10k/10k; no labels."""
    folder = root / "binarized_mnist"
    npz = folder / "binarized_mnist.npz"
    names = ("train", "valid", "test")
    amat = {s: [folder / f"binarized_mnist_{s}.amat", folder / f"binarized_mnist_{s}.amat.gz"] for s in names}
    if download and not npz.is_file() and any(_first_existing(amat[s]) is None for s in names):
        from torchvision.datasets.utils import download_url

        for s in names:
            download_url(_BINARIZED_MNIST_URL.format(s), str(folder))
    if npz.is_file():
        arrays = _read_npz(npz, names)
    else:
        found = {s: _first_existing(amat[s]) for s in names}
        if None in found.values():
            raise _not_found("mnist-static", root, [npz] + [p for s in names for p in amat[s]])
        arrays = {s: _read_amat(found[s]) for s in names}  # type: ignore[arg-type]
    for s, a in arrays.items():
        if a.ndim < 2 or int(np.prod(a.shape[1:])) != 784:
            raise _bad_file(npz if npz.is_file() else found[s], f"the {s!r} split has shape {a.shape}, not 784 pixels")
    tensors = {s: torch.from_numpy(np.ascontiguousarray(a).reshape(len(a), -1)) for s, a in arrays.items()}
    return Splits(
        train=tensors["train"],
        val=tensors["valid"],
        test=tensors["test"],
        image_shape=(1, 28, 28),
        max_value=1.0,
        is_binary=True,
    )


@DATASETS.register("cifar10")
def load_cifar10(root: Path, download: bool = False) -> Splits:
    """CIFAR-10 (Krizhevsky 2009) from torchvision's python batches ``cifar-10-batches-py``."""
    if download:
        _torchvision_download("CIFAR10", root)
    folder = root / "cifar-10-batches-py"
    paths = [folder / f"data_batch_{i}" for i in range(1, 6)] + [folder / "test_batch"]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise _not_found("cifar10", root, paths, hint=f"missing: {', '.join(p.name for p in missing)}")
    batches = [read_cifar_batch(p) for p in paths]
    train_x = np.concatenate([b[0] for b in batches[:5]])
    train_y = np.concatenate([b[1] for b in batches[:5]])
    return Splits(
        train=torch.from_numpy(train_x),
        test=torch.from_numpy(batches[5][0]),
        train_labels=torch.from_numpy(train_y),
        test_labels=torch.from_numpy(batches[5][1]),
        image_shape=(3, 32, 32),
        default_val_size=5_000,
    )


@DATASETS.register("synthetic")
def make_synthetic(
    root: Path | None = None,
    num_train: int = 2000,
    num_test: int = 500,
    components: int = 10,
    side: int = 8,
    flip: float = 0.05,
    data_seed: int = 0,
) -> Splits:
    """A mixture of ``components`` random binary ``side x side`` patterns, each pixel flipped w.p. ``flip``.

    The label is the pattern's index. Generated on the CPU from ``data_seed`` (not the training
    seed), so it is one fixed dataset; ``num_train // 5`` training examples are held out for
    validation by default.
    """
    if not 0.0 <= flip <= 0.5:
        raise ValueError(f"flip must be in [0, 0.5], got {flip}")
    if min(num_train, num_test, components, side) < 1:
        raise ValueError("num_train, num_test, components and side must be positive")
    gen = torch.Generator().manual_seed(data_seed)
    patterns = torch.rand(components, side * side, generator=gen) < 0.5

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(components, (n,), generator=gen)
        flips = torch.rand(n, side * side, generator=gen) < flip
        return (patterns[labels] ^ flips).to(torch.uint8), labels

    train, train_labels = draw(num_train)
    test, test_labels = draw(num_test)
    return Splits(
        train=train,
        test=test,
        train_labels=train_labels,
        test_labels=test_labels,
        image_shape=(1, side, side),
        max_value=1.0,
        default_val_size=num_train // 5,
        is_binary=True,
    )


# ---------------------------------------------------------------------------------------------
# The dataset object


@dataclass
class Dataset:
    """Splits of one data variant as float tensors ``(N, D)`` in [0, 1] on one device.

    ``train_epoch(epoch)`` is what an epoch trains on: ``train`` itself, except for
    ``mnist-dynamic``, where it is a fresh Bernoulli draw from the grey levels ``train_probs``
    (``train`` then holds the draw of epoch 0). Labels are int64 on the same device, or ``None``
    when the variant has none (``mnist-static``). ``fields`` holds the extra per-example fields a
    model structure may consume (``pyro_vae.fields``: observed labels, input masks).
    """

    name: str
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor | None
    val_labels: torch.Tensor | None
    test_labels: torch.Tensor | None
    image_shape: tuple[int, int, int]
    is_binary: bool
    seed: int = 0
    train_probs: torch.Tensor | None = field(default=None, repr=False)
    # The extra fields a model structure may consume, name -> split -> tensor (pyro_vae.fields).
    fields: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    # What a run should tell its user about how its config was applied (train.log), one line each.
    notes: list[str] = field(default_factory=list, repr=False)

    @property
    def x_dim(self) -> int:
        return int(np.prod(self.image_shape))

    @property
    def device(self) -> torch.device:
        return self.train.device

    @property
    def dynamic(self) -> bool:
        """True when every epoch draws a new binarization of the training set."""
        return self.train_probs is not None

    def train_epoch(self, epoch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The training tensor for ``epoch``.

        For ``mnist-dynamic``: x ~ Bernoulli(grey levels), drawn on the data's device with
        ``generator`` if given, else with a generator seeded from ``(seed, epoch)`` alone, so the
        same seed and epoch give the same draw (on the same kind of device).
        """
        if self.train_probs is None:
            return self.train
        if generator is None:
            generator = make_generator(epoch_seed(self.seed, epoch), self.device)
        return torch.bernoulli(self.train_probs, generator=generator)

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x, labels)`` of ``"train"``, ``"val"`` or ``"test"``."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; valid splits: train, val, test")
        return getattr(self, name), getattr(self, f"{name}_labels")

    def __str__(self) -> str:
        kind = "dynamically binarized" if self.dynamic else ("binary" if self.is_binary else "grey levels")
        return (
            f"{self.name}: train {len(self.train)}, val {len(self.val)}, test {len(self.test)}; "
            f"{'x'.join(map(str, self.image_shape))} {kind}; on {self.device}"
        )


def mixed_seed(*entropy: int) -> int:
    """A 63-bit seed mixing the non-negative integers ``entropy`` (numpy's SeedSequence), so nearby tuples give
    unrelated streams."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, dtype=np.uint64)[0]) >> 1


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's draws: :func:`mixed_seed` of ``seed`` and ``epoch``."""
    return mixed_seed(seed, epoch)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def fixed_binarization(x: torch.Tensor, seed: int = EVAL_BINARIZATION_SEED) -> torch.Tensor:
    """One draw x_b ~ Bernoulli(x) of grey levels ``x`` in [0, 1], made on the CPU with a generator seeded by
    ``seed`` (the same draw on every device), returned on ``x``'s device in ``x``'s dtype. For scoring a
    grey-level set with a model of binary data (``pyro_vae.ood``)."""
    draw = torch.bernoulli(x.detach().cpu().to(torch.float32).clamp(0, 1), generator=make_generator(seed))
    return draw.to(device=x.device, dtype=x.dtype)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` or ``None`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...

    The one place a device name is read (data, runs, distributed): an unknown name or a CUDA device
    that is not there is a ``ValueError`` saying what to use instead.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = device_problem(str(device))  # the one list of names, shared with the config check
    if problem is not None:
        raise ValueError(f"device {problem}")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested, but CUDA is not available here (use --device cpu)")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            plural = "device is" if count == 1 else "devices are"
            raise ValueError(f"device {str(device)!r} requested, but {count} CUDA {plural} visible")
    return resolved


def load_dataset(
    name: Spec = "mnist",
    root: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    subset: int | None = None,
    val_size: int | None = None,
    seed: int = 0,
    download: bool = False,
) -> Dataset:
    """Load a data variant onto ``device``.

    Args:
        name: a variant of ``DATASETS`` (``"mnist"``, ``"mnist-dynamic"``, ``"synthetic(side=6)"``, ...).
        root: the data root; ``None`` resolves ``$PYRO_VAE_DATA`` then ``~/.cache/pyro_vae/data``.
        device: where the tensors live (``"auto"`` = CUDA when available).
        subset: keep the first ``subset`` examples of each split (after the validation hold-out).
        val_size: examples held out from the end of the training set for validation; ``None``
            = the variant's default (10k for MNIST/Fashion-MNIST, 5k for CIFAR-10). Not allowed
            for ``mnist-static``, which has its own validation set.
        seed: seeds the per-epoch binarization of ``mnist-dynamic``.
        download: fetch missing files with torchvision (never done otherwise).
    """
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int) or subset < 1):
        raise ValueError(f"subset must be a positive integer or None, got {subset!r}")
    device = resolve_device(device)  # both checked before the files are read
    spec_name, kwargs = parse_spec(name)
    data_root = resolve_data_root(root)
    try:
        splits: Splits = DATASETS.build((spec_name, kwargs), root=data_root, download=download)
    except DatasetNotFoundError as err:
        if root is None or str(root) == "":
            raise DatasetNotFoundError(f"{err}\nThe data root is {_root_origin(root)}.") from None
        raise
    except SpecError as err:  # the registry says "bad dataset" for any ValueError; a bad file is not a bad spec
        if isinstance(err.__cause__, DataFileError):
            raise err.__cause__ from None
        raise
    train, train_labels, val, val_labels = _hold_out(splits, val_size, format_spec(spec_name, kwargs))

    def prepare(x: torch.Tensor, binarize_with: torch.Generator | None = None) -> torch.Tensor:
        if binarize_with is not None:  # on the CPU: the one fixed binarization is the same on every device
            probs = x[:subset].to(torch.float32).div_(splits.max_value)
            return torch.bernoulli(probs, generator=binarize_with).to(device)
        # Subset first, then convert on the device: moves 1 byte per pixel over the bus, not 4.
        return x[:subset].to(device).to(torch.float32).div_(splits.max_value)

    def prepare_labels(y: torch.Tensor | None) -> torch.Tensor | None:
        return None if y is None else y[:subset].to(device=device, dtype=torch.int64)

    # mnist-dynamic: the training set keeps its grey levels (redrawn every epoch), the evaluation
    # sets get one fixed binarization (val first, then test, from one generator).
    eval_gen = make_generator(EVAL_BINARIZATION_SEED) if splits.binarize_dynamically else None
    train_x, val_x, test_x = prepare(train), prepare(val, eval_gen), prepare(splits.test, eval_gen)
    train_probs = train_x if splits.binarize_dynamically else None
    dataset = Dataset(
        name=format_spec(spec_name, kwargs),
        train=train_x,
        val=val_x,
        test=test_x,
        train_labels=prepare_labels(train_labels),
        val_labels=prepare_labels(val_labels),
        test_labels=prepare_labels(splits.test_labels),
        image_shape=splits.image_shape,
        is_binary=splits.is_binary,
        seed=seed,
        train_probs=train_probs,
    )
    if train_probs is not None:
        dataset.train = dataset.train_epoch(0)
    return dataset


def _hold_out(splits: Splits, val_size: int | None, name: str):
    """Train and validation tensors: the official validation set, or the last ``val_size`` training examples."""
    if splits.val is not None:
        if val_size is not None and val_size != len(splits.val):
            raise ValueError(
                f"{name} has its own validation set of {len(splits.val)} examples; "
                f"val_size={val_size} cannot change it (leave data.val_size unset)"
            )
        return splits.train, splits.train_labels, splits.val, splits.val_labels
    size = splits.default_val_size if val_size is None else val_size
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < len(splits.train):
        raise ValueError(
            f"val_size must be an integer in [0, {len(splits.train)}) for {name} "
            f"({len(splits.train)} training examples), got {val_size!r}"
        )
    cut = len(splits.train) - size
    labels = splits.train_labels

    def part(y: torch.Tensor | None, sl: slice) -> torch.Tensor | None:
        return None if y is None else y[sl]

    return splits.train[:cut], part(labels, slice(None, cut)), splits.train[cut:], part(labels, slice(cut, None))


# ---------------------------------------------------------------------------------------------
# Batching


def batch_indices(
    n: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[torch.Tensor]:
    """Index tensors of mini-batches over ``range(n)``, in the order of a random permutation drawn on ``device``.

    ``generator`` must live on ``device`` (see :func:`make_generator`); ``None`` uses torch's global
    generator. The indices stay on the device: slicing device-resident data with them needs no host copy.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if generator is not None and torch.device(generator.device).type != torch.device(device).type:
        raise ValueError(f"the generator is on {generator.device} but the data is on {device}")
    perm = torch.randperm(n, device=device, generator=generator)
    for index in perm.split(batch_size):
        if drop_last and len(index) < batch_size:
            break
        yield index


def batches(
    x: torch.Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[torch.Tensor]:
    """Mini-batches of ``x`` in the order of a random permutation drawn on ``x``'s device (:func:`batch_indices`)."""
    for index in batch_indices(len(x), batch_size, x.device, generator, drop_last):
        yield x[index]


def spread_rows(count: int, num: int | None) -> torch.Tensor | slice:
    """The rows an evaluation of ``num`` of a split's ``count`` examples takes: ``num`` evenly spaced ones,
    i * count // num for i < num (all of them, ``slice(None)``, when ``num`` is None or not below ``count``).

    Not the first ``num``: a test set stored sorted by class (mnist-static's test set holds its 0s first, then
    its 1s, ...) would give a subset of one or two classes. Evenly spaced rows cover every class in proportion,
    and are the same rows on every run, so subsets of two runs pair example by example.
    """
    if num is None or num >= count:
        return slice(None)
    return torch.arange(num) * count // num


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """How many batches :func:`batches` yields for ``n`` examples."""
    return n // batch_size if drop_last else -(-n // batch_size)
