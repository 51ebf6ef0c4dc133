"""Compose real Hydra configs from ``conf/`` for tests, the way the command line does."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from pipeline.config.schema import register, to_plain
from pipeline.store import ResultNames

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_config(*overrides: str) -> DictConfig:
    """The composed config for ``overrides``; Hydra's global state is cleared afterwards."""
    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("config", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def config(*overrides: str) -> dict:
    """The resolved config for ``overrides``, as a plain dict (progress bars and plots off)."""
    return to_plain(compose_config("progress=false", "plots=false", *overrides))


def read_hessian(path) -> np.ndarray:
    """``/hessian`` of a result file, which must be complete."""
    with h5py.File(path, "r") as f:
        assert f.attrs["status"] == "complete"
        return f["hessian"][()]


def committed_blocks(path) -> list:
    """The commit records of the finished blocks of the result at ``path``: markers of blocks
    written into ``direct.h5`` or shard files (virtual layout, compression)."""
    names = ResultNames(Path(path))
    return sorted([*names.markers().values(), *names.shard_files().values()])
