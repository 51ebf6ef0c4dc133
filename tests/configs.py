"""Compose real Hydra configs from ``conf/`` for tests, the way the command line does."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from pipeline.config import register, to_plain

CONF = Path(__file__).resolve().parents[1] / "conf"


def config(*overrides: str) -> dict:
    """The resolved config for ``overrides``, as a plain dict (progress bars and plots off)."""
    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=["progress=false", "plots=false", *overrides])
        return to_plain(cfg)
    finally:
        GlobalHydra.instance().clear()
