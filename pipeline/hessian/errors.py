"""Errors of the math package, in its own terms: which argument of ``hessian()`` to change.

The command line maps ``argument`` to a config key (``pipeline.execution.job``); a library user
reads the message as is.
"""

from __future__ import annotations


class ArgumentError(ValueError):
    """A bad argument: ``argument`` names it (``outputs``, ``rows``, ``labels``, ``method``,
    ``model``, ``x``)."""

    def __init__(self, message: str, argument: str):
        self.argument = argument
        self.message = message
        super().__init__(f"{message} (argument: {argument})")
