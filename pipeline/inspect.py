"""``python -m pipeline.inspect PATH [--verify] [--stats]``: see :mod:`pipeline.results.inspect`."""

import sys

from .results.inspect import _main, main

__all__ = ["main"]

if __name__ == "__main__":
    import numpy as np

    np.set_printoptions(precision=5)
    sys.exit(_main())
