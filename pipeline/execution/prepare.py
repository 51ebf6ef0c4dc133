"""Everything a run needs, checked before it creates anything.

NOTE: [validation before anything exists] ``run`` checks the config
(``pipeline.config.validate.complete_config``) and then calls :func:`prepare` before it creates a
directory, a lock, a shard or a file, so a refused run leaves the file system as it was and its
corrected rerun is not mistaken for an interrupted run. In order (cheap checks first):
1. the config, typed per option (``pipeline.config``);
2. ``storage.path``: not a directory, its parent creatable and writable (nothing is created);
3. the backend (``Backend.check``): the device exists, dask-cuda is installed, the scheduler
   answers within ``backend.connect_timeout_s`` (a scheduler file is read here);
4. the job: model (finite weights), data and labels (finite), target, method;
5. the ``output`` (rows in range, k <= D) and the plan of blocks (said when it rounds
   ``storage.block_rows`` or leaves Dask workers idle);
6. the model on one sample through the chosen method (a model that ``vmap`` cannot transform
   fails here, not on a worker halfway through the run); ``output=factored`` on one sample (a
   model with no exact J^T A J form is refused here).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config.schema import Config, Mode
from ..errors import PipelineError
from ..store import ResultNames
from ..store.plan import Plan, make_plan
from .backends import Backend, backend_for
from .job import Job, build_job, model_key
from .outputs import check_output, plan_samples, probe_output

log = logging.getLogger(__name__)
PROBE_ROWS = 2  # Hessian rows of sample 0 computed by the one-sample check


@dataclass
class Prepared:
    """What the checks built: the job, its plan of blocks and the backend that runs them."""

    job: Job
    plan: Plan
    backend: Backend


def prepare(cfg: Config, path: Path, early: contextlib.ExitStack | None = None) -> Prepared:
    """Check everything a run needs before it creates anything (see the NOTE above).

    Args:
        cfg: the typed config.
        path: ``storage.path`` resolved (``pipeline.execution.run.output_path``).
        early: where the backend's early start goes (``Backend.start_early``: a Dask cluster
            starts once the backend is checked, its workers importing while the job is built;
            not for a resume of earlier work, which may need no worker).

    Raises:
        PipelineError: naming the config key to change.
    """
    check_storage_path(path)
    backend = backend_for(cfg.backend)
    backend.check()
    if early is not None and not _resumes_earlier_work(cfg, path):
        early.enter_context(backend.start_early())
    job = build_job(cfg)
    if cfg.storage.mode == Mode.resume and job.code_fingerprint is None:
        raise PipelineError(
            "cannot resume: the source code of the model is not readable (defined "
            "interactively?), so this run cannot prove that the model is unchanged; use "
            "storage.mode=overwrite",
            "storage.mode",
        )
    st = cfg.storage
    if cfg.output.name == "dense":
        if st.block_samples is not None:
            log.warning(
                "storage.block_samples applies to the outputs other than dense; a dense "
                "run's blocks are sized by storage.block_rows or storage.block_mb"
            )
        plan = plan_blocks(job)
    else:
        if st.block_rows is not None:
            log.warning(
                "storage.block_rows applies to output=dense; the blocks of output=%s are "
                "groups of whole samples (storage.block_samples)",
                cfg.output.name,
            )
        check_output(cfg.output, job.dim)
        n, k, d = len(job.data.x), job.target.n_outputs, job.dim
        itemsize = job.data.x.element_size()
        plan = plan_samples(cfg.output, n, k, d, itemsize, st.block_mb, st.block_samples)
    backend.review(plan)
    probe(job, backend.device)
    probe_output(job.work, job.model, job.data.x, job.target)
    return Prepared(job, plan, backend)


def _resumes_earlier_work(cfg: Config, path: Path) -> bool:
    """Whether the run resumes a result or blocks already on disk: it may have nothing left to
    compute, and then starts no workers (its backend starts when blocks are missing)."""
    return cfg.storage.mode == Mode.resume and (path.exists() or ResultNames(path).shards.exists())


def check_storage_path(path: Path) -> None:
    """``storage.path`` must name a file in a directory that exists or can be created."""
    if path.is_dir():
        raise PipelineError(
            f"storage.path {path} is a directory: give a file name, e.g. {path / 'hessians.h5'}",
            "storage.path",
        )
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise PipelineError(
            f"cannot write to {path.parent}: a part of the path is a file, not a directory",
            "storage.path",
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PipelineError(f"cannot write to {path.parent}: permission denied", "storage.path")


def plan_blocks(job: Job) -> Plan:
    """The plan of blocks; says in one line when ``storage.block_rows`` was rounded to whole
    HDF5 chunks."""
    st = job.cfg.storage
    n, k, d = len(job.data.x), job.target.n_outputs, job.dim
    plan = make_plan(n, k, d, job.data.x.element_size(), st.block_rows, st.block_mb)
    if st.block_rows is not None and plan.block_rows != min(st.block_rows, d):
        log.warning(
            "storage.block_rows=%d gives blocks of %d rows: a block holds whole HDF5 chunks of "
            "%d rows, and %d has no divisor near that size",
            st.block_rows,
            plan.block_rows,
            plan.chunks[2],
            st.block_rows,
        )
    return plan


def probe(job: Job, device: torch.device) -> None:
    """Compute a few Hessian rows of sample 0 with the job's method on the run's device."""
    rows = torch.arange(min(PROBE_ROWS, job.dim), device=device)
    try:
        job.method.compute(
            job.model.to(device),
            job.data.x[:1].to(device),
            job.target.subset(0, 1).to(device),
            rows,
            job.memory_budget,
        )
    except PipelineError:
        raise
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        hint = (
            "; torch.func must be able to transform the model's forward (no .numpy(), .item() or "
            "Python branches on tensor values), or use method=autograd"
            if job.method.name in ("forward_over_reverse", "reverse_over_reverse")
            else ""
        )
        raise PipelineError(
            f"method {job.method.name!r} fails on this model (sample 0): {type(err).__name__}: "
            f"{first[:240]}{hint}",
            "method.name" if job.cfg.method.name != "auto" else model_key(job.cfg),
        ) from err
    finally:
        job.model.to("cpu")
