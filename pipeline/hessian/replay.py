"""Graph-method calls replayed from a trace: the engine's Python paid once per model and call.

NOTE [replay]: A structured call is a few hundred tensor operations, and for small models (a
PINN, a pair potential, hessQuik's networks) the Python around them (running the captured graph
node by node, building each step's rule, the sweeps' bookkeeping) costs as much as the operations
themselves. Once the model has been analysed, a call at a given input shape, dtype, device,
target, row count and budget makes the same operations whatever the values (the engine reads no
tensor value on the host: see ``propagate``). So a call at such a key is traced (its operations
run for real and a dispatch mode records them as an ``fx`` graph of ATen operations) and later
calls run that graph. The traced call returns its own result. A trace costs 0.1-0.3 ms an operation
for the recording (27 ms for the pair potential, 10x one of its calls) and one call more, the
check of the lowered graph (below), so it is made only once the eager calls at the key since
the first have cost as much as that estimate (the first call counts its operations, the last
eager call stands for the check): a run of few calls pays at most about twice its eager time,
a long one gets the replays. (Estimated from the operations alone, ViT-Tiny's trace came after
one eager call and cost 2.8 of them: 13.3 s against 4.8, with a second replay of the call
after the check; now 2 eager calls, then about 2 calls' time.) The inputs, output indices and
rows are the graph's inputs; the parameters are references to the model's own tensors (a change
of the weights in place is seen); a change of the model's structure, or a parameter replaced by
a new tensor, drops the traces with the other per-model caches (``caches.check``). A trace is
kept only if it holds no operation whose result the Python read (``item``, ``nonzero``, a boolean
mask: a path that depends on values), and none that raised while traced (the engine caught it
and took another path, but the graph would raise again); otherwise, and where tracing fails,
the key runs eagerly from then on.

Measured on the 2-core CPU (one thread, freed memory kept), replayed against eager calls: the
pair potential at 64 samples 1.95 against 2.7 ms a call, the PINN at 4096 points 4.7 against
5.6 ms and at 1 point 0.54 against 0.89 ms; the trace comes after 4-14 calls (0.05-0.09 s) for
these, 2-10 calls (0.1-1.2 s) for the library conv nets and ViTs.

The recorded graph is lowered (NOTE [lowering]: fewer views, Python bindings) before it is
replayed; where the lowered graph fails or (on the CPU) gives other bits than the traced call,
the key runs eagerly. A caller that does not use the gradients says so (``gradient=False``, a key
of its own): the trace leaves them out.

Any thread traces (a Dask worker's threads too): the dispatch mode is the tracing thread's own.
``make_fx``, used before, patches ``nn.Module.__call__`` for every thread while it traces, so
it ran in the main thread only (another thread's forward got its proxies), and its traces cost
0.8 ms an operation.
"""

from __future__ import annotations

import logging
import math
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

from . import caches, lowering
from .rows import Rows
from .targets import Target

log = logging.getLogger(__name__)

ENABLED = True  # a switch for tests and benchmarks: False runs every call eagerly
# Seconds a traced operation costs beyond the call itself, the check's call left out: on the
# 2-core CPU 0.09-0.18 ms an operation for small graphs (hessQuik's network, 129 operations:
# 0.09; the PINN, 197: 0.13; MobileNetV3, 4056: 0.13; LCNet, 3004: 0.18) and 0.28 ms for
# ViT-Tiny depth 12's 71,624 (recording 0.2, lowering 0.02, the module's compilation 0.05 ms, on
# a VM that ran it 2x slower than usual); 0.12 ms let that trace come one call early.
TRACE_COST = 0.25e-3

# Operations whose result the engine's Python would have read, or whose output shape depends on
# values: a trace holding one is not replayed.
_VALUE_OPS = frozenset({"_local_scalar_dense", "item", "nonzero", "nonzero_static", "argwhere",
                        "is_nonzero", "equal", "allclose", "masked_select", "unique",
                        "_unique", "_unique2", "unique_dim", "unique_consecutive"})  # fmt: skip
_MASKED_OPS = frozenset({"index", "_index_put_impl_", "index_put", "index_put_"})

_TRACES = caches.per_model()  # model -> {key: _Entry}


@dataclass
class _Entry:
    calls: int = 0
    cost: float = math.inf  # the trace's estimated seconds: its operations x TRACE_COST
    spent: float = 0.0  # seconds of the eager calls after the first
    last: float = 0.0  # seconds of the last of them: what the check of a trace will cost
    graph: fx.GraphModule | None = None
    eager: bool = False  # no replay for this key (a refused or failed trace)


Compute = Callable[..., tuple[Tensor, Tensor]]


def replayed(compute: Compute) -> Compute:
    """``compute(model, x, target, rows, budget, *rest)`` with its calls at a key replayed from a
    trace once the eager calls there have cost as much as the trace will (see NOTE [replay])."""

    def run(model: nn.Module, x: Tensor, target: Target, rows, budget: int, *rest,
            gradient: bool = True):  # fmt: skip
        if not ENABLED or not isinstance(rows, Rows):
            return compute(model, x, target, rows, budget, *rest)
        aux = target.aux  # the output indices or labels: an input of the trace, as the rows
        key = (tuple(x.shape), x.dtype, x.device, target.kind, target.output_index.shape,
               tuple(aux.shape), aux.dtype, rows.full, len(rows), budget, rest,
               gradient)  # fmt: skip
        entry = _TRACES.setdefault(model, {}).setdefault(key, _Entry())
        inputs = (x, aux, rows.index)
        if entry.graph is not None:
            try:
                with torch.no_grad():
                    return entry.graph.forward(*inputs)  # no module hooks to run
            except Exception as err:  # noqa: BLE001 - a replay that fails runs eagerly
                log.debug("replay: the trace failed (%s): the call runs eagerly", err)
                entry.graph, entry.eager = None, True
                return compute(model, x, target, rows, budget, *rest)
        entry.calls += 1
        if entry.eager:
            return compute(model, x, target, rows, budget, *rest)
        if entry.calls == 1:  # it fills the engine's caches; its operations are counted
            count = _Count()
            with count:
                out = compute(model, x, target, rows, budget, *rest)
            entry.cost = count.ops * TRACE_COST
            return out
        if entry.spent < entry.cost + entry.last:
            start = time.perf_counter()
            out = compute(model, x, target, rows, budget, *rest)
            entry.last = time.perf_counter() - start
            entry.spent += entry.last
            return out

        def call(x_: Tensor, aux: Tensor, index: Tensor):
            sub = Target(target.kind, aux, target.output_index)
            h, grad = compute(model, x_, sub, Rows(index, rows.full), budget, *rest)
            return h, grad if gradient else None  # unused gradients: left out of the trace

        graph, out = _traced(call, inputs)
        entry.graph, entry.eager = graph, graph is None
        if out is None:  # the traced call raised: it runs eagerly
            return compute(model, x, target, rows, budget, *rest)
        return out

    run.__wrapped__ = compute
    return run


def traces(model: nn.Module) -> int:
    """How many call keys of ``model`` are replayed from a trace."""
    return sum(e.graph is not None for e in _TRACES.get(model, {}).values())


def refused(model: nn.Module) -> int:
    """How many call keys of ``model`` run eagerly for good (a refused or failed trace)."""
    return sum(e.eager for e in _TRACES.get(model, {}).values())


def _trace(call: Callable, inputs: tuple[Tensor, ...]) -> fx.GraphModule | None:
    """The graph of ATen operations of ``call(*inputs)``, or None where it cannot be replayed."""
    return _traced(call, inputs)[0]


def _traced(call: Callable, inputs: tuple[Tensor, ...]) -> tuple[fx.GraphModule | None, Any]:
    """``_trace``'s graph and the traced call's result (None where the call raised)."""
    recorder = _Recorder(inputs)
    try:
        with torch.no_grad(), recorder:
            out = call(*inputs)
        recorder.output(out)
    except Exception as err:  # noqa: BLE001 - any tracing failure means "run eagerly"
        log.debug("replay: tracing failed (%s): the call runs eagerly", err)
        return None, None
    why = recorder.failed or reads_values(recorder.graph)
    if why:
        log.debug("replay: the trace reads values (%s): the call runs eagerly", why)
        return None, out
    recorder.graph.eliminate_dead_code()  # results nothing uses (operations that write are kept)
    return _lowered(recorder.root(), recorder.graph, inputs, out), out


def _lowered(root: nn.Module, graph: fx.Graph, inputs: tuple[Tensor, ...], out):
    """The recorded ``graph`` (its constants held by ``root``) lowered in place (NOTE
    [lowering]), as a module, where that runs and, on the CPU, gives the traced call's result
    ``out`` bit for bit; else None (the key runs eagerly). Elsewhere the comparison would wait
    for the device, inside a call that queues its work without waiting; the lowering does not
    depend on the device. The graph is not copied to keep a recorded version (a copy took 0.2 s
    for MobileNetV3's 3112 operations, its compilation to Python 0.25 s)."""
    try:
        lowering.lower(graph)
        low = fx.GraphModule(root, graph)
        with torch.no_grad():
            again = low.forward(*inputs)
    except Exception as err:  # noqa: BLE001 - the key runs eagerly instead
        log.debug("replay: the lowered graph failed (%s): the call runs eagerly", err)
        return None
    if inputs[0].device.type == "cpu" and not _same(again, out):
        log.debug("replay: the lowered graph gave other values: the call runs eagerly")
        return None
    return low


def _same(a, b) -> bool:
    """Whether two results (tensors, or structures of them) are equal bit for bit."""
    xs, ys = tree_flatten(a)[0], tree_flatten(b)[0]
    return len(xs) == len(ys) and all(map(_same_leaf, xs, ys))


def _same_leaf(x, y) -> bool:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        return x is y
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


class _Mode(TorchDispatchMode):
    """A dispatch mode whose ``__torch_dispatch__`` torch leaves unwrapped.

    NOTE [dynamo import] torch wraps a mode's ``__torch_dispatch__`` in ``_disable_dynamo``
    unless the class says otherwise; the wrapper imports ``torch._dynamo`` on its first call:
    1.4 s of a 2-core CPU (sympy, the symbolic shapes) on the first ``hessian()`` of every
    process, a third of a small model's whole first call. Nothing here runs under
    ``torch.compile``, so there is nothing for the wrapper to disable.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False


class _Recorder(_Mode):
    """Records the ATen operations of a call as an ``fx`` graph, as they run.

    A dispatch mode is the thread's own, so a call is recorded while other threads run the same
    model (``make_fx`` patches ``nn.Module.__call__`` for every thread while it traces: another
    thread's forward got its proxies). Each tensor an operation makes is bound to its node; a
    tensor no recorded operation made (a parameter, a buffer, a cached index) is held by the graph
    as a constant, by reference, so a weight changed in place is seen. The tensors are looked up
    weakly: the record keeps no activation alive."""

    def __init__(self, inputs: tuple[Tensor, ...]):
        super().__init__()
        self.graph = fx.Graph()
        self.nodes: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
        self.constants: dict[str, Tensor] = {}
        self.failed: str | None = None
        for i, t in enumerate(inputs):
            self._bind(t, self.graph.placeholder(f"input_{i}"))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            out = func(*args, **kwargs)
        except Exception:
            # the engine caught it and took another path (``propagate._pull_shared`` tries a
            # shared seed first), but a graph holding the operation would raise in every replay
            self.failed = self.failed or f"{_op_name(func)} raised while traced"
            raise
        node = self.graph.call_function(func, *tree_map(self.node, (args, kwargs)))
        if isinstance(out, Tensor):
            self._bind(out, node)
        elif isinstance(out, (tuple, list)):
            for i, part in enumerate(out):
                if isinstance(part, Tensor):
                    self._bind(part, self.graph.call_function(operator.getitem, (node, i)))
        return out

    def _bind(self, t: Tensor, node: fx.Node) -> None:
        node.meta["dtype"], node.meta["shape"] = t.dtype, tuple(t.shape)
        self.nodes[t] = node  # an in-place operation's result is its input, now this node

    def node(self, a):
        """The node of tensor ``a`` (a new constant where no recorded operation made it); any
        other value as it is."""
        if not isinstance(a, Tensor):
            return a
        node = self.nodes.get(a)
        if node is None:  # made before the call
            name = f"constant_{len(self.constants)}"
            self.constants[name] = a
            node = self.graph.get_attr(name)
            self._bind(a, node)
        return node

    def output(self, out) -> None:
        """Ends the graph with the call's result ``out`` (tensors, or a structure of them)."""
        self.graph.output(tree_map(self.node, out))

    def root(self) -> nn.Module:
        """A module holding the graph's constants (parameters as parameters), by reference."""
        root = nn.Module()
        for name, t in self.constants.items():
            if isinstance(t, nn.Parameter):
                root.register_parameter(name, t)
            else:
                root.register_buffer(name, t, persistent=False)
        return root

    def module(self) -> fx.GraphModule:
        """The graph, once its output is set, as a module holding its constants."""
        return fx.GraphModule(self.root(), self.graph)


class _Count(_Mode):
    """Counts the ATen operations of a call."""

    ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def reads_values(graph: fx.Graph) -> str | None:
    """The first operation of ``graph`` whose result depends on values in a way a replay would
    not follow (a scalar read on the host, a value-dependent shape), or None."""
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        name = _op_name(node.target)
        if name in _VALUE_OPS:
            return name
        if name in _MASKED_OPS and any(_is_mask(a) for a in node.all_input_nodes):
            return f"{name} with a boolean mask"
    return None


def _op_name(target) -> str:
    packet = getattr(target, "_overloadpacket", None)
    return getattr(packet, "__name__", getattr(target, "__name__", str(target)))


def _is_mask(node: fx.Node) -> bool:
    return node.meta.get("dtype") == torch.bool
