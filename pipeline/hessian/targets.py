"""Which scalar functions of a network's output are differentiated: logits by index, or a loss."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .curvature import DENSE, DIAG, Curvature
from .errors import ArgumentError

LOSSES = ("cross_entropy", "mse")


@dataclass(frozen=True)
class Target:
    """K scalar functions y_k(z) of one sample's model output z of shape (C,).

    kind ``"index"``: y_k = z[aux[k]], with aux (N, K) long (per-sample output indices).
    kind ``"cross_entropy"``: y = cross_entropy(z, aux), aux (N,) long class labels; K = 1.
    kind ``"mse"``: y = mean((z - aux)^2), aux (N, C) float targets; K = 1.

    Attributes:
        kind: one of ``"index"``, ``"cross_entropy"``, ``"mse"``.
        aux: per-sample data, first axis N.
        output_index: (K,) when all samples share the outputs, (N, K) for per-sample outputs;
            -1 marks a loss.
    """

    kind: str
    aux: Tensor
    output_index: np.ndarray

    @property
    def n_outputs(self) -> int:
        return self.aux.shape[1] if self.kind == "index" else 1

    def select(self, z: Tensor, aux: Tensor) -> Tensor:
        """(C,) output and one sample's aux -> (K,) scalars. Pure, vmap-able."""
        if self.kind == "index":
            return z.gather(-1, aux)
        if self.kind == "cross_entropy":
            return F.cross_entropy(z.unsqueeze(0), aux.unsqueeze(0)).unsqueeze(0)
        return ((z - aux) ** 2).mean().unsqueeze(0)

    def values(self, z: Tensor, aux: Tensor | None = None) -> Tensor:
        """(N, C) outputs and their aux (default: all of ``aux``) -> (N, K) scalars, batched:
        ``select`` on each sample at once, without ``vmap``."""
        aux = self.aux if aux is None else aux
        if self.kind == "index":
            return z.gather(-1, aux)
        if self.kind == "cross_entropy":
            return F.cross_entropy(z, aux, reduction="none").unsqueeze(-1)
        return ((z - aux) ** 2).mean(-1, keepdim=True)

    def subset(self, start: int, stop: int) -> Target:
        """The target restricted to samples [start, stop)."""
        oi = self.output_index
        return Target(self.kind, self.aux[start:stop], oi[start:stop] if oi.ndim == 2 else oi)

    def derivatives(self, z: Tensor) -> tuple[Tensor, Curvature]:
        """Gradient g (N, K, C) and Hessian A of the K scalars with respect to the output z (N, C).

        Logits by index: A = 0. Cross-entropy: A = diag(p) - p p^T, dense (N, 1, C, C).
        MSE: A = 2/C I, diagonal (N, 1, C).
        """
        c = z.shape[-1]
        classes = torch.arange(c, device=z.device)
        if self.kind == "index":
            return (self.aux.unsqueeze(-1) == classes).to(z.dtype), Curvature.zero()
        if self.kind == "cross_entropy":
            p = torch.softmax(z, -1)
            g = p - (self.aux.unsqueeze(-1) == classes).to(z.dtype)
            a = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
            return g.unsqueeze(1), Curvature(DENSE, a.unsqueeze(1))
        g = 2 * (z - self.aux) / c
        return g.unsqueeze(1), Curvature(DIAG, torch.full_like(g, 2 / c).unsqueeze(1))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Target:
        aux = self.aux.to(device)
        if dtype is not None and aux.is_floating_point():
            aux = aux.to(dtype)
        return Target(self.kind, aux, self.output_index)


def make_target(
    outputs: Sequence[int] | Tensor | str,
    z: Tensor,
    labels: Tensor | None = None,
    loss: str = "cross_entropy",
) -> Target:
    """Build the target for model outputs ``z`` (N, C).

    Args:
        outputs: a list of output indices; a (N, K) tensor of per-sample indices; ``"all"``;
            ``"predicted"`` (each sample's argmax); or ``"loss"`` (needs ``labels``).
        z: the model's outputs (N, C) at the inputs, used for ``predicted`` and range checks.
        labels: (N,) class labels, or (N, C) float targets for ``mse``; only for ``"loss"``.
        loss: ``"cross_entropy"`` or ``"mse"``.
    """
    n, c = z.shape[0], z.shape[-1]
    if z.ndim != 2:
        raise ArgumentError(
            "the model must return one output vector per sample, shape (N, C); "
            f"got {tuple(z.shape)}",
            "model",
        )
    if isinstance(outputs, str):
        if outputs == "all":
            idx = torch.arange(c, device=z.device).expand(n, c)
            return Target("index", idx, np.arange(c))
        if outputs == "predicted":
            idx = z.argmax(-1, keepdim=True)
            return Target("index", idx, idx.cpu().numpy())
        if outputs == "loss":
            return _loss_target(z, labels, loss)
        raise ArgumentError(
            f"unknown target {outputs!r}: use a list of indices, 'all', 'predicted' or 'loss'",
            "outputs",
        )
    if isinstance(outputs, Tensor):
        outputs = outputs.cpu().numpy()
    idx = np.asarray(outputs, dtype=np.int64)  # checked on the host: no device operation
    if idx.ndim == 0:
        idx = idx.reshape(1)
    if idx.size == 0:
        raise ArgumentError("no outputs selected: give at least one index", "outputs")
    bad = idx[(idx < -c) | (idx >= c)]
    if bad.size:
        raise ArgumentError(
            f"output index {bad.flat[0]} is out of range for a model with {c} outputs "
            f"(valid: 0..{c - 1})",
            "outputs",
        )
    idx = idx % c
    if idx.ndim == 2 and idx.shape[0] != n:
        raise ArgumentError(f"per-sample indices must have {n} rows", "outputs")
    aux = torch.from_numpy(idx).to(z.device, non_blocking=True)
    return Target("index", aux.expand(n, -1) if idx.ndim == 1 else aux, idx)


def _loss_target(z: Tensor, labels: Tensor | None, loss: str) -> Target:
    n, c = z.shape
    if labels is None:
        raise ArgumentError(
            "outputs='loss' needs labels: (N,) class indices, or (N, C) targets for mse",
            "labels",
        )
    if loss not in LOSSES:
        raise ArgumentError(f"unknown loss {loss!r}: choose one of {list(LOSSES)}", "loss")
    labels = torch.as_tensor(labels).to(z.device)
    if len(labels) != n:
        raise ArgumentError(f"{len(labels)} labels for {n} samples", "labels")
    if loss == "cross_entropy" and (labels.is_floating_point() or labels.ndim != 1):
        raise ArgumentError("cross_entropy needs integer class labels of shape (N,)", "labels")
    if not labels.is_floating_point() and (labels.min() < 0 or labels.max() >= c):
        raise ArgumentError(f"labels must lie in 0..{c - 1} for a model with {c} outputs", "labels")
    if loss == "cross_entropy":
        aux = labels.long()
    else:
        aux = F.one_hot(labels.long(), c) if not labels.is_floating_point() else labels
        if c == 1 and aux.shape == (n,):  # regression targets (N,) for a model with one output
            aux = aux[:, None]
        if aux.shape != (n, c):
            raise ArgumentError(f"mse needs targets of shape (N, {c})", "labels")
        aux = aux.to(z.dtype)
    return Target(loss, aux, np.full(1, -1))
