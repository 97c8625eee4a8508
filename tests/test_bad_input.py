"""Every bad config input is one line naming the key or argument and what is valid: no traceback,
no silent coercion (the reliability audit's fuzzed configs, and a fuzzer that keeps looking)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_vae import checks, cli, optim
from pyro_vae import config as config_module
from pyro_vae.config import SECTIONS, Config, ConfigError
from pyro_vae.data import resolve_device
from pyro_vae.model import VAE
from pyro_vae.runs import build_vae, estimate_parameters
from pyro_vae.specs import SpecError

REPO = Path(__file__).resolve().parents[1]
DEEP_TABLE = "{a=" * 1000 + "1" + "}" * 1000

# (override, phrase of the one-line ConfigError)
CONFIG_CASES = [
    ("train.device=mps", "use auto, cpu, cuda or cuda:N"),
    ("train.device=xla", "'xla' is not a device"),
    ("train.device=meta", "'meta' is not a device"),
    ("train.device=vulkan", "'vulkan' is not a device"),
    ("train.device=cuda:x", "'cuda:x' is not a device"),
    ("model.prior=mixture(components=3, components=5)", "argument 'components' is given twice"),
    (f"model.prior={DEEP_TABLE}", "model.prior is nested too deeply"),
    (f"model.hidden_dims={'[' * 1000}{']' * 1000}", "nested too deeply"),
    ("model.hidden_dims=[0]", "model.hidden_dims must hold positive widths"),
]


@pytest.mark.parametrize(("override", "phrase"), CONFIG_CASES)
def test_bad_config_values_are_one_line_config_errors(override, phrase):
    with pytest.raises(ConfigError) as info:
        checks.load_config(None, [override])
    message = str(info.value)
    assert phrase in message and "\n" not in message and len(message) < 400


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_usable_device_names_are_accepted_by_the_config(device):
    # whether cuda:12 exists is asked when the run resolves its device, not when the config is read
    assert checks.load_config(None, [f"train.device={device}"]).train.device == device


def test_a_missing_cuda_device_is_one_line_when_resolved():
    with pytest.raises(ValueError, match="cuda:99") as info:
        resolve_device("cuda:99")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="not a device this library runs on"):
        resolve_device("mps")


def _vae(**families):
    return VAE(x_dim=4, z_dim=2, hidden_dims=[4], **families)


def _params():
    return [torch.nn.Parameter(torch.zeros(2))]


# (build, spec, phrase of the one-line SpecError)
BUILD_CASES = [
    ("prior", "mixture(components=1e400)", "components must be a positive integer, got inf"),
    ("prior", "mixture(components=1.5)", "components must be a positive integer, got 1.5"),
    ("prior", "mixture(components=True)", "components must be a positive integer, got True"),
    ("prior", "vamp(components=float('nan'))", "is not a Python literal"),
    ("prior", {"name": "vamp", "components": float("nan")}, "components must be a positive integer, got nan"),
    ("prior", "flow(hidden_dims=[0])", "hidden_dims[0] must be a positive integer, got 0"),
    ("prior", "flow(layers=2.5)", "layers must be a positive integer"),
    ("guide", "lowrank(rank=1e400)", "rank must be a positive integer, got inf"),
    ("guide", "iaf(hidden=[8, -1])", "hidden[1] must be a positive integer, got -1"),
    ("guide", "iaf(flows=False)", "flows must be a positive integer, got False"),
    ("likelihood", "discretized_logistic(mixtures=2.5)", "mixtures must be a positive integer"),
    ("encoder", "mlp(hidden=[0])", "hidden[0] must be a positive integer, got 0"),
    ("encoder", "mlp(hidden=[1e400])", "hidden[0] must be a positive integer, got inf"),
    ("schedule", "step(gamma=-1, step_size=1)", "gamma must be a finite number in (0, 1], got -1"),
    ("schedule", "exponential(gamma=1e10)", "gamma must be a finite number in (0, 1]"),
    ("schedule", {"name": "step", "gamma": float("nan")}, "gamma must be a finite number in (0, 1], got nan"),
    ("schedule", "step(step_size=1.5)", "step_size must be a positive integer, got 1.5"),
    ("schedule", "step(step_size=0)", "step_size must be a positive integer, got 0"),
    ("schedule", "cosine(min_factor=2)", "min_factor must be a finite number in [0, 1]"),
    ("optimizer", "adam(eps=1e400)", "eps must be a finite number > 0, got inf"),
    ("optimizer", "adam(betas=(0.9,))", "betas must be a pair of numbers in [0, 1)"),
    ("optimizer", "adam(betas=(0.9, 0.99, 0.999))", "betas must be a pair of numbers in [0, 1)"),
    ("optimizer", "adam(betas=(0.9, 1.0))", "betas[1] must be a finite number in [0, 1)"),
    ("optimizer", "adam(amsgrad=5)", "amsgrad must be True or False, got 5"),
    ("optimizer", "adam(fused=5)", "fused must be True or False or None, got 5"),
    ("optimizer", "adamw(weight_decay=-0.1)", "weight_decay must be a finite number >= 0"),
    ("optimizer", "sgd(nesterov=1, momentum=0.9)", "nesterov must be True or False"),
    ("optimizer", "rmsprop(alpha=1e400)", "alpha must be a finite number in [0, 1]"),
]

BUILDERS = {
    "prior": lambda spec: _vae(prior=spec),
    "guide": lambda spec: _vae(guide=spec),
    "likelihood": lambda spec: _vae(likelihood=spec),
    "encoder": lambda spec: _vae(encoder=spec),
    "schedule": lambda spec: optim.build_schedule(spec, epochs=3),
    "optimizer": lambda spec: optim.build_optimizer(spec, _params(), lr=1e-3),
}


@pytest.mark.parametrize(("kind", "spec", "phrase"), BUILD_CASES)
def test_bad_spec_arguments_are_one_line_spec_errors(kind, spec, phrase):
    with pytest.raises(SpecError) as info:
        BUILDERS[kind](spec)
    message = str(info.value)
    assert phrase in message and "\n" not in message


@pytest.mark.parametrize(
    ("kind", "spec"),
    [
        ("prior", "mixture(components=3.0)"),  # an integral float is the integer it names
        ("prior", "flow(hidden_dims=[8])"),
        ("schedule", "step(step_size=2, gamma=1)"),
        ("schedule", "exponential(gamma=0.5)"),
        ("optimizer", "adam(betas=[0.5, 0.9], eps=1e-4, amsgrad=True, fused=False)"),
        ("optimizer", "sgd(momentum=0.9, nesterov=True, weight_decay=0)"),
    ],
)
def test_good_spec_arguments_still_build(kind, spec):
    BUILDERS[kind](spec)


def test_a_config_path_that_is_not_a_regular_file(tmp_path):
    with pytest.raises(ConfigError, match="is not a regular file"):
        checks.load_config(tmp_path)
    if hasattr(os, "mkfifo"):  # opening a FIFO would block until a writer comes: it must not be opened
        fifo = tmp_path / "x.toml"
        os.mkfifo(fifo)
        with pytest.raises(ConfigError, match="is not a regular file"):
            checks.load_config(fifo)


def test_a_deeply_nested_config_file(tmp_path):
    path = tmp_path / "deep.toml"
    path.write_text(f"[model]\nprior = {DEEP_TABLE}\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        checks.load_config(path)


@pytest.mark.parametrize(
    ("argv", "phrase"),
    [
        (["--set", "train.device=mps"], "'mps' is not a device"),
        (["--device", "vulkan"], "'vulkan' is not a device"),
        (["--set", f"model.prior={DEEP_TABLE}"], "nested too deeply"),
        (["--set", "model.prior=mixture(components=2, components=2)"], "given twice"),
        (["--set", "train.lr=1\n2"], "train.lr"),
    ],
)
def test_the_command_line_says_one_line_and_exits_2(tmp_path, capsys, argv, phrase):
    config = tmp_path / "c.toml"
    config.write_text('[train]\ndevice = "cpu"\n')
    assert cli.main(["train", "--config", str(config), "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert phrase in err and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("pyro-vae train: error: ")


def test_the_command_line_on_a_directory_as_config(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is not a regular file" in err and err.count("\n") == 1


# -- the fuzzer ------------------------------------------------------------------------------------
KEYS = [f"{section}.{f}" for section, cls in SECTIONS.items() for f in cls.__dataclass_fields__]
SPEC_NAMES = sorted({name for registry, _ in checks.SPEC_KINDS.values() for name in registry.names()})
ARG_NAMES = sorted(
    {key for registry, context in checks.SPEC_KINDS.values() for n in registry.names() for key in registry.user_keys(n)}
)
# Python literals for spec strings; TOML literals for values (some are both)
PY_VALUES = [
    "0",
    "1",
    "-1",
    "3",
    "1.5",
    "1e400",
    "-1e400",
    "10**400",
    "True",
    "False",
    "None",
    "'x'",
    "[0]",
    "[16, 16]",
    "(0.9,)",
    "(0.9, 0.999)",
    "{'a': 1}",
    "[[[[1]]]]",
    "float('nan')",
    "1e-300",
    "2**63",
]
TOML_VALUES = [
    "0",
    "1",
    "-1",
    "1.5",
    "1e400",
    "inf",
    "-inf",
    "nan",
    "true",
    "false",
    '"x"',
    "[]",
    "[0]",
    "[16, 16]",
    "[1.5]",
    "[true]",
    '["a"]',
    "{}",
    "{a = 1}",
    "{ name = 1 }",
    "99999999999999999999",
    "none",
    "''",
    "[[1]]",
    "9223372036854775807",
]

py_value = st.one_of(st.sampled_from(PY_VALUES), st.integers().map(str), st.floats().map(repr))
toml_value = st.one_of(st.sampled_from(TOML_VALUES), st.integers().map(str), st.floats().map(repr))
arg_name = st.one_of(st.sampled_from(ARG_NAMES), st.from_regex(r"[a-z_]{1,6}", fullmatch=True))
spec_name = st.one_of(st.sampled_from(SPEC_NAMES), st.from_regex(r"[a-z][a-z_-]{0,8}", fullmatch=True))


@st.composite
def spec_string(draw):
    args = draw(st.lists(st.tuples(arg_name, py_value), max_size=3))
    body = ", ".join(f"{k}={v}" for k, v in args)
    return f"{draw(spec_name)}({body})" if args or draw(st.booleans()) else draw(spec_name)


@st.composite
def spec_table(draw):
    args = draw(st.lists(st.tuples(arg_name, toml_value), max_size=3, unique_by=lambda kv: kv[0]))
    fields = [f'name = "{draw(spec_name)}"'] * draw(st.booleans()) + [f"{k} = {v}" for k, v in args if k != "name"]
    return "{ " + ", ".join(fields) + " }"


@st.composite
def override(draw):
    key = draw(st.sampled_from(KEYS))
    if draw(st.integers(0, 5)) == 0:
        key += "." + draw(arg_name)  # one argument of a spec (or a mistake on a plain key)
    value = draw(
        st.one_of(
            toml_value,
            spec_string(),
            spec_table(),
            st.integers(1, 400).map(lambda n: "[" * n + "]" * n),
            st.integers(1, 400).map(lambda n: "{a=" * n + "1" + "}" * n),
            st.text(max_size=12),
        )
    )
    return f"{key}={value}"


OUTCOMES: Counter = Counter()


@settings(max_examples=300, deadline=None, derandomize=True)
@given(override())
def test_fuzzed_overrides_give_a_config_or_a_config_error(item):
    """Whatever the override, ``load_config`` returns a Config or raises ConfigError (one line): never
    a traceback of another type."""
    try:
        cfg = checks.load_config(None, [item])
    except ConfigError as err:
        OUTCOMES["config error"] += 1
        assert "\n" not in str(err), str(err)
    else:
        OUTCOMES["accepted"] += 1
        assert isinstance(cfg, Config)


# -- sizes that cannot be allocated: refused from the config, before anything is built ----------------
@pytest.mark.parametrize(
    "override",
    [
        "model.z_dim=1000000000",
        "model.hidden_dims=[100000000]",
        "model.prior=mixture(components=1e300)",
        "model.prior=vamp(components=100000000000)",
        "model.encoder=mlp(hidden=[3000000000])",
    ],
)
def test_a_model_too_large_to_allocate_is_one_line_saying_the_estimate(tmp_path, capsys, override):
    config = tmp_path / "c.toml"
    config.write_text('[data]\nname = "synthetic"\n[train]\ndevice = "cpu"\n')
    argv = ["train", "--config", str(config), "--out", str(tmp_path / "out"), "--set", override, "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    estimate = estimate_parameters(checks.load_config(config, [override]).model, x_dim=64)  # synthetic: 8x8
    assert estimate > 2**31
    assert err.startswith(f"pyro-vae train: error: the model would have at least {estimate:.3g} parameters ("), err
    assert err.count("\n") == 1 and "more than the 2.15e+09 this library builds" in err
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


@pytest.mark.parametrize("config", ["mnist", "mnist_static", "fashion_mnist", "mnist_dynamic_2layer"])
def test_the_estimate_is_a_lower_bound_exact_for_a_plain_mlp_vae(config):
    cfg = checks.load_config(REPO / "configs" / f"{config}.toml")
    actual = sum(p.numel() for p in build_vae(cfg.model, x_dim=784, x_shape=(1, 28, 28)).parameters())
    estimate = estimate_parameters(cfg.model, 784)
    assert estimate == actual if cfg.model.structure == "vae" else estimate < actual
    cfg = checks.load_config(None, ["model.prior=mixture(components=10)"])
    assert estimate_parameters(cfg.model, 784) <= sum(p.numel() for p in build_vae(cfg.model, 784).parameters())


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.encoder=mlp", "model.hidden_dims=[7]"],  # an mlp spec's own default widths, not the shorthand
        ["model.encoder=mlp(hidden=[30, 20])", "model.decoder=mlp(hidden=[5])"],
    ],
)
def test_the_estimate_stays_below_the_count_of_other_bodies(overrides):
    cfg = checks.load_config(None, overrides)
    vae = build_vae(cfg.model, x_dim=784, x_shape=(1, 28, 28))
    assert estimate_parameters(cfg.model, 784) <= sum(p.numel() for p in vae.parameters())


def test_a_body_that_is_not_an_mlp_is_left_out_of_the_estimate():
    # a conv body's size is not a chain of widths; only the decoder (one linear layer here) is counted
    cfg = config_module.load_config(
        None, ["model.encoder=conv", "model.hidden_dims=[4000]", "model.decoder=mlp(hidden=[])"]
    )
    assert estimate_parameters(cfg.model, 784) == 50 * 784 + 784
