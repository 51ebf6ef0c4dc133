"""Exact input Hessians of neural networks, computed in row blocks and streamed to HDF5."""

from .errors import PipelineError
from .hessian import METHODS, Target, hessian, make_target
from .reader import read

__all__ = ["METHODS", "PipelineError", "Target", "hessian", "make_target", "read"]
__version__ = "0.1.0"
