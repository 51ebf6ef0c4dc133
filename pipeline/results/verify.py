"""Checking a result file against a recomputation from its stored config.

NOTE: [what verify guarantees] Let H be a stored (D, D) Hessian of sample n and output k, and let a
check "catch" a change when it exceeds the tolerance (rtol relative to the row's norm, plus
atol = rtol * ||H||_F / sqrt(D); rtol = 1e-4 for float32 and 1e-9 for float64).
1. Gradients: every entry of ``/gradient`` is recomputed and compared.
2. Symmetry: every pair H[i, j], H[j, i] is compared, so any single changed off-diagonal entry is
   caught, whatever its place.
3. Probes: for two random vectors p with entries +-1, the product H p is recomputed exactly
   (Hessian-vector products of the rebuilt model) and compared row by row with the stored H times
   p. One changed entry (i, j), diagonal or not, moves row i of the product by exactly the change,
   so it is caught when it exceeds rtol * ||H_i|| * sqrt(D) + atol. Several changes within one row
   could cancel only by chance: with probability at most 1/2 per probe, 1/4 for two.
4. Rows: ``rows`` random rows per sample (every row when N * D <= 4096, or ``rows=0``) are
   recomputed with the stored method and compared entry by entry; on small files this checks
   every entry directly, at the row tolerance rtol * ||H_r|| + atol.
A change smaller than the tolerance is indistinguishable from rounding and is not reported.

NOTE: [verify and trust] The stored config names the code that builds the model (``_target_``s,
an exported program). Rebuilding it from a file someone sent runs their code, so by default
``verify`` rebuilds only models built by this package's own factories (``BUILTIN_FACTORIES``,
every ``_target_`` in the config checked, nested ones included); any other is a skipped check
whose reason names what it would import, unless the caller passes ``trust_file=True``
(``--trust-file``). Paths stored as typed (relative) are resolved against the working directory
the run recorded (``attrs["cwd"]``). A run that cannot be rebuilt here (a data file that moved) is
a skipped check, not a failure; a rebuilt model or data that differ from the file's are failures.
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
from .reader import Result
from .stats import DEFAULT_MEMORY_MB, matrix_stats

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


@dataclass
class Mismatch:
    """One disagreement between the file and the recomputation."""

    check: str  # gradient | symmetry | probe | row | model | inputs
    message: str


@dataclass
class VerifyReport:
    """The outcome of :func:`verify`: which checks ran, and what disagreed."""

    rtol: float
    rows_checked: int = 0
    probes_checked: int = 0
    pairs_checked: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    skipped: str | None = None  # why nothing was recomputed (see NOTE: [verify and trust])
    pairs: bool = True  # whether every entry pair was compared (check 2)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def summary(self) -> str:
        if self.skipped is not None and self.ok:
            return f"verify: SKIPPED: {self.skipped}"
        state = "OK" if self.ok else f"FAILED ({len(self.mismatches)} mismatches)"
        return (
            f"verify: {state}: {self.pairs_checked} (sample, output) Hessians checked "
            f"{'for symmetry and ' if self.pairs else '(entry pairs skipped) '}"
            f"with {self.probes_checked} probe products, {self.rows_checked} rows recomputed, "
            f"gradients compared; rtol {self.rtol:g}"
        )


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
    """Recompute parts of a result from its stored config and compare; see NOTE: [what verify
    guarantees] and NOTE: [verify and trust].

    Args:
        result: an open result (:func:`pipeline.read`).
        rows: Hessian rows recomputed per sample; None: every row when N * D <= 4096, else 8;
            0: every row.
        seed: seed of the random rows and probe vectors.
        memory_mb: bound on the Hessian panels held in memory at once.
        max_mismatches: stop after this many mismatches.
        rtol: relative tolerance; default 1e-4 for float32 and 1e-9 for float64 files.
        trust_file: rebuild the model even when that imports code the file names.
        pairs: compare every pair H[i, j], H[j, i] (check 2). Without, each Hessian is read once
            (for matrices far larger than ``memory_mb``, where the pairs take many passes).

    Returns:
        The report; ``report.ok`` is False when anything disagrees; ``report.skipped`` says why
        nothing was recomputed (code the file names and ``trust_file`` is False).

    Raises:
        PipelineError: the stored config cannot be rebuilt (e.g. a model file that moved).
    """
    dtype = str(result.attrs.get("dtype", "float32"))
    rtol = rtol if rtol is not None else RTOL.get(dtype, 1e-4)
    report = VerifyReport(rtol, pairs=pairs)
    cfg = rebuild_config(result, trust_file)
    untrusted = untrusted_code(cfg)
    if untrusted and not trust_file:
        report.skipped = (
            f"rebuilding the model would run code that the file names ({'; '.join(untrusted)}); "
            "pass --trust-file (trust_file=True) if you trust the file"
        )
        return report
    job = build_job(complete_config(cfg))
    f = result.file
    n_samples, n_out, d, _ = result.shape
    if job.model_fingerprint != result.attrs.get("model_fingerprint"):
        msg = (
            "the model rebuilt from the stored config differs from the one that wrote the file "
            "(model fingerprint); was the checkpoint replaced?"
        )
        report.mismatches.append(Mismatch("model", msg))
        return report
    x_file = f["inputs"][()]
    if x_file.shape != tuple(job.data.x.shape) or not np.array_equal(x_file, job.data.x.numpy()):
        msg = (
            "the inputs rebuilt from the stored data config differ from /inputs; "
            "was the data file changed?"
        )
        report.mismatches.append(Mismatch("inputs", msg))
        return report
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
        hv = _hvp(job.model, x[0], target, torch.as_tensor(probes.T, dtype=x.dtype))  # (P, K, D)
        expected = _Expected(
            rows=row_idx,
            hessian_rows=h_rows[0].double().numpy(),
            gradient=grad[0].double().numpy(),
            products=hv.double().numpy().transpose(1, 2, 0),
            probes=probes,
        )
        for k in range(n_out):
            found = _compare(result, n, k, expected, rtol, memory_mb, label, pairs)
            report.mismatches.extend(found[: max_mismatches - len(report.mismatches)])
            report.pairs_checked += 1
            report.probes_checked += N_PROBES
            if len(report.mismatches) >= max_mismatches:
                return report
        report.rows_checked += len(row_idx)
    return report


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
    result: Result, n: int, k: int, exp: _Expected, rtol: float, memory_mb: int, label: _Labels,
    pairs: bool = True,
) -> list[Mismatch]:  # fmt: skip
    """Mismatches of H = /hessian[n, k] and /gradient[n, k] against the recomputation."""
    hess, out = result.file["hessian"], []
    d = hess.shape[-1]
    tiny = np.finfo(np.float64).tiny
    st = matrix_stats(hess, n, k, probes=exp.probes, sym_rtol=rtol if pairs else None,
                      memory_mb=memory_mb, pairs=pairs)  # fmt: skip
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
    if st.worst_pair is not None and st.worst_pair[2] > atol:
        i, j, _ = st.worst_pair
        msg = (
            f"Hessian of {name} is not symmetric at row {label.col(i)}, column {label.col(j)}: "
            f"H[i,j] = {hess[n, k, i, j]:.8g}, H[j,i] = {hess[n, k, j, i]:.8g}"
        )
        out.append(Mismatch("symmetry", msg))
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


def _hvp(model: torch.nn.Module, x: Tensor, target: Target, v: Tensor) -> Tensor:
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


def check(result: Result, **kwargs) -> VerifyReport:
    """:func:`verify`, where a run that cannot be rebuilt here (a file that moved, a stored
    config this version refuses) is a skipped check with the reason, not a failure."""
    try:
        return verify(result, **kwargs)
    except PipelineError as err:
        report = VerifyReport(RTOL.get(str(result.attrs.get("dtype")), 1e-4))
        report.skipped = f"cannot rebuild the run here: {err}"
        return report
