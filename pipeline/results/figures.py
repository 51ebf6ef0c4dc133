"""What every figure of a result shares: its titles, the colour scale of signed values, and
whether the input is an image."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.colors import Normalize

from .reader import Result


def image_shape(shape: Sequence[int]) -> tuple[int, int, int] | None:
    """(C, H, W) of an image input of shape (H, W) or (C, H, W), else None."""
    if len(shape) == 2 and min(shape) > 1:
        return (1, int(shape[0]), int(shape[1]))
    if len(shape) == 3 and min(shape[1:]) > 1:
        return (int(shape[0]), int(shape[1]), int(shape[2]))
    return None


def plot_title(result: Result, n: int = 0, k: int = 0) -> str:
    si = int(result.file["sample_index"][n])
    oi = int(result.output_index_of(n)[k])
    out = "the loss" if oi < 0 else f"output {oi}"
    return f"{out}, sample {n} (dataset index {si})"


def plot_subtitle(result: Result) -> str:
    cfg = result.config
    net = (cfg.model.get("net") or {}).get("_target_", cfg.model.get("name"))
    return f"{net}, {result.method}, {result.attrs.get('dtype')}, {result.path.name}"


def diverging(values: np.ndarray) -> Normalize:
    finite = np.abs(values[np.isfinite(values)])
    vmax = float(finite.max()) if finite.size else 1.0
    return Normalize(vmin=-(vmax or 1.0), vmax=vmax or 1.0)


def zero_note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11,
            bbox={"boxstyle": "round", "fc": "0.95", "ec": "0.6"})  # fmt: skip
