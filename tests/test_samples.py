"""Inputs read from their source a chunk at a time (``pipeline.inputs.data.Samples``).

Every read is checked against numpy's fancy indexing of the whole source; a run over an npy
file reads it in ranges no larger than a chunk or a block, never whole, and writes the same
``/inputs``, fingerprint and Hessians as the data in memory.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from pipeline import hessian
from pipeline.config.schema import NpyData
from pipeline.errors import PipelineError
from pipeline.execution.run import run
from pipeline.inputs import data
from pipeline.inputs.data import Samples
from pipeline.store.fingerprint import data_fingerprint

from .configs import config
from .nets import mlp

N = 23
SOURCE = np.random.default_rng(0).normal(size=(N, 2, 3))


def _npy(tmp_path):
    np.save(tmp_path / "x.npy", SOURCE)
    return np.load(tmp_path / "x.npy", mmap_mode="r")


def _hdf5(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["x"] = SOURCE
    return h5py.File(tmp_path / "x.h5", "r")["x"]


SOURCES = {"memory": lambda tmp_path: SOURCE, "npy memory map": _npy, "hdf5": _hdf5}
INDICES = {
    "a range": np.arange(4, 19),
    "every sample": np.arange(N),
    "unordered, repeated": np.array([7, 2, 2, 20, 0, 11, 7, 3]),
    "one sample": np.array([5]),
}
KEYS = {"all": slice(None), "a middle range": slice(2, 6), "past the end": slice(3, 99),
        "empty": slice(6, 2), "from the end": slice(-3, None), "first": 0, "last": -1}  # fmt: skip


@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("index", list(INDICES))
def test_reads_equal_numpys_indexing_of_the_whole_source(tmp_path, source, index):
    idx = INDICES[index]
    samples = Samples(SOURCES[source](tmp_path), idx, torch.float32)
    whole = torch.as_tensor(SOURCE[idx]).float()
    assert samples.shape == whole.shape and len(samples) == len(idx)
    assert samples.dtype == torch.float32 and samples.element_size() == 4
    wrong = []
    for name, key in KEYS.items():
        if isinstance(key, int) and not -len(idx) <= key < len(idx):
            continue
        got, expected = samples[key], whole[key]
        if got.dtype != torch.float32 or not torch.equal(got, expected):
            wrong.append(
                f"{name}: {tuple(got.shape)} {got.dtype}, expected {tuple(expected.shape)}"
            )
    assert not wrong, f"{source}, {index}: " + "; ".join(wrong)


def test_reads_are_copies_of_the_source():
    source = SOURCE.astype(np.float32)
    samples = Samples(source, np.arange(N), torch.float32)
    samples[:3].zero_()
    assert samples[:3].abs().sum() > 0 and np.array_equal(source, SOURCE.astype(np.float32))


class Recorder:
    """An array that records how many samples each read of it takes."""

    def __init__(self, array):
        self.array, self.reads = array, []
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __len__(self):
        return len(self.array)

    def __getitem__(self, key):
        out = self.array[key]
        self.reads.append(len(out))
        return out


@pytest.mark.parametrize("index", ["a range", "unordered, repeated"])
def test_chunks_cover_the_slice_in_reads_of_at_most_a_chunk(index):
    source = Recorder(SOURCE)
    samples = Samples(source, INDICES[index], torch.float64, chunk_bytes=3 * 6 * 8)
    starts, parts = zip(*samples.chunks(), strict=True)
    assert samples.chunk == 3 and starts == tuple(range(0, len(samples), 3))
    assert max(source.reads) == 3, source.reads
    torch.testing.assert_close(
        torch.cat(parts), torch.as_tensor(SOURCE[INDICES[index]]), rtol=0, atol=0
    )


def test_the_chunked_fingerprint_is_the_whole_arrays():
    """A result written before the inputs were read in chunks still resumes: the same digest."""
    samples = Samples(SOURCE, np.arange(3, 20), torch.float32, chunk_bytes=100)
    assert samples.chunk == 4
    assert data_fingerprint(samples, samples.index, None) == data_fingerprint(
        samples[:], samples.index, None
    )


@pytest.mark.parametrize("bad", [[0], [21], [5, 6, 22]])
def test_non_finite_samples_are_named_by_source_index_in_any_chunk(tmp_path, monkeypatch, bad):
    x = SOURCE.copy()
    x[bad, 1, 2] = np.nan
    np.save(tmp_path / "x.npy", x)
    monkeypatch.setattr(data, "CHUNK_BYTES", 2 * 6 * 4)  # chunks of 2 samples
    with pytest.raises(PipelineError) as err:
        data.load_data(NpyData(path=str(tmp_path / "x.npy")), torch.float32)
    assert (
        f"{len(bad)} sample(s) contain NaN or inf (source indices {', '.join(map(str, bad))})"
        in str(err.value)
    )


def test_a_run_reads_an_npy_file_a_block_at_a_time(tmp_path, monkeypatch):
    """3,000 samples in blocks of 500, chunks of 1,000: no read takes more than 1,024 (the
    forward's batch); the file holds the same inputs and Hessians as the data in memory."""
    x = np.random.default_rng(1).normal(size=(3000, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    opened: list[Recorder] = []
    load = np.load

    def recording_load(path, *args, **kwargs):
        out = load(path, *args, **kwargs)
        if str(path).endswith("x.npy"):
            opened.append(Recorder(out))
            return opened[-1]
        return out

    monkeypatch.setattr(np, "load", recording_load)
    monkeypatch.setattr(data, "CHUNK_BYTES", 1000 * 4 * 4)
    result = run(config(
        "data=npy", f"data.path={tmp_path / 'x.npy'}", "model=custom",
        "+model.net._target_=tests.nets.mlp", "+model.net.d=4", "output=diagonal",
        "storage.block_samples=500", f"storage.path={tmp_path / 'h.h5'}",
    ))  # fmt: skip
    assert result.blocks_computed == 6 and len(opened) == 1
    reads = opened[0].reads
    assert max(reads) <= 1024 and sum(reads) >= 3 * len(x), reads
    with h5py.File(tmp_path / "h.h5") as f:
        np.testing.assert_array_equal(f["inputs"][()], x)
        diagonal = f["diagonal"][()]
    expected = hessian(mlp(4).eval(), torch.as_tensor(x[:8]), [2])  # class 2: the default
    np.testing.assert_allclose(
        diagonal[:8, 0],
        torch.diagonal(expected[:, 0], dim1=1, dim2=2).numpy(),
        rtol=1e-5,
        atol=1e-7,
    )
