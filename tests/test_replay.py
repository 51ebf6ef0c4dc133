"""Replayed calls (``pipeline/hessian/replay.py``): once the eager calls at a key have cost what
its trace is estimated to (here nothing: the second call), a graph method's calls run from a
trace, and every call, replayed or not, matches float64 references at its own inputs, labels,
rows and weights. A trace that reads values is refused; a model changed in place is traced
again; threads trace and replay while others run the same model; the trace waits for its
cost."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import Tensor, fx, nn

import pipeline
from pipeline.hessian import replay
from pipeline.hessian.rows import Rows
from pipeline.hessian.targets import make_target
from tests.library_models import PINN, PairPotential
from tests.model_zoo import ZOO_BY_NAME
from tests.zoo import (
    MODEL_BY_NAME,
    TARGET_BY_NAME,
    assert_close,
    make_labels,
    reference,
)

pytestmark = pytest.mark.usefixtures("float64_default", "trace_at_once")

CALLS = 3  # eager (operations counted), traced, replayed


@pytest.fixture
def trace_at_once(monkeypatch):
    """Traces cost nothing: the second call at a key is traced."""
    monkeypatch.setattr(replay, "TRACE_COST", 0.0)


# (model, target case, rows): each key is called CALLS times on new inputs (and new labels).
CASES = [
    ("digits_mlp", "index", None),
    ("digits_cnn", "indices", None),
    ("layernorm_gelu", "cross_entropy", None),
    ("residual", "predicted", None),
    ("elu_softplus", "mse_soft", slice(2, 9)),
    ("nonsquare_2x7x5", "index", [5, 0, 7, 7]),
    ("pinn", "all", None),
    ("pair_potential", "all", None),
    ("mnist_tanh_pool", "index", None),  # the max pool's transpose takes the shared seed
]  # fmt: skip

_POOLED = ZOO_BY_NAME["mnist_tanh"]
_EXTRA = {"pinn": (PINN, (2,)), "pair_potential": (PairPotential, (5, 3)),
          "mnist_tanh_pool": (_POOLED.small, _POOLED.small_shape)}  # fmt: skip


def _model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    if name in _EXTRA:
        factory, shape = _EXTRA[name]
        torch.manual_seed(0)
        return factory().double().eval(), shape
    case = MODEL_BY_NAME[name]
    model, x = case.build(torch.float64)
    return model, tuple(x.shape[1:])


def _rows_of(rows, d: int) -> Tensor:
    if rows is None:
        return torch.arange(d)
    if isinstance(rows, slice):
        return torch.arange(d)[rows]
    return torch.tensor(rows) % d


@pytest.mark.parametrize(("model_name", "target_name", "rows"), CASES,
                         ids=[f"{m}-{t}" for m, t, _ in CASES])  # fmt: skip
def test_every_call_matches_the_reference_and_later_ones_replay(model_name, target_name, rows):
    model, shape = _model(model_name)
    case = TARGET_BY_NAME[target_name]
    d = torch.Size(shape).numel()
    xs = []  # kept alive: the reference is cached by id(x)
    for call in range(CALLS):
        x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(10 + call))
        xs.append(x)
        with torch.no_grad():
            n_out = model(x).shape[1]
        labels = make_labels(case, len(x), n_out, seed=call)
        h, g = pipeline.hessian(model, x, case.outputs, rows=rows, labels=labels, loss=case.loss,
                                return_gradient=True)  # fmt: skip
        h_ref, g_ref = reference(model, x, case, labels)
        index = _rows_of(rows, d)
        assert_close(h, h_ref[:, :, index], rtol=1e-8, atol=1e-10)
        assert_close(g, g_ref, rtol=1e-8, atol=1e-10)
    assert replay.traces(model) == 1, "the calls after the first were not replayed"


def test_rows_and_labels_are_inputs_of_the_trace_not_constants():
    """Same key (row count, label shape), other values: the replay follows them."""
    model, shape = _model("digits_mlp")
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    case = TARGET_BY_NAME["cross_entropy"]
    for call, rows in enumerate([[1, 2, 3], [60, 7, 0], [5, 5, 63]]):
        labels = torch.tensor([call, 9 - call])
        h = pipeline.hessian(model, x, "loss", rows=rows, labels=labels)
        h_ref, _ = reference(model, x, case, labels)
        assert_close(h, h_ref[:, :, rows], rtol=1e-8, atol=1e-10)
    assert replay.traces(model) == 1


def test_calls_without_gradients_are_traced_without_them_and_calls_with_them_get_them():
    """``return_gradient=False`` is its own key, whose trace leaves the gradients out (fewer
    operations); a call that asks for them at the same shapes gets them, replayed too."""
    model, shape = _model("pinn")
    case = TARGET_BY_NAME["all"]
    xs = []  # kept alive: the reference is cached by id(x)
    for gradient in (False, True, False, True):
        for call in range(CALLS):
            x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(20 + call))
            xs.append(x)
            got = pipeline.hessian(model, x, case.outputs, return_gradient=gradient)
            h_ref, g_ref = reference(model, x, case, None)
            h, g = got if gradient else (got, None)
            assert_close(h, h_ref, rtol=1e-8, atol=1e-10)
            if gradient:
                assert_close(g, g_ref, rtol=1e-8, atol=1e-10)
    assert replay.traces(model) == 2, "one trace for each of return_gradient False and True"
    counts = {key[-1]: len(e.graph.graph.nodes) for key, e in replay._TRACES[model].items()
              if e.graph is not None}  # fmt: skip
    assert counts[False] < counts[True], f"operations without / with the gradients: {counts}"


def test_weights_changed_or_replaced_are_seen_and_a_new_structure_is_traced_again():
    model, shape = _model("residual")
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    case = TARGET_BY_NAME["index"]
    for _ in range(CALLS):
        pipeline.hessian(model, x, [1])
    assert replay.traces(model) == 1
    with torch.no_grad():
        model.inner[0].weight.mul_(1.7)  # in place: the trace holds references to the weights
    x2 = x.clone()  # a new object: the reference is cached by id(x)
    assert_close(pipeline.hessian(model, x2, [1]), reference(model, x2, case, None)[0],
                 rtol=1e-8, atol=1e-10)  # fmt: skip
    model.inner[0].weight = nn.Parameter(model.inner[0].weight * 0.5)  # a new object
    x4 = x.clone()
    assert_close(pipeline.hessian(model, x4, [1]), reference(model, x4, case, None)[0],
                 rtol=1e-8, atol=1e-10)  # fmt: skip
    model.inner[1] = nn.Tanh()  # a new structure: the caches and traces are dropped
    x3 = x.clone()
    h = pipeline.hessian(model, x3, [1])
    assert replay.traces(model) == 0
    assert_close(h, reference(model, x3, case, None)[0], rtol=1e-8, atol=1e-10)


# (function of one tensor, whether its trace may be replayed)
TRACES = [
    (lambda t: t * 2 + t.sum(), True),
    (lambda t: t.index_select(0, torch.tensor([1, 0])), True),
    (lambda t: t * t.sum().item(), False),  # a value read on the host
    (lambda t: t.nonzero(), False),  # a value-dependent shape
    (lambda t: t[t > 0], False),  # a boolean mask
    (lambda t: t.masked_select(t > 0), False),
    (lambda t: _caught(t), False),  # an operation raised and the error was caught
]  # fmt: skip


def _caught(t: Tensor) -> Tensor:
    try:
        return t.view(2, 2)
    except RuntimeError:
        return t * 3


@pytest.mark.parametrize(("fn", "replayable"), TRACES, ids=[str(i) for i in range(len(TRACES))])
def test_a_trace_that_depends_on_values_or_on_errors_is_refused(fn, replayable):
    graph = replay._trace(fn, (torch.tensor([1.0, -2.0, 3.0]),))
    if replayable:
        assert graph is not None, "a value-independent trace was refused"
    else:
        assert graph is None, "a trace that depends on values was kept"


def _recorded(fn, t: Tensor) -> fx.Graph:
    recorder = replay._Recorder((t,))
    with recorder:
        out = fn(t)
    recorder.output(out)
    return recorder.graph


def test_reads_values_names_the_operation():
    t = torch.tensor([1.0, 0.0])
    assert replay.reads_values(_recorded(lambda t: t.nonzero(), t)) == "nonzero"
    assert replay.reads_values(_recorded(lambda t: t.sum().item(), t)) == "_local_scalar_dense"
    assert "boolean mask" in (replay.reads_values(_recorded(lambda t: t[t > 0], t)) or "")


def test_the_graph_holds_weights_by_reference_and_no_activation():
    """A parameter is the model's own tensor in the graph; the activations of the traced call
    are not kept alive by the record."""
    layer = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    recorder = replay._Recorder((x,))
    with recorder, torch.no_grad():
        out = torch.tanh(layer(x)) * 2
    recorder.output(out)
    graph = recorder.module()
    held = {id(t) for t in graph.state_dict(keep_vars=True).values()}
    assert {id(layer.weight), id(layer.bias)} <= held, "the weights were copied"
    alive = {id(t) for t in recorder.nodes.keys()}  # the linear map's output and tanh's are gone
    assert alive == {id(x), id(layer.weight), id(layer.bias), id(out)}, f"{len(alive)} alive"
    assert_close(graph(x), torch.tanh(layer(x)) * 2, rtol=0, atol=0)


def test_a_compute_that_reads_values_runs_eagerly_on_every_call():
    """A branch on a value: its trace is refused, and each call takes its own branch."""

    def compute(model, x, target, rows, budget):
        scale = 2.0 if x.sum().item() > 0 else -1.0
        return x * scale, x

    run = replay.replayed(compute)
    model = nn.Linear(2, 1)
    target = make_target([0], torch.zeros(3, 1))
    rows = Rows(torch.arange(2), True)
    for sign in (1.0, -1.0, 1.0, -1.0):
        x = torch.full((3, 2), sign)
        h, _ = run(model, x, target, rows, 1 << 20)
        assert torch.equal(h, x * (2.0 if sign > 0 else -1.0)), f"wrong branch for sign {sign}"
    assert replay.traces(model) == 0 and replay.refused(model) == 1


def test_threads_trace_and_replay_while_others_run_the_model():
    """Two threads call the same model on their own inputs (a Dask worker's threads): one traces
    while the other runs eagerly, and every call matches its reference. The first call (the
    model's capture) is made before, as a Dask worker's warm-up does."""
    model, shape = _model("pinn")
    pipeline.hessian(model, torch.randn(4, *shape), [0])
    inputs = {i: [torch.randn(4, *shape) for _ in range(2 * CALLS)] for i in range(2)}
    results: dict[int, list[Tensor]] = {}

    def work(i: int):
        results[i] = [pipeline.hessian(model, x, [0]) for x in inputs[i]]

    threads = [threading.Thread(target=work, args=(i,)) for i in inputs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert replay.traces(model) == 1 and replay.refused(model) == 0
    for i, xs in inputs.items():
        assert len(results[i]) == len(xs), f"thread {i} failed"
        for c, (x, h) in enumerate(zip(xs, results[i], strict=True)):  # noqa: B007 - c: message
            ref = reference(model, x, TARGET_BY_NAME["index"], None)[0]
            assert h.shape == ref.shape, f"thread {i}, call {c}"
            assert_close(h, ref, rtol=1e-8, atol=1e-10)


def test_the_trace_waits_until_the_eager_calls_have_cost_as_much(monkeypatch):
    """The first call counts the operations; a trace estimated dear is not made after a few
    cheap calls, and is made once the calls have cost its estimate: the recording of its
    operations and one more call (the check of the lowered graph)."""
    model, shape = _model("pinn")
    x = torch.randn(4, *shape)
    monkeypatch.setattr(replay, "TRACE_COST", 1.0)  # a second an operation
    for _ in range(CALLS):
        pipeline.hessian(model, x, [0])
    entry = max(replay._TRACES[model].values(), key=lambda e: e.calls)  # not auto's probe
    assert entry.cost >= 10.0, f"{entry.cost} s: the call's operations were not counted"
    assert replay.traces(model) == 0 and entry.spent < entry.cost and entry.last > 0
    entry.spent = entry.cost  # the recording's estimate, but not the check's call: not yet
    pipeline.hessian(model, x, [0])
    assert replay.traces(model) == 0
    entry.spent = entry.cost + entry.last  # as if the eager calls had cost the estimate
    h = pipeline.hessian(model, x, [0])
    assert replay.traces(model) == 1
    assert_close(h, reference(model, x, TARGET_BY_NAME["all"], None)[0], rtol=1e-8, atol=1e-10)


# Library models (tests/library_models.py): hessQuik's networks, torchvision's and timm's ViT
# (attention moves the batch axis), a Mixer, a MobileNet (squeeze-excitation, hardswish), LCNet.
LIBRARY_CASES = ["hessquik_fc", "hessquik_icnn", "tv_vit", "timm_vit", "timm_mixer",
                 "tv_mobilenet_v3", "timm_lcnet"]  # fmt: skip


@pytest.mark.parametrize("name", LIBRARY_CASES)
def test_library_models_replay_and_match_float64_hessian_vector_products(name):
    """Each call (eager, traced, replayed) on new inputs: sampled rows against float64
    jvp(grad) rows."""
    from tests.library_models import LIBRARY_BY_NAME, unavailable
    from tests.test_library import _hvp_rows

    entry = LIBRARY_BY_NAME[name]
    why = unavailable(entry.package)
    if why:
        pytest.skip(why)
    model = entry.build()
    d = torch.Size(entry.shape).numel()
    rows = [0, d // 2, d - 1]
    for call in range(CALLS):
        x = torch.randn(2, *entry.shape, generator=torch.Generator().manual_seed(20 + call))
        h = pipeline.hessian(model, x, entry.outputs[:1], rows=rows)
        expected = _hvp_rows(model, x, entry.outputs[0], rows).detach()
        assert_close(h[:, 0], expected, rtol=1e-7, atol=1e-9 * float(expected.abs().max()))
    assert replay.traces(model) == 1, "the calls after the first were not replayed"


def test_dask_worker_threads_trace_and_replay():
    """A Dask worker runs tasks in its threads: their calls on the worker's model (scattered
    once, as the Dask backend holds one model a worker) are traced and replayed there."""
    from distributed import Client, LocalCluster

    model, shape = _model("pinn")
    pipeline.hessian(model, torch.randn(4, *shape), [0])  # the capture, as the worker's warm-up
    xs = [torch.randn(4, *shape) for _ in range(3 * CALLS)]
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
        ) as cluster,  # fmt: skip
        Client(cluster) as client,
    ):
        [held] = client.scatter([model])  # in-process: the worker holds this very object
        results = client.gather([client.submit(pipeline.hessian, held, x, [0], pure=False)
                                 for x in xs])  # fmt: skip
    assert replay.traces(model) == 1, "no trace in the worker's threads"
    for x, h in zip(xs, results, strict=True):
        assert_close(h, reference(model, x, TARGET_BY_NAME["index"], None)[0], rtol=1e-8,
                     atol=1e-10)  # fmt: skip


def test_a_capture_lets_other_threads_run_their_models():
    """While ``fx`` captures a model (the first call), it patches ``nn.Module.__call__`` for
    every thread: another thread's forward must still get tensors, not proxies."""
    import sys

    from pipeline.hessian.graph import capture

    interval = sys.getswitchinterval()
    busy = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    x = torch.randn(2, 3)
    stop, errors, calls = threading.Event(), [], []

    def run():
        while not stop.is_set():
            try:
                assert type(busy(x)) is Tensor
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(err)
                return
            calls.append(1)

    sys.setswitchinterval(1e-6)  # the threads take turns often, inside the captures
    thread = threading.Thread(target=run)
    thread.start()
    try:
        for _ in range(20):
            capture(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert not errors, f"the other thread's forward failed: {errors[0]!r}"
    assert calls, "the other thread never ran"


def test_the_traced_call_returns_its_own_result_and_the_next_one_replays(monkeypatch):
    """The trace's call is not replayed once more after the check of its lowered graph (that
    made ViT-Tiny's trace call cost 2.8 eager calls); the call after it replays."""
    model, shape = _model("pinn")
    replays = []
    lowered = replay._lowered

    def counted(*args):
        low = lowered(*args)
        if low is not None:
            forward = low.forward
            low.forward = lambda *a: (replays.append(1), forward(*a))[1]
        return low

    monkeypatch.setattr(replay, "_lowered", counted)
    xs = [torch.randn(4, *shape, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    done = []
    for x in xs:  # eager (operations counted), traced, replayed
        h = pipeline.hessian(model, x, [0])
        assert_close(h, reference(model, x, TARGET_BY_NAME["index"], None)[0], rtol=1e-8,
                     atol=1e-10)  # fmt: skip
        done.append((replay.traces(model), len(replays)))
    assert done == [(0, 0), (1, 0), (1, 1)], done
