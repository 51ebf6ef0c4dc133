"""The backend interface, the registry of backends by name, and what every backend shares.

A backend decides where blocks are computed and written. Each implementation is a class that
subclasses :class:`Backend` and is registered under the name that ``backend=`` selects (as xarray
registers its ``BackendEntrypoint``\\ s): adding one (a dask-jobqueue cluster, say) is one module
that defines the class, its options dataclass (a subclass of ``BackendConf``) and
``conf/backend/<name>.yaml``. Nothing outside this package compares backend names.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from torch import Tensor

from ...config.schema import OPTIONS, BackendConf
from ...errors import PipelineError
from ...store import BlockStats
from ...store.plan import Block, Plan

if TYPE_CHECKING:
    from ..job import Job

OnWritten = Callable[[int], None]  # called in the driver with each written block's index


class Backend(ABC):
    """Where a run's blocks are computed and written.

    Its life in a run: :meth:`check` (before anything is created), :meth:`review` of the plan,
    then :meth:`execute`, which starts what it needs (a cluster, a connection), submits the blocks,
    has each written where it can be (on a worker or in this process) and closes what it
    started.
    """

    name: ClassVar[str]
    # blocks may be written on another machine, whose writes this process cannot flush
    remote_workers: ClassVar[bool] = False

    def __init__(self, options: BackendConf):
        self.options = options

    def check(self) -> None:
        """Refuse, in one line naming the config key, what cannot work (a missing device, an
        unreachable scheduler), before the run creates anything."""
        return None

    @property
    def device(self) -> torch.device:
        """Where blocks are computed, as seen from this process (the one-sample check runs
        there, and the file records its precision)."""
        return torch.device("cpu")

    def review(self, plan: Plan) -> None:
        """Say in one line what the plan leaves unused (idle workers)."""
        return None

    def copies_can_overlap(self) -> bool:
        """Whether this process has a core to spare for copying shards while blocks compute."""
        return True

    def start_early(self) -> contextlib.AbstractContextManager:
        """Start what ``execute`` will run on (a cluster) now, while this process builds the
        job; closed on leaving. Nothing to start by default."""
        return contextlib.nullcontext()

    @abstractmethod
    def execute(self, job: Job, blocks: list[Block], sink, on_written: OnWritten) -> float:
        """Compute ``blocks`` and have each written by ``sink`` (``sink.write(block, hessian,
        gradient, stats) -> index``); call ``on_written(index)`` here for each written block.

        Returns:
            seconds spent computing and writing blocks (start-up and shut-down excluded).
        """


BACKENDS: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: ``backend=<cls.name>`` selects ``cls``. Its options dataclass must be
    in ``pipeline.config.schema.OPTIONS["backend"]`` (a new backend adds it there)."""
    if cls.name not in OPTIONS["backend"]:
        raise TypeError(f"backend {cls.name!r} has no options dataclass in OPTIONS['backend']")
    BACKENDS[cls.name] = cls
    return cls


def backend_for(options: BackendConf) -> Backend:
    """The backend that ``options`` (the typed ``backend`` config) selects."""
    try:
        return BACKENDS[options.name](options)
    except KeyError:
        raise PipelineError(
            f"unknown backend {options.name!r}: choose one of {', '.join(BACKENDS)}", "backend"
        ) from None


def torch_device(name: str) -> torch.device:
    """``backend.device`` as a torch device that exists here."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise PipelineError(
            f"unknown device {name!r}: use cpu, cuda or cuda:N", "backend.device"
        ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError("backend.device=cuda but no CUDA device is available", "backend.device")
    return device


class BlockWriter:
    """Writes computed blocks on one background thread, so that writing overlaps computing.

    At most one block waits while one is written (its statistics are taken there too). On a GPU
    the block is copied into one of two page-locked host buffers on a separate stream
    (``non_blocking``): the copy overlaps the next block's compute, and the thread waits for the
    copy's event before it writes. Errors of the thread are raised by the next ``put`` or
    on leaving the ``with`` block.
    """

    def __init__(self, sink, on_written: OnWritten, device: torch.device):
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
        if not self.cuda or isinstance(h, dict):  # (the arrays of a part are on the host)
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
