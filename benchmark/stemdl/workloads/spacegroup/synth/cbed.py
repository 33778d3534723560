"""Kinematic / two-beam convergent-beam electron diffraction (CBED) patterns of a crystal along a zone axis.

Geometry and conventions
------------------------
* ẑ is the zone axis [uvw] (the real-space direction u a + v b + w c), normalised. It points from the specimen
  towards the electron source: the electrons travel along −ẑ. Reciprocal vectors g = h a* + k b* + l c*
  (1/Å, no 2π) lie in Laue zone n = g·[uvw] = hu + kv + lw; the component along ẑ is g_z = n / |u a + v b + w c|.
  With this convention the higher-order Laue zones (HOLZ) that the Ewald sphere meets are the n > 0 ones.
* The image is the far-field (angular) distribution seen from the source side: x̂ right, ŷ up, ẑ towards the
  viewer, x̂ = ŷ × ẑ. Row 0 is the top of the array ("up" = decreasing row index), column 0 the left.
  `y_dir` (returned by `render`) is ŷ in Cartesian coordinates (the frame of the structure's lattice rows).
  Before the in-plane rotation, ŷ is the part of a (or b, or c: the first of them that is mostly
  perpendicular to ẑ) perpendicular to ẑ; `rotation_rad` then turns ŷ by that angle about ẑ (right-handed),
  so the pattern turns by the same angle clockwise on the image.
* Scattering angles map linearly to pixels: the image half-width (the outer edge of the edge pixels) is
  `max_angle_rad`, so one pixel is 2·max_angle_rad/size. The transmitted beam (the centre of the (000) disc,
  the optic axis) is at the exact centre of the image, pixel coordinate ((size−1)/2, (size−1)/2) with pixel
  centres at integer coordinates: for even sizes it is the corner shared by the four central pixels, so a
  point reflection of the pattern through the beam is exactly `img[::-1, ::-1]`.
* Every reflection g is a disc of radius α (the convergence semi-angle) centred at the angle λ g⊥ (g⊥ the
  part of g perpendicular to ẑ). A point at offset δ (a 2-vector in rad) from the centre of any disc belongs to
  the incident direction tilted by m + δ from the zone axis, m = `mistilt_rad` = (m_x, m_y) being the tilt of
  the optic axis away from the zone axis along x̂ and ŷ. Its excitation error (positive inside the Ewald
  sphere) is
      s_g(δ) = g_z − λ|g|²/2 − (m + δ)·g⊥ ,
  e.g. a ZOLZ reflection is at its Bragg condition on the line halfway between the (000) and g disc centres.
* Intensity in disc g (two-beam rocking curve for thickness t, ξ_g the extinction distance):
      I_g(δ) = (π/ξ_g)² sin²(π t s_eff) / (π s_eff)²,   s_eff = sqrt(s_g² + ξ_g⁻²).
  Bright-field disc: I_0(δ) = exp(−Σ_g I_g(δ)) = 1 − Σ_g I_g + O(I²) over all included reflections, HOLZ ones
  too (whose discs may be far outside the detector), so HOLZ deficiency lines cross it; the exponential keeps
  it positive where the two-beam intensities of many simultaneously excited reflections add up past 1.
  Discs are drawn with a one-pixel linear anti-aliased edge; overlapping discs add.
* Which reflections: every g (ZOLZ or HOLZ, any n) scattering by up to `max_scatter_rad` (0.12 rad) whose
  largest intensity anywhere in its disc can reach `min_intensity` (1e-5 of the incident beam by default),
  using the exact F_g; of those the strongest `max_reflections` (3000) are kept. All of them deplete the
  bright field; their discs are drawn where they overlap the image. The search runs layer by layer over
  the annulus of each Laue zone that can come that close to the Ewald sphere, with the bound
  |F_g| <= exp(−B s²) Σ_j f_j(s) before the structure factors are computed.
* Kinematic: F_g = F_-g in modulus (Friedel), so without mistilt the zero-layer part of a pattern is
  centrosymmetric; HOLZ features are centrosymmetric too when the Laue group has a 2-fold axis along ẑ.
  Forbidden reflections are exactly zero (no dynamical multiple scattering, hence no Gjønnes–Moodie lines).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from stemdl.workloads.spacegroup.synth.scattering import (
    _param_table,
    cell_volume,
    gamma_factor,
    reciprocal_lattice,
    structure_factors,
    wavelength_angstrom,
)

MIN_INTENSITY = 1e-5  # reflections whose peak two-beam intensity stays below this (incident beam = 1) are skipped
MAX_REFLECTIONS = 3000  # the strongest this many are drawn
MAX_SCATTER_RAD = 0.12  # reflections up to this scattering angle deplete the bright field (HOLZ lines)
CHUNK = 1 << 19  # (reflection, pixel) pairs evaluated at a time
SEMI_ANGLE_FRACTION = 0.45  # alpha = 0.45 lambda |g_min|: < 0.5, so neighbouring discs never overlap
SEMI_ANGLE_RANGE = (1e-3, 4e-3)  # ... clipped to 1..4 mrad


@dataclass(frozen=True)
class PatternSpec:
    """Everything that fixes one pattern of a structure (besides the noise draw)."""

    zone_axis: tuple  # [uvw], integers
    energy_keV: float
    semi_angle_rad: float  # convergence semi-angle alpha
    thickness_nm: float
    rotation_rad: float = 0.0  # in-plane rotation of the pattern (see module docstring)
    mistilt_rad: tuple = (0.0, 0.0)  # tilt of the optic axis from the zone axis along image x, y
    size: int = 512
    max_angle_rad: float = 0.05  # scattering angle at the image half-width
    dose: float | None = None  # electrons per pattern for Poisson noise; None: noiseless
    debye_waller: float = 0.5  # isotropic B in angstrom^2


@dataclass(frozen=True)
class ZoneFrame:
    """An integer reciprocal basis adapted to a zone axis, and the image frame."""

    uvw: np.ndarray  # (3,) int, reduced
    basis: np.ndarray  # (3, 3) int, rows m1, m2 (in the ZOLZ) and m3 (m3 . uvw = 1), unimodular
    z_len: float  # |u a + v b + w c| in angstrom: layer n has g_z = n / z_len
    z_hat: np.ndarray  # (3,) unit, the zone axis
    x_hat: np.ndarray  # (3,) unit, image right
    y_hat: np.ndarray  # (3,) unit, image up
    p_basis: np.ndarray  # (3, 2) projections of the rows of `basis` (as Cartesian g) onto (x_hat, y_hat)


@dataclass(frozen=True)
class Reflections:
    """The reflections drawn in a pattern (the (000) beam excluded), strongest first."""

    hkl: np.ndarray  # (K, 3) int
    layer: np.ndarray  # (K,) int, Laue zone n = g . [uvw]
    g_xy: np.ndarray  # (K, 2) g perpendicular to the beam, on image (x right, y up), 1/angstrom
    g_z: np.ndarray  # (K,) 1/angstrom
    centre_px: np.ndarray  # (K, 2) disc centre (row, col) in pixel coordinates
    F: np.ndarray  # (K,) complex structure factor, angstrom (Debye-Waller included)
    xi: np.ndarray  # (K,) extinction distance, angstrom
    s_centre: np.ndarray  # (K,) excitation error at the disc centre (mistilt included), 1/angstrom
    i_centre: np.ndarray  # (K,) two-beam intensity at the disc centre
    i_peak: np.ndarray  # (K,) upper bound of the intensity anywhere in the disc
    in_image: np.ndarray  # (K,) bool, the disc overlaps the image


# ----------------------------------------------------------------------------------------------------------
# zone-axis geometry


def _reduce_uvw(zone_axis) -> np.ndarray:
    uvw = np.asarray(zone_axis, dtype=np.int64).reshape(3)
    if not np.any(uvw):
        raise ValueError("zone axis [000]")
    return uvw // math.gcd(*(int(x) for x in uvw))


def _zone_integer_basis(uvw: np.ndarray) -> np.ndarray:
    """Unimodular integer rows m1, m2, m3 with m1.uvw = m2.uvw = 0 and m3.uvw = 1 (Euclid on uvw)."""
    r = [int(x) for x in uvw]
    m = np.eye(3, dtype=np.int64)
    while sum(x != 0 for x in r) > 1:
        nz = [i for i in range(3) if r[i] != 0]
        i = min(nz, key=lambda j: abs(r[j]))
        for j in nz:
            if j != i:
                q = r[j] // r[i]
                r[j] -= q * r[i]
                m[j] -= q * m[i]
    i = next(k for k in range(3) if r[k] != 0)  # r[i] = +-1 since gcd(u, v, w) = 1
    if r[i] < 0:
        m[i] = -m[i]
    return m[[k for k in range(3) if k != i] + [i]]


def zone_frame(structure, zone_axis, rotation_rad: float = 0.0) -> ZoneFrame:
    lattice = np.asarray(structure.lattice, dtype=float)
    recip = reciprocal_lattice(lattice)
    uvw = _reduce_uvw(zone_axis)
    z_vec = uvw.astype(float) @ lattice
    z_len = float(np.linalg.norm(z_vec))
    z_hat = z_vec / z_len
    m = _zone_integer_basis(uvw)
    e = m.astype(float) @ recip
    # Lagrange-Gauss reduction of the zero-layer basis, then bring m3 close to the zone axis
    for _ in range(100):
        if e[0] @ e[0] > e[1] @ e[1]:
            m[[0, 1]] = m[[1, 0]]
            e[[0, 1]] = e[[1, 0]]
        mu = int(np.rint((e[0] @ e[1]) / (e[0] @ e[0])))
        if mu == 0:
            break
        m[1] -= mu * m[0]
        e[1] -= mu * e[0]
    coef = np.linalg.lstsq(e[:2].T, e[2], rcond=None)[0]
    shift = np.rint(coef).astype(np.int64)
    m[2] -= shift[0] * m[0] + shift[1] * m[1]
    e = m.astype(float) @ recip
    # image frame: "up" from the first lattice vector that is mostly perpendicular to the beam
    y0 = None
    for v in lattice:
        perp = v - (v @ z_hat) * z_hat
        if np.linalg.norm(perp) > 0.5 * np.linalg.norm(v):
            y0 = perp / np.linalg.norm(perp)
            break
    if y0 is None:  # pragma: no cover - at most one lattice vector can be within 60 degrees of z
        v = lattice[int(np.argmin(np.abs(lattice @ z_hat) / np.linalg.norm(lattice, axis=1)))]
        perp = v - (v @ z_hat) * z_hat
        y0 = perp / np.linalg.norm(perp)
    c, s = math.cos(rotation_rad), math.sin(rotation_rad)
    y_hat = c * y0 + s * np.cross(z_hat, y0)
    y_hat /= np.linalg.norm(y_hat)
    x_hat = np.cross(y_hat, z_hat)
    p_basis = np.stack([e @ x_hat, e @ y_hat], axis=1)
    return ZoneFrame(uvw, m, z_len, z_hat, x_hat, y_hat, p_basis)


def _enumerate_layer(frame: ZoneFrame, n: int, r_in: float, r_out: float):
    """Integer (i, j) of layer n with r_in <= |n p3 + i p1 + j p2| <= r_out (projected lengths, 1/angstrom)."""
    p1, p2, p3 = frame.p_basis
    c = n * p3
    pinv = np.linalg.inv(np.stack([p1, p2]))  # [i j] = (p - c) @ pinv
    i_c = -c @ pinv[:, 0]
    hi = r_out * np.linalg.norm(pinv[:, 0])
    i = np.arange(math.floor(i_c - hi), math.ceil(i_c + hi) + 1)
    # per i, the j with |a + j p2| <= r_out, a = c + i p1, minus those with |a + j p2| < r_in
    a = c[None, :] + i[:, None] * p1[None, :]
    bb = p2 @ p2
    ab = a @ p2
    aa = np.einsum("ij,ij->i", a, a)

    def roots(r):
        disc = ab * ab - bb * (aa - r * r)
        ok = disc >= 0
        sq = np.sqrt(np.where(ok, disc, 0.0))
        return ok, (-ab - sq) / bb, (-ab + sq) / bb

    ok_o, lo_o, hi_o = roots(r_out)
    lo = np.ceil(lo_o - 1e-9).astype(np.int64)
    hi_ = np.floor(hi_o + 1e-9).astype(np.int64)
    segments = [(i, lo, hi_, ok_o)]
    if r_in > 0:
        ok_i, lo_i, hi_i = roots(r_in)
        # strictly inside r_in: (lo_i, hi_i); keep [lo, ceil(lo_i)-1] and [floor(hi_i)+1, hi]
        cut_lo = np.where(ok_i, np.ceil(lo_i - 1e-9).astype(np.int64) - 1, hi_)
        cut_hi = np.where(ok_i, np.floor(hi_i + 1e-9).astype(np.int64) + 1, hi_ + 1)
        segments = [(i, lo, np.minimum(hi_, cut_lo), ok_o), (i, np.maximum(lo, cut_hi), hi_, ok_o & ok_i)]
    out_i, out_j = [], []
    for ii, l, h, ok in segments:
        cnt = np.where(ok, np.maximum(h - l + 1, 0), 0)
        tot = int(cnt.sum())
        if tot == 0:
            continue
        rep_i = np.repeat(ii, cnt)
        start = np.repeat(l - np.concatenate([[0], np.cumsum(cnt)[:-1]]), cnt)
        out_i.append(rep_i)
        out_j.append(start + np.arange(tot))
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_i), np.concatenate(out_j)


# ----------------------------------------------------------------------------------------------------------
# reflections


def _upper_bound_table(structure, B: float, g_max: float, n: int = 512):
    """F_ub(|g|) = exp(-B s^2) sum_j f_j(s) on a grid of |g| (decreasing); lookup at the grid point below."""
    zs, counts = np.unique(np.asarray(structure.numbers, dtype=int), return_counts=True)
    g = np.linspace(0.0, g_max, n)
    s2 = (g / 2) ** 2
    p = _param_table()[zs]  # (S, 4, 2)
    f = np.sum(p[None, :, :, 0] * np.exp(-p[None, :, :, 1] * s2[:, None, None]), axis=-1)  # (n, S)
    return g[1] - g[0], (f @ counts) * np.exp(-B * s2)


def _bound_lookup(structure, debye_waller: float, g_max: float):
    """|g| -> an upper bound of |F_g| (beyond the table's end the last value is used, still an upper
    bound as the bound decreases with |g|)."""
    dg, f_ub = _upper_bound_table(structure, debye_waller, g_max)

    def fub(gabs):
        return f_ub[np.minimum((np.asarray(gabs) / dg).astype(np.int64), len(f_ub) - 1)]

    return fub


def _layer_candidates(frame, lam, kappa, beta, g_holz, fub, sqrt_thr):
    """Lattice points (i, j, n) of every Laue layer n whose reflections may reach the threshold
    intensity sqrt_thr**2 somewhere in their disc (beta bounds the tilt per unit |g_perp|)."""

    def annulus(n):
        """Projected radii [r_in, r_out] of layer n where a reflection may reach min_intensity, or None."""
        gz = n / frame.z_len
        u = gz - 0.5 * lam * gz * gz
        r_max = g_holz
        r_in = 0.0
        for _ in range(4):  # the band narrows as F_ub falls with |g|: iterate a few times
            sb = kappa * float(fub(math.hypot(r_in, gz))) / sqrt_thr
            if u + sb < -(beta**2) / (2 * lam):
                return None
            r_out = (beta + math.sqrt(beta**2 + 2 * lam * (u + sb))) / lam
            new_in = (-beta + math.sqrt(beta**2 + 2 * lam * (u - sb))) / lam if u - sb > 0 else 0.0
            if new_in > r_max:
                return None
            if abs(new_in - r_in) < 1e-6:
                break
            r_in = new_in
        return r_in, min(r_out, r_max)

    ii, jj, nn = [], [], []
    for direction in (1, -1):  # the annulus only moves outwards with |n|: stop at the first empty layer
        n = 0 if direction == 1 else -1
        while abs(n) <= 1000:
            ann = annulus(n)
            if ann is None:
                break
            i, j = _enumerate_layer(frame, n, *ann)
            ii.append(i)
            jj.append(j)
            nn.append(np.full(len(i), n, dtype=np.int64))
            n += direction
    return np.concatenate(ii), np.concatenate(jj), np.concatenate(nn)


def reflections(
    structure,
    spec: PatternSpec,
    min_intensity: float = MIN_INTENSITY,
    max_reflections: int = MAX_REFLECTIONS,
    max_scatter_rad: float = MAX_SCATTER_RAD,
    frame: ZoneFrame | None = None,
) -> Reflections:
    """The reflections of the pattern `spec` (see the module docstring for the selection rule)."""
    if frame is None:
        frame = zone_frame(structure, spec.zone_axis, spec.rotation_rad)
    lam = wavelength_angstrom(spec.energy_keV)
    kappa = lam * gamma_factor(spec.energy_keV) / (np.pi * cell_volume(structure.lattice))  # 1/xi = kappa |F|
    t = 10.0 * float(spec.thickness_nm)
    alpha = float(spec.semi_angle_rad)
    pix = 2.0 * spec.max_angle_rad / spec.size
    mis = np.asarray(spec.mistilt_rad, dtype=float).reshape(2)
    # in a disc, s(delta) = s_c - delta . g_perp with |delta| <= alpha + pix (edge pixels), and s_c differs from
    # its untilted value by at most |m| |g_perp|: beta bounds both per unit |g_perp|
    beta = alpha + pix + float(np.linalg.norm(mis))
    half = spec.max_angle_rad + alpha + pix  # a disc centre beyond this (in x or y) misses the image
    g_det = math.sqrt(2.0) * half / lam
    g_holz = max(g_det, max_scatter_rad / lam)
    z_len = frame.z_len
    fub = _bound_lookup(structure, spec.debye_waller, g_holz + 2.0)
    pi_t2 = (np.pi * t) ** 2
    i, j, n = _layer_candidates(frame, lam, kappa, beta, g_holz, fub, math.sqrt(min_intensity))
    keep = (i != 0) | (j != 0) | (n != 0)
    i, j, n = i[keep], j[keep], n[keep]
    p = i[:, None] * frame.p_basis[0] + j[:, None] * frame.p_basis[1] + n[:, None] * frame.p_basis[2]
    gz = n / z_len
    pabs = np.sqrt(np.einsum("ij,ij->i", p, p))
    g2 = pabs * pabs + gz * gz
    s_c = gz - 0.5 * lam * g2 - p @ mis
    s_min = np.maximum(np.abs(s_c) - (alpha + pix) * pabs, 0.0)
    in_image = (np.abs(p[:, 0]) * lam <= half) & (np.abs(p[:, 1]) * lam <= half)
    q_ub = kappa * fub(np.sqrt(g2))
    i_ub = q_ub**2 * np.minimum(pi_t2, 1.0 / (s_min**2 + q_ub**2))
    keep = i_ub >= min_intensity
    i, j, n, p, gz, g2, s_c, s_min, in_image = (a[keep] for a in (i, j, n, p, gz, g2, s_c, s_min, in_image))
    hkl = i[:, None] * frame.basis[0] + j[:, None] * frame.basis[1] + n[:, None] * frame.basis[2]
    F = structure_factors(structure, hkl, spec.debye_waller, fast=True)
    q = kappa * np.abs(F)
    i_peak = q**2 * np.minimum(pi_t2, 1.0 / np.maximum(s_min**2 + q**2, 1e-300))
    keep = (q > 0) & (i_peak >= min_intensity)
    order = np.argsort(-i_peak[keep], kind="stable")[:max_reflections]
    sel = np.flatnonzero(keep)[order]
    hkl, n, p, gz, F, q, s_c, i_peak, in_image = (a[sel] for a in (hkl, n, p, gz, F, q, s_c, i_peak, in_image))
    seff2 = s_c**2 + q**2
    i_centre = q**2 * np.sin(np.pi * t * np.sqrt(seff2)) ** 2 / seff2
    c0 = (spec.size - 1) / 2.0
    centre = np.stack([c0 - lam * p[:, 1] / pix, c0 + lam * p[:, 0] / pix], axis=1)
    return Reflections(hkl, n, p, gz, centre, F, 1.0 / q, s_c, i_centre, i_peak, in_image)


# ----------------------------------------------------------------------------------------------------------
# rendering


@lru_cache(maxsize=16)
def _disc_offsets(radius_px: float):
    """Integer (drow, dcol) within radius_px + 1.5 of the origin: covers every pixel a disc of radius_px
    touches (anti-aliased edge) whatever the sub-pixel position of its centre."""
    r = radius_px + 1.5
    k = int(math.ceil(r))
    di, dj = np.mgrid[-k : k + 1, -k : k + 1]
    m = di * di + dj * dj <= r * r
    return di[m].astype(np.int64), dj[m].astype(np.int64)


def _disc_intensities(frac, offsets, sc, gxy, q, t, pix, radius_px):
    """Two-beam intensity (K, M) and anti-aliased edge weight (K or 1, M), float32, for every reflection and
    disc pixel. frac: (K or 1, 2) position of the disc's base pixel minus the disc centre (row, col), pixels."""
    di, dj = offsets
    f32 = np.float32
    dx = frac[:, 1, None].astype(f32) + dj[None, :].astype(f32)  # pixels, image x = +col
    dy = -(frac[:, 0, None].astype(f32) + di[None, :].astype(f32))  # image y = -row
    w = np.clip(f32(radius_px + 0.5) - np.sqrt(dx * dx + dy * dy), 0, 1)
    s = sc[:, None].astype(f32) - (f32(pix) * gxy[:, 0, None].astype(f32)) * dx
    s -= (f32(pix) * gxy[:, 1, None].astype(f32)) * dy
    q2 = (q * q)[:, None].astype(f32)
    seff2 = s * s + q2
    val = np.sin(f32(np.pi * t) * np.sqrt(seff2))
    val *= val
    val *= q2 / seff2
    return val, w


def render(structure, spec: PatternSpec, rng=None, refl: Reflections | None = None):
    """The pattern (size, size) float32, >= 0, summing to 1, and y_dir (3,), the Cartesian image 'up'.

    `rng` (numpy Generator or seed) is only used for the Poisson noise when `spec.dose` is set."""
    frame = zone_frame(structure, spec.zone_axis, spec.rotation_rad)
    if refl is None:
        refl = reflections(structure, spec, frame=frame)
    N = int(spec.size)
    pix = 2.0 * spec.max_angle_rad / N
    radius_px = spec.semi_angle_rad / pix
    t = 10.0 * float(spec.thickness_nm)
    q = 1.0 / refl.xi
    offsets = _disc_offsets(round(radius_px, 6))
    di, dj = offsets
    c0 = (N - 1) / 2.0
    flat = np.zeros(N * N)

    # bright field: exp(-sum_g I_g) over the same incident directions, every reflection (HOLZ lines)
    base0 = np.array([[round(c0), round(c0)]])
    frac0 = (base0 - c0).astype(float)
    step = max(1, CHUNK // len(di))
    total = np.zeros(len(di))
    w0 = None
    for k in range(0, max(len(q), 1), step):
        ks = slice(k, k + step)
        val, w0 = _disc_intensities(frac0, offsets, refl.s_centre[ks], refl.g_xy[ks], q[ks], t, pix, radius_px)
        total += val.sum(axis=0, dtype=np.float64)
    bf = np.exp(-total) * w0[0]
    rows, cols = base0[0, 0] + di, base0[0, 1] + dj
    ok = (rows >= 0) & (rows < N) & (cols >= 0) & (cols < N)
    np.add.at(flat, rows[ok] * N + cols[ok], bf[ok])

    # diffracted discs that overlap the image
    sel = np.flatnonzero(refl.in_image)
    for k in range(0, len(sel), step):
        ks = sel[k : k + step]
        centre = refl.centre_px[ks]
        base = np.rint(centre).astype(np.int64)
        val, w = _disc_intensities(base - centre, offsets, refl.s_centre[ks], refl.g_xy[ks], q[ks], t, pix,
                                   radius_px)
        val *= w
        rows = base[:, 0, None] + di[None, :]
        cols = base[:, 1, None] + dj[None, :]
        ok = (rows >= 0) & (rows < N) & (cols >= 0) & (cols < N)
        idx = np.where(ok, rows * N + cols, 0)
        flat += np.bincount(idx.ravel(), weights=np.where(ok, val, 0).ravel(), minlength=N * N)

    img = flat.reshape(N, N) if spec.dose is None else _counted(flat.reshape(N, N), float(spec.dose), rng)
    img = (img / img.sum()).astype(np.float32)
    return img, frame.y_hat.copy()


def _counted(img: np.ndarray, dose: float, rng) -> np.ndarray:
    """Poisson counts of `dose` electrons spread as `img`; `img` itself if not one electron arrived."""
    counts = np.random.default_rng(rng).poisson(img * (dose / img.sum()))
    return counts.astype(np.float64) if counts.sum() > 0 else img


# ----------------------------------------------------------------------------------------------------------
# semi-angle rule and random pattern parameters


def semi_angle(structure, zone_axis, energy_keV: float) -> tuple[float, float]:
    """(alpha_rad, d_hkl_angstrom) of a zone axis: alpha = 0.45 lambda |g_min| clipped to 1..4 mrad, d = 1/|g_min|.

    g_min is the shortest distance between two discs of the zero layer with non-zero structure factor, the
    (000) disc included: the shortest allowed reflection, or shorter where a serial (row-only) absence removes
    a reflection whose neighbours off the row stay allowed (Pnma [001]: 010 is absent but 210 and 220 are
    not, so g_min = |b*|, not |020|). Since 0.45 < 0.5, neighbouring discs never overlap unless alpha was
    raised to the 1 mrad floor far enough: they do where lambda/d < 2 mrad, d > 12.5 angstrom at 200 kV
    (18.5 angstrom at 100 kV).
    """
    frame = zone_frame(structure, zone_axis)
    lam = wavelength_angstrom(energy_keV)
    for k in (4, 8, 16):
        i, j = np.mgrid[-k : k + 1, -k : k + 1]
        i, j = i.ravel(), j.ravel()
        hkl = i[:, None] * frame.basis[0] + j[:, None] * frame.basis[1]
        F = structure_factors(structure, hkl, 0.0)
        allowed = (np.abs(F) > 0) | ((i == 0) & (j == 0))
        if allowed.sum() < 2:
            continue
        p = (i[:, None] * frame.p_basis[0] + j[:, None] * frame.p_basis[1])[allowed]
        dist = np.linalg.norm(p[:, None, :] - p[None, :, :], axis=-1)
        g_min = float(dist[dist > 1e-9].min())
        alpha = float(np.clip(SEMI_ANGLE_FRACTION * lam * g_min, *SEMI_ANGLE_RANGE))
        return alpha, 1.0 / g_min
    raise ValueError(f"no allowed zero-layer reflection along {list(zone_axis)}")


def random_spec(
    structure,
    zone_axis,
    energy_keV: float,
    rng,
    debye_waller: float = 0.5,
    size: int = 512,
    max_angle_rad: float = 0.05,
    thickness_nm=(20.0, 80.0),
    max_mistilt_rad: float = 1e-3,
    dose: float | None = None,
) -> PatternSpec:
    """A PatternSpec with a uniform random thickness, in-plane rotation and mistilt (uniform in a disc)."""
    rng = np.random.default_rng(rng)
    alpha, _ = semi_angle(structure, zone_axis, energy_keV)
    r = max_mistilt_rad * math.sqrt(rng.random())
    phi = 2 * math.pi * rng.random()
    return PatternSpec(
        zone_axis=tuple(int(x) for x in zone_axis),
        energy_keV=float(energy_keV),
        semi_angle_rad=alpha,
        thickness_nm=float(rng.uniform(*thickness_nm)),
        rotation_rad=float(rng.uniform(0, 2 * math.pi)),
        mistilt_rad=(r * math.cos(phi), r * math.sin(phi)),
        size=int(size),
        max_angle_rad=float(max_angle_rad),
        dose=dose,
        debye_waller=float(debye_waller),
    )
