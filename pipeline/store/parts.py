"""The writer of the kinds of result other than the dense matrix (``output=diagonal``, ``rows``,
``eigen``, ``factored``; see ``pipeline.store.schema``).

Their blocks are groups of samples, and what a block stores is small next to a dense Hessian
(D or k x D numbers per output instead of D x D), so every block is committed as its own shard
file (``PartSink``: the rename commits it) and the final file is assembled from the shards when
every block is in. Everything else is the dense writer's (``ResultWriter``): the lock, the
manifest and fingerprint, resume after a kill, the checks before anything exists, the atomic
rename of the finished file, a fault that never corrupts finished work.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .durable import commit
from .layout import Metadata, label_common, write_common
from .names import temporary_name
from .plan import Block, Plan
from .schema import DERIVED, DESCRIPTION, FIELDS, Field, block_fields, numbers
from .writer import ResultWriter, _remove_tree


@dataclass(frozen=True)
class PartSink:
    """Writes the arrays of a block (samples [s0, s1)) as one shard file in ``directory``."""

    directory: str
    fields: tuple[Field, ...]
    fsync: bool = True

    def write(self, b: Block, arrays: dict[str, np.ndarray], g=None, stats=None) -> int:
        """Commit block ``b``. Idempotent: a block written twice leaves one identical shard."""
        del g, stats  # (the dense sink's arguments; the gradient is one of ``arrays``)
        final = Path(self.directory) / f"block-{b.index:06d}.h5"
        tmp = temporary_name(final)
        try:
            with h5py.File(tmp, "w") as f:
                for field in self.fields:
                    f.create_dataset(field.name, data=np.asarray(arrays[field.name]))
                f.attrs.update(s0=b.s0, s1=b.s1)
            commit(tmp, final, self.fsync)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return b.index


def shard_holds(path: Path, b: Block, fields: tuple[Field, ...]) -> bool:
    """Whether ``path`` is a complete shard of block ``b``."""
    try:
        with h5py.File(path, "r") as s:
            n = b.s1 - b.s0
            return all(s[f.name].shape[0] == n for f in fields)
    except (OSError, KeyError):
        return False


class PartsWriter(ResultWriter):
    """``ResultWriter`` for the kinds other than ``dense``: shards per block, assembled at the end.

    Args:
        kind: ``diagonal``, ``rows``, ``eigen`` or ``factored``.
        sizes: the sizes the run knows before computing (``sample``, ``output``, ``column``,
            ``row``, ``eigenpair``); the others (``feature``) are read from the shards.
        description: datasets of the run's description (``/rows``).
        mass_weighted: the blocks hold the frequencies of mass-weighted eigenvalues too.
        (the rest as ``ResultWriter``)
    """

    def __init__(self, path: Path, plan: Plan, meta: Metadata, storage, kind: str,
                 sizes: dict[str, int], description: dict[str, np.ndarray] | None = None,
                 remote_workers: bool = False, defer_copies: bool = False,
                 mass_weighted: bool = False):  # fmt: skip
        super().__init__(path, plan, meta, storage, remote_workers, defer_copies)
        self.kind, self.sizes = kind, dict(sizes)
        self.description = description or {}
        self.fields = block_fields(kind, mass_weighted)
        self.in_place, self.layout = False, "copy"

    def _check_free_space(self, keep: bool) -> None:
        per_copy = numbers(self.kind, self.sizes) * self.dtype.itemsize
        self._need(2 * per_copy, "block shards and the final file")

    def _open_shards(self) -> None:
        self._drop_direct()
        self.sink = PartSink(str(self.names.shards.resolve()), self.fields, self.fsync)
        self._final = _Pending()
        self._set_missing(self._done())

    def _done(self) -> set[int]:
        return {
            i
            for i, p in self.names.shard_files().items()
            if i in self._blocks and shard_holds(p, self._blocks[i], self.fields)
        }

    def finish(self) -> None:
        """Check every planned block is committed, assemble the file from the shards and rename
        it to ``path``; remove the shards."""
        if self.already_complete:
            self._finished = True
            return
        self._bg.wait()
        missing = [b.index for b in self.plan.blocks if b.index not in self._done()]
        if missing:
            raise RuntimeError(
                f"{len(missing)} of {len(self.plan.blocks)} planned blocks were not committed "
                f"(first: block {missing[0]}); the result is not marked complete, and "
                "storage.mode=resume computes the missing blocks"
            )
        tmp = temporary_name(self.path)
        try:
            with h5py.File(tmp, "w") as f:
                self._assemble(f)
            commit(tmp, self.path, self.fsync)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._finished = True
        if not self.keep_shards:
            _remove_tree(self.names.shards)

    def _assemble(self, f: h5py.File) -> None:
        sizes = dict(self.sizes)
        first = self.names.shard(self.plan.blocks[0].index)
        with h5py.File(first, "r") as s:
            for field in self.fields:  # sizes only the computation knew (C of ``factored``)
                for dim, n in zip(field.dims[1:], s[field.name].shape[1:], strict=True):
                    sizes.setdefault(dim, n)
        for field in (*self.fields, *DERIVED.get(self.kind, ())):
            f.create_dataset(field.name, field.shape(sizes), field.dtype or self.dtype, **self.comp)
        nonfinite = 0
        for b in self.plan.blocks:  # each shard read once: copied, counted, its trace taken
            with h5py.File(self.names.shard(b.index), "r") as s:
                for field in self.fields:
                    values = s[field.name][()]
                    f[field.name][b.s0 : b.s1] = values
                    if field in FIELDS[self.kind]:  # (not what is derived from them)
                        nonfinite += int((~np.isfinite(values)).sum())
                    if field.name == "diagonal":  # the trace, in float64
                        f["trace"][b.s0 : b.s1] = values.sum(-1, dtype=np.float64)
        for field in DESCRIPTION.get(self.kind, ()):
            f.create_dataset(field.name, data=np.asarray(self.description[field.name], field.dtype))
        write_common(f, self.meta, self.comp)
        for field in (*self.fields, *DERIVED.get(self.kind, ()), *DESCRIPTION.get(self.kind, ())):
            for i, dim in enumerate(field.dims):
                f[field.name].dims[i].label = dim
        label_common(f, (*self.fields, *DERIVED.get(self.kind, ())))
        f.attrs["layout"] = "copy"
        f.attrs["output"] = self.kind
        f.attrs["status"] = "complete"
        f.attrs["layout_id"] = uuid.uuid4().hex
        f.attrs.create("nonfinite_entries", nonfinite, dtype="i8")


class _Pending:
    """Stands in for the dense writer's assembled file: shards are copied at ``finish``."""

    def add(self, b: Block) -> None:
        del b

    def discard(self) -> None:
        pass
