"""TensorBoard event files for a long run (``train.tensorboard = true``): ``RUN/tensorboard/``.

Per epoch, under the epoch number as the global step:

- ``elbo/train``, ``elbo/val``, ``elbo/test``, ``bound/val`` (the training estimator's bound), ``lr``,
  ``beta``, ``seconds``: the epoch's line of ``metrics.jsonl``;
- ``kl_per_unit/NN``: E_x KL(q(z_j|x) || p(z_j)) of latent unit j on (up to) the first 1000
  validation rows (:func:`pyro_vae.evaluate.kl_per_dimension`; pairs that do not factorize, such as
  the VampPrior, have no per-unit split and log none), and ``kl/active_units``, the units above
  0.01 nats;
- ``grad_norm/NAME``: the L2 norm of the gradient of the training loss (beta = 1) on the first
  training batch of the validation rows, for each top-level module of the VAE (``encoder``,
  ``decoder``, ``prior``...) and ``grad_norm/total``. It is one extra backward per epoch, run under
  a forked RNG and with the gradients cleared after, so that a run with TensorBoard trains exactly
  as one without.

torch's own ``SummaryWriter`` writes the files; it needs the ``tensorboard`` package
(``pip install "pyro-vae[tensorboard]"``), asked for only when a run turns the option on.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from pyro_vae.evaluate import kl_per_dimension
from pyro_vae.train.errors import TrainingError

KL_ROWS = 1000  # validation rows for the KL per unit
ACTIVE_NATS = 0.01  # a unit carrying more KL than this is counted active
SCALARS = {
    "train_elbo": "elbo/train",
    "val_elbo": "elbo/val",
    "test_elbo": "elbo/test",
    "val_bound": "bound/val",
    "lr": "lr",
    "beta": "beta",
    "seconds": "seconds",
}


class TensorBoardMissingError(TrainingError):
    """``train.tensorboard = true`` without the ``tensorboard`` package."""


def require_tensorboard() -> type:
    """torch's ``SummaryWriter`` class, or a one-line error naming the package to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch imports tensorboard lazily, here
        raise TensorBoardMissingError(
            f"train.tensorboard = true needs the tensorboard package ({err}); "
            'install it with: pip install "pyro-vae[tensorboard]"'
        ) from None
    return SummaryWriter


class TensorBoardLog:
    """One run's event files; :meth:`epoch` after each epoch, :meth:`close` at the end."""

    def __init__(self, log_dir: Path, batch_size: int) -> None:
        self.writer = require_tensorboard()(log_dir=str(log_dir))
        self.batch_size = batch_size
        self.kl_error: str | None = None

    def epoch(self, record: dict[str, Any], vae: torch.nn.Module, estimator, rows: torch.Tensor, data: dict) -> None:
        """Write epoch ``record['epoch']``: its numbers, the KL per unit on ``rows`` and the gradient norms of
        ``estimator``'s loss on their first batch."""
        step = int(record["epoch"])
        for key, tag in SCALARS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], step)
        self._kl_per_unit(vae, rows[:KL_ROWS], {k: v[:KL_ROWS] for k, v in data.items()}, step)
        for name, norm in gradient_norms(vae, estimator, rows[: self.batch_size], data, self.batch_size).items():
            self.writer.add_scalar(f"grad_norm/{name}", norm, step)
        self.writer.flush()

    def _kl_per_unit(self, vae, rows: torch.Tensor, data: dict, step: int) -> None:
        if self.kl_error is not None:
            return
        try:
            with torch.random.fork_rng(devices=_cuda_devices(rows)):
                kl = kl_per_dimension(vae, rows, **data).tolist()
        except ValueError as err:  # no per-unit split for this prior and guide: said once, in the log
            self.kl_error = str(err)
            self.writer.add_text("kl_per_unit", f"not logged: {err}", step)
            return
        for unit, value in enumerate(kl):
            self.writer.add_scalar(f"kl_per_unit/{unit:02d}", value, step)
        self.writer.add_scalar("kl/active_units", sum(v > ACTIVE_NATS for v in kl), step)

    def close(self) -> None:
        self.writer.close()


def gradient_norms(vae: torch.nn.Module, estimator, x: torch.Tensor, data: dict, rows: int) -> dict[str, float]:
    """L2 norms of the gradient of ``estimator``'s loss (beta = 1) on ``x``, per top-level module and in total.

    Run under a forked RNG and with every ``.grad`` cleared after: training draws the same numbers
    and starts its next step from the same state as without this call.
    """
    data = {k: v[:rows] for k, v in data.items()}
    with torch.random.fork_rng(devices=_cuda_devices(x)), _gradients_cleared(vae):
        estimator.loss(vae, x, 1.0, **data).backward()
        norms = {
            name: _norm([p.grad for p in module.parameters() if p.grad is not None])
            for name, module in vae.named_children()
        }
        norms = {name: norm for name, norm in norms.items() if norm is not None}
        norms["total"] = _norm([p.grad for p in vae.parameters() if p.grad is not None]) or 0.0
    return norms


@contextlib.contextmanager
def _gradients_cleared(vae: torch.nn.Module):
    saved = {p: p.grad for p in vae.parameters()}
    for p in saved:
        p.grad = None
    try:
        yield
    finally:
        for p, grad in saved.items():
            p.grad = grad


def _norm(grads: list[torch.Tensor]) -> float | None:
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def _cuda_devices(t: torch.Tensor) -> list[int]:
    return [t.device.index or 0] if t.device.type == "cuda" else []
