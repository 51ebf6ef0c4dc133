"""Models that no one on the team wrote: small configurations of torchvision's and timm's
architectures and hessQuik's networks, built from their constructors with random weights (no
downloads), plus a physics-informed MLP and a pair potential written as their authors' tutorials
write them.

Each entry builds (model, input shape, outputs); ``LIBRARY`` is the table the tests and
``benchmarks/zoo.py`` read. A package that is missing, or whose import fails with the installed
torch, makes its entries skip with the reason (``unavailable``), never fail.

torchvision's wheel does not load its compiled ops with the CPU build of torch:
``import_torchvision`` (``pipeline/inputs/libraries.py``) imports it anyway (no model here calls
those ops); call it before importing timm.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.inputs.libraries import import_torchvision


def unavailable(package: str) -> str | None:
    """Why ``package`` cannot be used here, or None when it can."""
    try:
        if package == "torchvision":
            import_torchvision()
        elif package == "timm":
            import_torchvision()  # timm imports torchvision when it is installed
            importlib.import_module("timm")
        else:
            importlib.import_module(package)
    except Exception as err:  # noqa: BLE001 - any import failure is a reason to skip
        return f"{package} is not importable here ({type(err).__name__}: {str(err)[:120]})"
    return None


class FirstOutput(nn.Module):
    """hessQuik's networks return (f, df, d2f): f (N, m) alone, as a user wraps them."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[0]


class PINN(nn.Module):
    """u(x, t) = tanh MLP on the two coordinates, as the PINN tutorials write it (a
    ``torch.cat`` of the columns and ``nn.Sequential`` inside)."""

    def __init__(self, width: int = 32, depth: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(2, width), nn.Tanh()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.Tanh()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(self, xt: Tensor) -> Tensor:
        x, t = xt[:, 0:1], xt[:, 1:2]
        return self.net(torch.cat([x, t], dim=1))


class PairPotential(nn.Module):
    """E(positions) = sum over pairs of an MLP of the distance: positions (N, P, 3) -> (N, 1)."""

    def __init__(self, particles: int = 5, width: int = 16):
        super().__init__()
        i, j = torch.triu_indices(particles, particles, 1)
        self.register_buffer("i", i)
        self.register_buffer("j", j)
        self.phi = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, width),
                                 nn.SiLU(), nn.Linear(width, 1))  # fmt: skip

    def forward(self, pos: Tensor) -> Tensor:
        diff = pos[:, self.i] - pos[:, self.j]  # (N, pairs, 3)
        r = torch.sqrt((diff * diff).sum(-1, keepdim=True) + 1e-12)
        return self.phi(r).sum(dim=1)


def _hessquik(kind: str) -> nn.Module:
    import hessQuik.activations as act
    import hessQuik.layers as lay
    import hessQuik.networks as net

    d, w = 6, 8
    if kind == "fully_connected":
        return net.fullyConnectedNN([d, w, w, 3], act=act.tanhActivation())
    if kind == "resnet":
        return net.NN(lay.singleLayer(d, w, act=act.softplusActivation()),
                      net.resnetNN(w, 2, act=act.tanhActivation()),
                      lay.singleLayer(w, 2, act=act.identityActivation()))  # fmt: skip
    if kind == "icnn":
        return net.ICNN(d, [None, w, w, 1], act=act.softplusActivation())
    raise ValueError(kind)


def _torchvision(name: str) -> nn.Module:
    tv = import_torchvision()
    m = tv.models
    if name == "vit":
        return m.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2,
                                   hidden_dim=8, mlp_dim=16, num_classes=4)  # fmt: skip
    if name == "mobilenet_v3":
        return m.mobilenet_v3_small(num_classes=4, width_mult=0.25)
    if name == "resnet18":
        return m.resnet18(num_classes=4)
    if name == "efficientnet_b0":
        from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf

        setting, last = _efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
        return EfficientNet(setting, dropout=0.2, last_channel=last, num_classes=4)
    raise ValueError(name)


def _timm(name: str) -> nn.Module:
    import_torchvision()
    from timm.models import convnext, mlp_mixer, mobilenetv3, swin_transformer, vision_transformer

    if name == "vit":
        return vision_transformer.VisionTransformer(
            img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=4
        )
    if name == "lcnet":
        return mobilenetv3._gen_lcnet("lcnet_035", 0.35, num_classes=4)
    if name == "convnext":
        return convnext.ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), num_classes=4)
    if name == "mixer":
        return mlp_mixer.MlpMixer(
            img_size=16, patch_size=8, embed_dim=16, num_blocks=1, num_classes=4
        )
    if name == "swin":  # 4x4 patches in windows of 2x2, the second block's shifted (masked)
        return swin_transformer.SwinTransformer(
            img_size=16, patch_size=4, window_size=2, embed_dim=8, depths=(2,), num_heads=(2,),
            num_classes=4,
        )  # fmt: skip
    raise ValueError(name)


@torch.no_grad()
def randomized(model: nn.Module, scale: float = 0.1) -> nn.Module:
    """``model`` with noise added to every parameter, ``scale`` times its spread (or ``scale``
    where all its entries are equal): libraries initialise heads to zero (a ViT's, a Mixer's),
    LayerScale to 1e-6 and norms to 1, which makes a Hessian vanish or every channel alike."""
    for p in model.parameters():
        spread = p.std() if p.numel() > 1 else p.new_zeros(())
        p.add_(scale * torch.randn_like(p) * torch.where(spread > 0, spread, 1.0))
    return model


@dataclass(frozen=True)
class LibraryModel:
    """A library architecture as a test case.

    Attributes:
        name: the case's id.
        package: what it needs (skipped without it).
        factory: () -> the model as its constructor makes it.
        shape: per-sample input shape S.
        outputs: output indices, or ``"loss"`` (cross-entropy against labels).
        method: the method ``auto`` must choose.
    """

    name: str
    package: str
    factory: Callable[[], nn.Module]
    shape: tuple[int, ...]
    outputs: list[int] | str
    method: str = "structured"

    def build(self, seed: int = 0) -> nn.Module:
        """The model with random weights (``randomized``) and its BatchNorm statistics taken
        from a random batch (with the running statistics of a new model, activations of deep
        nets shrink to ~1e-10), in eval mode."""
        torch.manual_seed(seed)
        model = randomized(self.factory())
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if norms:
            for m in norms:
                m.momentum = 1.0  # the running statistics become this batch's
            with torch.no_grad():
                model.train()(torch.randn(8, *self.shape))
        return model.eval()


LIBRARY: list[LibraryModel] = [
    LibraryModel("hessquik_fc", "hessQuik", lambda: FirstOutput(_hessquik("fully_connected")),
                 (6,), [0, 2]),
    LibraryModel("hessquik_resnet", "hessQuik", lambda: FirstOutput(_hessquik("resnet")),
                 (6,), [1]),
    LibraryModel("hessquik_icnn", "hessQuik", lambda: FirstOutput(_hessquik("icnn")), (6,), [0]),
    LibraryModel("tv_vit", "torchvision", lambda: _torchvision("vit"), (3, 16, 16), [1]),
    LibraryModel("tv_mobilenet_v3", "torchvision", lambda: _torchvision("mobilenet_v3"),
                 (3, 16, 16), [0]),
    LibraryModel("tv_resnet18_loss", "torchvision", lambda: _torchvision("resnet18"),
                 (3, 16, 16), "loss", "piecewise"),
    LibraryModel("tv_efficientnet_b0", "torchvision", lambda: _torchvision("efficientnet_b0"),
                 (3, 16, 16), [2]),
    LibraryModel("timm_vit", "timm", lambda: _timm("vit"), (3, 16, 16), [0]),
    LibraryModel("timm_lcnet", "timm", lambda: _timm("lcnet"), (3, 16, 16), [3]),
    LibraryModel("timm_convnext", "timm", lambda: _timm("convnext"), (3, 32, 32), [1]),
    LibraryModel("timm_mixer", "timm", lambda: _timm("mixer"), (3, 16, 16), [2]),
    LibraryModel("timm_swin", "timm", lambda: _timm("swin"), (3, 16, 16), [1]),
    LibraryModel("pinn", "torch", PINN, (2,), [0]),
    LibraryModel("pair_potential", "torch", PairPotential, (5, 3), [0]),
]  # fmt: skip
LIBRARY_BY_NAME = {m.name: m for m in LIBRARY}
