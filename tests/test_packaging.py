"""A non-editable install runs from any directory (issue 11 item 14: ``conf/`` was not shipped).

The package is built from a copy of the sources (no build files in the repository), installed
into a directory of its own, and run from another directory, where only the installed copy is
importable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "pipeline", "conf")


def _copy_sources(dst: Path) -> Path:
    dst.mkdir()
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst / name)
    return dst


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _use_installed(python: str, work: Path, env: dict[str, str]) -> None:
    """``python -m pipeline data.stop=2`` in ``work``, then inspect --verify of its file."""
    where = _run([python, "-c", "import pipeline; print(pipeline.__file__)"], cwd=work, env=env)
    assert not where.stdout.strip().startswith(str(ROOT)), where.stdout
    _run([python, "-m", "pipeline", "data.stop=2", "plots=false", "progress=false"],
         cwd=work, env=env)  # fmt: skip
    (result,) = work.glob("outputs/*/*/hessians.h5")
    out = _run([python, "-m", "pipeline.inspect", str(result), "--verify"], cwd=work, env=env)
    assert "verify: OK" in out.stdout


def test_a_built_wheel_ships_the_configs_and_runs_elsewhere(tmp_path):
    src = _copy_sources(tmp_path / "src")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "-w", str(tmp_path / "dist"), str(src)])  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("pipeline-*.whl")
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
          str(wheel)])  # fmt: skip
    assert (site / "pipeline" / "conf" / "config.yaml").is_file()
    groups = sorted(p.name for p in (site / "pipeline" / "conf").iterdir() if p.is_dir())
    assert groups == ["backend", "data", "experiment", "method", "model", "output", "storage",
                      "target"]  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("HYDRA_FULL_ERROR", None)
    _use_installed(sys.executable, work, env)


@pytest.mark.slow
def test_pip_install_into_a_fresh_venv(tmp_path):
    """The issue's acceptance: a fresh virtual environment, ``pip install .``, ``cd`` elsewhere."""
    src = _copy_sources(tmp_path / "src")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    _run([python, "-m", "pip", "install", "-q", str(src)])
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    _use_installed(python, work, env)
