"""Swapping a family is one line: every prior, likelihood and guide trains end to end from a TOML file.

Each run writes the same small config (synthetic 4x4 binary data, 2 epochs) with exactly one line
changed -- ``prior = ...``, ``likelihood = ...`` or ``guide = ...`` -- and goes through the real
workflow (``load_config`` -> ``train``: run folder, evaluation with an importance-sampled NLL). The
command line's ``--set`` does the same without editing the file.
"""

from __future__ import annotations

import json
import math

import pytest
from test_guides import GUIDE_SPECS
from test_likelihoods import LIKELIHOOD_SPECS
from test_priors import PRIOR_SPECS

from pyro_vae import cli
from pyro_vae.checks import load_config
from pyro_vae.runs import load_run
from pyro_vae.train import train

TEMPLATE = """
[model]
z_dim = 2
hidden_dims = [16]
activation = "tanh"
prior = "normal"
likelihood = "bernoulli"
guide = "normal"

[data]
name = "synthetic(side=4, num_train=160, num_test=40)"

[train]
epochs = 2
batch_size = 40
lr = 3e-3
seed = 0
device = "cpu"
nll_samples = 20
eval_batch_size = 100
plots = false
"""


DEFAULTS = {"prior": "normal", "likelihood": "bernoulli", "guide": "normal"}


def write_config(tmp_path, key: str, spec: str):
    """The template with the one line ``key = "spec"`` changed."""
    text = TEMPLATE.replace(f'{key} = "{DEFAULTS[key]}"', f'{key} = "{spec}"')
    changed = [new for old, new in zip(TEMPLATE.splitlines(), text.splitlines(), strict=True) if old != new]
    assert changed == ([] if spec == DEFAULTS[key] else [f'{key} = "{spec}"'])
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


FAMILIES = [
    *[("prior", s) for s in PRIOR_SPECS],
    *[("likelihood", s) for s in LIKELIHOOD_SPECS],
    *[("guide", s) for s in GUIDE_SPECS if s != "normal"],
]


@pytest.mark.parametrize(("key", "spec"), FAMILIES)
def test_one_line_swap_trains_end_to_end(tmp_path, key, spec):
    cfg = load_config(write_config(tmp_path, key, spec))
    assert getattr(cfg.model, key) == spec
    result = train(cfg, tmp_path / "run", progress=False)
    assert result["status"] == "completed" and result["epoch"] == 2
    metrics = result["metrics"]
    assert math.isfinite(metrics["train_elbo"]) and math.isfinite(metrics["test_elbo"])
    evaluation = result["evaluation"]
    assert evaluation is not None, "the evaluation failed (see the run's log)"
    assert math.isfinite(evaluation["test_elbo"]) and math.isfinite(evaluation["test_nll"])
    # The NLL bound is at least as tight as the ELBO up to Monte Carlo noise (k = 20 importance samples).
    assert -evaluation["test_nll"] >= evaluation["test_elbo"] - 1.0
    run = load_run(tmp_path / "run", device="cpu")
    assert getattr(run.vae, "encoder" if key == "guide" else key).spec == spec
    assert run.vae.sample(3).shape == (3, 16)


def test_set_on_the_command_line_swaps_families(tmp_path, capsys):
    """``pyro-vae train --set model.prior=vamp(components=5) --set model.likelihood=continuous_bernoulli``."""
    config = write_config(tmp_path, "prior", "normal")
    out = tmp_path / "run"
    sets = ["--set", "model.prior=vamp(components=5)", "--set", "model.likelihood=continuous_bernoulli"]
    assert cli.main(["train", "--config", str(config), "--out", str(out), "--no-progress", *sets]) == 0
    run = load_run(out, device="cpu")
    assert run.vae.prior.spec == "vamp(components=5)" and run.vae.prior.pseudo_inputs.shape == (5, 16)
    assert run.vae.likelihood.spec == "continuous_bernoulli"
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert math.isfinite(evaluation["test_nll"])


def test_bad_family_lines_are_clear_errors(tmp_path):
    """A misspelled family in the TOML file is refused when the config loads, listing the valid names."""
    with pytest.raises(ValueError, match=r"unknown likelihood 'gausian'.*gaussian"):
        load_config(write_config(tmp_path, "likelihood", "gausian"))
    with pytest.raises(ValueError, match="prior 'mixture' has no argument 'k'"):
        load_config(write_config(tmp_path, "prior", "mixture(k=3)"))


def test_vamp_without_warmup_warns_and_with_warmup_does_not(tmp_path, recwarn):
    """The VampPrior collapses at beta = 1 from the first step (docs/families.md): the loop says so."""
    cfg = load_config(write_config(tmp_path, "prior", "vamp(components=4)"))
    cfg.train.epochs = 1
    with pytest.warns(UserWarning, match=r"warmup_epochs is 0: the VampPrior collapses.*set train.warmup_epochs"):
        train(cfg, tmp_path / "no_warmup", progress=False)
    recwarn.clear()
    cfg.train.warmup_epochs = 1
    train(cfg, tmp_path / "warmup", progress=False)
    assert not [w for w in recwarn if "VampPrior" in str(w.message)]
