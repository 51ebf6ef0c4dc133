"""Models as people write them: classes with their own ``forward`` (functional activations, views,
residual adds, ``log_softmax`` heads, LayerNorm, attention), not ``nn.Sequential`` chains.

Each factory takes sizes, so the tests build small instances (float64 against autograd) and
``benchmarks/zoo.py`` the real ones. ``ZOO`` lists them with their benchmark sizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MnistNet(nn.Module):
    """The PyTorch MNIST example (examples/mnist/main.py): conv-conv-max pool-dropout-flatten-fc-
    dropout-fc-log_softmax, with ReLU or tanh.

    Args:
        side: input side (28 for MNIST: 1 x 28 x 28); c1, c2, hidden: widths (32, 64, 128).
    """

    def __init__(self, act: str = "relu", side: int = 28, c1: int = 32, c2: int = 64,
                 hidden: int = 128):  # fmt: skip
        super().__init__()
        self.act = torch.relu if act == "relu" else torch.tanh
        self.conv1 = nn.Conv2d(1, c1, 3, 1)
        self.conv2 = nn.Conv2d(c1, c2, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(c2 * ((side - 4) // 2) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.act(x)
        x = self.conv2(x)
        x = self.act(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = self.act(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


class LeNet5(nn.Module):
    """LeNet-5 with tanh and average pools through ``F`` (1 x 28 x 28 inputs, padded conv1)."""

    def __init__(self, side: int = 28, c1: int = 6, c2: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        flat = c2 * ((side // 2 - 4) // 2) ** 2
        self.fc1 = nn.Linear(flat, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.avg_pool2d(torch.tanh(self.conv1(x)), 2)
        x = F.avg_pool2d(torch.tanh(self.conv2(x)), 2)
        x = x.view(x.size(0), -1)
        x = torch.tanh(self.fc1(x))
        x = torch.tanh(self.fc2(x))
        return self.fc3(x)


class TabularMLP(nn.Module):
    """A tabular MLP: Linear-LayerNorm-GELU, Linear-LayerNorm-SiLU (functional), Linear."""

    def __init__(self, d: int = 512, hidden: int = 256, n_out: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.norm1(self.fc1(x)))
        h = F.silu(self.norm2(self.fc2(h)))
        return self.head(h)


class BasicBlock(nn.Module):
    def __init__(self, channels: int, act: Callable[[Tensor], Tensor]):
        super().__init__()
        self.act = act
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.act(out)


class SmallResNet(nn.Module):
    """A ResNet for 3 x 16 x 16 inputs: stem, two residual blocks, adaptive average pool, fc."""

    def __init__(self, act: str = "relu", channels: int = 16, blocks: int = 2, n_out: int = 10):
        super().__init__()
        self.act = F.relu if act == "relu" else F.gelu
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.layers = nn.Sequential(*[BasicBlock(channels, self.act) for _ in range(blocks)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, n_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.bn(self.stem(x)))
        x = self.layers(x)
        x = self.pool(x).flatten(1)
        return self.fc(x)


class TransformerBlock(nn.Module):
    """A pre-norm transformer block on a sequence of T embeddings (T, E): multi-head attention
    written out (q, k, v projections, softmax(q k^T / sqrt(d)) v), a GELU MLP, residual adds,
    then the mean over tokens and a linear head."""

    def __init__(self, dim: int = 32, heads: int = 2, n_out: int = 10):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, n_out)

    def forward(self, x: Tensor) -> Tensor:
        b, t, e = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q = q.view(b, t, self.heads, e // self.heads).transpose(1, 2)
        k = k.view(b, t, self.heads, e // self.heads).transpose(1, 2)
        v = v.view(b, t, self.heads, e // self.heads).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(e // self.heads), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, e)
        x = x + self.proj(y)
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(x.mean(dim=1))


def randomize_batchnorm(net: nn.Module) -> nn.Module:
    """Running statistics and weights away from 0 and 1, so that BatchNorm is not an identity."""
    gen = torch.Generator().manual_seed(0)
    for bn in net.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            c = bn.num_features
            bn.running_mean.copy_(torch.rand(c, generator=gen) * 2 - 1)
            bn.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
            bn.weight.data.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
    return net


@dataclass(frozen=True)
class ZooModel:
    """A zoo entry: its factory at benchmark size, the input shape S, the outputs to
    differentiate (a list of indices or ``"loss"``), and a small version for float64 tests."""

    name: str
    factory: Callable[[], nn.Module]
    shape: tuple[int, ...]
    outputs: object
    small: Callable[[], nn.Module]
    small_shape: tuple[int, ...]


ZOO: list[ZooModel] = [
    ZooModel("mnist_relu", lambda: MnistNet("relu"), (1, 28, 28), [2],
             lambda: MnistNet("relu", side=10, c1=3, c2=4, hidden=8), (1, 10, 10)),
    ZooModel("mnist_tanh", lambda: MnistNet("tanh"), (1, 28, 28), [2],
             lambda: MnistNet("tanh", side=10, c1=3, c2=4, hidden=8), (1, 10, 10)),
    ZooModel("lenet5", LeNet5, (1, 28, 28), [2],
             lambda: LeNet5(side=16, c1=2, c2=3), (1, 16, 16)),
    ZooModel("tabular_mlp", TabularMLP, (512,), [2],
             lambda: TabularMLP(d=12, hidden=9, n_out=4), (12,)),
    ZooModel("resnet_relu_loss", lambda: randomize_batchnorm(SmallResNet("relu")), (3, 16, 16),
             "loss", lambda: randomize_batchnorm(SmallResNet("relu", channels=3)), (3, 5, 5)),
    ZooModel("resnet_gelu", lambda: randomize_batchnorm(SmallResNet("gelu")), (3, 16, 16), [2],
             lambda: randomize_batchnorm(SmallResNet("gelu", channels=3)), (3, 5, 5)),
    ZooModel("transformer", TransformerBlock, (8, 32), [2],
             lambda: TransformerBlock(dim=8, heads=2, n_out=4), (5, 8)),
]  # fmt: skip
ZOO_BY_NAME = {z.name: z for z in ZOO}
