"""One run of the pipeline: build the job, plan blocks, compute the missing ones, assemble the file.

``run(cfg)`` is what ``python -m pipeline`` calls; tests call it directly with composed configs.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import DictConfig

from . import __version__
from .backends import compute_device, execute
from .config import fingerprint
from .errors import PipelineError
from .job import Job
from .plan import Plan
from .precision import tf32_report
from .storage import (
    DirectFile,
    FinalFile,
    Metadata,
    ShardStore,
    Syncer,
    compression_options,
)
from .validate import Checked, complete_config, validate

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """Where the result went and what it took."""

    path: Path
    shape: tuple[int, int, int, int]
    method: str
    seconds: float
    blocks_computed: int
    blocks_reused: int
    compute_seconds: float = 0.0  # computing and committing the blocks (no start-up, assembly)


def output_path(cfg: dict[str, Any], output_dir: Path | None) -> Path:
    """``storage.path``, or ``hessians.h5`` in the run directory."""
    if cfg["storage"].get("path"):
        return Path(cfg["storage"]["path"]).expanduser().absolute()
    return (Path(output_dir) if output_dir else Path.cwd()).absolute() / "hessians.h5"


def shard_dir(path: Path) -> Path:
    return path.with_name(path.name + ".shards")


def versions() -> dict[str, str]:
    import dask
    import h5py
    import torch

    return {
        "torch": str(torch.__version__),
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "dask": dask.__version__,
        "pipeline": __version__,
        "numpy": np.__version__,
    }


def run(
    cfg: DictConfig | dict[str, Any],
    output_dir: Path | None = None,
    overrides: list[str] | None = None,
) -> RunResult:
    """Compute the Hessians a config describes and write them to ``storage.path``."""
    t0 = time.perf_counter()
    cfg = complete_config(cfg)
    path = output_path(cfg, output_dir)
    mode = cfg["storage"]["mode"]
    if mode == "create" and path.exists():
        raise PipelineError(
            f"{path} exists; use storage.mode=overwrite to replace it or choose another "
            "storage.path",
            "storage.mode",
        )
    checked = validate(cfg, path)  # see NOTE: [validation before anything exists]
    _check_writable(path)
    with RunLock(path):
        return _locked_run(cfg, path, mode, overrides, t0, checked)


def _locked_run(cfg, path: Path, mode: str, overrides, t0: float, checked: Checked) -> RunResult:
    shards = ShardStore(shard_dir(path), fsync=cfg["storage"].get("fsync", True))
    if mode == "create" and shards.manifest() is not None:
        raise PipelineError(
            f"{shards.directory} holds blocks of an interrupted run: use storage.mode=resume to "
            "finish it or storage.mode=overwrite to start afresh",
            "storage.mode",
        )
    job, plan = checked.job, checked.plan
    n, k, d = len(job.data.x), job.target.n_outputs, job.dim
    itemsize = job.data.x.element_size()
    st = cfg["storage"]
    code = job.code_fingerprint or os.urandom(16).hex()  # unreadable code: never reusable
    fp = fingerprint(cfg, job.model_fingerprint, code, job.data_fingerprint())
    if mode == "resume" and path.exists():
        return _already_complete(path, fp, shards, job, plan, t0)
    layout, compression = st.get("layout", "copy"), st.get("compression")
    direct = (
        cfg["backend"]["name"] == "local"
        and layout == "copy"
        and not compression_options(compression)
    )
    _check_free_space(path, plan, itemsize, shards, mode == "resume", layout, direct)
    shards.start(fp, resume=mode == "resume", info={"n_blocks": len(plan.blocks)})
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.partial"):  # a killed run's
        stale.unlink(missing_ok=True)  # final file (we hold the lock: nobody else writes it)
    meta = _metadata(job, cfg, overrides or [], plan, fp)
    meta.attrs.update(tf32_report(job, compute_device(cfg["backend"])))
    dtype = job.data.x.numpy().dtype
    syncer = Syncer() if shards.fsync else None
    shards.syncer = syncer
    try:
        if direct:
            final = DirectFile(path, plan, shards, dtype, meta, syncer)
        else:
            final = FinalFile(path, plan, shards, dtype, layout, compression, syncer)
        done = final.committed()
        todo = [b for b in plan.blocks if b.index not in done]
        reused = len(done)
        log.info(
            "Hessians (%d, %d, %d, %d) %s, method=%s, %d blocks of %d samples x %d rows (%d done)",
            n,
            k,
            d,
            d,
            cfg["dtype"],
            job.method.name,
            len(plan.blocks),
            plan.block_samples,
            plan.block_rows,
            reused,
        )
        with final, _progress(cfg, len(plan.blocks), reused, "blocks") as bar:
            for b in plan.blocks:  # blocks of an interrupted run
                if b.index in done:
                    final.add(b)

            later: list = []  # blocks to copy once the workers are done (see _copy_as_they_come)
            stream = _copy_as_they_come(cfg["backend"])

            def on_block(b, hessian, gradient):
                if stream or hessian is not None:
                    final.add(b, hessian, gradient)
                else:
                    later.append(b)
                bar.update(1)

            t_compute = execute(job, todo, shards, on_block)
            for b in later:
                final.add(b)
            final.finish(meta)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise PipelineError(
            f"disk full under {path.parent} after {len(shards.committed() | shards.marked())} of "
            f"{len(plan.blocks)} blocks: committed blocks are kept; free space and rerun with "
            "storage.mode=resume",
            "storage.path",
        ) from err
    finally:
        if syncer is not None:
            syncer.close()  # lets queued commits finish: more blocks kept after an error
    if layout != "virtual" and not st.get("keep_shards"):
        shards.remove()
    result = RunResult(
        path, (n, k, d, d), job.method.name, time.perf_counter() - t0, len(todo), reused, t_compute
    )
    log.info(
        "wrote %s: hessian %s %s, method %s, %.2f s (%d blocks computed, %d reused)",
        path,
        result.shape,
        cfg["dtype"],
        result.method,
        result.seconds,
        len(todo),
        reused,
    )
    if cfg.get("plots"):
        _after_run_reports(path, cfg)
    return result


def _copy_as_they_come(backend: dict[str, Any]) -> bool:
    """Whether the driver copies Dask shards into the final file while workers compute.

    It should, unless the run's own LocalCluster occupies every core: then the copying takes CPU
    from the workers (2 workers on 2 cores: 1.26-1.39x faster than 1 instead of 1.78x) and is
    better done after them.
    """
    if backend["name"] != "dask":
        return True
    busy = backend.get("n_workers", 2) * backend.get("threads_per_worker", 1)
    return busy < (os.cpu_count() or 1)


def _already_complete(path: Path, fp: str, shards: ShardStore, job: Job, plan: Plan, t0: float):
    """Resume found a finished file: fine if it is this job's result, an error otherwise."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            same = f.attrs.get("fingerprint") == fp and f.attrs.get("status") == "complete"
    except OSError:
        same = False
    if not same:
        raise PipelineError(
            f"{path} exists and is not the result of this config; use storage.mode=overwrite "
            "or choose another storage.path",
            "storage.mode",
        )
    shards.remove()
    log.info("%s is already complete; nothing to resume", path)
    n, k, d = plan.n_samples, plan.n_outputs, plan.dim
    return RunResult(
        path, (n, k, d, d), job.method.name, time.perf_counter() - t0, 0, len(plan.blocks)
    )


def _after_run_reports(path: Path, cfg: dict[str, Any]) -> None:
    """Plots and per-sample statistics next to the result (see pipeline.plots)."""
    try:
        from .plots import write_reports
    except ImportError:
        return
    try:
        write_reports(path, path.parent)
    except Exception as err:  # the result is complete; a failed plot must not hide that
        log.warning("plots not written: %s: %s", type(err).__name__, err)


def _metadata(job: Job, cfg: dict[str, Any], overrides: list[str], plan: Plan, fp: str) -> Metadata:
    attrs = {
        "config": yaml.safe_dump(cfg, sort_keys=False),
        "overrides": yaml.safe_dump(list(overrides)),
        "versions": yaml.safe_dump(versions()),
        "method": job.method.name,
        "dtype": cfg["dtype"],
        "target": job.target.kind,
        "model_fingerprint": job.model_fingerprint,
        "code_fingerprint": job.code_fingerprint or "unreadable",
        "fingerprint": fp,
        "cwd": os.getcwd(),  # relative paths in the config are relative to it
        "input_shape": list(job.data.x.shape[1:]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return Metadata(
        inputs=job.data.x.numpy(),
        outputs=job.outputs.numpy(),
        sample_index=job.data.sample_index,
        output_index=np.asarray(job.target.output_index, dtype=np.int64),
        attrs=attrs,
    )


def _check_writable(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".{path.name}.write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        why = err.strerror
        if isinstance(err, (FileExistsError, NotADirectoryError)):
            why = "a part of the path is a file, not a directory"
        raise PipelineError(f"cannot write to {path.parent}: {why}", "storage.path") from err


class _NoBar:
    def __init__(self, *a, **k):
        pass

    def update(self, n):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(cfg: dict[str, Any], total: int, initial: int, desc: str):
    if not cfg.get("progress", True):
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="block", leave=False)


class RunLock:
    """An exclusive lock on ``<storage.path>.lock`` for the duration of a run.

    ``flock`` locks vanish with the process that holds them, so a killed run never leaves a stale
    lock; a second run on the same path refuses at once.
    """

    def __init__(self, path: Path):
        self.path = path.with_name(path.name + ".lock")
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            os.close(self.fd)
            self.fd = None
            raise PipelineError(
                f"another run is writing {self.path.with_suffix('')} right now; wait for it or "
                "choose another storage.path",
                "storage.path",
            ) from err
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)


def _check_free_space(
    path: Path,
    plan: Plan,
    itemsize: int,
    shards: ShardStore,
    resume: bool,
    layout: str,
    direct: bool,
) -> None:
    """Refuse before computing when the result cannot fit on the disk: the final file (written in
    place by ``backend=local``), or block shards plus the final file."""
    total = plan.n_samples * plan.n_outputs * plan.dim * (plan.dim + 1) * itemsize
    if direct:
        needed = 0 if resume and shards.direct_path.is_file() else total
    else:
        done = len(shards.committed()) / max(1, len(plan.blocks)) if resume else 0.0
        needed = int(total * (1 - done)) + (0 if layout == "virtual" else total)
    free = shutil.disk_usage(path.parent).free
    if needed > free:
        raise PipelineError(
            f"the result needs about {_gb(needed)} under {path.parent} "
            f"({'the final file' if direct else 'block shards and the final file'}) but only "
            f"{_gb(free)} is free",
            "storage.path",
        )


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def run_overrides(
    overrides: list[str] | tuple[str, ...] = (), output_dir: str | os.PathLike | None = None
) -> RunResult:
    """Run the job that ``python -m pipeline OVERRIDES`` runs, from Python.

    The config is composed from the package's ``conf/`` with Hydra's compose API, exactly as the
    command line composes it, e.g. ``run_overrides(["model=cnn", "data.stop=4"])``.

    Args:
        overrides: Hydra overrides, as on the command line.
        output_dir: where ``hessians.h5`` goes unless ``storage.path`` is given (default: the
            current directory; the command line uses a new ``outputs/<date>/<time>/``).

    Returns:
        The :class:`RunResult`.

    Raises:
        PipelineError: a bad override or input, naming the config key.
    """
    from .config import compose
    from .validate import config_error

    try:
        cfg = compose(list(overrides))
    except Exception as err:
        raise config_error(err) from err
    return run(cfg, Path(output_dir) if output_dir is not None else None, list(overrides))
