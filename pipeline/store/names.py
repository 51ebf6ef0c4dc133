"""Every name the result writer puts on disk, in one place.

For a result at ``PATH`` (``storage.path``):

- ``PATH``: the finished result. It exists only when complete: it gets this name by a rename, last.
- ``PATH.lock``: the run lock (``flock``), held while a run writes the result.
- ``PATH.shards/``: the work in progress, kept after a failed or killed run for
  ``storage.mode=resume``:
  - ``manifest.json``: the fingerprint of the run that owns the blocks;
  - ``direct.h5``: the final file, laid out whole and written in place (no compression, copy
    layout); renamed to ``PATH`` when complete;
  - ``block-NNNNNN.done``: the commit marker of block N of ``direct.h5`` (an empty file);
  - ``block-NNNNNN.h5``: the shard file of block N (virtual layout or compression);
  - ``.<name>.<pid>.<id>.partial``: a file being written, or the marker by which Dask workers
    show that they see the directory (``.probe.<pid>.<id>.partial``); deleted by the next run.
- ``.<PATH name>.<pid>.<id>.partial`` beside ``PATH``: the final file assembled from shards, before
  its rename (deleted by the next run on ``PATH`` if a run was killed).
"""

from __future__ import annotations

import glob
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

DIRECT = "direct.h5"
MANIFEST = "manifest.json"
MARKER = "block-{:06d}.done"
SHARD = "block-{:06d}.h5"
_BLOCK = re.compile(r"block-(\d{6})\.(done|h5)$")


def temporary_name(path: Path) -> Path:
    """A hidden sibling name for writing ``path`` before an atomic rename."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")


def probe_marker(directory: Path) -> Path:
    """A fresh name for the marker that Dask workers look for in ``directory``."""
    return temporary_name(directory / "probe")


@dataclass(frozen=True)
class ResultNames:
    """The names that belong to the result at ``path``."""

    path: Path

    @property
    def lock(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    @property
    def shards(self) -> Path:
        return self.path.with_name(self.path.name + ".shards")

    @property
    def manifest(self) -> Path:
        return self.shards / MANIFEST

    @property
    def direct(self) -> Path:
        return self.shards / DIRECT

    def marker(self, index: int) -> Path:
        return self.shards / MARKER.format(index)

    def shard(self, index: int) -> Path:
        return self.shards / SHARD.format(index)

    def markers(self) -> dict[int, Path]:
        """Block index -> commit marker of a block written into ``direct.h5``."""
        return self._blocks("done")

    def shard_files(self) -> dict[int, Path]:
        """Block index -> shard file."""
        return self._blocks("h5")

    def _blocks(self, kind: str) -> dict[int, Path]:
        if not self.shards.is_dir():
            return {}
        out = {}
        for p in self.shards.iterdir():
            m = _BLOCK.match(p.name)
            if m and m.group(2) == kind:
                out[int(m.group(1))] = p
        return out

    def work_partials(self) -> list[Path]:
        """Files inside the shard directory that were being written when a run stopped."""
        return sorted(self.shards.glob(".*.partial")) if self.shards.is_dir() else []

    def final_partials(self) -> list[Path]:
        """Final files of killed runs on this path, beside it (not another path's)."""
        return sorted(self.path.parent.glob(f".{glob.escape(self.path.name)}.*.partial"))
