"""``python -m pipeline [overrides]``: the Hydra command line around :func:`pipeline.run.run`.

Every failure ends with one line on stderr: ``error: ... (config key: KEY)`` for what a user can
fix, ``internal error: ...; HYDRA_FULL_ERROR=1 shows the traceback`` otherwise; exit code 1.
Ctrl-C says how many blocks are committed and how to resume; exit code 130.
``HYDRA_FULL_ERROR=1`` shows the full traceback instead.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from pathlib import Path

import hydra
import hydra._internal.utils as hydra_utils
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .config.schema import config_dir, register
from .config.validate import complete_config, config_error
from .errors import PipelineError
from .execution.run import output_path, run

log = logging.getLogger("pipeline")
register()


def one_line(err: BaseException) -> str:
    """A Hydra/OmegaConf error or a PipelineError condensed to one line naming the config key."""
    return str(config_error(err))


def internal_error(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [""])[0][:300]
    return f"internal error: {type(err).__name__}: {first}; HYDRA_FULL_ERROR=1 shows the traceback"


def _report(func):
    """Replaces Hydra's error reporting: one line and exit 1, unless HYDRA_FULL_ERROR=1."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return _hydra_report(func)
    try:
        return func()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(1)


_hydra_report = hydra_utils.run_and_report
hydra_utils.run_and_report = _report


def interrupted(cfg: DictConfig, output_dir: Path, overrides: list[str]) -> str:
    """The line for Ctrl-C: how many blocks are committed, and the command that resumes."""
    from .store import ResultNames

    path = output_path(complete_config(cfg), output_dir)
    names = ResultNames(path)
    done = len(names.markers().keys() | names.shard_files().keys())
    try:
        total = json.loads(names.manifest.read_text())["n_blocks"]
    except (OSError, ValueError, KeyError):
        total = "?"
    if path.is_file() and not done:
        return f"interrupted after the result was written: {path}"
    if not done:
        return "interrupted before any block was committed: nothing to resume"
    keep = [o for o in overrides if o.split("=")[0].lstrip("+~") not in _RESUME_KEYS]
    command = shlex.join(
        ["python", "-m", "pipeline", *keep, "storage.mode=resume", f"storage.path={path}"]
    )
    return (
        f"interrupted: {done} of {total} blocks are committed in {names.shards}; "
        f"resume with: {command}"
    )


_RESUME_KEYS = {"storage.mode", "storage.path"}


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    output_dir = Path(hc.runtime.output_dir)
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        result = run(cfg, output_dir, overrides)
    except KeyboardInterrupt:
        if full:
            raise
        print(interrupted(cfg, output_dir, overrides), file=sys.stderr)
        sys.exit(130)
    except PipelineError as err:
        if full:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except Exception as err:
        if full:
            raise
        print(internal_error(err), file=sys.stderr)
        sys.exit(1)
    took = f"{result.seconds:.2f} s"
    print(f"{result.dataset} {result.shape} via {result.method} in {took} -> {result.path}")


if __name__ == "__main__":
    main()
