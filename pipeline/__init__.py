"""Exact input Hessians of neural networks, computed in row blocks and streamed to HDF5."""

from .errors import PipelineError
from .hessian import METHODS, Target, hessian, make_target
from .version import __version__

__all__ = [
    "METHODS",
    "PipelineError",
    "RunResult",
    "Target",
    "hessian",
    "make_target",
    "read",
    "run_overrides",
    "__version__",
]


def __getattr__(name: str):
    """``run_overrides`` and ``RunResult`` (``pipeline.execution.run``) and ``read``
    (``pipeline.results.reader``, which imports ``dask.array``: 0.3-0.45 s) are imported when
    first used."""
    if name in ("run_overrides", "RunResult"):
        from .execution.run import RunResult, run_overrides

        return {"run_overrides": run_overrides, "RunResult": RunResult}[name]
    if name == "read":
        from .results.reader import read

        return read
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
