"""A progress bar on stderr (tqdm) when ``progress=true``, else nothing."""

from __future__ import annotations

from typing import Any


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_description_str(self, text: str) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc) -> None:
        return None


def progress(cfg: dict[str, Any] | bool, total: int, initial: int, unit: str):
    """A bar over ``total`` items (``initial`` done), or a no-op when progress is off."""
    on = cfg.get("progress", True) if isinstance(cfg, dict) else bool(cfg)
    if not on:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=unit, unit=unit.rstrip("s"), leave=False)
