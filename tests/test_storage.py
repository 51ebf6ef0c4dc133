"""The background committer: commits complete by ``wait``, errors surface, flushes coalesce."""

from __future__ import annotations

import pytest

from pipeline.storage import Syncer


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
