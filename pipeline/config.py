"""Config schemas (typos and bad values fail when the config is composed) and their registration.

One dataclass per config group; ``conf/<group>/*.yaml`` fill them in. ``conf/config.yaml`` picks
the defaults. A schema field that a group option does not use stays at its default.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


class _StrEnum(str, Enum):
    """An enum whose str() is its value, so ``${dtype}`` in a path reads ``float64``."""

    def __str__(self) -> str:
        return str(self.value)


class DType(_StrEnum):
    float32 = "float32"
    float64 = "float64"


class Mode(_StrEnum):
    create = "create"  # refuse if storage.path exists
    resume = "resume"  # keep committed blocks of an interrupted run with the same config
    overwrite = "overwrite"  # start afresh, replace storage.path at the end


class Layout(_StrEnum):
    copy = "copy"  # one self-contained file
    virtual = "virtual"  # an HDF5 virtual dataset over the kept shard files


@dataclass
class ModelConf:
    name: str = "custom"
    net: Any = None  # Hydra instantiate node: _target_ and the factory's arguments
    checkpoint: str | None = None  # a state_dict file loaded into the net
    path: str | None = None  # a torch.export program (model=exported)


@dataclass
class DataConf:
    name: str = "digits"
    start: int = 0
    stop: int | None = None
    indices: list[int] | None = None  # explicit source indices; overrides start/stop
    path: str | None = None  # npy/npz/hdf5 file
    key: str | None = None  # array name inside an .npz
    labels_path: str | None = None
    labels_key: str | None = None
    dataset: str | None = None  # hdf5: inputs dataset
    labels_dataset: str | None = None  # hdf5: labels dataset
    shape: list[int] | None = None  # synthetic: input shape S
    n_samples: int = 16  # synthetic
    n_classes: int | None = None  # synthetic: draw random labels
    seed: int = 0


@dataclass
class TargetConf:
    name: str = "indices"  # indices | all | predicted | loss
    indices: list[int] = field(default_factory=lambda: [2])
    loss: str = "cross_entropy"  # cross_entropy | mse (target=loss)


@dataclass
class MethodConf:
    name: str = "auto"
    memory_budget_mb: int = 1024  # working memory of one vectorized call
    tf32: bool = False  # opt-in reduced-precision matmuls on GPU


@dataclass
class BackendConf:
    name: str = "local"  # local | dask | dask_cuda | address
    device: str = "cpu"  # local: cpu | cuda | cuda:N
    n_workers: int = 2  # dask: worker processes
    threads_per_worker: int = 1  # dask: torch threads in each worker
    address: str | None = None  # address: tcp://host:8786
    scheduler_file: str | None = None  # address: a scheduler file instead of an address
    max_in_flight: int | None = None  # blocks submitted at once (default 2 x workers)
    retries: int = 2  # dask: resubmissions of a block whose worker died
    connect_timeout_s: int = 20  # address: give up connecting after this


@dataclass
class StorageConf:
    path: str | None = None  # default: hessians.h5 in the Hydra run directory
    mode: Mode = Mode.create
    block_rows: int | None = None  # rows per block; default from block_mb
    block_mb: int = 64  # size of one block of Hessian rows, when block_rows is not set
    compression: str | None = None  # none | lzf | gzip
    layout: Layout = Layout.copy
    keep_shards: bool = False
    fsync: bool = True  # flush each committed block to disk (survives a machine crash)


class Spectrum(_StrEnum):
    auto = "auto"  # every eigenvalue for D <= 2048, else Lanczos within report.budget_s
    full = "full"  # Lanczos to convergence, and extreme eigenvalues of every sample in the CSV
    off = "off"


@dataclass
class ReportConf:
    sample: int = 0  # position of the sample the figures show
    output: int = 0  # position k of the output they show
    spectrum: Spectrum = Spectrum.auto
    budget_s: float = 10.0  # seconds the spectrum of a large matrix may take (auto)


@dataclass
class Config:
    model: ModelConf = field(default_factory=ModelConf)
    data: DataConf = field(default_factory=DataConf)
    target: TargetConf = field(default_factory=TargetConf)
    method: MethodConf = field(default_factory=MethodConf)
    backend: BackendConf = field(default_factory=BackendConf)
    storage: StorageConf = field(default_factory=StorageConf)
    dtype: DType = DType.float32
    seed: int = 0
    progress: bool = True  # a progress bar on stderr
    plots: bool = True  # PNG plots and CSV statistics in the run directory
    report: ReportConf = field(default_factory=ReportConf)  # what the plots show


def register() -> None:
    """Put the schema into Hydra's ConfigStore (``conf/config.yaml`` lists it first)."""
    ConfigStore.instance().store(name="schema", node=Config)


def to_plain(cfg: DictConfig | dict) -> dict[str, Any]:
    """A resolved, plain-``dict`` copy (safe to pickle to workers that lack Hydra's state)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]
    return json.loads(json.dumps(cfg, default=str))


# Keys that change how a run executes, not the numbers it produces.
_EXECUTION_KEYS = {"backend", "progress", "plots", "report"}
_STORAGE_EXECUTION_KEYS = {"mode", "keep_shards", "layout", "compression", "path", "fsync"}


def fingerprint(cfg: dict[str, Any], *extra: str) -> str:
    """SHA-256 of everything that determines the result: the config minus execution settings."""
    numeric = {k: v for k, v in cfg.items() if k not in _EXECUTION_KEYS}
    numeric["storage"] = {
        k: v for k, v in cfg.get("storage", {}).items() if k not in _STORAGE_EXECUTION_KEYS
    }
    blob = json.dumps(numeric, sort_keys=True, default=str) + "".join(extra)
    return hashlib.sha256(blob.encode()).hexdigest()
