"""The real command line, ``python -m pipeline``, in subprocesses.

Each job is a row of ``JOBS``; all of them are launched at once (they mostly wait on imports) and
each test checks its own job's exit code, output and HDF5 file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from tests.zoo import TargetCase, assert_close, assert_rel_close, reference

ROOT = Path(__file__).resolve().parents[1]
USERMOD = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, hidden):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, (3, 2))
            self.fc = nn.Linear(3 * 5 * 4, hidden)
            self.norm = nn.LayerNorm(hidden)
            self.out = nn.Linear(hidden, 4)

        def forward(self, x):
            h = torch.nn.functional.gelu(self.conv(x)).flatten(1)
            return self.out(torch.nn.functional.gelu(self.norm(self.fc(h))))


    def make_net(hidden=8):
        return Net(hidden)
    """
)
QUIET = ["progress=false", "plots=false"]


@dataclass(frozen=True)
class Job:
    name: str
    args: tuple[str, ...]  # overrides; "{tmp}" is the test directory
    multirun: bool = False


ACCEPTANCE = (
    "model=custom", "model.net._target_=usermod.make_net", "+model.net.hidden=16",
    "model.checkpoint={tmp}/net.pt", "data=npy", "data.path={tmp}/x.npy",
    "data.labels_path={tmp}/y.npy", "data.start=1", "data.stop=4", "dtype=float64",
)  # fmt: skip
JOBS = {
    j.name: j
    for j in (
        Job("default", ()),
        Job("custom_indices", (*ACCEPTANCE, "target.indices=[0,3]")),
        Job("custom_loss", (*ACCEPTANCE, "target=loss")),
        Job("sweep", ("data.stop=2", "dtype=float32,float64",
                      "hydra.sweep.dir={tmp}/sweep", "hydra.sweep.subdir=${dtype}"), True),
        Job("bad_index", ("target.indices=[42]", "storage.path={tmp}/bad.h5")),
    )
}  # fmt: skip


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Write the user's files, start every job, and return {name: (directory, process)}."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "usermod.py").write_text(USERMOD)
    sys.path.insert(0, str(tmp))
    try:
        import usermod
    finally:
        sys.path.remove(str(tmp))
    torch.manual_seed(0)
    torch.save(usermod.make_net(hidden=16).state_dict(), tmp / "net.pt")
    rng = np.random.default_rng(0)
    np.save(tmp / "x.npy", rng.standard_normal((6, 2, 7, 5)).astype(np.float32))
    np.save(tmp / "y.npy", rng.integers(0, 4, 6))
    # The jobs run side by side: one thread each, so that they do not oversubscribe the cores.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp), str(ROOT)]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    env.pop("HYDRA_FULL_ERROR", None)
    started = {}
    for job in JOBS.values():
        args = [a.replace("{tmp}", str(tmp)) for a in job.args]
        if not job.multirun:
            args.append(f"hydra.run.dir={tmp}/{job.name}")
        cmd = [sys.executable, "-m", "pipeline", *(["--multirun"] if job.multirun else []),
               *args, *QUIET]  # fmt: skip
        started[job.name] = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    yield tmp, {name: _Finished(p) for name, p in started.items()}, usermod
    for p in started.values():
        p.kill() if p.poll() is None else None


class _Finished:
    """Waits for a process on first use; then exposes rc, stdout, stderr."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.out: tuple[str, str] | None = None

    def wait(self) -> tuple[int, str, str]:
        if self.out is None:
            self.out = self.process.communicate(timeout=300)
        return self.process.returncode, *self.out


def result(jobs, name: str) -> tuple[Path, str]:
    tmp, procs, _ = jobs
    rc, out, err = procs[name].wait()
    assert rc == 0, f"exit {rc}\n{out}\n{err}"
    return tmp, out


def test_default_job_writes_the_trained_mlps_hessians(jobs):
    tmp, out = result(jobs, "default")
    path = tmp / "default" / "hessians.h5"
    assert f"-> {path}" in out
    with h5py.File(path, "r") as f:
        shapes = {name: f[name].shape for name in f}
        assert shapes == {
            "hessian": (16, 1, 64, 64), "gradient": (16, 1, 64), "inputs": (16, 1, 8, 8),
            "outputs": (16, 10), "sample_index": (16,), "output_index": (1,),
            "diagonal": (16, 1, 64), "row_norm": (16, 1, 64), "trace": (16, 1),
            "frobenius": (16, 1), "symmetry": (16, 1), "nonfinite": (16, 1),
            "block_sums": (1, 16, 1, 4),
        }  # fmt: skip
        h, x = torch.from_numpy(f["hessian"][:]), torch.from_numpy(f["inputs"][:])
        assert h.dtype == torch.float32
        assert f["sample_index"][:].tolist() == list(range(16))
        assert f["output_index"][:].tolist() == [2]
        assert [d.label for d in f["hessian"].dims] == ["sample", "output", "row", "column"]
        attrs = dict(f.attrs)
    assert torch.isfinite(h).all() and (h.flatten(1).abs().amax(1) > 0).all()
    assert attrs["dtype"] == "float32" and attrs["method"] == "structured"
    assert attrs["status"] == "complete"
    config = yaml.safe_load(attrs["config"])
    assert config["model"]["net"]["_target_"] == "pipeline.inputs.models.digits_mlp"
    assert config["target"]["indices"] == [2] and config["data"]["stop"] == 16
    from pipeline.inputs.data import load_digits_arrays
    from pipeline.inputs.models import digits_mlp

    np.testing.assert_array_equal(x.numpy(), load_digits_arrays()[0][:16])
    h_ref, _ = reference(digits_mlp().double(), x.double(), TargetCase("i", [2]), None)
    assert_rel_close(h.double(), h_ref, 1e-4)


ACCEPTANCE_CASES = {
    "custom_indices": (TargetCase("indices", [0, 3]), [0, 3]),
    "custom_loss": (TargetCase("loss", "loss", "cross_entropy", "classes"), [-1]),
}


@pytest.mark.parametrize("name", ACCEPTANCE_CASES)
def test_user_module_gelu_layernorm_nonsquare_input(jobs, name):
    """The issue's acceptance case: a user's module file, its checkpoint, .npy data, float64."""
    tmp, _ = result(jobs, name)
    case, output_index = ACCEPTANCE_CASES[name]
    net = jobs[2].make_net(hidden=16)
    net.load_state_dict(torch.load(tmp / "net.pt"))
    net = net.double().eval()
    x = torch.from_numpy(np.load(tmp / "x.npy")[1:4]).double()
    labels = torch.from_numpy(np.load(tmp / "y.npy")[1:4])
    h_ref, g_ref = reference(net, x, case, labels)
    with h5py.File(tmp / name / "hessians.h5", "r") as f:
        assert f["hessian"].shape == (3, len(output_index), 70, 70)
        assert f["sample_index"][:].tolist() == [1, 2, 3]
        assert f["output_index"][:].tolist() == output_index
        assert_close(torch.from_numpy(f["inputs"][:]), x, rtol=0)
        assert_rel_close(torch.from_numpy(f["hessian"][:]), h_ref, 1e-9)
        assert_rel_close(torch.from_numpy(f["gradient"][:]), g_ref, 1e-9)
        assert f.attrs["dtype"] == "float64"


def test_multirun_writes_one_file_per_job(jobs):
    tmp, _ = result(jobs, "sweep")
    hess = {}
    for dtype in ("float32", "float64"):
        with h5py.File(tmp / "sweep" / dtype / "hessians.h5", "r") as f:
            assert f.attrs["dtype"] == dtype and f["hessian"].dtype == np.dtype(dtype)
            assert f["hessian"].shape == (2, 1, 64, 64)
            hess[dtype] = torch.from_numpy(f["hessian"][:]).double()
    assert_rel_close(hess["float32"], hess["float64"], 1e-4)


def test_user_error_is_one_line_naming_the_key(jobs):
    tmp, procs, _ = jobs
    rc, out, err = procs["bad_index"].wait()
    assert rc == 1, f"exit {rc}\n{out}\n{err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "target.indices" in lines[-1], err
    assert "42" in lines[-1]
    assert "Traceback" not in err
    assert not (tmp / "bad.h5").exists()
    assert not list(tmp.glob("bad.h5*")), list(tmp.iterdir())
