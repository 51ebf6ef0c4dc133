"""Whole datasets through the pipeline against the engine in a plain loop (issue: stream whole
datasets at engine speed). Prints one line per run and the ratios; ``--json`` writes them.

The engine loop is what a user would write without the pipeline: the model built by the same
config, the same inputs, ``pipeline.hessian`` (or the diagonal) in batches of 1024, every
result kept in memory. It runs in a fresh process, timed from its first batch to its last (the
loop) and as a whole (imports, model, inputs, one warm-up batch, the loop); ratios are given
against both, and against the loop that drops each batch's result (the engine's speed with no
memory to grow: on this 2-core VM new memory is slow to come by, so keeping 3.3 GB of results
made the same loop 3-6x slower). The pipeline is timed as a
user times it: the whole ``python -m pipeline ...`` command in a fresh process (imports, Hydra,
the model, the probes, the cluster, computing, writing, finishing), ``plots=false
progress=false``; its own ``samples/s`` (from the first block to the last) is printed beside.

Cases (``--case``, several allowed):

- ``dense64``: 200,000 samples of the digits tanh MLP (D = 64), dense Hessians of class 2
  (3.3 GB).
- ``diag784``: 100,000 samples of a tanh MLP 784 -> 256 -> 256 -> 10, ``output=diagonal``.
- ``diag64``: 1,000,000 samples of the digits MLP, ``output=diagonal``; the run is killed
  (SIGKILL) when about half of its blocks are committed, then resumed: the resumed run must
  reuse every committed block.
- ``dd``: the 4.3 GB dense job (D = 4096: a tanh MLP 4096 -> 16 -> 16 -> 10, 64 samples) against
  ``dd`` writing as many bytes in the same directory (the faster of ``conv=fdatasync`` and
  ``oflag=direct``).

``--backends`` runs each case on ``local``, ``dask`` (a LocalCluster of 2 workers, 1 thread
each) and/or ``driver`` (the same cluster with ``backend.write_at=driver``). ``--samples``
scales every case down (a quick look: ``--samples 0.05``).

    python benchmarks/stream.py --case dense64 diag784 --backends local dask driver
    python benchmarks/stream.py --case diag64
    python benchmarks/stream.py --case dd --dir /data/tmp
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH = 1024  # the engine loop's batch


@dataclass(frozen=True)
class Case:
    overrides: tuple[str, ...]
    samples: int
    output: str = "dense"


MLP784 = ("model=custom", "+model.net._target_=pipeline.inputs.models.mlp",
          "+model.net.in_features=784")  # fmt: skip
MLP4096 = ("model=custom", "+model.net._target_=pipeline.inputs.models.mlp",
           "+model.net.in_features=4096", "+model.net.hidden=[16,16]")  # fmt: skip
CASES = {
    "dense64": Case(("model=mlp", "data=synthetic", "data.shape=[64]"), 200_000),
    "diag784": Case(
        (*MLP784, "data=synthetic", "data.shape=[784]", "output=diagonal"), 100_000, "diagonal"
    ),  # fmt: skip
    "diag64": Case(
        ("model=mlp", "data=synthetic", "data.shape=[64]", "output=diagonal"), 1_000_000, "diagonal"
    ),  # fmt: skip
    "dd": Case((*MLP4096, "data=synthetic", "data.shape=[4096]"), 64),
}
BACKENDS = {
    "local": ("backend=local",),
    "dask": ("backend=dask", "backend.n_workers=2", "backend.threads_per_worker=1"),
    "driver": (
        "backend=dask",
        "backend.n_workers=2",
        "backend.threads_per_worker=1",
        "backend.write_at=driver",
    ),  # fmt: skip
}


def overrides(case: Case, n: int, backend: str, path: Path) -> list[str]:
    return [*case.overrides, f"data.n_samples={n}", *BACKENDS[backend], "plots=false",
            "progress=false", f"storage.path={path}", "storage.mode=overwrite"]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The engine in a loop


def engine_loop(case: Case, n: int, keep: bool = True) -> float:
    """Seconds of the plain loop over batches of ``BATCH``, results kept in memory (or each
    dropped before the next batch: the engine's speed alone, with no memory to grow)."""
    import pipeline
    from pipeline.config.schema import compose
    from pipeline.execution.job import ModelSpec
    from pipeline.hessian import diagonal
    from pipeline.inputs.data import load_data

    cfg = compose([*case.overrides, f"data.n_samples={n}"])
    model = ModelSpec(cfg.model, "float32", cfg.seed).build()
    x = load_data(cfg.data, torch.float32).x[:]
    index = list(cfg.target.indices)

    def batch(xb):
        if case.output == "diagonal":
            target = pipeline.make_target(index, model(xb), None, "cross_entropy")
            return diagonal(model, xb, target)
        return pipeline.hessian(model, xb, index)

    batch(x[:BATCH])  # warm-up: plans and traces, as the pipeline's probes are
    kept = []
    t0 = time.perf_counter()
    for i in range(0, n, BATCH):
        out = batch(x[i : i + BATCH])
        if keep:
            kept.append(out)
        del out
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# The pipeline as a user runs it

RATE = re.compile(r"([\d.]+) samples/s")


def pipeline_run(args: list[str], cwd: Path, kill_at: float | None = None) -> dict:
    """``python -m pipeline ARGS``: wall seconds and the samples/s it logged; with
    ``kill_at``, SIGKILL once that fraction of the blocks is committed."""
    cmd = [sys.executable, "-m", "pipeline", *args, f"hydra.run.dir={cwd}/hydra"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    if kill_at is not None:
        path = Path(next(a.split("=", 1)[1] for a in args if a.startswith("storage.path=")))
        while proc.poll() is None:
            if _committed(path) >= kill_at:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
    out, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    if kill_at is None and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    rates = RATE.findall(out)
    reused = re.findall(r"\((\d+) blocks computed, (\d+) reused\)", out)
    return {"seconds": seconds, "rate": float(rates[-1]) if rates else None,
            "computed_reused": [int(v) for v in reused[-1]] if reused else None,
            "killed": kill_at is not None and proc.returncode != 0}  # fmt: skip


def agreement(case: Case, n: int, path: Path, count: int = 256) -> float:
    """The largest difference between the result file and the engine (``engine_loop``'s calls,
    here) on the first and the last ``count`` samples, relative to the largest entry: the
    pipeline's numbers are the loop's."""
    import h5py

    import pipeline
    from pipeline.config.schema import compose
    from pipeline.execution.job import ModelSpec
    from pipeline.hessian import diagonal
    from pipeline.inputs.data import load_data

    cfg = compose([*case.overrides, f"data.n_samples={n}"])
    model = ModelSpec(cfg.model, "float32", cfg.seed).build()
    x = load_data(cfg.data, torch.float32).x
    index = list(cfg.target.indices)
    worst = 0.0
    with h5py.File(path, "r") as f:
        stored = f["diagonal" if case.output == "diagonal" else "hessian"]
        for a in (0, max(0, n - count)):
            xb = x[a : a + count]
            if case.output == "diagonal":
                target = pipeline.make_target(index, model(xb), None, "cross_entropy")
                ours = diagonal(model, xb, target)[0]
            else:
                ours = pipeline.hessian(model, xb, index)
            got = torch.as_tensor(stored[a : a + count])
            scale = float(ours.abs().max()) or 1.0
            worst = max(worst, float((got - ours).abs().max()) / scale)
    return worst


def _committed(path: Path) -> float:
    """The fraction of blocks committed so far (the markers of an in-place run, else shards)."""
    shards = Path(f"{path}.shards")
    try:
        total = json.loads((shards / "manifest.json").read_text())["n_blocks"]
        done = sum(1 for p in shards.iterdir() if re.fullmatch(r"block-\d+\.(done|h5)", p.name))
    except (OSError, ValueError, KeyError):
        return 0.0
    return done / max(1, total)


def dd_seconds(directory: Path, nbytes: int) -> float:
    """The faster of ``dd`` through the page cache (then ``fdatasync``) and ``dd`` with
    ``oflag=direct``, writing ``nbytes`` in 64 MiB blocks (here: 387 MB/s and 1.3 GB/s)."""
    out = directory / "dd.bin"
    best = float("inf")
    for flags in (["conv=fdatasync"], ["oflag=direct", "conv=fdatasync"]):
        t0 = time.perf_counter()
        count = f"count={-(-nbytes >> 26)}"
        cmd = ["dd", "if=/dev/zero", f"of={out}", "bs=64M", count, *flags]
        subprocess.run(cmd, check=True, capture_output=True)
        best = min(best, time.perf_counter() - t0)
        out.unlink()
    return best


# ---------------------------------------------------------------------------------------------


def engine_child(name: str, n: int, keep: bool = True) -> tuple[float, float]:
    """``engine_loop`` in a fresh process (as the pipeline runs in one; on this 2-core VM the
    same loop read 1.0-4.3 s in one process, run after run, as freed memory was reused): the
    loop's seconds and the whole process's (imports, model, inputs, warm-up, loop)."""
    t0 = time.perf_counter()
    cmd = [sys.executable, __file__, "--engine", name, str(n), *([] if keep else ["--drop"])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1]), time.perf_counter() - t0


def run_case(
    name: str, backends: list[str], scale: float, directory: Path, repeats: int,
    skip_engine: bool = False,
) -> list[dict]:  # fmt: skip
    case = CASES[name]
    n = max(BATCH, int(case.samples * scale)) if name != "dd" else case.samples
    path = directory / f"{name}.h5"
    rows = []
    engine, drop = (None, None), None
    if name != "dd" and not skip_engine:
        engine = min(engine_child(name, n) for _ in range(repeats))
        drop = min(engine_child(name, n, keep=False)[0] for _ in range(repeats))
    for backend in backends:
        args = overrides(case, n, backend, path)
        row = {"case": name, "backend": backend, "samples": n, "engine_s": engine[0],
               "engine_whole_s": engine[1], "engine_drop_s": drop}  # fmt: skip
        if name == "diag64":
            first = pipeline_run(args, directory, kill_at=0.5)
            args = [a if a != "storage.mode=overwrite" else "storage.mode=resume" for a in args]
            second = pipeline_run(args, directory)
            row.update(killed_after_s=first["seconds"], **second)
            row["seconds"] = first["seconds"] + second["seconds"]
        else:
            runs = [pipeline_run(args, directory) for _ in range(repeats)]
            row.update(min(runs, key=lambda r: r["seconds"]))
        if name == "dd":
            row["bytes"] = os.path.getsize(path)
            row["dd_s"] = dd_seconds(directory, row["bytes"])
        else:
            row["difference"] = agreement(case, n, path)
        path.unlink(missing_ok=True)
        shutil.rmtree(f"{path}.shards", ignore_errors=True)
        rows.append(row)
        print(line(row), flush=True)
    return rows


def line(r: dict) -> str:
    s = (f"{r['case']:8s} {r['backend']:6s} N={r['samples']:<8d} pipeline {r['seconds']:7.2f} s "
         f"({r['samples'] / r['seconds']:8.0f} samples/s whole run, "
         f"{r['rate'] or float('nan'):8.0f} while computing)")  # fmt: skip
    if r.get("engine_s"):
        s += (f" | engine loop {r['engine_s']:6.2f} s ({r['samples'] / r['engine_s']:8.0f} "
              f"samples/s), its whole process {r['engine_whole_s']:6.2f} s | ratio "
              f"{r['engine_s'] / r['seconds']:.2f}x of the loop, "
              f"{r['engine_whole_s'] / r['seconds']:.2f}x of its process; "
              f"dropping its results {r['engine_drop_s']:6.2f} s: "
              f"{r['engine_drop_s'] / r['seconds']:.2f}x")  # fmt: skip
    if r.get("dd_s"):
        s += (f" | {r['bytes'] / 1e9:.2f} GB: dd {r['dd_s']:.2f} s | "
              f"{r['dd_s'] / r['seconds'] * 100:.0f}% of dd")  # fmt: skip
    if r.get("difference") is not None:
        s += f" | against the engine: {r['difference']:.1e} of the largest entry"
    if r.get("computed_reused") and r["case"] == "diag64":
        s += f" | resumed: {r['computed_reused'][0]} computed, {r['computed_reused'][1]} reused"
    return s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", nargs="+", default=["dense64", "diag784"], choices=list(CASES))
    p.add_argument("--backends", nargs="+", default=["local"], choices=list(BACKENDS))
    p.add_argument("--samples", type=float, default=1.0, help="scale every case's samples")
    p.add_argument("--dir", type=Path, default=None, help="where results and dd's file go")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--repeats", type=int, default=1, help="runs of each side; the fastest counts")
    p.add_argument("--skip-engine", action="store_true", help="the pipeline's runs only")
    p.add_argument("--engine", nargs=2, metavar=("CASE", "N"), help=argparse.SUPPRESS)
    p.add_argument("--drop", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.engine:  # the child of engine_child
        print(engine_loop(CASES[a.engine[0]], int(a.engine[1]), keep=not a.drop))
        return
    base = a.dir or (Path("/work") if Path("/work").is_dir() else Path(tempfile.gettempdir()))
    directory = Path(tempfile.mkdtemp(prefix="stream-", dir=base))
    print(f"# torch {torch.__version__}, {os.cpu_count()} CPUs, numpy {np.__version__}, "
          f"results under {directory}")  # fmt: skip
    rows = []
    try:
        for name in a.case:
            rows += run_case(name, a.backends, a.samples, directory, a.repeats, a.skip_engine)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
