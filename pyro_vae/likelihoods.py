"""Likelihoods p(x|z), by name.

A likelihood is an ``nn.Module`` that turns the decoder's output into a Pyro distribution over
the flattened observation x with event shape ``(x_dim,)``. It declares how many decoder
outputs it needs per pixel (``params_per_pixel``), maps data in [0, 1] to what it observes
(``prepare``), gives E[x|z] in data units (``mean``, for reconstructions and samples), and
checks that data fits its support before anything trains (``check``: one ``ValueError`` that
says what is wrong and what this likelihood accepts).

=================================  ==========================================  ==========================
spec                               p(x_d | z)                                  data
=================================  ==========================================  ==========================
``bernoulli``                      Bernoulli(sigmoid(l))                       binary (warns on grey)
``continuous_bernoulli``           C(l) lambda^x (1-lambda)^(1-x)              [0, 1]
``gaussian(scale=S|"learned")``    N(mu, S^2)                                  real
``laplace(scale=S|"learned")``     Laplace(mu, S)                              real
``beta(eps=1e-3)``                 Beta(a, b) of x squeezed into [eps, 1-eps]  [0, 1]
``discretized_logistic(mixtures)`` logistic mixture integrated over 8-bit bins  multiples of 1/255 in [0, 1]
``categorical``                    Categorical(softmax(l)) over 256 levels     multiples of 1/255 in [0, 1]
=================================  ==========================================  ==========================
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import ClassVar

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution
from torch import nn

from pyro_vae.networks import inverse_softplus, output_head
from pyro_vae.registry import Registry
from pyro_vae.specs import integer_arg

LIKELIHOODS: Registry[nn.Module] = Registry("likelihood")

LEVELS = 256  # 8-bit images: the grey levels k / 255, k = 0..255


class Likelihood(nn.Module):
    """Base class. Subclasses set ``params_per_pixel`` and ``accepts`` and implement ``forward``.

    The decoder output of shape ``(..., x_dim * params_per_pixel)`` is read as
    ``params_per_pixel`` consecutive blocks of ``x_dim`` (``split_params``).
    """

    params_per_pixel: int = 1
    accepts: str = "floats in [0, 1]"  # in check's error message
    needs_unit_range: bool = True

    def __init__(self, x_dim: int) -> None:
        super().__init__()
        self.x_dim = x_dim

    @property
    def out_dim(self) -> int:
        """Width of the decoder's output layer."""
        return self.x_dim * self.params_per_pixel

    def head(self, body: nn.Module, x_shape: Sequence[int]) -> nn.Module:
        """The decoder's head: the outputs of ``body`` -> the ``out_dim`` parameters this likelihood reads, for
        data of event shape ``x_shape`` (a linear layer on flat features, a 1x1 convolution on a feature map:
        ``networks.output_head``)."""
        if math.prod(x_shape) != self.x_dim:
            raise ValueError(f"event shape {tuple(x_shape)} holds {math.prod(x_shape)} values, not x_dim {self.x_dim}")
        return output_head(body, x_shape, self.params_per_pixel)

    def split_params(self, params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The ``params_per_pixel`` blocks of shape ``(..., x_dim)``."""
        return params.split(self.x_dim, dim=-1)

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        """p(x|z) from the decoder output ``params`` of shape ``(..., out_dim)``."""
        raise NotImplementedError

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The value observed at site ``"x"`` for data ``x`` in [0, 1]; identity by default."""
        return x

    def unprepare(self, value: torch.Tensor) -> torch.Tensor:
        """Data x whose observed value ``prepare(x)`` is ``value`` (a draw of this likelihood, e.g. data simulated
        from the model); identity by default."""
        return value

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """E[x|z] in data units ([0, 1]), for reconstructions and samples."""
        return self(params).mean

    def expectation(self, pixels: dist.Distribution) -> torch.Tensor:
        """E[x|z] in data units, exactly (no clipping for display), from the distribution this likelihood
        returned, masked or not (:func:`observe_pixels`): what an imputation averages (``pyro_vae.impute``)."""
        return pixels.mean

    def data_units(self, value: torch.Tensor) -> torch.Tensor:
        """A value of the site ``"x"`` (a draw of the distribution) in data units: the inverse of :meth:`prepare`
        where it has one (the identity by default; ``beta``'s squeeze is left as drawn, inside [eps, 1 - eps])."""
        return value

    def _fail(self, name: str, problem: str) -> None:
        spec = getattr(self, "spec", type(self).__name__)
        raise ValueError(f"{name} {problem}; likelihood {spec!r} accepts {self.accepts}, shape (batch, {self.x_dim})")

    def check(self, x: torch.Tensor, name: str = "data") -> None:
        """Raise ``ValueError`` when ``x`` cannot be modelled by this likelihood (shape, dtype, range)."""
        if x.dim() < 2 or x[0].numel() != self.x_dim:
            self._fail(name, f"has shape {tuple(x.shape)}")
        if not torch.is_floating_point(x):
            self._fail(name, f"has dtype {x.dtype}")
        if not torch.isfinite(x).all():
            self._fail(name, "has NaN or infinite values")
        if self.needs_unit_range:
            lo, hi = x.min().item(), x.max().item()
            if lo < 0 or hi > 1:
                self._fail(name, f"has values in [{lo:g}, {hi:g}]")


class EightBitLikelihood(Likelihood):
    """A likelihood of 8-bit images: data must be grey levels k / 255 (MNIST, CIFAR-10; binary data too)."""

    accepts = "8-bit grey levels k/255 (k = 0..255) in [0, 1]"

    def check(self, x: torch.Tensor, name: str = "data") -> None:
        super().check(x, name)
        # float32 holds k/255 to ~1e-7 relative; anything off the grid by 1e-3 of a level is not 8-bit.
        off = (x * (LEVELS - 1) - (x * (LEVELS - 1)).round()).abs().max().item()
        if off > 1e-3:
            self._fail(name, f"is not on the 8-bit grid (a value is {off:.3g} levels from k/255)")


@torch.library.custom_op("pyro_vae::bernoulli_log_density_cpu", mutates_args=(), device_types="cpu")
def _bernoulli_log_density_cpu(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """sum_d x_d l_d - softplus(l_d) over the last dimension, softplus(l) = max(l, 0) + log(1 + e^-|l|).

    Why not ``binary_cross_entropy_with_logits``: on the CPU torch evaluates log1p (and with it
    log-sigmoid, softplus and that cross-entropy) about 8x slower than log (10.7 vs 1.3 ms on
    1600 x 784 floats, one thread, AMD EPYC; ``benchmarks/bernoulli_log_density.py``), and it was 40%
    of an AIS gradient evaluation. log(1 + u) for u = e^-|l| in (0, 1] is off from log1p(u) by at most
    half an ulp of 1 (6e-8) per pixel, below the rounding of the float32 sum over the pixels; x l -
    max(l, 0) is formed first, exactly 0 where x agrees with the sign of l, so that a large l cannot
    absorb the small log(1 + u). A registered operator (not an ``autograd.Function``) so that the
    recorded loss (``pyro_vae.recorded``) keeps it as one node with its exact backward,
    (x - sigmoid(l)) for the logits and l for x, instead of differentiating the in-place arithmetic.
    """
    log_density = torch.addcmul(logits.clamp(min=0).neg_(), value, logits)
    # in place: a fresh (N, D) tensor costs as much as the arithmetic on it
    return log_density.sub_(logits.abs().neg_().exp_().add_(1).log_()).sum(-1)


@_bernoulli_log_density_cpu.register_fake
def _(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return logits.new_empty(logits.shape[:-1])


def _bernoulli_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _bernoulli_backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    logits, value = ctx.saved_tensors
    grad = grad.unsqueeze(-1)
    grad_logits = grad * (value - torch.sigmoid(logits)) if ctx.needs_input_grad[0] else None
    grad_value = grad * logits if ctx.needs_input_grad[1] else None
    return grad_logits, grad_value


_bernoulli_log_density_cpu.register_autograd(_bernoulli_backward, setup_context=_bernoulli_setup)


def bernoulli_log_density(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """log prod_d Bernoulli(x_d; sigmoid(l_d)) = sum_d x_d l_d - softplus(l_d), summed over the last dimension.

    The CPU has its own kernel (:func:`_bernoulli_log_density_cpu`); CUDA keeps torch's fused
    cross-entropy kernel (one kernel against five), and so does a ``torch.jit`` trace (Pyro's
    ``JitTrace_ELBO``).
    """
    if logits.device.type == "cpu" and not torch.jit.is_tracing():
        return _bernoulli_log_density_cpu(logits, value)
    return -F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1)


class IndependentBernoulli(dist.Independent):
    """prod_d Bernoulli(x_d; sigmoid(logits_d)) over the last dimension: ``Bernoulli(logits).to_event(1)``.

    The same distribution; only ``log_prob`` is cheaper (:func:`bernoulli_log_density`). torch
    negates the per-pixel cross-entropies and ``Independent`` then sums them; here the density is
    summed over the pixels as it is formed, one number per example instead of one per pixel (on a
    128 x 784 batch that saved a negation and its backward, about 1.5% of a CPU training step), and on
    the CPU without torch's slow ``log1p``: the values agree with torch's to float32 rounding.
    """

    def __init__(self, logits: torch.Tensor, validate_args: bool | None = None) -> None:
        super().__init__(dist.Bernoulli(logits=logits, validate_args=validate_args), 1, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(IndependentBernoulli, _instance)
        return super().expand(batch_shape, _instance=new)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits = self.base_dist.logits
        if logits.shape != value.shape:
            logits, value = torch.broadcast_tensors(logits, value)
        return bernoulli_log_density(logits, value)


def observe_pixels(pixels: dist.Distribution, mask: torch.Tensor | None) -> dist.Distribution:
    """``pixels`` (independent pixels, event shape ``(D,)``) scoring only the pixels where ``mask`` is True:

        log p(x_obs | z) = sum_{d : mask_d} log p_d(x_d | z),

    so the value of x at an unobserved pixel never matters (it need not even be known). Every likelihood here
    returns such an ``Independent`` distribution; its per-pixel base is masked (Pyro's ``MaskedDistribution``,
    ``base.mask(mask)``) and summed again. Draws and means are still those of every pixel. ``mask=None``
    returns ``pixels`` itself: the fully observed model, with not one operation more.

    The one masking mechanism of the library: missing data (``pyro_vae.structures.miwae``) and the conditional
    models' predicted pixels (``pyro_vae.structures.cvae``) both use it.
    """
    if mask is None:
        return pixels
    if not isinstance(pixels, dist.Independent) or pixels.reinterpreted_batch_ndims != 1:
        raise ValueError(f"observing some pixels needs a likelihood of independent pixels, got {type(pixels).__name__}")
    return dist.Independent(dist.MaskedDistribution(pixels.base_dist, mask), 1)


def per_pixel(pixels: dist.Distribution) -> dist.Distribution:
    """The per-pixel distributions (batch shape ``(..., D)``) under the ``Independent`` and the mask of
    :func:`observe_pixels`."""
    while isinstance(pixels, (dist.Independent, dist.MaskedDistribution)):
        pixels = pixels.base_dist
    return pixels


@LIKELIHOODS.register("bernoulli")
class BernoulliLikelihood(Likelihood):
    """p(x|z) = prod_d Bernoulli(x_d; sigmoid(logits_d)), on logits for stability.

    On binary data this is a likelihood. On grey levels in [0, 1] the same formula is the
    negative binary cross-entropy (what Pyro's VAE tutorial optimizes); it is not a normalized
    density of grey levels, so the number is not a log-likelihood, and ``check`` warns.
    """

    accepts = "binary floats {0, 1} (grey levels in [0, 1] with a warning)"

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        # validate_args=False: grey-level observations are allowed (and warned about in check).
        return IndependentBernoulli(params, validate_args=False)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params)

    def check(self, x: torch.Tensor, name: str = "data") -> None:
        super().check(x, name)
        if not ((x == 0) | (x == 1)).all():
            warnings.warn(
                f"{name} is not binary: a Bernoulli likelihood on grey levels gives a cross-entropy, "
                "not a log-likelihood (use mnist-dynamic or mnist-static for likelihood numbers)",
                stacklevel=2,
            )


# -- continuous Bernoulli ----------------------------------------------------------------------
# Below this |logit| the normalizer and mean use their Taylor series: the closed forms are 0/0 at
# logit 0, and the series' next terms (x^6 / 2835, eta^3 / 720) are below 1e-12 there.
CB_TAYLOR_LOGIT = 1e-2


def continuous_bernoulli_log_norm(logits: torch.Tensor) -> torch.Tensor:
    """log C(lambda) for lambda = sigmoid(eta), eta = ``logits`` (Loaiza-Ganem & Cunningham 2019, eq. 7).

    C(lambda) = 2 artanh(1 - 2 lambda) / (1 - 2 lambda) for lambda != 1/2, and 2 at 1/2. In logits,
    1 - 2 lambda = -tanh(eta/2) and 2 artanh(1 - 2 lambda) = -eta, so C = eta / tanh(eta/2):
    exact for every eta (no cancellation in 1 - lambda). Near eta = 0, with x = eta/2,
    log C = log 2 + log(x / tanh x) = log 2 + x^2/3 - 7 x^4/90 + O(x^6).
    """
    small = logits.abs() < CB_TAYLOR_LOGIT
    safe = torch.where(small, torch.ones_like(logits), logits)  # keeps the unused branch (and its grad) finite
    exact = torch.log(safe.abs()) - torch.log(torch.tanh(safe.abs() / 2))
    x2 = (logits / 2).square()
    taylor = math.log(2.0) + x2 / 3 - 7 * x2.square() / 90
    return torch.where(small, taylor, exact)


class ContinuousBernoulli(dist.ContinuousBernoulli):
    """Pyro's continuous Bernoulli with the log-normalizer and mean computed from the logits.

    torch computes them from lambda (through log1p(-lambda)), which loses digits as lambda -> 1;
    here log p(x) = x eta - softplus(eta) + log C(eta) and
    E[x] = sigmoid(eta) / tanh(eta/2) - 1/eta (1/2 + eta/12 - eta^3/720 near eta = 0).
    Sampling is torch's inverse CDF.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits, value = torch.broadcast_tensors(self.logits, value)
        return value * logits - F.softplus(logits) + continuous_bernoulli_log_norm(logits)

    @property
    def mean(self) -> torch.Tensor:
        eta = self.logits
        small = eta.abs() < CB_TAYLOR_LOGIT
        safe = torch.where(small, torch.ones_like(eta), eta)
        exact = torch.sigmoid(safe) / torch.tanh(safe / 2) - 1 / safe
        return torch.where(small, 0.5 + eta / 12 - eta.pow(3) / 720, exact)


@LIKELIHOODS.register("continuous_bernoulli")
class ContinuousBernoulliLikelihood(Likelihood):
    """p(x|z) = prod_d C(lambda_d) lambda_d^x_d (1 - lambda_d)^(1 - x_d), x_d in [0, 1], lambda = sigmoid(l).

    The continuous Bernoulli (Loaiza-Ganem & Cunningham 2019, "The continuous Bernoulli: fixing
    a pervasive error in variational autoencoders"): the Bernoulli formula with its normalizing
    constant C(lambda), so a proper density on grey levels. Stable at lambda = 1/2 and in the tails.
    """

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        return ContinuousBernoulli(logits=params).to_event(1)


# -- location-scale families -------------------------------------------------------------------
class LocationScaleLikelihood(Likelihood):
    """p(x|z) = prod_d family(x_d; mu_d(z), s_d): the decoder gives mu, the scale s is fixed or learned.

    ``scale`` a positive number: fixed s. ``scale="learned"``: s = softplus(raw) + ``min_scale``,
    one global s or, with ``per_pixel=True``, one s_d per pixel, registered with the likelihood
    (``pyro.module("likelihood", ...)``) so SVI learns it. ``min_scale`` bounds the density: on
    8-bit data a pixel that is always 0 would otherwise shrink s to 0 and log p(x) to infinity
    (a density of discrete data is not a likelihood of it). Observes real x; ``mean`` clips to
    [0, 1] for display. Subclasses set ``family`` (a Pyro location-scale distribution).
    """

    family: type[dist.Distribution] = dist.Normal
    accepts = "finite real floats"
    needs_unit_range = False

    def __init__(
        self,
        x_dim: int,
        scale: float | str = 1.0,
        per_pixel: bool = False,
        init_scale: float = 1.0,
        min_scale: float = 1e-3,
    ) -> None:
        super().__init__(x_dim)
        if scale == "learned":
            if not (init_scale > min_scale >= 0):
                raise ValueError(f"need init_scale > min_scale >= 0, got {init_scale!r}, {min_scale!r}")
            shape = (x_dim,) if per_pixel else ()
            self.raw_scale = nn.Parameter(torch.full(shape, inverse_softplus(init_scale - min_scale)))
            self.min_scale = min_scale
        elif isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0:
            if per_pixel:
                raise ValueError("per_pixel applies to scale='learned' only")
            self.register_buffer("fixed_scale", torch.tensor(float(scale)))
        else:
            raise ValueError(f"scale must be a positive number or 'learned', got {scale!r}")

    @property
    def scale(self) -> torch.Tensor:
        """s: a scalar, or ``(x_dim,)`` when learned per pixel."""
        if hasattr(self, "fixed_scale"):
            return self.fixed_scale
        return F.softplus(self.raw_scale) + self.min_scale

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        return self.family(params, self.scale.expand(params.shape)).to_event(1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return params.clamp(0.0, 1.0)


@LIKELIHOODS.register("gaussian")
class GaussianLikelihood(LocationScaleLikelihood):
    """p(x|z) = prod_d N(x_d; mu_d(z), s^2), s fixed or learned (``LocationScaleLikelihood``).

    With a linear decoder and a fixed s this is the linear-Gaussian model (probabilistic PCA,
    Tipping & Bishop 1999), whose log p(x) and posterior are exact: the tests' reference.
    """

    family = dist.Normal


@LIKELIHOODS.register("laplace")
class LaplaceLikelihood(LocationScaleLikelihood):
    """p(x|z) = prod_d Laplace(x_d; mu_d(z), b) = exp(-|x_d - mu_d| / b) / (2 b), b fixed or learned.

    An L1 reconstruction error (sharper reconstructions than L2), as a proper density.
    """

    family = dist.Laplace


@LIKELIHOODS.register("beta")
class BetaLikelihood(Likelihood):
    """p(x|z) = prod_d Beta(x~_d; a_d(z), b_d(z)) with x~ = clamp(x, eps, 1 - eps).

    The Beta density lives on (0, 1) and is 0 or infinite at the ends, where 8-bit images put most
    pixels (MNIST is ~80% exact zeros), so the observed value is x squeezed into [eps, 1 - eps].
    eps = 1e-3 by default: a quarter of a grey level (1/255 = 3.9e-3), so no level moves past its
    neighbour, while log x~ = -6.9 keeps the density at the ends bounded for moderate a, b.
    The number is a density of the squeezed data and depends on eps: compare Beta runs only at
    equal eps, and not with discrete likelihoods. The decoder gives a = softplus(.) + 1e-4 and
    b = softplus(.) + 1e-4 (two outputs per pixel); E[x|z] = a / (a + b).
    """

    params_per_pixel = 2

    def __init__(self, x_dim: int, eps: float = 1e-3) -> None:
        super().__init__(x_dim)
        if not 0 < eps < 0.5:
            raise ValueError(f"eps must lie in (0, 0.5), got {eps!r}")
        self.eps = float(eps)

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        raw_a, raw_b = self.split_params(params)
        return dist.Beta(F.softplus(raw_a) + 1e-4, F.softplus(raw_b) + 1e-4).to_event(1)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(self.eps, 1.0 - self.eps)


# -- 8-bit likelihoods -------------------------------------------------------------------------
class DiscretizedLogisticMixture(TorchDistribution):
    """A mixture of M logistics integrated over the 256 bins of 8-bit data in [0, 1] (PixelCNN++).

    Salimans et al. 2017 ("PixelCNN++", Section 2.1). Level x = k/255 owns the bin
    [x - 1/510, x + 1/510], except that the bin of 0 extends to -inf and that of 1 to +inf:

        P(x) = sum_m pi_m [F_m(x + 1/510) - F_m(x - 1/510)],   F_m(t) = sigmoid((t - mu_m) / s_m),

    with the edges F_m(-inf) = 0 and F_m(+inf) = 1. The difference of sigmoids is evaluated
    without cancellation as sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - e^(b - a)),
    so no threshold or mid-point fallback is needed. ``logits``, ``locs``, ``log_scales`` have
    shape ``(*batch, M)``; values have shape ``batch`` (one pixel each).
    """

    arg_constraints: ClassVar[dict] = {
        "logits": constraints.real_vector,
        "locs": constraints.real_vector,
        "log_scales": constraints.real_vector,
    }
    support = constraints.unit_interval
    half_bin = 0.5 / (LEVELS - 1)

    def __init__(self, logits, locs, log_scales, validate_args=None) -> None:
        self.logits, self.locs, self.log_scales = torch.broadcast_tensors(logits, locs, log_scales)
        super().__init__(self.logits.shape[:-1], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape) + self.logits.shape[-1:]
        return DiscretizedLogisticMixture(
            self.logits.expand(shape), self.locs.expand(shape), self.log_scales.expand(shape), validate_args=False
        )

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        value = value.unsqueeze(-1)
        inv_scale = torch.exp(-self.log_scales)
        upper = (value + self.half_bin - self.locs) * inv_scale  # a
        lower = (value - self.half_bin - self.locs) * inv_scale  # b
        interior = F.logsigmoid(upper) + F.logsigmoid(-lower) + torch.log(-torch.expm1(lower - upper))
        at_zero, at_one = value <= self.half_bin, value >= 1 - self.half_bin
        log_mass = torch.where(at_zero, F.logsigmoid(upper), torch.where(at_one, F.logsigmoid(-lower), interior))
        return torch.logsumexp(torch.log_softmax(self.logits, -1) + log_mass, dim=-1)

    def sample(self, sample_shape=()) -> torch.Tensor:
        sample_shape = torch.Size(sample_shape)
        with torch.no_grad():
            shape = self._extended_shape(sample_shape)
            component = dist.Categorical(logits=self.logits).sample(sample_shape).unsqueeze(-1)
            loc = self.locs.expand(shape + self.locs.shape[-1:]).gather(-1, component).squeeze(-1)
            log_scale = self.log_scales.expand(shape + self.locs.shape[-1:]).gather(-1, component).squeeze(-1)
            u = torch.rand(shape, dtype=loc.dtype, device=loc.device).clamp(1e-6, 1 - 1e-6)
            t = loc + log_scale.exp() * (u.log() - (-u).log1p())  # logistic inverse CDF
            return (t.clamp(0.0, 1.0) * (LEVELS - 1)).round() / (LEVELS - 1)

    @property
    def mean(self) -> torch.Tensor:
        """E[x] = sum_{k=1}^{255} P(x >= k/255) / 255 = 1/255 sum_k sum_m pi_m sigmoid((mu_m - (k - 1/2)/255) / s_m)."""
        weights = torch.softmax(self.logits, -1)
        inv_scale = torch.exp(-self.log_scales)
        total = torch.zeros_like(self.locs)
        for k in range(1, LEVELS):  # a loop, not a (..., M, 255) tensor: bounded memory for display
            total = total + torch.sigmoid((self.locs - (k - 0.5) / (LEVELS - 1)) * inv_scale)
        return (weights * total).sum(-1) / (LEVELS - 1)


@LIKELIHOODS.register("discretized_logistic")
class DiscretizedLogisticLikelihood(EightBitLikelihood):
    """p(x|z) = prod_d DiscretizedLogisticMixture(x_d; pi_d(z), mu_d(z), s_d(z)) (Salimans et al. 2017).

    ``mixtures`` = M components per pixel: the decoder gives 3M outputs per pixel (mixture
    logits, locations, log-scales; log-scales floored at -7 as in PixelCNN++). A proper
    likelihood of 8-bit data, comparable with ``categorical`` and in bits/dim.
    """

    def __init__(self, x_dim: int, mixtures: int = 5) -> None:
        super().__init__(x_dim)
        self.mixtures = integer_arg("mixtures", mixtures)
        self.params_per_pixel = 3 * self.mixtures

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        per_pixel = params.reshape(*params.shape[:-1], 3, self.mixtures, self.x_dim).transpose(-1, -2)
        logits, locs, log_scales = per_pixel.unbind(-3)  # each (..., x_dim, M)
        return DiscretizedLogisticMixture(logits, locs, log_scales.clamp(min=-7.0)).to_event(1)


@LIKELIHOODS.register("categorical")
class CategoricalLikelihood(EightBitLikelihood):
    """p(x|z) = prod_d Categorical(255 x_d; softmax(l_d(z))), 256 classes per pixel.

    The most flexible per-pixel 8-bit likelihood (van den Oord et al. 2016, "Pixel recurrent
    neural networks", used a 256-way softmax): no ordering of the levels is assumed. The decoder
    gives 256 logits per pixel; ``prepare`` maps x in [0, 1] to the level round(255 x).
    """

    params_per_pixel = LEVELS

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        logits = params.reshape(*params.shape[:-1], LEVELS, self.x_dim).transpose(-1, -2)
        return dist.Categorical(logits=logits).to_event(1)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return (x * (LEVELS - 1)).round().long()

    def unprepare(self, value: torch.Tensor) -> torch.Tensor:
        return value / (LEVELS - 1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return self.expectation(self(params))

    def expectation(self, pixels: dist.Distribution) -> torch.Tensor:
        """sum_k P(level k) k / 255: the levels' mean in data units (torch's ``Categorical.mean`` is NaN)."""
        probs = per_pixel(pixels).probs
        levels = torch.arange(LEVELS, dtype=probs.dtype, device=probs.device) / (LEVELS - 1)
        return probs @ levels

    def data_units(self, value: torch.Tensor) -> torch.Tensor:
        """Level k -> k / 255."""
        return value / (LEVELS - 1)


def build_likelihood(spec, x_dim: int) -> nn.Module:
    """Build a likelihood from a spec such as ``"bernoulli"`` or ``"gaussian(scale=0.1)"``."""
    return LIKELIHOODS.build(spec, x_dim=x_dim)
