"""One optimization step of the training loop, as fast as a hand-written PyTorch step.

``TrainStep(vae, estimator, optimizer, clip_norm=None)`` is what the loop calls:
``step(x, beta)`` does zero-grad, the estimator's loss, backward, optional gradient clipping and
one optimizer step, and returns the loss as a detached device scalar. It never synchronizes with
the host, so the loop accumulates losses on the device and reads them once per epoch.

The step picks one of three paths on its first call (``TrainStep.path``; see docs/speed.md).
That first call runs with Pyro validation as configured (for ``trace`` and ``meanfield`` it also traces the model
and guide once the way ``Trace_ELBO`` does, which checks them and registers their modules); every
later call runs the same computation with validation off, so a step is bitwise the same whether it
is the first after a resume or not.

``plain``
    ``estimator.loss`` as written, validation as configured, on every call (``fast=False``).
``fast``
    The same objective with the per-step overhead removed: Pyro validation off in the hot path
    (scoped, restored after each step) and, for estimators that declare a ``fast_loss``
    (``trace``, ``meanfield``), a lean evaluation of the same Pyro programs: one messenger sums
    ``scale * mask * log_prob`` over the sample sites of the guide and of the model replayed on
    the guide's draws, with no ``Trace`` objects, no ``.item()`` per site, and no param-store
    walk (``pyro.module`` is skipped once the first call has registered the modules).
    Value and gradient equal those of Pyro's ``Trace_ELBO`` (``TraceMeanField_ELBO``) ``differentiable_loss``.
    From the second call on, whatever loss the path runs (lean or the estimator's own) is recorded
    once per batch shape as a graph of ATen operations and replayed (``record=True``, the
    default; :mod:`pyro_vae.recorded`): the Pyro programs are interpreted once, not every step.
``cuda_graph``
    On CUDA, the whole fast step (loss, backward, clipping, optimizer) captured once per batch
    shape as a CUDA graph and replayed (``torch.cuda.CUDAGraph``): one launch per step instead of
    hundreds. A batch of another shape (the epoch's last, smaller batch) runs the eager fast step.

Anything the step cannot speed up falls back, with a logged message, to the next slower path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch

from pyro_vae.recorded import RecordedLoss
from pyro_vae.traces import lean_loss_supported

log = logging.getLogger(__name__)

# Eager steps before a CUDA graph is captured: they initialize the optimizer's state and let
# the caching allocator and autograd settle (PyTorch's documented warm-up on a side stream).
GRAPH_WARMUP_STEPS = 3


# -- choosing a path ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """The chosen path and, when a faster one was asked for but not taken, why."""

    path: str
    reason: str = ""


def plan_path(
    *,
    device: torch.device,
    fast: bool,
    cuda_graph: bool | str,
    lean_ok: bool,
    lean_reason: str = "",
    optimizer: torch.optim.Optimizer | None = None,
    graphs_available: bool | None = None,
) -> Plan:
    """Pick ``plain``, ``fast`` or ``cuda_graph``; pure logic, testable without a GPU.

    ``cuda_graph`` is ``True`` (asked for: a message when impossible), ``False``, or ``"auto"``
    (taken when possible, quietly skipped otherwise). A graph needs CUDA, the lean loss (no host
    sync inside the step) and an optimizer that can be captured.
    """
    if cuda_graph not in (True, False, "auto"):
        raise ValueError(f"cuda_graph must be True, False or 'auto', got {cuda_graph!r}")
    if not fast:
        return Plan("plain")
    if cuda_graph is False:
        return Plan("fast")
    if graphs_available is None:
        graphs_available = torch.cuda.is_available()
    if device.type != "cuda" or not graphs_available:
        why = f"CUDA graphs need a CUDA device; the model is on {device.type}"
    elif not lean_ok:
        why = f"CUDA graphs need the lean loss: {lean_reason or 'no fast loss for this estimator'}"
    elif optimizer is not None and not _capturable(optimizer):
        why = f"{type(optimizer).__name__} cannot be captured in a CUDA graph"
    else:
        return Plan("cuda_graph")
    return Plan("fast", why if cuda_graph is True else "")


def _capturable(optimizer: torch.optim.Optimizer) -> bool:
    """Optimizers whose ``step`` a CUDA graph can hold: those with a ``capturable`` flag, or no state."""
    return all("capturable" in g for g in optimizer.param_groups) or isinstance(optimizer, torch.optim.SGD)


# -- the step -------------------------------------------------------------------------------------
class TrainStep:
    """``step(x, beta) -> loss`` (detached device scalar) for ``vae`` under ``estimator``.

    Args:
        vae: the model (its device decides where the step runs).
        estimator: an estimator from ``pyro_vae.estimators.get``.
        optimizer: one torch optimizer over ``vae.parameters()``.
        clip_norm: clip the gradients' global 2-norm to this value (``None``: no clipping).
        fast: ``False`` keeps the plain path for every step.
        cuda_graph: ``"auto"`` (capture on CUDA when possible), ``True`` (capture, and log why
            not when impossible), ``False``.
        record: on the fast path, record the loss once per batch shape and replay it
            (``pyro_vae.recorded.RecordedLoss``, exposed as ``self.recorded``); ``False`` runs the
            programs on every step (for programs whose Python state changes between steps).
            Estimators with ``recordable = False``, or without the attribute, are never recorded.

    The first call chooses the path (``self.path``; the reason for a fallback from a faster one
    in ``self.fallback_reason``) and runs its loss with Pyro validation as configured.
    """

    def __init__(
        self,
        vae,
        estimator,
        optimizer: torch.optim.Optimizer,
        clip_norm: float | None = None,
        *,
        fast: bool = True,
        cuda_graph: bool | str = "auto",
        record: bool = True,
    ) -> None:
        if cuda_graph not in (True, False, "auto"):
            raise ValueError(f"cuda_graph must be True, False or 'auto', got {cuda_graph!r}")
        self.vae, self.estimator, self.optimizer, self.clip_norm = vae, estimator, optimizer, clip_norm
        self.fast, self.cuda_graph, self.record = fast, cuda_graph, record
        self.path: str | None = None
        self.fallback_reason = ""
        self.recorded: RecordedLoss | None = None
        self._loss_fn: Callable[..., torch.Tensor] | None = None
        self._graph: _GraphedStep | None = None

    def __call__(self, x: torch.Tensor, beta: float | torch.Tensor = 1.0, **data) -> torch.Tensor:
        """One step on the batch ``x`` (and the extra fields ``data`` its model structure consumes)."""
        if self.path is None:
            # Validation as configured on this first step (and in the lean-loss check), off after;
            # the first step runs the loss eagerly, a recorded loss records from the second on.
            self._choose(x, beta, data)
            return self._eager(self.recorded.loss_fn if self.recorded is not None else self._loss_fn, x, beta, data)
        if self.path == "plain":
            return self._eager(self._loss_fn, x, beta, data)
        if self.path == "cuda_graph" and not data:  # a graph holds x alone; other fields run the fast path
            return self._graph_step(x, beta)
        with pyro.validation_enabled(False):
            return self._eager(self._loss_fn, x, beta, data)

    # -- paths ---------------------------------------------------------------------------------
    def _eager(self, loss_fn, x, beta, data: dict | None = None) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(self.vae, x, beta, **data) if data else loss_fn(self.vae, x, beta)
        loss.backward()
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.vae.parameters(), self.clip_norm, foreach=True)
        self.optimizer.step()
        return loss.detach()

    def _choose(self, x, beta, data: dict) -> None:
        lean = getattr(self.estimator, "fast_loss", None)
        lean_ok, lean_reason = (False, f"no fast loss for estimator {self.estimator!r}")
        if self.fast and lean is not None:
            # The check traces the programs once: keep the random stream as if it had not run.
            devices = [x.device] if x.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                lean_ok, lean_reason = lean_loss_supported(self.vae, x, beta, **data)
        device = x.device
        plan = plan_path(
            device=device,
            fast=self.fast,
            cuda_graph=self.cuda_graph,
            lean_ok=lean_ok,
            lean_reason=lean_reason,
            optimizer=self.optimizer,
        )
        self.path, self.fallback_reason = plan.path, plan.reason
        if plan.reason:
            log.warning("TrainStep: %s; using the %s path", plan.reason, plan.path)
        if self.fast and not lean_ok and lean is not None:
            log.info(
                "TrainStep: lean loss not used (%s); the estimator's own loss runs without validation", lean_reason
            )
        # The estimator's own loss when there is no lean loss (validation off after the first step).
        self._loss_fn = lean if lean_ok else self.estimator.loss
        # Only estimators that declare it (``Estimator.recordable``, true by default): one that does not
        # say may keep Python state that a replay would freeze.
        declared = getattr(self.estimator, "recordable", False)
        if self.fast and self.record and declared:
            self.recorded = self._loss_fn = RecordedLoss(self._loss_fn, self.vae)
        if plan.path == "cuda_graph":
            self._graph = _GraphedStep(self)
        log.debug("TrainStep: %s path", self.path)

    def _graph_step(self, x, beta) -> torch.Tensor:
        try:
            return self._graph(x, beta)
        except CaptureFailedError as failure:  # only the capture: errors of eager or replayed steps propagate
            error = failure.__cause__
            log.warning("TrainStep: CUDA graph capture failed (%s); using the fast path", error)
            self.path, self.fallback_reason, self._graph = "fast", f"capture failed: {error}", None
            with pyro.validation_enabled(False):
                return self._eager(self._loss_fn, x, beta)


class CaptureFailedError(RuntimeError):
    """CUDA graph capture refused the step (an op that syncs, an uncapturable kernel); its cause is the error."""


class _GraphedStep:
    """The fast step of a :class:`TrainStep` captured as one CUDA graph per (shape, dtype, lr).

    Inputs are copied into static buffers (``beta`` too, so a warm-up schedule does not
    re-capture); the graph replays zero-grad-free (its backward writes fresh gradients),
    clipping and the optimizer update in place. A learning-rate change (a schedule) re-captures,
    because the captured kernels hold the old value. A batch of another shape runs eagerly.
    """

    def __init__(self, train_step: TrainStep) -> None:
        self.ts = train_step
        self.key: tuple | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warmup_left = GRAPH_WARMUP_STEPS
        self.warned_shapes: set[tuple] = set()
        _make_capturable(train_step.optimizer)

    def _key(self, x) -> tuple:
        # A tensor learning rate is read from device memory at every replay: no re-capture needed.
        lrs = tuple(None if torch.is_tensor(g["lr"]) else g["lr"] for g in self.ts.optimizer.param_groups)
        return tuple(x.shape), x.dtype, lrs

    def __call__(self, x: torch.Tensor, beta) -> torch.Tensor:
        ts = self.ts
        key = self._key(x)
        if self.graph is not None and key[0] != self.key[0]:
            if key[0] not in self.warned_shapes:  # the epoch's smaller last batch, typically
                self.warned_shapes.add(key[0])
                log.info("TrainStep: batch shape %s differs from the captured %s; eager step", key[0], self.key[0])
            with pyro.validation_enabled(False):
                return ts._eager(ts._loss_fn, x, beta)
        if self.graph is None or key != self.key:
            if self.warmup_left > 0:
                self.warmup_left -= 1
                return self._side_stream_eager(x, beta)
            try:
                self._capture(x, key)
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as error:
                raise CaptureFailedError(str(error)) from error
        self.static_x.copy_(x)
        if torch.is_tensor(beta):
            self.static_beta.copy_(beta)
        else:
            self.static_beta.fill_(beta)
        self.graph.replay()
        return self.static_loss.clone()

    def _side_stream_eager(self, x, beta) -> torch.Tensor:
        stream = torch.cuda.Stream(device=x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream), pyro.validation_enabled(False):
            loss = self.ts._eager(self.ts._loss_fn, x, beta)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        return loss

    def _capture(self, x, key) -> None:
        ts = self.ts
        self.graph, self.key = None, key
        self.static_x = torch.empty_like(x)
        self.static_beta = torch.ones((), dtype=x.dtype, device=x.device)
        if ts.recorded is not None:  # recording checks itself against the eager loss: not inside the capture
            ts.recorded.record(x, self.static_beta)
        ts.optimizer.zero_grad(set_to_none=True)  # backward inside the graph allocates the gradients
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), pyro.validation_enabled(False):
            loss = ts._loss_fn(ts.vae, self.static_x, self.static_beta)
            loss.backward()
            if ts.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(ts.vae.parameters(), ts.clip_norm, foreach=True)
            ts.optimizer.step()
            self.static_loss = loss.detach()
        self.graph = graph
        log.info("TrainStep: captured the step as a CUDA graph for batch shape %s", key[0])


def _make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Turn on ``capturable`` and move scalar step counters to the parameters' device."""
    for group in optimizer.param_groups:
        if "capturable" in group:
            group["capturable"] = True
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if torch.is_tensor(state.get("step")) and state["step"].device != p.device:
                state["step"] = state["step"].to(p.device)


def release_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Undo :func:`_make_capturable`'s flag: ``capturable`` back to the optimizer's own default.

    A checkpoint of a CUDA-graph run carries ``capturable=True`` in its parameter groups, and a
    foreach optimizer on the CPU refuses to step with it; the graph path turns it on again when
    it is taken.
    """
    for group in optimizer.param_groups:
        if "capturable" in group:
            group["capturable"] = optimizer.defaults.get("capturable", False)
