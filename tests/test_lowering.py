"""The lowering of recorded graphs (``pipeline/hessian/lowering.py``): each case is recorded as
``replay`` records a call, lowered, and run again; its result must equal the eager one bit for
bit, with the view operations folded as the table says and every operation that has a Python
binding called through it. A lowering that changes a value, or fails, is caught, and the key
runs eagerly."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, fx

import pipeline
from pipeline.hessian import lowering, replay
from tests.library_models import PINN
from tests.zoo import assert_close

aten = torch.ops.aten


def _chain(t: Tensor) -> Tensor:
    return t.view(4, 6).unsqueeze(0).view(24).unsqueeze(-1) * 2


def _in_place_through_a_view(t: Tensor) -> Tensor:
    v = t.clone()
    v.view(2, 12).unsqueeze(0)[0, 1].add_(1.0)  # writes into v through views
    return v


def _restrided_in_place(t: Tensor) -> Tensor:
    a = t.clone().view(6, 4).view(6, 4)
    a.t_()  # a view of a and a differ for this: the views are kept
    return a * 2


def _pieces(t: Tensor) -> Tensor:
    a, b = torch.split(t, [1, 3], dim=0)
    values, index = t.max(dim=1)
    return torch.cat([a * 2, b], 0).sum(0) + values.sum() + index.to(t.dtype).sum()


# (name, function of a (4, 6) tensor, view operations the lowered graph keeps: a Counter of
# their names; None: no expectation). Operations other than views are kept as they are.
CASES = [
    ("reshape chain: one view", _chain, {"view": 1}),
    ("reshape back to the shape: none", lambda t: t.view(24).view(4, 6) + 1, {}),
    ("transpose of a transpose: none", lambda t: t.transpose(0, 1).transpose(1, 0) * 3, {}),
    ("t of t: none", lambda t: t.t().t() - 1, {}),
    ("transposes of other axes kept", lambda t: t.view(2, 2, 6).transpose(0, 1).transpose(1, 2)
     + 0, {"view": 1, "transpose": 2}),
    ("slice of a slice: one narrow", lambda t: t[:, 1:][:, 1:3] * 2, {"narrow": 1}),
    ("slice from the end", lambda t: t[:, -2:] * 2, {"narrow": 1}),
    ("slice past the end", lambda t: t[1:100] * 2, {"narrow": 1}),
    ("whole slice: none", lambda t: t[:, :] + t[0:4] * 2, {}),
    ("slice with a step kept", lambda t: t[:, ::2] * 2, {"slice": 1}),
    ("slice from None", lambda t: aten.slice.Tensor(t, 1, None, 4) * 2, {"narrow": 1}),
    ("slice between negative ends", lambda t: t[:, -5:-1][:, 1:] * 2, {"narrow": 1}),
    ("expand to the shape: none", lambda t: t.expand(4, 6) * 2, {}),
    ("expand to another shape kept", lambda t: t[None].expand(3, 4, 6) * 2, {"view": 1,
                                                                            "expand": 1}),
    ("in place through views", _in_place_through_a_view, None),
    ("t_ in place: views kept", _restrided_in_place, {"view": 2}),
    ("pieces and two outputs", _pieces, None),
    ("where: the schema's order", lambda t: torch.where(t > 0, t, -t) + torch.addcmul(t, t, t,
                                                                                    value=-2), {}),
    ("sum over a list of axes", lambda t: t.view(2, 2, 6).sum([0, 2]) * 2, {"view": 1}),
]  # fmt: skip

_VIEWS = {"view", "_unsafe_view", "unsqueeze", "squeeze", "transpose", "t", "expand", "slice",
          "narrow", "alias", "permute", "select"}  # fmt: skip


def _record(fn, t: Tensor) -> tuple[fx.GraphModule, Tensor]:
    recorder = replay._Recorder((t,))
    with torch.no_grad(), recorder:
        out = fn(t)
    recorder.output(out)
    recorder.graph.eliminate_dead_code()
    return recorder.module(), out


def _name(node: fx.Node) -> str:
    if node.op == "call_method":
        return node.target
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._overloadpacket.__name__
    return getattr(node.target, "__name__", str(node.target))


def _views(graph: fx.Graph) -> dict[str, int]:
    found: dict[str, int] = {}
    for node in graph.nodes:
        if node.op in ("call_function", "call_method") and _name(node) in _VIEWS:
            found[_name(node)] = found.get(_name(node), 0) + 1
    return found


def _calls(graph: fx.Graph) -> int:
    return sum(node.op in ("call_function", "call_method") for node in graph.nodes)


def _boxed_with_a_binding(graph: fx.Graph) -> list[str]:
    """Operations still called through the operator although a Python binding exists."""
    left = []
    for node in graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            name = _name(node)
            if any(hasattr(ns, name) for ns in lowering._BINDINGS) or name in lowering._METHODS:
                left.append(name)
    return left


@pytest.mark.parametrize(("name", "fn", "views"), CASES, ids=[c[0] for c in CASES])
def test_a_lowered_graph_gives_the_same_bits_with_fewer_views(name, fn, views):
    torch.manual_seed(0)
    t = torch.randn(4, 6)
    module, out = _record(fn, t)
    recorded = module.code
    low = replay._lowered(module, module.graph, (t,), out)
    assert low is not None, f"{name}: the lowered graph was refused\n{recorded}"
    got = low.forward(t)
    assert torch.equal(got, fn(t)), f"{name}: values differ\n{low.code}"
    if views is not None:
        assert _views(low.graph) == views, f"{name}: views left {_views(low.graph)}\n{low.code}"
    assert not _boxed_with_a_binding(low.graph), f"{name}: {_boxed_with_a_binding(low.graph)}"


def test_a_lowering_that_changes_a_value_is_refused(monkeypatch):
    def wrong(graph: fx.Graph) -> None:  # multiplies where the call adds
        for node in graph.nodes:
            if node.target is aten.add.Tensor:
                node.target = torch.mul

    t = torch.randn(4, 6)
    module, out = _record(lambda t: t + 1.5, t)
    monkeypatch.setattr(lowering, "lower", wrong)
    assert replay._lowered(module, module.graph, (t,), out) is None, "a changed value was kept"

    def broken(graph: fx.Graph) -> None:
        raise RuntimeError("a bug in the lowering")

    monkeypatch.setattr(lowering, "lower", broken)
    assert replay._lowered(module, module.graph, (t,), out) is None, "a failing lowering kept"


def test_the_pinn_replays_a_lowered_graph(monkeypatch):
    """The replayed PINN call: its graph is the lowered one (no operation with a binding called
    through the operator, at most 4/5 of the recorded operations: 126 of 160 at 4096 points),
    and its Hessians match float64 ones."""
    monkeypatch.setattr(replay, "TRACE_COST", 0.0)
    recorded = []
    lowered = replay._lowered

    def counting(root, graph, inputs, out):
        recorded.append(_calls(graph))  # before the lowering, which works in place
        return lowered(root, graph, inputs, out)

    monkeypatch.setattr(replay, "_lowered", counting)
    torch.manual_seed(0)
    model, x = PINN().eval(), torch.randn(64, 2)
    for _ in range(3):  # eager, traced, replayed
        h = pipeline.hessian(model, x, [0])
    (entry,) = (e for e in replay._TRACES[model].values() if e.graph is not None)
    nodes = _calls(entry.graph.graph)
    assert not _boxed_with_a_binding(entry.graph.graph)
    assert nodes <= 0.8 * recorded[0], f"{nodes} of {recorded[0]} nodes left"
    ref = pipeline.hessian(model.double(), x.double(), [0])  # eager: a new dtype, a new key
    assert_close(h.double(), ref, rtol=1e-5, atol=1e-6)
