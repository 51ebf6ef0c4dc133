"""What one block computes, for each ``output`` kind (``pipeline.store.schema`` lists what each
stores): the dense rows through the job's method, or the diagonal, chosen rows, eigenpairs or
factors through ``pipeline.hessian``. A :class:`Work` is small and picklable: Dask workers get it
with each block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..config.schema import OutputConf
from ..errors import PipelineError
from ..hessian import diagonal, eigen, factored
from ..hessian.errors import ArgumentError
from ..hessian.methods import compute_rows, handover
from ..hessian.targets import Target
from ..inputs.atoms import frequencies
from ..store.plan import Block, Plan
from ..store.schema import numbers
from ..store.statistics import BlockStats, block_stats

# NOTE [pieces] On the CPU a dense block (64 MiB by default: large HDF5 chunks, few commits) is
# computed a few MiB of Hessians at a time, each piece's statistics taken while it is still in
# the cache and the piece copied into the block. A tanh MLP at D = 64 computed 41,000 samples/s
# in calls of 3,846 samples (a whole block), 58,000-61,000 in calls of 128-256; statistics of a
# whole block afterwards, on the writer's thread, read 64 MiB from memory again, beside the
# compute (183 ms a block against 300 ms of compute). At D = 784 calls of 4-8 samples (10-20
# MB) were as fast as any; of 1 sample 25% slower: a piece holds at least PIECE_SAMPLES.
PIECE_BYTES = 4 << 20
PIECE_SAMPLES = 4


@dataclass(frozen=True)
class Work:
    """What every block of a run computes.

    Attributes:
        output: the ``output`` config (its ``name`` is the kind).
        method: the resolved method (dense rows, chosen rows, the gradients).
        requested: ``method.name`` as configured: ``auto`` lets the diagonal and the eigen solver
            choose their own route (a diagonal propagated on the graph, not from rows).
        masses: (D,) per input coordinate, for ``output.mass_weighted`` (else None): the
            eigenpairs of M^-1/2 H M^-1/2 and their frequencies.
    """

    output: OutputConf
    method: str
    requested: str
    masses: tuple[float, ...] | None = None

    @property
    def kind(self) -> str:
        return self.output.name

    def compute(
        self, model: nn.Module, x: Tensor, target: Target, block: Block, budget: int | None
    ) -> tuple[Tensor | dict[str, np.ndarray], Tensor | None, BlockStats | None]:
        """Block ``block`` of samples ``x``: dense Hessian rows [r0, r1) (S, K, R, D), the
        gradients (S, K, D) at row 0 and, on the CPU, the block's statistics (NOTE [pieces]);
        or, for the other kinds, a dict of the arrays the schema names, on the host, and None,
        None."""
        if self.kind == "dense":
            return self._dense(model, x, target, block, budget)
        parts = self._part(model, x, target, budget)
        return {k: _host(v) for k, v in parts.items()}, None, None

    def _dense(
        self, model, x, target, block, budget
    ) -> tuple[Tensor, Tensor | None, BlockStats | None]:
        rows = slice(block.r0, block.r1)  # a slice of all D rows lets a method use symmetry
        if x.device.type != "cpu":  # (the writer takes the statistics from the host copy)
            hess, grad = self._rows(model, x, target, rows, budget)
            return hess, (grad if block.r0 == 0 else None), None
        per_sample = target.n_outputs * (block.r1 - block.r0) * x[0].numel() * x.element_size()
        step = max(PIECE_SAMPLES, PIECE_BYTES // max(1, per_sample))
        if step >= len(x):  # one piece: the block itself
            hess, grad = self._rows(model, x, target, rows, budget)
            stats = block_stats(hess.detach().numpy(), block.r0)
            return hess, (grad if block.r0 == 0 else None), stats
        hess = grad = None
        stats = []
        for s in range(0, len(x), step):
            e = min(len(x), s + step)
            h, g = self._rows(model, x[s:e], target.subset(s, e), rows, budget)
            if hess is None:
                hess = h.new_empty((len(x), *h.shape[1:]))
                grad = g.new_empty((len(x), *g.shape[1:]))
            hess[s:e], grad[s:e] = h, g
            stats.append(block_stats(hess[s:e].numpy(), block.r0))  # while it is in the cache
        return hess, (grad if block.r0 == 0 else None), BlockStats.concat(stats)

    def _rows(self, model, x, target, rows, budget) -> tuple[Tensor, Tensor]:
        """Rows by the job's method; where it fails on a block although its probe passed, the
        rest of ``auto``'s chain takes over (``pipeline.hessian.methods.compute_rows``)."""
        after = handover(self.method, self.requested)
        return compute_rows(self.method, after, self.requested, model, x, target, rows, budget)

    def _part(self, model, x, target, budget) -> dict[str, Tensor]:
        o = self.output
        if self.kind == "diagonal":
            diag, grad = diagonal(model, x, target, budget, self.requested)
            return {"diagonal": diag, "gradient": grad}
        if self.kind == "rows":
            rows = torch.as_tensor(list(o.rows), device=x.device)
            hess, grad = self._rows(model, x, target, rows, budget)
            return {"hessian": hess, "gradient": grad}
        if self.kind == "eigen":
            masses = None if self.masses is None else torch.tensor(self.masses, dtype=x.dtype)
            values, vectors, residuals = eigen(
                model, x, target, o.k, str(o.which), o.tol, budget, self.requested, masses=masses
            )
            grad = self._rows(model, x, target, slice(0, 1), budget)[1]
            out = {"eigenvalues": values, "eigenvectors": vectors, "residuals": residuals,
                   "gradient": grad}  # fmt: skip
            if masses is not None:
                out["frequencies"] = torch.as_tensor(frequencies(_host(values)))
            return out
        if self.kind == "factored":
            jacobian, curvature, grad = factored(model, x, target, budget)
            return {"jacobian": jacobian, "curvature": curvature, "gradient": grad}
        raise PipelineError(f"unknown output {self.kind!r}", "output")


def _host(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def check_output(output: OutputConf, dim: int) -> None:
    """Refuse, in one line naming the key, an ``output`` the input size cannot serve."""
    if output.name == "rows":
        rows = list(output.rows)
        if not rows:
            raise PipelineError("output.rows is empty: give flat input indices", "output.rows")
        bad = [r for r in rows if not 0 <= r < dim]
        if bad:
            raise PipelineError(
                f"output.rows holds {bad[0]}, out of range: the input has D={dim} entries "
                f"(valid: 0..{dim - 1})",
                "output.rows",
            )
        if len(set(rows)) != len(rows):
            raise PipelineError("output.rows repeats an index", "output.rows")
    if output.name == "eigen" and not 1 <= output.k <= dim:
        raise PipelineError(
            f"output.k={output.k} is out of range: a Hessian of D={dim} has 1..{dim} eigenpairs",
            "output.k",
        )


def probe_output(work: Work, model: nn.Module, x: Tensor, target: Target) -> None:
    """``factored`` on sample 0: refused in one line where the model has no exact J^T A J."""
    if work.kind != "factored":
        return
    try:
        factored(model, x[:1], target.subset(0, 1))
    except ArgumentError as err:
        raise PipelineError(err.message, "output") from err


def sizes(output: OutputConf, n: int, k: int, d: int) -> dict[str, int]:
    """The dimension sizes a run of ``output`` knows before computing (see the schema)."""
    out = {"sample": n, "output": k, "column": d}
    if output.name == "rows":
        out["row"] = len(output.rows)
    if output.name == "eigen":
        out["eigenpair"] = output.k
    return out


def plan_samples(
    output: OutputConf, n: int, k: int, d: int, itemsize: int, block_mb: int,
    block_samples: int | None = None,
) -> Plan:  # fmt: skip
    """Blocks of whole samples for the kinds other than ``dense``: ``block_samples``, or as many
    samples as store about ``block_mb`` MiB (the math chunks its own working memory by
    ``method.memory_budget_mb``)."""
    per = numbers(output.name, sizes(output, 1, k, d)) * itemsize  # bytes a sample stores
    samples = block_samples or max(1, (block_mb << 20) // max(1, per))
    samples = min(n, samples)
    return Plan(n, k, d, samples, d, (1, 1, 1, 1))
