"""The writer of the kinds of result other than the dense matrix (``output=diagonal``, ``rows``,
``eigen``, ``factored``; see ``pipeline.store.schema``).

Their blocks are groups of samples, and what a block stores is small next to a dense Hessian
(D or k x D numbers per output instead of D x D), so every block is committed as its own shard
file (``PartSink``: the rename commits it) and copied into the final file, under a temporary
name, as it comes (``_AssembledParts``; the inputs are written there on the background thread
while the first blocks compute): at the end only what is left (blocks of an earlier run) is
copied before the rename. Everything else is the dense writer's (``ResultWriter``): the lock, the
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
        self._final = _AssembledParts(self)
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
        assert isinstance(self._final, _AssembledParts)
        self._final.finish()
        self._finished = True
        if not self.keep_shards:
            _remove_tree(self.names.shards)


class _AssembledParts:
    """The final file of a parts result, under a temporary name beside ``path``: its datasets
    are created when the run opens, ``/inputs`` and the other common datasets written on the
    writer's background thread, each committed shard copied in as it comes (``add``); ``finish``
    copies the blocks not copied yet (an earlier run's), labels the file and renames it."""

    def __init__(self, writer: PartsWriter):
        self.w = writer
        self.tmp = temporary_name(writer.path)
        self.file: h5py.File | None = h5py.File(self.tmp, "w")
        self.copied: set[int] = set()
        self.nonfinite = 0
        self._sizes: dict[str, int] | None = None
        writer._bg.submit(write_common, self.file, writer.meta, writer.comp)

    def _create(self, shard: h5py.File) -> None:
        """The datasets, once a shard tells the sizes only the computation knew (C of
        ``factored``)."""
        assert self.file is not None
        w, sizes = self.w, dict(self.w.sizes)
        for field in w.fields:
            for dim, n in zip(field.dims[1:], shard[field.name].shape[1:], strict=True):
                sizes.setdefault(dim, n)
        for field in (*w.fields, *DERIVED.get(w.kind, ())):
            dtype = field.dtype or w.dtype
            self.file.create_dataset(field.name, field.shape(sizes), dtype, **w.comp)
        self._sizes = sizes

    def add(self, b: Block) -> None:
        """Copy block ``b``'s committed shard into the file, count its non-finite values and
        take its trace (in float64)."""
        assert self.file is not None
        f, w = self.file, self.w
        with h5py.File(w.names.shard(b.index), "r") as s:
            if self._sizes is None:
                self._create(s)
            for field in w.fields:
                values = s[field.name][()]
                f[field.name][b.s0 : b.s1] = values
                if field in FIELDS[w.kind]:  # (not what is derived from them)
                    self.nonfinite += int((~np.isfinite(values)).sum())
                if field.name == "diagonal":
                    f["trace"][b.s0 : b.s1] = values.sum(-1, dtype=np.float64)
        self.copied.add(b.index)

    def finish(self) -> None:
        assert self.file is not None
        w, f = self.w, self.file
        for b in w.plan.blocks:
            if b.index not in self.copied:
                self.add(b)
        for field in DESCRIPTION.get(w.kind, ()):
            f.create_dataset(field.name, data=np.asarray(w.description[field.name], field.dtype))
        for field in (*w.fields, *DERIVED.get(w.kind, ()), *DESCRIPTION.get(w.kind, ())):
            for i, dim in enumerate(field.dims):
                f[field.name].dims[i].label = dim
        label_common(f, (*w.fields, *DERIVED.get(w.kind, ())))
        f.attrs["layout"] = "copy"
        f.attrs["output"] = w.kind
        f.attrs["status"] = "complete"
        f.attrs["layout_id"] = uuid.uuid4().hex
        f.attrs.create("nonfinite_entries", self.nonfinite, dtype="i8")
        f.close()
        self.file = None
        commit(self.tmp, w.path, w.fsync)

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        self.tmp.unlink(missing_ok=True)
