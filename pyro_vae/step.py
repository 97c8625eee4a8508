"""One optimization step of the training loop.

``TrainStep`` is the default path: the estimator's differentiable loss, backward, one torch
optimizer over all parameters. It returns the loss as a device tensor and never synchronizes
with the host, so the loop can accumulate losses on the device and read them once per epoch.
"""

from __future__ import annotations

import torch


class TrainStep:
    """``step(x, beta) -> loss`` (detached device scalar) for ``vae`` under ``estimator``."""

    def __init__(self, vae, estimator, optimizer: torch.optim.Optimizer, clip_norm: float | None = None) -> None:
        self.vae, self.estimator, self.optimizer, self.clip_norm = vae, estimator, optimizer, clip_norm

    def __call__(self, x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.estimator.loss(self.vae, x, beta)
        loss.backward()
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.vae.parameters(), self.clip_norm)
        self.optimizer.step()
        return loss.detach()
