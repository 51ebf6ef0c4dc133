"""A progress bar on stderr (tqdm) when ``progress=true``, else nothing.

While a bar is shown, log records go through ``tqdm.write`` (``logging_redirect_tqdm``): the bar
is cleared, the line printed, the bar redrawn, so the two never write into each other's lines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_description_str(self, text: str) -> None:
        pass


@contextlib.contextmanager
def progress(on: bool, total: int, initial: int, unit: str) -> Iterator[Any]:
    """A bar over ``total`` items (``initial`` done), or a no-op when ``on`` is False."""
    if not on:
        yield _NoBar()
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    with (
        logging_redirect_tqdm(),
        tqdm(total=total, initial=initial, desc=unit, unit=unit.rstrip("s"), leave=False) as bar,
    ):
        yield bar
