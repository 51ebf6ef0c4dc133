"""Every bad input a user can give: one clear line naming the config key, nothing written.

``python -m tests.test_errors`` prints the table of cases with the messages users see (it is the
"Errors and faults" table of the README).
"""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.models import digits_cnn
from pipeline.run import run
from pipeline.store import ResultNames

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
]


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_bad_input_is_one_clear_error(tmp_path, case):
    out = tmp_path / "out" / "h.h5"
    overrides = [f"storage.path={out}", *case.setup(tmp_path)]
    with pytest.raises(PipelineError) as info:
        run(config(*overrides))
    msg = str(info.value)
    assert "\n" not in msg
    assert info.value.key == case.key, msg
    assert re.search(case.pattern, msg), msg
    assert not out.exists() and not ResultNames(out).shards.exists()


def test_existing_output_is_left_untouched(tmp_path):
    out = tmp_path / "h.h5"
    out.write_bytes(b"precious")
    with pytest.raises(PipelineError, match="exists; use storage.mode=overwrite") as info:
        run(config(f"storage.path={out}"))
    assert info.value.key == "storage.mode"
    assert out.read_bytes() == b"precious"


# On the command line: composition errors and run errors alike are one line, exit code 1.
CLI_CASES = [
    ("unknown config key", "storage.pathh=x", r"Key 'pathh' not in .*config key: storage.pathh"),
    ("unknown option of a group", "model=foo", r"Could not find 'model/foo'; available options"),
    ("unknown dtype", "dtype=float16", r"Invalid value 'float16'.*config key: dtype"),
    ("unknown storage mode", "storage.mode=append", r"expected one of \[create, resume, overwrite"),
    ("value of the wrong type", "data.stop=ten", r"could not be converted to Integer.*data.stop"),
    ("output index out of range", "target.indices=[42]", r"config key: target.indices"),
]


@pytest.mark.parametrize("what,override,pattern", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_command_line_errors_are_one_line(tmp_path, what, override, pattern):
    out = tmp_path / "h.h5"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            override,
            f"storage.path={out}",
            "plots=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert re.search(pattern, lines[0]), lines[0]
    assert not out.exists()


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
                run(config(f"storage.path={d}/out/h.h5", *c.setup(Path(d))))
                msg = "(no error!)"
            except PipelineError as err:
                msg = str(err).replace(d, "...")
        print(f"| {c.what} | `error: {msg}` |")
    for what, override, _ in CLI_CASES[:5]:
        p = subprocess.run(
            [sys.executable, "-m", "pipeline", override, "storage.path=/tmp/x.h5"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        print(f"| {what} (`{override}`) | `{p.stderr.strip()}` |")
