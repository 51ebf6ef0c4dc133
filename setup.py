"""Packaging beyond what ``pyproject.toml`` can say: the repository's ``conf/`` (the Hydra config
groups, kept at the root beside ``pipeline/``) is shipped inside the package as
``pipeline/conf``, so an installed ``python -m pipeline`` finds its configs from any directory
(see ``pipeline.config.schema.config_dir``)."""

from pathlib import Path

from setuptools import find_packages, setup

GROUPS = sorted(d.name for d in (Path(__file__).parent / "conf").iterdir() if d.is_dir())

setup(
    packages=[
        *find_packages(include=["pipeline", "pipeline.*"]),
        "pipeline.inputs.checkpoints",
        "pipeline.conf",
        *(f"pipeline.conf.{group}" for group in GROUPS),
    ],
    package_dir={"pipeline.conf": "conf"},
    package_data={"pipeline.inputs.checkpoints": ["*.pt"], "pipeline.conf": ["*.yaml"]}
    | {f"pipeline.conf.{group}": ["*.yaml"] for group in GROUPS},
)
