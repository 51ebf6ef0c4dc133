"""Backends give the same numbers; a worker killed mid-run does not lose the run."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from distributed import Client, LocalCluster

from pipeline.run import run
from pipeline.store import ResultNames

from .configs import committed_blocks, config, read_hessian

# A small smooth job with many blocks: 6 samples x 64 rows in blocks of 8 rows -> 48 blocks.
JOB = (
    "data=synthetic",
    "data.shape=[64]",
    "data.n_samples=6",
    "storage.block_rows=8",
    "model=custom",
    "+model.net._target_=tests.nets.mlp",
    "+model.net.d=64",
)


@pytest.fixture(scope="module")
def local_result(tmp_path_factory):
    path = tmp_path_factory.mktemp("local") / "h.h5"
    run(config(*JOB, f"storage.path={path}"))
    return read_hessian(path)


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cl:
        yield cl


def test_dask_backend_equals_local(tmp_path, local_result):
    path = tmp_path / "h.h5"
    res = run(config(*JOB, "backend=dask", "backend.n_workers=2", f"storage.path={path}"))
    assert res.blocks_computed == 48
    np.testing.assert_array_equal(read_hessian(path), local_result)
    assert not ResultNames(path).shards.exists()


def test_address_backend_with_a_worker_killed_mid_run(tmp_path, local_result, cluster):
    """An existing scheduler; one worker is SIGKILLed after the first blocks commit."""
    path = tmp_path / "h.h5"
    with Client(cluster) as client:
        pids = list(client.run(os.getpid).values())
    killed = []

    def kill_one_worker():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if len(committed_blocks(path)) >= 3:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_one_worker)
    killer.start()
    res = run(
        config(
            *JOB,
            "backend=address",
            f"backend.address={cluster.scheduler_address}",
            "backend.max_in_flight=2",
            f"storage.path={path}",
        )
    )
    killer.join()
    assert killed, "the worker was not killed while the run was going on"
    assert res.blocks_computed == 48
    np.testing.assert_array_equal(read_hessian(path), local_result)
    assert cluster.scheduler_address  # the run did not close the cluster it did not start
    with Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)


def test_unreachable_scheduler_fails_fast(tmp_path):
    from pipeline.errors import PipelineError

    t = time.monotonic()
    with pytest.raises(PipelineError, match="backend.address"):
        run(
            config(
                *JOB,
                "backend=address",
                "backend.address=tcp://127.0.0.1:9",
                "backend.connect_timeout_s=3",
                f"storage.path={tmp_path / 'h.h5'}",
            )
        )
    assert time.monotonic() - t < 30
    assert not (tmp_path / "h.h5").exists()
