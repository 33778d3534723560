"""One reconstruction sample: shapes, dtypes and normalization, reproducibility, and the geometry (the
target is the image of the scanned region: a heavy atom column sits where the scan grid says)."""

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from stemdl.harness.errors import StemdlError
from stemdl.physics import simulate
from stemdl.physics.multislice import transmission
from stemdl.physics.potential import slice_potentials
from stemdl.workloads.reconstruction.generate import (Conditions, SampleSettings, ScanGeometry, make_sample,
                                                       simulate_sample)
from stemdl.workloads.spacegroup.data.layout import Structure


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, 0, 0]))


@pytest.fixture(scope="module")
def sample():
    return make_sample(rng(7), SampleSettings())


def test_a_sample_has_the_shapes_dtypes_and_normalization(sample):
    cbed, potential, attrs = sample
    assert cbed.shape == (16, 64, 64) and cbed.dtype == np.float16
    assert potential.shape == (1, 32, 32) and potential.dtype == np.float16
    assert np.isfinite(cbed).all() and np.isfinite(potential).all()
    c = cbed.astype(np.float64)
    assert np.allclose(c.mean(axis=(1, 2)), 0, atol=2e-3) and np.allclose(c.std(axis=(1, 2)), 1, atol=2e-3)
    p = potential.astype(np.float64)
    assert abs(p.mean()) < 2e-3 and p.std() == pytest.approx(1, abs=2e-3)
    assert attrs["space_group"] in SampleSettings().space_groups
    assert 100 <= attrs["energy_keV"] <= 200 and 15 <= attrs["semi_angle_mrad"] <= 25
    assert attrs["positions_A"].shape == (16, 2) and attrs["cbed_std"].shape == (16,)
    assert attrs["target_pixel_A"] == pytest.approx(20.0 / 32)
    assert min(attrs["specimen_extent_A"]) >= 2 * attrs["scan_A"]  # the scan is at most the central half


def test_the_same_seed_gives_the_same_bytes(sample):
    cbed, potential, attrs = make_sample(rng(7), SampleSettings())
    assert cbed.tobytes() == sample[0].tobytes() and potential.tobytes() == sample[1].tobytes()
    assert attrs.keys() == sample[2].keys()
    assert all(np.array_equal(attrs[k], sample[2][k]) for k in attrs)
    other = make_sample(rng(8), SampleSettings())
    assert other[0].tobytes() != cbed.tobytes()


def test_probes_sit_on_target_pixels_in_raster_order():
    geometry = ScanGeometry((10.0, 20.0), 16.0, 4, 32)
    positions = geometry.positions_A()
    assert np.allclose(positions[:5], [[10, 20], [14, 20], [18, 20], [22, 20], [10, 24]])  # p = iy·N + ix
    iy, ix = np.divmod(np.arange(16), 4)
    assert np.allclose(geometry.target_pixel(positions), np.stack([iy * 8, ix * 8], axis=1))
    xs, ys = geometry.target_axes()
    assert xs[0] == 10.0 and ys[0] == 20.0 and xs[-1] == pytest.approx(10.0 + 31 * 0.5)


def heavy_column():
    """Au on an orthorhombic 6 x 9 x 4 Å lattice, at (0, 4.5) Å in the plane: a rectangle, so a swap of x
    and y would show. Seen along [001] the specimen is 7 x 5 cells (42 x 45 Å); the 12 Å scan square
    starts at (15, 16.5), its probes 3 Å apart: the columns at x = 18 and 24, y = 22.5 lie under probes
    (ix, iy) = (1, 2) and (3, 2), patterns 9 and 11, and on target pixels (16, 8) and (16, 24)."""
    structure = Structure(np.diag([6.0, 9.0, 4.0]), np.array([[0.0, 0.5, 0.0]]), np.array([79]))
    settings = SampleSettings(scan_A=12.0, thickness_A=8.0)
    return simulate_sample(structure, (0, 0, 1), Conditions(200.0, 20.0, 0.0), settings)


def test_the_target_shows_the_scanned_region():
    sim = heavy_column()
    assert sim.geometry.origin_A == (15.0, 16.5) and sim.plan.grid.extent == (42.0, 45.0)
    target = sim.target
    peaks = target == sliding_window_view(np.pad(target, 1, mode="wrap"), (3, 3)).max(axis=(-2, -1))
    assert sorted(map(tuple, np.argwhere(peaks & (target > 1.0)))) == [(16, 8), (16, 24)]
    assert target[16, 8] == pytest.approx(target[16, 24], rel=1e-6)  # two equal columns
    # the patterns agree: only the two probes on a column scatter outside the bright-field disc
    angle = np.hypot(*(np.mgrid[:64, :64] - 32)) * 2 * 40.0 / 64  # mrad, the optical axis at (32, 32)
    dark = (sim.patterns * (angle > 25.0)).sum(axis=(1, 2))
    assert set(np.argsort(dark)[-2:]) == {9, 11}
    assert np.sort(dark)[-3] < 0.05 * np.sort(dark)[-2]  # the others: the probe's tails, far below
    assert np.allclose(sim.geometry.target_pixel(sim.geometry.positions_A()[[9, 11]]), [[16, 8], [16, 24]])


def test_the_target_reads_the_slices_the_simulation_transmits():
    sim = heavy_column()
    plan = sim.plan
    slices = slice_potentials(plan.cell, plan.cell_gpts, plan.dz_A, dtype=torch.float32)
    assert torch.equal(transmission(slices.repeat(1, *plan.tiles), plan.grid), simulate.specimen(plan))


def test_settings_are_checked_and_an_impossible_draw_fails_clearly():
    with pytest.raises(StemdlError, match="semi_angle_mrad within the detector"):
        make_sample(rng(0), SampleSettings(semi_angle_mrad=(10.0, 50.0)))
    with pytest.raises(StemdlError, match="max_specimen_A >= 2·scan_A"):
        make_sample(rng(0), SampleSettings(scan_A=40.0))
    with pytest.raises(StemdlError, match="no crystal .* in 2 tries"):
        make_sample(rng(0), SampleSettings(thickness_A=1.0, max_tries=2))  # every cell is deeper


def test_a_specimen_with_a_flat_target_is_drawn_again(monkeypatch):
    from stemdl.workloads.reconstruction import generate

    settings = SampleSettings(scan=2, pattern_size=32, target_size=16, sampling_A=None, max_tries=3)
    real, calls = generate.simulate_sample, []

    def flat_first(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 1:
            raise generate.FlatTarget("cannot z-score a constant target")
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "simulate_sample", flat_first)
    cbed, potential, _ = make_sample(rng(3), settings)
    assert len(calls) == 2 and cbed.shape == (4, 32, 32) and np.isfinite(potential).all()
    monkeypatch.setattr(generate, "simulate_sample", lambda *a, **k: (_ for _ in ()).throw(generate.FlatTarget("x")))
    with pytest.raises(StemdlError, match="3 specimens in a row had a flat target"):
        make_sample(rng(3), settings)
    with pytest.raises(StemdlError, match="sampling_A positive"):
        make_sample(rng(3), SampleSettings(sampling_A=0.0))
