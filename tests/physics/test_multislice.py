"""Multislice propagation and patterns: conservation laws, symmetries and the detector mapping.

The specimens are synthetic: Gaussian bumps of projected potential on a square lattice (no dependence on
the crystal half of the package), small grids so the whole file runs in seconds on two cores.
"""

import functools

import numpy as np
import pytest
import torch

from stemdl.physics import electrons, multislice, waves
from stemdl.physics.waves import Grid

A_LATTICE = 4.0  # Å, period of the synthetic lattice


def bumps(grid: Grid, centres, peak_VA: float, width_A: float = 0.5) -> torch.Tensor:
    """Projected potential (Nx, Ny) in V·Å: periodic Gaussian bumps of height peak_VA at the centres
    (fractions of A_LATTICE), repeated on the square lattice of period A_LATTICE over the grid."""
    x = torch.arange(grid.gpts[0], dtype=torch.float64) * grid.sampling[0]
    y = torch.arange(grid.gpts[1], dtype=torch.float64) * grid.sampling[1]
    v = torch.zeros(grid.gpts, dtype=torch.float64)
    images = torch.arange(-2, 2, dtype=torch.float64) * A_LATTICE  # copies within 2 periods: smooth sum
    for fx, fy in centres:
        dx = torch.remainder(x - fx * A_LATTICE, A_LATTICE)[:, None] + images[None, :]
        dy = torch.remainder(y - fy * A_LATTICE, A_LATTICE)[:, None] + images[None, :]
        gx = torch.exp(-dx**2 / (2 * width_A**2)).sum(1)
        gy = torch.exp(-dy**2 / (2 * width_A**2)).sum(1)
        v += peak_VA * gx[:, None] * gy[None, :]
    return v


def specimen(grid, slices, dtype=torch.complex64, peak=300.0):
    """Transmissions of a 2-slice cell (n, Nx, Ny); `slices` lists each slice's bump centres."""
    v = torch.stack([bumps(grid, centres, peak) for centres in slices])
    return multislice.transmission(v, grid, dtype=dtype)


GRID = Grid((2 * A_LATTICE, 2 * A_LATTICE), (64, 64), 200)  # 2x2 unit cells, 0.125 Å, 67 mrad
CENTRO = [[(0.0, 0.0)], [(0.5, 0.5), (0.25, 0.0), (0.75, 0.0)]]  # inversion centre at the origin
POLAR = [[(0.0, 0.0), (0.3, 0.1)], [(0.5, 0.5)]]  # no inversion centre


@pytest.mark.parametrize("dtype, tol", [(torch.complex128, 1e-5), (torch.complex64, 1e-4)])
def test_norm_conserved_through_200_slices(dtype, tol):
    """A strong potential (peaks of 0.22 rad a slice, 44 rad over the depth) scatters next to nothing past
    the limit on this grid, so the norm is kept: measured 1e-8 in double (tolerance 1e-5); complex64
    rounding over 400 FFTs drifts ~1.5e-5 (tolerance 1e-4). Peaks of 0.73 rad would lose 2e-4 past the
    limit: the physical loss a grid too coarse for the specimen shows, not an error of the loop."""
    t = specimen(GRID, POLAR, dtype)
    prop = waves.propagator(GRID, 2.0, dtype=dtype)
    psi = waves.probe(GRID, 20.0, [(2.3, 1.1)], dtype=dtype)
    out = multislice.propagate(psi, t, prop, [200, 0, 37])
    norms = (out.abs() ** 2).sum(dim=(-2, -1)).double()
    assert torch.allclose(norms, torch.ones_like(norms), atol=tol, rtol=0)


def test_transmission_is_phase_object_within_limit():
    """A weak potential: |t| = 1 to the (tiny) part of exp(iσv) beyond the limit; default σ from the energy."""
    v = bumps(GRID, [(0.0, 0.0)], 50.0)[None]
    t = multislice.transmission(v, GRID, dtype=torch.complex128)
    sigma = electrons.interaction_parameter(200)
    assert torch.allclose(t.angle(), sigma * v, atol=1e-9)  # σv < π here, so no phase wrapping
    assert torch.allclose(t.abs(), torch.ones_like(t.abs()), atol=1e-9)


def test_phase_object_pattern_is_fft_of_transmission():
    """Zero propagation distance: the pattern of a plane wave is |FFT exp(iσv)|² inside the limit."""
    v = bumps(GRID, POLAR[0], 800.0).numpy()
    sigma = electrons.interaction_parameter(200)
    t = multislice.transmission(torch.as_tensor(v)[None], GRID, dtype=torch.complex128)
    psi = waves.plane_wave(GRID, dtype=torch.complex128)
    exit_wave = multislice.propagate(psi, t, waves.propagator(GRID, 0.0, dtype=torch.complex128), [1])
    pattern = multislice.diffraction(exit_wave)[0, 0].numpy()
    n = GRID.gpts[0] * GRID.gpts[1]
    expected = np.abs(np.fft.fft2(np.exp(1j * sigma * v))) ** 2 / n**2
    expected *= GRID.bandlimit().numpy()
    assert np.allclose(pattern, np.fft.fftshift(expected), atol=1e-12)


def _inverted(pattern: torch.Tensor) -> torch.Tensor:
    """I(−k) on the fftshifted grid (k = 0 at N/2): flip both axes, then roll by one pixel."""
    return torch.roll(torch.flip(pattern, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))


def test_centrosymmetric_potential_gives_centrosymmetric_cbed():
    """Inversion symmetry of specimen and probe makes I(k) = I(−k); without it dynamical scattering breaks
    Friedel's law, which shows the check can fail."""
    prop = waves.propagator(GRID, 2.0, dtype=torch.complex128)
    for slices, symmetric in [(CENTRO, True), (POLAR, False)]:
        t = specimen(GRID, slices, torch.complex128)
        pattern = multislice.cbed(GRID, t, prop, [(0.0, 0.0)], [60], semi_angle_mrad=15.0)[0]
        asym = float((pattern - _inverted(pattern)).abs().max() / pattern.max())
        assert (asym < 1e-10) if symmetric else (asym > 1e-3), (slices, asym)


def test_probe_translation_by_a_lattice_period_leaves_pattern():
    t = specimen(GRID, POLAR, torch.complex128)
    prop = waves.propagator(GRID, 2.0, dtype=torch.complex128)
    r0 = np.array([0.71, 1.93])
    positions = [r0, r0 + (A_LATTICE, 0.0), r0 + (0.0, A_LATTICE), r0 + (A_LATTICE, A_LATTICE)]
    patterns = multislice.four_d_stem(GRID, t, prop, positions, [40], semi_angle_mrad=15.0)[0]
    for p in patterns[1:]:
        assert torch.allclose(p, patterns[0], atol=1e-12)


def test_chunked_equals_unchunked():
    t = specimen(GRID, POLAR)
    prop = waves.propagator(GRID, 2.0)
    positions = multislice.position_grid((A_LATTICE, A_LATTICE), 3)
    kwargs = dict(semi_angle_mrad=15.0)
    whole = multislice.four_d_stem(GRID, t, prop, positions, [10, 20], chunk=len(positions), **kwargs)
    assert whole.shape == (2, 9, 64, 64)
    for chunk in (1, 4):
        parts = multislice.four_d_stem(GRID, t, prop, positions, [10, 20], chunk=chunk, **kwargs)
        assert torch.equal(parts, whole)  # each probe's FFTs do not depend on the batch around it
        mean = multislice.cbed(GRID, t, prop, positions, [10, 20], chunk=chunk, **kwargs)
        assert torch.allclose(mean, whole.mean(dim=1), rtol=1e-5, atol=1e-9)


def test_complex64_agrees_with_complex128():
    prop64, prop128 = waves.propagator(GRID, 2.0), waves.propagator(GRID, 2.0, dtype=torch.complex128)
    positions = multislice.position_grid((A_LATTICE, A_LATTICE), 2)
    single = multislice.cbed(GRID, specimen(GRID, POLAR), prop64, positions, [50], semi_angle_mrad=15.0)
    double = multislice.cbed(GRID, specimen(GRID, POLAR, torch.complex128), prop128, positions, [50],
                             semi_angle_mrad=15.0)
    assert single.dtype == torch.float32 and double.dtype == torch.float64
    assert float((single.double() - double).abs().max() / double.max()) < 1e-5


def test_position_grid_spans_one_cell():
    pos = multislice.position_grid((4.0, 6.0), 4, origin_A=(1.0, 2.0))
    assert pos.shape == (16, 2)
    assert np.allclose(pos[:4], [(1.0, 2.0), (1.0, 3.5), (1.0, 5.0), (1.0, 6.5)])
    assert pos[:, 0].max() == pytest.approx(4.0) and pos[:, 1].max() == pytest.approx(6.5)


def test_slice_counts():
    assert multislice.slice_counts([100.0, 205.0, 0.0], 2.0) == [50, 102, 0]


def test_to_detector_conserves_intensity():
    t = specimen(GRID, POLAR)
    pattern = multislice.cbed(GRID, t, waves.propagator(GRID, 2.0), [(0.3, 0.4)], [30], semi_angle_mrad=15.0)[0]
    step = GRID.angular_sampling_mrad[0]
    # a field of view wider than the bandwidth limit keeps everything, at a non-integer pixel ratio
    det = multislice.to_detector(pattern, GRID, GRID.max_angle_mrad * 1.1, 33)
    assert det.shape == (33, 33) and det.dtype == torch.float32
    assert float(det.sum()) == pytest.approx(float(pattern.sum()), rel=1e-5)
    # pixel centres (c − S/2)·d put the field of view at [−A − d/2, A − d/2]: with S = 6, A = 9 steps
    # (d = 3 steps) its edges fall on simulation pixel edges −10.5 and 7.5 steps, keeping those pixels
    det = multislice.to_detector(pattern, GRID, 9 * step, 6)
    inside = pattern[32 - 10:32 + 8, 32 - 10:32 + 8]
    assert float(det.sum()) == pytest.approx(float(inside.sum()), rel=1e-5)


@pytest.mark.parametrize("beam", [(2, -1), (-3, 2), (0, 3)])
def test_to_detector_places_tilted_beam(beam):
    """A plane wave tilted by (θx, θy) lands in column S/2 + θx/d and row S/2 + θy/d (y down)."""
    grid = Grid((12.0, 12.0), (96, 96), 200)
    size, ratio = 16, 3  # detector pixel d = 3 simulation pixels, so a beam fills one detector pixel
    d = ratio * grid.angular_sampling_mrad[0]
    tilt = (beam[0] * d, beam[1] * d)
    pattern = multislice.diffraction(waves.plane_wave(grid, [tilt], dtype=torch.complex128))[0]
    det = multislice.to_detector(pattern, grid, size * d / 2, size)
    row, col = size // 2 + beam[1], size // 2 + beam[0]
    assert float(det[row, col]) == pytest.approx(1.0, abs=1e-6)
    # an untilted envelope displaced by center_mrad lands in the same pixel
    flat = multislice.diffraction(waves.plane_wave(grid, dtype=torch.complex128))[0]
    det = multislice.to_detector(flat, grid, size * d / 2, size, center_mrad=tilt)
    assert float(det[row, col]) == pytest.approx(1.0, abs=1e-6)


def test_cbed_through_detector_callable():
    t = specimen(GRID, POLAR)
    prop = waves.propagator(GRID, 2.0)
    detector = functools.partial(multislice.to_detector, grid=GRID, max_angle_mrad=60.0, size=24)
    positions = multislice.position_grid((A_LATTICE, A_LATTICE), 2)
    out = multislice.cbed(GRID, t, prop, positions, [5, 10], semi_angle_mrad=15.0, detector=detector)
    assert out.shape == (2, 24, 24)
    full = multislice.cbed(GRID, t, prop, positions, [5, 10], semi_angle_mrad=15.0)
    assert torch.allclose(out, detector(full), atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_agree():
    positions = multislice.position_grid((A_LATTICE, A_LATTICE), 2)
    results = {}
    for device in ("cpu", "cuda"):
        for dtype in (torch.complex64, torch.complex128):
            t = specimen(GRID, POLAR, dtype).to(device)
            prop = waves.propagator(GRID, 2.0, device=device, dtype=dtype)
            out = multislice.cbed(GRID, t, prop, positions, [50], semi_angle_mrad=15.0)
            assert out.device.type == device
            results[device, dtype] = out.cpu().double()
    for dtype, tol in ((torch.complex64, 1e-5), (torch.complex128, 1e-12)):
        cpu, gpu = results["cpu", dtype], results["cuda", dtype]
        assert float((cpu - gpu).abs().max() / cpu.max()) < tol
