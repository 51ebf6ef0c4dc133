"""One run of the pipeline: build the job, open the result, compute the missing blocks, finish.

``run(cfg)`` is what ``python -m pipeline`` calls; tests call it directly with composed configs.
Storage (locks, resume rules, commits, the file) belongs to ``pipeline.store``; where blocks are
computed and written to the backend (``pipeline.execution.backends``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import yaml
from omegaconf import DictConfig

from ..config.precision import tf32_report
from ..config.schema import Config, as_dict, fingerprint
from ..config.validate import complete_config
from ..store import Metadata, ResultWriter, check_destination
from ..store.parts import PartsWriter
from ..store.plan import Plan
from ..store.schema import main_field
from ..version import __version__
from .backends import Backend
from .job import Job
from .outputs import sizes as output_sizes
from .prepare import prepare
from .progress import progress

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """Where the result went and what it took."""

    path: Path
    shape: tuple[int, ...]  # of the main dataset: /hessian (N, K, D, D) of a dense result
    method: str
    seconds: float
    blocks_computed: int
    blocks_reused: int
    compute_seconds: float = 0.0  # computing and writing the blocks (no start-up, no finishing)
    finish_seconds: float = 0.0  # checking, flushing and renaming the file after the last block
    reports: list[Path] | None = None  # the plots and statistics written after the run
    output: str = "dense"  # the kind of result (``output``), and so the main dataset's name

    samples_computed: int = 0  # the samples of the blocks computed by this run (not reused)

    @property
    def samples_per_second(self) -> float:
        """Samples computed per second of computing and writing (0.0 when none was computed)."""
        return self.samples_computed / self.compute_seconds if self.compute_seconds > 0 else 0.0

    @property
    def dataset(self) -> str:
        """The main dataset's name (``hessian``, ``diagonal``, ``eigenvalues``, ``jacobian``)."""
        return main_field(self.output).name


def output_path(cfg: Config, output_dir: Path | None) -> Path:
    """``storage.path``, or ``hessians.h5`` in the run directory."""
    if cfg.storage.path:
        return Path(cfg.storage.path).expanduser().absolute()
    return (Path(output_dir) if output_dir else Path.cwd()).absolute() / "hessians.h5"


def versions() -> dict[str, str]:
    """The versions recorded in a result's metadata (dask's from its package metadata: importing
    it took 0.3 s of a local run)."""
    from importlib.metadata import version

    import h5py
    import torch

    return {
        "torch": str(torch.__version__),
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "dask": version("dask"),
        "pipeline": __version__,
        "numpy": np.__version__,
    }


def run(
    cfg: Config | DictConfig | dict,
    output_dir: Path | None = None,
    overrides: list[str] | None = None,
) -> RunResult:
    """Compute the Hessians a config describes and write them to ``storage.path``."""
    t0 = time.perf_counter()
    cfg = complete_config(cfg)
    path = output_path(cfg, output_dir)
    check_destination(path, cfg.storage)  # the mode's rules, before building anything
    with contextlib.ExitStack() as early:  # a Dask cluster started early, closed after it ran
        prepared = prepare(cfg, path, early)  # see NOTE: [validation before anything exists]
        job, plan, backend = prepared.job, prepared.plan, prepared.backend
        if cfg.plots:
            _check_report_options(cfg, plan)
        meta = metadata(job, backend, overrides or [])
        kind = cfg.output.name
        writer = result_writer(path, plan, meta, cfg, backend)
        with writer:
            left, t_compute = _compute(cfg, job, plan, backend, writer, early)
            t_finish = time.perf_counter()
            writer.finish()
            t_finish = time.perf_counter() - t_finish
    with h5py.File(path, "r") as f:
        shape = tuple(int(s) for s in f[main_field(kind).name].shape)
    computed = left // max(1, plan.dim)
    result = RunResult(
        path, shape, job.method.name, time.perf_counter() - t0, len(writer.missing),
        writer.reused, t_compute, t_finish, output=kind, samples_computed=computed,
    )  # fmt: skip
    log.info(
        "wrote %s: %s %s %s, method %s, %.2f s (%d blocks computed, %d reused), %.0f samples/s "
        "while computing",
        path, result.dataset, result.shape, cfg.dtype, result.method, result.seconds,
        len(writer.missing), writer.reused, result.samples_per_second,
    )  # fmt: skip
    if cfg.plots:
        result.reports = _after_run_reports(path, job, output_dir)
    return result


def _compute(
    cfg: Config, job: Job, plan: Plan, backend: Backend, writer, early: contextlib.ExitStack
) -> tuple[int, float]:
    """Compute and commit the blocks the writer misses, then close what started early; returns
    the (sample, row) pairs computed and the backend's seconds."""
    log.info(
        "Hessians (%d, %d, %d, %d) %s, output=%s, method=%s, %d blocks of %d samples x %d "
        "rows (%d done)",
        plan.n_samples, plan.n_outputs, plan.dim, plan.dim, cfg.dtype, cfg.output.name,
        job.method.name, len(plan.blocks), plan.block_samples, plan.block_rows, writer.reused,
    )  # fmt: skip
    left = sum(b.cells for b in writer.missing)  # (sample, row) pairs still to compute
    if not writer.missing:  # a resume with every block committed starts no workers
        return left, 0.0
    todo = {b.index: b for b in writer.missing}
    done = plan.n_samples * plan.dim - left  # the bar counts samples (rate, time left)
    with progress(cfg.progress, plan.n_samples, done // plan.dim, "samples") as bar:

        def on_written(index: int) -> None:
            nonlocal done
            writer.commit(index)
            before, done = done // plan.dim, done + todo[index].cells
            bar.update(done // plan.dim - before)

        t_compute = backend.execute(job, writer.missing, writer.sink, on_written)
    early.close()
    log.info("all %d blocks written", len(plan.blocks))
    return left, t_compute


def result_writer(path: Path, plan: Plan, meta: Metadata, cfg: Config, backend: Backend):
    """The writer of the run's kind of result (``output``)."""
    overlap = {"remote_workers": backend.remote_workers,
               "defer_copies": not backend.copies_can_overlap()}  # fmt: skip
    if cfg.output.name == "dense":
        return ResultWriter(path, plan, meta, cfg.storage, **overlap)
    sizes = output_sizes(cfg.output, plan.n_samples, plan.n_outputs, plan.dim)
    rows = {"rows": list(cfg.output.rows)} if cfg.output.name == "rows" else {}
    weighted = bool(getattr(cfg.output, "mass_weighted", False))
    return PartsWriter(path, plan, meta, cfg.storage, cfg.output.name, sizes, rows, **overlap,
                       mass_weighted=weighted)  # fmt: skip


def metadata(job: Job, backend: Backend, overrides: list[str]) -> Metadata:
    """Everything in the file besides the blocks' values: inputs, outputs, indices, provenance."""
    plain = as_dict(job.cfg)
    code = job.code_fingerprint or os.urandom(16).hex()  # unreadable code: never reusable
    attrs = {
        "config": yaml.safe_dump(plain, sort_keys=False),
        "overrides": yaml.safe_dump(list(overrides)),
        "versions": yaml.safe_dump(versions()),
        "method": job.method.name,
        "dtype": str(job.cfg.dtype),
        "target": job.target.kind,
        "model_fingerprint": job.model_fingerprint,
        "code_fingerprint": job.code_fingerprint or "unreadable",
        "fingerprint": fingerprint(plain, job.model_fingerprint, code, job.data_fingerprint()),
        "cwd": os.getcwd(),  # relative paths in the config are relative to it
        "input_shape": list(job.data.x.shape[1:]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    attrs.update(tf32_report(job, backend.device))
    return Metadata(
        inputs=job.data.x,  # written to /inputs a chunk at a time
        outputs=job.outputs.numpy(),
        sample_index=job.data.sample_index,
        output_index=np.asarray(job.target.output_index, dtype=np.int64),
        attrs=attrs,
        atomic_numbers=job.data.atomic_numbers,
        masses=job.data.masses,
    )


def _check_report_options(cfg: Config, plan: Plan) -> None:
    try:
        from ..results.plots import check_report
    except ImportError:
        return
    check_report(cfg.report, plan.n_samples, plan.n_outputs)


def _after_run_reports(path: Path, job: Job, output_dir: Path | None) -> list[Path]:
    """Plots and per-sample statistics in the run directory (see pipeline.results.plots); the
    spectrum of a large matrix from the model's Hessian-vector products, not from the file."""
    cfg = job.cfg
    try:
        from ..results.plots import report_dir, write_reports
    except ImportError:
        return []
    try:
        out = report_dir(path, output_dir)
        return write_reports(path, out, cfg.report, cfg.progress, model_products(job))
    except Exception as err:  # the result is complete; a failed plot must not hide that
        log.warning("plots not written: %s: %s", type(err).__name__, err)
        return []


def model_products(job: Job):
    """``(n, k) -> (v -> H[n, k] v)``: exact Hessian-vector products of the job's model (float64
    arrays in and out), for the reports. The gradient's graph is built once per (n, k); each
    product is then one backward pass through it (double backward), a few milliseconds where a
    product read from the file streams the whole D x D matrix."""
    import torch

    def for_pair(n: int, k: int):
        x = job.data.x[n : n + 1].clone().requires_grad_(True)
        target = job.target.subset(n, n + 1)
        with torch.enable_grad():
            y = target.select(job.model(x)[0], target.aux[0])[k]
            (g,) = torch.autograd.grad(y, x, create_graph=True)

        def matvec(v):
            u = torch.as_tensor(v, dtype=x.dtype).reshape(x.shape)
            with torch.enable_grad():
                (hv,) = torch.autograd.grad(g, x, u, retain_graph=True, allow_unused=True)
            return np.zeros(u.numel()) if hv is None else hv.reshape(-1).double().numpy()

        return matvec

    return for_pair


def run_overrides(
    overrides: list[str] | tuple[str, ...] = (), output_dir: str | os.PathLike | None = None
) -> RunResult:
    """Run the job that ``python -m pipeline OVERRIDES`` runs, from Python.

    The config is composed from the package's ``conf/`` with Hydra's compose API, exactly as the
    command line composes it, e.g. ``run_overrides(["model=cnn", "data.stop=4"])``.

    Args:
        overrides: Hydra overrides, as on the command line.
        output_dir: where ``hessians.h5`` goes unless ``storage.path`` is given (default: the
            current directory; the command line uses a new ``outputs/<date>/<time>/``).

    Returns:
        The :class:`RunResult`.

    Raises:
        PipelineError: a bad override or input, naming the config key.
    """
    from ..config.schema import compose
    from ..config.validate import config_error

    try:
        cfg = compose(list(overrides))
    except Exception as err:
        raise config_error(err) from err
    return run(cfg, Path(output_dir) if output_dir is not None else None, list(overrides))
