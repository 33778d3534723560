"""Bloch-wave LACBED (stemdl.physics.bloch) against two-beam theory, unitarity, its own geometry rule and
the multislice engine: two methods, one answer.

All at 200 keV along [001]. The CPU tests take ~20 s together on one thread.
"""

import math

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from stemdl.physics import bloch, potential
from stemdl.physics.electrons import gamma, wavelength
from stemdl.physics.supercell import crystal_arrays, orthogonal_supercell
from stemdl.workloads.spacegroup.synth import scattering

KEV = 200.0
LAMBDA = wavelength(KEV)
C128 = torch.complex128


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread for these tests (restored after): on a shared, loaded CPU the FFTs of the multislice
    ran 2x faster on one thread than on two (9.4 s against 19.9 s for the MgO case below)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mgo():
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.212), ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])


@pytest.fixture(scope="module")
def srtio3():
    return Structure.from_spacegroup("Pm-3m", Lattice.cubic(3.905), ["Sr", "Ti", "O"],
                                     [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0]])


def nacl():
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.640), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


# ---- structure factors: the engine's sign convention --------------------------------------------------------

def test_fourier_coefficients_are_the_engines_projected_potential():
    """V_g · Lz equals the Fourier coefficient of the engine's projected potential, phase included, for a
    structure with no symmetry at all (P1, three species at random sites): one sign convention, F_g =
    Σ f exp(−2πi g·r_j), in both methods. Measured: agreement to 1e-14 relative."""
    rng = np.random.default_rng(0)
    p1 = Structure(Lattice.orthorhombic(4.0, 4.5, 3.5), ["Ga", "As", "O"], rng.random((3, 3)))
    cell = orthogonal_supercell(p1, (0, 0, 1))
    v = potential.projected_potential(cell, (30, 32), dtype=torch.float64)
    coeff = torch.fft.fft2(v).numpy() / v.numel()
    hkl = [(1, 0, 0), (0, 1, 0), (1, 2, 0), (-2, 1, 0), (3, -1, 0)]
    expected = bloch.fourier_potential(p1, hkl) * 3.5
    got = np.array([coeff[h, k] for h, k, _ in hkl])
    assert np.abs(got - expected).max() < 1e-10 * np.abs(expected).max()
    # the tuple of arrays serves as well as the Structure; U_g = γ F_g / (π Ω)
    u = bloch.structure_factors(crystal_arrays(p1), hkl, KEV)
    volume = 4.0 * 4.5 * 3.5
    assert np.allclose(u, gamma(KEV) * bloch.structure_factor_F(p1, hkl) / (math.pi * volume), rtol=1e-14)


# ---- beams -------------------------------------------------------------------------------------------------------

def test_beam_selection(si, mgo):
    """000 first, ZOLZ only, at least the requested count and whole shells (the set is invariant under the
    square's 4mm), ranked by |g| + d_g; the beams that cannot couple to 000 left out (Si: {200}, {420}:
    F = 0 and every path through the ZOLZ stays in that class; FCC: mixed hkl, absent by centring)."""
    for crystal, n in ((si, 40), (mgo, 60)):
        beams = bloch.select_beams(crystal, n, energy_keV=KEV)
        assert len(beams) >= n and np.all(beams.hkl[0] == 0) and np.all(beams.hkl[:, 2] == 0)
        assert np.all(np.diff(beams.rank) >= -1e-12)
        keys = {tuple(h) for h in beams.hkl.tolist()}
        for h, k, l in beams.hkl.tolist():
            for image in ((-h, k, l), (h, -k, l), (k, h, l)):
                assert image in keys
        h, k = beams.hkl[:, 0], beams.hkl[:, 1]
        assert np.all((h - k) % 2 == 0)  # F centring: h, k, (l = 0) unmixed
        if crystal is si:
            assert np.all((h + k) % 4 == 0)
        assert "beams (requested" in beams.describe()
    explicit = bloch.select_beams(mgo, [(2, 0, 0), (0, 0, 0), (2, 2, 0)])
    assert explicit.hkl.tolist() == [[0, 0, 0], [2, 0, 0], [2, 2, 0]]
    assert np.allclose(explicit.U[1, 0], bloch.structure_factors(mgo, [(2, 0, 0)])[0])
    with pytest.raises(ValueError, match="ZOLZ"):
        bloch.select_beams(mgo, [(1, 1, 1)])


# ---- two-beam theory ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("surface_normal", [False, True])
def test_two_beam_pendellosung(mgo, surface_normal):
    """Beams {000, 200} at the exact Bragg condition (k_t = −g/2): I_g(t) = sin²(π t/ξ_g), ξ_g = 1/(λ|U_g|)
    = π Ω/(λ γ |F_g|), the kinematic generator's formula with this F; with the surface-normal correction
    the period is ξ_g · K_n/K (K_n = K cos θ_B). Measured: 1e-15 (complex128)."""
    g = (2, 0, 0)
    xi = bloch.two_beam_xi(mgo, g, KEV)
    volume = 4.212**3
    assert xi == pytest.approx(float(scattering.extinction_distance(bloch.structure_factor_F(mgo, [g]), volume,
                                                                    KEV)[0]), rel=1e-12)
    beams = bloch.select_beams(mgo, [g], energy_keV=KEV)
    k_bragg = -0.5 * beams.g[1]  # 1/Å in the beam frame
    tilt = k_bragg * LAMBDA * 1e3
    t = np.linspace(0.0, 2.0 * xi, 41)
    out = bloch.intensities(beams, [tilt], t, which=(0, 1), dtype=C128, surface_normal=surface_normal)[:, 0]
    period = xi * (math.sqrt(1.0 - (LAMBDA * np.linalg.norm(k_bragg)) ** 2) if surface_normal else 1.0)
    expected = np.sin(np.pi * t / period) ** 2
    assert np.abs(out[:, 1].numpy() - expected).max() < 1e-10
    assert np.abs(out[:, 0].numpy() - (1 - expected)).max() < 1e-10


def test_norm_conserved_for_every_pixel_and_thickness(srtio3):
    """A is Hermitian, C unitary: Σ_g |ψ_g|² = 1 at every tilt and thickness (primitive SrTiO3, 69 beams,
    8x8 tilts, 0-2000 Å). Measured: 4e-14 (complex128), 2e-6 (complex64)."""
    beams = bloch.select_beams(srtio3, 60, energy_keV=KEV)
    tilts = bloch.lacbed_tilts(8, bloch.tilt_half_width_mrad(srtio3, KEV))
    thick = [0.0, 137.0, 500.0, 2000.0]
    for dtype, tol in ((C128, 1e-11), (torch.complex64, 1e-4)):
        out = bloch.intensities(beams, tilts, thick, which=np.arange(len(beams)), dtype=dtype, chunk=13)
        assert out.shape == (4, 64, len(beams))
        assert float((out.sum(-1) - 1).abs().max()) < tol
        assert torch.allclose(out[0, :, 0], torch.ones(64, dtype=out.dtype))  # t = 0: all in 000


# ---- LACBED geometry -----------------------------------------------------------------------------------------------

def test_tilt_range_rule_puts_bragg_lines_at_fixed_pixels(mgo):
    """Half-width K_RANGE/a: the 000 two-beam dark line of 200 (at ξ/2, I_0 = 0 exactly at s = 0) falls on
    column S/2 − S/(2 K_RANGE) for rock salts of different a (MgO 4.212 Å, NaCl 5.640 Å), every row; 020
    on that row: x along columns, y down the rows."""
    size = 16
    line = size // 2 - round(size / (2 * bloch.K_RANGE))
    for crystal in (mgo, nacl()):
        for g in ((2, 0, 0), (0, 2, 0)):
            xi = bloch.two_beam_xi(crystal, g, KEV)
            img = bloch.lacbed(crystal, [xi / 2], size, KEV, beams=[g], dtype=C128, surface_normal=False)[0]
            assert img.shape == (size, size) and img.dtype == torch.float32
            dark, profile = (img[:, line], img.mean(0)) if g[0] else (img[line, :], img.mean(1))
            assert int(profile.argmin()) == line
            assert float(dark.max()) < 1e-6
    assert bloch.tilt_half_width_mrad(mgo, KEV) == pytest.approx(1e3 * LAMBDA * bloch.K_RANGE / 4.212)


def test_pattern_has_the_zone_symmetry(si):
    """Si [001] (4mm in projection, centrosymmetric): the 000 pattern is invariant under x -> −x, y -> −y
    and x <-> y (even S: the zone axis is pixel (S/2, S/2), so compare [1:, 1:]). Measured: 1e-6."""
    img = bloch.lacbed(si, [400.0], 16, KEV, beams=60)[0, 1:, 1:].numpy()
    scale = img.max()
    for image in (img[::-1, :], img[:, ::-1], img.T):
        assert np.abs(image - img).max() < 1e-4 * scale


# ---- two methods, one answer -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, beams, slice_A, k_max, debye_waller, thicknesses", [
    ("si", 100, 2.0, 3.0, 0.0, (200.0, 500.0, 1000.0)),
    ("mgo", 200, 1.0, 4.0, 0.0, (200.0, 500.0, 1000.0)),
    ("srtio3", 400, 1.0, 4.0, 0.5, (200.0, 500.0, 1000.0)),
])
def test_bloch_and_multislice_agree(name, beams, slice_A, k_max, debye_waller, thicknesses, request):
    """The 000 LACBED (16x16 tilts over ±2/a) by Bloch waves and by the multislice engine (projected
    potential sliced, |k| <= k_max): ZNCC >= 0.99 at each thickness, Bloch evaluated at the thicknesses
    the whole slices reach. Measured (complex64): Si 0.99980, 0.99985, 0.99882 (101 beams, 1.81 Å slices,
    3 1/Å); MgO 0.99995, 0.99900, 0.99725 (201 beams, 1.05 Å, 4 1/Å); SrTiO3 with B = 0.5 Å² 0.99999,
    0.99969, 0.99938 (401 beams, 0.98 Å, 4 1/Å). A heavy static lattice (SrTiO3, B = 0) needs ~800 beams
    and 0.5 Å, 5 1/Å for the same agreement at 1000-2000 Å (bloch.BEAMS, MS_SLICE_A, MS_K_MAX)."""
    crystal = request.getfixturevalue(name)
    ms = bloch.lacbed_multislice(crystal, thicknesses, 16, KEV, slice_A=slice_A, k_max=k_max,
                                 debye_waller=debye_waller)
    blo = bloch.lacbed(crystal, ms.thicknesses_A, 16, KEV, beams=beams, surface_normal=False,
                       debye_waller=debye_waller)
    scores = bloch.zncc(blo.numpy(), ms.patterns.numpy())
    assert np.all(scores >= 0.99), scores


# ---- similarity ---------------------------------------------------------------------------------------------------

def test_zncc():
    """ZNCC = Σ(a − ā)(b − b̄)/(σ_a σ_b N), population σ: 1 for gain and offset, −1 for a negative; a hand
    value; stacks; torch (differentiable) equals numpy; a constant image gives NaN."""
    rng = np.random.default_rng(1)
    a = rng.random((8, 9))
    assert bloch.zncc(a, 3.0 * a + 2.0) == pytest.approx(1.0)
    assert bloch.zncc(a, -a) == pytest.approx(-1.0)
    x, y = np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[1.0, 3.0], [2.0, 5.0]])
    # means 2.5 and 2.75; Σ products of deviations 5.5; σ_x = sqrt(1.25), σ_y = sqrt(2.1875); N = 4
    assert bloch.zncc(x, y) == pytest.approx(5.5 / (4 * math.sqrt(1.25 * 2.1875)), rel=1e-12)
    b = rng.random((8, 9))
    stack = bloch.zncc(np.stack([a, a]), np.stack([b, a]))
    assert stack.shape == (2,) and stack[1] == pytest.approx(1.0)
    ta = torch.tensor(a, requires_grad=True)
    score = bloch.zncc(ta, torch.tensor(b))
    assert float(score.detach()) == pytest.approx(bloch.zncc(a, b), rel=1e-12)
    score.backward()
    assert ta.grad is not None and torch.isfinite(ta.grad).all()
    assert math.isnan(bloch.zncc(np.ones((3, 3)), a[:3, :3]))
    with pytest.raises(ValueError):
        bloch.zncc(a, b[:4])


# ---- devices -------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_agree(si):
    """The same patterns on CPU and CUDA, complex64 and complex128 (cuSOLVER against LAPACK)."""
    beams = bloch.select_beams(si, 100, energy_keV=KEV)
    for dtype, tol in ((torch.complex64, 1e-4), (C128, 1e-10)):
        cpu = bloch.lacbed(si, [500.0, 1500.0], 32, KEV, beamset=beams, dtype=dtype)
        gpu = bloch.lacbed(si, [500.0, 1500.0], 32, KEV, beamset=beams, dtype=dtype, device="cuda")
        assert gpu.device.type == "cuda"
        assert float((cpu - gpu.cpu()).abs().max()) < tol
    ms_cpu = bloch.lacbed_multislice(si, [500.0], 16, KEV, slice_A=2.0, k_max=2.5).patterns
    ms_gpu = bloch.lacbed_multislice(si, [500.0], 16, KEV, slice_A=2.0, k_max=2.5, device="cuda").patterns
    assert float((ms_cpu - ms_gpu.cpu()).abs().max()) < 1e-4


def test_symmetry_is_used_only_where_exact(si):
    """Si [001]: all eight maps of the square hold (4mm), 256 pixels computed as 45 orbits, and the
    pattern equals the full computation; a structure with no symmetry (P1) keeps the identity only."""
    beams = bloch.select_beams(si, 60, energy_keV=KEV)
    assert len(bloch.pattern_symmetry(beams)) == 8
    assert len(np.unique(bloch._pixel_orbits(16, bloch.pattern_symmetry(beams)))) == 45
    fast = bloch.lacbed(si, [300.0, 900.0], 16, KEV, beamset=beams, dtype=C128)
    full = bloch.lacbed(si, [300.0, 900.0], 16, KEV, beamset=beams, dtype=C128, symmetry=False)
    assert float((fast - full).abs().max()) < 1e-6
    rng = np.random.default_rng(2)
    p1 = Structure(Lattice.cubic(4.0), ["Ga", "As", "O"], rng.random((3, 3)))
    ops = bloch.pattern_symmetry(bloch.select_beams(p1, 30, energy_keV=KEV))
    assert len(ops) == 1 and np.array_equal(ops[0], np.eye(2))
