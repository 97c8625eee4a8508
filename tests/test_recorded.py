"""The recorded loss: one graph of ATen operations per input signature, replayed instead of the programs."""

from __future__ import annotations

import logging

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.poutine import runtime

from pyro_vae import estimators, recorded
from pyro_vae.model import VAE
from pyro_vae.priors import Prior
from pyro_vae.recorded import RecordedLoss
from pyro_vae.traces import meanfield_elbo_loss, reparameterized_elbo_loss

SMALL = dict(x_dim=12, z_dim=3, hidden_dims=(8,))

FAMILIES = [
    {},
    *({"guide": g} for g in ("lowrank", "iaf")),
    *({"prior": p} for p in ("learned_normal", "mixture", "vamp", "flow", "flow(kind='spline_autoregressive')")),
    *({"likelihood": lik} for lik in ("continuous_bernoulli", "gaussian(scale='learned')", "laplace", "beta")),
]


def small_vae(**kwargs) -> VAE:
    torch.manual_seed(1)
    return VAE(**{**SMALL, **kwargs})


def batch(n: int = 6, d: int = 12) -> torch.Tensor:
    # inside (0, 1) for every likelihood; binary * 0.8 + 0.1 keeps Bernoulli cross-entropies honest
    return (torch.rand(n, d, generator=torch.Generator().manual_seed(2)) < 0.4).float() * 0.8 + 0.1


def value_and_grads(loss_fn, vae, x, beta, seed: int):
    pyro.set_rng_seed(seed)
    loss = loss_fn(vae, x, beta)
    params = [p for p in vae.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)


def assert_bitwise_equal(got, expected) -> None:
    (loss, grads), (expected_loss, expected_grads) = got, expected
    assert torch.equal(loss, expected_loss), (loss.item(), expected_loss.item())
    for g, e in zip(grads, expected_grads, strict=True):
        assert (g is None) == (e is None)
        if g is not None:
            assert torch.equal(g, e)


@pytest.mark.parametrize("loss_fn", [reparameterized_elbo_loss, meanfield_elbo_loss], ids=lambda f: f.__name__)
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()) or "default")
def test_replay_equals_the_eager_loss_bit_for_bit_for_every_family(family, loss_fn):
    """Same seed: the replay draws the same noise and computes the same loss and gradients as the
    Pyro programs evaluated eagerly, for every prior, guide and likelihood (and beta 1 and not 1)."""
    vae, x = small_vae(**family), batch()
    rec = RecordedLoss(loss_fn, vae)
    for beta in (1.0, 0.3):
        assert rec.record(x, beta) is not None, rec.fallback_reason
        assert_bitwise_equal(value_and_grads(rec, vae, x, beta, seed=7), value_and_grads(loss_fn, vae, x, beta, seed=7))
    assert len(rec.replays) == 2 and None not in rec.replays.values()


def test_replay_runs_no_pyro_message_and_reads_current_parameters(monkeypatch):
    """What the replay skips is Pyro's interpretation of the programs; what it keeps is the model's
    parameters themselves: after an optimizer step it computes with the new values."""
    vae, x = small_vae(), batch()
    rec = RecordedLoss(reparameterized_elbo_loss, vae)
    rec.record(x)

    def no_pyro(msg):
        raise AssertionError(f"Pyro message {msg['name']!r} during a replay")

    monkeypatch.setattr(runtime, "apply_stack", no_pyro)
    monkeypatch.setattr(pyro.primitives, "apply_stack", no_pyro)
    loss = rec(vae, x)
    with pytest.raises(AssertionError, match="Pyro message"):
        reparameterized_elbo_loss(vae, x)
    monkeypatch.undo()
    loss.backward()
    torch.optim.SGD(vae.parameters(), lr=0.1).step()
    assert_bitwise_equal(
        value_and_grads(rec, vae, x, 1.0, seed=3), value_and_grads(reparameterized_elbo_loss, vae, x, 1.0, seed=3)
    )


def test_recording_leaves_the_random_stream_where_the_eager_loss_would():
    """The record's check runs the eager loss and the replay on forked generators: a run that
    records on its first step draws the same noise afterwards as one that never records."""
    vae, x = small_vae(), batch()
    rec = RecordedLoss(reparameterized_elbo_loss, vae)
    pyro.set_rng_seed(21)
    recorded_losses = [rec(vae, x).item() for _ in range(3)]
    pyro.set_rng_seed(21)
    eager_losses = [reparameterized_elbo_loss(vae, x).item() for _ in range(3)]
    assert recorded_losses == eager_losses
    assert len(set(eager_losses)) == 3  # three different draws: the comparison can fail


def test_one_graph_per_batch_shape_and_beta_is_an_input():
    """A warm-up schedule changes beta every step: it is a graph input, not a reason to re-record."""
    vae = small_vae()
    rec = RecordedLoss(reparameterized_elbo_loss, vae)
    x, tail = batch(6), batch(4)
    for beta in (0.1, 0.2, torch.tensor(0.7)):
        assert_bitwise_equal(
            value_and_grads(rec, vae, x, beta, seed=5), value_and_grads(reparameterized_elbo_loss, vae, x, beta, seed=5)
        )
    assert len(rec.replays) == 1
    rec(vae, tail, 0.5)
    rec(vae, x, 1.0)
    assert {key[0][0] for key in rec.replays} == {6, 4} and len(rec.replays) == 3
    vae.eval()  # a module's mode is part of what the programs compute (dropout would be)
    rec(vae, x, 1.0)
    assert len(rec.replays) == 4 and None not in rec.replays.values()


def test_too_many_batch_shapes_run_eagerly(monkeypatch, caplog):
    monkeypatch.setattr(recorded, "MAX_SIGNATURES", 2)
    vae = small_vae()
    rec = RecordedLoss(reparameterized_elbo_loss, vae)
    with caplog.at_level(logging.WARNING, logger="pyro_vae.recorded"):
        for n in (2, 3, 4, 5, 4):
            rec(vae, batch(n))
    assert len(rec.replays) == 2 and None not in rec.replays.values()  # nothing stored past the cap
    assert caplog.text.count("more than 2 input signatures") == 1  # said once
    assert_bitwise_equal(
        value_and_grads(rec, vae, batch(4), 1.0, seed=1),
        value_and_grads(reparameterized_elbo_loss, vae, batch(4), 1.0, seed=1),
    )


class _DataDependentVAE(VAE):
    """A model whose Python control flow reads the data: it cannot be recorded faithfully."""

    def model(self, x, beta=1.0):
        if x.sum() > 0:  # a Python branch on a tensor value
            return super().model(x, beta)
        return super().model(x, 2 * beta)


class _CachingPrior(Prior):
    """p(z) = N(m, I) with m a plain tensor attribute (neither parameter nor buffer) rewritten after each call."""

    def __init__(self, z_dim: int) -> None:
        super().__init__(z_dim)
        self.loc = torch.zeros(z_dim)

    def forward(self, encoder=None):
        d = dist.Normal(self.loc, torch.ones_like(self.loc)).to_event(1)
        self.loc = self.loc + 1.0
        return d


def _counting_loss():
    """A loss that multiplies by how often it has been called: Python state a graph freezes."""
    calls = []

    def loss(vae, x, beta=1.0):
        calls.append(1)
        return reparameterized_elbo_loss(vae, x, beta) * len(calls)

    return loss


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: (_DataDependentVAE(**SMALL), reparameterized_elbo_loss), "recording failed"),
        (lambda: (VAE(**SMALL, prior=_CachingPrior(3)), reparameterized_elbo_loss), "neither a parameter nor a buffer"),
        (lambda: (VAE(**SMALL), _counting_loss()), "differs from the eager loss"),
    ],
    ids=["data-dependent-branch", "foreign-tensor", "python-state"],
)
def test_what_cannot_be_replayed_faithfully_runs_eagerly_with_a_reason(make, reason, caplog):
    torch.manual_seed(1)
    vae, loss_fn = make()
    rec = RecordedLoss(loss_fn, vae)
    x = batch()
    with caplog.at_level(logging.INFO, logger="pyro_vae.recorded"):
        assert rec.record(x) is None
    assert reason in rec.fallback_reason and reason in caplog.text
    assert list(rec.replays.values()) == [None]
    # and the loss is still the eager one, parameters intact (no fake tensor left behind)
    assert all(type(p) is torch.nn.Parameter and type(p.data) is torch.Tensor for p in vae.parameters())
    pyro.set_rng_seed(4)
    got = rec(vae, x)
    assert torch.isfinite(got)


def test_a_recorded_loss_belongs_to_one_model():
    vae, other, x = small_vae(), small_vae(), batch()
    rec = RecordedLoss(reparameterized_elbo_loss, vae)
    with pytest.raises(ValueError, match="another module"):
        rec(other, x)


def test_simplify_drops_identity_views_and_keeps_every_draw():
    """The replay's graph: no expand/reshape to the shape a tensor already has, no dead subsample
    indices, one random draw per latent site (the guide's z), and the arithmetic that remains."""
    vae, x = small_vae(), batch()
    replay = RecordedLoss(reparameterized_elbo_loss, vae).record(x)
    targets = [node.target for node in replay.graph_module.graph.nodes if node.op == "call_function"]
    aten = torch.ops.aten
    assert targets.count(aten.normal_.default) == 1
    assert aten.arange.default not in targets and aten.broadcast_tensors.default not in targets
    for node in replay.graph_module.graph.nodes:
        if node.target in (aten.expand.default, aten.reshape.default, aten.view.default):
            assert node.meta["val"].shape != node.args[0].meta["val"].shape
    assert targets.count(aten.linear.default) == 4  # encoder and decoder, two layers each


def test_a_graph_that_returns_a_gradient_alone_drops_the_forward_value():
    """Autograd seeds the backward with ones_like(output): recorded as is, the seed would keep the whole
    forward value alive. ``full`` in its place lets the value's own operations go (here the exp and the
    sum feed only the value; the gradient of sum(exp(2 w)) is 2 exp(2 w), which keeps one exp)."""
    w = torch.nn.Parameter(torch.randn(5))
    module = torch.nn.Module()
    module.w = w

    def gradient_only(x):
        with torch.enable_grad():
            y = (x * module.w).requires_grad_(True)
            value = torch.exp(2 * y).sum() + torch.log(x.abs() + 1).sum()
            (grad,) = torch.autograd.grad(value, y)
        return grad

    x = torch.randn(5)
    graph, _ = recorded.record_graph(gradient_only, (x,), module, pre_dispatch=False)
    targets = [node.target for node in graph.graph.nodes if node.op == "call_function"]
    aten = torch.ops.aten
    assert aten.ones_like.default not in targets and aten.full.default in targets
    assert aten.log.default not in targets and aten.sum.default not in targets, targets
    torch.testing.assert_close(graph(x), 2 * torch.exp(2 * x * w).detach())


class _BatchNormGuide(torch.nn.Module):
    """A diagonal-Normal guide whose encoder has a batch norm: buffers updated in place every call."""

    def __init__(self, x_dim: int = 12, z_dim: int = 3) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(x_dim, 8), torch.nn.BatchNorm1d(8), torch.nn.Softplus())
        self.loc, self.scale = torch.nn.Linear(8, z_dim), torch.nn.Linear(8, z_dim)

    def forward(self, x):
        h = self.net(x)
        return dist.Normal(self.loc(h), torch.nn.functional.softplus(self.scale(h)) + 1e-3).to_event(1)


def test_recording_leaves_buffers_as_they_were_and_the_replay_updates_them_like_eager():
    """The trace and the check run the loss three times; a batch norm's running statistics must
    not remember that. The replay then updates them exactly as an eager call does."""
    torch.manual_seed(1)
    vae, x = VAE(**SMALL, guide=_BatchNormGuide()), batch()
    twin = VAE(**SMALL, guide=_BatchNormGuide())
    twin.load_state_dict(vae.state_dict())
    bn = vae.encoder.net[1]
    rec = RecordedLoss(reparameterized_elbo_loss, vae)
    assert rec.record(x) is not None, rec.fallback_reason
    assert int(bn.num_batches_tracked) == 0 and torch.equal(bn.running_mean, torch.zeros(8))
    pyro.set_rng_seed(8)
    rec(vae, x)
    pyro.set_rng_seed(8)
    reparameterized_elbo_loss(twin, x)
    for (name, a), (_, b) in zip(vae.named_buffers(), twin.named_buffers(), strict=True):
        assert torch.equal(a, b), name
    assert int(bn.num_batches_tracked) == 1


def test_a_replaced_parameter_or_buffer_is_recorded_again():
    """``module.to()`` replaces buffers and ``load_state_dict(assign=True)`` parameters: a replay
    holding the old tensors would compute with stale values, so the call records again."""
    vae, x = small_vae(), batch()
    rec = RecordedLoss(reparameterized_elbo_loss, vae)
    first = rec.record(x)
    vae.double().float()  # back on the same signature, with new buffer objects
    state = {k: v.clone() * 1.5 for k, v in vae.state_dict().items()}
    vae.load_state_dict(state, assign=True)
    assert not first.current()
    assert_bitwise_equal(
        value_and_grads(rec, vae, x, 1.0, seed=2), value_and_grads(reparameterized_elbo_loss, vae, x, 1.0, seed=2)
    )
    assert rec.replays[rec._signature(x, 1.0, {})] is not first


def test_inside_a_pyro_handler_or_with_beta_not_positive_the_loss_runs_eagerly():
    vae, x = small_vae(), batch()
    rec = RecordedLoss(reparameterized_elbo_loss, vae)
    rec.record(x, 0.5)
    with poutine.scale(scale=2.0):  # the handler must see the sites: a replay would not
        got = value_and_grads(rec, vae, x, 0.5, seed=3)
        expected = value_and_grads(reparameterized_elbo_loss, vae, x, 0.5, seed=3)
    assert_bitwise_equal(got, expected)
    with pytest.raises(ValueError):  # Pyro's own check of the scale, as without recording
        rec(vae, x, 0.0)


def _with_an_unused_draw(vae, x, beta=1.0):
    torch.randn(5)  # drawn and never used: dead code that must stay, or the random stream shifts
    return reparameterized_elbo_loss(vae, x, beta)


def test_an_unused_random_draw_stays_in_the_graph():
    vae, x = small_vae(), batch()
    rec = RecordedLoss(_with_an_unused_draw, vae)
    replay = rec.record(x)
    assert replay is not None
    targets = [node.target for node in replay.graph_module.graph.nodes]
    assert torch.ops.aten.randn.default in targets
    expected = value_and_grads(_with_an_unused_draw, vae, x, 1.0, seed=6)
    assert_bitwise_equal(value_and_grads(rec, vae, x, 1.0, seed=6), expected)
    pyro.set_rng_seed(6)
    rec(vae, x)
    after_replay = torch.get_rng_state()
    pyro.set_rng_seed(6)
    _with_an_unused_draw(vae, x)
    assert torch.equal(after_replay, torch.get_rng_state())


class _RememberingIWAE(estimators.IWAE):
    """Keeps the last loss on itself, then branches on the data: the trace stores a fake tensor
    and fails, and no eager run of the check comes to overwrite it."""

    def loss(self, vae, x, beta=1.0):
        self.last = super().loss(vae, x, beta)
        return self.last if self.last > 0 else -self.last


def test_attributes_the_trace_stores_on_the_estimator_are_put_back():
    vae, x = small_vae(), batch()
    estimator = _RememberingIWAE(k=2)
    estimator.last = None
    rec = RecordedLoss(estimator.loss, vae)
    assert rec.record(x) is None and "recording failed" in rec.fallback_reason
    assert estimator.last is None
    assert torch.isfinite(rec(vae, x)) and type(estimator.last) is torch.Tensor
