"""Capture a model's graph with ``torch.fx`` and record it on a batch as steps with local rules.

NOTE [capture]: we trace with ``torch.fx.symbolic_trace`` rather than ``torch.export``:
* the user's own size arithmetic (``x.view(x.size(0), -1)``) stays in the graph as calls, so one
  capture serves every batch size (an exported graph holds the example's batch size unless the
  batch axis was exported as dynamic);
* torch's layer modules stay whole (``call_module``), with their weights at hand for the rules,
  while the user's modules, functional calls and tensor methods become nodes;
* it needs no example input and takes milliseconds.
``fx`` patches ``nn.Module.__call__`` for every thread while it traces; our tracer
(``_ThreadTracer``) passes other threads' module calls through, so a model is captured while
another thread (a Dask worker's) runs a forward.
A ``torch.export`` program (``model=exported``) is already a graph of ATen ops; tracing its module
gives those ops as nodes, and ``ops`` has rules for the common ones. A model whose ``forward``
branches on tensor values cannot be traced: ``capture`` says why and the caller falls back to
``forward_over_reverse``. Sizes taken from the input among several arguments
(``torch.zeros(x.shape[0], 1)``, ``buffer.expand(x.shape[0], -1)``) fail in torch's argument
parser before ``fx`` sees them; while a model is traced those functions record the call instead
(``_sizes_take_proxies``).

NOTE [batch axis]: every rule works on values whose batch axis is first. Attention code moves
it (``qkv.reshape(B, T, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)``: the batch axis is second
until ``unbind`` takes it back to the front). Where a call moves the batch axis, or reads a tensor
whose batch axis is elsewhere, the recorder finds where the call puts it by a dry run on meta
tensors whose batch axis has a size no other axis has, and records the step on batch-first
values: the call wrapped between ``movedim``s, as a ``Fold`` for linear reshuffles (permute,
transpose, unbind, select, indexing) or a ``General`` step for a nonlinear one. The slot keeps
the batch-first value; the run itself goes on with the tensor as the model made it. A call
whose arguments name the batch size there (a reshape) is refused with its reason. Samples
concatenated along axis 0 (message passing: ``pos.reshape(-1, 3)``) are blocks of rows: NOTE
[blocks] in ``blocks``.

NOTE [refused steps]: a float result the recorder cannot describe (a call that mixes the samples,
say) refuses the model only where the output depends on it: the node is marked with its reason,
every float computed from it inherits the mark, and the capture is refused when a marked node is
the output. Integer and boolean results computed from it are fine (no derivative passes through
them): ``torch.cdist`` of the concatenated positions of all samples, compared with a cutoff for
a neighbour list, is such a node. The recorder also notes which nodes depend on x at all
(integers too): an index tensor that does not is analysed once per call key (NOTE [blocks]).

A ``Tape`` is the graph run on a batch x (N, *S): the values of every tensor that depends on x
(its "slots"), and the steps between them in topological order, each with its ``Rule``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import threading
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.node import map_aggregate, map_arg
from torch.utils._pytree import tree_leaves

from . import blocks, caches, elementwise, pruning
from .blocks import Blocks
from .ops import ALIAS, Call, Unsupported, canonical, rule_for
from .rules import Elementwise, Fold, General, Rule, Select

_CACHE: weakref.WeakKeyDictionary[nn.Module, fx.GraphModule | str] = caches.per_model()

# Calls whose result depends on a tensor's shape or type only, never on its values.
_SHAPE_METHODS = {"size", "dim", "numel", "type", "new_zeros", "new_ones", "new_empty",
                  "new_full", "new_tensor", "get_device", "nelement", "ndimension",
                  "detach"}  # fmt: skip
_SHAPE_FUNCS = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
                torch.rand_like, torch.randn_like, torch.numel, torch.Tensor.size,
                torch.Tensor.dim, torch.detach}  # fmt: skip
_SHAPE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}


def capture(model: nn.Module) -> fx.GraphModule:
    """The model's graph (cached per model object); raises ``Unsupported`` when it cannot be
    traced (see NOTE [capture])."""
    cached = _CACHE.get(model)
    if cached is None:
        try:
            tracer = _ThreadTracer()
            graph = tracer.trace(model)
            cached = fx.GraphModule(tracer.root, graph, type(model).__name__)
            lowered = [lower(cached) for lower in (_lower_norms, _lower_multihead,
                                                   _lower_attention, _lower_unbind)]  # fmt: skip
            if any(lowered):
                cached.recompile()
        except Exception as err:  # noqa: BLE001 - any tracing failure means "not capturable"
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            cached = f"its forward cannot be traced by torch.fx ({first[:160]})"
        _CACHE[model] = cached
    if isinstance(cached, str):
        raise Unsupported(cached)
    return cached


def _lower_norms(gm: fx.GraphModule) -> bool:
    """2-norms over some axes written as what they are (NOTE [norms]), in place; whether any was.

    NOTE [norms]: ``v.norm(dim=-1)``, ``torch.linalg.vector_norm(v, dim=-1)`` and their kind
    (the distances of a potential) have no rule of their own; as ``norm_root(sum(v * v, dim))``
    they are a product, a sum and an elementwise root, each with closed-form derivatives that
    every schedule takes (Taylor's too), where the norm as one call was a ``General`` step
    differentiated by ``torch.func``. ``norm_root`` is sqrt with its derivatives taken as zero at
    0 (the zero vector), where torch's norm takes its gradient zero."""
    changed = False
    for node in list(gm.graph.nodes):
        spec = _two_norm(node)
        if spec is None:
            continue
        v, dim, keepdim = spec
        with gm.graph.inserting_before(node):
            squares = gm.graph.call_function(operator.mul, (v, v))
            total = gm.graph.call_function(torch.sum, (squares,), {"dim": dim, "keepdim": keepdim})
            root = gm.graph.call_function(elementwise.norm_root, (total,))
        node.replace_all_uses_with(root)
        gm.graph.erase_node(node)
        changed = True
    return changed


def _lower_unbind(gm: fx.GraphModule) -> bool:
    """``t.permute(p).unbind(0)`` written as ``[u.permute(q) for u in t.unbind(p[0])]``, in
    place; whether any was.

    NOTE [unbind]: attention splits its projections with
    ``qkv.reshape(B, T, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)``: the permute moves the
    batch axis to second place and the unbind brings it back (NOTE [batch axis]). Where the
    samples are blocks of rows (window attention: the windows of all images on axis 0, NOTE
    [blocks]) no step may move that axis; unbinding the axis the permute puts first and then
    permuting the rest (q: the remaining axes in the permute's order) is the same tensors with
    axis 0 left where it is."""
    changed = False
    for node in list(gm.graph.nodes):
        spec = _unbind_of_permute(node)
        if spec is None:
            continue
        t, perm = spec
        first = perm[0]
        rest = [a - (a > first) for a in perm[1:]]
        getters = list(node.users)
        permute = node.args[0]
        with gm.graph.inserting_before(node):
            parts = gm.graph.call_method("unbind", (t, first))
        for get in getters:
            with gm.graph.inserting_before(get):
                part = gm.graph.call_function(operator.getitem, (parts, get.args[1]))
                moved = gm.graph.call_method("permute", (part, *rest))
            get.replace_all_uses_with(moved)
            gm.graph.erase_node(get)
        gm.graph.erase_node(node)
        if not permute.users:
            gm.graph.erase_node(permute)
        changed = True
    return changed


def _unbind_of_permute(node: fx.Node) -> tuple[fx.Node, list[int]] | None:
    """(t, p) for ``t.permute(p).unbind(0)`` whose parts are only taken by index; else None."""
    method = node.op == "call_method" and node.target == "unbind"
    if not (method or (node.op == "call_function" and node.target is torch.unbind)):
        return None
    src, dim = node.args[0], (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0))
    if dim != 0 or not isinstance(src, fx.Node) or src.kwargs:
        return None
    if not (src.op == "call_method" and src.target == "permute"):
        return None
    dims = src.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    if not dims or not all(isinstance(d, int) for d in dims):
        return None
    perm = [d % len(dims) for d in dims]
    users = list(node.users)
    if not users or any(
        u.op != "call_function"
        or u.target is not operator.getitem
        or not isinstance(u.args[1], int)
        for u in users
    ):
        return None
    return src.args[0], perm


_ATTENTION = {torch.nn.functional.scaled_dot_product_attention,
              torch.ops.aten.scaled_dot_product_attention.default}  # fmt: skip


def _lower_attention(gm: fx.GraphModule) -> bool:
    """Scaled dot-product attention written as its steps (NOTE [attention]), in place; whether
    any call was.

    NOTE [attention]: ``F.scaled_dot_product_attention(q, k, v)`` (timm's attention, any model
    calling it) as one call is a ``General`` step, differentiated by ``torch.func`` a step at a
    time. Written as what it computes, ``softmax(s q k^T + bias) v`` with s = ``scale`` or
    1/sqrt(d), it is a transpose, two products of two inputs each (``Bilinear``: per-head, with
    their exact second-order terms), a scale, an add of the bias and a softmax along the keys
    (``Softmax``), whose closed forms every schedule takes. The bias is ``attn_mask`` (a float
    mask as it is; a boolean one as 0 where it is True and -inf where it is False) or, for
    ``is_causal``, -inf above the diagonal; one that does not depend on x is a constant, one that
    does is a step of its own. A call with dropout (``dropout_p`` other than 0: a model in
    training mode) or grouped heads (``enable_gqa``) keeps the ``General`` step, exact but
    slower. The forward's values are those of torch's math kernel (fused kernels round
    differently, within float32's precision)."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _ATTENTION:
            continue
        given = _arguments(node, _SDPA_ARGS)
        q, k, v = (given.get(n) for n in _SDPA_ARGS[:3])
        mask, causal, scale = (
            given.get("attn_mask"),
            given.get("is_causal", False),
            given.get("scale"),
        )
        if (given.get("dropout_p", 0.0) != 0.0 or given.get("enable_gqa", False) is not False
                or causal not in (True, False) or (causal and mask is not None)
                or not all(isinstance(t, fx.Node) for t in (q, k, v))
                or not (scale is None or isinstance(scale, (int, float)))
                or not (mask is None or isinstance(mask, fx.Node))):  # fmt: skip
            continue
        graph = gm.graph
        with graph.inserting_before(node):
            if scale is None:
                scale = graph.call_function(_inverse_sqrt, (graph.call_method("size", (q, -1)),))
            kt = graph.call_method("transpose", (k, -2, -1))
            scores = graph.call_function(operator.mul, (graph.call_function(torch.matmul, (q, kt)),
                                                        scale))  # fmt: skip
            if causal or mask is not None:
                dtype = graph.call_function(getattr, (scores, "dtype"))
                device = graph.call_function(getattr, (scores, "device"))
            if causal:
                sizes = (graph.call_method("size", (q, -2)), graph.call_method("size", (k, -2)))
                mask = graph.call_function(_causal_mask, (*sizes, device))
            if mask is not None:
                bias = graph.call_function(_as_bias, (mask, dtype, device))
                scores = graph.call_function(operator.add, (scores, bias))
            p = graph.call_function(torch.softmax, (scores,), {"dim": -1})
            out = graph.call_function(torch.matmul, (p, v))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        changed = True
    return changed


def _lower_multihead(gm: fx.GraphModule) -> bool:
    """``nn.MultiheadAttention`` calls written as their projections and an SDPA call, in place
    (NOTE [attention]; torchvision's ViT calls it with ``need_weights=False``); whether any was.

    A leaf module for ``torch.fx``, it would be one ``General`` step. Rewritten where it is
    the plain case: ``batch_first``, one in-projection weight, no extra key/value biases or zero
    attention, no masks, not causal, and its attention weights unused: then it is
    ``q, k, v = F.linear(query / key / value, W_q / W_k / W_v, b)``, heads split off the last
    axis, ``F.scaled_dot_product_attention`` (written as its steps below), the heads merged and
    ``out_proj``. Any other call stays whole."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        if not isinstance(m, nn.MultiheadAttention) or not _plain_multihead(m, node):
            continue
        given = _arguments(node, _MHA_ARGS)
        q, k, v = (given.get(n) for n in _MHA_ARGS[:3])
        if not all(isinstance(t, fx.Node) for t in (q, k, v)):
            continue
        e, heads, graph = m.embed_dim, m.num_heads, gm.graph
        with graph.inserting_before(node):
            w = graph.get_attr(f"{node.target}.in_proj_weight")
            b = None if m.in_proj_bias is None else graph.get_attr(f"{node.target}.in_proj_bias")
            split = []
            for i, t in enumerate((q, k, v)):
                part = slice(i * e, (i + 1) * e)
                wi = graph.call_function(operator.getitem, (w, part))
                bi = None if b is None else graph.call_function(operator.getitem, (b, part))
                proj = graph.call_function(F.linear, (t, wi, bi))
                heads_of = graph.call_method("unflatten", (proj, -1, (heads, e // heads)))
                split.append(graph.call_method("transpose", (heads_of, 1, 2)))
            att = graph.call_function(F.scaled_dot_product_attention, tuple(split))
            merged = graph.call_method("flatten", (graph.call_method("transpose", (att, 1, 2)), -2))
            out = graph.call_module(f"{node.target}.out_proj", (merged,))
        for user in list(node.users):
            if user.args[1] == 0:
                user.replace_all_uses_with(out)
            graph.erase_node(user)
        graph.erase_node(node)
        changed = True
    return changed


def _plain_multihead(m: nn.MultiheadAttention, node: fx.Node) -> bool:
    """Whether a call of ``m`` is the plain case ``_lower_multihead`` rewrites."""
    given = _arguments(node, _MHA_ARGS)
    module_ok = (m.batch_first and m._qkv_same_embed_dim and m.bias_k is None
                 and m.bias_v is None and not m.add_zero_attn
                 and (m.dropout == 0.0 or not m.training))  # fmt: skip
    call_ok = (given.get("key_padding_mask") is None and given.get("attn_mask") is None
               and given.get("is_causal", False) is False)  # fmt: skip
    # its output is (attention, weights): only element 0 may be read (``x, _ = attention(...)``
    # takes element 1 too, and uses it nowhere)
    users_ok = all(u.op == "call_function" and u.target is operator.getitem
                   and (u.args[1] == 0 or (u.args[1] == 1 and not u.users))
                   for u in node.users)  # fmt: skip
    return module_ok and call_ok and users_ok


def _causal_mask(rows: int, cols: int, device: torch.device) -> Tensor:
    """SDPA's ``is_causal`` mask: True on and below the diagonal."""
    return torch.ones(rows, cols, dtype=torch.bool, device=device).tril()


def _as_bias(mask: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An SDPA mask as the bias added to the scores: a float mask as it is, a boolean one as 0
    where it is True and -inf where it is False."""
    if mask.dtype != torch.bool:
        return mask.to(device=device, dtype=dtype)
    zeros = torch.zeros(mask.shape, dtype=dtype, device=device)
    return zeros.masked_fill(~mask.to(device), -math.inf)


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
              "enable_gqa")  # fmt: skip
_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal")  # fmt: skip


def _arguments(node: fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    """A call's arguments by name (positional ones named by ``names``). An argument that is a
    forward's optional parameter (timm's ``attn_mask=None``) is the default it is recorded with
    (``record``)."""
    given = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    return {n: _default(a) for n, a in given.items()}


def _default(arg: Any) -> Any:
    if isinstance(arg, fx.Node) and arg.op == "placeholder" and arg.args:
        return arg.args[0]
    return arg


def _inverse_sqrt(d: int) -> float:
    """SDPA's default scale for a head width d."""
    return 1.0 / math.sqrt(d)


_NORM_FUNCTIONS = {torch.norm, torch.functional.norm, torch.linalg.norm, torch.linalg.vector_norm}


def _two_norm(node: fx.Node) -> tuple[fx.Node, Any, bool] | None:
    """(v, dim, keepdim) of a call taking the 2-norm of v over the axes ``dim``, else None."""
    if node.op == "call_method" and node.target == "norm":
        names = ["p", "dim", "keepdim"]
    elif node.op == "call_function" and node.target in _NORM_FUNCTIONS:
        vector = node.target is torch.linalg.vector_norm
        names = ["ord" if vector or node.target is torch.linalg.norm else "p", "dim", "keepdim"]
    else:
        return None
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    given = dict(zip(names, node.args[1:], strict=False))
    for key, value in node.kwargs.items():
        if key not in names and value is not None:
            return None  # a dtype, out
        given[key] = value
    p, dim, keepdim = given.get(names[0], 2), given.get("dim"), given.get("keepdim", False)
    if node.target is torch.linalg.norm and p is None:
        p = 2
    if p not in (2, 2.0) and not (p == "fro" and node.target is not torch.linalg.norm):
        return None
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    if not dims or not all(type(d) is int for d in dims) or not isinstance(keepdim, bool):
        return None
    if node.target is torch.linalg.norm and len(dims) != 1:
        return None  # a matrix norm
    return node.args[0], dim, keepdim


class _ThreadTracer(fx.Tracer):
    """``fx.symbolic_trace``'s tracer for the thread that traces only.

    While it traces, ``fx`` patches ``nn.Module.__call__`` and ``__getattr__`` for every thread:
    another thread running a model at that moment (a Dask worker's) got proxies for its layers'
    outputs. Here the patched calls pass other threads through to the module itself."""

    def trace(self, root, concrete_args=None):
        self._thread = threading.get_ident()
        with _sizes_take_proxies():
            return super().trace(root, concrete_args)

    def call_module(self, m, forward, args, kwargs):
        if threading.get_ident() != self._thread:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


# Functions and tensor methods that take sizes as separate arguments: given a proxy among several
# (``torch.zeros(x.shape[0], 1)``, ``buffer.expand(x.shape[0], -1)``), torch's argument parser
# fails before ``fx`` sees the proxy ("zeros() takes 1 positional argument but 2 were given").
_SIZE_FUNCTIONS = ("zeros", "ones", "empty", "full", "rand", "randn", "arange", "eye",
                   "linspace")  # fmt: skip
_SIZE_METHODS = ("expand", "view", "reshape", "repeat", "new_zeros", "new_ones", "new_empty",
                 "new_full")  # fmt: skip


_PATCHING = threading.Lock()
_PATCHED: list[tuple[Any, str, Any]] = []  # (owner, name, original) while any trace runs
_TRACES = [0]  # traces running (threads trace at once: the first patches, the last restores)


@contextlib.contextmanager
def _sizes_take_proxies():
    """While a model is traced: the functions and tensor methods above record a call when a
    proxy is among their arguments (as ``fx`` does for one proxy); any other call, another
    thread's included, goes to torch as it is."""
    with _PATCHING:
        if _TRACES[0] == 0:
            owners = [(torch, name) for name in _SIZE_FUNCTIONS]
            owners += [(torch.Tensor, name) for name in _SIZE_METHODS]
            for owner, name in owners:
                fn = getattr(owner, name)
                _PATCHED.append((owner, name, fn))
                setattr(owner, name, _taking_proxies(fn, owner is torch.Tensor, name))
        _TRACES[0] += 1
    try:
        yield
    finally:
        with _PATCHING:
            _TRACES[0] -= 1
            if _TRACES[0] == 0:
                for owner, name, fn in _PATCHED:
                    setattr(owner, name, fn)
                _PATCHED.clear()


def _taking_proxies(fn, method: bool, name: str):
    def wrapper(*args, **kwargs):
        proxy = next((a for a in tree_leaves((args, kwargs)) if isinstance(a, fx.Proxy)), None)
        if proxy is None:
            return fn(*args, **kwargs)
        if method:
            return proxy.tracer.create_proxy("call_method", name, args, kwargs)
        return proxy.tracer.create_proxy("call_function", fn, args, kwargs)

    return functools.wraps(fn)(wrapper)


@dataclass
class Step:
    """y = f(inputs): slot ``out`` from slots ``inputs``, with the rule of f."""

    name: str
    rule: Rule
    inputs: list[int]
    out: int


@dataclass
class Tape:
    """A captured graph run on a batch.

    Attributes:
        values: the value (N, *s) of each slot; slot 0 is the input x.
        steps: in topological order.
        output: the slot of the model's output z (N, C).
    """

    values: list[Tensor]
    steps: list[Step]
    output: int

    @property
    def n(self) -> int:
        return self.values[0].shape[0]

    def width(self, slot: int) -> int:
        """F: the flat per-sample size of a slot."""
        return math.prod(self.values[slot].shape[1:])


class _Active:
    """Stands for the i-th active argument of a call while its function is built."""

    def __init__(self, i: int):
        self.i = i


# The captured graphs narrowed to what their outputs read (NOTE [pruning]), per input shape.
_NARROWED: weakref.WeakKeyDictionary[fx.GraphModule, dict] = weakref.WeakKeyDictionary()


@torch.no_grad()
def record(gm: fx.GraphModule, x: Tensor) -> Tape:
    """Run the captured graph on x (N, *S) and describe it as steps (see module doc); no
    autograd graph is kept. Steps whose outputs the output reads only in part compute that part
    (NOTE [pruning] in ``pruning``): the first call at an input shape finds them, and later
    calls at that shape record the narrowed graph.

    Raises:
        Unsupported: a step mixes the samples of the batch, or is random, or the model does not
            return one tensor.
    """
    key = (tuple(x.shape[1:]), x.dtype, x.device.type)
    known = _NARROWED.setdefault(gm, {})
    if key in known:
        return _record(known[key], x)[0]
    tape, env, slot, st = _record(gm, x)
    smaller = _narrower(gm, env, slot, st)
    known[key] = gm
    if smaller is None:
        return tape
    out = tape.values[tape.output]
    del tape, env, slot, st  # (the narrowed graph is recorded in the memory of the whole one)
    narrow = _alike(smaller, x, out)
    if narrow is None:
        return _record(gm, x)[0]
    known[key] = smaller
    return narrow


def _narrower(gm, env, slot, st: _State) -> fx.GraphModule | None:
    """The graph narrowed to what its output reads (``pruning.pruned``), from a recording."""
    made = {step.out: step for step in st.steps}
    steps = {n: made[i].rule for n, i in slot.items() if i in made and made[i].name == n.name}
    plain = set(range(len(st.values))) - set(st.axes) - set(st.layouts)
    return pruning.pruned(gm, steps, env, slot, plain)


def _alike(gm: fx.GraphModule, x: Tensor, out: Tensor) -> Tape | None:
    """The tape of ``gm`` on x where its output is ``out`` within 1000 ulps of its largest
    entry; None where it differs or cannot be recorded."""
    try:
        tape = _record(gm, x)[0]
    except Unsupported:
        return None
    again = tape.values[tape.output]
    tolerance = 1e3 * torch.finfo(out.dtype).eps * out.abs().max().item()
    if again.shape != out.shape or (again - out).abs().max().item() > tolerance:
        return None
    return tape


def _record(gm: fx.GraphModule, x: Tensor) -> tuple[Tape, dict, dict, _State]:
    """``record`` of the graph as captured: the tape, and each node's value and slot."""
    env: dict[fx.Node, Any] = {}
    slot: dict[fx.Node, int] = {}
    tuples: dict[fx.Node, tuple] = {}  # active calls with tuple outputs: their Call parts
    st = _State([], [], {}, {})
    refused: dict[fx.Node, str] = {}  # NOTE [refused steps]
    varying: set[fx.Node] = set()  # nodes whose value depends on x (integer ones too)
    placeholders = 0
    output = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if placeholders == 0:
                env[node] = x
                slot[node] = len(st.values)
                st.values.append(x)
                varying.add(node)
            elif node.args:
                env[node] = node.args[0]  # a default value
            else:
                raise Unsupported("its forward takes more than one required input")
            placeholders += 1
            continue
        if node.op == "get_attr":
            env[node] = _fetch(gm, node.target)
            continue
        if node.op == "output":
            result = node.args[0]
            if isinstance(result, fx.Node) and result in refused:
                raise Unsupported(refused[result])
            if not isinstance(result, fx.Node) or result not in slot:
                raise Unsupported("its forward does not return one tensor computed from the input")
            output = slot[result]
            break
        shape_only = _shape_only(node)
        if not shape_only and any(n in varying for n in _value_inputs(node)):
            varying.add(node)
        bad = next((n for n in node.all_input_nodes if n in refused), None)
        if bad is not None and not shape_only:
            env[node] = _run_node(gm, node, env)
            if _differentiable(env[node]):
                refused[node] = refused[bad]
            continue
        try:
            if (
                node.op == "call_function"
                and node.target is operator.getitem
                and node.args[0] in tuples
            ):
                _record_element(node, tuples[node.args[0]], env, slot, st)
                continue
            active = [n for n in node.all_input_nodes if n in slot or n in tuples]
            if not active or shape_only:
                env[node] = _run_node(gm, node, env)
                continue
            constant_index = not any(
                n in varying for n in node.all_input_nodes if n not in slot and n not in tuples
            )
            _record_call(gm, node, env, slot, tuples, st, constant_index)
        except Unsupported as err:
            if node not in env:
                env[node] = _run_node(gm, node, env)
            refused[node] = str(err)
    if output is None:
        raise Unsupported("its graph has no output")
    if output in st.axes:
        raise Unsupported(f"its output has the batch axis at position {st.axes[output]}, not first")
    if output in st.layouts:
        raise Unsupported(
            "its output is the rows of the concatenated samples, not one row per sample (sum "
            "them per sample: index_add over the batch index)"
        )
    values = st.values
    return Tape(values, _pool_first(_live(st.steps, output), values), output), env, slot, st


@dataclass
class _State:
    """What ``record`` builds: every slot's value, the steps, and where a slot's layout is not
    plain batch-first: its batch axis elsewhere (``axes``) or its samples in blocks of rows
    (``layouts``, NOTE [blocks] in ``blocks``)."""

    values: list[Tensor]
    steps: list[Step]
    axes: dict[int, int]
    layouts: dict[int, Blocks]

    def add(self, name: str, rule: Rule, inputs: list[int], value: Tensor) -> int:
        """A new step into a new slot holding ``value``; returns the slot."""
        self.values.append(value)
        self.steps.append(Step(name, rule, list(inputs), len(self.values) - 1))
        return len(self.values) - 1


def _run_node(gm: fx.GraphModule, node: fx.Node, env: dict) -> Any:
    return _run(
        gm, node, map_arg(node.args, env.__getitem__), map_arg(node.kwargs, env.__getitem__)
    )


def _differentiable(value: Any) -> bool:
    """Whether a value holds a floating tensor (one that may carry a derivative)."""
    if isinstance(value, Tensor):
        return value.is_floating_point() or value.is_complex()
    if isinstance(value, (tuple, list)):
        return any(_differentiable(v) for v in value)
    return False


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _shape_only(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op == "call_function":
        if node.target is getattr:
            return node.args[1] in _SHAPE_ATTRS
        return node.target in _SHAPE_FUNCS or getattr(node.target, "__name__", "") in (
            "sym_size", "sym_numel", "sym_stride", "_assert_tensor_metadata",
        )  # fmt: skip
    if node.op == "call_module":
        return node.target == "_guards_fn"  # an exported program's input checks
    return False


# Tensor methods whose second argument gives only a shape or a dtype (an index expanded like the
# messages it scatters: its values do not depend on the messages').
_LIKE_METHODS = {"expand_as", "view_as", "reshape_as", "type_as"}


def _value_inputs(node: fx.Node) -> list[fx.Node]:
    """The input nodes whose values the node's value depends on."""
    if node.op == "call_method" and node.target in _LIKE_METHODS and node.args:
        first = node.args[0]
        return [first] if isinstance(first, fx.Node) else []
    return node.all_input_nodes


def _in_place(node: fx.Node, module: nn.Module | None, kwargs: dict) -> bool:
    if kwargs.get("inplace"):
        return True
    if node.op == "call_method" and node.target.endswith("_"):
        return True
    return module is not None and bool(getattr(module, "inplace", False))


def _run(gm: fx.GraphModule, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _record_call(gm, node, env, slot, tuples, st: _State, constant_index: bool) -> None:
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    inputs: list[Tensor] = []
    ids: list[int] = []

    def mark(n: fx.Node):
        if n in slot:
            inputs.append(env[n])
            ids.append(slot[n])
            return _Active(len(inputs) - 1)
        return env[n]

    marked_args = map_arg(node.args, mark)
    marked_kwargs = map_arg(node.kwargs, mark)
    if any(n in tuples for n in node.all_input_nodes):
        env[node] = _run_node(gm, node, env)
        raise Unsupported(f"{node.name} takes a whole tuple of intermediate tensors")
    in_place = _in_place(node, module, node.kwargs)

    def bind(ins):
        def put(a):
            return ins[a.i] if isinstance(a, _Active) else a

        return map_aggregate(marked_args, put), map_aggregate(marked_kwargs, put)

    def fn(*ins):  # an in-place call works on copies: derivatives never write into a primal
        a, k = bind([t.clone() for t in ins] if in_place else ins)
        return _run(gm, node, a, k)

    args, kwargs = bind([t.clone() for t in inputs] if in_place else inputs)
    out = _run(gm, node, args, kwargs)
    args, kwargs = bind(inputs)  # the rules look at the recorded inputs, not at the clones
    target = module if module is not None else node.target
    call = Call(node.op, target, args, kwargs, inputs, out, fn)
    if isinstance(out, (tuple, list)):
        tuples[node] = (call, ids, constant_index)
        env[node] = out
        return
    env[node] = out
    if not (isinstance(out, Tensor) and out.is_floating_point()):
        return  # an integer or boolean result (argmax, a mask): no derivative
    _add_step(node.name, call, ids, slot, node, st, constant_index)


def _record_element(node, parts, env, slot, st: _State) -> None:
    call, ids, constant_index = parts
    i = node.args[1]
    out = call.out[i]
    env[node] = out
    if not (isinstance(out, Tensor) and out.is_floating_point()):
        return
    whole = call.fn
    element = Call(call.kind, call.target, call.args, call.kwargs, call.inputs, out,
                   lambda *ins: whole(*ins)[i], element=i)  # fmt: skip
    _add_step(node.name, element, ids, slot, node, st, constant_index)


def _add_step(name, call: Call, ids, slot, node, st: _State, constant_index: bool) -> None:
    values, axes = st.values, st.axes
    n = values[0].shape[0]
    layouts = [st.layouts.get(i) for i in ids]
    if not any(axes.get(i, 0) for i in ids) and blocks.applies(call, layouts, n):
        out, layout = blocks.record(name, call, ids, values, st.layouts,
                                    lambda *a: st.add(name, *a), constant_index)  # fmt: skip
        slot[node] = ids[0] if out is None else out
        if layout is not None:
            st.layouts[slot[node]] = layout
        return
    if any(lay is not None for lay in layouts):
        raise Unsupported(f"{name} ({_describe(call)}) reads rows of concatenated samples "
                          "with the batch axis moved")  # fmt: skip
    batch = [axes.get(i, 0) for i in ids]
    if any(batch) or canonical(call) in _AXIS_OPS:
        moved = _moved_step(name, call, [values[i] for i in ids], batch)
        if moved is not None:
            rule, out, axis = moved
            slot[node] = st.add(name, rule, list(ids), out)
            if axis:
                axes[slot[node]] = axis
            return
    out = call.out
    if out.dim() == 0 or out.shape[0] != n or any(t.shape[:1] != (n,) for t in call.inputs):
        raise Unsupported(f"{name} ({_describe(call)}) mixes the samples of a batch")
    rule = rule_for(call)
    if rule == ALIAS:
        slot[node] = ids[0]
        return
    slot[node] = st.add(name, rule, list(ids), out)


# Ops that may move the batch axis away from the front, or that act on a tensor whose batch axis
# is elsewhere, linearly and alike for every sample.
_AXIS_OPS = {"permute", "transpose", "movedim"}
_LINEAR_OPS = _AXIS_OPS | {"split", "select", "getitem", "identity", "cast", "narrow", "slice",
                           "flip"}  # fmt: skip
_MARK = 1_000_003  # a size no real axis has: marks the batch axis in a shape-only dry run


def _moved_step(name, call: Call, canon: list[Tensor], batch: list[int]):
    """The step of a call whose input or output has its batch axis elsewhere than first, as a
    step on batch-first values (NOTE [batch axis]); None when the call keeps it first.

    Returns:
        (rule, output with its batch axis first, where the call put the batch axis).
    """
    axis = _batch_axis_after(call, batch)
    if axis == 0 and not any(batch):
        return None
    fn = call.fn

    def first(*ins: Tensor) -> Tensor:  # the call on batch-first inputs, batch-first output
        moved = [t.movedim(0, b) if b else t for t, b in zip(ins, batch, strict=True)]
        return fn(*moved).movedim(axis, 0)

    shapes = [tuple(t.shape[1:]) for t in canon], tuple(call.out.movedim(axis, 0).shape[1:])
    if canonical(call) in _LINEAR_OPS:
        rule = Fold(*shapes, fn=first)
    elif call.out.shape == call.inputs[0].shape and len(canon) == 1:
        rule = General(*shapes, fn=first, primals=tuple(canon))
    else:
        raise Unsupported(
            f"{name} ({_describe(call)}) acts on a tensor whose batch axis is not first"
        )
    return rule, call.out.movedim(axis, 0), axis


def _batch_axis_after(call: Call, batch: list[int]) -> int:
    """Where the call puts the batch axis of its inputs (at ``batch``), found by running it on
    meta tensors whose batch axis has a size no other axis has."""
    metas = []
    for t, b in zip(call.inputs, batch, strict=True):
        shape = list(t.shape)
        shape[b] = _MARK
        metas.append(torch.empty(shape, dtype=t.dtype, device="meta"))
    try:
        out = call.fn(*metas)
    except Exception as err:  # noqa: BLE001 - the call depends on the batch size itself
        raise Unsupported(
            f"{_describe(call)} acts on a tensor whose batch axis is not first, with sizes "
            f"that name the batch ({type(err).__name__})"
        ) from err
    if not isinstance(out, Tensor) or list(out.shape).count(_MARK) != 1:
        raise Unsupported(f"{_describe(call)} mixes the samples of a batch")
    return list(out.shape).index(_MARK)


def _describe(call: Call) -> str:
    if call.kind == "call_module":
        return type(call.target).__name__
    if call.kind == "call_method":
        return f".{call.target}()"
    return getattr(call.target, "__name__", str(call.target))


def _pool_first(steps: list[Step], values: list[Tensor]) -> list[Step]:
    """Max pools moved below the non-decreasing elementwise step that feeds them.

    NOTE [pool first]: for s non-decreasing, maxpool(s(a)) = s(maxpool(a)) with the same
    selected positions, so s', s'' are only needed at the maxima: the elementwise work on
    tangents and adjoints shrinks by the pool's factor (4x for a 2 x 2 pool). Where s is flat on a
    window (ReLU below 0), the positions may differ but s' is zero at both.
    """
    readers = consumers(steps)
    producer = {step.out: i for i, step in enumerate(steps)}
    out = list(steps)
    for j, step in enumerate(steps):
        i = producer.get(step.inputs[0]) if isinstance(step.rule, Select) else None
        if i is None:
            continue
        act = steps[i].rule
        if not (isinstance(act, Elementwise) and act.non_decreasing()) or readers[steps[i].out] > 1:
            continue
        pool = step.rule

        def at_maxima(t: Tensor, pool: Select = pool) -> Tensor:  # (N, *s_in) -> (N, *s_out)
            return pool.jvp([t.unsqueeze(1)])[:, 0]

        values[steps[i].out] = at_maxima(values[steps[i].inputs[0]])  # now: the pooled a
        d1, d2 = at_maxima(act.d1), at_maxima(act.d2)
        shape = pool.shape_out
        select = Select([act.shapes_in[0]], shape, index=pool.index, sliding=pool.sliding)
        out[i] = Step(step.name, select, steps[i].inputs, steps[i].out)
        out[j] = Step(steps[i].name, Elementwise([shape], shape, name=act.name, d1=d1, d2=d2),
                      [steps[i].out], step.out)  # fmt: skip
    return out


def consumers(steps: list[Step]) -> Counter[int]:
    """How many of ``steps`` read each slot."""
    return Counter(v for step in steps for v in step.inputs)


def release(values: dict[int, Any], step: Step, left: Counter[int], keep: set[int]) -> None:
    """After ``step`` ran: drop the values of its inputs that no later step reads (``left``
    counts the readers still to run) and that are not in ``keep``."""
    for v in step.inputs:
        left[v] -= 1
        if left[v] == 0 and v not in keep:
            values.pop(v, None)


def _live(steps: list[Step], output: int) -> list[Step]:
    """The steps the output depends on."""
    needed = {output}
    kept = []
    for step in reversed(steps):
        if step.out in needed:
            kept.append(step)
            needed.update(step.inputs)
    return kept[::-1]
