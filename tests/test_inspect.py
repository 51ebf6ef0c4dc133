"""python -m pipeline.inspect: the summary, and --verify on good and tampered result files."""

from __future__ import annotations

import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.results.inspect import main, stats_table
from pipeline.results.reader import read
from pipeline.results.stats import matrix_stats
from pipeline.results.verify import verify

from .result_files import result_file


def _inspect(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.inspect", *map(str, args)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _tamper(src, dst, dataset: str, index: tuple[int, ...], rel: float = 1e-2):
    """Copy ``src`` to ``dst`` and add rel * (norm of the enclosing row) to one entry."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        dset = f[dataset]
        row = dset[index[:-1]]
        row[index[-1]] += rel * np.linalg.norm(row)
        dset[index[:-1]] = row
    return dst


def test_summary_and_verify_ok(tmp_path_factory):
    path = result_file(tmp_path_factory, "copy")
    out = _inspect(path, "--verify")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    expected_lines = [
        "hessian    (3, 2, 64, 64) float32", "method     structured",
        "pipeline.inputs.models.digits_mlp", "data       digits [0:3]", "target     indices [2, 5]",
        "on disk", "status complete", "file checks: OK", "verify: OK",
    ]  # fmt: skip
    for expected in expected_lines:
        assert expected in text, expected
    # the per-(sample, output) table: 6 lines whose values match the file
    with read(path) as r:
        st = matrix_stats(r.file["hessian"], 2, 1)
    last = [line for line in text.splitlines() if line.split()[:3] == ["2", "2", "5"]]
    assert len(last) == 1
    frob, trace, sym = map(float, last[0].split()[3:6])
    np.testing.assert_allclose([frob, trace], [st.frobenius, st.trace], rtol=1e-4)
    assert sym < 1e-5


def test_verify_exits_1_on_changed_entry(tmp_path_factory, tmp_path, capsys):
    bad = _tamper(result_file(tmp_path_factory, "copy"), tmp_path / "bad.h5", "hessian",
                  (1, 0, 20, 20))  # fmt: skip
    assert main([str(bad), "--verify", "--rows", "2"]) == 1
    out = capsys.readouterr().out
    assert "sample 1" in out and "row 20" in out
    assert "mismatch (diagonal)" in out and "file checks: FAILED" in out  # no model needed
    assert "verify: FAILED" in out


def test_missing_file_is_one_line_error(tmp_path, capsys):
    assert main([str(tmp_path / "nothing.h5")]) == 1
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "no result file" in err


@pytest.mark.parametrize("case", ["copy", "virtual", "float64"])
def test_verify_passes_good_files(tmp_path_factory, case):
    with read(result_file(tmp_path_factory, case)) as r:
        report = verify(r)
        n, _, d, _ = r.shape
    assert report.ok, [m.message for m in report.mismatches]
    assert report.rows_checked == n * d  # small files: every row


# (dataset, entry, rows recomputed per sample, a check that must report it)
TAMPER_CASES = [
    ("hessian", (1, 0, 5, 40), 1, "symmetry"),  # off-diagonal: symmetry catches it
    ("hessian", (1, 1, 40, 5), 1, "symmetry"),
    ("hessian", (2, 0, 20, 20), 1, "probe"),  # diagonal: the +-1 probes catch it
    ("hessian", (0, 1, 63, 63), 1, "probe"),
    ("hessian", (2, 0, 20, 20), 0, "row"),  # every row recomputed: compared entry by entry
    ("gradient", (1, 1, 17), 1, "gradient"),
]


@pytest.mark.parametrize("dataset, index, rows, check", TAMPER_CASES)
def test_verify_catches_one_changed_entry(tmp_path_factory, tmp_path, dataset, index, rows, check):
    bad = _tamper(result_file(tmp_path_factory, "copy"), tmp_path / "bad.h5", dataset, index)
    with read(bad) as r:
        report = verify(r, rows=rows, seed=1)
    assert not report.ok
    found = {m.check for m in report.mismatches}
    assert check in found, found
    n, k, i = index[0], index[1], index[2]
    assert any(f"sample {n} " in m.message and f"(k={k})" in m.message and f"{i} (" in m.message
               for m in report.mismatches if m.check == check)  # fmt: skip
    others = {m.message.split(",")[0] for m in report.mismatches}
    assert all(f"sample {n} " in o for o in others)  # nothing reported for untouched samples


def test_verify_without_pairs_reads_each_matrix_once(tmp_path_factory, tmp_path, monkeypatch):
    """--no-pairs skips the panel pairs; the probes still catch a changed off-diagonal entry."""
    import pipeline.results.stats

    fail = lambda *a: pytest.fail("read a pair")  # noqa: E731
    monkeypatch.setattr(pipeline.results.stats, "_panels_from", fail)
    good = result_file(tmp_path_factory, "copy")
    with read(good) as r:
        report = verify(r, rows=1, pairs=False)
    assert report.ok and "entry pairs skipped" in report.summary()
    bad = _tamper(good, tmp_path / "bad.h5", "hessian", (1, 0, 5, 40))
    with read(bad) as r:
        report = verify(r, rows=1, seed=1, pairs=False)
    assert {m.check for m in report.mismatches} == {"probe"}


def test_table_of_stored_statistics_equals_the_streamed_one(tmp_path_factory):
    with read(result_file(tmp_path_factory, "copy")) as r:
        stored = [line.split() for line in stats_table(r)[1:]]
        streamed = [line.split() for line in stats_table(r, stream=True)[1:]]
    assert len(stored) == len(streamed) == 6
    for a, b in zip(stored, streamed, strict=True):
        assert a[:3] == b[:3] and a[-1] == b[-1] == "0"
        np.testing.assert_allclose(np.float64(a[3:5]), np.float64(b[3:5]), rtol=1e-4)
        np.testing.assert_allclose(float(a[5]), float(b[5]), rtol=1e-2, atol=1e-9)


def test_a_contiguous_hessian_is_read_and_inspected(tmp_path_factory, tmp_path):
    """A result rewritten without chunks (h5repack -l CONTI, or h5py by hand) crashed inspect."""
    src = result_file(tmp_path_factory, "copy")
    dst = tmp_path / "contiguous.h5"
    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        for name, dset in f.items():
            g.create_dataset(name, data=dset[()])  # contiguous
        g.attrs.update(f.attrs)
    out = _inspect(dst)
    assert out.returncode == 0, out.stderr
    assert "chunks none (contiguous)" in out.stdout
    with read(dst) as r, read(src) as s:
        assert set(r.hessian.chunks[0]) == {1} and set(r.hessian.chunks[1]) == {1}
        np.testing.assert_array_equal(r.hessian.compute(), s.hessian.compute())


@pytest.mark.parametrize("drop", ["attr:method", "attr:status", "dataset:inputs", "shape"])
def test_a_result_like_foreign_file_is_refused_in_one_line(tmp_path_factory, tmp_path, drop):
    src = result_file(tmp_path_factory, "copy")
    dst = tmp_path / "foreign.h5"
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        kind, _, name = drop.partition(":")
        if kind == "attr":
            del f.attrs[name]
        elif kind == "dataset":
            del f[name]
        else:
            del f["gradient"]
            f["gradient"] = np.zeros((3, 2, 5), np.float32)
    with pytest.raises(PipelineError, match="is not a pipeline result|incomplete"):
        read(dst)
    out = _inspect(dst)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: ")


def test_inspect_into_a_closed_pipe_ends_quietly(tmp_path_factory):
    """``inspect F | head`` ended in a BrokenPipeError traceback; here the reader (``true``)
    exits before inspect writes anything, so every write meets a closed pipe."""
    path = result_file(tmp_path_factory, "copy")
    proc = subprocess.run(
        f"{sys.executable} -m pipeline.inspect {path} | true; echo ${{PIPESTATUS[0]}}",
        shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.stderr == "", proc.stderr
    assert proc.stdout.strip() == "141"  # as a Unix tool killed by SIGPIPE
