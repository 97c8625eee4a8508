"""Data-parallel training (pyro_vae.train.distributed): sharding, gradient averaging, reductions, RNG.

Multi-process tests run two CPU processes with the gloo backend over loopback, set up exactly as
torchrun sets them up (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*``), so they exercise the
same ``distributed.session`` path as ``torchrun -m pyro_vae train``. One spawn runs every
scenario (importing torch and Pyro twice costs seconds); the tests below check its results.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from pyro_vae.closed_form import closed_form_terms
from pyro_vae.data import batches
from pyro_vae.estimators import ESTIMATORS, Estimator
from pyro_vae.estimators import get as get_estimator
from pyro_vae.guides import GUIDES
from pyro_vae.likelihoods import LIKELIHOODS
from pyro_vae.model import VAE
from pyro_vae.priors import PRIORS
from pyro_vae.train import distributed
from pyro_vae.train.epoch import EpochSums

WORLD = 2
X_DIM, Z_DIM, HIDDEN = 12, 3, (8,)
GLOBAL_BATCH = 8
SEED = 3
LR = 0.05
STOCHASTIC_ESTIMATORS = ("closed_form", "trace", "meanfield")


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0 and let the OS choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PosteriorMeanELBO(Estimator):
    """A deterministic bound for exact comparisons: log p(x | z = mean of q) - KL(q || p), no noise."""

    def loss(self, vae, x, beta=1.0):
        loc, _ = vae.encode(x)
        terms = closed_form_terms(vae, x)
        log_px = vae.decode(loc).log_prob(vae.likelihood.prepare(x))
        return -(log_px - beta * terms.kl).sum()


def make_data(n: int = 40) -> torch.Tensor:
    generator = torch.Generator().manual_seed(123)
    return torch.bernoulli(torch.full((n, X_DIM), 0.3, dtype=torch.float64), generator=generator)


def make_vae(init_seed: int, **families) -> VAE:
    pyro.clear_param_store()  # as train() does: pyro.module (and Pyro's JIT) must see this VAE's tensors
    pyro.set_rng_seed(init_seed)
    return VAE(x_dim=X_DIM, z_dim=Z_DIM, hidden_dims=HIDDEN, **families).double()


# Every registered estimator (default families), then every prior, likelihood and guide (estimator "trace").
FAMILY_CASES = [
    *[{"estimator": name} for name in sorted(ESTIMATORS.names())],
    *[{"prior": name} for name in sorted(PRIORS.names()) if name != "normal"],
    *[{"likelihood": name} for name in sorted(LIKELIHOODS.names()) if name != "bernoulli"],
    *[{"guide": name} for name in sorted(GUIDES.names()) if name != "normal"],
]


def case_id(case: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in case.items())


def split_case(case: dict) -> tuple[str, dict]:
    families = dict(case)
    return families.pop("estimator", "trace"), families


def params(vae: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in vae.named_parameters()}


# -- the reference: one process, the same B examples, the same noise -------------------------------


def reference_sgd_step(make_estimator, x: torch.Tensor, **families) -> tuple[dict[str, torch.Tensor], list[float]]:
    """One SGD step of a single process on the global batch, with each rank's share of the noise.

    The loss is the sum over the global batch; its rank-r part is computed after seeding the RNG as
    rank r does, and by a fresh estimator as rank r holds one (estimators may keep state: the
    ``tracegraph`` baseline, the JIT's compiled function, whose tracing draws noise), so the Monte
    Carlo noise matches the distributed step example by example.
    """
    vae = make_vae(100, **families)  # rank 0's initialization (DDP broadcasts it to every rank)
    optimizer = torch.optim.SGD(vae.parameters(), lr=LR)
    total, parts = 0.0, []
    for rank in range(WORLD):
        index = distributed.shard_indices(len(x), GLOBAL_BATCH, SEED, 0, rank, WORLD)[0]
        pyro.set_rng_seed(distributed.rank_seed(SEED, rank))
        part = make_estimator().loss(vae, x[index])
        parts.append(part.item())
        total = total + part
    total.backward()
    optimizer.step()
    return params(vae), parts


# -- the worker: one rank -----------------------------------------------------------------------


def _one_step(ctx, estimator, x, **families):
    vae = make_vae(100 + ctx.rank, **families)  # different on each rank: DDP must broadcast rank 0's
    train_estimator = ctx.wrap(estimator, vae)
    optimizer = torch.optim.SGD(vae.parameters(), lr=LR)
    index = distributed.shard_indices(len(x), GLOBAL_BATCH, SEED, 0, ctx.rank, ctx.world_size)[0]
    ctx.seed(SEED)
    optimizer.zero_grad()
    loss = train_estimator.loss(vae, x[index])
    loss.backward()
    optimizer.step()
    return {"params": params(vae), "loss": loss.item(), "index": index}


def _several_steps(ctx, x, steps_per_epoch_limit=None):
    """Two epochs of Adam with clipping on this rank's shards, as the training loop does it."""
    vae = make_vae(init_seed=200 + ctx.rank)
    estimator = get_estimator("trace")
    train_estimator = ctx.wrap(estimator, vae)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-2)
    ctx.seed(SEED)
    seen, total, count = [], torch.zeros((), dtype=torch.float64), 0
    for epoch in range(2):
        for index in distributed.shard_indices(len(x), GLOBAL_BATCH, SEED, epoch, ctx.rank, ctx.world_size):
            optimizer.zero_grad()
            loss = train_estimator.loss(vae, x[index], 0.5)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 5.0)
            optimizer.step()
            seen.append((epoch, index))
            total, count = total + loss.detach(), count + len(index)
    total, count = distributed.all_reduce_sum(total, count)
    return {"params": params(vae), "batches": seen, "train_loss_per_example": (total / count).item()}


def _unused_parameter(ctx, x):
    """A parameter outside the loss's graph: DDP (static graph) must not wait for its gradient."""
    vae = make_vae(init_seed=300)
    vae.register_parameter("spare", nn.Parameter(torch.zeros(2, dtype=torch.float64)))
    module = ctx.loss_module(vae, PosteriorMeanELBO())
    optimizer = torch.optim.SGD(vae.parameters(), lr=LR)
    for step in range(3):
        optimizer.zero_grad()
        index = distributed.shard_indices(len(x), GLOBAL_BATCH, SEED, step, ctx.rank, ctx.world_size)[0]
        module(x[index]).backward()
        optimizer.step()
    return {"params": params(vae), "spare_grad": vae.spare.grad}


def _reductions(ctx, x):
    (total, count) = distributed.all_reduce_sum(torch.tensor(ctx.rank + 1.5), len(distributed.shard_rows(x[:7])))
    rows = distributed.map_rows(lambda block: block.sum(-1) * (1 + block[:, 0]), x[:7])
    ctx.seed(SEED)
    states = distributed.gather_rng_states()
    distributed.restore_rank_rng(states, SEED, epoch=1, ctx=ctx)
    after_restore = torch.rand(3)
    # entry 1 holds a step index (-1: none): rank 0 reports none, rank 1 step 5; entry 3 both report one
    vector = torch.tensor([[1.0, -1.0, 2.0, 7.0], [3.0, 5.0, 4.0, 3.0]])[ctx.rank]
    none = torch.tensor([0.0, -1.0])
    return {
        "vector": distributed.reduce_sums(vector, earliest=(1, 3)),
        "none": distributed.reduce_sums(none, earliest=(1,)),
        "sum": total.item(),
        "count": count.item(),
        "rows": rows,
        "states": states,
        "after_restore": after_restore,
        "out_dir_from_rank0": distributed.broadcast_object(f"run-of-rank-{ctx.rank}"),
        **_context_methods(ctx, x),
    }


def _context_methods(ctx, x):
    """What the training loop asks of the context, under a process group."""
    bad_step = torch.tensor([-1, 5][ctx.rank])  # rank 0 saw no bad step, rank 1 one at step 5
    sums = EpochSums(
        loss=torch.tensor(1.5 + ctx.rank), examples=4, first_bad_step=bad_step, test_elbo=torch.tensor(-2.0)
    )
    return {
        "epoch_sums": ctx.reduce(sums),
        "context_broadcast": ctx.broadcast(f"run-of-rank-{ctx.rank}"),
        "context_rows": ctx.shard_rows(x[:7]),
        "context_rng_keys": sorted(ctx.rng_state()),
        "context_steps": ctx.steps_per_epoch(len(x), GLOBAL_BATCH),
    }


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # exact comparisons: float64 leaves only summation-order noise
    x = make_data()
    with distributed.session("cpu") as ctx:
        assert ctx.enabled and ctx.world_size == world and ctx.rank == rank and ctx.backend == "gloo"
        assert distributed.is_main() == (rank == 0)
        results = {
            "one_step": {name: _one_step(ctx, get_estimator(name), x) for name in STOCHASTIC_ESTIMATORS},
            "deterministic": _one_step(ctx, PosteriorMeanELBO(), x),
            "families": {
                case_id(case): _one_step(ctx, get_estimator(split_case(case)[0]), x, **split_case(case)[1])
                for case in FAMILY_CASES
            },
            "several_steps": _several_steps(ctx, x),
            "unused_parameter": _unused_parameter(ctx, x),
            "reductions": _reductions(ctx, x),
        }
    assert not torch.distributed.is_initialized(), "session() must destroy the process group it created"
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Run every scenario on two gloo ranks; the list holds each rank's results."""
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(WORLD, free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


# -- gradient averaging -------------------------------------------------------------------------


def assert_params_close(actual: dict, expected: dict, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol, msg=name)


def test_deterministic_step_of_two_ranks_equals_one_process_step_on_the_union(ranks, float64):
    """No noise at all: one literal single-process call on the global batch is the reference."""
    x = make_data()
    vae = make_vae(init_seed=100)
    optimizer = torch.optim.SGD(vae.parameters(), lr=LR)
    index = torch.cat([ranks[r]["deterministic"]["index"] for r in range(WORLD)])
    PosteriorMeanELBO().loss(vae, x[index]).backward()
    optimizer.step()
    expected = params(vae)
    before = params(make_vae(init_seed=100))
    moved = max((expected[k] - before[k]).abs().max().item() for k in expected)
    assert moved > 1e-3, "the step must move the parameters, or the comparison shows nothing"
    for r in range(WORLD):
        assert_params_close(ranks[r]["deterministic"]["params"], expected)


@pytest.mark.parametrize("name", STOCHASTIC_ESTIMATORS)
def test_step_of_two_ranks_equals_one_process_step_with_the_same_noise(ranks, float64, name):
    x = make_data()
    expected, parts = reference_sgd_step(lambda: get_estimator(name), x)
    for r in range(WORLD):
        result = ranks[r]["one_step"][name]
        # the value each rank returns is its own summed loss (the gradient factor leaves it alone)
        assert result["loss"] == pytest.approx(parts[r], rel=1e-12)
        assert_params_close(result["params"], expected)


@pytest.mark.parametrize("case", FAMILY_CASES, ids=case_id)
def test_every_estimator_and_family_steps_like_one_process(ranks, float64, case):
    """Every registered estimator, prior, likelihood and guide trains data-parallel: same step as the reference."""
    name, families = split_case(case)
    expected, parts = reference_sgd_step(lambda: get_estimator(name), make_data(), **families)
    for r in range(WORLD):
        result = ranks[r]["families"][case_id(case)]
        assert result["loss"] == pytest.approx(parts[r], rel=1e-9)
        assert_params_close(result["params"], expected, rtol=1e-8, atol=1e-10)


def test_loss_scale_matters_so_the_comparison_can_fail(float64):
    """Without the world-size gradient factor DDP's average would be half the global gradient:
    the step would differ from the reference by far more than the tolerance used above."""
    x = make_data()
    expected, _ = reference_sgd_step(PosteriorMeanELBO, x)
    vae = make_vae(init_seed=100)
    optimizer = torch.optim.SGD(vae.parameters(), lr=LR)
    for rank in range(WORLD):
        index = distributed.shard_indices(len(x), GLOBAL_BATCH, SEED, 0, rank, WORLD)[0]
        (PosteriorMeanELBO().loss(vae, x[index]) / WORLD).backward()  # DDP's mean without the factor
    optimizer.step()
    with pytest.raises(AssertionError):
        assert_params_close(params(vae), expected)


def test_ranks_hold_identical_parameters_after_several_steps(ranks):
    """Different initial weights on each rank, different noise, disjoint data: after two epochs of
    Adam with clipping the parameters are bitwise equal (DDP broadcast + all-reduced gradients)."""
    first, second = ranks[0]["several_steps"]["params"], ranks[1]["several_steps"]["params"]
    initial = params(make_vae(init_seed=200))
    assert any(not torch.equal(first[k], initial[k]) for k in first), "training must change the weights"
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert ranks[0]["several_steps"]["train_loss_per_example"] == ranks[1]["several_steps"]["train_loss_per_example"]


def test_a_parameter_without_gradient_does_not_stall_training(ranks):
    for r in range(WORLD):
        assert ranks[r]["unused_parameter"]["spare_grad"] is None
        assert torch.equal(ranks[r]["unused_parameter"]["params"]["spare"], torch.zeros(2, dtype=torch.float64))
    for name, value in ranks[0]["unused_parameter"]["params"].items():
        assert torch.equal(value, ranks[1]["unused_parameter"]["params"][name]), name


# -- data sharding ------------------------------------------------------------------------------


def test_the_ranks_minibatches_are_disjoint_within_each_epoch(ranks):
    batches = [ranks[r]["several_steps"]["batches"] for r in range(WORLD)]
    assert len(batches[0]) == len(batches[1]), "every rank runs the same number of steps"
    for epoch in range(2):
        mine = [torch.cat([index for e, index in batches[r] if e == epoch]) for r in range(WORLD)]
        for indices in mine:
            assert len(set(indices.tolist())) == len(indices), "no repeats within a rank"
        assert not set(mine[0].tolist()) & set(mine[1].tolist())
        assert len(mine[0]) + len(mine[1]) == 40


@pytest.mark.parametrize(("n", "world", "batch"), [(40, 2, 8), (41, 2, 8), (103, 4, 12), (10, 3, 3), (7, 1, 3)])
def test_shards_are_disjoint_equal_and_their_union_is_the_global_batch(n, world, batch):
    shards = [distributed.shard_indices(n, batch, SEED, 5, r, world) for r in range(world)]
    steps = {len(s) for s in shards}
    assert len(steps) == 1, "equal number of steps on every rank"
    everything = torch.cat([torch.cat(s) for s in shards])
    assert len(set(everything.tolist())) == len(everything) == n - n % world
    perm = distributed.epoch_permutation(n, SEED, 5)[: n - n % world]  # n % world examples sit out
    for step in range(steps.pop()):
        union = torch.cat([s[step] for s in shards])
        assert sorted(union.tolist()) == sorted(perm[step * batch : (step + 1) * batch].tolist())
        assert len({len(s[step]) for s in shards}) == 1, "equal batch sizes across ranks at each step"


def test_every_epoch_draws_a_new_permutation_from_the_shared_seed():
    a, b = distributed.epoch_permutation(100, SEED, 0), distributed.epoch_permutation(100, SEED, 1)
    assert not torch.equal(a, b)
    assert torch.equal(a, distributed.epoch_permutation(100, SEED, 0))
    assert not torch.equal(a, distributed.epoch_permutation(100, SEED + 1, 0))


def test_shard_batches_slices_the_device_resident_tensor():
    x = torch.arange(20.0).unsqueeze(-1)
    ctx = distributed.ProcessGroup(rank=1, world_size=2)
    batches = list(distributed.shard_batches(x, 4, SEED, 0, ctx))
    expected = distributed.shard_indices(20, 4, SEED, 0, 1, 2)
    assert [b.squeeze(-1).long().tolist() for b in batches] == [i.tolist() for i in expected]


def test_a_global_batch_that_does_not_split_evenly_is_a_clear_error():
    with pytest.raises(ValueError, match=r"batch_size=10 .*divisible by the number of processes \(4\).*8 or 12"):
        distributed.per_rank_batch_size(10, 4)
    with pytest.raises(ValueError, match="positive"):
        distributed.per_rank_batch_size(0, 2)


# -- reductions, broadcast, RNG ----------------------------------------------------------------


def test_sums_over_ranks(ranks):
    for r in range(WORLD):
        assert ranks[r]["reductions"]["sum"] == 1.5 + 2.5
        assert ranks[r]["reductions"]["count"] == 7


def test_vector_sums_over_ranks_with_earliest_step_entries(ranks):
    for r in range(WORLD):
        assert ranks[r]["reductions"]["vector"].tolist() == [4.0, 5.0, 6.0, 3.0]
        assert ranks[r]["reductions"]["none"].tolist() == [0.0, -1.0]


@pytest.mark.parametrize(("n", "batch", "world"), [(60000, 256, 1), (60000, 256, 2), (41, 8, 2), (7, 3, 1), (10, 4, 4)])
def test_steps_per_epoch_match_the_shards(n, batch, world):
    expected = len(distributed.shard_indices(n, batch, SEED, 0, 0, world))
    assert distributed.num_steps(n, batch, world) == expected
    if world == 1:
        assert expected == -(-n // batch)


def test_rowwise_results_gathered_in_order_equal_the_single_process_result(ranks, float64):
    x = make_data()[:7]
    expected = x.sum(-1) * (1 + x[:, 0])
    for r in range(WORLD):
        assert torch.equal(ranks[r]["reductions"]["rows"], expected)


def test_the_context_adds_named_sums_over_ranks_and_keeps_the_earliest_bad_step(ranks):
    for r in range(WORLD):
        assert ranks[r]["reductions"]["epoch_sums"] == EpochSums(
            loss=1.5 + 2.5, examples=8.0, first_bad_step=5.0, test_elbo=-4.0
        )


def test_the_context_shards_rows_broadcasts_and_checkpoints_every_ranks_rng(ranks):
    x = make_data()[:7]
    assert torch.equal(torch.cat([ranks[r]["reductions"]["context_rows"] for r in range(WORLD)]), x)
    for r in range(WORLD):
        assert ranks[r]["reductions"]["context_broadcast"] == "run-of-rank-0"
        assert ranks[r]["reductions"]["context_rng_keys"] == ["rank_rng", "rng"]
        assert ranks[r]["reductions"]["context_steps"] == len(
            distributed.shard_indices(40, GLOBAL_BATCH, SEED, 0, r, WORLD)
        )


def test_rank0_object_is_broadcast(ranks):
    assert [ranks[r]["reductions"]["out_dir_from_rank0"] for r in range(WORLD)] == ["run-of-rank-0"] * WORLD


def test_each_rank_has_its_own_noise_and_restores_its_own_state(ranks, float64):
    states = ranks[0]["reductions"]["states"]
    assert len(states) == WORLD
    assert not torch.equal(states[0]["torch"], states[1]["torch"]), "ranks must not share noise"
    for r in range(WORLD):
        torch.set_rng_state(states[r]["torch"])
        assert torch.equal(ranks[r]["reductions"]["after_restore"], torch.rand(3))


def test_restore_with_another_world_size_reseeds_reproducibly():
    ctx = distributed.SingleProcess()
    with pytest.warns(UserWarning, match="RNG states of 2 process"):
        distributed.restore_rank_rng([pyro.util.get_rng_state()] * 2, SEED, epoch=4, ctx=ctx)
    first = torch.rand(3)
    with pytest.warns(UserWarning):
        distributed.restore_rank_rng([pyro.util.get_rng_state()] * 2, SEED, epoch=4, ctx=ctx)
    assert torch.equal(torch.rand(3), first)


def test_single_process_is_a_no_op(monkeypatch):
    for name in distributed.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    assert not distributed.launched_by_torchrun()
    with distributed.session("cpu") as ctx:
        assert not ctx.enabled and ctx.is_main and ctx.device == torch.device("cpu")
        assert not torch.distributed.is_initialized()
        vae = VAE(x_dim=X_DIM, z_dim=Z_DIM, hidden_dims=HIDDEN)
        estimator = get_estimator("trace")
        assert ctx.wrap(estimator, vae) is estimator
        x = torch.rand(5, 2)
        assert distributed.map_rows(lambda t: t * 2, x).equal(x * 2)
        assert distributed.all_reduce_sum(torch.tensor(2.0), 3) == (2.0, 3.0)
        assert distributed.broadcast_object("a") == "a"
        states = distributed.gather_rng_states()
        expected = torch.rand(2)
        distributed.restore_rank_rng(states, SEED, 0, ctx)
        assert torch.equal(torch.rand(2), expected)


def test_one_process_context_is_the_identity(monkeypatch):
    for name in distributed.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    ctx = distributed.current_context()
    assert type(ctx) is distributed.SingleProcess and ctx.is_main and not ctx.enabled
    x = torch.arange(6.0).reshape(3, 2)
    assert ctx.shard_rows(x).equal(x) and ctx.broadcast("a") == "a"
    estimator = get_estimator("trace")
    assert ctx.wrap(estimator, None) is estimator
    before = torch.get_rng_state()
    ctx.seed(SEED)  # one process keeps its stream
    ctx.barrier()
    assert torch.equal(torch.get_rng_state(), before)
    assert ctx.reduce(EpochSums(loss=torch.tensor(2.0), examples=4)) == EpochSums(2.0, 4.0, -1.0)
    state = ctx.rng_state()
    assert list(state) == ["rng"]  # one-process checkpoints have no rank_rng
    expected = torch.rand(3)
    ctx.restore_rng_state(state, SEED, epoch=0)
    assert torch.equal(torch.rand(3), expected)


def test_one_process_batches_are_the_device_side_permutation():
    x = torch.arange(10.0).unsqueeze(-1)
    dataset = type("Data", (), {"train_epoch": lambda self, epoch, generator: x})()
    source = distributed.SingleProcess().batches(dataset, 4, seed=SEED)
    got = list(source(0, torch.Generator().manual_seed(1)))
    expected = list(batches(x, 4, torch.Generator().manual_seed(1)))
    assert [b.tolist() for b, fields in got] == [b.tolist() for b in expected]
    assert all(fields == {} for _, fields in got)  # the structure consumes no fields
    assert distributed.SingleProcess().steps_per_epoch(10, 4) == len(got) == 3


@pytest.mark.parametrize("world_size", [1, 2])
def test_batches_carry_the_consumed_fields_row_for_row(world_size):
    x = torch.arange(10.0).unsqueeze(-1)
    labels = torch.arange(10) * 10
    attributes = {"train_epoch": lambda self, epoch, generator: x, "fields": {"labels": {"train": labels}}}
    dataset = type("Data", (), attributes)()
    ctx = distributed.SingleProcess() if world_size == 1 else distributed.ProcessGroup(rank=1, world_size=2)
    source = ctx.batches(dataset, 4, seed=SEED, consumes=("labels",))
    got = list(source(0, torch.Generator().manual_seed(1)))
    assert got and all(torch.equal(fields["labels"], xb.squeeze(-1).long() * 10) for xb, fields in got)


def test_a_torchrun_worker_without_a_process_group_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="no process group is set up"):
        distributed.current_context()
    monkeypatch.setenv("WORLD_SIZE", "1")  # a world of one trains as one process
    assert type(distributed.current_context()) is distributed.SingleProcess


def test_torchrun_environment_is_detected():
    assert distributed.launched_by_torchrun({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert not distributed.launched_by_torchrun({"RANK": "0", "WORLD_SIZE": "2"})


def test_gradient_factor_scales_the_gradient_only():
    t = torch.tensor(3.0, requires_grad=True)
    out = distributed.scale_gradient(t * t, 4.0)
    assert out.item() == 9.0
    out.backward()
    assert t.grad.item() == 4.0 * 6.0


# -- end to end: torchrun -m pyro_vae train ----------------------------------------------------

TINY_RUN = [
    "--config",
    str(Path(__file__).resolve().parents[1] / "configs" / "mnist.toml"),
    "--set",
    "data.subset=300",
    "--set",
    "data.val_size=60",
    "--set",
    "model.z_dim=4",
    "--set",
    "model.hidden_dims=[32]",
    "--set",
    "train.batch_size=64",
    "--set",
    "train.nll_samples=4",
    "--set",
    "train.plots=false",
    "--device",
    "cpu",
]


def torchrun_train(data_root: Path, out: Path, *args: str, nproc: int = WORLD) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "pyro_vae",
        "train",
        *TINY_RUN,
        "--out",
        str(out),
        *args,
    ]
    env = {**os.environ, "PYRO_VAE_DATA": str(data_root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def torchrun_runs(data_root, tmp_path_factory) -> dict[str, Path]:
    """Two-process runs: one epoch then ``--resume`` to two, and two epochs uninterrupted."""
    root = tmp_path_factory.mktemp("torchrun")
    resumed, straight = root / "resumed", root / "straight"
    first = torchrun_train(data_root, resumed, "--set", "train.epochs=1")
    assert first.stdout.strip().splitlines() == [str(resumed)], "rank 0 alone prints the run folder"
    one_epoch = read_metrics(resumed)
    torchrun_train(data_root, resumed, "--set", "train.epochs=2", "--resume")
    torchrun_train(data_root, straight, "--set", "train.epochs=2")
    return {"root": root, "resumed": resumed, "straight": straight, "one_epoch": one_epoch}


def test_torchrun_two_processes_train_one_epoch_and_rank0_writes_once(torchrun_runs):
    (metrics,) = torchrun_runs["one_epoch"]
    assert metrics["epoch"] == 1 and metrics["train_elbo"] < 0 and metrics["test_elbo"] < 0
    root = torchrun_runs["root"]
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("metrics.jsonl")) == [
        "resumed/metrics.jsonl",
        "straight/metrics.jsonl",
    ]
    assert len(list(root.rglob("checkpoint.pt"))) == 2
    state = torch.load(torchrun_runs["resumed"] / "checkpoint.pt", weights_only=True)
    assert len(state["rank_rng"]) == WORLD
    assert not torch.equal(state["rank_rng"][0]["torch"], state["rank_rng"][1]["torch"])
    # 300 training examples, global batch 64 -> 32 per rank: ceil(150 / 32) = 5 steps per epoch
    assert metrics["steps"] == 5


def test_torchrun_resume_continues_exactly(torchrun_runs):
    resumed, straight = read_metrics(torchrun_runs["resumed"]), read_metrics(torchrun_runs["straight"])
    assert [m["epoch"] for m in resumed] == [1, 2]
    for key in ("train_elbo", "val_elbo", "test_elbo", "steps"):
        assert [m[key] for m in resumed] == [m[key] for m in straight], key
