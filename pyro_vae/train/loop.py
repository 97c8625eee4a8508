"""Training with SVI: the run folder, checkpoints, metrics, warm-up, early stopping.

:func:`train` trains the VAE a :class:`~pyro_vae.config.Config` describes and writes a run
folder (see ``docs/training.md``):

- ``config.toml`` (the resolved config), ``train.log`` (one line per epoch), ``metrics.jsonl``
  (one JSON object per epoch: ``epoch, train_elbo, val_elbo, val_bound, test_elbo, beta, lr, seconds, steps``);
- ``checkpoint.pt`` after every epoch and ``best.pt`` at the best ``val_bound``, written
  atomically (``pyro_vae.checkpoint``); ``--resume`` continues from ``checkpoint.pt`` exactly;
- at the end, ``evaluation.json`` (``pyro_vae.evaluate.evaluate`` on the best weights) and the
  figures (``pyro_vae.plots.write_all_figures``).

The objective is the estimator's loss (``pyro_vae.estimators``, by name; ``trace`` is Pyro's
``Trace_ELBO``), minimized by one torch optimizer over ``vae.parameters()`` (``pyro_vae.optim``).
KL warm-up (Bowman et al. 2016; Sønderby et al. 2016) multiplies the latent site's log-densities
by beta via ``poutine.scale``, so the training bound is E_q[log p(x|z)] - beta KL(q || p); beta rises
linearly per step to 1 over ``train.warmup_epochs``. Validation, test and final evaluation always
use beta = 1.

Model selection (``best.pt``) and early stopping follow ``val_bound``: the training estimator's
own bound (``estimator.bound``) averaged over the validation set. For the ELBO estimators it is
the validation ELBO; for ``iwae(k)``, ``dreg(k)``, ``renyi`` it is their k-sample bound, which
can improve (with the NLL) while the ELBO falls, as the guide stops fitting the ELBO.

A step makes no host sync: losses are summed on the device, and the index of the first step whose
loss is not finite is kept in a device tensor (``torch.where``); both are read once per epoch,
together with the validation bounds and the test ELBO.

``fit`` is the minimal loop of the core: Pyro's ``SVI`` with ``Trace_ELBO`` over mini-batches of an
in-memory tensor, returning the ELBO per example for each epoch.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import pyro.optim
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_vae import checkpoint as ckpt
from pyro_vae import estimators
from pyro_vae.config import Config, config_to_dict, save_config
from pyro_vae.data import batches, make_generator, resolve_device
from pyro_vae.evaluate import elbo_per_example, evaluate
from pyro_vae.optim import build_optimizer, build_schedule
from pyro_vae.runs import BEST, CHECKPOINT, CONFIG, METRICS, build_vae, load_dataset_for, read_metrics
from pyro_vae.train import distributed
from pyro_vae.train.step import TrainStep, release_capturable

__all__ = ["NonFiniteLossError", "TrainingError", "fit", "train", "warmup_beta"]

LOG = "train.log"
EVALUATION = "evaluation.json"

# The entries of the device vector read once per epoch (and all-reduced under torch.distributed).
EPOCH_SUMS = ("loss_sum", "first_bad_step", "val_elbo_sum", "val_bound_sum", "test_elbo_sum")

# (epoch, generator) -> the epoch's training batches, device tensors (batch, x_dim).
BatchSource = Callable[[int, torch.Generator], Iterable[torch.Tensor]]


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a run folder in the wrong state)."""


class NonFiniteLossError(TrainingError):
    """A step's loss was NaN or infinite; the message names the epoch and step."""

    def __init__(self, message: str, epoch: int, step: int) -> None:
        super().__init__(message)
        self.epoch, self.step = epoch, step


def warmup_beta(step: int, warmup_steps: int) -> float:
    """KL weight of step ``step`` (0-based): ``min(1, (step + 1) / warmup_steps)``; 1 without warm-up.

    It starts at ``1 / warmup_steps`` rather than 0 because ``poutine.scale`` needs a positive
    scale; it reaches 1 at the last step of the warm-up and stays there.
    """
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


@dataclass
class Progress:
    """Counters that a checkpoint carries: completed epochs and steps, early-stopping state.

    The best epoch is the one with the highest ``val_bound``; ``best_val_elbo`` is its ``val_elbo``.
    """

    epoch: int = 0
    step: int = 0
    best_val_bound: float | None = None
    best_val_elbo: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0


class _Reporter:
    """A tqdm bar per epoch on a terminal, otherwise one plain line per epoch; ``train.log`` always."""

    def __init__(self, out_dir: Path | None, bar: bool | None, is_main: bool) -> None:
        self.is_main = is_main
        self.bar = is_main and (sys.stderr.isatty() if bar is None else bar)
        self.logger = logging.getLogger(f"pyro_vae.train.{id(self)}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self._tqdm = None
        if is_main and out_dir is not None:
            handler = logging.FileHandler(out_dir / LOG)
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
            self.logger.addHandler(handler)

    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None:
        if self.bar:
            from tqdm.auto import tqdm

            self._tqdm = tqdm(total=steps, initial=done, desc=f"epoch {epoch}/{epochs}", leave=False, unit="step")

    def advance(self) -> None:
        if self._tqdm is not None:
            self._tqdm.update(1)

    def end_epoch(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None

    def line(self, text: str) -> None:
        """A message for the terminal (above the bar) and for ``train.log``."""
        if not self.is_main:
            return
        if self.bar:
            from tqdm.auto import tqdm

            tqdm.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)
        self.logger.info(text)

    def close(self) -> None:
        self.end_epoch()
        for handler in list(self.logger.handlers):
            handler.close()
            self.logger.removeHandler(handler)


def _sum_elbo(vae, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Sum over ``x`` of the one-sample ELBO at beta = 1, as a device scalar (no host read)."""
    return elbo_per_example(vae, x, batch_size=batch_size).sum()


def _sum_bound(estimator: estimators.Estimator, vae, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Sum over ``x`` of the training estimator's own bound (``estimator.bound``, beta = 1), a device scalar."""
    # k draws per example: k times fewer examples per chunk keep the memory of the one-draw ELBO's.
    chunk = max(1, batch_size // estimator.particles)
    with torch.no_grad():
        return sum((estimator.bound(vae, xb).sum() for xb in x.split(chunk)), x.new_zeros(()))


def _default_batches(dataset, batch_size: int) -> BatchSource:
    return lambda epoch, generator: batches(dataset.train_epoch(epoch, generator), batch_size, generator)


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
    batch_source: BatchSource | None = None,
    is_main: bool = True,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    steps_per_epoch: int | None = None,
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
        batch_source: ``(epoch, generator) -> batches`` replacing the default device-side
            permutation (e.g. a rank's shard under torch.distributed).
        is_main: whether this process writes files and prints (rank 0).
        reduce_sum: applied to the epoch's device vector before the host read (an all-reduce);
            its entries are ``EPOCH_SUMS``: summed losses, the first non-finite step (-1: none;
            reduce it with a minimum over the non-negative entries), the validation ELBO and bound
            sums and the test ELBO sum.
        steps_per_epoch: steps that ``batch_source`` yields per epoch (for the warm-up ramp and
            the progress bar); default ``ceil(len(train) / batch_size)``.

    Under ``torchrun`` (``docs/distributed.md``) it sets up the process group itself and trains
    data-parallel: ``train.batch_size`` is the global batch, split over the ranks; rank 0 alone writes.

    Returns a dict: ``run_dir``, ``status`` (``"completed"``, ``"early_stopped"`` or
    ``"interrupted"``), ``epoch``, ``step``, ``best_epoch``, ``best_val_bound``, ``best_val_elbo``
    (the best epoch's ``val_bound`` and ``val_elbo``), ``metrics`` (the
    last epoch's record), ``evaluation`` (``evaluation.json``'s content, or ``None``).

    Raises :class:`NonFiniteLossError` when a loss is NaN or infinite: ``checkpoint.pt`` then
    still holds the last good epoch.
    """
    if distributed.launched_by_torchrun() and not torch.distributed.is_initialized():
        # One process per device under torchrun: NCCL on cuda:LOCAL_RANK or gloo on the CPU, for this run.
        with distributed.session(device if device is not None else cfg.train.device) as dctx:
            return train(
                cfg,
                out_dir,
                dctx.device,
                data_dir,
                resume,
                progress,
                download=download,
                dataset=dataset,
                batch_source=batch_source,
                is_main=is_main,
                reduce_sum=reduce_sum,
                steps_per_epoch=steps_per_epoch,
            )
    dctx = distributed.current_context()
    if dctx.enabled:
        is_main = is_main and dctx.is_main
        out_dir = distributed.broadcast_object(str(out_dir))  # rank 0's folder (a default name has a timestamp)
        bad_entry = EPOCH_SUMS.index("first_bad_step")  # a step index: the earliest over ranks, not the sum
        reduce_sum = reduce_sum or (lambda sums: distributed.reduce_sums(sums, earliest=(bad_entry,)))
    out_dir = Path(out_dir)
    tcfg = cfg.train
    device = resolve_device(device if device is not None else tcfg.device)
    checkpoint_path = out_dir / CHECKPOINT
    state = None
    if resume:
        state = ckpt.load_checkpoint(checkpoint_path)  # a clear error when there is nothing to resume
        _check_same_model(state["config"], config_to_dict(cfg), checkpoint_path)
    elif checkpoint_path.exists():
        raise TrainingError(
            f"{out_dir} already holds a run ({CHECKPOINT}); continue it with --resume or choose another --out"
        )
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / CONFIG)
    distributed.barrier()  # every rank has looked at the folder before rank 0 writes a checkpoint into it

    # Seed first: weight initialization and everything after it is reproducible.
    pyro.set_rng_seed(tcfg.seed)
    # train() owns Pyro's global param store: pyro.module must register this VAE's tensors, not stale ones.
    pyro.clear_param_store()
    if dataset is None:
        data_dir = data_dir if data_dir is not None else cfg.data.data_dir
        dataset = load_dataset_for(cfg, device=device, data_dir=data_dir, download=download or cfg.data.download)
    vae = build_vae(cfg.model, x_dim=dataset.x_dim).to(device)
    vae.likelihood.check(dataset.train[:1024], name=f"{dataset.name} (train)")
    if tcfg.warmup_epochs == 0 and getattr(vae.prior, "needs_warmup", "") and is_main:
        warnings.warn(f"train.warmup_epochs is 0: {vae.prior.needs_warmup}", UserWarning, stacklevel=2)
    estimator = estimators.get(tcfg.estimator)
    # The validation ELBO already is the bound of the ELBO estimators: no second pass for them.
    bound_is_elbo = estimator.bound_is_elbo
    optimizer = build_optimizer(tcfg.optimizer, vae.parameters(), lr=tcfg.lr)
    schedule = build_schedule(tcfg.lr_schedule, epochs=tcfg.epochs)
    # Distributed: DDP around the estimator's loss, and each rank's own Monte Carlo noise from here on.
    train_estimator = dctx.wrap(estimator, vae)
    dctx.seed(tcfg.seed)
    step_fn = TrainStep(vae, train_estimator, optimizer, clip_norm=tcfg.clip_norm, record=tcfg.record)
    generator = make_generator(tcfg.seed, dataset.train.device)
    if dctx.enabled and batch_source is None:  # each rank its disjoint shard of one (seed, epoch) permutation
        batch_source = distributed.sharded_batch_source(dataset, tcfg.batch_size, tcfg.seed, dctx)
    batch_source = batch_source or _default_batches(dataset, tcfg.batch_size)
    steps_per_epoch = steps_per_epoch or distributed.num_steps(len(dataset.train), tcfg.batch_size, dctx.world_size)
    warmup_steps = tcfg.warmup_epochs * steps_per_epoch
    patience = tcfg.patience or 0  # None: off
    has_val = dataset.val is not None and len(dataset.val) > 0

    progress_state = Progress()
    if state is not None:
        progress_state = _restore(state, vae, optimizer, generator)
        if dctx.enabled:  # each rank its own stream back (or a fresh one when the world size changed)
            distributed.restore_rank_rng(state.get("rank_rng"), tcfg.seed, progress_state.epoch, dctx)
        if is_main:
            _truncate_metrics(out_dir / METRICS, progress_state.epoch)
    reporter = _Reporter(out_dir if is_main else None, progress, is_main)
    if patience and not has_val:
        reporter.line(f"train.patience={patience} is ignored: {dataset.name} has no validation set (data.val_size)")

    def snapshot() -> dict[str, Any]:
        params, names = ckpt.param_store_state()
        return {
            "model": vae.state_dict(),
            "optimizer": optimizer.state_dict(),
            "param_store": params,
            "param_constraints": names,
            "config": config_to_dict(cfg),
            "x_dim": dataset.x_dim,
            "image_shape": list(dataset.image_shape),
            "epoch": progress_state.epoch,
            "step": progress_state.step,
            "best_val_bound": progress_state.best_val_bound,
            "best_val_elbo": progress_state.best_val_elbo,
            "best_epoch": progress_state.best_epoch,
            "bad_epochs": progress_state.bad_epochs,
            "rng": ckpt.rng_state(),
            **({"rank_rng": rank_rng} if dctx.enabled else {}),
            "data_generator": generator.get_state(),
        }

    rank_rng = distributed.gather_rng_states() if dctx.enabled else None
    if state is None and is_main:
        # Epoch 0: a Ctrl-C during the first epoch still leaves a consistent state to resume from.
        ckpt.save_checkpoint(snapshot(), checkpoint_path)
    reporter.line(
        f"{'resuming' if state else 'training'} {out_dir} on {device}: {dataset}; "
        f"{sum(p.numel() for p in vae.parameters())} parameters; estimator {tcfg.estimator}, "
        f"best epoch by its validation {estimator.bound_name} (val_bound)"
    )

    status = "completed"
    record: dict[str, Any] = {}
    try:
        # Distribution argument checks sync with the host on every step; the data were checked above,
        # and a NaN is caught at the end of the epoch with its step named.
        with pyro.validation_enabled(False):
            while progress_state.epoch < tcfg.epochs and not (patience and progress_state.bad_epochs >= patience):
                epoch = progress_state.epoch + 1
                start = time.perf_counter()
                lr = schedule.apply(optimizer, tcfg.lr, epoch - 1)
                vae.train()
                reporter.start_epoch(epoch, tcfg.epochs, steps_per_epoch)
                losses: list[torch.Tensor] = []  # device scalars: the step itself adds no kernel to sum them
                seen, step, beta = 0, progress_state.step, 1.0
                for x in batch_source(epoch, generator):
                    beta = warmup_beta(step, warmup_steps)
                    losses.append(step_fn(x, beta))
                    seen += x.shape[0]
                    step += 1
                    reporter.advance()
                reporter.end_epoch()
                loss_sum, first_bad = _epoch_losses(losses, progress_state.step, device)
                evaluated = epoch % tcfg.eval_every == 0 or epoch == tcfg.epochs
                zero = loss_sum.new_zeros((), dtype=torch.float64)
                sums = [loss_sum.double(), first_bad.double(), zero, zero, zero]
                if evaluated:  # at beta = 1, whatever the warm-up
                    vae.eval()
                    # shard_rows: this rank's block (all of it in one process); reduce_sum adds the blocks
                    if has_val:
                        val = distributed.shard_rows(dataset.val)
                        sums[2] = _sum_elbo(vae, val, tcfg.eval_batch_size).double()
                        sums[3] = (
                            sums[2] if bound_is_elbo else _sum_bound(estimator, vae, val, tcfg.eval_batch_size).double()
                        )
                    sums[4] = _sum_elbo(vae, distributed.shard_rows(dataset.test), tcfg.eval_batch_size).double()
                host = torch.stack(sums)
                if reduce_sum is not None:
                    host = reduce_sum(host)
                loss_total, bad, val_sum, val_bound_sum, test_sum = host.tolist()  # the epoch's one host read
                if bad >= 0:
                    bad = int(bad)
                    raise NonFiniteLossError(
                        f"non-finite loss at epoch {epoch}, step {bad - progress_state.step + 1} of the epoch "
                        f"(global step {bad + 1}); {checkpoint_path} still holds epoch {progress_state.epoch}. "
                        "Try a lower train.lr, train.clip_norm, or a longer train.warmup_epochs.",
                        epoch=epoch,
                        step=bad + 1,
                    )
                progress_state.epoch, progress_state.step = epoch, step
                record = {
                    "epoch": epoch,
                    "train_elbo": -loss_total / (seen * dctx.world_size),  # every rank sees as many
                    "val_elbo": val_sum / len(dataset.val) if evaluated and has_val else None,
                    "val_bound": val_bound_sum / len(dataset.val) if evaluated and has_val else None,
                    "test_elbo": test_sum / len(dataset.test) if evaluated else None,
                    "beta": beta,
                    "lr": lr,
                    "seconds": time.perf_counter() - start,
                    "steps": step,
                }
                improved = _update_early_stopping(progress_state, record, has_val)
                rank_rng = distributed.gather_rng_states() if dctx.enabled else None
                if is_main:
                    _write_epoch(out_dir, record, snapshot(), improved)
                reporter.line(_format_record(record, tcfg.epochs))
            if patience and progress_state.bad_epochs >= patience:
                status = "early_stopped"
    except KeyboardInterrupt:
        reporter.end_epoch()
        status = "interrupted"
        reporter.line(
            f"interrupted during epoch {progress_state.epoch + 1}; {checkpoint_path} holds epoch "
            f"{progress_state.epoch} (step {progress_state.step}). Resume with: "
            f"pyro-vae train --resume --out {out_dir}"
        )
    except BaseException:
        reporter.close()
        raise

    if status == "early_stopped":
        reporter.line(
            f"early stopping: no better validation {estimator.bound_name} for {patience} epochs; "
            f"best epoch {progress_state.best_epoch} ({progress_state.best_val_bound:.2f})"
        )
    evaluation = None
    if status != "interrupted" and is_main:
        evaluation = _finish(cfg, vae, dataset, out_dir, reporter)
    reporter.close()
    return {
        "run_dir": str(out_dir),
        "status": status,
        "epoch": progress_state.epoch,
        "step": progress_state.step,
        "best_epoch": progress_state.best_epoch,
        "best_val_bound": progress_state.best_val_bound,
        "best_val_elbo": progress_state.best_val_elbo,
        "metrics": record,
        "evaluation": evaluation,
    }


def _epoch_losses(losses: list[torch.Tensor], first_step: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the epoch's losses, global index of its first non-finite loss or -1), on the device, no host sync."""
    if not losses:
        return torch.zeros((), device=device), torch.full((), -1, dtype=torch.int64, device=device)
    stacked = torch.stack(losses)
    bad = ~torch.isfinite(stacked)
    first_bad = torch.where(bad.any(), bad.int().argmax() + first_step, -1)
    return stacked.sum(), first_bad


def _restore(state: dict[str, Any], vae, optimizer, generator: torch.Generator) -> Progress:
    """Load a checkpoint's weights, optimizer, param store and RNG states; return its counters."""
    vae.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    release_capturable(optimizer)  # a CUDA-graph run saved capturable=True, which a CPU optimizer refuses
    ckpt.restore_param_store(state["param_store"], state["param_constraints"])
    ckpt.set_rng_state(state["rng"])
    generator.set_state(state["data_generator"].cpu())
    return Progress(
        epoch=int(state["epoch"]),
        step=int(state["step"]),
        # Checkpoints written before val_bound existed selected by the ELBO.
        best_val_bound=state.get("best_val_bound", state["best_val_elbo"]),
        best_val_elbo=state["best_val_elbo"],
        best_epoch=int(state["best_epoch"]),
        bad_epochs=int(state["bad_epochs"]),
    )


def _check_same_model(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Resuming may change training settings, never the model or the data."""
    where_not_what = {"data_dir", "download"}  # where the files are, not which data
    for section in ("model", "data"):
        old, new = saved.get(section, {}), current.get(section, {})
        changed = sorted(k for k in (set(old) | set(new)) - where_not_what if old.get(k) != new.get(k))
        if changed:
            diffs = ", ".join(f"{section}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
            raise TrainingError(f"cannot resume {path} with a different {section}: {diffs}")


def _update_early_stopping(progress: Progress, record: dict[str, Any], has_val: bool) -> bool:
    """Track the best ``val_bound`` (the training estimator's bound); True when this epoch is the new best.

    Epochs without an evaluation (``train.eval_every``) do not count; without a validation set
    there is no best epoch and ``best.pt`` is not written.
    """
    val = record["val_bound"]
    if not has_val or val is None:
        return False
    if progress.best_val_bound is None or val > progress.best_val_bound:
        progress.best_val_bound, progress.best_val_elbo = val, record["val_elbo"]
        progress.best_epoch, progress.bad_epochs = record["epoch"], 0
        return True
    progress.bad_epochs += 1
    return False


def _write_epoch(out_dir: Path, record: dict[str, Any], state: dict[str, Any], improved: bool) -> None:
    """Metrics line, then best.pt, then checkpoint.pt: an interruption anywhere leaves a resumable folder.

    ``checkpoint.pt`` is the commit point; on resume, metrics beyond its epoch are dropped and the
    epoch is trained again (bitwise the same), so best.pt written ahead of it is harmless.
    """
    with open(out_dir / METRICS, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    if improved:
        ckpt.save_checkpoint(state, out_dir / BEST)
    ckpt.save_checkpoint(state, out_dir / CHECKPOINT)


def _truncate_metrics(path: Path, epoch: int) -> None:
    """Drop metric lines of epochs the checkpoint does not hold (written before an interruption)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["epoch"] <= epoch]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept))


def _format_record(record: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {record['epoch']:>3}/{epochs}", f"train {record['train_elbo']:.2f}"]
    named = {"val": record["val_elbo"], "val bound": record["val_bound"], "test": record["test_elbo"]}
    if record["val_bound"] == record["val_elbo"]:  # an ELBO estimator: the bound is the ELBO
        del named["val bound"]
    parts += [f"{name} {value:.2f}" for name, value in named.items() if value is not None]
    if record["beta"] < 1:
        parts.append(f"beta {record['beta']:.3f}")
    parts += [f"lr {record['lr']:.3g}", f"{record['seconds']:.1f}s"]
    return "  ".join(parts)


def _finish(cfg: Config, vae, dataset, out_dir: Path, reporter: _Reporter) -> dict[str, Any] | None:
    """Evaluation and figures on the best weights; failures are reported, never fatal to the run."""
    best = out_dir / BEST
    if best.is_file():
        vae.load_state_dict(ckpt.load_checkpoint(best)["model"])
    vae.eval()
    evaluation = None
    nll_samples = cfg.train.nll_samples
    try:
        evaluation = evaluate(vae, dataset, nll_samples=nll_samples)
        evaluation["weights"] = best.name if best.is_file() else CHECKPOINT
        (out_dir / EVALUATION).write_text(json.dumps(evaluation, indent=2) + "\n")
        summary = f"test ELBO {evaluation['test_elbo']:.2f}"
        if evaluation["test_nll"] is not None:  # None: skipped (nll_samples = 0); its SE is None for k = 1
            summary += (
                f", test NLL {evaluation['test_nll']:.2f} ± {evaluation['test_nll_se'] or 0:.2f} (k={nll_samples})"
            )
        reporter.line(f"{summary} -> {out_dir / EVALUATION}")
    except Exception as err:  # the checkpoint is already safe; say what failed and how to redo it
        reporter.line(
            f"evaluation failed ({type(err).__name__}: {err}); redo it with: pyro-vae evaluate --run {out_dir}"
        )
    if not cfg.train.plots:
        return evaluation
    try:
        from pyro_vae.plots import write_all_figures  # matplotlib loads only when figures are drawn

        written = write_all_figures(vae, dataset, read_metrics(out_dir), out_dir)
        if written:
            reporter.line(f"figures: {', '.join(Path(p).name for p in written)}")
    except Exception as err:
        reporter.line(f"figures failed ({type(err).__name__}: {err}); redo them with: pyro-vae plot --run {out_dir}")
    return evaluation


def fit(
    vae,
    train_x: torch.Tensor,
    test_x: torch.Tensor | None = None,
    epochs: int = 1,
    batch_size: int = 256,
    lr: float = 1e-3,
    max_steps: int | None = None,
    seed: int | None = None,
) -> list[dict[str, float]]:
    """Train ``vae`` with ``SVI(vae.model, vae.guide, Adam(lr), Trace_ELBO())``.

    Returns one dict per epoch: ``epoch``, ``train_elbo`` (mean over the epoch's batches, nats
    per example) and, when ``test_x`` is given, ``test_elbo`` (a one-sample Trace_ELBO estimate
    over the whole test set). ``max_steps`` stops early (for quick runs).
    """
    if seed is not None:
        pyro.set_rng_seed(seed)
    device = next(vae.parameters()).device
    train_x = train_x.to(device).reshape(train_x.shape[0], -1)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": lr}), loss=Trace_ELBO())
    history, step = [], 0
    for epoch in range(1, epochs + 1):
        total, seen = 0.0, 0  # svi.step returns a host float already
        for batch in torch.randperm(len(train_x), device=device).split(batch_size):
            total += svi.step(train_x[batch])
            seen += len(batch)
            step += 1
            if max_steps is not None and step >= max_steps:
                break
        record = {"epoch": epoch, "train_elbo": -total / seen}
        if test_x is not None:
            record["test_elbo"] = evaluate_elbo(vae, test_x, batch_size=1000)
        history.append(record)
        if max_steps is not None and step >= max_steps:
            break
    return history


@torch.no_grad()
def evaluate_elbo(vae, x: torch.Tensor, batch_size: int = 1000) -> float:
    """One-sample ``Trace_ELBO`` estimate of the mean ELBO per example over ``x`` (nats)."""
    device = next(vae.parameters()).device
    x = x.to(device).reshape(x.shape[0], -1)
    elbo = Trace_ELBO()
    total = sum(elbo.loss(vae.model, vae.guide, chunk) for chunk in x.split(batch_size))
    return -total / len(x)
