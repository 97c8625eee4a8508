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
    (scoped, restored after each step) and, for estimators with an entry in :data:`FAST_LOSSES`
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
import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.enum import get_importance_trace
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import nn
from torch.distributions import constraints, kl_divergence

from pyro_vae import estimators as _estimators
from pyro_vae.model import module_registration
from pyro_vae.priors import LOG_SQRT_2PI
from pyro_vae.recorded import RecordedLoss

log = logging.getLogger(__name__)

# Eager steps before a CUDA graph is captured: they initialize the optimizer's state and let
# the caching allocator and autograd settle (PyTorch's documented warm-up on a side stream).
GRAPH_WARMUP_STEPS = 3


# -- the lean loss ------------------------------------------------------------------------------
def _diagonal_normal(fn) -> tuple[dist.Normal, int] | None:
    """``(normal, event_dims)`` when ``fn`` is a ``Normal``, or an ``Independent`` of one; else None."""
    event_dims = 0
    while isinstance(fn, dist.Independent):
        event_dims += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    return (fn, event_dims) if type(fn) in (dist.Normal, torch.distributions.Normal) else None


class SiteLogDensity(Messenger):
    """Collects ``scale * mask * log_prob(value)``, summed, for each sample site of one run of a Pyro program.

    With ``replay`` (name -> value) the latent sites take those values, as ``poutine.replay``
    would. Plate subsample sites are skipped, as ``Trace_ELBO`` prunes them. Parameter sites
    whose initial value is an ``nn.Parameter`` with the real constraint (what ``pyro.module``
    sends) are answered with that parameter: the param store holds the very same tensor once the
    step's first call has registered it (:func:`lean_loss_supported` checks), so the values are
    identical and the store lookup is skipped.

    A latent site drawn here from a diagonal ``Normal`` (the default guide) is drawn as Pyro's
    ``rsample`` draws it, z = loc + scale * e with e ~ N(0, I) from the same random stream (the
    same z, bit for bit), and its log-density is taken from the noise:
    log q(z) = sum(-e^2/2 - log scale - log sqrt(2 pi)). That is ``Normal.log_prob(z)`` exactly
    as a function of the parameters, since (z - loc) / scale = e for every loc and scale: the same
    value and the same total derivative (d/dloc = 0, d/dscale = -1/scale), to float rounding, for
    about half the operations.

    With ``kl_from`` (the guide's messenger of the same step) a replayed latent site whose KL to
    the guide's distribution is registered in torch contributes ``-scale * mask * KL(q || p)``
    (the guide site's scale and mask, as ``TraceMeanField_ELBO``) instead of its log-density, and
    is listed in ``analytic``: the guide's term for it is then left out (:meth:`log_density`).
    Terms are evaluated only when summed, so a log q that the KL replaces is never computed.
    """

    def __init__(self, replay: dict[str, torch.Tensor] | None = None, kl_from: SiteLogDensity | None = None) -> None:
        super().__init__()
        self.replay, self.kl_from = replay, kl_from
        self.values: dict[str, torch.Tensor] = {}  # name -> value of each latent site
        self.sites: dict[str, tuple] = {}  # name -> (fn, scale, mask) of each latent site
        self.noise: dict[str, tuple] = {}  # name -> (Normal, event dims, e) of the sites drawn here from one
        self.terms: dict[str, Callable[[], torch.Tensor]] = {}
        self.analytic: set[str] = set()

    def log_density(self, exclude: set[str] | frozenset = frozenset()) -> torch.Tensor | float:
        """The sum of the sites' terms in site order, leaving out the sites named in ``exclude`` (0.0 if none)."""
        total: torch.Tensor | None = None
        for name, term in self.terms.items():
            if name not in exclude:
                total = term() if total is None else total + term()
        return 0.0 if total is None else total

    def _pyro_param(self, msg) -> None:
        args = msg["args"]
        real = msg["kwargs"].get("constraint", constraints.real) is constraints.real
        if len(args) > 1 and isinstance(args[1], nn.Parameter) and real:
            msg["value"], msg["done"], msg["stop"] = args[1], True, True

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or msg["value"] is not None or msg["done"]:
            return
        if self.replay is not None:
            if msg["name"] in self.replay:
                msg["value"], msg["done"] = self.replay[msg["name"]], True
            return
        found = _diagonal_normal(msg["fn"])
        if found is not None and not msg["args"] and not msg["kwargs"]:
            normal, event_dims = found
            # torch.distributions.Normal.rsample's own draw and arithmetic: the same z, bit for bit.
            noise = torch.empty(normal.batch_shape, dtype=normal.loc.dtype, device=normal.loc.device).normal_()
            msg["value"], msg["done"] = normal.loc + noise * normal.scale, True
            self.noise[msg["name"]] = (normal, event_dims, noise)

    def _pyro_post_sample(self, msg) -> None:
        if site_is_subsample(msg):
            return
        name, fn, value, scale, mask = msg["name"], msg["fn"], msg["value"], msg["scale"], msg["mask"]
        if not msg["is_observed"]:
            self.values[name], self.sites[name] = value, (fn, scale, mask)
        guide_site = self.kl_from.sites.get(name) if self.kl_from is not None and not msg["is_observed"] else None
        if guide_site is not None:
            try:
                kl = kl_divergence(guide_site[0], fn)
            except NotImplementedError:
                pass
            else:
                self.analytic.add(name)
                self.terms[name] = lambda: -scale_and_mask(kl, guide_site[1], guide_site[2]).sum()
                return
        drawn = self.noise.get(name)
        if drawn is not None:
            self.terms[name] = lambda: scale_and_mask(_log_normal_from_noise(*drawn), scale, mask).sum()
        else:
            args, kwargs = msg["args"], msg["kwargs"]
            self.terms[name] = lambda: scale_and_mask(fn.log_prob(value, *args, **kwargs), scale, mask).sum()


def _log_normal_from_noise(normal, event_dims: int, noise: torch.Tensor) -> torch.Tensor:
    """log N(loc + scale * noise; loc, scale), summed over the last ``event_dims`` dimensions."""
    log_p = -0.5 * noise.square() - normal.scale.log() - LOG_SQRT_2PI
    return log_p.sum(tuple(range(-event_dims, 0))) if event_dims else log_p


def _lean_elbo_loss(vae, x: torch.Tensor, beta, analytic_kl: bool) -> torch.Tensor:
    """The guide under one :class:`SiteLogDensity`, the model replayed on its draws under another."""
    with module_registration(False):
        with SiteLogDensity() as guide:
            vae.guide(x, beta)
        with SiteLogDensity(replay=guide.values, kl_from=guide if analytic_kl else None) as model:
            vae.model(x, beta)
    elbo, log_q = model.log_density(), guide.log_density(exclude=model.analytic)
    # meanfield with every latent's KL analytic leaves no log q: nothing to subtract.
    return -(elbo - log_q) if torch.is_tensor(log_q) else -elbo


def reparameterized_elbo_loss(vae, x: torch.Tensor, beta: float | torch.Tensor = 1.0) -> torch.Tensor:
    """-(log p(x, z) - log q(z|x)) summed over the batch at one reparameterized draw z ~ q(z|x).

    The surrogate of Pyro's ``Trace_ELBO`` for fully reparameterized guides (there the score
    term is zero and the entropy term is log q), summed in the same site order, so value and
    gradient agree with ``Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, beta)`` to
    float rounding. Valid only where :func:`lean_loss_supported` says so.

    ``VAE``'s ``pyro.module`` calls are skipped (``module_registration(False)``): the messenger
    would answer their parameter sites with the modules' own parameters anyway, and the walk over
    the parameters costs about a tenth of a CPU step. The param store is left as it was.
    """
    return _lean_elbo_loss(vae, x, beta, analytic_kl=False)


def meanfield_elbo_loss(vae, x: torch.Tensor, beta: float | torch.Tensor = 1.0) -> torch.Tensor:
    """The surrogate of Pyro's ``TraceMeanField_ELBO``: -(log p(x|z) - KL(q(z|x) || p(z))) at one draw,
    with the analytic KL wherever torch has one for the pair, and log p(z) - log q(z|x) elsewhere.

    The same programs and messengers as :func:`reparameterized_elbo_loss`; value and gradient
    agree with ``TraceMeanField_ELBO().differentiable_loss`` to float rounding (tested).
    """
    return _lean_elbo_loss(vae, x, beta, analytic_kl=True)


@torch.no_grad()
def lean_loss_supported(vae, x: torch.Tensor, beta: float | torch.Tensor = 1.0) -> tuple[bool, str]:
    """Whether :func:`reparameterized_elbo_loss` equals ``Trace_ELBO`` for this model and guide.

    Traces the programs once the way ``Trace_ELBO`` does (``get_importance_trace``: with Pyro
    validation on, this checks that model and guide sites match and have valid shapes; it also
    registers the ``pyro.module`` parameters in the param store) and checks: every guide site is a
    latent, reparameterized (``has_rsample``), not enumerated; every latent of the model is drawn
    by the guide; every ``pyro.module`` parameter is the param store's own tensor.
    Returns (ok, reason). Draws random numbers: call it under ``torch.random.fork_rng``.
    """
    model_trace, guide_trace = get_importance_trace("flat", math.inf, vae.model, vae.guide, (x, beta), {})
    guide_latents = set()
    for site in _estimators.sample_sites(guide_trace):
        if site["is_observed"]:
            return False, f"the guide observes site {site['name']!r}"
        if not site["fn"].has_rsample:
            return False, f"guide site {site['name']!r} is not reparameterized"
        if site["infer"].get("enumerate"):
            return False, f"guide site {site['name']!r} is enumerated"
        guide_latents.add(site["name"])
    for site in _estimators.sample_sites(model_trace):
        if not site["is_observed"] and site["name"] not in guide_latents:
            return False, f"model latent {site['name']!r} has no guide site"
    for trace in (guide_trace, model_trace):
        for site in trace.nodes.values():
            args = site.get("args", ())
            module_param = site["type"] == "param" and len(args) > 1 and isinstance(args[1], nn.Parameter)
            if module_param and site["value"] is not args[1]:
                return False, f"param store entry {site['name']!r} is not the module's parameter"
    return True, ""


# Estimator class -> a loss with the same value and gradient and less overhead. Exact classes
# only: a subclass may change the objective.
FAST_LOSSES: dict[type, Callable[..., torch.Tensor]] = {
    _estimators.TraceELBO: reparameterized_elbo_loss,
    _estimators.MeanFieldELBO: meanfield_elbo_loss,
}


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
            Estimators with ``recordable = False`` are never recorded.

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

    def __call__(self, x: torch.Tensor, beta: float | torch.Tensor = 1.0) -> torch.Tensor:
        if self.path is None:
            # Validation as configured on this first step (and in the lean-loss check), off after;
            # the first step runs the loss eagerly, a recorded loss records from the second on.
            self._choose(x, beta)
            return self._eager(self.recorded.loss_fn if self.recorded is not None else self._loss_fn, x, beta)
        if self.path == "plain":
            return self._eager(self._loss_fn, x, beta)
        if self.path == "cuda_graph":
            return self._graph_step(x, beta)
        with pyro.validation_enabled(False):
            return self._eager(self._loss_fn, x, beta)

    # -- paths ---------------------------------------------------------------------------------
    def _eager(self, loss_fn, x, beta) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(self.vae, x, beta)
        loss.backward()
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.vae.parameters(), self.clip_norm, foreach=True)
        self.optimizer.step()
        return loss.detach()

    def _choose(self, x, beta) -> None:
        lean = FAST_LOSSES.get(type(self.estimator))
        lean_ok, lean_reason = (False, f"no fast loss for estimator {self.estimator!r}")
        if self.fast and lean is not None:
            # The check traces the programs once: keep the random stream as if it had not run.
            devices = [x.device] if x.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                lean_ok, lean_reason = lean_loss_supported(self.vae, x, beta)
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
        # Only estimators that say what they are: a duck-typed one may keep state a replay would freeze.
        declared = isinstance(self.estimator, _estimators.Estimator) and self.estimator.recordable
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
