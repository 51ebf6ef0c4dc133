"""Time every exact input-Hessian method on the same model, inputs, dtype and device.

All methods run in one process, interleaved (repeat r runs every method once before repeat r + 1),
and the table reports the median per-sample time and its ratio to ``vmap(torch.func.hessian)``.
The slow baselines (the double-backward loop and ``torch.autograd.functional.hessian``) run on a
few samples and are scaled per sample. Each method's result is checked against torch.func.

    python benchmarks/compare_methods.py                        # the full CPU table
    python benchmarks/compare_methods.py --cases mlp784 --outputs one --repeats 3
    python benchmarks/compare_methods.py --device cuda --samples 256 --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from allocator import keep_freed_memory  # benchmarks/allocator.py, beside this script
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

import pipeline
from pipeline.config.precision import tf32
from pipeline.hessian.methods import METHODS, resolve_method
from pipeline.hessian.support import analyze

CASES: dict[str, tuple[str, tuple[int, ...]]] = {
    "mlp64": ("mlp", (64,)),
    "mlp784": ("mlp", (784,)),
    "mlp3072": ("mlp", (3072,)),
    "cnn784": ("cnn", (1, 28, 28)),
    "cnn3072": ("cnn", (3, 32, 32)),
}


def make_model(kind: str, shape: tuple[int, ...]) -> nn.Sequential:
    """tanh MLP D->256->256->10, or conv16-conv32-fc64-fc10 (3x3, stride 2, padding 1), tanh."""
    if kind == "mlp":
        d = shape[0]
        return nn.Sequential(
            nn.Linear(d, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
        )
    c, h, w = shape
    side = ((h + 1) // 2 + 1) // 2 * (((w + 1) // 2 + 1) // 2)
    return nn.Sequential(
        nn.Conv2d(c, 16, 3, stride=2, padding=1), nn.Tanh(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
        nn.Linear(32 * side, 64), nn.Tanh(), nn.Linear(64, 10),
    )  # fmt: skip


def _scalar_fn(model: nn.Module, shape, outputs: list[int]):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(xf: Tensor) -> Tensor:
        return functional_call(model, params, (xf.view(shape).unsqueeze(0),))[0, outputs]

    return f


def gist_loop(model, x, outputs):
    """The popular gist: one ``autograd.grad`` call per Hessian row."""
    out = []
    for xn in x:
        xf = xn.reshape(-1).clone().requires_grad_(True)
        per_k = []
        for k in outputs:
            y = model(xf.view(xn.shape).unsqueeze(0))[0, k]
            (g,) = torch.autograd.grad(y, xf, create_graph=True)
            rows = [torch.autograd.grad(g[i], xf, retain_graph=True)[0] for i in range(len(g))]
            per_k.append(torch.stack(rows))
        out.append(torch.stack(per_k))
    return torch.stack(out)


def functional_hessian(model, x, outputs):
    """``torch.autograd.functional.hessian(vectorize=True)`` per sample and output."""
    f = _scalar_fn(model, x.shape[1:], outputs)
    return torch.stack([
        torch.stack([
            torch.autograd.functional.hessian(lambda v, k=k: f(v)[k], xn.reshape(-1),
                                              vectorize=True)
            for k in range(len(outputs))
        ])
        for xn in x
    ])  # fmt: skip


def func_hessian(model, x, outputs, chunk=None):
    """``vmap(torch.func.hessian(f))`` over samples."""
    f = _scalar_fn(model, x.shape[1:], outputs)
    return vmap(torch.func.hessian(f), chunk_size=chunk)(x.reshape(x.shape[0], -1))


def func_jacrev2(model, x, outputs, chunk=None):
    """``vmap(jacrev(jacrev(f)))`` over samples."""
    f = _scalar_fn(model, x.shape[1:], outputs)
    return vmap(jacrev(jacrev(f)), chunk_size=chunk)(x.reshape(x.shape[0], -1))


def jax_hessian(model, x, outputs):
    """JAX ``jit(vmap(jax.hessian(f)))`` at highest float32 matmul precision on the device of
    ``x`` (cpu or gpu); None without JAX (or without a JAX GPU backend for a cuda ``x``)."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave the GPU to torch too
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    try:
        device = jax.devices("gpu" if x.is_cuda else "cpu")[0]
    except RuntimeError:
        return None
    jax.config.update("jax_default_matmul_precision", "highest")

    def arr(t: Tensor):
        return jax.device_put(t.detach().cpu().numpy(), device)

    layers = []
    for m in model:
        if isinstance(m, nn.Linear):
            layers.append(("linear", arr(m.weight), arr(m.bias)))
        elif isinstance(m, nn.Conv2d):
            w, b = arr(m.weight), arr(m.bias)
            layers.append(("conv", w, b, m.stride, m.padding))
        elif isinstance(m, nn.Tanh):
            layers.append(("tanh",))
        elif isinstance(m, nn.Flatten):
            layers.append(("flatten",))
    shape = tuple(x.shape[1:])
    idx = jnp.asarray(outputs)

    def f(xf):
        h = xf.reshape((1, *shape))
        for layer in layers:
            if layer[0] == "linear":
                h = h @ layer[1].T + layer[2]
            elif layer[0] == "conv":
                _, w, b, stride, pad = layer
                h = (
                    jax.lax.conv_general_dilated(
                        h,
                        w,
                        stride,
                        [(p, p) for p in pad],
                        dimension_numbers=("NCHW", "OIHW", "NCHW"),
                    )
                    + b[None, :, None, None]
                )
            elif layer[0] == "tanh":
                h = jnp.tanh(h)
            else:
                h = h.reshape(h.shape[0], -1)
        return h[0, idx]

    fn = jax.jit(jax.vmap(jax.hessian(f)))
    xj = jax.device_put(jnp.asarray(x.reshape(x.shape[0], -1).cpu().numpy()), device)

    def run(_model, _x, _outputs):
        return fn(xj).block_until_ready()

    return run


def plain_chain(model: nn.Sequential, x: Tensor, outputs: list[int]) -> Tensor:
    """The reference algebra written plainly for a Linear/Tanh chain (one logit at a time, all
    rows, batched over samples, no planner): g and M = d^2 y / dh^2 carried down layer by layer,
    N = diag(s') M diag(s') + diag(s'' g), M <- W^T N W; H = M at the input (N, K, D, D)."""
    layers = [m for m in model if isinstance(m, (nn.Linear, nn.Tanh))]
    hs = [x.reshape(x.shape[0], -1)]
    for m in layers:
        hs.append(m(hs[-1]))
    out = []
    for k in outputs:
        g = layers[-1].weight[k].expand(x.shape[0], -1)  # dy/dh below the last Linear
        m_ = None
        for i in range(len(layers) - 2, -1, -1):
            layer = layers[i]
            if isinstance(layer, nn.Tanh):
                t = hs[i + 1]
                d1 = 1 - t * t
                c = -2 * t * d1 * g
                m_ = torch.diag_embed(c) if m_ is None else d1[:, :, None] * m_ * d1[:, None, :]
                if m_ is not None and i != len(layers) - 2:
                    m_ = m_ + torch.diag_embed(c)
                g = d1 * g
            else:
                w = layer.weight
                m_ = w.T @ m_ @ w
                g = g @ w
        out.append(m_)
    return torch.stack(out, 1)


def count_aten_ops(fn: Callable[[], object]) -> tuple[int, int]:
    """ATen operations that one call of ``fn`` dispatches: at the top level (not those an op
    calls), and those that compute (the innermost ones that are not views: a top-level
    ``matmul`` counts once in the first, its ``mm`` once in the second; a replayed call, whose
    graph holds ``matmul``'s pieces, is compared fairly by the second)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = sum(1 for e in events if not (e.cpu_parent and e.cpu_parent.name.startswith("aten::")))
    parents = {e.cpu_parent.id for e in events if e.cpu_parent is not None}
    compute = sum(1 for e in events if e.id not in parents and e.name[6:] not in _VIEWS)
    return top, compute


_VIEWS = {"view", "reshape", "_unsafe_view", "_reshape_alias", "unsqueeze", "squeeze", "expand",
          "t", "transpose", "permute", "as_strided", "select", "slice", "narrow", "detach",
          "alias", "numpy_T", "mT", "diagonal", "unflatten", "flatten", "split",
          "unbind", "empty", "empty_strided", "lift_fresh", "to", "_to_copy_noop"}  # fmt: skip


def ours(name: str, allow_tf32: bool = False):
    def run(model, x, outputs):
        with tf32(allow_tf32):
            return pipeline.hessian(model, x, outputs, method=name)

    return run


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_case(case: str, outputs: list[int], args) -> list[dict]:
    """Rows of the table for one model and output selection."""
    torch.manual_seed(0)
    kind, shape = CASES[case]
    dtype = getattr(torch, args.dtype)
    model = make_model(kind, shape).to(args.device, dtype).eval()
    x = torch.randn(args.samples, *shape, device=args.device, dtype=dtype)
    few = x[: args.few]
    methods: dict[str, tuple[Callable, Tensor]] = {
        "gist loop of autograd.grad": (gist_loop, x[: args.gist_samples]),
        "autograd.functional.hessian": (functional_hessian, few),
        "vmap(torch.func.hessian)": (lambda m, v, o: func_hessian(m, v, o, args.chunk), x),
        "vmap(jacrev(jacrev))": (lambda m, v, o: func_jacrev2(m, v, o, args.chunk), x),
    }
    if kind == "mlp":
        methods["plain batched chain (same algebra)"] = (plain_chain, x)
    jax_run = jax_hessian(model, x, outputs) if args.jax else None
    if jax_run is not None:
        methods["jax jit(vmap(hessian)) f32 highest"] = (jax_run, x)
    target = pipeline.make_target(outputs, model(x[:1]).detach())
    support = analyze(model, x, target)
    for name in ["auto", *METHODS]:
        if name == "auto" or METHODS[name].unsupported(support) is None:
            label = f"pipeline {name}" + (
                f" (= {resolve_method('auto', model, target, x).name})"
                if name == "auto" else ""
            )  # fmt: skip
            methods[label] = (ours(name), x)
    if args.tf32:  # the opt-in reduced precision, its error against the float32 reference below
        methods["pipeline auto, TF32 matmuls"] = (ours("auto", allow_tf32=True), x)
    skip = [s.lower() for s in args.skip]
    methods = {k: v for k, v in methods.items() if not any(s in k.lower() for s in skip)}

    reference = func_hessian(model, x, outputs, args.chunk).detach()
    errors = {}
    for name, (fn, inp) in methods.items():  # warm-up and accuracy check
        with torch.no_grad() if ("pipeline" in name or "plain" in name) else torch.enable_grad():
            out = fn(model, inp, outputs)
        if not isinstance(out, Tensor):  # a JAX array
            out = torch.tensor(np.asarray(out), device=args.device)
        ref = reference[: inp.shape[0]].reshape(out.shape).to(out.dtype)
        errors[name] = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, (fn, inp) in methods.items():
            _sync(args.device)
            t0 = time.perf_counter()
            fn(model, inp, outputs)
            _sync(args.device)
            times[name].append((time.perf_counter() - t0) / inp.shape[0])
    base = statistics.median(times["vmap(torch.func.hessian)"])
    with torch.no_grad():
        ops = {"pipeline auto": count_aten_ops(lambda: pipeline.hessian(model, x, outputs))}
        if kind == "mlp":
            ops["plain batched chain"] = count_aten_ops(lambda: plain_chain(model, x, outputs))
    print("aten operations per call (top level, computing): "
          + ", ".join(f"{k} {t}, {c}" for k, (t, c) in ops.items()))  # fmt: skip
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({
            "case": case, "outputs": len(outputs), "method": name,
            "samples": methods[name][1].shape[0], "ms_per_sample": 1e3 * med,
            "ratio_vs_torch_func": med / base, "rel_error_vs_torch_func": errors[name],
        })  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--outputs", default="both", choices=["one", "all", "both"])
    p.add_argument("--samples", type=int, default=16, help="samples for the batched methods")
    p.add_argument("--few", type=int, default=2, help="samples for autograd.functional")
    p.add_argument("--gist-samples", type=int, default=1, help="samples for the gist loop")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk", type=int, default=None, help="vmap chunk_size over samples")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--skip", nargs="*", default=[], help="skip methods whose name contains this")
    p.add_argument("--no-jax", dest="jax", action="store_false")
    p.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--tf32", action="store_true", help="add `auto` with TF32 matmuls (GPU)")
    p.add_argument(
        "--default-malloc", action="store_true", help="glibc returns freed memory (allocator.py)"
    )
    args = p.parse_args()
    malloc = "default allocator" if args.default_malloc else keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, "
          f"{args.dtype}, {platform.processor() or platform.machine()}, {malloc}")  # fmt: skip
    outs = {"one": [[2]], "all": [list(range(10))], "both": [[2], list(range(10))]}[args.outputs]
    all_rows = []
    for case in args.cases:
        for outputs in outs:
            rows = bench_case(case, outputs, args)
            all_rows += rows
            print(f"\n{case}, K={len(outputs)}, {args.samples} samples")
            print(f"| {'method':<44} | {'n':>3} | {'ms/sample':>10} | {'vs torch.func':>13} "
                  f"| {'rel. error':>10} |")  # fmt: skip
            print(f"|{'-' * 46}|{'-' * 5}|{'-' * 12}|{'-' * 15}|{'-' * 12}|")
            for r in rows:
                ratio, err = r["ratio_vs_torch_func"], r["rel_error_vs_torch_func"]
                print(f"| {r['method']:<44} | {r['samples']:>3} | {r['ms_per_sample']:>10.3f} "
                      f"| {ratio:>12.2f}x | {err:>10.1e} |")  # fmt: skip
    if args.json:
        meta = {"torch": torch.__version__, "device": args.device, "dtype": args.dtype,
                "threads": torch.get_num_threads(), "args": vars(args)}  # fmt: skip
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": all_rows}, fh, indent=1)


if __name__ == "__main__":
    main()
