"""Every bad input a user can give: one clear line naming the config key, nothing written.

``python -m tests.test_errors`` prints the table of cases with the messages users see (it is the
"Errors" table of docs/faults.md).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.execution.run import run
from pipeline.inputs.models import digits_cnn, digits_mlp

from .configs import config

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    """A bad input: ``setup(tmp)`` returns the overrides; the error must name ``key``."""

    what: str
    setup: Callable[[Path], list[str]]
    key: str
    pattern: str


def npy(tmp: Path, name: str, array: np.ndarray) -> str:
    np.save(tmp / name, array)
    return str(tmp / name)


def garbage(tmp: Path, name: str) -> str:
    (tmp / name).write_bytes(b"this is not what it claims to be" * 10)
    return str(tmp / name)


def nan_inputs(tmp):
    x = np.random.default_rng(0).random((5, 1, 8, 8)).astype(np.float32)
    x[2, 0, 3, 3] = np.nan
    return ["data=npy", f"data.path={npy(tmp, 'x.npy', x)}"]


def other_architecture(tmp):
    torch.save(digits_cnn(pretrained=False).state_dict(), tmp / "cnn.pt")
    return [f"model.checkpoint={tmp / 'cnn.pt'}"]


def under_a_file(tmp):
    (tmp / "file").write_text("")
    return [f"storage.path={tmp / 'file' / 'h.h5'}"]


def a_directory(tmp):
    (tmp / "results").mkdir()
    return [f"storage.path={tmp / 'results'}", "storage.mode=overwrite"]


def with_labels(tmp, labels, *extra):
    x = np.random.default_rng(0).random((4, 1, 8, 8)).astype(np.float32)
    return ["data=npy", f"data.path={npy(tmp, 'x.npy', x)}",
            f"data.labels_path={npy(tmp, 'y.npy', labels)}", *extra]  # fmt: skip


def nan_targets(tmp):
    y = np.random.default_rng(0).random((4, 10)).astype(np.float32)
    y[3, 1] = np.nan
    return with_labels(tmp, y, "target=loss", "target.loss=mse")


def nan_weights(tmp):
    state = digits_mlp().state_dict()
    state["3.weight"][2, 5] = np.nan
    torch.save(state, tmp / "w.pt")
    return [f"model.checkpoint={tmp / 'w.pt'}"]


def hdf5_group(tmp):
    with h5py.File(tmp / "d.h5", "w") as f:
        f["x/a"] = np.ones((3, 4), np.float32)
    return ["data=hdf5", f"data.path={tmp / 'd.h5'}"]


def frames(tmp, target="target.indices=[0]"):
    """An extxyz trajectory of water whose frame 2 has a carbon where frame 0 has a hydrogen."""
    pytest.importorskip("ase")
    from ase import Atoms
    from ase.io import write

    pos = [[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]
    write(tmp / "traj.extxyz", [Atoms("OH2" if i != 2 else "OHC", positions=pos) for i in range(4)])
    return ["data=ase", f"data.path={tmp / 'traj.extxyz'}", "model=custom",
            "+model.net._target_=tests.springs.spring_energy", target]  # fmt: skip


def scheduler_file(tmp, text):
    (tmp / "scheduler.json").write_text(text)
    return ["backend=address", f"backend.scheduler_file={tmp / 'scheduler.json'}"]


def zip_but_not_a_program(tmp):
    with zipfile.ZipFile(tmp / "m.pt2", "w") as z:
        z.writestr("m/archive_format", "pt2")
    return ["model=exported", f"model.path={tmp / 'm.pt2'}", "model.trust=true"]


def a_program(tmp):
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    torch.export.save(torch.export.export(net, (torch.rand(2, 1, 8, 8),)), tmp / "m.pt2")
    return ["model=exported", f"model.path={tmp / 'm.pt2'}"]


CASES = [
    Case(
        "output index out of range",
        lambda t: ["target.indices=[0,42]"],
        "target.indices",
        r"output index 42 is out of range .* 10 outputs",
    ),
    Case(
        "empty data slice",
        lambda t: ["data.start=5", "data.stop=5"],
        "data.stop",
        r"slice is empty",
    ),
    Case(
        "data slice past the end",
        lambda t: ["data.stop=5000"],
        "data.stop",
        r"past the end: the dataset has 1797 samples",
    ),
    Case(
        "sample index out of range",
        lambda t: ["data.indices=[1,99999]"],
        "data.indices",
        r"sample index 99999 is out of range",
    ),
    Case(
        "missing data file",
        lambda t: ["data=npy", f"data.path={t / 'nope.npy'}"],
        "data.path",
        r"not found",
    ),
    Case(
        "unreadable data file",
        lambda t: ["data=npy", f"data.path={garbage(t, 'x.npy')}"],
        "data.path",
        r"cannot read",
    ),
    Case(
        "integer inputs",
        lambda t: [
            "data=npy",
            f"data.path={npy(t, 'x.npy', np.ones((3, 1, 8, 8), dtype=np.int64))}",
        ],
        "data.path",
        r"dtype int64: .* needs real-valued",
    ),
    Case(
        "non-finite inputs",
        nan_inputs,
        "data.indices",
        r"1 sample\(s\) contain NaN or inf \(source indices 2\)",
    ),
    Case(
        "input shape the model does not take",
        lambda t: ["data=synthetic", "data.shape=[10]"],
        "data",
        r"does not accept inputs of shape \(10,\)",
    ),
    Case(
        "loss target without labels",
        lambda t: [
            "target=loss",
            "data=npy",
            f"data.path={npy(t, 'x.npy', np.ones((3, 1, 8, 8), dtype=np.float32))}",
        ],
        "data.labels_path",
        r"needs labels",
    ),
    Case(
        "missing checkpoint",
        lambda t: [f"model.checkpoint={t / 'w.pt'}"],
        "model.checkpoint",
        r"not found",
    ),
    Case(
        "corrupt checkpoint",
        lambda t: [f"model.checkpoint={garbage(t, 'w.pt')}"],
        "model.checkpoint",
        r"not a readable state_dict",
    ),
    Case(
        "checkpoint of another architecture",
        other_architecture,
        "model.checkpoint",
        r"does not fit the model architecture",
    ),
    Case(
        "model factory that cannot be imported",
        lambda t: ["model=custom", "model.net._target_=no_such_module.make_net"],
        "model.net._target_",
        r"cannot build 'no_such_module.make_net'",
    ),
    Case(
        "model not differentiable in its input (embeddings of ids)",
        lambda t: ["model=custom", "+model.net._target_=tests.nets.TokenModel"],
        "model.net",
        r"not differentiable in its input",
    ),
    Case(
        "a method that does not support the model",
        lambda t: ["method=structured", "model=custom", "+model.net._target_=tests.nets.Branching"],
        "method.name",
        r"method 'structured' does not support this model",
    ),
    Case(
        "unknown method name",
        lambda t: ["method.name=newton"],
        "method.name",
        r"unknown method 'newton'",
    ),
    Case(
        "unknown compression",
        lambda t: ["storage.compression=zip"],
        "storage.compression",
        r"unknown compression",
    ),
    Case(
        "output directory that cannot be written", under_a_file, "storage.path", r"cannot write to"
    ),
    Case(
        "storage.path is a directory",
        a_directory,
        "storage.path",
        r"is a directory: give a file name",
    ),
    # ranges of the config (issue 11 items 2, 12)
    *[
        Case(f"{key}={value}", lambda t, o=f"{key}={value}", e=extra: [*e, o], key, "at least")
        for key, value, extra in [
            ("storage.block_rows", 0, []),
            ("storage.block_mb", 0, []),
            ("method.memory_budget_mb", 0, []),
            ("backend.n_workers", 0, ["backend=dask"]),
            ("backend.threads_per_worker", 0, ["backend=dask"]),
            ("backend.max_in_flight", -1, ["backend=dask"]),
        ]
    ],
    # the environment (item 8, 9)
    Case(
        "CUDA device on a machine without one",
        lambda t: ["backend.device=cuda"],
        "backend.device",
        r"no CUDA device is available",
    ),
    Case(
        "missing scheduler file",
        lambda t: ["backend=address", f"backend.scheduler_file={t / 'nope.json'}"],
        "backend.scheduler_file",
        r"scheduler file .* not found",
    ),
    Case(
        "scheduler file that is not JSON",
        lambda t: scheduler_file(t, "tcp://127.0.0.1:8786"),
        "backend.scheduler_file",
        r"is not a Dask scheduler file",
    ),
    Case(
        "unreachable scheduler",
        lambda t: [
            "backend=address",
            "backend.address=tcp://127.0.0.1:9",
            "backend.connect_timeout_s=2",
        ],  # fmt: skip
        "backend.address",
        r"cannot reach the Dask scheduler at tcp://127.0.0.1:9 within 2 s",
    ),
    # data, labels, model (items 4, 10)
    Case(
        "non-finite float targets (target.loss=mse)",
        nan_targets,
        "data.labels_path",
        r"labels \(targets\) of 1 sample\(s\) contain NaN or inf \(source indices 3\)",
    ),
    Case(
        "labels that are one value (0-d)",
        lambda t: with_labels(t, np.array(3), "target=loss"),
        "data.labels_path",
        r"0-d array",
    ),
    Case("an HDF5 group as data.dataset", hdf5_group, "data.dataset", r"is an HDF5 group"),
    Case(
        "a frame with other atoms (data=ase)",
        frames,
        "data.path",
        r"frame 2 of .*traj.extxyz has C as atom 2 where frame 0 has H",
    ),
    Case(
        "mass weighting without masses",
        lambda t: ["output=eigen", "output.mass_weighted=true"],
        "output.mass_weighted",
        r"needs the atoms' masses, and data=digits has none",
    ),
    Case(
        "a loss of frames without labels (data=ase)",
        lambda t: frames(t, "target=loss"),
        "target",
        r"target=loss needs labels, and the frames of data=ase have none",
    ),
    Case(
        "inputs without entries (D = 0)",
        lambda t: ["data=npy", f"data.path={npy(t, 'x.npy', np.ones((3, 0), np.float32))}"],
        "data.path",
        r"no entries: shape \(0,\) per sample",
    ),
    Case(
        "a model with 0 outputs",
        lambda t: ["model=custom", "+model.net._target_=tests.nets.mlp", "+model.net.out=0"],
        "model.net",
        r"returns 0 outputs",
    ),
    Case(
        "an error raised in the model's forward",
        lambda t: ["model=custom", "+model.net._target_=tests.nets.Raises"],
        "model.net",
        r"forward raised ValueError .*: this model refuses to run",
    ),
    Case(
        "NaN weights in the checkpoint",
        nan_weights,
        "model.checkpoint",
        r"weights are not finite: 3.weight holds NaN",
    ),
    Case(
        "a model whose forward leaves autograd (`.numpy()`)",
        lambda t: ["model=custom", "+model.net._target_=tests.nets.NotVmappable"],
        "model.net",
        r"no method can differentiate the model: .*forward_over_reverse failed on a probe",
    ),
    Case(
        "an exported program without model.trust",
        a_program,
        "model.trust",
        r"unpickles parts of it.*set model.trust=true",
    ),
    Case(
        "a zip archive that is not an exported program",
        zip_but_not_a_program,
        "model.path",
        r"cannot load exported program",
    ),
    Case(
        "no output selected",
        lambda t: ["target.indices=[]"],
        "target.indices",
        r"no outputs selected",
    ),
]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``root`` with its size and modification time."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def overrides_of(case: Case, tmp: Path) -> list[str]:
    """The case's overrides, with ``storage.path`` in a directory that does not exist yet."""
    given = case.setup(tmp)
    if any(o.startswith("storage.path=") for o in given):
        return given
    return [f"storage.path={tmp / 'out' / 'h.h5'}", *given]


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_bad_input_is_one_clear_error(tmp_path, case):
    overrides = overrides_of(case, tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(PipelineError) as info:
        run(config(*overrides))
    msg = str(info.value)
    assert "\n" not in msg
    assert info.value.key == case.key, msg
    assert re.search(case.pattern, msg), msg
    assert snapshot(tmp_path) == before, "a refused run created, changed or removed files"


def test_a_corrected_rerun_is_not_taken_for_an_interrupted_run(tmp_path):
    """Issue 11 item 8: a model failing under vmap was found after the run had started, left
    <path>.shards/ behind, and the corrected rerun was refused as an interrupted run."""
    path = tmp_path / "h.h5"
    bad = ["model=custom", "+model.net._target_=tests.nets.NotVmappable", "+model.net.d=64"]
    with pytest.raises(PipelineError, match="no method can differentiate the model"):
        run(config(*bad, "data.stop=3", f"storage.path={path}"))
    assert list(tmp_path.iterdir()) == []
    good = ["model=custom", "+model.net._target_=tests.nets.mlp", "+model.net.d=64"]
    run(config(*good, "data.stop=3", f"storage.path={path}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.h5"]


def test_existing_output_is_left_untouched(tmp_path):
    out = tmp_path / "h.h5"
    out.write_bytes(b"precious")
    with pytest.raises(PipelineError, match="exists; use storage.mode=overwrite") as info:
        run(config(f"storage.path={out}"))
    assert info.value.key == "storage.mode"
    assert out.read_bytes() == b"precious"


# On the command line: composition errors and run errors alike are one line, exit code 1.
CLI_CASES = [
    ("unknown config key", "storage.pathh=x",
     r"unknown key storage.pathh: storage takes path, mode, .*config key: storage.pathh"),
    ("unknown option of a group", "model=foo", r"Could not find 'model/foo'; available options"),
    ("unknown dtype", "dtype=float16", r"Invalid value 'float16'.*config key: dtype"),
    ("unknown storage mode", "storage.mode=append", r"expected one of \[create, resume, overwrite"),
    ("value of the wrong type", "data.stop=ten", r"could not be converted to Integer.*data.stop"),
    ("a key of another backend", "backend.n_workers=4",
     r"backend=local takes name, device; n_workers belongs to backend=dask .*backend.n_workers"),
    ("a key of another target", "target=all target.indices=[3]",
     r"target=all takes name; indices belongs to target=indices .*target.indices"),
    ("a key of another data option", "data.path=x.npy",
     r"data=digits takes .*; path belongs to data=npy and data=hdf5 .*config key: data.path"),
    ("output index out of range", "target.indices=[42]", r"config key: target.indices"),
]  # fmt: skip


def pipeline_cli(tmp: Path, *overrides: str, env: dict | None = None, **kwargs):
    """``python -m pipeline OVERRIDES`` with its output under ``tmp``."""
    cmd = [sys.executable, "-m", "pipeline", *overrides, "plots=false",
           f"hydra.run.dir={tmp / 'run'}"]  # fmt: skip
    environ = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**environ, **(env or {})}, **kwargs)  # fmt: skip


def one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    return lines[0]


@pytest.mark.parametrize("what,override,pattern", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_command_line_errors_are_one_line(tmp_path, what, override, pattern):
    out = tmp_path / "out" / "h.h5"
    line = one_error_line(pipeline_cli(tmp_path, *override.split(), f"storage.path={out}"))
    assert line.startswith("error: ") and re.search(pattern, line), line
    assert not (tmp_path / "out").exists()  # (Hydra's run directory holds its log)


def test_unexpected_errors_are_one_line_internal_error(tmp_path):
    """A bug of ours (simulated: the free-space check raises ZeroDivisionError) is one line that
    says how to see the traceback, not Hydra's "Error executing job" and a raw message."""
    script = (
        "import sys, pipeline.store.writer as w, pipeline.__main__ as m\n"
        "def boom(*a, **k): return 1 / 0\n"
        "w.ResultWriter._check_free_space = boom\n"
        "sys.argv = ['pipeline', *sys.argv[1:]]\n"
        "m.main()\n"
    )
    out = tmp_path / "h.h5"
    proc = subprocess.run(
        [sys.executable, "-c", script, f"storage.path={out}", "plots=false", "progress=false",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    line = one_error_line(proc)
    assert line == (
        "internal error: ZeroDivisionError: division by zero; HYDRA_FULL_ERROR=1 shows the "
        "traceback"
    ), line
    assert not out.exists()
    assert "Error executing job" not in proc.stderr + proc.stdout


def test_training_mode_layers_run_in_eval_with_a_warning(tmp_path):
    cfg = config(
        "model=custom",
        "+model.net._target_=tests.nets.with_dropout_in_training",
        f"storage.path={tmp_path / 'h.h5'}",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(cfg)
    assert any("training mode" in str(w.message) for w in caught)


if __name__ == "__main__":  # print the README table
    import tempfile

    print("| bad input | what the user sees |\n| --- | --- |")
    for c in CASES:
        with tempfile.TemporaryDirectory() as d:
            try:
                run(config(*overrides_of(c, Path(d))))
                msg = "(no error!)"
            except PipelineError as err:
                msg = str(err).replace(d, "...")
        print(f"| {c.what} | `error: {msg}` |")
    for what, override, _ in CLI_CASES[:-1]:
        with tempfile.TemporaryDirectory() as d:
            p = pipeline_cli(Path(d), *override.split(), f"storage.path={d}/h.h5")
        print(f"| {what} (`{override}`) | `{p.stderr.strip()}` |")
