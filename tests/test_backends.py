"""Backends give the same numbers; a worker killed mid-run does not lose the run."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import numpy as np
import pytest
from distributed import Client

from pipeline.execution.run import run
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


def test_dask_backend_equals_local(tmp_path, local_result):
    path = tmp_path / "h.h5"
    res = run(config(*JOB, "backend=dask", "backend.n_workers=2", f"storage.path={path}"))
    assert res.blocks_computed == 48
    np.testing.assert_array_equal(read_hessian(path), local_result)
    assert not ResultNames(path).shards.exists()


def test_address_backend_with_a_worker_killed_mid_run(tmp_path, local_result, cluster):
    """An existing scheduler; one worker is SIGKILLed after the first blocks commit. The block it
    was computing is recomputed elsewhere by the scheduler (``allowed-failures``), even with
    ``backend.retries=0`` (which re-runs blocks that raised)."""
    import dask

    assert dask.config.get("distributed.scheduler.allowed-failures") >= 1
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
            "backend.retries=0",  # a dead worker is Dask's allowed-failures, not our retries
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


def test_missing_scheduler_file_fails_at_once(tmp_path):
    """Issue 11 item 9: Dask waits for a scheduler file that does not exist (over 117 s)."""
    from pipeline.errors import PipelineError

    t = time.monotonic()
    with pytest.raises(PipelineError, match="not found") as info:
        run(config(*JOB, "backend=address", f"backend.scheduler_file={tmp_path / 's.json'}",
                   "backend.connect_timeout_s=3", f"storage.path={tmp_path / 'h.h5'}"))  # fmt: skip
    assert time.monotonic() - t < 3
    assert info.value.key == "backend.scheduler_file"


# Weights drawn from the seed (no checkpoint): 4 samples x 64 rows in blocks of 16 rows.
SEEDED = ("model.net.pretrained=false", "data.stop=4", "storage.block_rows=16", "seed=3")


def test_workers_build_the_drivers_seeded_model(tmp_path, cluster):
    """Issue 11 item 1: workers built the model without torch.manual_seed(cfg.seed), so a Dask
    run of a model whose weights come from the seed computed another model's Hessians."""
    local, dask = tmp_path / "local.h5", tmp_path / "dask.h5"
    run(config(*SEEDED, f"storage.path={local}"))
    res = run(config(*SEEDED, "backend=address", f"backend.address={cluster.scheduler_address}",
                     f"storage.path={dask}"))  # fmt: skip
    assert res.blocks_computed == 16
    np.testing.assert_array_equal(read_hessian(dask), read_hessian(local))


def test_a_worker_that_builds_another_model_refuses_in_one_line(tmp_path):
    """The workers check the fingerprint of the model they built (here the factory draws the
    weights from the process id); the error is one line, not a worker's traceback."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "h.h5"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "backend=dask", "model=custom",
         "+model.net._target_=tests.nets.drawn_per_process", "data=synthetic",
         "data.n_samples=4", "storage.block_rows=32", f"storage.path={out}", "plots=false",
         "progress=false", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    chatter = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "[distributed." in ln]
    assert not chatter, chatter  # the scheduler's INFO lines (and shutdown tracebacks) filtered
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("error: the model that Dask worker ")
    assert "differs from the driver's (weights fingerprint" in errors[0]
    assert not out.exists()


# (logger, level, whether the user sees it while a Dask cluster runs)
DRIVER_LOGS = [
    ("distributed.scheduler", logging.INFO, False),
    ("distributed.batched", logging.INFO, False),  # "Batched Comm Closed" with its traceback
    ("distributed.worker", logging.WARNING, True),
    ("tornado.application", logging.ERROR, False),  # "Exception in callback" after Ctrl-C
    ("asyncio", logging.ERROR, False),
    ("tornado.application", logging.CRITICAL, True),
    ("tests.a_users_logger", logging.INFO, True),
]


def test_the_driver_shows_dasks_warnings_not_its_chatter(monkeypatch):
    from pipeline.execution.backends.dask import _driver_logs_quiet

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    seen: list[tuple[str, int]] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append((record.name, record.levelno))

    handler = Keep(logging.DEBUG)
    monkeypatch.setattr(logging.root, "handlers", [handler])
    with _driver_logs_quiet():
        for name, level, _ in DRIVER_LOGS:
            logger = logging.getLogger(name)  # (as configured by no earlier test)
            for attr, value in (("level", logging.DEBUG), ("disabled", False), ("propagate", True)):
                monkeypatch.setattr(logger, attr, value)
            monkeypatch.setattr(logger, "handlers", [])
            logger.log(level, "a record")
    expected = [(name, level) for name, level, shown in DRIVER_LOGS if shown]
    assert seen == expected
    assert not handler.filters  # the filter is gone after the run
