"""The validation stage and the Python entry points (issue 11 items 8-12 and 16).

The bad inputs of the README's error table are in ``test_errors.py``; here: keys of another
option, partial configs, ``run_overrides``, the plan's messages and sweeps.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra.errors import ConfigCompositionException

import pipeline
from pipeline.config.schema import AllTarget
from pipeline.config.validate import check_sweep, complete_config, config_error
from pipeline.errors import PipelineError
from pipeline.execution.prepare import prepare
from pipeline.execution.run import output_path, run
from pipeline.store.plan import make_plan

from .configs import compose_config, config, read_hessian

ROOT = Path(__file__).resolve().parents[1]

# (overrides, the key named, what the message says)
OTHER_OPTIONS_KEYS = {
    "local_n_workers": (["backend=local", "backend.n_workers=4"], "backend.n_workers",
                        "backend=local takes name, device; n_workers belongs to backend=dask"),
    "all_indices": (["target=all", "target.indices=[3]"], "target.indices",
                    "target=all takes name; indices belongs to target=indices"),
    "digits_path": (["data=digits", "data.path=x.npy"], "data.path",
                    "path belongs to data=npy and data=hdf5"),
    "exported_checkpoint": (["model=exported", "model.path=m.pt2", "model.checkpoint=w.pt"],
                            "model.checkpoint", "checkpoint belongs to model=mlp"),
    "dask_address": (["backend=dask", "backend.address=tcp://h:1"], "backend.address",
                     "address belongs to backend=address"),
    "dense_mass_weighted": (["output=dense", "output.mass_weighted=true"], "output.mass_weighted",
                            "output=dense takes name; mass_weighted belongs to output=eigen"),
    "npy_format": (["data=npy", "data.format=extxyz"], "data.format",
                   "format belongs to data=ase"),
}  # fmt: skip


@pytest.mark.parametrize("overrides, key, text", OTHER_OPTIONS_KEYS.values(),
                         ids=OTHER_OPTIONS_KEYS.keys())  # fmt: skip
def test_keys_of_another_option_are_refused(overrides, key, text):
    with pytest.raises(ConfigCompositionException) as info:
        compose_config(*overrides)
    err = config_error(info.value)
    assert err.key == key and text in str(err), str(err)


def test_keys_of_another_option_are_refused_in_a_plain_dict(tmp_path):
    cfg = config(f"storage.path={tmp_path / 'h.h5'}")
    cfg["backend"]["n_workers"] = 4
    with pytest.raises(PipelineError, match="backend=local takes name, device") as info:
        run(cfg)
    assert info.value.key == "backend.n_workers"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "edit, key, text",
    [
        (lambda c: c["storage"].update(block_rows="many"), "storage.block_rows", "many"),
        (lambda c: c.update(dtype="float16"), "dtype", "float16"),
        (lambda c: c["data"].update(name="parquet"), "data.name", "unknown data option"),
        (lambda c: c.update(colour="red"), "colour", "unknown config key 'colour'"),
    ],
    ids=["type", "enum", "option", "top_level"],
)
def test_a_plain_dict_is_typed_like_a_composed_config(tmp_path, edit, key, text):
    cfg = config(f"storage.path={tmp_path / 'h.h5'}")
    edit(cfg)
    with pytest.raises(PipelineError, match=text) as info:
        run(cfg)
    assert info.value.key == key


def test_run_overrides_is_the_command_line_in_python(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    res = pipeline.run_overrides(["data.stop=3", "plots=false", "progress=false",
                                  f"storage.path={a}"])  # fmt: skip
    assert isinstance(res, pipeline.RunResult) and res.shape == (3, 1, 64, 64)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "data.stop=3", "plots=false", "progress=false",
         f"storage.path={b}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(read_hessian(a), read_hessian(b))
    with pytest.raises(PipelineError, match="unknown key data.stopp") as info:
        pipeline.run_overrides(["data.stopp=3"])
    assert info.value.key == "data.stopp"


def test_run_overrides_default_path_is_in_output_dir(tmp_path):
    res = pipeline.run_overrides(["data.stop=1", "plots=false", "progress=false"], tmp_path)
    assert res.path == tmp_path / "hessians.h5" and res.path.is_file()


def test_a_partial_config_is_completed_like_the_command_line(tmp_path):
    """``run(dict)`` with only some groups: the rest are the defaults of conf/ (was KeyError)."""
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    run({"data": {"stop": 3}, "storage": {"path": str(a)}, "plots": False, "progress": False})
    run(config("data.stop=3", f"storage.path={b}"))
    np.testing.assert_array_equal(read_hessian(a), read_hessian(b))
    cfg = complete_config({"data": {"name": "synthetic", "shape": [5]}, "target": {"name": "all"}})
    assert cfg.data.n_samples == 16 and cfg.target == AllTarget()
    with pytest.raises(PipelineError, match="unknown key data.path") as info:
        complete_config({"data": {"path": "x.npy"}})  # digits takes no path
    assert info.value.key == "data.path"


def test_rejected_runs_create_no_parent_directory(tmp_path):
    out = tmp_path / "a" / "b" / "h.h5"
    with pytest.raises(PipelineError, match="out of range"):
        run(config("target.indices=[42]", f"storage.path={out}"))
    assert list(tmp_path.iterdir()) == []
    run(config("data.stop=1", f"storage.path={out}"))
    assert out.is_file()


def test_block_rows_keep_the_size_asked_for():
    """Item 12: block_rows=392 at D=784 became 501 (three chunks of 167 rows)."""
    plan = make_plan(2, 1, 784, 4, block_rows=392)
    assert plan.block_rows == 392 and 392 % plan.chunks[2] == 0
    assert [(b.r0, b.r1) for b in plan.blocks[:2]] == [(0, 392), (392, 784)]


def test_rounded_block_rows_are_said(tmp_path, caplog):
    """A size with no divisor near the chunk size (389 is prime) is rounded up, in one line."""
    cfg = config("data=synthetic", "data.shape=[784]", "data.n_samples=1", "model=custom",
                 "+model.net._target_=tests.nets.mlp", "+model.net.d=784",
                 "storage.block_rows=389")  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        checked = prepare(complete_config(cfg), tmp_path / "h.h5")
    assert checked.plan.block_rows == 501
    assert "storage.block_rows=389 gives blocks of 501 rows" in caplog.text


def test_idle_dask_workers_are_said(tmp_path, caplog):
    cfg = config("data.stop=1", "backend=dask", "backend.n_workers=3")
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        checked = prepare(complete_config(cfg), tmp_path / "h.h5")
    assert len(checked.plan.blocks) == 1
    assert "1 block(s) for 3 Dask workers: 2 worker(s) will have nothing to do" in caplog.text
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "overrides, refused",
    [
        (["dtype=float32,float64", "storage.path=/x/h.h5"], True),
        (["storage.path=/x/a.h5,/x/b.h5", "dtype=float32,float64"], True),
        (["storage.path=/x/a.h5,/x/b.h5"], False),
        (["dtype=float32,float64", "storage.path=/x/h${hydra:job.num}.h5"], False),
        (["dtype=float32,float64"], False),
        (["storage.path=/x/h.h5"], False),
    ],
)
def test_sweeps_that_share_one_path(overrides, refused):
    if refused:
        with pytest.raises(PipelineError, match="would write .* storage.path") as info:
            check_sweep(overrides)
        assert info.value.key == "storage.path"
    else:
        check_sweep(overrides)


def test_a_sweep_with_one_fixed_path_is_refused_before_any_job(tmp_path):
    """Item 16: job 0 was computed, then job 1 failed on the existing file."""
    out = tmp_path / "h.h5"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "--multirun", "data.stop=1,2", f"storage.path={out}",
         "plots=false", "progress=false", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert lines == [lines[0]] and lines[0].startswith("error: the 2 jobs of this sweep"), lines
    assert not out.exists() and "Launching" not in proc.stdout + proc.stderr


def test_output_path_of_a_partial_config(tmp_path):
    cfg = complete_config({"storage": {"path": "rel/h.h5"}})
    assert output_path(cfg, tmp_path) == Path.cwd() / "rel" / "h.h5"
