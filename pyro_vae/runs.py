"""Run folders: build the model a config describes, pick the device, load a finished run.

A run folder (written by ``pyro-vae train``, see ``docs/training.md``) holds ``config.toml``,
``metrics.jsonl``, ``checkpoint.pt`` (the last completed epoch), ``best.pt`` (the best epoch by the
training estimator's validation bound, ``val_bound``), ``evaluation.json``, ``train.log`` and the figures.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pyro_vae import data
from pyro_vae.checkpoint import WEIGHTS_ENTRIES, CheckpointError, load_checkpoint, load_weights
from pyro_vae.config import Config, ConfigError, ModelConfig, config_from_dict, config_to_dict, load_config
from pyro_vae.fields import attach_fields
from pyro_vae.model import VAE
from pyro_vae.networks import MLPBody
from pyro_vae.specs import parse_spec

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
CONFIG = "config.toml"
METRICS = "metrics.jsonl"


# Past this many parameters a model is refused before anything is allocated: 2**31 float32 weights are
# 8 GiB, and their gradients and Adam's two moments make that 32 GiB, beyond the machines this runs on.
MAX_PARAMETERS = 2**31


def estimate_parameters(model_cfg: ModelConfig, x_dim: int) -> int:
    """A lower bound on the parameter count of the VAE a ``[model]`` section describes, from the
    config alone: the encoder MLP to the guide's mean and scale, the decoder MLP to ``x_dim``, and
    ``z_dim`` numbers per prior component. Python integers: a width of 1e300 does not overflow.

    Bodies that are not MLPs (conv, resnet), flows and structure extras are left out: a lower bound
    never refuses a model that would fit, and what it leaves out is never what makes a model absurdly large.
    """
    z = model_cfg.z_dim
    encoder = _mlp_widths(model_cfg.encoder, model_cfg.hidden_dims)
    decoder = _mlp_widths(model_cfg.decoder, model_cfg.hidden_dims[::-1])
    chains = [[x_dim, *encoder, 2 * z]] if encoder is not None else []
    chains += [[z, *decoder, x_dim]] if decoder is not None else []
    layers = sum(a * b + b for chain in chains for a, b in itertools.pairwise(chain))
    components = parse_spec(model_cfg.prior)[1].get("components", 0)
    # a value the prior will refuse (inf, nan, "x") counts as none: the prior's own check names it
    countable = isinstance(components, (int, float)) and math.isfinite(components) and components > 0
    return layers + (int(components) * z if countable else 0)


def _mlp_widths(spec, shorthand: list[int]) -> list[int] | None:
    """The hidden widths of an encoder or decoder body: the ``hidden_dims`` shorthand when unset, an
    ``mlp`` spec's own ``hidden``; None for another kind of body (its size is not a chain of widths)."""
    if spec is None:
        return list(shorthand)
    name, kwargs = parse_spec(spec)
    hidden = kwargs.get("hidden", inspect.signature(MLPBody).parameters["hidden"].default)
    if name != "mlp" or not isinstance(hidden, (list, tuple)) or not all(isinstance(w, int) for w in hidden):
        return None
    return list(hidden)


def check_size(model_cfg: ModelConfig, x_dim: int) -> None:
    """Refuse, in one line saying the estimate, a model too large to allocate (:data:`MAX_PARAMETERS`)."""
    count = estimate_parameters(model_cfg, x_dim)
    if count > MAX_PARAMETERS:
        raise ConfigError(
            f"the model would have at least {count:.3g} parameters ({4 * count / 2**30:.3g} GiB of float32 "
            f"weights, before gradients and optimizer state), more than the {MAX_PARAMETERS:.3g} this "
            f"library builds; reduce model.z_dim ({model_cfg.z_dim}), model.hidden_dims or the prior's components"
        )


def build_vae(model_cfg: ModelConfig, x_dim: int, x_shape: Sequence[int] | None = None) -> VAE:
    """The VAE that a ``[model]`` section describes, for data of width ``x_dim`` and event shape
    ``x_shape`` (a data set's ``image_shape``, ``(C, H, W)``: what the encoder body receives).
    A model too large to allocate is refused first (:func:`check_size`)."""
    check_size(model_cfg, x_dim)
    return VAE(
        x_dim=x_dim,
        x_shape=x_shape,
        z_dim=model_cfg.z_dim,
        hidden_dims=tuple(model_cfg.hidden_dims),
        activation=model_cfg.activation,
        init=model_cfg.init,
        prior=model_cfg.prior,
        likelihood=model_cfg.likelihood,
        guide=model_cfg.guide,
        encoder=model_cfg.encoder,
        decoder=model_cfg.decoder,
        structure=model_cfg.structure,
    )


@dataclass
class Run:
    """A loaded run: its config, the trained VAE (in eval mode), the dataset and the metrics."""

    path: Path
    config: Config
    vae: VAE
    dataset: Any
    metrics: list[dict[str, Any]] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    checkpoint: str = CHECKPOINT
    epoch: int = 0
    image_shape: tuple[int, ...] | None = None


class RunFolderError(ValueError):
    """A run folder's file that cannot be read (a bad line in ``metrics.jsonl``); the message names it."""


class RunFolderWarning(UserWarning):
    """A run folder whose files disagree, where a sound choice can still be made (``config.toml``
    edited after training: the checkpoint's own config is used)."""


def read_metrics(run_dir: str | os.PathLike, torn_tail_ok: bool = False) -> list[dict[str, Any]]:
    """The per-epoch records of ``metrics.jsonl`` (empty when the file does not exist).

    A line that is not a JSON object with an integer ``epoch`` is a :class:`RunFolderError` naming
    the file and line. With ``torn_tail_ok`` (resuming), a last line without its newline that does
    not parse is dropped instead: it is an append that a ``kill -9`` cut short, of an epoch that no
    checkpoint holds, so the resumed run writes it again.
    """
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _metrics_record(line)
        if record is None:
            if torn_tail_ok and number == len(lines) and not text.endswith("\n"):
                break
            raise RunFolderError(
                f"{path} line {number} is not a metrics record (a JSON object with an integer epoch): "
                f"{line[:60]!r}; delete that line (and any after it) and try again"
            )
        records.append(record)
    return records


def _metrics_record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or type(record.get("epoch")) is not int:
        return None
    return record


def config_differences(saved: dict[str, Any], current: dict[str, Any], sections=("model", "data")) -> list[str]:
    """``section.key: old -> new`` for each key of ``sections`` that differs between two config dicts.

    Where the data files live (``data.data_dir``, ``data.download``) is not which data, so it is not
    a difference. A config written before a key existed meant that key's default.
    """
    where_not_what = {"data_dir", "download"}
    saved, current = (config_to_dict(config_from_dict(d, source="checkpoint")) for d in (saved, current))
    diffs = []
    for section in sections:
        old, new = saved[section], current[section]
        for key in sorted(set(old) - where_not_what):
            if old[key] != new[key]:
                diffs.append(f"{section}.{key}: {old[key]!r} -> {new[key]!r}")
    return diffs


def load_dataset_for(config: Config, device: torch.device | str = "cpu", data_dir=None, download: bool = False):
    """The dataset a config's ``[data]`` section names, on ``device``, with the fields it asks for
    (``pyro_vae.fields``).

    ``data.val_size`` applies to the variants that hold out a validation set from their training set;
    one with fixed splits (``mnist-static``) ignores it, with a note in ``dataset.notes``, so that a
    config written for MNIST swaps to it with one ``--set data.name=...`` (docs/config.md).
    """
    section = config.data
    val_size, ignored = section.val_size, data.has_fixed_splits(section.name) and section.val_size is not None
    dataset = data.load_dataset(
        section.name,
        root=data_dir,
        device=device,
        subset=section.subset,
        val_size=None if ignored else val_size,
        seed=config.train.seed,
        download=download,
    )
    if ignored:
        dataset.notes.append(
            f"data.val_size={val_size} is ignored: {dataset.name} has fixed splits, "
            f"its own validation set of {len(dataset.val)} examples"
        )
    return attach_fields(
        dataset,
        labels=section.labels,
        quadrants=section.quadrants,
        seed=config.train.seed,
        labelled_repeats=section.labelled_repeats,
        missing=section.missing,
    )


def weights_path(run_dir: str | os.PathLike, which: str = "best") -> Path:
    """``best.pt`` when ``which="best"`` and it exists, else ``checkpoint.pt``; ``which="last"`` forces the latter."""
    run_dir = Path(run_dir)
    if which not in ("best", "last"):
        raise ValueError(f"which must be 'best' or 'last', got {which!r}")
    if which == "best" and (run_dir / BEST).is_file():
        return run_dir / BEST
    return run_dir / CHECKPOINT


def load_run(
    run_dir: str | os.PathLike,
    device: str | torch.device = "auto",
    data_dir=None,
    load_data: bool = True,
    which: str = "best",
) -> Run:
    """Load a run folder: config, the VAE with its trained weights, the dataset and the metrics.

    The weights are those of ``best.pt`` (best ``val_bound``) when it exists, else of
    ``checkpoint.pt`` (the last completed epoch); ``which="last"`` always takes ``checkpoint.pt``.
    The x dimension is read from the checkpoint, so ``load_data=False`` needs no dataset.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    path = weights_path(run_dir, which)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint in {run_dir} (expected {CHECKPOINT}); has this run trained an epoch?")
    state = load_checkpoint(path, map_location="cpu", required=WEIGHTS_ENTRIES)
    config = config_from_dict(state["config"], source=f"the config in {path}")
    _warn_if_config_toml_differs(run_dir, state["config"], path)
    device = data.resolve_device(device)
    image_shape = state.get("image_shape")
    vae = build_vae(config.model, x_dim=int(state["x_dim"]), x_shape=image_shape or None)
    load_weights(vae, state, "model", path)
    vae.to(device).eval()
    dataset = load_dataset_for(config, device=device, data_dir=data_dir) if load_data else None
    return Run(
        path=run_dir,
        config=config,
        vae=vae,
        dataset=dataset,
        metrics=read_metrics(run_dir),
        device=device,
        checkpoint=path.name,
        epoch=int(state["epoch"]),
        image_shape=tuple(state["image_shape"]) if state.get("image_shape") else None,
    )


def _warn_if_config_toml_differs(run_dir: Path, saved: dict[str, Any], path: Path) -> None:
    """Say (a :class:`RunFolderWarning`) when ``config.toml`` no longer describes the checkpoint's model or data.

    The checkpoint's own config is used either way: it is the one its tensors were trained with.
    ``config.toml`` is only a copy for people to read, so an edit of it cannot change what is
    evaluated; refusing would make the run unusable for no gain, saying nothing would mislead.
    """
    toml = run_dir / CONFIG
    if not toml.is_file():
        return
    try:
        diffs = config_differences(saved, config_to_dict(load_config(toml)))
    except ConfigError as err:
        diffs = [f"it cannot be read ({err})"]
    if diffs:
        warnings.warn(
            f"{toml} differs from the config saved in {path} ({'; '.join(diffs)}); "
            f"using the checkpoint's, which its weights were trained with",
            RunFolderWarning,
            stacklevel=3,
        )
