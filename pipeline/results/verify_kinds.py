"""``verify`` of the results that are not the dense matrix (``output=diagonal``, ``rows``,
``eigen``, ``factored``): the checks each kind supports, in the two stages of NOTE: [what verify
guarantees] in ``verify``.

File checks (no model): the dtypes against the ``dtype`` attribute, the non-finite entries
against ``attrs["nonfinite_entries"]``, ``/output_index``; and per kind: ``/trace`` against the sum
of ``/diagonal`` (diagonal); ``/rows`` in range and distinct (rows); each eigenvector of unit norm,
the vectors of one Hessian orthogonal, the eigenvalues in the stored ``which`` order and the
residuals non-negative, and the frequencies of a mass-weighted result in one proportion to
the square roots of their eigenvalues, with their signs (eigen); each ``/curvature`` matrix
symmetric (factored).
Model checks (``--trust-file`` where the file names code): the gradients recomputed; sampled
diagonal entries recomputed as e_i^T H e_i (diagonal); the chosen rows recomputed (rows); fresh
residuals ||H v - lambda v|| from Hessian-vector products of the rebuilt model (mass-weighted:
of M^-1/2 H M^-1/2) (eigen); sampled
rows of J^T A J against rows recomputed by the stored method (factored).
"""

from __future__ import annotations

import numpy as np
import torch

from ..hessian.methods import DEFAULT_MEMORY_BUDGET, METHODS
from ..store.schema import FIELDS
from .reader import Result, mass_weighted


def file_checks(result: Result, rtol: float, label, mismatch) -> list:
    """The model-free checks of a kind's file; ``mismatch(check, message)`` makes one."""
    f, a, out = result.file, result.attrs, []
    kind = result.output
    dtype = f[FIELDS[kind][0].name].dtype
    if "dtype" in a and str(a["dtype"]) != str(dtype):
        out.append(mismatch("dtype", f"/{FIELDS[kind][0].name} is {dtype}, the dtype attribute "
                                     f"says {a['dtype']}"))  # fmt: skip
    for fd in FIELDS[kind]:
        if f[fd.name].dtype != dtype:
            out.append(mismatch("dtype", f"/{fd.name} is {f[fd.name].dtype}, not {dtype}"))
    nonfinite = sum(int((~np.isfinite(f[fd.name][()])).sum()) for fd in FIELDS[kind])
    said = int(a.get("nonfinite_entries", 0))
    if said != nonfinite:
        msg = f"attrs['nonfinite_entries'] says {said}; the file holds {nonfinite}"
        out.append(mismatch("nonfinite", msg))
    n_samples, n_out = f["gradient"].shape[:2]
    if kind == "diagonal":
        diag = f["diagonal"][()].astype(np.float64)
        trace = f["trace"][()]
        tol = rtol * np.abs(diag).sum(-1) + np.finfo(np.float64).tiny
        bad = np.abs(trace - diag.sum(-1)) > tol
        for n, k in np.argwhere(bad)[:3]:
            out.append(mismatch("trace", f"/trace of {label(n, k)} is {trace[n, k]:.8g}; "
                                         f"/diagonal sums to {diag[n, k].sum():.8g}"))  # fmt: skip
    if kind == "rows":
        rows, d = f["rows"][()], f["gradient"].shape[-1]
        if (
            len(rows) != f["hessian"].shape[2]
            or len(set(rows.tolist())) != len(rows)
            or ((rows < 0) | (rows >= d)).any()
        ):
            r = f["hessian"].shape[2]
            out.append(mismatch("rows", f"/rows {rows.tolist()[:8]} are not {r} "
                                        f"distinct indices in 0..{d - 1}"))  # fmt: skip
    if kind == "eigen":
        out.extend(_eigen_file(result, rtol, label, mismatch))
    if kind == "factored":
        a_ = f["curvature"][()].astype(np.float64)
        asym = np.abs(a_ - np.swapaxes(a_, -1, -2)).max((-1, -2))
        bad = asym > rtol * np.abs(a_).max((-1, -2)) + np.finfo(np.float64).tiny
        for n, k in np.argwhere(bad)[:3]:
            out.append(mismatch("symmetry", f"/curvature of {label(n, k)} is not symmetric "
                                            f"(max |A - A^T| = {asym[n, k]:.3g})"))  # fmt: skip
    return out


def _eigen_file(result: Result, rtol: float, label, mismatch) -> list:
    f, out = result.file, []
    values = f["eigenvalues"][()].astype(np.float64)
    which = str((result.config.get("output") or {}).get("which", "LM"))
    key = {"LM": -np.abs(values), "LA": -values, "SA": values}[which]
    unordered = (np.diff(key, axis=-1) < -rtol * np.abs(values).max(-1, keepdims=True)).any(-1)
    for n, k in np.argwhere(unordered)[:3]:
        out.append(mismatch("eigenvalues", f"/eigenvalues of {label(n, k)} are not in {which} "
                                           f"order: {values[n, k].tolist()}"))  # fmt: skip
    for n, k in np.ndindex(values.shape[:2]):
        v = f["eigenvectors"][n, k].astype(np.float64)  # (k, D)
        gram = v @ v.T
        err = np.abs(gram - np.eye(len(v)))
        if err.max() > max(rtol, 1e3 * np.finfo(f["eigenvectors"].dtype).eps):
            i, j = np.unravel_index(int(np.argmax(err)), err.shape)
            what = f"vector {i} has norm {np.sqrt(gram[i, i]):.8g}" if i == j else (
                f"vectors {i} and {j} have inner product {gram[i, j]:.3g}")  # fmt: skip
            out.append(mismatch("eigenvectors", f"/eigenvectors of {label(n, k)}: {what}"))
    if (f["residuals"][()] < 0).any():
        out.append(mismatch("residuals", "/residuals holds negative norms"))
    if "frequencies" in f:
        out.extend(_frequencies_file(values, f["frequencies"][()], rtol, label, mismatch))
    return out


def _frequencies_file(values: np.ndarray, freq: np.ndarray, rtol: float, label,
                      mismatch) -> list:  # fmt: skip
    """/frequencies against /eigenvalues: the sign of each (imaginary frequencies negative),
    and one factor c with freq^2 = c |lambda| for all of them (ASE's unit conversion)."""
    out = []
    big = np.abs(values) > 1e-6 * np.abs(values).max(initial=0.0)  # (rounding-level ones aside)
    wrong = big & (np.sign(freq) != np.sign(values))
    for n, k, i in np.argwhere(wrong)[:3]:
        out.append(
            mismatch(
                "frequencies",
                f"frequency {i} of {label(n, k)} is "
                f"{freq[n, k, i]:.6g} for the eigenvalue {values[n, k, i]:.6g}",
            )
        )
    if big.any():
        factor = freq[big] ** 2 / np.abs(values[big])
        spread = np.abs(factor / np.median(factor) - 1)
        for n, k, i in np.argwhere(big)[spread > max(rtol, 1e-6)][:3]:
            out.append(
                mismatch(
                    "frequencies",
                    f"frequency {i} of {label(n, k)} is "
                    f"{freq[n, k, i]:.6g}, not in proportion to the square root of "
                    f"its eigenvalue {values[n, k, i]:.6g} as the others are",
                )
            )
    return out


def model_checks(result: Result, job, rtol: float, rows: int, seed: int, label, mismatch,
                 hvp) -> tuple[list, int]:  # fmt: skip
    """The model checks of a kind's file; returns the mismatches and the (sample, output)
    pairs checked. ``hvp(model, x, target, v)``: exact products (P, K, D)."""
    f, out, kind = result.file, [], result.output
    method = METHODS[result.method]
    rng = np.random.default_rng(seed)
    n_samples, n_out, d = f["gradient"].shape
    for n in range(n_samples):
        x, target = job.data.x[n : n + 1], job.target.subset(n, n + 1)
        sample = rng.choice(d, min(rows, d), replace=False)
        # one call per sample: the rows each kind compares (the chosen ones for ``rows``; for
        # ``eigen`` one row, whose call gives the gradients), and the gradients with them
        which = f["rows"][()] if kind == "rows" else np.arange(1) if kind == "eigen" else sample
        h_rows, grad = method.compute(job.model, x, target, torch.as_tensor(which),
                                      DEFAULT_MEMORY_BUDGET)  # fmt: skip
        h_rows, grad = h_rows[0].double().numpy(), grad[0].double().numpy()  # (K, R, D), (K, D)
        stored_g = f["gradient"][n].astype(np.float64)
        for k in range(n_out):
            j = int(np.argmax(np.abs(stored_g[k] - grad[k])))
            if abs(stored_g[k, j] - grad[k, j]) > rtol * np.linalg.norm(grad[k]) + 1e-300:
                out.append(mismatch("gradient", f"gradient of {label(n, k)} differs at entry "
                                    f"{label.col(j)}: stored {stored_g[k, j]:.8g}, recomputed "
                                    f"{grad[k, j]:.8g}"))  # fmt: skip
        if kind == "diagonal":
            stored = f["diagonal"][n][:, sample].astype(np.float64)
            want = h_rows[:, np.arange(len(sample)), sample]  # (K, R): H[i, i]
            out.extend(
                _entries(stored, want, rtol, h_rows, n, sample, label, mismatch, "diagonal entry")
            )
        elif kind == "rows":
            stored = f["hessian"][n].astype(np.float64)
            out.extend(_rows(stored, h_rows, rtol, n, which, label, mismatch))
        elif kind == "factored":
            j_ = f["jacobian"][n].astype(np.float64)
            a_ = f["curvature"][n].astype(np.float64)
            stored = np.einsum("ci,kce,ed->kid", j_[:, sample], a_, j_)
            out.extend(_rows(stored, h_rows, rtol, n, sample, label, mismatch))
        elif kind == "eigen":
            vecs = torch.as_tensor(f["eigenvectors"][n], dtype=x.dtype)  # (K, k, D)
            vals = f["eigenvalues"][n].astype(np.float64)
            w = np.ones(d)  # mass-weighted: the products of M^-1/2 H M^-1/2 = w * H (w * v)
            if mass_weighted(result.attrs):
                w = np.repeat(f["masses"][()].astype(np.float64), 3) ** -0.5
            wt = torch.as_tensor(w, dtype=x.dtype)
            for k in range(n_out):
                hv = hvp(job.model, x[0], target, vecs[k] * wt)[:, k].double().numpy() * w
                res = np.linalg.norm(hv - vals[k][:, None] * vecs[k].double().numpy(), axis=-1)
                scale = max(np.abs(vals[k]).max(), np.linalg.norm(hv, axis=-1).max(), 1e-300)
                for i in np.flatnonzero(res > rtol * scale)[:3]:
                    out.append(mismatch("eigenpair", f"eigenpair {i} of {label(n, k)}: "
                                        f"||Hv - lambda v|| = {res[i]:.3g} with fresh products "
                                        f"(lambda = {vals[k, i]:.8g}, tolerance "
                                        f"{rtol * scale:.3g})"))  # fmt: skip
    return out, n_samples * n_out


def _entries(stored, want, rtol, h_rows, n, sample, label, mismatch, what) -> list:
    out = []
    for k in range(stored.shape[0]):
        tol = rtol * np.linalg.norm(h_rows[k], axis=-1) + 1e-300
        bad = np.abs(stored[k] - want[k]) > tol
        for r in np.flatnonzero(bad)[:3]:
            i = int(sample[r])
            msg = (f"{what} of {label(n, k)} at {label.col(i)}: stored {stored[k, r]:.8g}, "
                   f"recomputed {want[k, r]:.8g}")  # fmt: skip
            out.append(mismatch(what, msg))
    return out


def _rows(stored, want, rtol, n, rows, label, mismatch) -> list:
    out = []
    for k in range(stored.shape[0]):
        for r, row in enumerate(rows):
            diff = np.abs(stored[k, r] - want[k, r])
            if diff.max() > rtol * np.linalg.norm(want[k, r]) + 1e-300:
                j = int(np.argmax(diff))
                out.append(mismatch("row", f"Hessian of {label(n, k)}, row {label.col(int(row))}, "
                                    f"column {label.col(j)}: stored {stored[k, r, j]:.8g}, "
                                    f"recomputed {want[k, r, j]:.8g}"))  # fmt: skip
    return out
