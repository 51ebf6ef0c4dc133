"""Reports (PNG figures, hessian_stats.csv), the streamed statistics and Lanczos, against numpy."""

from __future__ import annotations

import csv

import h5py
import numpy as np
import pytest

from pipeline.results import plots
from pipeline.results.lanczos import lanczos, top_eigenvalues
from pipeline.results.reader import read
from pipeline.results.stats import block_average, matrix_stats, matvec_operator

from .configs import compose_config, config
from .result_files import result_file

PNG = b"\x89PNG\r\n\x1a\n"
FIGURES = ["hessian_heatmap.png", "hessian_input_maps.png", "hessian_spectrum.png",
           "hessian_summary.png"]  # fmt: skip


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 10_000, path


def _read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_run_writes_reports_named_after_the_result(tmp_path_factory):
    path = result_file(tmp_path_factory, "copy")  # run(cfg) with plots=true, no run directory
    out = path.parent / "hessians_reports"
    for name in FIGURES:
        _assert_png(out / name)
    rows = _read_csv(out / "hessian_stats.csv")
    with h5py.File(path) as f:
        h = f["hessian"][()].astype(np.float64)
    assert len(rows) == h.shape[0] * h.shape[1]
    for row in rows:
        m = h[int(row["sample"]), int(row["k"])]
        ev = np.linalg.eigvalsh(m)
        np.testing.assert_allclose(float(row["frobenius"]), np.linalg.norm(m), rtol=1e-7)
        np.testing.assert_allclose(float(row["trace"]), np.trace(m), rtol=1e-7, atol=1e-9)
        # Lanczos error bounds scale with ||H||_2, not with each eigenvalue.
        np.testing.assert_allclose(
            [float(row["eig_min"]), float(row["eig_max"])],
            [ev[0], ev[-1]],
            rtol=1e-6,
            atol=1e-6 * np.abs(ev).max(),
        )
        sym = np.linalg.norm(m - m.T) / np.linalg.norm(m)
        np.testing.assert_allclose(float(row["symmetry_residual"]), sym, rtol=1e-3)
        assert row["output_index"] in ("2", "5") and row["nonfinite"] == "0"


def test_cli_and_lanczos_paths(tmp_path_factory, tmp_path, monkeypatch):
    """The Lanczos paths (large D, spectrum=full), forced on D = 64, agree with eigvalsh; --out is
    honoured."""
    monkeypatch.setattr(plots, "CSV_EIGVALSH_MAX_D", 16)
    monkeypatch.setattr(plots, "FULL_SPECTRUM_MAX_D", 16)
    monkeypatch.setattr(plots, "TOP_EIGENVALUES", 10)
    path = result_file(tmp_path_factory, "virtual")
    assert plots.main([str(path), "--out", str(tmp_path / "rep"), "--spectrum", "full"]) == 0
    for name in FIGURES:
        _assert_png(tmp_path / "rep" / name)
    rows = _read_csv(tmp_path / "rep" / "hessian_stats.csv")
    with read(path) as r:
        h = r.hessian.compute().astype(np.float64)
        top, how = plots.spectrum(r, mode="full")
    assert "Lanczos" in how
    for row in rows:
        ev = np.linalg.eigvalsh(h[int(row["sample"]), int(row["k"])])
        assert row["eig_source"] == "lanczos64"
        # Lanczos error bounds scale with ||H||_2, not with each eigenvalue.
        np.testing.assert_allclose(
            [float(row["eig_min"]), float(row["eig_max"])],
            [ev[0], ev[-1]],
            rtol=1e-6,
            atol=1e-6 * np.abs(ev).max(),
        )
    ev = np.linalg.eigvalsh(h[0, 0])
    ref = np.sort(ev[np.argsort(-np.abs(ev))[:10]])[::-1]
    np.testing.assert_allclose(top, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def _spectrum(kind: str, d: int, rng) -> np.ndarray:
    if kind == "decaying":
        return rng.standard_normal(d) * np.exp(-np.arange(d) / 15)
    if kind == "low_rank":  # like an MLP Hessian: rank <= first layer width
        return np.concatenate([rng.standard_normal(20) * 5, np.zeros(d - 20)])
    return np.linspace(-1, 3, d)  # dense, evenly spread


# (spectrum, D, Lanczos steps, how many top eigenvalues, rtol)
LANCZOS_CASES = [
    ("decaying", 300, 80, 10, 1e-10),
    ("low_rank", 400, 40, 20, 1e-10),
    ("even", 120, 120, 120, 1e-10),  # steps = D: every eigenvalue
]


@pytest.mark.parametrize("kind, d, steps, k, rtol", LANCZOS_CASES)
def test_lanczos_top_eigenvalues_match_eigvalsh(kind, d, steps, k, rtol):
    rng = np.random.default_rng(d)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a = (q * _spectrum(kind, d, rng)) @ q.T
    a = 0.5 * (a + a.T)
    ev = np.linalg.eigvalsh(a)
    ref = np.sort(ev[np.argsort(-np.abs(ev))[:k]])[::-1]
    got = top_eigenvalues(lambda v: a @ v, d, k, steps=steps, seed=3)
    scale = np.abs(ev).max()
    np.testing.assert_allclose(got, ref, rtol=0, atol=rtol * scale)


def test_lanczos_stops_on_invariant_subspace():
    a = np.diag([3.0, -2.0, 0.0, 0.0, 0.0, 0.0])
    ritz = lanczos(lambda v: a @ v, 6, steps=6, seed=0)
    assert len(ritz) <= 3  # Krylov space of dimension <= 3
    np.testing.assert_allclose([ritz.min(), ritz.max()], [-2.0, 3.0], atol=1e-12)


@pytest.fixture
def matrix_file(tmp_path):
    """(2, 1, 300, 300) float64 dataset, chunked by 32 rows, nearly symmetric."""
    rng = np.random.default_rng(0)
    h = rng.standard_normal((2, 1, 300, 300))
    h = h + h.transpose(0, 1, 3, 2)
    h[1, 0, 7, 250] += 0.5  # one asymmetric pair in sample 1
    with h5py.File(tmp_path / "m.h5", "w") as f:
        f.create_dataset("hessian", data=h, chunks=(1, 1, 32, 300))
    f = h5py.File(tmp_path / "m.h5", "r")
    yield f["hessian"], h
    f.close()


@pytest.mark.parametrize("memory_mb", [1, 64])  # 1 MiB: many row panels; 64: one
@pytest.mark.parametrize("n", [0, 1])
def test_streamed_stats_match_numpy(matrix_file, memory_mb, n):
    dset, h = matrix_file
    m = h[n, 0]
    probes = np.random.default_rng(1).choice([-1.0, 1.0], size=(300, 2))
    st = matrix_stats(dset, n, 0, probes=probes, sym_rtol=0.0, memory_mb=memory_mb)
    np.testing.assert_allclose(st.frobenius, np.linalg.norm(m), rtol=1e-12)
    np.testing.assert_allclose(st.trace, np.trace(m), rtol=1e-12)
    np.testing.assert_allclose(st.symmetry, np.linalg.norm(m - m.T) / np.linalg.norm(m),
                               rtol=1e-9, atol=1e-15)  # fmt: skip
    np.testing.assert_allclose(st.diagonal, np.diag(m))
    np.testing.assert_allclose(st.row_norms, np.linalg.norm(m, axis=1))
    np.testing.assert_allclose(st.products, m @ probes, rtol=1e-12, atol=1e-12)
    if n == 1:  # the planted asymmetric pair is the worst one
        assert {st.worst_pair[0], st.worst_pair[1]} == {7, 250}
    np.testing.assert_allclose(matvec_operator(dset, n, 0, memory_mb)(probes), m @ probes)


@pytest.mark.parametrize("size, factor", [(64, 5), (100, 3), (300, 1)])
def test_block_average(matrix_file, size, factor):
    dset, h = matrix_file
    got, f = block_average(dset, 0, 0, size)
    assert f == factor
    m, d = h[0, 0], 300
    nb = -(-d // f)
    ref = np.array([[m[i * f : (i + 1) * f, j * f : (j + 1) * f].mean() for j in range(nb)]
                    for i in range(nb)])  # fmt: skip
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


# ---- What the reports read and say ----------------------------------------------------------


@pytest.fixture
def figures(monkeypatch):
    """The figures the reports draw, kept open for inspection."""
    kept, close = [], plots.plt.close
    monkeypatch.setattr(plots.plt, "close", kept.append)
    yield kept
    for fig in kept:
        close(fig)


def _texts(fig) -> str:
    parts = [fig.get_suptitle()]
    for ax in fig.axes:
        parts += [ax.get_title(), *(t.get_text() for t in ax.texts)]
    return "\n".join(parts)


def test_large_d_reports_read_no_matrix_per_sample(tmp_path_factory, tmp_path, monkeypatch):
    """Above the eigvalsh sizes, the CSV and summary come from the stored datasets alone, and the
    spectrum of the one drawn matrix stops at its time budget."""
    monkeypatch.setattr(plots, "CSV_EIGVALSH_MAX_D", 16)
    monkeypatch.setattr(plots, "FULL_SPECTRUM_MAX_D", 16)
    monkeypatch.setattr(plots, "matrix_stats", lambda *a, **k: pytest.fail("a pass per sample"))
    monkeypatch.setattr(plots, "lanczos", lambda *a, **k: pytest.fail("Lanczos per sample"))
    path = result_file(tmp_path_factory, "copy")
    written = plots.write_reports(path, tmp_path, {"budget_s": 0.0})
    rows = _read_csv(tmp_path / "hessian_stats.csv")
    assert {r["eig_source"] for r in rows} == {""} and {r["eig_min"] for r in rows} == {""}
    with read(path) as r:
        ev, how = plots.spectrum(r, budget_s=0.0)
    assert "budget" in how and len(ev) < 10  # one Lanczos step or two, not 100 eigenvalues
    assert sorted(p.name for p in written) == sorted([*FIGURES, "hessian_stats.csv"])


def test_a_zero_hessian_says_so(tmp_path_factory, tmp_path, monkeypatch, figures):
    monkeypatch.setattr(plots, "block_average", lambda *a, **k: pytest.fail("read a zero matrix"))
    path = result_file(tmp_path_factory, "zero")
    start = len(figures)
    plots.write_reports(path, tmp_path)
    text = "\n".join(_texts(f) for f in figures[start:])
    assert "H = 0: all 64 x 64 entries are exactly zero" in text  # heatmap
    assert "H = 0: every eigenvalue is 0" in text  # spectrum
    assert "H = 0: every entry is zero" in text  # input maps
    assert "0 for every sample (H = 0)" in text  # summary


def test_the_sample_and_output_drawn_can_be_chosen(tmp_path_factory, tmp_path, figures, caplog):
    path = result_file(tmp_path_factory, "copy")  # 3 samples, outputs [2, 5]
    start = len(figures)  # the run that made the file may have drawn some
    with caplog.at_level("INFO", logger="pipeline.results.plots"):
        written = plots.write_reports(path, tmp_path, {"sample": 2, "output": 1})
    heatmap = next(f for f in figures[start:] if "Input Hessian of" in f.axes[0].get_title())
    assert "output 5, sample 2 (dataset index 2)" in heatmap.axes[0].get_title()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert all(f"wrote {p}" in logged for p in written)
    with pytest.raises(plots.PipelineError, match="report.sample=3 is out of range") as info:
        plots.write_reports(path, tmp_path, {"sample": 3})
    assert info.value.key == "report.sample"


def test_a_report_option_out_of_range_is_refused_before_computing(tmp_path, monkeypatch):
    from pipeline.execution.backends.local import Local
    from pipeline.execution.run import run

    monkeypatch.setattr(Local, "execute", lambda *a: pytest.fail("computed"))
    cfg = compose_config("data.stop=3", "plots=true", "report.output=1", "progress=false",
                         f"storage.path={tmp_path / 'h.h5'}")  # fmt: skip
    with pytest.raises(plots.PipelineError, match="report.output=1 is out of range") as info:
        run(cfg)
    assert info.value.key == "report.output" and list(tmp_path.iterdir()) == []


def test_spectrum_keeps_every_eigenvalue_in_view_and_counts_clear_signs(
    tmp_path_factory, tmp_path, figures
):
    path = result_file(tmp_path_factory, "copy")
    with read(path) as r:
        plots.plot_spectrum(r, tmp_path / "s.png")
        ev, _ = plots.spectrum(r)
        tol = plots.rounding_level(ev, 64, r.dtype)
    ax = figures[-1].axes[0]
    lo, hi = ax.get_ylim()
    assert lo < ev.min() and hi > ev.max()  # nothing clipped at the edges
    ticks = [t for t in ax.get_yticks() if lo <= t <= hi]
    assert len(ticks) <= 9
    pos, neg = int((ev > tol).sum()), int((ev < -tol).sum())
    assert f"{pos} positive, {neg} negative, {64 - pos - neg} within rounding" in ax.get_title()


def test_rounding_level_and_symlog_ticks():
    ev = np.array([1.0, 1e-9, -1e-9, -0.5])
    tol = plots.rounding_level(ev, 64, np.dtype(np.float32))
    assert tol == pytest.approx(64 * np.finfo(np.float32).eps)
    assert int((ev > tol).sum()) == 1 and int((ev < -tol).sum()) == 1
    ticks = plots.symlog_ticks(1e-6, 3e4)  # 11 decades: every third one
    assert ticks == sorted(ticks) and 0.0 in ticks and len(ticks) <= 9
    assert max(ticks) <= 3e4 and min(ticks) >= -3e4


def test_reports_of_two_results_in_one_directory_do_not_collide(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    assert plots.report_dir(a) != plots.report_dir(b)
    assert plots.report_dir(a, tmp_path / "run") == tmp_path / "run"


def test_the_spectrum_of_a_large_matrix_from_the_models_products(tmp_path):
    """Above D = 2048 the run gives the reports exact Hessian-vector products of its model:
    the same top eigenvalues as the stored matrix's, without streaming the file per product."""
    from pipeline.config.validate import complete_config
    from pipeline.execution.job import build_job
    from pipeline.execution.run import model_products, run
    from pipeline.results.plots import spectrum

    d = 2304
    cfg = config("model=custom", "model.net._target_=pipeline.inputs.models.mlp",
                 f"+model.net.in_features={d}", "+model.net.hidden=[32,32]", "data=synthetic",
                 f"data.shape=[{d}]", "data.n_samples=1", "target.indices=[0]", "dtype=float64",
                 f"storage.path={tmp_path / 'h.h5'}")  # fmt: skip
    run(cfg)
    products = model_products(build_job(complete_config(cfg)))
    with read(tmp_path / "h.h5") as r:
        ev, how = spectrum(r, 0, 0, "full", products=products)
        want = np.linalg.eigvalsh(r.hessian[0, 0].compute())
    assert "model's Hessian-vector products" in how
    top = want[np.argsort(-np.abs(want))[: len(ev)]]
    scale = np.abs(want).max()
    np.testing.assert_allclose(np.sort(ev)[::-1][:10], np.sort(top)[::-1][:10], atol=1e-8 * scale)
