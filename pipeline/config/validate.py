"""The config, checked once: :func:`complete_config` turns what Hydra composed (or a partial
mapping from Python) into a typed :class:`~pipeline.config.schema.Config`, or refuses it in one
line naming the key: keys of another option, types, ranges, required values. A partial config
(``run({"data": {...}})``) is completed by composing the defaults exactly as the command line
does. Everything after this reads the typed object. The checks of the environment, the job and
the plan follow in ``pipeline.execution.prepare`` (see NOTE: [validation before anything
exists] there).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import fields
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import PipelineError
from ..hessian.methods import METHODS
from .schema import OPTIONS, Config, compose, to_plain

GROUPS = ("model", "data", "target", "method", "backend", "storage", "output")
COMPRESSIONS = (None, "none", "null", "lzf", "gzip")  # storage.compression


def complete_config(cfg: Config | DictConfig | dict[str, Any]) -> Config:
    """The typed config, checked per option; a partial one is completed with the defaults of
    ``conf/``.

    Raises:
        PipelineError: naming the config key to change.
    """
    if isinstance(cfg, Config):
        return cfg
    try:
        plain = to_plain(cfg)
    except OmegaConfBaseException as err:
        raise PipelineError(_first_line(err), _full_key(err)) from err
    if not isinstance(plain, dict):
        raise PipelineError(f"a config is a mapping of groups to settings, not {type(cfg)}")
    top = {f.name for f in fields(Config)}
    for key in plain:
        if key not in top:
            raise PipelineError(
                f"unknown config key {key!r}: the config has {', '.join(sorted(top))}", key
            )
    if _partial(plain):
        plain = _compose_partial(plain)
    check_config(plain)
    return typed(plain)


def typed(plain: dict[str, Any]) -> Config:
    """A checked plain config as the dataclasses of its options."""
    groups = {g: _instance(_schema(g, plain[g]), plain[g]) for g in GROUPS}  # type: ignore[arg-type]
    rest = {k: v for k, v in plain.items() if k not in GROUPS}
    return dataclasses.replace(_instance(Config, rest), **groups)


def _instance(schema: type, node: dict[str, Any]) -> Any:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))


def _partial(plain: dict[str, Any]) -> bool:
    if any(f.name not in plain for f in fields(Config)):
        return True
    for group in GROUPS:
        node = plain[group]
        schema = _schema(group, node) if isinstance(node, dict) else None
        if schema is not None and any(f.name not in node for f in fields(schema)):
            return True
    return False


def _compose_partial(plain: dict[str, Any]) -> dict[str, Any]:
    """The defaults of ``conf/`` (with the group options that ``plain`` names) merged with it."""
    choices = [
        f"{g}={plain[g]['name']}"
        for g in GROUPS
        if isinstance(plain.get(g), dict) and isinstance(plain[g].get("name"), str)
    ]
    try:
        composed = compose(choices)
        merged = OmegaConf.merge(composed, plain)
        return to_plain(merged)
    except PipelineError:
        raise
    except Exception as err:
        raise config_error(err) from err


def _schema(group: str, node: dict[str, Any]) -> type | None:
    if group == "storage":
        return OPTIONS["storage"]["default"]
    return OPTIONS[group].get(node.get("name"))  # type: ignore[arg-type]


def check_config(cfg: dict[str, Any]) -> None:
    """Each group against its option's schema: keys, types, ranges, required values."""
    for group in GROUPS:
        node = cfg[group]
        if not isinstance(node, dict):
            raise PipelineError(f"{group} must be a mapping of settings, not {node!r}", group)
        schema = _schema(group, node)
        if schema is None:
            name = node.get("name")
            if group == "method":
                raise PipelineError(
                    f"unknown method {name!r}: choose one of {['auto', *METHODS]}", "method.name"
                )
            raise PipelineError(
                f"unknown {group} option {name!r}: choose one of {', '.join(OPTIONS[group])}",
                f"{group}.name",
            )
        _check_node(group, node, schema)
    scalars = {k: v for k, v in cfg.items() if k not in GROUPS}
    _typed(Config, scalars, "")
    if cfg["data"]["name"] == "synthetic" and any(s < 1 for s in cfg["data"]["shape"]):
        raise PipelineError(
            f"data.shape={cfg['data']['shape']} must have positive entries (D = prod(S) > 0)",
            "data.shape",
        )
    _check_atoms(cfg)
    if cfg["storage"].get("compression") not in COMPRESSIONS:
        raise PipelineError(
            f"unknown compression {cfg['storage']['compression']!r}: choose none, lzf or gzip",
            "storage.compression",
        )


def _check_atoms(cfg: dict[str, Any]) -> None:
    """What needs the atoms of ``data=ase`` (masses) and what they cannot give (labels)."""
    data, output = cfg["data"]["name"], cfg["output"]
    if output.get("mass_weighted") and data != "ase":
        raise PipelineError(
            f"output.mass_weighted=true needs the atoms' masses, and data={data} has none: "
            "read the frames with data=ase (or set output.mass_weighted=false)",
            "output.mass_weighted",
        )
    if data == "ase" and cfg["target"]["name"] == "loss":
        raise PipelineError(
            "target=loss needs labels, and the frames of data=ase have none: choose the "
            "model's outputs with target.indices (an energy is output 0)",
            "target",
        )


def _check_node(group: str, node: dict[str, Any], schema: type) -> None:
    known = {f.name for f in fields(schema)}
    option = f"{group}={node.get('name')}" if group != "storage" else "storage"
    for key in node:
        if key not in known:
            raise PipelineError(unknown_key_message(f"{group}.{key}", schema), f"{group}.{key}")
    _typed(schema, node, f"{group}.")
    for f in fields(schema):
        value = node.get(f.name)
        if value == "???" or (f.name not in node and f.default is NO_DEFAULT):
            raise PipelineError(f"{option} needs {group}.{f.name}", f"{group}.{f.name}")
        low = f.metadata.get("min")
        if low is not None and value is not None and value < low:
            raise PipelineError(
                f"{group}.{f.name}={value} is out of range: it must be at least {low}",
                f"{group}.{f.name}",
            )


def _typed(schema: type, node: dict[str, Any], prefix: str) -> None:
    """Type-check ``node`` against a dataclass schema (OmegaConf's conversions and errors)."""
    try:
        OmegaConf.merge(OmegaConf.structured(schema), node)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise PipelineError(_first_line(err), f"{prefix}{key}" if key else None) from err


def unknown_key_message(full_key: str, schema: type) -> str:
    """``backend.n_workers`` given to ``backend=local``: what the option takes, and which options
    take the key."""
    group, _, key = full_key.partition(".")
    key = key.split(".")[0]
    options = OPTIONS.get(group, {})
    chosen = [o for o, s in options.items() if s is schema]
    keys = ", ".join(f.name for f in fields(schema))
    where = [o for o, s in options.items() if key in {f.name for f in fields(s)}]
    every = not chosen or len(chosen) == len(options)  # (all options of method share one)
    msg = group if every else f"{group}={'/'.join(chosen)}"
    msg = f"unknown key {group}.{key}: {msg} takes {keys}"
    if where:
        msg += f"; {key} belongs to {' and '.join(f'{group}={o}' for o in where)}"
    return msg


def config_error(err: BaseException) -> PipelineError:
    """A Hydra/OmegaConf composition error as a one-line PipelineError naming the config key."""
    if isinstance(err, PipelineError):
        return err
    parts, cause = [], err
    while cause is not None and len(parts) < 2:
        if "$VALUE" not in str(cause):
            parts.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    text = "\n".join(dict.fromkeys(parts))
    found = re.search(r"full_key: (\S+)", text)
    key = found.group(1) if found else None
    unknown = re.search(r"Key '[^']+' not in '(\w+)'", text)
    schemas = {s.__name__: s for options in OPTIONS.values() for s in options.values()}
    if key and unknown and unknown.group(1) in schemas and "." in key:
        return PipelineError(unknown_key_message(key, schemas[unknown.group(1)]), key)
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip()
        and not re.match(r"(full_key|object_type|reference_type|provider)=?:?", line.strip())
        and not line.startswith("Config search path")
        and "HYDRA_FULL_ERROR" not in line
    ]
    msg = "; ".join(lines).replace(":;", ":").replace("Available options", "available options")
    if "(config key: " in msg:
        key = None
    return PipelineError(msg or type(err).__name__, key)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _full_key(err: BaseException) -> str | None:
    while err is not None:
        key = getattr(err, "full_key", None)
        if key:
            return key
        err = err.__cause__  # type: ignore[assignment]
    return None


# ---- sweeps --------------------------------------------------------------------------------


def check_sweep(overrides: list[str]) -> None:
    """Refuse a ``--multirun`` whose jobs would all write one ``storage.path``.

    The default path (``hessians.h5`` in each job's directory) is always per job; an explicit
    one must contain an interpolation (``${hydra:job.num}``) or take as many values as there
    are jobs.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    jobs, paths, interpolated = 1, None, False
    for o in parsed:
        values = (
            list(o.sweep_string_iterator())
            if o.is_sweep_override()
            else [o.get_value_element_as_str()]
        )
        jobs *= max(1, len(values))
        if o.key_or_group == "storage.path":
            paths, interpolated = values, "${" in (o.input_line or "")
    if paths is None or interpolated:
        return
    if len(set(paths)) < jobs:
        raise PipelineError(
            f"the {jobs} jobs of this sweep would write {len(set(paths))} storage.path "
            f"({paths[0]}{', ...' if len(paths) > 1 else ''}): put ${{hydra:job.num}} in it "
            "(storage.path=out/h${hydra:job.num}.h5) or leave it unset (each job writes "
            "hessians.h5 in its own directory)",
            "storage.path",
        )


class SweepCheck(Callback):
    """Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``): :func:`check_sweep` before
    the first job of a ``--multirun``. Hydra turns a callback's exceptions into warnings, so a
    refusal exits here, with the one-line error."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_sweep(list(config.hydra.overrides.task))
        except PipelineError as err:
            import sys

            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(1) from None
