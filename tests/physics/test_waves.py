"""The fast electron, the grid and the waves: textbook values, probe geometry and Fresnel propagation."""

import math

import numpy as np
import pytest
import torch

from stemdl.physics import electrons, waves
from stemdl.physics.waves import Grid


@pytest.mark.parametrize("energy, lam", [(100, 0.03701), (200, 0.02508), (300, 0.01969)])
def test_wavelength_matches_textbook(energy, lam):
    assert electrons.wavelength(energy) == pytest.approx(lam, abs=1e-5)


def test_gamma_at_200_kev():
    assert electrons.gamma(200) == pytest.approx(1.3914, abs=1e-4)


@pytest.mark.parametrize("energy, sigma", [(100, 9.244e-4), (200, 7.288e-4)])
def test_interaction_parameter(energy, sigma):
    """σ = 2π γ m₀ e λ / h² in rad/(V·Å), Kirkland eq. 5.6 (0.924 and 0.729 rad/(kV·Å))."""
    assert electrons.interaction_parameter(energy) == pytest.approx(sigma, rel=2e-4)


def test_grid_derived_quantities():
    grid = Grid((10.0, 20.0), (100, 100), 200)
    assert grid.sampling == (0.1, 0.2)
    assert grid.k_limit == pytest.approx(2 / 3 * 1 / (2 * 0.2))  # the coarser axis sets the limit
    assert grid.max_angle_mrad == pytest.approx(grid.wavelength * grid.k_limit * 1e3)
    mask = grid.bandlimit()
    k = grid.k2().sqrt()
    assert bool((mask[k <= grid.k_limit] == 1).all()) and bool((mask[k > grid.k_limit] == 0).all())


def test_choose_gpts_is_smallest_fft_friendly_size():
    extent, energy, angle = (23.0, 41.0), 200, 60.0
    gpts = waves.choose_gpts(extent, energy, angle)
    assert Grid(extent, gpts, energy).max_angle_mrad >= angle
    for n, length in zip(gpts, extent):
        assert n % 2 == 0 and waves._fft_size(n) == n
        below = max(m for m in range(2, n) if waves._fft_size(m) == m)  # the next friendly size down
        assert Grid((length, length), (below, below), energy).max_angle_mrad < angle
    assert waves._fft_size(127) == 128 and waves._fft_size(121) == 126 and waves._fft_size(11) == 12


def _centroid(intensity: torch.Tensor, grid: Grid) -> tuple[float, float]:
    """Periodic centroid in Å: the phase of the first Fourier coefficient of I along each axis, exact for
    a band-limited intensity symmetric about its centre, wherever the centre sits on the torus."""
    out = []
    for axis in (0, 1):
        n, length = grid.gpts[axis], grid.extent[axis]
        profile = intensity.sum(dim=1 - axis).double()
        harmonic = torch.exp(2j * math.pi * torch.arange(n, dtype=torch.float64) / n)
        phase = torch.angle((profile * harmonic).sum()).item()
        out.append((phase / (2 * math.pi) * length) % length)
    return tuple(out)


@pytest.mark.parametrize("position", [(8.0, 8.0), (3.37, 11.81), (0.05, 15.9)])
def test_probe_normalised_and_centred(position):
    grid = Grid((16.0, 16.0), (96, 96), 200)
    psi = waves.probe(grid, 20.0, [position], defocus_A=30.0, cs_mm=0.5, dtype=torch.complex128)[0]
    intensity = psi.abs() ** 2
    assert float(intensity.sum()) == pytest.approx(1.0, abs=1e-12)
    cx, cy = _centroid(intensity, grid)
    assert cx == pytest.approx(position[0], abs=1e-6) and cy == pytest.approx(position[1], abs=1e-6)


def test_probe_aperture_semi_angle():
    grid = Grid((40.0, 40.0), (160, 160), 200)
    alpha = 18.0
    psi = waves.probe(grid, alpha, [(5.0, 5.0)], dtype=torch.complex128)
    pattern = torch.fft.fft2(psi[0], norm="ortho").abs() ** 2
    theta = grid.k2().sqrt() * grid.wavelength * 1e3
    step = grid.angular_sampling_mrad[0]
    inside, outside = pattern[theta < alpha - step], pattern[theta > alpha + step]
    assert float(inside.min()) == pytest.approx(float(pattern.max()), rel=1e-9)
    assert float(outside.max()) < 1e-12 * float(pattern.max())
    # the soft edge keeps the disc's area (Σ A over pixels) that of radius α to a fraction of a pixel
    area = float(waves.aperture(grid, alpha).sum()) * step**2
    assert math.sqrt(area / math.pi) == pytest.approx(alpha, abs=0.05 * step)


def test_probe_beyond_bandwidth_limit_refused():
    grid = Grid((10.0, 10.0), (32, 32), 200)
    with pytest.raises(ValueError, match="bandwidth"):
        waves.probe(grid, grid.max_angle_mrad + 1, [(0, 0)])


def test_positive_defocus_is_underfocus():
    """A probe of defocus Δf > 0 comes to focus after Δf of vacuum (Kirkland's sign: underfocus)."""
    grid = Grid((20.0, 20.0), (100, 100), 200)
    focused = waves.probe(grid, 25.0, [(10.0, 10.0)], dtype=torch.complex128)
    defocused = waves.probe(grid, 25.0, [(10.0, 10.0)], defocus_A=150.0, dtype=torch.complex128)
    after = torch.fft.ifft2(torch.fft.fft2(defocused) * waves.propagator(grid, 150.0, dtype=torch.complex128))
    assert torch.allclose(after, focused, atol=1e-12)
    before = torch.fft.ifft2(torch.fft.fft2(defocused) * waves.propagator(grid, -150.0, dtype=torch.complex128))
    assert float((before.abs() ** 2).max()) < 0.5 * float((focused.abs() ** 2).max())


def _gaussian_beam(grid: Grid, s0: float, centre) -> torch.Tensor:
    """ψ ∝ exp(−|r − c|²/(4 s0²)): an intensity of standard deviation s0 (Å) per axis, Σ|ψ|² = 1."""
    x = torch.arange(grid.gpts[0], dtype=torch.float64) * grid.sampling[0] - centre[0]
    y = torch.arange(grid.gpts[1], dtype=torch.float64) * grid.sampling[1] - centre[1]
    psi = torch.exp(-(x[:, None] ** 2 + y[None, :] ** 2) / (4 * s0**2)).to(torch.complex128)
    return psi / psi.abs().pow(2).sum().sqrt()


def _moments(intensity: torch.Tensor, grid: Grid):
    x = torch.arange(grid.gpts[0], dtype=torch.float64) * grid.sampling[0]
    y = torch.arange(grid.gpts[1], dtype=torch.float64) * grid.sampling[1]
    px, py = intensity.sum(1), intensity.sum(0)
    mx, my = float((px * x).sum()), float((py * y).sum())
    return mx, my, float((px * (x - mx) ** 2).sum()), float((py * (y - my) ** 2).sum())


def test_fresnel_gaussian_beam_spreads_as_analytic():
    """Paraxial Gaussian beam: s(z)² = s0² + (λz / 4π s0)², and free space keeps the norm."""
    grid = Grid((48.0, 48.0), (192, 192), 200)
    s0, z = 1.0, 4 * math.pi / grid.wavelength  # z where the width has grown by √2
    psi = _gaussian_beam(grid, s0, (24.0, 24.0))
    out = torch.fft.ifft2(torch.fft.fft2(psi) * waves.propagator(grid, z, dtype=torch.complex128))
    intensity = out.abs() ** 2
    assert float(intensity.sum()) == pytest.approx(1.0, abs=1e-12)
    mx, my, vx, vy = _moments(intensity, grid)
    expected = s0**2 + (grid.wavelength * z / (4 * math.pi * s0)) ** 2
    assert vx == pytest.approx(expected, rel=1e-6) and vy == pytest.approx(expected, rel=1e-6)
    assert (mx, my) == pytest.approx((24.0, 24.0), abs=1e-9)


def test_tilted_propagator_moves_envelope_along_tilt():
    """The tilt term moves the envelope by +Δz·θ (both axes, both signs), keeping its width law."""
    grid = Grid((48.0, 48.0), (192, 192), 200)
    psi = _gaussian_beam(grid, 1.0, (24.0, 24.0))
    tilts = [(6.0, -4.0), (-3.5, 2.5)]
    dz = 800.0
    prop = waves.propagator(grid, dz, tilt_mrad=tilts, dtype=torch.complex128)
    assert prop.shape == (2, 192, 192)
    out = torch.fft.ifft2(torch.fft.fft2(psi)[None] * prop)
    for wave, (tx, ty) in zip(out, tilts):
        mx, my, _, _ = _moments(wave.abs() ** 2, grid)
        assert mx == pytest.approx(24.0 + dz * tx * 1e-3, abs=1e-6)
        assert my == pytest.approx(24.0 + dz * ty * 1e-3, abs=1e-6)


def test_plane_wave_snaps_tilt_to_grid():
    grid = Grid((25.0, 20.0), (64, 50), 200)
    step = grid.angular_sampling_mrad
    tilts = [(3.2 * step[0], -1.9 * step[1])]
    assert np.allclose(waves.snap_tilt(grid, tilts), [(3 * step[0], -2 * step[1])])
    psi = waves.plane_wave(grid, tilts, dtype=torch.complex128)[0]
    assert float((psi.abs() ** 2).sum()) == pytest.approx(1.0, abs=1e-12)
    spectrum = torch.fft.fft2(psi, norm="ortho").abs() ** 2
    assert float(spectrum[3, -2]) == pytest.approx(1.0, abs=1e-12)  # all in the (3, −2) beam
