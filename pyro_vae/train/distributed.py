"""Data-parallel training with ``torch.distributed``, launched by ``torchrun``.

Nothing here launches processes: ``torchrun`` (or any launcher that sets the ``env://``
variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) starts one
process per device, and :func:`session` turns that environment into a process group
(NCCL on ``cuda:LOCAL_RANK``, gloo on CPU); ``pyro-vae train`` enters it (``pyro_vae.cli``).

The training loop talks to one **context** object and never asks whether it is distributed:
:class:`SingleProcess` is the identity (its batches are the one-process permutation, its
reductions add nothing, its ``wrap`` returns the estimator itself), and :class:`ProcessGroup`
has the same methods with collectives behind them. Its methods are the loop's whole contact
with distribution: ``batches``, ``steps_per_epoch``, ``reduce``, ``wrap``, ``seed``,
``rng_state`` / ``restore_rng_state``, ``shard_rows``, ``broadcast``, ``barrier``, ``is_main``.

The pieces behind them, each standard PyTorch:

- **Gradients.** :class:`LossModule` is an ``nn.Module`` whose ``forward(x, beta)`` returns an
  estimator's loss (the pattern of Pyro's ``ELBOModule``, generalized to every estimator here,
  including the plain-torch ``closed_form``). ``ProcessGroup.loss_module`` puts it in
  ``torch.nn.parallel.DistributedDataParallel``, which all-reduces gradients during
  ``backward``. DDP *averages* over ranks; the estimators' losses are *sums* over the batch, so
  the loss's gradient is multiplied by the world size (:func:`scale_gradient`) and the averaged
  gradient is exactly the gradient of the summed loss over the global batch, the same as one
  process stepping on the union of the ranks' mini-batches.
- **Data.** :func:`shard_indices` gives each rank a disjoint slice of one permutation that all
  ranks draw from a shared seed and the epoch; ``batch_size`` is the *global* batch. Pyro's
  ``plate(subsample_size=...)`` is deliberately not used: every rank would draw the same indices.
- **Metrics.** :func:`reduce_sums`, :func:`all_reduce_sum`, :func:`gather_rows` and :func:`map_rows`
  make evaluation over sharded data equal to a single-process evaluation.
- **RNG.** Rank r draws its Monte Carlo noise from :func:`rank_seed` ``(seed, r)`` so ranks do not
  share noise; :func:`gather_rng_states` / :func:`restore_rank_rng` carry every rank's state
  through a checkpoint.

See docs/distributed.md for commands, batch and learning-rate semantics, and resume.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import pyro.util
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pyro_vae import checkpoint
from pyro_vae.data import batch_indices, epoch_seed, resolve_device
from pyro_vae.fields import split_fields

# Variables that torchrun (torch.distributed.run) sets in every worker.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")

# (epoch, generator) -> the epoch's training batches, device tensors (batch, x_dim).
# (epoch, generator) -> the epoch's batches, each ``(x, fields)``: the rows of x and of each field
# the model structure consumes (``pyro_vae.fields``), taken with the same indices.
Batch = tuple[torch.Tensor, dict[str, torch.Tensor]]
BatchSource = Callable[[int, torch.Generator], Iterable[Batch]]


class Sums(Protocol):
    """Named per-rank sums that travel as one vector (``pyro_vae.train.epoch.EpochSums``)."""

    def to_tensor(self) -> torch.Tensor: ...

    def read_back(self, vector: torch.Tensor) -> Any: ...

    @classmethod
    def earliest_entries(cls) -> tuple[int, ...]: ...


S = TypeVar("S", bound=Sums)


# -- the context the training loop talks to -----------------------------------------------------
@dataclass(frozen=True)
class SingleProcess:
    """One process on ``device``: the training loop's context when there is nothing to distribute.

    Every method is the identity or does nothing beyond what one process does anyway;
    :class:`ProcessGroup` has the same methods with collectives behind them, so the loop has one
    code path. (``rank``, ``world_size``, ``local_rank`` and ``backend`` are constants here.)
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    rank = 0
    world_size = 1
    local_rank = 0
    backend = None

    @property
    def enabled(self) -> bool:
        """True when a process group with more than one rank is in use."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files and prints."""
        return self.rank == 0

    # -- data
    def batches(self, dataset, batch_size: int, seed: int, consumes: Sequence[str] = ()) -> BatchSource:
        """``(epoch, generator) -> batches`` of ``dataset.train_epoch(epoch, generator)`` with the training
        fields named in ``consumes``: here a device-side permutation drawn with ``generator``
        (``pyro_vae.data.batch_indices``)."""

        def source(epoch: int, generator: torch.Generator) -> Iterator[Batch]:
            x = dataset.train_epoch(epoch, generator)
            indices = batch_indices(len(x), batch_size, x.device, generator)
            return with_fields(x, split_fields(dataset, "train", consumes), indices)

        return source

    def steps_per_epoch(self, n: int, batch_size: int) -> int:
        """Steps that :meth:`batches` yields per epoch on every rank for ``n`` training examples."""
        return num_steps(n, batch_size, self.world_size)

    def shard_rows(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous block of the rows of ``x`` (all of them in one process), for evaluation:
        :meth:`reduce` adds the blocks' sums back together."""
        return shard_rows(x, self.rank, self.world_size)

    # -- numbers
    def reduce(self, sums: S) -> S:
        """``sums`` added over ranks and read to the host: one collective and one host read.

        ``sums.to_tensor()`` is the per-rank vector; the entries at ``sums.earliest_entries()``
        hold a step index (-1: none) and become the earliest index any rank reports instead of a
        sum; ``read_back`` reads the result back as numbers. In one process only the read is left.
        """
        return sums.read_back(self._add_over_ranks(sums.to_tensor(), sums.earliest_entries()))

    def _add_over_ranks(self, vector: torch.Tensor, earliest: Sequence[int]) -> torch.Tensor:
        return vector

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (e.g. a run folder name that holds a timestamp)."""
        return obj

    def barrier(self) -> None:
        """Wait until every rank gets here."""

    # -- gradients
    def loss_module(self, vae: nn.Module, estimator) -> nn.Module:
        """The estimator's loss as an ``nn.Module`` (:class:`LossModule`); DDP-wrapped under a group."""
        return LossModule(vae, estimator)

    def wrap(self, estimator, vae: nn.Module):
        """The estimator to train with: ``estimator`` itself; under a group one whose loss all-reduces gradients."""
        return estimator

    # -- random number generators
    def seed(self, seed: int) -> None:
        """Give this rank its own Monte Carlo noise from here on; one process keeps its stream untouched."""

    def rng_state(self) -> dict[str, Any]:
        """The checkpoint entries that carry the RNG state: ``rng`` (``checkpoint.rng_state``)."""
        return {"rng": checkpoint.rng_state()}

    def restore_rng_state(self, state: Mapping[str, Any], seed: int, epoch: int) -> None:
        """Restore the RNG state of a checkpoint written after ``epoch`` by a run with ``seed``."""
        checkpoint.set_rng_state(state["rng"])


@dataclass(frozen=True)
class ProcessGroup(SingleProcess):
    """Rank ``rank`` of ``world_size`` processes of an initialized ``torch.distributed`` process group.

    The same methods as :class:`SingleProcess`, as collectives: each rank trains on its shard of
    the global batch, the loss runs through ``DistributedDataParallel``, sums are added over ranks,
    and the checkpoint keeps every rank's RNG state. Constructing one initializes nothing
    (:func:`setup` does); the collectives need the group.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    def batches(self, dataset, batch_size: int, seed: int, consumes: Sequence[str] = ()) -> BatchSource:
        """This rank's shard of each epoch's batches (:func:`sharded_batch_source`)."""
        return sharded_batch_source(dataset, batch_size, seed, self, consumes)

    def _add_over_ranks(self, vector: torch.Tensor, earliest: Sequence[int]) -> torch.Tensor:
        return reduce_sums(vector, earliest=earliest)

    def broadcast(self, obj: Any) -> Any:
        return broadcast_object(obj)

    def barrier(self) -> None:
        dist.barrier()

    def loss_module(self, vae: nn.Module, estimator) -> nn.Module:
        """``DistributedDataParallel(LossModule(vae, estimator, world_size))`` for this rank.

        DDP broadcasts rank 0's parameters and buffers on construction, so every rank starts from the
        same model. ``static_graph=True``: every step uses the same parameters (true of every
        estimator and family here), so DDP learns in the first step which parameters, if any, get no
        gradient (a parameter an estimator leaves out of the loss would otherwise make DDP wait for it
        forever) without ``find_unused_parameters``' graph traversal at every step, and without running
        the estimator beforehand (which would change stateful estimators such as ``tracegraph``'s baseline).
        """
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        module = LossModule(vae, estimator, gradient_factor=self.world_size)
        return DistributedDataParallel(module, device_ids=device_ids, static_graph=True)

    def wrap(self, estimator, vae: nn.Module):
        """A :class:`DistributedEstimator` around the DDP loss module.

        Each rank holds its own estimator object, so estimator state (``tracegraph``'s baseline, the
        JIT estimators' compiled functions) is per rank.
        """
        return DistributedEstimator(self.loss_module(vae, estimator), estimator)

    def seed(self, seed: int) -> None:
        """``pyro.set_rng_seed(rank_seed(seed, rank))``.

        Identical streams on all ranks would pair example i of every rank's batch with the same
        noise: not wrong in expectation, but correlated.
        """
        pyro.util.set_rng_seed(rank_seed(seed, self.rank))

    def rng_state(self) -> dict[str, Any]:
        """Rank 0's ``rng`` and every rank's state (``rank_rng``); a collective: every rank calls it."""
        return {**super().rng_state(), "rank_rng": gather_rng_states()}

    def restore_rng_state(self, state: Mapping[str, Any], seed: int, epoch: int) -> None:
        """This rank's own stream back from ``rank_rng`` (a fresh one when the world size changed)."""
        super().restore_rng_state(state, seed, epoch)
        restore_rank_rng(state.get("rank_rng"), seed, epoch, self)


def _context(rank: int, world_size: int, local_rank: int, device: torch.device, backend: str) -> SingleProcess:
    # A group of one process has nothing to add up and no gradient to average: it trains as one process.
    if world_size == 1:
        return SingleProcess(device)
    return ProcessGroup(device, rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)


# -- the process group --------------------------------------------------------------------------
def launched_by_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``torchrun`` started this process (its ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` are set)."""
    env = os.environ if env is None else env
    return all(name in env for name in TORCHRUN_ENV)


def _env_int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def setup(device: str | torch.device | None = "auto", timeout_s: float = 1800.0) -> SingleProcess:
    """Initialize the process group from torchrun's environment and return this rank's context.

    ``device`` is the requested device (``"auto"``, ``"cpu"``, ``"cuda"``). Under torchrun a CUDA
    device becomes ``cuda:LOCAL_RANK`` (one GPU per process) with the NCCL backend; a CPU device
    uses gloo. Without torchrun's environment nothing is initialized and the context is the
    single process on the resolved device. A process group that already exists (e.g. set up by
    the caller) is reused and left for its owner to destroy.
    """
    resolved = resolve_device(device)
    if not launched_by_torchrun():
        return SingleProcess(resolved)
    env = os.environ
    rank, world_size, local_rank = (_env_int(env, name) for name in TORCHRUN_ENV)
    if resolved.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible: "
                "start at most one process per GPU (torchrun --nproc_per_node=<number of GPUs>)"
            )
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
        backend = "nccl"
    elif resolved.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"distributed training supports cuda and cpu devices, not {resolved.type!r}")
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout_s)}
        if backend == "nccl":
            kwargs["device_id"] = resolved  # binds the communicator to this GPU eagerly
        dist.init_process_group(backend=backend, init_method="env://", **kwargs)
    return _context(rank, world_size, local_rank, resolved, dist.get_backend())


def teardown() -> None:
    """Destroy the process group (after a barrier, so no rank leaves while others still talk).

    The garbage collection first: DistributedDataParallel sits in reference cycles (its hooks
    point back at it), so without it the wrapper and its gloo work objects can outlive the group
    and be freed at interpreter exit, where freeing them aborts the process (SIGABRT,
    "terminate called without an active exception"; seen once on a loaded CI machine).
    """
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: str | torch.device | None = "auto") -> Iterator[SingleProcess]:
    """``with session(device) as ctx:`` -- :func:`setup` on entry; on exit destroy the group it created.

    On an exception the group is destroyed without a barrier (the other ranks may never reach it;
    torchrun then stops them).
    """
    owned = launched_by_torchrun() and not dist.is_initialized()
    ctx = setup(device)
    try:
        yield ctx
    except BaseException:
        if owned and dist.is_initialized():
            dist.destroy_process_group()
        raise
    if owned:
        teardown()


def current_context() -> SingleProcess:
    """The context of an already initialized process group, or of a single process.

    Raises ``RuntimeError`` when torchrun started several processes but none set up the group:
    each would otherwise train alone and write the same files (``session`` sets it up).
    """
    if not dist.is_initialized():
        if launched_by_torchrun() and _env_int(os.environ, "WORLD_SIZE") > 1:
            raise RuntimeError(
                "torchrun started this process but no process group is set up: train with `pyro-vae train`, "
                "or pass train(..., context=ctx) inside `with pyro_vae.train.distributed.session(device) as ctx:`"
            )
        return SingleProcess()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = dist.get_backend()
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return _context(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def is_main() -> bool:
    """True on rank 0 and in a single process: the one process that writes files and prints."""
    return not dist.is_initialized() or dist.get_rank() == 0


def get_rank() -> int:
    """This process's rank (0 in a single process)."""
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    """The number of processes (1 in a single process)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# -- data -------------------------------------------------------------------------------


def per_rank_batch_size(batch_size: int, world_size: int) -> int:
    """The per-rank share ``batch_size / world_size`` of the global ``batch_size``.

    Raises ``ValueError`` unless it divides evenly: an uneven split would silently change the
    global batch (and so the meaning of the learning rate).
    """
    if batch_size < 1:
        raise ValueError(f"train.batch_size must be positive, got {batch_size}")
    if batch_size % world_size:
        lower = max(world_size, batch_size - batch_size % world_size)
        raise ValueError(
            f"train.batch_size={batch_size} is the global batch and must be divisible by the number of "
            f"processes ({world_size}); use e.g. {lower} or {lower + world_size}"
        )
    return batch_size // world_size


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of ``range(n)`` for ``epoch``: one CPU ``torch.Generator`` seeded from (seed, epoch).

    Drawn on the CPU so that every rank, whatever its device, gets the same permutation.
    """
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(n, generator=generator)


def shard_indices(
    n: int, batch_size: int, seed: int, epoch: int, rank: int, world_size: int, device: torch.device | str = "cpu"
) -> list[torch.Tensor]:
    """This rank's mini-batches of example indices for one epoch.

    All ranks draw the same permutation ``perm`` (:func:`epoch_permutation`); rank ``r`` takes
    ``perm[r : m : world_size]`` with ``m = n - n % world_size`` and cuts it into batches of
    ``batch_size / world_size``. Hence:

    - the ranks' indices are disjoint, and each rank runs the same number of steps (DDP needs
      every rank in every all-reduce);
    - at step t the union of the ranks' batches is ``perm[t*B : (t+1)*B]`` with ``B = batch_size``,
      i.e. the global batch a single process would take from the same permutation;
    - ``n % world_size`` examples (at most ``world_size - 1``, different ones each epoch since the
      permutation changes) sit out the epoch; the last batch may be smaller (the same on every rank).
    """
    local = per_rank_batch_size(batch_size, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    perm = epoch_permutation(n, seed, epoch)
    mine = perm[rank : n - n % world_size : world_size].to(device)  # one copy per epoch; batches index on device
    return list(mine.split(local))


def shard_batches(
    x: torch.Tensor, batch_size: int, seed: int, epoch: int, ctx: SingleProcess | None = None
) -> Iterator[torch.Tensor]:
    """Mini-batches of the device-resident ``x`` for this rank (see :func:`shard_indices`)."""
    ctx = ctx or current_context()
    for index in shard_indices(len(x), batch_size, seed, epoch, ctx.rank, ctx.world_size, x.device):
        yield x[index]


def num_steps(n: int, batch_size: int, world_size: int) -> int:
    """Steps per epoch on every rank for ``n`` training examples (``ceil(n / batch_size)`` in one process)."""
    local = per_rank_batch_size(batch_size, world_size)
    return -(-(n // world_size) // local)


def sharded_batch_source(
    dataset, batch_size: int, seed: int, ctx: SingleProcess | None = None, consumes: Sequence[str] = ()
) -> BatchSource:
    """``(epoch, generator) -> batches``: this rank's shard of ``dataset.train_epoch(epoch, generator)``
    and of the training fields named in ``consumes``.

    ``generator`` is in the same state on every rank, so a dynamically binarized epoch is the same
    tensor on all of them; the shard itself comes from (seed, epoch) alone (:func:`shard_indices`).
    """
    ctx = ctx or current_context()
    per_rank_batch_size(batch_size, ctx.world_size)  # a bad split fails before training starts

    def source(epoch: int, generator: torch.Generator | None = None) -> Iterator[Batch]:
        x = dataset.train_epoch(epoch, generator)
        indices = shard_indices(len(x), batch_size, seed, epoch, ctx.rank, ctx.world_size, x.device)
        return with_fields(x, split_fields(dataset, "train", consumes), indices)

    return source


def with_fields(x: torch.Tensor, fields: dict[str, torch.Tensor], indices: Iterable[torch.Tensor]) -> Iterator[Batch]:
    """``(x[index], {name: field[index]})`` for each index tensor: a batch and its fields, row for row."""
    for index in indices:
        yield x[index], {name: field[index] for name, field in fields.items()}


def shard_rows(x: torch.Tensor, rank: int | None = None, world_size: int | None = None) -> torch.Tensor:
    """This rank's contiguous block of the rows of ``x`` (blocks differ by at most one row); for evaluation."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    return torch.tensor_split(x, world_size)[rank]


# -- gradients --------------------------------------------------------------------------


class _ScaleGradient(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``factor``."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.factor, None


def scale_gradient(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """``tensor`` unchanged, with its gradient multiplied by ``factor`` (exactly, for a power of two)."""
    if factor == 1:
        return tensor
    return _ScaleGradient.apply(tensor, factor)


class LossModule(nn.Module):
    """``forward(x, beta) = estimator.loss(vae, x, beta)``: a training objective as an ``nn.Module``.

    The same idea as Pyro's ``ELBOModule`` (``Trace_ELBO()(model, guide)``) -- a module whose
    forward returns the loss, so ``DistributedDataParallel`` can wrap it -- but for any estimator
    here, not only Pyro ELBO classes, and for the VAE's ``pyro.module``-registered networks.

    With ``gradient_factor = world_size`` the returned value is still this rank's summed loss, while
    its gradient is ``world_size`` times as large; DDP's average over ranks then equals the gradient
    of the loss summed over the global batch.
    """

    def __init__(self, vae: nn.Module, estimator, gradient_factor: float = 1.0) -> None:
        super().__init__()
        self.vae = vae
        self.estimator = estimator
        self.gradient_factor = gradient_factor

    def forward(self, x: torch.Tensor, beta: float | torch.Tensor = 1.0, **data) -> torch.Tensor:
        return scale_gradient(self.estimator.loss(self.vae, x, beta, **data), self.gradient_factor)


class DistributedEstimator:
    """An estimator whose ``loss`` runs through the DDP-wrapped :class:`LossModule`.

    Drop-in for the training step (``TrainStep(vae, DistributedEstimator(...), optimizer)``):
    ``loss(vae, x, beta)`` returns this rank's summed loss and its backward all-reduces the
    gradients. Everything else (``bound``, ``log_weights``, ``spec``) is the wrapped estimator's.
    """

    # DDP's forward prepares its gradient reducer for every iteration; a replayed recording of the
    # loss would skip it, so the distributed step runs the loss itself.
    recordable = False
    # Its loss is the DDP module's forward, whose backward all-reduces the gradients: no lean loss may stand in.
    fast_loss = None

    def __init__(self, module: nn.Module, estimator) -> None:
        self.module, self.estimator = module, estimator

    def loss(self, vae, x: torch.Tensor, beta: float | torch.Tensor = 1.0, **data) -> torch.Tensor:
        return self.module(x, beta, **data)

    def __getattr__(self, name: str):
        # Only called for attributes not found normally: delegate to the wrapped estimator.
        return getattr(self.__dict__["estimator"], name)


# -- metrics ----------------------------------------------------------------------------


def _collective_device(device: torch.device) -> torch.device:
    """NCCL talks only to this rank's GPU; gloo to any device (CPU tensors are cheapest)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def all_reduce_sum(*values: torch.Tensor | float) -> tuple[torch.Tensor, ...]:
    """The sums over ranks of scalar ``values`` (one collective for all); unchanged in one process."""
    tensors = [torch.as_tensor(v) for v in values]
    device = _collective_device(tensors[0].device)
    stacked = torch.stack([t.to(device=device, dtype=torch.float64).reshape(()) for t in tensors])
    if dist.is_initialized():
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    return tuple(stacked.unbind())


def reduce_sums(values: torch.Tensor, earliest: Sequence[int] = ()) -> torch.Tensor:
    """Per-rank vector ``values`` summed over ranks, except the entries at ``earliest``.

    Those hold a step index or -1 for "none" (e.g. the first step with a non-finite loss) and are
    reduced to the earliest index that any rank reports. One ``all_gather``; every rank adds the
    gathered rows in the same order, so all ranks get bitwise equal results (and so take the same
    early-stopping decisions).
    """
    if not dist.is_initialized():
        return values
    device = _collective_device(values.device)
    local = values.to(device)
    rows = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, local)
    table = torch.stack(rows)
    out = table.sum(0)
    for i in earliest:
        column = table[:, i]
        hits = column[column >= 0]
        out[i] = hits.min() if len(hits) else column.new_tensor(-1)
    return out.to(values.device)


def gather_rows(local: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's ``local`` rows in rank order (the inverse of :func:`shard_rows`).

    ``sizes`` (rows per rank) defaults to an all-gather of the row counts. Rows are padded to
    the largest count for the collective and trimmed after.
    """
    if not dist.is_initialized():
        return local
    device = _collective_device(local.device)
    local = local.to(device)
    if sizes is None:
        count = torch.tensor([len(local)], device=device)
        counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
        dist.all_gather(counts, count)
        sizes = [int(c) for c in counts]
    longest = max(sizes)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


def map_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` (per-row results) computed with each rank on its :func:`shard_rows` block, then gathered.

    Every rank returns the full result in the original row order, so any statistic of it (a mean,
    a standard error) is what a single process computes -- up to each rank's own random draws.
    """
    if not dist.is_initialized():
        return fn(x)
    sizes = [len(block) for block in torch.tensor_split(torch.empty(len(x), 0), get_world_size())]
    return gather_rows(fn(shard_rows(x)), sizes)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (e.g. a run folder name or a stop decision)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# -- random number generators -----------------------------------------------------------


def rank_seed(seed: int, rank: int) -> int:
    """An independent 32-bit seed for the Monte Carlo noise of ``rank`` in a run with ``seed``."""
    return int(np.random.SeedSequence([int(seed), 1 + int(rank)]).generate_state(1)[0])


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state (``checkpoint.rng_state``: torch, CUDA, random, numpy), in rank order.

    A collective: every rank calls it; rank 0 puts the list in the checkpoint.
    """
    state = checkpoint.rng_state()
    if not dist.is_initialized():
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def restore_rank_rng(
    states: Sequence[Mapping[str, Any]] | Mapping[str, Any] | None,
    seed: int,
    epoch: int,
    ctx: SingleProcess | None = None,
) -> None:
    """Restore this rank's RNG state from a checkpoint's ``states``.

    ``states`` is the list of :func:`gather_rng_states` (or one ``checkpoint.rng_state``).
    When it holds one state per rank of the current world, each rank takes its own and the
    resumed run continues exactly. Otherwise (different number of processes, or no states) every
    rank is reseeded from (seed, epoch, rank): reproducible, but not the uninterrupted stream.
    """
    ctx = ctx or current_context()
    if isinstance(states, Mapping):
        states = [states]
    if states and len(states) == ctx.world_size:
        checkpoint.set_rng_state(dict(states[ctx.rank]))
        return
    if states:
        warnings.warn(
            f"checkpoint holds RNG states of {len(states)} process(es) but {ctx.world_size} are running: "
            "reseeding each rank from (seed, epoch, rank)",
            stacklevel=2,
        )
    pyro.util.set_rng_seed(rank_seed(epoch_seed(seed, epoch), ctx.rank))
