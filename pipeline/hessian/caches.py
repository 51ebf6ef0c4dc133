"""Per-model caches, forgotten when the model's structure changes.

The captured graph, its analysis, the plans, the method choice and the output width are cached
per model object (each keyed inside on what it depends on: input shape, dtype, device, target
kind). A model changed in place (a layer replaced, a head resized) is the same object with
another structure, so every entry point that reads a cache first calls :func:`check`, which
compares a signature of the model's modules and parameter shapes with the one the entries were
made for, and drops the model's entries from every cache when they differ. Changed weights (the
same modules, the same tensor objects changed in place) keep the caches: nothing cached depends
on parameter values; a parameter replaced by a new tensor object drops them (a replay's trace
refers to the objects it was made with).
"""

from __future__ import annotations

import weakref

from torch import nn

_CACHES: list[weakref.WeakKeyDictionary] = []
_SIGNATURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def per_model() -> weakref.WeakKeyDictionary:
    """A new cache keyed by model, emptied for a model by :func:`check` when it changes."""
    cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    _CACHES.append(cache)
    return cache


def signature(model: nn.Module) -> tuple:
    """The module tree (names and types), and each module's parameters and buffers: which tensor
    objects (a replay holds them: NOTE [replay]) and their shapes. Read from the modules' own
    tables, not ``state_dict`` (its hooks and prefixes: 21 against 13 us for the PINN)."""
    parts: list[tuple] = []
    for name, m in model.named_modules():
        parts.append((name, type(m)))
        for table in (m._parameters, m._buffers):
            parts.extend((key, id(t), t is not None and t.shape) for key, t in table.items())
    return tuple(parts)


def check(model: nn.Module) -> None:
    """Forget what the caches hold for ``model`` if its structure changed since they were made."""
    sig = signature(model)
    if _SIGNATURES.get(model) != sig:
        for cache in _CACHES:
            cache.pop(model, None)
        _SIGNATURES[model] = sig
