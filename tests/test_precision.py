"""The TF32 switch: scoped, measured, recorded; ignored (and said so) where it cannot apply."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from pipeline.config.precision import tf32, tf32_error
from pipeline.execution.run import run
from pipeline.hessian.methods import METHODS
from pipeline.hessian.targets import make_target

from .configs import config, read_hessian
from .nets import mlp

JOB = ("data=synthetic", "data.shape=[16]", "data.n_samples=3", "model=custom",
       "+model.net._target_=tests.nets.mlp", "+model.net.d=16")  # fmt: skip


def test_tf32_switch_is_scoped():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with tf32(not before[0]):
        assert torch.backends.cuda.matmul.allow_tf32 is (not before[0])
        assert torch.backends.cudnn.allow_tf32 is (not before[0])
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_tf32_error_compares_the_method_with_and_without_tf32():
    """tf32_error runs the method once with TF32 allowed and once without, and measures the
    relative difference: here a method that shifts its result by 1e-3 of its largest entry when
    TF32 is on (what a GPU's TF32 matmuls do, which a CPU cannot show)."""
    torch.manual_seed(0)
    net, x = mlp(16).eval(), torch.randn(2, 16)
    target = make_target([1], net(x).detach())
    exact = METHODS["structured"].compute

    def with_tf32_error(model, x, target, rows, budget):
        h, g = exact(model, x, target, rows, budget)
        if torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32:
            h = h + 1e-3 * h.abs().max()
        return h, g

    err = tf32_error(with_tf32_error, net, x, target, torch.arange(16), 1 << 26)
    assert err == pytest.approx(1e-3, rel=1e-3)
    assert tf32_error(exact, net, x, target, torch.arange(16), 1 << 26) == 0.0


def test_tf32_on_the_cpu_is_recorded_as_ignored(tmp_path):
    plain, fast = tmp_path / "plain.h5", tmp_path / "fast.h5"
    run(config(*JOB, f"storage.path={plain}"))
    run(config(*JOB, "method.tf32=true", f"storage.path={fast}"))
    with h5py.File(fast) as f:
        assert f.attrs["tf32"].startswith("ignored"), f.attrs["tf32"]
        assert "tf32_max_rel_error" not in f.attrs
    with h5py.File(plain) as f:
        assert "tf32" not in f.attrs
    np.testing.assert_array_equal(read_hessian(fast), read_hessian(plain))
