"""Which Hessian rows to compute: indices into the flattened input, and whether they are all."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import ArgumentError


class Rows:
    """The selected rows: indices (R,) on the device, and whether they are all D rows in order
    (known on the host, so that no comparison on the device is needed to find out)."""

    def __init__(self, index: Tensor, full: bool):
        self.index = index
        self.full = full

    def __len__(self) -> int:
        return self.index.shape[0]

    def chunk(self, start: int, stop: int) -> Rows:
        return Rows(self.index[start:stop], self.full and start == 0 and stop >= len(self))


def select_rows(rows: slice | Tensor | Sequence[int] | Rows | None, dim: int, device) -> Rows:
    """Rows from None (all), a slice, or a sequence/tensor of indices (negative ones count from
    the end)."""
    if isinstance(rows, Rows):
        return rows
    if rows is None:
        return Rows(torch.arange(dim, device=device), True)
    if isinstance(rows, slice):
        start, stop, step = rows.indices(dim)
        full = start == 0 and stop == dim and step == 1
        return Rows(torch.arange(start, stop, step, device=device), full)
    idx = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
    if idx.device.type == "cpu" and idx.numel() and (idx.min() < -dim or idx.max() >= dim):
        raise ArgumentError(f"row index out of range for D = {dim}", "rows")
    return Rows((idx % dim).to(device), False)
