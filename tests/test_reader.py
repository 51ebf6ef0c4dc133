"""pipeline.read on real result files (copy and virtual layout) and on files it must refuse."""

from __future__ import annotations

import shutil

import dask.array as da
import h5py
import numpy as np
import pytest
from omegaconf import DictConfig

import pipeline
from pipeline import PipelineError
from pipeline.results.reader import DATASETS, read
from pipeline.store import ResultNames

from .result_files import result_file


@pytest.mark.parametrize("case", ["copy", "virtual"])
def test_dask_arrays_equal_file_contents(tmp_path_factory, case):
    path = result_file(tmp_path_factory, case)
    with read(path) as r, h5py.File(path, "r") as f:
        for name in DATASETS:
            arr = getattr(r, name)
            assert isinstance(arr, da.Array), name
            np.testing.assert_array_equal(arr.compute(), f[name][()], err_msg=name)
        assert r.shape == f["hessian"].shape
        assert r.dtype == np.float32
        assert r.layout == case
        assert not np.isnan(r.hessian.compute()).any()


def test_chunks_align_with_file(tmp_path_factory):
    with read(result_file(tmp_path_factory, "copy")) as r:
        chunks = r.file["hessian"].chunks
        assert all(
            c[0] == min(s, n) for c, s, n in zip(r.hessian.chunks, chunks, r.shape, strict=True)
        )
    with read(result_file(tmp_path_factory, "virtual")) as r:
        # storage.block_rows=16: one shard per sample and 16 rows
        assert r.hessian.chunks == ((1, 1, 1), (1,), (16, 16, 16, 16), (64,))


@pytest.mark.parametrize("case, n, k, d", [("copy", 3, 2, 64), ("virtual", 3, 1, 64)])
def test_config_attrs_and_shape(tmp_path_factory, case, n, k, d):
    with read(result_file(tmp_path_factory, case)) as r:
        assert isinstance(r.config, DictConfig)
        assert r.config.data.stop == n
        assert r.shape == (n, k, d, d)
        assert r.method == r.attrs["method"] == "structured"  # auto picks it for tanh MLPs
        assert r.input_shape == (1, 8, 8)
        assert r.attrs["status"] == "complete"
        assert r.output_index_of(0).shape == (k,)


def test_close_and_context_manager(tmp_path_factory):
    r = pipeline.read(result_file(tmp_path_factory, "copy"))
    assert r.file.id.valid
    with r:
        pass
    assert not r.file.id.valid


def _not_hdf5(p):
    p.write_text("hello")


def _no_hessian(p):
    with h5py.File(p, "w") as f:
        f["x"] = np.zeros(3)


def _incomplete(p, src):
    shutil.copy(src, p)
    with h5py.File(p, "r+") as f:
        f.attrs["status"] = "running"


@pytest.mark.parametrize(
    "make, message",
    [
        (None, "no result file"),
        (_not_hdf5, "not an HDF5 file"),
        (_no_hessian, "not a pipeline result"),
        (_incomplete, "incomplete"),
    ],
)
def test_refuses_bad_files(tmp_path, tmp_path_factory, make, message):
    p = tmp_path / "r.h5"
    if make is _incomplete:
        make(p, result_file(tmp_path_factory, "copy"))
    elif make is not None:
        make(p)
    with pytest.raises(PipelineError, match=message) as err:
        read(p)
    assert "\n" not in str(err.value)


def test_virtual_with_missing_shards_is_refused(tmp_path, tmp_path_factory):
    src = result_file(tmp_path_factory, "virtual")
    dst = tmp_path / src.name
    shutil.copy(src, dst)
    shutil.copytree(ResultNames(src).shards, ResultNames(dst).shards)
    with read(dst) as r:  # complete copy reads
        assert r.shape[0] == 3
    ResultNames(dst).shard(5).unlink()
    with pytest.raises(PipelineError, match="shard files are missing"):
        read(dst)
