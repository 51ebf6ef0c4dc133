"""``run(cfg)`` in-process with composed configs: every target option, checked against autograd."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from pipeline.execution.run import run
from pipeline.inputs.data import load_digits_arrays
from pipeline.inputs.models import digits_mlp
from tests.configs import compose_config
from tests.zoo import TargetCase, assert_rel_close, reference

SMALL = ["data.start=5", "data.stop=8", "dtype=float64", "progress=false", "plots=false"]

# (overrides, the zoo's equivalent target, expected /output_index for the 3 samples)
TARGET_OPTIONS = {
    "indices": (["target=indices", "target.indices=[7,2]"], TargetCase("i", [7, 2]), None),
    "all": (["target=all"], TargetCase("a", "all"), None),
    "predicted": (["target=predicted"], TargetCase("p", "predicted"), None),
    "cross_entropy": (["target=loss"], TargetCase("ce", "loss", "cross_entropy"), [-1]),
    "mse": (["target=loss", "target.loss=mse"], TargetCase("mse", "loss", "mse"), [-1]),
}


@pytest.mark.parametrize("overrides, case, output_index", TARGET_OPTIONS.values(),
                         ids=TARGET_OPTIONS.keys())  # fmt: skip
def test_run_every_target_option(tmp_path, overrides, case, output_index):
    cfg = compose_config(*overrides, *SMALL)
    result = run(cfg, tmp_path)
    x_all, y_all = load_digits_arrays()
    x = torch.from_numpy(x_all[5:8]).double()
    labels = torch.from_numpy(y_all[5:8])
    model = digits_mlp().double().eval()
    h_ref, g_ref = reference(model, x, case, labels)
    with h5py.File(result.path, "r") as f:
        assert f["hessian"].shape == result.shape == (3, h_ref.shape[1], 64, 64)
        assert_rel_close(torch.from_numpy(f["hessian"][:]), h_ref, 1e-9)
        assert_rel_close(torch.from_numpy(f["gradient"][:]), g_ref, 1e-9)
        assert f["sample_index"][:].tolist() == [5, 6, 7]
        if case.outputs == "predicted":
            expected = model(x).argmax(1, keepdim=True).numpy()
        elif case.outputs == "all":
            expected = np.arange(10)
        else:
            expected = output_index or case.outputs
        np.testing.assert_array_equal(f["output_index"][:], expected)


def test_a_linear_model_says_why_its_hessians_are_zero(tmp_path, caplog):
    """Issue 11, item 13: a linear model from the command line gave zeros and said nothing."""
    cfg = compose_config("model=custom", "+model.net._target_=tests.nets.linear", *SMALL)
    with caplog.at_level("WARNING"):
        result = run(cfg, tmp_path)
    said = [r.getMessage() for r in caplog.records if "zero" in r.getMessage()]
    assert any("linear in the input" in m for m in said), said
    with h5py.File(result.path, "r") as f:
        assert not np.any(f["hessian"][:])
