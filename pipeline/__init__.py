"""Exact input Hessians of neural networks, computed in row blocks and streamed to HDF5."""

from .errors import PipelineError
from .methods import METHODS, hessian
from .reader import read
from .targets import Target, make_target

__all__ = ["METHODS", "PipelineError", "Target", "hessian", "make_target", "read"]
__version__ = "0.1.0"
