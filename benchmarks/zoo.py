"""The model zoo (class-style models with their own ``forward``): ``auto`` against torch.func.

For each model of ``tests/model_zoo.py`` at its real size, and each library model of
``tests/library_models.py`` (torchvision, timm, hessQuik, a PINN, a pair potential; skipped
where the package is missing), in one process and interleaved (repeat r times a block of
calls in a row of every method before repeat r + 1; a block fills ``--block-s``, 50 ms, as a
loop over batches would): ``pipeline.hessian`` with ``auto`` (the
method it picks is printed), ``vmap(torch.func.hessian)`` and ``vmap(jacrev(jacrev))`` over
samples, and the generic ``forward_over_reverse`` for reference. The table gives the median time a
sample, and ``auto``'s ratio to the best torch.func variant (with the graph engine's schedule in
brackets: ``taylor`` is forward Taylor propagation); each result is checked against float64
Hessians (``vmap(torch.func.hessian)`` on a float64 copy of the model, the first 64 samples):
the table gives ``auto``'s largest error relative to the largest entry, and torch.func's.
The last column is the fixed cost of a call: the median time of one call on one sample, ``auto``
against the best torch.func variant (caches warm). ``auto`` is timed once its calls run from a
trace (NOTE [replay] in ``pipeline/hessian/replay.py``: after as many eager calls as the trace
costs; the last column says how many that took), ``auto, no replay`` with every call eager.
``plain chain`` is the same algebra written by
hand for one model (the PINN: forward Jacobians and one contraction a layer, no graph engine),
the floor an eager implementation reaches.

Freed memory stays in the process (``allocator.py``: glibc's mmap and trim thresholds raised,
for every method alike); ``--default-malloc`` keeps glibc's defaults, under which the large
models' buffers are page-faulted in again on every call and times vary by a third or more.

    python benchmarks/zoo.py                     # every model, CPU
    python benchmarks/zoo.py --models lenet5 tabular_mlp --repeats 5
    python benchmarks/zoo.py --library           # the library models only
    python benchmarks/zoo.py --device cuda --json zoo.json
    python benchmarks/zoo.py --cpu-time          # one thread, CPU time of the calling thread

On a shared machine wall-clock times vary with the load; ``--cpu-time`` runs torch on one thread
(``torch.set_num_threads(1)``) and measures ``time.thread_time``, which other processes do not
inflate.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipeline  # noqa: E402
from benchmarks.allocator import keep_freed_memory  # noqa: E402
from pipeline.hessian import replay, structured  # noqa: E402
from pipeline.hessian.graph import capture  # noqa: E402
from pipeline.hessian.methods import GRAPH_ORDER as GRAPH  # noqa: E402
from pipeline.hessian.methods import resolve_method  # noqa: E402
from pipeline.hessian.planner import REVERSE, SCHEDULES  # noqa: E402
from tests.library_models import LIBRARY, LIBRARY_BY_NAME, unavailable  # noqa: E402
from tests.model_zoo import ZOO, ZOO_BY_NAME  # noqa: E402
from tests.zoo import HardAsClamp  # noqa: E402

# Samples per timed call, by model: on the CPU few (the MNIST nets take seconds a sample); on a
# GPU enough that a call is not bound by its launches (a call's Python and kernel launches cost
# milliseconds: with 16 samples that was up to half of the transformer's time on an H200).
SAMPLES = {"mnist_relu": 4, "mnist_tanh": 1, "lenet5": 4, "tabular_mlp": 16,
           "resnet_relu_loss": 4, "resnet_gelu": 2, "transformer": 8}  # fmt: skip
SAMPLES_GPU = {"mnist_relu": 64, "mnist_tanh": 32, "lenet5": 128, "tabular_mlp": 256,
               "resnet_relu_loss": 64, "resnet_gelu": 64, "transformer": 256}  # fmt: skip
# Library models: D = 768 (3 x 16 x 16) or 3072 (ConvNeXt), tiny inputs for the others.
SAMPLES |= {e.name: 4 for e in LIBRARY} | {
    "timm_convnext": 1,
    "tv_resnet18_loss": 1,  # jacrev(jacrev) needs > 20 GiB with 4 samples
    "pinn": 4096,
    "pair_potential": 64,
    "hessquik_fc": 256,
    "hessquik_resnet": 256,
    "hessquik_icnn": 256,
}
SAMPLES_GPU |= {e.name: 64 for e in LIBRARY} | {
    "timm_convnext": 16,
    "pinn": 65536,
    "pair_potential": 4096,
    "hessquik_fc": 4096,
    "hessquik_resnet": 4096,
    "hessquik_icnn": 4096,
}


def scalar_fn(model: nn.Module, shape, outputs, label: Tensor | None):
    """One sample's selected outputs (K,) as a function of its flat input (D,)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def f(xf: Tensor, y: Tensor) -> Tensor:
        z = functional_call(model, (params, buffers), (xf.view(shape).unsqueeze(0),))[0]
        if outputs == "loss":
            return F.cross_entropy(z[None], y[None])[None]
        return z[outputs]

    return f


def torch_func(transform):
    """``vmap(transform(f))`` over samples, with attention on its math kernel (the fused ones
    have no forward-mode AD), and hardsigmoid/hardswish as clamps where torch cannot
    differentiate its own kernels twice: what a user of torch.func has to do for these models."""

    def run(model, x, outputs, labels):
        f = scalar_fn(model, x.shape[1:], outputs, labels)
        xf = x.reshape(x.shape[0], -1)
        with sdpa_kernel([SDPBackend.MATH]):
            try:
                return vmap(transform(f))(xf, labels)
            except RuntimeError as err:
                if "hardsigmoid_backward" not in str(err) and "hardswish_backward" not in str(err):
                    raise
            with HardAsClamp():
                return vmap(transform(f))(xf, labels)

    return run


REFERENCE_SAMPLES = 64  # the float64 reference is computed on at most this many samples


def float64_reference(model: nn.Module, x: Tensor, outputs, labels: Tensor) -> Tensor:
    """The Hessians in float64 (a copy of the model, ``vmap(torch.func.hessian)``), on the CPU:
    what every method's float32 result is checked against."""
    model64 = copy.deepcopy(model).to("cpu", torch.float64)
    return torch_func(torch.func.hessian)(model64, x.cpu().double(), outputs, labels.cpu())


def ours(method: str, replays: bool = True):
    def run(model, x, outputs, labels):
        replay.ENABLED = replays
        try:
            with torch.no_grad():
                return pipeline.hessian(model, x, outputs, method=method, labels=labels)
        finally:
            replay.ENABLED = True

    return run


def until_replayed(model, x, outputs, labels, limit_s: float = 120.0) -> str:
    """Calls ``auto`` until its calls at this key run from a trace (NOTE [replay]: after the
    eager calls have cost what the trace will); says after how many calls and seconds."""
    before, no, start, calls = replay.traces(model), replay.refused(model), time.perf_counter(), 0
    while (replay.traces(model) == before and replay.refused(model) == no
           and time.perf_counter() - start < limit_s):  # fmt: skip
        ours("auto")(model, x, outputs, labels)
        calls += 1
    done = "replayed" if replay.traces(model) > before else "not replayed"
    done = "trace refused" if replay.refused(model) > no else done
    return f"{done} after {calls} calls, {time.perf_counter() - start:.2f} s"


@torch.no_grad()
def plain_pinn(model: nn.Module, x: Tensor, outputs, labels) -> Tensor:
    """The PINN's Hessians (N, 1, D, D) written plainly: the outer schedule's algebra with no
    graph, planner or rules, the floor of an eager implementation. Forward Jacobians J_l = dz_l/dx
    direction-major (D, N, F), the adjoint g_l of each tanh's output, and
    H = sum_l J_l^T diag(s''(z_l) g_l) J_l, D^2 products and sums a layer."""
    lin = [m for m in model.net if isinstance(m, nn.Linear)]
    n = x.shape[0]
    z = lin[0](torch.cat([x[:, 0:1], x[:, 1:2]], dim=1))
    jac = lin[0].weight.T.unsqueeze(1)  # (D, 1, F): the same for every sample
    saved = []
    for i, layer in enumerate(lin[1:], 1):
        t = torch.tanh(z)
        d1 = 1 - t * t
        saved.append((t, d1, jac))
        z = layer(t)
        if i < len(lin) - 1:
            jac = ((d1 * jac).reshape(-1, t.shape[1]) @ layer.weight.T).reshape(-1, n, z.shape[1])
    g = lin[-1].weight[outputs[0]].expand(n, -1)  # dy/dt of the last tanh
    h = None
    for i in reversed(range(len(saved))):
        t, d1, jac = saved[i]
        gz = d1 * g
        q = (-2 * t * gz) * jac  # diag(s'' g) J, (D, N, F)
        d = q.shape[0]  # (D, D, N); one product a pair (a four-axis broadcast ran 1.7x slower)
        part = torch.stack([(q[a] * jac[b]).sum(-1) for a in range(d) for b in range(d)])
        part = part.reshape(d, d, n)
        h = part if h is None else h + part
        g = gz @ lin[i].weight
    return h.permute(2, 0, 1).unsqueeze(1)


# Hand-written chains of the same algebra, timed beside ``auto`` where one exists.
PLAIN = {"pinn": plain_pinn}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(name: str, args) -> dict:
    torch.manual_seed(0)
    if name in LIBRARY_BY_NAME:
        entry = LIBRARY_BY_NAME[name]
        model = entry.build().to(args.device)
    else:
        entry = ZOO_BY_NAME[name]
        model = entry.factory().to(args.device).eval()
    n = args.samples or (SAMPLES_GPU if args.device.startswith("cuda") else SAMPLES)[name]
    x = torch.randn(n, *entry.shape, device=args.device)
    with torch.no_grad():
        classes = model(x[:1]).shape[1]
    labels = torch.randint(classes, (n,), device=args.device)
    methods = {
        "auto": ours("auto"),
        "auto, no replay": ours("auto", replays=False),
        "vmap(torch.func.hessian)": torch_func(torch.func.hessian),
        "vmap(jacrev(jacrev))": torch_func(lambda f: jacrev(jacrev(f))),
        "forward_over_reverse": ours("forward_over_reverse"),
    }
    if name in PLAIN:
        methods["plain chain"] = PLAIN[name]
    target = pipeline.make_target(entry.outputs, model(x).detach(), labels)
    picked = resolve_method("auto", model, target, x).name
    schedule = schedule_of(model, x, target, picked)
    results = {}
    for k, fn in list(methods.items()):  # warm-up; a method that runs out of memory is dropped
        try:
            results[k] = fn(model, x, entry.outputs, labels)
        except torch.OutOfMemoryError:
            print(f"{name}: {k} runs out of memory with {n} samples", flush=True)
            del methods[k]
            torch.cuda.empty_cache()
        except RuntimeError as err:  # a baseline torch cannot run here (32-bit index limits)
            if k == "auto":
                raise
            first = (str(err).strip().splitlines() or [""])[0][:120]
            print(f"{name}: {k} fails with {n} samples ({first})", flush=True)
            del methods[k]
    m = min(n, REFERENCE_SAMPLES)
    ref = float64_reference(model, x[:m], entry.outputs, labels[:m]).reshape(m, -1)
    errors = {
        k: float(
            (v[:m].reshape(m, -1).double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300)
        )
        for k, v in results.items()
    }
    del results
    warm = until_replayed(model, x, entry.outputs, labels) if picked in GRAPH else "eager"
    clock = time.thread_time if args.cpu_time else time.perf_counter
    block = {k: _block(fn, model, x, entry.outputs, labels, args, clock)
             for k, fn in methods.items()}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(args.repeats):
        for k, fn in methods.items():
            _sync(args.device)
            t0 = clock()
            for _ in range(block[k]):
                fn(model, x, entry.outputs, labels)
            _sync(args.device)
            times[k].append((clock() - t0) / (block[k] * n))
    med = {k: statistics.median(v) for k, v in times.items()}
    if picked in GRAPH:
        until_replayed(model, x[:1], entry.outputs, labels[:1])
    one = one_sample_call(model, x[:1], entry.outputs, labels[:1], methods, args, clock)
    nan = float("nan")
    for k in ("vmap(torch.func.hessian)", "vmap(jacrev(jacrev))", "forward_over_reverse",
              "plain chain", "auto, no replay"):  # fmt: skip
        med.setdefault(k, nan)
    best = min(med["vmap(torch.func.hessian)"], med["vmap(jacrev(jacrev))"])
    ms = {k: 1e3 * v for k, v in med.items()}
    return {"model": name, "samples": n, "auto_method": picked, "ms": ms,
            "auto_vs_best_torch_func": med["auto"] / best, "errors": errors,
            "one_sample_call_ms": one, "schedule": schedule, "warm_up": warm}  # fmt: skip


def _block(fn, model, x, outputs, labels, args, clock) -> int:
    """Calls a timed block makes: as many as fill ``args.block_s`` (at least one, at most 20).
    A block of calls in a row is what a loop over batches runs; single calls interleaved with the
    other methods' ran cold (hessQuik's network: 1.36 ms a call against 0.72 in a row)."""
    if args.block_s <= 0:
        return 1
    _sync(args.device)
    t0 = clock()
    fn(model, x, outputs, labels)
    _sync(args.device)
    return max(1, min(20, int(args.block_s / max(clock() - t0, 1e-9))))


def schedule_of(model: nn.Module, x: Tensor, target, picked: str) -> str | None:
    """The bottom schedule of the graph method's plan for this call (``taylor``: forward Taylor
    propagation), or None for the generic methods."""
    if picked not in ("structured", "piecewise"):
        return None
    schedules = (REVERSE,) if picked == "piecewise" else SCHEDULES
    with torch.no_grad():
        plan, _ = structured._plan(capture(model), x, target, x[0].numel(), schedules)
    return plan.bottom


def plan_note(r: dict) -> str:
    return f" ({r['schedule']})" if r.get("schedule") else ""


def one_sample_call(model, x1, outputs, labels, methods, args, clock) -> dict[str, float]:
    """The median time of one call on one sample (ms): the fixed cost a call pays whatever its
    size (capture, planning and support analysis are cached after the first call)."""
    names = [k for k in ("auto", "vmap(torch.func.hessian)", "vmap(jacrev(jacrev))")
             if k in methods]  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in names}
    for k in names:
        methods[k](model, x1, outputs, labels)  # warm-up: the caches for this shape
    for _ in range(max(5, args.repeats)):
        for k in names:
            _sync(args.device)
            t0 = clock()
            methods[k](model, x1, outputs, labels)
            _sync(args.device)
            times[k].append(clock() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [z.name for z in ZOO] + [e.name for e in LIBRARY]
    p.add_argument("--models", nargs="+", default=None, choices=names)
    p.add_argument("--library", action="store_true", help="the library models only")
    p.add_argument("--samples", type=int, default=None, help="samples per call (default: by model)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--block-s", type=float, default=0.05,
                   help="seconds of calls in a row a timed block holds (0: one call)")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--cpu-time", action="store_true", help="one thread, and thread CPU time (CPU only)"
    )
    p.add_argument(
        "--default-malloc", action="store_true", help="glibc returns freed memory (allocator.py)"
    )
    args = p.parse_args()
    malloc = "default allocator" if args.default_malloc else keep_freed_memory()
    if args.cpu_time:
        if args.device != "cpu":
            p.error("--cpu-time measures the CPU: --device cpu")
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    clock = "thread CPU time" if args.cpu_time else "wall clock"
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, float32, "
          f"{platform.processor() or platform.machine()}, {clock}, {malloc}")  # fmt: skip
    head = ["auto", "auto, no replay", "vmap(torch.func.hessian)", "vmap(jacrev(jacrev))",
            "forward_over_reverse", "plain chain"]  # fmt: skip
    print(
        f"\n| model | n | auto picks | {' | '.join(h + ' ms' for h in head)} | auto / best "
        "torch.func | max rel. error vs float64: auto / torch.func | one call, 1 sample: "
        "auto / best torch.func ms | auto's "
        "warm-up |"
    )
    print("|" + "---|" * (len(head) + 7))
    rows = []
    models = args.models or ([e.name for e in LIBRARY] if args.library else names)
    for name in models:
        entry = LIBRARY_BY_NAME.get(name)
        why = unavailable(entry.package) if entry and entry.package != "torch" else None
        if why:
            print(f"| {name} | skipped: {why} |", flush=True)
            continue
        r = bench(name, args)
        rows.append(r)
        ms = " | ".join(f"{r['ms'][h]:.4g}" if r["ms"][h] == r["ms"][h] else "-" for h in head)
        one = r["one_sample_call_ms"]
        best_one = min(v for k, v in one.items() if k != "auto")
        print(f"| {name} | {r['samples']} | {r['auto_method']}{plan_note(r)} | {ms} | "
              f"{r['auto_vs_best_torch_func']:.2f}x | {_errors(r['errors'])} | "
              f"{one['auto']:.3f} / {best_one:.3f} | {r['warm_up']} |", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"torch": torch.__version__, "device": args.device, "rows": rows}, fh,
                      indent=1)  # fmt: skip


def _errors(errors: dict[str, float]) -> str:
    funcs = [v for k, v in errors.items() if k.startswith("vmap")]
    return f"{errors['auto']:.1e} / {min(funcs):.1e}" if funcs else f"{errors['auto']:.1e} / -"


if __name__ == "__main__":
    main()
