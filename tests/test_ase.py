"""``data=ase`` and ``output.mass_weighted``: frames read with ASE (only the slice's), their atoms
in the result file, mass-weighted eigenpairs and vibrational frequencies against ASE's
``VibrationsData`` and closed forms, and a trajectory on Dask workers through the command line.

The potential is ``tests.springs`` (harmonic springs between all atoms, in eV and Angstrom),
whose factory takes the atomic numbers as the MACE and TorchANI factories do.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("ase")

import ase.io  # noqa: E402
import ase.io.extxyz  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.io.trajectory import TrajectoryReader  # noqa: E402
from ase.vibrations import VibrationsData  # noqa: E402

import pipeline  # noqa: E402
from pipeline import PipelineError  # noqa: E402
from pipeline.config.schema import AseData, NetModel, compose  # noqa: E402
from pipeline.config.validate import complete_config  # noqa: E402
from pipeline.execution.run import run_overrides  # noqa: E402
from pipeline.hessian import eigen, make_target  # noqa: E402
from pipeline.inputs.atoms import frequencies, with_atomic_numbers  # noqa: E402
from pipeline.inputs.data import load_data  # noqa: E402
from pipeline.results import inspect as inspect_cli  # noqa: E402
from pipeline.results.plots import write_reports  # noqa: E402
from tests.springs import dimer_eigenvalues, dimer_hessian, spring_energy  # noqa: E402
from tests.zoo import assert_close  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPRINGS = "model.net._target_=tests.springs.spring_energy"
WATER = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
N_FRAMES = 6


def water_frames(masses=None) -> list[Atoms]:
    """Six geometries of a water molecule, each distorted differently (some with imaginary
    modes under the springs)."""
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(N_FRAMES):
        a = Atoms("OH2", positions=WATER + 0.06 * rng.standard_normal((3, 3)))
        if masses is not None:
            a.set_masses(masses)
        frames.append(a)
    return frames


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ase")
    frames = water_frames()
    ase.io.write(d / "water.extxyz", frames)
    ase.io.write(d / "water.traj", frames)
    ase.io.write(d / "water.xyz", frames, format="extxyz")
    ase.io.write(d / "heavy.extxyz", water_frames(masses=[15.999, 2.014, 2.014]))
    other = water_frames()
    other[3] = Atoms("OHC", positions=other[3].positions)  # a carbon where frame 0 has H
    other[4] = Atoms("OH3", positions=np.vstack([other[4].positions, [[0.0, 0.0, 1.0]]]))
    ase.io.write(d / "other.extxyz", other)
    isotopes = water_frames()
    isotopes[2].set_masses([15.999, 1.008, 2.014])
    ase.io.write(d / "isotopes.extxyz", isotopes)
    (d / "junk.extxyz").write_text("3\nnot a frame\nO 0 0\n")
    return d


def reference_positions(path: Path) -> np.ndarray:
    return np.stack([a.positions for a in ase.io.read(path, index=":")])


# --- reading the slice ---------------------------------------------------------------------

# (file, data.start, data.stop, data.indices, the source indices read)
SLICES = [
    ("water.extxyz", 0, None, None, [0, 1, 2, 3, 4, 5]),
    ("water.extxyz", 2, 5, None, [2, 3, 4]),
    ("water.extxyz", 0, None, [4, 1, 4, 0], [4, 1, 4, 0]),
    ("water.extxyz", 0, None, [5, 0, 2], [5, 0, 2]),
    ("water.traj", 1, 3, None, [1, 2]),
    ("water.traj", 0, None, [5, 2], [5, 2]),
    ("water.xyz", 3, None, None, [3, 4, 5]),
    ("heavy.extxyz", 5, 6, None, [5]),
]


@pytest.mark.parametrize(("name", "start", "stop", "indices", "expected"), SLICES)
def test_the_slice_is_the_frames_asked_for(files, name, start, stop, indices, expected):
    cfg = AseData(path=str(files / name), start=start, stop=stop, indices=indices)
    data = load_data(cfg, torch.float64)
    every = reference_positions(files / name)
    assert data.sample_index.tolist() == expected
    assert_close(data.x[:], torch.as_tensor(every[expected]), rtol=0)
    assert data.labels is None
    assert data.atomic_numbers.tolist() == [8, 1, 1]
    first = ase.io.read(files / name, index=expected[0])
    assert data.masses.tolist() == first.get_masses().tolist()
    if name == "heavy.extxyz":
        assert data.masses.tolist() == [15.999, 2.014, 2.014]  # the file's masses, not ASE's


# (file, what counts a parsed frame)
PARSERS = [
    ("water.extxyz", (ase.io.extxyz, "_read_xyz_frame")),
    ("water.traj", (TrajectoryReader, "__getitem__")),
]


@pytest.mark.parametrize(("name", "parser"), PARSERS, ids=[p[0] for p in PARSERS])
@pytest.mark.parametrize(("start", "stop", "indices", "parsed"), [
    (2, 4, None, 2), (0, 1, None, 1), (5, None, None, 1), (0, None, [3, 1], 2),
    (0, None, [0, 5, 2, 2], 3), (0, None, [4, 1, 2, 3, 5], 5),
])  # fmt: skip
def test_only_the_slices_frames_are_parsed(files, monkeypatch, name, parser, start, stop,
                                           indices, parsed):  # fmt: skip
    owner, attr = parser
    original = getattr(owner, attr)
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attr, counting)
    cfg = AseData(path=str(files / name), start=start, stop=stop, indices=indices)
    data = load_data(cfg, torch.float64)
    assert len(calls) == parsed, f"{len(calls)} frames parsed for {len(data.x)} asked"


# (overrides of AseData, the key named, what the message says)
BAD_SLICES = {
    "start_past_end": ({"start": 6}, "data.start", "data.start=6 is out of range: the dataset "
                       "has 6 samples"),
    "stop_past_end": ({"start": 2, "stop": 9}, "data.stop", "data.stop=9 is past the end: the "
                      "dataset has 6 samples"),
    "index_past_end": ({"indices": [1, 7]}, "data.indices", "sample index 7 is out of range: "
                       "the dataset has 6 samples"),
    "far_index": ({"indices": [40]}, "data.indices", "the dataset has 6 samples"),
    "negative_index": ({"indices": [-1]}, "data.indices", "frames are counted from 0"),
    "empty_slice": ({"start": 3, "stop": 3}, "data.stop", "the data slice is empty"),
    "empty_indices": ({"indices": []}, "data.indices", "the data slice is empty"),
    "missing_file": ({"path": "nope.extxyz"}, "data.path", "file 'nope.extxyz' not found"),
    "unknown_format": ({"format": "nonsense"}, "data.format", "ASE knows no format 'nonsense'"),
    "unreadable": ({"path": "junk.extxyz"}, "data.path", "ASE cannot read"),
    "other_element": ({"path": "other.extxyz", "stop": 4}, "data.path",
                      "frame 3 of {dir}/other.extxyz has C as atom 2 where frame 0 has H"),
    "other_count": ({"path": "other.extxyz", "indices": [5, 4]}, "data.path",
                    "frame 4 of {dir}/other.extxyz has 4 atoms (H3O), frame 5 3 (H2O)"),
    "other_masses": ({"path": "isotopes.extxyz", "start": 1}, "data.path",
                     "frame 2 of {dir}/isotopes.extxyz gives atom 2 (H) the mass 2.014 where "
                     "frame 1 gives 1.008"),
}  # fmt: skip


@pytest.mark.parametrize(("edit", "key", "text"), BAD_SLICES.values(), ids=BAD_SLICES.keys())
def test_bad_slices_and_files_are_one_line_naming_the_key(files, edit, key, text):
    edit = dict(edit)
    path = files / edit.pop("path", "water.extxyz")
    if path.name == "nope.extxyz":
        path = Path("nope.extxyz")
    cfg = AseData(path=str(path), **edit)
    with pytest.raises(PipelineError) as info:
        load_data(cfg, torch.float64)
    assert info.value.key == key, str(info.value)
    assert text.format(dir=files) in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_frames_outside_the_slice_may_differ(files):
    data = load_data(AseData(path=str(files / "other.extxyz"), stop=3), torch.float64)
    assert data.x.shape == (3, 3, 3)  # frames 3 and 4 (other atoms) are not read


# --- configuration ---------------------------------------------------------------------------

# (overrides, the key named, what the message says)
REFUSED = {
    "mass_weighted_digits": (["output=eigen", "output.mass_weighted=true"],
                             "output.mass_weighted", "data=digits has none"),
    "mass_weighted_npy": (["output=eigen", "output.mass_weighted=true", "data=npy",
                           "data.path=x.npy"], "output.mass_weighted", "data=npy has none"),
    "mass_weighted_dense": (["data=ase", "data.path=x.extxyz", "output=dense",
                             "+output.mass_weighted=true"], "output.mass_weighted",
                            "mass_weighted belongs to output=eigen"),
    "loss_of_atoms": (["data=ase", "data.path=x.extxyz", "target=loss"], "target",
                      "target=loss needs labels, and the frames of data=ase have none"),
    "no_path": (["data=ase"], "data.path", "data=ase needs data.path"),
}  # fmt: skip


@pytest.mark.parametrize(("overrides", "key", "text"), REFUSED.values(), ids=REFUSED.keys())
def test_what_atoms_need_and_cannot_give_is_refused(tmp_path, overrides, key, text):
    with pytest.raises(PipelineError) as info:
        run_overrides([*overrides, "progress=false", "plots=false"], tmp_path)
    assert info.value.key == key and text in str(info.value), str(info.value)
    assert list(tmp_path.iterdir()) == []


def unrelated(positions):
    """A factory without an atomic_numbers parameter."""
    return positions


# (net node, numbers, the node after)
FACTORY_CASES = {
    "filled": ({"_target_": "tests.springs.spring_energy", "k": 2.0}, [8, 1, 1],
               {"_target_": "tests.springs.spring_energy", "k": 2.0, "atomic_numbers": [8, 1, 1]}),
    "class_filled": ({"_target_": "tests.springs.Springs"}, [1, 1],
                     {"_target_": "tests.springs.Springs", "atomic_numbers": [1, 1]}),
    "set_is_kept": ({"_target_": "tests.springs.spring_energy", "atomic_numbers": [6]}, [8],
                    {"_target_": "tests.springs.spring_energy", "atomic_numbers": [6]}),
    "no_parameter": ({"_target_": "tests.test_ase.unrelated"}, [8],
                     {"_target_": "tests.test_ase.unrelated"}),
    "not_importable": ({"_target_": "nomod.make"}, [8], {"_target_": "nomod.make"}),
    "no_atoms": ({"_target_": "tests.springs.spring_energy"}, None,
                 {"_target_": "tests.springs.spring_energy"}),
}  # fmt: skip


@pytest.mark.parametrize(("net", "numbers", "after"), FACTORY_CASES.values(),
                         ids=FACTORY_CASES.keys())  # fmt: skip
def test_the_factory_gets_the_atomic_numbers_in_the_config(net, numbers, after):
    model = NetModel(name="custom", net=net)
    filled = with_atomic_numbers(model, None if numbers is None else np.asarray(numbers))
    assert filled.net == after
    assert model.net == net  # the config given is not changed


def test_the_experiment_composes():
    cfg = compose(["+experiment=vibrations", "data.path=traj.extxyz"])
    checked = complete_config(cfg)
    assert checked.data.name == "ase" and checked.data.path == "traj.extxyz"
    assert checked.model.name == "custom"
    assert checked.model.net["_target_"] == "pipeline.inputs.potentials.mace_energy"
    assert checked.output.name == "eigen" and checked.output.mass_weighted
    assert str(checked.output.which) == "SA" and str(checked.dtype) == "float64"
    assert checked.backend.name == "dask" and list(checked.target.indices) == [0]


# --- the math: mass weighting and frequencies against ASE and closed forms ---------------------


def _hessian64(model, positions: np.ndarray) -> np.ndarray:
    """The (3n, 3n) float64 Hessian of the energy by torch.autograd.functional."""
    x = torch.as_tensor(positions, dtype=torch.float64)
    h = torch.autograd.functional.hessian(lambda p: model(p[None])[0, 0], x)
    return h.reshape(x.numel(), x.numel()).numpy()


def _ase_frequencies(atoms: Atoms, h: np.ndarray) -> np.ndarray:
    """ASE's frequencies of a full Hessian, imaginary ones as negative numbers."""
    f = VibrationsData.from_2d(atoms, h).get_frequencies()
    return np.where(f.imag != 0, -np.abs(f.imag), f.real)


def _signed_square(f: np.ndarray) -> torch.Tensor:
    """f |f|: proportional to the eigenvalue, so near-zero modes compare to rounding level."""
    return torch.as_tensor(f * np.abs(f))


def _cm1(eigenvalue: np.ndarray) -> np.ndarray:
    """Closed form with CODATA constants (scipy, not ASE): the wavenumber in cm^-1 of a
    mass-weighted eigenvalue in eV / (Angstrom^2 amu), negative for a negative one."""
    from scipy import constants as c

    omega = np.sqrt(np.abs(eigenvalue) * c.e / (1e-20 * c.atomic_mass))  # rad / s
    return np.sign(eigenvalue) * omega / (2 * math.pi * c.c) / 100


# (name, masses, bond length / r0): a dimer stretched (real) or compressed (imaginary modes)
DIMERS = [
    ("OH_stretched", [15.999, 1.008], 1.3),
    ("OH_compressed", [15.999, 1.008], 0.8),
    ("HD_stretched", [1.008, 2.014], 1.1),
]


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize(("name", "masses", "stretch"), DIMERS, ids=[d[0] for d in DIMERS])
def test_dimer_hessian_and_frequencies_have_their_closed_forms(name, masses, stretch):
    numbers = [8, 1] if name.startswith("OH") else [1, 1]
    model = spring_energy(numbers, k=7.0).eval()
    r0 = float(model.r0[0])
    u = np.array([0.48, -0.6, 0.64])  # unit bond direction
    pos = np.array([[0.1, 0.2, -0.3], [0.1, 0.2, -0.3] + stretch * r0 * u])
    x = torch.as_tensor(pos)[None]
    target = make_target([0], model(x).detach())
    h = pipeline.hessian(model, x, [0])[0, 0]
    assert_close(h, torch.as_tensor(dimer_hessian(pos, 7.0, r0)), rtol=1e-12, atol=1e-12)
    m = torch.as_tensor(np.repeat(masses, 3))
    values, vectors, _ = eigen(model, x, target, 6, "SA", masses=m)
    closed = np.sort(dimer_eigenvalues(pos, np.asarray(masses), 7.0, r0))
    assert_close(values[0, 0], torch.as_tensor(closed), rtol=1e-10, atol=1e-12)
    freq = frequencies(values.numpy())[0, 0]
    assert_close(_signed_square(freq), _signed_square(_cm1(closed)), rtol=1e-6, atol=1e-6)
    atoms = Atoms(numbers=numbers, positions=pos, masses=masses)
    ase_freq = _ase_frequencies(atoms, dimer_hessian(pos, 7.0, r0))
    assert_close(_signed_square(freq), _signed_square(ase_freq), rtol=1e-10, atol=1e-8)
    imaginary = stretch < 1
    assert (freq.min() < -1) == imaginary and freq.max() > 100


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("path", ["dense", "lanczos"])
def test_water_frequencies_match_vibrations_data(files, path):
    frames = ase.io.read(files / "heavy.extxyz", index=":")
    model = spring_energy(frames[0].numbers.tolist()).eval()
    x = torch.as_tensor(np.stack([a.positions for a in frames]))
    target = make_target([0], model(x).detach())
    masses = torch.as_tensor(np.repeat(frames[0].get_masses(), 3))
    extra = {"dense_limit": 0, "tol": 1e-13} if path == "lanczos" else {}
    values, _, _ = eigen(model, x, target, 9, "SA", masses=masses, **extra)
    freq = frequencies(values.numpy())[:, 0]  # (N, 9)
    for n, atoms in enumerate(frames):
        want = _ase_frequencies(atoms, _hessian64(model, atoms.positions))
        scale = float(np.abs(want).max()) ** 2
        assert_close(_signed_square(freq[n]), _signed_square(want), rtol=1e-9,
                     atol=1e-9 * scale)  # fmt: skip
    assert (freq < -1).any() and (freq > 1).any()  # imaginary and real modes both covered


def test_frequencies_keep_shape_sign_and_nan():
    lam = np.array([[4.0, -1.0, 0.0], [np.nan, 1e-30, -9.0]])
    f = frequencies(lam)
    one = frequencies(np.array([1.0]))[0]
    assert f.shape == lam.shape and np.isnan(f[1, 0])
    np.testing.assert_allclose(f[0], [2 * one, -one, 0.0], rtol=1e-14)
    np.testing.assert_allclose(f[1, 2], -3 * one, rtol=1e-14)
    many = np.linspace(-5, 5, 401)  # several chunks of VibrationsData
    np.testing.assert_allclose(frequencies(many), np.sign(many) * np.sqrt(np.abs(many)) * one,
                               rtol=1e-12, atol=1e-12)  # fmt: skip


# --- the result file -------------------------------------------------------------------------


def _run(tmp_path: Path, data: Path, *overrides: str, name: str = "h.h5") -> Path:
    path = tmp_path / name
    run_overrides(["data=ase", f"data.path={data}", "model=custom", SPRINGS, "target.indices=[0]",
                   "dtype=float64", f"storage.path={path}", "progress=false", "plots=false",
                   *overrides], tmp_path)  # fmt: skip
    return path


def test_the_file_holds_the_atoms(files, tmp_path):
    path = _run(tmp_path, files / "heavy.extxyz", "data.start=1", "data.stop=4")
    with h5py.File(path, "r") as f:
        assert f["atomic_numbers"][()].tolist() == [8, 1, 1]
        assert f["atomic_numbers"].dtype == np.int64 and f["masses"].dtype == np.float64
        assert f["masses"][()].tolist() == [15.999, 2.014, 2.014]
        assert [d.label for d in f["atomic_numbers"].dims] == ["atom"]
        assert [d.label for d in f["masses"].dims] == ["atom"]
        assert [d.label for d in f["inputs"].dims] == ["sample", "atom", "xyz"]
        assert f["sample_index"][()].tolist() == [1, 2, 3]
        config = yaml.safe_load(f.attrs["config"])
        assert config["model"]["net"]["atomic_numbers"] == [8, 1, 1]  # what the factory got
        positions = reference_positions(files / "heavy.extxyz")[1:4]
        np.testing.assert_array_equal(f["inputs"][()], positions)
        model = spring_energy([8, 1, 1])
        for n in range(3):
            np.testing.assert_allclose(f["hessian"][n, 0], _hessian64(model, positions[n]),
                                       rtol=1e-10, atol=1e-12)  # fmt: skip
    with pipeline.read(path) as r:
        assert r.atomic_numbers.compute().tolist() == [8, 1, 1]
        assert r.masses.compute().tolist() == [15.999, 2.014, 2.014]


def test_the_fingerprint_covers_the_masses(files, tmp_path):
    light = _run(tmp_path, files / "water.extxyz", "output=diagonal", name="light.h5")
    heavy = _run(tmp_path, files / "heavy.extxyz", "output=diagonal", name="heavy.h5")
    with h5py.File(light, "r") as a, h5py.File(heavy, "r") as b:
        np.testing.assert_array_equal(a["inputs"][()], b["inputs"][()])  # the same positions
        assert a.attrs["fingerprint"] != b.attrs["fingerprint"]
    _run(
        tmp_path, files / "water.extxyz", "output=diagonal", "storage.mode=resume", name="light.h5"
    )  # the same run: complete already
    with pytest.raises(PipelineError, match="light.h5 exists and is not the result of this"):
        _run(
            tmp_path,
            files / "heavy.extxyz",
            "output=diagonal",
            "storage.mode=resume",
            name="light.h5",
        )


# --- the command line: a trajectory on Dask workers -------------------------------------------

JOBS = {
    "vibrations": ["+experiment=vibrations", "data.path={tmp}/heavy.extxyz", SPRINGS,
                   "backend.n_workers=2", "output.k=9", "storage.block_samples=2",
                   "storage.path={tmp}/vib/vib.h5", "hydra.run.dir={tmp}/vib", "progress=false"],
    "other_atoms": ["+experiment=vibrations", "data.path={tmp}/other.extxyz", SPRINGS,
                    "backend=local", "output.k=9", "storage.path={tmp}/other/o.h5",
                    "hydra.run.dir={tmp}/other", "progress=false", "plots=false"],
}  # fmt: skip


@pytest.fixture(scope="module")
def cli(files):
    """Both jobs, started at once: {name: (exit code, stdout, stderr)}."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    started = {
        name: subprocess.Popen(
            [sys.executable, "-m", "pipeline", *(a.replace("{tmp}", str(files)) for a in args)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name, args in JOBS.items()
    }  # fmt: skip
    done = {}
    for name, p in started.items():
        out, err = p.communicate(timeout=300)
        done[name] = (p.returncode, out, err)
    return done


def test_a_frame_with_other_atoms_is_one_line_through_the_cli(cli, files):
    rc, out, err = cli["other_atoms"]
    assert rc == 1, f"exit {rc}\n{out}\n{err}"
    assert err.strip().splitlines() == [
        f"error: frame 3 of {files}/other.extxyz has C as atom 2 where frame 0 has H (1 atom(s) "
        "differ): every frame must have the same atoms in the same order (config key: data.path)"
    ]
    assert not (files / "other" / "o.h5").exists()


def test_a_trajectory_on_dask_workers(cli, files):
    rc, out, err = cli["vibrations"]
    assert rc == 0, f"exit {rc}\n{out}\n{err}"
    path = files / "vib" / "vib.h5"
    frames = ase.io.read(files / "heavy.extxyz", index=":")
    model = spring_energy(frames[0].numbers.tolist())
    with pipeline.read(path) as r:
        assert r.output == "eigen" and r.config.backend.name == "dask"
        assert list(r.config.model.net.atomic_numbers) == [8, 1, 1]
        assert r.masses.compute().tolist() == [15.999, 2.014, 2.014]
        freq, values = r.frequencies.compute(), r.eigenvalues.compute()
        vectors = r.eigenvectors.compute()
        assert freq.shape == values.shape == (N_FRAMES, 1, 9)
        w = np.repeat(frames[0].get_masses(), 3) ** -0.5
        for n, atoms in enumerate(frames):
            h = _hessian64(model, atoms.positions)
            weighted = w[:, None] * h * w[None, :]
            ref = np.linalg.eigvalsh(weighted)  # SA order: ascending
            assert_close(torch.as_tensor(values[n, 0]), torch.as_tensor(ref), rtol=1e-10,
                         atol=1e-10 * np.abs(ref).max())  # fmt: skip
            res = np.linalg.norm(vectors[n, 0] @ weighted - values[n, 0, :, None] * vectors[n, 0],
                                 axis=-1)  # fmt: skip
            assert res.max() <= 1e-9 * np.abs(ref).max()
            want = _ase_frequencies(atoms, h)
            assert_close(_signed_square(freq[n, 0]), _signed_square(want), rtol=1e-9,
                         atol=1e-9 * float(np.abs(want).max()) ** 2)  # fmt: skip
    reports = files / "vib"
    assert (reports / "hessian_frequencies.png").stat().st_size > 10_000
    header = (reports / "hessian_values.csv").read_text().splitlines()[0]
    assert "frequency_cm-1_0" in header and "eigenvalue_8" in header


def test_inspect_shows_and_verify_checks_the_frequencies(cli, files, tmp_path, capsys):
    assert cli["vibrations"][0] == 0
    path = files / "vib" / "vib.h5"
    assert inspect_cli.main([str(path), "--verify", "--trust-file"]) == 0
    out = capsys.readouterr().out
    assert "atoms      3 (OH2), masses in amu: O 15.999, H 2.014, H 2.014" in out
    assert "/frequencies (6, 1, 9)" in out and "cm^-1: " in out
    assert "verify: OK" in out
    bad = tmp_path / "bad.h5"
    shutil.copy(path, bad)
    with h5py.File(bad, "r+") as f:
        f["frequencies"][2, 0, 7] *= 1.01
    assert inspect_cli.main([str(bad), "--verify", "--trust-file"]) == 1
    out = capsys.readouterr().out
    assert "mismatch (frequencies): frequency 7 of sample 2" in out
    weighted = tmp_path / "unweighted_vectors.h5"
    shutil.copy(path, weighted)
    with h5py.File(weighted, "r+") as f:  # the masses say otherwise: the eigenpairs are wrong
        f["masses"][1] = 1.008
    assert inspect_cli.main([str(weighted), "--verify", "--trust-file"]) == 1
    assert "mismatch (eigenpair)" in capsys.readouterr().out


def test_the_reader_refuses_a_mass_weighted_file_without_its_frequencies(cli, files, tmp_path):
    assert cli["vibrations"][0] == 0
    for name, edit, text in [
        ("no_frequencies.h5", lambda f: f.__delitem__("frequencies"), "lacks /frequencies"),
        ("masses_shape.h5", lambda f: (f.__delitem__("masses"), f.create_dataset("masses",
                                       data=np.ones(4))), "/masses has shape (4,)"),
    ]:  # fmt: skip
        copy = tmp_path / name
        shutil.copy(files / "vib" / "vib.h5", copy)
        with h5py.File(copy, "r+") as f:
            edit(f)
        with pytest.raises(PipelineError, match=text.replace("(", r"\(").replace(")", r"\)")):
            pipeline.read(copy)


def test_the_spectrum_plot_of_another_sample(cli, files, tmp_path):
    assert cli["vibrations"][0] == 0
    written = write_reports(files / "vib" / "vib.h5", tmp_path, {"sample": 3})
    assert tmp_path / "hessian_frequencies.png" in written
    rows = (tmp_path / "hessian_values.csv").read_text().splitlines()
    assert len(rows) == 1 + N_FRAMES
