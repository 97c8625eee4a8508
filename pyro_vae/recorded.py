"""A loss recorded once per input signature as a graph of ATen operations, and replayed.

The lean losses of :mod:`pyro_vae.train.step` run the model and the guide as Pyro programs on every
call: effect-handler messages for every site, plate frames, distribution objects broadcast to the
plate. On a CPU at batch 128 that Python costs about half a millisecond per step, 10-14% of a
hand-written PyTorch step, and it is the same work every time: for a fixed batch shape the
programs issue the same tensor operations in the same order. :class:`RecordedLoss` runs them
once under ``make_fx`` with fake tensors (no data, no arithmetic: the operations are recorded,
not computed), keeps the graph of ATen operations, and from then on calls the graph. The model
and guide remain the Pyro programs that produced it; only their per-call interpretation is
skipped. It is the CPU counterpart of capturing the step as a CUDA graph (``pyro_vae.train.step``),
and on CUDA the captured step replays the recorded loss.

What a replay computes is what the eager loss computes, operation for operation:

- the model's parameters and buffers are held by the graph as the very tensors (not copies), so
  a replay reads their current values and autograd reaches them as usual; any other tensor the
  programs read (a value a transform cached on an earlier call) refuses the recording, since the
  replay would freeze it;
- random draws are operations of the graph (``normal_`` on a fresh tensor), drawn from the same
  generator in the same order: for the same seed a replay gives the same loss and gradients as the
  eager loss (checked to float tolerance when a signature is recorded; bit for bit on a CPU in
  the tests);
- tracing with fake tensors refuses Python that reads tensor values (``.item()``, ``if t > 0``),
  so a program whose control flow depends on the data cannot be recorded wrongly: it fails to
  record and runs eagerly, with a logged reason.

A signature is (batch shape, dtype, device, whether ``beta`` is the number 1, whether the model is
in training mode, and the name, shape and dtype of each extra data field a structure consumes): a KL
warm-up's ``beta`` is a graph input, so the schedule does not re-record, and so are the fields
(labels, masks), which a replay reads like x.
A parameter or buffer replaced by another tensor (``module.to()`` replaces buffers,
``load_state_dict(assign=True)`` parameters) is noticed at the next call, which records again.
What the graph cannot see is Python state that changes between calls without changing the
signature (a counter, an attribute someone else updates); such programs should train with
``TrainStep(record=False)`` (an estimator can say so itself: ``recordable = False``). Before a
recorded graph is used it is checked against the eager loss on the same random numbers (value and
gradient); a mismatch keeps the eager loss for that signature. Called inside a Pyro handler
(``poutine.scale``, ``poutine.trace``, ...), or with a number ``beta <= 0``, the loss runs eagerly:
the handler must see the programs' sites, and Pyro's own check of ``beta`` must run.

Recording has no lasting effect on the model: the random generators are forked, the buffers
(a batch norm's running statistics) are put back after the trace and the check, and so are the
attributes the traced call stores on the modules and on the loss's owner (Pyro's transforms cache
their last input and output). Python side effects elsewhere (a counter in a closure) happen once
for the trace and once for each run of the check.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import time
from collections.abc import Callable, Iterator

import pyro
import torch
from pyro.poutine.runtime import am_i_wrapped
from torch import nn

from pyro_vae.model import beta_tensor, is_unit_beta

log = logging.getLogger(__name__)

_MISSING = object()

# Signatures recorded per loss: a training loop needs two to four (the full batch and the epoch's
# last one, during and after KL warm-up). Beyond this the loss runs eagerly instead of growing the
# cache without bound.
MAX_SIGNATURES = 8

_VIEW_OPS = (torch.ops.aten.expand.default, torch.ops.aten.reshape.default, torch.ops.aten.view.default)


class Replay:
    """One recorded graph. It holds the model's parameters and buffers as attributes (the very
    tensors) and, for :meth:`current`, where each of them lives in the model."""

    def __init__(
        self,
        graph_module: torch.fx.GraphModule,
        takes_beta: bool,
        owners: list[tuple[dict, str, torch.Tensor]],
        fields: tuple[str, ...] = (),
    ) -> None:
        self.graph_module, self.takes_beta, self.owners, self.fields = graph_module, takes_beta, owners, fields

    @property
    def num_ops(self) -> int:
        return sum(node.op == "call_function" for node in self.graph_module.graph.nodes)

    def current(self) -> bool:
        """Whether every parameter and buffer the graph holds is still the one its module holds."""
        return all(slots.get(name) is tensor for slots, name, tensor in self.owners)

    def __call__(self, x: torch.Tensor, beta, data: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        fields = [data[name] for name in self.fields] if self.fields else []
        if self.takes_beta:
            return self.graph_module(x, beta_tensor(beta, x), *fields)
        return self.graph_module(x, *fields)


class RecordedLoss:
    """``loss_fn(vae, x, beta)`` recorded once per signature and replayed (see the module docstring).

    Args:
        loss_fn: a loss of the form ``loss_fn(vae, x, beta) -> scalar`` that touches the model only
            through its parameters, buffers and the Pyro programs (the lean losses of ``pyro_vae.train.step``).
        vae: the module it is evaluated on.

    Call it as the loss itself: ``recorded(vae, x, beta)``. ``replays`` maps each signature to its
    replay, or to ``None`` where the signature runs eagerly (``fallback_reason`` says why).
    """

    def __init__(self, loss_fn: Callable[..., torch.Tensor], vae: nn.Module) -> None:
        self.loss_fn, self.vae = loss_fn, vae
        self.replays: dict[tuple, Replay | None] = {}
        self._over_capacity_logged = False
        self.fallback_reason = ""

    def __call__(self, vae: nn.Module, x: torch.Tensor, beta: float | torch.Tensor = 1.0, **data) -> torch.Tensor:
        if vae is not self.vae:
            raise ValueError("RecordedLoss was built for another module")
        if am_i_wrapped() or (not torch.is_tensor(beta) and beta <= 0):
            return self.loss_fn(vae, x, beta, **data)
        replay = self.record(x, beta, **data)
        if replay is None:
            return self.loss_fn(vae, x, beta, **data)
        return replay(x, beta, data)

    def _signature(self, x: torch.Tensor, beta, data: dict[str, torch.Tensor]) -> tuple:
        # Module mode too: a network with dropout records what it does in the mode it is in.
        fields = tuple((name, data[name].shape, data[name].dtype) for name in sorted(data))
        return x.shape, x.dtype, x.device, is_unit_beta(beta), self.vae.training, fields

    # -- recording -------------------------------------------------------------------------------
    def record(self, x: torch.Tensor, beta: float | torch.Tensor = 1.0, **data) -> Replay | None:
        """The replay for this signature, recorded (and checked) if it is new or holds a replaced
        parameter or buffer; ``None`` where the signature runs eagerly.

        Call it before a CUDA graph capture: recording runs the eager loss for its check, which a
        capture must not see.
        """
        key = self._signature(x, beta, data)
        replay = self.replays.get(key, _MISSING)
        if replay is None or (replay is not _MISSING and replay.current()):
            return replay
        if replay is not _MISSING:
            log.info("RecordedLoss: a parameter or buffer of the model was replaced; recording again")
            del self.replays[key]
        if len(self.replays) >= MAX_SIGNATURES:
            if not self._over_capacity_logged:  # logged once; nothing stored, so the cache stays bounded
                self._over_capacity_logged = True
                log.warning(
                    "RecordedLoss: %s: more than %d input signatures; new ones run the eager loss",
                    self.name,
                    MAX_SIGNATURES,
                )
            self.fallback_reason = f"more than {MAX_SIGNATURES} input signatures (batch shapes)"
            return None
        start = time.perf_counter()
        owner = getattr(self.loss_fn, "__self__", None)  # an estimator's state, for a bound ``loss``
        try:
            with pyro.validation_enabled(False), _state_restored(self.vae, owner):
                replay = self._trace(x, beta, data)
                mismatch = self._mismatch(replay, x, beta, data)
        except torch.cuda.OutOfMemoryError:
            raise
        except FrozenTensorError as error:
            return self._refuse(key, f"recording refused: {error}", logging.WARNING)
        except Exception as error:  # cannot be traced: data-dependent Python, a host read, an op fake tensors lack
            first_line = next(iter(str(error).strip().splitlines()), "")
            return self._refuse(key, f"recording failed ({type(error).__name__}: {first_line})", logging.INFO)
        if mismatch:
            return self._refuse(key, f"the recorded graph differs from the eager loss ({mismatch})", logging.WARNING)
        log.info(
            "RecordedLoss: recorded %s for batch shape %s in %.2f s: %d operations",
            self.name,
            tuple(x.shape),
            time.perf_counter() - start,
            replay.num_ops,
        )
        self.replays[key] = replay
        return replay

    @property
    def all_replayed(self) -> bool:
        """Whether every signature seen so far runs a replay (none runs the eager loss)."""
        return bool(self.replays) and None not in self.replays.values()

    @property
    def name(self) -> str:
        return getattr(self.loss_fn, "__qualname__", None) or type(self.loss_fn).__name__

    def _refuse(self, key: tuple, reason: str, level: int) -> None:
        # INFO where a loss simply cannot be traced (Pyro's own ELBOs read values to the host);
        # WARNING where the programs hold state that a replay would freeze.
        log.log(level, "RecordedLoss: %s: %s; batch shape %s runs the eager loss", self.name, reason, tuple(key[0]))
        self.fallback_reason = reason
        self.replays[key] = None
        return None

    def _trace(self, x: torch.Tensor, beta, data: dict[str, torch.Tensor]) -> Replay:
        takes_beta = not is_unit_beta(beta)
        names = tuple(sorted(data))
        inputs = (x, beta_tensor(beta, x)) if takes_beta else (x,)
        inputs += tuple(data[name] for name in names)

        def loss(*args):
            fixed = 2 if takes_beta else 1
            return self.loss_fn(self.vae, *args[:fixed], **dict(zip(names, args[fixed:], strict=True)))

        # Pre-dispatch: ATen operations above autograd (``linear``, not its decomposition), which
        # autograd differentiates at replay exactly as it does the eager calls.
        graph_module, owners = record_graph(loss, inputs, self.vae, pre_dispatch=True)
        return Replay(graph_module, takes_beta, owners, names)

    def _mismatch(self, replay: Replay, x: torch.Tensor, beta, data: dict[str, torch.Tensor]) -> str:
        """'' when replay and eager loss agree in value and gradient on the same random numbers."""
        params = [p for p in self.vae.parameters() if p.requires_grad]
        devices = [x.device] if x.device.type == "cuda" else []
        results = []
        for fn in (lambda: self.loss_fn(self.vae, x, beta, **data), lambda: replay(x, beta, data)):
            # Both from the generator's current state, which is restored after each: the training
            # run draws as if the check had not happened.
            with torch.random.fork_rng(devices=devices):
                loss = fn()
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            results.append((loss.detach(), grads))
        (eager, eager_grads), (replayed, replayed_grads) = results
        try:
            torch.testing.assert_close(replayed, eager)
            for a, b in zip(replayed_grads, eager_grads, strict=True):
                if (a is None) != (b is None):
                    return "a parameter's gradient is missing in one of them"
                if a is not None:
                    torch.testing.assert_close(a, b)
        except AssertionError as error:
            return str(error).splitlines()[0]
        return ""


def record_graph(
    fn: Callable[..., object], inputs: tuple[torch.Tensor, ...], vae: nn.Module, pre_dispatch: bool
) -> tuple[torch.fx.GraphModule, list[tuple[dict, str, torch.Tensor]]]:
    """``fn(*inputs)`` recorded as a graph of ATen operations and simplified (:func:`_simplify`), with the
    owners of the parameters and buffers it holds (:func:`_check_constants`, which raises
    :class:`FrozenTensorError` for any other tensor the programs read).

    The inputs are traced as fake tensors (shapes, no arithmetic); the model's parameters and buffers
    stay real and become attributes of the graph, the very tensors, so a replay reads their current
    values and autograd reaches them. ``pre_dispatch``: record above autograd (autograd differentiates
    the replay); otherwise below it, where a ``torch.autograd.grad`` inside ``fn`` is recorded as its
    backward operations (a replay then needs no autograd at all).
    """
    # Imported here: torch.fx's tracer pulls in much of torch._subclasses, which a process that never
    # records (evaluation, plotting) need not load.
    from torch.fx.experimental.proxy_tensor import make_fx

    with _state_restored(vae, None):
        graph_module = make_fx(fn, tracing_mode="fake", pre_dispatch=pre_dispatch, _allow_non_fake_inputs=True)(*inputs)
    owners = _check_constants(graph_module, vae)
    _simplify(graph_module)
    return graph_module, owners


class FrozenTensorError(ValueError):
    """The programs read a tensor that a replay would freeze at its recorded value."""


@contextlib.contextmanager
def _state_restored(vae: nn.Module, owner: object | None) -> Iterator[None]:
    """Put back what recording did to the model: its buffers' values and the plain attributes of
    its modules and of the loss's owner (an estimator).

    The trace and the check's two runs would otherwise update a batch norm's running statistics
    three extra times, and the trace computes on fake tensors: whatever the programs store on an
    object (Pyro's transforms cache their last input and output) would be a fake tensor that later
    eager calls trip over.
    """
    objects = [*vae.modules(), *([owner] if owner is not None and hasattr(owner, "__dict__") else [])]
    attributes = [(obj, dict(vars(obj))) for obj in objects]
    buffers = [(buffer, buffer.detach().clone()) for buffer in vae.buffers()]
    try:
        yield
    finally:
        for obj, saved in attributes:
            current = vars(obj)
            for name in [name for name in current if name not in saved]:
                del current[name]
            current.update(saved)
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)


def _check_constants(graph_module: torch.fx.GraphModule, vae: nn.Module) -> list[tuple[dict, str, torch.Tensor]]:
    """Refuse a graph that froze a tensor other than the model's parameters and buffers; return, for
    each of those it holds, (the module's parameter or buffer dict, the name, the tensor).

    Literals the program creates (``torch.tensor(0.0)``) are recorded as constants lifted by
    ``lift_fresh_copy`` and are constants indeed. Any other tensor the tracing met (a value cached
    by a transform on an earlier call, a tensor held by some object) would be replayed with the
    value it had when recorded.
    """
    slots = {
        id(tensor): (module_slots, name)
        for module in vae.modules()
        for module_slots in (module._parameters, module._buffers)
        for name, tensor in module_slots.items()
        if tensor is not None
    }
    owners = []
    for node in graph_module.graph.nodes:
        if node.op != "get_attr":
            continue
        value = operator.attrgetter(node.target)(graph_module)
        if not torch.is_tensor(value):
            continue
        if id(value) in slots:
            owners.append((*slots[id(value)], value))
        elif not all(user.target is torch.ops.aten.lift_fresh_copy.default for user in node.users):
            raise FrozenTensorError(
                f"the programs read a tensor of shape {tuple(value.shape)} that is neither a parameter nor a buffer "
                "of the model; a replay would use its value at recording time"
            )
    return owners


_FILLED_LIKE = {torch.ops.aten.ones_like.default: 1.0, torch.ops.aten.zeros_like.default: 0.0}


def _contiguous_value(node: torch.fx.Node) -> bool:
    """Whether the node's recorded value is a contiguous tensor: ``full`` makes one, so only then may it stand in
    for ``ones_like`` (whose ``memory_format`` may keep its input's strides)."""
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.is_contiguous()


def _fill_without_reading(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """``ones_like(t)`` (or ``zeros_like``) as ``full(shape, 1)``: the same tensor without depending on t.
    Autograd seeds a backward pass with ``ones_like`` of the output, which would otherwise keep every
    operation of the forward value alive in a graph that returns only gradients."""
    value = node.meta["val"]
    with graph.inserting_before(node):
        filled = graph.call_function(
            torch.ops.aten.full.default,
            (list(value.shape), _FILLED_LIKE[node.target]),
            {"dtype": value.dtype, "device": value.device},
        )
    filled.meta["val"] = value
    node.replace_all_uses_with(filled)
    graph.erase_node(node)


def _simplify(graph_module: torch.fx.GraphModule) -> None:
    """Drop what the replay does not need, keeping every operation that computes or draws.

    Views to the shape they already have (``expand``, ``reshape``, ``view``: distributions
    broadcast to the plate they already fill) and ``broadcast_tensors`` of same-shape tensors are
    identities; ``ones_like``/``zeros_like`` become ``full`` (:func:`_fill_without_reading`); dead pure
    nodes go (Pyro's unused subsample indices, a forward value only a gradient's seed read); random draws stay even when
    unused, so the random stream matches the eager loss. The graph is then called with flat
    arguments (no pytree flattening per call).
    """
    graph = graph_module.graph

    def same(node, source) -> bool:
        a, b = node.meta.get("val"), getattr(source, "meta", {}).get("val")
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype

    def only_read(node) -> bool:  # an in-place user would write through the view into its source
        return not any(isinstance(u.target, torch._ops.OpOverload) and u.target._schema.is_mutable for u in node.users)

    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _VIEW_OPS and same(node, node.args[0]) and only_read(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.target in _FILLED_LIKE and _contiguous_value(node):
            _fill_without_reading(graph, node)
        elif node.target is torch.ops.aten.broadcast_tensors.default:
            sources, users = node.args[0], list(node.users)
            if (
                all(same(source, sources[0]) for source in sources)
                and all(user.target is operator.getitem for user in users)
                and all(only_read(user) for user in users)
            ):
                for user in users:
                    user.replace_all_uses_with(sources[user.args[1]])
                    graph.erase_node(user)
                graph.erase_node(node)
    graph.eliminate_dead_code()
    # One loss tensor out, not a one-element list.
    output = next(node for node in reversed(graph.nodes) if node.op == "output")
    if isinstance(output.args[0], (list, tuple)) and len(output.args[0]) == 1:
        output.args = (output.args[0][0],)
    graph._codegen = torch.fx.graph.CodeGen()
    graph_module.recompile()
