"""Config schemas (typos, keys of another option and bad values fail when the config is composed)
and their registration.

One dataclass per option of each config group (``backend=local`` has no ``n_workers``), and each
default is written here only: ``conf/<group>/<option>.yaml`` names its schema in its defaults
list and sets only its ``name`` and what differs (the digits MLP's ``net``), and
``conf/config.yaml`` picks the options. Ranges (``block_rows >= 1``) are declared on the fields
(``metadata={"min": ...}``) and checked by ``pipeline.config.validate``, which turns the composed
config into a :class:`Config` of these dataclasses: what every later stage reads
(``cfg.storage.mode``, never ``cfg["storage"]["mode"]``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


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


class WriteAt(_StrEnum):
    auto = "auto"  # workers if every worker sees the output directory (a probe), else driver
    workers = "workers"  # each worker writes the blocks it computed
    driver = "driver"  # workers return their blocks; this process writes them


class Loss(_StrEnum):
    cross_entropy = "cross_entropy"
    mse = "mse"


def at_least(n: int, default: Any) -> Any:
    """A field whose value (when not None) must be at least ``n``."""
    return field(default=default, metadata={"min": n})


# ---- model ---------------------------------------------------------------------------------


@dataclass
class ModelConf:
    """Base of the ``model`` options."""

    name: str = "custom"


@dataclass
class NetModel(ModelConf):
    """``mlp``, ``cnn``, ``custom``: a Hydra instantiate node and an optional checkpoint."""

    net: Any = None  # _target_ and the factory's arguments
    checkpoint: str | None = None  # a state_dict file loaded into the net


@dataclass
class ExportedModel(ModelConf):
    """``exported``: a ``torch.export`` program file. Loading one unpickles parts of it, which
    can run code: ``trust`` says the user trusts the file."""

    name: str = "exported"
    path: str = MISSING
    trust: bool = False


# ---- data ----------------------------------------------------------------------------------


@dataclass
class DataConf:
    """Base of the ``data`` options: the slice."""

    name: str = "digits"
    start: int = at_least(0, 0)
    stop: int | None = at_least(0, None)
    indices: list[int] | None = None  # explicit source indices; overrides start/stop


@dataclass
class DigitsData(DataConf):
    name: str = "digits"


@dataclass
class SyntheticData(DataConf):
    name: str = "synthetic"
    shape: list[int] = field(default_factory=lambda: [64])  # input shape S
    n_samples: int = at_least(1, 16)
    n_classes: int | None = at_least(1, 10)  # random labels (null: none)
    seed: int = 0


@dataclass
class NpyData(DataConf):
    name: str = "npy"
    path: str = MISSING  # .npy or .npz
    key: str | None = None  # array name inside an .npz
    labels_path: str | None = None
    labels_key: str | None = None


@dataclass
class Hdf5Data(DataConf):
    name: str = "hdf5"
    path: str = MISSING
    dataset: str = "x"  # inputs dataset
    labels_dataset: str | None = None


@dataclass
class AseData(DataConf):
    """``ase``: the frames of a file ASE reads (extxyz, an ASE trajectory ``.traj``, any format
    of ``ase.io.read``). Inputs are the positions (N, n, 3) in Angstrom; every frame must have
    the atoms of the slice's first frame."""

    name: str = "ase"
    path: str = MISSING
    format: str | None = None  # ase.io.read's format (default: guessed from the file)


# ---- target --------------------------------------------------------------------------------


@dataclass
class TargetConf:
    """Base of the ``target`` options (``all``, ``predicted``: nothing else)."""

    name: str = "indices"


@dataclass
class AllTarget(TargetConf):
    name: str = "all"


@dataclass
class PredictedTarget(TargetConf):
    name: str = "predicted"


@dataclass
class IndicesTarget(TargetConf):
    name: str = "indices"
    indices: list[int] = field(default_factory=lambda: [2])


@dataclass
class LossTarget(TargetConf):
    name: str = "loss"
    loss: Loss = Loss.cross_entropy


# ---- method --------------------------------------------------------------------------------


@dataclass
class MethodConf:
    name: str = "auto"
    # working memory of one vectorized call; null: 1024 on a CPU, a quarter of a GPU's memory
    memory_budget_mb: int | None = at_least(1, None)
    tf32: bool = False  # opt-in reduced-precision matmuls on GPU


# ---- backend -------------------------------------------------------------------------------


@dataclass
class BackendConf:
    """Base of the ``backend`` options."""

    name: str = "local"
    device: str = "cpu"  # local: cpu | cuda | cuda:N


@dataclass
class LocalBackend(BackendConf):
    name: str = "local"


@dataclass
class DaskOptions(BackendConf):
    """What every Dask backend takes."""

    threads_per_worker: int = at_least(1, 1)  # torch threads in each worker
    max_in_flight: int | None = at_least(1, None)  # blocks submitted at once (2 x workers)
    retries: int = at_least(0, 2)  # re-runs of a block whose computation raised
    write_at: WriteAt = WriteAt.auto  # who writes the computed blocks into the result


@dataclass
class DaskBackend(DaskOptions):
    name: str = "dask"
    n_workers: int = at_least(1, 2)  # worker processes of the LocalCluster
    fork_workers: bool = True  # fork the workers from the run where safe, else spawn them


@dataclass
class DaskCudaBackend(DaskOptions):
    name: str = "dask_cuda"
    device: str = "cuda"


@dataclass
class AddressBackend(DaskOptions):
    name: str = "address"
    address: str | None = None  # tcp://host:8786
    scheduler_file: str | None = None  # a scheduler file instead of an address
    connect_timeout_s: int = at_least(1, 20)  # give up connecting after this


# ---- storage -------------------------------------------------------------------------------


@dataclass
class StorageConf:
    path: str | None = None  # default: hessians.h5 in the Hydra run directory
    mode: Mode = Mode.create
    block_rows: int | None = at_least(1, None)  # rows per block; default from block_mb
    block_mb: int = at_least(1, 64)  # size of one block of Hessian rows, when block_rows is unset
    # samples per block of an output other than dense (default: as many as store block_mb)
    block_samples: int | None = at_least(1, None)
    compression: str | None = None  # none | lzf | gzip
    layout: Layout = Layout.copy
    keep_shards: bool = False
    fsync: bool = True  # flush each committed block to disk (survives a machine crash)


# ---- output --------------------------------------------------------------------------------


class Which(_StrEnum):
    LM = "LM"  # largest magnitude
    LA = "LA"  # largest algebraic
    SA = "SA"  # smallest algebraic


@dataclass
class OutputConf:
    """Base of the ``output`` options: what of each Hessian is computed and stored."""

    name: str = "dense"


@dataclass
class DenseOutput(OutputConf):
    """``dense``: every entry, ``/hessian`` (N, K, D, D)."""

    name: str = "dense"


@dataclass
class DiagonalOutput(OutputConf):
    """``diagonal``: ``/diagonal`` (N, K, D) and ``/trace`` (N, K)."""

    name: str = "diagonal"


@dataclass
class RowsOutput(OutputConf):
    """``rows``: ``/hessian`` (N, K, R, D) of the flat indices ``output.rows``, and ``/rows``."""

    name: str = "rows"
    rows: list[int] = MISSING


@dataclass
class EigenOutput(OutputConf):
    """``eigen``: the ``k`` eigenpairs of each Hessian that ``which`` selects."""

    name: str = "eigen"
    k: int = at_least(1, 6)
    which: Which = Which.LM
    tol: float = 1e-8  # Lanczos stops when every ||Hv - lambda v|| <= tol * |lambda_max|
    # eigenpairs of M^-1/2 H M^-1/2 (M: the atoms' masses, data=ase) and /frequencies in cm^-1
    mass_weighted: bool = False


@dataclass
class FactoredOutput(OutputConf):
    """``factored``: ``/jacobian`` (N, C, D) and ``/curvature`` (N, K, C, C), H = J^T A J."""

    name: str = "factored"


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
    output: OutputConf = field(default_factory=OutputConf)
    dtype: DType = DType.float32
    seed: int = 0
    progress: bool = True  # a progress bar on stderr
    plots: bool = True  # PNG plots and CSV statistics in the run directory
    report: ReportConf = field(default_factory=ReportConf)  # what the plots show


# group -> option -> schema. Each conf/<group>/<option>.yaml starts with
# ``defaults: [/schema/<group>/<option>@_here_, _self_]``.
OPTIONS: dict[str, dict[str, type]] = {
    "model": {"mlp": NetModel, "cnn": NetModel, "custom": NetModel, "exported": ExportedModel},
    "data": {"digits": DigitsData, "synthetic": SyntheticData, "npy": NpyData, "hdf5": Hdf5Data,
             "ase": AseData},
    "target": {"indices": IndicesTarget, "all": AllTarget, "predicted": PredictedTarget,
               "loss": LossTarget},
    "method": {name: MethodConf for name in ("auto", "forward_over_reverse",
                                              "reverse_over_reverse", "piecewise", "structured",
                                              "autograd")},
    "backend": {"local": LocalBackend, "dask": DaskBackend, "dask_cuda": DaskCudaBackend,
                "address": AddressBackend},
    "storage": {"default": StorageConf},
    "output": {"dense": DenseOutput, "diagonal": DiagonalOutput, "rows": RowsOutput,
               "eigen": EigenOutput, "factored": FactoredOutput},
}  # fmt: skip


def register() -> None:
    """Put the schemas into Hydra's ConfigStore (``conf/config.yaml`` lists ``schema`` first)."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    for group, options in OPTIONS.items():
        for option, schema in options.items():
            cs.store(group=f"schema/{group}", name=option, node=schema)


def config_dir() -> Path:
    """The ``conf/`` directory: inside the installed package (``pipeline/conf``, shipped there at
    build time), else the repository's ``conf/`` beside the package (a source checkout)."""
    here = Path(__file__).resolve().parents[1]  # the package directory
    shipped = here / "conf"
    return shipped if (shipped / "config.yaml").is_file() else here.parent / "conf"


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config that ``python -m pipeline OVERRIDES`` runs, composed with Hydra's compose API
    from :func:`config_dir` (Hydra's global state is restored afterwards, so this also works
    inside a running Hydra app)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    register()
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides))
    finally:
        restore_gh_from_backup(backup)


def as_dict(cfg: Config) -> dict[str, Any]:
    """A typed config as plain, JSON-able data (enums as their values): for the file's
    provenance and the fingerprint."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def to_plain(cfg: DictConfig | dict) -> dict[str, Any]:
    """A resolved, plain-``dict`` copy (safe to pickle to workers that lack Hydra's state)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]
    return json.loads(json.dumps(cfg, default=str))


# Keys that change how a run executes, not the numbers it produces.
_EXECUTION_KEYS = {"backend", "progress", "plots", "report"}
_STORAGE_EXECUTION_KEYS = {"mode", "keep_shards", "layout", "compression", "path", "fsync"}


def fingerprint(cfg: dict[str, Any], *extra: str) -> str:
    """SHA-256 of everything that determines the result: the config minus execution settings
    (so the seeds ``seed`` and ``data.seed`` too), and ``extra`` (the fingerprints of the weights,
    the model's code, the inputs and the labels: see ``pipeline.job.Job``)."""
    numeric = {k: v for k, v in cfg.items() if k not in _EXECUTION_KEYS}
    numeric["storage"] = {
        k: v for k, v in cfg.get("storage", {}).items() if k not in _STORAGE_EXECUTION_KEYS
    }
    model = cfg.get("model", {})
    numeric["model"] = {k: v for k, v in model.items() if k != "trust"}  # consent, not a number
    if isinstance(model.get("net"), dict):  # a factory's own consent key (mace_energy's trust)
        numeric["model"]["net"] = {k: v for k, v in model["net"].items() if k != "trust"}
    blob = json.dumps(numeric, sort_keys=True, default=str) + "".join(extra)
    return hashlib.sha256(blob.encode()).hexdigest()
