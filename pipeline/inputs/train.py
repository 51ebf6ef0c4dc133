"""Train the bundled digits models and write their checkpoints: ``python -m pipeline.train``."""

from __future__ import annotations

import argparse

import torch
from torch import nn

from .data import load_digits_arrays
from .models import CHECKPOINTS, digits_cnn, digits_mlp


def train(net: nn.Module, epochs: int = 60, seed: int = 0) -> float:
    """Fit ``net`` on the first 1500 digits with Adam; return accuracy on the remaining 297."""
    torch.manual_seed(seed)
    x, y = load_digits_arrays()
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    xtr, ytr, xte, yte = x[:1500], y[:1500], x[1500:], y[1500:]
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 64):
            b = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(net(xtr[b]), ytr[b]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        return (net(xte).argmax(-1) == yte).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    CHECKPOINTS.mkdir(exist_ok=True)
    for name, factory in (("mlp", digits_mlp), ("cnn", digits_cnn)):
        for act in ("tanh", "relu"):
            torch.manual_seed(0)
            net = factory(activation=act, pretrained=False)
            acc = train(net, args.epochs)
            path = CHECKPOINTS / f"digits_{name}_{act}.pt"
            torch.save(net.state_dict(), path)
            print(f"{path.name}: test accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
