"""The validation stage: everything a run needs is checked before it creates anything.

NOTE: [validation before anything exists] ``run`` calls :func:`complete_config` and
:func:`validate` before it creates a directory, a lock, a shard or a file, so a refused run leaves
the file system as it was and its corrected rerun is not mistaken for an interrupted run. In
order (cheap checks first):
1. the config, typed per option (``pipeline.config.OPTIONS``): keys of another option, types,
   ranges, required values; a partial config (``run({"data": {...}})``) is completed by composing
   the defaults exactly as the command line does;
2. ``storage.path``: not a directory, its parent creatable and writable (nothing is created);
3. the backend: the device exists, dask-cuda is installed, the scheduler answers within
   ``backend.connect_timeout_s`` (a scheduler file is read here: missing or not JSON is one line);
4. the job: model (finite weights), data and labels (finite), target, method;
5. the plan of blocks (said when it rounds ``storage.block_rows`` or leaves Dask workers idle);
6. the model on one sample through the chosen method (a model that ``vmap`` cannot transform
   fails here, not on a worker halfway through the run).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import OPTIONS, Config, compose, to_plain
from .errors import PipelineError
from .hessian.methods import METHODS
from .job import Job, build_job, model_key
from .plan import Plan, make_plan
from .store import compression_options

log = logging.getLogger(__name__)
GROUPS = ("model", "data", "target", "method", "backend", "storage")
PROBE_ROWS = 2  # Hessian rows of sample 0 computed by the one-sample check


@dataclass
class Checked:
    """What the validation built: the job and its plan of blocks."""

    job: Job
    plan: Plan


# ---- 1. the config -------------------------------------------------------------------------


def complete_config(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The resolved config as a plain dict, checked per option (see NOTE: [validation before
    anything exists]); a partial one is completed with the defaults of ``conf/``."""
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
    return plain


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
    if cfg["backend"]["name"] == "address" and not (
        cfg["backend"].get("address") or cfg["backend"].get("scheduler_file")
    ):
        raise PipelineError(
            "backend=address needs backend.address=tcp://host:8786 or backend.scheduler_file",
            "backend.address",
        )
    if cfg["data"]["name"] == "synthetic" and any(s < 1 for s in cfg["data"]["shape"]):
        raise PipelineError(
            f"data.shape={cfg['data']['shape']} must have positive entries (D = prod(S) > 0)",
            "data.shape",
        )
    compression_options(cfg["storage"].get("compression"))


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


# ---- 2.-6. the environment, the job, the plan, one sample ------------------------------------


def validate(cfg: dict[str, Any], path: Path) -> Checked:
    """Check everything a run needs before it creates anything; returns the job and its plan.

    Args:
        cfg: a config from :func:`complete_config`.
        path: ``storage.path`` resolved (``pipeline.run.output_path``).

    Raises:
        PipelineError: naming the config key to change.
    """
    check_storage_path(path)
    check_backend(cfg["backend"])
    job = build_job(cfg)
    if cfg["storage"]["mode"] == "resume" and job.code_fingerprint is None:
        raise PipelineError(
            "cannot resume: the source code of the model is not readable (defined "
            "interactively?), so this run cannot prove that the model is unchanged; use "
            "storage.mode=overwrite",
            "storage.mode",
        )
    plan = plan_blocks(job)
    probe(job)
    return Checked(job, plan)


def check_storage_path(path: Path) -> None:
    """``storage.path`` must name a file in a directory that exists or can be created."""
    if path.is_dir():
        raise PipelineError(
            f"storage.path {path} is a directory: give a file name, e.g. {path / 'hessians.h5'}",
            "storage.path",
        )
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise PipelineError(
            f"cannot write to {path.parent}: a part of the path is a file, not a directory",
            "storage.path",
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PipelineError(f"cannot write to {path.parent}: permission denied", "storage.path")


def check_backend(backend: dict[str, Any]) -> None:
    """The device exists; dask-cuda is installed; the scheduler answers in time."""
    from .backends import compute_device, scheduler_address

    name = backend["name"]
    if name == "local":
        compute_device(backend)
    elif name == "dask_cuda":
        try:
            import dask_cuda  # noqa: F401
        except ImportError as err:
            raise PipelineError(
                "backend=dask_cuda needs dask-cuda: pip install dask-cuda", "backend"
            ) from err
        if not torch.cuda.is_available():
            raise PipelineError("backend=dask_cuda but no CUDA device is available", "backend")
    elif name == "address":
        check_scheduler(backend, scheduler_address(backend))


def check_scheduler(backend: dict[str, Any], address: str) -> None:
    """Connect to the scheduler once, within ``backend.connect_timeout_s``."""
    from .backends import connect

    with connect(backend, address):
        pass


def plan_blocks(job: Job) -> Plan:
    """The plan of blocks; says in one line when ``storage.block_rows`` was rounded to whole
    HDF5 chunks, or when a Dask cluster of the run gets fewer blocks than workers."""
    st, backend = job.cfg["storage"], job.cfg["backend"]
    n, k, d = len(job.data.x), job.target.n_outputs, job.dim
    plan = make_plan(n, k, d, job.data.x.element_size(), st.get("block_rows"), st["block_mb"])
    asked = st.get("block_rows")
    if asked is not None and plan.block_rows != min(asked, d):
        log.warning(
            "storage.block_rows=%d gives blocks of %d rows: a block holds whole HDF5 chunks of "
            "%d rows, and %d has no divisor near that size",
            asked,
            plan.block_rows,
            plan.chunks[2],
            asked,
        )
    if backend["name"] == "dask":
        idle_workers(len(plan.blocks), backend["n_workers"])
    return plan


def idle_workers(n_blocks: int, n_workers: int) -> None:
    """One line when a Dask job has fewer blocks than workers."""
    if n_blocks < n_workers:
        log.warning(
            "%d block(s) for %d Dask workers: %d worker(s) will have nothing to do; a smaller "
            "storage.block_rows or storage.block_mb splits the work",
            n_blocks,
            n_workers,
            n_workers - n_blocks,
        )


def probe(job: Job) -> None:
    """Compute a few Hessian rows of sample 0 with the job's method on the run's device."""
    from .backends import compute_device

    device = compute_device(job.cfg["backend"])
    rows = torch.arange(min(PROBE_ROWS, job.dim), device=device)
    try:
        job.method.compute(
            job.model.to(device),
            job.data.x[:1].to(device),
            job.target.subset(0, 1).to(device),
            rows,
            job.memory_budget,
        )
    except PipelineError:
        raise
    except Exception as err:
        chosen = job.cfg["method"]["name"]
        raise PipelineError(
            f"method {job.method.name!r} fails on this model (sample 0): {type(err).__name__}: "
            f"{_first_line(err)[:240]}; torch.func must be able to transform the model's forward "
            "(no .numpy(), .item() or Python branches on tensor values)",
            "method.name" if chosen != "auto" else model_key(job.cfg),
        ) from err
    finally:
        job.model.to("cpu")


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
