"""The training step: the fast path optimizes exactly Pyro's Trace_ELBO objective, and falls back."""

from __future__ import annotations

import copy
import logging

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

from pyro_vae import estimators
from pyro_vae.model import VAE
from pyro_vae.traces import SiteLogDensity, lean_loss_supported, meanfield_elbo_loss, reparameterized_elbo_loss
from pyro_vae.train.distributed import DistributedEstimator, LossModule
from pyro_vae.train.step import (
    CaptureFailedError,
    Plan,
    TrainStep,
    plan_path,
)

SMALL = dict(x_dim=12, z_dim=3, hidden_dims=(8,))


def small_vae(**kwargs) -> VAE:
    torch.manual_seed(1)
    return VAE(**{**SMALL, **kwargs})


def binary_batch(n: int = 6, d: int = 12) -> torch.Tensor:
    return (torch.rand(n, d, generator=torch.Generator().manual_seed(2)) < 0.4).float()


def grads(module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("beta", [1.0, 0.3, torch.tensor(0.3)])
def test_lean_loss_equals_trace_elbo_value_and_gradient(beta):
    vae, x = small_vae(), binary_batch()
    pyro.set_rng_seed(5)
    expected = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, beta)
    expected.backward()
    expected_grads = grads(vae)
    vae.zero_grad(set_to_none=True)
    pyro.set_rng_seed(5)
    loss = reparameterized_elbo_loss(vae, x, beta)
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for g, e in zip(grads(vae), expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)


def assert_same_value_and_gradient(vae, x, pyro_elbo, lean_loss, seed: int) -> torch.Tensor:
    """``lean_loss`` has the value and gradient of ``pyro_elbo.differentiable_loss`` for the same seed (beta 0.5)."""
    pyro.set_rng_seed(seed)
    expected = pyro_elbo.differentiable_loss(vae.model, vae.guide, x, 0.5)
    expected_grads = torch.autograd.grad(expected, list(vae.parameters()), allow_unused=True)
    pyro.set_rng_seed(seed)
    loss = lean_loss(vae, x, 0.5)
    got = torch.autograd.grad(loss, list(vae.parameters()), allow_unused=True)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-5)
    for g, e in zip(got, expected_grads, strict=True):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    return loss


FAMILIES = [
    *({"guide": g} for g in ("lowrank", "iaf")),
    *({"prior": p} for p in ("learned_normal", "mixture", "vamp", "flow")),
    *({"likelihood": lik} for lik in ("continuous_bernoulli", "gaussian", "laplace")),
]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_lean_loss_equals_trace_elbo_for_every_family(family):
    """The fast path's objective is Trace_ELBO's for every guide, prior and likelihood (all reparameterized)."""
    vae, x = small_vae(**family), binary_batch() * 0.8 + 0.1  # inside (0, 1) for every likelihood
    assert lean_loss_supported(vae, x)[0]
    assert_same_value_and_gradient(vae, x, Trace_ELBO(), reparameterized_elbo_loss, seed=7)


@pytest.mark.parametrize("guide, from_noise", [("normal", True), ("lowrank", False), ("iaf", False)])
def test_lean_guide_draws_pyros_z_and_takes_log_q_from_the_noise(guide, from_noise):
    """The lean guide run draws the very z that Pyro's rsample draws (same seed, bit for bit); for a
    diagonal Normal it evaluates log q from the noise, and that equals Normal.log_prob(z) in value."""
    vae, x = small_vae(guide=guide), binary_batch()
    pyro.set_rng_seed(11)
    trace = poutine.trace(vae.guide).get_trace(x)
    pyro.set_rng_seed(11)
    with SiteLogDensity() as lean:
        vae.guide(x)
    assert torch.equal(lean.values["z"], trace.nodes["z"]["value"])
    assert ("z" in lean.noise) is from_noise
    expected = trace.nodes["z"]["fn"].log_prob(trace.nodes["z"]["value"]).sum()
    assert lean.log_density().item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("family", "analytic"),
    [
        ({}, True),
        ({"prior": "learned_normal"}, True),
        ({"prior": "mixture"}, False),
        ({"prior": "vamp"}, False),
        ({"guide": "iaf"}, False),
        ({"guide": "lowrank"}, True),  # closed_form registers the low-rank/diagonal pair with torch
        ({"guide": "lowrank", "prior": "learned_normal"}, True),
        ({"likelihood": "gaussian"}, True),
    ],
    ids=lambda v: "-".join(f"{k}={w}" for k, w in v.items()) if isinstance(v, dict) else f"analytic={v}",
)
def test_lean_meanfield_loss_equals_trace_meanfield_elbo(family, analytic):
    """The fast path of ``meanfield``: TraceMeanField_ELBO's value and gradient, analytic KL where torch has one."""
    vae, x = small_vae(**family), binary_batch() * 0.8 + 0.1
    with SiteLogDensity() as guide:
        vae.guide(x, 0.5)
    with SiteLogDensity(replay=guide.values, kl_from=guide) as model:
        vae.model(x, 0.5)
    assert model.analytic == ({"z"} if analytic else set())
    loss = assert_same_value_and_gradient(vae, x, TraceMeanField_ELBO(), meanfield_elbo_loss, seed=9)
    if analytic:  # and it is not Trace_ELBO's number: the KL term replaced log p(z) - log q(z|x)
        pyro.set_rng_seed(9)
        assert abs(reparameterized_elbo_loss(vae, x, 0.5).item() - loss.item()) > 1e-3


def test_meanfield_estimator_takes_the_lean_path():
    vae, x = small_vae(), binary_batch()
    step = TrainStep(vae, estimators.get("meanfield"), torch.optim.Adam(vae.parameters(), lr=1e-3))
    assert torch.isfinite(step(x)) and step.path == "fast" and step.recorded.loss_fn is meanfield_elbo_loss


def test_lean_loss_is_a_different_number_for_other_noise():
    """The comparison above can fail: another draw of z gives another loss."""
    vae, x = small_vae(), binary_batch()
    pyro.set_rng_seed(5)
    a = reparameterized_elbo_loss(vae, x)
    pyro.set_rng_seed(6)
    b = reparameterized_elbo_loss(vae, x)
    assert abs(a.item() - b.item()) > 1e-3


def test_fast_step_follows_plain_svi_step_for_step():
    """Same seed per step: TrainStep (fast path) and pyro.infer.SVI + pyro.optim.Adam give the same
    losses and the same parameters after every step (pyro.optim.Adam is torch Adam per parameter)."""
    x, steps, lr = binary_batch(), 6, 1e-2
    vae_svi = small_vae()
    vae_fast = copy.deepcopy(vae_svi)
    svi = SVI(vae_svi.model, vae_svi.guide, pyro.optim.Adam({"lr": lr}), loss=Trace_ELBO())
    svi_losses, svi_params = [], []
    for t in range(steps):
        pyro.set_rng_seed(100 + t)
        svi_losses.append(svi.step(x, 0.5))
        svi_params.append([p.detach().clone() for p in vae_svi.parameters()])
    pyro.clear_param_store()
    step = TrainStep(vae_fast, estimators.get("trace"), torch.optim.Adam(vae_fast.parameters(), lr=lr))
    for t in range(steps):
        pyro.set_rng_seed(100 + t)
        loss = step(x, 0.5)
        assert loss.item() == pytest.approx(svi_losses[t], rel=1e-5)
        for p, q in zip(vae_fast.parameters(), svi_params[t], strict=True):
            torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)
    # The steps after the first replayed the recorded loss (pyro_vae.recorded), one graph for this batch.
    assert step.path == "fast" and step.recorded.loss_fn is reparameterized_elbo_loss
    assert len(step.recorded.replays) == 1 and None not in step.recorded.replays.values()
    assert any(not torch.equal(p, q) for p, q in zip(svi_params[0], svi_params[-1], strict=True))  # it did train


@pytest.mark.parametrize("name", ["iwae", "dreg", "closed_form"])
def test_estimators_without_a_lean_loss_are_recorded_too(name):
    """The fast path records whatever loss it runs; IWAE, DReG and the closed form trace cleanly and
    train step for step like the same estimator unrecorded."""
    x = binary_batch()
    runs = {}
    for record in (True, False):
        vae = small_vae()
        pyro.clear_param_store()
        step = TrainStep(vae, estimators.get(name), torch.optim.Adam(vae.parameters(), lr=1e-2), record=record)
        losses = []
        for t in range(4):
            pyro.set_rng_seed(400 + t)
            losses.append(step(x, 0.5).item())
        runs[record] = (step, losses, [p.detach().clone() for p in vae.parameters()])
    recorded, plain = runs[True], runs[False]
    assert list(recorded[0].recorded.replays.values()) != [] and None not in recorded[0].recorded.replays.values()
    assert recorded[1] == plain[1]
    for p, q in zip(recorded[2], plain[2], strict=True):
        assert torch.equal(p, q)


class _DuckTypedTrace:
    """An estimator by duck typing only: it does not say whether it keeps state, so it is not recorded."""

    def __init__(self) -> None:
        self.inner = estimators.get("trace")

    def loss(self, vae, x, beta=1.0):
        return self.inner.loss(vae, x, beta)


@pytest.mark.parametrize("name", ["jit_trace", "tracegraph", "distributed", "duck-typed"])
def test_estimators_that_keep_state_compile_or_synchronize_themselves_are_not_recorded(name):
    vae, x = small_vae(), binary_batch()
    if name == "distributed":  # the DDP wrapper's type, around a plain module (no process group needed)
        estimator = DistributedEstimator(LossModule(vae, estimators.get("trace")), estimators.get("trace"))
    else:
        estimator = _DuckTypedTrace() if name == "duck-typed" else estimators.get(name)
    step = TrainStep(vae, estimator, torch.optim.Adam(vae.parameters(), lr=1e-3))
    step(x)
    assert torch.isfinite(step(x)) and step.path == "fast" and step.recorded is None


def test_the_distributed_wrapper_runs_its_ddp_loss_never_the_inner_fast_loss():
    # The wrapper delegates what the estimator declares (its bound, its draws), but a lean loss in
    # place of the DDP module's forward would skip the gradient all-reduce.
    vae, x = small_vae(), binary_batch()
    inner = estimators.get("trace")
    estimator = DistributedEstimator(LossModule(vae, inner), inner)
    assert inner.fast_loss is reparameterized_elbo_loss and estimator.fast_loss is None
    assert estimator.bound_is_elbo and estimator.particles == 1
    step = TrainStep(vae, estimator, torch.optim.Adam(vae.parameters(), lr=1e-3))
    step(x)
    assert step._loss_fn == estimator.loss


def test_a_subclass_that_writes_its_own_loss_drops_the_inherited_fast_loss():
    class Custom(estimators.TraceELBO):
        def loss(self, vae, x, beta=1.0):
            return 2 * super().loss(vae, x, beta)

    class Declared(estimators.TraceELBO):
        fast_loss = staticmethod(meanfield_elbo_loss)

        def loss(self, vae, x, beta=1.0):
            return estimators.get("meanfield").loss(vae, x, beta)

    assert Custom().fast_loss is None and Declared().fast_loss is meanfield_elbo_loss
    assert estimators.get("iwae(k=5)").fast_loss is None
    assert estimators.get("meanfield").fast_loss is meanfield_elbo_loss


def test_step_without_recording_runs_the_lean_loss_itself():
    vae, x = small_vae(), binary_batch()
    step = TrainStep(vae, estimators.get("trace"), torch.optim.Adam(vae.parameters(), lr=1e-3), record=False)
    step(x)
    assert torch.isfinite(step(x)) and step.recorded is None and step._loss_fn is reparameterized_elbo_loss


def run_steps(vae, x, steps=4, **kwargs):
    step = TrainStep(vae, estimators.get("trace"), torch.optim.Adam(vae.parameters(), lr=1e-2), **kwargs)
    losses = []
    for t in range(steps):
        pyro.set_rng_seed(200 + t)
        losses.append(step(x).item())
    return step, losses


def test_fast_step_equals_plain_step_with_gradient_clipping():
    x = binary_batch()
    vae = small_vae()
    total = torch.nn.utils.get_total_norm(
        [
            g
            for g in torch.autograd.grad(
                Trace_ELBO().differentiable_loss(vae.model, vae.guide, x), list(vae.parameters())
            )
        ]
    )
    assert total > 0.5  # so that clipping at 0.5 acts
    pyro.clear_param_store()
    plain_vae, fast_vae = copy.deepcopy(vae), copy.deepcopy(vae)
    plain, plain_losses = run_steps(plain_vae, x, clip_norm=0.5, fast=False)
    pyro.clear_param_store()
    fast, fast_losses = run_steps(fast_vae, x, clip_norm=0.5)
    assert (plain.path, fast.path) == ("plain", "fast")
    assert fast_losses == pytest.approx(plain_losses, rel=1e-5)
    for p, q in zip(fast_vae.parameters(), plain_vae.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_fast_step_makes_no_host_sync(monkeypatch):
    """The plain Trace_ELBO reads every site to the host (``.item()``); the fast path reads nothing but
    the optimizer's step counters, which torch keeps on the host (non-capturable Adam) so that reading
    them costs no device sync."""
    vae, x = small_vae(), binary_batch()
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3, foreach=True)
    step = TrainStep(vae, estimators.get("trace"), optimizer)
    step(x)  # the first call runs the plain step and chooses the path
    counters = [s["step"] for s in optimizer.state.values()]
    assert counters and all(c.device.type == "cpu" for c in counters)
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "__bool__", "__float__", "tolist")}
    reads = []

    def guarded(name):
        def read(self, *args):
            if not any(self is c for c in counters):
                raise AssertionError(f"host sync in the training step: Tensor.{name}")
            reads.append(name)
            return originals[name](self, *args)

        return read

    for name in originals:
        monkeypatch.setattr(torch.Tensor, name, guarded(name))
    loss = step(x)
    with pytest.raises(AssertionError, match="host sync"):
        Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    monkeypatch.undo()
    assert torch.isfinite(loss) and set(reads) == {"item"}  # the step counters only


def test_validation_is_off_only_inside_the_fast_step():
    vae, x = small_vae(), binary_batch()
    seen = []

    class Spy(estimators.TraceELBO):
        def loss(self, vae, x, beta=1.0):
            seen.append((pyro.infer.util.is_validation_enabled(), dist.is_validation_enabled()))
            return super().loss(vae, x, beta)

    pyro.enable_validation(True)
    # A subclass gets no lean loss (it may change the objective): its own loss runs, validation off.
    step = TrainStep(vae, Spy(), torch.optim.Adam(vae.parameters(), lr=1e-3))
    step(x)
    step(x)
    # The second step also tried to record the loss (Trace_ELBO reads values to the host: it runs
    # eagerly), with validation off as well.
    assert seen[0] == (True, True) and set(seen[1:]) == {(False, False)}
    assert None in step.recorded.replays.values()
    assert step.path == "fast" and step._loss_fn is not reparameterized_elbo_loss
    assert pyro.infer.util.is_validation_enabled() and dist.is_validation_enabled()


class DiscreteLatent(torch.nn.Module):
    """A model whose latent is a Bernoulli: not reparameterizable, so Trace_ELBO needs its score term."""

    def __init__(self) -> None:
        super().__init__()
        self.logit = torch.nn.Parameter(torch.zeros(()))
        self.loc = torch.nn.Parameter(torch.zeros(2))

    def model(self, x, beta=1.0):
        pyro.module("m", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(self.loc[z.long()], 1.0), obs=x[:, 0])

    def guide(self, x, beta=1.0):
        pyro.module("m", self)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=self.logit.expand(x.shape[0])))


def test_non_reparameterized_guide_falls_back_to_the_estimators_loss(caplog):
    model, x = DiscreteLatent(), binary_batch()
    ok, reason = lean_loss_supported(model, x)
    assert not ok and "'z' is not reparameterized" in reason
    step = TrainStep(model, estimators.get("trace"), torch.optim.Adam(model.parameters(), lr=1e-2))
    with caplog.at_level(logging.INFO, logger="pyro_vae.train.step"):
        step(x)
    assert step._loss_fn is not reparameterized_elbo_loss
    assert "lean loss not used" in caplog.text and "not reparameterized" in caplog.text
    pyro.set_rng_seed(3)
    assert torch.isfinite(step(x))


def test_cuda_graph_requested_on_cpu_falls_back_with_a_message(caplog):
    vae, x = small_vae(), binary_batch()
    step = TrainStep(vae, estimators.get("trace"), torch.optim.Adam(vae.parameters(), lr=1e-3), cuda_graph=True)
    with caplog.at_level(logging.WARNING, logger="pyro_vae.train.step"):
        step(x)
    assert step.path == "fast"
    assert "CUDA graphs need a CUDA device" in step.fallback_reason
    assert "CUDA graphs need a CUDA device" in caplog.text


def test_auto_cuda_graph_on_cpu_is_quiet(caplog):
    vae, x = small_vae(), binary_batch()
    step = TrainStep(vae, estimators.get("trace"), torch.optim.Adam(vae.parameters(), lr=1e-3))
    with caplog.at_level(logging.WARNING, logger="pyro_vae.train.step"):
        step(x)
    assert step.path == "fast" and step.fallback_reason == "" and caplog.text == ""


CUDA = torch.device("cuda")


@pytest.mark.parametrize(
    ("kwargs", "path", "reason"),
    [
        (dict(device=CUDA, fast=True, cuda_graph="auto", lean_ok=True), "cuda_graph", ""),
        (dict(device=CUDA, fast=True, cuda_graph=True, lean_ok=True), "cuda_graph", ""),
        (dict(device=CUDA, fast=False, cuda_graph=True, lean_ok=True), "plain", ""),
        (dict(device=CUDA, fast=True, cuda_graph=False, lean_ok=True), "fast", ""),
        (dict(device=CUDA, fast=True, cuda_graph="auto", lean_ok=False), "fast", ""),
        (
            dict(device=CUDA, fast=True, cuda_graph=True, lean_ok=False, lean_reason="guide site 'z' is not"),
            "fast",
            "need the lean loss: guide site 'z' is not",
        ),
        (dict(device=torch.device("cpu"), fast=True, cuda_graph=True, lean_ok=True), "fast", "need a CUDA device"),
        (dict(device=torch.device("cpu"), fast=True, cuda_graph="auto", lean_ok=True), "fast", ""),
    ],
)
def test_plan_path(kwargs, path, reason):
    plan = plan_path(graphs_available=True, **kwargs)
    assert plan.path == path
    assert (reason in plan.reason) if reason else plan.reason == ""


def test_plan_path_refuses_an_optimizer_it_cannot_capture():
    params = [torch.nn.Parameter(torch.zeros(2))]

    def plan(optimizer):
        return plan_path(
            device=CUDA, fast=True, cuda_graph=True, lean_ok=True, optimizer=optimizer, graphs_available=True
        )

    assert plan(torch.optim.LBFGS(params)) == Plan("fast", "LBFGS cannot be captured in a CUDA graph")
    assert plan(torch.optim.Adam(params)).path == "cuda_graph"


def test_bad_cuda_graph_option_is_an_error():
    vae = small_vae()
    with pytest.raises(ValueError, match="cuda_graph must be True, False or 'auto'"):
        TrainStep(vae, estimators.get("trace"), torch.optim.Adam(vae.parameters()), cuda_graph="yes")


def test_a_fresh_step_object_continues_bitwise_like_the_running_one():
    """Resuming builds a new TrainStep; its first call must compute exactly what the running one does."""
    x = binary_batch()
    vae = small_vae()
    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
    running = TrainStep(vae, estimators.get("trace"), opt)
    pyro.set_rng_seed(10)
    running(x)
    vae_copy = copy.deepcopy(vae)
    opt_copy = torch.optim.Adam(vae_copy.parameters(), lr=1e-2)
    opt_copy.load_state_dict(copy.deepcopy(opt.state_dict()))
    pyro.set_rng_seed(11)
    loss_running = running(x)
    pyro.clear_param_store()
    fresh = TrainStep(vae_copy, estimators.get("trace"), opt_copy)
    pyro.set_rng_seed(11)
    loss_fresh = fresh(x)
    assert torch.equal(loss_fresh, loss_running)
    for p, q in zip(vae_copy.parameters(), vae.parameters(), strict=True):
        assert torch.equal(p, q)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@needs_cuda
def test_cuda_graph_step_matches_the_eager_fast_step(caplog):
    """Captured and replayed, the step gives the eager fast step's losses and parameters; a batch of
    another shape (an epoch's tail) runs eagerly with a message; a learning-rate change re-captures."""
    device = torch.device("cuda")
    x = binary_batch(8).to(device)
    tail = binary_batch(5).to(device)
    vae_graph = small_vae().to(device)
    vae_eager = copy.deepcopy(vae_graph)
    runs = {}
    for name, vae, mode in (("graph", vae_graph, True), ("eager", vae_eager, False)):
        pyro.clear_param_store()
        opt = torch.optim.Adam(vae.parameters(), lr=1e-2, capturable=True)
        step = TrainStep(vae, estimators.get("trace"), opt, cuda_graph=mode)
        losses = []
        with caplog.at_level(logging.INFO, logger="pyro_vae.train.step"):
            for t in range(8):
                pyro.set_rng_seed(300 + t)
                batch = tail if t == 6 else x
                losses.append(step(batch, 0.5 if t < 4 else 1.0).item())
        runs[name] = (step, losses)
    assert runs["graph"][0].path == "cuda_graph" and runs["eager"][0].path == "fast"
    # the captured step replays the recorded loss (a graph per signature, none refused)
    assert None not in runs["graph"][0].recorded.replays.values()
    assert runs["graph"][1] == pytest.approx(runs["eager"][1], rel=1e-4)
    for p, q in zip(vae_graph.parameters(), vae_eager.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert "captured the step as a CUDA graph" in caplog.text
    assert "differs from the captured" in caplog.text


class _FakeGraph:
    """Stands in for _GraphedStep on the CPU: raises what a capture or a replay would."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __call__(self, x, beta):
        raise self.error


def test_failed_capture_falls_back_and_other_errors_propagate(caplog):
    vae, x = small_vae(), binary_batch()
    step = TrainStep(vae, estimators.get("trace"), torch.optim.Adam(vae.parameters(), lr=1e-3))
    step(x)  # chooses the fast path on the CPU
    step.path, step._graph = "cuda_graph", _FakeGraph(RuntimeError("a bug in an eager step"))
    with pytest.raises(RuntimeError, match="a bug in an eager step"):
        step(x)  # not hidden as a capture failure
    assert step.path == "cuda_graph"
    failure = CaptureFailedError("operation not permitted when stream is capturing")
    failure.__cause__ = RuntimeError("operation not permitted when stream is capturing")
    step._graph = _FakeGraph(failure)
    with caplog.at_level(logging.WARNING, logger="pyro_vae.train.step"):
        loss = step(x)
    assert torch.isfinite(loss) and step.path == "fast" and step._graph is None
    assert "capture failed" in step.fallback_reason and "CUDA graph capture failed" in caplog.text
