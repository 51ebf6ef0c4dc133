"""``output=diagonal|rows|eigen|factored``: real runs against the dense run's numbers (float64),
the same execution (Dask, the driver writing, resume after a kill), the one-line refusals, the
reader's views and the reports of each kind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pipeline
from pipeline.errors import PipelineError
from pipeline.execution.backends.local import Local
from pipeline.execution.run import run
from pipeline.store import ResultNames

from .configs import config

ROOT = Path(__file__).resolve().parents[1]
TANH = ("dtype=float64", "data.stop=5", "target.indices=[2,7]")  # the digits MLP, D = 64
RELU_LOSS = ("dtype=float64", "data.stop=4", "model=cnn", "model.net.activation=relu",
             "target=loss")  # fmt: skip


def _close(name: str, got: np.ndarray, want: np.ndarray, rtol: float, atol: float = 0.0) -> None:
    """Equal within tolerance; else name the worst entry."""
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    err = np.abs(got - want) - (atol + rtol * np.abs(want))
    if (err > 0).any():
        at = np.unravel_index(int(np.argmax(err)), err.shape)
        raise AssertionError(f"{name}[{at}] = {got[at]!r}, dense gives {want[at]!r}")


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """Dense float64 results of the two models: (hessian, gradient)."""
    out = {}
    for key, over in (("tanh", TANH), ("relu", RELU_LOSS)):
        path = tmp_path_factory.mktemp("dense") / "h.h5"
        run(config(*over, f"storage.path={path}"))
        with pipeline.read(path) as r:
            out[key] = (r.hessian.compute(), r.gradient.compute())
    return out


def _run(tmp_path, *overrides) -> Path:
    path = tmp_path / "k.h5"
    run(config(*overrides, f"storage.path={path}"))
    return path


def test_diagonal_and_trace_equal_the_dense_ones(tmp_path, dense):
    h, g = dense["tanh"]
    with pipeline.read(_run(tmp_path, *TANH, "output=diagonal")) as r:
        assert r.output == "diagonal" and r.hessian is None
        _close("diagonal", r.diagonal.compute(), np.diagonal(h, axis1=2, axis2=3), 1e-10, 1e-13)
        _close("trace", r.trace.compute(), np.trace(h, axis1=2, axis2=3), 1e-10, 1e-12)
        _close("gradient", r.gradient.compute(), g, 1e-12, 1e-14)


def test_rows_equal_the_dense_rows(tmp_path, dense):
    h, g = dense["tanh"]
    rows = [0, 17, 63, 5]
    with pipeline.read(_run(tmp_path, *TANH, "output=rows", f"output.rows={rows}")) as r:
        assert r.rows.compute().tolist() == rows
        _close("hessian", r.hessian.compute(), h[:, :, rows], 1e-10, 1e-13)
        _close("gradient", r.gradient.compute(), g, 1e-12, 1e-14)


@pytest.mark.parametrize("which", ["LM", "LA", "SA"])
def test_eigenpairs_equal_those_of_the_dense_matrix(tmp_path, dense, which):
    h, _ = dense["tanh"]
    k = 3
    over = (*TANH, "output=eigen", f"output.k={k}", f"output.which={which}")
    with pipeline.read(_run(tmp_path, *over)) as r:
        values, vectors = r.eigenvalues.compute(), r.eigenvectors.compute()
        residuals = r.residuals.compute()
    ev, evec = np.linalg.eigh(h)
    order = {"LM": np.argsort(-np.abs(ev), -1), "LA": np.argsort(-ev, -1),
             "SA": np.argsort(ev, -1)}[which][..., :k]  # fmt: skip
    want = np.take_along_axis(ev, order, -1)
    scale = np.abs(ev).max(-1, keepdims=True)
    _close("eigenvalues", values, want, 1e-6, 1e-9 * scale.max())
    for n, kk, i in np.ndindex(values.shape):
        v = vectors[n, kk, i]
        hv = h[n, kk] @ v
        assert np.linalg.norm(hv - values[n, kk, i] * v) <= 1e-6 * scale[n, kk, 0], (n, kk, i)
        assert residuals[n, kk, i] <= 1e-6 * scale[n, kk, 0], (n, kk, i, residuals[n, kk, i])
        want_v = evec[n, kk][:, order[n, kk, i]]
        gap = np.min(np.abs(np.delete(ev[n, kk], order[n, kk, i]) - want[n, kk, i]))
        if gap > 1e-6 * scale[n, kk, 0]:  # a simple eigenvalue: its vector up to sign
            assert min(np.abs(v - want_v).max(), np.abs(v + want_v).max()) < 1e-6, (n, kk, i)


def test_factored_reconstructs_the_dense_hessian(tmp_path, dense):
    h, g = dense["relu"]
    with pipeline.read(_run(tmp_path, *RELU_LOSS, "output=factored")) as r:
        n, c, d = r.jacobian.shape
        assert (n, d) == (4, 64) and r.curvature.shape == (4, 1, c, c)
        _close("J^T A J", r.hessian.compute(), h, 1e-10, 1e-13)
        _close("gradient", r.gradient.compute(), g, 1e-12, 1e-14)


@pytest.mark.parametrize("backend", ["backend=dask", "backend.write_at=driver"])
def test_dask_writes_the_same_kind_result(tmp_path, backend):
    over = (*TANH, "output=diagonal", "storage.block_samples=2")
    local = _run(tmp_path, *over)
    path = tmp_path / "dask.h5"
    extra = ("backend=dask", "backend.write_at=driver") if "driver" in backend else (backend,)
    run(config(*over, *extra, "backend.n_workers=2", f"storage.path={path}"))
    with pipeline.read(local) as a, pipeline.read(path) as b:
        np.testing.assert_array_equal(a.diagonal.compute(), b.diagonal.compute())
        np.testing.assert_array_equal(a.gradient.compute(), b.gradient.compute())


SMALL = (*TANH, "data.stop=12", "output=eigen", "output.k=2", "storage.block_samples=2")


def test_a_killed_kind_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    """Six blocks of two samples: stop after 3, resume computes the rest."""
    path = tmp_path / "k.h5"
    real = Local.execute

    def some(self, job, blocks, sink, on_written):
        real(self, job, blocks[:3], sink, on_written)
        raise KeyboardInterrupt

    monkeypatch.setattr(Local, "execute", some)
    over = SMALL
    with pytest.raises(KeyboardInterrupt):
        run(config(*over, f"storage.path={path}"))
    assert not path.exists() and len(ResultNames(path).shard_files()) == 3
    monkeypatch.undo()
    res = run(config(*over, "storage.mode=resume", f"storage.path={path}"))
    assert (res.blocks_reused, res.blocks_computed) == (3, 3)
    fresh = tmp_path / "fresh.h5"
    run(config(*over, f"storage.path={fresh}"))
    with pipeline.read(path) as a, pipeline.read(fresh) as b:
        np.testing.assert_array_equal(a.eigenvalues.compute(), b.eigenvalues.compute())
    assert not ResultNames(path).shards.exists()


def test_a_resume_with_another_output_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "k.h5"

    def stop(self, job, blocks, sink, on_written):
        real(self, job, blocks[:1], sink, on_written)
        raise KeyboardInterrupt

    real = Local.execute
    monkeypatch.setattr(Local, "execute", stop)
    with pytest.raises(KeyboardInterrupt):
        run(config(*SMALL, f"storage.path={path}"))
    monkeypatch.undo()
    with pytest.raises(PipelineError, match="different config") as info:
        run(config(*TANH, "output=diagonal", "storage.mode=resume", f"storage.path={path}"))
    assert info.value.key == "storage.mode"


# (overrides, config key, message)
REFUSED = {
    "rows out of range": (("output=rows", "output.rows=[3,64]"), "output.rows", "out of range"),
    "rows empty": (("output=rows", "output.rows=[]"), "output.rows", "empty"),
    "k too small": (("output=eigen", "output.k=0"), "output.k", "at least 1"),
    "k above D": (("output=eigen", "output.k=65"), "output.k", "1..64"),
    "which unknown": (("output=eigen", "output.which=XX"), "output.which", "LM, LA, SA"),
    "factored tanh": (("output=factored",), "output", "no exact J\\^T A J"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_output_settings_are_one_line_naming_the_key(tmp_path, case):
    overrides, key, message = REFUSED[case]
    out = tmp_path / "sub" / "k.h5"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *TANH, *overrides, f"storage.path={out}",
         f"hydra.run.dir={tmp_path / 'run'}", "plots=false", "progress=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and lines[0].endswith(f"(config key: {key})"), lines
    assert __import__("re").search(message, lines[0]), lines[0]
    assert not (tmp_path / "sub").exists()


@pytest.mark.parametrize(
    "output, reports",
    [
        (("output=diagonal",), {"hessian_values.csv", "hessian_diagonal.png"}),
        (("output=rows", "output.rows=[1,2]"), {"hessian_values.csv", "hessian_rows.png"}),
        (("output=eigen", "output.k=2"), {"hessian_values.csv", "hessian_eigenvalues.png"}),
    ],
)
def test_each_kind_gets_its_reports(tmp_path, output, reports):
    path = tmp_path / "k.h5"
    cfg = config(*TANH, *output, f"storage.path={path}")
    cfg["plots"] = True
    res = run(cfg, tmp_path / "run")
    assert {p.name for p in res.reports or []} == reports
    assert all(p.stat().st_size > 0 for p in res.reports or [])


def _inspect(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.inspect", str(path), "--verify"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip


def _add(name: str, at: tuple, delta: float):
    def change(f):
        f[name][at] = f[name][at] + delta

    return change


# kind -> (overrides, a tampering, the check that must catch it)
TAMPERED = {
    "diagonal": (("output=diagonal",), _add("diagonal", (1, 0, 5), 0.5), "trace"),
    "rows": (("output=rows", "output.rows=[3,9]"), _add("hessian", (1, 1, 0, 7), 0.5), "row"),
    "eigen": (("output=eigen", "output.k=2"), _add("eigenvectors", (0, 1, 1, 4), 0.5),
              "eigenvectors"),
    "eigen values": (("output=eigen", "output.k=2"), _add("eigenvalues", (2, 0, 1), 1e-3),
                     "eigenpair"),
    "factored": (("output=factored",), _add("curvature", (0, 0, 1, 2), 0.5), "symmetry"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(TAMPERED))
def test_verify_passes_each_kind_and_catches_one_changed_number(tmp_path, case):
    import h5py

    overrides, change, check = TAMPERED[case]
    model = RELU_LOSS if case == "factored" else TANH
    path = _run(tmp_path, *model[:1], "data.stop=3", *model[2:], *overrides)
    good = _inspect(path)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "file checks: OK" in good.stdout and "verify: OK" in good.stdout, good.stdout
    with h5py.File(path, "r+") as f:
        change(f)
    bad = _inspect(path)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"mismatch ({check})" in bad.stdout, bad.stdout
