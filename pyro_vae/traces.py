"""The one log-weight mechanism: per-example log p(x, z) and log q(z|x) from Pyro traces.

Everything that needs a log weight -- the estimators (``pyro_vae.estimators``), evaluation
(ELBO and importance-sampled NLL, ``pyro_vae.evaluate``) and the training step's lean loss
(``pyro_vae.train.step``) -- reads it here, from the structure's Pyro ``model`` and ``guide``
(``vae.model``/``vae.guide``), site by site, never from attribute names of a particular model:

    log w(x, z) = sum_{model sites s} scale_s mask_s log p_s(v_s) - sum_{guide sites s} scale_s mask_s log q_s(v_s),

the guide run under a particle plate at dim -2 (``k`` draws per example, vectorized) and the
model replayed on its draws, so every term has shape ``(k, batch)``. Every latent site counts,
however many a structure has; ``poutine.scale`` (the KL warm-up beta) and ``poutine.mask``
(missing data) are honoured. With ``analytic_kl`` a latent site whose KL(q || p) torch registers
contributes -KL instead of log p - log q at the draw (``TraceMeanField_ELBO``'s per-example value),
if the structure allows it for that site (``Structure.analytic_kl_sites``; ``None``: every site).

Two evaluations of the same quantity live here:

- :func:`log_weights`, from ``poutine.trace`` (``Trace`` objects; for bounds and evaluation);
- :class:`SiteLogDensity`, one lean messenger that sums the same terms without building traces
  (the training step's hot path: :func:`reparameterized_elbo_loss`, :func:`meanfield_elbo_loss`).
  Tests check that the two agree with each other and with Pyro's ``Trace_ELBO``.

``pyro_vae.closed_form`` is the independent, hand-written reference and shares no code with this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.enum import get_importance_trace
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import nn
from torch.distributions import constraints, kl_divergence

from pyro_vae.model import module_registration
from pyro_vae.priors import LOG_SQRT_2PI

Beta = float | torch.Tensor


# Enumerated discrete sites take the dimensions left of the particle plate (-2) and the data plate (-1).
FIRST_ENUM_DIM = -3


# -- log weights from traces ----------------------------------------------------------------------
def guide_particles(vae, x: torch.Tensor, k: int = 1, beta: Beta = 1.0, **data):
    """The guide's trace with ``k`` draws of every latent per example, on a particle plate at dim -2.

    Guide sites marked ``infer={"enumerate": "parallel"}`` are enumerated (``poutine.enum``) at
    dims from :data:`FIRST_ENUM_DIM` leftwards: every value of a discrete latent at once, and
    the continuous latents drawn for each of them.
    """
    with pyro.plate("particles", k, dim=-2), poutine.enum(first_available_dim=FIRST_ENUM_DIM):
        return poutine.trace(vae.guide).get_trace(x, beta, **data)


def particle_traces(vae, x: torch.Tensor, k: int = 1, beta: Beta = 1.0, **data):
    """(guide_trace, model_trace): ``k`` draws from the guide per example and the model replayed on them.

    Vectorized over a particle plate at dim -2, so every per-example log-density has shape ``(k, batch)``.
    ``data`` are the structure's extra inputs (``vae.consumes``), passed to both programs.
    """
    guide_trace = guide_particles(vae, x, k, beta, **data)
    with pyro.plate("particles", k, dim=-2):
        model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x, beta, **data)
    return guide_trace, model_trace


def log_weights(
    vae, x: torch.Tensor, k: int = 1, beta: Beta = 1.0, *, analytic_kl: bool = False, **data
) -> torch.Tensor:
    """log w = log p(x, z) - log q(z|x) for ``k`` draws z ~ q(z|x) per example, shape ``(k, batch)``.

    Computed from Pyro traces of ``vae.guide`` and ``vae.model`` (replayed on the guide's draws),
    vectorized over a particle plate at dim -2; ``z`` stands for every latent site. Each site's
    log-density is scaled and masked as its ``poutine.scale``/``poutine.mask`` say (the KL
    warm-up ``beta``). With ``analytic_kl`` each latent site whose KL(q || p) torch registers
    contributes -KL(q || p) instead of log p(z) - log q(z) at the draw: the same expectation with
    the variance of the other terms only (the per-example ELBO that ``TraceMeanField_ELBO`` sums).

    Enumerated discrete guide sites y (see :func:`guide_particles`) are summed out exactly: the
    weight of a draw is w = sum_y q(y|x) p(x, y, z_y) / (q(y|x) q(z_y|x, y)) = sum_y p(x, y, z_y) / q(z_y|x, y),
    with z_y drawn given each y, so E[w] = p(x) still holds and every bound built on these weights
    stays a bound (``analytic_kl`` is not applied then: a KL cannot sit inside the sum over y).
    Where a row masks the enumerated site out (``poutine.mask``: y observed there, as M2's labelled
    rows through ``obs_mask``), its q is uniform over the enumerated copies, which all hold the
    observed value: w is then their average, p(x, y_obs, z) / q(z|x, y_obs) (:func:`enumerated_log_q`).
    """
    guide_trace, model_trace = particle_traces(vae, x, k, beta, **data)
    enumerated = enumerated_sites(guide_trace)
    if enumerated:
        log_w = trace_log_density(model_trace) - trace_log_density(guide_trace, exclude=enumerated)
        # log q~(y) - log q(y): 0 on rows where y is drawn, -log K where a row masks the site out.
        _, log_normalizer = enumerated_log_q(guide_trace, enumerated)
        log_w = log_w - log_normalizer
        log_w = log_w.expand(*log_w.shape[:-2], k, x.shape[0])
        return log_w.logsumexp(tuple(range(log_w.dim() - 2)))
    if analytic_kl:
        return _analytic_kl_log_weights(guide_trace, model_trace, analytic_kl_sites(vae))
    return trace_log_density(model_trace) - trace_log_density(guide_trace)


def elbo_particles(
    vae, x: torch.Tensor, k: int = 1, beta: Beta = 1.0, *, analytic_kl: bool = False, **data
) -> torch.Tensor:
    """The ELBO of ``k`` draws per example, shape ``(k, batch)``: log p(x, z) - log q(z|x) at each draw.

    Equal to :func:`log_weights` without enumerated sites. Enumerated discrete guide sites y are
    averaged over exactly, weighted by q: sum_y q(y|x) [log p(x, y, z_y) - log q(y|x) - log q(z_y|x, y)],
    the ELBO that Pyro's ``TraceEnum_ELBO`` computes (Kingma et al. 2014, eq. 7 for M2's unlabelled
    bound), whereas :func:`log_weights` sums y out inside the weight (a tighter bound, for the
    importance-weighted estimators and the NLL).
    """
    guide_trace, model_trace = particle_traces(vae, x, k, beta, **data)
    enumerated = enumerated_sites(guide_trace)
    if not enumerated:
        if analytic_kl:
            return _analytic_kl_log_weights(guide_trace, model_trace, analytic_kl_sites(vae))
        return trace_log_density(model_trace) - trace_log_density(guide_trace)
    log_q, _ = enumerated_log_q(guide_trace, enumerated)
    terms = (log_q.exp() * (trace_log_density(model_trace) - trace_log_density(guide_trace))).expand(
        *log_q.shape[:-2], k, x.shape[0]
    )
    return terms.sum(tuple(range(terms.dim() - 2)))


def enumerated_log_q(guide_trace, enumerated: set[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log q~(y), its normalizer): the guide's probabilities of the enumerated values, normalized over
    each site's enumeration dim, and the sum over sites of that dim's log-sum-exp.

    A site's log q(y) counts 0 where a row masks it out (``poutine.mask``). Where a site is not
    masked, log q~ is log q(y|x) itself (already normalized: the normalizer is 0); where a row masks
    it out it is -log K, the uniform average over the K enumerated copies, which hold the same
    observed value there (normalizer log K).
    """
    total, normalizer = 0.0, 0.0
    for name in sorted(enumerated):
        site = guide_trace.nodes[name]
        log_q = site["fn"].log_prob(site["value"])
        if site["mask"] is not None:
            log_q = torch.where(torch.as_tensor(site["mask"], device=log_q.device), log_q, log_q.new_zeros(()))
        log_norm = log_q.logsumexp(site["infer"]["_enumerate_dim"], keepdim=True)
        total, normalizer = total + log_q - log_norm, normalizer + log_norm
    return total, normalizer


def analytic_kl_sites(vae) -> tuple[str, ...] | None:
    """The latent sites whose analytic KL may stand for log p - log q (``Structure.analytic_kl_sites``;
    ``None``: every site with a registered KL)."""
    return getattr(vae, "analytic_kl_sites", None)


def _analytic_kl_log_weights(guide_trace, model_trace, allowed: tuple[str, ...] | None) -> torch.Tensor:
    """log w with -KL(q || p) for each latent site in ``allowed`` (every one when None) that has one."""
    latent = latent_values(guide_trace)
    total = 0.0
    for site in sample_sites(model_trace):
        name = site["name"]
        if name not in latent:
            total = total + _site_log_density(site)
            continue
        q = guide_trace.nodes[name]["fn"]
        kl = _registered_kl(q, site["fn"]) if allowed is None or name in allowed else None
        if kl is not None:
            total = total - scale_and_mask(kl, site["scale"], site["mask"])
        else:
            log_ratio = site["fn"].log_prob(site["value"]) - q.log_prob(site["value"])
            total = total + scale_and_mask(log_ratio, site["scale"], site["mask"])
    return total


def _registered_kl(q, p) -> torch.Tensor | None:
    """KL(q || p) where torch registers it for the pair, else None."""
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        return None


def _site_log_density(site) -> torch.Tensor:
    return scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"])


def trace_log_density(trace, exclude: frozenset[str] | set[str] = frozenset()) -> torch.Tensor:
    """Sum over the trace's sample sites (those not in ``exclude``) of ``scale * mask * log_prob(value)``
    (per example, per particle)."""
    total = 0.0
    for site in sample_sites(trace):
        if site["name"] not in exclude:
            total = total + _site_log_density(site)
    return total


def sample_sites(trace) -> list[dict]:
    """The trace's sample sites, without the plates' subsample sites (which carry no density)."""
    return [site for site in trace.nodes.values() if site["type"] == "sample" and not site_is_subsample(site)]


def enumerated_sites(trace) -> set[str]:
    """The names of the sites of ``trace`` that ``poutine.enum`` enumerated (every value at once)."""
    return {site["name"] for site in sample_sites(trace) if site["infer"].get("_enumerate_dim") is not None}


def latent_values(trace, detach: bool = False) -> dict[str, torch.Tensor]:
    """name -> value of every latent (unobserved) sample site of ``trace``."""
    return {
        site["name"]: site["value"].detach() if detach else site["value"]
        for site in sample_sites(trace)
        if not site["is_observed"]
    }


def replayed_log_density(program, values: dict[str, torch.Tensor], x, k, beta, **data) -> torch.Tensor:
    """log density of ``program(x, beta)`` with its latent sites set to ``values``, shape ``(k, batch)``."""
    with pyro.plate("particles", k, dim=-2):
        trace = poutine.trace(poutine.condition(program, data=values)).get_trace(x, beta, **data)
    return trace_log_density(trace)


# -- the lean evaluation of the same sums (the training step's hot path) ------------------------------
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
    ``kl_sites`` restricts that to the sites it names (``Structure.analytic_kl_sites``; ``None``:
    every site). Terms are evaluated only when summed, so a log q that the KL replaces is never computed.
    """

    def __init__(
        self,
        replay: dict[str, torch.Tensor] | None = None,
        kl_from: SiteLogDensity | None = None,
        kl_sites: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__()
        self.replay, self.kl_from, self.kl_sites = replay, kl_from, kl_sites
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
        if guide_site is not None and self.kl_sites is not None and name not in self.kl_sites:
            guide_site = None  # the structure says -KL is not this site's expectation: log p at the draw
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


def _lean_elbo_loss(vae, x: torch.Tensor, beta, analytic_kl: bool, data: dict) -> torch.Tensor:
    """The guide under one :class:`SiteLogDensity`, the model replayed on its draws under another."""
    with module_registration(False):
        with SiteLogDensity() as guide:
            vae.guide(x, beta, **data)
        kl_from = guide if analytic_kl else None
        with SiteLogDensity(replay=guide.values, kl_from=kl_from, kl_sites=analytic_kl_sites(vae)) as model:
            vae.model(x, beta, **data)
    elbo, log_q = model.log_density(), guide.log_density(exclude=model.analytic)
    # meanfield with every latent's KL analytic leaves no log q: nothing to subtract.
    return -(elbo - log_q) if torch.is_tensor(log_q) else -elbo


def reparameterized_elbo_loss(vae, x: torch.Tensor, beta: float | torch.Tensor = 1.0, **data) -> torch.Tensor:
    """-(log p(x, z) - log q(z|x)) summed over the batch at one reparameterized draw z ~ q(z|x).

    The surrogate of Pyro's ``Trace_ELBO`` for fully reparameterized guides (there the score
    term is zero and the entropy term is log q), summed in the same site order, so value and
    gradient agree with ``Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, beta)`` to
    float rounding. Valid only where :func:`lean_loss_supported` says so.

    ``VAE``'s ``pyro.module`` calls are skipped (``module_registration(False)``): the messenger
    would answer their parameter sites with the modules' own parameters anyway, and the walk over
    the parameters costs about a tenth of a CPU step. The param store is left as it was.
    """
    return _lean_elbo_loss(vae, x, beta, False, data)


def meanfield_elbo_loss(vae, x: torch.Tensor, beta: float | torch.Tensor = 1.0, **data) -> torch.Tensor:
    """The surrogate of Pyro's ``TraceMeanField_ELBO``: -(log p(x|z) - KL(q(z|x) || p(z))) at one draw,
    with the analytic KL wherever torch has one for the pair, and log p(z) - log q(z|x) elsewhere.

    The same programs and messengers as :func:`reparameterized_elbo_loss`; value and gradient
    agree with ``TraceMeanField_ELBO().differentiable_loss`` to float rounding (tested), except
    that only the sites the structure allows (``Structure.analytic_kl_sites``) take the KL: there
    ``log_weights(..., analytic_kl=True)`` is the reference.
    """
    return _lean_elbo_loss(vae, x, beta, True, data)


@torch.no_grad()
def lean_loss_supported(vae, x: torch.Tensor, beta: float | torch.Tensor = 1.0, **data) -> tuple[bool, str]:
    """Whether :func:`reparameterized_elbo_loss` equals ``Trace_ELBO`` for this model and guide.

    Traces the programs once the way ``Trace_ELBO`` does (``get_importance_trace``: with Pyro
    validation on, this checks that model and guide sites match and have valid shapes; it also
    registers the ``pyro.module`` parameters in the param store) and checks: every guide site is a
    latent, reparameterized (``has_rsample``), not enumerated; every latent of the model is drawn
    by the guide; every ``pyro.module`` parameter is the param store's own tensor.
    Returns (ok, reason). Draws random numbers: call it under ``torch.random.fork_rng``.
    """
    model_trace, guide_trace = get_importance_trace("flat", math.inf, vae.model, vae.guide, (x, beta), data)
    guide_latents = set()
    for site in sample_sites(guide_trace):
        if site["is_observed"]:
            return False, f"the guide observes site {site['name']!r}"
        if not site["fn"].has_rsample:
            return False, f"guide site {site['name']!r} is not reparameterized"
        if site["infer"].get("enumerate"):
            return False, f"guide site {site['name']!r} is enumerated"
        guide_latents.add(site["name"])
    for site in sample_sites(model_trace):
        if not site["is_observed"] and site["name"] not in guide_latents:
            return False, f"model latent {site['name']!r} has no guide site"
    for trace in (guide_trace, model_trace):
        for site in trace.nodes.values():
            args = site.get("args", ())
            module_param = site["type"] == "param" and len(args) > 1 and isinstance(args[1], nn.Parameter)
            if module_param and site["value"] is not args[1]:
                return False, f"param store entry {site['name']!r} is not the module's parameter"
    return True, ""
