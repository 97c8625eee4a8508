"""Annealed importance sampling (AIS) of log p(x), and the bidirectional Monte Carlo (BDMC) sandwich.

Neal (2001), "Annealed importance sampling"; Wu, Burda, Salakhutdinov & Grosse (2017), "On the
quantitative analysis of decoder-based generative models" (ICLR), whose protocol this follows;
Grosse, Ghahramani & Adams (2015), "Sandwiching the marginal likelihood using bidirectional Monte Carlo".

**The path.** For one example x, let z be every latent site of the structure flattened into one
vector (the two-layer VAE's z1 and z2 side by side). AIS anneals from a normalized start density
p0(z) -- the prior p(z) (``start="prior"``) or the guide q(z|x) (``start="guide"``) -- to the
unnormalized posterior p(x, z) along the geometric path

    f_b(z) = p0(z)^(1-b) p(x, z)^b = p0(z) exp(b r(z)),    r(z) = log p(x, z) - log p0(z),

at temperatures 0 = b_0 < b_1 < ... < b_T = 1, T = ``steps``: Wu et al.'s sigmoid schedule
b_t = (s(d(2t/T - 1)) - s(-d)) / (s(d) - s(-d)), s the logistic function and d = 4, or a linear one
b_t = t/T. The normalizers are Z_0 = 1 and Z_1 = p(x).

**The weight.** Draw z_0 ~ p0; for t = 1 .. T-1 move z_{t-1} to z_t with a Markov transition that
leaves f_{b_t} invariant; the chain's log weight is

    log w = sum_{t=1..T} (b_t - b_{t-1}) r(z_{t-1})  =  sum_t log f_{b_t}(z_{t-1}) - log f_{b_{t-1}}(z_{t-1}),

with E[w] = Z_1 / Z_0 = p(x) (Neal 2001). Over C independent chains per example,
log p-hat(x) = log (1/C) sum_c w_c, a stochastic lower bound (E[log p-hat] <= log p(x) by Jensen)
that tightens as T grows. With T = 1 there is no transition and log w = r(z_0) =
log p(x, z_0) - log p0(z_0): plain importance sampling from p0 with C samples (from the guide, the
estimator of :func:`pyro_vae.evaluate.log_likelihood` with K = C; the tests check both).

**The standard error** of log p-hat is the jackknife over the C chains, as for importance sampling
(:func:`pyro_vae.evaluate.weights_estimate`, which also gives the delta method's and the effective sample
size). It measures the chains' disagreement; AIS weights are heavy-tailed when T is too small, and no SE
can see the bias of a bound that no chain has reached.

**The transitions** are one Hamiltonian Monte Carlo step per temperature (Neal 2011): momentum
m ~ N(0, I), ``leapfrog`` leapfrog steps of size eps on H(z, m) = -log f_b(z) + |m|^2 / 2, accepted
with probability alpha = min(1, exp(H_start - H_end)). Gradients of log f_b are taken by
``torch.autograd.grad`` through the structure's Pyro programs (``pyro_vae.traces``: log p(x, z) is
the model's trace conditioned on z, every site's log-density summed). eps is one number per example
and chain, adapted after every transition as Wu et al. do: a running average a <- 0.9 a + 0.1 alpha
multiplies eps by 1.02 when a > ``target_accept`` (0.65) and by 0.98 otherwise, within [1e-4, 0.5].
Strictly, a step size that depends on the chain's own past is outside the proof that E[w] = p(x);
Wu et al. adapt the same way, and the tests check the estimates against exact log-likelihoods.

**Faster gradients, exact energies** (``gradient_precision``). The leapfrog map with *any* force field
that is a fixed function of z -- not only the exact gradient of log f_b -- is volume-preserving and, with
the momentum flipped, its own inverse; Metropolis-Hastings on the exact energy H then leaves f_b invariant
whatever the force (the surrogate-gradient HMC of Rasmussen 2003, "Gaussian processes to speed up hybrid
Monte Carlo for expensive Bayesian integrals"). A less precise gradient costs only acceptance. With
``gradient_precision="bf16"`` (CPU: oneDNN multiplies float32 matrices on bfloat16 inputs,
``torch.backends.mkldnn.matmul.fp32_precision``) or ``"tf32"`` (CUDA; a CPU whose oneDNN has it), the
leapfrog gradients are taken with the faster matrix products; the energies of the accept step and every
r(z) that enters the weight are evaluated again at ``"ieee"`` precision (one forward pass per
transition), so log w is the same function of the chain as with ``"ieee"`` and E[w] = p(x) still holds.
Float32 models only: the setting does not change float64 products.

**Batching.** Examples x chains run at once, the chains on a particle plate at dim -2 (shape
``(chains, batch, D)``); the loop keeps everything in tensors (no ``.item()``, no Python branch on a
tensor, no host sync), so it could be captured as a graph on a GPU. Cost: (T - 1)(L + 1) + 1
evaluations of log p(x, z) and its gradient per example and chain: for T = 1000, L = 10 and 16
chains, about 176 000 decoder passes forward and backward per example. The evaluations are recorded
once per batch as graphs of ATen operations and replayed (:meth:`AnnealingPath.record`), and every
leapfrog kick of a transition but the last (all of them below ``"ieee"``) replays a graph of the
gradient alone (``force``): L evaluations without the values and one with them at ``"ieee"``; L + 1
without and one forward pass for the energy otherwise.

**Which models.** Every prior, likelihood and guide, and every structure, whose latent sites are
real-valued (unconstrained) and one value per example: the plain VAE, the two-layer VAE, the CVAE.
A discrete or constrained latent site (M2's class) is refused in one line; so is a guide start with
an enumerated guide.

**BDMC** (:func:`bdmc`): simulate (z, x) ~ p(z) p(x|z) from the model, so that z is an exact
posterior sample for x. Forward AIS (b from 0 to 1) gives a stochastic lower bound on log p(x);
reverse AIS, started at that z and run from b = 1 down to 0, has E[w_rev] = 1/p(x), so
-log (1/C) sum_c w_rev,c is a stochastic upper bound. The gap between the two bounds the error of
forward AIS with the same settings on simulated data (Grosse et al. 2015; Wu et al. 2017, sec. 4).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from torch.distributions import constraints

from pyro_vae.evaluate import (
    MEMORY_BUDGET,
    NLL_METHODS,
    ImportanceEstimate,
    chunks,
    describe,
    evaluating,
    fields_on_device,
    flat_on_device,
    model_device,
    nll_method,
    progress_bar,
    weights_estimate,
    widest_activation,
)
from pyro_vae.model import module_registration
from pyro_vae.recorded import record_graph
from pyro_vae.runs import load_run
from pyro_vae.specs import integer_arg, number_arg
from pyro_vae.traces import guide_particles, latent_values, replayed_log_density, sample_sites, trace_log_density

log = logging.getLogger(__name__)

SCHEDULES = ("sigmoid", "linear")
# Matrix-product precisions of float32 gradients, in torch's words (``torch.backends.*.fp32_precision``),
# per device type; "ieee" is full float32 and the default.
GRADIENT_PRECISIONS = {"cpu": ("ieee", "bf16", "tf32"), "cuda": ("ieee", "tf32")}
_ANY_PRECISION = tuple(dict.fromkeys(p for valid in GRADIENT_PRECISIONS.values() for p in valid))
STARTS = ("prior", "guide")
SIGMOID_RADIUS = 4.0  # d of the sigmoid schedule (Wu et al. 2017)
# HMC step-size adaptation (Wu et al. 2017): growth and shrink factors, bounds, smoothing of the acceptance rate.
STEP_GROW, STEP_SHRINK, STEP_MIN, STEP_MAX, ACCEPT_SMOOTHING = 1.02, 0.98, 1e-4, 0.5, 0.9
STAGES = 10  # the acceptance rate is reported per tenth of the schedule


@NLL_METHODS.register("ais")
@dataclass
class AISSettings:
    """The settings of AIS, and the NLL method ``ais(steps=..., leapfrog=..., chains=...)``.

    Args:
        steps: T, the number of temperatures after b_0 = 0 (T - 1 HMC transitions; T = 1 is importance sampling).
        leapfrog: L, leapfrog steps per HMC transition.
        chains: C, independent chains (weights) per example.
        start: p0, ``"prior"`` (p(z), Wu et al.'s choice) or ``"guide"`` (q(z|x)).
        schedule: ``"sigmoid"`` (Wu et al.) or ``"linear"`` temperatures.
        target_accept: the acceptance rate the step sizes are adapted towards.
        step_size: the initial HMC step size of every chain.
        gradient_precision: the precision of the float32 matrix products in the leapfrog gradients,
            ``"ieee"``, ``"bf16"`` (CPU) or ``"tf32"``; energies and weights stay at ``"ieee"``
            (module docstring: faster gradients, exact energies).
        record: record the gradient and the energies as ATen graphs once per batch and replay them
            (:meth:`AnnealingPath.record`); ``False`` interprets the Pyro programs at every evaluation.
    """

    steps: int = 1000
    leapfrog: int = 10
    chains: int = 16
    start: str = "prior"
    schedule: str = "sigmoid"
    target_accept: float = 0.65
    step_size: float = 0.01
    gradient_precision: str = "ieee"
    record: bool = field(default=True, metadata={"protocol": False})  # how, not what: not in the protocol

    def __post_init__(self) -> None:
        self.steps = integer_arg("steps", self.steps)
        self.leapfrog = integer_arg("leapfrog", self.leapfrog)
        self.chains = integer_arg("chains", self.chains)
        for name, valid in (("start", STARTS), ("schedule", SCHEDULES), ("gradient_precision", _ANY_PRECISION)):
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, valid))}, got {getattr(self, name)!r}")
        self.target_accept = number_arg("target_accept", self.target_accept, 0, 1, open_low=True, open_high=True)
        self.step_size = number_arg("step_size", self.step_size, STEP_MIN, STEP_MAX)
        if not isinstance(self.record, bool):
            raise ValueError(f"record must be True or False, got {self.record!r}")

    def estimate(
        self, vae, x: torch.Tensor, batch_size: int | None = None, progress: bool | None = False, **data
    ) -> tuple[ImportanceEstimate, dict[str, Any]]:
        """The NLL method's interface (``pyro_vae.evaluate.NLL_METHODS``): the estimate over the chains' weights
        (its SEs and ESS), and the acceptance numbers."""
        result = ais_log_likelihood(vae, x, **asdict(self), batch_size=batch_size, progress=progress, **data)
        return weights_estimate(result.log_weights), result.diagnostics("ais_")


DEFAULTS = AISSettings()


def _settings_of(arguments: dict[str, Any]) -> AISSettings:
    """The :class:`AISSettings` among a function's arguments (``ais_log_likelihood``, ``bdmc``)."""
    return AISSettings(**{f.name: arguments[f.name] for f in fields(AISSettings)})


@dataclass
class AISResult:
    """Per-example AIS estimates and how the chains behaved.

    ``log_px`` (N,): log p-hat(x) = log mean_c w_c (forward AIS; for a reverse run, the upper bound
    -log mean_c w_rev,c). ``se`` (N,): its delta-method standard error over the chains.
    ``log_weights`` (chains, N): log w of every chain (a reverse run's log w_rev estimates -log p(x)).
    ``acceptance`` (steps - 1,): the mean HMC acceptance probability at each transition, over examples
    and chains. ``step_size`` (chains, N): the step sizes after the last adaptation.
    """

    log_px: torch.Tensor
    se: torch.Tensor
    log_weights: torch.Tensor
    acceptance: torch.Tensor
    step_size: torch.Tensor
    settings: AISSettings

    @property
    def acceptance_rate(self) -> float | None:
        """The mean acceptance probability over all transitions (``None`` for steps = 1: no transition)."""
        return float(self.acceptance.mean()) if self.acceptance.numel() else None

    def diagnostics(self, prefix: str = "") -> dict[str, Any]:
        """JSON-ready ``acceptance_rate``, ``acceptance_by_stage`` (mean over each tenth of the schedule) and
        ``step_size_final`` (the mean over examples and chains), each key with ``prefix``."""
        stages = self.acceptance.tensor_split(min(STAGES, self.acceptance.numel())) if self.acceptance.numel() else ()
        return {
            f"{prefix}acceptance_rate": self.acceptance_rate,
            f"{prefix}acceptance_by_stage": [float(stage.mean()) for stage in stages],
            f"{prefix}step_size_final": float(self.step_size.mean()),
        }


# -- the path ---------------------------------------------------------------------------------------------
def temperatures(steps: int, kind: str = "sigmoid", dtype=torch.float64, device=None) -> torch.Tensor:
    """The temperatures b_0 = 0 < b_1 < ... < b_T = 1, shape ``(steps + 1,)`` (see the module docstring)."""
    t = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    if kind == "sigmoid":
        s = torch.sigmoid(SIGMOID_RADIUS * (2 * t - 1))
        t = (s - s[0]) / (s[-1] - s[0])
    elif kind != "linear":
        raise ValueError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {kind!r}")
    return t.to(dtype=dtype, device=device)


def _is_real(support) -> bool:
    """Whether a support is the real numbers (possibly as independent or mixture events of them)."""
    while hasattr(support, "base_constraint"):
        support = support.base_constraint
    return type(support) is type(constraints.real)


@dataclass(frozen=True)
class LatentLayout:
    """A structure's latent sites flattened into one vector per example (and chain): names and per-example shapes."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, trace, lead: tuple[int, ...], structure: str) -> LatentLayout:
        """The latent sites of a trace whose values have the leading shape ``lead`` (``(chains, batch)`` on a
        particle plate); a one-line ``ValueError`` for a site AIS cannot move (not real-valued, or not one
        value per example)."""
        names, shapes = [], []
        for site in sample_sites(trace):
            if site["is_observed"] or site["infer"].get("was_observed"):
                continue
            name, value = site["name"], site["value"]
            if not _is_real(site["fn"].support):
                raise ValueError(
                    f"AIS needs real-valued latent sites; site {name!r} of structure {structure} has support "
                    f"{site['fn'].support} (discrete or constrained latents cannot be moved by HMC)"
                )
            if tuple(value.shape[: len(lead)]) != lead:
                raise ValueError(
                    f"AIS needs one value per example at every latent site; site {name!r} of structure "
                    f"{structure} has shape {tuple(value.shape)}, not {lead} + the shape of one value"
                )
            names.append(name)
            shapes.append(value.shape[len(lead) :])
        if not names:
            raise ValueError(f"structure {structure} has no latent site: its log p(x) needs no AIS")
        return cls(tuple(names), tuple(shapes))

    @property
    def sizes(self) -> list[int]:
        return [math.prod(shape) for shape in self.shapes]

    def flatten(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """name -> ``(*lead, *shape)`` to one ``(*lead, D)`` tensor, the sites in model order."""
        parts = [values[name] for name in self.names]
        return torch.cat(
            [v.reshape(*v.shape[: v.dim() - len(shape)], -1) for v, shape in zip(parts, self.shapes, strict=True)], -1
        )

    def unflatten(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`flatten`."""
        parts = z.split(self.sizes, -1)
        return {
            name: part.reshape(*z.shape[:-1], *shape)
            for name, shape, part in zip(self.names, self.shapes, parts, strict=True)
        }


def _draws_random_numbers(node: torch.fx.Node) -> bool:
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags


class AnnealingPath:
    """f_b(z) = p0(z) exp(b r(z)) for one batch of examples and ``chains`` chains, z of shape ``(chains, batch, D)``.

    ``model`` is the structure's model program (default ``vae.model``; BDMC passes one whose observed
    sites hold simulated values). The layout of z is read from the start draw (:meth:`draw`) or given.
    """

    def __init__(
        self,
        vae,
        x: torch.Tensor,
        chains: int,
        start: str,
        data: dict[str, torch.Tensor],
        model: Callable | None = None,
        layout: LatentLayout | None = None,
    ) -> None:
        self.vae, self.x, self.chains, self.start, self.data = vae, x, chains, start, data
        self.model = model or vae.model
        self.lead = (chains, x.shape[0])
        self.layout = layout
        self.structure = type(getattr(vae, "structure", vae)).__name__
        self.replays: dict[str, Callable] = {}
        self.fallback_reason = ""

    def _fields(self) -> list[torch.Tensor]:
        return [self.data[name] for name in sorted(self.data)]

    def record(self, z: torch.Tensor, beta: torch.Tensor) -> bool:
        """Record :meth:`gradient`, :meth:`force` and :meth:`terms` as graphs of ATen operations for this batch's shapes
        (``pyro_vae.recorded.record_graph``: fake inputs, the model's parameters held as the very
        tensors, the gradient's backward pass recorded as operations) and replay them from now on: the
        Pyro programs are interpreted once instead of at every leapfrog step. Each graph is checked
        against the eager evaluation at (``z``, ``beta``); a program that cannot be recorded (it reads a
        tensor on the host, holds a tensor that is not a parameter, draws random numbers) or a replay that
        differs keeps the eager path, with the reason in ``fallback_reason`` (logged). Whether it recorded.
        """
        names = sorted(self.data)
        inputs = (z, beta, self.x, *self._fields())
        eager = {
            "gradient": self._eager_gradient,
            "force": lambda z, beta: self._eager_gradient(z, beta)[2],
            "terms": lambda z, beta: self._eager_terms(z),
        }
        replays = {}
        try:
            for name, method in eager.items():
                graph, _ = record_graph(self._on_inputs(name, names), inputs, self.vae, pre_dispatch=False)
                random = [n.target for n in graph.graph.nodes if _draws_random_numbers(n)]
                if random:
                    raise ValueError(f"the programs draw random numbers ({random[0]})")
                torch.testing.assert_close(graph(*inputs), method(z, beta))
                replays[name] = graph
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as error:  # anything that stops a faithful replay: the eager path stays
            first_line = next(iter(str(error).strip().splitlines()), "")
            self.fallback_reason = f"{type(error).__name__}: {first_line}"
            log.info("AIS: %s runs eagerly (recording refused: %s)", self.structure, self.fallback_reason)
            return False
        self.replays = replays
        return True

    def _on_inputs(self, name: str, names: list[str]) -> Callable:
        """The eager ``name`` as a function of (z, beta, x, *fields), the batch's tensors as graph inputs."""

        def evaluate(z, beta, x, *fields):
            view = copy.copy(self)
            view.x, view.data, view.replays = x, dict(zip(names, fields, strict=True)), {}
            if name == "terms":
                return view._eager_terms(z)
            log_p0, r, grad = view._eager_gradient(z, beta)
            return (log_p0, r, grad) if name == "gradient" else grad  # "force": the graph drops the values

        return evaluate

    def _model_trace(self, values: dict[str, torch.Tensor]):
        with pyro.plate("particles", self.chains, dim=-2):
            program = poutine.condition(self.model, data=values) if values else self.model
            return poutine.trace(program).get_trace(self.x, 1.0, **self.data)

    def draw(self) -> torch.Tensor:
        """z_0 ~ p0: ``chains`` draws per example from the model's prior or from the guide (``guide_particles``,
        the draws of ``traces.log_weights``); sets the layout of z from them."""
        if self.start == "prior":
            trace = self._model_trace({})
        else:
            trace = guide_particles(self.vae, self.x, self.chains, **self.data)
        self.layout = LatentLayout.of(trace, self.lead, self.structure)
        return self.layout.flatten(latent_values(trace, detach=True))

    def terms(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log p0(z), r(z))``, each of shape ``(chains, batch)``: the model's trace conditioned on z
        (latent sites: log p(z); the others: log p(x|z)) and, from the guide, the guide replayed on z."""
        if "terms" in self.replays:  # contiguous: the graph views z as it was laid out when recorded
            return self.replays["terms"](z.contiguous(), z.new_zeros(()), self.x, *self._fields())
        return self._eager_terms(z)

    def _eager_terms(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = self.layout.unflatten(z)
        trace = self._model_trace(values)
        latent = set(values)
        missing = [site["name"] for site in sample_sites(trace) if not site["is_observed"]]
        if missing:  # a model latent that z does not hold (the guide has no such site) would be drawn afresh
            raise ValueError(f"the {self.start} draws no value for the model's latent site(s) {', '.join(missing)}")
        observed = {site["name"] for site in sample_sites(trace)} - latent
        log_latent = trace_log_density(trace, exclude=observed).expand(self.lead)
        log_observed = trace_log_density(trace, exclude=latent).expand(self.lead)
        if self.start == "prior":
            return log_latent, log_observed
        log_q = replayed_log_density(self.vae.guide, values, self.x, self.chains, 1.0, **self.data).expand(self.lead)
        return log_q, log_latent + log_observed - log_q

    def gradient(self, z: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(log p0(z), r(z), d log f_beta / dz)``, the gradient by ``torch.autograd.grad`` (or its
        recorded backward operations, :meth:`record`)."""
        if "gradient" in self.replays:
            return self.replays["gradient"](z.contiguous(), beta, self.x, *self._fields())
        return self._eager_gradient(z, beta)

    def force(self, z: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """d log f_beta / dz alone: what a leapfrog kick needs when the energy there is not wanted (every
        kick but a transition's last at ``"ieee"``). Recorded, its graph has no operation that only the
        values log p0 and r need (the likelihood's density itself: its backward reads the logits)."""
        if "force" in self.replays:
            return self.replays["force"](z.contiguous(), beta, self.x, *self._fields())
        return self._eager_gradient(z, beta)[2]

    def _eager_gradient(self, z: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            log_p0, r = self._eager_terms(z)
            (grad,) = torch.autograd.grad((log_p0 + beta * r).sum(), z)
        return log_p0.detach(), r.detach(), grad


# -- HMC ------------------------------------------------------------------------------------------------------
@dataclass
class ChainState:
    """Where the chains are: z ``(chains, batch, D)``, log p0(z) and r(z) there ``(chains, batch)``."""

    z: torch.Tensor
    log_p0: torch.Tensor
    r: torch.Tensor

    def select(self, accept: torch.Tensor, proposal: ChainState) -> ChainState:
        """``proposal`` where ``accept``, else this state (elementwise, no host sync)."""
        return ChainState(
            torch.where(accept.unsqueeze(-1), proposal.z, self.z),
            torch.where(accept, proposal.log_p0, self.log_p0),
            torch.where(accept, proposal.r, self.r),
        )


def hmc_transition(
    path: AnnealingPath,
    state: ChainState,
    beta: torch.Tensor,
    step_size: torch.Tensor,
    leapfrog: int,
    gradient_precision: str = "ieee",
) -> tuple[ChainState, torch.Tensor]:
    """One HMC step leaving f_beta invariant: ``(new state, acceptance probability (chains, batch))``.

    Leapfrog on H(z, m) = -log f_beta(z) + |m|^2 / 2 with per-chain step sizes ``step_size``
    ``(chains, batch)``, its gradients at ``gradient_precision``; a proposal whose energy is not finite is
    rejected (alpha = 0). Below ``"ieee"`` the proposal's energy is evaluated again at ``"ieee"``.
    """
    eps = step_size.unsqueeze(-1)
    momentum = torch.randn_like(state.z)
    h_start = -(state.log_p0 + beta * state.r) + 0.5 * momentum.square().sum(-1)
    z = state.z
    exact = gradient_precision == "ieee"
    with matmul_precision(z.device, gradient_precision):
        momentum = momentum + 0.5 * eps * path.force(z, beta)
        for _ in range(leapfrog - 1):
            z = z + eps * momentum
            momentum = momentum + eps * path.force(z, beta)
        z = z + eps * momentum
        if exact:  # the last gradient evaluation also gives the proposal's energy
            log_p0, r, grad = path.gradient(z, beta)
        else:
            grad = path.force(z, beta)
        momentum = momentum + 0.5 * eps * grad
    if not exact:  # the accept step and the weights need the exact energy
        with matmul_precision(z.device, "ieee"):
            log_p0, r = path.terms(z)
    h_end = -(log_p0 + beta * r) + 0.5 * momentum.square().sum(-1)
    alpha = (h_start - h_end).clamp(max=0).exp().nan_to_num(nan=0.0)
    accept = torch.rand_like(alpha) < alpha
    return state.select(accept, ChainState(z, log_p0, r)), alpha


@contextlib.contextmanager
def matmul_precision(device: torch.device, precision: str) -> Iterator[None]:
    """float32 matrix products and convolutions on ``device`` at ``precision`` (``"ieee"``, ``"bf16"``,
    ``"tf32"``: torch's ``fp32_precision`` of the device's backends) inside the block, put back after it;
    a one-line ``ValueError`` for a precision the device's backends lack."""
    check_precision(device, precision)
    backends = _PRECISION_BACKENDS.get(device.type, ())
    saved = [backend.fp32_precision for backend in backends]
    try:
        for backend in backends:
            backend.fp32_precision = precision
        yield
    finally:
        for backend, value in zip(backends, saved, strict=True):
            backend.fp32_precision = value


def check_precision(device: torch.device, precision: str) -> None:
    """A one-line ``ValueError`` for a precision ``device``'s backends lack; a warning where oneDNN would
    ignore ``"bf16"`` (a CPU without bfloat16 support: the products stay float32 and the extra full-precision
    energy evaluation makes AIS slower, not faster)."""
    valid = GRADIENT_PRECISIONS.get(device.type, ("ieee",))
    if precision not in valid:
        raise ValueError(
            f"gradient_precision {precision!r} is not available on {device.type}; valid there: "
            + ", ".join(map(repr, valid))
        )
    if precision == "bf16" and not (torch.backends.mkldnn.is_available() and _bf16_supported()):
        warnings.warn("gradient_precision 'bf16': this CPU has no bfloat16 products; AIS runs in float32", stacklevel=3)


def _bf16_supported() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


_PRECISION_BACKENDS = {
    "cpu": (torch.backends.mkldnn.matmul, torch.backends.mkldnn.conv),
    "cuda": (torch.backends.cuda.matmul, torch.backends.cudnn.conv),
}


def adapt_step_size(
    step_size: torch.Tensor, rate: torch.Tensor, alpha: torch.Tensor, target: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wu et al.'s multiplicative rule: ``(new step sizes, new running acceptance rates)``, per chain."""
    rate = ACCEPT_SMOOTHING * rate + (1 - ACCEPT_SMOOTHING) * alpha
    factor = torch.where(rate > target, STEP_GROW, STEP_SHRINK)
    return (step_size * factor).clamp(STEP_MIN, STEP_MAX), rate


def anneal(
    path: AnnealingPath, z: torch.Tensor, betas: torch.Tensor, settings: AISSettings, bar=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AIS run along ``betas`` (b_0 .. b_T, either direction) from z_0 = ``z``:
    ``(log w (chains, batch), acceptance per transition (T - 1,), final step sizes (chains, batch))``.

    log w = sum_{t=1..T} (b_t - b_{t-1}) r(z_{t-1}), with z_t an HMC step at b_t from z_{t-1} for t < T.
    Every r(z) and energy at ``"ieee"`` precision, whatever torch's global setting; only the leapfrog
    gradients at ``settings.gradient_precision``.
    """
    with matmul_precision(z.device, "ieee"):
        if settings.record and len(betas) > 2 and not path.replays and not path.fallback_reason:
            path.record(z, betas[1])  # before the loop: its check reads values on the host, the loop does not
        return _anneal(path, z, betas, settings, bar)


def _anneal(
    path: AnnealingPath, z: torch.Tensor, betas: torch.Tensor, settings: AISSettings, bar
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    deltas = betas.diff()
    state = ChainState(z, *path.terms(z))
    log_w = deltas[0] * state.r
    step_size = torch.full_like(state.r, settings.step_size)
    rate = torch.full_like(state.r, settings.target_accept)
    acceptance = state.r.new_zeros(len(deltas) - 1)
    _advance(bar)
    for t in range(1, len(deltas)):
        state, alpha = hmc_transition(path, state, betas[t], step_size, settings.leapfrog, settings.gradient_precision)
        step_size, rate = adapt_step_size(step_size, rate, alpha, settings.target_accept)
        acceptance[t - 1] = alpha.mean()
        log_w = log_w + deltas[t] * state.r
        _advance(bar)
    return log_w, acceptance, step_size


def _advance(bar) -> None:
    if bar is not None:
        bar.update(1)


# -- forward AIS on data ----------------------------------------------------------------------------------------
def default_batch_size(vae, chains: int, n: int) -> int:
    """Examples per batch: ``(chains, batch, width)`` activations stay under ``MEMORY_BUDGET`` elements."""
    return max(1, min(n, MEMORY_BUDGET // (chains * widest_activation(vae))))


def ais_log_likelihood(
    vae,
    x: torch.Tensor,
    steps: int = DEFAULTS.steps,
    leapfrog: int = DEFAULTS.leapfrog,
    chains: int = DEFAULTS.chains,
    start: str = DEFAULTS.start,
    schedule: str = DEFAULTS.schedule,
    target_accept: float = DEFAULTS.target_accept,
    step_size: float = DEFAULTS.step_size,
    gradient_precision: str = DEFAULTS.gradient_precision,
    record: bool = DEFAULTS.record,
    batch_size: int | None = None,
    progress: bool | None = False,
    **data,
) -> AISResult:
    """AIS estimate of log p(x) per example (a stochastic lower bound), with its SE and acceptance rates.

        log p-hat(x) = log (1/C) sum_c exp(sum_{t=1..T} (b_t - b_{t-1}) [log p(x, z_{c,t-1}) - log p0(z_{c,t-1})]),

    the math, the HMC transitions and the references in the module docstring; the settings in
    :class:`AISSettings`. ``x`` is flattened to ``(N, x_dim)`` and moved to the module's device; ``data``
    are the fields the structure consumes (``vae.consumes``), a row per example. ``batch_size``
    examples run at once (default: as many as keep ``(chains, batch, width)`` activations under
    ``MEMORY_BUDGET``); ``progress`` shows a bar over temperatures (``None``: only on a terminal).
    """
    settings = _settings_of(locals())  # first statement: locals() holds the arguments alone
    x, data = flat_on_device(vae, x), fields_on_device(vae, data)
    check_precision(x.device, gradient_precision)
    if x.shape[0] == 0:
        raise ValueError("AIS needs at least one example, got none")
    batch = batch_size or default_batch_size(vae, chains, x.shape[0])
    betas = temperatures(steps, schedule, x.dtype, x.device)
    parts = []
    with _annealing(vae), _bar(x.shape[0], batch, steps, progress, f"AIS log p(x), T={steps}") as bar:
        for xb, db in chunks(x, data, batch):
            path = AnnealingPath(vae, xb, chains, start, db)
            parts.append(anneal(path, path.draw(), betas, settings, bar))
    return _result(parts, settings)


def _result(parts: list[tuple[torch.Tensor, ...]], settings: AISSettings, reverse: bool = False) -> AISResult:
    """Batches of :func:`anneal`'s output joined into one :class:`AISResult` (``reverse``: the upper bound)."""
    log_w = torch.cat([part[0] for part in parts], 1)
    acceptance = sum(part[1] * part[0].shape[1] for part in parts) / log_w.shape[1]  # weighted by batch size
    estimate = weights_estimate(log_w)
    return AISResult(
        log_px=-estimate.log_px if reverse else estimate.log_px,
        se=estimate.se,
        log_weights=log_w,
        acceptance=acceptance,
        step_size=torch.cat([part[2] for part in parts], 1),
        settings=settings,
    )


@contextlib.contextmanager
def _annealing(vae) -> Iterator[None]:
    """Eval mode without autograd (except the HMC gradients), without Pyro's validation checks (they read
    tensors on the host) and without ``pyro.module`` registration (the modules are used as they are)."""
    with evaluating(vae), pyro.validation_enabled(False), module_registration(False):
        yield


def _bar(n: int, batch: int, steps: int, progress: bool | None, desc: str, runs: int = 1):
    """A bar over temperatures: ``runs`` AIS runs of ``steps`` temperatures for each batch of examples."""
    return progress_bar(runs * steps * math.ceil(n / batch), progress, desc, unit="temperature")


# -- BDMC: the sandwich on simulated data ------------------------------------------------------------------------
class _Observations(Messenger):
    """Holds the named observed sites at given values (data simulated from the model), whatever ``obs`` the
    program passes: the value is the model's own draw, not a re-encoding of it (``Likelihood.prepare``)."""

    def __init__(self, values: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] and msg["name"] in self.values:
            msg["value"] = self.values[msg["name"]]


@dataclass
class Simulation:
    """(z, x) ~ p(z) p(x|z): ``x`` in data units ``(num, x_dim)``, the observed and the latent sites' values
    (each ``(num, *shape)``), and the layout of the latent ones."""

    x: torch.Tensor
    observed: dict[str, torch.Tensor]
    latent: dict[str, torch.Tensor]
    layout: LatentLayout


def simulate(vae, num: int) -> Simulation:
    """``num`` draws from the model, every observed site sampled (``poutine.uncondition``).

    For structures whose model generates x alone: one observed site ``"x"``, no consumed fields.
    """
    structure = type(getattr(vae, "structure", vae)).__name__
    if getattr(vae, "consumes", ()):
        raise ValueError(
            f"BDMC simulates data from the model alone; structure {structure} also consumes {', '.join(vae.consumes)}"
        )
    device, dtype = model_device(vae), next(vae.parameters()).dtype
    with _annealing(vae):
        blank = torch.zeros(num, vae.x_dim, device=device, dtype=dtype)
        trace = poutine.trace(poutine.uncondition(vae.model)).get_trace(blank, 1.0)
    sites = sample_sites(trace)
    observed = {site["name"]: site["value"] for site in sites if site["infer"].get("was_observed")}
    if set(observed) != {"x"}:
        raise ValueError(f"BDMC needs a model that observes x alone; structure {structure} observes {sorted(observed)}")
    latent = {site["name"]: site["value"] for site in sites if site["name"] not in observed}
    x = vae.likelihood.unprepare(observed["x"]).to(dtype).reshape(num, -1)
    return Simulation(x, observed, latent, LatentLayout.of(trace, (num,), structure))


@dataclass
class BDMCResult:
    """Forward AIS (``forward.log_px``, a stochastic lower bound) and reverse AIS (``reverse.log_px``, a
    stochastic upper bound) on data ``x`` simulated from the model; ``gap`` = upper - lower, per example."""

    x: torch.Tensor
    forward: AISResult
    reverse: AISResult

    @property
    def gap(self) -> torch.Tensor:
        return self.reverse.log_px - self.forward.log_px

    def summary(self) -> dict[str, Any]:
        """JSON-ready means (nats per example, log-likelihoods: negative), their Monte Carlo SEs, the
        acceptance rates, and the per-example lists."""
        n = self.x.shape[0]
        result: dict[str, Any] = {"bdmc_num": n}
        for name, run in (("forward", self.forward), ("reverse", self.reverse)):
            result[f"{name}_log_px"] = float(run.log_px.double().mean())
            se = float(run.se.double().square().sum().sqrt() / n)
            result[f"{name}_se"] = se if math.isfinite(se) else None
            result.update(run.diagnostics(f"{name}_"))
        result["gap"] = float(self.gap.double().mean())
        result["per_example"] = {
            "forward_log_px": self.forward.log_px.tolist(),
            "reverse_log_px": self.reverse.log_px.tolist(),
            "gap": self.gap.tolist(),
        }
        return result


def bdmc(
    vae,
    num: int = 100,
    steps: int = DEFAULTS.steps,
    leapfrog: int = DEFAULTS.leapfrog,
    chains: int = DEFAULTS.chains,
    start: str = DEFAULTS.start,
    schedule: str = DEFAULTS.schedule,
    target_accept: float = DEFAULTS.target_accept,
    step_size: float = DEFAULTS.step_size,
    gradient_precision: str = DEFAULTS.gradient_precision,
    record: bool = DEFAULTS.record,
    batch_size: int | None = None,
    progress: bool | None = False,
) -> BDMCResult:
    """Bidirectional Monte Carlo (Grosse et al. 2015; Wu et al. 2017, sec. 4) on ``num`` simulated examples.

    Draw (z, x) ~ p(z) p(x|z) (:func:`simulate`); then z is an exact sample of p(z|x). Forward AIS
    from p0 (b: 0 -> 1) estimates p(x) without bias: E[log p-hat_fwd] <= log p(x). Reverse AIS starts
    every chain at that z and runs the same schedule backwards (b: 1 -> 0), its weight
    log w_rev = sum_t (b_{t-1} - b_t) r(z) estimating 1/p(x) without bias, so
    log p-hat_rev = -log (1/C) sum_c w_rev,c has E[log p-hat_rev] >= log p(x). The true log p(x) lies
    between them in expectation, and the gap E[log p-hat_rev - log p-hat_fwd] bounds the error of
    forward AIS with these settings on data from the model (only there: on real data no exact
    posterior sample exists). Settings as :func:`ais_log_likelihood`.
    """
    settings = _settings_of(locals())  # first statement: locals() holds the arguments alone
    num = integer_arg("num", num)
    check_precision(model_device(vae), gradient_precision)
    simulation = simulate(vae, num)
    batch = batch_size or default_batch_size(vae, chains, num)
    betas = temperatures(steps, schedule, simulation.x.dtype, simulation.x.device)
    forward, reverse = [], []
    with _annealing(vae), _bar(num, batch, steps, progress, f"BDMC, T={steps}", runs=2) as bar:
        for begin in range(0, num, batch):
            rows = slice(begin, begin + batch)
            model = _Observations({name: value[rows] for name, value in simulation.observed.items()})(vae.model)
            path = AnnealingPath(vae, simulation.x[rows], chains, start, {}, model)
            forward.append(anneal(path, path.draw(), betas, settings, bar))
            exact = simulation.layout.flatten({name: value[rows] for name, value in simulation.latent.items()})
            reverse.append(anneal(path, exact.expand(chains, *exact.shape), betas.flip(0), settings, bar))
    return BDMCResult(simulation.x, _result(forward, settings), _result(reverse, settings, reverse=True))


def bdmc_run(
    run_dir: str | Path,
    num: int,
    nll=None,
    device: str = "auto",
    seed: int | None = 0,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """:func:`bdmc` on a run folder's model (no dataset is read), with the AIS settings of the NLL method
    ``nll`` (an ``ais(...)`` spec; default ``ais``); JSON-ready, with ``ais_method`` and ``seconds``."""
    method = nll_method(nll if nll is not None else "ais")
    if not isinstance(method, AISSettings):
        raise ValueError(f"BDMC runs AIS: its settings must be an ais(...) spec, got {describe(method)[0]!r}")
    if seed is not None:
        pyro.set_rng_seed(seed)
    run = load_run(run_dir, device=device, load_data=False)
    begin = time.perf_counter()
    result = bdmc(run.vae, num, **asdict(method), batch_size=batch_size, progress=progress)
    spec, settings = describe(method)
    return {
        "run": str(run_dir),
        "ais_method": spec,
        "ais_settings": settings,
        **result.summary(),
        "seconds": time.perf_counter() - begin,
    }
