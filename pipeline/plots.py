"""Reports of a result file: PNG figures and per-(sample, output) statistics as CSV.

``write_reports(path, out_dir)`` writes, for sample 0 and output 0:
- ``hessian_heatmap.png``: H, block-averaged to at most 256 x 256, diverging colours centred at 0;
- ``hessian_input_maps.png`` (image inputs, S = (H, W) or (C, H, W)): the input, diag(H) and the
  Hessian row of the most sensitive pixel (largest row norm), each shown as an image;
- ``hessian_spectrum.png``: the eigenvalues (all by ``numpy.linalg.eigvalsh`` for D <= 2048, else
  the largest in magnitude by Lanczos over products streamed from the file);
and ``hessian_stats.csv`` with one line per (sample, output): Frobenius norm, trace, symmetry
residual ||H - H^T||_F / ||H||_F and the extreme eigenvalues (eigvalsh for D <= 256, else the
extreme Ritz values of 64 Lanczos steps, which converge first; column ``eig_source``).
``python -m pipeline.plots PATH [--out DIR]`` does the same from the command line.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402

from .errors import PipelineError  # noqa: E402
from .lanczos import lanczos, top_eigenvalues  # noqa: E402
from .reader import Result, read  # noqa: E402
from .stats import block_average, load_matrix, matrix_stats, matvec_operator  # noqa: E402

HEATMAP_SIZE = 256  # heatmaps are block-averaged to at most this many pixels a side
FULL_SPECTRUM_MAX_D = 2048  # eigvalsh of the whole matrix up to this D, Lanczos above
CSV_EIGVALSH_MAX_D = 256  # exact extreme eigenvalues in the CSV up to this D
LANCZOS_STEPS = 64
TOP_EIGENVALUES = 100


def write_reports(path: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Write the figures and ``hessian_stats.csv`` of a result file into ``out_dir``.

    Args:
        path: a result file (see :func:`pipeline.read`).
        out_dir: where the reports go (created if missing).

    Returns:
        The paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with read(path) as result:
        written = [write_stats_csv(result, out / "hessian_stats.csv")]
        written.append(plot_heatmap(result, out / "hessian_heatmap.png"))
        if image_shape(result.input_shape) is not None:
            written.append(plot_input_maps(result, out / "hessian_input_maps.png"))
        written.append(plot_spectrum(result, out / "hessian_spectrum.png"))
    return written


def image_shape(shape: Sequence[int]) -> tuple[int, int, int] | None:
    """(C, H, W) of an image input of shape (H, W) or (C, H, W), else None."""
    if len(shape) == 2 and min(shape) > 1:
        return (1, int(shape[0]), int(shape[1]))
    if len(shape) == 3 and min(shape[1:]) > 1:
        return (int(shape[0]), int(shape[1]), int(shape[2]))
    return None


def _title(result: Result, n: int = 0, k: int = 0) -> str:
    si = int(result.file["sample_index"][n])
    oi = int(result.output_index_of(n)[k])
    out = "the loss" if oi < 0 else f"output {oi}"
    return f"{out}, sample {n} (dataset index {si})"


def _subtitle(result: Result) -> str:
    cfg = result.config
    net = (cfg.model.get("net") or {}).get("_target_", cfg.model.get("name"))
    return f"{net}, {result.method}, {result.attrs.get('dtype')}, {result.path.name}"


def extreme_eigenvalues(result: Result, n: int, k: int) -> tuple[float, float, str]:
    """(smallest, largest) eigenvalue of H[n, k] and how they were found."""
    hess = result.file["hessian"]
    d = hess.shape[-1]
    if d <= CSV_EIGVALSH_MAX_D:
        ev = np.linalg.eigvalsh(_symmetrised(hess[n, k].astype(np.float64)))
        return float(ev[0]), float(ev[-1]), "eigvalsh"
    ritz = lanczos(matvec_operator(hess, n, k), d, LANCZOS_STEPS)
    return float(ritz[0]), float(ritz[-1]), f"lanczos{min(d, LANCZOS_STEPS)}"


def _symmetrised(h: np.ndarray) -> np.ndarray:
    return 0.5 * (h + h.T)


def write_stats_csv(result: Result, path: Path) -> Path:
    """One line per (sample, output): norms, trace, symmetry residual, extreme eigenvalues."""
    n_samples, n_out, _, _ = result.shape
    si = result.file["sample_index"][()]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "sample",
                "sample_index",
                "k",
                "output_index",
                "frobenius",
                "trace",
                "symmetry_residual",
                "eig_min",
                "eig_max",
                "max_abs_eig",
                "eig_source",
            ]
        )
        for n in range(n_samples):
            oi = result.output_index_of(n)
            for k in range(n_out):
                st = matrix_stats(result.file["hessian"], n, k)
                lo, hi, source = extreme_eigenvalues(result, n, k)
                w.writerow(
                    [
                        n,
                        int(si[n]),
                        k,
                        int(oi[k]),
                        f"{st.frobenius:.9g}",
                        f"{st.trace:.9g}",
                        f"{st.symmetry:.3e}",
                        f"{lo:.9g}",
                        f"{hi:.9g}",
                        f"{max(abs(lo), abs(hi)):.9g}",
                        source,
                    ]
                )
    return path


def _diverging(values: np.ndarray) -> Normalize:
    vmax = float(np.max(np.abs(values))) or 1.0
    return Normalize(vmin=-vmax, vmax=vmax)


def plot_heatmap(result: Result, path: Path, n: int = 0, k: int = 0) -> Path:
    """Heatmap of H[n, k], block-averaged to at most 256 x 256."""
    hess = result.file["hessian"]
    d = hess.shape[-1]
    mat, f = block_average(hess, n, k, HEATMAP_SIZE)
    fig, ax = plt.subplots(figsize=(7, 6), layout="constrained")
    extent = (-0.5, d - 0.5, d - 0.5, -0.5)
    im = ax.imshow(mat, cmap="RdBu_r", norm=_diverging(mat), extent=extent, interpolation="nearest")
    cb = fig.colorbar(im, ax=ax, shrink=0.85)
    cb.set_label(
        r"$\partial^2 y / \partial x_i \partial x_j$" + (f" (mean of {f}x{f})" if f > 1 else "")
    )
    img = image_shape(result.input_shape)
    if img is not None and d // img[2] <= 32:  # image rows as faint grid lines
        step = img[2]
        for t in range(step, d, step):
            ax.axhline(t - 0.5, color="0.85", lw=0.4)
            ax.axvline(t - 0.5, color="0.85", lw=0.4)
    ax.set_xlabel(f"input index j (flattened row-major over S = {tuple(result.input_shape)})")
    ax.set_ylabel("input index i")
    ax.set_title(f"Input Hessian of {_title(result, n, k)}\n{_subtitle(result)}", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_input_maps(result: Result, path: Path, n: int = 0, k: int = 0) -> Path:
    """The input image, diag(H) and the row of the most sensitive pixel, as images."""
    c, h, w = image_shape(result.input_shape)  # type: ignore[misc]
    hess = result.file["hessian"]
    st = matrix_stats(hess, n, k)
    i_star = int(np.argmax(st.row_norms))
    row = hess[n, k, i_star, :].astype(np.float64)
    x = np.asarray(result.file["inputs"][n], dtype=np.float64).reshape(c, h, w)
    diag = st.diagonal.reshape(c, h, w).sum(0)
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
    panels = [
        (axes[1], diag, r"diagonal $\partial^2 y / \partial x_i^2$"),
        (
            axes[2],
            row_img,
            f"row of pixel (y={py}, x={px}"
            + (f", c={ch}" if c > 1 else "")
            + r"): $\partial^2 y / \partial x_{i^*} \partial x_j$",
        ),
    ]
    for ax, img, title in panels:
        im = ax.imshow(img, cmap="RdBu_r", norm=_diverging(img), interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set_title(title + (" (sum over channels)" if c > 1 else ""), fontsize=10)
    for ax in axes:
        ax.plot(px, py, marker="s", ms=10, mfc="none", mec="gold", mew=2)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
    fig.suptitle(
        f"Where the curvature lies: {_title(result, n, k)}, most sensitive pixel in gold "
        f"(largest row norm)\n{_subtitle(result)}",
        fontsize=10,
    )
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def spectrum(result: Result, n: int = 0, k: int = 0) -> tuple[np.ndarray, str]:
    """Eigenvalues of H[n, k], descending: all (D <= 2048), else the top 100 by magnitude."""
    hess = result.file["hessian"]
    d = hess.shape[-1]
    h = load_matrix(hess, n, k) if d <= FULL_SPECTRUM_MAX_D else None
    if h is not None:
        return np.linalg.eigvalsh(_symmetrised(h))[::-1], "all eigenvalues (eigvalsh)"
    top = top_eigenvalues(matvec_operator(hess, n, k), d, min(d, TOP_EIGENVALUES))
    return top, f"top {len(top)} by magnitude (Lanczos)"


def plot_spectrum(result: Result, path: Path, n: int = 0, k: int = 0) -> Path:
    """Eigenvalues of H[n, k] (symlog scale) and their magnitudes (log scale)."""
    ev, how = spectrum(result, n, k)
    d = result.shape[-1]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.4), layout="constrained")
    idx = np.arange(1, len(ev) + 1)
    a1.plot(idx, ev, ".-", ms=3, lw=0.8, color="C0")
    a1.axhline(0, color="0.5", lw=0.6)
    top = float(np.max(np.abs(ev))) or 1.0
    a1.set_yscale("symlog", linthresh=top * 1e-4)
    a1.set_xlabel("index (descending)")
    a1.set_ylabel("eigenvalue (symlog)")
    a1.set_title(
        f"{how}\n{int((ev > 0).sum())} positive, {int((ev < 0).sum())} negative", fontsize=10
    )
    mags = np.sort(np.abs(ev))[::-1]
    a2.semilogy(idx, np.maximum(mags, np.finfo(np.float64).tiny), ".-", ms=3, lw=0.8, color="C3")
    a2.set_xlabel("index (by magnitude)")
    a2.set_ylabel("|eigenvalue|")
    a2.set_title(
        f"magnitudes (D = {d})\nlargest {mags[0]:.3g}, smallest shown {mags[-1]:.3g}", fontsize=10
    )
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"Spectrum of the input Hessian of {_title(result, n, k)}\n{_subtitle(result)}", fontsize=10
    )
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.plots PATH [--out DIR]``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.plots",
        description="Write Hessian figures (PNG) and hessian_stats.csv for a result file.",
    )
    parser.add_argument("path", type=Path, help="a result file written by python -m pipeline")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: the result file's directory)",
    )
    args = parser.parse_args(argv)
    try:
        written = write_reports(args.path, args.out or args.path.parent)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
