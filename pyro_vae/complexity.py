"""The compressed length of images in bits: the input complexity L(x) of Serrà et al. (2020).

Serrà, Álvarez, Gómez, Slizovskaia, Núñez & Luque (2020), "Input complexity and out-of-distribution
detection with likelihood-based generative models", ICLR, take L(x) = the length in bits of the
image x written by a generic lossless compressor (PNG, JPEG2000 in lossless mode, FLIF), as an
estimate of its Kolmogorov complexity. Here x is first put on its 8-bit grey (or RGB) levels,
``round(255 x)`` for data in [0, 1] (a binary image becomes 0/255), then compressed by one of
:data:`COMPRESSORS`:

- ``png``: a PNG file written by Pillow at its highest compression level (``compress_level=9``;
  zlib's deflate after PNG's per-row filters), header and chunks included: about 60 bytes that
  every image of one size shares, a constant that shifts every score alike;
- ``zlib``: zlib's deflate at level 9 over the raw 8-bit pixels, row after row (channels
  interleaved), with zlib's 6 bytes of header and checksum.

A leaf module: numpy, torch and Pillow (which matplotlib brings) only.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from pyro_vae.specs import unknown_name


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def _zlib(image: np.ndarray) -> bytes:
    return zlib.compress(np.ascontiguousarray(image).tobytes(), 9)


# name -> a function from one 8-bit image (H, W) or (H, W, 3) to its compressed bytes
COMPRESSORS: dict[str, Callable[[np.ndarray], bytes]] = {"png": _png, "zlib": _zlib}


def check_compressor(name: str) -> str:
    """``name`` if it is one of :data:`COMPRESSORS`, else a one-line ``ValueError`` listing them."""
    if name not in COMPRESSORS:
        raise ValueError(unknown_name("compressor", str(name), COMPRESSORS))
    return name


def eight_bit_images(x: torch.Tensor, image_shape: Sequence[int]) -> np.ndarray:
    """Rows ``(N, C*H*W)`` in [0, 1], channel-first, -> uint8 images ``(N, H, W)`` (C = 1) or ``(N, H, W, 3)``."""
    channels, height, width = (int(d) for d in image_shape)
    if channels not in (1, 3):
        raise ValueError(f"input complexity compresses grey or RGB images, not {channels} channels")
    levels = (x.detach().reshape(x.shape[0], channels, height, width).clamp(0, 1) * 255).round()
    images = levels.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return images[..., 0] if channels == 1 else images


def compressed_bits(x: torch.Tensor, image_shape: Sequence[int], compressor: str = "png") -> torch.Tensor:
    """L(x): the length in bits (8 per byte) of each image of ``x`` compressed by ``compressor``, shape ``(N,)``."""
    compress = COMPRESSORS[check_compressor(compressor)]
    lengths = [8 * len(compress(image)) for image in eight_bit_images(x, image_shape)]
    return torch.tensor(lengths, dtype=torch.float64)
