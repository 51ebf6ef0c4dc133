"""A Dask run starts its cluster before it builds the job (``Backend.start_early``): the workers
import torch and the pipeline while the driver loads the data, chooses the method and opens the
result. One cluster a run, closed on every path; none for a resume that has nothing to compute.
"""

from __future__ import annotations

import multiprocessing
import sys

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
    """In a worker: this module's ``_MARK``, which the test sets in the driver only. A forked
    worker has the driver's copy of the module; a spawned one imports it afresh, without it."""
    return getattr(sys.modules[__name__], "_MARK", None)


# (backend options, whether the early cluster's workers are forked from the driver)
FORKED = [
    ((), True),
    (("backend.fork_workers=false",), False),
    (("backend.threads_per_worker=2",), False),  # GNU OpenMP hangs in forked children
]


@pytest.mark.parametrize(("options", "forked"), FORKED, ids=[str(o) for o, _ in FORKED])
def test_the_early_cluster_forks_its_workers_only_where_safe(monkeypatch, options, forked):
    backend = backend_for(complete_config(config(*JOB, *options)).backend)
    monkeypatch.setattr(sys.modules[__name__], "_MARK", "driver", raising=False)
    with backend.start_early():
        seen = list(backend._early.run(_driver_mark).values())
    assert seen == ["driver" if forked else None], (options, seen)
    with backend.client() as client:  # a late start (a resume's): spawned
        assert list(client.run(_driver_mark).values()) == [None]
    assert not multiprocessing.active_children(), "a worker process outlived its cluster"
