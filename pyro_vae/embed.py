"""Latent codes as features: the posterior means and scales of a run's splits, with the true labels.

:func:`embed_run` (``pyro-vae embed --run DIR --out codes.npz``) writes an ``.npz`` with, for each
split s (``train`` and ``test`` by default; ``val`` on request):

=================  ================  ==========================================================
key                array             meaning
=================  ================  ==========================================================
``{s}_loc``        float32 (N, K)    E_q[z|x], the posterior mean of each example (K = z_dim)
``{s}_scale``      float32 (N, K)    sd_q[z_j|x], the posterior sd of each dimension
``{s}_labels``     int64 (N,)        the true labels; absent when the data has none (mnist-static)
``scale_kind``     str               ``analytic``, or ``sampled (1000 draws)`` for flow guides
``data_variant``   str               the data set the codes are of (``dataset.name``)
``run``            str               the run folder
=================  ================  ==========================================================

Mean and sd are the guide's own where its distribution has them in closed form: the ``normal``
guide's loc and scale, the ``lowrank`` guide's loc and marginal sd sqrt(diag(F F^T + D)). A flow
(``iaf``) has neither: both are then the mean and sd of :data:`MEAN_SAMPLES` draws of q(z|x),
as ``posterior_mean`` does for the mean. Codes of the plain and two-layer VAEs are q(z|x) (z1's
for the two-layer model); M2 and the CVAE have no q(z|x) of x alone and are refused in one line.
Strings are stored as numpy unicode arrays: ``np.load(path)`` reads everything without pickles.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyro
import torch
import torch.distributions as tdist

from pyro_vae.evaluate import evaluating
from pyro_vae.model import MEAN_SAMPLES
from pyro_vae.runs import load_run

DEFAULT_SPLITS = ("train", "test")
SPLITS = ("train", "val", "test")
DEFAULT_BATCH_SIZE = 1000


def posterior_moments(q: tdist.Distribution, num_samples: int = MEAN_SAMPLES) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(mean, sd, kind)`` of q per dimension: analytic where the distribution has them (``kind`` is
    ``"analytic"``), else from ``num_samples`` draws (``"sampled (N draws)"``)."""
    try:
        return q.mean, q.stddev, "analytic"
    except NotImplementedError:
        draws = q.sample((num_samples,))
        return draws.mean(0), draws.std(0), f"sampled ({num_samples} draws)"


def encode(
    vae, x: torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE, num_samples: int = MEAN_SAMPLES
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(loc, scale, kind)`` of q(z|x) for every row of ``x``, each ``(N, z_dim)`` on the CPU
    (:func:`posterior_moments`)."""
    if not hasattr(vae, "posterior"):
        structure = type(getattr(vae, "structure", vae)).__name__
        raise ValueError(f"embed reads q(z|x) of x alone (structures vae, two_layer); {structure} has none")
    device = next(vae.parameters()).device
    locs, scales, kind = [], [], "analytic"
    with evaluating(vae):
        for start in range(0, x.shape[0], batch_size):
            q = vae.posterior(x[start : start + batch_size].reshape(-1, vae.x_dim).to(device))
            loc, scale, kind = posterior_moments(q, num_samples)
            locs.append(loc.float().cpu())
            scales.append(scale.float().cpu())
    return torch.cat(locs), torch.cat(scales), kind


def dataset_codes(vae, dataset, splits: Sequence[str] = DEFAULT_SPLITS) -> dict[str, np.ndarray]:
    """The ``.npz`` arrays of the module docstring for ``splits`` of ``dataset`` (no ``run`` key)."""
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise ValueError(f"unknown split {(unknown or [''])[0]!r}; valid splits: {', '.join(SPLITS)}")
    arrays: dict[str, np.ndarray] = {"data_variant": np.array(str(dataset.name))}
    for split in dict.fromkeys(splits):
        x, labels = dataset.split(split)
        loc, scale, kind = encode(vae, x)
        arrays[f"{split}_loc"], arrays[f"{split}_scale"] = loc.numpy(), scale.numpy()
        if labels is not None:
            arrays[f"{split}_labels"] = labels.cpu().numpy().astype(np.int64)
        arrays["scale_kind"] = np.array(kind)
    return arrays


def embed_run(
    run_dir: str | Path,
    out: str | Path,
    splits: Sequence[str] = DEFAULT_SPLITS,
    device: str = "auto",
    data_dir: str | Path | None = None,
    seed: int | None = 0,
) -> dict[str, np.ndarray]:
    """Write the codes of ``splits`` of a run's data to ``out`` (an ``.npz``, exactly that path) and return
    the arrays. ``seed`` (default 0) seeds the draws of a flow guide's moments."""
    if seed is not None:
        pyro.set_rng_seed(seed)
    run = load_run(run_dir, device=device, data_dir=data_dir)
    arrays = {**dataset_codes(run.vae, run.dataset, splits), "run": np.array(str(run_dir))}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:  # a file object: np.savez would append ".npz" to a name without it
        np.savez(f, **arrays)
    return arrays
