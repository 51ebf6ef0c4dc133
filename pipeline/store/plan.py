"""How a job is cut into blocks of Hessian rows, and how HDF5 chunks align with them.

NOTE: [blocks and chunks] The unit of work is a block: samples [s0, s1) x rows [r0, r1) of the
Hessians of all K selected outputs. Block edges are multiples of the chunk edges, so every block
fills whole chunks of ``/hessian`` and a chunk is written once ("align the block size of the storage
target with the block size of your array"). The plan depends only on (N, K, D, itemsize) and the
storage settings, so a rerun finds the same blocks: that is what makes resume possible.
"""

from __future__ import annotations

from dataclasses import dataclass

CHUNK_BYTES = 512 * 1024  # HDF5 chunks of 10 KiB - 1 MiB read well


@dataclass(frozen=True)
class Block:
    """Samples [s0, s1) x Hessian rows [r0, r1), all outputs; ``index`` is its place in the plan."""

    index: int
    s0: int
    s1: int
    r0: int
    r1: int

    @property
    def cells(self) -> int:
        """The (sample, row) pairs it holds: a sample's worth per D of them."""
        return (self.s1 - self.s0) * (self.r1 - self.r0)


@dataclass(frozen=True)
class Plan:
    """Blocks of a (N, K, D, D) Hessian and the chunk shape of the file that stores it."""

    n_samples: int
    n_outputs: int
    dim: int
    block_samples: int
    block_rows: int
    chunks: tuple[int, int, int, int]

    @property
    def blocks(self) -> list[Block]:
        out = []
        for s0 in range(0, self.n_samples, self.block_samples):
            for r0 in range(0, self.dim, self.block_rows):
                s1 = min(s0 + self.block_samples, self.n_samples)
                out.append(Block(len(out), s0, s1, r0, min(r0 + self.block_rows, self.dim)))
        return out


def chunk_rows_for(block_rows: int, most: int) -> int:
    """Rows of a chunk for blocks of ``block_rows`` rows: at most ``most`` (chunks of about
    ``CHUNK_BYTES``), a divisor of ``block_rows`` when one is at least ``most / 4`` (blocks keep
    the size asked for), else ``most`` (blocks are rounded up to whole chunks; the run says so).
    """
    if block_rows <= most:
        return block_rows
    for rows in range(most, max(1, most // 4) - 1, -1):
        if block_rows % rows == 0:
            return rows
    return most


def make_plan(
    n: int, k: int, d: int, itemsize: int, block_rows: int | None = None, block_mb: int = 64
) -> Plan:
    """Plan blocks of about ``block_mb`` MiB (or ``block_rows`` rows) with aligned chunks."""
    row = d * itemsize  # bytes of one Hessian row
    chunk_rows = max(1, min(d, CHUNK_BYTES // row))
    if block_rows is not None:
        block_rows = max(1, min(d, block_rows))
        chunk_rows = chunk_rows_for(block_rows, chunk_rows)
        block_rows = min(d, -(-block_rows // chunk_rows) * chunk_rows)
        per_sample = k * block_rows * row
        block_samples = 1 if block_rows < d else max(1, (block_mb << 20) // per_sample)
    else:
        budget = block_mb << 20
        if k * d * row <= budget:  # whole Hessians, several samples per block
            block_rows, block_samples = d, max(1, budget // (k * d * row))
        else:
            block_samples = 1
            block_rows = max(chunk_rows, (budget // (k * row)) // chunk_rows * chunk_rows)
            block_rows = min(d, block_rows)
    block_samples = min(block_samples, n)
    chunk_samples = 1
    if chunk_rows == d and block_rows == d:  # small Hessians: several samples per chunk
        chunk_samples = max(1, min(block_samples, CHUNK_BYTES // (d * row)))
        block_samples = max(chunk_samples, block_samples // chunk_samples * chunk_samples)
    return Plan(n, k, d, block_samples, block_rows, (chunk_samples, 1, chunk_rows, d))
