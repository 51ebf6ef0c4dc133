"""Blocks go where they can be written (``backend.write_at``): Dask workers that cannot see the
output directory send their blocks to the driver, which writes them; the result, its commits
and its fingerprint are those of ``backend=local``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from distributed import Client

from pipeline.errors import PipelineError
from pipeline.execution.run import run, run_overrides
from pipeline.store import ResultNames

from .configs import committed_blocks, config
from .test_backends import JOB
from .test_resume import JOB as SLOW_JOB
from .test_resume import start_cli, wait_for_blocks

ROOT = Path(__file__).resolve().parents[1]


def contents(path: Path) -> dict:
    """Every dataset of a complete result file, and its fingerprint."""
    with h5py.File(path, "r") as f:
        assert f.attrs["status"] == "complete"
        out = {"fingerprint": f.attrs["fingerprint"]}
        f.visititems(lambda name, obj: out.setdefault(name, obj[()]) if obj.shape else None)
    return out


def assert_same_result(path: Path, reference: dict) -> None:
    got = contents(path)
    assert got.keys() == reference.keys()
    for name, value in reference.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)  # bit for bit


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("local") / "h.h5"
    run(config(*JOB, f"storage.path={path}"))
    return contents(path)


def address_run(path: Path, address: str, *overrides: str, job=JOB):
    return run(config(*job, "backend=address", f"backend.address={address}",
                      f"storage.path={path}", *overrides))  # fmt: skip


def test_a_bad_write_at_is_refused_in_one_line():
    with pytest.raises(PipelineError) as info:
        run_overrides(["backend=dask", "backend.write_at=sideways"])
    assert info.value.key == "backend.write_at"
    assert "\n" not in str(info.value) and "auto, workers, driver" in str(info.value)
    with pytest.raises(PipelineError, match="unknown key backend.write_at: backend=local"):
        run_overrides(["backend=local", "backend.write_at=driver"])


@pytest.mark.parametrize(
    "overrides",
    [("backend.write_at=driver",), ("backend.write_at=workers",), ("backend.write_at=auto",),
     ("backend.write_at=driver", "storage.compression=lzf")],  # shards written by the driver
    ids=["driver", "workers", "auto", "driver-shards"],
)  # fmt: skip
def test_driver_and_worker_writes_equal_local(tmp_path, local, cluster, overrides):
    path = tmp_path / "h.h5"
    res = address_run(path, cluster.scheduler_address, *overrides, "backend.max_in_flight=2")
    assert res.blocks_computed == 48
    assert_same_result(path, local)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.h5"]  # no marker, no shards


def test_driver_writes_survive_a_worker_killed_mid_run(tmp_path, local, cluster):
    """The blocks in flight on a SIGKILLed worker (computing, or finished and not yet sent) are
    recomputed elsewhere; committed blocks stay committed."""
    path = tmp_path / "h.h5"
    with Client(cluster) as client:
        pid = next(iter(client.run(os.getpid).values()))
    killed = []

    def kill_one_worker():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            if len(committed_blocks(path)) >= 3:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.005)

    killer = threading.Thread(target=kill_one_worker)
    killer.start()
    res = address_run(path, cluster.scheduler_address, "backend.write_at=driver",
                      "backend.max_in_flight=2", "backend.retries=0")  # fmt: skip
    killer.join()
    assert killed, "the worker was not killed while the run was going on"
    assert res.blocks_computed == 48
    assert_same_result(path, local)
    with Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)  # the nanny restarted it for the next tests


def test_resume_after_a_kill_with_driver_writes(tmp_path, cluster):
    """A run whose driver writes the blocks is SIGKILLed; a resume keeps its committed blocks
    (not rewritten) and gives the uninterrupted result."""
    reference = tmp_path / "ref.h5"
    run(config(*SLOW_JOB, f"storage.path={reference}"))
    path = tmp_path / "h.h5"
    with Client(cluster) as client:
        client.run(os.environ.__setitem__, "SLOW_NET_DELAY", "0.005")  # ~20 ms a block
        proc = start_cli(
            *SLOW_JOB,
            "backend=address",
            "backend.write_at=driver",
            f"backend.address={cluster.scheduler_address}",
            f"storage.path={path}",
        )
        try:
            wait_for_blocks(path, 5, proc, timeout=60)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            proc.stdout.close()
            client.run(os.environ.pop, "SLOW_NET_DELAY", None)
    assert not path.exists()
    committed = {p.name: p.stat().st_ino for p in committed_blocks(path)}
    assert 5 <= len(committed) < 64
    res = address_run(path, cluster.scheduler_address, "backend.write_at=driver",
                      "storage.mode=resume", "storage.keep_shards=true", job=SLOW_JOB)  # fmt: skip
    assert (res.blocks_reused, res.blocks_computed) == (len(committed), 64 - len(committed))
    shards = ResultNames(path).shards
    for name, ino in committed.items():  # finished blocks were not redone
        assert (shards / name).stat().st_ino == ino
    assert_same_result(path, contents(reference))


# ---- workers that cannot see the output directory ----------------------------------------------


def _dask_command() -> str:
    here = Path(sys.executable).parent / "dask"
    found = str(here) if here.exists() else shutil.which("dask")
    if found is None:
        pytest.skip("the dask command line is not installed")
    return found


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=30)


@pytest.fixture
def blind_cluster(tmp_path):
    """``dask scheduler`` and one ``dask worker`` on 127.0.0.1, the worker in a mount namespace
    of its own where an empty tmpfs lies over ``tmp_path/out``: it cannot see the output
    directory (as on a cluster without a shared file system). Yields (address, out)."""
    out = tmp_path / "out"
    out.mkdir()
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    mount = 'mount -t tmpfs none "$0"'
    probe = subprocess.run(["unshare", "-m", "sh", "-c", mount, str(out)],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
    if probe.returncode:
        pytest.skip(f"mount namespaces are not allowed here (unshare -m, mount -t tmpfs: "
                    f"{probe.stderr.strip() or probe.returncode})")  # fmt: skip
    dask = _dask_command()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the workers import this checkout's code
    scheduler_file = tmp_path / "scheduler.json"
    log = open(tmp_path / "cluster.log", "wb")  # noqa: SIM115 (closed below)
    procs = []
    try:
        procs.append(subprocess.Popen(
            [dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(scheduler_file)],
            cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True,
        ))  # fmt: skip
        deadline = time.monotonic() + 60
        while not scheduler_file.is_file() and time.monotonic() < deadline:
            assert procs[0].poll() is None, (tmp_path / "cluster.log").read_text()
            time.sleep(0.05)
        address = json.loads(scheduler_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        worker = (
            f'{mount} && exec "$1" worker "$2" --no-nanny --nthreads 1 --host 127.0.0.1 '
            "--no-dashboard"
        )
        procs.append(subprocess.Popen(
            ["unshare", "-m", "sh", "-c", worker, str(out), dask, address],
            cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True,
        ))  # fmt: skip
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(1, timeout=60)
            assert client.run(os.path.isdir, str(tmp_path)) == {
                w: True for w in client.scheduler_info()["workers"]
            }  # it sees the rest of the file system
        yield address, out
    finally:
        _kill(procs)
        log.close()


def _models_built(address: str) -> list[int]:
    """How many models each worker built (none: no block was computed there)."""
    from pipeline.execution.backends import dask_worker

    with Client(address, timeout="30s") as client:
        return list(client.run(lambda: len(dask_worker._WORKER_MODELS)).values())


def test_workers_that_cannot_see_the_directory(blind_cluster, local):
    address, out = blind_cluster
    path = out / "h.h5"
    with pytest.raises(PipelineError) as info:
        address_run(path, address, "backend.write_at=workers")
    message = str(info.value)
    assert info.value.key == "backend.write_at"
    assert "\n" not in message and f"cannot see {path}.shards" in message, message
    assert list(out.iterdir()) == []  # nothing at storage.path, nothing beside it
    assert _models_built(address) == [0]  # refused before anything was computed

    res = address_run(path, address)  # write_at=auto: the probe says driver
    assert res.blocks_computed == 48
    assert_same_result(path, local)
    assert sorted(p.name for p in out.iterdir()) == ["h.h5"]
