"""What a model's autograd graph holds: the measure behind the memory budget's arithmetic.

Counted with ``torch.autograd.graph.saved_tensors_hooks`` (the tensors autograd keeps for the
backward), not with module hooks: ScriptModules refuse those, and a module's output says nothing of
what its ``forward`` computes inside.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class Saved:
    """Bytes of the distinct storages saved for the backward while the context was open."""

    storages: dict[int, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


@contextmanager
def saved_bytes(model: nn.Module) -> Iterator[Saved]:
    """Count what autograd saves for the backward inside the context, the model's parameters
    and buffers excluded (they are held anyway, whatever the batch)."""
    held = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = Saved()

    def pack(t: Tensor) -> Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return t  # no storage (sparse, meta, a wrapper subclass): not counted
        ptr = storage.data_ptr()
        if ptr not in held:
            saved.storages[ptr] = max(saved.storages.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def forward_bytes(model: nn.Module, x: Tensor) -> int:
    """Bytes autograd saves in one forward of x (b, *S) with respect to x."""
    xb = x.detach().requires_grad_(True)
    with torch.enable_grad(), saved_bytes(model) as saved:
        model(xb)
    return saved.total
