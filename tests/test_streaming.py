"""Streaming at engine speed: direct writes, blocks computed in pieces, start-up costs.

Direct writes (NOTE [direct I/O] in ``pipeline.store.blocks``) are checked byte for byte against
the same pieces written through the page cache; blocks computed in pieces (NOTE [pieces] in
``pipeline.execution.outputs``) against one call and against float64; whole runs with both
against the shard path and the engine.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch

from pipeline import hessian, make_target
from pipeline.execution import outputs
from pipeline.execution.run import run
from pipeline.store import block_stats, blocks
from pipeline.store.durable import preallocate
from pipeline.store.plan import Block

from .configs import compose_config, config, read_hessian
from .nets import mlp

PAGE = blocks.DIRECT_ALIGN

# name: (where the run starts, sizes of its buffers): aligned or not at either end, one buffer or
# many, shorter than a page, crossing staging segments (DIRECT_SEGMENT is 3 pages here).
RUNS = {
    "aligned": (PAGE, [4 * PAGE]),
    "unaligned start": (PAGE + 100, [4 * PAGE]),
    "unaligned end": (2 * PAGE, [4 * PAGE + 7]),
    "both ends, many buffers": (517, [1000, 3 * PAGE, 13, 2 * PAGE + 555, 9000]),
    "within one page": (PAGE + 10, [300, 200]),
    "across segments": (3, [PAGE * 7 + 11, PAGE * 5]),
}


def _pieces(start: int, sizes: list[int], seed: int) -> list[tuple[int, memoryview]]:
    rng = np.random.default_rng(seed)
    out, at = [], start
    for n in sizes:
        out.append((at, memoryview(rng.integers(0, 255, n, dtype=np.uint8)).cast("B")))
        at += n
    return out


def _first_difference(a: bytes, b: bytes) -> str:
    if len(a) != len(b):
        return f"lengths {len(a)} != {len(b)}"
    diff = np.flatnonzero(np.frombuffer(a, np.uint8) != np.frombuffer(b, np.uint8))
    return f"{len(diff)} bytes differ, first at offset {diff[0]}" if len(diff) else "equal"


@pytest.mark.parametrize("case", list(RUNS))
def test_direct_writes_put_every_byte_in_place(tmp_path, monkeypatch, case):
    """A run written with O_DIRECT (whole pages) and the page cache (its ends) leaves the file
    exactly as plain writes do; the bytes around it are untouched."""
    monkeypatch.setattr(blocks, "DIRECT_SEGMENT", 3 * PAGE)
    monkeypatch.setattr(blocks, "DIRECT_AT_LEAST", 0)
    monkeypatch.setattr(blocks, "_STAGING", type(blocks._STAGING)())  # a 3-page staging buffer
    start, sizes = RUNS[case]
    size = start + sum(sizes) + 3 * PAGE
    results = {}
    for how in ("plain", "direct"):
        path = tmp_path / f"{how}.bin"
        path.write_bytes(b"\xaa" * size)
        fd = os.open(path, os.O_WRONLY)
        direct = blocks._open_direct(str(path)) if how == "direct" else None
        if how == "direct" and direct is None:
            pytest.skip(f"O_DIRECT is refused under {tmp_path}")
        try:
            pieces = _pieces(start, sizes, seed=len(case))
            if direct is not None:
                taken = blocks._write_direct(fd, direct, [p for _, p in pieces], start)
                expect_direct = (start + sum(sizes)) // PAGE - -(-start // PAGE) >= 1
                assert taken == expect_direct, f"{case}: direct path taken: {taken}"
                if not taken:
                    blocks._write_runs(fd, pieces)
            else:
                blocks._write_runs(fd, pieces)
        finally:
            os.close(fd)
            if direct is not None:
                os.close(direct)
        results[how] = path.read_bytes()
    assert results["direct"] == results["plain"], (
        f"{case}: {_first_difference(results['direct'], results['plain'])}"
    )
    assert results["plain"][:start] == b"\xaa" * start, f"{case}: bytes before the run changed"


def test_a_direct_write_refused_at_write_time_goes_through_the_page_cache(tmp_path, monkeypatch):
    """Some file systems accept O_DIRECT at open and refuse the write (EINVAL): the run is then
    written through the page cache, whole."""
    path = tmp_path / "f.bin"
    path.write_bytes(b"\0" * (16 * PAGE))
    real = os.pwrite

    def refuse(fd, data, at):
        if fd == refused[0]:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, at)

    fd = os.open(path, os.O_WRONLY)
    direct = os.open(path, os.O_WRONLY)  # stands in for an O_DIRECT descriptor
    refused = [direct]
    monkeypatch.setattr(blocks.os, "pwrite", refuse)
    monkeypatch.setattr(blocks, "DIRECT_AT_LEAST", 0)
    pieces = _pieces(100, [5 * PAGE], seed=1)
    try:
        blocks._write_runs(fd, list(pieces), direct)
    finally:
        os.close(fd)
        os.close(direct)
    data = path.read_bytes()
    assert data[100 : 100 + 5 * PAGE] == bytes(pieces[0][1]), "the refused run was not written"


def test_preallocation_allocates_a_sparse_file_without_changing_it(tmp_path):
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as fh:
        fh.seek(64 * PAGE - 1)
        fh.write(b"\x01")
    before = path.read_bytes()
    if not preallocate(path):
        pytest.skip(f"fallocate is not supported under {tmp_path}")
    st = os.stat(path)
    assert st.st_size == 64 * PAGE and path.read_bytes() == before
    assert st.st_blocks * 512 >= st.st_size, f"{st.st_blocks * 512} bytes allocated"


# ---- blocks in pieces ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_block_computed_in_pieces_equals_one_call_and_float64(monkeypatch, dtype):
    """Pieces of 3 samples (the last one short): the Hessians equal one call's, the statistics
    equal those of the whole block, and the rows match float64 autograd."""
    torch.manual_seed(0)
    net = mlp(6).to(dtype).eval()
    x = torch.randn(8, 6, dtype=dtype)
    target = make_target([2], net(x), None, "cross_entropy")
    work = outputs.Work(compose_config("output=dense").output, "structured", "auto")
    block = Block(0, 0, 8, 0, 6)
    whole = work.compute(net, x, target, block, None)
    monkeypatch.setattr(outputs, "PIECE_BYTES", 3 * 6 * 6 * x.element_size())
    monkeypatch.setattr(outputs, "PIECE_SAMPLES", 1)
    h, g, stats = work.compute(net, x, target, block, None)
    eps = 1e-5 if dtype == torch.float32 else 1e-12  # of the largest entry
    tol = {"rtol": eps, "atol": eps * whole[0].abs().max().item()}
    torch.testing.assert_close(h, whole[0], **tol, msg=lambda m: f"pieces vs one call: {m}")
    torch.testing.assert_close(g, whole[1], **tol)
    expected = block_stats(h.numpy(), 0)
    for name in ("diagonal", "row_norm", "sums"):
        np.testing.assert_allclose(getattr(stats, name), getattr(expected, name), rtol=1e-6,
                                   err_msg=f"statistics {name}")  # fmt: skip
    net64, x64 = mlp(6).double().eval(), x.double()
    net64.load_state_dict(net.state_dict())
    for n in range(len(x)):
        ref = torch.autograd.functional.hessian(lambda v: net64(v[None])[0, 2], x64[n])
        err = (h[n, 0].double() - ref).abs().max().item() / ref.abs().max().item()
        assert err < (1e-5 if dtype == torch.float32 else 1e-12), f"sample {n}: {err:.1e}"


def test_runs_with_direct_writes_and_pieces_equal_the_shard_path(tmp_path, monkeypatch):
    """Every run of a block through O_DIRECT, blocks computed 5 samples at a time: the file
    equals the shard path's (lzf) and the engine's Hessians."""
    monkeypatch.setattr(blocks, "DIRECT_AT_LEAST", 0)
    monkeypatch.setattr(outputs, "PIECE_BYTES", 5 * 64 * 64 * 4)
    monkeypatch.setattr(outputs, "PIECE_SAMPLES", 1)
    job = ("data=synthetic", "data.shape=[64]", "data.n_samples=40", "model=custom",
           "+model.net._target_=tests.nets.mlp", "+model.net.d=64",
           "storage.block_mb=1")  # fmt: skip
    direct, sharded = tmp_path / "direct.h5", tmp_path / "sharded.h5"
    result = run(config(*job, f"storage.path={direct}"))
    run(config(*job, "storage.compression=lzf", f"storage.path={sharded}"))
    assert result.blocks_computed > 1 and result.samples_computed == 40
    with h5py.File(direct) as f, h5py.File(sharded) as g:
        for name in f:
            np.testing.assert_array_equal(f[name][()], g[name][()], err_msg=name)
        x = torch.as_tensor(f["inputs"][()])
    expected = hessian(mlp(64).eval(), x, [2]).numpy()
    np.testing.assert_allclose(read_hessian(direct), expected, rtol=0, atol=1e-6)


def test_the_run_reports_samples_per_second(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline"):
        result = run(config("data=synthetic", "data.n_samples=24", f"storage.path={tmp_path}/h.h5"))
    assert result.samples_computed == 24 and result.samples_per_second > 0
    assert f"{result.samples_per_second:.0f} samples/s" in caplog.text


# ---- start-up -----------------------------------------------------------------------------


def test_a_first_call_imports_neither_dynamo_nor_dask():
    """``import pipeline`` and a first ``hessian()`` on the graph path import neither
    ``torch._dynamo`` (1.4 s; NOTE [dynamo import]) nor ``dask.array`` or ``distributed``."""
    code = textwrap.dedent(
        """
        import sys, torch, pipeline
        net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
        pipeline.hessian(net, torch.randn(4, 5), [1])
        from pipeline.execution.run import run_overrides
        print(sorted(m for m in ("torch._dynamo", "dask.array", "distributed") if m in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
