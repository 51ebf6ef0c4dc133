"""Importing third-party model libraries that need help with the installed torch.

torchvision's wheel on PyPI is built against a CUDA torch: with the CPU build its compiled ops do
not load, and importing ``torchvision`` fails in ``_meta_registrations`` (``operator
torchvision::nms does not exist``). The model code is pure Python; ``import_torchvision`` declares
the two operator schemas that module registers fake kernels for, so the import goes through
(``torchvision.ops.nms`` itself stays unusable). Anything that imports torchvision when it is
installed (timm, torchmetrics, mace) must be imported after it.

mace sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` in the process environment when it is imported
(e3nn, imported by mace, loads its constants with a bare ``torch.load``): ``import_mace`` imports
both in that order and then puts the variable back as it was, so that a later ``torch.load``
without ``weights_only`` (the user's code, a Dask worker started from this process) stays safe.
"""

from __future__ import annotations

import importlib
import os
import sys
from functools import cache
from typing import Any

import torch

_KEEP: list[Any] = []


@cache
def import_torchvision() -> Any:
    """``torchvision``, imported even where its compiled ops do not load (see module doc).

    Raises:
        ImportError: torchvision is not installed.
    """
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                   "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):  # fmt: skip
        try:
            lib.define(schema)
        except RuntimeError:
            pass  # already defined
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _KEEP.append(lib)  # the definitions live as long as the library object
    return importlib.import_module("torchvision")


@cache
def import_mace() -> Any:
    """``mace.modules`` (with e3nn), imported after torchvision where that is installed, leaving
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` as it was before (see module doc).

    Raises:
        ImportError: mace-torch or e3nn is not installed.
    """
    try:
        import_torchvision()
    except ImportError:
        pass  # mace does not need torchvision; it only must not import a broken one
    key = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(key)
    try:
        importlib.import_module("mace")
        importlib.import_module("e3nn.o3")
        return importlib.import_module("mace.modules")
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
