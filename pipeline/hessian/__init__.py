"""The math: exact input Hessians of a model's outputs, with no config, Dask or HDF5 in sight.

``hessian(model, x, outputs)`` is the public entry point; ``METHODS`` lists the exact methods.
"""

from .methods import METHODS, hessian
from .targets import Target, make_target

__all__ = ["METHODS", "Target", "hessian", "make_target"]
