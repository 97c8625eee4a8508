"""Convolutional network bodies for images: ``conv`` (DCGAN-style) and ``resnet`` (residual blocks).

Both are entries of :data:`pyro_vae.networks.NETWORKS` and work either way round, decided by the
shape they are built for:

- as an **encoder** (``in_shape = (C, H, W)``, the data's event shape): the image is halved
  ``levels`` times by strided convolutions and the last feature map is flattened to
  ``out_features`` numbers, to which the guide adds its linear head (``GaussianEncoder``);
- as a **decoder** (``in_shape = (z_dim,)`` and ``out_shape = (C, H, W)``): a linear layer maps z
  to a feature map of ``H / 2^levels x W / 2^levels``, which transposed convolutions double back
  to ``H x W``. The body's output is that full-resolution feature map, ``out_shape = (F, H, W)``;
  the likelihood's head is then a 1x1 convolution to its per-pixel parameters
  (``networks.output_head``), so every likelihood works unchanged on images.

Leading dimensions (particles of an importance-weighted bound, a batch) are folded into one
batch dimension for the convolutions and restored after them.

A body that cannot fit the data says so in one line naming both shapes: halving ``H x W``
``levels`` times needs H and W divisible by ``2^levels`` (28 x 28 can be halved twice, not three
times); a flat event shape such as ``(784,)`` is not an image.

Normalisation (``norm``): ``none`` (the default), ``layer`` (``GroupNorm(1, F)``: per example, over
channels and pixels) or ``batch``. Batch norm couples the examples of a batch and the particles of a
bound while training, so a per-example bound (IWAE, an IS NLL in training mode) is no longer one;
it is offered for comparison with DCGAN recipes, not as a default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from pyro_vae.networks import NETWORKS, make_activation
from pyro_vae.specs import closest, integer_arg

NORMS: dict[str, Callable[[int], nn.Module]] = {
    "none": lambda channels: nn.Identity(),
    "layer": lambda channels: nn.GroupNorm(1, channels),
    "batch": nn.BatchNorm2d,
}


# Bounds on the spec's sizes: beyond them a body is absurd on any image (2^16 = 65536 pixels a side) or
# larger than memory, and a refusal in one line beats an allocator's traceback.
MAX_LEVELS, MAX_WIDTH, MAX_KERNEL, MAX_BLOCKS = 16, 4096, 15, 64


def bounded(name: str, value, maximum: int, minimum: int = 1) -> int:
    """``value`` as an integer in ``[minimum, maximum]`` (``specs.integer_arg`` plus an upper bound)."""
    value = integer_arg(name, value, minimum=minimum)
    if value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value}")
    return value


def make_norm(name: str, channels: int) -> nn.Module:
    """A normalisation layer by name for ``channels`` feature maps; an unknown name lists the valid ones."""
    if name not in NORMS:
        raise ValueError(f"unknown norm {name!r}{closest(name, NORMS)}; valid: {', '.join(NORMS)}")
    return NORMS[name](channels)


def image_shape(network: str, shape: Sequence[int], levels: int, role: str, key: str) -> tuple[int, int, int]:
    """``shape`` as ``(C, H, W)`` with H and W divisible by ``2 ** levels``; otherwise one line naming both shapes."""
    shape = tuple(int(d) for d in shape)
    factor = 2**levels
    if len(shape) != 3 or any(d < 1 for d in shape):
        raise ValueError(f"network {network!r} needs images of event shape (C, H, W) as {role}, got {shape}")
    if shape[1] % factor or shape[2] % factor:
        raise ValueError(
            f"network {network!r} halves the image {levels} times, so it needs an event shape (C, H, W) with H and "
            f"W multiples of {factor}; the data's event shape is {shape} (use a smaller {key} or another network)"
        )
    return shape  # type: ignore[return-value]


def same_half(kernel: int) -> dict[str, int]:
    """Padding of a stride-2 convolution with this kernel that maps an even H to exactly H / 2."""
    return {"kernel_size": kernel, "stride": 2, "padding": (kernel - 1) // 2}


def same_double(kernel: int) -> dict[str, int]:
    """Padding and output padding of a stride-2 transposed convolution that maps H to exactly 2 H:
    (H - 1) 2 - 2 p + k + o = 2 H with p = (k - 1) // 2 gives o = 2 - k + 2 p, which is 0 or 1."""
    padding = (kernel - 1) // 2
    return {"kernel_size": kernel, "stride": 2, "padding": padding, "output_padding": 2 - kernel + 2 * padding}


class ImageBody(nn.Module):
    """What ``conv`` and ``resnet`` share: the direction (encoder or decoder) from the shapes, the
    folding of leading dimensions, and the declared output (``out_shape``, ``out_features``).

    Subclasses implement ``down(C)`` (a stack from C input channels that halves H and W ``levels``
    times and ends with ``top`` channels) and ``up()`` (a stack from ``top`` channels at the coarsest
    resolution that doubles back to full resolution, ending with ``features`` channels).
    """

    top: int  # channels of the coarsest feature map
    features: int  # channels of a decoder's full-resolution output

    levels_key: str  # the spec key that sets how often the image is halved

    def setup(self, in_shape: Sequence[int], out_shape: Sequence[int] | None, levels: int, activation: str) -> None:
        name = type(self).spec_name  # type: ignore[attr-defined]
        self.in_shape = tuple(int(d) for d in in_shape)
        if len(self.in_shape) == 3:  # an encoder: image -> flat features
            c, h, w = image_shape(name, self.in_shape, levels, "input", self.levels_key)
            self.stack = self.down(c)
            self.coarse = (self.top, h >> levels, w >> levels)
            self.out_shape = (math.prod(self.coarse),)
        elif len(self.in_shape) == 1 and out_shape is not None:  # a decoder: z -> feature map of the image's size
            c, h, w = image_shape(name, out_shape, levels, "output", self.levels_key)
            self.coarse = (self.top, h >> levels, w >> levels)
            linear = nn.Linear(self.in_shape[0], math.prod(self.coarse))
            self.project = nn.Sequential(linear, make_activation(activation))
            self.stack = self.up()
            self.out_shape = (self.features, h, w)
        else:
            raise ValueError(
                f"network {name!r} reads an image (C, H, W) or, as a decoder, a flat code that it maps to the "
                f"data's image shape; got input shape {self.in_shape} and output shape {out_shape}"
            )
        self.out_features = math.prod(self.out_shape)
        self.decoding = len(self.in_shape) == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[: x.dim() - len(self.in_shape)]
        # a decoder projects z to the coarsest feature map; an encoder reads the image as it is
        h = self.project(x).reshape(-1, *self.coarse) if self.decoding else x.reshape(-1, *self.in_shape)
        return self.stack(h).reshape(*lead, *self.out_shape)

    @property
    def activation_width(self) -> int:
        """Numbers per example in the widest feature map (for the chunking of memory-bound evaluations)."""
        h, w = self.out_shape[1:] if self.decoding else self.in_shape[1:]
        return max(self.top, self.features) * h * w

    def down(self, channels: int) -> nn.Sequential:
        raise NotImplementedError

    def up(self) -> nn.Sequential:
        raise NotImplementedError


@NETWORKS.register("conv")
class ConvBody(ImageBody):
    """DCGAN-style body (Radford et al. 2016, "Unsupervised representation learning with deep
    convolutional generative adversarial networks"): ``depth`` stride-2 convolutions with widths
    ``channels * 2^i`` (i = 0 .. depth-1), each followed by ``norm`` and ``activation``; the decoder
    mirrors it with stride-2 transposed convolutions, ending with ``channels`` feature maps at full
    resolution. ``depth=2`` fits 1x28x28 (to 7x7) and 3x32x32 (to 8x8).
    """

    levels_key = "depth"

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int] | None = None,
        channels: int = 32,
        depth: int = 2,
        kernel: int = 4,
        activation: str = "relu",
        norm: str = "none",
    ) -> None:
        super().__init__()
        depth = bounded("depth", depth, MAX_LEVELS)
        self.widths = [bounded("channels", channels, MAX_WIDTH >> (depth - 1)) * 2**i for i in range(depth)]
        self.kernel, self.activation, self.norm = bounded("kernel", kernel, MAX_KERNEL), activation, norm
        make_norm(norm, 1), make_activation(activation)  # refuse bad names before any shape talk
        self.top, self.features = self.widths[-1], self.widths[0]
        self.setup(in_shape, out_shape, len(self.widths), activation)

    def _layer(self, conv: nn.Module, width: int) -> list[nn.Module]:
        return [conv, make_norm(self.norm, width), make_activation(self.activation)]

    def down(self, channels: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for width in self.widths:
            layers += self._layer(nn.Conv2d(channels, width, **same_half(self.kernel)), width)
            channels = width
        return nn.Sequential(*layers)

    def up(self) -> nn.Sequential:
        outs = [*self.widths[-2::-1], self.widths[0]]  # [.., 2c, c] then c again at full resolution
        layers: list[nn.Module] = []
        for width_in, width in zip(self.widths[::-1], outs, strict=True):
            layers += self._layer(nn.ConvTranspose2d(width_in, width, **same_double(self.kernel)), width)
        return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """x + conv(act(norm(conv(act(norm(x)))))): a pre-activation residual block (He et al. 2016,
    "Identity mappings in deep residual networks") of two ``kernel x kernel`` convolutions at one width."""

    def __init__(self, width: int, kernel: int, activation: str, norm: str) -> None:
        super().__init__()
        pad = kernel // 2

        def unit() -> list[nn.Module]:
            return [make_norm(norm, width), make_activation(activation), nn.Conv2d(width, width, kernel, padding=pad)]

        self.branch = nn.Sequential(*unit(), *unit())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


@NETWORKS.register("resnet")
class ResNetBody(ImageBody):
    """Residual body in the layout of the IAF paper's ResNet VAE (Kingma et al. 2016, "Improved
    variational inference with inverse autoregressive flow"), at a small width by default.

    Encoder: a ``kernel`` convolution to ``width`` channels, then per level ``blocks`` residual blocks
    (:class:`ResidualBlock`, ELU as in the paper) and a stride-2 convolution that halves H and W.
    Decoder: per level a stride-2 transposed convolution that doubles H and W and ``blocks`` residual
    blocks, then ``activation``. The paper's model keeps a latent map per resolution (a ladder); here z
    is one vector, so the coarsest map is flattened (encoder) or projected from z (decoder). ``levels=2``
    fits 1x28x28 and 3x32x32; odd kernels keep the residual branch the size of its input.
    """

    levels_key = "levels"

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int] | None = None,
        width: int = 32,
        levels: int = 2,
        blocks: int = 1,
        kernel: int = 3,
        activation: str = "elu",
        norm: str = "none",
    ) -> None:
        super().__init__()
        self.width, self.levels = bounded("width", width, MAX_WIDTH), bounded("levels", levels, MAX_LEVELS)
        self.blocks = bounded("blocks", blocks, MAX_BLOCKS, minimum=0)
        self.kernel = bounded("kernel", kernel, MAX_KERNEL)
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (a residual branch keeps the size of its input), got {kernel}")
        self.activation, self.norm = activation, norm
        make_norm(norm, 1), make_activation(activation)
        self.top = self.features = self.width
        self.setup(in_shape, out_shape, self.levels, activation)

    def _blocks(self) -> list[nn.Module]:
        return [ResidualBlock(self.width, self.kernel, self.activation, self.norm) for _ in range(self.blocks)]

    def down(self, channels: int) -> nn.Sequential:
        layers: list[nn.Module] = [nn.Conv2d(channels, self.width, self.kernel, padding=self.kernel // 2)]
        for _ in range(self.levels):
            layers += [*self._blocks(), nn.Conv2d(self.width, self.width, **same_half(4))]
        return nn.Sequential(*layers, make_activation(self.activation))

    def up(self) -> nn.Sequential:
        layers: list[nn.Module] = []
        for _ in range(self.levels):
            layers += [nn.ConvTranspose2d(self.width, self.width, **same_double(4)), *self._blocks()]
        return nn.Sequential(*layers, make_activation(self.activation))
