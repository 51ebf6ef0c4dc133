"""The same numbers on a GPU: every method, the local backend on cuda, dask_cuda, TF32's error.

Marked ``gpu`` (deselected by default; ``make test-gpu`` runs them) and skipped without CUDA.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from pipeline import hessian, make_target
from pipeline.execution.run import run
from pipeline.hessian import replay
from pipeline.hessian.methods import METHODS
from pipeline.hessian.support import analyze

from .configs import config, read_hessian
from .model_zoo import ZOO, ZooModel
from .nets import mlp
from .test_no_sync import CASES as NO_SYNC_CASES
from .zoo import assert_close_to_max

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

JOB = ("data=synthetic", "data.shape=[64]", "data.n_samples=6", "storage.block_rows=16",
       "model=custom", "+model.net._target_=tests.nets.mlp", "+model.net.d=64")  # fmt: skip


@pytest.fixture(scope="module")
def cpu_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cpu") / "h.h5"
    run(config(*JOB, "dtype=float64", f"storage.path={path}"))
    return path


@pytest.fixture(scope="module")
def cpu_result(cpu_file):
    return read_hessian(cpu_file)


def assert_same_statistics(path, cpu_file, what: str) -> None:
    """Gradients and the statistics taken from the blocks (written from page-locked buffers on
    the GPU paths) equal those of the CPU run."""
    with h5py.File(path) as f, h5py.File(cpu_file) as g:
        for name in ("gradient", "diagonal", "row_norm", "trace", "frobenius"):
            np.testing.assert_allclose(f[name][()], g[name][()], rtol=1e-9, atol=1e-12,
                                       err_msg=f"{what}: {name}")  # fmt: skip
        assert f.attrs["nonfinite_entries"] == 0 and (f["nonfinite"][()] == 0).all()


@pytest.mark.parametrize("method", ["auto", *METHODS])
def test_every_method_on_cuda_matches_the_cpu_float64_result(method):
    torch.manual_seed(0)
    net, x = mlp(64).eval(), torch.randn(4, 64)
    target = make_target([0, 3], net(x).detach())
    if method != "auto" and METHODS[method].unsupported(analyze(net, x, target)) is not None:
        pytest.skip(f"{method} does not support the net")
    ref = hessian(net.double(), x.double(), [0, 3])
    got = hessian(net.float().cuda(), x.cuda(), [0, 3], method=method)
    assert_close_to_max(got.cpu().double(), ref, 1e-4, what=f"{method} on cuda")


@pytest.mark.parametrize("entry", ZOO, ids=[z.name for z in ZOO])
def test_zoo_on_cuda_matches_the_cpu_float64_result(entry: ZooModel):
    torch.manual_seed(0)
    net, x = entry.small().eval(), torch.randn(3, *entry.small_shape)
    kw = {"labels": torch.tensor([0, 3, 1])} if entry.outputs == "loss" else {}
    ref = hessian(net.double(), x.double(), entry.outputs, **kw)
    kw = {k: v.cuda() for k, v in kw.items()}
    got = hessian(net.float().cuda(), x.cuda(), entry.outputs, **kw)
    assert_close_to_max(got.cpu().double(), ref, 1e-4, what=f"{entry.name} on cuda")


@pytest.mark.parametrize("name", NO_SYNC_CASES)
def test_no_host_synchronisation_inside_hessian(name, monkeypatch):
    """torch.cuda.set_sync_debug_mode('error') raises at any synchronising call."""
    monkeypatch.setattr(replay, "TRACE_COST", 0.0)  # the second call is traced
    factory, shape, outputs = NO_SYNC_CASES[name]
    torch.manual_seed(0)
    model, x = factory().eval().cuda(), torch.randn(4, *shape, device="cuda")
    hessian(model, x, outputs)  # the first call analyses the model
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        hessian(model, x, outputs)  # traced (pipeline/hessian/replay.py)
        hessian(model, x, outputs)  # replayed
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_local_backend_on_cuda_equals_cpu(tmp_path, cpu_result, cpu_file):
    path = tmp_path / "h.h5"  # 24 blocks through the two page-locked buffers
    run(config(*JOB, "dtype=float64", "backend.device=cuda", f"storage.path={path}"))
    assert_close(read_hessian(path), cpu_result, 1e-10, "backend.device=cuda")
    assert_same_statistics(path, cpu_file, "backend.device=cuda")


def test_dask_cuda_backend_equals_cpu(tmp_path, cpu_result, cpu_file):
    pytest.importorskip("dask_cuda")
    path = tmp_path / "h.h5"
    run(config(*JOB, "dtype=float64", "backend=dask_cuda", f"storage.path={path}"))
    assert_close(read_hessian(path), cpu_result, 1e-10, "backend=dask_cuda")
    assert_same_statistics(path, cpu_file, "backend=dask_cuda")


def test_tf32_error_is_measured_and_recorded(tmp_path, cpu_result):
    path = tmp_path / "h.h5"
    run(config(*JOB, "backend.device=cuda", "method.tf32=true", f"storage.path={path}"))
    with h5py.File(path) as f:
        assert f.attrs["tf32"] == "on"
        err = float(f.attrs["tf32_max_rel_error"])
    assert 0 <= err < 1e-2, err
    assert_close(read_hessian(path).astype(np.float64), cpu_result, 5e-2, "TF32 result")


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float, what: str) -> None:
    assert_close_to_max(torch.as_tensor(actual), torch.as_tensor(expected), rtol, what)
