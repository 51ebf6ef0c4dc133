"""The Dask backends: ``dask`` (a LocalCluster the run starts), ``dask_cuda`` (dask-cuda's
LocalCUDACluster) and ``address`` (an existing cluster). Workers compute blocks
(``dask_worker.block_task``) and write them where they can: each into the output directory when
every worker sees it, else this process writes them (``backend.write_at``, see :func:`write_at`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch

from ...errors import PipelineError
from ...hessian.allocator import one_heap
from ...store import InPlaceSink, probe_marker
from ...store.plan import Block, Plan
from .base import Backend, BlockWriter, OnWritten, register_backend
from .dask_worker import block_task, sees
from .memory import keep_malloc_defaults

log = logging.getLogger(__name__)


class DaskBackend(Backend):
    """What the Dask backends share: how blocks are submitted, written and counted."""

    # the number of workers is known before the run (a cluster it starts): reviewed with the plan
    workers_known_before: ClassVar[bool] = False

    @contextlib.contextmanager
    def client(self, early: bool = False) -> Iterator:
        """A ``distributed.Client``; what it started is closed on leaving. ``early``: started
        by ``start_early``, before this process has built the job or opened any file."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    _early: Any = None  # the client of ``start_early``, while it is open

    @contextlib.contextmanager
    def start_early(self) -> Iterator[None]:
        """Start (or connect to) the cluster now and have its workers import torch and the
        pipeline while this process builds the job, checks it and opens the result (3-4 s of a
        run, which the workers' start-up took after them before); ``execute`` runs on it."""
        from .dask_worker import imported

        with _driver_logs_quiet(), self.client(early=True) as client:
            client.run(imported, wait=False)
            self._early = client
            try:
                yield
            finally:
                self._early = None

    def execute(self, job, blocks: list[Block], sink, on_written: OnWritten) -> float:
        if self._early is not None:
            return self.run_on(self._early, job, blocks, sink, on_written)
        with _driver_logs_quiet(), self.client() as client:
            return self.run_on(client, job, blocks, sink, on_written)

    def run_on(self, client, job, blocks: list[Block], sink, on_written: OnWritten) -> float:
        """Submit blocks with a bounded number in flight; each worker writes its own blocks, or
        sends them to this process, which writes them (``backend.write_at``, see :func:`write_at`).

        Blocks sent here are written on one background thread (:class:`BlockWriter`); while it is
        behind, no block is fetched and no new one submitted, so this process holds at most three
        blocks (one written, one queued, one received) and the workers at most
        ``backend.max_in_flight`` finished ones: a slow disk slows the run, it does not fill memory.
        """
        from distributed import as_completed

        options = self.options
        where = write_at(client, options.write_at, sink.directory)
        identity = (job.model_fingerprint, job.code_fingerprint)
        key = job.model_fingerprint[:16] + str(job.cfg.dtype)
        model_args = (key, job.spec, options.device, options.threads_per_worker, identity)
        oi = job.target.output_index
        warm_up = (
            job.method.name,
            job.data.x[:1].cpu().numpy(),
            job.target.kind,
            job.target.aux[:1].cpu().numpy(),
            oi[:1] if oi.ndim == 2 else oi,
        )
        from .dask_plugin import ModelPlugin

        plugin = ModelPlugin(*model_args, warm_up=warm_up)
        client.register_plugin(plugin, name=f"pipeline-model-{key}")
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        log.info("Dask cluster ready: %d workers, each with the model", n_workers)
        if not self.workers_known_before:  # (else reviewed with the plan)
            idle_workers(len(blocks), n_workers)
        in_flight = options.max_in_flight or 2 * n_workers
        x = job.data.x  # read a block at a time, as it is submitted
        aux = job.target.aux.cpu().numpy()

        def submit(b: Block):
            return client.submit(
                block_task,
                model_args,
                job.work,
                x[b.s0 : b.s1].numpy(),
                job.target.kind,
                aux[b.s0 : b.s1],
                oi[b.s0 : b.s1] if oi.ndim == 2 else oi,
                b,
                sink if where == "workers" else None,
                job.memory_budget,
                job.cfg.method.tf32,
                key=f"hessian-block-{key}-{b.index}",
                retries=options.retries,
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


def write_at(client, asked: str, directory: str) -> str:
    """Who writes the blocks into ``directory`` (the sink's): ``"workers"`` or ``"driver"``.

    ``backend.write_at=auto`` decides before any block is computed, by a probe: this process
    creates a marker file in ``directory`` and asks every worker (``client.run``) whether it
    sees it; ``workers`` if all do, else ``driver`` (also when no worker has joined yet).
    ``workers`` is refused when a worker does not see it.

    Raises:
        PipelineError: ``write_at=workers`` and a worker cannot see ``directory``.
    """
    if asked == "driver":
        return "driver"
    marker = probe_marker(Path(directory))
    marker.touch()
    try:
        seen = client.run(sees, directory, marker.name, on_error="return")
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


def scheduler_address(options) -> str:
    """``backend.address``, or the address in ``backend.scheduler_file`` (read here: Dask's own
    reading waits for a missing file without end)."""
    if options.address:
        return options.address
    path = options.scheduler_file
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
def connect(options, address: str) -> Iterator:
    """A client of the scheduler at ``address``, connected within ``backend.connect_timeout_s``."""
    from distributed import Client

    timeout = options.connect_timeout_s
    key = "backend.address" if options.address else "backend.scheduler_file"
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


# NOTE: [forked workers]
# A spawned worker is a fresh interpreter that imports distributed, torch and the pipeline:
# 2.7 s of CPU each, which on 2 cores the driver paid for too (it builds the job meanwhile):
# a run of 2 workers took 3-4 s longer than the local backend. Forked from the driver, the
# workers have all of it already (dense D = 64, 20,000 samples: 8.6-9.5 s -> 4.9-5.5 s, local
# 4.4-5.0 s). A fork copies only the forking thread, so it is done only where it is safe:
# - when the run starts its own LocalCluster early (``start_early``): before the driver has
#   loaded data, built the model or opened a file (no HDF5 state, no writer thread, little
#   memory for the workers to share); a later start (a resume) and the nanny's restart of a
#   lost worker spawn;
# - with one torch thread a worker: GNU OpenMP hangs in a forked child that runs a parallel
#   region after its parent did (measured: a matrix product with 2 threads never returns);
# - without CUDA initialised in the driver, and where the platform can fork;
# - where the driver's threads share glibc's main heap alone, made so for its later threads
#   (``allocator.one_heap``: MALLOC_ARENA_MAX=1 from then on): a forked worker's threads take the
#   heaps its parent's threads had, and a task computing on such a heap (64 MiB at most, trimmed
#   apart) faults its large tensors in afresh (diagonals of 300,000 samples at D = 64 on 2
#   workers: 9.9 million page faults and 29 s of system time against 0.6 million and 3 s,
#   2.7x slower blocks), where spawned workers start with MALLOC_ARENA_MAX=1 (NOTE [malloc in
#   Dask workers]); a driver whose threads (torch's, an earlier cluster's) have heaps spawns;
# - each child is made what a spawned worker is: it drops the driver's logging handlers
#   (Hydra's console and file), so that a failed task is reported once, by the run, and its
#   thread pools (torch's, OpenBLAS's) get one thread, as ``OMP_NUM_THREADS=1`` gives a spawned
#   one (they had the driver's 2).
# ``backend.fork_workers=false`` spawns them always.

_FORKING = threading.Event()  # set while forked_workers starts a cluster


def can_fork(options) -> bool:
    """Whether this run's LocalCluster may fork its workers (see NOTE [forked workers])."""
    import multiprocessing

    return (
        options.fork_workers
        and options.threads_per_worker == 1
        and "fork" in multiprocessing.get_all_start_methods()
        and not torch.cuda.is_initialized()
        and one_heap()
    )


def _as_spawned(blas_limits) -> None:
    """In a forked child: leave the driver's log handlers (console, the run's log file) to it
    and run its thread pools with one thread (see NOTE [forked workers])."""
    if not _FORKING.is_set():
        return
    for handler in list(logging.root.handlers):
        logging.root.removeHandler(handler)
    torch.set_num_threads(1)
    if blas_limits is not None:
        blas_limits(1)


@functools.cache
def _hook_forked_children() -> None:
    """``_as_spawned`` run in every child forked from now on (once a process); threadpoolctl
    (scikit-learn's dependency, for numpy's BLAS) imported here, before any fork."""
    blas_limits = None
    with contextlib.suppress(ImportError):
        from threadpoolctl import threadpool_limits as blas_limits
    os.register_at_fork(after_in_child=functools.partial(_as_spawned, blas_limits))


@contextlib.contextmanager
def forked_workers(enabled: bool) -> Iterator[None]:
    """Worker processes started inside are forked from this one (Dask's
    ``distributed.worker.multiprocessing-method``), if ``enabled``; see NOTE [forked workers]."""
    if not enabled:
        yield
        return
    import warnings

    import dask

    _hook_forked_children()
    with (
        dask.config.set({"distributed.worker.multiprocessing-method": "fork"}),
        warnings.catch_warnings(),  # Python >= 3.12 warns of any fork beside threads
    ):
        warnings.filterwarnings("ignore", r".*fork\(\) may lead to deadlocks", DeprecationWarning)
        _FORKING.set()
        try:
            yield
        finally:
            _FORKING.clear()


def _quiet(record: logging.LogRecord) -> bool:
    """Whether a record reaches the user while a Dask cluster runs: Dask's own from WARNING up,
    its event loop's (tornado, asyncio: a callback that raised while Ctrl-C closed the cluster)
    only when CRITICAL, everything else."""
    if record.name.startswith("distributed"):
        return record.levelno >= logging.WARNING
    if record.name.startswith(("tornado", "asyncio")):
        return record.levelno >= logging.CRITICAL
    return True


@contextlib.contextmanager
def _driver_logs_quiet() -> Iterator[None]:
    """The scheduler and client in this process log every connection at INFO, and a connection
    that closes while the cluster shuts down with its traceback ("Batched Comm Closed"; after
    Ctrl-C, tornado's "Exception in callback" too): noise for a user, whose run reports what
    matters in its own lines. Dask's warnings and errors are kept (``_quiet``);
    ``HYDRA_FULL_ERROR=1`` keeps everything. (Dask sets its loggers' levels itself, so
    the records are filtered where they are written: at the root logger's handlers.)"""
    handlers = [] if os.environ.get("HYDRA_FULL_ERROR") == "1" else list(logging.root.handlers)
    for h in handlers:
        h.addFilter(_quiet)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(_quiet)


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


@contextlib.contextmanager
def started(cluster_factory, fork: bool = False) -> Iterator:
    """A client of the cluster that ``cluster_factory()`` starts (without the nanny's malloc
    settings, with Ctrl-C left to the run; its workers forked from this process if ``fork``,
    see :func:`forked_workers`); both are closed on leaving."""
    from distributed import Client

    with keep_malloc_defaults(), _workers_ignore_ctrl_c(), forked_workers(fork):
        cluster = cluster_factory()
    # NOTE [results direct]: with ``write_at=driver`` every block is sent to this process. A
    # client gathers through the scheduler by default (it may not reach the workers of a cluster
    # elsewhere), and a LocalCluster's scheduler runs in this process: each block crossed TCP
    # twice, worker to scheduler to client. The workers of our own cluster are on this machine,
    # so the client fetches from them directly. Dense D = 64, 200,000 samples (3.3 GB), 2
    # workers, whole command, interleaved: 16.6 and 18.8 s before, 16.1 and 14.4 s after (system
    # time 6.7-8.2 s before, 3.9-5.4 s after). A cluster given by address keeps the default.
    with cluster, Client(cluster, direct_to_workers=True) as client:
        if client.dashboard_link and _has_bokeh():
            log.info("Dask dashboard: %s", client.dashboard_link)
        yield client


def dashboard() -> str | None:
    return ":0" if _has_bokeh() else None


def idle_workers(n_blocks: int, n_workers: int) -> None:
    """One line when a Dask job has fewer blocks than workers."""
    if n_blocks < n_workers:
        log.warning(
            "%d block(s) for %d Dask workers: %d worker(s) will have nothing to do; a smaller "
            "storage.block_rows or storage.block_mb splits the work",
            n_blocks,
            n_workers,
            n_workers - n_blocks,
        )


@register_backend
class DaskLocal(DaskBackend):
    """``backend=dask``: a ``distributed.LocalCluster`` of ``backend.n_workers`` processes."""

    name = "dask"
    workers_known_before = True

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def review(self, plan: Plan) -> None:
        idle_workers(len(plan.blocks), self.options.n_workers)

    def copies_can_overlap(self) -> bool:
        """No core to spare when the run's own cluster occupies every one: copying shards then
        takes CPU from the workers (2 workers on 2 cores: 1.26-1.39x faster than 1 instead of
        1.78x) and is better done after them."""
        busy = self.options.n_workers * self.options.threads_per_worker
        return busy < (os.cpu_count() or 1)

    def client(self, early: bool = False):
        from distributed import LocalCluster

        threads = self.options.threads_per_worker
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        return started(
            lambda: LocalCluster(
                n_workers=self.options.n_workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=dashboard(),
                env=env,
                silence_logs=_worker_log_level(),
            ),  # fmt: skip
            fork=early and can_fork(self.options),
        )


@register_backend
class DaskCuda(DaskBackend):
    """``backend=dask_cuda``: dask-cuda's ``LocalCUDACluster``, one worker per visible GPU."""

    name = "dask_cuda"

    def check(self) -> None:
        _cuda_cluster_class()
        if not torch.cuda.is_available():
            raise PipelineError("backend=dask_cuda but no CUDA device is available", "backend")

    def client(self, early: bool = False):
        cluster = _cuda_cluster_class()
        threads = self.options.threads_per_worker
        return started(lambda: cluster(threads_per_worker=threads, dashboard_address=dashboard()))


def _cuda_cluster_class():
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as err:
        raise PipelineError(
            "backend=dask_cuda needs dask-cuda: pip install dask-cuda", "backend"
        ) from err
    return LocalCUDACluster


@register_backend
class DaskAddress(DaskBackend):
    """``backend=address``: an existing cluster, neither started nor stopped by the run. Its
    workers may run on other machines, so they flush their own writes."""

    name = "address"
    remote_workers = True

    def check(self) -> None:
        with connect(self.options, scheduler_address(self.options)):
            pass

    def client(self, early: bool = False):
        return connect(self.options, scheduler_address(self.options))


def _take(it: Iterator[Block], n: int) -> list[Block]:
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out
