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
from pyro_vae.specs import flag_arg, integer_arg, number_arg

OPTIMIZERS: Registry[torch.optim.Optimizer] = Registry("optimizer")
SCHEDULES: Registry[Schedule] = Registry("lr schedule")

Params = Iterable[torch.nn.Parameter]


# Devices and dtypes for which torch has a fused (single-kernel) Adam.
FUSED_DEVICES = ("cpu", "cuda")
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _common(lr: float, betas=None, eps: float | None = None, weight_decay: float = 0.0) -> dict:
    """The arguments several optimizers share, checked once here: torch takes inf or a negative rate,
    a 3-element ``betas`` or ``betas=(0.9,)`` (an IndexError traceback) without a clean word."""
    out = {
        "lr": number_arg("lr", lr, 0, open_low=True),
        "weight_decay": number_arg("weight_decay", weight_decay, 0),
    }
    if eps is not None:
        out["eps"] = number_arg("eps", eps, 0, open_low=True)
    if betas is not None:
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair of numbers in [0, 1), e.g. (0.9, 0.999), got {betas!r}")
        out["betas"] = tuple(number_arg(f"betas[{i}]", b, 0, 1, open_high=True) for i, b in enumerate(betas))
    return out


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
    to float rounding; ``adam(fused=False)`` forces ``foreach``, ``adam(fused=True)`` insists on fused.
    """
    common = _common(lr, betas, eps, weight_decay)
    amsgrad = flag_arg("amsgrad", amsgrad)
    fused = flag_arg("fused", fused, optional=True)
    params = list(params)
    if fused is None:
        fused = fused_supported(params)
    multi = {"fused": True} if fused else {"foreach": True}
    return torch.optim.Adam(params, amsgrad=amsgrad, **common, **multi)


class AdamNormGrad(torch.optim.Adam):
    """Adam on gradients divided by their own norm, g_p / (||g_p||_2 + 1e-7) for each parameter tensor p
    (block-normalized gradients, Yu et al. 2017): the ``AdamNormGrad`` of Tomczak & Welling's
    VampPrior code, which their paper's numbers were trained with."""

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            norms = torch._foreach_norm(grads)
            torch._foreach_add_(norms, 1e-7)
            torch._foreach_div_(grads, norms)
        return super().step(closure)


@OPTIMIZERS.register("adam_normgrad")
def adam_normgrad(params: Params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
    """Adam on per-tensor normalized gradients (:class:`AdamNormGrad`), the VampPrior paper's optimizer."""
    return AdamNormGrad(list(params), **_common(lr, betas, eps, weight_decay), foreach=True)


@OPTIMIZERS.register("adamw")
def adamw(params: Params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01):
    """AdamW: Adam with decoupled weight decay (Loshchilov & Hutter 2019)."""
    return torch.optim.AdamW(params, **_common(lr, betas, eps, weight_decay), foreach=True)


@OPTIMIZERS.register("sgd")
def sgd(params: Params, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
    """Stochastic gradient descent, optionally with (Nesterov) momentum."""
    momentum = number_arg("momentum", momentum, 0)
    nesterov = flag_arg("nesterov", nesterov)
    if nesterov and momentum == 0:  # torch's own refusal, said here in the spec's words
        raise ValueError("nesterov=True needs momentum > 0")
    common = _common(lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, momentum=momentum, nesterov=nesterov, **common, foreach=True)


@OPTIMIZERS.register("rmsprop")
def rmsprop(params: Params, lr: float, alpha: float = 0.99, eps: float = 1e-8, momentum: float = 0.0):
    """RMSprop (Tieleman & Hinton 2012)."""
    alpha = number_arg("alpha", alpha, 0, 1)
    momentum = number_arg("momentum", momentum, 0)
    return torch.optim.RMSprop(params, alpha=alpha, momentum=momentum, **_common(lr, eps=eps), foreach=True)


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
        self.min_factor = number_arg("min_factor", min_factor, 0, 1)

    def factor(self, epoch: int) -> float:
        return self.min_factor + (1 - self.min_factor) * 0.5 * (
            1 + math.cos(math.pi * min(epoch, self.epochs) / self.epochs)
        )


@SCHEDULES.register("exponential")
class Exponential(Schedule):
    """lr_e = lr * gamma^e."""

    def __init__(self, epochs: int, gamma: float = 0.95) -> None:
        super().__init__(epochs)
        # (0, 1]: a decay; above 1 the rate grows without bound (gamma=1e10 overflows in a few epochs)
        self.gamma = number_arg("gamma", gamma, 0, 1, open_low=True)

    def factor(self, epoch: int) -> float:
        return self.gamma**epoch


@SCHEDULES.register("step")
class Step(Schedule):
    """lr_e = lr * gamma^floor(e / step_size)."""

    def __init__(self, epochs: int, step_size: int = 10, gamma: float = 0.5) -> None:
        super().__init__(epochs)
        self.step_size = integer_arg("step_size", step_size)
        # (0, 1]: a negative gamma gives a negative rate every other step, which trains uphill
        self.gamma = number_arg("gamma", gamma, 0, 1, open_low=True)

    def factor(self, epoch: int) -> float:
        return self.gamma ** (epoch // self.step_size)


@SCHEDULES.register("multistep")
class MultiStep(Schedule):
    """lr_e = lr * gamma^(number of milestones <= e): torch's ``MultiStepLR`` stepped once per epoch.

    pythae's VAE reproduction (Chadebec et al. 2022) uses ``milestones=[200, 350, 500, 750, 1000]``
    with ``gamma=10^(-1/5)``.
    """

    def __init__(self, epochs: int, milestones=(), gamma: float = 0.1) -> None:
        super().__init__(epochs)
        if not isinstance(milestones, (list, tuple)):
            raise ValueError(f"milestones must be a list of epochs, e.g. [200, 350], got {milestones!r}")
        self.milestones = sorted(integer_arg(f"milestones[{i}]", m) for i, m in enumerate(milestones))
        self.gamma = number_arg("gamma", gamma, 0, 1, open_low=True)

    def factor(self, epoch: int) -> float:
        return self.gamma ** sum(epoch >= m for m in self.milestones)


@SCHEDULES.register("burda")
class Burda(Schedule):
    """The IWAE paper's schedule (Burda, Grosse & Salakhutdinov 2015, section 5): stage i = 0, 1, ...
    lasts ``base``^i epochs at lr * ``decay``^i, i.e. 1 epoch at lr, 3 at lr 10^(-1/7), 9 at
    lr 10^(-2/7), ... (3280 epochs for the paper's 8 stages, with ``base`` 3 and ``decay`` 10^(-1/7)).
    """

    def __init__(self, epochs: int, base: int = 3, decay: float = 10 ** (-1 / 7)) -> None:
        super().__init__(epochs)
        self.base = integer_arg("base", base, 2)
        self.decay = number_arg("decay", decay, 0, 1, open_low=True)

    def stage(self, epoch: int) -> int:
        """The stage of (0-based) ``epoch``: the i with sum_{j<i} base^j <= epoch < sum_{j<=i} base^j."""
        stage, end = 0, 1
        while epoch >= end:
            stage += 1
            end += self.base**stage
        return stage

    def factor(self, epoch: int) -> float:
        return self.decay ** self.stage(epoch)


def build_optimizer(spec, params: Params, lr: float) -> torch.optim.Optimizer:
    """An optimizer from a spec such as ``"adam"`` or ``"sgd(momentum=0.9)"``."""
    return OPTIMIZERS.build(spec, params=params, lr=lr)


def build_schedule(spec, epochs: int) -> Schedule:
    """A per-epoch learning-rate schedule from a spec such as ``"cosine"`` or ``"step(step_size=5)"``."""
    return SCHEDULES.build(spec, epochs=epochs)
