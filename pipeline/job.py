"""What one run computes: model, data slice, target and method, built from the config."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .data import Dataset, load_data
from .errors import PipelineError
from .hessian.errors import ArgumentError
from .hessian.methods import Method, resolve_method, zero_hessian_reason
from .hessian.targets import Target, make_target
from .models import build_model

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Job:
    """A resolved run: inputs (N, *S), outputs (N, C), the target's K functions and the method."""

    cfg: dict[str, Any]
    model: nn.Module
    data: Dataset
    outputs: Tensor
    target: Target
    method: Method
    dtype: torch.dtype

    @property
    def memory_budget(self) -> int:
        """Bytes of working memory for one vectorized call (``method.memory_budget_mb``)."""
        return int(self.cfg["method"].get("memory_budget_mb", 1024)) << 20

    @property
    def dim(self) -> int:
        return self.data.x[0].numel()

    @cached_property
    def model_fingerprint(self) -> str:
        """SHA-256 over the model's class, parameter and buffer values (hashed once per job)."""
        h = hashlib.sha256(type(self.model).__name__.encode())
        for name, t in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def data_fingerprint(self) -> str:
        h = hashlib.sha256(self.data.x.cpu().numpy().tobytes())
        h.update(self.data.sample_index.tobytes())
        return h.hexdigest()


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise PipelineError(f"unknown dtype {name!r}: choose float32 or float64", "dtype")
    return DTYPES[name]


def build_job(cfg: dict[str, Any]) -> Job:
    """Build model, data, target and method from a resolved config, checking that they fit."""
    dtype = torch_dtype(cfg["dtype"])
    torch.manual_seed(cfg.get("seed", 0))
    model = build_model(cfg["model"], dtype)
    data = load_data(cfg["data"], dtype)
    outputs = forward(model, data.x, cfg)
    _check_differentiable(model, data.x[:1])
    tcfg = cfg["target"]
    spec = tcfg["indices"] if tcfg["name"] == "indices" else tcfg["name"]
    with config_keys():
        target = make_target(spec, outputs, data.labels, tcfg.get("loss", "cross_entropy"))
        method = resolve_method(cfg["method"]["name"], model, target, data.x)
    log.info("method %s", method.name)
    reason = zero_hessian_reason(model, target, data.x)
    if reason:
        log.warning("Hessians will be zero almost everywhere: %s", reason)
    return Job(cfg, model, data, outputs, target, method, dtype)


# The config key of each argument of ``hessian()`` that an ``ArgumentError`` can name.
CONFIG_KEYS = {"outputs": "target.indices", "labels": "data.labels_path", "loss": "target.loss",
               "method": "method.name", "model": "model.net", "x": "data"}  # fmt: skip


@contextlib.contextmanager
def config_keys():
    """Turn the math package's ``ArgumentError`` into a ``PipelineError`` naming the config key."""
    try:
        yield
    except ArgumentError as err:
        raise PipelineError(err.message, CONFIG_KEYS.get(err.argument)) from err


def forward(model: nn.Module, x: Tensor, cfg: dict[str, Any]) -> Tensor:
    """The model's outputs (N, C); a shape mismatch becomes a one-line error."""
    try:
        with torch.no_grad():
            z = model(x[: min(len(x), 1024)])
            if len(x) > 1024:
                z = torch.cat([z] + [model(x[i : i + 1024]) for i in range(1024, len(x), 1024)])
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        msg = str(err).strip().splitlines()[0][:240]
        raise PipelineError(
            f"the model does not accept inputs of shape {tuple(x.shape[1:])} (per sample)"
            f"{_expected_input(model)}: {msg}",
            "data",
        ) from err
    if not isinstance(z, Tensor) or z.ndim != 2 or z.shape[0] != len(x):
        shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise PipelineError(
            f"the model must return (N, C) outputs for (N, *S) inputs; got {shape}", "model.net"
        )
    if not torch.isfinite(z).all():
        bad = np.flatnonzero(~torch.isfinite(z).all(-1).numpy())[:5]
        raise PipelineError(f"the model's outputs are not finite for samples {list(bad)}", "data")
    return z


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
