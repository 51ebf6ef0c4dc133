"""The math: exact input Hessians of a model's outputs, with no config, Dask or HDF5 in sight.

``hessian(model, x, outputs)`` is the public entry point; ``METHODS`` lists the exact methods.
``diagonal``, ``eigen`` and ``factored`` give what is wanted of the Hessian without the dense
D x D matrix (its diagonal, a few eigenpairs, J^T A J).
"""

from .diagonal import diagonal
from .eigen import eigen
from .factored import factored
from .methods import METHODS, hessian
from .targets import Target, make_target

__all__ = ["METHODS", "Target", "diagonal", "eigen", "factored", "hessian", "make_target"]
