"""Projected potentials: the q = 0 sum rule, a closed-form Gaussian check of the constant and the FFT
conventions, symmetry, conservation under slicing, translation, dtypes and devices."""

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from stemdl.physics import parameters, potential
from stemdl.physics.parameters import H2_OVER_2PI_M0_E, scattering_factor
from stemdl.physics.potential import projected_potential, slice_geometry, slice_potentials
from stemdl.physics.supercell import Supercell, orthogonal_supercell


def atoms(extent, positions, numbers) -> Supercell:
    """A hand-made cell (no crystal behind it)."""
    return Supercell(tuple(float(x) for x in extent), np.asarray(positions, dtype=float),
                     np.asarray(numbers, dtype=int), (0, 0, 1), np.eye(3), 0.0)


@pytest.fixture(scope="module")
def si110():
    si = Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.431), ["Si"], [[0, 0, 0]])
    return orthogonal_supercell(si, [1, 1, 0], min_extent=10.0)


def test_slice_geometry():
    assert slice_geometry(5.431, 2.0) == (3, pytest.approx(5.431 / 3))
    assert slice_geometry(1.0, 2.0) == (1, 1.0)
    with pytest.raises(ValueError):
        slice_geometry(5.0, 0.0)


def test_integral_is_the_q0_term(si110):
    """∫ v_z d²r = mean · A = 47.878 V·Å² · Σ_j f_e,j(0): the q = 0 term, whatever the grid."""
    v = projected_potential(si110, (96, 90), dtype=torch.float64)
    area = si110.extent[0] * si110.extent[1]
    expected = H2_OVER_2PI_M0_E * len(si110.numbers) * scattering_factor(14, 0.0)
    assert float(v.mean()) * area == pytest.approx(expected, rel=1e-10)


def test_gaussian_factor_matches_the_closed_form(monkeypatch):
    """With f(q) = c·exp(−b q²) the projected potential of an atom at r₀ is
    47.878 · c (π/b) exp(−π² |r − r₀|²/b) (the 2-D Fourier transform of a Gaussian). Checks the constant,
    the 1/A and Nx·Ny factors and the sign and origin of the positions, independently of the table."""
    c, b = 2.0, 1.0  # exp(−b q²) < 1e-10 at the grid's Nyquist frequencies (5 and 6 1/Å)

    def gaussian(zs, q):
        return (c * torch.exp(-b * q**2)).expand(len(zs), *q.shape).to(q.dtype)

    monkeypatch.setattr(parameters, "species_factors", gaussian)
    extent, gpts, r0 = (9.0, 8.0, 2.0), (90, 96), (3.217, 5.1)
    v = projected_potential(atoms(extent, [[*r0, 1.0]], [14]), gpts, dtype=torch.float64).numpy()
    x = np.arange(gpts[0])[:, None] * extent[0] / gpts[0] - r0[0]
    y = np.arange(gpts[1])[None, :] * extent[1] / gpts[1] - r0[1]
    x -= np.rint(x / extent[0]) * extent[0]  # nearest periodic image (the others are < 1e-40)
    y -= np.rint(y / extent[1]) * extent[1]
    exact = H2_OVER_2PI_M0_E * c * np.pi / b * np.exp(-np.pi**2 * (x**2 + y**2) / b)
    np.testing.assert_allclose(v, exact, atol=1e-9 * exact.max())


def test_single_atom_is_round_and_peaked_at_the_atom():
    """Gold at the pixel (50, 50) of a 10 Å square: the maximum is there; the grid's own symmetries (mirrors
    and the diagonal) hold exactly; after the multislice's circular 2/3 band limit (the square frequency
    grid rings anisotropically without it) equal distances out to 1 Å, 5 and 10 pixels along an axis and
    along (3, 4) and (6, 8), differ by under 1 % (measured 0.8 %) while v falls 75-fold."""
    n, length = 100, 10.0
    cell = atoms((length, length, 2.0), [[5.0, 5.0, 1.0]], [79])
    v = projected_potential(cell, (n, n), dtype=torch.float64)
    assert np.unravel_index(int(v.argmax()), v.shape) == (50, 50)
    rounding = 1e-12 * float(v.max())
    torch.testing.assert_close(v, v.T, rtol=0.0, atol=rounding)
    torch.testing.assert_close(v[1:], v[1:].flip(0), rtol=0.0, atol=rounding)  # x -> −x about the atom
    k = torch.fft.fftfreq(n, d=length / n, dtype=torch.float64)
    round_limit = (k[:, None] ** 2 + k[None, :] ** 2) <= (2 / 3 * n / (2 * length)) ** 2
    v = torch.fft.ifft2(torch.fft.fft2(v) * round_limit).real.numpy()
    for ring in ([(5, 0), (3, 4), (4, 3), (0, -5)], [(10, 0), (6, 8), (-8, 6), (0, 10)]):
        values = [v[50 + a, 50 + b] for a, b in ring]
        np.testing.assert_allclose(values, values[0], rtol=1e-2)
        assert v[50, 50] > 15 * values[0]


def test_potential_is_real(si110):
    """Hermitian by construction (the Nyquist row/column of even axes dropped): imaginary part is rounding."""
    for gpts in [(64, 60), (63, 61)]:
        field = next(potential._slice_fields(si110, gpts, 1, None, torch.float64, 0.0))
        assert float(field.imag.abs().max()) < 1e-12 * float(field.real.abs().max())


def test_slices_sum_to_the_whole_cell(si110):
    slices = slice_potentials(si110, (72, 64), 1.0, dtype=torch.float64)
    assert slices.shape == (4, 72, 64)  # Lz = 3.84 Å -> 4 slices of 0.96 Å
    whole = projected_potential(si110, (72, 64), dtype=torch.float64)
    torch.testing.assert_close(slices.sum(0), whole, rtol=0, atol=1e-10 * float(whole.max()))


def test_atoms_go_to_the_slice_holding_their_z():
    cell = atoms((6.0, 6.0, 4.0), [[1.0, 1.0, 0.2], [3.0, 3.0, 1.9], [4.0, 2.0, 2.1], [2.0, 5.0, 3.99]],
                 [6, 8, 8, 29])
    v = slice_potentials(cell, (48, 48), 1.0, dtype=torch.float64)
    integrals = v.mean(dim=(1, 2)).numpy() * 36.0 / H2_OVER_2PI_M0_E
    f0 = {z: scattering_factor(z, 0.0) for z in (6, 8, 29)}
    np.testing.assert_allclose(integrals, [f0[6], f0[8], f0[8], f0[29]], rtol=1e-10)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_moving_atoms_one_pixel_moves_the_potential_one_pixel(si110, dtype, tol):
    gpts = (60, 64)
    step = np.array([si110.extent[0] / gpts[0], 2 * si110.extent[1] / gpts[1], 0.0])
    moved = Supercell(si110.extent, (si110.positions + step) % np.array(si110.extent), si110.numbers,
                      si110.zone, si110.cell_vectors, si110.strain)
    v = projected_potential(si110, gpts, dtype=dtype)
    w = projected_potential(moved, gpts, dtype=dtype)
    rolled = torch.roll(v, shifts=(1, 2), dims=(0, 1))
    torch.testing.assert_close(w, rolled, rtol=0, atol=tol * float(v.max()))


def test_float32_matches_float64_and_device_is_honoured(si110):
    v32 = slice_potentials(si110, (64, 64), 2.0, device="cpu", dtype=torch.float32)
    v64 = slice_potentials(si110, (64, 64), 2.0, device=torch.device("cpu"), dtype=torch.float64)
    assert v32.dtype == torch.float32 and v64.dtype == torch.float64
    assert v32.device.type == "cpu" and v64.device.type == "cpu"
    torch.testing.assert_close(v32.double(), v64, rtol=0, atol=1e-5 * float(v64.max()))
    with pytest.raises(ValueError, match="dtype"):
        slice_potentials(si110, (64, 64), 2.0, dtype=torch.float16)


def test_debye_waller_smears_but_conserves(si110):
    sharp = projected_potential(si110, (96, 96), dtype=torch.float64)
    smeared = projected_potential(si110, (96, 96), dtype=torch.float64, debye_waller=0.5)
    assert float(smeared.max()) < 0.8 * float(sharp.max())
    assert float(smeared.mean()) == pytest.approx(float(sharp.mean()), rel=1e-10)


def test_many_atoms_on_a_large_grid_is_quick(si110):
    """Hundreds of atoms on 512 x 512 (the chunked structure factor keeps memory small)."""
    big = orthogonal_supercell(Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.431), ["Si"], [[0, 0, 0]]),
                               [0, 0, 1], min_extent=40.0)
    assert len(big.numbers) > 400
    v = slice_potentials(big, (512, 512), big.extent[2] / 2)
    assert v.shape == (2, 512, 512) and bool(torch.isfinite(v).all())
    assert float(v.mean()) * big.extent[0] * big.extent[1] * 2 == pytest.approx(
        H2_OVER_2PI_M0_E * len(big.numbers) * scattering_factor(14, 0.0), rel=1e-5)
