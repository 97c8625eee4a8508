"""Run configuration: dataclasses for the ``[model]``, ``[data]`` and ``[train]`` sections of a TOML file.

A config is read with :func:`load_config` (TOML file, then ``--set section.key=value``
overrides), checked field by field against the dataclass types, and written back with
:func:`save_config` as the run folder's ``config.toml``; reading that file gives an equal config.

Spec fields (``model.prior``, ``model.likelihood``, ``model.guide``, ``model.structure``,
``model.encoder``, ``model.decoder``, ``train.estimator``, ``train.optimizer``,
``train.lr_schedule``, ``data.name``, ``data.missing``) hold a spec string ``"name(key=value, ...)"`` or a TOML
inline table ``{ name = "mixture", components = 10 }``; they stay as written and are built by the
registries (see ``pyro_vae.specs``).

Everything this module knows about a key is in its dataclass field: the type annotation, and the
field's ``metadata`` (see "Field metadata" below) for bounds and for which registry or name table
a value belongs to. One generic check reads it, so a new key is one line here.

This module is a leaf: it imports only the leaves ``pyro_vae.specs`` and ``pyro_vae.toml_writer``,
so reading and writing configs is cheap and cannot create an import cycle. Checking spec *names*
needs the registries, which sit above the model; that is ``pyro_vae.checks`` (``validate`` and
the loader that the command line uses, ``checks.load_config``), reading the ``spec`` and
``names`` metadata declared here.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from pyro_vae.specs import SpecError, format_spec, parse_spec, unknown_name
from pyro_vae.toml_writer import TOMLWriteError, dumps

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# A spec as it appears in a config: a string or a TOML table (see pyro_vae.specs).
SpecValue = str | dict[str, Any]


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key and what is valid."""


# The device names a run can use. Not torch's list: torch parses "mps", "xla", "meta", "vulkan", ...,
# which this library cannot train on (a traceback deep in the run); whether a "cuda:N" exists is
# asked only when a run resolves its device (pyro_vae.data.resolve_device), not when a config is read.
_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def device_problem(value: str) -> str | None:
    """What is wrong with a device name, or None: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if _DEVICE_NAME.fullmatch(value):
        return None
    return f"{value!r} is not a device this library runs on; use auto, cpu, cuda or cuda:N"


# Field metadata, read by _check_bounds here and by pyro_vae.checks:
#   {"min": m}                 an integer >= m
#   {"max": m}                 an integer <= m
#   {"positive": True}         a finite number > 0
#   {"positive_items": noun}   a list whose items are all > 0 ("must hold positive widths")
#   {"check": f}               f(value) -> what is wrong, or None (for what no bound can say)
#   {"spec": kind}             a spec checked against the registry of that kind (pyro_vae.checks)
#   {"names": table}           a plain name checked against that table of names (pyro_vae.checks)
# A bound applies to a set value; None (an unset optional key) has none.


@dataclass
class ModelConfig:
    """``[model]``: the VAE's shape and families (arguments of :class:`pyro_vae.model.VAE`)."""

    z_dim: int = field(default=50, metadata={"min": 1})
    # The MLP shorthand: encoder mlp(hidden=hidden_dims, activation) and the mirrored decoder,
    # unless model.encoder / model.decoder name a network.
    hidden_dims: list[int] = field(default_factory=lambda: [400], metadata={"positive_items": "widths"})
    activation: str = field(default="softplus", metadata={"names": "activation"})
    encoder: SpecValue | None = field(default=None, metadata={"spec": "network"})
    decoder: SpecValue | None = field(default=None, metadata={"spec": "network"})
    init: str = field(default="torch", metadata={"names": "init"})  # weight initialization
    prior: SpecValue = field(default="normal", metadata={"spec": "prior"})
    likelihood: SpecValue = field(default="bernoulli", metadata={"spec": "likelihood"})
    guide: SpecValue = field(default="normal", metadata={"spec": "guide"})
    structure: SpecValue = field(default="vae", metadata={"spec": "structure"})


@dataclass
class DataConfig:
    """``[data]``: which variant, how much of it and where it lives (see ``pyro_vae.data``)."""

    name: SpecValue = field(default="mnist", metadata={"spec": "dataset"})
    subset: int | None = field(default=None, metadata={"min": 1})
    # None: the variant's default (10k for MNIST); 0: no validation set
    val_size: int | None = field(default=None, metadata={"min": 0})
    data_dir: str | None = None  # None: $PYRO_VAE_DATA, else ~/.cache/pyro_vae/data
    download: bool = False
    # Training labels a semi-supervised model observes (balanced over classes, fixed by train.seed);
    # None: every one (pyro_vae.fields)
    labels: int | None = field(default=None, metadata={"min": 0})
    # Times each training row with an observed label appears per epoch (pyro_vae.fields.repeat_labelled)
    labelled_repeats: int = field(default=1, metadata={"min": 1})
    # Quadrants of each image a conditional model is given as input (1, 2 or 3; pyro_vae.fields); None: none
    quadrants: int | None = field(default=None, metadata={"min": 1, "max": 3})
    # Which pixels of each example are missing (pyro_vae.masks: "mcar(rate=0.5)", "squares(size=14)"), drawn once
    # from train.seed; the model observes the others (structure "miwae", docs/missing.md). None: nothing missing
    missing: SpecValue | None = field(default=None, metadata={"spec": "mask"})


@dataclass
class TrainConfig:
    """``[train]``: the optimization and what is measured along the way."""

    epochs: int = field(default=20, metadata={"min": 0})
    batch_size: int = field(default=256, metadata={"min": 1})
    lr: float = field(default=1e-3, metadata={"positive": True})
    estimator: SpecValue = field(default="trace", metadata={"spec": "estimator"})
    seed: int = field(default=0, metadata={"min": 0})
    # KL warm-up: beta ramps linearly from 0 to 1 over these epochs
    warmup_epochs: int = field(default=0, metadata={"min": 0})
    # "step": beta rises at every step; "epoch": beta = e / warmup_epochs through (1-based) epoch e, as
    # Tomczak & Welling do (pyro_vae.train.epoch.WARMUPS). Warm-up epochs never count against patience.
    warmup_by: str = field(default="step", metadata={"names": "warmup"})
    optimizer: SpecValue = field(default="adam", metadata={"spec": "optimizer"})
    lr_schedule: SpecValue = field(default="constant", metadata={"spec": "lr_schedule"})
    clip_norm: float | None = field(default=None, metadata={"positive": True})  # gradient-norm clipping; None: off
    # stop when an epoch's ELBO per example falls this many nats below the best train ELBO; 0: off (not
    # None: config.toml leaves unset keys out and reads them back as the default, here not None)
    divergence_nats: float = field(default=1e4, metadata={"min": 0})
    record: bool = True  # record the loss once per batch shape and replay it (docs/speed.md)
    # early stopping on val_bound (the estimator's validation bound); None: off
    patience: int | None = field(default=None, metadata={"min": 1})
    # epochs between evaluations on the validation and test sets
    eval_every: int = field(default=1, metadata={"min": 1})
    eval_batch_size: int = field(default=1000, metadata={"min": 1})
    device: str = field(default="auto", metadata={"check": device_problem})  # "auto": CUDA when available
    # torch's intra-op CPU threads while training; None: torch's choice (every core). 1 for a background run.
    threads: int | None = field(default=None, metadata={"min": 1})
    # TensorBoard event files in RUN/tensorboard/ (pyro_vae.train.tensorboard; needs the tensorboard package)
    tensorboard: bool = False
    nll_samples: int = field(default=100, metadata={"min": 0})  # importance samples for the final test NLL; 0 skips it
    plots: bool = True


@dataclass
class Config:
    """A whole run: ``[model]``, ``[data]`` and ``[train]``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


# ---------------------------------------------------------------------------------------------
# Typing one value against a dataclass field


def _fields(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}


def _field_type(section: str, key: str) -> Any:
    return typing.get_type_hints(SECTIONS[section])[key]


def _optional_inner(tp: Any) -> Any | None:
    """``int`` for ``int | None``; None when ``tp`` is not optional."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and len(args) == 2:
            return next(a for a in args if a is not type(None))
    return None


def _is_spec(section: str, key: str) -> bool:
    return "spec" in _fields(section)[key].metadata


def _type_name(tp: Any) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_type_name(inner)} or none"
    if typing.get_origin(tp) is list:
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(typing.get_args(tp)[0], "values")
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


# No key holds anything deeper than a spec table with a list of lists in it; past this depth a value
# is a mistake (or a fuzzer), and copying or printing it would end in a RecursionError traceback.
MAX_DEPTH = 16


def _too_deep(value: Any, depth: int = 0) -> bool:
    if depth > MAX_DEPTH:
        return True
    if isinstance(value, Mapping):
        return any(_too_deep(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_too_deep(v, depth + 1) for v in value)
    return False


def _nested_too_deeply(where: str) -> ConfigError:
    return ConfigError(f"{where} is nested too deeply (more than {MAX_DEPTH} levels of tables or lists)")


def _read_toml(text: str, where: str) -> Any:
    """``tomllib.loads(text)``, with a RecursionError (a thousand nested tables) said as one line."""
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise _nested_too_deeply(where) from None


def _coerce(section: str, key: str, value: Any) -> Any:
    """``value`` as the type of ``section.key``, or a ConfigError saying what was expected."""
    where = f"{section}.{key}"
    if _too_deep(value):
        raise _nested_too_deeply(where)
    if _is_spec(section, key):
        if value is None and type(None) in typing.get_args(_field_type(section, key)):
            return None
        if isinstance(value, str):
            return value
        if isinstance(value, Mapping):
            try:
                name, kwargs = parse_spec(value)
            except SpecError as err:
                raise ConfigError(f"{where}: {err}") from None
            return {"name": name, **kwargs}
        raise ConfigError(f'{where} must be a spec string like "name(key=value)" or a table, got {value!r}')
    tp = _field_type(section, key)
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else _coerce_plain(where, inner, value)
    if value is None:
        raise ConfigError(f"{where} cannot be none; expected {_type_name(tp)}")
    return _coerce_plain(where, tp, value)


def _coerce_plain(where: str, tp: Any, value: Any) -> Any:
    if typing.get_origin(tp) is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be {_type_name(tp)}, e.g. [400] or [200, 200]; got {value!r}")
        return [_coerce_plain(f"{where}[{i}]", typing.get_args(tp)[0], v) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a field type this module does not know is a bug here
        raise TypeError(f"{where}: unsupported field type {tp}")
    raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r}")


def _check_bounds(section: str, key: str, value: Any) -> None:
    """The bounds in the field's metadata, on a value already of the field's type."""
    if value is None:
        return
    meta = _fields(section)[key].metadata
    where = f"{section}.{key}"
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{where} must be at least {meta['min']}, got {value}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{where} must be at most {meta['max']}, got {value}")
    if meta.get("positive") and not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{where} must be a positive number, got {value}")
    if "positive_items" in meta and not all(v > 0 for v in value):
        raise ConfigError(f"{where} must hold positive {meta['positive_items']}, got {value}")
    problem = meta["check"](value) if "check" in meta else None
    if problem is not None:
        raise ConfigError(f"{where}: {problem}")


def _unknown(what: str, name: str, valid: Iterable[str], where: str = "") -> ConfigError:
    return ConfigError(unknown_name(what, name, valid, where))


def _check_key(section: str, key: str) -> None:
    if section not in SECTIONS:
        raise _unknown("section", section, SECTIONS)
    if key not in _fields(section):
        raise _unknown("key", key, _fields(section), where=f" in [{section}]")


# ---------------------------------------------------------------------------------------------
# Dicts <-> dataclasses


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """``{"model": {...}, "data": {...}, "train": {...}}`` with every key (None where unset); a deep copy."""
    return {name: copy.deepcopy(dataclasses.asdict(getattr(cfg, name))) for name in SECTIONS}


def config_from_dict(d: Mapping[str, Any], source: str = "config") -> Config:
    """A checked :class:`Config` from nested dicts; missing keys take their defaults.

    Unknown sections or keys, values of the wrong type and out-of-range values raise
    :class:`ConfigError` naming ``source`` and the key.
    """
    sections: dict[str, Any] = {}
    for section, values in d.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: {_unknown('section', section, SECTIONS)}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: [{section}] must be a table of keys, got {values!r}")
        typed = {}
        for key, value in values.items():
            try:
                _check_key(section, key)
                typed[key] = _coerce(section, key, value)
                _check_bounds(section, key, typed[key])
            except ConfigError as err:
                raise ConfigError(f"{source}: {err}") from None
        sections[section] = SECTIONS[section](**typed)
    return Config(**sections)


# ---------------------------------------------------------------------------------------------
# Overrides: --set section.key=value


def parse_override_value(section: str, key: str, text: str) -> Any:
    """The typed value of ``--set section.key=text``.

    ``text`` is read as a TOML value (``3``, ``1e-4``, ``true``, ``[200, 200]``,
    ``{ name = "mixture", components = 10 }``, ``"quoted"``). String fields and spec fields also
    take bare text (``softplus``, ``vamp(components=500)``), and ``none`` clears an optional field.
    """
    text = text.strip()
    tp = _field_type(section, key)
    if text.lower() in ("none", "null"):
        if type(None) not in typing.get_args(tp):
            raise ConfigError(f"{section}.{key} cannot be none; expected {_type_name(tp)}")
        return None
    try:
        value = _read_toml(f"v = {text}", f"{section}.{key}")["v"]
    except tomllib.TOMLDecodeError:
        if (_optional_inner(tp) or tp) is str or _is_spec(section, key):
            return text  # bare text: a spec string or a plain string
        raise ConfigError(f"cannot read {text!r} as {_type_name(tp)}") from None
    if _is_spec(section, key) and not isinstance(value, (str, dict)):
        return text  # e.g. a bare number as a spec name: keep the text and let validation speak
    return value


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """A new config with ``["section.key=value", ...]`` applied in order (see :func:`parse_override_value`).

    ``section.spec_field.arg=value`` changes one argument of a spec (``model.prior.components=20``)
    and keeps the spec's form (string or table).
    """
    d = config_to_dict(cfg)
    for item in overrides:
        path, eq, text = item.partition("=")
        parts = path.strip().split(".")
        if not eq or len(parts) not in (2, 3) or not all(parts):
            raise ConfigError(f"--set expects section.key=value (e.g. train.lr=1e-4), got {item!r}")
        section, key = parts[0], parts[1]
        try:
            _check_key(section, key)
            if len(parts) == 3:
                if not _is_spec(section, key):
                    raise ConfigError(f"{section}.{key} is not a spec, so it has no argument {parts[2]!r}")
                value = _set_spec_argument(d[section][key], parts[2], text)
            else:
                value = parse_override_value(section, key, text)
            d[section][key] = _coerce(section, key, value)
            _check_bounds(section, key, d[section][key])
        except (ConfigError, SpecError) as err:
            # The override as typed, unless it holds a newline (shown escaped: one line) or is huge
            shown = item if item.isprintable() else repr(item)
            shown = shown if len(shown) <= 100 else shown[:97] + "..."  # a 1000-level table is not worth echoing
            raise ConfigError(f"--set {shown}: {err}") from None
    return config_from_dict(d, source="--set")


def _set_spec_argument(spec: SpecValue | None, arg: str, text: str) -> SpecValue:
    if spec is None:  # an unset optional spec (model.encoder) has no arguments to change
        raise ConfigError(f"the spec is unset, so it has no argument {arg!r} to change; set the whole spec")
    try:
        value = _read_toml(f"v = {text.strip()}", arg)["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    if isinstance(spec, str):
        name, kwargs = parse_spec(spec)
        return format_spec(name, {**kwargs, arg: value})
    return {**spec, arg: value}


# ---------------------------------------------------------------------------------------------
# Files


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """The config in TOML file ``path`` (defaults when None) with ``overrides`` applied.

    Types and bounds are checked; spec *names* are not, since that needs the registries: the
    command line loads with :func:`pyro_vae.checks.load_config`, which also checks them.
    """
    if path is None:
        cfg = Config()
    else:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        if not path.is_file():  # a directory is an IsADirectoryError; a FIFO would block the open forever
            raise ConfigError(f"config file {path} is not a regular file")
        try:
            raw = _read_toml(path.read_bytes().decode("utf-8"), str(path))
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path} is not valid TOML: not UTF-8 text ({err.reason})") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path} is not valid TOML: {err}") from None
        except OSError as err:  # e.g. no permission to read it
            raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
        cfg = config_from_dict(raw, source=str(path))
    return apply_overrides(cfg, overrides)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as TOML; :func:`load_config` on the file gives back an equal config."""
    Path(path).write_text(dumps_config(cfg))


def dumps_config(cfg: Config) -> str:
    """``cfg`` as TOML text. Unset optional keys (None) are written as comments: TOML has no null."""
    try:
        return dumps(config_to_dict(cfg))
    except TOMLWriteError as err:
        raise ConfigError(f"{err}; a spec with an argument of None can be written as a spec string") from None
