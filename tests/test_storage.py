"""The result writer: in-place writes against shards, statistics from blocks, completeness,
batched commits, and runs that fail or are refused leaving nothing behind."""

from __future__ import annotations

import logging
import threading

import h5py
import numpy as np
import pytest
import torch

from pipeline import hessian
from pipeline.errors import PipelineError
from pipeline.execution.backends.dask import DaskLocal
from pipeline.execution.backends.local import Local
from pipeline.execution.run import run
from pipeline.store import InPlaceSink, ResultNames, ResultWriter, block_stats
from pipeline.store.durable import Background
from pipeline.store.plan import make_plan
from pipeline.store.statistics import reduce_sums

from .configs import committed_blocks, config, read_hessian
from .nets import mlp


def test_background_calls_run_in_order_and_errors_are_raised(tmp_path):
    bg = Background()
    try:
        for i in range(20):
            bg.submit((tmp_path / f"{i}.txt").write_text, str(i))
        bg.wait()
        bg.submit((tmp_path / "missing" / "x").write_text, "x")
        with pytest.raises(FileNotFoundError):
            bg.wait()
    finally:
        bg.close()
    assert [(tmp_path / f"{i}.txt").read_text() for i in range(20)] == [str(i) for i in range(20)]


# A small smooth job: (samples, D, block rows) chosen so that blocks hold whole Hessians or split
# rows, and edge chunks (rows past D, samples past N) occur.
def job(d: int, n: int, *extra: str) -> tuple[str, ...]:
    return ("data=synthetic", f"data.shape=[{d}]", f"data.n_samples={n}", "model=custom",
            "+model.net._target_=tests.nets.mlp", f"+model.net.d={d}", *extra)  # fmt: skip


EDGES = {
    "rows": job(100, 3, "storage.block_rows=30"),
    "samples": job(64, 40),
}


@pytest.mark.parametrize("edge", list(EDGES))
def test_in_place_writes_equal_the_shard_path(tmp_path, edge):
    """Edge chunks (rows past D, samples past N) are written partly; the values read back equal
    those of the shard path (lzf compression takes it) and of the engine."""
    direct, sharded = tmp_path / "direct.h5", tmp_path / "sharded.h5"
    run(config(*EDGES[edge], f"storage.path={direct}"))
    run(config(*EDGES[edge], "storage.compression=lzf", f"storage.path={sharded}"))
    with h5py.File(direct) as f, h5py.File(sharded) as g:
        assert f["hessian"].chunks == g["hessian"].chunks
        assert f["hessian"].compression is None and g["hessian"].compression == "lzf"
        assert sorted(f) == sorted(g)
        for name in f:
            np.testing.assert_array_equal(f[name][()], g[name][()], err_msg=name)
        x = torch.as_tensor(f["inputs"][()])
    net = mlp(x.shape[1]).eval()
    expected = hessian(net, x, [2]).numpy()
    np.testing.assert_allclose(read_hessian(direct), expected, rtol=0, atol=1e-6)


def test_resume_across_write_strategies(tmp_path):
    """Blocks committed as shards (compression) are written into the file by an in-place resume;
    the other way round, the in-place file is dropped and its blocks are recomputed."""
    base = job(32, 4, "storage.block_rows=8")
    ref = tmp_path / "ref.h5"
    run(config(*base, f"storage.path={ref}"))
    shards, in_place = "storage.compression=lzf", "storage.compression=null"
    for first, second, reused in ((shards, in_place, 16), (in_place, shards, 0)):
        path = tmp_path / f"{first == shards}-then-{second == shards}.h5"
        # a complete first run whose file is then removed leaves committed blocks behind
        run(config(*base, first, "storage.keep_shards=true", f"storage.path={path}"))
        path.unlink()
        res = run(config(*base, second, "storage.mode=resume", f"storage.path={path}"))
        assert res.blocks_reused == reused, (first, second, res)
        np.testing.assert_array_equal(read_hessian(path), read_hessian(ref), err_msg=path.name)


# ---- Statistics taken from the blocks -----------------------------------------------------------

# (job, extra overrides): whole Hessians per block, or rows split over blocks; every strategy.
STAT_CASES = {
    "whole-in-place": (job(48, 5), ()),
    "rows-in-place": (job(48, 3, "storage.block_rows=16"), ()),
    "rows-shards": (job(48, 3, "storage.block_rows=16"), ("storage.compression=lzf",)),
    "virtual": (job(48, 3, "storage.block_rows=16"), ("storage.layout=virtual",)),
    "dask": (job(48, 3, "storage.block_rows=16"), ("backend=dask", "backend.n_workers=2")),
}


def tile_asymmetry(h: np.ndarray, rows: int) -> np.ndarray:
    """||H - H^T||_F over the pairs inside the diagonal tiles of ``rows`` rows, scaled to all
    D^2 entries (NOTE: [symmetry from blocks]); (N, K, D, D) -> (N, K)."""
    d = h.shape[-1]
    total, covered = np.zeros(h.shape[:2]), 0
    for r0 in range(0, d, rows):
        t = h[:, :, r0 : r0 + rows, r0 : r0 + rows]
        total += ((t - t.swapaxes(-1, -2)) ** 2).sum((-2, -1))
        covered += t.shape[-1] ** 2
    return np.sqrt(total * d * d / covered)


@pytest.mark.parametrize("case", list(STAT_CASES))
def test_stored_statistics_equal_numpy(tmp_path, case):
    overrides, extra = STAT_CASES[case]
    path = tmp_path / "h.h5"
    run(config(*overrides, *extra, f"storage.path={path}"))
    with h5py.File(path) as f:
        h = f["hessian"][()].astype(np.float64)
        rows = f["hessian"].shape[-1] if "whole" in case else 16
        # float32 files: squares are summed along rows in float32 (see block_stats)
        np.testing.assert_allclose(f["trace"][()], np.einsum("nkii->nk", h), rtol=1e-12)
        np.testing.assert_allclose(f["frobenius"][()], np.sqrt((h**2).sum((2, 3))), rtol=1e-6)
        np.testing.assert_array_equal(f["diagonal"][()], np.einsum("nkii->nki", f["hessian"][()]))
        np.testing.assert_allclose(f["row_norm"][()], np.sqrt((h**2).sum(3)), rtol=1e-6)
        sym = tile_asymmetry(h, rows) / np.sqrt((h**2).sum((2, 3)))
        np.testing.assert_allclose(f["symmetry"][()], sym, rtol=1e-5)
        assert (f["nonfinite"][()] == 0).all() and f.attrs["nonfinite_entries"] == 0
        assert f["block_sums"].shape[0] == -(-h.shape[-1] // rows)


@pytest.mark.parametrize("rows", [64, 256])  # four row blocks, or whole Hessians
def test_symmetry_from_tiles_estimates_the_residual(rows):
    """Rounding-like asymmetry: the diagonal tiles' pairs estimate the full residual closely;
    with whole Hessians per block it is exact."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((256, 256))
    h = (a + a.T) + 1e-6 * rng.standard_normal((256, 256))
    plan = make_plan(1, 1, 256, 8, block_rows=rows)
    sums = np.zeros((1, 1, 4))
    for b in plan.blocks:
        sums += block_stats(h[None, None, b.r0 : b.r1], b.r0).sums
    got = reduce_sums(plan, sums)["symmetry"][0, 0]
    exact = np.linalg.norm(h - h.T) / np.linalg.norm(h)
    np.testing.assert_allclose(got, exact, rtol=0.05 if rows < 256 else 1e-12)


# (entry changes of a random float32 block (1, 1, 8, 16) at rows [4, 12): what they do)
BLOCK_EDGES = {
    "plain": {},
    "square overflows float32": {(0, 0, 2, 7): 1e25},  # finite entry: float64 fallback
    "nan": {(0, 0, 3, 1): np.nan},
    "infs": {(0, 0, 0, 0): np.inf, (0, 0, 5, 9): -np.inf},
}


@pytest.mark.parametrize("case", list(BLOCK_EDGES))
def test_block_stats_against_float64(case):
    rng = np.random.default_rng(1)
    h = rng.standard_normal((1, 1, 8, 16)).astype(np.float32)
    for index, value in BLOCK_EDGES[case].items():
        h[index] = value
    st = block_stats(h, 4)
    ref = h.astype(np.float64)[0, 0]
    tile = ref[:, 4:12]
    with np.errstate(invalid="ignore", over="ignore"):
        expected = [(ref**2).sum(), np.trace(tile), ((tile - tile.T) ** 2).sum(),
                    (~np.isfinite(ref)).sum()]  # fmt: skip
        np.testing.assert_allclose(st.sums[0, 0], expected, rtol=1e-6)
        np.testing.assert_array_equal(st.diagonal[0, 0], np.diag(h[0, 0, :, 4:12]))
        np.testing.assert_allclose(st.row_norm[0, 0], np.sqrt((ref**2).sum(1)), rtol=1e-6)


def test_nonfinite_entries_are_counted_and_flagged(tmp_path, caplog):
    """A model whose second derivative is infinite at sample 1's input: the run completes, the file
    says how many entries are not finite, and one warning line says so."""
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    x[1, 0] = 0.0  # sqrt(|x_0|) has no second derivative here
    np.save(tmp_path / "x.npy", x)
    path = tmp_path / "h.h5"
    overrides = ("model=custom", "+model.net._target_=tests.nets.Cusp", "data=npy",
                 f"data.path={tmp_path / 'x.npy'}", "target.indices=[0]")  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        run(config(*overrides, f"storage.path={path}"))
    with h5py.File(path) as f:
        bad = ~np.isfinite(f["hessian"][()])
        assert bad[1].any() and not bad[0].any() and not bad[2].any()
        np.testing.assert_array_equal(f["nonfinite"][()], bad.sum((2, 3)))
        assert f.attrs["nonfinite_entries"] == bad.sum()
        assert f.attrs["status"] == "complete"
    lines = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(lines) == 1 and "source index 1" in lines[0], lines


# ---- Completeness and leftovers -------------------------------------------------------------

SMALL = job(32, 4, "storage.block_rows=8")  # 16 blocks


def test_a_backend_that_skips_blocks_never_makes_a_complete_file(tmp_path, monkeypatch):
    """Like backend.max_in_flight=-1 once did: the executor returns without computing some blocks.
    The result is refused; the blocks it did commit are kept, and resume completes it."""
    real = Local.execute
    monkeypatch.setattr(Local, "execute",
                        lambda self, job, blocks, *a: real(self, job, blocks[::2], *a))  # fmt: skip
    path = tmp_path / "h.h5"
    with pytest.raises(RuntimeError, match="8 of 16 planned blocks were not committed"):
        run(config(*SMALL, f"storage.path={path}"))
    assert not path.exists()
    assert len(committed_blocks(path)) == 8
    monkeypatch.setattr(Local, "execute", real)
    res = run(config(*SMALL, "storage.mode=resume", f"storage.path={path}"))
    assert (res.blocks_reused, res.blocks_computed) == (8, 8)
    ref = tmp_path / "ref.h5"
    run(config(*SMALL, f"storage.path={ref}"))
    np.testing.assert_array_equal(read_hessian(path), read_hessian(ref))


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
@pytest.mark.parametrize("strategy", ["storage.compression=null", "storage.compression=lzf"])
def test_a_run_that_commits_no_block_leaves_nothing(tmp_path, monkeypatch, error, strategy):
    """An error after the writer opened, before any commit: the shard directory, the laid-out
    file, partial files, the lock and the directories the run created are all gone."""

    def fail(*args):
        raise error

    monkeypatch.setattr(Local, "execute", fail)
    path = tmp_path / "new" / "dir" / "h.h5"
    with pytest.raises(type(error)):
        run(config(*SMALL, strategy, f"storage.path={path}"))
    assert list(tmp_path.iterdir()) == []


def test_a_failed_resume_keeps_the_earlier_blocks(tmp_path, monkeypatch):
    path = tmp_path / "h.h5"
    real = Local.execute
    monkeypatch.setattr(Local, "execute",
                        lambda self, job, blocks, *a: real(self, job, blocks[:5], *a))  # fmt: skip
    with pytest.raises(RuntimeError, match="not committed"):
        run(config(*SMALL, f"storage.path={path}"))
    before = sorted(p.name for p in ResultNames(path).shards.iterdir())

    def fail(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(Local, "execute", fail)
    with pytest.raises(RuntimeError, match="boom"):
        run(config(*SMALL, "storage.mode=resume", f"storage.path={path}"))
    assert sorted(p.name for p in ResultNames(path).shards.iterdir()) == before


REFUSED = {
    "bad index": (("target.indices=[42]",), "target.indices"),
    "path is a directory": (("storage.mode=overwrite",), "storage.path"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_refused_run_creates_nothing(tmp_path, monkeypatch, case):
    overrides, key = REFUSED[case]
    monkeypatch.setattr(Local, "execute", lambda *a: pytest.fail("computed"))
    path = tmp_path / "a" / "b" / "h.h5"
    if case == "path is a directory":
        path = tmp_path / "h.h5"
        path.mkdir()
    with pytest.raises(PipelineError) as info:
        run(config(*SMALL, *overrides, f"storage.path={path}"))
    assert info.value.key == key
    assert [p.name for p in tmp_path.iterdir()] == ([] if path.parent != tmp_path else ["h.h5"])


def test_resume_with_every_block_committed_starts_no_workers(tmp_path, monkeypatch):
    """Blocks all committed but the run stopped before finishing: a Dask resume finishes the file
    without starting a cluster."""
    path = tmp_path / "h.h5"

    def stop(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ResultWriter, "_finish_in_place", stop)
    with pytest.raises(KeyboardInterrupt):
        run(config(*SMALL, f"storage.path={path}"))
    assert len(committed_blocks(path)) == 16
    monkeypatch.undo()
    monkeypatch.setattr(DaskLocal, "client", lambda *a: pytest.fail("a cluster was started"))
    res = run(config(*SMALL, "backend=dask", "storage.mode=resume", f"storage.path={path}"))
    assert (res.blocks_reused, res.blocks_computed) == (16, 0)
    ref = tmp_path / "ref.h5"
    run(config(*SMALL, f"storage.path={ref}"))
    np.testing.assert_array_equal(read_hessian(path), read_hessian(ref))


def test_leaving_the_writer_without_finishing_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(ResultWriter, "finish", lambda self: None)
    with pytest.raises(RuntimeError, match="without finish"):
        run(config(*SMALL, f"storage.path={tmp_path / 'h.h5'}"))
    kept = ResultNames(tmp_path / "h.h5").shards
    assert list(tmp_path.iterdir()) == [kept] and committed_blocks(tmp_path / "h.h5")


def test_a_block_is_never_written_with_another_files_offsets(tmp_path):
    """A sink whose file was replaced under the same name (another run's layout) refuses."""
    path = tmp_path / "h.h5"
    run(config(*SMALL, "storage.keep_shards=true", f"storage.path={path}"))
    direct = ResultNames(path).direct
    path.rename(direct)  # the laid-out file, as during a run
    st = direct.stat()
    plan = make_plan(4, 1, 32, 4, block_rows=8)
    block = np.zeros((1, 1, 8, 32), np.float32)
    stale = InPlaceSink(str(direct), (st.st_dev, st.st_ino), "another-layout", plan, "<f4")
    with pytest.raises(RuntimeError, match="not the file this block belongs to"):
        stale.write(plan.blocks[0], block, np.zeros((1, 1, 32), np.float32))
    moved = InPlaceSink(str(direct), (st.st_dev, st.st_ino + 1), "x", plan, "<f4")
    with pytest.raises(RuntimeError, match="replaced by another run"):
        moved.write(plan.blocks[0], block, np.zeros((1, 1, 32), np.float32))


def test_blocks_written_during_a_flush_are_committed_together(tmp_path, monkeypatch):
    """Group commit: the first flush is held until every block is written; then one more flush
    commits the 15 blocks that arrived meanwhile, and every block is committed once."""
    written = threading.Event()
    commits, groups = [], []
    real_commit, real_now = ResultWriter.commit, ResultWriter._commit_now

    def commit(self, index):
        real_commit(self, index)
        commits.append(index)
        if len(commits) == 16:
            written.set()

    def commit_now(self, indices):
        assert written.wait(60)
        groups.append(list(indices))
        real_now(self, indices)

    monkeypatch.setattr(ResultWriter, "commit", commit)
    monkeypatch.setattr(ResultWriter, "_commit_now", commit_now)
    path = tmp_path / "h.h5"
    run(config(*SMALL, "storage.keep_shards=true", f"storage.path={path}"))
    assert [len(g) for g in groups] == [1, 15]
    assert sorted(i for g in groups for i in g) == list(range(16))
    assert len(committed_blocks(path)) == 16
