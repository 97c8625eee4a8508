"""A config's names checked against the registries, before any data is loaded or network built.

``pyro_vae.config`` is a leaf: it types a config and checks its bounds, but cannot know whether
``vmap`` is a prior, since the registries live above the model. This module imports them and
checks every field that declares, in its metadata, a registry (``{"spec": kind}``) or a table of
plain names (``{"names": table}``), so a typo fails in milliseconds with the valid names listed.

It is a module of its own rather than part of ``runs.py`` because the two are used apart: the
command line and the examples check a config before training, while ``runs.load_run`` rebuilds a
config that was checked when its run was trained, and this module's import of every registry,
estimators and optimizers included, is no business of a run loader.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pyro_vae import config, data, estimators, guides, likelihoods, masks, networks, optim, priors, structures
from pyro_vae.config import SECTIONS, Config, ConfigError
from pyro_vae.registry import Registry
from pyro_vae.specs import SpecError, unknown_name
from pyro_vae.train.epoch import WARMUPS

# Each spec kind (field metadata {"spec": kind}): its registry, and the arguments that whoever
# builds it passes itself (the shapes, the parameters, ...), which a spec may therefore not set.
SPEC_KINDS: dict[str, tuple[Registry, tuple[str, ...]]] = {
    "prior": (priors.PRIORS, ("z_dim", "x_shape")),
    "likelihood": (likelihoods.LIKELIHOODS, ("x_dim",)),
    "guide": (guides.GUIDES, ("body", "z_dim")),
    "network": (networks.NETWORKS, ("in_shape", "out_shape")),
    "structure": (structures.STRUCTURES, structures.CONTEXT),
    "estimator": (estimators.ESTIMATORS, ()),
    "dataset": (data.DATASETS, ("root", "download")),
    "optimizer": (optim.OPTIMIZERS, ("params", "lr")),
    "lr_schedule": (optim.SCHEDULES, ("epochs",)),
    "mask": (masks.MASKS, ()),
}

# Each plain-name table (field metadata {"names": table}): the valid names. Not specs: no arguments.
NAME_TABLES: dict[str, Mapping[str, Any]] = {
    "activation": networks.ACTIVATIONS,
    "init": networks.INITIALIZERS,
    "warmup": WARMUPS,
}


def validate(cfg: Config) -> Config:
    """Check every spec field's name and argument names against its registry, and every plain-name
    field (``model.activation``, ``model.init``) against its table; returns ``cfg``.

    Raises :class:`~pyro_vae.config.ConfigError` naming the key, listing the valid names or
    arguments and the closest match. An unset optional spec (``model.encoder = None``) has nothing
    to check. The values of spec arguments are checked when the object is built.
    """
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            value = getattr(getattr(cfg, section), f.name)
            where = f"{section}.{f.name}"
            if "names" in f.metadata:
                table = NAME_TABLES[f.metadata["names"]]
                if value not in table:
                    raise ConfigError(unknown_name(f.metadata["names"], value, table, where=f" for {where}"))
            elif "spec" in f.metadata and value is not None:
                registry, context = SPEC_KINDS[f.metadata["spec"]]
                try:
                    registry.check(value, context)
                except SpecError as err:
                    raise ConfigError(f"{where}: {err}") from None
    return cfg


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """:func:`pyro_vae.config.load_config` (file, ``--set`` overrides, types, bounds), then
    :func:`validate`: the loader for anything about to train, so a typo fails before data loads."""
    return validate(config.load_config(path, overrides))
