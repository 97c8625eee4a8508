"""The semi-supervised M2 (structure ``m2``): its bounds against hand computations, draw by draw.

Every number is recomputed in float64 from the structure's networks with the very z draws the
library made (the same seed replays the guide), so the checks are exact: the enumerated ELBO is
sum_y q(y|x)[...] on unlabelled rows and the labelled bound once (not C times) on labelled rows.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

from pyro_vae import cli, estimators
from pyro_vae.config import load_config
from pyro_vae.data import load_dataset
from pyro_vae.evaluate import log_likelihood
from pyro_vae.fields import attach_fields
from pyro_vae.model import VAE
from pyro_vae.structures.m2 import joined
from pyro_vae.traces import elbo_particles, guide_particles, log_weights
from pyro_vae.train import train
from pyro_vae.train.distributed import SingleProcess

C, ALPHA, SEED = 3, 2.0, 7
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL_LABELLED = torch.tensor([0, 2, 1, 0, 1])
MIXED = torch.tensor([-1, 2, -1, 0, -1])
HIDDEN = torch.full((5,), -1)


@pytest.fixture(autouse=True)
def _float64(_fresh_pyro_state):
    """float64 throughout: Pyro's TraceEnum_ELBO builds its Dice weights in the default dtype."""
    torch.set_default_dtype(torch.float64)


def _m2(alpha: float = ALPHA) -> VAE:
    torch.manual_seed(0)
    return VAE(x_dim=6, z_dim=2, hidden_dims=(5,), structure=f"m2(classes={C}, alpha={alpha})").double()


def _x() -> torch.Tensor:
    return (torch.rand(5, 6, generator=torch.Generator().manual_seed(1)) < 0.5).double()


def _terms(vae, x, y, z) -> torch.Tensor:
    """log p(y) + log p(x|y, z) + log p(z) - log q(z|x, y), broadcast over y's and z's leading dims."""
    m2 = vae.structure
    log_pz = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_qz = m2.encoder(joined(x, m2.onehot(y, x))).log_prob(z)
    return m2.decode(z, y).log_prob(x) + log_pz - log_qz - math.log(C)


def _by_hand(vae, x, labels, z, reduce):
    """Per-example bound from the draws z (enumeration dim first): unlabelled rows ``reduce`` over y with
    log q(y|x); labelled rows the mean over the C copies (of the terms or of the weights) plus alpha log q."""
    m2 = vae.structure
    values = torch.arange(C).reshape(C, *[1] * (z.dim() - 2))  # (C, 1, ...): one copy per class
    y = torch.where(labels >= 0, labels, values)
    terms = _terms(vae, x, y, z)
    log_q = m2.classify(x).log_prob(values)
    aux = ALPHA * m2.classify(x).log_prob(labels.clamp(min=0))
    if reduce == "elbo":
        hidden, seen = (log_q.exp() * (terms - log_q)).sum(0), terms.mean(0)
    else:  # log of the summed-out weight: sum_y p(x, y, z_y) / q(z_y|x, y)
        hidden, seen = terms.logsumexp(0), terms.logsumexp(0) - math.log(C)
    return torch.where(labels >= 0, seen + aux, hidden)


def _enum_loss_and_draws(vae, x, labels, alpha_free=False):
    pyro.set_rng_seed(SEED)
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(vae.model, vae.guide, x, 1.0, labels=labels)
    pyro.set_rng_seed(SEED)  # the guide again, as TraceEnum_ELBO ran it: the same z for every copy of y
    trace = poutine.trace(poutine.enum(vae.guide, first_available_dim=-2)).get_trace(x, 1.0, labels=labels)
    return loss, trace.nodes["z"]["value"]


def test_all_labelled_enum_loss_is_the_supervised_trace_elbo_averaged_over_the_enumerated_copies():
    vae, x = _m2(), _x()
    m2, y = vae.structure, ALL_LABELLED
    loss, z = _enum_loss_and_draws(vae, x, y)

    def supervised_model(x):
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Categorical(logits=torch.zeros(C, dtype=x.dtype)), obs=y)
            z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", m2.decode(z, y), obs=x)
            pyro.factor("aux", ALPHA * m2.classify(x).log_prob(y))

    def supervised_guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", m2.encoder(joined(x, m2.onehot(y, x))))

    losses = []
    for copy in z:  # Trace_ELBO of the supervised model at each of the C draws TraceEnum_ELBO made
        drawn = poutine.trace(supervised_guide).get_trace(x)
        drawn.nodes["z"]["value"] = copy
        losses.append(Trace_ELBO().loss(supervised_model, poutine.replay(supervised_guide, trace=drawn), x))
    assert z.shape == (C, 5, 2)
    torch.testing.assert_close(loss.item(), sum(losses) / C, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("labels", [HIDDEN, MIXED, ALL_LABELLED], ids=["hidden", "mixed", "labelled"])
def test_enum_loss_is_the_hand_sum_over_classes_and_labelled_rows_count_once(labels):
    vae, x = _m2(), _x()
    loss, z = _enum_loss_and_draws(vae, x, labels)
    expected = -_by_hand(vae, x, labels, z, "elbo").sum()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("labels", [HIDDEN, MIXED], ids=["hidden", "mixed"])
def test_traces_bounds_are_the_hand_sums_on_the_particle_plate(labels):
    vae, x, k = _m2(), _x(), 4
    pyro.set_rng_seed(SEED)
    z = guide_particles(vae, x, k, labels=labels).nodes["z"]["value"]
    assert z.shape == (C, k, 5, 2)  # enumeration at -3, particles at -2
    for function, reduce in ((elbo_particles, "elbo"), (log_weights, "weights")):
        pyro.set_rng_seed(SEED)
        got = function(vae, x, k, labels=labels)
        torch.testing.assert_close(got, _by_hand(vae, x, labels, z, reduce), rtol=1e-12, atol=1e-10, msg=reduce)
        pyro.set_rng_seed(SEED)
        assert torch.equal(got, function(vae, x, k, labels=labels)), "same seed, same draws"


def test_summed_out_bound_is_above_the_elbo_draw_by_draw_and_the_nll_is_finite():
    vae, x = _m2(), _x()
    for labels in (HIDDEN, MIXED):
        pyro.set_rng_seed(SEED)
        tight = log_weights(vae, x, 6, labels=labels)
        pyro.set_rng_seed(SEED)
        assert (tight >= elbo_particles(vae, x, 6, labels=labels) - 1e-12).all()  # Jensen, per draw
    pyro.set_rng_seed(SEED)
    without = log_weights(vae, x, 3)
    pyro.set_rng_seed(SEED)
    assert torch.equal(without, log_weights(vae, x, 3, labels=HIDDEN)), "no labels: every row hidden"
    nll = -log_likelihood(vae, x, num_samples=20, labels=HIDDEN)
    assert torch.isfinite(nll).all() and (nll > 0).all()


def _classifier_grads(vae, x, labels) -> list[torch.Tensor]:
    vae.zero_grad()
    pyro.set_rng_seed(SEED)
    estimators.get("enum").loss(vae, x, labels=labels).backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in vae.classifier.parameters()]


def test_the_classifier_learns_from_unlabelled_rows_and_from_the_auxiliary_term_alone():
    x = _x()
    vae = _m2(alpha=0.0)
    assert all(g.abs().sum() > 0 for g in _classifier_grads(vae, x, HIDDEN))  # through the weights q(y|x)
    assert all(g.abs().sum() == 0 for g in _classifier_grads(vae, x, ALL_LABELLED))  # labelled, alpha = 0
    vae = _m2()
    vae.zero_grad()
    (-ALPHA * vae.structure.classify(x).log_prob(ALL_LABELLED).sum()).backward()
    aux = [p.grad.clone() for p in vae.classifier.parameters()]
    for got, want in zip(_classifier_grads(vae, x, ALL_LABELLED), aux, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spec", ["enum", "trace", "tracegraph", "iwae(k=3)", "renyi(alpha=0.5, k=2)"])
def test_estimators_that_apply_train_the_classifier_from_unlabelled_rows(spec):
    vae, x = _m2(alpha=0.0), _x()
    estimator = estimators.get(spec)
    with pytest.warns(UserWarning, match="enumerate") if spec in ("trace", "tracegraph") else contextlib.nullcontext():
        loss = estimator.loss(vae, x, labels=MIXED)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad.abs().sum() > 0 for p in vae.classifier.parameters())
    assert torch.isfinite(estimator.bound(vae, x, labels=MIXED)).all()


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("meanfield", "no score-function term"),
        ("stl", "needs every latent site reparameterized"),
        ("dreg(k=2)", "needs every latent site reparameterized"),
        ("closed_form", "takes x alone"),
        ("jit_trace", "takes x alone"),
    ],
)
def test_estimators_that_do_not_apply_refuse_in_one_line(spec, why):
    vae, x = _m2(), _x()
    with pytest.raises(ValueError, match=why) as error:
        estimators.get(spec).loss(vae, x, labels=MIXED)
    assert "\n" not in str(error.value)


def test_model_prior_other_than_normal_is_refused():
    with pytest.raises(ValueError, match=re.escape("model.prior must be 'normal'")):
        VAE(x_dim=6, z_dim=2, hidden_dims=(5,), prior="mixture(components=3)", structure="m2")


def test_every_labelled_row_is_seen_once_per_epoch_by_the_loop_batches():
    dataset = attach_fields(load_dataset("synthetic(num_train=300, components=3)", device="cpu"), labels=12)
    source = SingleProcess().batches(dataset, 32, seed=0, consumes=("labels",))
    seen = torch.cat([fields["labels"] for _, fields in source(1, torch.Generator().manual_seed(0))])
    assert len(seen) == len(dataset.train) and int((seen >= 0).sum()) == 12


M2_RUN = [
    "data.name=synthetic(num_train=300, num_test=60, side=4, components=3)",
    "data.labels=30",
    "model.structure=m2(classes=3)",
    "model.z_dim=2",
    "model.hidden_dims=[8]",
    "train.estimator=enum",
    "train.batch_size=40",
    "train.epochs=2",
    "train.nll_samples=5",
    "train.device=cpu",
]


def test_training_writes_accuracies_and_figures_and_the_cli_evaluates_and_plots(tmp_path):
    torch.set_default_dtype(torch.float32)  # the data sets are float32
    out = tmp_path / "m2"
    train(load_config(None, M2_RUN), out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(0 <= r["val_accuracy"] <= 1 and 0 <= r["test_accuracy"] <= 1 for r in records)
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert 0 <= evaluation["test_accuracy"] <= 1 and math.isfinite(evaluation["test_nll"])
    assert (out / "class_samples.png").is_file() and (out / "style_transfer.png").is_file()
    (out / "class_samples.png").unlink()
    assert cli.main(["plot", "--run", str(out)]) == 0
    assert (out / "class_samples.png").is_file()
    assert cli.main(["evaluate", "--run", str(out), "--nll-samples", "3", "--json"]) == 0


@pytest.mark.parametrize(
    ("config", "why"),
    [
        ("bare", "structure 'm2' consumes the data field 'labels', which mnist-static lacks"),
        ("mnist_m2", "data.labels = 100, but mnist-static has no labels"),
    ],
)
def test_m2_on_data_without_labels_fails_in_one_line(config, why, tmp_path, data_root, capsys):
    torch.set_default_dtype(torch.float32)
    path = CONFIGS / "mnist_m2.toml"
    if config == "bare":
        path = tmp_path / "bare.toml"
        path.write_text('[model]\nstructure = "m2"\n')
    sets = ["data.name=mnist-static", "data.subset=200", "train.device=cpu"]
    argv = ["train", "--config", str(path), "--out", str(tmp_path / "o"), "--data-dir", str(data_root)]
    status = cli.main([*argv, "--no-progress", *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert status != 0 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and why in err
