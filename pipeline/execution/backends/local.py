"""``backend=local``: blocks in order in this process, on ``backend.device``."""

from __future__ import annotations

import time

import torch

from ...config.precision import tf32
from ...hessian.allocator import large_buffers_reused
from ...store.plan import Block
from .base import Backend, BlockWriter, OnWritten, register_backend, torch_device


@register_backend
class Local(Backend):
    """One process, blocks in order; each is written on a background thread while the next one
    computes (see :class:`~pipeline.execution.backends.base.BlockWriter`)."""

    name = "local"

    def check(self) -> None:
        torch_device(self.options.device)

    @property
    def device(self) -> torch.device:
        return torch_device(self.options.device)

    def execute(self, job, blocks: list[Block], sink, on_written: OnWritten) -> float:
        t0 = time.perf_counter()
        device = self.device
        model = job.model.to(device)
        x = job.data.x  # read a block at a time (pipeline.inputs.data.Samples)
        target = job.target.to(device)
        with large_buffers_reused(), BlockWriter(sink, on_written, device) as writer:
            for b in blocks:
                xb = x[b.s0 : b.s1].to(device)
                with tf32(job.cfg.method.tf32):
                    h, g, stats = job.work.compute(
                        model, xb, target.subset(b.s0, b.s1), b, job.memory_budget
                    )
                writer.put(b, h, g, stats)
        return time.perf_counter() - t0
