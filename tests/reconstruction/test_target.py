"""The target (ORNL's recipe: mean sin(σV), periodic Gaussian of 1.2 px, central half, z-score) and the
per-pattern z-score of CBED stacks."""

import numpy as np
import pytest

from stemdl.physics.electrons import interaction_parameter
from stemdl.workloads.reconstruction.target import (SIGMA_PX, crop_central_half, fourier_resample,
                                                     gaussian_filter_periodic, mean_sin_phase, ornl_target,
                                                     target_image, zscore, zscore_patterns)


def test_mean_sin_phase_of_known_potentials():
    sigma = interaction_parameter(200.0)
    assert sigma == pytest.approx(7.288e-4, rel=1e-3)  # rad/(V·Å) at 200 keV (Kirkland)
    slices = np.stack([np.full((4, 4), 100.0), np.full((4, 4), 3000.0)])  # V·Å
    expected = (np.sin(sigma * 100.0) + np.sin(sigma * 3000.0)) / 2  # the second phase is 2.19 rad: not σV
    assert np.allclose(mean_sin_phase(slices, sigma), expected)
    with pytest.raises(ValueError, match="n_slices"):
        mean_sin_phase(np.ones((4, 4)), sigma)


def test_the_filter_turns_a_delta_into_a_gaussian_of_1_2_px():
    delta = np.zeros((64, 64))
    delta[32, 32] = 1.0
    out = gaussian_filter_periodic(delta)
    assert SIGMA_PX == 1.2
    assert out.sum() == pytest.approx(1.0)
    y, x = np.mgrid[:64, :64] - 32
    assert np.sqrt((out * x**2).sum()) == pytest.approx(1.2, rel=1e-3)  # the width along each axis
    assert np.sqrt((out * y**2).sum()) == pytest.approx(1.2, rel=1e-3)
    gauss = np.exp(-(x**2 + y**2) / (2 * 1.2**2)) / (2 * np.pi * 1.2**2)
    assert np.abs(out - gauss).max() < 1e-3 * gauss.max()
    # periodic boundary: a delta in a corner spreads to the other three
    corner = np.zeros((16, 16))
    corner[0, 0] = 1.0
    spread = gaussian_filter_periodic(corner)
    assert spread[0, -1] == pytest.approx(spread[0, 1]) and spread[-1, -1] == pytest.approx(spread[1, 1])


def test_the_crop_is_the_central_half():
    image = np.arange(3 * 64 * 48, dtype=float).reshape(3, 64, 48)
    assert np.array_equal(crop_central_half(image), image[:, 16:48, 12:36])


def test_zscore_properties_and_the_constant_guard():
    rng = np.random.default_rng(0)
    image = rng.normal(5.0, 3.0, (32, 32))
    z = zscore(image)
    assert z.mean() == pytest.approx(0.0, abs=1e-12) and z.std() == pytest.approx(1.0)
    assert np.allclose(zscore(7.0 * image - 2.0), z)  # invariant to a positive affine change
    for flat in (np.zeros((8, 8)), np.full((8, 8), 3.0), np.full((8, 8), 0.1, dtype=np.float32)):
        with pytest.raises(ValueError, match="constant"):
            zscore(flat)


def test_patterns_are_zscored_one_by_one():
    rng = np.random.default_rng(1)
    stack = rng.gamma(1.0, 1.0, (2, 5, 16, 16)) * np.array([1e-6, 1.0, 1e3, 2.0, 5.0])[None, :, None, None]
    z = zscore_patterns(stack)
    assert np.allclose(z.mean(axis=(-2, -1)), 0.0) and np.allclose(z.std(axis=(-2, -1)), 1.0)
    stack[1, 3] = 0.25
    with pytest.raises(ValueError, match=r"constant or non-finite CBED pattern.*index \(1, 3\)"):
        zscore_patterns(stack)


def test_the_ornl_target_is_the_recipe():
    rng = np.random.default_rng(2)
    slices = rng.uniform(0.0, 400.0, (3, 64, 64))
    sigma = interaction_parameter(150.0)
    by_hand = gaussian_filter_periodic(np.sin(sigma * slices).mean(axis=0), 1.2)[16:48, 16:48]
    target = ornl_target(slices, sigma)
    assert target.shape == (32, 32)
    assert np.allclose(target, (by_hand - by_hand.mean()) / by_hand.std())


def test_fourier_resampling_is_exact_for_a_band_limited_image():
    lx, ly, nx, ny = 12.0, 9.0, 24, 18
    f = lambda x, y: np.cos(2 * np.pi * 2 * x / lx) + 0.5 * np.sin(2 * np.pi * (3 * y / ly + x / lx))  # noqa
    grid = f(*np.meshgrid(np.arange(nx) * lx / nx, np.arange(ny) * ly / ny, indexing="ij"))  # [x, y]
    xs, ys = np.array([0.3, 5.0, 11.9, 13.0]), np.array([-1.0, 4.4, 8.0])  # beyond the cell: periodic
    out = fourier_resample(grid, (lx, ly), xs, ys)
    assert out.shape == (3, 4)  # rows along y
    assert np.allclose(out, f(xs[None, :], ys[:, None]))
    # a Gaussian of sigma_A Å multiplies each frequency by exp(-2π²σ²f²)
    filtered = fourier_resample(grid, (lx, ly), xs, ys, sigma_A=0.5)
    damp = lambda fx, fy: np.exp(-2 * np.pi**2 * 0.25 * (fx**2 + fy**2))  # noqa
    expected = (damp(2 / lx, 0) * np.cos(2 * np.pi * 2 * xs[None, :] / lx)
                + 0.5 * damp(1 / lx, 3 / ly) * np.sin(2 * np.pi * (3 * ys[:, None] / ly + xs[None, :] / lx)))
    assert np.allclose(filtered, expected)


def test_the_target_on_the_slices_own_grid_is_ornls():
    """On the cell's own pixels, the general target (filter, evaluate at points) is ORNL's recipe."""
    rng = np.random.default_rng(3)
    slices = rng.uniform(0.0, 400.0, (2, 64, 64))  # [k, x, y] as the engine's
    sigma, cell = interaction_parameter(100.0), (32.0, 32.0)
    axis = (16 + np.arange(32)) * 0.5  # the central half, on the cell's 0.5 Å pixels
    general = target_image(slices, sigma, cell, axis, axis)
    assert np.allclose(general, ornl_target(slices, sigma).T, atol=1e-9)  # .T: rows along y
