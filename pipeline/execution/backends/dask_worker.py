"""What runs inside a Dask worker: the worker's copy of the model, the per-block task, and the
probe that tells whether a worker sees the output directory."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from ...config.precision import tf32
from ...errors import PipelineError
from ...hessian.targets import Target
from ...store import BlockStats, block_stats
from ...store.blocks import host_array
from ...store.fingerprint import code_fingerprint, weights_fingerprint
from ...store.plan import Block
from ..job import ModelSpec
from ..outputs import Work

_WORKER_MODELS: dict[str, nn.Module] = {}  # per worker process: model key -> model


def _worker_model(
    key: str, spec: ModelSpec, device: str, threads: int, identity: tuple[str, str | None]
) -> nn.Module:
    """The worker's copy of the model, built on first use exactly as the driver built it
    (``ModelSpec.build``: seed, dtype, eval mode), and refused unless its weights and code have
    the driver's fingerprints ``identity``."""
    if key not in _WORKER_MODELS:
        torch.set_num_threads(max(1, threads))
        dev = device
        if device.startswith("cuda") and torch.cuda.is_available():
            dev = "cuda"  # dask-cuda pins one GPU per worker via CUDA_VISIBLE_DEVICES
        _WORKER_MODELS.clear()
        model = spec.build(dev)
        built = (weights_fingerprint(model), code_fingerprint(model, spec.model))
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


async def imported() -> None:
    """Nothing: a worker that unpickles this function imports torch and the pipeline with it
    (``DaskBackend.start_early``: while the driver builds the job; a coroutine, which Dask's
    ``Client.run`` can start without waiting for it)."""


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"


def block_task(
    model_args: tuple,
    work: Work,
    x: np.ndarray,
    kind: str,
    aux: np.ndarray,
    output_index: np.ndarray,
    block: Block,
    sink,
    budget: int | None,
    allow_tf32: bool = False,
) -> int | tuple[int, np.ndarray, np.ndarray | None, BlockStats]:
    """Compute one block and write it with ``sink``; returns its index. Without a sink
    (``backend.write_at=driver``) the block goes back to the driver instead: (index, hessian
    (S, K, R, D), gradient (S, K, D) or None, its statistics; or the arrays of a part of
    another ``output`` kind, None, None). Idempotent."""
    model = _worker_model(*model_args)
    device = next(iter(model.parameters()), torch.empty(0)).device
    target = Target(kind, torch.as_tensor(aux), output_index).to(device)
    xt = torch.as_tensor(x).to(device)
    with tf32(allow_tf32):
        h, g, stats = work.compute(model, xt, target, block, budget)
    if sink is not None:
        return sink.write(block, h, g, stats)
    if isinstance(h, dict):
        return block.index, h, None, None
    h = host_array(h)  # its own memory (not the staged buffer): it outlives this task
    grad = None if g is None else host_array(g)
    return block.index, h, grad, stats if stats is not None else block_stats(h, block.r0)


def sees(directory: str, marker: str) -> bool:
    """Whether this worker sees the driver's ``marker`` in ``directory`` and may write there."""
    return os.path.isfile(os.path.join(directory, marker)) and os.access(directory, os.W_OK)
