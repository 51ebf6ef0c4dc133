"""Exact input Hessians of neural networks, computed in row blocks and streamed to HDF5."""

from .errors import PipelineError
from .hessian import METHODS, Target, hessian, make_target
from .results.reader import read
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
    """``run_overrides`` and ``RunResult`` (``pipeline.execution.run``) import Dask when first
    used."""
    if name in ("run_overrides", "RunResult"):
        from .execution.run import RunResult, run_overrides

        return {"run_overrides": run_overrides, "RunResult": RunResult}[name]
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
