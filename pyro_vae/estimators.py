"""Bounds and gradient estimators, by name.

An estimator has two methods:

- ``loss(vae, x, beta=1.0, **data)``: a differentiable scalar whose gradient is the estimator's
  gradient of the negative bound summed over the batch (nats), and whose value is minus that bound
  estimate summed over the batch. This is the training objective.
- ``bound(vae, x, **data)``: the per-example bound estimate, shape ``(batch,)``, in nats (higher is
  better); ``bound_name`` says which bound it is.

``data`` are the extra fields a model structure consumes (``vae.consumes``: labels, a mask, a
conditioning input), passed on to its Pyro programs. Everything is read from the programs' traces
(``pyro_vae.traces``), site by site, so any structure's latent sites count.

``get(spec)`` builds one from a spec such as ``"trace"`` or ``"iwae(k=50)"``.

Registered estimators (see docs/estimators.md for the math of each):

=================  ==========================================  ========================================
spec               bound (``bound``)                           gradient (``loss``)
=================  ==========================================  ========================================
``trace``          ELBO, one draw, Monte Carlo KL              Pyro ``Trace_ELBO`` (reparameterized)
``meanfield``      ELBO, one draw, analytic KL where known     Pyro ``TraceMeanField_ELBO``
``closed_form``    ELBO, one draw, analytic KL (plain torch)   pathwise, ``closed_form_terms``
``jit_trace``      as ``trace``                                Pyro ``JitTrace_ELBO``
``jit_meanfield``  as ``meanfield``                            Pyro ``JitTraceMeanField_ELBO``
``tracegraph``     as ``trace``                                score function + baseline, ``TraceGraph_ELBO``
``enum``           ELBO, enumerated sites exactly              Pyro ``TraceEnum_ELBO`` (parallel enumeration)
``iwae(k)``        IWAE bound with k draws, per example        pathwise through the k-sample bound
``renyi(alpha,k)`` variational Renyi bound, per example        pathwise through the k-sample bound
``stl(k)``         IWAE bound (k=1: ELBO)                      "sticking the landing": no score term
``dreg(k)``        IWAE bound                                  doubly reparameterized (guide) + IWAE (model)
=================  ==========================================  ========================================

**KL warm-up** (``beta``). Every estimator accepts ``beta``: it is the ``poutine.scale`` on the
latent site ``"z"`` in both the model and the guide (``VAE.model``/``VAE.guide``), so every
estimator sees the same tempered log weight

    log w_beta(x, z) = log p(x|z) + beta * (log p(z) - log q(z|x)).

For one draw this is the beta-ELBO E_q[log p(x|z)] - beta KL(q || p) of warm-up schedules; for
k > 1 draws it is the same tempering inside each importance weight, a heuristic warm-up that is
a bound on log p(x) only at beta = 1. ``bound`` is always evaluated at beta = 1.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from pyro.infer import (
    JitTrace_ELBO,
    JitTraceMeanField_ELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
)
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyro_vae.closed_form import closed_form_elbo, closed_form_terms
from pyro_vae.model import beta_tensor
from pyro_vae.registry import Registry
from pyro_vae.traces import (
    analytic_kl_sites,
    elbo_particles,
    enumerated_sites,
    guide_particles,
    latent_values,
    log_weights,
    meanfield_elbo_loss,
    particle_traces,
    reparameterized_elbo_loss,
    replayed_log_density,
    sample_sites,
    trace_log_density,
)

ESTIMATORS: Registry = Registry("estimator")


# -- a stop-gradient on the parameters (STL, DReG) ------------------------------------------------
class _Call(nn.Module):
    """Holds the VAE as a submodule so that ``functional_call`` can swap all of its parameters."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


def call_with_stopped_parameters(vae: nn.Module, fn, *args, **kwargs):
    """``fn(*args)`` with every parameter of ``vae`` replaced by a detached copy: a stop-gradient on the
    parameters only (tensors passed in, such as reparameterized z, keep their gradient path).

    Works for any guide or prior family, because it swaps the module's parameters
    (``torch.func.functional_call``) instead of rebuilding a particular distribution.
    """
    params = {f"vae.{name}": p.detach() for name, p in vae.named_parameters()}
    with warnings.catch_warnings():
        # pyro.module skips (and warns about) parameters without requires_grad: exactly the intent here.
        warnings.filterwarnings("ignore", message=".*was not registered in the param store.*")
        return torch.func.functional_call(_Call(vae), params, (fn, *args), kwargs)


def _refuse_extra_data(estimator, data: dict) -> None:
    """A one-line error for an estimator that cannot pass a structure's extra data fields on."""
    if data:
        raise ValueError(
            f"estimator {str(estimator)!r} takes x alone, but the model consumes {', '.join(sorted(data))}; "
            "use trace, meanfield, tracegraph, enum, iwae, renyi, stl or dreg"
        )


# -- the estimators ---------------------------------------------------------------------------
class Estimator:
    """Base class; subclasses implement ``loss`` and ``bound`` and name their bound in ``bound_name``.

    What an estimator declares, so that the training loop and step never test its class or name:

    - ``bound_is_elbo``: ``bound`` is the one-draw ELBO, so the loop's validation ELBO already is
      the validation bound (no second pass);
    - ``particles``: draws per example that ``bound`` and ``loss`` take (the loop sizes its
      validation chunks by it, so that k draws per example keep the memory of one);
    - ``fast_loss``: ``None``, or a function ``(vae, x, beta, **data) -> loss`` with the value and gradient
      of ``loss`` and less overhead, used by the training step where ``traces.lean_loss_supported``
      says it applies to the model;
    - ``recordable``: whether the training step may record ``loss`` (or ``fast_loss``) as a graph
      and replay it (``pyro_vae.recorded``).
    """

    bound_name: str = "ELBO"
    bound_is_elbo: bool = True
    particles: int = 1
    fast_loss: Callable[..., torch.Tensor] | None = None
    recordable: bool = True

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # A fast loss stands for the loss of the class that declared it: a subclass that writes its
        # own ``loss`` (and may change the objective) drops the inherited one unless it declares its own.
        if "loss" in cls.__dict__ and "fast_loss" not in cls.__dict__:
            cls.fast_loss = None

    def loss(self, vae, x: torch.Tensor, beta: float = 1.0, **data) -> torch.Tensor:
        raise NotImplementedError

    def bound(self, vae, x: torch.Tensor, **data) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return getattr(self, "spec", type(self).__name__)


def _with_value(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """A scalar whose value is ``value`` and whose gradient is that of ``surrogate`` (both summed)."""
    return value.detach().sum() + (surrogate.sum() - surrogate.sum().detach())


class _PyroELBO(Estimator):
    """An estimator backed by a Pyro ELBO class; ``bound`` is log w for one draw."""

    elbo_class: type = Trace_ELBO

    def __init__(self) -> None:
        self.elbo = self.elbo_class()

    def loss(self, vae, x: torch.Tensor, beta: float = 1.0, **data) -> torch.Tensor:
        return self._pyro_loss(self.elbo, vae.model, vae.guide, x, beta, **data)

    def _pyro_loss(self, elbo, model, guide, x, beta, **data) -> torch.Tensor:
        # Pyro 1.9's Trace_ELBO reads every site's log-probability to the host (torch_item): one
        # sync per site and step. ``iwae(k=1)`` and ``closed_form`` are the sync-free equivalents.
        return elbo.differentiable_loss(model, guide, x, beta, **data)

    @torch.no_grad()
    def bound(self, vae, x: torch.Tensor, **data) -> torch.Tensor:
        return elbo_particles(vae, x, 1, **data)[0]


@ESTIMATORS.register("trace")
class TraceELBO(_PyroELBO):
    """Pyro's ``Trace_ELBO``: log p(x, z) - log q(z|x) at one reparameterized draw (Monte Carlo KL).

    Gradient: the pathwise (reparameterization) gradient of Kingma & Welling (2014), including the
    score term -grad_phi log q(z|x) at fixed z, whose expectation is zero.
    """

    elbo_class = Trace_ELBO
    fast_loss = staticmethod(reparameterized_elbo_loss)


class _ReparameterizedMeanField(TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` that refuses, in one line, a guide with a latent site it cannot differentiate.

    Pyro's class has no score-function term: a discrete guide site (M2's enumerated label) would get
    a wrong gradient with validation off and a bare ``NotImplementedError`` with it on. The check
    reads the guide trace Pyro builds anyway.
    """

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        for site in sample_sites(guide_trace):
            if not site["is_observed"] and not site["fn"].has_rsample:
                raise ValueError(
                    f"estimator 'meanfield' needs every latent site reparameterized, but guide site "
                    f"{site['name']!r} is not (TraceMeanField_ELBO has no score-function term); use enum, trace or iwae"
                )
        return model_trace, guide_trace


@ESTIMATORS.register("meanfield")
class MeanFieldELBO(_PyroELBO):
    """Pyro's ``TraceMeanField_ELBO``: Monte Carlo reconstruction, analytic KL where registered.

    The bound is ``traces.log_weights(..., analytic_kl=True)``; its variance over draws is that of the
    reconstruction term only. Pyro requires the guide's latent sites to be independent of each other (mean field)
    and reparameterized (a discrete site is refused in one line).

    A structure that allows the analytic KL at some latent sites only (``Structure.analytic_kl_sites``:
    a bottom-up guide such as the two-layer VAE's) gets the loss from those log weights instead,
    -sum log w, with the KL where allowed and log p - log q at the draw elsewhere: Pyro's
    ``TraceMeanField_ELBO`` would take every registered KL, a biased bound there. For a
    reparameterized guide its pathwise gradient is the ELBO's (as ``Trace_ELBO``'s is).
    """

    elbo_class = _ReparameterizedMeanField
    fast_loss = staticmethod(meanfield_elbo_loss)

    def loss(self, vae, x: torch.Tensor, beta: float = 1.0, **data) -> torch.Tensor:
        if analytic_kl_sites(vae) is not None:
            return -elbo_particles(vae, x, 1, beta, analytic_kl=True, **data).sum()
        return super().loss(vae, x, beta, **data)

    @torch.no_grad()
    def bound(self, vae, x: torch.Tensor, **data) -> torch.Tensor:
        return elbo_particles(vae, x, 1, analytic_kl=True, **data)[0]


@ESTIMATORS.register("closed_form")
class ClosedFormELBO(Estimator):
    """The hand-written reference ``closed_form_elbo`` (plain torch, analytic KL, no Pyro).

    Gradient: pathwise through E_q[log p(x|z)] (one draw) minus beta times the analytic KL.
    """

    def loss(self, vae, x: torch.Tensor, beta: float = 1.0, **data) -> torch.Tensor:
        _refuse_extra_data(self, data)
        terms = closed_form_terms(vae, x)
        return -(terms.reconstruction - beta * terms.kl).sum()

    @torch.no_grad()
    def bound(self, vae, x: torch.Tensor, **data) -> torch.Tensor:
        _refuse_extra_data(self, data)
        return closed_form_elbo(vae, x)


class _JitELBO(_PyroELBO):
    """A Pyro JIT ELBO: the model and guide are traced once per input shape and replayed compiled.

    Pyro's JIT needs tensor arguments (``beta`` is passed as a tensor, so a KL warm-up schedule
    does not recompile) and fixed shapes: one compiled ELBO is kept per (model, input shape, dtype,
    device), so a smaller last batch compiles once more rather than failing.
    """

    # It compiles itself (the comparison these estimators exist for); its compiled function holds
    # tensors of its own, which a recording would freeze.
    recordable = False

    def __init__(self) -> None:
        self._compiled: dict[tuple, tuple] = {}

    def loss(self, vae, x: torch.Tensor, beta: float = 1.0, **data) -> torch.Tensor:
        _refuse_extra_data(self, data)  # Pyro's JIT traces positional tensors only
        key = (id(vae), tuple(x.shape), x.dtype, x.device)
        if key not in self._compiled:
            # Keep the bound methods: Pyro's JIT cache is keyed on id(model) and id(guide).
            self._compiled[key] = (self.elbo_class(ignore_jit_warnings=True), vae.model, vae.guide)
        elbo, model, guide = self._compiled[key]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.trace.* is deprecated", category=FutureWarning)
            return self._pyro_loss(elbo, model, guide, x, beta_tensor(beta, x))


@ESTIMATORS.register("jit_trace")
class JitTraceELBO(_JitELBO):
    """Pyro's ``JitTrace_ELBO``: ``trace`` compiled with the PyTorch JIT (for speed comparisons)."""

    elbo_class = JitTrace_ELBO

    def _pyro_loss(self, elbo, model, guide, x, beta, **data) -> torch.Tensor:
        # Not ``elbo.differentiable_loss``: in Pyro 1.9 it adds the surrogate's gradient to that of
        # an undetached loss, doubling every gradient. Its (loss, surrogate) pair is right.
        loss, surrogate = elbo.loss_and_surrogate_loss(model, guide, x, beta)
        return _with_value(loss, surrogate)


@ESTIMATORS.register("jit_meanfield")
class JitMeanFieldELBO(_JitELBO):
    """Pyro's ``JitTraceMeanField_ELBO``: ``meanfield`` compiled with the PyTorch JIT."""

    elbo_class = JitTraceMeanField_ELBO

    def loss(self, vae, x: torch.Tensor, beta: float = 1.0, **data) -> torch.Tensor:
        if analytic_kl_sites(vae) is not None:  # Pyro's mean-field ELBO would take every KL: a biased bound
            raise ValueError(
                f"estimator {str(self)!r} takes the analytic KL at every latent site, but this model allows it at "
                f"{', '.join(analytic_kl_sites(vae)) or 'none'} only; use meanfield, trace, iwae, stl or dreg"
            )
        return super().loss(vae, x, beta, **data)

    def _pyro_loss(self, elbo, model, guide, x, beta, **data) -> torch.Tensor:
        loss = elbo.differentiable_loss(model, guide, x, beta)
        # Pyro 1.9 stores the compiled function as ``_differentiable_loss`` but looks for
        # ``_loss_and_surrogate_loss``, so it would trace the model anew on every call (60x slower).
        elbo._loss_and_surrogate_loss = elbo._differentiable_loss
        return loss

    bound = MeanFieldELBO.bound


@ESTIMATORS.register("enum")
class TraceEnumELBO(_PyroELBO):
    """Pyro's ``TraceEnum_ELBO``: discrete guide sites marked for enumeration are summed out exactly.

    For a guide site y with ``infer={"enumerate": "parallel"}`` (``pyro.infer.config_enumerate``),
    every value of y is evaluated at once in a tensor dimension left of the data plate, and the ELBO
    is the exact expectation over q(y|x) of the one-draw ELBO of the other latents,

        ELBO(x) = sum_y q(y|x) [log p(x, y, z_y) - log q(y|x) - log q(z_y|x, y)],   z_y ~ q(z|x, y),

    with the pathwise gradient for z and the exact gradient through the weights q(y|x): no
    score-function noise (Kingma et al. 2014, eq. 7, for M2's unlabelled examples; Pyro's
    ``examples/vae/ss_vae_M2.py``). Without enumerated sites it is ``trace``. The bound is that ELBO
    (``traces.elbo_particles``).
    """

    elbo_class = TraceEnum_ELBO
    # Pyro contracts the enumerated dimensions with opt_einsum, planned on the host at every call:
    # nothing a recorded graph could hold.
    recordable = False

    def __init__(self) -> None:
        # The data plate is the only plate a structure's programs use (dim -1): enumeration starts at -2.
        self.elbo = TraceEnum_ELBO(max_plate_nesting=1)


class _ScoreFunctionLatents(Messenger):
    """Samples every latent site without reparameterization and gives it a fixed baseline.

    ``has_rsample`` is switched off on the innermost distribution (``Independent`` and transformed
    distributions delegate it), so Pyro samples z without a gradient path and ``TraceGraph_ELBO``
    builds the score-function (REINFORCE) term for it.
    """

    def __init__(self, baseline: torch.Tensor) -> None:
        super().__init__()
        self.baseline = baseline

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or site_is_subsample(msg):
            return
        fn = msg["fn"]
        while True:
            try:
                fn.has_rsample_(False)
                break
            except AttributeError:  # a wrapper whose has_rsample is its base distribution's
                fn = fn.base_dist
        baseline = self.baseline.expand(msg["fn"].batch_shape)
        msg["infer"] = {**msg["infer"], "baseline": {"baseline_value": baseline}}


@ESTIMATORS.register("tracegraph")
class TraceGraphELBO(_PyroELBO):
    """Score-function estimator: Pyro's ``TraceGraph_ELBO`` with z *not* reparameterized.

    Gradient (Williams 1992; Mnih & Gregor 2014; Schulman et al. 2015 for the surrogate):

        grad_phi ELBO = E_q[(log w(x, z) - b) grad_phi log q(z|x)],   grad_theta ELBO = E_q[grad_theta log p(x, z)],

    with a decaying-average baseline b, kept here (not in Pyro's param store, whose per-position
    average would break on a smaller last batch): the exponential moving average, with factor
    ``baseline_beta``, of the batch-mean log weight, the same for every example (none on the first
    call, which starts the average). It is updated on the device at every ``loss`` call (no host
    sync). The bound is the ordinary one-draw ELBO.
    Pyro's ``TraceGraph_ELBO`` has no public differentiable loss (1.9), so its surrogate is used
    through ``_loss_and_surrogate_loss``.
    """

    elbo_class = TraceGraph_ELBO

    # Its baseline is a running average kept between calls: state a recorded replay would freeze.
    recordable = False

    def __init__(self, baseline_beta: float = 0.9) -> None:
        if not 0 <= baseline_beta < 1:
            raise ValueError(f"baseline_beta must be in [0, 1), got {baseline_beta!r}")
        super().__init__()
        self.baseline_beta = baseline_beta
        self._average: torch.Tensor | None = None

    def loss(self, vae, x: torch.Tensor, beta: float = 1.0, **data) -> torch.Tensor:
        # No baseline on the first call, then the average starts at that call's value (Python checks, no sync).
        baseline = x.new_zeros(()) if self._average is None else self._average
        guide = _ScoreFunctionLatents(baseline)(vae.guide)
        elbo, surrogate_loss = self.elbo._loss_and_surrogate_loss(vae.model, guide, (x, beta), data)
        mean = elbo.detach() / x.shape[0]  # elbo is the batch sum
        if self._average is None:
            self._average = mean
        else:
            self._average = self.baseline_beta * self._average + (1 - self.baseline_beta) * mean
        return _with_value(-elbo, surrogate_loss)


class ImportanceWeighted(Estimator):
    """Estimators built on ``k`` importance weights w_i = p(x, z_i) / q(z_i|x), z_i ~ q(z|x), per example.

    Subclasses choose how the k log weights make a bound (:meth:`aggregate`) and which gradient
    they carry (``stop_score``: the guide's parameters are stop-gradiented inside log q, as in
    STL; ``doubly_reparameterized``: the DReG weights). The value of ``loss`` is always minus the
    bound, summed over the batch.
    """

    stop_score: bool = False
    doubly_reparameterized: bool = False

    def __init__(self, k: int = 1) -> None:
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"k (the number of importance samples) must be an integer >= 1, got {k!r}")
        self.k = self.particles = k
        self.bound_name = f"IWAE bound (k={k})"
        self.bound_is_elbo = False

    def aggregate(self, log_w: torch.Tensor) -> torch.Tensor:
        """The IWAE bound log (1/k) sum_i w_i from log weights of shape ``(k, batch)``."""
        return torch.logsumexp(log_w, 0) - math.log(self.k)

    def loss(self, vae, x: torch.Tensor, beta: float = 1.0, **data) -> torch.Tensor:
        if self.doubly_reparameterized:
            return self._dreg_loss(vae, x, beta, **data)
        if not self.stop_score:
            return -self.aggregate(log_weights(vae, x, self.k, beta, **data)).sum()
        guide_trace, model_trace = particle_traces(vae, x, self.k, beta, **data)
        self._refuse_enumeration(guide_trace)
        log_q = self._stopped_log_q(vae, x, beta, latent_values(guide_trace), **data)
        return -self.aggregate(trace_log_density(model_trace) - log_q).sum()

    def _refuse_enumeration(self, guide_trace) -> None:
        """STL and DReG rewrite the score of every latent site through its reparameterized path, which an
        enumerated discrete site does not have: a one-line error instead of a wrong gradient."""
        enumerated = enumerated_sites(guide_trace)
        if enumerated:
            raise ValueError(
                f"estimator {str(self)!r} needs every latent site reparameterized, but the guide enumerates "
                f"{', '.join(sorted(enumerated))}; use iwae or renyi, which sum enumerated sites out exactly"
            )

    def _stopped_log_q(self, vae, x, beta, values, **data) -> torch.Tensor:
        """log q(z|x) with the guide's parameters stop-gradiented and z on its reparameterized path."""
        return call_with_stopped_parameters(vae, replayed_log_density, vae.guide, values, x, self.k, beta, **data)

    def _dreg_loss(self, vae, x: torch.Tensor, beta, **data) -> torch.Tensor:
        """The DReG surrogate (Tucker et al. 2019, eq. 7 for phi; the IWAE gradient for theta):

            surrogate = sum_i sg(w~_i) log p_theta(x, sg(z_i))
                      + sum_i sg(w~_i^2) [log p_sg(theta)(x, z_i) - log q_sg(phi)(z_i|x)],

        w~_i = w_i / sum_j w_j. The first term carries the model's gradient sum_i w~_i grad_theta log p
        (z held fixed); the second, with all parameters stop-gradiented, only the path through
        z_i = z(eps_i, phi): sum_i w~_i^2 (d log w_i / d z_i)(d z_i / d phi).
        """
        guide_trace = guide_particles(vae, x, self.k, beta, **data)
        self._refuse_enumeration(guide_trace)
        values, fixed = latent_values(guide_trace), latent_values(guide_trace, detach=True)
        log_p_model = replayed_log_density(vae.model, fixed, x, self.k, beta, **data)

        def pathwise(values):
            log_p = replayed_log_density(vae.model, values, x, self.k, beta, **data)
            return log_p - replayed_log_density(vae.guide, values, x, self.k, beta, **data)

        log_w_path = call_with_stopped_parameters(vae, pathwise, values)
        log_w = log_w_path.detach()  # log p(x, z_i) - log q(z_i|x): the values, without a graph
        normalized = torch.softmax(log_w, 0).detach()
        surrogate = (normalized * log_p_model + normalized.square() * log_w_path).sum(0)
        return -_with_value(self.aggregate(log_w), surrogate)

    @torch.no_grad()
    def bound(self, vae, x: torch.Tensor, **data) -> torch.Tensor:
        return self.aggregate(log_weights(vae, x, self.k, **data))


@ESTIMATORS.register("iwae")
class IWAE(ImportanceWeighted):
    """The importance-weighted bound (Burda et al. 2015), per example:

        L_k(x) = E[log (1/k) sum_{i=1..k} w_i] <= log p(x),   w_i = p(x, z_i) / q(z_i|x),

    non-decreasing in k, equal to the ELBO at k = 1 and tending to log p(x) as k grows.
    Gradient: pathwise through the log-sum-exp, sum_i w~_i grad log w_i with w~_i = w_i / sum_j w_j.
    """


@ESTIMATORS.register("renyi")
class Renyi(ImportanceWeighted):
    """The variational Renyi bound (Li & Turner 2016, eq. 9 with k draws), per example:

        L_alpha,k(x) = 1/(1 - alpha) log (1/k) sum_i w_i^(1 - alpha),

    alpha = 0 is the IWAE bound (the same draws give the same number), alpha -> 1 the ELBO
    (the mean of log w, used at alpha = 1 exactly). For 0 <= alpha <= 1 its expectation is a lower
    bound on log p(x) (Jensen's inequality, and L_alpha <= log p(x) for alpha >= 0), between the
    ELBO and the IWAE bound with the same k; for alpha < 0 it can exceed log p(x).
    Gradient: pathwise, sum_i v_i grad log w_i with v = softmax((1 - alpha) log w).

    Unlike Pyro's ``RenyiELBO``, which adds the log weights of all examples in the data plate
    before its log-sum-exp over particles (a bound on the whole batch's log p that does not
    decompose per example for local latents, Pyro issue 3104), the log-sum-exp here runs over the
    k particles of each example separately, as in the paper.
    """

    def __init__(self, alpha: float = 0.0, k: int = 1) -> None:
        super().__init__(k)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        self.alpha = float(alpha)
        self.bound_name = f"Renyi bound (alpha={alpha}, k={k})"

    def aggregate(self, log_w: torch.Tensor) -> torch.Tensor:
        if self.alpha == 1.0:
            return log_w.mean(0)
        return super().aggregate((1.0 - self.alpha) * log_w) / (1.0 - self.alpha)


@ESTIMATORS.register("stl")
class StickingTheLanding(ImportanceWeighted):
    """ "Sticking the landing" (Roeder et al. 2017): the total derivative of log q minus its score term.

    The gradient is the IWAE/ELBO pathwise gradient with the guide's parameters stop-gradiented
    inside log q(z|x) while z = z(eps, phi) keeps its path:

        grad_phi = sum_i w~_i (d/dz_i)[log p(x, z_i) - log q_sg(phi)(z_i|x)] dz_i/dphi.

    At k = 1 (the default) it is unbiased for the ELBO gradient and has zero variance when q is
    the exact posterior (then log p(x, z) - log q(z|x) = log p(x) for every z). At k > 1 it is the
    STL-IWAE gradient, which is biased (Tucker et al. 2019, section 4). The stop-gradient swaps
    the parameters of the whole VAE for detached copies while log q is evaluated
    (:func:`call_with_stopped_parameters`), so it works for every guide family.
    The bound is the IWAE bound with k draws (the ELBO at k = 1).
    """

    stop_score = True

    def __init__(self, k: int = 1) -> None:
        super().__init__(k)
        self.bound_is_elbo = k == 1
        self.bound_name = "ELBO" if k == 1 else f"IWAE bound (k={k})"


@ESTIMATORS.register("dreg")
class DReG(ImportanceWeighted):
    """Doubly reparameterized gradients for the IWAE bound (Tucker, Lawson, Gu & Maddison 2019).

    Guide (phi): the score term of the IWAE gradient is rewritten by reparameterizing it a second
    time, E[sum_i w~_i grad_phi log q(z_i)] = E[sum_i (w~_i - w~_i^2) d log w_i/dz_i dz_i/dphi], so

        grad_phi L_k = E[sum_i w~_i^2 (d log w_i / d z_i)(d z_i / d phi)],   (eq. 7)

    with log q's parameters stop-gradiented in log w_i as in STL. Unbiased for the IWAE gradient,
    and its signal-to-noise ratio does not vanish as k grows (unlike IWAE's for the guide, Rainforth
    et al. 2018). Model (theta): the usual IWAE gradient sum_i w~_i grad_theta log p(x, z_i).
    Parameters that appear in the model (e.g. a VampPrior's pseudo-inputs through the encoder) get
    the model gradient too. The bound is the IWAE bound with k draws.
    """

    doubly_reparameterized = True


def get(spec) -> Estimator:
    """An estimator from a spec, e.g. ``get("iwae(k=50)")``; an unknown name lists the valid ones."""
    return ESTIMATORS.build(spec)


def names() -> list[str]:
    return ESTIMATORS.names()
