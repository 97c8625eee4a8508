"""Missing-data patterns by name (``data.missing``): which pixels of each example are observed.

A mask maker is built from a spec (the ``MASKS`` registry, like every other family) and draws one
mask per example, ``(N, D)`` bool, True = observed, D the flattened pixels in channel-first order
(every channel of a pixel shares its fate):

==========================  ================================================================  ======================
spec                        missing pixels                                                     kind
==========================  ================================================================  ======================
``mcar(rate=0.5)``          each pixel independently with probability ``rate`` in [0, 1)      missing completely at
                                                                                               random (Rubin 1976)
``squares(size=14)``        one ``size x size`` square per image, its position uniform        a hole to inpaint
                            among those inside the image
==========================  ================================================================  ======================

Masks are drawn with a CPU generator (:func:`draw_masks`), so the same seed gives the same masks on
every device; ``pyro_vae.fields`` draws them once per split, each split from its own seed
(:func:`split_seed`), and hands them to the model as the data field ``mask``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pyro_vae.data import mixed_seed
from pyro_vae.registry import Registry
from pyro_vae.specs import Spec, integer_arg, number_arg

MASKS: Registry = Registry("mask")

# Mixed into every mask seed, so that masks never share a random stream with the data's or the run's draws.
MASK_STREAM = 0x6D61736B  # "mask"


class MaskMaker:
    """Base class: :meth:`draw` returns ``(count, D)`` bool masks, True on the observed pixels."""

    def draw(self, image_shape: Sequence[int], count: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


@MASKS.register("mcar")
class MissingCompletelyAtRandom(MaskMaker):
    """Each pixel (all its channels) missing independently with probability ``rate``, 0 <= rate < 1."""

    def __init__(self, rate: float = 0.5) -> None:
        self.rate = number_arg("rate", rate, 0.0, 1.0, open_high=True)

    def draw(self, image_shape: Sequence[int], count: int, generator: torch.Generator) -> torch.Tensor:
        channels, height, width = image_shape
        observed = torch.rand(count, 1, height, width, generator=generator) >= self.rate
        return observed.expand(count, channels, height, width).reshape(count, -1)


@MASKS.register("squares")
class MissingSquare(MaskMaker):
    """One ``size x size`` square of each image missing (all channels), its top-left corner drawn
    uniformly among the positions that keep it inside the image; at least one pixel stays observed."""

    def __init__(self, size: int = 14) -> None:
        self.size = integer_arg("size", size)

    def draw(self, image_shape: Sequence[int], count: int, generator: torch.Generator) -> torch.Tensor:
        channels, height, width = image_shape
        if self.size > min(height, width) or self.size * self.size == height * width:
            raise ValueError(
                f"mask squares(size={self.size}) does not fit {channels}x{height}x{width} images: size must be at "
                f"most {min(height, width)} and leave some pixel observed"
            )
        top = torch.randint(height - self.size + 1, (count,), generator=generator)
        left = torch.randint(width - self.size + 1, (count,), generator=generator)
        rows, cols = torch.arange(height), torch.arange(width)
        in_rows = (rows >= top[:, None]) & (rows < top[:, None] + self.size)  # (count, height)
        in_cols = (cols >= left[:, None]) & (cols < left[:, None] + self.size)  # (count, width)
        observed = ~(in_rows[:, :, None] & in_cols[:, None, :])
        return observed[:, None].expand(count, channels, height, width).reshape(count, -1)


def split_seed(seed: int, split: str) -> int:
    """The seed of one split's masks: ``seed`` (the run's ``train.seed``) mixed with the split's name
    (``data.mixed_seed``), so train, validation and test get unrelated masks and nearby seeds unrelated streams."""
    return mixed_seed(seed, MASK_STREAM, *split.encode())


def draw_masks(spec: Spec | MaskMaker, image_shape: Sequence[int], count: int, seed: int) -> torch.Tensor:
    """``count`` masks of the pattern ``spec`` names for images of ``image_shape`` ``(C, H, W)``, shape
    ``(count, C * H * W)`` bool (True = observed), on the CPU: a generator seeded with ``seed`` draws
    them, so they are the same on every device. A bad spec or a pattern that does not fit is one
    ``ValueError`` line."""
    maker = MASKS.build(spec)
    return maker.draw(tuple(int(d) for d in image_shape), count, torch.Generator().manual_seed(seed))
