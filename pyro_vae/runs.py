"""Run folders: build the model a config describes, pick the device, load a finished run.

A run folder (written by ``pyro-vae train``, see ``docs/training.md``) holds ``config.toml``,
``metrics.jsonl``, ``checkpoint.pt`` (the last completed epoch), ``best.pt`` (the best epoch by the
training estimator's validation bound, ``val_bound``), ``evaluation.json``, ``train.log`` and the figures.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pyro_vae import data
from pyro_vae.checkpoint import CheckpointError, load_checkpoint
from pyro_vae.config import Config, ModelConfig, config_from_dict
from pyro_vae.fields import attach_fields
from pyro_vae.model import VAE

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
CONFIG = "config.toml"
METRICS = "metrics.jsonl"


def build_vae(model_cfg: ModelConfig, x_dim: int, x_shape: Sequence[int] | None = None) -> VAE:
    """The VAE that a ``[model]`` section describes, for data of width ``x_dim`` and event shape
    ``x_shape`` (a data set's ``image_shape``, ``(C, H, W)``: what the encoder body receives)."""
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


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-epoch records of ``metrics.jsonl`` (empty when the file does not exist)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_dataset_for(config: Config, device: torch.device | str = "cpu", data_dir=None, download: bool = False):
    """The dataset a config's ``[data]`` section names, on ``device``, with the fields it asks for
    (``pyro_vae.fields``)."""
    section = config.data
    dataset = data.load_dataset(
        section.name,
        root=data_dir,
        device=device,
        subset=section.subset,
        val_size=section.val_size,
        seed=config.train.seed,
        download=download,
    )
    return attach_fields(dataset, labels=section.labels, quadrants=section.quadrants, seed=config.train.seed)


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
    state = load_checkpoint(path, map_location="cpu")
    config = config_from_dict(state["config"])
    device = data.resolve_device(device)
    image_shape = state.get("image_shape")
    vae = build_vae(config.model, x_dim=int(state["x_dim"]), x_shape=image_shape or None)
    vae.load_state_dict(state["model"])
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
