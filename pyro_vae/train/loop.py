"""Training with SVI as a short sequence of named pieces: prepare a run, train its epochs, finish.

:func:`train` trains the VAE a :class:`~pyro_vae.config.Config` describes and writes a run
folder (``pyro_vae.train.run_folder``, ``docs/training.md``); ``--resume`` continues from
``checkpoint.pt`` exactly. The objective is the estimator's loss (``pyro_vae.estimators``, by
name; ``trace`` is Pyro's ``Trace_ELBO``), minimized by one torch optimizer over
``vae.parameters()`` (``pyro_vae.optim``), one step at a time (``pyro_vae.train.step``); what
an epoch computes and reports, KL warm-up and the bound that selects the best epoch are
``pyro_vae.train.epoch``'s.

The loop talks to one distributed context (``pyro_vae.train.distributed``) and never asks
whether it is distributed: in one process every method of the context is the identity; under
torchrun the same calls shard the batches, all-reduce the gradients and the epoch's sums, and keep
every rank's RNG state in the checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pyro
import torch

from pyro_vae import checkpoint as ckpt
from pyro_vae import estimators
from pyro_vae.config import Config, config_to_dict
from pyro_vae.data import make_generator, resolve_device
from pyro_vae.fields import check_provided, split_fields
from pyro_vae.optim import Schedule, build_optimizer, build_schedule
from pyro_vae.runs import build_vae, load_dataset_for
from pyro_vae.specs import parse_spec
from pyro_vae.train.distributed import SingleProcess, current_context
from pyro_vae.train.epoch import (
    Epoch,
    EpochSums,
    Progress,
    check_finite,
    divergence_problem,
    epoch_record,
    has_validation,
    state_problem,
)
from pyro_vae.train.errors import DivergenceError, RunFolderLockedError
from pyro_vae.train.run_folder import Reporter, RunFolder
from pyro_vae.train.step import TrainStep, release_capturable
from pyro_vae.train.tensorboard import TensorBoardLog, require_tensorboard


@dataclass
class Run:
    """A prepared run: what its epochs need and what its checkpoints hold."""

    cfg: Config
    context: SingleProcess
    folder: RunFolder
    reporter: Reporter
    dataset: Any
    vae: torch.nn.Module
    estimator: Any  # the training estimator (its bound's name for the messages)
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    epoch: Epoch
    progress: Progress
    tensorboard: TensorBoardLog | None = None  # train.tensorboard, on the main process

    @property
    def patience(self) -> int:
        return self.cfg.train.patience or 0  # None: off

    def stopped_early(self) -> bool:
        return bool(self.patience) and self.progress.bad_epochs >= self.patience

    def finished(self) -> bool:
        return self.progress.epoch >= self.cfg.train.epochs or self.stopped_early()

    def close(self) -> None:
        """Close the logs and release the run folder's lock: the end of every run, however it ends."""
        self.reporter.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        self.folder.close()


def train(
    cfg: Config,
    out_dir: str | os.PathLike,
    device: str | torch.device | None = None,
    data_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool | None = None,
    *,
    download: bool = False,
    dataset=None,
    context: SingleProcess | None = None,
) -> dict[str, Any]:
    """Train the VAE that ``cfg`` describes and write the run folder ``out_dir``.

    Args:
        cfg: a :class:`pyro_vae.config.Config`.
        out_dir: the run folder; it must not hold a checkpoint unless ``resume``.
        device: ``"auto"``, ``"cpu"``, ``"cuda:1"``...; ``None`` takes ``cfg.train.device``.
        data_dir: the data root (else ``data.data_dir``, else ``$PYRO_VAE_DATA``, else ``~/.cache/pyro_vae/data``).
        resume: continue from ``out_dir/checkpoint.pt``; ``cfg`` may extend ``train.epochs``,
            but the model must be the one of the checkpoint.
        progress: a tqdm bar (True), plain lines (False), or a bar only when stderr is a terminal (None).
        download: let the dataset loader fetch missing files (as ``data.download = true`` does).
        dataset: an already loaded dataset (else ``cfg.data`` is loaded on ``device``).
        context: the distributed context; default: one process, or the process group already set
            up. ``pyro-vae train`` under torchrun passes its group's: ``train.batch_size`` is then
            the global batch, split over the ranks, and rank 0 alone writes.

    Returns a dict: ``run_dir``, ``status`` (``"completed"``, ``"early_stopped"`` or
    ``"interrupted"``), ``epoch``, ``step``, ``best_epoch``, ``best_val_bound``, ``best_val_elbo``
    (the best epoch's ``val_bound`` and ``val_elbo``), ``metrics`` (the last epoch's record),
    ``evaluation`` (``evaluation.json``'s content, or ``None``).

    Raises :class:`NonFiniteLossError` when a loss is NaN or infinite, and :class:`DivergenceError`
    when an epoch leaves non-finite weights, optimizer state or numbers, or its train ELBO falls more
    than ``train.divergence_nats`` below the best: ``checkpoint.pt`` and ``best.pt`` then still hold
    the last good epochs. :class:`RunFolderLockedError` when another process writes into ``out_dir``.
    """
    context = context if context is not None else current_context()
    options = RunOptions(device, data_dir, resume, progress, download, dataset)
    with torch_threads(cfg.train.threads):
        return _train(cfg, out_dir, context, options)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` (``train.threads``) inside, restored after; None: torch's choice.

    One thread per process is what lets a long background run share a small machine: two processes
    with torch's default (every core each) on two cores ran 10x slower than one.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train(cfg: Config, out_dir, context: SingleProcess, options: RunOptions) -> dict[str, Any]:
    """:func:`train` with its threads set."""
    run = prepare_run(cfg, out_dir, context, options)
    status, record = "completed", {}
    try:
        # Distribution argument checks sync with the host on every step; the data were checked when
        # the model was built, and a NaN is caught at the end of the epoch with its step named.
        with pyro.validation_enabled(False):
            while not run.finished():
                record = train_epoch(run, run.progress.epoch + 1)
        status = "early_stopped" if run.stopped_early() else status
    except KeyboardInterrupt:
        status = "interrupted"
        report_interruption(run)
    except BaseException:
        run.close()
        raise
    return finish(run, status, record)


@dataclass(frozen=True)
class RunOptions:
    """How a run is carried out, as opposed to what it trains (the config): :func:`train`'s arguments."""

    device: str | torch.device | None = None  # None: train.device
    data_dir: str | os.PathLike | None = None  # None: data.data_dir, else $PYRO_VAE_DATA, else the cache
    resume: bool = False
    progress: bool | None = None  # a bar, plain lines, or a bar on a terminal only (None)
    download: bool = False
    dataset: Any = None  # an already loaded dataset, else the config's


def prepare_run(cfg: Config, out_dir: str | os.PathLike, context: SingleProcess, options: RunOptions) -> Run:
    """Check the run folder, build the VAE, estimator, optimizer and step, and restore a checkpoint.

    The order is the reproducible one: the seed before the weights are initialized; the estimator's
    DDP wrapper and each rank's own noise after; a resumed checkpoint's states over all of it.
    """
    # A device that cannot be had fails before the folder is touched.
    device = resolve_device(options.device if options.device is not None else cfg.train.device)
    # Rank 0's folder on every rank: each rank's default name holds its own timestamp.
    folder = RunFolder(Path(context.broadcast(str(out_dir))), active=context.is_main)
    refusal = context.broadcast(folder.lock(options.resume))  # rank 0's answer: every rank stops, none waits
    if refusal is not None:
        raise RunFolderLockedError(refusal)
    try:
        return _prepare(cfg, folder, context, options, device)
    except BaseException:
        folder.close()
        raise


def _dataset(cfg: Config, options: RunOptions, device: torch.device):
    """The dataset the run trains on, on ``device``: the one passed in, else the config's."""
    if options.dataset is not None:
        return options.dataset
    data_dir = options.data_dir if options.data_dir is not None else cfg.data.data_dir
    return load_dataset_for(cfg, device=device, data_dir=data_dir, download=options.download or cfg.data.download)


def _prepare(cfg: Config, folder: RunFolder, context: SingleProcess, options: RunOptions, device) -> Run:
    """:func:`prepare_run` once the folder is locked."""
    tcfg = cfg.train
    if tcfg.tensorboard:
        require_tensorboard()  # before anything is written
    state = folder.open(cfg, options.resume)
    context.barrier()  # every rank has looked at the folder before rank 0 writes a checkpoint into it
    # Seed first: weight initialization and everything after it is reproducible.
    pyro.set_rng_seed(tcfg.seed)
    # train() owns Pyro's global param store: pyro.module must register this VAE's tensors, not stale ones.
    pyro.clear_param_store()
    dataset = _dataset(cfg, options, device)
    vae = _build_vae(cfg, dataset, device, warn=context.is_main)
    estimator = estimators.get(tcfg.estimator)
    check_estimator_applies(estimator, vae, dataset)
    optimizer = build_optimizer(tcfg.optimizer, vae.parameters(), lr=tcfg.lr)
    schedule = build_schedule(tcfg.lr_schedule, epochs=tcfg.epochs)
    epoch = _epoch(cfg, vae, estimator, optimizer, dataset, context, device)
    run_progress = Progress()
    if state is not None:
        run_progress = restore(state, vae, optimizer, epoch.generator, context, tcfg.seed, folder.checkpoint)
        folder.truncate_metrics(run_progress.epoch)
        folder.write_config(cfg)  # only now: the checkpoint fits this config
    reporter = folder.reporter(options.progress, tcfg.epochs)
    run = Run(
        cfg=cfg,
        context=context,
        folder=folder,
        reporter=reporter,
        dataset=dataset,
        vae=vae,
        estimator=estimator,
        optimizer=optimizer,
        schedule=schedule,
        epoch=epoch,
        progress=run_progress,
    )
    if tcfg.tensorboard and context.is_main:
        run.tensorboard = TensorBoardLog(folder.path / "tensorboard", tcfg.batch_size)
    _start(run, resumed=state is not None)
    return run


def _build_vae(cfg: Config, dataset, device: torch.device, warn: bool) -> torch.nn.Module:
    """The config's VAE on ``device``, the training data checked by its structure once, here."""
    vae = build_vae(cfg.model, x_dim=dataset.x_dim, x_shape=dataset.image_shape).to(device)
    check_provided(dataset, vae.consumes, structure=parse_spec(cfg.model.structure)[0])
    vae.check_data(dataset.train[:1024], name=f"{dataset.name} (train)")
    if cfg.train.warmup_epochs == 0 and vae.needs_warmup and warn:
        warnings.warn(f"train.warmup_epochs is 0: {vae.needs_warmup}", UserWarning, stacklevel=4)
    return vae


def check_estimator_applies(estimator, vae, dataset) -> None:
    """Evaluate the estimator's loss once on two training examples, so that an estimator that does not
    apply to the structure (``closed_form`` on two layers, ``dreg`` on an enumerated site) refuses in
    one line before a checkpoint is written; nothing of the run changes.

    The loss runs on a copy of the estimator (``tracegraph`` keeps a running baseline) with the random
    generators forked, so the run draws what it would have drawn without the check.
    """
    x = dataset.train[:2]
    data = {name: value[:2] for name, value in split_fields(dataset, "train", vae.consumes).items()}
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the training step's first call reports what matters
        copy.deepcopy(estimator).loss(vae, x, 1.0, **data)


def _epoch(cfg: Config, vae, estimator, optimizer, dataset, context: SingleProcess, device) -> Epoch:
    """The run's epoch: the training step on the context's batches, the warm-up ramp, the evaluation."""
    tcfg = cfg.train
    # DDP around the estimator's loss, then each rank's own Monte Carlo noise (identities in one process).
    train_estimator = context.wrap(estimator, vae)
    context.seed(tcfg.seed)
    step = TrainStep(vae, train_estimator, optimizer, clip_norm=tcfg.clip_norm, record=tcfg.record)
    steps = context.steps_per_epoch(len(dataset.train), tcfg.batch_size)
    return Epoch(
        vae=vae,
        estimator=estimator,
        step=step,
        batches=context.batches(dataset, tcfg.batch_size, tcfg.seed, vae.consumes),
        generator=make_generator(tcfg.seed, dataset.train.device),
        context=context,
        dataset=dataset,
        device=device,
        steps=steps,
        warmup_steps=tcfg.warmup_epochs * steps,
        warmup_by=tcfg.warmup_by,
        eval_batch_size=tcfg.eval_batch_size,
        optimizer=optimizer,
    )


def restore(
    state: dict[str, Any], vae, optimizer, generator: torch.Generator, context, seed: int, path: Path | str = ""
) -> Progress:
    """Load a checkpoint's weights, optimizer, param store and RNG states; return its counters.

    ``path`` names the checkpoint in the one-line error when its tensors do not fit the model.
    """
    ckpt.load_weights(vae, state, "model", path)
    ckpt.load_weights(optimizer, state, "optimizer", path)
    release_capturable(optimizer)  # a CUDA-graph run saved capturable=True, which a CPU optimizer refuses
    ckpt.restore_param_store(state["param_store"], state["param_constraints"])
    generator.set_state(state["data_generator"].cpu())
    progress = Progress(
        epoch=int(state["epoch"]),
        step=int(state["step"]),
        # Checkpoints written before val_bound existed selected by the ELBO.
        best_val_bound=state.get("best_val_bound", state["best_val_elbo"]),
        best_val_elbo=state["best_val_elbo"],
        best_epoch=int(state["best_epoch"]),
        bad_epochs=int(state["bad_epochs"]),
        best_train_elbo=state.get("best_train_elbo"),  # None in checkpoints written before the divergence guard
    )
    # Each rank its own stream back (or a fresh one when the number of processes changed).
    context.restore_rng_state(state, seed, progress.epoch)
    return progress


def checkpoint_state(run: Run, progress: Progress | None = None) -> dict[str, Any]:
    """What ``checkpoint.pt`` and ``best.pt`` hold: everything :func:`restore` needs to continue exactly.

    ``progress``: the counters to save, when they are not yet the run's (an epoch being committed).
    The keys are those of every checkpoint written so far (``runs.load_run`` reads them too). Every
    rank calls it: under a process group it gathers all ranks' RNG states, a collective.
    """
    progress = run.progress if progress is None else progress
    params, names = ckpt.param_store_state()
    return {
        "model": run.vae.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "param_store": params,
        "param_constraints": names,
        "config": config_to_dict(run.cfg),
        "x_dim": run.dataset.x_dim,
        "image_shape": list(run.dataset.image_shape),
        **asdict(progress),  # epoch, step, best_val_bound, best_val_elbo, best_epoch, bad_epochs
        **run.context.rng_state(),  # rng; and rank_rng, every rank's, under a process group
        "data_generator": run.epoch.generator.get_state(),
    }


def _start(run: Run, resumed: bool) -> None:
    """The first lines of ``train.log`` and, for a new run, the checkpoint of epoch 0."""
    for note in getattr(run.dataset, "notes", ()):  # how the config was applied to this data set
        run.reporter.line(note)
    if run.patience and not has_validation(run.dataset):
        run.reporter.line(
            f"train.patience={run.patience} is ignored: {run.dataset.name} has no validation set (data.val_size)"
        )
    if not resumed:  # a Ctrl-C during the first epoch still leaves a consistent state to resume from
        run.folder.save_checkpoint(checkpoint_state(run))
    parameters = sum(p.numel() for p in run.vae.parameters())
    run.reporter.line(
        f"{'resuming' if resumed else 'training'} {run.folder.path} on {run.epoch.device}: {run.dataset}; "
        f"{parameters} parameters; estimator {run.cfg.train.estimator}, "
        f"best epoch by its validation {run.estimator.bound_name} (val_bound)"
    )


def train_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """Epoch ``epoch``: its steps and evaluation, then its metrics line, its checkpoint and its log line."""
    tcfg, progress = run.cfg.train, run.progress
    start = time.perf_counter()
    lr = run.schedule.apply(run.optimizer, tcfg.lr, epoch - 1)
    evaluated = epoch % tcfg.eval_every == 0 or epoch == tcfg.epochs
    sums, step, beta = run.epoch.run(epoch, progress.step, evaluated, run.reporter)
    check_finite(sums, epoch, progress, run.folder.checkpoint)
    record = epoch_record(epoch, sums, beta=beta, lr=lr, seconds=time.perf_counter() - start, steps=step)
    check_diverged(run, epoch, step, sums, record)
    # The run's counters become the epoch's only once checkpoint.pt holds it: an interruption during
    # the write then reports the epoch the file really holds. A first Ctrl-C waits for the write.
    committed = replace(progress, epoch=epoch, step=step)
    improved = committed.observe(record, warming_up=epoch <= run.cfg.train.warmup_epochs)
    with ckpt.deferred_interrupt():
        run.folder.write_epoch(record, checkpoint_state(run, committed), improved)
        run.progress = committed
    run.reporter.epoch_line(record)
    if run.tensorboard is not None:
        split = "val" if has_validation(run.dataset) else "test"
        rows = getattr(run.dataset, split)
        run.tensorboard.epoch(record, run.vae, run.estimator, rows, split_fields(run.dataset, split, run.vae.consumes))
    return record


def check_diverged(run: Run, epoch: int, step: int, sums: EpochSums, record: dict[str, Any]) -> None:
    """Raise :class:`DivergenceError` when the epoch broke the state or exploded, before it writes anything.

    Nothing of the epoch reaches the folder (no metrics line, no checkpoint), so ``checkpoint.pt``
    and ``best.pt`` stay byte for byte the last good ones; the message says how to go on from them.
    """
    problem = state_problem(sums, record) or divergence_problem(record, run.progress, run.cfg.train.divergence_nats)
    if problem is None:
        return
    if sums.nonfinite_weights:  # the failure path: naming the broken tensors may read them to the host
        problem += f" ({_nonfinite_names(run.vae)})"
    raise DivergenceError(
        f"training diverged at epoch {epoch} (global step {step}): {problem}; {kept_and_resume(run)}",
        epoch=epoch,
        step=step,
    )


def _nonfinite_names(vae: torch.nn.Module, shown: int = 3) -> str:
    names = [name for name, p in vae.named_parameters() if not torch.isfinite(p).all()]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def kept_and_resume(run: Run) -> str:
    """Which epochs ``checkpoint.pt`` and ``best.pt`` still hold, and the command that resumes with a smaller lr."""
    progress, folder = run.progress, run.folder
    kept = f"{folder.checkpoint} (epoch {progress.epoch}) is"
    if progress.best_epoch:  # best.pt exists once an epoch was the best
        kept = f"{folder.checkpoint} (epoch {progress.epoch}) and best.pt (epoch {progress.best_epoch}) are"
    return (
        f"{kept} untouched; resume from there with a smaller lr: "
        f"pyro-vae train --resume --out {folder.path} --set train.lr={run.cfg.train.lr / 10:g}"
    )


def report_interruption(run: Run) -> None:
    """Ctrl-C: say which epoch ``checkpoint.pt`` holds and how to resume."""
    progress = run.progress
    run.reporter.end_epoch()
    run.reporter.line(
        f"interrupted during epoch {progress.epoch + 1}; {run.folder.checkpoint} holds epoch "
        f"{progress.epoch} (step {progress.step}). Resume with: pyro-vae train --resume --out {run.folder.path}"
    )


def finish(run: Run, status: str, record: dict[str, Any]) -> dict[str, Any]:
    """Evaluation and figures on the best weights (unless interrupted), then the run's summary."""
    progress = run.progress
    if status == "early_stopped":
        run.reporter.line(
            f"early stopping: no better validation {run.estimator.bound_name} for {run.patience} epochs; "
            f"best epoch {progress.best_epoch} ({progress.best_val_bound:.2f})"
        )
    evaluation = None
    if status != "interrupted":
        evaluation = run.folder.finish(run.cfg, run.vae, run.dataset, run.reporter)
    run.close()
    return {
        "run_dir": str(run.folder.path),
        "status": status,
        "epoch": progress.epoch,
        "step": progress.step,
        "best_epoch": progress.best_epoch,
        "best_val_bound": progress.best_val_bound,
        "best_val_elbo": progress.best_val_elbo,
        "metrics": record,
        "evaluation": evaluation,
    }
