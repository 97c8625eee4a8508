"""Optimizers and learning-rate schedules, by name.

``train.optimizer`` and ``train.lr_schedule`` in a config are specs (``"adamw(weight_decay=0.01)"``,
``"cosine(min_factor=0.01)"``) built from the registries below; the learning rate itself is
``train.lr``. A schedule multiplies it by a factor that depends on the epoch alone, so it has
no state to checkpoint and a resumed run continues on the same rates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from pyro_vae.registry import Registry

OPTIMIZERS: Registry[torch.optim.Optimizer] = Registry("optimizer")
SCHEDULES: Registry[Schedule] = Registry("lr schedule")

Params = Iterable[torch.nn.Parameter]


# Devices and dtypes for which torch has a fused (single-kernel) Adam.
FUSED_DEVICES = ("cpu", "cuda")
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fused_supported(params: list[torch.nn.Parameter]) -> bool:
    """Whether ``torch.optim.Adam(fused=True)`` accepts these parameters (all on one fused-capable device)."""
    devices = {p.device for p in params}
    return (
        len(devices) == 1 and next(iter(devices)).type in FUSED_DEVICES and all(p.dtype in FUSED_DTYPES for p in params)
    )


@OPTIMIZERS.register("adam")
def adam(
    params: Params,
    lr: float,
    betas=(0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad=False,
    fused: bool | None = None,
):
    """Adam (Kingma & Ba 2015), the default; Pyro's VAE tutorial uses lr = 1e-3.

    ``fused=None`` (default): torch's fused Adam, one kernel over all parameters, where torch has
    one for them (CPU and CUDA floating point), else ``foreach``. Fused is about 15-20% faster per
    training step than ``foreach`` on a CPU at batch 128 (docs/results/speed.md) and equal to it up
    to float rounding; ``adam(fused=false)`` forces ``foreach``, ``adam(fused=true)`` insists on fused.
    """
    params = list(params)
    if fused is None:
        fused = fused_supported(params)
    multi = {"fused": True} if fused else {"foreach": True}
    return torch.optim.Adam(
        params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, **multi
    )


@OPTIMIZERS.register("adamw")
def adamw(params: Params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01):
    """AdamW: Adam with decoupled weight decay (Loshchilov & Hutter 2019)."""
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, foreach=True)


@OPTIMIZERS.register("sgd")
def sgd(params: Params, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
    """Stochastic gradient descent, optionally with (Nesterov) momentum."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, foreach=True)


@OPTIMIZERS.register("rmsprop")
def rmsprop(params: Params, lr: float, alpha: float = 0.99, eps: float = 1e-8, momentum: float = 0.0):
    """RMSprop (Tieleman & Hinton 2012)."""
    return torch.optim.RMSprop(params, lr=lr, alpha=alpha, eps=eps, momentum=momentum, foreach=True)


class Schedule:
    """A learning-rate multiplier per epoch: ``factor(epoch)`` for epoch 0, 1, ... of ``epochs``.

    Stateless on purpose: the learning rate of an epoch is ``train.lr * factor(epoch)``, a pure
    function of the epoch, so a resumed run sets exactly the rate the uninterrupted run had.
    """

    def __init__(self, epochs: int) -> None:
        self.epochs = max(1, int(epochs))

    def factor(self, epoch: int) -> float:
        raise NotImplementedError

    def apply(self, optimizer: torch.optim.Optimizer, lr: float, epoch: int) -> float:
        """Set every parameter group's rate for ``epoch`` (0-based); return it."""
        rate = lr * self.factor(epoch)
        for group in optimizer.param_groups:
            group["lr"] = rate
        return rate


@SCHEDULES.register("constant")
class Constant(Schedule):
    """The learning rate stays at ``train.lr``."""

    def factor(self, epoch: int) -> float:
        return 1.0


@SCHEDULES.register("cosine")
class Cosine(Schedule):
    """lr_e = lr (m + (1 - m) (1 + cos(pi e / epochs)) / 2) with m = ``min_factor``.

    Cosine annealing without restarts (Loshchilov & Hutter 2017, SGDR).
    """

    def __init__(self, epochs: int, min_factor: float = 0.0) -> None:
        super().__init__(epochs)
        if not 0.0 <= min_factor <= 1.0:
            raise ValueError(f"min_factor must be in [0, 1], got {min_factor}")
        self.min_factor = min_factor

    def factor(self, epoch: int) -> float:
        return self.min_factor + (1 - self.min_factor) * 0.5 * (
            1 + math.cos(math.pi * min(epoch, self.epochs) / self.epochs)
        )


@SCHEDULES.register("exponential")
class Exponential(Schedule):
    """lr_e = lr * gamma^e."""

    def __init__(self, epochs: int, gamma: float = 0.95) -> None:
        super().__init__(epochs)
        if not gamma > 0:
            raise ValueError(f"gamma must be positive, got {gamma}")
        self.gamma = gamma

    def factor(self, epoch: int) -> float:
        return self.gamma**epoch


@SCHEDULES.register("step")
class Step(Schedule):
    """lr_e = lr * gamma^floor(e / step_size)."""

    def __init__(self, epochs: int, step_size: int = 10, gamma: float = 0.5) -> None:
        super().__init__(epochs)
        if int(step_size) < 1:
            raise ValueError(f"step_size must be a positive integer, got {step_size}")
        self.step_size, self.gamma = int(step_size), gamma

    def factor(self, epoch: int) -> float:
        return self.gamma ** (epoch // self.step_size)


def build_optimizer(spec, params: Params, lr: float) -> torch.optim.Optimizer:
    """An optimizer from a spec such as ``"adam"`` or ``"sgd(momentum=0.9)"``."""
    return OPTIMIZERS.build(spec, params=params, lr=lr)


def build_schedule(spec, epochs: int) -> Schedule:
    """A per-epoch learning-rate schedule from a spec such as ``"cosine"`` or ``"step(step_size=5)"``."""
    return SCHEDULES.build(spec, epochs=epochs)
