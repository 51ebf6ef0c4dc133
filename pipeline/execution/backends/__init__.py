"""Where blocks run: backends as registered objects (see ``base``). ``backend_for(cfg.backend)``
gives the run's backend; the built-in ones are ``local``, ``dask``, ``dask_cuda`` and
``address``."""

from . import dask, local  # noqa: F401  (they register themselves)
from .base import BACKENDS, Backend, BlockWriter, backend_for, register_backend

__all__ = ["BACKENDS", "Backend", "BlockWriter", "backend_for", "register_backend"]
