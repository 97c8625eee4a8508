"""The per-example variational fit: q's parameters optimized for one example alone.

An amortized guide outputs the parameters phi(x) of q(z|x) from an encoder network; the best member of
the same family for x alone, tau*(x) = argmax_tau ELBO(x; tau), is generally better. The difference of
their ELBOs is the *amortization gap* of Cremer, Li & Duvenaud (2018), "Inference suboptimality in
variational autoencoders", ICML (``pyro_vae.gaps``), and the *likelihood regret* OOD score of Xiao, Yan &
Amit (2020) (``pyro_vae.scores``).

tau*(x) is approached by Adam on the encoder head's unconstrained output (``GaussianEncoder.raw``: loc,
pre-softplus scale, and any extra outputs of the guide family: a low-rank factor, an IAF context), starting
at phi(x). The guide program runs unchanged: a forward hook on the encoder network returns the free
parameters for the batch being fitted (:func:`substituted`). All examples of a batch are optimized jointly
on the sum of their ELBOs: an example's parameters enter only its own term and Adam is elementwise, so
this is N separate optimizations run at once. The model's own weights (decoder, prior, a flow's MADE
networks) stay fixed: for ``iaf`` the local family is the flow with its per-example inputs free.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pyro_vae.evaluate import DEFAULT_BATCH_SIZE, chunks, progress_bar
from pyro_vae.networks import GaussianEncoder
from pyro_vae.specs import integer_arg, number_arg
from pyro_vae.traces import elbo_particles


@dataclass
class LocalFit:
    """How the local fit runs: ``steps`` Adam steps at a rate decaying linearly from ``lr`` to 0 (a fixed
    rate keeps Adam's noisy steps jittering around the optimum), each on a ``step_particles``-draw ELBO with
    analytic KL; the two ELBOs compared from ``particles`` common draws; ``batch_size`` examples at once
    (0: ``evaluate.DEFAULT_BATCH_SIZE``)."""

    steps: int = 100
    lr: float = 0.05
    particles: int = 64
    step_particles: int = 1
    batch_size: int = 0

    def __post_init__(self) -> None:
        self.steps = integer_arg("steps", self.steps, minimum=0)
        self.lr = number_arg("lr", self.lr, 0, open_low=True)
        self.particles = integer_arg("particles", self.particles)
        self.step_particles = integer_arg("step_particles", self.step_particles)
        self.batch_size = integer_arg("batch_size", self.batch_size, minimum=0) or DEFAULT_BATCH_SIZE


@dataclass
class LocalElbos:
    """Per example (float64 CPU tensors ``(N,)``, nats): L[q_phi] (``amortized``) and L[q*] (``local``), each the
    mean of ``particles`` draws, with the Monte Carlo SE of each and of their difference (the draws are
    common to both, so ``difference_se`` is far below either)."""

    amortized: torch.Tensor
    local: torch.Tensor
    amortized_se: torch.Tensor
    local_se: torch.Tensor
    difference_se: torch.Tensor


def local_elbos(
    vae, x: torch.Tensor, fit: LocalFit, progress: bool | None = False, what: str = "local fit", **data
) -> LocalElbos:
    """ELBO(x; phi(x)) and ELBO(x; tau*(x)) per example, with their Monte Carlo SEs (:class:`LocalElbos`)."""
    net = encoder_network(vae, what)
    x = x.reshape(x.shape[0], -1)
    parts = []
    was_training = vae.training
    vae.eval()
    try:
        with frozen(vae), progress_bar(x.shape[0], progress, f"{what}, {fit.steps} steps") as bar:
            for xb, db in chunks(x, data, fit.batch_size):
                parts.append(_fit_batch(vae, net, xb, db, fit))
                if bar is not None:
                    bar.update(xb.shape[0])
    finally:
        vae.train(was_training)
    before, after = (torch.cat(column, 1).double().cpu() for column in zip(*parts, strict=True))
    root = math.sqrt(fit.particles)
    return LocalElbos(
        before.mean(0),
        after.mean(0),
        before.std(0) / root,
        after.std(0) / root,
        (after - before).std(0) / root,
    )


def _elbo_draws(vae, x: torch.Tensor, particles: int, data: dict) -> torch.Tensor:
    """``(particles, batch)`` ELBO draws, analytic KL where the pair has one."""
    return elbo_particles(vae, x, particles, analytic_kl=True, **data)


def _fit_batch(vae, net: GaussianEncoder, x: torch.Tensor, data: dict, fit: LocalFit):
    seed = int(torch.randint(2**62, ()))  # both ELBOs from the same noise: their difference is far less noisy
    with torch.no_grad(), seeded(seed, x.device):
        amortized = _elbo_draws(vae, x, fit.particles, data)
    with torch.no_grad():
        raw = net.raw(x.reshape(x.shape[0], *vae.x_shape)).clone()
    raw.requires_grad_(True)
    optimizer = torch.optim.Adam([raw], lr=fit.lr)
    with substituted(net, x, raw):
        for step in range(fit.steps):
            for group in optimizer.param_groups:
                group["lr"] = fit.lr * (1 - step / fit.steps)
            loss = -_elbo_draws(vae, x, fit.step_particles, data).mean(0).sum()
            (raw.grad,) = torch.autograd.grad(loss, [raw])
            optimizer.step()
        with torch.no_grad(), seeded(seed, x.device):
            optimized = _elbo_draws(vae, x, fit.particles, data)
    return amortized, optimized


def encoder_network(vae, what: str = "local fit") -> GaussianEncoder:
    """The network whose output are q(z|x)'s parameters; a one-line ``ValueError`` for a model without one."""
    net = getattr(getattr(vae, "encoder", None), "net", None)
    if not (isinstance(net, GaussianEncoder) and hasattr(vae, "posterior") and hasattr(vae, "x_shape")):
        structure = type(getattr(vae, "structure", vae)).__name__
        raise ValueError(
            f"{what} optimizes the parameters of q(z|x) that an encoder network outputs; "
            f"{structure} with guide {getattr(getattr(vae, 'encoder', None), 'spec', '?')!r} has no such q(z|x) "
            "(use a structure with one amortized q(z|x): vae, two_layer)"
        )
    return net


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Torch's generators seeded with ``seed`` for the duration, then restored: the same draws of the
    reparameterization noise in two evaluations (common random numbers), the global stream untouched."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def frozen(vae) -> Iterator[None]:
    """No gradients for the model's own parameters for the duration (their flags are restored after)."""
    flags = [(p, p.requires_grad) for p in vae.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def substituted(net: GaussianEncoder, x: torch.Tensor, raw: torch.Tensor) -> Iterator[None]:
    """Within this block, ``net`` applied to (a view of) ``x`` returns ``net.params(raw)`` instead of its
    own output: the guide program runs unchanged, on free per-example parameters. Calls on other inputs
    (a VampPrior's pseudo-inputs) are left alone; a block in which no call matched raises."""
    matched = []

    def hook(module, args, output):
        inputs = args[0]
        if inputs.data_ptr() == x.data_ptr() and inputs.shape[0] == raw.shape[0]:
            matched.append(True)
            return net.params(raw)
        return None

    handle = net.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
    if not matched:
        raise RuntimeError("local fit: the guide never applied the encoder to the batch; nothing was optimized")
