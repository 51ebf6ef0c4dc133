"""Faults never corrupt finished work: kill, resume, refuse a changed config, full disk, locks."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.execution.run import run
from pipeline.store import ResultNames, ResultWriter, RunLock

from .configs import committed_blocks, config, read_hessian

ROOT = Path(__file__).resolve().parents[1]
# 4 samples x 64 rows in blocks of 4 rows: 64 blocks; the slow net makes each take ~20 ms.
JOB = (
    "data=synthetic",
    "data.shape=[64]",
    "data.n_samples=4",
    "storage.block_rows=4",
    "model=custom",
    "+model.net._target_=tests.nets.Slow",
    "+model.net.d=64",
)


def start_cli(*overrides: str) -> subprocess.Popen:
    run_dir = tempfile.mkdtemp(prefix="hydra-run-")  # keep the repository's outputs/ clean
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "progress=false",
        "plots=false",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    env = {**os.environ, "SLOW_NET_DELAY": "0.005"}  # ~4 forwards a block: ~20 ms
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
        preexec_fn=_ctrl_c_as_in_a_terminal,
    )


def _ctrl_c_as_in_a_terminal() -> None:
    """SIGINT at its default in the run, as in a terminal: a test suite started in the background
    of a non-interactive shell (``make test &``) ignores SIGINT, its children inherit that, and
    Python then installs no KeyboardInterrupt handler (the Ctrl-C test's run finished instead)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_blocks(path: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until ``n`` blocks of the result at ``path`` are committed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(committed_blocks(path)) >= n:
            return
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.005)
    raise AssertionError("no blocks were committed")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "h.h5"
    run(config(*JOB, f"storage.path={path}"))
    return read_hessian(path)


@pytest.mark.parametrize("backend", [("backend=local",), ("backend=dask", "backend.n_workers=2")])
def test_sigkill_then_resume_gives_identical_result(tmp_path, reference, backend):
    path = tmp_path / "h.h5"
    shards = ResultNames(path).shards
    proc = start_cli(*JOB, *backend, f"storage.path={path}")
    wait_for_blocks(path, 5, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not path.exists(), "a killed run left a file at storage.path"
    committed = {p.name: p.stat().st_ino for p in committed_blocks(path)}
    assert 5 <= len(committed) < 64
    res = run(
        config(*JOB, "storage.mode=resume", "storage.keep_shards=true", f"storage.path={path}")
    )
    assert res.blocks_reused == len(committed)
    assert res.blocks_computed == 64 - len(committed)
    for name, ino in committed.items():  # finished blocks were not redone
        assert (shards / name).stat().st_ino == ino
    np.testing.assert_array_equal(read_hessian(path), reference)


@pytest.mark.parametrize("backend", [("backend=local",), ("backend=dask", "backend.n_workers=2")])
def test_ctrl_c_says_how_many_blocks_are_kept_and_how_to_resume(tmp_path, reference, backend):
    """Issue 11 item 11: Ctrl-C printed 110 lines of traceback and no word about resuming (and
    each Dask worker its own traceback)."""
    path = tmp_path / "h.h5"
    shards = ResultNames(path).shards
    proc = start_cli(*JOB, *backend, f"storage.path={path}")
    wait_for_blocks(path, 3, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: to every process of the run
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 130, out
    assert "Traceback" not in out
    last = out.strip().splitlines()[-1]
    found = re.fullmatch(
        rf"interrupted: (\d+) of 64 blocks are committed in {re.escape(str(shards))}; "
        r"resume with: (.*)",
        last,
    )
    assert found, last
    kept = int(found.group(1))
    assert kept == len(committed_blocks(path)) >= 3
    command = shlex.split(found.group(2))
    assert command[:3] == ["python", "-m", "pipeline"]
    assert command[-2:] == ["storage.mode=resume", f"storage.path={path}"]
    assert set(JOB) | set(backend) <= set(command)
    done = subprocess.run(
        [sys.executable, *command[1:], f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(read_hessian(path), reference)
    assert re.search(rf"{64 - kept} blocks computed, {kept} reused", done.stderr + done.stdout)


def test_resume_with_a_changed_config_is_refused(tmp_path):
    path = tmp_path / "h.h5"
    shards = ResultNames(path).shards
    proc = start_cli(*JOB, f"storage.path={path}")
    wait_for_blocks(path, 2, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = sorted(p.name for p in shards.iterdir())
    with pytest.raises(PipelineError, match="different config.*storage.mode"):
        run(config(*JOB, "storage.mode=resume", "dtype=float64", f"storage.path={path}"))
    with pytest.raises(PipelineError, match="interrupted run"):
        run(config(*JOB, f"storage.path={path}"))
    assert sorted(p.name for p in shards.iterdir()) == before  # nothing touched
    assert not path.exists()


def test_virtual_layout_equals_copy(tmp_path, reference):
    path = tmp_path / "v.h5"
    run(config(*JOB, "storage.layout=virtual", f"storage.path={path}"))
    np.testing.assert_array_equal(read_hessian(path), reference)
    with h5py.File(path, "r") as f:
        assert f["hessian"].is_virtual


def test_second_run_on_the_same_path_refuses(tmp_path):
    path = tmp_path / "h.h5"
    with RunLock(path), pytest.raises(PipelineError, match="another run"):
        run(config(*JOB, f"storage.path={path}"))
    assert not path.exists()


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_result_larger_than_free_disk_is_refused_before_computing(small_disk):
    path = small_disk / "h.h5"
    with pytest.raises(PipelineError, match="needs about .* free.*storage.path"):
        run(config(*JOB, "data.shape=[512]", "++model.net.d=512", f"storage.path={path}"))
    assert list(small_disk.iterdir()) == []


def test_disk_filling_up_mid_run_keeps_committed_blocks(small_disk, monkeypatch):
    """The space check passes, then another process fills the disk: a clear error, blocks kept."""
    monkeypatch.setattr(ResultWriter, "_check_free_space", lambda *a, **k: None)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * 560_000)  # leaves ~40 kB: less than the 66 kB result
    path = small_disk / "h.h5"
    with pytest.raises(PipelineError, match="disk full.*resume"):
        run(config(*JOB, f"storage.path={path}"))
    assert not path.exists()
    kept = committed_blocks(path)
    assert kept, "committed blocks were lost"
    files = [p for p in kept if p.suffix == ".h5"] or [ResultNames(path).direct]
    for file in files:  # shards, or the file that backend=local writes in place
        with h5py.File(file, "r") as f:
            assert f["hessian"].shape
    filler.unlink()
    res = run(config(*JOB, "storage.mode=resume", f"storage.path={path}"))
    assert res.blocks_reused == len(kept)


def test_a_killed_runs_partial_final_file_is_removed(tmp_path, reference):
    """The final file is written under a hidden temporary name during the run; the next run on
    the same path deletes what a killed run left there."""
    path = tmp_path / "h.h5"
    stale = tmp_path / ".h.h5.12345.0123abcd.partial"
    stale.write_bytes(b"\0" * 1000)
    other = tmp_path / ".other.h5.1.0123abcd.partial"  # another path's: not ours to delete
    other.write_bytes(b"")
    run(config(*JOB, f"storage.path={path}"))
    assert not stale.exists()
    assert other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, "h.h5"])
    np.testing.assert_array_equal(read_hessian(path), reference)


@pytest.mark.parametrize("fsync", [True, False])
def test_every_block_is_committed_by_the_end(tmp_path, reference, fsync):
    """With fsync the commits run on a background thread: all must be done when run returns."""
    path = tmp_path / "h.h5"
    run(config(*JOB, f"storage.path={path}", "storage.keep_shards=true", f"storage.fsync={fsync}"))
    assert len(committed_blocks(path)) == 64
    assert ResultNames(path).work_partials() == [], "a file kept its temporary name"
    np.testing.assert_array_equal(read_hessian(path), reference)
