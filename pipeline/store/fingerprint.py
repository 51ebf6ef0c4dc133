"""Fingerprints of what determines a run's numbers: the weights, the model's code, the data.

With the config (``pipeline.config.fingerprint``) they make the run's fingerprint, which a resume
must match; the weights and code fingerprints also let a Dask worker prove that the model it
built is the driver's.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config.schema import ModelConf
from ..inputs.data import Samples
from ..inputs.models import ExportedModel


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the model's class name and its parameter and buffer values."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def code_fingerprint(model: nn.Module, model_cfg: ModelConf) -> str | None:
    """SHA-256 of the code that computes the model, or None where it cannot be read.

    The code is torch's version, and: for an exported program, its graph's code; otherwise the
    source files of the modules that define the model's layer classes and the factories its
    config names (``_target_``), so a change anywhere in a user's model file changes it.
    None (no source, e.g. a class defined interactively) means equality cannot be proved.
    """
    h = hashlib.sha256(f"torch {torch.__version__}\n".encode())
    if isinstance(model, ExportedModel):
        h.update(str(getattr(model.program, "code", model.program)).encode())
        return h.hexdigest()
    objects: list[Any] = [type(m) for m in model.modules()]
    objects += [_locate(t) for t in instantiate_targets(getattr(model_cfg, "net", None))]
    sources: dict[str, str] = {}
    for obj in objects:
        name = getattr(obj, "__module__", None)
        if name is None:
            return None
        if name == "torch" or name.startswith("torch.") or name in sources:
            continue  # torch's code is its version
        try:
            sources[name] = inspect.getsource(sys.modules[name])
        except (OSError, TypeError, KeyError):
            return None
    for name in sorted(sources):
        h.update(f"\n# module {name}\n".encode())
        h.update(sources[name].encode())
    return h.hexdigest()


def data_fingerprint(
    x: torch.Tensor | Samples,
    sample_index: np.ndarray,
    labels: torch.Tensor | None,
    atomic_numbers: np.ndarray | None = None,
    masses: np.ndarray | None = None,
) -> str:
    """SHA-256 of the inputs (N, *S), their source indices, the labels (if any) and the atoms'
    numbers and masses (if any)."""
    if isinstance(x, Samples):  # hashed in the pass that checked them (the same digest)
        h = x.scan().digest.copy()
    else:
        h = hashlib.sha256(f"{tuple(x.shape)} {x.dtype}\n".encode())
        h.update(x.detach().cpu().contiguous().numpy().tobytes())
    h.update(np.ascontiguousarray(sample_index).tobytes())
    if labels is None:
        h.update(b"no labels")
    else:
        h.update(f"labels {tuple(labels.shape)} {labels.dtype}\n".encode())
        h.update(labels.detach().cpu().contiguous().numpy().tobytes())
    if atomic_numbers is not None or masses is not None:  # (absent: the hash of before)
        for name, values, dtype in (("atomic_numbers", atomic_numbers, np.int64),
                                    ("masses", masses, np.float64)):  # fmt: skip
            h.update(f"\n{name}\n".encode())
            if values is not None:
                h.update(np.ascontiguousarray(values, dtype).tobytes())
    return h.hexdigest()


def instantiate_targets(node: Any) -> list[str]:
    """Every ``_target_`` in a Hydra instantiate node, nested ones included."""
    if isinstance(node, dict):
        found = [node["_target_"]] if isinstance(node.get("_target_"), str) else []
        return found + [t for v in node.values() for t in instantiate_targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in instantiate_targets(v)]
    return []


def _locate(target: str) -> Any:
    from hydra.utils import get_object

    try:
        return get_object(target)
    except Exception:  # the model was built from it, so this does not happen in a run
        return None
