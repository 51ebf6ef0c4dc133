"""Reports of the results that are not the dense matrix (``output=diagonal``, ``rows``,
``eigen``, ``factored``): what each kind shows best, read from the file alone (no pass over a
D x D matrix). ``pipeline.results.plots.write_reports`` calls :func:`kind_reports`.

- ``values.csv``: per (sample, output) the trace (diagonal, factored) or the eigenvalues and
  their largest residual (eigen), with the source indices;
- ``diagonal.png`` (diagonal, factored): diag(H) of the chosen sample and output, as an image for
  image inputs (summed over channels), else against the input index;
- ``rows.png`` (rows): each chosen row, the same way;
- ``eigenvalues.png`` (eigen): the eigenvalues of every sample, the chosen one marked;
- ``frequencies.png`` (eigen, mass-weighted): the stick spectrum of the chosen sample's
  vibrational frequencies (cm^-1; imaginary ones at negative wavenumbers, in red), above the
  frequencies of every sample.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .figures import diverging, image_shape, plot_subtitle, plot_title  # noqa: E402
from .reader import Result  # noqa: E402


def factored_diagonal(result: Result, n: int, k: int) -> np.ndarray:
    """diag(J^T A_k J) of sample n: sum over (c, e) of J[c, i] A[c, e] J[e, i], in float64."""
    j = np.asarray(result.file["jacobian"][n], np.float64)
    a = np.asarray(result.file["curvature"][n, k], np.float64)
    return np.einsum("ci,ce,ei->i", j, a, j)


def kind_reports(result: Result, n: int, k: int) -> list[tuple[str, Callable[[Path], Path]]]:
    """(file name, writer) of each report of the result's kind."""
    kind = result.output
    steps: list[tuple[str, Callable[[Path], Path]]] = [
        ("values.csv", lambda p: write_values(result, p))
    ]
    if kind == "diagonal":
        diag = np.asarray(result.file["diagonal"][n, k], np.float64)
        steps.append(
            ("diagonal.png", lambda p: plot_vectors(result, p, n, k, [diag], ["diagonal"]))
        )
    if kind == "factored":
        diag = factored_diagonal(result, n, k)
        title = "diagonal of J^T A J"
        steps.append(("diagonal.png", lambda p: plot_vectors(result, p, n, k, [diag], [title])))
    if kind == "rows":
        rows = result.file["rows"][()]
        shown = rows[:4]
        values = [
            np.asarray(result.file["hessian"][n, k, i], np.float64) for i in range(len(shown))
        ]
        titles = [f"row {int(r)}" for r in shown]
        steps.append(("rows.png", lambda p: plot_vectors(result, p, n, k, values, titles)))
    if kind == "eigen":
        steps.append(("eigenvalues.png", lambda p: plot_eigenvalues(result, p, n, k)))
        if "frequencies" in result.file:
            steps.append(("frequencies.png", lambda p: plot_frequencies(result, p, n, k)))
    return steps


def write_values(result: Result, path: Path) -> Path:
    """One line per (sample, output): the trace, or the eigenvalues and the largest residual."""
    f = result.file
    n_samples, n_out = f["gradient"].shape[:2]
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        kind = result.output
        freq = "frequencies" in f
        if kind == "eigen":
            k = f["eigenvalues"].shape[-1]
            cm = [f"frequency_cm-1_{i}" for i in range(k)] if freq else []
            out.writerow(["sample", "source_index", "k", "output_index",
                          *[f"eigenvalue_{i}" for i in range(k)], "max_residual", *cm])  # fmt: skip
        else:
            out.writerow(["sample", "source_index", "k", "output_index", "trace"])
        for n in range(n_samples):
            oi = result.output_index_of(n)
            for kk in range(n_out):
                head = [n, int(f["sample_index"][n]), kk, int(oi[kk])]
                if kind == "eigen":
                    ev = f["eigenvalues"][n, kk]
                    cm = f["frequencies"][n, kk].tolist() if freq else []
                    res = repr(float(f["residuals"][n, kk].max()))
                    out.writerow([*head, *map(repr, ev.tolist()), res, *map(repr, cm)])
                elif kind == "diagonal":
                    out.writerow([*head, repr(float(f["trace"][n, kk]))])
                elif kind == "factored":
                    out.writerow([*head, repr(float(factored_diagonal(result, n, kk).sum()))])
                else:
                    out.writerow([*head, ""])
    return path


def plot_vectors(result: Result, path: Path, n: int, k: int, values: list[np.ndarray],
                 titles: list[str]) -> Path:  # fmt: skip
    """Vectors over the input: images for image inputs (summed over channels), else lines."""
    shape = image_shape(result.input_shape)
    fig, axes = plt.subplots(1, len(values), figsize=(4.6 * len(values), 4.2), layout="constrained",
                             squeeze=False)  # fmt: skip
    for ax, v, title in zip(axes[0], values, titles, strict=True):
        if shape is not None:
            img = v.reshape(shape).sum(0)
            im = ax.imshow(img, cmap="RdBu_r", norm=diverging(img), interpolation="nearest")
            fig.colorbar(im, ax=ax, shrink=0.8)
        else:
            ax.plot(v, lw=1)
            ax.set_xlabel("input index i")
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"{plot_title(result, n, k)}\n{plot_subtitle(result)}", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_eigenvalues(result: Result, path: Path, n: int, k: int) -> Path:
    """The stored eigenvalues of every sample for output k; sample n in red."""
    ev = np.asarray(result.file["eigenvalues"][:, k], np.float64)  # (N, k)
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    for i, row in enumerate(ev):
        ax.scatter(np.arange(len(row)), row, s=10, c="tab:red" if i == n else "0.6",
                   zorder=3 if i == n else 2)  # fmt: skip
    which = result.config.get("output", {}).get("which", "LM")
    ax.set_xlabel(f"eigenpair ({which} order)")
    ax.set_ylabel("eigenvalue")
    ax.axhline(0, color="k", lw=0.5)
    fig.suptitle(
        f"Eigenvalues, {plot_title(result, n, k)} in red\n{plot_subtitle(result)}", fontsize=10
    )
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_frequencies(result: Result, path: Path, n: int, k: int) -> Path:
    """Stick spectrum of sample n's frequencies (cm^-1) for output k; below, the frequencies of
    every sample (sample n in red). Imaginary frequencies are drawn at negative wavenumbers."""
    freq = np.asarray(result.file["frequencies"][:, k], np.float64)  # (N, k)
    mine = freq[n]
    top = float(np.nanmax(np.abs(freq))) if np.isfinite(freq).any() else 1.0
    near_zero = np.abs(mine) < 1e-3 * max(top, 1e-300)  # translations and rotations
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 5.8), layout="constrained",
                                 height_ratios=(3, 2), sharex=True)  # fmt: skip
    real, imag = (mine >= 0) & ~near_zero, (mine < 0) & ~near_zero
    a1.vlines(mine[real], 0, 1, color="C0", lw=1.5, label=f"{int(real.sum())} real")
    if imag.any():
        a1.vlines(mine[imag], 0, 1, color="tab:red", lw=1.5,
                  label=f"{int(imag.sum())} imaginary (at −|ν|)")  # fmt: skip
    if near_zero.any():
        a1.vlines(mine[near_zero], 0, 0.25, color="tab:orange", lw=2.5,
                  label=f"{int(near_zero.sum())} ≈ 0 (|ν| < 1e-3 max)")  # fmt: skip
    for v in mine[real | imag]:
        text = f"{abs(v):.0f}i" if v < 0 else f"{v:.0f}"
        a1.annotate(text, (v, 1), textcoords="offset points", xytext=(0, 3), ha="center",
                    va="bottom", fontsize=7, rotation=90)  # fmt: skip
    a1.set_ylim(0, 1.6)
    a1.set_yticks([])
    a1.axvline(0, color="0.6", lw=0.5, zorder=0)
    a1.legend(fontsize=8, loc="upper center", ncols=3, frameon=False)
    a1.set_title(f"{len(mine)} frequencies of sample {n} (cm$^{{-1}}$)", fontsize=10)
    for i, row in enumerate(freq):
        a2.scatter(row, np.full(len(row), i), s=60, marker="|", linewidths=1.2,
                   c="tab:red" if i == n else "0.45")  # fmt: skip
    a2.set_ylabel("sample")
    a2.yaxis.get_major_locator().set_params(integer=True)
    a2.set_ylim(len(freq) - 0.5, -0.5)
    a2.set_xlabel("wavenumber (cm$^{-1}$); imaginary frequencies at negative values")
    a2.axvline(0, color="0.6", lw=0.5, zorder=0)
    for ax in (a1, a2):
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(
        f"Vibrational frequencies (mass-weighted Hessian), {plot_title(result, n, k)}\n"
        f"{plot_subtitle(result)}",
        fontsize=10,
    )
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
