"""What a model is made of, as far as the choice of a Hessian method is concerned."""

from __future__ import annotations

from torch import nn

# Layers that are affine in their input (in eval mode) or pass it through unchanged.
AFFINE = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Flatten, nn.Unflatten, nn.Identity,
    nn.Dropout, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.Sequential, nn.ModuleList,
)  # fmt: skip
# Elementwise activations whose second derivative is zero almost everywhere, and max pools.
PIECEWISE_LINEAR = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh, nn.PReLU, nn.MaxPool1d,
                    nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool2d)  # fmt: skip


def leaf_modules(model: nn.Module) -> list[nn.Module]:
    """Modules without children, in registration order."""
    return [m for m in model.modules() if not list(m.children())]


def is_piecewise_linear(model: nn.Module) -> bool:
    """True when every layer is affine or piecewise linear and at least one is piecewise linear.

    Only module-level structure is visible: a ``forward`` that calls ``torch.tanh`` directly is not
    seen, so this can say False for a piecewise-linear net but never True for a smooth one whose
    layers are all modules listed here.
    """
    containers = [m for m in model.modules() if list(m.children())]
    if any(type(m).forward is not nn.Sequential.forward for m in containers):
        return False  # a container with its own forward may compute anything from its layers
    if any(type(m).forward is not _listed_base(m).forward for m in leaf_modules(model)
           if _listed_base(m) is not None):  # fmt: skip
        return False  # a subclass of a listed layer with its own forward
    leaves = leaf_modules(model)
    return (
        bool(leaves)
        and all(isinstance(m, AFFINE + PIECEWISE_LINEAR) for m in leaves)
        and any(isinstance(m, PIECEWISE_LINEAR) for m in leaves)
    )


def _listed_base(m: nn.Module) -> type[nn.Module] | None:
    """The class in AFFINE or PIECEWISE_LINEAR that ``m`` is or subclasses."""
    return next((c for c in type(m).__mro__ if c in AFFINE + PIECEWISE_LINEAR), None)


def training_layers(model: nn.Module) -> list[str]:
    """Names of BatchNorm and Dropout layers that are in training mode."""
    kinds = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
    return [n for n, m in model.named_modules() if isinstance(m, kinds) and m.training]
