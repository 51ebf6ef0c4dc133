"""Time every admissible plan (cut x bottom schedule) of a model on a device, against the one the
planner picks by counted multiply-adds: is the CPU-fitted cost model right on this device?

    python benchmarks/plans.py                          # tanh MLP D=784 and the zoo, CPU
    python benchmarks/plans.py --device cuda --samples 256 --models mlp784 mlp3072
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_methods import make_model  # noqa: E402

import pipeline  # noqa: E402
from pipeline.hessian.graph import capture, record  # noqa: E402
from pipeline.hessian.planner import all_plans, head_kind, make_plan  # noqa: E402
from pipeline.hessian.products import triangle_product  # noqa: E402
from pipeline.hessian.propagate import gradients, hessian_rows  # noqa: E402
from pipeline.hessian.rows import Rows  # noqa: E402
from tests.model_zoo import ZOO_BY_NAME  # noqa: E402

MODELS = {"mlp784": ("mlp", (784,)), "mlp3072": ("mlp", (3072,)), "cnn784": ("cnn", (1, 28, 28))}


def label(plan) -> tuple[int, str]:
    """(cut step, schedule); a local plan taking J_L from the patches is ``local+J``."""
    patch = plan.layout is not None and plan.layout.head is not None
    return plan.cut_step, plan.bottom + ("+J" if patch else "")


def build(name: str, device: str):
    if name in MODELS:
        kind, shape = MODELS[name]
        return make_model(kind, shape).to(device).eval(), shape, [2]
    entry = ZOO_BY_NAME[name]
    return entry.factory().to(device).eval(), entry.shape, [2]


def time_symmetric_product(device: str, repeats: int) -> None:
    """One product against the triangle (NOTE [symmetric product]) on this device."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    print(f"\nsymmetric product on {device}: ms a matrix, U (B, D, 256) W (256, D)")
    for d, b in ((784, 1), (784, 16), (784, 256), (3072, 1), (3072, 32)):
        w = torch.randn(256, d, device=device)
        m = torch.randn(b, 256, 256, device=device)
        u = w.T @ (m + m.mT)
        res = {}
        products = {"one product": torch.matmul, "triangle": triangle_product}
        for name, product in products.items():

            def fn(product=product, u=u, w=w):
                return product(u, w)

            fn()
            ts = []
            for _ in range(repeats):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                ts.append((time.perf_counter() - t0) / b * 1e3)
            res[name] = statistics.median(ts)
        print(f"  D={d:>5} B={b:>4}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mlp784", "lenet5", "tabular_mlp"])
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--symmetric", action="store_true", help="also time the symmetric product")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for name in args.models:
        torch.manual_seed(0)
        model, shape, outputs = build(name, args.device)
        x = torch.randn(args.samples, *shape, device=args.device)
        target = pipeline.make_target(outputs, model(x).detach())
        d = x[0].numel()
        rows = Rows(torch.arange(d, device=args.device), True)
        with torch.no_grad():
            tape = record(capture(model), x)
            picked = make_plan(tape, d, 1, head_kind(target.kind), samples=args.samples)
            g_top, head = target.derivatives(tape.values[tape.output])
            g = gradients(tape, g_top)
            plans = all_plans(tape, d, 1, head_kind(target.kind), samples=args.samples)
            times, counted = {}, {}
            for plan in plans:
                try:
                    hessian_rows(tape, plan, head, g, rows, 1)
                except torch.OutOfMemoryError:
                    continue
                ts = []
                for _ in range(args.repeats):
                    sync()
                    t0 = time.perf_counter()
                    hessian_rows(tape, plan, head, g, rows, 1)
                    sync()
                    ts.append((time.perf_counter() - t0) / args.samples * 1e3)
                times[label(plan)] = statistics.median(ts)
                counted[label(plan)] = plan.cost
        best = min(times, key=times.get)
        mine = label(picked)
        print(
            f"\n{name} ({args.device}, {args.samples} samples): planner picks cut at step "
            f"{mine[0]} ({mine[1]}): {times[mine]:.4f} ms/sample; fastest: step {best[0]} "
            f"({best[1]}): {times[best]:.4f} ms/sample ({times[mine] / times[best]:.2f}x)"
        )
        for key, ms in sorted(times.items()):
            print(
                f"  cut at step {key[0]:>2} {key[1]:<10} {ms:10.4f} ms/sample, counted "
                f"{counted[key] / 1e9:8.3f} G multiply-adds"
            )
    if args.symmetric:
        time_symmetric_product(args.device, args.repeats)


if __name__ == "__main__":
    main()
