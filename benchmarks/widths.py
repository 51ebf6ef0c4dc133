"""The standard table: library architectures at the widths people use, cold and warm.

Every case is the full Hessian of one logit (or of the network's scalar output) of float32
inputs with random weights (``tests/library_models.randomized``: heads and LayerScales that
libraries initialise to zero would make the Hessian vanish), on the models as their libraries
build them:

========================  ====================================================================
``vit_tiny_d2``/``_d12``  timm ViT-Tiny (width 192, 3 heads, patch 8) of depth 2 and 12, 3x32x32
``tv_vit_tiny``           torchvision's ViT (``nn.MultiheadAttention``) at the sizes of ``_d2``
``swin``                  timm Swin (patch 4, window 4, width 96, depths 2-2, 3-6 heads), 3x32x32
``mixer``                 timm MLP-Mixer (patch 8, width 128, 4 blocks), 3x32x32
``efficientnet_b0``       torchvision EfficientNet-B0, 3x32x32
``convnext_atto``         timm ConvNeXt-atto, 3x32x32
``mobilenet_v3``          torchvision MobileNetV3-Small, 3x32x32
``regnet_y_400mf``        torchvision RegNet-Y-400MF, 3x32x32
``pinn``                  tanh 2-50-50-50-1 on 4096 points
``tanh256``/``sine256``   coordinate networks 2-256-256-256-1, tanh and sine (SIREN), 4096 points
========================  ====================================================================

(The interatomic potentials have their own table: ``potentials.py``.)

Methods: ``pipeline.hessian`` with ``auto`` (the method it picks is printed), our generic
``forward_over_reverse`` and ``reverse_over_reverse``, ``vmap(torch.func.hessian)`` and
``vmap(jacrev(jacrev))`` over samples (attention on the math kernel, which has forward-mode AD;
hardsigmoid and hardswish as clamps, which torch differentiates twice: what a torch.func user
has to write for MobileNetV3). Where a generic method's full Hessian would take minutes (the
3x32x32 cases, D = 3072), it computes ``--generic-rows`` rows (256) and its time is scaled by
D / rows, as the same rows of the full Hessian cost the same (a ``vmap`` over the rows' basis
vectors is what ``jacfwd`` and ``jacrev`` run).

Each method of each case runs in a fresh process: ``cold`` is its first call there (with capture,
planning and tracing for ours, and torch's own first-call costs for every method), then
``--warmups`` calls, then ``--repeats`` timed calls, whose median, minimum and maximum the table
gives (the spread: a call that pays for a trace or a re-plan stands out). The ratios are ``auto``
against the best torch.func variant, warm (medians) and cold.

Exactness: ``auto``'s float32 Hessian is compared on ``--check-rows`` rows with float64
``jvp(grad)`` rows of a float64 copy of the model (its error relative to the largest entry,
beside the same error of float32 ``torch.func.hessian`` rows: what float32 allows for that
model), and ``auto`` in float64 on those rows must match them to 1e-9 (``float64 err``).

    python benchmarks/widths.py                              # the table (~20 min on 2 CPU cores)
    python benchmarks/widths.py --cases vit_tiny_d2 mixer pinn --repeats 3
    python benchmarks/widths.py --cases swin --methods auto forward_over_reverse
    python benchmarks/widths.py --cases vit_tiny_d2 --methods auto "auto, whole graph"  # pruning
    python benchmarks/widths.py --json widths.json
    python benchmarks/widths.py --device cuda             # on a GPU (gpu_check.sh widths)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Siren(nn.Module):
    """A sine-activation coordinate network (SIREN): sin(w0 (W x + b)) layers, a linear head."""

    def __init__(self, width: int = 256, depth: int = 3, w0: float = 30.0):
        super().__init__()
        dims = [2] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:], strict=False))
        self.head = nn.Linear(width, 1)
        self.w0 = w0
        with torch.no_grad():  # SIREN's initialisation: first layer U(-1/2, 1/2), then sqrt(6/n)/w0
            for i, layer in enumerate(self.layers):
                bound = 1 / 2 if i == 0 else math.sqrt(6 / layer.in_features) / w0
                layer.weight.uniform_(-bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.sin(self.w0 * layer(x))
        return self.head(x)


def _timm(name: str) -> nn.Module:
    from pipeline.inputs.libraries import import_torchvision

    import_torchvision()  # (timm imports torchvision, whose wheel's ops do not load here)
    from timm.models import convnext, mlp_mixer, swin_transformer, vision_transformer

    if name.startswith("vit_tiny"):
        return vision_transformer.VisionTransformer(
            img_size=32, patch_size=8, embed_dim=192, depth=int(name.split("_d")[1]),
            num_heads=3, num_classes=10)  # fmt: skip
    if name == "swin":
        return swin_transformer.SwinTransformer(
            img_size=32, patch_size=4, window_size=4, embed_dim=96, depths=(2, 2),
            num_heads=(3, 6), num_classes=10)  # fmt: skip
    if name == "mixer":
        return mlp_mixer.MlpMixer(img_size=32, patch_size=8, embed_dim=128, num_blocks=4,
                                  num_classes=10)  # fmt: skip
    if name == "convnext_atto":
        return convnext.convnext_atto(num_classes=10)
    raise ValueError(name)


def _torchvision(name: str) -> nn.Module:
    from pipeline.inputs.libraries import import_torchvision

    models = import_torchvision().models
    if name == "vit_tiny":  # torchvision's ViT (nn.MultiheadAttention) at ViT-Tiny's sizes
        return models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=3,
                                        hidden_dim=192, mlp_dim=768, num_classes=10)  # fmt: skip
    return getattr(models, name)(num_classes=10)


def _coordinates(name: str) -> nn.Module:
    from tests.library_models import PINN

    if name == "pinn":
        return PINN(width=50, depth=3)
    if name == "tanh256":
        return PINN(width=256, depth=3)
    return Siren(width=256, depth=3)


@dataclass(frozen=True)
class Case:
    factory: object
    shape: tuple[int, ...]
    samples: int = 1
    output: int = 0


IMAGE = (3, 32, 32)
CASES: dict[str, Case] = {
    "vit_tiny_d2": Case(lambda: _timm("vit_tiny_d2"), IMAGE, output=2),
    "vit_tiny_d12": Case(lambda: _timm("vit_tiny_d12"), IMAGE, output=2),
    "tv_vit_tiny": Case(lambda: _torchvision("vit_tiny"), IMAGE, output=2),
    "swin": Case(lambda: _timm("swin"), IMAGE, output=2),
    "mixer": Case(lambda: _timm("mixer"), IMAGE, output=2),
    "efficientnet_b0": Case(lambda: _torchvision("efficientnet_b0"), IMAGE, output=2),
    "convnext_atto": Case(lambda: _timm("convnext_atto"), IMAGE, output=2),
    "mobilenet_v3": Case(lambda: _torchvision("mobilenet_v3_small"), IMAGE, output=2),
    "regnet_y_400mf": Case(lambda: _torchvision("regnet_y_400mf"), IMAGE, output=2),
    "pinn": Case(lambda: _coordinates("pinn"), (2,), samples=4096),
    "tanh256": Case(lambda: _coordinates("tanh256"), (2,), samples=4096),
    "sine256": Case(lambda: _coordinates("sine256"), (2,), samples=4096),
}
METHODS = ("auto", "forward_over_reverse", "reverse_over_reverse", "vmap(torch.func.hessian)",
           "vmap(jacrev(jacrev))")  # fmt: skip
TORCH_FUNC = METHODS[3:]
WHOLE = "auto, whole graph"  # auto without pruning (NOTE [pruning]): only when named
OURS = ("auto", WHOLE)


def build(name: str, device: str = "cpu") -> tuple[nn.Module, Tensor]:
    """The case's model (random weights, BatchNorm statistics of a random batch, eval mode) and
    its inputs, on ``device``."""
    from tests.library_models import LibraryModel

    case = CASES[name]
    model = LibraryModel(name, "torch", case.factory, case.shape, [case.output]).build(seed=0)
    torch.manual_seed(1)
    return model.to(device), torch.randn(case.samples, *case.shape).to(device)


def generic_rows(method: str, model: nn.Module, x: Tensor, output: int, rows: Tensor) -> Tensor:
    """Rows (N, 1, R, D) of one output's Hessian by a torch.func method: ``jacfwd(jacrev)``'s
    (``torch.func.hessian``) or ``jacrev(jacrev)``'s algebra, vmapped over the rows' basis
    vectors and the samples, attention on its math kernel."""
    from torch.func import functional_call, grad, jvp, vjp, vmap
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    shape = x.shape[1:]

    def f(xf: Tensor) -> Tensor:
        return functional_call(model, (params, buffers), (xf.view(shape).unsqueeze(0),))[0, output]

    basis = torch.eye(shape.numel(), dtype=x.dtype, device=x.device)[rows.to(x.device)]
    g = grad(f)
    if method == "vmap(torch.func.hessian)":

        def one(xf, e):  # noqa: E306
            return vmap(lambda v: jvp(g, (xf,), (v,))[1])(e)
    else:

        def one(xf, e):  # noqa: E306
            _, back = vjp(g, xf)
            return vmap(lambda v: back(v)[0])(e)

    # (the basis batched over the samples too, as jacrev's own cotangents would be: an
    # unbatched one makes LayerNorm's double backward add in place into a smaller tensor;
    # hardsigmoid and hardswish as clamps: torch cannot differentiate its kernels twice)
    from tests.zoo import HardAsClamp

    with sdpa_kernel([SDPBackend.MATH]), HardAsClamp():
        return vmap(one)(x.reshape(len(x), -1), basis.expand(len(x), *basis.shape)).unsqueeze(1)


def hessian_by(method: str, model: nn.Module, x: Tensor, output: int, rows) -> Tensor:
    """One timed call: ours (``auto`` or ``forward_over_reverse``), or a torch.func variant."""
    import pipeline

    d = x[0].numel()
    if method in TORCH_FUNC:
        index = torch.arange(d) if rows is None else torch.arange(rows)
        return generic_rows(method, model, x, output, index)
    with torch.no_grad():
        return pipeline.hessian(model, x, [output], rows=None if rows is None else slice(0, rows),
                                method="auto" if method == WHOLE else method)  # fmt: skip


def measure(name: str, method: str, args) -> dict:
    """Cold, warm-up and timed calls of one method on one case, in this (fresh) process."""
    from benchmarks.allocator import keep_freed_memory

    keep_freed_memory()
    if method == WHOLE:  # (this process runs this method alone)
        from pipeline.hessian import pruning

        pruning.MIN_SAVED = math.inf
    model, x = build(name, args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    d = x[0].numel()
    rows = args.generic_rows if (method not in OURS and d > args.generic_rows) else None
    scale = d / rows if rows else 1.0
    t0 = time.perf_counter()
    h = hessian_by(method, model, x, CASES[name].output, rows)
    sync()
    cold = (time.perf_counter() - t0) * scale
    for _ in range(args.warmups):
        hessian_by(method, model, x, CASES[name].output, rows)
    times = []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        hessian_by(method, model, x, CASES[name].output, rows)
        sync()
        times.append((time.perf_counter() - t0) * scale)
    out = {"case": name, "method": method, "cold_s": cold, "times_s": times,
           "rows": rows or d, "D": d, "samples": len(x)}  # fmt: skip
    if method == "auto":
        out |= check(model, x, CASES[name].output, h, args.check_rows)
    return out


def check(model: nn.Module, x: Tensor, output: int, h: Tensor, n_rows: int) -> dict:
    """``auto``'s float32 rows and its float64 rows against float64 ``jvp(grad)`` rows, on the
    first (at most 16) samples and ``n_rows`` rows spread over D."""
    import copy

    import pipeline
    from pipeline.hessian.methods import resolve_method

    d, m = x[0].numel(), min(len(x), 16)
    rows = torch.linspace(0, d - 1, min(n_rows, d)).round().long().unique().to(x.device)
    model64 = copy.deepcopy(model).double()
    x64 = x[:m].double()
    ref = generic_rows("vmap(torch.func.hessian)", model64, x64, output, rows)
    with torch.no_grad():
        ours64 = pipeline.hessian(model64, x64, [output], rows=rows)
        z = model(x[:1])
    scale = ref.abs().max().clamp_min(1e-300)
    err32 = float((h[:m][:, :, rows].double() - ref).abs().max() / scale)
    func32 = generic_rows("vmap(torch.func.hessian)", model, x[:m], output, rows)
    err_func = float((func32.double() - ref).abs().max() / scale)
    err64 = float((ours64 - ref).abs().max() / scale)
    picked = resolve_method("auto", model, pipeline.make_target([output], z), x).name
    return {"auto_method": picked, "float32_err": err32, "float64_err": err64,
            "torch_func_float32_err": err_func}  # fmt: skip


def child(name: str, method: str, args) -> dict:
    """``measure`` in a fresh process (cold means cold); its dict, or the error it died with."""
    cmd = [sys.executable, __file__, "--one", name, "--method", method,
           "--repeats", str(args.repeats), "--warmups", str(args.warmups),
           "--device", args.device,
           "--generic-rows", str(args.generic_rows),
           "--check-rows", str(args.check_rows)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:160]
        return {"case": name, "method": method, "error": tail}
    return json.loads(lines[-1])


def row(results: dict[str, dict], methods) -> str:
    def cell(r):
        if "error" in r:
            return "failed"
        t = r["times_s"]
        return f"{statistics.median(t):.3g} ({min(t):.3g}-{max(t):.3g}) / {r['cold_s']:.3g}"

    auto = results.get("auto", {})
    funcs = [results[m] for m in TORCH_FUNC if m in results and "error" not in results[m]]
    ratio = "-"
    if "times_s" in auto and funcs:
        best = min(statistics.median(r["times_s"]) for r in funcs)
        warm = statistics.median(auto["times_s"]) / best
        cold = auto["cold_s"] / min(r["cold_s"] for r in funcs)
        ratio = f"{warm:.2f}x / {cold:.2f}x"
    check = (f"{auto['auto_method']}, {auto['float32_err']:.1e} "
             f"({auto['torch_func_float32_err']:.1e}), {auto['float64_err']:.1e}"
             if "auto_method" in auto else "-")  # fmt: skip
    name = next(iter(results.values()))["case"]
    cells = " | ".join(cell(results[m]) if m in results else "-" for m in methods)
    return f"| {name} | {cells} | {ratio} | {check} |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--cases",
        nargs="+",
        default=[c for c in CASES if c != "vit_tiny_d12"],
        choices=list(CASES),
        help="(vit_tiny_d12 only when named: ~3 min)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=(*METHODS, WHOLE),
        metavar="METHOD",
        help=f"of {', '.join(METHODS)}; and '{WHOLE}'",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmups", type=int, default=1)
    p.add_argument("--generic-rows", type=int, default=256)
    p.add_argument("--check-rows", type=int, default=16)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (gpu_check.sh widths)")
    p.add_argument("--json", type=Path)
    p.add_argument("--one", choices=list(CASES), help=argparse.SUPPRESS)
    p.add_argument("--method", choices=(*METHODS, WHOLE), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.method, args)), flush=True)
        return
    machine = platform.processor() or platform.machine()
    if args.device.startswith("cuda"):
        machine = torch.cuda.get_device_name()
    print(f"# {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}, float32; "
          "seconds a call: median (min-max) / cold")  # fmt: skip
    print(
        "| case | " + " | ".join(args.methods) + " | auto / best torch.func, warm / cold "
        "| auto's method, float32 err (torch.func's), float64 err |"
    )
    print("|" + " --- |" * (len(args.methods) + 3))
    everything = []
    for name in args.cases:
        results = {m: child(name, m, args) for m in args.methods}
        everything += results.values()
        print(row(results, args.methods), flush=True)
        for r in results.values():
            if "error" in r:
                print(f"#   {name} {r['method']}: {r['error']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
