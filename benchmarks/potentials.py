"""Interatomic potentials: ``pipeline.hessian`` (``auto``) against the Hessian code their users
run, time and peak memory, float32 unless ``--dtype float64``.

Every measurement runs in a fresh subprocess (this script with ``--child``): its first call is
the cold time (the process's first Hessian of a model built in it), the median of
``--repeats`` further calls the warm one (with min-max), and its peak resident memory
(``ru_maxrss``) is that method's alone. The child saves its Hessians; this process compares ours
with the reference's (largest error relative to the largest reference entry) and prints a table.

Cases (``--case``):

- ``batch24`` (default): 8 geometries of a 24-atom molecule (``--atoms``, ``--geometries``):
  MACE (random weights, ``pipeline.inputs.potentials.mace_energy``) against MACE's own Hessian
  (``compute_hessian=True``, one geometry a call, as its ASE calculator computes it); TorchANI
  against ``torch.autograd.functional.hessian(vectorize=True)`` one geometry a call, and against
  the same on the batch's summed energy (all 8 geometries' positions at once, the diagonal blocks
  kept: what a user with a batched model may write); the pure-torch message-passing potential
  (``tests/potentials.py: MessagePassingPotential``, every pair an edge) against
  ``vmap(torch.func.hessian)`` over the geometries.
- ``mace96``: one 96-atom MACE molecule, ours under ``memory_budget=1 << 30`` against MACE's own
  (cold calls only unless ``--repeats``).
- ``radius500``: one 500-atom molecule with ``MessagePassingPotential(neighbours="radius")``, ours
  under the 1 GiB budget; the reference is 16 rows by double backward in float64 (a check, not a
  rival: no ratio).

TorchANI's model covers H, C and O: nitrogen atoms of the molecule are made carbon for it.
``--quick`` runs every case at toy sizes (a few atoms) to see that it runs.

    python benchmarks/potentials.py                      # batch24, float32
    python benchmarks/potentials.py --case mace96
    python benchmarks/potentials.py --case radius500 --json radius500.json
    python benchmarks/potentials.py --case batch24 mace96 radius500 --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402
from benchmarks.allocator import keep_freed_memory  # noqa: E402

BUDGET = 1 << 30
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ---------------------------------------------------------------------------------------------
# Molecules: tests/potentials.py's where it is there, else the same signatures here.


def _fallback_random_molecule(n_atoms: int, seed: int = 0) -> tuple[list[int], Tensor]:
    """Atomic numbers (H, C, N, O) and positions (n, 3), Angstrom: each atom 1.0-1.5 A from one
    placed before and at least 1.0 A from all, in a sphere of ~0.08 atoms per cubic Angstrom."""
    gen = torch.Generator().manual_seed(seed)
    species = (1, 6, 7, 8)
    picks = torch.multinomial(torch.tensor([0.5, 0.3, 0.1, 0.1]), n_atoms, True, generator=gen)
    numbers = [species[int(i)] for i in picks]
    radius = (3 * n_atoms / (4 * math.pi * 0.08)) ** (1 / 3) + 1.0
    pos = torch.zeros(n_atoms, 3, dtype=torch.float64)
    placed, tries = 1, 0
    while placed < n_atoms:
        tries += 1
        if tries % (50 * n_atoms) == 0:
            radius *= 1.05
        anchor = pos[int(torch.randint(placed, (1,), generator=gen))]
        direction = torch.randn(3, generator=gen, dtype=torch.float64)
        step = (1.0 + 0.5 * torch.rand((), generator=gen, dtype=torch.float64)) * direction
        candidate = anchor + step / direction.norm()
        if candidate.norm() > radius or (pos[:placed] - candidate).norm(dim=-1).min() < 1.0:
            continue
        pos[placed] = candidate
        placed += 1
    return numbers, pos - pos.mean(0)


def _fallback_trajectory(positions: Tensor, frames: int, noise: float = 0.05, seed: int = 0):
    """``frames`` geometries (frames, n, 3): Gaussian noise of ``noise`` A on every coordinate."""
    gen = torch.Generator().manual_seed(seed)
    shake = torch.randn(frames, *positions.shape, generator=gen, dtype=torch.float64)
    return positions.unsqueeze(0) + noise * shake


try:
    from tests.potentials import MessagePassingPotential, random_molecule, trajectory
except ImportError as err:  # tests/potentials.py not in this checkout
    MessagePassingPotential = None
    NO_MESSAGE_PASSING = f"tests/potentials.py is not importable ({err})"
    random_molecule, trajectory = _fallback_random_molecule, _fallback_trajectory
else:
    NO_MESSAGE_PASSING = ""


def molecule(n_atoms: int, frames: int, seed: int = 0) -> tuple[list[int], Tensor]:
    """Atomic numbers and ``frames`` float64 geometries (frames, n, 3) of a made-up molecule."""
    numbers, pos = random_molecule(n_atoms, seed)
    return numbers, trajectory(pos.double(), frames, 0.05, seed + 1).double()


# ---------------------------------------------------------------------------------------------
# Rows: a model, our call and the reference's, each a function of (model, x) -> (B, D, D).


def _ours(budget: int | None) -> Callable[[nn.Module, Tensor], Tensor]:
    def run(net: nn.Module, x: Tensor) -> Tensor:
        return pipeline.hessian(net, x, [0], memory_budget=budget)[:, 0]

    return run


def _mace_own(net: nn.Module, x: Tensor) -> Tensor:
    from pipeline.inputs.potentials import mace_own_hessian

    return torch.stack([mace_own_hessian(net, xb) for xb in x])


def _afh_each(net: nn.Module, x: Tensor) -> Tensor:
    from pipeline.inputs.potentials import ani_reference_hessian

    return torch.stack([ani_reference_hessian(net, xb, vectorize=True) for xb in x])


def _afh_sum(net: nn.Module, x: Tensor) -> Tensor:
    """Hessian of the batch's summed energy over all B * 3n coordinates, diagonal blocks kept."""
    b, n, _ = x.shape
    d = 3 * n
    h = torch.autograd.functional.hessian(
        lambda flat: net(flat.reshape(b, n, 3)).sum(), x.reshape(-1), vectorize=True
    )
    return torch.stack([h[i * d : (i + 1) * d, i * d : (i + 1) * d] for i in range(b)])


NOTES: list[str] = []  # what a reference had to do otherwise (the child prints them)


def _func_vmap(net: nn.Module, x: Tensor) -> Tensor:
    """``vmap(torch.func.hessian)`` over the geometries; where ``vmap`` cannot batch the model
    (an in-place ``index_add_`` into an unbatched tensor), ``torch.func.hessian`` one geometry a
    call, and a note says so."""
    n = x.shape[1]

    def energy(flat: Tensor) -> Tensor:
        return net(flat.reshape(1, n, 3))[0, 0]

    flat = x.reshape(len(x), -1)
    try:
        return torch.vmap(torch.func.hessian(energy))(flat)
    except RuntimeError as err:
        if "vmap" not in str(err):
            raise
        note = f"vmap failed ({str(err)[:90]}...): torch.func.hessian per geometry"
        if note not in NOTES:
            NOTES.append(note)
        return torch.stack([torch.func.hessian(energy)(xb) for xb in flat])


def _rows_float64(rows: int) -> Callable[[nn.Module, Tensor], Tensor]:
    """``rows`` rows (spread over D) of each geometry's Hessian, by double backward, float64."""

    def run(net: nn.Module, x: Tensor) -> Tensor:
        net, x = net.double(), x.double()
        d = x[0].numel()
        picks = torch.linspace(0, d - 1, rows).round().long().unique()
        out = []
        for xb in x:
            u = xb[None].clone().requires_grad_(True)
            (g,) = torch.autograd.grad(net(u).sum(), u, create_graph=True)
            g = g.reshape(-1)
            out.append(torch.stack([torch.autograd.grad(g[r], u, retain_graph=True)[0].reshape(-1)
                                    for r in picks.tolist()]))  # fmt: skip
        return torch.stack(out)

    return run


def _mace(numbers: list[int]) -> nn.Module:
    from pipeline.inputs.potentials import mace_energy

    return mace_energy(numbers)


def _ani(numbers: list[int]) -> nn.Module:
    from pipeline.inputs.potentials import ani_energy

    return ani_energy([6 if z == 7 else z for z in numbers])


def _message_passing(neighbours: str) -> Callable[[list[int]], nn.Module]:
    def build(numbers: list[int]) -> nn.Module:
        torch.manual_seed(0)
        return MessagePassingPotential(numbers, neighbours=neighbours)

    return build


@dataclass(frozen=True)
class Row:
    """One line of the table: a model on a case's molecule, our call against a reference."""

    name: str
    build: Callable[[list[int]], nn.Module]
    reference: str  # what the reference is, for the table
    ours: Callable[[nn.Module, Tensor], Tensor]
    theirs: Callable[[nn.Module, Tensor], Tensor]
    needs: str = ""  # "message_passing": skipped without tests/potentials.py
    rows: int = 0  # > 0: the reference computes only these rows (ours is cut to them)


@dataclass(frozen=True)
class Case:
    atoms: int
    geometries: int
    rows: tuple[Row, ...]
    repeats: int  # warm calls after the cold one (--repeats overrides)


CASES = {
    "batch24": Case(24, 8, (
        Row("MACE", _mace, "MACE's own (compute_hessian), per geometry", _ours(None), _mace_own),
        Row("TorchANI", _ani, "autograd.functional.hessian, per geometry", _ours(None),
            _afh_each),
        Row("TorchANI, batch sum", _ani, "autograd.functional.hessian of the batch's energy sum",
            _ours(None), _afh_sum),
        Row("message passing (all pairs)", _message_passing("all"), "vmap(torch.func.hessian)",
            _ours(None), _func_vmap, "message_passing"),
    ), 5),
    "mace96": Case(96, 1, (
        Row("MACE, 1 GiB budget", _mace, "MACE's own (compute_hessian)", _ours(BUDGET),
            _mace_own),
    ), 0),
    "radius500": Case(500, 1, (
        Row("message passing (radius), 1 GiB budget", _message_passing("radius"),
            "double backward rows, float64", _ours(BUDGET), _rows_float64(16), "message_passing",
            16),
    ), 0),
}  # fmt: skip
QUICK = {"batch24": (6, 2), "mace96": (8, 1), "radius500": (30, 1)}


# ---------------------------------------------------------------------------------------------
# The child: one method of one row, timed, its Hessians saved.


def child(args: argparse.Namespace) -> None:
    keep_freed_memory()
    case = CASES[args.case]
    row = next(r for r in case.rows if r.name == args.row)
    dtype = DTYPES[args.dtype]
    numbers, x = molecule(args.atoms, args.geometries, args.seed)
    x = x.to(dtype)
    start = time.perf_counter()
    net = row.build(numbers).to(dtype).eval()
    build_s = time.perf_counter() - start
    compute = row.ours if args.side == "ours" else row.theirs
    start = time.perf_counter()
    h = compute(net, x)
    cold = time.perf_counter() - start
    warm = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        compute(net, x)
        warm.append(time.perf_counter() - start)
    np.save(args.save, h.detach().double().cpu().numpy())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"cold": cold, "warm": warm, "peak": peak, "build": build_s, "notes": NOTES}))


def measure(args: argparse.Namespace, case_name: str, row: Row, side: str, tmp: Path) -> dict:
    """Runs one side of a row in a fresh process; its figures, or {"error": ...}."""
    save = tmp / f"{case_name}-{row.name}-{side}.npy".replace(" ", "_").replace(",", "")
    cmd = [sys.executable, __file__, "--child", "--case", case_name, "--row", row.name,
           "--side", side, "--dtype", args.dtype, "--atoms", str(args.atoms_of[case_name]),
           "--geometries", str(args.geometries_of[case_name]), "--seed", str(args.seed),
           "--repeats", str(args.repeats_of[case_name]), "--save", str(save)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {done.returncode}: {last[:200]}"}
    result = json.loads(lines[-1])
    result["hessian"] = np.load(save)
    return result


def _time(result: dict, warm: bool) -> str:
    if "error" in result:
        return "failed"
    if not warm:
        return f"{result['cold']:.3g}"
    if not result["warm"]:
        return "-"
    w = result["warm"]
    return f"{statistics.median(w):.3g} ({min(w):.3g}-{max(w):.3g})"


def _ratio(ours: dict, theirs: dict, warm: bool) -> str:
    if "error" in ours or "error" in theirs:
        return "-"
    if warm:
        if not ours["warm"] or not theirs["warm"]:
            return "-"
        return f"{statistics.median(ours['warm']) / statistics.median(theirs['warm']):.2f}x"
    return f"{ours['cold'] / theirs['cold']:.2f}x"


def _error(row: Row, ours: dict, theirs: dict, d: int) -> str:
    if "error" in ours or "error" in theirs:
        return "-"
    a, b = ours["hessian"], theirs["hessian"]
    if row.rows:  # the reference computed only these rows
        picks = np.unique(np.round(np.linspace(0, d - 1, row.rows)).astype(int))
        a = a[:, picks]
    scale = np.abs(b).max()
    return f"{np.abs(a - b).max() / scale:.1e}" if scale > 0 else "reference is zero"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", nargs="+", default=["batch24"], choices=list(CASES))
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--atoms", type=int, help="atoms of the molecule (default: the case's)")
    parser.add_argument("--geometries", type=int, help="geometries (default: the case's)")
    parser.add_argument("--repeats", type=int, help="warm calls after the cold one")
    parser.add_argument("--rows", nargs="+", help="only the rows whose name starts so")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="toy sizes: does it run?")
    parser.add_argument("--json", type=Path, help="write the figures there too")
    # the child's own arguments
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.case = args.case[0]
        child(args)
        return

    args.atoms_of, args.geometries_of, args.repeats_of = {}, {}, {}
    for name in args.case:
        case = CASES[name]
        atoms, geometries = QUICK[name] if args.quick else (case.atoms, case.geometries)
        args.atoms_of[name] = args.atoms or atoms
        args.geometries_of[name] = args.geometries or geometries
        repeats = args.repeats if args.repeats is not None else case.repeats
        args.repeats_of[name] = min(repeats, 2) if args.quick else repeats

    print(f"# potentials, {args.dtype}, torch {torch.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads; times in s: cold "
          "(first call in a fresh process), warm median (min-max); peak = the process's "
          "ru_maxrss")  # fmt: skip
    if NO_MESSAGE_PASSING:
        print(f"# message-passing rows skipped: {NO_MESSAGE_PASSING}")
    header = ("case", "row", "reference", "ours cold", "ref cold", "cold ratio", "ours warm",
              "ref warm", "warm ratio", "ours peak MiB", "ref peak MiB",
              "max rel error")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.case:
            case = CASES[name]
            n, b = args.atoms_of[name], args.geometries_of[name]
            for row in case.rows:
                if args.rows and not any(row.name.startswith(r) for r in args.rows):
                    continue
                label = f"{name} ({b} x {n} atoms)"
                if row.needs == "message_passing" and MessagePassingPotential is None:
                    print(f"| {label} | {row.name} | skipped: no tests/potentials.py |")
                    continue
                ours = measure(args, name, row, "ours", Path(tmp))
                theirs = measure(args, name, row, "theirs", Path(tmp))
                cells = [
                    label, row.name, row.reference, _time(ours, False), _time(theirs, False),
                    "-" if row.rows else _ratio(ours, theirs, False), _time(ours, True),
                    _time(theirs, True), "-" if row.rows else _ratio(ours, theirs, True),
                    *(f"{r['peak'] / 2**20:.0f}" if "peak" in r else "-" for r in (ours, theirs)),
                    _error(row, ours, theirs, 3 * n),
                ]  # fmt: skip
                print("| " + " | ".join(cells) + " |", flush=True)
                for side, r in (("ours", ours), ("reference", theirs)):
                    if "error" in r:
                        print(f"#   {row.name}, {side}: {r['error']}")
                    for note in r.get("notes", []):
                        print(f"#   {row.name}, {side}: {note}")
                records.append({
                    "case": name, "row": row.name, "reference": row.reference, "atoms": n,
                    "geometries": b, "dtype": args.dtype, "max_rel_error": cells[-1],
                    **{f"{side}_{k}": v for side, r in (("ours", ours), ("ref", theirs))
                       for k, v in r.items() if k != "hessian"},
                })  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
