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

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch

from pyro_vae.complexity import check_compressor, compressed_bits
from pyro_vae.evaluate import DEFAULT_BATCH_SIZE, _progress, chunks, elbo_per_example, log_likelihood
from pyro_vae.networks import GaussianEncoder
from pyro_vae.registry import Registry
from pyro_vae.specs import integer_arg, number_arg
from pyro_vae.traces import elbo_particles


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

    tau*(x) is approached by ``steps`` Adam steps from phi(x) on the encoder head's unconstrained output
    (``GaussianEncoder.raw``: loc, pre-softplus scale, and any extra outputs of the guide family), each
    on a ``step_particles``-draw ELBO with analytic KL, the rate decaying linearly from ``lr`` to 0 (a
    fixed rate keeps Adam's noisy steps jittering around the optimum). All examples of a batch of
    ``batch_size`` are optimized jointly on the sum of their ELBOs: an example's parameters enter only
    its own term and Adam is elementwise, so this is N separate optimizations run at once. Both ELBOs
    are then estimated with the same ``particles`` draws of the noise (common random numbers); their
    difference may still dip slightly below 0 by Monte Carlo noise.

    Needs a guide on an encoder network (``normal``, ``lowrank``, ``iaf``) of a structure with
    ``posterior(x)``; for the two-layer VAE only q(z1|x)'s parameters move (q(z2|z1) stays amortized).
    """

    def __init__(
        self, steps: int = 100, lr: float = 0.05, particles: int = 64, step_particles: int = 1, batch_size: int = 0
    ) -> None:
        self.steps = integer_arg("steps", steps, minimum=0)
        self.lr = number_arg("lr", lr, 0, open_low=True)
        self.particles = integer_arg("particles", particles)
        self.step_particles = integer_arg("step_particles", step_particles)
        self.batch_size = integer_arg("batch_size", batch_size, minimum=0) or DEFAULT_BATCH_SIZE

    def __call__(self, vae, x, *, image_shape, progress=False, **data) -> torch.Tensor:
        net = _encoder_network(vae)
        x = x.reshape(x.shape[0], -1)
        regrets = []
        was_training = vae.training
        vae.eval()
        try:
            with _frozen(vae), _progress(x.shape[0], progress, f"likelihood regret, {self.steps} steps") as bar:
                for xb, db in chunks(x, data, self.batch_size):
                    regrets.append(self._batch(vae, net, xb, db).double().cpu())
                    if bar is not None:
                        bar.update(xb.shape[0])
        finally:
            vae.train(was_training)
        return torch.cat(regrets)

    def _elbo(self, vae, x: torch.Tensor, particles: int, data: dict) -> torch.Tensor:
        return elbo_particles(vae, x, particles, analytic_kl=True, **data).mean(0)

    def _batch(self, vae, net: GaussianEncoder, x: torch.Tensor, data: dict) -> torch.Tensor:
        seed = int(torch.randint(2**62, ()))  # both ELBOs from the same noise: their difference is far less noisy
        with torch.no_grad(), _seeded(seed, x.device):
            amortized = self._elbo(vae, x, self.particles, data)
        with torch.no_grad():
            raw = net.raw(x.reshape(x.shape[0], *vae.x_shape)).clone()
        raw.requires_grad_(True)
        optimizer = torch.optim.Adam([raw], lr=self.lr)
        with _substituted(net, x, raw):
            for step in range(self.steps):
                for group in optimizer.param_groups:  # linear decay to 0: no jitter of fixed-size steps at the end
                    group["lr"] = self.lr * (1 - step / self.steps)
                loss = -self._elbo(vae, x, self.step_particles, data).sum()
                (raw.grad,) = torch.autograd.grad(loss, [raw])
                optimizer.step()
            with torch.no_grad(), _seeded(seed, x.device):
                optimized = self._elbo(vae, x, self.particles, data)
        return optimized - amortized


def _encoder_network(vae) -> GaussianEncoder:
    """The network whose output are q(z|x)'s parameters; a one-line ``ValueError`` for a model without one."""
    net = getattr(getattr(vae, "encoder", None), "net", None)
    if not (isinstance(net, GaussianEncoder) and hasattr(vae, "posterior") and hasattr(vae, "x_shape")):
        structure = type(getattr(vae, "structure", vae)).__name__
        raise ValueError(
            f"likelihood_regret optimizes the parameters of q(z|x) that an encoder network outputs; "
            f"{structure} with guide {getattr(getattr(vae, 'encoder', None), 'spec', '?')!r} has no such q(z|x) "
            "(use a structure with one amortized q(z|x): vae, two_layer)"
        )
    return net


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Torch's generators seeded with ``seed`` for the duration, then restored: the same draws of the
    reparameterization noise in two evaluations (common random numbers), the global stream untouched."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _frozen(vae) -> Iterator[None]:
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
def _substituted(net: GaussianEncoder, x: torch.Tensor, raw: torch.Tensor) -> Iterator[None]:
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
        raise RuntimeError("likelihood_regret: the guide never applied the encoder to the batch; nothing was optimized")
