"""Per-example anomaly scores of a trained VAE, by name (:data:`SCORES`): **higher = more anomalous**.

Each entry is built from a spec (``"log_px(samples=1000)"``) and called as
``score(vae, x, image_shape=..., progress=..., **data)`` on rows ``x`` of shape ``(N, D)``; it returns
a float64 CPU tensor ``(N,)``. ``data`` are the fields the structure consumes (``vae.consumes``).

================================  =====================================================  =======
spec                              score(x)                                               units
================================  =====================================================  =======
``log_px(samples=1000)``          -log p-hat(x), K importance samples (Burda et al.      nats
                                  2015; ``evaluate.log_likelihood``)
``elbo(particles=1)``             -ELBO(x) (``evaluate.elbo_per_example``, analytic KL)  nats
``input_complexity(samples=1000,  S(x) = -log2 p-hat(x) - L(x), L the compressed length  bits
compressor='png')``               of the 8-bit image (Serrà et al. 2020;
                                  ``pyro_vae.complexity``)
``likelihood_regret(steps=100,    ELBO(x; q optimized for x alone) - ELBO(x; q(z|x))     nats
lr=0.05, ...)``                   (Xiao, Yan & Amit 2020)
================================  =====================================================  =======

The formulas, units and references are written out in ``docs/applications.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from pyro_vae.complexity import check_compressor, compressed_bits
from pyro_vae.evaluate import elbo_per_example, log_likelihood
from pyro_vae.local_fit import LocalFit, local_elbos
from pyro_vae.registry import Registry
from pyro_vae.specs import integer_arg


class Score:
    """Base class of the entries of :data:`SCORES`: ``__call__`` returns one score per example."""

    units = "nats"

    def __call__(
        self, vae, x: torch.Tensor, *, image_shape: Sequence[int], progress: bool | None = False, **data
    ) -> torch.Tensor:
        raise NotImplementedError


SCORES: Registry[Score] = Registry("score")


@SCORES.register("log_px")
class NegativeLogLikelihood(Score):
    """-log p-hat(x), the importance-sampled estimate with ``samples`` = K draws from q(z|x) (Burda et al.
    2015). The likelihood itself is the classic OOD score, and it fails famously: Nalisnick et al. (2019),
    "Do deep generative models know what they don't know?", ICLR."""

    def __init__(self, samples: int = 1000) -> None:
        self.samples = integer_arg("samples", samples)

    def __call__(self, vae, x, *, image_shape, progress=False, **data) -> torch.Tensor:
        return -log_likelihood(vae, x, self.samples, progress=progress, **data).double().cpu()


@SCORES.register("elbo")
class NegativeElbo(Score):
    """-ELBO(x) = -(E_q[log p(x|z)] - KL(q(z|x) || p(z))), ``particles`` draws, analytic KL where it exists."""

    def __init__(self, particles: int = 1) -> None:
        self.particles = integer_arg("particles", particles)

    def __call__(self, vae, x, *, image_shape, progress=False, **data) -> torch.Tensor:
        return -elbo_per_example(vae, x, num_samples=self.particles, **data).double().cpu()


@SCORES.register("input_complexity")
class InputComplexity(Score):
    """Serrà et al. (2020), eq. 2: S(x) = -log2 p(x) - L(x), in bits.

    -log2 p(x) is the code length the model gives x; L(x) (``pyro_vae.complexity``) is what a generic
    lossless compressor needs. Their difference is a log-likelihood ratio against a universal model:
    simple images (few bits for both) no longer look in-distribution merely for being simple.
    """

    units = "bits"

    def __init__(self, samples: int = 1000, compressor: str = "png") -> None:
        self.samples = integer_arg("samples", samples)
        self.compressor = check_compressor(compressor)

    def __call__(self, vae, x, *, image_shape, progress=False, **data) -> torch.Tensor:
        nll_bits = -log_likelihood(vae, x, self.samples, progress=progress, **data).double().cpu() / math.log(2)
        return nll_bits - compressed_bits(x, image_shape, self.compressor)


@SCORES.register("likelihood_regret")
class LikelihoodRegret(Score):
    """Xiao, Yan & Amit (2020), "Likelihood Regret: an out-of-distribution detection score for variational
    auto-encoder", NeurIPS: LR(x) = ELBO(x; tau*(x)) - ELBO(x; phi(x)), where phi(x) are the parameters of
    q(z|x) the encoder outputs and tau*(x) those that maximize the ELBO of x alone.

    tau*(x) is approached by ``steps`` Adam steps from phi(x) (``pyro_vae.local_fit``: on the encoder head's
    unconstrained output, each step on a ``step_particles``-draw ELBO with analytic KL, the rate decaying
    linearly from ``lr`` to 0); both ELBOs are then estimated with the same ``particles`` draws of the noise
    (common random numbers), so their difference may dip slightly below 0 by Monte Carlo noise only. It is
    the amortization gap of Cremer et al. (2018) for one example (``pyro_vae.gaps``).

    Needs a guide on an encoder network (``normal``, ``lowrank``, ``iaf``) of a structure with
    ``posterior(x)``; for the two-layer VAE only q(z1|x)'s parameters move (q(z2|z1) stays amortized).
    """

    def __init__(
        self, steps: int = 100, lr: float = 0.05, particles: int = 64, step_particles: int = 1, batch_size: int = 0
    ) -> None:
        self.fit = LocalFit(steps, lr, particles, step_particles, batch_size)

    def __call__(self, vae, x, *, image_shape, progress=False, **data) -> torch.Tensor:
        elbos = local_elbos(vae, x, self.fit, progress=progress, what="likelihood_regret", **data)
        return elbos.local - elbos.amortized
