"""Every option of every config group composes, builds its model and loads its data.

Required values (``???``) are filled with small real files written to a temporary directory.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

import pipeline
from pipeline import PipelineError
from pipeline.config.schema import register, to_plain
from pipeline.config.validate import complete_config
from pipeline.inputs.data import load_data
from pipeline.inputs.models import build_model
from tests.zoo import assert_close

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = "experiment"  # conf/experiment/: whole runs (`+experiment=NAME`), not a group option
OPTIONS = [
    (group.name, option.stem)
    for group in sorted(CONF.iterdir())
    if group.is_dir() and group.name != EXPERIMENTS
    for option in sorted(group.glob("*.yaml"))
]
USERMOD = "cfgtest_usermod"
USERMOD_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn


    def make_net(in_features=64, hidden=8, n_out=10):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, n_out)
        )


    def not_a_module():
        return 3
    """
)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Small real inputs for the options that need files: arrays, HDF5, a module, an export."""
    d = tmp_path_factory.mktemp("files")
    rng = np.random.default_rng(0)
    x = rng.random((6, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 10, 6)
    np.save(d / "x.npy", x)
    np.save(d / "y.npy", y)
    np.savez(d / "xy.npz", inputs=x, labels=y)
    with h5py.File(d / "xy.h5", "w") as f:
        f["x"], f["y"] = x, y
    (d / f"{USERMOD}.py").write_text(USERMOD_SOURCE)
    torch.manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))
    program = torch.export.export(
        net, (torch.rand(2, 1, 8, 8),), dynamic_shapes={"input": {0: torch.export.Dim("batch")}}
    )
    torch.export.save(program, d / "net.pt2")
    torch.save(net.state_dict(), d / "net_state.pt")
    torch.export.save(torch.export.export(net, (torch.rand(2, 1, 8, 8),)), d / "static.pt2")
    try:
        from ase import Atoms
        from ase.io import write
    except ImportError:  # data=ase is skipped
        pass
    else:
        frames = [Atoms("CH3O", positions=rng.random((5, 3)) * 2) for _ in range(6)]
        write(d / "frames.extxyz", frames)
    return {p.name: p for p in d.iterdir()} | {"dir": d}


def fill(group: str, option: str, files: dict[str, Path]) -> list[str]:
    """Overrides that fill the required values of one option (and keep it small)."""
    return {
        ("model", "custom"): [f"model.net._target_={USERMOD}.make_net", "+model.net.hidden=4"],
        ("model", "exported"): [f"model.path={files['net.pt2']}", "model.trust=true"],
        ("data", "npy"): [f"data.path={files['x.npy']}", f"data.labels_path={files['y.npy']}"],
        ("data", "hdf5"): [f"data.path={files['xy.h5']}", "data.labels_dataset=y"],
        ("output", "rows"): ["output.rows=[0,5]"],
        # positions (N, 5, 3) of five atoms: a model of 15 inputs
        ("data", "ase"): [
            f"data.path={files['frames.extxyz']}",
            "model=custom",
            f"model.net._target_={USERMOD}.make_net",
            "+model.net.in_features=15",
        ],
    }.get((group, option), [])


@pytest.fixture
def hydra_compose(files, monkeypatch):
    """compose(overrides) with the project's conf/ and schema; Hydra's global state is cleared."""
    monkeypatch.syspath_prepend(str(files["dir"]))
    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield lambda overrides: compose("config", overrides=overrides)
    GlobalHydra.instance().clear()


def instantiate_all(node, found: list) -> None:
    """Instantiate every ``_target_`` node of a plain config."""
    if isinstance(node, dict):
        if "_target_" in node:
            found.append(instantiate(node))
        for value in node.values():
            instantiate_all(value, found)
    elif isinstance(node, list):
        for value in node:
            instantiate_all(value, found)


def test_every_group_has_options():
    groups = {g for g, _ in OPTIONS}
    assert groups == {"model", "data", "target", "method", "backend", "storage", "output"}


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_builds_and_loads(hydra_compose, files, group, option):
    if (group, option) == ("data", "ase"):
        pytest.importorskip("ase")
    cfg = hydra_compose([f"{group}={option}", *fill(group, option, files)])
    assert not OmegaConf.missing_keys(cfg), OmegaConf.missing_keys(cfg)
    if group != "storage":
        assert cfg[group].name == option
    plain = to_plain(cfg)
    targets: list = []
    instantiate_all(plain, targets)
    assert all(isinstance(t, nn.Module) for t in targets)
    assert len(targets) == (plain["model"].get("net") is not None)
    checked = complete_config(cfg)
    model = build_model(checked.model, torch.float64)
    assert not model.training
    data = load_data(checked.data, torch.float64)
    assert data.x.dtype == torch.float64 and len(data.x) == len(data.sample_index) > 0
    with torch.no_grad():
        z = model(data.x[:])
    assert z.shape == (len(data.x), 10) and torch.isfinite(z).all()
    if data.labels is not None:
        assert data.labels.shape == (len(data.x),)


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / EXPERIMENTS).glob("*.yaml")))
def test_every_experiment_composes_and_loads(hydra_compose, files, name):
    """An experiment sets options of several groups; its model factory may live in an optional
    package, so the model is checked by composition only (tests/test_ase.py runs one)."""
    pytest.importorskip("ase")  # (the frames of data=ase)
    cfg = hydra_compose([f"+experiment={name}", f"data.path={files['frames.extxyz']}"])
    assert not OmegaConf.missing_keys(cfg), OmegaConf.missing_keys(cfg)
    checked = complete_config(cfg)
    data = load_data(checked.data, torch.float64)
    assert len(data.x) == len(data.sample_index) > 0


def test_exported_model_matches_its_source(hydra_compose, files):
    cfg = complete_config(
        hydra_compose(["model=exported", f"model.path={files['net.pt2']}", "model.trust=true"])
    )
    exported = build_model(cfg.model, torch.float64)
    source = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))
    source.load_state_dict(torch.load(files["net_state.pt"]))
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    for method in ("auto", "reverse_over_reverse"):
        h = pipeline.hessian(exported, x, [0, 7], method=method)
        assert_close(h, pipeline.hessian(source.double(), x, [0, 7]), rtol=0, atol=1e-15)


def test_custom_model_checkpoint_is_loaded(hydra_compose, files, tmp_path):
    over = [f"model.net._target_={USERMOD}.make_net", "+model.net.hidden=4"]
    cfg = complete_config(hydra_compose(["model=custom", *over]))
    net = build_model(cfg.model, torch.float64)
    state = {k: torch.full_like(v, 0.5) for k, v in net.state_dict().items()}
    torch.save(state, tmp_path / "w.pt")
    cfg.model.checkpoint = str(tmp_path / "w.pt")
    loaded = build_model(cfg.model, torch.float64)
    assert all(torch.equal(v, torch.full_like(v, 0.5)) for v in loaded.state_dict().values())


@pytest.mark.parametrize("source", ["npy", "npz", "hdf5"])
def test_explicit_indices_keep_their_order_and_repeats(hydra_compose, files, source):
    over = {
        "npy": ["data=npy", f"data.path={files['x.npy']}", f"data.labels_path={files['y.npy']}"],
        "npz": ["data=npy", f"data.path={files['xy.npz']}", "data.key=inputs",
                f"data.labels_path={files['xy.npz']}", "data.labels_key=labels"],
        "hdf5": ["data=hdf5", f"data.path={files['xy.h5']}", "data.labels_dataset=y"],
    }[source]  # fmt: skip
    data = load_data(
        complete_config(hydra_compose([*over, "data.indices=[4,0,2,0]"])).data, torch.float32
    )
    x, y = np.load(files["x.npy"]), np.load(files["y.npy"])
    assert data.sample_index.tolist() == [4, 0, 2, 0]
    np.testing.assert_array_equal(data.x[:].numpy(), x[[4, 0, 2, 0]])
    np.testing.assert_array_equal(data.labels.numpy(), y[[4, 0, 2, 0]])


# (override, text the composition error must contain)
BAD_OVERRIDES = {
    "typo_key": ("storage.pathh=x", "storage.pathh"),
    "typo_group_key": ("target.indice=[1]", "target.indice"),
    "dtype_enum": ("dtype=float16", "dtype=float16"),
    "mode_enum": ("storage.mode=append", "storage.mode=append"),
    "layout_enum": ("storage.layout=links", "storage.layout=links"),
    "int_field": ("data.start=one", "data.start=one"),
    "unknown_option": ("model=resnet", "model/resnet"),
}


@pytest.mark.parametrize("override, text", BAD_OVERRIDES.values(), ids=BAD_OVERRIDES.keys())
def test_invalid_values_fail_at_composition(hydra_compose, override, text):
    with pytest.raises(ConfigCompositionException, match=re.escape(text)):
        hydra_compose([override])


def _build(cfg):
    return build_model(cfg.model, torch.float32)


def _load(cfg):
    return load_data(cfg.data, torch.float32)


# (overrides, what is called, config key that the one-line error must name)
BUILD_ERRORS = {
    "bad_activation": (["model.net.activation=swish"], _build, "model.net.activation"),
    "no_bundled_weights": (["+model.net.hidden=[8]"], _build, "model.net.pretrained"),
    "target_not_importable": (["model=custom", "model.net._target_=nomod.make"], _build,
                              "model.net._target_"),
    "target_not_a_module": (["model=custom", f"model.net._target_={USERMOD}.not_a_module"],
                            _build, "model.net._target_"),
    "missing_checkpoint": (["model.checkpoint=/nonexistent.pt"], _build, "model.checkpoint"),
    "wrong_checkpoint": (["model=cnn", "model.checkpoint={net_state.pt}"], _build,
                         "model.checkpoint"),
    "missing_export": (["model=exported", "model.path=/nonexistent.pt2"], _build, "model.path"),
    "not_an_export": (["model=exported", "model.path={x.npy}"], _build, "model.path"),
    "start_out_of_range": (["data.start=5000", "data.stop=null"], _load, "data.start"),
    "stop_past_end": (["data.stop=5000"], _load, "data.stop"),
    "empty_slice": (["data.start=3", "data.stop=3"], _load, "data.stop"),
    "index_out_of_range": (["data.indices=[0,1797]"], _load, "data.indices"),
    "missing_file": (["data=npy", "data.path=/nonexistent.npy"], _load, "data.path"),
    "npz_key": (["data=npy", "data.path={xy.npz}", "data.key=nope"], _load, "data.key"),
    "hdf5_dataset": (["data=hdf5", "data.path={xy.h5}", "data.dataset=nope"], _load,
                     "data.dataset"),
    "hdf5_labels_dataset": (["data=hdf5", "data.path={xy.h5}", "data.labels_dataset=nope"],
                            _load, "data.labels_dataset"),
    "npz_labels_key": (["data=npy", "data.path={xy.npz}", "data.labels_path={xy.npz}",
                        "data.labels_key=nope"], _load, "data.labels_key"),
    "labels_length": (["data=npy", "data.path={x.npy}", "data.labels_path={y_short.npy}"], _load,
                      "data.labels_path"),
    "integer_inputs": (["data=npy", "data.path={y2d.npy}"], _load, "data.path"),
    "nan_inputs": (["data=npy", "data.path={nan.npy}"], _load, "data.indices"),
}  # fmt: skip


@pytest.mark.parametrize("overrides, call, key", BUILD_ERRORS.values(), ids=BUILD_ERRORS.keys())
def test_user_errors_name_the_config_key(hydra_compose, files, overrides, call, key):
    d = files["dir"]
    np.save(d / "y_short.npy", np.zeros(3, dtype=np.int64))
    np.save(d / "y2d.npy", np.zeros((4, 3), dtype=np.int64))
    nan = np.zeros((4, 3), dtype=np.float32)
    nan[2, 1] = np.nan
    np.save(d / "nan.npy", nan)
    for path in d.iterdir():  # "{x.npy}" -> the file's path
        overrides = [o.replace(f"{{{path.name}}}", str(path)) for o in overrides]
    cfg = complete_config(hydra_compose(overrides))
    with pytest.raises(PipelineError, match=rf"\(config key: {key}\)$") as info:
        call(cfg)
    assert "\n" not in str(info.value)


def test_static_batch_export_says_how_to_export(hydra_compose, files):
    cfg = complete_config(
        hydra_compose(["model=exported", f"model.path={files['static.pt2']}", "model.trust=true"])
    )
    model = build_model(cfg.model, torch.float64)
    with pytest.raises(PipelineError, match=r"dynamic.*\(config key: model.path\)$"):
        pipeline.hessian(model, torch.rand(3, 1, 8, 8, dtype=torch.float64), [0])
