"""Small real result files for the reader, inspect and plots tests, each computed once per session.

``result_file(tmp_path_factory, name)`` runs ``pipeline.execution.run.run`` on a config composed
from ``conf/`` with the overrides in ``CASES[name]`` and returns the path of the written file.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.execution.run import run

from .configs import compose_config

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
    "zero": ["data.stop=2", "model.net.activation=relu"],  # a ReLU net's logit: H = 0
}

_made: dict[str, Path] = {}


def result_file(tmp_path_factory, name: str) -> Path:
    """The result file of case ``name`` (computed on first use)."""
    if name not in _made:
        path = tmp_path_factory.mktemp(name) / "hessians.h5"
        cfg = compose_config(
            *CASES[name],
            f"storage.path={path}",
            "progress=false",
            *([] if "plots=true" in CASES[name] else ["plots=false"]),
        )
        run(cfg)
        _made[name] = path
    return _made[name]
