"""Reports of a result file: PNG figures and per-(sample, output) statistics as CSV.

Per-sample numbers come from the statistics stored in the file (``/trace``, ``/frobenius``,
``/symmetry``, ``/nonfinite``, ``/diagonal``, ``/row_norm``: see ``pipeline.store.statistics``),
and each figure of one (sample, output) reads only what it draws:

- ``hessian_summary.png``: trace, Frobenius norm and symmetry residual of every sample and output;
- ``hessian_heatmap.png``: H[n, k] block-averaged to at most 256 x 256, diverging colours centred
  at 0 (one pass over that matrix; beyond ``HEATMAP_READ_BYTES`` evenly spaced row panels only);
- ``hessian_input_maps.png`` (image inputs, S = (H, W) or (C, H, W)): the input, diag(H) and the
  Hessian row of the most sensitive pixel (largest row norm), each shown as an image;
- ``hessian_spectrum.png``: the eigenvalues of H[n, k] (see ``spectrum``) on a symlog scale and
  their magnitudes; eigenvalues within rounding level of 0 are counted apart;
- ``hessian_stats.csv``: one line per (sample, output).

Options (``report.*`` in the config, flags of ``python -m pipeline.plots``): which sample and
output the figures show, and the spectrum: ``auto`` (every eigenvalue for D <= 2048, else
Lanczos stopped after ``budget_s`` seconds; eigenvalues in the CSV only where D <= 256), ``full``
(Lanczos to convergence, and 64 Lanczos steps per sample for the CSV: a pass over every matrix
per step, slow for large D) or ``off``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FixedLocator, MaxNLocator  # noqa: E402

from ..config.schema import ReportConf  # noqa: E402
from ..errors import PipelineError  # noqa: E402
from ..execution.progress import progress  # noqa: E402
from .figures import diverging, image_shape, plot_subtitle, plot_title, zero_note  # noqa: E402
from .lanczos import lanczos, top_eigenvalues  # noqa: E402
from .reader import Result, read  # noqa: E402
from .stats import (  # noqa: E402
    block_average,
    load_matrix,
    matrix_stats,
    matvec_operator,
    stored_stats,
)

log = logging.getLogger(__name__)
Products = Callable[[int, int], Callable[[np.ndarray], np.ndarray]]  # (n, k) -> v -> H[n, k] v

HEATMAP_SIZE = 256  # heatmaps are block-averaged to at most this many pixels a side
HEATMAP_READ_BYTES = 2 << 30  # a larger matrix is sampled in evenly spaced row panels
FULL_SPECTRUM_MAX_D = 2048  # eigvalsh of the whole matrix up to this D, Lanczos above
CSV_EIGVALSH_MAX_D = 256  # exact extreme eigenvalues in the CSV up to this D
LANCZOS_STEPS = 64
TOP_EIGENVALUES = 100


def report_options(options: ReportConf | dict[str, Any] | None) -> ReportConf:
    """What the reports show: ``report.*`` of the config (a dict of those values works too)."""
    if isinstance(options, ReportConf):
        return options
    return ReportConf(**{k: v for k, v in (options or {}).items() if v is not None})


def check_report(opt: ReportConf, n_samples: int, n_outputs: int) -> None:
    """Refuse a sample or output the result will not have (before anything is computed)."""
    for value, size, key in ((opt.sample, n_samples, "sample"),
                             (opt.output, n_outputs, "output")):  # fmt: skip
        if not 0 <= value < size:
            raise PipelineError(
                f"report.{key}={value} is out of range: the result has {size} "
                f"{'samples' if key == 'sample' else 'outputs'} (valid: 0..{size - 1})",
                f"report.{key}",
            )


def report_dir(path: Path, run_dir: Path | None = None) -> Path:
    """Where a result's reports go: the run directory, else a folder named after the result."""
    return Path(run_dir) if run_dir is not None else path.parent / f"{path.stem}_reports"


def write_reports(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    options: ReportConf | dict[str, Any] | None = None,
    show_progress: bool = False,
    products: Products | None = None,
) -> list[Path]:
    """Write the figures and ``hessian_stats.csv`` of a result file into ``out_dir``.

    Args:
        path: a result file (see :func:`pipeline.read`).
        out_dir: where the reports go (created if missing).
        options: ``report.*`` (see :func:`report_options`).
        show_progress: a progress bar over the reports.
        products: ``(n, k) -> (v -> H[n, k] v)``, exact products for the spectrum of a large
            matrix (a run passes its model's, see ``spectrum``); None: products from the file.

    Returns:
        The paths written (each is also logged).
    """
    opt = report_options(options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with read(path) as result:
        n, k = _selected(result, opt)
        steps = _dense_reports(result, n, k, opt, products) if result.output == "dense" else []
        if result.output != "dense":
            from .kind_plots import kind_reports

            steps = [(f"hessian_{name}", make) for name, make in kind_reports(result, n, k)]
        written = []
        with progress(show_progress, len(steps), 0, "reports") as bar:
            for name, make in steps:
                t = time.perf_counter()
                written.append(make(out / name))
                log.info("wrote %s (%.1f s)", written[-1], time.perf_counter() - t)
                bar.update(1)
    return written


def _dense_reports(result: Result, n: int, k: int, opt: ReportConf, products) -> list:
    table = stored_stats(result)
    steps = [
        ("hessian_stats.csv", lambda p: write_stats_csv(result, p, opt.spectrum, table)),
        ("hessian_summary.png", lambda p: plot_summary(result, p, table)),
        ("hessian_heatmap.png", lambda p: plot_heatmap(result, p, n, k, table)),
    ]
    if image_shape(result.input_shape) is not None:
        steps.append(("hessian_input_maps.png", lambda p: plot_input_maps(result, p, n, k)))
    if opt.spectrum != "off":
        steps.append(
            ("hessian_spectrum.png", lambda p: plot_spectrum(result, p, n, k, opt, table, products))
        )
    return steps


def _selected(result: Result, opt: ReportConf) -> tuple[int, int]:
    check_report(opt, *result.shape[:2])
    return opt.sample, opt.output


def extreme_eigenvalues(result: Result, n: int, k: int, mode: str) -> tuple[float, float, str]:
    """(smallest, largest) eigenvalue of H[n, k] and how they were found; NaN where ``mode``
    leaves them out (see the module docstring)."""
    hess = result.file["hessian"]
    d = hess.shape[-1]
    if mode != "off" and d <= CSV_EIGVALSH_MAX_D:
        ev = np.linalg.eigvalsh(_symmetrised(hess[n, k].astype(np.float64)))
        return float(ev[0]), float(ev[-1]), "eigvalsh"
    if mode == "full":
        ritz = lanczos(matvec_operator(hess, n, k), d, LANCZOS_STEPS)
        return float(ritz[0]), float(ritz[-1]), f"lanczos{min(d, LANCZOS_STEPS)}"
    return math.nan, math.nan, ""


def _symmetrised(h: np.ndarray) -> np.ndarray:
    return 0.5 * (h + h.T)


def write_stats_csv(
    result: Result, path: Path, spectrum_mode: str = "auto", table: dict | None = None
) -> Path:
    """One line per (sample, output): stored statistics and (where cheap) extreme eigenvalues."""
    table = table or stored_stats(result)
    n_samples, n_out, _, _ = result.shape
    si = result.file["sample_index"][()]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["sample", "sample_index", "k", "output_index", "frobenius", "trace",
                    "symmetry_residual", "nonfinite", "eig_min", "eig_max", "max_abs_eig",
                    "eig_source"])  # fmt: skip
        for n in range(n_samples):
            oi = result.output_index_of(n)
            for k in range(n_out):
                lo, hi, source = extreme_eigenvalues(result, n, k, spectrum_mode)
                eigs = [_num(lo), _num(hi), _num(max(abs(lo), abs(hi)))] if source else [""] * 3
                w.writerow(
                    [n, int(si[n]), k, int(oi[k]), _num(table["frobenius"][n, k]),
                     _num(table["trace"][n, k]), f"{table['symmetry'][n, k]:.3e}",
                     int(table["nonfinite"][n, k]), *eigs, source]
                )  # fmt: skip
    return path


def _num(x: float) -> str:
    return f"{x:.9g}"


def plot_summary(result: Result, path: Path, table: dict | None = None) -> Path:
    """Trace, Frobenius norm and symmetry residual of every sample, one line per output."""
    table = table or stored_stats(result)
    n_samples, n_out, d, _ = result.shape
    x = np.arange(n_samples)
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True, layout="constrained")
    labels = [f"k={k}" for k in range(n_out)]
    oi = result.file["output_index"]
    if oi.ndim == 1:
        labels = ["loss" if int(o) < 0 else f"output {int(o)}" for o in oi[()]]
    style = {"marker": ".", "ms": 4, "lw": 0.8 if n_samples > 1 else 0}
    for k in range(n_out):
        axes[0].plot(x, table["trace"][:, k], label=labels[k], **style)
        frob = np.where(table["frobenius"][:, k] > 0, table["frobenius"][:, k], np.nan)
        axes[1].plot(x, frob, **style)
        sym = np.where(table["symmetry"][:, k] > 0, table["symmetry"][:, k], np.nan)
        axes[2].plot(x, sym, **style)
    axes[0].axhline(0, color="0.5", lw=0.6)
    axes[0].set_ylabel("trace")
    axes[1].set_ylabel(r"$\|H\|_F$")
    axes[2].set_ylabel(r"$\|H - H^T\|_F / \|H\|_F$")
    for ax, name in ((axes[1], "frobenius"), (axes[2], "symmetry")):
        if np.any(table[name] > 0):
            ax.set_yscale("log")
        else:
            zero_note(ax, "0 for every sample" + (" (H = 0)" if name == "frobenius" else ""))
    bad = np.argwhere(table["nonfinite"] != 0)
    if len(bad):
        for a in axes:
            for n in np.unique(bad[:, 0]):
                a.axvline(n, color="red", lw=0.8, alpha=0.5)
    if n_out <= 10:
        axes[0].legend(fontsize=8, ncols=min(n_out, 5))
    axes[-1].set_xlabel("sample (position in the file; dataset indices in hessian_stats.csv)")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    for a in axes:
        a.grid(alpha=0.3)
    note = f", {len(bad)} with non-finite entries (red)" if len(bad) else ""
    fig.suptitle(f"Input Hessians of {n_samples} sample(s) x {n_out} output(s) (D = {d}){note}\n"
                 f"{plot_subtitle(result)}", fontsize=10)  # fmt: skip
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_heatmap(result: Result, path: Path, n: int = 0, k: int = 0, table=None) -> Path:
    """Heatmap of H[n, k], block-averaged to at most 256 x 256."""
    table = table or stored_stats(result)
    hess = result.file["hessian"]
    d = hess.shape[-1]
    fig, ax = plt.subplots(figsize=(7, 6), layout="constrained")
    title = f"Input Hessian of {plot_title(result, n, k)}"
    if table["frobenius"][n, k] == 0:
        zero_note(ax, f"H = 0: all {d} x {d} entries are exactly zero")
        ax.set_axis_off()
    else:
        nbytes = d * d * hess.dtype.itemsize
        step = max(1, math.ceil(nbytes / HEATMAP_READ_BYTES))
        mat, f = block_average(hess, n, k, HEATMAP_SIZE, row_step=step)
        extent = (-0.5, d - 0.5, d - 0.5, -0.5)
        im = ax.imshow(mat, cmap="RdBu_r", norm=diverging(mat), extent=extent,
                       interpolation="nearest")  # fmt: skip
        cb = fig.colorbar(im, ax=ax, shrink=0.85)
        cb.set_label(
            r"$\partial^2 y / \partial x_i \partial x_j$" + (f" (mean of {f}x{f})" if f > 1 else "")
        )
        img = image_shape(result.input_shape)
        if img is not None and d // img[2] <= 32:  # image rows as faint grid lines
            for t in range(img[2], d, img[2]):
                ax.axhline(t - 0.5, color="0.85", lw=0.4)
                ax.axvline(t - 0.5, color="0.85", lw=0.4)
        ax.set_xlabel(f"input index j (flattened row-major over S = {tuple(result.input_shape)})")
        ax.set_ylabel("input index i")
        if step > 1:
            title += f" (rows sampled: 1 panel in {step})"
        if table["nonfinite"][n, k]:
            title += f"; {int(table['nonfinite'][n, k])} non-finite entries"
    ax.set_title(f"{title}\n{plot_subtitle(result)}", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _row_data(result: Result, name: str, n: int, k: int) -> np.ndarray:
    """/diagonal or /row_norm of (n, k), or (older files) computed by one streamed pass."""
    f = result.file
    if name in f:
        return f[name][n, k].astype(np.float64)
    st = matrix_stats(f["hessian"], n, k)
    return st.diagonal if name == "diagonal" else st.row_norms


def plot_input_maps(result: Result, path: Path, n: int = 0, k: int = 0) -> Path:
    """The input image, diag(H) and the row of the most sensitive pixel, as images."""
    c, h, w = image_shape(result.input_shape)  # type: ignore[misc]
    row_norm = _row_data(result, "row_norm", n, k)
    i_star = int(np.argmax(np.nan_to_num(row_norm, nan=-1.0)))
    zero = not np.any(row_norm)
    row = result.file["hessian"][n, k, i_star, :].astype(np.float64)
    x = np.asarray(result.file["inputs"][n], dtype=np.float64).reshape(c, h, w)
    diag = _row_data(result, "diagonal", n, k).reshape(c, h, w).sum(0)
    row_img = row.reshape(c, h, w).sum(0)
    ch, py, px = np.unravel_index(i_star, (c, h, w))

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4), layout="constrained")
    if c == 3:
        lo, hi = x.min(), x.max()
        axes[0].imshow(((x - lo) / (hi - lo + 1e-12)).transpose(1, 2, 0))
    else:
        im = axes[0].imshow(x.mean(0), cmap="gray_r" if c == 1 else "gray")
        fig.colorbar(im, ax=axes[0], shrink=0.8, label="input value")
    axes[0].set_title("input" + (" (mean over channels)" if c not in (1, 3) else ""))
    where = f"pixel (y={py}, x={px}" + (f", c={ch}" if c > 1 else "") + ")"
    panels = [
        (axes[1], diag, r"diagonal $\partial^2 y / \partial x_i^2$"),
        (axes[2], row_img, f"row of {where}: " + r"$\partial^2 y / \partial x_{i^*} \partial x_j$"),
    ]
    for ax, img, title in panels:
        if zero:
            zero_note(ax, "H = 0: every entry is zero")
        else:
            im = ax.imshow(img, cmap="RdBu_r", norm=diverging(img), interpolation="nearest")
            fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set_title(title + (" (sum over channels)" if c > 1 else ""), fontsize=10)
    for ax in axes:
        if not zero:
            ax.plot(px, py, marker="s", ms=10, mfc="none", mec="gold", mew=2)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
    fig.suptitle(
        f"Where the curvature lies: {plot_title(result, n, k)}"
        + ("" if zero else ", most sensitive pixel in gold (largest row norm)")
        + f"\n{plot_subtitle(result)}",
        fontsize=10,
    )
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def spectrum(
    result: Result, n: int = 0, k: int = 0, mode: str = "auto", budget_s: float = 10.0,
    products: Products | None = None,
) -> tuple[np.ndarray, str]:  # fmt: skip
    """Eigenvalues of H[n, k], descending, and how they were found.

    Every eigenvalue for D <= 2048 (eigvalsh); above, the 100 largest in magnitude by Lanczos,
    stopped after ``budget_s`` seconds under ``auto`` (fewer, less converged eigenvalues; the
    description says so). Lanczos takes its products from ``products(n, k)`` where the run
    gives it (exact Hessian-vector products of the model: milliseconds each, where a product
    streamed from the file reads the whole D x D matrix), else from the file.
    """
    hess = result.file["hessian"]
    d = hess.shape[-1]
    h = load_matrix(hess, n, k) if d <= FULL_SPECTRUM_MAX_D else None
    if h is not None:
        return np.linalg.eigvalsh(_symmetrised(h))[::-1], "all eigenvalues (eigvalsh)"
    t0 = time.monotonic()
    deadline = t0 + budget_s if mode == "auto" else None
    top = None
    if products is not None:
        try:
            top = top_eigenvalues(products(n, k), d, min(d, TOP_EIGENVALUES), deadline=deadline)
        except Exception as err:  # an op without a double backward: the file's products
            log.info("spectrum from the file: the model's products failed (%s)", err)
            products = None
    if top is None:
        matvec = matvec_operator(hess, n, k)
        top = top_eigenvalues(matvec, d, min(d, TOP_EIGENVALUES), deadline=deadline)
    source = "model's Hessian-vector products" if products is not None else "file"
    how = f"top {len(top)} by magnitude (Lanczos on the {source})"
    if deadline is not None and time.monotonic() > deadline:
        how = (
            f"top {len(top)} by magnitude (Lanczos on the {source}, stopped by the {budget_s:g} s "
            "budget)"
        )
    return top, how


def rounding_level(ev: np.ndarray, d: int, dtype: np.dtype) -> float:
    """|eigenvalue| below which its sign is rounding noise: D * eps * max |eigenvalue|."""
    top = float(np.max(np.abs(ev))) if len(ev) else 0.0
    return d * float(np.finfo(dtype).eps) * top


def symlog_ticks(linthresh: float, top: float, most: int = 4) -> list[float]:
    """Ticks of a symlog axis from -top to top: 0 and at most ``most`` decades each side."""
    lo, hi = math.ceil(math.log10(linthresh)), math.floor(math.log10(top))
    step = max(1, math.ceil((hi - lo + 1) / most))
    pos = [10.0**e for e in range(hi, lo - 1, -step)]
    return sorted([-p for p in pos] + [0.0] + pos)


def plot_spectrum(result: Result, path: Path, n: int = 0, k: int = 0,
                  options: ReportConf | None = None, table=None,
                  products: Products | None = None) -> Path:  # fmt: skip
    """Eigenvalues of H[n, k] (symlog scale) and their magnitudes (log scale)."""
    opt = options or ReportConf()
    table = table or stored_stats(result)
    d = result.shape[-1]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.4), layout="constrained")
    head = f"Spectrum of the input Hessian of {plot_title(result, n, k)}\n{plot_subtitle(result)}"
    if table["frobenius"][n, k] == 0 or not math.isfinite(table["frobenius"][n, k]):
        what = "H = 0: every eigenvalue is 0" if table["frobenius"][n, k] == 0 else (
            "H has non-finite entries: no spectrum")  # fmt: skip
        for ax in (a1, a2):
            zero_note(ax, what)
            ax.set_axis_off()
        fig.suptitle(head, fontsize=10)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
    ev, how = spectrum(result, n, k, opt.spectrum, opt.budget_s, products)
    top = float(np.max(np.abs(ev)))
    tol = rounding_level(ev, d, result.dtype)
    pos, neg = int((ev > tol).sum()), int((ev < -tol).sum())
    idx = np.arange(1, len(ev) + 1)
    a1.plot(idx, ev, ".-", ms=3, lw=0.8, color="C0")
    a1.axhline(0, color="0.5", lw=0.6)
    linthresh = max(tol, top * 1e-6)
    a1.set_yscale("symlog", linthresh=linthresh)
    a1.yaxis.set_major_locator(FixedLocator(symlog_ticks(linthresh, top)))
    a1.set_ylim(-2 * top if neg else -linthresh, 2 * top if pos or not neg else linthresh)
    a1.set_xlim(0, len(ev) + 1)
    a1.axhspan(-tol, tol, color="0.85", lw=0, label=f"|λ| ≤ {tol:.2g} (rounding)")
    a1.legend(fontsize=8, loc="upper right")
    a1.set_xlabel("index (descending)")
    a1.set_ylabel("eigenvalue (symlog)")
    a1.set_title(f"{how}\n{pos} positive, {neg} negative, {len(ev) - pos - neg} within rounding "
                 "of 0", fontsize=10)  # fmt: skip
    mags = np.sort(np.abs(ev))[::-1]
    a2.semilogy(idx, np.maximum(mags, np.finfo(np.float64).tiny), ".-", ms=3, lw=0.8, color="C3")
    a2.axhline(max(tol, np.finfo(np.float64).tiny), color="0.5", lw=0.6, ls="--")
    a2.set_ylim(max(mags[-1], tol, top * 1e-12) / 3, top * 3)
    a2.set_xlim(0, len(ev) + 1)
    a2.set_xlabel("index (by magnitude)")
    a2.set_ylabel("|eigenvalue|")
    a2.set_title(f"magnitudes (D = {d}); dashed: rounding level\nlargest {mags[0]:.3g}, "
                 f"smallest shown {mags[-1]:.3g}", fontsize=10)  # fmt: skip
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
    fig.suptitle(head, fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.plots PATH [--out DIR] ...``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.plots",
        description="Write Hessian figures (PNG) and hessian_stats.csv for a result file.",
    )
    parser.add_argument("path", type=Path, help="a result file written by python -m pipeline")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: <result name>_reports beside it)",
    )
    parser.add_argument("--sample", type=int, default=0, help="position of the sample to draw")
    parser.add_argument("--output", type=int, default=0, help="position k of the output to draw")
    parser.add_argument(
        "--spectrum",
        choices=["auto", "full", "off"],
        default="auto",
        help="auto: within --budget-s for large D; full: to convergence; off",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=10.0,
        help="seconds the spectrum of a large matrix may take (auto)",
    )
    args = parser.parse_args(argv)  # fmt: skip
    logging.basicConfig(level=logging.WARNING)
    opt = ReportConf(args.sample, args.output, args.spectrum, args.budget_s)
    try:
        written = write_reports(args.path, args.out or report_dir(args.path), opt)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
