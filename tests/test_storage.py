"""Storage: the background committer, and blocks written in place against the shard path."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from pipeline import hessian
from pipeline.run import run
from pipeline.storage import Syncer

from .configs import config, read_hessian
from .nets import mlp


def test_commits_are_done_after_wait(tmp_path):
    syncer = Syncer()
    try:
        for i in range(20):
            tmp = tmp_path / f".{i}.partial"
            tmp.write_text(str(i))
            syncer.commit(tmp, tmp_path / f"{i}.txt")
        syncer.wait()
    finally:
        syncer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{i}.txt" for i in range(20))
    assert [(tmp_path / f"{i}.txt").read_text() for i in range(20)] == [str(i) for i in range(20)]


def test_a_failed_commit_is_raised(tmp_path):
    syncer = Syncer()
    try:
        syncer.commit(tmp_path / ".missing.partial", tmp_path / "missing")
        with pytest.raises(FileNotFoundError):
            syncer.wait()
    finally:
        syncer.close()
    assert list(tmp_path.iterdir()) == []


def test_flushes_of_a_growing_file(tmp_path):
    growing = tmp_path / "growing"
    syncer = Syncer()
    try:
        with growing.open("wb") as fh:
            for _ in range(50):
                fh.write(b"\1" * 4096)
                fh.flush()
                syncer.flush(growing)
        syncer.wait()
    finally:
        syncer.close()
    assert growing.stat().st_size == 50 * 4096


# ---- Writing blocks in place (backend=local) against the shard path, edge chunks included ----

EDGES = {
    "rows": ("data.shape=[100]", "+model.net.d=100", "data.n_samples=3", "storage.block_rows=30"),
    "samples": ("data.shape=[64]", "+model.net.d=64", "data.n_samples=40"),
}


@pytest.mark.parametrize("edge", list(EDGES))
def test_in_place_writes_equal_the_shard_path(tmp_path, edge):
    """Edge chunks (rows past D, samples past N) are padded in the file; the values read back
    equal those of the shard path (lzf compression takes it) and of the engine."""
    job = ("data=synthetic", "model=custom", "+model.net._target_=tests.nets.mlp", *EDGES[edge])
    direct, sharded = tmp_path / "direct.h5", tmp_path / "sharded.h5"
    run(config(*job, f"storage.path={direct}"))
    run(config(*job, "storage.compression=lzf", f"storage.path={sharded}"))
    with h5py.File(direct) as f, h5py.File(sharded) as g:
        assert f["hessian"].chunks == g["hessian"].chunks
        assert f["hessian"].compression is None and g["hessian"].compression == "lzf"
        for name in ("hessian", "gradient", "inputs", "outputs"):
            np.testing.assert_array_equal(f[name][()], g[name][()], err_msg=name)
        x = torch.as_tensor(f["inputs"][()])
    net = mlp(x.shape[1]).eval()
    expected = hessian(net, x, [2]).numpy()
    np.testing.assert_allclose(read_hessian(direct), expected, rtol=0, atol=1e-6)


def test_resume_across_backends(tmp_path):
    """Blocks a Dask run committed as shards are copied in by a local resume (and the other way
    round, the local run's in-place file is dropped and its blocks recomputed)."""
    job = ("data=synthetic", "data.shape=[32]", "data.n_samples=4", "storage.block_rows=8",
           "model=custom", "+model.net._target_=tests.nets.mlp", "+model.net.d=32")  # fmt: skip
    ref = tmp_path / "ref.h5"
    run(config(*job, f"storage.path={ref}"))
    for first, second in (("backend=dask", "backend=local"), ("backend=local", "backend=dask")):
        path = tmp_path / f"{first[8:]}-then-{second[8:]}.h5"
        # a complete first run whose file is then removed leaves committed blocks behind
        run(config(*job, first, "storage.keep_shards=true", f"storage.path={path}"))
        path.unlink()
        res = run(config(*job, second, "storage.mode=resume", f"storage.path={path}"))
        expected_reused = 16 if first == "backend=dask" else 0
        assert res.blocks_reused == expected_reused, (first, second, res)
        np.testing.assert_array_equal(read_hessian(path), read_hessian(ref), err_msg=path.name)
