"""The training loop: exact resume, NaN handling, Ctrl-C, warm-up, early stopping, schedules, the run folder."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from pyro_vae import checkpoint as ckpt
from pyro_vae import optim
from pyro_vae.checks import load_config as checked_config
from pyro_vae.config import ConfigError, load_config
from pyro_vae.model import VAE
from pyro_vae.runs import load_run
from pyro_vae.specs import SpecError
from pyro_vae.train import NonFiniteLossError, TrainingError, fit, run_folder, train, warmup_beta
from pyro_vae.train import epoch as epoch_module
from pyro_vae.train import loop as train_module

# 160 training examples of 4x4 pixels in batches of 40: 4 steps per epoch, a fraction of a second.
TINY = [
    "data.name=synthetic(num_train=200, num_test=60, side=4, components=3)",
    "model.z_dim=2",
    "model.hidden_dims=[8]",
    "train.batch_size=40",
    "train.lr=0.01",
    "train.nll_samples=0",
    "train.plots=false",
    "train.device=cpu",
]
STEPS_PER_EPOCH = 4


def tiny(*overrides: str):
    return load_config(None, [*TINY, *overrides])


def _metrics(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("seconds")  # wall-clock time is the one thing allowed to differ
    return records


def _assert_same_state(a, b):
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for (ka, sa), (kb, sb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items(), strict=True):
        assert ka == kb
        for name in sa:
            assert torch.equal(sa[name], sb[name]), (ka, name)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert torch.equal(a["data_generator"], b["data_generator"])
    assert (a["epoch"], a["step"], a["best_epoch"]) == (b["epoch"], b["step"], b["best_epoch"])


class _InterruptAt:
    """A TrainStep that raises KeyboardInterrupt (as Ctrl-C would) before global step ``at``."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0
        self.real = train_module.TrainStep

    def __call__(self, *args, **kwargs):
        inner = self.real(*args, **kwargs)
        outer = self

        def step(x, beta=1.0):
            outer.calls += 1
            if outer.calls == outer.at:
                raise KeyboardInterrupt
            return inner(x, beta)

        return step


def test_resume_after_ctrl_c_equals_uninterrupted_run(tmp_path, monkeypatch):
    cfg = tiny("train.epochs=3", "train.warmup_epochs=2", "train.lr_schedule=cosine", "train.patience=5")
    full = train(cfg, tmp_path / "full", progress=False)
    assert full["status"] == "completed"

    # Ctrl-C in the middle of epoch 2: the checkpoint of epoch 1 is what a resume starts from.
    monkeypatch.setattr(train_module, "TrainStep", _InterruptAt(STEPS_PER_EPOCH + 2))
    interrupted = train(cfg, tmp_path / "resumed", progress=False)
    assert interrupted["status"] == "interrupted" and interrupted["epoch"] == 1
    assert "pyro-vae train --resume --out" in (tmp_path / "resumed" / "train.log").read_text()
    monkeypatch.undo()
    assert len(_metrics(tmp_path / "resumed")) == 1

    resumed = train(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert resumed["status"] == "completed" and resumed["epoch"] == 3
    a = ckpt.load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = ckpt.load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    _assert_same_state(a, b)
    assert _metrics(tmp_path / "full") == _metrics(tmp_path / "resumed")
    assert json.loads((tmp_path / "full" / "evaluation.json").read_text())["test_elbo"] == pytest.approx(
        json.loads((tmp_path / "resumed" / "evaluation.json").read_text())["test_elbo"], abs=0
    )


def test_resume_can_extend_the_number_of_epochs(tmp_path):
    train(tiny("train.epochs=2"), tmp_path / "full", progress=False)
    train(tiny("train.epochs=1"), tmp_path / "short", progress=False)
    train(tiny("train.epochs=2"), tmp_path / "short", resume=True, progress=False)
    a = ckpt.load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = ckpt.load_checkpoint(tmp_path / "short" / "checkpoint.pt")
    _assert_same_state(a, b)
    assert _metrics(tmp_path / "full") == _metrics(tmp_path / "short")


def test_resume_refuses_another_model_and_a_missing_checkpoint(tmp_path):
    train(tiny("train.epochs=1"), tmp_path / "run", progress=False)
    with pytest.raises(TrainingError, match=r"different model: model\.z_dim: 2 -> 3"):
        train(tiny("train.epochs=2", "model.z_dim=3"), tmp_path / "run", resume=True, progress=False)
    with pytest.raises(TrainingError, match=r"already holds a run.*--resume"):
        train(tiny("train.epochs=1"), tmp_path / "run", progress=False)
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint at"):
        train(tiny(), tmp_path / "nothing", resume=True, progress=False)


def _as_written_before_the_redesign(run_dir) -> None:
    """Rewrite a run folder's checkpoints as the code before networks and structures wrote them:
    one nn.Sequential per MLP (keys ``encoder.net.net.i``, ``decoder.net.i``) and no
    ``model.structure``/``encoder``/``decoder`` in the saved config."""
    for name in ("checkpoint.pt", "best.pt"):
        path = run_dir / name
        if not path.is_file():
            continue
        state = ckpt.load_checkpoint(path)
        legacy = {}
        for key, value in state["model"].items():
            for net, old in (("encoder.net.", "encoder.net.net."), ("decoder.", "decoder.net.")):
                key = key.replace(f"{net}head.", f"{old}2.").replace(f"{net}body.layers.", old)
            legacy[key] = value
        state["model"] = legacy
        for key in ("structure", "encoder", "decoder"):
            del state["config"]["model"][key]
        ckpt.save_checkpoint(state, path)


def test_a_run_written_before_the_redesign_loads_evaluates_and_resumes(tmp_path):
    train(tiny("train.epochs=2"), tmp_path / "full", progress=False)
    train(tiny("train.epochs=1"), tmp_path / "old", progress=False)
    _as_written_before_the_redesign(tmp_path / "old")
    assert "decoder.net.2.weight" in ckpt.load_checkpoint(tmp_path / "old" / "checkpoint.pt")["model"]
    run = load_run(tmp_path / "old", device="cpu", load_data=False)
    assert run.vae.decoder.head.weight.shape == (16, 8)
    train(tiny("train.epochs=2"), tmp_path / "old", resume=True, progress=False)
    a = ckpt.load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = ckpt.load_checkpoint(tmp_path / "old" / "checkpoint.pt")
    _assert_same_state(a, b)
    assert _metrics(tmp_path / "full") == _metrics(tmp_path / "old")


class _NaNEstimator:
    """Wraps an estimator; the loss becomes NaN from the ``at``-th call on, as after a blow-up."""

    # Python state (a call counter) decides the loss: a recorded replay would freeze it. (Duck-typed
    # estimators are not recorded anyway; said here for the reader.)
    recordable = False

    def __init__(self, inner, at: int, on_nan=None) -> None:
        self.inner, self.at, self.calls, self.on_nan = inner, at, 0, on_nan
        self.bound_name, self.bound_is_elbo, self.particles = inner.bound_name, inner.bound_is_elbo, inner.particles

    def loss(self, vae, x, beta=1.0):
        self.calls += 1
        loss = self.inner.loss(vae, x, beta)
        if self.calls == self.at and self.on_nan is not None:
            self.on_nan()
        return loss * math.nan if self.calls >= self.at else loss

    def bound(self, vae, x):
        return self.inner.bound(vae, x)


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    seen = {}
    at = STEPS_PER_EPOCH + 3  # the third step of epoch 2

    def remember_checkpoint():
        seen["bytes"] = (run / "checkpoint.pt").read_bytes()

    real_get = train_module.estimators.get
    monkeypatch.setattr(
        train_module.estimators, "get", lambda spec: _NaNEstimator(real_get(spec), at, remember_checkpoint)
    )
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at epoch 2, step 3 of the epoch \(global step 7\)"):
        train(tiny("train.epochs=3"), run, progress=False)
    assert (run / "checkpoint.pt").read_bytes() == seen["bytes"]
    state = ckpt.load_checkpoint(run / "checkpoint.pt")
    assert state["epoch"] == 1 and state["step"] == STEPS_PER_EPOCH
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert [r["epoch"] for r in _metrics(run)] == [1]


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_huge_learning_rate_is_caught_as_non_finite(tmp_path):
    cfg = tiny("train.epochs=2", "train.lr=1e30", "train.optimizer=sgd")
    with pytest.raises(NonFiniteLossError, match="non-finite loss at epoch 1") as info:
        train(cfg, tmp_path / "run", progress=False)
    assert info.value.epoch == 1 and 1 <= info.value.step <= STEPS_PER_EPOCH
    assert ckpt.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 0  # the initial state, intact


def test_warmup_beta_values():
    assert [warmup_beta(t, 4) for t in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_beta(0, 0) == 1.0 and warmup_beta(100, 0) == 1.0


class _BetaRecorder:
    def __init__(self) -> None:
        self.betas = []
        self.real = train_module.TrainStep

    def __call__(self, *args, **kwargs):
        inner = self.real(*args, **kwargs)

        def step(x, beta=1.0):
            self.betas.append(beta)
            return inner(x, beta)

        return step


def test_warmup_ramps_beta_per_step_and_evaluates_at_beta_one(tmp_path, monkeypatch):
    recorder = _BetaRecorder()
    monkeypatch.setattr(train_module, "TrainStep", recorder)
    evaluated = []
    real_sum = epoch_module.sum_elbo

    def sum_elbo(vae, x, batch_size):
        evaluated.append(len(x))
        return real_sum(vae, x, batch_size)

    monkeypatch.setattr(epoch_module, "sum_elbo", sum_elbo)
    train(tiny("train.epochs=3", "train.warmup_epochs=2"), tmp_path / "run", progress=False)
    warmup_steps = 2 * STEPS_PER_EPOCH
    assert recorder.betas == [min(1.0, (t + 1) / warmup_steps) for t in range(3 * STEPS_PER_EPOCH)]
    assert [r["beta"] for r in _metrics(tmp_path / "run")] == [0.5, 1.0, 1.0]
    assert evaluated == [40, 60] * 3  # validation and test every epoch, through the beta-free bound


def test_early_stopping_keeps_the_best_epoch(tmp_path, monkeypatch):
    # Validation ELBOs per epoch (as sums over the 40 validation examples): best at epoch 2.
    val = iter([-400.0, -200.0, -240.0, -280.0, -100.0])
    real_sum = epoch_module.sum_elbo

    def scripted(vae, x, batch_size):
        return torch.tensor(next(val)) if len(x) == 40 else real_sum(vae, x, batch_size)

    monkeypatch.setattr(epoch_module, "sum_elbo", scripted)
    result = train(tiny("train.epochs=5", "train.patience=2"), tmp_path / "run", progress=False)
    assert result["status"] == "early_stopped"
    assert (result["epoch"], result["best_epoch"], result["best_val_elbo"]) == (4, 2, -5.0)
    assert [r["val_elbo"] for r in _metrics(tmp_path / "run")] == [-10.0, -5.0, -6.0, -7.0]
    assert ckpt.load_checkpoint(tmp_path / "run" / "best.pt")["epoch"] == 2
    assert ckpt.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 4
    assert "early stopping" in (tmp_path / "run" / "train.log").read_text()


def test_warmup_by_epoch_holds_beta_e_over_w_for_the_whole_epoch(tmp_path, monkeypatch):
    """Tomczak & Welling's warm-up: beta = e / W in (1-based) epoch e, the same for every step of it."""
    recorder = _BetaRecorder()
    monkeypatch.setattr(train_module, "TrainStep", recorder)
    train(tiny("train.epochs=3", "train.warmup_epochs=2", "train.warmup_by=epoch"), tmp_path / "run", progress=False)
    assert recorder.betas == [0.5] * STEPS_PER_EPOCH + [1.0] * 2 * STEPS_PER_EPOCH
    with pytest.raises(ConfigError, match=r"unknown warmup 'epochs' for train.warmup_by.*valid warmups: step, epoch"):
        checked_config(None, ["train.warmup_by=epochs"])


def test_warmup_epochs_never_count_against_the_patience(tmp_path, monkeypatch):
    # Best at epoch 1, then worse every epoch: with 3 warm-up epochs the patience of 2 runs from epoch 4 on.
    val = iter([-100.0, -200.0, -240.0, -280.0, -300.0, -320.0, -340.0])
    real_sum = epoch_module.sum_elbo

    def scripted(vae, x, batch_size):
        return torch.tensor(next(val)) if len(x) == 40 else real_sum(vae, x, batch_size)

    monkeypatch.setattr(epoch_module, "sum_elbo", scripted)
    cfg = tiny("train.epochs=7", "train.patience=2", "train.warmup_epochs=3")
    result = train(cfg, tmp_path / "run", progress=False)
    assert result["status"] == "early_stopped" and (result["epoch"], result["best_epoch"]) == (5, 1)


def test_train_threads_sets_torchs_threads_while_training_only(tmp_path, monkeypatch):
    seen = []
    real = train_module.prepare_run

    def prepare(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "prepare_run", prepare)
    before = torch.get_num_threads()
    train(tiny("train.epochs=1", f"train.threads={before + 1}"), tmp_path / "run", progress=False)
    assert seen == [before + 1] and torch.get_num_threads() == before
    with pytest.raises(ConfigError, match="threads"):
        tiny("train.threads=0")


def test_importance_weighted_training_selects_the_best_epoch_by_its_own_bound(tmp_path, monkeypatch):
    # iwae(k=2): the validation ELBO falls after epoch 1 while the IWAE bound rises until epoch 3.
    elbos = iter([-400.0, -440.0, -480.0, -520.0])  # sums over the 40 validation examples
    bounds = iter([-9.0, -8.0, -7.0, -7.5])  # per example
    real_sum = epoch_module.sum_elbo

    def scripted_elbo(vae, x, batch_size):
        return torch.tensor(next(elbos)) if len(x) == 40 else real_sum(vae, x, batch_size)

    def scripted_bound(self, vae, x):
        assert not torch.is_grad_enabled() and not vae.training  # evaluated like the ELBO
        return torch.full((len(x),), next(bounds))

    monkeypatch.setattr(epoch_module, "sum_elbo", scripted_elbo)
    monkeypatch.setattr(train_module.estimators.IWAE, "bound", scripted_bound)
    cfg = tiny("train.epochs=4", "train.estimator=iwae(k=2)", "train.patience=2")
    result = train(cfg, tmp_path / "run", progress=False)
    assert result["status"] == "completed"  # by the ELBO it would have stopped after epoch 3
    records = _metrics(tmp_path / "run")
    assert [r["val_elbo"] for r in records] == [-10.0, -11.0, -12.0, -13.0]
    assert [r["val_bound"] for r in records] == [-9.0, -8.0, -7.0, -7.5]
    assert (result["best_epoch"], result["best_val_bound"], result["best_val_elbo"]) == (3, -7.0, -12.0)
    assert ckpt.load_checkpoint(tmp_path / "run" / "best.pt")["epoch"] == 3
    assert "validation IWAE bound (k=2)" in (tmp_path / "run" / "train.log").read_text()


def test_elbo_estimators_reuse_the_validation_elbo_as_their_bound(tmp_path, monkeypatch):
    def no_second_pass(*args, **kwargs):
        raise AssertionError("the ELBO estimators' bound is the validation ELBO already computed")

    monkeypatch.setattr(epoch_module, "sum_bound", no_second_pass)
    train(tiny("train.epochs=1", "train.estimator=closed_form"), tmp_path / "run", progress=False)
    (record,) = _metrics(tmp_path / "run")
    assert record["val_bound"] == record["val_elbo"] < 0


def test_run_folder_contents_and_learning(tmp_path):
    cfg = tiny("train.epochs=4", "train.nll_samples=10", "train.eval_every=2")
    result = train(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert {"config.toml", "metrics.jsonl", "checkpoint.pt", "best.pt", "train.log", "evaluation.json"} <= {
        p.name for p in run.iterdir()
    }
    assert load_config(run / "config.toml") == cfg
    records = _metrics(run)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert [r["steps"] for r in records] == [4, 8, 12, 16]
    assert set(records[0]) == {"epoch", "train_elbo", "val_elbo", "val_bound", "test_elbo", "beta", "lr", "steps"}
    assert records[0]["test_elbo"] is None and records[1]["test_elbo"] is not None  # eval_every = 2
    assert records[-1]["train_elbo"] > records[0]["train_elbo"]  # lr 0.01 on 16 pixels: it learns
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert evaluation["weights"] == "best.pt" and evaluation["num_examples"] == 60
    assert evaluation["test_nll"] > 0 > evaluation["test_elbo"]
    assert result["evaluation"] == evaluation
    assert (run / "train.log").read_text().count("epoch ") >= 4


def test_the_loop_reads_the_host_once_per_epoch(tmp_path, monkeypatch):
    """The loop itself never syncs per step: one ``.tolist()`` per epoch, no ``.item()``/``float()``/``bool()``.

    The step and the ELBO are replaced by sync-free stand-ins, so this checks the loop alone
    (the step's own code is ``pyro_vae.train.step``'s).
    """
    reads: list[str] = []
    marks: list[int] = []
    for name in ("item", "tolist", "__float__", "__bool__", "__int__", "__index__", "numpy"):
        real = getattr(torch.Tensor, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            reads.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)

    def fake_step_factory(vae, estimator, optimizer, clip_norm=None, record=True):
        def step(x, beta=1.0):
            if not marks:
                marks.append(len(reads))  # the first step: setup reads are behind us
            return x.sum() * beta

        return step

    real_write = run_folder.RunFolder.write_epoch

    def write_epoch(*args, **kwargs):
        marks.append(len(reads))
        return real_write(*args, **kwargs)

    monkeypatch.setattr(train_module, "TrainStep", fake_step_factory)
    monkeypatch.setattr(epoch_module, "sum_elbo", lambda vae, x, batch_size: x.sum())
    monkeypatch.setattr(run_folder.RunFolder, "write_epoch", write_epoch)
    monkeypatch.setattr(run_folder.RunFolder, "finish", lambda *args, **kwargs: None)
    train(tiny("train.epochs=3", "train.warmup_epochs=1"), tmp_path / "run", progress=False)
    windows = [reads[a:b] for a, b in itertools.pairwise(marks)]
    assert len(windows) == 3
    # Epoch 1: its steps and its read. Epochs 2, 3: the previous epoch's checkpoint and log line too.
    assert windows == [["tolist"]] * 3, windows


def test_optimizer_and_schedule_registries():
    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = optim.build_optimizer("sgd(momentum=0.9)", params, lr=0.1)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    valid = "adam, adam_normgrad, adamw, rmsprop, sgd"
    with pytest.raises(SpecError, match=rf"unknown optimizer 'adan'.*valid optimizers: {valid}"):
        optim.build_optimizer("adan", params, lr=0.1)
    cosine = optim.build_schedule("cosine(min_factor=0.1)", epochs=10)
    assert cosine.factor(0) == 1.0 and cosine.factor(10) == pytest.approx(0.1)
    assert cosine.factor(5) == pytest.approx(0.55)
    assert optim.build_schedule("step(step_size=3, gamma=0.5)", epochs=10).factor(7) == 0.25
    assert optim.build_schedule("exponential(gamma=0.5)", epochs=10).factor(3) == 0.125
    assert cosine.apply(sgd, 0.2, 10) == pytest.approx(0.02) and sgd.param_groups[0]["lr"] == pytest.approx(0.02)
    with pytest.raises(SpecError, match=r"unknown lr schedule 'cosin'.*did you mean \"cosine\""):
        optim.build_schedule("cosin", epochs=3)


def test_the_iwae_papers_schedule_runs_stage_i_for_3_to_the_i_epochs_at_10_to_the_minus_i_over_7():
    burda = optim.build_schedule("burda", epochs=3280)
    stages = [burda.stage(e) for e in range(3280)]
    # Stage i covers epochs [sum_{j<i} 3^j, sum_{j<=i} 3^j): 1, 3, 9, ..., 2187 epochs, 3280 in all.
    assert [stages.count(i) for i in range(8)] == [3**i for i in range(8)] and stages[-1] == 7
    assert burda.factor(0) == 1.0 and burda.factor(1) == pytest.approx(10 ** (-1 / 7))
    assert burda.factor(3279) == pytest.approx(10 ** (-1)) and burda.factor(13) == pytest.approx(10 ** (-3 / 7))
    with pytest.raises(ValueError, match="base must be an integer >= 2"):
        optim.build_schedule("burda(base=1)", epochs=3)


def test_multistep_is_torchs_multisteplr_stepped_per_epoch():
    spec = "multistep(milestones=[200, 350, 500, 750, 1000], gamma=0.6309573444801932)"
    ours = optim.build_schedule(spec, epochs=1100)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    theirs = torch.optim.lr_scheduler.MultiStepLR(opt, [200, 350, 500, 750, 1000], gamma=10 ** (-1 / 5))
    for epoch in range(1100):
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-4 * ours.factor(epoch), rel=1e-12), epoch
        opt.step()
        theirs.step()
    with pytest.raises(ValueError, match="milestones must be a list of epochs"):
        optim.build_schedule("multistep(milestones=200)", epochs=3)


def test_adam_normgrad_is_adam_on_per_tensor_normalized_gradients():
    """Tomczak & Welling's AdamNormGrad: g / (||g|| + 1e-7) per tensor, then Adam."""
    torch.manual_seed(0)
    start = [torch.randn(3, 2), torch.randn(2)]
    ours = [torch.nn.Parameter(p.clone()) for p in start]
    plain = [torch.nn.Parameter(p.clone()) for p in start]
    opt_ours = optim.build_optimizer("adam_normgrad", ours, lr=0.1)
    opt_plain = torch.optim.Adam(plain, lr=0.1)
    for t in range(4):
        for group, opt in ((ours, opt_ours), (plain, opt_plain)):
            opt.zero_grad()
            sum(((p - t) ** 3).sum() * (i + 1) for i, p in enumerate(group)).backward()
        for p in plain:
            p.grad /= p.grad.norm() + 1e-7
        opt_ours.step()
        opt_plain.step()
    for p, q in zip(ours, plain, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ours[0], start[0])


def test_adam_is_fused_where_torch_has_it_and_foreach_on_request():
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))]
    default = optim.build_optimizer("adam", params, lr=0.1)
    assert default.defaults["fused"] is True and not default.defaults["foreach"]
    forced = optim.build_optimizer("adam(fused=False)", params, lr=0.1)
    assert forced.defaults["foreach"] is True and not forced.defaults["fused"]
    # Complex parameters have no fused kernel: the default falls back to foreach, not an error.
    assert not optim.fused_supported([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))])
    assert not optim.fused_supported([])
    # Fused and foreach Adam take the same steps up to float rounding.
    a = [torch.nn.Parameter(p.detach().clone()) for p in params]
    b = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt_a, opt_b = optim.build_optimizer("adam", a, lr=0.1), optim.build_optimizer("adam(fused=False)", b, lr=0.1)
    for t in range(5):
        for group, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            sum(((p - t) ** 2).sum() for p in group).backward()
            opt.step()
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    assert not torch.equal(a[0], params[0])


def test_lr_follows_the_schedule_in_the_metrics(tmp_path):
    train(tiny("train.epochs=3", "train.lr_schedule=step(step_size=1, gamma=0.5)"), tmp_path / "run", progress=False)
    assert [r["lr"] for r in _metrics(tmp_path / "run")] == [0.01, 0.005, 0.0025]


def test_fit_still_trains():
    torch.manual_seed(0)
    x = (torch.rand(64, 16) < 0.5).float()
    vae = VAE(x_dim=16, z_dim=2, hidden_dims=(8,))
    history = fit(vae, x, test_x=x[:16], epochs=2, batch_size=32, seed=0)
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["train_elbo"] < 0 and h["test_elbo"] < 0 for h in history)


def test_resume_on_cpu_after_a_cuda_graph_run_saved_capturable_groups(tmp_path):
    """A CUDA-graph run turns on ``capturable`` in the optimizer and the checkpoint keeps it; a CPU
    foreach optimizer refuses to step with it, so resuming releases it (step.release_capturable)."""
    run = tmp_path / "run"
    train(tiny("train.epochs=1", "train.optimizer=adamw"), run, progress=False)
    state = ckpt.load_checkpoint(run / "checkpoint.pt")
    for group in state["optimizer"]["param_groups"]:
        group["capturable"] = True  # what step._make_capturable leaves in a CUDA-graph run's checkpoint
    ckpt.save_checkpoint(state, run / "checkpoint.pt")
    model = torch.nn.Linear(3, 2)
    refusing = optim.build_optimizer("adamw", model.parameters(), lr=0.1)
    refusing.load_state_dict(
        {
            **state["optimizer"],
            "state": {},
            "param_groups": [{**state["optimizer"]["param_groups"][0], "params": [0, 1]}],
        }
    )
    model(torch.ones(1, 3)).sum().backward()
    with pytest.raises(AssertionError, match="capturable"):
        refusing.step()  # the failure a resume hit before
    result = train(tiny("train.epochs=2", "train.optimizer=adamw"), run, resume=True, progress=False)
    assert result["status"] == "completed" and result["epoch"] == 2


def test_the_loop_records_its_loss_unless_told_not_to_and_trains_the_same(tmp_path, monkeypatch):
    """``train.record`` reaches the step; recording changes the speed, not one number of the run."""
    steps = []
    real = train_module.TrainStep

    def spy(*args, **kwargs):
        steps.append(real(*args, **kwargs))
        return steps[-1]

    monkeypatch.setattr(train_module, "TrainStep", spy)
    train(tiny("train.epochs=2", "train.warmup_epochs=1"), tmp_path / "recorded", progress=False)
    train(tiny("train.epochs=2", "train.warmup_epochs=1", "train.record=false"), tmp_path / "eager", progress=False)
    recorded, eager = steps
    assert eager.recorded is None
    replays = recorded.recorded.replays
    assert replays and None not in replays.values()  # warm-up (beta an input) and beta = 1: two graphs
    assert {key[3] for key in replays} == {False, True}
    assert _metrics(tmp_path / "recorded") == _metrics(tmp_path / "eager")
    _assert_same_state(
        ckpt.load_checkpoint(tmp_path / "recorded" / "checkpoint.pt"),
        ckpt.load_checkpoint(tmp_path / "eager" / "checkpoint.pt"),
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.structure=two_layer(z2_dim=2, hidden=[4])", "train.estimator=closed_form"], "no closed form"),
        (["model.structure=m2", "train.estimator=dreg(k=2)"], "needs every latent site reparameterized"),
    ],
)
def test_an_estimator_that_does_not_apply_refuses_before_a_checkpoint_is_written(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(tiny(*overrides), tmp_path / "run", device="cpu", progress=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    # Nothing was lost: the same folder takes a run that applies.
    result = train(tiny(overrides[0]), tmp_path / "run", device="cpu", progress=False)
    assert result["status"] == "completed"
