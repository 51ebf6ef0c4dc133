"""``--verify`` checks the file against itself without a model: a file whose model is not
rebuilt (its config names code that is not this package's) still fails on a changed entry, a
changed statistic or an uncounted NaN; only a changed gradient needs ``--trust-file``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

import pipeline.results.stats
import pipeline.results.verify
from pipeline.errors import PipelineError
from pipeline.execution.run import run
from pipeline.results.reader import read
from pipeline.results.verify import check, check_file

from .configs import config

ROOT = Path(__file__).resolve().parents[1]
SKIPPED = (
    "SKIPPED: rebuilding the model would run code that the file names (imports and calls "
    "'tests.nets.mlp'); pass --trust-file"
)


@pytest.fixture(scope="module")
def custom_file(tmp_path_factory) -> Path:
    """A result of a model that ``--verify`` does not rebuild without ``--trust-file``: two
    samples, D = 64, blocks of 16 rows (four entries per Hessian in /block_sums)."""
    path = tmp_path_factory.mktemp("custom") / "h.h5"
    run(config("model=custom", "+model.net._target_=tests.nets.mlp", "data.stop=2",
               "storage.block_rows=16", f"storage.path={path}"))  # fmt: skip
    return path


def inspect_verify(path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.inspect", str(path), "--verify", *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )  # fmt: skip


def tampered(src: Path, dst: Path, edit: Callable[[h5py.File], None]) -> Path:
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        edit(f)
    return dst


def add(dataset: str, index: tuple[int, ...], change: float) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        f[dataset][index] = f[dataset][index] + change

    return edit


def put(dataset: str, index: tuple[int, ...], value: float) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        f[dataset][index] = value

    return edit


def scale(dataset: str, index: tuple[int, ...], factor: float) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        f[dataset][index] = f[dataset][index] * factor

    return edit


@dataclass
class Case:
    name: str
    edit: Callable[[h5py.File], None]
    check: str  # the mismatch that must be reported: "mismatch (<check>): ..."
    names: tuple[str, ...]  # what its message must name (sample, output, row, column)


# The Hessians are (2, 1, 64, 64) float32; entry labels read "row 5 (0, 0, 5)".
CASES = [
    Case("off-diagonal entry + 0.5", add("hessian", (1, 0, 5, 40), 0.5), "symmetry",
         ("sample 1 ", "(k=0)", "row 5 (", "column 40 (")),
    Case("off-diagonal entry + 0.5, last rows", add("hessian", (0, 0, 63, 2), 0.5), "symmetry",
         ("sample 0 ", "(k=0)", "row 2 (", "column 63 (")),
    Case("diagonal entry + 0.5", add("hessian", (0, 0, 20, 20), 0.5), "diagonal",
         ("sample 0 ", "(k=0)", "row 20 (", "column 20 (")),
    Case("NaN in /hessian, /nonfinite not updated", put("hessian", (1, 0, 7, 33), np.nan),
         "nonfinite", ("sample 1 ", "(k=0)", "row 7 (", "column 33 (", "nan")),
    Case("/trace + 0.5", add("trace", (1, 0), 0.5), "trace", ("sample 1 ", "(k=0)")),
    Case("/frobenius + 0.5", add("frobenius", (0, 0), 0.5), "frobenius", ("sample 0 ", "(k=0)")),
    Case("/symmetry x 1000", scale("symmetry", (1, 0), 1000.0), "stored_symmetry",
         ("sample 1 ", "(k=0)")),
    Case("/diagonal + 0.5", add("diagonal", (1, 0, 9), 0.5), "diagonal",
         ("sample 1 ", "(k=0)", "row 9 (", "column 9 (")),
    Case("/row_norm + 0.5", add("row_norm", (0, 0, 33), 0.5), "row_norm",
         ("sample 0 ", "(k=0)", "row 33 (")),
    Case("/nonfinite says 2", put("nonfinite", (0, 0), 2), "nonfinite", ("sample 0 ", "(k=0)")),
    Case("/block_sums trace of rows 32-47 + 0.5", add("block_sums", (2, 1, 0, 1), 0.5),
         "block_sums", ("sample 1 ", "(k=0)", "rows 32 (", "(row block 2)", "trace")),
    Case("attrs nonfinite_entries", lambda f: f.attrs.modify("nonfinite_entries", 1),
         "nonfinite", ("nonfinite_entries",)),
    Case("/output_index out of range", put("output_index", (0,), 10), "output_index",
         ("k=0", "is 10")),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_file_checks_fail_without_the_model(custom_file, tmp_path, case):
    bad = tampered(custom_file, tmp_path / "bad.h5", case.edit)
    out = inspect_verify(bad)
    text = out.stdout + out.stderr
    assert out.returncode == 1, f"{case.name}: exit {out.returncode}\n{text}"
    lines = [
        line for line in out.stdout.splitlines() if line.startswith(f"mismatch ({case.check})")
    ]
    assert lines, f"{case.name}: no 'mismatch ({case.check})' line\n{text}"
    missing = [name for name in case.names if not any(name in line for line in lines)]
    assert not missing, f"{case.name}: the {case.check} mismatch does not name {missing}\n{text}"
    last = out.stdout.strip().splitlines()
    assert last[-2].startswith("file checks: FAILED"), f"{case.name}: {last[-2]}"
    assert last[-1].startswith("verify: FAILED") and SKIPPED in last[-1], f"{case.name}: {last[-1]}"


def test_a_good_file_passes_the_file_checks_without_the_model(custom_file):
    out = inspect_verify(custom_file)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-2].startswith("file checks: OK: 2 (sample, output) Hessians"), lines[-2]
    for stored in ("/diagonal", "/row_norm", "/trace", "/frobenius", "/symmetry", "/nonfinite",
                   "/block_sums"):  # fmt: skip
        assert stored in lines[-2], stored
    assert lines[-1].startswith("verify: " + SKIPPED), lines[-1]
    assert "mismatch" not in out.stdout


def test_a_changed_gradient_needs_the_model(custom_file, tmp_path):
    """Only the model can tell a changed gradient: SKIPPED (exit 0) without --trust-file,
    a gradient mismatch (exit 1) with it."""
    bad = tampered(custom_file, tmp_path / "bad.h5", add("gradient", (0, 0, 17), 0.5))
    out = inspect_verify(bad)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-2].startswith("file checks: OK"), lines[-2]
    assert lines[-1].startswith("verify: " + SKIPPED), lines[-1]
    out = inspect_verify(bad, "--trust-file")
    assert out.returncode == 1, out.stdout + out.stderr
    found = [line for line in out.stdout.splitlines() if line.startswith("mismatch (gradient)")]
    assert len(found) == 1 and "sample 0 " in found[0] and "entry 17 (" in found[0], out.stdout
    assert out.stdout.strip().splitlines()[-2].startswith("file checks: OK")


def test_entries_changed_with_their_statistics_need_the_model(custom_file, tmp_path):
    """A diagonal entry changed together with every statistic it enters passes the file checks;
    the model checks (--trust-file) catch it."""
    n, i, change = 1, 12, 0.5

    def consistent(f: h5py.File) -> None:
        h = f["hessian"][n, 0].astype(np.float64)
        old_frobenius = np.linalg.norm(h)
        h[i, i] += change
        b0 = i // 16 * 16  # the block of 16 rows that holds row i
        f["hessian"][n, 0, i, i] = h[i, i]
        f["diagonal"][n, 0, i] = h[i, i]
        f["row_norm"][n, 0, i] = np.linalg.norm(h[i])
        f["trace"][n, 0] = np.trace(h)
        f["frobenius"][n, 0] = np.linalg.norm(h)
        f["symmetry"][n, 0] = f["symmetry"][n, 0] * old_frobenius / np.linalg.norm(h)
        sums = f["block_sums"][b0 // 16, n, 0]
        sums[0] = np.sum(h[b0 : b0 + 16] ** 2)
        sums[1] = np.trace(h[b0 : b0 + 16, b0 : b0 + 16])
        f["block_sums"][b0 // 16, n, 0] = sums

    bad = tampered(custom_file, tmp_path / "bad.h5", consistent)
    with read(bad) as r:
        report = check_file(r)
    assert report.ok, [m.message for m in report.mismatches]
    out = inspect_verify(bad, "--trust-file")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "mismatch (probe)" in out.stdout and "mismatch (row)" in out.stdout, out.stdout


def test_a_run_that_cannot_be_rebuilt_still_gets_the_file_checks(
    custom_file, tmp_path, monkeypatch
):
    def cannot(cfg):
        raise PipelineError("file 'x.npy' not found (config key: data.path)", "data.path")

    monkeypatch.setattr(pipeline.results.verify, "build_job", cannot)
    bad = tampered(custom_file, tmp_path / "bad.h5", add("hessian", (1, 0, 5, 40), 0.5))
    for path, ok in ((custom_file, True), (bad, False)):
        with read(path) as r:
            report = check(r, trust_file=True)
        assert report.skipped and report.skipped.startswith("cannot rebuild the run here: file")
        assert report.ok is ok and report.file_ok is ok
        assert report.matrices_checked == 2
    assert {m.check for m in report.mismatches} >= {"symmetry"}


@pytest.mark.parametrize("rows", [16, 24, 64])
def test_row_panels_of_any_size_give_the_same_answers(custom_file, tmp_path, monkeypatch, rows):
    """Huge Hessians are read in panels of rows, never whole: panels that do not line up with
    the blocks of 16 rows check the tiles' asymmetry and the block sums just as well."""
    monkeypatch.setattr(pipeline.results.stats, "panel_rows", lambda dset, memory_mb=0: rows)
    with read(custom_file) as r:
        report = check_file(r)
    assert report.ok, [m.message for m in report.mismatches]
    for case in CASES[:4]:
        bad = tampered(custom_file, tmp_path / "bad.h5", case.edit)
        with read(bad) as r:
            report = check_file(r)
        found = [m.message for m in report.mismatches if m.check == case.check]
        assert found, f"{case.name}: {[m.message for m in report.mismatches]}"
        assert all(name in found[0] for name in case.names), f"{case.name}: {found[0]}"
