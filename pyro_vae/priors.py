"""Priors p(z), by name.

A prior is an ``nn.Module`` whose ``forward(encoder)`` returns a Pyro distribution over z with
event shape ``(z_dim,)`` and batch shape ``()``; inside ``pyro.plate`` Pyro broadcasts it to the
plates' shape (the data plate, and a particle plate for vectorized particles). The encoder (the
guide's module) is passed in because some priors are defined through it (the VampPrior mixes
the encoder's posteriors at learned pseudo-inputs); the others ignore it. Learnable parameters
are ordinary module parameters: the model registers the prior with ``pyro.module("prior", ...)``
so SVI learns them.

========================  ==========================================================  =============================
spec                      p(z)                                                        reference
========================  ==========================================================  =============================
``normal``                N(0, I)                                                     Kingma & Welling 2014
``learned_normal``        N(m, diag(s^2)), m and s learned                            --
``mixture(components=K)`` sum_k pi_k N(m_k, diag(s_k^2)), all learned                 e.g. Dilokthanakul et al. 2016
``vamp(components=K)``    1/K sum_k q(z | u_k), pseudo-inputs u_k learned             Tomczak & Welling 2018
``flow(kind, layers)``    z = f(e), e ~ N(0, I), f a stack of Pyro transforms         Papamakarios et al. 2017/2021
========================  ==========================================================  =============================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
import torch.nn.functional as F
from torch import nn

# MIN_SCALE floors learned prior scales too: a component that collapses onto a point would make
# log p(z) unbounded.
from pyro_vae.mixtures import DiagonalGaussianMixture
from pyro_vae.networks import MIN_SCALE, inverse_softplus
from pyro_vae.registry import Registry
from pyro_vae.specs import closest, integer_arg, widths_arg

PRIORS: Registry[nn.Module] = Registry("prior")


class Prior(nn.Module):
    """Base class: ``forward(encoder=None)`` returns p(z) with event shape ``(z_dim,)``."""

    #: Non-empty for priors that collapse without KL warm-up: the training loop warns with this text.
    needs_warmup: str = ""

    def __init__(self, z_dim: int) -> None:
        super().__init__()
        self.z_dim = z_dim

    def forward(self, encoder: nn.Module | None = None) -> dist.Distribution:
        raise NotImplementedError


class DiagonalGaussian(nn.Module):
    """Learned diagonal Gaussians N(loc, diag(scale^2)) with ``scale = softplus(raw) + MIN_SCALE``.

    ``shape = (*batch, z_dim)``: ``(z_dim,)`` is one Gaussian, ``(K, z_dim)`` the K components of a
    mixture. The one parametrization shared by ``learned_normal`` and ``mixture``.
    """

    def __init__(self, shape: Sequence[int], loc_init_std: float = 0.0, scale_init: float = 1.0) -> None:
        super().__init__()
        self.loc = nn.Parameter(loc_init_std * torch.randn(*shape))
        self.raw_scale = nn.Parameter(torch.full(tuple(shape), inverse_softplus(scale_init - MIN_SCALE)))

    @property
    def scale(self) -> torch.Tensor:
        return F.softplus(self.raw_scale) + MIN_SCALE

    def forward(self) -> dist.Distribution:
        """prod_j N(z_j; loc_j, scale_j^2): batch shape ``shape[:-1]``, event shape ``(z_dim,)``."""
        return dist.Normal(self.loc, self.scale).to_event(1)


@PRIORS.register("normal")
class StandardNormal(Prior):
    """p(z) = N(0, I), the default (Kingma & Welling 2014)."""

    def __init__(self, z_dim: int) -> None:
        super().__init__(z_dim)
        # Buffers, not constants, so that ``vae.to(device)`` moves them.
        self.register_buffer("loc", torch.zeros(z_dim))
        self.register_buffer("scale", torch.ones(z_dim))

    def forward(self, encoder: nn.Module | None = None) -> dist.Distribution:
        return UnitNormal(self.loc, self.scale).to_event(1)


# log sqrt(2 pi), as torch.distributions.Normal computes it (the lean loss's log q uses it too).
LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


class UnitNormal(dist.Normal):
    """``Normal(loc, scale)`` for ``loc = 0``, ``scale = 1`` (the caller's zeros and ones, which
    :class:`StandardNormal` keeps as buffers), with log N(z; 0, 1) = -z^2/2 - log sqrt(2 pi).

    ``Normal.log_prob`` evaluates -(z - loc)^2 / (2 scale^2) - log scale - log sqrt(2 pi) on the
    prior broadcast to the batch: five more elementwise operations (and the autograd nodes of the
    two on z) for the same numbers, bit for bit. Everything else (sampling, KL dispatch, ``expand``)
    is ``Normal``'s.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        log_p = -(value.square() / 2) - LOG_SQRT_2PI
        if log_p.shape != self.batch_shape:
            log_p = log_p.expand(torch.broadcast_shapes(log_p.shape, self.batch_shape))
        return log_p


@PRIORS.register("learned_normal")
class LearnedNormal(Prior):
    """p(z) = N(m, diag(s^2)) with m and s > 0 learned (initialized at N(0, I)).

    With a diagonal-Gaussian guide the KL is analytic (``closed_form.gaussian_kl_diagonal``). It
    can only shift and rescale the latent axes, which the decoder could absorb; it is the
    simplest learned prior and a check that prior parameters train.
    """

    def __init__(self, z_dim: int) -> None:
        super().__init__(z_dim)
        self.gaussian = DiagonalGaussian((z_dim,))

    def forward(self, encoder: nn.Module | None = None) -> dist.Distribution:
        return self.gaussian()


@PRIORS.register("mixture")
class GaussianMixture(Prior):
    """p(z) = sum_k pi_k N(z; m_k, diag(s_k^2)), a learned mixture of K diagonal Gaussians.

    Weights pi = softmax(logits), locations and scales are learned; the locations start at
    N(0, I) draws (so that the components differ) and the scales at 1. As in
    Dilokthanakul et al. 2016 ("Deep unsupervised clustering with Gaussian mixture VAEs"), and
    the learned-mixture baseline of Tomczak & Welling 2018. No analytic KL to a Gaussian guide:
    the estimators use Monte Carlo.
    """

    def __init__(self, z_dim: int, components: int = 10) -> None:
        super().__init__(z_dim)
        self.components = integer_arg("components", components)
        self.gaussians = DiagonalGaussian((self.components, z_dim), loc_init_std=1.0)
        self.logits = nn.Parameter(torch.zeros(self.components))

    def forward(self, encoder: nn.Module | None = None) -> dist.Distribution:
        return DiagonalGaussianMixture(self.logits, self.gaussians.loc, self.gaussians.scale)


@PRIORS.register("vamp")
class VampPrior(Prior):
    """VampPrior (Tomczak & Welling 2018, "VAE with a VampPrior", eq. 9):

        p(z) = 1/K sum_k q(z | u_k),

    the uniform mixture of the encoder's diagonal-Gaussian posteriors at K learned pseudo-inputs
    u_k of the data's event shape ``x_shape``. The pseudo-inputs are trained with everything else
    (gradients reach them and the encoder through log p(z)). As in the authors' code, a
    pseudo-input is ``hardtanh(w, 0, 1)`` of a free parameter w, so that it stays in the data's
    range [0, 1], with w initialized at N(``init_mean``, ``init_std``^2): default 0.05 and 0.01,
    the scale of the authors' initialization, with a mean inside (0, 1) because hardtanh has no
    gradient outside it (near-black images that learn their shape).

    Needs a guide with ``gaussian_params`` (the diagonal ``normal`` guide); any other guide is
    an error when the prior is first evaluated.

    It needs KL warm-up and an encoder that sees x from the start (``model.init = "he"`` for tanh
    networks): an encoder that ignores x makes every q(z|x) and every q(z|u_k) the same Gaussian,
    KL = 0 at any scale, an optimum no fixed prior has; at beta = 1 from the first step training
    falls into it (docs/families.md). The training loop warns when ``train.warmup_epochs`` is 0.
    """

    needs_warmup = (
        "the VampPrior collapses onto an encoder that ignores x without KL warm-up "
        "(Tomczak & Welling 2018 warm up for 100 epochs); set train.warmup_epochs"
    )

    def __init__(
        self,
        z_dim: int,
        x_shape: Sequence[int],
        components: int = 500,
        init_mean: float = 0.05,
        init_std: float = 0.01,
    ) -> None:
        super().__init__(z_dim)
        components = integer_arg("components", components)
        if not 0 < init_mean < 1:
            # hardtanh has zero gradient outside (0, 1): pseudo-inputs started there never learn.
            raise ValueError(f"init_mean must lie in (0, 1), got {init_mean!r}")
        self.components, self.x_shape = int(components), tuple(x_shape)
        # Flat, (K, D), like the data's rows and the checkpoints before event shapes reached the encoder.
        self.raw_pseudo_inputs = nn.Parameter(init_mean + init_std * torch.randn(self.components, math.prod(x_shape)))
        self.register_buffer("logits", torch.zeros(self.components))

    @property
    def pseudo_inputs(self) -> torch.Tensor:
        """u_k in [0, 1], flat: shape ``(K, D)`` like the data's rows; the encoder receives them in ``x_shape``."""
        return F.hardtanh(self.raw_pseudo_inputs, 0.0, 1.0)

    def forward(self, encoder: nn.Module | None = None) -> dist.Distribution:
        if encoder is None or not hasattr(encoder, "gaussian_params"):
            raise ValueError("the vamp prior is defined through the encoder: call prior(encoder)")
        try:
            loc, scale = encoder.gaussian_params(self.pseudo_inputs.reshape(self.components, *self.x_shape))
        except ValueError as err:
            raise ValueError(
                f"prior 'vamp' mixes diagonal-Gaussian posteriors q(z|u_k), but {err}; use guide='normal' with it"
            ) from err
        return DiagonalGaussianMixture(self.logits, loc, scale)


class FlowKind:
    """One kind of flow layer: ``make(z_dim, hidden_dims, **kw)`` builds a Pyro ``TransformModule``.

    ``autoregressive`` layers have a sequential inverse; the prior uses them in the inverse
    direction (density in one parallel pass, as in MAF, Papamakarios et al. 2017), which makes
    log p(z) -- what training needs -- cheap and sampling sequential.
    """

    def __init__(self, make: Callable[..., T.TransformModule], autoregressive: bool, min_dim: int = 1) -> None:
        self.make, self.autoregressive, self.min_dim = make, autoregressive, min_dim


FLOW_KINDS: dict[str, FlowKind] = {
    # Neural spline flows, Durkan et al. 2019 (coupling: half the dimensions condition the rest).
    "spline": FlowKind(lambda d, h, **kw: T.spline_coupling(d, hidden_dims=h, **kw), False, min_dim=2),
    "spline_autoregressive": FlowKind(lambda d, h, **kw: T.spline_autoregressive(d, hidden_dims=h, **kw), True, 2),
    # MAF / IAF-style affine autoregressive layers, Papamakarios et al. 2017, Kingma et al. 2016.
    "affine_autoregressive": FlowKind(lambda d, h, **kw: T.affine_autoregressive(d, hidden_dims=h, **kw), True, 2),
    # RealNVP, Dinh et al. 2017.
    "affine_coupling": FlowKind(lambda d, h, **kw: T.affine_coupling(d, hidden_dims=h, **kw), False, min_dim=2),
}


@PRIORS.register("flow")
class FlowPrior(Prior):
    """p(z) = N(e; 0, I) |det d f^{-1}/dz| with z = f(e) = f_L o ... o f_1(e) (a normalizing flow;
    Rezende & Mohamed 2015; Papamakarios et al. 2021 for a review).

    Each f_l is a learned transform from ``pyro.distributions.transforms``, chosen by ``kind``:
    ``spline`` (neural spline coupling, Durkan et al. 2019), ``spline_autoregressive``,
    ``affine_autoregressive`` (MAF, Papamakarios et al. 2017) or ``affine_coupling`` (RealNVP,
    Dinh et al. 2017); ``hidden_dims`` are the widths of each layer's conditioner network
    (Pyro's default when None) and ``options`` go to Pyro's helper (e.g. ``count_bins`` for
    splines). A fixed random permutation of the coordinates between layers lets every
    coordinate depend on every other one. The layers are ``nn.Module`` s in a ``ModuleList``, so
    ``pyro.module("prior", ...)`` registers them.
    """

    def __init__(
        self,
        z_dim: int,
        kind: str = "spline",
        layers: int = 2,
        hidden_dims: Sequence[int] | None = None,
        options: dict | None = None,
    ) -> None:
        super().__init__(z_dim)
        if kind not in FLOW_KINDS:
            raise ValueError(f"unknown flow kind {kind!r}{closest(kind, FLOW_KINDS)}; valid: {', '.join(FLOW_KINDS)}")
        self.kind = FLOW_KINDS[kind]
        if z_dim < self.kind.min_dim:
            raise ValueError(f"flow kind {kind!r} needs z_dim >= {self.kind.min_dim}, got {z_dim}")
        layers = integer_arg("layers", layers)
        hidden = widths_arg("hidden_dims", hidden_dims) if hidden_dims is not None else None
        self.layers = nn.ModuleList(self.kind.make(z_dim, hidden, **(options or {})) for _ in range(layers))
        generator = torch.Generator().manual_seed(0)  # the permutations are part of the architecture
        for i in range(layers - 1):
            self.register_buffer(f"permutation_{i}", torch.randperm(z_dim, generator=generator))
        self.register_buffer("base_loc", torch.zeros(z_dim))
        self.register_buffer("base_scale", torch.ones(z_dim))

    def transforms(self) -> list[T.Transform]:
        """f_1, permutation, f_2, ..., f_L, in the sampling direction e -> z."""
        out: list[T.Transform] = []
        for i, layer in enumerate(self.layers):
            if i > 0:
                out.append(T.Permute(getattr(self, f"permutation_{i - 1}")))
            out.append(layer.inv if self.kind.autoregressive else layer)
        return out

    def forward(self, encoder: nn.Module | None = None) -> dist.Distribution:
        base = dist.Normal(self.base_loc, self.base_scale).to_event(1)
        return dist.TransformedDistribution(base, self.transforms())


def build_prior(spec, z_dim: int, x_shape: Sequence[int]) -> nn.Module:
    """Build a prior from a spec such as ``"normal"`` or ``"mixture(components=10)"``; ``x_shape`` is the
    data's event shape (the VampPrior's pseudo-inputs have it)."""
    return PRIORS.build(spec, z_dim=z_dim, x_shape=tuple(x_shape))
