"""Encoder and decoder networks: plain torch, no Pyro.

Network *bodies* are chosen by name (:data:`NETWORKS`, ``model.encoder`` / ``model.decoder``):
``mlp`` here, the image bodies ``conv`` and ``resnet`` in :mod:`pyro_vae.conv`. Heads are added by
whoever uses a body: :class:`GaussianEncoder` for a guide, :func:`output_head` for a likelihood (a
linear layer on flat features, a 1x1 convolution on a decoder's feature map).

The MLPs have configurable widths, depth and activation:

- Pyro's VAE tutorial: ``hidden_dims=(400,)``, ``activation="softplus"``, ``z_dim=50``;
- the IWAE paper (Burda et al. 2015, one stochastic layer): ``hidden_dims=(200, 200)``,
  ``activation="tanh"``, ``z_dim=50``.

The encoder maps x to the location and a positive scale of a diagonal Gaussian (plus, for
richer guides, extra outputs); the decoder maps z to the likelihood's parameters. The
decoder mirrors the encoder's hidden widths.

Weight initialization is a choice of its own (:data:`INITIALIZERS`, ``VAE(init=...)``): with
PyTorch's default the tanh network of the IWAE paper starts as an encoder whose output hardly
depends on x, and a VampPrior then collapses before z carries any information
(docs/results/priors.md measures it); He initialization, as in the VampPrior authors' code, avoids it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pyro_vae.registry import Registry
from pyro_vae.specs import closest, widths_arg

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
}

# Floor on the encoder's scale: keeps log q finite when a unit collapses (1e-4 nats of
# reconstruction are far below anything reported).
MIN_SCALE = 1e-4


def inverse_softplus(y: float) -> float:
    """x with softplus(x) = y > 0, for initializing a raw scale parameter."""
    return y + math.log(-math.expm1(-y))


def make_activation(name: str) -> nn.Module:
    """An activation module by name; an unknown name lists the valid ones."""
    if name not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {name!r}{closest(name, ACTIVATIONS)}; valid: {', '.join(sorted(ACTIVATIONS))}"
        )
    return ACTIVATIONS[name]()


def _glorot_uniform(layer: nn.Linear) -> None:
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)


def _he_normal(layer: nn.Linear) -> None:
    nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
    nn.init.zeros_(layer.bias)


# name -> what it does to one ``nn.Linear`` (None: keep the layer's own initialization).
INITIALIZERS: dict[str, Callable[[nn.Linear], None] | None] = {
    # PyTorch's nn.Linear default: W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)); what Pyro's VAE tutorial uses.
    "torch": None,
    # Glorot & Bengio 2010: W ~ U(-a, a), a = sqrt(6 / (fan_in + fan_out)); b = 0.
    "glorot": _glorot_uniform,
    # He et al. 2015: W ~ N(0, 2 / fan_in); b = 0. The VampPrior authors' code initializes its layers so.
    "he": _he_normal,
}


# The layers a scheme re-initializes: linear and convolutional (whose fan-in torch computes per kernel).
INITIALIZED = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)


def initialize(modules: Iterable[nn.Module], scheme: str) -> None:
    """Re-initialize every linear and convolutional layer (:data:`INITIALIZED`) in ``modules`` by ``scheme``
    (see :data:`INITIALIZERS`).

    Pass the networks this module builds (``mlp``s, :class:`GaussianEncoder`, :class:`Decoder`), not
    modules that also hold Pyro's flow layers: those keep the initialization their authors chose.
    """
    if scheme not in INITIALIZERS:
        raise ValueError(f"unknown init {scheme!r}{closest(scheme, INITIALIZERS)}; valid: {', '.join(INITIALIZERS)}")
    init = INITIALIZERS[scheme]
    if init is None:
        return
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, INITIALIZED):
                init(layer)


def mlp(in_dim: int, hidden_dims: Sequence[int], out_dim: int, act: str = "softplus") -> nn.Sequential:
    """Linear layers of widths ``in_dim -> *hidden_dims -> out_dim`` with ``act`` between them."""
    dims = [in_dim, *hidden_dims]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(dims):
        layers += [nn.Linear(a, b), make_activation(act)]
    layers.append(nn.Linear(dims[-1], out_dim))
    return nn.Sequential(*layers)


# -- network bodies by name ----------------------------------------------------------------------
NETWORKS: Registry[nn.Module] = Registry("network")


@NETWORKS.register("mlp")
class MLPBody(nn.Module):
    """A multilayer perceptron body: flatten the event, then ``Linear -> activation`` per hidden width.

    ``in_shape`` is the event shape of the input (``(784,)``, ``(1, 28, 28)``, ``(z_dim,)``); the
    body flattens those trailing dimensions itself, so data keep their shape up to the network.
    ``out_features`` is the width it hands to a head (the last hidden width; the input width when
    ``hidden`` is empty, which makes encoder and decoder single linear layers: the linear-Gaussian
    model of the exact checks).
    """

    def __init__(self, in_shape: Sequence[int], hidden: Sequence[int] = (400,), activation: str = "softplus") -> None:
        super().__init__()
        hidden = widths_arg("hidden", hidden)
        self.in_shape = tuple(int(d) for d in in_shape)
        self.hidden, self.activation = tuple(hidden), activation
        dims = [math.prod(self.in_shape), *hidden]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(dims):
            layers += [nn.Linear(a, b), make_activation(activation)]
        self.layers = nn.Sequential(*layers)
        self.out_features = dims[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(flatten_event(x, len(self.in_shape)))


def flatten_event(x: torch.Tensor, event_dims: int) -> torch.Tensor:
    """``(..., *event)`` -> ``(..., prod(event))``: what a dense body reads."""
    return x if event_dims == 1 else x.reshape(*x.shape[: x.dim() - event_dims], -1)


class GatedLinear(nn.Module):
    """h = (W x + b) * sigmoid(V x + c): a gated linear unit (Dauphin et al. 2017), the ``GatedDense``
    layer of Tomczak & Welling's VampPrior code (no activation on the linear part)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear, self.gate = nn.Linear(in_features, out_features), nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * torch.sigmoid(self.gate(x))


@NETWORKS.register("gated_mlp")
class GatedMLPBody(nn.Module):
    """A stack of :class:`GatedLinear` layers of widths ``hidden``: the encoder and decoder bodies of the
    VampPrior paper (Tomczak & Welling 2018, section 4: two gated layers of 300 units).

    ``in_shape`` and ``out_features`` as for :class:`MLPBody`; ``hidden`` must not be empty.
    """

    def __init__(self, in_shape: Sequence[int], hidden: Sequence[int] = (300, 300)) -> None:
        super().__init__()
        hidden = widths_arg("hidden", hidden)
        if not hidden:
            raise ValueError("gated_mlp needs at least one hidden width, e.g. hidden=[300, 300]")
        self.in_shape, self.hidden = tuple(int(d) for d in in_shape), tuple(hidden)
        dims = [math.prod(self.in_shape), *hidden]
        self.layers = nn.Sequential(*(GatedLinear(a, b) for a, b in itertools.pairwise(dims)))
        self.out_features = dims[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(flatten_event(x, len(self.in_shape)))


def build_network(spec, in_shape: Sequence[int], out_shape: Sequence[int] | None = None) -> nn.Module:
    """A network body from a spec such as ``"mlp(hidden=[400])"``, for inputs of event shape ``in_shape``.

    A body maps ``(..., *in_shape)`` to ``(..., *out_shape)``: flat features ``(out_features,)`` (an
    MLP, any encoder), or a feature map ``(F, H, W)`` (an image decoder, ``pyro_vae.conv``).
    ``out_shape`` is the data's event shape when the body is a decoder: an image decoder up-samples
    to it, an MLP ignores it. Heads (the guide's loc/scale, the likelihood's parameters,
    :func:`output_head`) are added by whoever uses it.
    """
    context = {"in_shape": tuple(in_shape)}
    built_for = getattr(spec, "in_shape", None) if isinstance(spec, nn.Module) else None
    if built_for is not None and tuple(built_for) != context["in_shape"]:
        name = getattr(spec, "spec_name", type(spec).__name__)
        raise ValueError(
            f"network {name!r} was built for event shape {tuple(built_for)}; the data's is {tuple(in_shape)}"
        )
    if out_shape is not None:
        context["out_shape"] = tuple(out_shape)
    return NETWORKS.build(spec, **context)


def body_shape(body: nn.Module) -> tuple[int, ...]:
    """What a body outputs per example: its ``out_shape``, else ``(out_features,)``."""
    return tuple(getattr(body, "out_shape", (body.out_features,)))


class PixelHead(nn.Module):
    """Per-pixel parameters from a feature map: a 1x1 convolution ``(..., F, H, W) -> (..., P C, H, W)``,
    flattened to ``(..., P C H W)``.

    Channel ``p C + c`` holds parameter p of channel c, so the flat output is P consecutive blocks of
    ``C H W`` in the data's channel-first order: the layout every likelihood reads
    (``Likelihood.split_params``), the same as a linear head's.
    """

    def __init__(self, features: int, channels: int, size: Sequence[int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(features, channels, kernel_size=1)
        self.activation_width = channels * math.prod(size)  # numbers per example (evaluate's chunking)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        lead = h.shape[:-3]
        out = self.conv(h.reshape(-1, *h.shape[-3:]))
        return out.reshape(*lead, -1)


def output_head(body: nn.Module, x_shape: Sequence[int], params_per_pixel: int) -> nn.Module:
    """The head from a decoder body to ``params_per_pixel`` parameters per value of x (event shape ``x_shape``).

    A body with flat features gets a linear layer; a body with a feature map ``(F, H, W)`` gets a
    :class:`PixelHead`, which needs the data to be images ``(C, H, W)`` of the same height and width.
    """
    shape, x_shape = body_shape(body), tuple(int(d) for d in x_shape)
    if len(shape) == 1:
        return nn.Linear(shape[0], params_per_pixel * math.prod(x_shape))
    if len(x_shape) != 3 or shape[1:] != x_shape[1:]:
        raise ValueError(f"the decoder body's feature map {shape} does not fit the data's event shape {x_shape}")
    return PixelHead(shape[0], params_per_pixel * x_shape[0], x_shape[1:])


def mlp_spec(hidden: Sequence[int], activation: str) -> dict[str, object]:
    """The network spec of the ``model.hidden_dims``/``model.activation`` shorthand."""
    return {"name": "mlp", "hidden": [int(h) for h in hidden], "activation": activation}


# How the encoder's head output becomes a positive scale (``GaussianEncoder(scale=...)``, the
# guides' ``scale`` argument); MIN_SCALE keeps log q finite whichever is used.
SCALE_LINKS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # the default: softplus grows linearly, so a large raw output cannot blow the scale up
    "softplus": F.softplus,
    # raw = log sigma^2, sigma = exp(raw / 2): Kingma & Welling's "log_var" head, pythae's and most code's
    "log_variance": lambda raw: torch.exp(0.5 * raw),
    # raw = log sigma: the IWAE authors' code (Burda et al. 2015)
    "log_scale": torch.exp,
}


class GaussianEncoder(nn.Module):
    """x -> (loc, scale, extra) of a diagonal Gaussian q(z|x) = N(loc, diag(scale^2)): a body and a linear head.

    ``scale = link(raw) + MIN_SCALE`` is positive, with ``link`` from :data:`SCALE_LINKS`
    (``softplus`` by default). ``extra_dim`` further outputs (e.g. the low-rank factor or an IAF
    context) are returned as ``extra`` (shape ``(..., 0)`` by default).
    """

    def __init__(self, body: nn.Module, z_dim: int, extra_dim: int = 0, scale: str = "softplus") -> None:
        super().__init__()
        if scale not in SCALE_LINKS:
            raise ValueError(f"unknown scale {scale!r}{closest(scale, SCALE_LINKS)}; valid: {', '.join(SCALE_LINKS)}")
        self.z_dim, self.extra_dim, self.link = z_dim, extra_dim, SCALE_LINKS[scale]
        self.body = body
        self.head = nn.Linear(body.out_features, 2 * z_dim + extra_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.params(self.raw(x))

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """The head's unconstrained output ``(..., 2 z_dim + extra_dim)``: what an optimizer of q's
        parameters for single examples moves (``pyro_vae.scores``' likelihood regret)."""
        return self.head(self.body(x))

    def params(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loc, scale, extra)`` from the unconstrained output :meth:`raw`."""
        loc, raw_scale, extra = raw.split([self.z_dim, self.z_dim, self.extra_dim], dim=-1)
        return loc, self.link(raw_scale) + MIN_SCALE, extra


class Decoder(nn.Module):
    """z -> the likelihood's parameters: a body, then the head the likelihood asks for (``Likelihood.head``)."""

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body, self.head = body, head

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(z))


# The image bodies (conv, resnet) live in their own module and register themselves here.
from pyro_vae import conv  # noqa: E402, F401
