"""Each ``output`` kind against ``dense``: time, file size and exactness, with real
``python -m pipeline`` processes on this machine.

1. ``kinds``: one model at D = 4096 (a ReLU MLP 4096 -> 256 -> 256 -> 10 under the cross-entropy
   loss, so that every kind applies, factored included), N samples: each kind's wall time and
   file size against the dense run, and its numbers against the dense file's.
2. ``factored``: a ReLU CNN (3x32x32, D = 3072) under the loss: the factored file's size against
   the dense one's, and J^T A J against the dense Hessians.
3. ``diagonal``: a tanh MLP D = 65,536 -> 64 -> 64 -> 1: ``output=diagonal``, its peak RSS (the
   pipeline process and everything it started, ``RUSAGE_CHILDREN``), and sampled entries against
   Hessian-vector products e_i^T H e_i of the same model (torch.func ``jvp(grad)``).

    python benchmarks/outputs.py all            # about 2-4 minutes on 2 cores
    python benchmarks/outputs.py kinds --samples 4
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COMMON = ("plots=false", "progress=false", "dtype=float32")


def pipeline_run(out: Path, *overrides: str) -> tuple[float, int, int]:
    """Wall seconds, file size and peak RSS in bytes of one ``python -m pipeline`` run (its
    ``ru_maxrss`` from ``wait4``: the process, or the largest of the processes it waited for)."""
    cmd = [sys.executable, "-m", "pipeline", *COMMON, *overrides, f"storage.path={out}",
           f"hydra.run.dir={out.parent / (out.stem + '_run')}"]  # fmt: skip
    t = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        took = time.perf_counter() - t
        if proc.returncode:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed:\n{err.read().decode()}")
    return took, out.stat().st_size, usage.ru_maxrss * 1024


def _mb(n: int) -> str:
    return f"{n / 1e6:9.2f} MB"


def kinds(tmp: Path, samples: int) -> None:
    import pipeline

    model = ("model=custom", "model.net._target_=pipeline.inputs.models.mlp",
             "+model.net.in_features=4096", "+model.net.activation=relu", "data=synthetic",
             "data.shape=[4096]", f"data.n_samples={samples}", "target=loss")  # fmt: skip
    runs = {
        "dense": (),
        "diagonal": ("output=diagonal",),
        "rows": ("output=rows", "output.rows=[0,1000,2000,3000]"),
        "eigen": ("output=eigen", "output.k=6"),
        "factored": ("output=factored",),
    }
    print(f"1. kinds: ReLU MLP D=4096 -> 256 -> 256 -> 10, cross-entropy loss, {samples} samples")
    print(f"{'output':10} {'seconds':>8} {'x dense':>8} {'file':>12} {'/ dense':>9}  check")
    base = None
    for kind, over in runs.items():
        path = tmp / f"{kind}.h5"
        took, size, _ = pipeline_run(path, *model, *over)
        if base is None:
            base = (took, size)
            with pipeline.read(path) as r:
                dense = r.hessian.compute().astype(np.float64)
        check = _check(kind, path, dense)
        print(f"{kind:10} {took:8.2f} {took / base[0]:7.2f}x {_mb(size)} {size / base[1]:8.4f}  "
              f"{check}")  # fmt: skip


def _check(kind: str, path: Path, dense: np.ndarray) -> str:
    """The largest difference from the dense file, relative to its largest entry."""
    import pipeline

    scale = np.abs(dense).max()
    with pipeline.read(path) as r:
        if kind == "dense":
            return "reference"
        if kind == "diagonal":
            got, want = r.diagonal.compute(), np.diagonal(dense, axis1=2, axis2=3)
        elif kind == "rows":
            got, want = r.hessian.compute(), dense[:, :, r.rows.compute()]
        elif kind == "factored":
            got, want = r.hessian.compute(), dense
        else:
            vals, vecs = r.eigenvalues.compute(), r.eigenvectors.compute()
            hv = np.einsum("nkij,nkej->nkei", dense, vecs)
            res = np.linalg.norm(hv - vals[..., None] * vecs, axis=-1).max()
            return f"max ||Hv - lambda v|| / max|lambda| = {res / np.abs(vals).max():.1e}"
    return f"max |diff| / max|H| = {np.abs(got - want).max() / scale:.1e}"


def factored(tmp: Path, samples: int) -> None:
    import pipeline

    model = ("model=custom", "model.net._target_=pipeline.inputs.models.convnet",
             "data=synthetic", "data.shape=[3,32,32]", f"data.n_samples={samples}",
             "target=loss")  # fmt: skip
    print(f"\n2. factored: ReLU CNN 3x32x32 (D=3072), cross-entropy loss, {samples} samples")
    t_d, s_d, _ = pipeline_run(tmp / "cnn_dense.h5", *model)
    t_f, s_f, _ = pipeline_run(tmp / "cnn_factored.h5", *model, "output=factored")
    with pipeline.read(tmp / "cnn_dense.h5") as d, pipeline.read(tmp / "cnn_factored.h5") as f:
        worst = max(float(np.abs(f.hessian[n].compute() - d.hessian[n].compute()).max())
                    for n in range(samples))  # fmt: skip
        scale = float(np.abs(d.hessian.compute()).max())
    print(f"dense    {t_d:7.2f} s {_mb(s_d)}")
    print(
        f"factored {t_f:7.2f} s {_mb(s_f)}   {s_d / s_f:.0f}x smaller; "
        f"max |J^T A J - dense| / max|H| = {worst / scale:.1e}"
    )


def diagonal(tmp: Path, samples: int, d: int = 65536, checks: int = 16) -> None:
    import torch
    from torch.func import grad, jvp

    import pipeline
    from pipeline.inputs.models import mlp

    path = tmp / "diag.h5"
    over = ("model=custom", "model.net._target_=pipeline.inputs.models.mlp",
            f"+model.net.in_features={d}", "+model.net.hidden=[64,64]", "+model.net.out_features=1",
            "data=synthetic", f"data.shape=[{d}]", f"data.n_samples={samples}",
            "target.indices=[0]", "output=diagonal")  # fmt: skip
    took, size, peak = pipeline_run(path, *over)
    print(f"\n3. diagonal: tanh MLP D={d} -> 64 -> 64 -> 1, {samples} samples")
    print(
        f"{took:.2f} s, file {_mb(size)}, peak RSS of the pipeline process {peak / 2**20:.0f} MiB"
    )
    net = mlp(d, (64, 64), 1).eval()
    with pipeline.read(path) as r:
        diag = r.diagonal.compute()
        x = torch.as_tensor(r.inputs.compute()).reshape(samples, -1)
    worst = 0.0
    rng = np.random.default_rng(0)
    for n in range(samples):
        f = lambda v: net(v[None])[0, 0]  # noqa: E731
        for i in rng.choice(d, checks, replace=False):
            e = torch.zeros(d)
            e[i] = 1
            hv = jvp(grad(f), (x[n],), (e,))[1].detach()
            worst = max(worst, abs(float(hv[i]) - float(diag[n, 0, i])))
    print(
        f"{checks} sampled entries per sample against jvp(grad): max |diff| = {worst:.1e} "
        f"(largest |entry| {np.abs(diag).max():.1e})"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["kinds", "factored", "diagonal", "all"])
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        tmp = Path(d)
        if args.what in ("kinds", "all"):
            kinds(tmp, args.samples)
        if args.what in ("factored", "all"):
            factored(tmp, args.samples)
        if args.what in ("diagonal", "all"):
            diagonal(tmp, args.samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
