"""Typed configuration: one dataclass per option (``schema``), checked once (``validate``)."""
