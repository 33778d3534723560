"""Pattern physics of the synthetic CBED generator: scattering, absences, geometry and output contract."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

spglib = pytest.importorskip("spglib")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:spglib")

from stemdl.workloads.spacegroup.data.layout import Structure  # noqa: E402
from stemdl.workloads.spacegroup.synth import scattering as sc  # noqa: E402
from stemdl.workloads.spacegroup.synth.cbed import (  # noqa: E402
    PatternSpec,
    Reflections,
    random_spec,
    reflections,
    render,
    semi_angle,
    zone_frame,
)

# ----------------------------------------------------------------------------------------------------------
# structures built from the space-group operations (spglib's database, standard settings)


def orbit_structure(hall: int, lattice, sites) -> Structure:
    """The full conventional cell: every site (Z, frac) expanded by all operations of Hall setting `hall`."""
    sym = spglib.get_symmetry_from_database(hall)
    frac, numbers = [], []
    for z, x in sites:
        pts = (np.einsum("nij,j->ni", sym["rotations"], np.asarray(x, float)) + sym["translations"]) % 1.0
        uniq: list[np.ndarray] = []
        for p in pts:
            if not any(np.allclose((p - q + 0.5) % 1.0 - 0.5, 0.0, atol=1e-9) for q in uniq):
                uniq.append(p)
        frac += uniq
        numbers += [z] * len(uniq)
    return Structure(np.asarray(lattice, float), np.array(frac), np.array(numbers))


def hexagonal(a, c):
    return np.array([[a, 0, 0], [-a / 2, a * math.sqrt(3) / 2, 0], [0, 0, c]])


def monoclinic(a, b, c, beta_deg):
    be = math.radians(beta_deg)
    return np.array([[a, 0, 0], [0, b, 0], [c * math.cos(be), 0, c * math.sin(be)]])


@pytest.fixture(scope="module")
def si():
    s = orbit_structure(526, np.eye(3) * 5.431, [(14, (0.125, 0.125, 0.125))])  # Fd-3m origin 2, 8a
    assert len(s.numbers) == 8 and spglib.get_spacegroup(s.spglib_cell()) == "Fd-3m (227)"
    return s


@pytest.fixture(scope="module")
def pnma():
    sites = [(20, (0.03, 0.25, 0.99)), (22, (0.0, 0.0, 0.5)), (8, (0.48, 0.25, 0.08)), (8, (0.29, 0.04, 0.71))]
    s = orbit_structure(292, np.diag([5.5, 7.7, 5.4]), sites)
    assert len(s.numbers) == 20 and spglib.get_spacegroup(s.spglib_cell()) == "Pnma (62)"
    return s


def hkl_index(refl: Reflections, hkl) -> int | None:
    hit = np.flatnonzero(np.all(refl.hkl == np.asarray(hkl), axis=1))
    return int(hit[0]) if len(hit) else None


# ----------------------------------------------------------------------------------------------------------
# scattering


def test_wavelength_and_gamma():
    assert sc.wavelength_angstrom(100) == pytest.approx(0.03701, abs=1e-4)
    assert sc.wavelength_angstrom(200) == pytest.approx(0.02508, abs=1e-4)
    assert sc.wavelength_angstrom(300) == pytest.approx(0.01969, abs=1e-4)
    assert sc.gamma_factor(200) == pytest.approx(1.3914, abs=1e-4)


def test_scattering_factors():
    s = np.linspace(0, 2, 41)
    for el in ("H", "C", "O", "Si", "Fe", "Au", "U", 98):
        f = sc.scattering_factor(el, s)
        assert np.all(f > 0) and np.all(np.diff(f) < 0)
    # f_e(0) in angstrom (Doyle-Turner / Kirkland): Si 5.8, O 2.0, C 2.5, H 0.53
    for el, f0 in (("Si", 5.8), ("O", 2.0), ("C", 2.5), ("H", 0.53)):
        assert sc.scattering_factor(el, 0.0) == pytest.approx(f0, rel=0.05)
    assert sc.scattering_factor(14, 0.3) == sc.scattering_factor("Si", 0.3)
    # Mott-Bethe: the X-ray factor of Si 220 (s = 0.26 / angstrom) is about 8.7 electrons
    s220 = math.sqrt(8) / 5.431 / 2
    assert 14 - 41.78214 * s220**2 * sc.scattering_factor("Si", s220) == pytest.approx(8.7, abs=0.15)
    with pytest.raises(ValueError):
        sc.scattering_factor(99, 0.1)
    with pytest.raises(ValueError):
        sc.scattering_factor("Xx", 0.1)


def test_extinction_distances_of_silicon(si):
    # textbook two-beam extinction distances of Si at 100 kV (no Debye-Waller): 111 60 nm, 220 76 nm
    F = sc.structure_factors(si, [[1, 1, 1], [2, 2, 0]], 0.0)
    xi_nm = sc.extinction_distance(F, sc.cell_volume(si.lattice), 100) / 10
    assert xi_nm[0] == pytest.approx(60.2, rel=0.05)
    assert xi_nm[1] == pytest.approx(75.7, rel=0.03)
    assert np.isinf(sc.extinction_distance([0.0], 100.0, 200)[0])
    # Debye-Waller damps, more at larger |g|
    F_b = sc.structure_factors(si, [[1, 1, 1], [4, 4, 4]], 1.0)
    F_0 = sc.structure_factors(si, [[1, 1, 1], [4, 4, 4]], 0.0)
    ratio = np.abs(F_b) / np.abs(F_0)
    assert 1 > ratio[0] > ratio[1] > 0


def _extinct(sym, h) -> bool:
    """Space-group extinction: some operation (R, t) keeps h (h R = h) with h . t not an integer."""
    for r, t in zip(sym["rotations"], sym["translations"]):
        if np.array_equal(h @ r, h):
            ht = float(h @ t)
            if abs(ht - round(ht)) > 1e-6:
                return True
    return False


@pytest.mark.parametrize(
    "hall,lattice",
    [
        (526, np.eye(3) * 5.4),  # Fd-3m
        (292, np.diag([5.5, 7.7, 5.4])),  # Pnma
        (81, monoclinic(5.1, 6.2, 7.3, 101.0)),  # P2_1/c
        (63, monoclinic(9.1, 5.2, 6.3, 97.0)),  # C2/m
        (492, np.eye(3) * 6.1),  # P2_13
        (488, hexagonal(3.2, 5.2)),  # P6_3/mmc
        (460, hexagonal(4.9, 13.4)),  # R-3c, hexagonal axes
        (365, np.diag([5.2, 5.2, 11.5])),  # I4_1/a
        (530, np.eye(3) * 11.8),  # Ia-3d
    ],
)
def test_structure_factors_vanish_exactly_for_space_group_extinctions(hall, lattice):
    rng = np.random.default_rng(hall)
    s = orbit_structure(hall, lattice, [(26, rng.random(3)), (8, rng.random(3))])
    sym = spglib.get_symmetry_from_database(hall)
    hkl = np.array([h for h in np.ndindex(9, 9, 9)]) - 4
    hkl = hkl[np.any(hkl != 0, axis=1)]
    extinct = np.array([_extinct(sym, h) for h in hkl])
    for fast in (False, True):
        F = sc.structure_factors(s, hkl, 0.4, fast=fast)
        assert np.all(F[extinct] == 0)  # exactly, not just small
        assert np.all(np.abs(F[~extinct]) > 1e-4)  # general positions: nothing else vanishes
    assert extinct.any() or hall == 492 or hall == 81  # (sanity: most of these groups have extinctions)


# ----------------------------------------------------------------------------------------------------------
# systematic absences in the patterns


def test_silicon_001_absences(si):
    alpha, d = semi_angle(si, (0, 0, 1), 200)
    spec = PatternSpec((0, 0, 1), 200, alpha, 50.0, size=512)
    refl = reflections(si, spec)
    F = sc.structure_factors(si, [[2, 0, 0], [2, 2, 0], [4, 0, 0]], spec.debye_waller)
    assert F[0] == 0 and abs(F[1]) > 5 and abs(F[2]) > 3
    assert hkl_index(refl, (2, 0, 0)) is None and hkl_index(refl, (0, 2, 0)) is None
    k220, k400 = hkl_index(refl, (2, 2, 0)), hkl_index(refl, (4, 0, 0))
    assert k220 is not None and k400 is not None
    assert refl.i_peak[k220] > 0.1 and refl.i_peak[k400] > 0.01
    img, _ = render(si, spec)
    pix = 2 * spec.max_angle_rad / spec.size
    rows, cols = np.mgrid[: spec.size, : spec.size]

    def disc(centre, radius_rad):
        return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= (radius_rad / pix) ** 2

    # where the 200 disc would be: exactly dark (the 111-type HOLZ tails overlap only its rim)
    lam = sc.wavelength_angstrom(200)
    c0 = (spec.size - 1) / 2
    c200 = c0 + (refl.centre_px[k400] - c0) / 2  # same direction as 400, half the distance
    assert np.linalg.norm((c200 - c0) * pix) == pytest.approx(lam * 2 / 5.431, rel=1e-6)
    assert np.all(img[disc(c200, 2e-3)] == 0)
    assert img[disc(refl.centre_px[k220], 0.8 * alpha)].mean() > 1e-3 * img.max()
    assert img[disc(refl.centre_px[k400], 0.8 * alpha)].mean() > 1e-4 * img.max()


def test_rocking_curve_orientation_in_a_disc(si):
    # a zero-layer reflection meets its Bragg condition halfway between the (000) and g discs, so in a thin
    # crystal (first fringe wider than the disc) its disc is brighter on the side facing the centre
    spec = PatternSpec((0, 0, 1), 200, semi_angle(si, (0, 0, 1), 200)[0], 10.0, rotation_rad=0.4, size=512)
    refl = reflections(si, spec)
    img, _ = render(si, spec, refl=refl)
    pix = 2 * spec.max_angle_rad / spec.size
    c0 = (spec.size - 1) / 2
    rows, cols = np.mgrid[: spec.size, : spec.size]
    for hkl in ((2, 2, 0), (-2, 2, 0), (4, 0, 0)):
        k = hkl_index(refl, hkl)
        centre = refl.centre_px[k]
        inside = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= (0.9 * spec.semi_angle_rad / pix) ** 2
        towards = (rows - centre[0]) * (c0 - centre[0]) + (cols - centre[1]) * (c0 - centre[1]) > 0
        assert img[inside & towards].mean() > 1.2 * img[inside & ~towards].mean()


def test_pnma_absences(pnma):
    B = 0.5
    F = dict(zip(["100", "110", "300", "120", "010", "200", "020", "001", "101", "002", "011"],
                 sc.structure_factors(pnma, [[1, 0, 0], [1, 1, 0], [3, 0, 0], [1, 2, 0], [0, 1, 0], [2, 0, 0],
                                             [0, 2, 0], [0, 0, 1], [1, 0, 1], [0, 0, 2], [0, 1, 1]], B)))
    for h in ("100", "110", "300", "120", "010", "001"):
        assert F[h] == 0, h
    for h in ("200", "020", "101", "002", "011"):
        assert abs(F[h]) > 0.5, h

    # [001]: zero layer hk0 with h odd absent (a-glide), 200 and 020 drawn
    spec = PatternSpec((0, 0, 1), 200, semi_angle(pnma, (0, 0, 1), 200)[0], 40.0, size=256)
    refl = reflections(pnma, spec)
    zolz = refl.hkl[refl.layer == 0]
    assert len(zolz) > 20 and np.all(zolz[:, 0] % 2 == 0) and np.all(zolz[:, 2] == 0)
    assert not np.any((zolz[:, 0] == 0) & (zolz[:, 1] % 2 == 1))  # 0k0, k odd (2_1 along b)
    assert hkl_index(refl, (2, 0, 0)) is not None and hkl_index(refl, (0, 2, 0)) is not None
    assert np.all(np.abs(refl.F) > 0)

    # [010]: 100 and 001 absent (2_1 screw axes along a and c), 101 drawn
    spec = PatternSpec((0, 1, 0), 200, semi_angle(pnma, (0, 1, 0), 200)[0], 40.0, size=256)
    refl = reflections(pnma, spec)
    zolz = refl.hkl[refl.layer == 0]
    assert np.all(zolz[:, 1] == 0)
    assert not np.any((zolz[:, 2] == 0) & (zolz[:, 0] % 2 == 1))
    assert not np.any((zolz[:, 0] == 0) & (zolz[:, 2] % 2 == 1))
    for h in ((1, 0, 0), (0, 0, 1), (-1, 0, 0), (3, 0, 0)):
        assert hkl_index(refl, h) is None
    assert hkl_index(refl, (1, 0, 1)) is not None


# ----------------------------------------------------------------------------------------------------------
# output contract, symmetry, determinism


@pytest.mark.parametrize("size", [128, 256, 512])
def test_output_contract(pnma, size):
    spec = random_spec(pnma, (1, 2, 3), 200, np.random.default_rng(size), size=size)
    img, y_dir = render(pnma, spec)
    assert img.dtype == np.float32 and img.shape == (size, size)
    assert np.all(np.isfinite(img)) and img.min() >= 0
    assert abs(float(img.sum(dtype=np.float64)) - 1) < 1e-4
    assert (img > 0).mean() > 0.01  # discs, not a single pixel
    frame = zone_frame(pnma, (1, 2, 3))
    assert y_dir.shape == (3,) and np.linalg.norm(y_dir) == pytest.approx(1)
    assert abs(y_dir @ frame.z_hat) < 1e-12
    # with noise too
    img_n, _ = render(pnma, dataclasses.replace(spec, dose=1e5), rng=1)
    assert img_n.dtype == np.float32 and img_n.min() >= 0 and abs(float(img_n.sum(dtype=np.float64)) - 1) < 1e-4


@pytest.mark.parametrize("zone", [(0, 0, 1), (0, 1, 0), (1, 0, 0)])
def test_friedel_centrosymmetry_without_mistilt(si, pnma, zone):
    # the beam is at the exact image centre (corner of the four central pixels for even sizes), so the
    # point reflection through it is img[::-1, ::-1]; these zones have a 2-fold axis along the beam in the
    # Laue group, so the HOLZ features are centrosymmetric as well
    for s in (si, pnma):
        spec = PatternSpec(zone, 200, semi_angle(s, zone, 200)[0], 37.0, rotation_rad=0.3, size=256)
        img, _ = render(s, spec)
        assert np.abs(img - img[::-1, ::-1]).max() <= 1e-5 * img.max()
        tilted, _ = render(s, dataclasses.replace(spec, mistilt_rad=(8e-4, -3e-4)))
        assert np.abs(tilted - tilted[::-1, ::-1]).max() > 1e-2 * tilted.max()  # mistilt breaks it


def test_zero_layer_is_centrosymmetric_in_any_zone(pnma):
    spec = PatternSpec((1, 2, 3), 100, semi_angle(pnma, (1, 2, 3), 100)[0], 60.0, size=256)
    refl = reflections(pnma, spec)
    z = refl.layer == 0
    for k in np.flatnonzero(z):
        m = hkl_index(refl, -refl.hkl[k])
        assert m is not None
        assert abs(refl.F[m]) == pytest.approx(abs(refl.F[k]), rel=1e-6)
        assert refl.i_centre[m] == pytest.approx(refl.i_centre[k], rel=1e-6)


def test_determinism_and_noise(pnma):
    spec = PatternSpec((0, 1, 1), 200, semi_angle(pnma, (0, 1, 1), 200)[0], 55.0, mistilt_rad=(5e-4, 2e-4))
    a, ya = render(pnma, spec, rng=0)
    b, yb = render(pnma, spec, rng=1)
    assert np.array_equal(a, b) and np.array_equal(ya, yb)  # noiseless: the rng is not used
    noisy = dataclasses.replace(spec, dose=2e5)
    n0, _ = render(pnma, noisy, rng=7)
    n0b, _ = render(pnma, noisy, rng=np.random.default_rng(7))
    n1, _ = render(pnma, noisy, rng=8)
    assert np.array_equal(n0, n0b)
    assert not np.array_equal(n0, n1)
    # Poisson counts: every value is a whole number of electrons (of about 2e5), close to the clean pattern
    counts = n0.astype(np.float64) / n0[n0 > 0].min()
    assert np.abs(counts - np.rint(counts)).max() < 1e-3
    assert counts.sum() == pytest.approx(2e5, rel=0.01)
    assert np.abs(n0.astype(np.float64) - a).sum() < 0.3
    spec2 = random_spec(pnma, (0, 1, 1), 200, 3)
    assert spec2 == random_spec(pnma, (0, 1, 1), 200, 3)
    assert 20 <= spec2.thickness_nm <= 80 and math.hypot(*spec2.mistilt_rad) <= 1e-3


# ----------------------------------------------------------------------------------------------------------
# geometry


def test_disc_positions_follow_y_dir(pnma):
    spec = PatternSpec((1, 1, 0), 200, semi_angle(pnma, (1, 1, 0), 200)[0], 50.0, rotation_rad=1.1, size=512)
    refl = reflections(pnma, spec)
    _, y_dir = render(pnma, spec, refl=refl)
    frame = zone_frame(pnma, (1, 1, 0), 1.1)
    x_dir = np.cross(y_dir, frame.z_hat)
    g = refl.hkl @ sc.reciprocal_lattice(pnma.lattice)
    lam = sc.wavelength_angstrom(200)
    pix = 2 * spec.max_angle_rad / spec.size
    c0 = (spec.size - 1) / 2
    np.testing.assert_allclose(refl.centre_px[:, 0], c0 - lam * (g @ y_dir) / pix, atol=1e-6)
    np.testing.assert_allclose(refl.centre_px[:, 1], c0 + lam * (g @ x_dir) / pix, atol=1e-6)
    np.testing.assert_allclose(refl.layer, refl.hkl @ np.array([1, 1, 0]))
    np.testing.assert_allclose(refl.g_z, (g @ frame.z_hat), atol=1e-12)


def test_mistilt_moves_the_laue_circle(pnma):
    # the optic axis is tilted by m from the zone axis, so the zone axis, the centre of the circle of excited
    # zero-layer reflections (the Laue circle), is at -m on the image: s_g = g_z - lam |g|^2 / 2 - m . g
    m = np.array([12e-3, -5e-3])  # far more than a real mistilt, so that the circle passes many reflections
    spec = PatternSpec((0, 0, 1), 200, semi_angle(pnma, (0, 0, 1), 200)[0], 30.0, mistilt_rad=tuple(m), size=256)
    refl = reflections(pnma, spec)
    lam = sc.wavelength_angstrom(200)
    g2 = np.sum(refl.g_xy**2, axis=1) + refl.g_z**2
    np.testing.assert_allclose(refl.s_centre, refl.g_z - lam * g2 / 2 - refl.g_xy @ m, atol=1e-12)
    z = np.flatnonzero(refl.layer == 0)
    near = z[np.abs(refl.s_centre[z]) < 1e-3]  # (nearly) at the Bragg condition: on the Laue circle
    assert len(near) >= 6
    radius = np.linalg.norm(lam * refl.g_xy[near] + m, axis=1)  # distance from -m, in rad
    np.testing.assert_allclose(radius, np.linalg.norm(m), rtol=0.15)
    # and those are the bright discs of this thin crystal
    strongest = z[np.argsort(-refl.i_centre[z])[:6]]
    assert np.all(np.linalg.norm(lam * refl.g_xy[strongest] + m, axis=1) < 1.3 * np.linalg.norm(m))


def test_rotation_by_quarter_turn_is_rot90(si, pnma):
    for s, zone in ((pnma, (1, 2, 3)), (si, (1, 1, 1))):
        spec = PatternSpec(zone, 200, semi_angle(s, zone, 200)[0], 45.0, rotation_rad=0.2, size=128)
        a, ya = render(s, spec)
        b, yb = render(s, dataclasses.replace(spec, rotation_rad=0.2 + math.pi / 2))
        # y_dir turned by +90 degrees about the beam: the old "left" is now up, the pattern turned clockwise
        frame = zone_frame(s, zone)
        assert yb == pytest.approx(np.cross(frame.z_hat, ya), abs=1e-12)
        np.testing.assert_allclose(b, np.rot90(a, k=-1), atol=1e-6 * a.max())


def test_semi_angle_rule(si, pnma):
    lam = sc.wavelength_angstrom(200)
    alpha, d = semi_angle(si, (0, 0, 1), 200)
    assert d == pytest.approx(5.431 / math.sqrt(8))  # 220: 200 is forbidden
    assert alpha == pytest.approx(min(0.45 * lam / d, 4e-3))
    alpha, d = semi_angle(si, (1, 1, 0), 200)
    assert d == pytest.approx(5.431 / math.sqrt(3))  # 111
    assert alpha == pytest.approx(0.45 * lam / d)
    # Pnma [001]: 010 is absent (2_1), but 210 and 220 are both allowed: discs are |b*| apart
    alpha, d = semi_angle(pnma, (0, 0, 1), 200)
    assert d == pytest.approx(7.7) and alpha == pytest.approx(0.45 * lam / 7.7)
    for s in (si, pnma):
        for zone in ((0, 0, 1), (0, 1, 0), (1, 1, 0), (1, 1, 1), (1, 2, 3), (0, 1, 2)):
            for energy in (100, 200):
                alpha, d = semi_angle(s, zone, energy)
                assert 1e-3 <= alpha <= 4e-3
                spec = PatternSpec(zone, energy, alpha, 50.0, size=256)
                refl = reflections(s, spec)
                z = refl.g_xy[refl.layer == 0]
                pts = np.vstack([np.zeros((1, 2)), z])
                dist = np.linalg.norm(pts[:, None] - pts[None, :], axis=-1)
                g_min = dist[dist > 0].min()
                assert d == pytest.approx(1 / g_min, rel=1e-9)  # the closest pair of discs drawn
                if alpha > 1e-3:  # not raised to the 1 mrad floor: neighbouring discs never overlap
                    wl = sc.wavelength_angstrom(energy)
                    assert wl * g_min > 2 * alpha
                    assert alpha == pytest.approx(min(0.45 * wl * g_min, 4e-3))


def test_two_beam_intensity_and_holz_lines(si):
    spec = PatternSpec((1, 1, 1), 100, semi_angle(si, (1, 1, 1), 100)[0], 150.0, debye_waller=0.3, size=256)
    refl = reflections(si, spec)
    t = 1500.0
    seff = np.sqrt(refl.s_centre**2 + refl.xi**-2)
    expect = (np.pi / refl.xi) ** 2 * np.sin(np.pi * t * seff) ** 2 / (np.pi * seff) ** 2
    np.testing.assert_allclose(refl.i_centre, expect, rtol=1e-9)
    assert np.all(refl.i_centre <= refl.i_peak * (1 + 1e-9))
    holz = refl.layer != 0
    assert holz.sum() > 20
    # the Ewald sphere curves towards the n > 0 zones: those are excited on the HOLZ ring, the n < 0 ones are
    # kinematic tails only
    assert refl.i_peak[refl.layer > 0].max() > 0.05 and refl.i_peak[refl.layer < 0].max() < 1e-3
    ring = (refl.layer == 1) & (refl.i_peak > 1e-3)  # the excited ones; the rest are tails
    lam = sc.wavelength_angstrom(100)
    assert np.all(np.abs(refl.s_centre[ring]) < np.linalg.norm(refl.g_xy[ring], axis=1) * spec.semi_angle_rad * 1.2)
    r_ring = np.sqrt(2 * refl.g_z[ring] / lam)  # |g_perp| where s = 0 on the exact zone axis
    assert ring.sum() >= 12
    np.testing.assert_allclose(np.linalg.norm(refl.g_xy[ring], axis=1), r_ring, rtol=0.05)
    # HOLZ deficiency lines: the bright field with the HOLZ reflections is darker along lines, never brighter
    zolz_only = Reflections(*[getattr(refl, f.name)[~holz] for f in dataclasses.fields(refl)])
    img, _ = render(si, spec, refl=refl)
    img0, _ = render(si, spec, refl=zolz_only)
    pix = 2 * spec.max_angle_rad / spec.size
    c0 = (spec.size - 1) / 2
    rows, cols = np.mgrid[: spec.size, : spec.size]
    inner = (rows - c0) ** 2 + (cols - c0) ** 2 <= (0.9 * spec.semi_angle_rad / pix) ** 2
    ratio = img[inner].astype(float) / img0[inner]
    ratio /= ratio.max()  # the images are normalised differently
    assert ratio.min() < 0.9  # dark lines
    assert np.mean(ratio > 0.99) > 0.2  # ... across an otherwise unchanged disc
