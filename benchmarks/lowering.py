"""Replays of one call key from the graph as recorded and as lowered, timed interleaved.

NOTE [lowering] in ``pipeline/hessian/lowering.py``: before a trace is replayed, its chains of
views are folded and its operations are called through their Python bindings. For each library
model (``tests/library_models.py``), ``auto`` is called until its key is traced; both graphs of
that key are then replayed in one process, a block of calls of each in turn per repeat, and the
table gives their operations (and how many are still called through the boxed operator), the
median ms a call of each, the ratio, and whether they give the same bits.

    python benchmarks/lowering.py --cpu-time
    python benchmarks/lowering.py --models pinn pair_potential --samples 8 --cpu-time
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import fx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipeline  # noqa: E402
from benchmarks.allocator import keep_freed_memory  # noqa: E402
from benchmarks.zoo import SAMPLES  # noqa: E402
from pipeline.hessian import replay  # noqa: E402
from tests.library_models import LIBRARY, LIBRARY_BY_NAME, unavailable  # noqa: E402


def _graphs(model, x, outputs, labels) -> tuple[fx.GraphModule, fx.GraphModule, tuple]:
    """The recorded and the lowered graph of ``auto``'s key at x, and the replay's inputs."""
    seen: dict[str, object] = {}
    lowered = replay._lowered

    def keep(root, graph, inputs, out):
        copy = fx.Graph()  # the lowering works in place
        copy.output(copy.graph_copy(graph, {}))
        seen["recorded"], seen["inputs"] = fx.GraphModule(root, copy), inputs
        return lowered(root, graph, inputs, out)

    replay._lowered, cost = keep, replay.TRACE_COST
    replay.TRACE_COST = 0.0  # the second call is traced
    try:
        with torch.no_grad():
            for _ in range(3):
                pipeline.hessian(model, x, outputs, labels=labels)
    finally:
        replay._lowered, replay.TRACE_COST = lowered, cost
    if "recorded" not in seen:
        raise RuntimeError("the call was not traced")
    (entry,) = (e for e in replay._TRACES[model].values() if e.graph is not None)
    return seen["recorded"], entry.graph, seen["inputs"]


def _calls(graph: fx.Graph) -> tuple[int, int]:
    ops = [n for n in graph.nodes if n.op in ("call_function", "call_method")]
    boxed = sum(isinstance(n.target, torch._ops.OpOverload) for n in ops)
    return len(ops), boxed


def _block(fn, inputs, clock, seconds: float) -> float:
    """ms a call of ``fn(*inputs)``, over a block of calls in a row lasting ~``seconds``."""
    calls, start = 0, clock()
    while True:
        fn(*inputs)
        calls += 1
        spent = clock() - start
        if spent >= seconds:
            return spent / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    every = [m.name for m in LIBRARY if m.name != "tv_resnet18_loss"]  # its eager call: seconds
    parser.add_argument("--models", nargs="+", choices=sorted(LIBRARY_BY_NAME), default=every)
    parser.add_argument("--samples", type=int, help="samples a call (default: as zoo.py)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--block-s", type=float, default=0.05)
    parser.add_argument("--cpu-time", action="store_true", help="one thread, thread CPU time")
    args = parser.parse_args()
    if args.cpu_time:
        torch.set_num_threads(1)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    timing = "thread CPU time" if args.cpu_time else "wall time"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, {timing}, "
          f"{keep_freed_memory()}")  # fmt: skip
    print("\n| model | n | operations recorded / lowered (boxed) | recorded ms | lowered ms "
          "| lowered / recorded | same bits |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for name in args.models:
        entry = LIBRARY_BY_NAME[name]
        why = unavailable(entry.package)
        if why:
            print(f"| {name} | skipped: {why} |||||")
            continue
        model = entry.build()
        n = args.samples or SAMPLES[name]
        x = torch.randn(n, *entry.shape)
        with torch.no_grad():
            labels = torch.randint(model(x[:1]).shape[1], (n,))
        recorded, lowered, inputs = _graphs(model, x, entry.outputs, labels)
        times: dict[str, list[float]] = {"recorded": [], "lowered": []}
        with torch.no_grad():
            same = replay._same(recorded.forward(*inputs), lowered.forward(*inputs))
            for _ in range(args.repeats):
                for key, graph in (("recorded", recorded), ("lowered", lowered)):
                    times[key].append(_block(graph.forward, inputs, clock, args.block_s))
        a, b = (statistics.median(times[k]) for k in ("recorded", "lowered"))
        (ra, _), (lb, boxed) = _calls(recorded.graph), _calls(lowered.graph)
        print(f"| {name} | {n} | {ra} / {lb} ({boxed}) | {a:.4g} | {b:.4g} | {b / a:.2f}x "
              f"| {'yes' if same else 'NO'} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
