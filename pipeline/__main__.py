"""``python -m pipeline [overrides]``: the Hydra command line around :func:`pipeline.run.run`.

Errors a user can cause (a bad override, a missing file, an index out of range) end the run with
one line ``error: ... (config key: KEY)`` on stderr and exit code 1; ``HYDRA_FULL_ERROR=1`` shows
the full traceback instead.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import hydra
import hydra._internal.utils as hydra_utils
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .config import register
from .errors import PipelineError
from .run import run

log = logging.getLogger("pipeline")
register()


def one_line(err: BaseException) -> str:
    """A Hydra/OmegaConf error or a PipelineError condensed to one line naming the config key."""
    if isinstance(err, PipelineError):
        return str(err)
    parts, cause = [], err
    while cause is not None and len(parts) < 2:
        if "$VALUE" not in str(cause):
            parts.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    text = "\n".join(dict.fromkeys(parts))
    key = re.search(r"full_key: (\S+)", text)
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip()
        and not re.match(r"(full_key|object_type|reference_type|provider)=?:?", line.strip())
        and not line.startswith("Config search path")
        and "HYDRA_FULL_ERROR" not in line
    ]
    msg = "; ".join(lines).replace(":;", ":").replace("Available options", "available options")
    if key and "config key" not in msg:
        msg += f" (config key: {key.group(1)})"
    return msg or type(err).__name__


def _report(func):
    """Replaces Hydra's error reporting: one line and exit 1, unless HYDRA_FULL_ERROR=1."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return _hydra_report(func)
    try:
        return func()
    except Exception as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(1)


_hydra_report = hydra_utils.run_and_report
hydra_utils.run_and_report = _report


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    try:
        result = run(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task))
    except PipelineError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    n, k, d, _ = result.shape
    took = f"{result.seconds:.2f} s"
    print(f"hessian ({n}, {k}, {d}, {d}) via {result.method} in {took} -> {result.path}")


if __name__ == "__main__":
    main()
