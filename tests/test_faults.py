"""SIGKILL at random moments: never a corrupt file at storage.path, never a lost committed block."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.execution.run import run
from pipeline.store import ResultNames

from .configs import committed_blocks, config
from .test_resume import JOB, start_cli


def kill_point(rng: random.Random) -> tuple[str, int]:
    """Where to kill: after k committed blocks, while assembling, or just after the rename."""
    return rng.choice([("blocks", rng.randint(0, 63))] * 3 + [("assembling", 0), ("done", 0)])


def reached(point: tuple[str, int], path: Path) -> bool:
    kind, k = point
    if kind == "blocks":
        return len(committed_blocks(path)) >= k
    if kind == "assembling":
        return any(path.parent.glob(f".{path.name}.*.partial")) or path.exists()
    return path.exists()


def readable(p: Path) -> bool:
    try:
        with h5py.File(p, "r") as f:
            f["hessian"][()]
        return True
    except OSError:
        return False


def one_trial(tmp: Path, seed: int, reference: np.ndarray) -> dict:
    rng = random.Random(seed)
    path = tmp / "h.h5"
    point = kill_point(rng)
    proc = start_cli(*JOB, f"storage.path={path}")
    deadline = time.monotonic() + 120
    while not reached(point, path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    shards = committed_blocks(path)
    corrupt = [p.name for p in shards if p.suffix == ".h5" and not readable(p)]
    direct = ResultNames(path).direct  # the final file, written in place
    if direct.exists() and not readable(direct):
        corrupt.append(direct.name)
    final_state = "absent"
    if path.exists():
        with h5py.File(path, "r") as f:  # anything at storage.path must be a finished result
            assert f.attrs["status"] == "complete"
            np.testing.assert_array_equal(f["hessian"][()], reference)
        final_state = "complete"
    res = run(config(*JOB, "storage.mode=resume", f"storage.path={path}"))
    lost = 0 if final_state == "complete" else len(shards) - res.blocks_reused
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["hessian"][()], reference)
    return {
        "point": point,
        "committed": len(shards),
        "corrupt": corrupt,
        "lost": lost,
        "final": final_state,
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "h.h5"
    run(config(*JOB, f"storage.path={path}"))
    with h5py.File(path, "r") as f:
        return f["hessian"][()]


def _check(trials: list[dict]) -> None:
    print("\n".join(str(t) for t in trials))
    assert [t for t in trials if t["corrupt"]] == []
    assert sum(t["lost"] for t in trials) == 0


@pytest.mark.parametrize("seed", [1, 2])
def test_kill_at_a_random_moment(tmp_path, reference, seed):
    _check([one_trial(tmp_path, seed, reference)])


@pytest.mark.slow
def test_ten_kill_trials(tmp_path, reference):
    trials = []
    for seed in range(10, 20):
        d = tmp_path / f"t{seed}"
        d.mkdir()
        trials.append(one_trial(d, seed, reference))
    _check(trials)
