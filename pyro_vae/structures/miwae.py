"""The VAE of incomplete data of Mattei & Frellsen (2019): the structure ``"miwae"``.

Mattei & Frellsen, "MIWAE: Deep Generative Modelling and Imputation of Incomplete Data Sets", ICML 2019.
Each example x comes with a mask m (the data field ``mask``, ``data.missing``; True on the observed
pixels), and the model is the plain VAE's, observed on x_obs = the pixels where m is True:

    model:  z ~ p(z),  x_obs ~ p(x_obs|z) = prod_{d : m_d} p(x_d|z)             (``poutine.scale(beta)`` on z)
    guide:  z ~ q(z|x_obs, m) = guide(encoder_body([x * m, m]))                  (zeros on the missing pixels)

The missing pixels are ignorable under missingness at random (their mechanism need not be modelled), and
are left out of the likelihood by masking its per-pixel terms (``likelihoods.observe_pixels``), never
filled in: their values (the data hold the truth there) reach neither the bound nor the encoder. The
encoder reads the zero-filled image and the mask concatenated along the feature axis (channels of an
image, features of a flat row), so it can tell a black observed pixel from a missing one.

Every estimator then trains a bound on log p(x_obs); ``iwae(k)`` on it is the MIWAE bound

    L_K = E[ log (1/K) sum_k p(x_obs, z_k) / q(z_k|x_obs) ],   z_k ~ q(z|x_obs),

and the importance-sampled NLL of ``pyro_vae.evaluate`` estimates -log p(x_obs). Imputation of the missing
pixels (single, by self-normalised importance sampling, and multiple, by sampling-importance-resampling)
is ``pyro_vae.impute``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from pyro_vae.structures.vae import PlainVAE


class MIWAE(PlainVAE):
    """The plain VAE observed on the observed pixels of each example, with an encoder of the zero-filled image
    and its mask; the structure ``"miwae"`` (consumes the data field ``mask``). Arguments as :class:`PlainVAE`;
    a VampPrior's pseudo-inputs are encoder inputs, image and mask."""

    consumes = ("mask",)
    closed_form_refusal = (
        "the closed-form ELBO scores every pixel, but structure 'miwae' observes only the observed ones"
    )

    @property
    def encoder_shape(self) -> tuple[int, ...]:
        """x's event shape with the first (feature or channel) axis doubled: the image, then its mask."""
        first, *rest = self.x_shape
        return (2 * first, *rest)

    def encoder_input(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[x * m, m] along the feature axis, shape ``(batch, *encoder_shape)``; ``mask=None``: every pixel observed."""
        x = x.reshape(x.shape[0], -1)
        if mask is None:
            mask = torch.ones_like(x, dtype=torch.bool)
        return torch.cat([super().encoder_input(x, mask), self._event(mask.to(x.dtype))], dim=1)

    def model(self, x: torch.Tensor, beta: float | torch.Tensor = 1.0, *, mask: torch.Tensor) -> torch.Tensor:
        """p(z) p(x_obs|z) over a batch (:meth:`PlainVAE.model` with the mask)."""
        return super().model(x, beta, mask=mask)

    def guide(self, x: torch.Tensor, beta: float | torch.Tensor = 1.0, *, mask: torch.Tensor) -> torch.Tensor:
        """q(z|x_obs, m) over a batch (:meth:`PlainVAE.guide` with the mask)."""
        return super().guide(x, beta, mask=mask)

    def observed_dim(self, x: torch.Tensor, *, mask: torch.Tensor) -> float:
        """The observed pixels per example, on average over the batch: bits/dim divides the mean NLL by it
        (not the mean of each example's NLL over its own count; the two agree when every example has as many)."""
        return float(mask.sum(-1).double().mean())

    def figures(self, dataset) -> dict[str, Callable[[Path], Path]]:
        """``samples.png`` (and ``manifold.png`` for a 2-d z), and ``imputations.png`` of test images under their
        masks (``pyro_vae.impute.imputation_figure``). Reconstructions and latent codes would read q(z|x) of
        complete images, which this encoder never saw."""
        from pyro_vae.impute import imputation_figure
        from pyro_vae.plots import manifold, sample_figure

        shape, x, mask = getattr(dataset, "image_shape", None), dataset.test, dataset.fields["mask"]["test"]
        figures: dict[str, Callable[[Path], Path]] = {
            "samples.png": lambda p: sample_figure(self, shape, 64, p),
            "imputations.png": lambda p: imputation_figure(self, x, mask, shape, p),
        }
        if self.z_dim == 2:
            figures["manifold.png"] = lambda p: manifold(self, shape, p)
        return figures
