"""Small real result files for the reader, inspect and plots tests, each computed once per session.

``result_file(tmp_path_factory, name)`` runs ``pipeline.run.run`` on a config composed from
``conf/`` with the overrides in ``CASES[name]`` and returns the path of the written file.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from pipeline.config import register
from pipeline.run import run

CONF = Path(__file__).resolve().parents[1] / "conf"

# name -> overrides: digits (1, 8, 8) inputs, tanh MLP, D = 64.
CASES: dict[str, list[str]] = {
    "copy": ["data.stop=3", "target.indices=[2,5]", "plots=true"],
    "virtual": [
        "data.stop=3",
        "target=predicted",
        "storage.layout=virtual",
        "storage.block_rows=16",
    ],
    "float64": ["data.stop=2", "dtype=float64"],
}

_made: dict[str, Path] = {}


def compose_config(overrides: list[str]):
    register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def result_file(tmp_path_factory, name: str) -> Path:
    """The result file of case ``name`` (computed on first use)."""
    if name not in _made:
        path = tmp_path_factory.mktemp(name) / "hessians.h5"
        cfg = compose_config(
            [*CASES[name], f"storage.path={path}", "progress=false"]
            + ([] if "plots=true" in CASES[name] else ["plots=false"])
        )
        run(cfg)
        _made[name] = path
    return _made[name]
