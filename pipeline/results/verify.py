"""Checking a result file: against itself (no model), then against a recomputation from its
stored config.

NOTE: [what verify guarantees] Let H be a stored (D, D) Hessian of sample n and output k, and let a
check "catch" a change when it exceeds the tolerance (rtol relative to the row's norm, plus
atol = rtol * ||H||_F / sqrt(D); rtol = 1e-4 for float32 and 1e-9 for float64).
File checks (``check_file``: they need no model, so they always run, whoever built the model):
1. Layout: the dtypes of ``/hessian``, ``/gradient``, ``/inputs``, ``/diagonal``, ``/row_norm``
   against the ``dtype`` attribute; the shapes of the stored statistics and of ``/inputs``
   against ``/hessian`` and ``input_shape``; ``/output_index`` against the target (0 <= index <
   C for ``index`` targets, -1 for a loss; the config's ``target.indices``).
2. Symmetry: every pair H[i, j], H[j, i] is compared, so any single changed off-diagonal entry is
   caught, whatever its place.
3. Stored statistics against ``/hessian``, streamed in row panels (NOTE: [row panels] in
   ``stats``): ``/diagonal`` and ``/row_norm`` entry by entry (a changed diagonal entry is caught
   here), ``/trace``, ``/frobenius``, ``/symmetry`` (the residual the writer derives from the
   diagonal tiles of its blocks, see NOTE: [symmetry from blocks] in ``store.statistics``),
   ``/nonfinite`` and ``attrs["nonfinite_entries"]`` (exact counts: a NaN or inf written into
   ``/hessian`` is named by its place), and every row block's partial sums in ``/block_sums``.
   Sums the writer accumulated in the file's dtype get rtol + (terms) * eps of that dtype.
Model checks (``verify`` after ``check_file``; they rebuild the model, see NOTE: [verify and
trust]):
4. Gradients: every entry of ``/gradient`` is recomputed and compared.
5. Probes: for two random vectors p with entries +-1, the product H p is recomputed exactly
   (Hessian-vector products of the rebuilt model) and compared row by row with the stored H times
   p. One changed entry (i, j), diagonal or not, moves row i of the product by exactly the change,
   so it is caught when it exceeds rtol * ||H_i|| * sqrt(D) + atol. Several changes within one row
   could cancel only by chance: with probability at most 1/2 per probe, 1/4 for two.
6. Rows: ``rows`` random rows per sample (every row when N * D <= 4096, or ``rows=0``) are
   recomputed with the stored method and compared entry by entry; on small files this checks
   every entry directly, at the row tolerance rtol * ||H_r|| + atol.
A change smaller than the tolerance is indistinguishable from rounding and is not reported. A file
whose entries and statistics were all changed consistently passes the file checks; only the model
checks can tell (so can a changed gradient).

NOTE: [verify and trust] The stored config names the code that builds the model (``_target_``s,
an exported program). Rebuilding it from a file someone sent runs their code, so by default
``verify`` rebuilds only models built by this package's own factories (``BUILTIN_FACTORIES``,
every ``_target_`` in the config checked, nested ones included); any other is a skipped model
check whose reason names what it would import, unless the caller passes ``trust_file=True``
(``--trust-file``). The file checks run either way. Paths stored as typed (relative) are resolved
against the working directory the run recorded (``attrs["cwd"]``). A run that cannot be rebuilt
here (a data file that moved) skips the model checks, which is not a failure; a rebuilt model or
data that differ from the file's are failures.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import jacrev, jvp, vjp, vmap

from ..config.schema import to_plain
from ..config.validate import complete_config
from ..errors import PipelineError
from ..execution.job import build_job
from ..hessian.methods import DEFAULT_MEMORY_BUDGET, METHODS
from ..hessian.rules import is_missing_forward_ad
from ..hessian.targets import Target
from ..store.fingerprint import instantiate_targets
from ..store.layout import BLOCK_SUMS, ROW_DATASETS, SUMMARY_DATASETS
from ..store.plan import make_plan
from ..store.statistics import SUMS, TILE
from .reader import Result
from .stats import DEFAULT_MEMORY_MB, MatrixStats, matrix_stats
from .verify_kinds import file_checks, model_checks

RTOL = {"float32": 1e-4, "float64": 1e-9}
ALL_ROWS_BELOW = 4096  # recompute every row when N * D is at most this
N_PROBES = 2
# Factories whose code is this package's: rebuilding a model with them runs no code of the file's.
BUILTIN_FACTORIES = {
    "pipeline.inputs.models.digits_mlp",
    "pipeline.inputs.models.digits_cnn",
    "pipeline.inputs.models.mlp",
}
PATH_KEYS = (("model", "checkpoint"), ("model", "path"), ("data", "path"), ("data", "labels_path"))
# the checks that need the model (those of the other output kinds too: ``verify_kinds``)
MODEL_CHECKS = ("gradient", "probe", "row", "model", "inputs", "diagonal entry", "eigenpair")
KIND_FILE_CHECKS = {
    "diagonal": ["/trace against the sum of /diagonal"],
    "rows": ["/rows in range and distinct"],
    "eigen": ["unit, orthogonal /eigenvectors", "/eigenvalues in order", "/residuals >= 0"],
    "factored": ["symmetric /curvature"],
}
SUM_NAMES = {"sum_squares": "sum of squares", "trace": "trace",
             "asymmetry_squares": "squared asymmetry", "nonfinite": "non-finite count"}  # fmt: skip


@dataclass
class Mismatch:
    """One disagreement within the file, or between the file and the recomputation."""

    # file checks: dtype | shape | output_index | symmetry | nonfinite | diagonal | row_norm |
    # trace | frobenius | stored_symmetry | block_sums; model checks: MODEL_CHECKS
    check: str
    message: str

    @property
    def needs_model(self) -> bool:
        return self.check in MODEL_CHECKS


@dataclass
class VerifyReport:
    """The outcome of :func:`check_file` and :func:`verify`: which checks ran, what disagreed."""

    rtol: float
    rows_checked: int = 0
    probes_checked: int = 0
    pairs_checked: int = 0  # (sample, output) Hessians compared with the model
    matrices_checked: int = 0  # (sample, output) Hessians of the file checks
    compared: list[str] = field(default_factory=list)  # stored statistics compared with /hessian
    mismatches: list[Mismatch] = field(default_factory=list)
    skipped: str | None = None  # why the model checks did not run (see NOTE: [verify and trust])
    pairs: bool = True  # whether every entry pair was compared (file check 2)
    kind: str = "dense"  # the file's output kind

    @property
    def ok(self) -> bool:
        return not self.mismatches

    @property
    def file_ok(self) -> bool:
        """No file check (the checks that need no model) disagreed."""
        return not any(not m.needs_model for m in self.mismatches)

    def file_summary(self) -> str:
        """One line on the file checks."""
        bad = sum(not m.needs_model for m in self.mismatches)
        state = "OK" if not bad else f"FAILED ({bad} mismatches)"
        if self.kind != "dense":
            return (
                f"file checks: {state}: output={self.kind}, {self.matrices_checked} (sample, "
                f"output) pairs: {', '.join(self.compared)}; dtypes, non-finite counts and "
                f"output indices checked; rtol {self.rtol:g}"
            )
        pairs = "for symmetry (every entry pair)" if self.pairs else "(entry pairs skipped)"
        stored = ", ".join(f"/{name}" for name in self.compared) or "no stored statistics"
        return (
            f"file checks: {state}: {self.matrices_checked} (sample, output) Hessians read "
            f"{pairs}; {stored} compared with /hessian; dtypes, shapes and output indices "
            f"checked; rtol {self.rtol:g}"
        )

    def summary(self) -> str:
        """Two lines: the file checks, then the model checks (or why they were skipped)."""
        n = len(self.mismatches)
        if self.skipped is not None:
            if self.ok:
                model = f"verify: SKIPPED: {self.skipped}"
            else:
                model = (
                    f"verify: FAILED ({n} mismatches in the file checks); the model checks were "
                    f"SKIPPED: {self.skipped}"
                )
        else:
            state = "OK" if self.ok else f"FAILED ({n} mismatches)"
            model = (
                (
                    f"verify: {state}: {self.pairs_checked} (sample, output) pairs of output="
                    f"{self.kind} checked against the model ({self.rows_checked} rows or entries "
                    f"recomputed, gradients compared); rtol {self.rtol:g}"
                )
                if self.kind != "dense"
                else (
                    f"verify: {state}: {self.pairs_checked} (sample, output) Hessians checked "
                    f"against the model with {self.probes_checked} probe products, "
                    f"{self.rows_checked} rows recomputed, gradients compared; rtol {self.rtol:g}"
                )
            )
        return f"{self.file_summary()}\n{model}"


def default_rtol(result: Result) -> float:
    """1e-4 for float32 files, 1e-9 for float64 ones."""
    return RTOL.get(str(result.attrs.get("dtype", "float32")), 1e-4)


def check_file(
    result: Result,
    rtol: float | None = None,
    memory_mb: int = DEFAULT_MEMORY_MB,
    max_mismatches: int = 10,
    pairs: bool = True,
) -> VerifyReport:
    """The checks that need no model (1-3 of NOTE: [what verify guarantees]): the file against
    itself. Each Hessian is streamed in row panels (``memory_mb``), never loaded whole.

    Args:
        result: an open result (:func:`pipeline.read`).
        rtol: relative tolerance; default 1e-4 for float32 and 1e-9 for float64 files.
        memory_mb: bound on the Hessian panels held in memory at once.
        max_mismatches: stop after this many mismatches.
        pairs: compare every pair H[i, j], H[j, i] and the stored symmetry residuals. Without,
            each Hessian is read once (for matrices far larger than ``memory_mb``).

    Returns:
        The report; ``report.ok`` is False when anything disagrees.
    """
    rtol = rtol if rtol is not None else default_rtol(result)
    report = VerifyReport(rtol, pairs=pairs, kind=result.output)
    if result.output != "dense":
        found = file_checks(result, rtol, _Labels(result), Mismatch)
        found += _check_output_index(result)
        report.mismatches.extend(found[:max_mismatches])
        report.matrices_checked = int(np.prod(result.file["gradient"].shape[:2]))
        report.compared = KIND_FILE_CHECKS[result.output]
        return report
    found, stored = _check_layout(result)
    report.mismatches.extend(found[:max_mismatches])
    tiles = None
    if BLOCK_SUMS in stored:
        tiles = _block_rows(result)
        if tiles is None:
            del stored[BLOCK_SUMS]
            msg = (
                f"/{BLOCK_SUMS} has {result.file[BLOCK_SUMS].shape[0]} row blocks, which no plan "
                "of the stored config's storage.block_rows and storage.block_mb has"
            )
            report.mismatches.append(Mismatch("shape", msg))
    if not pairs:
        stored.pop("symmetry", None)
    elif tiles is None:
        stored.pop("symmetry", None)  # an estimate over the blocks' tiles (needs their rows)
    report.compared = [name for name in (*ROW_DATASETS, *SUMMARY_DATASETS, BLOCK_SUMS)
                       if name in stored]  # fmt: skip
    n_samples, n_out, _, _ = result.shape
    label = _Labels(result)
    total = 0
    for n in range(n_samples):
        for k in range(n_out):
            if len(report.mismatches) >= max_mismatches:
                return report
            st = matrix_stats(result.file["hessian"], n, k, sym_rtol=rtol if pairs else None,
                              memory_mb=memory_mb, pairs=pairs, tiles=tiles)  # fmt: skip
            found = _compare_stats(result, n, k, st, rtol, stored, tiles, label)
            report.mismatches.extend(found[: max_mismatches - len(report.mismatches)])
            report.matrices_checked += 1
            total += int(st.nonfinite.sum())
    attr = result.attrs.get("nonfinite_entries")
    if attr is not None and int(attr) != total and len(report.mismatches) < max_mismatches:
        msg = f"attrs['nonfinite_entries'] says {int(attr)}; /hessian holds {total} non-finite"
        report.mismatches.append(Mismatch("nonfinite", msg))
    return report


def _check_layout(result: Result) -> tuple[list[Mismatch], dict[str, Any]]:
    """Dtypes, shapes and output indices against the attributes (file check 1); and the stored
    statistics whose shapes fit, to compare with ``/hessian``."""
    f, a, out = result.file, result.attrs, []
    n, k, d, _ = result.shape
    dtype = f["hessian"].dtype
    if "dtype" in a and str(a["dtype"]) != str(dtype):
        out.append(Mismatch("dtype", f"/hessian is {dtype}, the dtype attribute says {a['dtype']}"))
    for name in ("gradient", "inputs", *ROW_DATASETS):
        if name in f and f[name].dtype != dtype:
            out.append(Mismatch("dtype", f"/{name} is {f[name].dtype}, /hessian is {dtype}"))
    if "input_shape" in a and tuple(f["inputs"].shape[1:]) != tuple(a["input_shape"]):
        msg = (
            f"/inputs has shape {tuple(f['inputs'].shape)}, the input_shape attribute says "
            f"{tuple(a['input_shape'])}"
        )
        out.append(Mismatch("shape", msg))
    shapes = {name: (n, k, d) for name in ROW_DATASETS}
    shapes.update({name: (n, k) for name in SUMMARY_DATASETS})
    stored: dict[str, Any] = {}
    for name, shape in shapes.items():
        if name not in f:
            continue  # a file written before the statistics were stored
        if tuple(f[name].shape) != shape:
            msg = f"/{name} has shape {tuple(f[name].shape)}, not {shape} as /hessian has"
            out.append(Mismatch("shape", msg))
        else:
            stored[name] = f[name]
    if BLOCK_SUMS in f:
        shape = tuple(f[BLOCK_SUMS].shape)
        if len(shape) != 4 or shape[1:] != (n, k, len(SUMS)) or not 1 <= shape[0] <= d:
            msg = f"/{BLOCK_SUMS} has shape {shape}, not (row blocks, {n}, {k}, {len(SUMS)})"
            out.append(Mismatch("shape", msg))
        else:
            stored[BLOCK_SUMS] = f[BLOCK_SUMS]
    out.extend(_check_output_index(result))
    return out, stored


def _check_output_index(result: Result) -> list[Mismatch]:
    f = result.file
    oi = np.asarray(f["output_index"][()])
    n_classes = f["outputs"].shape[1]
    target = result.config.get("target") or {}
    if result.attrs.get("target") == "index":
        bad = (oi < 0) | (oi >= n_classes)
        why = f"not one of the model's {n_classes} outputs"
        indices = target.get("indices") if target.get("name") == "indices" else None
        if not bad.any() and indices is not None and oi.ndim == 1 and len(indices) == len(oi):
            bad = oi != np.asarray(list(indices))
            why = f"the config's target.indices are {list(indices)}"
    else:
        bad, why = oi != -1, f"not -1 (a {result.attrs.get('target')} target)"
    if not bad.any():
        return []
    at = np.argwhere(bad)[0]
    where = f"sample {at[0]}, k={at[1]}" if oi.ndim == 2 else f"k={at[0]}"
    msg = f"/output_index of {where} is {int(oi[tuple(at)])}: {why}"
    return [Mismatch("output_index", msg)]


def _block_rows(result: Result) -> int | None:
    """The rows of the blocks that wrote the file (``/block_sums`` has one entry per row block),
    from the stored config's plan; None when no plan of it fits."""
    n, k, d, _ = result.shape
    blocks = result.file[BLOCK_SUMS].shape[0]
    storage = result.config.get("storage") or {}
    try:
        plan = make_plan(n, k, d, result.dtype.itemsize, storage.get("block_rows"),
                         int(storage.get("block_mb") or 64))  # fmt: skip
        if -(-d // plan.block_rows) == blocks:
            return plan.block_rows
    except (TypeError, ValueError):
        pass
    return d if blocks == 1 else None


def _compare_stats(
    result: Result, n: int, k: int, st: MatrixStats, rtol: float, stored: dict[str, Any],
    tiles: int | None, label: _Labels,
) -> list[Mismatch]:  # fmt: skip
    """File checks 2 and 3 of H = /hessian[n, k] from one streamed pass ``st``."""
    hess, out, name = result.file["hessian"], [], label(n, k)
    d = hess.shape[-1]
    tiny = np.finfo(np.float64).tiny
    eps = float(np.finfo(result.dtype).eps)
    sum_rel = rtol + d * eps  # the writer sums a row's squares in the file's dtype
    finite = np.isfinite(st.row_norms)
    frob_f = float(np.sqrt(np.sum(st.row_norms[finite] ** 2)))  # of the rows without NaN or inf
    atol = rtol * frob_f / np.sqrt(d) + tiny
    count = int(st.nonfinite.sum())
    if "nonfinite" in stored and int(stored["nonfinite"][n, k]) != count:
        says = int(stored["nonfinite"][n, k])
        if count:
            i = int(np.flatnonzero(st.nonfinite)[0])
            row = hess[n, k, i, :]
            j = int(np.flatnonzero(~np.isfinite(row))[0])
            msg = (
                f"/hessian of {name} holds {count} non-finite entries (the first at row "
                f"{label.col(i)}, column {label.col(j)}: {row[j]}), but /nonfinite says {says}"
            )
        else:
            msg = f"/nonfinite of {name} says {says} non-finite entries, /hessian holds none"
        out.append(Mismatch("nonfinite", msg))
    if st.worst_pair is not None and st.worst_pair[2] > atol:
        i, j, _ = st.worst_pair
        msg = (
            f"Hessian of {name} is not symmetric at row {label.col(i)}, column {label.col(j)}: "
            f"H[i,j] = {hess[n, k, i, j]:.8g}, H[j,i] = {hess[n, k, j, i]:.8g}"
        )
        out.append(Mismatch("symmetry", msg))
    if "diagonal" in stored:
        s = stored["diagonal"][n, k]
        i = _worst(s, st.diagonal, rtol * st.row_norms + atol)
        if i is not None:
            msg = (
                f"/diagonal of {name} differs at row {label.col(i)}, column {label.col(i)}: "
                f"stored {s[i]:.8g}, /hessian has {st.diagonal[i]:.8g}"
            )
            out.append(Mismatch("diagonal", msg))
    if "row_norm" in stored:
        s = stored["row_norm"][n, k]
        i = _worst(s, st.row_norms, sum_rel * st.row_norms + atol)
        if i is not None:
            msg = (
                f"/row_norm of {name} differs at row {label.col(i)}: stored {s[i]:.8g}, the "
                f"row in /hessian has norm {st.row_norms[i]:.8g}"
            )
            out.append(Mismatch("row_norm", msg))
    expected = {
        "trace": (st.trace, rtol * float(np.nansum(np.abs(st.diagonal))) + atol),
        "frobenius": (st.frobenius, sum_rel * frob_f + atol),
    }
    if st.tile_asymmetry is not None and tiles is not None:
        frac = sum(min(tiles, d - r0) ** 2 for r0 in range(0, d, tiles)) / float(d) ** 2
        # against the stored norm: a wrong /frobenius is the frobenius check's to report
        frob = float(stored["frobenius"][n, k]) if "frobenius" in stored else st.frobenius
        sym = float(np.sqrt(st.tile_asymmetry.sum() / frac))
        sym = sym / frob if frob > 0 else 0.0
        sym = sym if np.isfinite(st.frobenius) else float("nan")
        sym_rel = 2 * rtol + (min(tiles, TILE) ** 2 + d) * eps  # squares summed in the dtype
        expected["symmetry"] = (sym, sym_rel * sym + tiny)
    for stat, (value, tol) in expected.items():
        if stat in stored and _worst(stored[stat][n, k], value, tol) is not None:
            msg = f"/{stat} of {name} is {stored[stat][n, k]:.8g}, /hessian gives {value:.8g}"
            out.append(Mismatch("stored_symmetry" if stat == "symmetry" else stat, msg))
    if BLOCK_SUMS in stored and tiles is not None:
        out.extend(_compare_block_sums(stored[BLOCK_SUMS][:, n, k, :], st, tiles, rtol, sum_rel,
                                       atol, name, label))  # fmt: skip
    return out


def _compare_block_sums(
    sums: np.ndarray, st: MatrixStats, tiles: int, rtol: float, sum_rel: float, atol: float,
    name: str, label: _Labels,
) -> list[Mismatch]:  # fmt: skip
    """The first row block whose partial sums (/block_sums[:, n, k]) disagree with /hessian."""
    d = len(st.diagonal)
    eps_sym = 2 * (rtol + sum_rel)
    for b, r0 in enumerate(range(0, d, tiles)):
        r1 = min(d, r0 + tiles)
        ss = float(np.sum(st.row_norms[r0:r1] ** 2))
        expected = {
            "sum_squares": (ss, sum_rel * ss + atol * atol),
            "trace": (float(st.diagonal[r0:r1].sum()),
                      rtol * float(np.nansum(np.abs(st.diagonal[r0:r1]))) + atol),
            "nonfinite": (float(st.nonfinite[r0:r1].sum()), 0.0),
        }  # fmt: skip
        if st.tile_asymmetry is not None:
            asym = float(st.tile_asymmetry[b])
            expected["asymmetry_squares"] = (asym, eps_sym * asym + np.finfo(np.float64).tiny)
        for j, key in enumerate(SUMS):
            if key in expected and _worst(sums[b, j], *expected[key]) is not None:
                msg = (
                    f"/{BLOCK_SUMS} of {name}, rows {label.col(r0)} to {label.col(r1 - 1)} "
                    f"(row block {b}): stored {SUM_NAMES[key]} {sums[b, j]:.8g}, /hessian gives "
                    f"{expected[key][0]:.8g}"
                )
                return [Mismatch(BLOCK_SUMS, msg)]
    return []


def _worst(stored: Any, computed: Any, tol: Any) -> int | None:
    """The flat index where ``stored`` and ``computed`` differ the most beyond ``tol`` (NaN and
    inf agree only with themselves), or None."""
    a = np.atleast_1d(np.asarray(stored, np.float64))
    b = np.atleast_1d(np.asarray(computed, np.float64))
    tol = np.broadcast_to(np.nan_to_num(np.asarray(tol, np.float64), nan=np.inf), a.shape)
    with np.errstate(invalid="ignore"):
        excess = np.abs(a - b) - tol
    excess[np.isnan(excess)] = np.inf  # opposite infinities, inf against a number
    excess[(a == b) | (np.isnan(a) & np.isnan(b))] = -np.inf
    excess[np.isnan(a) != np.isnan(b)] = np.inf
    i = int(np.argmax(excess))
    return i if excess[i] > 0 else None


def verify(
    result: Result,
    rows: int | None = None,
    seed: int = 0,
    memory_mb: int = DEFAULT_MEMORY_MB,
    max_mismatches: int = 10,
    rtol: float | None = None,
    trust_file: bool = False,
    pairs: bool = True,
) -> VerifyReport:
    """The file checks (:func:`check_file`), then parts of the result recomputed from its stored
    config and compared; see NOTE: [what verify guarantees] and NOTE: [verify and trust].

    Args:
        result: an open result (:func:`pipeline.read`).
        rows: Hessian rows recomputed per sample; None: every row when N * D <= 4096, else 8;
            0: every row.
        seed: seed of the random rows and probe vectors.
        memory_mb: bound on the Hessian panels held in memory at once.
        max_mismatches: stop after this many mismatches.
        rtol: relative tolerance; default 1e-4 for float32 and 1e-9 for float64 files.
        trust_file: rebuild the model even when that imports code the file names.
        pairs: compare every pair H[i, j], H[j, i] (file check 2). Without, the file checks read
            each Hessian once (for matrices far larger than ``memory_mb``, where the pairs take
            many passes).

    Returns:
        The report; ``report.ok`` is False when anything disagrees; ``report.skipped`` says why
        the model checks did not run (code the file names and ``trust_file`` is False).

    Raises:
        PipelineError: the stored config cannot be rebuilt (e.g. a model file that moved).
    """
    report = check_file(result, rtol, memory_mb, max_mismatches, pairs)
    _model_checks(result, report, rows, seed, memory_mb, max_mismatches, trust_file)
    return report


def check(
    result: Result,
    rows: int | None = None,
    seed: int = 0,
    memory_mb: int = DEFAULT_MEMORY_MB,
    max_mismatches: int = 10,
    rtol: float | None = None,
    trust_file: bool = False,
    pairs: bool = True,
) -> VerifyReport:
    """:func:`verify`, where a run that cannot be rebuilt here (a file that moved, a stored
    config this version refuses) skips the model checks with the reason, not a failure; the file
    checks run in any case."""
    report = check_file(result, rtol, memory_mb, max_mismatches, pairs)
    try:
        _model_checks(result, report, rows, seed, memory_mb, max_mismatches, trust_file)
    except PipelineError as err:
        report.skipped = f"cannot rebuild the run here: {err}"
    return report


def _model_checks(
    result: Result, report: VerifyReport, rows: int | None, seed: int, memory_mb: int,
    max_mismatches: int, trust_file: bool,
) -> None:  # fmt: skip
    """Model checks 4-6 of NOTE: [what verify guarantees], added to ``report``."""
    rtol = report.rtol
    if len(report.mismatches) >= max_mismatches:
        report.skipped = f"stopped after {max_mismatches} mismatches in the file checks"
        return
    cfg = rebuild_config(result, trust_file)
    untrusted = untrusted_code(cfg)
    if untrusted and not trust_file:
        report.skipped = (
            f"rebuilding the model would run code that the file names ({'; '.join(untrusted)}); "
            "pass --trust-file (trust_file=True) if you trust the file"
        )
        return
    job = build_job(complete_config(cfg))
    f = result.file
    n_samples, n_out, d, _ = result.shape
    if job.model_fingerprint != result.attrs.get("model_fingerprint"):
        msg = (
            "the model rebuilt from the stored config differs from the one that wrote the file "
            "(model fingerprint); was the checkpoint replaced?"
        )
        report.mismatches.append(Mismatch("model", msg))
        return
    stored, x = f["inputs"], job.data.x
    if stored.shape != tuple(x.shape) or not all(
        np.array_equal(stored[a : a + len(chunk)], chunk.numpy()) for a, chunk in x.chunks()
    ):
        msg = (
            "the inputs rebuilt from the stored data config differ from /inputs; "
            "was the data file changed?"
        )
        report.mismatches.append(Mismatch("inputs", msg))
        return
    if result.output != "dense":
        found, checked = model_checks(result, job, rtol, rows or 8, seed, _Labels(result),
                                      Mismatch, hessian_vector_products)  # fmt: skip
        report.mismatches.extend(found[: max_mismatches - len(report.mismatches)])
        report.pairs_checked, report.rows_checked = checked, n_samples * min(rows or 8, d)
        return
    if rows is None:
        rows = d if n_samples * d <= ALL_ROWS_BELOW else 8
    rows = d if rows <= 0 else min(rows, d)
    rng = np.random.default_rng(seed)
    method = METHODS[result.method]
    label = _Labels(result)
    for n in range(n_samples):
        x = job.data.x[n : n + 1]
        target = job.target.subset(n, n + 1)
        probes = rng.choice([-1.0, 1.0], size=(d, N_PROBES))
        row_idx = np.arange(d) if rows == d else np.sort(rng.choice(d, rows, replace=False))
        h_rows, grad = method.compute(
            job.model, x, target, torch.as_tensor(row_idx), DEFAULT_MEMORY_BUDGET
        )
        hv = hessian_vector_products(
            job.model, x[0], target, torch.as_tensor(probes.T, dtype=x.dtype)
        )  # (P, K, D)
        expected = _Expected(
            rows=row_idx,
            hessian_rows=h_rows[0].double().numpy(),
            gradient=grad[0].double().numpy(),
            products=hv.double().numpy().transpose(1, 2, 0),
            probes=probes,
        )
        for k in range(n_out):
            found = _compare(result, n, k, expected, rtol, memory_mb, label)
            report.mismatches.extend(found[: max_mismatches - len(report.mismatches)])
            report.pairs_checked += 1
            report.probes_checked += N_PROBES
            if len(report.mismatches) >= max_mismatches:
                return
        report.rows_checked += len(row_idx)


@dataclass
class _Expected:
    """Recomputed values for one sample: rows (R,), hessian_rows (K, R, D), gradient (K, D),
    products (K, D, P) = H_k @ probes, probes (D, P)."""

    rows: np.ndarray
    hessian_rows: np.ndarray
    gradient: np.ndarray
    products: np.ndarray
    probes: np.ndarray


def _compare(
    result: Result, n: int, k: int, exp: _Expected, rtol: float, memory_mb: int, label: _Labels
) -> list[Mismatch]:
    """Mismatches of H = /hessian[n, k] and /gradient[n, k] against the recomputation (one
    streamed pass over H for the probe products; the pairs are the file checks')."""
    hess, out = result.file["hessian"], []
    d = hess.shape[-1]
    tiny = np.finfo(np.float64).tiny
    st = matrix_stats(hess, n, k, probes=exp.probes, memory_mb=memory_mb, pairs=False)
    atol = rtol * st.frobenius / np.sqrt(d) + tiny
    name = label(n, k)

    g, g_exp = result.file["gradient"][n, k].astype(np.float64), exp.gradient[k]
    diff = np.abs(g - g_exp)
    if diff.max() > rtol * np.linalg.norm(g_exp) + tiny:
        j = int(np.argmax(diff))
        msg = (
            f"gradient of {name} differs at entry {label.col(j)}: "
            f"stored {g[j]:.8g}, recomputed {g_exp[j]:.8g}"
        )
        out.append(Mismatch("gradient", msg))
    diff = np.abs(st.products - exp.products[k])
    tol = rtol * st.row_norms[:, None] * np.sqrt(d) + atol
    if (diff > tol).any():
        i = int(np.unravel_index(int(np.argmax(diff - tol)), diff.shape)[0])
        msg = (
            f"Hessian of {name}, row {label.col(i)}: the stored row times a random +-1 vector "
            f"differs from the recomputed Hessian-vector product by {diff[i].max():.3g} "
            f"(tolerance {tol[i, 0]:.3g})"
        )
        out.append(Mismatch("probe", msg))
    stored = hess[n, k, exp.rows, :].astype(np.float64)  # (R, D)
    for r, row in enumerate(exp.rows):
        diff = np.abs(stored[r] - exp.hessian_rows[k, r])
        if diff.max() > rtol * np.linalg.norm(exp.hessian_rows[k, r]) + atol:
            j = int(np.argmax(diff))
            msg = (
                f"Hessian of {name}, row {label.col(int(row))}, column {label.col(j)}: "
                f"stored {stored[r, j]:.8g}, recomputed {exp.hessian_rows[k, r, j]:.8g}"
            )
            out.append(Mismatch("row", msg))
    return out


class _Labels:
    """Names of samples, outputs and input positions for messages."""

    def __init__(self, result: Result):
        self.sample_index = result.file["sample_index"][()]
        self.output_index = result.file["output_index"][()]
        self.shape = result.input_shape

    def __call__(self, n: int, k: int) -> str:
        oi = self.output_index[n, k] if self.output_index.ndim == 2 else self.output_index[k]
        out = "the loss" if oi < 0 else f"output {int(oi)}"
        return f"sample {n} (source index {int(self.sample_index[n])}), {out} (k={k})"

    def col(self, i: int) -> str:
        if len(self.shape) <= 1:
            return str(i)
        return f"{i} {tuple(int(c) for c in np.unravel_index(i, self.shape))}"


def hessian_vector_products(model: torch.nn.Module, x: Tensor, target: Target, v: Tensor) -> Tensor:
    """Hessian-vector products of one sample's K outputs: x (*S), v (P, D) -> (P, K, D).

    Independent of the stored method: ``jvp`` of ``jacrev`` (reverse over reverse where an op
    lacks forward-mode AD).
    """
    shape, aux = x.shape, target.aux[0]

    def f(xf: Tensor) -> Tensor:
        return target.select(model(xf.view(shape).unsqueeze(0)).squeeze(0), aux)

    jac = jacrev(f)
    xf = x.reshape(-1)
    try:
        return vmap(lambda u: jvp(jac, (xf,), (u,))[1])(v).detach()
    except (RuntimeError, NotImplementedError) as err:
        if not is_missing_forward_ad(err):
            raise
    _, pullback = vjp(jac, xf)
    k = target.n_outputs
    eye = torch.eye(k, dtype=v.dtype, device=v.device)
    # (H_k v)_i = sum_j H_k[i, j] v_j = pullback of e_k (x) v, since H_k is symmetric.
    return vmap(lambda u: vmap(lambda e: pullback(e[:, None] * u[None, :])[0])(eye))(v).detach()


def rebuild_config(result: Result, trust_file: bool = False) -> dict[str, Any]:
    """The stored config, with relative paths resolved against the run's working directory.

    With ``trust_file``, an exported program may be loaded (``model.trust``) and the run's
    directory is importable (as it was for ``python -m pipeline`` started there).
    """
    cfg = to_plain(result.config)
    cwd = result.attrs.get("cwd")
    base = Path(cwd) if cwd else result.path.parent
    for group, key in PATH_KEYS:
        value = cfg.get(group, {}).get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            cfg[group][key] = str(base / value)
    if trust_file:
        if cfg.get("model", {}).get("path"):
            cfg["model"]["trust"] = True
        if cwd and cwd not in sys.path:
            sys.path.append(cwd)
    return cfg


def untrusted_code(cfg: dict[str, Any]) -> list[str]:
    """What rebuilding the model of ``cfg`` would run that is not this package's code."""
    found = [
        f"imports and calls {t!r}" for t in instantiate_targets(cfg) if t not in BUILTIN_FACTORIES
    ]
    path = cfg.get("model", {}).get("path")
    if path:
        found.append(f"unpickles parts of the exported program {path!r}")
    return found
