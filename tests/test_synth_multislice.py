"""`stemdl synth --physics multislice`: the public layout, reproducibility, resume, the same random draws as
the kinematic path, the kinematic renderer's frame, and what only dynamical scattering shows (Friedel)."""

import dataclasses
import hashlib
import json
import math

import h5py
import numpy as np
import pytest
import torch

from stemdl.cli import main
from stemdl.harness.errors import StemdlError
from stemdl.workloads.spacegroup.data import layout
from stemdl.workloads.spacegroup.synth import cbed, crystals, dynamical, generate

ARGS = ["--preset", "tiny-multislice", "--seed", "7", "--quiet"]


def digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.h5"))}


def records(root):
    """(stack, SampleRecord) of every sample, in file and group order."""
    out = []
    for path in sorted(root.rglob("*.h5")):
        with h5py.File(path, "r") as h5:
            for name in sorted(h5):
                out.append((h5[name][layout.DATASET][()], layout.decode_attrs(h5[name].attrs, path, name)))
    return out


def sample(label, seed=3, **changes):
    """One sample's stack and record, noiseless, untilted and unrotated unless `changes` say otherwise."""
    cfg = generate.preset_config("tiny-multislice", seed=seed, no_noise=True, rotate=False)
    cfg = dataclasses.replace(cfg, **{"mistilt_mrad": 0.0, **changes})
    return generate.make_sample(cfg, "train", 0, label)


@pytest.fixture(scope="module")
def ms_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "ms"
    assert main(["synth", str(out), *ARGS, "--workers", "1"]) == 0
    return out


def test_the_set_has_the_public_layout_and_passes_validate(ms_set):
    cfg = generate.preset_config("tiny-multislice", seed=7)
    assert (cfg.physics, cfg.scan, cfg.image_size) == ("multislice", 2, 64)
    got = records(ms_set)
    assert len(got) == 8
    for stack, _ in got:
        assert stack.dtype == np.float32 and stack.shape == (3, 64, 64) and stack.min() >= 0
        np.testing.assert_allclose(stack.sum(axis=(1, 2)), 1.0, rtol=1e-5)  # as the public patterns
    assert main(["validate", str(ms_set)]) == 0


def test_the_physics_is_recorded_in_the_attributes_and_the_manifest(ms_set):
    manifest = json.loads((ms_set / generate.MANIFEST).read_text())
    assert manifest["config"]["physics"] == "multislice" and manifest["config"]["scan"] == 2
    for _, rec in records(ms_set):
        sim = rec.simulation
        assert sim.physics == "multislice" and sim.scan == 2
        assert np.all((sim.slice_angstrom > 1.0) & (sim.slice_angstrom < 3.0))  # ~2 Å (simulate.SLICE_A)
        assert sim.grid_gpts.shape == (3, 2) and np.all(sim.grid_gpts % 2 == 0)
        assert np.all(sim.grid_extent_angstrom >= 40.0) and np.all((sim.cell_strain >= 0) & (sim.cell_strain <= 0.1))
        assert np.all((rec.thickness_nm > 1.0) & (rec.thickness_nm < 6.5))  # 2-5 nm, to whole cell repeats


def test_same_seed_same_bytes_with_two_workers(tmp_path, ms_set):
    out = tmp_path / "two"
    assert main(["synth", str(out), *ARGS, "--workers", "2"]) == 0
    assert digests(out) == digests(ms_set)


def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, monkeypatch, ms_set):
    out, cfg = tmp_path / "resumed", generate.preset_config("tiny-multislice", seed=7)
    real_task, done = generate._task, []

    def dying_task(args):
        if len(done) == 3:  # after the first file (2 samples) and part of the second
            raise KeyboardInterrupt
        done.append(args[2])
        return real_task(args)

    monkeypatch.setattr(generate, "_task", dying_task)
    with pytest.raises(KeyboardInterrupt):
        generate.generate(out, cfg, quiet=True)
    assert [p.name for p in out.rglob("*.h5")] == ["batch_train_0.h5"]
    done.clear()
    monkeypatch.setattr(generate, "_task", lambda args: (done.append(args[2]), real_task(args))[1])
    generate.generate(out, cfg, quiet=True)
    assert done == [2, 3, 0, 1, 0, 1], "only the samples of the unfinished files are computed again"
    assert digests(out) == digests(ms_set)


def test_kinematic_and_multislice_share_the_draws_but_not_the_patterns(tmp_path, ms_set):
    kin = tmp_path / "kin"
    assert main(["synth", str(kin), *ARGS, "--physics", "kinematic", "--workers", "1"]) == 0
    for (k_stack, k), (m_stack, m) in zip(records(kin), records(ms_set)):
        assert k.simulation is None and (k.material, k.space_group, k.energy_keV) == (m.material, m.space_group,
                                                                                       m.energy_keV)
        for name in ("z_dirs", "y_dirs", "semi_angles_rad", "d_hkls_angstrom", "abc_angstrom"):
            np.testing.assert_array_equal(getattr(k, name), getattr(m, name))
        repeat_nm = np.linalg.norm(k.z_dirs @ k.structure.lattice, axis=1) / 10  # >= the cell's along the beam
        assert np.all(np.abs(k.thickness_nm - m.thickness_nm) <= repeat_nm)  # the drawn one, to whole repeats
        assert not np.allclose(k_stack, m_stack, atol=1e-3 / 64**2)
    manifest = json.loads((kin / generate.MANIFEST).read_text())
    assert manifest["config"]["physics"] == "kinematic" and "scan" not in manifest["config"]


def test_a_manifest_from_before_physics_resumes_as_kinematic(tmp_path):
    out, cfg = tmp_path / "old", generate.preset_config("tiny", seed=7, samples=8)
    generate.generate(out, cfg, quiet=True)
    manifest = json.loads((out / generate.MANIFEST).read_text())
    del manifest["config"]["physics"]
    (out / generate.MANIFEST).write_text(json.dumps(dict(manifest, status="incomplete")))
    (out / "test" / "batch_test_0.h5").unlink()
    assert generate.generate(out, cfg, quiet=True)["status"] == "complete"
    assert (out / "test" / "batch_test_0.h5").is_file()
    with pytest.raises(StemdlError, match="other settings"):
        generate.generate(out, dataclasses.replace(cfg, physics="multislice"), quiet=True)


def test_physics_and_scan_are_checked():
    with pytest.raises(StemdlError, match="--physics"):
        generate.preset_config("tiny", physics="ray-tracing")
    with pytest.raises(StemdlError, match="--scan"):
        generate.preset_config("tiny-multislice", scan=0)
    assert generate.preset_config("tiny", physics="multislice", scan=3).content()["scan"] == 3


def test_non_centrosymmetric_crystal_breaks_friedel_only_dynamically():
    """F-43m along [011] (no 2-fold along the beam, no inversion): the kinematic pattern keeps Friedel's
    law, the dynamical one breaks it (the GaAs [110] textbook case). Measured 0.11 (seed 3)."""
    asym = {}
    for physics in ("kinematic", "multislice"):
        stack, rec = sample(216, physics=physics, thickness_nm=(20.0, 20.0))
        assert list(rec.z_dirs[1]) == [0, 1, 1]
        image = stack[1]
        asym[physics] = float(np.abs(image - image[::-1, ::-1]).sum())  # point reflection through the beam
    assert asym["kinematic"] < 1e-6 and asym["multislice"] > 0.05


def test_patterns_are_in_the_kinematic_frame():
    """Thin (2 nm), rotated: the multislice discs sit where the kinematic ones do. Measured log-intensity
    correlations 0.92-0.94 in the same frame, 0.62-0.73 a quarter turn off."""
    def corr(a, b):
        return float(np.corrcoef(np.log(a + 1e-5).ravel(), np.log(b + 1e-5).ravel())[0, 1])

    (kin, _), (ms, _) = (sample(62, seed=5, physics=p, rotate=True, thickness_nm=(2.0, 2.0))
                         for p in ("kinematic", "multislice"))
    same = [corr(k, m) for k, m in zip(kin, ms)]
    turned = [corr(np.rot90(k), m) for k, m in zip(kin, ms)]
    assert min(same) > 0.85 and np.mean(same) > np.mean(turned) + 0.1


def test_a_quarter_turn_is_rot90_and_turns_y_dir():
    rng = np.random.default_rng(0)
    structure = crystals.random_crystal(62, rng).structure
    alpha, _ = cbed.semi_angle(structure, (0, 1, 0), 200)
    spec = cbed.PatternSpec(zone_axis=(0, 1, 0), energy_keV=200, semi_angle_rad=alpha, thickness_nm=2.0, size=32)
    a, y_a, _ = dynamical.render(structure, spec, scan=1)
    b, y_b, _ = dynamical.render(structure, dataclasses.replace(spec, rotation_rad=math.pi / 2), scan=1)
    np.testing.assert_allclose(b, np.rot90(a, k=-1), atol=1e-6 * a.max())  # as cbed.render's
    z = cbed.zone_frame(structure, spec.zone_axis).z_hat
    np.testing.assert_allclose(y_b, np.cross(z, y_a), atol=1e-12)


def test_rendering_leaves_torch_threads_as_they_were():
    before = torch.get_num_threads()
    with dynamical.one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("mistilt", [(8e-3, 0.0), (0.0, -8e-3)])
def test_mistilt_excites_the_same_side_as_kinematically(mistilt):
    """A beam tilted along +x excites the reflections on the -x side (the Laue circle): the first moment of
    the diffracted intensity (the bright-field disc masked) moves the same way in both renderers. Measured
    (-1.7, 0.1) px kinematically, (-2.6, 0.2) px by multislice for (8, 0) mrad."""
    structure = crystals.random_crystal(62, np.random.default_rng(1)).structure
    alpha, _ = cbed.semi_angle(structure, (1, 0, 0), 200)
    spec = cbed.PatternSpec(zone_axis=(1, 0, 0), energy_keV=200, semi_angle_rad=alpha, thickness_nm=10.0,
                            size=64, mistilt_rad=mistilt, rotation_rad=1.0)
    y, x = np.mgrid[0:64, 0:64] - 31.5
    outside = np.hypot(x, y) > alpha / (2 * spec.max_angle_rad / 64) + 2

    def moment(image):
        w = image * outside
        return np.array([(w * x).sum(), -(w * y).sum()]) / w.sum()  # (right, up) in pixels

    kin = moment(cbed.render(structure, spec)[0])
    ms = moment(dynamical.render(structure, spec, scan=2)[0])
    axis = int(np.argmax(np.abs(mistilt)))
    assert np.sign(kin[axis]) == np.sign(ms[axis]) == -np.sign(mistilt[axis]) and abs(ms[axis]) > 1.0
