"""Configs: defaults, TOML round trip, typed --set overrides, spec tables and every error message."""

from __future__ import annotations

import ast
import dataclasses
import math
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_vae import checks
from pyro_vae import config as config_module
from pyro_vae import toml_writer as toml_writer_module
from pyro_vae.checks import load_config, validate  # config.load_config, then the names against the registries
from pyro_vae.config import (
    SECTIONS,
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dumps_config,
    save_config,
)
from pyro_vae.toml_writer import toml_value

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


def _round_trip(cfg: Config, tmp_path: Path) -> Config:
    path = tmp_path / "config.toml"
    save_config(cfg, path)
    return load_config(path)


def test_defaults_are_the_pyro_tutorial_model():
    cfg = Config()
    assert (cfg.model.z_dim, cfg.model.hidden_dims, cfg.model.activation) == (50, [400], "softplus")
    assert (cfg.model.prior, cfg.model.likelihood, cfg.model.guide) == ("normal", "bernoulli", "normal")
    assert (cfg.data.name, cfg.data.subset, cfg.data.val_size, cfg.data.download) == ("mnist", None, None, False)
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.estimator, cfg.train.optimizer) == (
        256,
        1e-3,
        "trace",
        "adam",
    )
    assert load_config() == cfg
    assert Config().model.hidden_dims is not cfg.model.hidden_dims  # no shared mutable default


def test_every_optional_field_defaults_to_none():
    # The TOML writer leaves None out (TOML has no null); reading back gives the default, so the
    # round trip is exact only if that default is None.
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            tp = config_module._field_type(section, f.name)
            if config_module._optional_inner(tp) is not None:
                assert f.default is None, f"{section}.{f.name}"


def test_round_trip_is_exact(tmp_path):
    cfg = apply_overrides(
        Config(),
        [
            "model.hidden_dims=[200, 200]",
            "model.activation=tanh",
            'model.prior={ name = "mixture", components = 10 }',
            "model.likelihood=continuous_bernoulli",
            "data.name=mnist-dynamic",
            "data.subset=1000",
            "data.val_size=0",
            'data.data_dir="/tmp/a dir/with \\"quotes\\" and \\\\ and é"',
            "train.lr=3e-05",
            "train.clip_norm=0.1",
            "train.estimator=iwae(k=5)",
            "train.lr_schedule=step(step_size=5, gamma=0.5)",
            "train.plots=false",
        ],
    )
    assert cfg.data.data_dir == '/tmp/a dir/with "quotes" and \\ and é'
    back = _round_trip(cfg, tmp_path)
    assert back == cfg
    assert isinstance(back.train.clip_norm, float) and back.train.lr == 3e-05
    assert dumps_config(back) == dumps_config(cfg)
    assert _round_trip(Config(), tmp_path) == Config()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    cfg = load_config(path)  # names checked against the registries
    assert _round_trip(cfg, tmp_path) == cfg


def test_shipped_configs_are_what_they_say():
    names = {p.name for p in CONFIGS}
    assert {"mnist.toml", "mnist_dynamic.toml", "mnist_static.toml", "fashion_mnist.toml"} <= names
    tutorial = load_config(CONFIGS[0].parent / "mnist.toml")
    assert (tutorial.data.name, tutorial.model.hidden_dims, tutorial.model.z_dim) == ("mnist", [400], 50)
    assert (tutorial.model.activation, tutorial.model.likelihood) == ("softplus", "bernoulli")
    assert (tutorial.train.batch_size, tutorial.train.lr, tutorial.train.optimizer) == (256, 1e-3, "adam")
    iwae = load_config(CONFIGS[0].parent / "mnist_dynamic.toml")
    assert (iwae.data.name, iwae.model.hidden_dims, iwae.model.activation) == ("mnist-dynamic", [200, 200], "tanh")
    assert iwae.model.z_dim == 50 and iwae.train.nll_samples == 5000
    assert load_config(CONFIGS[0].parent / "mnist_static.toml").data.name == "mnist-static"
    assert load_config(CONFIGS[0].parent / "fashion_mnist.toml").data.name == "fashion-mnist"


def test_override_typing():
    cfg = apply_overrides(
        Config(),
        [
            "model.z_dim=2",
            "model.hidden_dims=[]",
            "train.lr=1",  # an integer for a float field becomes a float
            "train.epochs=3",
            "train.plots=false",
            "train.clip_norm=10.5",
            "train.patience=4",
            "data.subset=none",
            "train.device=cuda:1",
            "data.data_dir=~/data",
            "model.activation=tanh",
            'model.guide="normal"',
        ],
    )
    assert cfg.model.z_dim == 2 and cfg.model.hidden_dims == []
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 3 and cfg.train.plots is False and cfg.train.clip_norm == 10.5
    assert cfg.train.patience == 4 and cfg.data.subset is None
    assert cfg.train.device == "cuda:1" and cfg.data.data_dir == "~/data" and cfg.model.activation == "tanh"
    assert cfg.model.guide == "normal"
    cleared = apply_overrides(cfg, ["train.patience=None", "train.clip_norm=null"])
    assert cleared.train.patience is None and cleared.train.clip_norm is None
    assert cfg.train.patience == 4  # apply_overrides returns a new config
    assert apply_overrides(Config(), ["train.epochs=3", "train.epochs=7"]).train.epochs == 7  # later wins


def test_spec_overrides_stay_strings_or_tables():
    cfg = apply_overrides(Config(), ["model.prior=vamp(components=500)", "train.estimator=iwae(k=50)"])
    assert cfg.model.prior == "vamp(components=500)" and cfg.train.estimator == "iwae(k=50)"
    table = apply_overrides(Config(), ['model.prior={ name = "mixture", components = 10 }'])
    assert table.model.prior == {"name": "mixture", "components": 10}
    # One argument of a spec, in either form; the form is kept.
    assert apply_overrides(cfg, ["model.prior.components=20"]).model.prior == "vamp(components=20)"
    assert apply_overrides(table, ["model.prior.components=3"]).model.prior == {"name": "mixture", "components": 3}
    assert apply_overrides(Config(), ["train.optimizer.eps=1e-4"]).train.optimizer == "adam(eps=0.0001)"
    hyphen = apply_overrides(Config(), ["data.name=synthetic(side=4)", "data.name.flip=0.1"])
    assert hyphen.data.name == "synthetic(side=4, flip=0.1)"
    assert apply_overrides(Config(), ["data.name=mnist-static"]).data.name == "mnist-static"


def test_spec_tables_in_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[model]\nprior = { name = "mixture", components = 10 }\n\n'
        '[model.likelihood]\nname = "gaussian"\n\n'
        '[train]\noptimizer = { name = "adam", betas = [0.9, 0.99] }\n'
    )
    cfg = load_config(path)
    assert cfg.model.prior == {"name": "mixture", "components": 10}
    assert cfg.model.likelihood == {"name": "gaussian"}
    assert cfg.train.optimizer == {"name": "adam", "betas": [0.9, 0.99]}
    assert _round_trip(cfg, tmp_path) == cfg


def test_config_to_dict_is_a_deep_copy():
    cfg = Config()
    d = config_to_dict(cfg)
    d["model"]["hidden_dims"].append(7)
    assert cfg.model.hidden_dims == [400]
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert config_from_dict({"train": {"epochs": 2}}).model == Config().model


# -- error messages ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.z_dmi=3", "unknown key 'z_dmi' in [model] (did you mean \"z_dim\"?); valid keys: z_dim, hidden_dims"),
        ("modle.z_dim=3", "unknown section 'modle' (did you mean \"model\"?); valid sections: model, data, train"),
        ("train.learning_rate=1", "valid keys: epochs, batch_size, lr, estimator"),
        ("train.lr=abc", "--set train.lr=abc: cannot read 'abc' as a number"),
        ("train.epochs=1.5", "train.epochs must be an integer, got 1.5"),
        ("train.epochs=true", "train.epochs must be an integer, got True"),
        ("train.epochs=none", "train.epochs cannot be none; expected an integer"),
        ("train.plots=yes", "cannot read 'yes' as true or false"),
        ("train.plots=1", "train.plots must be true or false, got 1"),
        ("model.activation=3", "model.activation must be a string, got 3"),
        ("model.hidden_dims=400", "model.hidden_dims must be a list of integers, e.g. [400] or [200, 200]; got 400"),
        ("model.hidden_dims=[400, 0]", "model.hidden_dims must hold positive widths"),
        ("model.hidden_dims=[400, 1.5]", "model.hidden_dims[1] must be an integer, got 1.5"),
        ("model.z_dim=0", "model.z_dim must be at least 1, got 0"),
        ("train.batch_size=0", "train.batch_size must be at least 1"),
        ("train.patience=0", "train.patience must be at least 1"),
        ("data.subset=0", "data.subset must be at least 1"),
        ("data.val_size=-1", "data.val_size must be at least 0"),
        ("data.labels=-1", "data.labels must be at least 0, got -1"),
        ("data.quadrants=0", "data.quadrants must be at least 1, got 0"),
        ("data.quadrants=4", "data.quadrants must be at most 3, got 4"),
        ("train.lr=-1e-3", "train.lr must be a positive number, got -0.001"),
        ("train.lr=nan", "train.lr must be a positive number, got nan"),
        ("train.clip_norm=0", "train.clip_norm must be a positive number"),
        ("train.device=gpu", "train.device: 'gpu' is not a device"),
        ("train.lr=inf", "train.lr must be a positive number, got inf"),
        ("train.epochs=-1", "train.epochs must be at least 0, got -1"),
        ("train.seed=-1", "train.seed must be at least 0"),
        ("train.warmup_epochs=-1", "train.warmup_epochs must be at least 0"),
        ("train.eval_every=0", "train.eval_every must be at least 1"),
        ("train.eval_batch_size=0", "train.eval_batch_size must be at least 1"),
        ("train.nll_samples=-1", "train.nll_samples must be at least 0"),
        ("model.hidden_dims=[-1]", "model.hidden_dims must hold positive widths, got [-1]"),
        ("lr=3", "--set expects section.key=value (e.g. train.lr=1e-4), got 'lr=3'"),
        ("train.lr", "--set expects section.key=value"),
        ("a.b.c.d=1", "--set expects section.key=value"),
        ("train.lr.x=3", "train.lr is not a spec, so it has no argument 'x'"),
        ("model.prior={ components = 10 }", "a spec table needs a 'name' key"),
    ],
)
def test_override_errors(override, message):
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), [override])
    assert message in str(info.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.prior=vmap", "model.prior: unknown prior 'vmap' (did you mean \"vamp\"?); valid priors:"),
        ("model.likelihood=bernouli", "unknown likelihood 'bernouli' (did you mean \"bernoulli\"?)"),
        ("model.guide=nromal", "model.guide: unknown guide 'nromal' (did you mean \"normal\"?); valid guides:"),
        ("train.estimator=iwea(k=5)", "unknown estimator 'iwea' (did you mean \"iwae\"?)"),
        ("train.estimator=iwae(kk=5)", "estimator 'iwae' has no argument 'kk' (did you mean \"k\"?); its arguments: k"),
        ("data.name=mnist-dinamic", "data.name: unknown dataset 'mnist-dinamic' (did you mean \"mnist-dynamic\"?)"),
        ("data.name=synthetic(sid=3)", "dataset 'synthetic' has no argument 'sid' (did you mean \"side\"?)"),
        (
            "train.optimizer=adma",
            "train.optimizer: unknown optimizer 'adma' (did you mean \"adam\"?); valid optimizers:",
        ),
        ("train.lr_schedule=cosin", "unknown lr schedule 'cosin' (did you mean \"cosine\"?)"),
        ("train.lr_schedule=cosine(epochs=3)", "lr schedule 'cosine' has no argument 'epochs'"),
        ("model.prior=normal(z_dim=3)", "prior 'normal' has no argument 'z_dim'; its arguments: none"),
        ("model.prior=mixture(", "model.prior: cannot parse spec 'mixture('"),
        ("model.encoder=mlpp", "model.encoder: unknown network 'mlpp' (did you mean \"mlp\"?); valid networks:"),
        ("model.decoder=mlp(hiden=[3])", "model.decoder: network 'mlp' has no argument 'hiden' (did you mean"),
        ("model.decoder=mlp(in_shape=3)", "network 'mlp' has no argument 'in_shape'"),
        ("model.structure=vea", "model.structure: unknown structure 'vea' (did you mean \"vae\"?)"),
    ],
)
def test_unknown_spec_names_and_arguments(override, message):
    cfg = apply_overrides(Config(), [override])  # structurally fine: specs stay as written
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert message in str(info.value)
    with pytest.raises(ConfigError):
        load_config(overrides=[override])
    assert config_module.load_config(overrides=[override]) == cfg  # the leaf's loader leaves names alone


def test_optional_network_specs_are_checked_when_set_and_skipped_when_cleared():
    cfg = load_config(overrides=["model.encoder=mlp(hidden=[8])", "model.decoder={ name = 'mlp', hidden = [8] }"])
    assert cfg.model.encoder == "mlp(hidden=[8])" and cfg.model.decoder == {"name": "mlp", "hidden": [8]}
    cleared = load_config(overrides=["model.encoder=mlpp", "model.encoder=none"])
    assert cleared.model.encoder is None and validate(cleared) is cleared


def test_every_spec_kind_and_name_table_has_its_registry():
    # The field metadata (config.py) and the tables (checks.py) are two halves of one mapping.
    metadata = [f.metadata for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    assert {m["spec"] for m in metadata if "spec" in m} == set(checks.SPEC_KINDS)
    assert {m["names"] for m in metadata if "names" in m} == set(checks.NAME_TABLES)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[model]\nz_dim = 'ten'\n", "c.toml: model.z_dim must be an integer, got 'ten'"),
        ("[modle]\nz_dim = 3\n", "c.toml: unknown section 'modle' (did you mean \"model\"?)"),
        ("[train]\nepoch = 3\n", "c.toml: unknown key 'epoch' in [train] (did you mean \"epochs\"?)"),
        ("epochs = 3\n", "unknown section 'epochs'"),
        ("model = 3\n", "c.toml: [model] must be a table of keys, got 3"),
        ("[model\n", "c.toml is not valid TOML"),
        ("[model]\nprior = { components = 3 }\n", "c.toml: model.prior: a spec table needs a 'name' key"),
        ("[model]\nprior = [1, 2]\n", 'c.toml: model.prior must be a spec string like "name(key=value)" or a table'),
    ],
)
def test_file_errors(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope\.toml does not exist"):
        load_config(tmp_path / "nope.toml")


def test_none_inside_a_spec_table_cannot_be_written():
    cfg = Config()
    cfg.model.prior = {"name": "mixture", "components": None}
    with pytest.raises(ConfigError, match="TOML has no null"):
        dumps_config(cfg)


# -- the TOML writer -----------------------------------------------------------------------

_scalars = (
    st.text(max_size=20)
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.booleans()
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None)
@given(_values)
def test_toml_value_reads_back_exactly(value):
    assert tomllib.loads(f"v = {toml_value(value)}")["v"] == value


def test_toml_value_special_floats():
    assert toml_value(1e-5) == "1e-05" and toml_value(2.0) == "2.0"
    assert tomllib.loads(f"v = {toml_value(-math.inf)}")["v"] == -math.inf
    assert math.isnan(tomllib.loads(f"v = {toml_value(math.nan)}")["v"])


def _pyro_vae_imports(module) -> set[str]:
    """Every pyro_vae module that ``module`` imports, at the top or inside a function."""
    imported = set()
    for node in ast.walk(ast.parse(Path(module.__file__).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    return {m for m in imported if m.startswith("pyro_vae")}


def test_config_module_is_a_leaf():
    # config.py imports only leaves, anywhere in the file: the registries are checks.py's to import.
    assert _pyro_vae_imports(config_module) == {"pyro_vae.specs", "pyro_vae.toml_writer"}
    assert _pyro_vae_imports(toml_writer_module) == set()
