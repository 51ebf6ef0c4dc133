"""Where blocks run: in this process (``local``) or on Dask workers (``dask``, ``dask_cuda``,
``address``). Every backend computes blocks with :func:`compute_block` and hands each to the
result writer's sink (see ``pipeline.store.blocks``): where it was computed, or, for Dask workers
that cannot see the output directory, in this process (``backend.write_at``, see
:func:`write_at`); none holds the full Hessian.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from distributed.diagnostics.plugin import WorkerPlugin
from torch import Tensor, nn

from .errors import PipelineError
from .fingerprint import code_fingerprint, weights_fingerprint
from .hessian.methods import METHODS
from .hessian.targets import Target
from .job import Job, make_model
from .plan import Block
from .precision import tf32
from .store import BlockStats, InPlaceSink, block_stats, probe_marker
from .store.blocks import host_array
from .validate import idle_workers

log = logging.getLogger(__name__)


def compute_block(
    model: nn.Module, method: str, x: Tensor, target: Target, block: Block, budget: int
) -> tuple[Tensor, Tensor | None]:
    """Hessian rows [r0, r1) of samples [s0, s1): (S, K, R, D), and their gradients (S, K, D),
    on the model's device."""
    rows = slice(block.r0, block.r1)  # a slice of all D rows lets a method use H's symmetry
    hess, grad = METHODS[method].compute(model, x, target, rows, budget)
    return hess, (grad if block.r0 == 0 else None)


def execute(job: Job, blocks: list[Block], sink, on_written: Callable[[int], None]) -> float:
    """Compute ``blocks``, each written by ``sink`` where it was computed; ``on_written(index)``
    is called in this process for each written block (it commits it).

    Returns:
        seconds spent computing and writing blocks (cluster start-up and shut-down excluded).
    """
    backend = job.cfg["backend"]
    if backend["name"] == "local":
        return run_local(job, blocks, sink, on_written)
    elif backend["name"] in ("dask", "dask_cuda", "address"):
        with dask_client(backend) as client:
            return run_dask(client, job, blocks, sink, on_written)
    else:
        raise PipelineError(
            f"unknown backend {backend['name']!r}: choose local, dask, dask_cuda or address",
            "backend",
        )


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise PipelineError(
            f"unknown device {name!r}: use cpu, cuda or cuda:N", "backend.device"
        ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError("backend.device=cuda but no CUDA device is available", "backend.device")
    return device


def run_local(job: Job, blocks: list[Block], sink, on_written) -> float:
    """One process, blocks in order; each is written on a background thread while the next one
    computes (see :class:`BlockWriter`)."""
    t0 = time.perf_counter()
    device = _device(job.cfg["backend"].get("device", "cpu"))
    model = job.model.to(device)
    x = job.data.x.to(device)
    target = job.target.to(device)
    with reuse_large_buffers(), BlockWriter(sink, on_written, device) as writer:
        for b in blocks:
            with tf32(_tf32(job.cfg)):
                h, g = compute_block(
                    model,
                    job.method.name,
                    x[b.s0 : b.s1],
                    target.subset(b.s0, b.s1),
                    b,
                    job.memory_budget,
                )
            writer.put(b, h, g)
    return time.perf_counter() - t0


class BlockWriter:
    """Writes computed blocks on one background thread, so that writing overlaps computing.

    At most one block waits while one is written (its statistics are taken there too). On a GPU
    the block is copied into one of two page-locked host buffers on a separate stream
    (``non_blocking``): the copy overlaps the next block's compute, and the thread waits for the
    copy's event before it writes. Errors of the thread are raised by the next ``put`` or
    on leaving the ``with`` block.
    """

    def __init__(self, sink, on_written, device: torch.device):
        self.sink, self.on_written = sink, on_written
        self.cuda = device.type == "cuda"
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.buffers: queue.Queue = queue.Queue()
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            for _ in range(2):
                self.buffers.put(None)  # pinned buffers, allocated on first use
        self.thread = threading.Thread(target=self._loop, name="pipeline-writer", daemon=True)

    def __enter__(self) -> BlockWriter:
        self.thread.start()
        return self

    def put(self, b: Block, h: Tensor | np.ndarray, g: Tensor | np.ndarray | None,
            stats: BlockStats | None = None) -> None:  # fmt: skip
        """Queue block ``b`` (hessian (S, K, R, D), gradient (S, K, D) at row 0, and its
        statistics when they were taken already); waits while another block is queued."""
        if self.error is not None:
            raise self.error
        if not self.cuda:
            self.queue.put((b, h, g, stats, None, None))
            return
        buf = self.buffers.get()
        if buf is None or buf.numel() < h.numel():
            buf = torch.empty(h.numel(), dtype=h.dtype, pin_memory=True)
        host = buf[: h.numel()].view(h.shape)
        self.copy_stream.wait_stream(torch.cuda.current_stream(h.device))
        with torch.cuda.stream(self.copy_stream):
            host.copy_(h, non_blocking=True)
            grad = g.to("cpu", non_blocking=True) if g is not None else None
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        h.record_stream(self.copy_stream)  # h's memory is not reused before the copy ends
        if g is not None:
            g.record_stream(self.copy_stream)
        self.queue.put((b, host, grad, stats, done, buf))

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            b, h, g, stats, done, buf = item
            try:
                if self.error is None:
                    if done is not None:
                        done.synchronize()
                    self.on_written(self.sink.write(b, h, g, stats))
            except BaseException as err:  # raised in the computing thread
                self.error = err
            finally:
                if self.cuda:
                    self.buffers.put(buf)

    def __exit__(self, *exc) -> None:
        self.queue.put(None)  # the queued block is still written: one more block kept on error
        self.thread.join()
        if self.error is not None and exc[1] is None:
            raise self.error


def _tf32(cfg: dict[str, Any]) -> bool:
    return bool(cfg["method"].get("tf32", False))


def compute_device(backend: dict[str, Any]) -> torch.device:
    """Where the blocks run, as seen from this process (a GPU for dask_cuda when it has one)."""
    if backend["name"] == "local":
        return _device(backend.get("device", "cpu"))
    if backend["name"] == "dask":
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---- Dask ------------------------------------------------------------------------------------

_WORKER_MODELS: dict[str, nn.Module] = {}  # per worker process: model key -> model


def _worker_model(
    key: str, cfg: dict, device: str, threads: int, identity: tuple[str, str | None]
) -> nn.Module:
    """The worker's copy of the model, built on first use exactly as the driver built it
    (``pipeline.job.make_model``: seed, dtype, eval mode), and refused unless its weights and
    code have the driver's fingerprints ``identity``."""
    if key not in _WORKER_MODELS:
        torch.set_num_threads(max(1, threads))
        dev = device
        if device.startswith("cuda") and torch.cuda.is_available():
            dev = "cuda"  # dask-cuda pins one GPU per worker via CUDA_VISIBLE_DEVICES
        _WORKER_MODELS.clear()
        model = make_model(cfg, dev)
        built = (weights_fingerprint(model), code_fingerprint(model, cfg["model"]))
        if built != tuple(identity):
            what = "weights" if built[0] != identity[0] else "code"
            raise PipelineError(
                f"the model that Dask worker {_worker_name()} built differs from the driver's "
                f"({what} fingerprint {str(built[0 if what == 'weights' else 1])[:12]} against "
                f"{str(identity[0 if what == 'weights' else 1])[:12]}): the workers must see the "
                "same model files, code and package versions as the driver",
                "backend",
            )
        _WORKER_MODELS[key] = model
    return _WORKER_MODELS[key]


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"


class ModelPlugin(WorkerPlugin):
    """A Dask worker plugin that builds the model once per worker from the resolved config."""

    name = "pipeline-model"

    def __init__(self, *model_args, warm_up=None):
        self.args = model_args  # see _worker_model
        self.warm_up = warm_up  # (method, x of one sample, target kind, aux, output_index)

    def setup(self, worker) -> None:
        _mallopt(1 << 30, 2 << 30)  # for the worker's life (see NOTE: [malloc in Dask workers])
        try:
            model = _worker_model(*self.args)
        except PipelineError:  # every task raises it again, and the run reports it once (a
            return  # raise here would be logged with a traceback by each worker)
        if self.warm_up is not None:  # first torch.func calls in a process take ~1-2 s
            method, x, kind, aux, oi = self.warm_up
            device = next(iter(model.parameters()), torch.empty(0)).device
            target = Target(kind, torch.as_tensor(aux), oi).to(device)
            rows = torch.arange(min(2, x[0].size), device=device)
            METHODS[method].compute(model, torch.as_tensor(x).to(device), target, rows, 1 << 26)

    def teardown(self, worker) -> None:
        _WORKER_MODELS.clear()


def _dask_task(
    model_args: tuple,
    method: str,
    x: np.ndarray,
    kind: str,
    aux: np.ndarray,
    output_index: np.ndarray,
    block: Block,
    sink,
    budget: int,
    allow_tf32: bool = False,
) -> int | tuple[int, np.ndarray, np.ndarray | None, BlockStats]:
    """Run on a worker: compute one block and write it with ``sink``; returns its index.
    Without a sink (``backend.write_at=driver``) the block goes back to the driver instead:
    (index, hessian (S, K, R, D), gradient (S, K, D) or None, its statistics). Idempotent."""
    model = _worker_model(*model_args)
    device = next(iter(model.parameters()), torch.empty(0)).device
    target = Target(kind, torch.as_tensor(aux), output_index).to(device)
    xt = torch.as_tensor(x).to(device)
    with tf32(allow_tf32):
        h, g = compute_block(model, method, xt, target, block, budget)
    if sink is not None:
        return sink.write(block, h, g)
    h = host_array(h)  # its own memory (not the staged buffer): it outlives this task
    grad = None if g is None else host_array(g)
    return block.index, h, grad, block_stats(h, block.r0)


def _sees(directory: str, marker: str) -> bool:
    """Run on a worker: whether it sees the driver's ``marker`` in ``directory`` and may write
    there."""
    return os.path.isfile(os.path.join(directory, marker)) and os.access(directory, os.W_OK)


def write_at(client, backend: dict[str, Any], directory: str) -> str:
    """Who writes the blocks into ``directory`` (the sink's): ``"workers"`` or ``"driver"``.

    ``backend.write_at=auto`` decides before any block is computed, by a probe: this process
    creates a marker file in ``directory`` and asks every worker (``client.run``) whether it
    sees it; ``workers`` if all do, else ``driver`` (also when no worker has joined yet).
    ``workers`` is refused when a worker does not see it.

    Raises:
        PipelineError: ``write_at=workers`` and a worker cannot see ``directory``.
    """
    asked = str(backend.get("write_at", "auto"))
    if asked == "driver":
        return "driver"
    marker = probe_marker(Path(directory))
    marker.touch()
    try:
        seen = client.run(_sees, directory, marker.name, on_error="return")
    finally:
        marker.unlink(missing_ok=True)
    blind = sorted(str(w) for w, ok in seen.items() if ok is not True)
    if blind and asked == "workers":
        raise PipelineError(
            f"backend.write_at=workers, but {len(blind)} of {len(seen)} Dask workers (first: "
            f"{blind[0]}) cannot see {directory}: give them that directory (a shared file "
            "system) or use backend.write_at=driver",
            "backend.write_at",
        )
    if asked == "workers" or (seen and not blind):
        log.info("the Dask workers write their blocks into %s (%d checked)", directory, len(seen))
        return "workers"
    why = f"{len(blind)} of {len(seen)} Dask workers cannot see" if seen else "no worker yet sees"
    log.info("%s %s: the blocks are sent to this process, which writes them", why, directory)
    return "driver"


@contextlib.contextmanager
def dask_client(backend: dict[str, Any]) -> Iterator[Any]:
    """A ``distributed.Client`` for the backend; clusters the run starts are closed on exit."""
    from distributed import Client

    name = backend["name"]
    threads = backend.get("threads_per_worker", 1)
    dashboard = ":0" if _has_bokeh() else None
    if name == "address":
        with connect(backend, scheduler_address(backend)) as client:
            yield client
        return
    with keep_malloc_defaults(), _workers_ignore_ctrl_c():
        cluster = _start_cluster(name, backend, threads, dashboard)
    with cluster, Client(cluster) as client:
        if dashboard:
            log.info("Dask dashboard: %s", client.dashboard_link)
        yield client


def scheduler_address(backend: dict[str, Any]) -> str:
    """``backend.address``, or the address in ``backend.scheduler_file`` (read here: Dask's own
    reading waits for a missing file without end)."""
    if backend.get("address"):
        return backend["address"]
    path = backend.get("scheduler_file")
    if not path:
        raise PipelineError(
            "backend=address needs backend.address=tcp://host:8786 or backend.scheduler_file",
            "backend.address",
        )
    p = Path(path).expanduser()
    if not p.is_file():
        raise PipelineError(f"scheduler file {path!r} not found", "backend.scheduler_file")
    try:
        address = json.loads(p.read_text())["address"]
        if not isinstance(address, str):
            raise TypeError(f"its address is {address!r}")
    except (ValueError, KeyError, TypeError, OSError) as err:
        why = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
        raise PipelineError(
            f"{path!r} is not a Dask scheduler file (JSON with an 'address'): {why}",
            "backend.scheduler_file",
        ) from err
    return address


@contextlib.contextmanager
def connect(backend: dict[str, Any], address: str) -> Iterator[Any]:
    """A client of the scheduler at ``address``, connected within ``backend.connect_timeout_s``."""
    from distributed import Client

    timeout = backend.get("connect_timeout_s", 20)
    key = "backend.address" if backend.get("address") else "backend.scheduler_file"
    try:
        client = Client(address, timeout=f"{timeout}s")
    except (OSError, TimeoutError, ValueError, TypeError) as err:
        raise PipelineError(
            f"cannot reach the Dask scheduler at {address} within {timeout} s "
            f"({type(err).__name__})",
            key,
        ) from err
    with client:
        yield client


# NOTE: [malloc in Dask workers] Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536.
# Setting it disables glibc's dynamic mmap threshold, so every large tensor is mmap-ed and
# page-faulted afresh: a measured 1.5x slowdown of the Hessian kernels (24 -> 38 ms a block), and
# more when two workers fault pages at once. The clusters we start keep glibc's defaults.
# Even glibc's dynamic threshold stops at 32 MiB, so 64 MiB blocks are mmap-ed and faulted afresh
# every time (16,384 faults a block; a narrow MLP's 64 blocks of D = 4096 took 4.6-6.7 s instead
# of 2.7 s). So blocks are computed with ``reuse_large_buffers``: allocations below 1 GiB come
# from the heap and are reused, which bounds the memory kept to the run's peak.
_DASK_TRIM = "MALLOC_TRIM_THRESHOLD_"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_GLIBC_DEFAULT = 128 * 1024


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
    return bool(ok and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))


@contextlib.contextmanager
def reuse_large_buffers() -> Iterator[None]:
    """Let glibc reuse freed blocks instead of mapping fresh pages (see the NOTE above); the
    defaults come back on leaving."""
    changed = _mallopt(1 << 30, 2 << 30)
    try:
        yield
    finally:
        if changed:
            _mallopt(_GLIBC_DEFAULT, _GLIBC_DEFAULT)


@contextlib.contextmanager
def keep_malloc_defaults() -> Iterator[None]:
    """Start Dask workers without the nanny's MALLOC_TRIM_THRESHOLD_ (see the NOTE above)."""
    import dask

    if os.environ.get(_DASK_TRIM) == "65536":  # left behind by an earlier nanny in this process
        os.environ.pop(_DASK_TRIM)
    with dask.config.set({f"distributed.nanny.pre-spawn-environ.{_DASK_TRIM}": None}):
        yield


@contextlib.contextmanager
def _workers_ignore_ctrl_c() -> Iterator[None]:
    """Start the cluster's processes with SIGINT ignored (they inherit it): Ctrl-C reaches the
    whole process group, and the run, not each worker with its traceback, handles it (it closes
    the cluster and says how to resume)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _start_cluster(name: str, backend: dict[str, Any], threads: int, dashboard: str | None):
    from distributed import LocalCluster

    if name == "dask_cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as err:
            raise PipelineError(
                "backend=dask_cuda needs dask-cuda: pip install dask-cuda", "backend"
            ) from err
        return LocalCUDACluster(threads_per_worker=threads, dashboard_address=dashboard)
    else:
        n = backend.get("n_workers", 2)
        if n < 1:
            raise PipelineError("backend.n_workers must be at least 1", "backend.n_workers")
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        return LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=dashboard,
            env=env,
            silence_logs=_worker_log_level(),
        )


def _worker_log_level() -> int:
    """Workers log a failed task with its traceback at ERROR ("Compute Failed"); the run reports
    it once, in one line, so the workers of our clusters log only what is worse, unless
    ``HYDRA_FULL_ERROR=1`` asks for everything."""
    return logging.WARNING if os.environ.get("HYDRA_FULL_ERROR") == "1" else logging.CRITICAL


def _has_bokeh() -> bool:
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


def run_dask(client, job: Job, blocks: list[Block], sink, on_written) -> float:
    """Submit blocks with a bounded number in flight; each worker writes its own blocks, or
    sends them to this process, which writes them (``backend.write_at``, see :func:`write_at`).

    Blocks sent here are written on one background thread (:class:`BlockWriter`); while it is
    behind, no block is fetched and no new one submitted, so this process holds at most three
    blocks (one written, one queued, one received) and the workers at most
    ``backend.max_in_flight`` finished ones: a slow disk slows the run, it does not fill memory.
    """
    from distributed import as_completed

    backend = job.cfg["backend"]
    where = write_at(client, backend, sink.directory)
    identity = (job.model_fingerprint, job.code_fingerprint)
    key = job.model_fingerprint[:16] + job.cfg["dtype"]
    model_args = (
        key,
        {name: job.cfg[name] for name in ("model", "dtype", "seed")},
        backend.get("device", "cpu"),
        backend.get("threads_per_worker", 1),
        identity,
    )
    oi = job.target.output_index
    warm_up = (
        job.method.name,
        job.data.x[:1].cpu().numpy(),
        job.target.kind,
        job.target.aux[:1].cpu().numpy(),
        oi[:1] if oi.ndim == 2 else oi,
    )
    client.register_plugin(ModelPlugin(*model_args, warm_up=warm_up), name=f"pipeline-model-{key}")
    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    log.info("Dask cluster ready: %d workers, each with the model", n_workers)
    if backend["name"] != "dask":  # (a LocalCluster's count was checked before the run)
        idle_workers(len(blocks), n_workers)
    in_flight = backend.get("max_in_flight") or 2 * n_workers
    x = job.data.x.cpu().numpy()
    aux = job.target.aux.cpu().numpy()

    def submit(b: Block):
        return client.submit(
            _dask_task,
            model_args,
            job.method.name,
            x[b.s0 : b.s1],
            job.target.kind,
            aux[b.s0 : b.s1],
            oi[b.s0 : b.s1] if oi.ndim == 2 else oi,
            b,
            sink if where == "workers" else None,
            job.memory_budget,
            _tf32(job.cfg),
            key=f"hessian-block-{key}-{b.index}",
            retries=backend.get("retries", 2),
            pure=False,
        )

    t0 = time.perf_counter()
    pending: Iterator[Block] = iter(blocks)
    ac = as_completed([submit(b) for b in _take(pending, in_flight)])
    if where == "workers":
        for fut in ac:
            on_written(fut.result())  # re-raises a task's error here
            for b in _take(pending, 1):
                ac.add(submit(b))
        return time.perf_counter() - t0
    if isinstance(sink, InPlaceSink):  # this process's writes are flushed by its group commits
        sink = dataclasses.replace(sink, flush=False)
    planned = {b.index: b for b in blocks}
    with BlockWriter(sink, on_written, torch.device("cpu")) as writer:
        for fut in ac:
            index, h, g, stats = fut.result()  # re-raises a task's error here
            del fut  # the worker's copy is released
            writer.put(planned[index], h, g, stats)  # waits while a block is queued
            for b in _take(pending, 1):
                ac.add(submit(b))
    return time.perf_counter() - t0


def copies_can_overlap(backend: dict[str, Any]) -> bool:
    """Whether the driver has a core to spare for copying shards while the workers compute.

    It has none when the run's own LocalCluster occupies every core: the copying then takes CPU
    from the workers (2 workers on 2 cores: 1.26-1.39x faster than 1 instead of 1.78x) and is
    better done after them.
    """
    if backend["name"] != "dask":
        return True
    busy = backend.get("n_workers", 2) * backend.get("threads_per_worker", 1)
    return busy < (os.cpu_count() or 1)


def workers_may_be_remote(backend: dict[str, Any]) -> bool:
    """Whether blocks may be written on another machine (an existing cluster): such workers
    flush their own writes, since the driver's flush covers only this machine's page cache."""
    return backend["name"] == "address"


def _take(it: Iterator[Block], n: int) -> list[Block]:
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out
