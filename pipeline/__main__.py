"""``python -m pipeline [overrides]``: the Hydra command line around :func:`pipeline.run.run`."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .config import register
from .errors import PipelineError
from .run import run

log = logging.getLogger("pipeline")
register()


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
    print(
        f"hessian ({n}, {k}, {d}, {d}) via {result.method} in {result.seconds:.2f} s -> {result.path}"
    )


if __name__ == "__main__":
    main()
