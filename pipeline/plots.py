"""``python -m pipeline.plots PATH [--out DIR] ...``: see :mod:`pipeline.results.plots`."""

import sys

from .results.plots import main, write_reports

__all__ = ["main", "write_reports"]

if __name__ == "__main__":
    sys.exit(main())
