"""The result writer: one object owns a result on disk, from opening it to finishing it.

``check_destination`` refuses what the storage mode forbids before anything exists on disk
(``pipeline.validate`` checks the rest); ``ResultWriter`` then opens the result for a plan: it
creates the parent
directories, takes the run lock, applies the create/resume/overwrite rules (comparing
fingerprints), checks the free space, deletes stale partial files, chooses the write strategy and
lays out the file. The blocks in ``writer.missing`` are computed anywhere and written by
``writer.sink`` (see ``pipeline.store.blocks``); ``writer.commit(index)`` commits each on the
driver; ``writer.finish()`` checks that every planned block was committed, stores the statistics,
marks the file complete and gives it its name.

NOTE: [atomic commits] ``storage.path`` either does not exist or holds a finished result: the
final file is written under another name and renamed into place only when complete. A crash
loses at most the blocks not yet committed (see NOTE: [commit guarantee] in ``durable``), and
resume computes only the missing ones. Leaving the writer without ``finish`` (an error, Ctrl-C)
keeps the committed blocks for ``storage.mode=resume``; a run that committed no block leaves
nothing behind: its shard directory, partial files, lock and the directories it created go.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import threading
from pathlib import Path

import h5py
import numpy as np

from ..config.schema import StorageConf
from ..errors import PipelineError
from .blocks import InPlaceSink, ShardSink, read_shard, shard_is_readable
from .durable import Background, commit, fsync_path, preallocate, write_atomic
from .layout import (
    BLOCK_SUMS,
    SUMMARY_DATASETS,
    FileMap,
    Metadata,
    add_virtual_hessian,
    compression_options,
    create_datasets,
    inputs_dtype,
    set_nonfinite,
)
from .names import ResultNames, temporary_name
from .plan import Block, Plan
from .statistics import reduce_sums

log = logging.getLogger(__name__)


def check_destination(path: Path, storage: StorageConf) -> None:
    """Refuse what ``storage.mode`` forbids at ``path``, before anything is created (the path's
    directory and the compression are checked by ``pipeline.validate``).

    Raises:
        PipelineError: the path exists (``create``), or an interrupted run's blocks are there
            (``create``).
    """
    if storage.mode != "create":
        return
    if path.exists():
        raise PipelineError(
            f"{path} exists; use storage.mode=overwrite to replace it or choose another "
            "storage.path",
            "storage.mode",
        )
    if ResultNames(path).manifest.is_file():
        raise _interrupted(ResultNames(path))


def _interrupted(names: ResultNames) -> PipelineError:
    return PipelineError(
        f"{names.shards} holds blocks of an interrupted run: use storage.mode=resume to finish it "
        "or storage.mode=overwrite to start afresh",
        "storage.mode",
    )


class RunLock:
    """An exclusive lock on ``<storage.path>.lock`` for the duration of a run.

    ``flock`` locks vanish with the process that holds them, so a killed run never leaves a stale
    lock; a second run on the same path refuses at once.
    """

    def __init__(self, path: Path):
        self.path = ResultNames(path).lock
        self.target = path
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            os.close(self.fd)
            self.fd = None
            raise PipelineError(
                f"another run is writing {self.target} right now; wait for it or choose another "
                "storage.path",
                "storage.path",
            ) from err
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class ResultWriter:
    """One result on disk, from open to finish. Use as a context manager.

    Args:
        path: ``storage.path``.
        plan: the blocks.
        meta: inputs, outputs, indices and attributes (``attrs["fingerprint"]`` identifies the
            job: a resume must match it).
        storage: the ``storage`` config (mode, layout, compression, fsync, keep_shards).
        remote_workers: blocks may be written from other machines: they flush their own writes.
        defer_copies: with shards, copy them into the final file at the end, not as they come.

    Attributes:
        missing: the blocks left to compute.
        reused: how many planned blocks were committed before this run.
        sink: writes a computed block (picklable: Dask ships it to workers).
        in_place: whether blocks are written in place (else as shards).
    """

    def __init__(
        self,
        path: Path,
        plan: Plan,
        meta: Metadata,
        storage: StorageConf,
        remote_workers: bool = False,
        defer_copies: bool = False,
    ):
        self.path, self.plan, self.meta = path, plan, meta
        self.names = ResultNames(path)
        self.mode = str(storage.mode)
        self.layout = str(storage.layout)
        self.comp = compression_options(storage.compression)
        self.fsync = storage.fsync
        self.keep_shards = storage.keep_shards
        self.in_place = self.layout == "copy" and not self.comp
        self.dtype = inputs_dtype(meta.inputs)
        self.fingerprint = str(meta.attrs["fingerprint"])
        self.remote_workers, self.defer_copies = remote_workers, defer_copies
        self.missing: list[Block] = []
        self.reused = 0
        self.already_complete = False
        self.sink: InPlaceSink | ShardSink | None = None
        self._created: list[Path] = []  # directories this run created, parents first
        self._fresh = False  # the shard directory was (re)made by this run
        self._committed_now = 0
        self._finished = False
        self._lock = RunLock(path)
        self._bg = Background()
        self._pending: list[int] = []
        self._group_scheduled = False
        self._pending_lock = threading.Lock()
        self._flush_fd: int | None = None
        self._final: _AssembledFile | None = None
        self._blocks = {b.index: b for b in plan.blocks}

    # ---- opening -----------------------------------------------------------------------------

    def __enter__(self) -> ResultWriter:
        try:
            self._open()
        except BaseException as err:
            self._abort(err)
            raise self._translate(err) from err
        return self

    def _open(self) -> None:
        self._make_parents()
        self._lock.__enter__()
        if self.path.exists():
            if self.mode == "create":
                check_destination(self.path, {"mode": "create"})
            if self.mode == "resume":
                self._check_finished()
                return
        manifest = self._manifest()
        if manifest is not None and self.mode == "create":
            raise _interrupted(self.names)
        if manifest is not None and self.mode == "resume" and manifest != self.fingerprint:
            raise PipelineError(
                f"cannot resume: the blocks in {self.names.shards} were computed with a "
                "different config or model; use storage.mode=overwrite to start afresh",
                "storage.mode",
            )
        keep = self.mode == "resume" and manifest is not None
        self._check_free_space(keep)
        self._start_shards(keep)
        if self.in_place:
            self._open_in_place()
        else:
            self._open_shards()

    def _make_parents(self) -> None:
        missing = []
        d = self.path.parent
        while not d.exists():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except OSError as err:
                raise PipelineError(f"cannot write to {self.path.parent}: {err.strerror}",
                                    "storage.path") from err  # fmt: skip
            self._created.append(d)

    def _manifest(self) -> str | None:
        try:
            return json.loads(self.names.manifest.read_text())["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _check_finished(self) -> None:
        """``resume`` on an existing file: fine if it is this job's complete result."""
        try:
            with h5py.File(self.path, "r") as f:
                status = f.attrs.get("status")
                status = status.decode() if isinstance(status, bytes) else status
                same = f.attrs.get("fingerprint") == self.fingerprint and status == "complete"
        except OSError:
            same = False
        if not same:
            raise PipelineError(
                f"{self.path} exists and is not the result of this config; use "
                "storage.mode=overwrite or choose another storage.path",
                "storage.mode",
            )
        self.already_complete = True
        self.reused = len(self.plan.blocks)
        _remove_tree(self.names.shards)
        log.info("%s is already complete; nothing to resume", self.path)

    def _check_free_space(self, keep: bool) -> None:
        """Refuse before computing when the result cannot fit on the disk."""
        p = self.plan
        total = p.n_samples * p.n_outputs * p.dim * (p.dim + 3) * self.dtype.itemsize
        n = len(p.blocks)
        if self.in_place:
            done = len(self.names.markers()) + len(self.names.shard_files()) if keep else 0
            needed = int(total * (1 - min(done, n) / n))
            what = "the final file"
        else:
            done = len(self.names.shard_files()) if keep else 0
            needed = int(total * (1 - min(done, n) / n)) + (
                0 if self.layout == "virtual" else total
            )
            what = "block shards and the final file"
        self._need(needed, what)

    def _need(self, needed: int, what: str) -> None:
        """Refuse, before computing, ``needed`` bytes that the disk under ``path`` has not."""
        free = shutil.disk_usage(self.path.parent).free
        if needed > free:
            raise PipelineError(
                f"the result needs about {_gb(needed)} under {self.path.parent} ({what}) but only "
                f"{_gb(free)} is free",
                "storage.path",
            )

    def _start_shards(self, keep: bool) -> None:
        """Make the shard directory and its manifest, or keep an interrupted run's."""
        if not keep:
            _remove_tree(self.names.shards)
            self.names.shards.mkdir()
            self._fresh = True
            tmp = temporary_name(self.names.manifest)
            body = json.dumps({"fingerprint": self.fingerprint, "n_blocks": len(self.plan.blocks)})
            write_atomic(self.names.manifest, body.encode(), tmp, self.fsync)
        for stale in [*self.names.work_partials(), *self.names.final_partials()]:
            stale.unlink(missing_ok=True)  # a killed run's (we hold the lock: nobody writes them)

    def _open_in_place(self) -> None:
        direct = self.names.direct
        if not self._reusable(direct):
            self._drop_direct()
            tmp = temporary_name(direct)
            try:
                with h5py.File(tmp, "w") as f:
                    create_datasets(f, self.plan, self.dtype, self.meta, in_place=True)
                preallocate(tmp)  # the blocks' bytes are written into allocated extents
                commit(tmp, direct, self.fsync)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        st = os.stat(direct)
        with h5py.File(direct, "r") as f:
            layout_id = str(f.attrs["layout_id"])
        self.sink = InPlaceSink(str(direct), (st.st_dev, st.st_ino), layout_id, self.plan,
                                self.dtype.str, self.remote_workers)  # fmt: skip
        self._flush_fd = os.open(direct, os.O_RDONLY)
        done = set(self._marked())
        shards = {i: p for i, p in self.names.shard_files().items() if i not in done}
        imported = []
        for i, p in sorted(shards.items()):  # blocks of an earlier run that wrote shards
            b = self._blocks.get(i)
            if b is not None and shard_is_readable(p, self.plan, b):
                h, g, stats = read_shard(p)
                imported.append(self.sink.write(b, h, g, stats))
                done.add(i)
        if imported:
            self._commit_now(imported)
        for p in shards.values():
            p.unlink()
        self._set_missing(done)

    def _reusable(self, direct: Path) -> bool:
        try:
            with h5py.File(direct, "r") as f:
                return f.attrs.get("fingerprint") == self.fingerprint
        except OSError:
            return False

    def _drop_direct(self) -> None:
        self.names.direct.unlink(missing_ok=True)
        for p in self.names.markers().values():
            p.unlink()

    def _open_shards(self) -> None:
        self._drop_direct()  # an in-place run's file: its blocks are recomputed
        self.sink = ShardSink(str(self.names.shards.resolve()), self.fsync)
        done = {
            i
            for i, p in self.names.shard_files().items()
            if i in self._blocks and shard_is_readable(p, self.plan, self._blocks[i])
        }
        self._final = _AssembledFile(self, done)
        self._set_missing(done)

    def _set_missing(self, done: set[int]) -> None:
        self.missing = [b for b in self.plan.blocks if b.index not in done]
        self.reused = len(self.plan.blocks) - len(self.missing)

    # ---- committing --------------------------------------------------------------------------

    def commit(self, index: int) -> None:
        """Commit a block written by the sink (from any thread of the driver).

        Blocks written in place are committed in groups (see NOTE: [commit guarantee] in
        ``durable``): the background thread flushes the file once for every block that arrived
        while it was flushing the previous group, then creates their markers.
        """
        if not self.in_place:
            self._committed_now += 1
            assert self._final is not None
            if not self.defer_copies:
                self._final.add(self._blocks[index])
            return
        if not self.fsync:
            self._commit_now([index])
            return
        self._bg.raise_errors()
        with self._pending_lock:
            self._pending.append(index)
            if self._group_scheduled:
                return
            self._group_scheduled = True
        self._bg.submit(self._group_commit)

    def _group_commit(self) -> None:
        """On the background thread: commit what is pending, until nothing is."""
        while True:
            with self._pending_lock:
                group, self._pending = self._pending, []
                if not group:
                    self._group_scheduled = False
                    return
            try:
                self._commit_now(group)
            except BaseException:
                with self._pending_lock:
                    self._pending = group + self._pending  # still uncommitted
                    self._group_scheduled = False
                raise

    def _commit_now(self, indices: list[int]) -> None:
        """Flush the file once (every block written so far), then create the blocks' markers."""
        if self.fsync and self._flush_fd is not None:
            os.fsync(self._flush_fd)
        for i in indices:
            self.names.marker(i).touch()
        if self.fsync:
            fsync_path(self.names.shards)
        self._committed_now += len(indices)

    def _flush_pending(self) -> None:
        with self._pending_lock:
            batch, self._pending = self._pending, []
        if batch:
            self._commit_now(batch)

    def _marked(self) -> set[int]:
        """Planned blocks written in place and committed."""
        return {i for i in self.names.markers() if i in self._blocks}

    # ---- finishing ---------------------------------------------------------------------------

    def finish(self) -> dict[str, np.ndarray] | None:
        """Check every planned block is committed, store the statistics, mark the file complete
        and rename it to ``path``; remove the shards (unless kept). Returns the (N, K)
        statistics (None when the result was complete before this run)."""
        if self.already_complete:
            self._finished = True
            return None
        self._bg.wait()
        self._flush_pending()
        sums = self._all_sums()
        stats = reduce_sums(self.plan, sums)
        nonfinite = int(stats["nonfinite"].sum())
        if self.in_place:
            self._finish_in_place(stats, nonfinite)
        else:
            assert self._final is not None
            self._final.finish(stats, nonfinite)
        self._finished = True
        if self.layout != "virtual" and not self.keep_shards:
            _remove_tree(self.names.shards)
        if nonfinite:
            self._say_nonfinite(stats["nonfinite"])
        return stats

    def _all_sums(self) -> np.ndarray:
        """(N, K, 4) partial sums added over the row blocks; refuses to go on when a planned
        block was not committed."""
        if self.in_place:
            done = self._marked()
        else:
            done = {
                i
                for i, p in self.names.shard_files().items()
                if i in self._blocks and shard_is_readable(p, self.plan, self._blocks[i])
            }
        missing = [b.index for b in self.plan.blocks if b.index not in done]
        if missing:
            raise RuntimeError(
                f"{len(missing)} of {len(self.plan.blocks)} planned blocks were not committed "
                f"(first: block {missing[0]}); the result is not marked complete, and "
                "storage.mode=resume computes the missing blocks"
            )
        if self.in_place:
            with h5py.File(self.names.direct, "r") as f:
                return f[BLOCK_SUMS][()].sum(0)
        assert self._final is not None
        return self._final.block_sums()

    def _finish_in_place(self, stats: dict[str, np.ndarray], nonfinite: int) -> None:
        direct = self.names.direct
        assert isinstance(self.sink, InPlaceSink)
        fmap = FileMap.of(direct, self.sink.layout_id)
        fd = os.open(direct, os.O_WRONLY)
        try:
            for name, kind in SUMMARY_DATASETS.items():
                data = np.ascontiguousarray(stats[name], kind)
                os.pwrite(fd, memoryview(data).cast("B"), fmap.contiguous[name])
        finally:
            os.close(fd)
        if nonfinite:
            with h5py.File(direct, "r+") as f:
                set_nonfinite(f, nonfinite)
        self._close_flush_fd()
        commit(direct, self.path, self.fsync)

    def _say_nonfinite(self, counts: np.ndarray) -> None:
        n, k = np.argwhere(counts > 0)[0]
        si = int(self.meta.sample_index[n])
        log.warning(
            "the Hessians hold %d non-finite entries (NaN or inf) in %d (sample, output) pairs, "
            "first sample %d (source index %d), k=%d; %s is flagged "
            "(attrs['nonfinite_entries'], /nonfinite)",
            int(counts.sum()), int((counts > 0).sum()), n, si, k, self.path,
        )  # fmt: skip

    # ---- leaving -----------------------------------------------------------------------------

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._finished:
            self._release()
            return
        self._abort(exc)
        if exc is None:
            raise RuntimeError("the result writer was left without finish()")
        translated = self._translate(exc)
        if translated is not exc:
            raise translated from exc

    def _abort(self, err: BaseException | None) -> None:
        """Keep what is committed; if nothing is, remove everything this run created."""
        self._bg.drain()
        if self.in_place and self._flush_fd is not None:
            try:
                self._flush_pending()  # blocks already written: commit them, keep more
            except OSError:
                pass
        if self._final is not None:
            self._final.discard()
        self._close_flush_fd()
        if self._fresh and self._committed_now == 0:
            _remove_tree(self.names.shards)
        self._release()
        for d in reversed(self._created):
            try:
                d.rmdir()  # only if empty: files someone else put there stay
            except OSError:
                break
        del err

    def _release(self) -> None:
        self._close_flush_fd()
        self._lock.__exit__(None, None, None)
        self._bg.close()

    def _close_flush_fd(self) -> None:
        if self._flush_fd is not None:
            os.close(self._flush_fd)
            self._flush_fd = None

    def committed_count(self) -> int:
        """Blocks committed so far (earlier runs' included)."""
        return self.reused + self._committed_now

    def _translate(self, err: BaseException) -> BaseException:
        """A full disk becomes a one-line error that says the committed blocks are kept."""
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return PipelineError(
                f"disk full under {self.path.parent} after {self.committed_count()} of "
                f"{len(self.plan.blocks)} blocks: committed blocks are kept; free space and rerun "
                "with storage.mode=resume",
                "storage.path",
            )
        return err


def _remove_tree(directory: Path) -> None:
    """Delete a shard directory, its manifest last (a half-removed one is never resumed)."""
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        if p.name != "manifest.json":
            p.unlink(missing_ok=True)
    shutil.rmtree(directory, ignore_errors=True)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


class _AssembledFile:
    """The final file of the shard strategy: written under a temporary name beside ``path`` as
    shards arrive (or at the end), renamed when complete. With the virtual layout ``/hessian``
    maps the shard files, which are kept."""

    def __init__(self, writer: ResultWriter, done: set[int]):
        self.w = writer
        self.tmp = temporary_name(writer.path)
        self.file: h5py.File | None = h5py.File(self.tmp, "w")
        create_datasets(self.file, writer.plan, writer.dtype, writer.meta, writer.layout,
                        writer.comp)  # fmt: skip
        self.copied: set[int] = set()
        del done

    def add(self, b: Block) -> None:
        """Copy a committed shard's values into the file (only the small ones for virtual)."""
        assert self.file is not None
        f = self.file
        h, g, stats = read_shard(self.w.names.shard(b.index), hessian=self.w.layout != "virtual")
        if h is not None:
            f["hessian"][b.s0 : b.s1, :, b.r0 : b.r1, :] = h
        if g is not None:
            f["gradient"][b.s0 : b.s1] = g
        f["diagonal"][b.s0 : b.s1, :, b.r0 : b.r1] = stats.diagonal
        f["row_norm"][b.s0 : b.s1, :, b.r0 : b.r1] = stats.row_norm
        f[BLOCK_SUMS][b.r0 // self.w.plan.block_rows, b.s0 : b.s1] = stats.sums
        self.copied.add(b.index)

    def block_sums(self) -> np.ndarray:
        """(N, K, 4) sums over the row blocks, once every block is copied in."""
        assert self.file is not None
        for b in self.w.plan.blocks:
            if b.index not in self.copied:
                self.add(b)
        return self.file[BLOCK_SUMS][()].sum(0)

    def finish(self, stats: dict[str, np.ndarray], nonfinite: int) -> None:
        assert self.file is not None
        f = self.file
        if self.w.layout == "virtual":
            sources = [
                os.path.relpath(self.w.names.shard(b.index), self.w.path.parent)
                for b in self.w.plan.blocks
            ]
            add_virtual_hessian(f, self.w.plan, self.w.dtype, sources)
        for name in SUMMARY_DATASETS:
            f[name][()] = stats[name]
        set_nonfinite(f, nonfinite)
        f.close()
        self.file = None
        commit(self.tmp, self.w.path, self.w.fsync)

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        self.tmp.unlink(missing_ok=True)
