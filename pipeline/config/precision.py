"""Opt-in TF32 matmuls on GPU (``method.tf32=true``) and how far they move the result.

TF32 keeps float32's range but rounds matmul inputs to 10 mantissa bits: faster on Ampere and
newer cards, with a relative error near 1e-3 instead of 1e-7. The run measures that error on its
own model before computing (one sample, a few rows, TF32 against full float32) and records it in
the file's attributes, so nobody uses reduced precision without knowing what it cost.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

log = logging.getLogger(__name__)

CHECK_ROWS = 64  # Hessian rows of the first sample compared with and without TF32


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Allow (or forbid) TF32 in CUDA matmuls and convolutions inside the block."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tf32_error(compute, model, x, target, rows, budget: int) -> float:
    """max |H_tf32 - H_fp32| / max |H_fp32| of ``compute`` (a ``Method.compute``) on ``x``."""
    with tf32(True):
        fast, _ = compute(model, x, target, rows, budget)
    with tf32(False):
        exact, _ = compute(model, x, target, rows, budget)
    scale = exact.abs().max().clamp_min(torch.finfo(exact.dtype).tiny)
    return float((fast - exact).abs().max() / scale)


def tf32_report(job, device: torch.device) -> dict[str, Any]:
    """Attributes for the output file: whether TF32 was used, and its measured error."""
    if not job.cfg.method.tf32:
        return {}
    if device.type != "cuda" or job.data.x.dtype != torch.float32:
        log.warning("method.tf32=true has no effect here (it needs float32 on a CUDA device)")
        return {"tf32": "ignored: needs float32 on a CUDA device"}
    rows = torch.arange(min(CHECK_ROWS, job.dim), device=device)
    err = tf32_error(
        job.method.compute,
        job.model.to(device),
        job.data.x[:1].to(device),
        job.target.subset(0, 1).to(device),
        rows,
        job.memory_budget,
    )
    log.info("TF32: max relative error against float32 %.2e (sample 0, %d rows)", err, len(rows))
    return {"tf32": "on", "tf32_max_rel_error": err, "tf32_checked_rows": len(rows)}
