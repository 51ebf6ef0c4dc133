"""Files never run code unless the user says they trust them; a resume proves its inputs equal.

Issue 11 items 3 (the fingerprint), 6 (``--verify`` and the ``_target_`` stored in a file),
7 (``model=exported``) and 15 (``--verify`` from another directory).
"""

from __future__ import annotations

import builtins
import importlib
import io
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from torch import nn

from pipeline.errors import PipelineError
from pipeline.execution.run import run
from pipeline.results.reader import read
from pipeline.results.verify import verify

from .configs import config, read_hessian
from .result_files import result_file

ROOT = Path(__file__).resolve().parents[1]


def inspect_cli(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.inspect", *map(str, args)],
        capture_output=True, text=True, timeout=120, cwd=cwd,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


# ---- item 6: --verify does not run code named in the file ----------------------------------


def with_config(src: Path, dst: Path, edit) -> Path:
    """A copy of a result file whose stored config was changed by ``edit(config_dict)``."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        cfg = yaml.safe_load(f.attrs["config"])
        edit(cfg)
        f.attrs["config"] = yaml.safe_dump(cfg)
    return dst


def test_verify_does_not_import_what_a_crafted_file_names(tmp_path_factory, tmp_path):
    """A result whose config makes the model factory write a file: --verify must not call it."""
    marker = tmp_path / "written-by-the-file"

    def craft(cfg):
        cfg["model"]["net"] = {
            "_target_": "pipeline.inputs.models.digits_mlp",  # a built-in, with a nested payload
            "activation": {"_target_": "numpy.savetxt", "fname": str(marker), "X": [1.0]},
        }

    bad = with_config(result_file(tmp_path_factory, "copy"), tmp_path / "crafted.h5", craft)
    out = inspect_cli(bad, "--verify")
    assert out.returncode == 0, out.stdout + out.stderr
    assert not marker.exists(), "--verify ran code named in the file"
    *_, files, last = out.stdout.strip().splitlines()
    assert files.startswith("file checks: OK"), files  # no model needed: they ran
    assert last.startswith("verify: SKIPPED: rebuilding the model would run code"), last
    assert "'numpy.savetxt'" in last and "--trust-file" in last


def test_verify_of_a_custom_model_needs_trust_file(tmp_path):
    path = tmp_path / "h.h5"
    run(config("model=custom", "+model.net._target_=tests.nets.mlp", "data.stop=2",
               f"storage.path={path}"))  # fmt: skip
    with read(path) as r:
        report = verify(r)
    assert report.ok and report.skipped and "'tests.nets.mlp'" in report.skipped
    assert report.rows_checked == 0
    out = inspect_cli(path, "--verify", "--trust-file")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert "--trust-file: verify imports and calls 'tests.nets.mlp'" in lines
    assert lines[-1].startswith("verify: OK"), lines[-1]


def test_a_built_in_model_is_verified_without_trust(tmp_path_factory):
    with read(result_file(tmp_path_factory, "float64")) as r:
        report = verify(r)
    assert report.ok and report.skipped is None and report.rows_checked > 0


# ---- item 15: relative paths, and what cannot be rebuilt ------------------------------------


def test_verify_from_another_directory_resolves_relative_paths(tmp_path):
    """The run's config holds paths as typed (relative to the run's working directory)."""
    work = tmp_path / "work"
    work.mkdir()
    x = np.random.default_rng(0).random((2, 1, 8, 8)).astype(np.float32)
    np.save(work / "x.npy", x)
    torch.save(torch.load(ROOT / "pipeline/inputs/checkpoints/digits_mlp_tanh.pt"), work / "w.pt")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "data=npy", "data.path=x.npy",
         "model.checkpoint=w.pt", "storage.path=h.h5", "plots=false", "progress=false",
         "hydra.run.dir=run"],
        cwd=work, capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = inspect_cli(work / "h.h5", "--verify", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1].startswith("verify: OK"), out.stdout
    # the data file moved away: the check cannot run here, which is not a failure
    (work / "x.npy").rename(work / "moved.npy")
    out = inspect_cli(work / "h.h5", "--verify", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    *_, files, last = out.stdout.strip().splitlines()
    assert files.startswith("file checks: OK"), files
    assert last.startswith("verify: SKIPPED: cannot rebuild the run here: file "), last
    assert "x.npy' not found (config key: data.path)" in last
    # a data file that changed: that is a disagreement
    np.save(work / "x.npy", x + 1)
    out = inspect_cli(work / "h.h5", "--verify", cwd=tmp_path)
    assert out.returncode == 1
    assert "mismatch (inputs)" in out.stdout


# ---- item 7: exported programs ------------------------------------------------------------


class _WritesAFile:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return builtins.open, (str(self.path), "w")


def crafted_program(tmp: Path, marker: Path) -> Path:
    """A real torch.export archive whose pickled sample inputs create ``marker`` when loaded."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    batch = torch.export.Dim("batch")
    program = torch.export.export(net, (torch.rand(2, 1, 8, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp / "good.pt2")
    payload = io.BytesIO()
    torch.save(_WritesAFile(marker), payload)
    with zipfile.ZipFile(tmp / "good.pt2") as src, zipfile.ZipFile(tmp / "m.pt2", "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            dst.writestr(info, payload.getvalue() if "sample_inputs" in info.filename else data)
    return tmp / "m.pt2"


def test_an_exported_program_is_loaded_only_with_model_trust(tmp_path):
    marker = tmp_path / "written-by-the-program"
    program = crafted_program(tmp_path, marker)
    over = ["model=exported", f"model.path={program}", "data.stop=2"]
    with pytest.raises(PipelineError, match="unpickles parts of it") as info:
        run(config(*over, f"storage.path={tmp_path / 'a.h5'}"))
    assert info.value.key == "model.trust"
    assert not marker.exists()
    # what the refusal protects against: the archive does run code when it is trusted
    with pytest.raises(PipelineError):
        run(config(*over, "model.trust=true", f"storage.path={tmp_path / 'b.h5'}"))
    assert marker.exists()


# ---- item 3: a resume must prove equality -------------------------------------------------


def interrupted(tmp: Path, *overrides: str) -> Path:
    """A run whose committed blocks are kept (virtual layout) and whose result is then lost:
    to ``storage.mode=resume``, the same state as an interrupted run."""
    path = tmp / "h.h5"
    run(config(*overrides, "storage.layout=virtual", "storage.block_rows=16",
               f"storage.path={path}"))  # fmt: skip
    path.unlink()
    return path


def resume(path: Path, *overrides: str):
    return run(config(*overrides, "storage.layout=virtual", "storage.block_rows=16",
                      "storage.mode=resume", f"storage.path={path}"))  # fmt: skip


def test_resume_with_changed_labels_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.random((4, 1, 8, 8)).astype(np.float32))
    np.save(tmp_path / "y.npy", rng.integers(0, 10, 4))
    job = ("data=npy", f"data.path={tmp_path / 'x.npy'}",
           f"data.labels_path={tmp_path / 'y.npy'}", "target=loss")  # fmt: skip
    path = interrupted(tmp_path, *job)
    np.save(tmp_path / "y.npy", (np.load(tmp_path / "y.npy") + 1) % 10)
    with pytest.raises(PipelineError, match="different config or model") as info:
        resume(path, *job)
    assert info.value.key == "storage.mode"
    np.save(tmp_path / "y.npy", (np.load(tmp_path / "y.npy") - 1) % 10)  # the old labels
    assert resume(path, *job).blocks_reused == 16


MODULE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return torch.tanh(self.fc(x.flatten(1))){change}
"""


def test_resume_with_changed_model_code_is_refused(tmp_path, monkeypatch):
    """Same weights, another forward: the blocks of the old code must not be reused."""
    name = "trust_usernet"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MODULE.format(change="")))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module(name)
    job = ("model=custom", f"+model.net._target_={name}.Net", "data.stop=4")
    path = interrupted(tmp_path, *job)
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MODULE.format(change=" * 2")))
    importlib.reload(sys.modules[name])
    with pytest.raises(PipelineError, match="different config or model"):
        resume(path, *job)
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MODULE.format(change="")))
    importlib.reload(sys.modules[name])
    assert resume(path, *job).blocks_reused == 16
    sys.modules.pop(name)


def test_resume_of_a_model_without_readable_source_is_refused(tmp_path, monkeypatch):
    import pipeline.store.fingerprint as fp

    monkeypatch.setattr(fp.inspect, "getsource", _no_source)
    with pytest.raises(PipelineError, match="cannot prove that the model is unchanged"):
        run(config("data.stop=2", "storage.mode=resume", f"storage.path={tmp_path / 'h.h5'}"))
    assert list(tmp_path.iterdir()) == []


def _no_source(obj):
    raise OSError("could not get source code")


def test_the_code_fingerprint_is_recorded(tmp_path_factory):
    with h5py.File(result_file(tmp_path_factory, "copy"), "r") as f:
        assert len(f.attrs["code_fingerprint"]) == 64
        assert Path(f.attrs["cwd"]).is_dir()


def test_same_seeded_model_same_numbers(tmp_path):
    """``seed`` draws the weights of a model built without a checkpoint."""
    over = ("model.net.pretrained=false", "data.stop=2")
    a, b, c = (tmp_path / f"{n}.h5" for n in "abc")
    run(config(*over, f"storage.path={a}"))
    run(config(*over, f"storage.path={b}"))
    run(config(*over, "seed=1", f"storage.path={c}"))
    np.testing.assert_array_equal(read_hessian(a), read_hessian(b))
    assert not np.array_equal(read_hessian(a), read_hessian(c))


def test_a_bad_program_file_is_one_line_without_torchs_logged_traceback(tmp_path):
    with zipfile.ZipFile(tmp_path / "m.pt2", "w") as z:
        z.writestr("m/archive_format", "pt2")  # a zip, not a program
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "model=exported", f"model.path={tmp_path / 'm.pt2'}",
         "model.trust=true", f"storage.path={tmp_path / 'h.h5'}", "plots=false",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: cannot load exported program") and "model.path" in lines[0]


def test_consent_keys_are_not_part_of_the_fingerprint():
    """``model.trust`` and a factory's ``model.net.trust`` (``mace_energy``) say the user trusts
    a file, not what is computed: a resume that only adds consent is the same run."""
    from pipeline.config.schema import fingerprint

    base = {"model": {"name": "custom", "net": {"_target_": "m.f", "model_path": "a.model"}},
            "seed": 0}  # fmt: skip
    consent = {"model": {"name": "custom", "trust": True,
                         "net": {"_target_": "m.f", "model_path": "a.model", "trust": True}},
               "seed": 0}  # fmt: skip
    other = {"model": {"name": "custom", "net": {"_target_": "m.f", "model_path": "b.model"}},
             "seed": 0}  # fmt: skip
    assert fingerprint(base) == fingerprint(consent)
    assert fingerprint(base) != fingerprint(other)
