"""The exact Hessian diagonal of a tanh MLP at a large input size: time and peak memory.

A tanh MLP D -> 64 -> 64 -> 1 (float32 by default), N samples, one logit: ``diagonal`` with its
default budget (propagated on the graph, which ``auto`` also picks there), then entries checked
against Hessian-vector products e_i^T H e_i (torch.func ``jvp(grad)``) at sampled i. Peak RSS
from ``resource.getrusage`` (ru_maxrss of this process and of its children), read before the
checks, covers everything the process did until then, imports and the model included.

    python benchmarks/kinds.py                     # D = 65536, 2 samples
    python benchmarks/kinds.py --d 16384 --samples 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch
from torch import nn
from torch.func import grad, jvp


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=65536)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--checks", type=int, default=16, help="entries checked per sample")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from pipeline.hessian import diagonal, make_target
    from pipeline.hessian.diagonal import diagonal_plan
    from pipeline.hessian.methods import default_memory_budget

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    h = args.hidden
    model = nn.Sequential(nn.Linear(args.d, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(),
                          nn.Linear(h, 1)).to(dtype).eval()  # fmt: skip
    x = torch.randn(args.samples, args.d, dtype=dtype)
    with torch.no_grad():
        target = make_target([0], model(x))
    plan = diagonal_plan(model, x, target, default_memory_budget(x.device))
    route = "rows" if isinstance(plan, str) else f"propagated (cut {plan.cut}, {plan.curved})"
    t0 = time.perf_counter()
    diag, _ = diagonal(model, x, target, method="propagated" if route != "rows" else "auto")
    seconds = time.perf_counter() - t0
    rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for n in range(args.samples):

        def f(v):
            return model(v.unsqueeze(0))[0, 0]

        idx = torch.randint(args.d, (args.checks,), generator=gen)
        basis = torch.zeros(args.checks, args.d, dtype=dtype)
        basis[torch.arange(args.checks), idx] = 1
        hvps = [jvp(grad(f), (x[n],), (e,))[1] for e in basis]  # H e_i
        ref = torch.stack([hv[i].detach() for hv, i in zip(hvps, idx, strict=True)])
        scale = diag[n, 0].abs().max()
        worst = max(worst, float(((diag[n, 0, idx] - ref).abs() / scale).max()))
    result = {
        "d": args.d, "hidden": args.hidden, "samples": args.samples, "dtype": args.dtype,
        "threads": torch.get_num_threads(), "route": route, "seconds": round(seconds, 3),
        "peak_rss_self_mib": round(rss_self / 1024, 1),
        "peak_rss_children_mib": round(rss_children / 1024, 1),
        "max_error_vs_hvp_relative_to_max_entry": worst,
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    return 0 if worst <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
