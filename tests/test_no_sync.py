"""No host synchronisation inside ``hessian()`` once a model has been analysed: on a GPU such a
call queues its kernels without waiting. On the CPU the profile of a call must hold no operation
that reads a device value back (``item``, ``is_nonzero``, ``nonzero``, ``_local_scalar_dense``).
The GPU variant (``torch.cuda.set_sync_debug_mode``) is in ``tests/test_gpu.py``."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import pipeline
from pipeline.hessian import replay
from tests.model_zoo import ZOO_BY_NAME, MnistNet

SYNCING = {"aten::item", "aten::is_nonzero", "aten::nonzero", "aten::_local_scalar_dense"}


def tanh_mlp(d: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 10))  # fmt: skip


CASES = {
    "tanh_mlp": (lambda: tanh_mlp(64), (64,), [2]),
    "tanh_mlp_all_logits": (lambda: tanh_mlp(64), (64,), "all"),
    "lenet5": (ZOO_BY_NAME["lenet5"].small, ZOO_BY_NAME["lenet5"].small_shape, [1]),
    "mnist_relu_logit": (ZOO_BY_NAME["mnist_relu"].small, ZOO_BY_NAME["mnist_relu"].small_shape,
                         [3]),
    "transformer": (ZOO_BY_NAME["transformer"].small, ZOO_BY_NAME["transformer"].small_shape, [0]),
    # the local schedule, with patches through both convolutions and the max pool
    "mnist_tanh_local": (lambda: MnistNet("tanh", side=14, c1=3, c2=4, hidden=8), (1, 14, 14),
                         [1]),
}  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_a_call_reads_nothing_back_from_the_device(name, monkeypatch):
    monkeypatch.setattr(replay, "TRACE_COST", 0.0)  # the second call is traced
    factory, shape, outputs = CASES[name]
    torch.manual_seed(0)
    model, x = factory().eval(), torch.randn(4, *shape)
    with torch.no_grad():
        pipeline.hessian(model, x, outputs)  # the first call analyses the model
        for call in ("traced", "replayed"):  # the second call is traced, later ones replayed
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                pipeline.hessian(model, x, outputs)
            found = sorted({e.name for e in prof.events()} & SYNCING)
            assert not found, f"host synchronisation inside the {call} hessian(): {found}"
