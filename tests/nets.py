"""Small model factories that tests name in configs (``model.net._target_=tests.nets.mlp``)."""

from __future__ import annotations

import os
import time

import torch
from torch import nn


def mlp(d: int = 64, hidden: int = 32, out: int = 10, seed: int = 0) -> nn.Module:
    """A tanh MLP D -> hidden -> hidden -> out with seeded weights."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.GELU(),
        nn.Linear(hidden, out),
    )  # fmt: skip


def pause(x: torch.Tensor) -> torch.Tensor:
    """Sleeps ``$SLOW_NET_DELAY`` seconds and returns x; a call in a captured graph (``fx.wrap``),
    so that it sleeps in every forward of the graph engine, not once while it traces."""
    time.sleep(float(os.environ.get("SLOW_NET_DELAY", "0")))
    return x


torch.fx.wrap("pause")


class Slow(nn.Module):
    """An MLP that sleeps ``$SLOW_NET_DELAY`` seconds in each forward (the config stays the same,
    so a slow run and a fast resume share a fingerprint): makes runs long enough to kill part way.
    """

    def __init__(self, d: int = 64):
        super().__init__()
        self.net = mlp(d)

    def forward(self, x):
        return self.net(pause(x))


def with_dropout_in_training(d: int = 64) -> nn.Module:
    """A net with Dropout, returned in training mode (the pipeline must switch it to eval)."""
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(d, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3)
    )
    return net.train()


class TokenModel(nn.Module):
    """Embeds inputs as integer ids: not differentiable in its input."""

    def __init__(self, vocab: int = 16, out: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, 4)
        self.head = nn.Linear(4, out)

    def forward(self, x):
        return self.head(self.emb(x.abs().long().clamp(max=15).flatten(1)).mean(1))


class Cusp(nn.Module):
    """Finite outputs whose second derivative in x_0 is infinite where x_0 = 0 (sqrt(|x_0|))."""

    def __init__(self, d: int = 8, out: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(d, out)

    def forward(self, x):
        x = x.flatten(1)
        return self.lin(torch.tanh(x)) + x[:, :1].abs().sqrt()


class Branching(nn.Module):
    """An MLP whose forward branches on a tensor value: torch.fx cannot capture its graph."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.net = mlp(d)

    def forward(self, x):
        if x.sum() > 0:
            return self.net(x)
        return self.net(-x)


def linear(d: int = 64, out: int = 10) -> nn.Module:
    """An affine model: every Hessian is exactly zero."""
    return nn.Sequential(nn.Flatten(), nn.Linear(d, out))


class NotVmappable(nn.Module):
    """A net whose forward leaves torch (``.numpy()``): runs on plain tensors, fails under vmap."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.net = mlp(d)

    def forward(self, x):
        return self.net(torch.from_numpy(x.detach().numpy()))


class Raises(nn.Module):
    """A net whose forward raises an error of its own (not a shape mismatch)."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.net = mlp(d)

    def forward(self, x):
        raise ValueError("this model refuses to run")


def drawn_per_process(d: int = 64) -> nn.Module:
    """An MLP whose weights depend on the process that builds it (not on torch's seed): a Dask
    worker builds a different model than the driver."""
    torch.manual_seed(os.getpid())
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, 3))
