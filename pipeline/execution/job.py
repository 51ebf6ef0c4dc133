"""What one run computes: model, data slice, target and method, built from the config."""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import torch
from torch import Tensor, nn

from ..config.schema import Config, ModelConf
from ..errors import PipelineError
from ..hessian.errors import ArgumentError
from ..hessian.methods import Method, resolve_method, zero_hessian_reason
from ..hessian.targets import Target, make_target
from ..inputs.atoms import with_atomic_numbers
from ..inputs.data import Dataset, Samples, load_data, provides_atoms
from ..inputs.models import build_model
from ..store.fingerprint import code_fingerprint, data_fingerprint, weights_fingerprint
from .outputs import Work

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Job:
    """A resolved run: inputs (N, *S), outputs (N, C), the target's K functions and the method."""

    cfg: Config
    model: nn.Module
    data: Dataset
    outputs: Tensor
    target: Target
    method: Method
    dtype: torch.dtype

    @property
    def memory_budget(self) -> int | None:
        """Bytes of working memory for one vectorized call (``method.memory_budget_mb``); None:
        the device's default (``pipeline.hessian.methods.default_memory_budget``)."""
        mb = self.cfg.method.memory_budget_mb
        return None if mb is None else int(mb) << 20

    @property
    def work(self) -> Work:
        """What each block computes (picklable: sent to Dask workers)."""
        masses = None
        if getattr(self.cfg.output, "mass_weighted", False) and self.data.masses is not None:
            masses = tuple(float(m) for m in np.repeat(self.data.masses, 3))  # x, y, z per atom
        return Work(self.cfg.output, self.method.name, self.cfg.method.name, masses)

    @property
    def spec(self) -> ModelSpec:
        """What builds this job's model in another process."""
        return ModelSpec(self.cfg.model, str(self.cfg.dtype), self.cfg.seed)

    @property
    def dim(self) -> int:
        return self.data.x[0].numel()

    @cached_property
    def model_fingerprint(self) -> str:
        """SHA-256 over the model's class, parameter and buffer values (hashed once per job)."""
        return weights_fingerprint(self.model)

    @cached_property
    def code_fingerprint(self) -> str | None:
        """SHA-256 of the model's code (see ``pipeline.fingerprint``); None: not provable."""
        return code_fingerprint(self.model, self.cfg.model)

    def data_fingerprint(self) -> str:
        """SHA-256 of the inputs, their source indices and the labels."""
        d = self.data
        return data_fingerprint(d.x, d.sample_index, d.labels, d.atomic_numbers, d.masses)


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise PipelineError(f"unknown dtype {name!r}: choose float32 or float64", "dtype")
    return DTYPES[name]


@dataclass(frozen=True)
class ModelSpec:
    """What builds the model, the same way in every process (the driver and each Dask worker)."""

    model: ModelConf
    dtype: str
    seed: int

    def build(self, device: str = "cpu") -> nn.Module:
        """The model: torch seeded with ``seed``, in ``dtype``, in eval mode."""
        torch.manual_seed(self.seed)
        return build_model(self.model, torch_dtype(self.dtype), device)


def model_key(cfg: Config) -> str:
    """The config key that names the model: ``model.path`` (exported) or ``model.net``."""
    return "model.path" if getattr(cfg.model, "path", None) else "model.net"


# The samples the method is chosen on: the plans count a call's shared costs over up to 64
# (``pipeline.hessian.structured._samples``); the probes take the first one or two.
CHOICE_SAMPLES = 64


def build_job(cfg: Config) -> Job:
    """Build model, data, target and method from a typed config, checking that they fit."""
    dtype = torch_dtype(cfg.dtype)
    data = None
    if provides_atoms(cfg.data):  # their atomic numbers go to the model's factory, in the config
        data = load_data(cfg.data, dtype)
        cfg = replace(cfg, model=with_atomic_numbers(cfg.model, data.atomic_numbers))
    model = ModelSpec(cfg.model, str(cfg.dtype), cfg.seed).build()
    _check_finite_weights(model, cfg)
    if data is None:
        data = load_data(cfg.data, dtype)
    outputs = forward(model, data.x, cfg)
    head = data.x[:CHOICE_SAMPLES]
    _check_differentiable(model, head[:1])
    t = cfg.target
    spec = getattr(t, "indices", t.name)
    with config_keys(cfg):
        target = make_target(spec, outputs, data.labels, str(getattr(t, "loss", "cross_entropy")))
        method = resolve_method(cfg.method.name, model, target, head)
    log.info("method %s", method.name)
    reason = zero_hessian_reason(model, target, head)
    if reason:
        log.warning("Hessians will be zero almost everywhere: %s", reason)
    return Job(cfg, model, data, outputs, target, method, dtype)


# The config key of each argument of ``hessian()`` that an ``ArgumentError`` can name.
CONFIG_KEYS = {"outputs": "target.indices", "labels": "data.labels_path", "loss": "target.loss",
               "method": "method.name", "model": "model.net", "x": "data"}  # fmt: skip


@contextlib.contextmanager
def config_keys(cfg: Config):
    """Turn the math package's ``ArgumentError`` into a ``PipelineError`` naming the config key
    (the model of ``model=exported`` is ``model.path``)."""
    try:
        yield
    except ArgumentError as err:
        key = CONFIG_KEYS.get(err.argument)
        if err.argument == "model":
            key = model_key(cfg)
        raise PipelineError(err.message, key) from err


# Words of torch's errors about shapes: such an error means the inputs do not fit the model.
_SHAPE_ERROR = re.compile(
    r"shape|size of tensor|sizes? mismatch|dimension|mat1|mat2|channels|expected input|"
    r"must match|cannot be multiplied|to have \d+ channels",
    re.IGNORECASE,
)


def forward(model: nn.Module, x: Tensor | Samples, cfg: Config) -> Tensor:
    """The model's outputs (N, C); a shape mismatch or an error in ``forward`` becomes one line."""
    try:
        with torch.no_grad():
            z = model(x[: min(len(x), 1024)])
            if len(x) > 1024:
                z = torch.cat([z] + [model(x[i : i + 1024]) for i in range(1024, len(x), 1024)])
    except PipelineError:
        raise
    except Exception as err:
        msg = (str(err).strip().splitlines() or [""])[0][:240]
        if isinstance(err, (RuntimeError, ValueError)) and _SHAPE_ERROR.search(msg):
            raise PipelineError(
                f"the model does not accept inputs of shape {tuple(x.shape[1:])} (per sample)"
                f"{_expected_input(model)}: {msg}",
                "data",
            ) from err
        raise PipelineError(
            f"the model's forward raised {type(err).__name__} on inputs of shape "
            f"{tuple(x.shape[1:])} (per sample): {msg}",
            model_key(cfg),
        ) from err
    if not isinstance(z, Tensor) or z.ndim != 2 or z.shape[0] != len(x):
        shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise PipelineError(
            f"the model must return (N, C) outputs for (N, *S) inputs; got {shape}", model_key(cfg)
        )
    if z.shape[1] == 0:
        raise PipelineError(
            "the model returns 0 outputs per sample (shape (N, 0)): there is nothing to "
            "differentiate",
            model_key(cfg),
        )
    if not torch.isfinite(z).all():
        bad = np.flatnonzero(~torch.isfinite(z).all(-1).numpy())[:5]
        raise PipelineError(
            f"the model's outputs are not finite for samples {[int(b) for b in bad]} (the "
            "inputs and weights are finite: the model overflows on them); drop them with "
            "data.indices",
            "data.indices",
        )
    return z


def _check_finite_weights(model: nn.Module, cfg: Config) -> None:
    """Refuse a model whose parameters or buffers hold NaN or inf (blamed on the model)."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            source = getattr(cfg.model, "checkpoint", None)
            raise PipelineError(
                f"the model's weights are not finite: {name} holds NaN or inf"
                + (f" (loaded from {source!r})" if source else ""),
                "model.checkpoint" if source else model_key(cfg),
            )


def _expected_input(model: nn.Module) -> str:
    """What the model's first Linear/Conv layer takes, as a phrase (empty if unknown)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return f"; its first layer takes {m.in_features} features"
        if isinstance(m, nn.modules.conv._ConvNd):
            return f"; its first layer takes {m.in_channels} input channels"
    return ""


def _check_differentiable(model: nn.Module, x: Tensor) -> None:
    """Refuse a model with embeddings whose outputs are cut off from the input (integer ids)."""
    if not any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in model.modules()):
        return
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        z = model(x)
        connected = (
            z.requires_grad and torch.autograd.grad(z.sum(), x, allow_unused=True)[0] is not None
        )
    if not connected:
        raise PipelineError(
            "the model's outputs are not differentiable in its input (it looks up embeddings of "
            "integer ids): a Hessian with respect to the input needs a model of real-valued "
            "inputs, e.g. one that takes the embedding vectors as its input",
            "model.net",
        )
