"""Built-in networks for the bundled digits data, and loading any model a config names."""

from __future__ import annotations

import logging
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..config.schema import ModelConf
from ..errors import PipelineError
from ..hessian.support import training_layers

CHECKPOINTS = Path(__file__).parent / "checkpoints"
ACTIVATIONS = {
    "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus, "gelu": nn.GELU,
    "silu": nn.SiLU, "elu": nn.ELU, "relu": nn.ReLU,
}  # fmt: skip


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise PipelineError(
            f"unknown activation {name!r}: choose one of {list(ACTIVATIONS)}",
            "model.net.activation",
        )
    return ACTIVATIONS[name]()


def digits_mlp(
    hidden: tuple[int, ...] = (64, 64), activation: str = "tanh", pretrained: bool = True
) -> nn.Sequential:
    """MLP for (1, 8, 8) digits: Flatten -> [Linear -> act] * len(hidden) -> Linear(10).

    With ``pretrained`` the bundled checkpoint for this activation is loaded (default sizes only).
    """
    layers: list[nn.Module] = [nn.Flatten()]
    width = 64
    for h in hidden:
        layers += [nn.Linear(width, h), _activation(activation)]
        width = h
    layers.append(nn.Linear(width, 10))
    net = nn.Sequential(*layers)
    if pretrained:
        _load_bundled(net, f"digits_mlp_{activation}.pt", tuple(hidden) == (64, 64))
    return net


def mlp(
    in_features: int,
    hidden: tuple[int, ...] = (256, 256),
    out_features: int = 10,
    activation: str = "tanh",
    seed: int = 0,
) -> nn.Sequential:
    """A randomly initialised MLP (seeded) over flattened inputs: for benchmarks and sweeps."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), _activation(activation)]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, out_features))


def convnet(
    in_channels: int = 3,
    size: int = 32,
    width: int = 16,
    out_features: int = 10,
    activation: str = "relu",
    seed: int = 0,
) -> nn.Sequential:
    """A randomly initialised CNN (seeded) for (in_channels, size, size) images: two 3x3 convs
    with 2x2 max pools, then a linear layer; for benchmarks and sweeps."""
    torch.manual_seed(seed)
    side = size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), _activation(activation), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), _activation(activation), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * side * side, out_features),
    )  # fmt: skip


def digits_cnn(activation: str = "tanh", pretrained: bool = True) -> nn.Sequential:
    """Small CNN for (1, 8, 8) digits: conv8 -> conv16 (stride 2) -> fc32 -> fc10."""
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), _activation(activation),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), _activation(activation),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), _activation(activation), nn.Linear(32, 10),
    )  # fmt: skip
    if pretrained:
        _load_bundled(net, f"digits_cnn_{activation}.pt", True)
    return net


def _load_bundled(net: nn.Module, name: str, default_shape: bool) -> None:
    path = CHECKPOINTS / name
    if not default_shape or not path.exists():
        raise PipelineError(
            f"no bundled checkpoint {name} for these settings: set model.net.pretrained=false "
            "or train one with `python -m pipeline.train`",
            "model.net.pretrained",
        )
    net.load_state_dict(torch.load(path, weights_only=True))


def build_model(model_cfg: ModelConf, dtype: torch.dtype, device: str = "cpu") -> nn.Module:
    """The model a typed ``model`` config describes, in eval mode, in ``dtype`` on ``device``.

    ``model_cfg`` has ``net`` (a Hydra instantiate node) and an optional ``checkpoint``, or, for
    ``exported`` models, ``path`` to a ``torch.export`` program.
    """
    from hydra.utils import instantiate

    if getattr(model_cfg, "path", None):
        net = _load_exported(model_cfg.path, model_cfg.trust)
    else:
        net_cfg = model_cfg.net
        if not net_cfg or not net_cfg.get("_target_"):
            raise PipelineError("no model given: set model.net._target_", "model.net._target_")
        try:
            net = instantiate(net_cfg)
        except Exception as err:
            # Hydra wraps what the factory raises in an InstantiationException: a PipelineError
            # of the factory (e.g. a bad model.net.activation) is the one-line message to show.
            cause = _pipeline_error_in_chain(err)
            if cause is not None:
                raise cause from None
            raise PipelineError(
                f"cannot build {net_cfg['_target_']!r}: {_root_cause(err)}", "model.net._target_"
            ) from err
        if not isinstance(net, nn.Module):
            raise PipelineError(
                f"{net_cfg['_target_']!r} returned {type(net).__name__}, not a torch.nn.Module",
                "model.net._target_",
            )
    if getattr(model_cfg, "checkpoint", None):
        _load_checkpoint(net, model_cfg.checkpoint)
    if training_layers(net):
        warnings.warn(
            f"BatchNorm/Dropout layers in training mode ({', '.join(training_layers(net)[:3])}): "
            "the Hessians are computed in eval mode",
            stacklevel=2,
        )
    return net.to(device=device, dtype=dtype).eval()


class ExportedModel(nn.Module):
    """A ``torch.export`` program as an ordinary module.

    The module of an exported program refuses ``eval()``/``train()`` (its mode was fixed when it was
    exported), and the Hessian methods switch modes; here the switch only sets the flag. The
    program's input guards become one-line errors: the methods evaluate one sample at a time, so
    the batch axis must have been exported as dynamic.
    """

    def __init__(self, program: nn.Module, path: str):
        super().__init__()
        self.program = program
        self.path = path

    def train(self, mode: bool = True) -> ExportedModel:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.program(x)
        except (AssertionError, RuntimeError) as err:
            if "guard" not in str(err).lower():
                raise
            raise PipelineError(
                f"the exported program {self.path!r} does not accept inputs of shape "
                f"{tuple(x.shape)} ({str(err).strip().splitlines()[0]}): export it with a dynamic "
                "batch axis, dynamic_shapes={'x': {0: torch.export.Dim('batch')}}",
                "model.path",
            ) from err


def _load_exported(path: str, trust: bool) -> nn.Module:
    """A ``torch.export.save``d program; ``trust``: the user trusts the file (see docs/faults.md,
    Trust: ``torch.export.load`` unpickles parts of the archive, which can run code)."""
    if not Path(path).is_file():
        raise PipelineError(f"exported program {path!r} not found", "model.path")
    if not zipfile.is_zipfile(path):
        raise PipelineError(
            f"{path!r} is not a torch.export program (not a zip archive)", "model.path"
        )
    if not trust:
        raise PipelineError(
            f"loading the exported program {path!r} unpickles parts of it, which can run any "
            "code the file contains: set model.trust=true if you trust this file",
            "model.trust",
        )
    # torch logs a traceback for a bad archive, then raises an error that points at it: the
    # logged error is caught here and reported once, in the one line
    caught = _Caught()
    names = {"torch.export", "torch._export", *logging.Logger.manager.loggerDict}
    loggers = [
        logging.getLogger(n) for n in names if n.startswith(("torch.export", "torch._export"))
    ]
    saved = [(lg.handlers, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [caught], False
    try:
        return ExportedModel(torch.export.load(path).module(), path)
    except Exception as err:
        cause = caught.error if caught.error and "above" in str(err) else err  # "see above"
        raise PipelineError(
            f"cannot load exported program {path!r}: {_root_cause(cause)}", "model.path"
        ) from err
    finally:
        for lg, (handlers, propagate) in zip(loggers, saved, strict=True):
            lg.handlers, lg.propagate = handlers, propagate


class _Caught(logging.Handler):
    """Keeps the first exception that a logger reports (instead of printing its traceback)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.error: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.error is None and record.exc_info and record.exc_info[1] is not None:
            self.error = record.exc_info[1]


def _load_checkpoint(net: nn.Module, path: str) -> None:
    if not Path(path).is_file():
        raise PipelineError(f"checkpoint {path!r} not found", "model.checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PipelineError(
            f"checkpoint {path!r} is not a readable state_dict: {_root_cause(err)}",
            "model.checkpoint",
        ) from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        net.load_state_dict(state)
    except Exception as err:
        first = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])[:300]
        raise PipelineError(
            f"checkpoint {path!r} does not fit the model architecture: {detail}",
            "model.checkpoint",
        ) from err


def _pipeline_error_in_chain(err: BaseException) -> PipelineError | None:
    seen: BaseException | None = err
    while seen is not None and not isinstance(seen, PipelineError):
        seen = seen.__cause__
    return seen


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}"
