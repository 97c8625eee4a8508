"""The run folder a training run writes, and the lines it reports as it goes (``docs/training.md``).

- ``config.toml`` (the resolved config) at the start; ``train.log``: the :class:`Reporter`'s lines;
- ``metrics.jsonl``: one JSON object per epoch (``epoch, train_elbo, val_elbo, val_bound,
  test_elbo, beta, lr, seconds, steps``);
- ``checkpoint.pt`` after every epoch (and once before the first) and ``best.pt`` at the best
  ``val_bound``, written atomically (``pyro_vae.checkpoint``);
- at the end, ``evaluation.json`` and ``evaluation.npz`` (``pyro_vae.evaluate.evaluate_examples`` on
  the best weights, and its per-example numbers) and the figures (``pyro_vae.plots.write_all_figures``):
  :meth:`RunFolder.finish`.

Under ``torch.distributed`` rank 0 alone writes and prints: the folder and reporter of the other
ranks are built with ``active=False`` and do nothing.

One writer per folder: rank 0 holds ``fcntl.flock`` on ``.lock`` (which holds its PID) from before
anything is written to the end of the run (:meth:`RunFolder.lock`). The kernel drops the lock
when the process ends, however it ends, so a ``kill -9`` leaves no stale lock behind. Windows has
no ``flock``: there the folder is not locked.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pyro_vae import checkpoint as ckpt
from pyro_vae.config import Config, config_from_dict, config_to_dict, save_config
from pyro_vae.evaluate import evaluate_examples
from pyro_vae.protocol import EVALUATION
from pyro_vae.protocol import save as save_evaluation
from pyro_vae.runs import BEST, CHECKPOINT, CONFIG, METRICS, config_differences, read_metrics
from pyro_vae.specs import format_spec, parse_spec
from pyro_vae.train.errors import TrainingError

try:
    import fcntl
except ImportError:  # Windows: no flock, so no lock (docs/training.md); the project runs on Linux
    fcntl = None

LOG = "train.log"
LOCK = ".lock"


class Reporter:
    """A tqdm bar per epoch on a terminal, otherwise one plain line per epoch; ``train.log`` always."""

    def __init__(self, log_dir: Path | None, bar: bool | None, active: bool, epochs: int) -> None:
        self.active, self.epochs = active, epochs
        self.bar = active and (sys.stderr.isatty() if bar is None else bar)
        self.logger = logging.getLogger(f"pyro_vae.train.{id(self)}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self._tqdm = None
        if active and log_dir is not None:
            handler = logging.FileHandler(log_dir / LOG)
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
            self.logger.addHandler(handler)

    def start_epoch(self, epoch: int, steps: int) -> None:
        if self.bar:
            from tqdm.auto import tqdm

            self._tqdm = tqdm(total=steps, desc=f"epoch {epoch}/{self.epochs}", leave=False, unit="step")

    def advance(self) -> None:
        if self._tqdm is not None:
            self._tqdm.update(1)

    def end_epoch(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None

    def line(self, text: str) -> None:
        """A message for the terminal (above the bar) and for ``train.log``."""
        if not self.active:
            return
        if self.bar:
            from tqdm.auto import tqdm

            tqdm.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)
        self.logger.info(text)

    def epoch_line(self, record: dict[str, Any]) -> None:
        """The epoch's numbers in one line: ``epoch   3/20  train -104.90  val -103.80 ...``."""
        self.line(format_record(record, self.epochs))

    def close(self) -> None:
        self.end_epoch()
        for handler in list(self.logger.handlers):
            handler.close()
            self.logger.removeHandler(handler)


# The numbers every epoch record has (pyro_vae.train.epoch.EpochSums.means); others are a structure's.
STANDARD_KEYS = ("train_elbo", "val_elbo", "val_bound", "test_elbo")


def format_record(record: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {record['epoch']:>3}/{epochs}", f"train {record['train_elbo']:.2f}"]
    named = {"val": record["val_elbo"], "val bound": record["val_bound"], "test": record["test_elbo"]}
    if record["val_bound"] == record["val_elbo"]:  # an ELBO estimator: the bound is the ELBO
        del named["val bound"]
    parts += [f"{name} {value:.2f}" for name, value in named.items() if value is not None]
    # A structure's own numbers (M2's val_accuracy, test_accuracy), after the bounds.
    own = [key for key in record if key.startswith(("val_", "test_")) and key not in STANDARD_KEYS]
    parts += [f"{key.replace('_', ' ')} {record[key]:.4g}" for key in own if record[key] is not None]
    if record["beta"] < 1:
        parts.append(f"beta {record['beta']:.3f}")
    parts += [f"lr {record['lr']:.3g}", f"{record['seconds']:.1f}s"]
    return "  ".join(parts)


class RunFolder:
    """The run folder ``path`` as training writes it; with ``active=False`` (ranks but 0) it writes nothing.

    ``checkpoint.pt`` is the commit point of an epoch: on resume, metrics beyond its epoch are
    dropped and the epoch is trained again (bitwise the same), so what was written ahead of it
    (a metrics line, ``best.pt``) is harmless.
    """

    def __init__(self, path: Path, active: bool) -> None:
        self.path, self.active = path, active
        self._lock_fd: int | None = None

    def lock(self, resume: bool) -> str | None:
        """Take the folder's write lock (rank 0); return why it cannot be had, else None.

        It returns rather than raises so that under torchrun rank 0 can broadcast the refusal and
        every rank stops, instead of the others waiting at a barrier. With the lock held nobody
        else writes here, so temporary files of interrupted atomic writes are stale: removed.
        """
        if not self.active or fcntl is None or (resume and not self.path.is_dir()):
            return None  # a resume of no folder fails on its missing checkpoint, with a clearer message
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            return (
                f"{self.path} is being written by another training process (PID {holder}, which holds "
                f"{self.path / LOCK}); wait for it to end or choose another --out"
            )
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        for stale in self.path.glob(".*.tmp"):  # checkpoint.save_checkpoint's .NAME.PID.tmp
            stale.unlink(missing_ok=True)
        return None

    def close(self) -> None:
        """Release the lock (the file stays: removing it would let two writers lock two different files)."""
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def open(self, cfg: Config, resume: bool) -> dict[str, Any] | None:
        """Check the folder and, for a new run, write ``config.toml``; return the checkpoint to resume from.

        Every rank reads the checkpoint. A folder that holds a run is never overwritten, and a
        resumed run must have the checkpoint's model and data. A resume rewrites ``config.toml``
        only once its checkpoint is restored (:meth:`write_config`): a failed resume leaves it as it was.
        """
        state = None
        if resume:
            # a clear error when there is nothing to resume, or a checkpoint that lacks what resuming reads
            state = ckpt.load_checkpoint(self.checkpoint, required=ckpt.RESUME_ENTRIES)
            check_same_model(state["config"], config_to_dict(cfg), self.checkpoint)
        elif self.checkpoint.exists():
            raise TrainingError(
                f"{self.path} already holds a run ({CHECKPOINT}); continue it with --resume or choose another --out"
            )
        if self.active:
            self.path.mkdir(parents=True, exist_ok=True)
        if not resume:
            self.write_config(cfg)
        return state

    def write_config(self, cfg: Config) -> None:
        if self.active:
            save_config(cfg, self.path / CONFIG)

    def reporter(self, bar: bool | None, epochs: int) -> Reporter:
        """The run's reporter, logging to this folder's ``train.log``."""
        return Reporter(self.path, bar, self.active, epochs)

    def truncate_metrics(self, epoch: int) -> None:
        """Drop metric lines of epochs the checkpoint does not hold (written before an interruption)."""
        path = self.path / METRICS
        if not self.active or not path.is_file():
            return
        records = read_metrics(self.path, torn_tail_ok=True)  # a bad line: one error naming the file and line
        kept = [record for record in records if record["epoch"] <= epoch]
        if len(kept) != len(records) or not path.read_text().endswith("\n"):
            path.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        if self.active:
            ckpt.save_checkpoint(state, self.checkpoint)

    def write_epoch(self, record: dict[str, Any], state: dict[str, Any], improved: bool) -> None:
        """Metrics line, then best.pt, then checkpoint.pt: an interruption anywhere leaves a resumable folder."""
        if not self.active:
            return
        with open(self.path / METRICS, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if improved:
            ckpt.save_checkpoint(state, self.path / BEST)
        ckpt.save_checkpoint(state, self.checkpoint)

    def finish(self, cfg: Config, vae, dataset, reporter: Reporter) -> dict[str, Any] | None:
        """``evaluation.json`` and the figures, on the best weights; returns the evaluation (``None``: failed).

        The best weights are ``best.pt`` when the run had a validation set, else the last epoch's.
        Failures are reported with the command that redoes them, never fatal: the checkpoint is safe.
        """
        if not self.active:
            return None
        best = self.path / BEST
        if best.is_file():
            ckpt.load_weights(vae, ckpt.load_checkpoint(best, required=("model",)), "model", best)
        vae.eval()
        evaluation = self._evaluate(vae, dataset, cfg.train.nll_samples, best, reporter)
        if cfg.train.plots:
            self._figures(vae, dataset, reporter)
        return evaluation

    def _evaluate(self, vae, dataset, nll_samples: int, best: Path, reporter: Reporter) -> dict[str, Any] | None:
        evaluation = None
        try:
            evaluation, examples = evaluate_examples(vae, dataset, nll_samples=nll_samples)
            evaluation["weights"] = best.name if best.is_file() else CHECKPOINT
            save_evaluation(self.path, evaluation, examples)
            reporter.line(f"{_summary(evaluation, nll_samples)} -> {self.path / EVALUATION}")
        except Exception as err:
            reporter.line(
                f"evaluation failed ({type(err).__name__}: {err}); redo it with: pyro-vae evaluate --run {self.path}"
            )
        return evaluation

    def _figures(self, vae, dataset, reporter: Reporter) -> None:
        try:
            from pyro_vae.plots import write_all_figures  # matplotlib loads only when figures are drawn

            written = write_all_figures(vae, dataset, read_metrics(self.path), self.path)
            if written:
                reporter.line(f"figures: {', '.join(Path(p).name for p in written)}")
        except Exception as err:
            reporter.line(
                f"figures failed ({type(err).__name__}: {err}); redo them with: pyro-vae plot --run {self.path}"
            )


def _summary(evaluation: dict[str, Any], nll_samples: int) -> str:
    summary = f"test ELBO {evaluation['test_elbo']:.2f}"
    if evaluation["test_nll"] is not None:  # None: skipped (nll_samples = 0); its SE is None for k = 1
        nll, se = evaluation["test_nll"], evaluation["test_nll_se"] or 0
        summary += f", test NLL {nll:.2f} ± {se:.2f} (k={nll_samples})"
    return summary


def check_same_model(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Resuming may change training settings, never the model, the data or the optimizer.

    The optimizer is the checkpoint's because its state is: Adam's moments do not load into SGD,
    and torch would put the saved hyperparameters (``eps``, ``betas``) back over new ones silently.
    """
    for section in ("model", "data"):
        diffs = config_differences(saved, current, sections=(section,))
        if diffs:
            raise TrainingError(f"cannot resume {path} with a different {section}: {', '.join(diffs)}")
    old, new = (config_from_dict(d, source=str(path)).train.optimizer for d in (saved, current))
    if parse_spec(old) != parse_spec(new):
        raise TrainingError(
            f"cannot resume {path} with train.optimizer={format_spec(*parse_spec(new))}: its checkpoint holds "
            f"the state of {format_spec(*parse_spec(old))}, which a resumed run must keep; drop that --set "
            "(train.lr can change), or start a new run with --out elsewhere"
        )
