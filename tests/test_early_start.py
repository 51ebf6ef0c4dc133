"""A Dask run starts its cluster before it builds the job (``Backend.start_early``): the workers
import torch and the pipeline while the driver loads the data, chooses the method and opens the
result. One cluster a run, closed on every path; none for a resume that has nothing to compute.
"""

from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor

import h5py
import numpy as np
import pytest
import torch

from pipeline import hessian
from pipeline.config.validate import complete_config
from pipeline.errors import PipelineError
from pipeline.execution import prepare as prepare_module
from pipeline.execution.backends import backend_for
from pipeline.execution.backends.dask import DaskLocal
from pipeline.execution.run import run

from .configs import config, read_hessian
from .nets import mlp

JOB = ("model=custom", "+model.net._target_=tests.nets.mlp", "+model.net.d=8", "data=synthetic",
       "data.shape=[8]", "data.n_samples=6", "storage.block_rows=4", "backend=dask",
       "backend.n_workers=1")  # fmt: skip


@pytest.fixture
def events(monkeypatch):
    """What happened, in order: ``cluster`` when a Dask cluster starts, ``job`` when the job is
    built, ``closed`` when the cluster is closed."""
    seen: list[str] = []
    client, build_job = DaskLocal.client, prepare_module.build_job

    def spied_client(self, early=False):
        seen.append("cluster")
        inner = client(self, early)

        class Spy:
            def __enter__(self):
                return inner.__enter__()

            def __exit__(self, *exc):
                seen.append("closed")
                return inner.__exit__(*exc)

        return Spy()

    def spied_build_job(cfg):
        seen.append("job")
        return build_job(cfg)

    monkeypatch.setattr(DaskLocal, "client", spied_client)
    monkeypatch.setattr(prepare_module, "build_job", spied_build_job)
    return seen


def test_a_dask_run_starts_one_cluster_before_it_builds_the_job(tmp_path, events):
    path = tmp_path / "h.h5"
    result = run(config(*JOB, f"storage.path={path}"))
    assert events == ["cluster", "job", "closed"], events
    assert result.blocks_computed > 1 and not multiprocessing.active_children()
    with h5py.File(path, "r") as f:
        x = torch.as_tensor(f["inputs"][()])
    expected = hessian(mlp(8).eval(), x, [2]).numpy()  # class 2: the default target
    np.testing.assert_allclose(read_hessian(path), expected, rtol=1e-5, atol=1e-6)


# (what is wrong, the config key the error names): refused after the cluster started
REFUSED_LATE = [
    (("output=rows", "output.rows=[99]"), "output.rows"),  # checked with the plan
    (("target.indices=[12]",), "target.indices"),  # checked when the job is built
]


@pytest.mark.parametrize(("wrong", "key"), REFUSED_LATE, ids=[k for _, k in REFUSED_LATE])
def test_a_run_refused_after_its_cluster_started_closes_it(tmp_path, events, wrong, key):
    path = tmp_path / "h.h5"
    with pytest.raises(PipelineError) as err:
        run(config(*JOB, *wrong, f"storage.path={path}"))
    assert err.value.key == key, err.value
    assert events[0] == "cluster" and events[-1] == "closed", events
    assert not multiprocessing.active_children(), "a worker process outlived the run"
    assert not path.exists() and list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_a_resume_of_a_complete_result_starts_no_cluster(tmp_path, events):
    path = tmp_path / "h.h5"
    run(config(*JOB[:-2], f"storage.path={path}"))  # the local backend writes it
    result = run(config(*JOB, "storage.mode=resume", f"storage.path={path}"))
    assert result.blocks_computed == 0 and result.blocks_reused > 0
    assert "cluster" not in events, events


def _driver_mark():
    """In a worker: this module's ``_MARK``, which the driver sets (a forked worker has the
    driver's copy of the module; a spawned one imports it afresh, without it), the threads of
    its torch and BLAS pools (one, as a spawned worker's) and its malloc heaps (one, as a
    spawned worker's with MALLOC_ARENA_MAX=1: NOTE [malloc in Dask workers])."""
    import threading

    from threadpoolctl import threadpool_info

    from pipeline.hessian.allocator import heaps

    pools = sorted({p["num_threads"] for p in threadpool_info()})
    found: list[int] = []
    compute = threading.Thread(target=lambda: found.append(heaps()))  # a task's thread
    compute.start()
    compute.join()
    mark = getattr(sys.modules[__name__], "_MARK", None)
    return mark, torch.get_num_threads(), pools, found[0]


def _workers_of_a_new_driver(options: tuple[str, ...], threads_before: bool) -> tuple:
    """In a new process (the driver): what the worker of its early cluster, and of a cluster
    started later, report (``_driver_mark``). ``threads_before``: another thread ran first."""
    global _MARK
    _MARK = "driver"
    if threads_before:  # a thread allocated before (torch's OpenMP threads, say): its own heap
        import threading

        from pipeline.hessian.allocator import _libc

        _libc().mallopt(-8, 8)  # M_ARENA_MAX (an earlier nanny's MALLOC_ARENA_MAX=1 is in env)
        before = threading.Thread(target=lambda: torch.randn(1 << 16).sum())
        before.start()
        before.join()
    backend = backend_for(complete_config(config(*JOB, *options)).backend)
    with backend.start_early():
        early = list(backend._early.run(_driver_mark).values())
    with backend.client() as client:  # a late start (a resume's)
        late = list(client.run(_driver_mark).values())
    return early, late, bool(multiprocessing.active_children())


# (backend options, another thread allocated in the driver first, the early workers forked)
FORKED = [
    ((), False, True),
    (("backend.fork_workers=false",), False, False),
    (("backend.threads_per_worker=2",), False, False),  # GNU OpenMP hangs in forked children
    ((), True, False),  # more than one heap: a forked worker's threads would take the others
]


@pytest.mark.parametrize(
    ("options", "threads_before", "forked"), FORKED, ids=[f"{o}-{t}" for o, t, _ in FORKED]
)
def test_the_early_cluster_forks_its_workers_only_where_safe(options, threads_before, forked):
    spawn = multiprocessing.get_context("spawn")  # a driver of its own (this one's torch has
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:  # run threads); not daemonic
        job = pool.submit(_workers_of_a_new_driver, options, threads_before)
        early, late, left = job.result(timeout=300)
    threads = 2 if "backend.threads_per_worker=2" in options else 1
    ((mark, torch_threads, pools, heaps),) = early
    assert mark == ("driver" if forked else None), (options, early)
    assert torch_threads == threads and (threads > 1 or pools == [1]), (options, early)
    assert heaps == 1, f"{options}: a worker's thread computes on one of {heaps} heaps"
    assert [m for m, *_ in late] == [None], f"{options}: a late cluster's workers: {late}"
    assert not left, "a worker process outlived its cluster"
