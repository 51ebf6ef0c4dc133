"""``python -m pipeline.inspect PATH [--verify]``: summarise a result file, optionally check it.

The summary lists shapes, dtype, method, the key config values, the size on disk and, per
(sample, output), the Frobenius norm, trace, symmetry residual ||H - H^T||_F / ||H||_F and count
of non-finite entries: the statistics the run stored in the file (``--stream`` recomputes them
from ``/hessian`` in row panels, see NOTE: [row panels] in ``pipeline.stats``).

``--verify`` first checks the file against itself, which needs no model and always runs: the
symmetry of every stored Hessian, the stored statistics (``/diagonal``, ``/row_norm``,
``/trace``, ``/frobenius``, ``/symmetry``, ``/nonfinite``, ``/block_sums``) against
``/hessian``, dtypes and shapes against the attributes, the output indices. It then rebuilds the
model to recompute gradients, probe products and rows, which it does only for this package's own
model factories unless ``--trust-file`` is given (otherwise ``verify: SKIPPED``, with the
reason). The exit status is 1 when any check fails, with or without the model checks; see
NOTE: [what verify guarantees] in ``pipeline.results.verify``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from ..errors import PipelineError
from ..store import ResultNames
from ..store.schema import fields
from .kind_plots import factored_diagonal
from .reader import Result, mass_weighted, read
from .stats import DEFAULT_MEMORY_MB, matrix_stats, stored_stats
from .verify import ALL_ROWS_BELOW, check, rebuild_config, untrusted_code

MAX_TABLE_LINES = 64

VERIFY_HELP = f"""\
--verify checks the file against itself first (file checks: no model is built, so they always
run, with or without --trust-file, also when the run cannot be rebuilt here): the symmetry of
every entry pair H[i,j], H[j,i] (so any changed off-diagonal entry is caught); the stored
statistics against /hessian, read in row panels: /diagonal and /row_norm entry by entry (so a
changed diagonal entry is caught), /trace, /frobenius, /symmetry, the row blocks' /block_sums,
and the non-finite counts /nonfinite and attrs['nonfinite_entries'] exactly (a NaN written into
/hessian is named by its row and column); dtypes and shapes against the attributes, and
/output_index against the target.
Then it rebuilds the model and data from the stored config (model checks) and checks:
every gradient entry; two products H p with random +-1 vectors p against exact Hessian-vector
products (a single changed entry (i,j), diagonal included, shifts row i of H p by exactly the
change, so it is caught; several changes in one row cancel only by chance: at most 1/2 per
probe, 1/4 for both);
and --rows random rows per sample recomputed with the stored method (every row when
N * D <= {ALL_ROWS_BELOW}, so small files are compared entry by entry). Only the model checks
catch a changed gradient, or entries changed together with their statistics.
Tolerance: rtol 1e-4 (float32) or 1e-9 (float64) relative to the row norm (times sqrt(D) for
the probes), plus rtol * ||H||_F / sqrt(D). Smaller changes look like rounding and are not
reported. Exit status 1 when any check fails, naming the check, sample, output, row and column.

Trust: the model is rebuilt only when this package's own factories build it; a file whose config
names other code (a _target_ of yours or someone else's) or an exported program is not rebuilt
(the model checks say verify: SKIPPED; the exit status is that of the file checks) unless
--trust-file is given, which prints what it will import first. A run that cannot be rebuilt here
(a data file that moved) skips the model checks too, with the reason.
Relative paths in the stored config are resolved against the run's working directory."""


def disk_size(result: Result) -> int:
    """Bytes of the file, plus its shard files for a virtual layout."""
    size = result.path.stat().st_size
    if result.layout == "virtual":
        size += sum(p.stat().st_size for p in ResultNames(result.path).shard_files().values())
    return size


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError


def describe(result: Result) -> list[str]:
    """The summary lines: file, shapes, provenance and key config values."""
    cfg, a, f = result.config, result.attrs, result.file
    n, k, d, _ = result.shape
    if result.output == "dense":
        h = f["hessian"]
        if h.is_virtual:
            chunks = f"virtual over {len(h.virtual_sources())} shard files"
        else:
            chunks = h.chunks or "none (contiguous)"
        main = f"hessian    ({n}, {k}, {d}, {d}) {result.dtype}, chunks {chunks}"
    else:
        own = fields(result.output, mass_weighted(a))
        stored = ", ".join(f"/{fd.name} {tuple(f[fd.name].shape)}" for fd in own)
        main = (
            f"output     {result.output} of Hessians ({n}, {k}, {d}, {d}) {result.dtype}: {stored}"
        )
    data = cfg.get("data", {})
    sl = (
        f"indices {list(data.indices)}"
        if data.get("indices") is not None
        else f"[{data.get('start', 0)}:{data.get('stop')}]"
    )
    net = cfg.model.get("net") or {}
    net_args = ", ".join(f"{key}={v}" for key, v in net.items() if key != "_target_")
    target = cfg.get("target", {})
    tdesc = target.get("name")
    if tdesc == "indices":
        tdesc = f"indices {list(target.indices)}"
    elif tdesc == "loss":
        tdesc = f"loss ({target.get('loss')})"
    versions = OmegaConf.create(a.get("versions") or "{}")
    lines = [
        f"file       {result.path}",
        f"size       {human(disk_size(result))} on disk, layout {result.layout}, "
        f"status {a.get('status')}, created {a.get('created')}",
        main,
        f"gradient   {tuple(f['gradient'].shape)}   inputs {tuple(f['inputs'].shape)}   "
        f"outputs {tuple(f['outputs'].shape)}   output_index {tuple(f['output_index'].shape)}",
        f"method     {result.method}, dtype {a.get('dtype')}, target {a.get('target')}",
        f"model      {cfg.model.get('name')}: {net.get('_target_', cfg.model.get('path'))}"
        + (f"({net_args})" if net_args else "")
        + (f", checkpoint {cfg.model.checkpoint}" if cfg.model.get("checkpoint") else "")
        + f", fingerprint {str(a.get('model_fingerprint'))[:12]}",
        f"data       {data.get('name')} {sl}" + (f" from {data.path}" if data.get("path") else ""),
        f"target     {tdesc}",
        "versions   " + ", ".join(f"{key} {v}" for key, v in versions.items()),
    ]
    if "atomic_numbers" in f:
        lines.insert(7, atoms_line(result))
    return lines


def atoms_line(result: Result) -> str:
    """The atoms of a result of ``data=ase``: formula, numbers and masses."""
    from collections import Counter

    from ase.data import chemical_symbols

    numbers = result.file["atomic_numbers"][()]
    masses = result.file["masses"][()] if "masses" in result.file else []
    count = Counter(chemical_symbols[int(z)] for z in numbers)
    formula = "".join(f"{el}{n if n > 1 else ''}" for el, n in count.items())
    pairs = zip(numbers[:8], masses, strict=False)
    shown = ", ".join(f"{chemical_symbols[int(z)]} {m:.6g}" for z, m in pairs)
    more = ", ..." if len(numbers) > 8 else ""
    weighted = ", eigenpairs mass-weighted" if mass_weighted(result.attrs) else ""
    return f"atoms      {len(numbers)} ({formula}), masses in amu: {shown}{more}{weighted}"


def stats_table(
    result: Result, memory_mb: int = DEFAULT_MEMORY_MB, stream: bool = False
) -> list[str]:
    """Per (sample, output): Frobenius norm, trace, symmetry residual and non-finite entries (at
    most 64 lines), as stored in the file, or with ``stream`` recomputed from ``/hessian``."""
    if result.output != "dense":
        return kind_table(result)
    n, k, _, _ = result.shape
    si = result.file["sample_index"][()]
    table = None if stream else stored_stats(result)
    lines = [
        f"{'sample':>6} {'index':>6} {'output':>6} {'frobenius':>12} {'trace':>12} "
        f"{'symmetry':>10} {'nonfinite':>9}"
    ]
    for i in range(n):
        oi = result.output_index_of(i)
        for j in range(k):
            if len(lines) > MAX_TABLE_LINES:
                lines.append(
                    f"... {n * k - MAX_TABLE_LINES} more (see hessian_stats.csv from "
                    "python -m pipeline.plots)"
                )
                return lines
            if table is None:
                st = matrix_stats(result.file["hessian"], i, j, memory_mb=memory_mb)
                row = (st.frobenius, st.trace, st.symmetry, -1 if np.isnan(st.frobenius) else 0)
            else:
                row = tuple(table[name][i, j] for name in ("frobenius", "trace", "symmetry",
                                                           "nonfinite"))  # fmt: skip
            lines.append(
                f"{i:>6} {int(si[i]):>6} {int(oi[j]):>6} {row[0]:>12.5g} {row[1]:>12.5g} "
                f"{row[2]:>10.2e} {int(row[3]):>9}"
            )
    return lines


def kind_table(result: Result) -> list[str]:
    """Per (sample, output) of a result that is not the dense matrix (at most 64 lines): the
    trace (diagonal, factored), the eigenvalues and the largest residual (eigen; and the
    frequencies in cm^-1 when mass-weighted, imaginary ones negative), the largest entry of the
    chosen rows (rows)."""
    f, kind = result.file, result.output
    n, k = f["gradient"].shape[:2]
    si = f["sample_index"][()]
    head = {"diagonal": "trace", "factored": "trace", "rows": "max |entry|",
            "eigen": "eigenvalues (max residual)"}[kind]  # fmt: skip
    lines = [f"{'sample':>6} {'index':>6} {'output':>6}  {head}"]
    for i in range(n):
        oi = result.output_index_of(i)
        for j in range(k):
            if len(lines) > MAX_TABLE_LINES:
                lines.append(f"... {n * k - MAX_TABLE_LINES} more (hessian_values.csv of the run)")
                return lines
            if kind == "diagonal":
                value = f"{float(f['trace'][i, j]):.6g}"
            elif kind == "factored":
                value = f"{float(factored_diagonal(result, i, j).sum()):.6g}"
            elif kind == "rows":
                value = f"{float(np.abs(f['hessian'][i, j]).max()):.6g}"
            else:
                ev = ", ".join(f"{v:.5g}" for v in f["eigenvalues"][i, j])
                value = f"{ev} ({float(f['residuals'][i, j].max()):.2e})"
                if "frequencies" in f:
                    cm = ", ".join(f"{v:.1f}" for v in f["frequencies"][i, j])
                    value += f"; cm^-1: {cm}"
            lines.append(f"{i:>6} {int(si[i]):>6} {int(oi[j]):>6}  {value}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.inspect",
        description="Summarise a Hessian result file; --verify checks it against itself and "
        "against the model.",
        epilog=VERIFY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("path", type=Path, help="a result file written by python -m pipeline")
    parser.add_argument(
        "--verify", action="store_true", help="check the file, then recompute and compare (below)"
    )
    parser.add_argument(
        "--rows",
        type=int,
        default=None,
        help=f"rows recomputed per sample by --verify (default: all when N*D <= {ALL_ROWS_BELOW}, "
        "else 8; 0: all)",
    )
    parser.add_argument(
        "--rtol", type=float, default=None,
        help="relative tolerance of --verify (default 1e-4 for float32, 1e-9 for float64)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the random rows and probes")
    parser.add_argument(
        "--no-pairs",
        action="store_true",
        help="--verify without comparing every entry pair H[i,j], H[j,i] or the stored "
        "symmetry: the file checks read each Hessian once (for matrices far larger than "
        "--memory-mb, where the pairs take many passes)",
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="recompute the table from /hessian (exact symmetry residual) instead of reading "
        "the statistics stored in the file",
    )
    parser.add_argument(
        "--trust-file",
        action="store_true",
        help="let --verify import the code the file's config names (its _target_s) or load the "
        "exported program it names; only for files you trust (see below)",
    )
    parser.add_argument(
        "--memory-mb",
        type=int,
        default=DEFAULT_MEMORY_MB,
        help="memory bound for the Hessian row panels read at once",
    )
    args = parser.parse_args(argv)
    try:
        result = read(args.path)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    with result:
        print("\n".join(describe(result)))
        print()
        print("\n".join(stats_table(result, args.memory_mb, args.stream)))
        if not args.verify:
            return 0
        print()
        if args.trust_file:
            for what in untrusted_code(rebuild_config(result, True)):
                print(f"--trust-file: verify {what}", flush=True)
        report = check(
            result,
            rows=args.rows,
            seed=args.seed,
            memory_mb=args.memory_mb,
            rtol=args.rtol,
            trust_file=args.trust_file,
            pairs=not args.no_pairs,
        )
        for m in report.mismatches:
            print(f"mismatch ({m.check}): {m.message}")
        print(report.summary())
        return 0 if report.ok else 1


def _main() -> int:
    """``main`` with stdout closed early (``| head``) ending quietly, like other Unix tools."""
    try:
        status = main()
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's flush at exit must not fail again
        return 141  # 128 + SIGPIPE, as a shell reports a process killed by the broken pipe


if __name__ == "__main__":
    np.set_printoptions(precision=5)
    sys.exit(_main())
