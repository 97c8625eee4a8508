"""The minimal loop of the core: Pyro's ``SVI`` with ``Trace_ELBO`` over mini-batches of a tensor.

No run folder, no checkpoints: what the README and the tests use to train a VAE in a few lines,
and the plain-Pyro reference that :func:`pyro_vae.train.train` is compared with.
"""

from __future__ import annotations

import pyro
import pyro.optim
import torch
from pyro.infer import SVI, Trace_ELBO


def fit(
    vae,
    train_x: torch.Tensor,
    test_x: torch.Tensor | None = None,
    epochs: int = 1,
    batch_size: int = 256,
    lr: float = 1e-3,
    max_steps: int | None = None,
    seed: int | None = None,
) -> list[dict[str, float]]:
    """Train ``vae`` with ``SVI(vae.model, vae.guide, Adam(lr), Trace_ELBO())``.

    Returns one dict per epoch: ``epoch``, ``train_elbo`` (mean over the epoch's batches, nats
    per example) and, when ``test_x`` is given, ``test_elbo`` (a one-sample Trace_ELBO estimate
    over the whole test set). ``max_steps`` stops early (for quick runs).
    """
    if seed is not None:
        pyro.set_rng_seed(seed)
    device = next(vae.parameters()).device
    train_x = train_x.to(device).reshape(train_x.shape[0], -1)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": lr}), loss=Trace_ELBO())
    history, step = [], 0
    for epoch in range(1, epochs + 1):
        total, seen = 0.0, 0  # svi.step returns a host float already
        for batch in torch.randperm(len(train_x), device=device).split(batch_size):
            total += svi.step(train_x[batch])
            seen += len(batch)
            step += 1
            if max_steps is not None and step >= max_steps:
                break
        record = {"epoch": epoch, "train_elbo": -total / seen}
        if test_x is not None:
            record["test_elbo"] = evaluate_elbo(vae, test_x, batch_size=1000)
        history.append(record)
        if max_steps is not None and step >= max_steps:
            break
    return history


@torch.no_grad()
def evaluate_elbo(vae, x: torch.Tensor, batch_size: int = 1000) -> float:
    """One-sample ``Trace_ELBO`` estimate of the mean ELBO per example over ``x`` (nats)."""
    device = next(vae.parameters()).device
    x = x.to(device).reshape(x.shape[0], -1)
    elbo = Trace_ELBO()
    total = sum(elbo.loss(vae.model, vae.guide, chunk) for chunk in x.split(batch_size))
    return -total / len(x)
