"""Scale-out benchmarks: peak memory of the process tree, throughput against the disk, reports,
a result larger than memory, resume, worker scaling, and the pipeline's overhead over the
in-process engine. Prints one line per case; --json writes the numbers.

    python benchmarks/scale.py memory   --dim 16384 --samples 4 --workers 2
    python benchmarks/scale.py io       --dim 4096 --samples 64 --width 16   # vs dd: local, dask
    python benchmarks/scale.py reports  --dim 16384 --samples 4     # end of compute -> exit
    python benchmarks/scale.py big      --dim 98304 --samples 1     # 38.7 GB on a 24 GiB machine
    python benchmarks/scale.py resume   --dim 1024 --samples 8
    python benchmarks/scale.py scaling  --dim 1024 --samples 8
    python benchmarks/scale.py overhead --dim 784 --samples 64
    python benchmarks/scale.py gpu      --dim 784 --samples 1024   # needs CUDA; vs dd too
    python benchmarks/scale.py all --quick      # small sizes, a couple of minutes

The model is a tanh MLP D -> 256 -> 256 -> 10 (pipeline.inputs.models.mlp; --width changes the
hidden widths), one logit, float32, synthetic inputs. Every run is a real `python -m pipeline`
process (memory, io, reports, big, resume) or a real `pipeline.execution.run.run` call (scaling,
overhead, gpu) on this machine. `--dir` chooses where results and dd's file go (default: a
temporary directory under /work if it exists, else the system's): dd runs in the same directory as
the results.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.processes import TreeMonitor  # noqa: E402


def job(dim: int, samples: int, *extra: str, width: int | None = None) -> list[str]:
    return [
        "model=custom",
        "model.net._target_=pipeline.inputs.models.mlp",
        f"+model.net.in_features={dim}",
        *([f"+model.net.hidden=[{width},{width}]"] if width else []),
        "data=synthetic",
        f"data.shape=[{dim}]",
        f"data.n_samples={samples}",
        "target.indices=[2]",
        "progress=false",
        "plots=false",
        *extra,
    ]


def cli(overrides: list[str], env: dict | None = None, run_dir=None) -> subprocess.Popen:
    run_dir = run_dir or tempfile.mkdtemp()
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", f"hydra.run.dir={run_dir}", *overrides],
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )


def device_written(path: Path) -> int:
    """Bytes written so far to the block device holding ``path`` (/proc/diskstats; every
    process's writes, not only ours)."""
    dev = os.stat(path).st_dev
    name = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve().name
    for line in Path("/proc/diskstats").read_text().splitlines():
        fields = line.split()
        if fields[2] == name:
            return int(fields[9]) * 512
    return 0


def dd_bandwidth(directory: Path, count: int = 256) -> float:
    """Bytes/s of ``dd if=/dev/zero of=<directory>/dd.bin bs=16M count=256 conv=fdatasync``."""
    target = directory / "dd.bin"
    cmd = ["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={count}", "conv=fdatasync"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    target.unlink()
    line = next(x for x in out.splitlines() if "copied" in x)
    nbytes, seconds = int(line.split()[0]), float(line.split(", ")[-2].split()[0])
    return nbytes / seconds


def bench_dir(a) -> Path:
    """``--dir``, or a new temporary directory (under /work when it exists), removed at exit."""
    if a.dir:
        return Path(a.dir)
    base = Path("/work") if Path("/work").is_dir() else None
    made = Path(tempfile.mkdtemp(prefix="bench-", dir=base))
    atexit.register(shutil.rmtree, made, True)
    return made


LOG_TIME = "%Y-%m-%d %H:%M:%S"


def cli_timed(overrides: list[str], where: Path) -> dict:
    """Run ``python -m pipeline`` and measure it: wall time, peak tree RSS, bytes written by the
    tree and to the device holding ``where``, and the time of the run's log lines (Hydra's log
    file), in seconds after the start."""
    run_dir = Path(tempfile.mkdtemp(prefix="bench-run-"))
    atexit.register(shutil.rmtree, run_dir, True)
    os.sync()  # start clean: no other run's dirty pages to flush on this run's clock
    disk0 = device_written(where)
    t0 = time.time()
    proc = cli(overrides, run_dir=run_dir)
    with TreeMonitor(proc.pid) as mon:
        out = proc.communicate()[0].decode()
    t1 = time.time()
    if proc.returncode:
        raise SystemExit(out)
    events = []
    for line in (run_dir / "__main__.log").read_text().splitlines():
        stamp, _, rest = line[1:].partition("]")
        when = time.mktime(time.strptime(stamp[:19], LOG_TIME)) + float("0." + stamp[20:23])
        events.append((when - t0, rest.split("] - ", 1)[-1]))
    return {
        "wall_s": t1 - t0,
        "peak_rss": mon.peak,
        "tree_write_bytes": mon.write_bytes,
        "device_bytes": device_written(where) - disk0,
        "events": events,
        "output": out,
    }


def event_time(events: list[tuple[float, str]], prefix: str) -> float:
    """Seconds after the start at which the first log line starting with ``prefix`` appeared."""
    return next(t for t, msg in events if msg.startswith(prefix))


def reference_rows(path: Path, dim: int, rows: list[int]) -> float:
    """Max relative error of stored rows of sample 0 against a double-backward reference."""
    from pipeline.inputs.models import mlp

    net = mlp(dim).eval()
    with h5py.File(path, "r") as f:
        x = torch.as_tensor(f["inputs"][0]).reshape(1, dim).requires_grad_(True)
        stored = f["hessian"][0, 0, rows, :]
    (g,) = torch.autograd.grad(net(x)[0, 2], x, create_graph=True)
    worst = 0.0
    for i, r in enumerate(rows):
        (h,) = torch.autograd.grad(g[0, r], x, retain_graph=True)
        ref = h[0].numpy()
        worst = max(worst, float(np.abs(stored[i] - ref).max() / np.abs(ref).max()))
    return worst


def all_chunks_written(path: Path) -> bool:
    with h5py.File(path, "r") as f:
        d = f["hessian"]
        expected = int(np.prod([-(-s // c) for s, c in zip(d.shape, d.chunks, strict=True)]))
        return d.id.get_num_chunks() == expected and f.attrs["status"] == "complete"


def bench_memory(a) -> dict:
    tmp = Path(a.dir or tempfile.mkdtemp(prefix="bench-mem-"))
    path = tmp / "h.h5"
    matrix = a.samples * a.dim * a.dim * 4
    over = job(
        a.dim,
        a.samples,
        "backend=dask",
        f"backend.n_workers={a.workers}",
        f"storage.path={path}",
        "storage.mode=overwrite",
    )
    t = time.perf_counter()
    proc = cli(over)
    with TreeMonitor(proc.pid) as mem:
        out = proc.communicate()[0].decode()
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(out)
    err = reference_rows(path, a.dim, [0, a.dim // 2, a.dim - 1])
    res = {
        "case": "memory",
        "dim": a.dim,
        "samples": a.samples,
        "workers": a.workers,
        "matrix_gb": matrix / 1e9,
        "peak_rss_gb": mem.peak / 1e9,
        "peak_over_matrix": mem.peak / matrix,
        "wall_s": wall,
        "rows_per_s": a.samples * a.dim / wall,
        "all_chunks_written": all_chunks_written(path),
        "spot_row_rel_err": err,
    }
    path.unlink()
    return res


def bench_io(a) -> dict:
    """An I/O-bound job (narrow MLP) against dd in the same directory: backend=local and
    backend=dask with 2 workers, the workers writing their blocks (dask) or sending them to the
    driver, which writes them (dask_driver: backend.write_at=driver). The write phase runs from
    the writer's first log line (file laid out; for Dask, once the cluster is ready) to the
    rename of the finished file."""
    tmp = bench_dir(a)
    size = a.samples * a.dim * a.dim * 4
    res = {"case": "io", "dim": a.dim, "samples": a.samples, "width": a.width, "gb": size / 1e9}
    res["dd_mb_s"] = dd_bandwidth(tmp) / 1e6
    backends = {
        "local": ["backend=local"],
        "dask": ["backend=dask", f"backend.n_workers={a.workers}"],
    }
    backends["dask_driver"] = [*backends["dask"], "backend.write_at=driver"]
    for name, extra in backends.items():
        path = tmp / f"io-{name}.h5"
        over = job(a.dim, a.samples, *extra, f"storage.path={path}", width=a.width)
        m = cli_timed(over, tmp)
        ready = "Dask cluster ready" if name.startswith("dask") else "Hessians ("
        start = event_time(m["events"], ready)
        phase = event_time(m["events"], "wrote ") - start
        res[f"{name}_wall_s"] = m["wall_s"]
        res[f"{name}_write_phase_s"] = phase
        res[f"{name}_mb_s"] = size / phase / 1e6
        res[f"{name}_of_dd"] = size / phase / 1e6 / res["dd_mb_s"]
        res[f"{name}_tree_written_over_size"] = m["tree_write_bytes"] / size
        res[f"{name}_device_written_over_size"] = m["device_bytes"] / size
        path.unlink()
    return res


def bench_reports(a) -> dict:
    """A job with the default reports (plots=true): the time from the last block written to the
    end of the process, against the compute time (workers ready -> last block written)."""
    tmp = bench_dir(a)
    path = tmp / "reports.h5"
    over = job(a.dim, a.samples, "backend=dask", f"backend.n_workers={a.workers}",
               f"storage.path={path}")  # fmt: skip
    over = [o for o in over if o != "plots=false"]
    m = cli_timed(over, tmp)
    ev = m["events"]
    written = event_time(ev, "all ")
    compute = written - event_time(ev, "Dask cluster ready")
    res = {
        "case": "reports",
        "dim": a.dim,
        "samples": a.samples,
        "wall_s": m["wall_s"],
        "compute_s": compute,
        "after_last_block_s": m["wall_s"] - written,
        "limit_s": max(30.0, 0.1 * compute),
        "report_lines": [f"{t - written:.1f}s {msg}" for t, msg in ev if msg.startswith("wrote ")],
    }
    path.unlink()
    return res


def bench_big(a) -> dict:
    """One sample with D = 98,304 (a 38.7 GB float32 Hessian; needs about 40 GB free), Dask with 2
    workers, no reports: wall time against the compute time (the engine on a few row blocks in
    this process, scaled to all) plus size / dd bandwidth; peak memory of the process tree;
    ``inspect --verify`` on spot rows."""
    from pipeline import hessian
    from pipeline.inputs.models import mlp
    from pipeline.store.plan import make_plan

    tmp = bench_dir(a)
    size = a.samples * a.dim * a.dim * 4
    free = shutil.disk_usage(tmp).free
    if free < size * 1.1 + 5e9:
        raise SystemExit(f"big: needs {size * 1.1 / 1e9 + 5:.0f} GB free under {tmp}, has "
                         f"{free / 1e9:.0f} GB")  # fmt: skip
    res = {"case": "big", "dim": a.dim, "samples": a.samples, "gb": size / 1e9}
    res["dd_mb_s"] = dd_bandwidth(tmp) / 1e6
    plan = make_plan(a.samples, 1, a.dim, 4)
    net = mlp(a.dim).eval()
    x = torch.randn(1, a.dim)
    probe = plan.blocks[: min(3, len(plan.blocks))]
    hessian(net, x, [2], rows=slice(0, 8))  # warm-up
    t = time.perf_counter()
    for b in probe:
        hessian(net, x, [2], rows=slice(b.r0, b.r1))
    res["compute_s"] = (time.perf_counter() - t) / len(probe) * len(plan.blocks) * a.samples
    path = tmp / "big.h5"
    over = job(a.dim, a.samples, "backend=dask", f"backend.n_workers={a.workers}",
               f"storage.path={path}")  # fmt: skip
    m = cli_timed(over, tmp)
    res["wall_s"] = m["wall_s"]
    res["bound_s"] = 1.5 * (res["compute_s"] + size / (res["dd_mb_s"] * 1e6))
    res["peak_rss_gb"] = m["peak_rss"] / 1e9
    res["tree_written_over_size"] = m["tree_write_bytes"] / size
    t = time.perf_counter()
    verify = subprocess.run(
        [sys.executable, "-m", "pipeline.inspect", str(path), "--verify", "--rows", "4",
         "--no-pairs"], cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    res["verify_s"] = time.perf_counter() - t
    res["verify"] = (verify.stdout.strip().splitlines() or ["?"])[-1]
    res["verify_ok"] = verify.returncode == 0
    path.unlink()
    return res


def bench_resume(a) -> dict:
    from tests.configs import committed_blocks

    tmp = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    base = job(a.dim, a.samples, "storage.block_rows=256", "method=forward_over_reverse")
    t = time.perf_counter()
    full = cli([*base, f"storage.path={tmp / 'full.h5'}"])
    full.communicate()
    t_full = time.perf_counter() - t
    part = cli([*base, f"storage.path={tmp / 'r.h5'}"])
    n_blocks = a.samples * (-(-a.dim // 256))
    while len(committed_blocks(tmp / "r.h5")) < n_blocks // 2 and part.poll() is None:
        time.sleep(0.01)
    os.killpg(part.pid, signal.SIGKILL)
    part.wait()
    killed_with = len(committed_blocks(tmp / "r.h5"))
    t = time.perf_counter()
    resumed = cli([*base, f"storage.path={tmp / 'r.h5'}", "storage.mode=resume"])
    out = resumed.communicate()[0].decode()
    t_resume = time.perf_counter() - t
    if resumed.returncode:
        raise SystemExit(out)
    with h5py.File(tmp / "full.h5") as f, h5py.File(tmp / "r.h5") as g:
        equal = bool(np.array_equal(f["hessian"][()], g["hessian"][()]))
    return {
        "case": "resume",
        "dim": a.dim,
        "samples": a.samples,
        "blocks": n_blocks,
        "blocks_done_at_kill": killed_with,
        "full_s": t_full,
        "resume_s": t_resume,
        "resume_over_full": t_resume / t_full,
        "identical": equal,
    }


def bench_scaling(a) -> dict:
    from pipeline.execution.run import run
    from tests.configs import config

    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    out = {"case": "scaling", "dim": a.dim, "samples": a.samples}
    for w in (1, 2):
        cfg = config(
            *job(
                a.dim,
                a.samples,
                "backend=dask",
                f"backend.n_workers={w}",
                "method=forward_over_reverse",
                "storage.block_rows=512",
                f"storage.path={tmp / f'w{w}.h5'}",
            )
        )
        res = run(cfg)
        out[f"w{w}_compute_s"], out[f"w{w}_total_s"] = res.compute_seconds, res.seconds
    out["speedup_compute"] = out["w1_compute_s"] / out["w2_compute_s"]
    out["speedup_total"] = out["w1_total_s"] / out["w2_total_s"]
    return out


def bench_overhead(a) -> dict:
    from pipeline import hessian
    from pipeline.execution.run import run
    from pipeline.inputs.data import load_data
    from pipeline.inputs.models import mlp
    from tests.configs import config

    tmp = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    cfg = config(*job(a.dim, a.samples, f"method={a.method}", f"storage.path={tmp / 'h.h5'}"))
    net = mlp(a.dim).eval()
    x = load_data(cfg["data"], torch.float32).x[:]
    times: dict[str, list[float]] = {"engine": [], "fsync": [], "no_fsync": []}
    for i in range(a.repeats):  # interleaved
        t = time.perf_counter()
        hessian(net, x, [2], method=a.method)
        times["engine"].append(time.perf_counter() - t)
        for name, fsync in (("fsync", True), ("no_fsync", False)):
            cfg["storage"].update(path=str(tmp / f"h{i}{name}.h5"), fsync=fsync)
            # Start clean: the page cache still holds the previous run's unflushed 157 MB (with
            # fsync=false), and this run's first fsync would write them out on its own clock.
            os.sync()
            times[name].append(run(cfg).seconds)
    e, r, r2 = (float(np.median(times[k])) for k in ("engine", "fsync", "no_fsync"))
    return {
        "case": "overhead",
        "dim": a.dim,
        "samples": a.samples,
        "method": a.method,
        "engine_s": e,
        "pipeline_s": r,
        "pipeline_over_engine": r / e,
        "pipeline_no_fsync_s": r2,
        "no_fsync_over_engine": r2 / e,
    }


def bench_gpu(a) -> dict:
    """Throughput on a GPU: the in-process engine, ``backend=local backend.device=cuda`` and
    ``backend=dask_cuda`` (when dask-cuda is installed) on the same job; samples a second, and
    the write phase (blocks computed and written, file flushed and renamed) against dd in the
    same directory (``*_of_dd``)."""
    import torch

    from pipeline import hessian
    from pipeline.execution.run import run
    from pipeline.inputs.data import load_data
    from pipeline.inputs.models import mlp
    from tests.configs import config

    tmp = bench_dir(a)
    base = job(a.dim, a.samples, "method.memory_budget_mb=16000", "storage.block_mb=512")
    cfg = config(*base, f"storage.path={tmp / 'warm.h5'}", "backend.device=cuda")
    net = mlp(a.dim).eval().cuda()
    x = load_data(cfg["data"], torch.float32).x[:].cuda()
    out = {"case": "gpu", "dim": a.dim, "samples": a.samples, "card": torch.cuda.get_device_name()}
    out["dd_mb_s"] = dd_bandwidth(tmp) / 1e6
    size = a.samples * a.dim * a.dim * 4
    hessian(net, x[:8], [2])  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    for s in range(0, len(x), 256):
        hessian(net, x[s : s + 256], [2]).cpu()
    out["engine_samples_per_s"] = a.samples / (time.perf_counter() - t)
    backends = {"local_cuda": ["backend.device=cuda"], "dask_cuda": ["backend=dask_cuda"]}
    for name, extra in backends.items():
        if name == "dask_cuda" and not _importable("dask_cuda"):
            continue
        path = tmp / f"{name}.h5"
        res = run(config(*base, *extra, f"storage.path={path}"))
        out[f"{name}_samples_per_s"] = a.samples / res.seconds
        seconds = res.compute_seconds + res.finish_seconds  # blocks written, file renamed
        out[f"{name}_write_phase_samples_per_s"] = a.samples / seconds
        out[f"{name}_mb_s"] = size / seconds / 1e6
        out[f"{name}_of_dd"] = size / seconds / (out["dd_mb_s"] * 1e6)
        path.unlink()
    return out


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "case",
        choices=["memory", "io", "reports", "big", "resume", "scaling", "overhead", "gpu", "all"],
    )
    p.add_argument("--dim", type=int)
    p.add_argument("--samples", type=int)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--width", type=int, default=16, help="io: hidden width of the narrow MLP")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--method", default="auto", help="overhead: the method of both sides")
    p.add_argument("--dir", help="where the memory case writes (needs 2x the matrix free)")
    p.add_argument("--quick", action="store_true", help="small sizes for a quick check")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    defaults = {  # (dim, samples): full size, quick size
        "memory": ((16384, 4), (4096, 2)),
        "io": ((4096, 64), (2048, 16)),
        "reports": ((16384, 4), (4096, 2)),
        "big": ((98304, 1), (16384, 1)),
        "resume": ((2048, 16), (512, 4)),
        "scaling": ((1024, 32), (512, 4)),
        "overhead": ((784, 64), (784, 16)),
        "gpu": ((784, 1024), (784, 256)),
    }
    cases = [c for c in defaults if c not in ("gpu", "big")] if a.case == "all" else [a.case]
    results = []
    for case in cases:
        dim, samples = defaults[case][1 if a.quick else 0]
        args = argparse.Namespace(
            **{**vars(a), "dim": a.dim or dim, "samples": a.samples or samples}
        )
        r = globals()[f"bench_{case}"](args)
        results.append(r)
        print(
            " | ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
            ),
            flush=True,
        )
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
