"""Bloch-wave dynamical diffraction in torch: structure factors, beam selection, the structure matrix and
its eigen-decomposition batched over incident directions, and large-angle CBED (LACBED) of the 000 beam;
the same LACBED from the multislice engine with tilted plane waves, to check one method with the other.

Written from the textbooks (Spence & Zuo 1992, "Electron Microdiffraction", ch. 3 and app. D; Humphreys
1979, Rep. Prog. Phys. 42, 1825; Kirkland 2010, ch. 5-6). Units: Å, 1/Å without 2π, mrad, keV.

Conventions (the multislice engine's, so that both methods give one answer):

* Fourier series V(r) = Σ_g V_g exp(+2πi g·r), hence F_g = Σ_j f_e,j(|g|) exp(−2πi g·r_j) over the
  atoms of the cell (the engine's `potential` sums exp(2πi q·(r − r_j)) the same way).
* V_g = h²/(2π m₀ e) F_g / Ω in V (Ω the cell volume), and U_g = 2 m e V_g / h² with the relativistic
  mass m = γ m₀, i.e. U_g = γ F_g / (π Ω) in 1/Å² (Spence & Zuo's U_g). In the engine's terms
  π λ U_g = σ V_g: the phase per Å that the potential gives the wave.
* Beam frame: z along the zone [uvw], x along the projection of a, y = z × x (as `supercell`). An
  incident direction is its tangential wave vector k_t = θ/λ, θ = (θx, θy) in mrad (the paraxial angle
  of `waves.propagator`'s tilt). Only zero-order Laue zone (ZOLZ) reflections, g·[uvw] = 0, are beams.
* Excitation error (high-energy form): 2K s_g = K² − |K + g|² = −(2 k_t·g + |g|²) for a ZOLZ g,
  K = 1/λ (vacuum, relativistic; the mean inner potential U_0 shifts every Bloch wave alike and
  drops out of intensities, so it is left out of the matrix).
* Structure matrix (Spence & Zuo eq. 3.14 in the forward-scattering form): A_gg = 2K s_g,
  A_gh = U_{g−h} (g ≠ h); A C^j = 2K_n γ_j C^j, with K_n the component of K along the surface normal,
  taken along the zone (a crystal cut normal to the beam axis): K_n = sqrt(K² − |k_t|²) (the
  surface-normal correction; `surface_normal=False` uses K_n = K, the paraxial multislice's form,
  whose propagator phase −πλ(|g|² + 2 k_t·g)Δz is exactly 2π s_g Δz). g·n = 0 for every ZOLZ beam,
  so the usual (1 + g·n/K_n) factors are 1 and A stays Hermitian (no absorption).
* Amplitudes at depth t for a plane wave entering at t = 0 (ψ_g(0) = δ_g0):
  ψ_g(t) = Σ_j C_g^j exp(2πi γ_j t) C_0^j*, one decomposition serving every thickness.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from stemdl.physics import multislice, potential, waves
from stemdl.physics.electrons import gamma, interaction_parameter, wavelength
from stemdl.physics.parameters import H2_OVER_2PI_M0_E, species_factors
from stemdl.physics.supercell import (beam_axes, crystal_arrays, lattice_translations, orthogonal_supercell,
                                      three_index)

# LACBED tilt range rule: the half-width of the square of incident directions is K_RANGE / a in 1/Å
# (θ = 1e3 · λ · K_RANGE / a mrad), a = |a| the lattice parameter. Bragg lines of the 000 disc lie where
# k_t·ĝ = −|g|/2; for g = (h, k, 0)/a in a cubic crystal along [001] that is u·(h, k) = −(h² + k²)/2 with
# u = a·k_t, independent of a: every feature sits at a fixed pixel. With K_RANGE = 2 the {200} lines
# cross at 1/4 and 3/4 of the image width (u = ±1), the {400} lines at its edges.
K_RANGE = 2.0
# Default number of beams (requested; completed to a whole shell of equal rank, see `select_beams`).
# Convergence (16x16 tilts, 200 keV, [001], ZNCC against 800 beams (Si: 401) at 1000 / 2000 Å): Si
# (B = 0) 101 beams 0.9966 / 0.9966, 205 beams 0.9999; MgO (B = 0) 201 beams 0.994 / 0.992, 405 beams 0.9998 /
# 0.9997; SrTiO3 (B = 0) 401 beams 0.993 / 0.949, 601 beams 0.999 / 0.969; SrTiO3 (B = 0.5 Å²) 401 beams
# 0.9989 / 0.9945. What decides is the largest |g| kept (≈ 4-5 1/Å for a static lattice at 2000 Å);
# centred and light crystals reach it with fewer beams.
BEAMS = 400
# Weight of the distance from the Bragg condition in the beam rank (`select_beams`).
EXCITATION_WEIGHT = 1.0
# |U_g| below this fraction of the largest |U_g| counts as zero when finding beams coupled to 000.
ZERO_U = 1e-9
# Memory (bytes) for the structure matrices and eigenvectors of one chunk of incident directions.
CHUNK_BYTES = 256 * 2**20
# Threads for the batched eigh on the CPU (None: torch's setting). MKL threads each small matrix's
# decomposition; with the cores shared that spin-waits: 256 matrices of 100 beams took 31 s on 2 threads
# of a loaded 2-core machine against 0.32 s on one. Parallelism over pixels belongs to the caller
# (processes, MPI ranks).
CPU_EIGH_THREADS: int | None = 1
# Multislice defaults for `lacbed_multislice`: slice thickness (Å) and the largest spatial frequency kept
# (1/Å). With these, MgO and SrTiO3 (B = 0) agree with 800 Bloch beams to ZNCC >= 0.9963 up to 2000 Å
# (>= 0.9980 up to 1000 Å); 1 Å and 3-4 1/Å suffice for Si, or with a Debye–Waller factor.
MS_SLICE_A = 0.5
MS_K_MAX = 5.0


# --------------------------------------------------------------------------------------------------
# Crystal and structure factors


def _arrays(structure) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lattice (3, 3) rows a, b, c in Å, fractional (N, 3), atomic numbers (N,)) of a pymatgen Structure,
    or of the tuple `supercell.crystal_arrays` returns."""
    if isinstance(structure, (tuple, list)):
        lattice, frac, numbers = structure
        return np.asarray(lattice, float), np.mod(np.asarray(frac, float), 1.0), np.asarray(numbers, int)
    return crystal_arrays(structure)


def reciprocal_vectors(lattice, hkl) -> np.ndarray:
    """Cartesian g (M, 3) in 1/Å of Miller indices hkl (M, 3): g = h a* + k b* + l c*, a_i·b*_j = δ_ij."""
    return np.asarray(hkl, dtype=float) @ np.linalg.inv(np.asarray(lattice, dtype=float)).T


def structure_factor_F(structure, hkl, debye_waller: float = 0.0) -> np.ndarray:
    """F_g = Σ_j f_e,j(|g|) exp(−B|g|²/4) exp(−2πi g·r_j) in Å over the cell's atoms: complex128 (M,).

    f_e are the engine's Lobato–Van Dyck factors (`parameters.species_factors`); B (Å²) is one
    Debye–Waller factor for every atom, as in `potential`.
    """
    lattice, frac, numbers = _arrays(structure)
    hkl = np.asarray(hkl, dtype=float).reshape(-1, 3)
    q = np.linalg.norm(reciprocal_vectors(lattice, hkl), axis=1)
    species = sorted({int(z) for z in numbers})
    f = species_factors(species, torch.as_tensor(q, dtype=torch.float64)).numpy()  # (S, M)
    f = f * np.exp(-debye_waller * q**2 / 4.0)
    cycles = np.mod(frac @ hkl.T, 1.0)  # (N, M)
    phases = np.exp(-2j * np.pi * cycles)
    index = np.searchsorted(species, numbers)
    return (f[index] * phases).sum(axis=0)


def fourier_potential(structure, hkl, debye_waller: float = 0.0) -> np.ndarray:
    """V_g = h²/(2π m₀ e) F_g / Ω in V: the Fourier coefficients of the crystal potential, (M,) complex."""
    lattice = _arrays(structure)[0]
    return H2_OVER_2PI_M0_E * structure_factor_F(structure, hkl, debye_waller) / abs(np.linalg.det(lattice))


def structure_factors(structure, hkl, energy_keV: float = 200.0, debye_waller: float = 0.0) -> np.ndarray:
    """U_g = 2 γ m₀ e V_g / h² = γ F_g / (π Ω) in 1/Å² (Spence & Zuo), complex128 (M,)."""
    lattice = _arrays(structure)[0]
    return gamma(energy_keV) * structure_factor_F(structure, hkl, debye_waller) / (
        math.pi * abs(np.linalg.det(lattice)))


def two_beam_xi(structure, hkl, energy_keV: float = 200.0, debye_waller: float = 0.0) -> float:
    """ξ_g = 1/(λ |U_g|) in Å: the two-beam Pendellösung period at the Bragg condition,
    I_g(t) = sin²(π t / ξ_g) (with K_n = K). Equals π Ω / (λ γ |F_g|)."""
    u = structure_factors(structure, [hkl], energy_keV, debye_waller)[0]
    return 1.0 / (wavelength(energy_keV) * abs(u))


# --------------------------------------------------------------------------------------------------
# Beams


def tilt_half_width_mrad(structure, energy_keV: float = 200.0, k_range: float = K_RANGE) -> float:
    """Half-width of the LACBED square of incident directions: 1e3 · λ · k_range / |a| mrad (see K_RANGE).
    Si (a = 5.431 Å) at 200 keV: 9.24 mrad."""
    a = float(np.linalg.norm(_arrays(structure)[0][0]))
    return 1e3 * wavelength(energy_keV) * k_range / a


def lacbed_tilts(size: int, half_width_mrad: float) -> np.ndarray:
    """Incident tilts (size², 2) (θx, θy) in mrad of the LACBED pixels, row-major: pixel (r, c) is at
    ((c − S/2)·d, (r − S/2)·d), d = 2·half_width/S, as `multislice.to_detector` (x along columns, y down
    the rows, the zone axis at pixel (S/2, S/2))."""
    d = 2.0 * half_width_mrad / size
    axis = (np.arange(size) - size / 2) * d
    ty, tx = np.meshgrid(axis, axis, indexing="ij")
    return np.stack([tx.ravel(), ty.ravel()], axis=1)


def _zolz(lattice, zone, g_max, translations) -> np.ndarray:
    """Integer hkl (M, 3) with hkl·[uvw] = 0, |g| <= g_max, and g a vector of the true reciprocal lattice
    (exp(2πi g·t) = 1 for every centring translation t: the rest have F_g = 0 identically)."""
    lengths = np.linalg.norm(lattice, axis=1)
    bounds = [int(math.ceil(g_max * length)) for length in lengths]
    ranges = [np.arange(-b, b + 1) for b in bounds]
    hkl = np.stack(np.meshgrid(*ranges, indexing="ij"), axis=-1).reshape(-1, 3)
    hkl = hkl[hkl @ np.asarray(zone) == 0]
    hkl = hkl[np.linalg.norm(reciprocal_vectors(lattice, hkl), axis=1) <= g_max * (1 + 1e-12)]
    cycles = hkl @ np.asarray(translations).T
    return hkl[np.all(np.abs(cycles - np.rint(cycles)) < 1e-6, axis=1)]


def _difference_u(structure, hkl, energy_keV, debye_waller) -> np.ndarray:
    """U_{g−h} (M, M) for beams hkl (M, 3), each distinct difference evaluated once."""
    hkl = np.asarray(hkl, dtype=np.int64)
    width = 4 * int(np.abs(hkl).max(initial=0)) + 1  # every difference's index lies in ±(width − 1)/2
    key = (hkl[:, 0] * width + hkl[:, 1]) * width + hkl[:, 2]  # linear in hkl: key(g − h) = key g − key h
    unique, first, inverse = np.unique((key[:, None] - key[None, :]).ravel(), return_index=True,
                                       return_inverse=True)
    rows, cols = np.divmod(first, len(hkl))
    u = structure_factors(structure, hkl[rows] - hkl[cols], energy_keV, debye_waller)
    return u[inverse.reshape(-1)].reshape(len(hkl), len(hkl))


def _coupled_to_000(u: np.ndarray) -> np.ndarray:
    """Mask (M,) of the beams linked to beam 0 by a chain of nonzero U_{g−h} (the rest form blocks of A
    that 000 never reaches: leaving them out changes no amplitude)."""
    off = np.abs(u)
    np.fill_diagonal(off, 0.0)
    adjacent = off > ZERO_U * max(off.max(), 1e-300)
    reach = np.zeros(len(u), dtype=bool)
    reach[0] = True
    while True:
        grown = reach | adjacent[reach].any(axis=0)
        if (grown == reach).all():
            return reach
        reach = grown


@dataclass(frozen=True, eq=False)
class BeamSet:
    """The beams of a Bloch-wave calculation: hkl (N, 3) (000 first), g (N, 2) in the beam frame (1/Å),
    U (N, N) = U_{g−h} in 1/Å² with a zero diagonal, the rank of each beam (1/Å), the smallest and largest
    |s_g| over the tilt square (1/Å), the requested count and the energy."""

    hkl: np.ndarray
    g: np.ndarray
    U: np.ndarray
    rank: np.ndarray
    s_min: np.ndarray
    s_max: np.ndarray
    requested: int
    energy_keV: float
    zone: tuple[int, int, int]
    half_width_mrad: float

    def __len__(self) -> int:
        return len(self.hkl)

    def describe(self) -> str:
        g = np.linalg.norm(self.g, axis=1)
        return (f"{len(self)} beams (requested {self.requested}) along [{' '.join(map(str, self.zone))}], "
                f"|g| <= {g.max():.3f} 1/Å, |s_g| <= {self.s_max.max():.4f} 1/Å over ±{self.half_width_mrad:.2f} "
                f"mrad, {self.energy_keV:g} keV")


def select_beams(structure, beams=BEAMS, zone=(0, 0, 1), energy_keV: float = 200.0,
                 half_width_mrad: float | None = None, excitation_weight: float = EXCITATION_WEIGHT,
                 debye_waller: float = 0.0) -> BeamSet:
    """The beams for incident directions in the square |θx|, |θy| <= half_width (mrad) about `zone`.

    `beams`: a count N, or explicit hkl (M, 3) (000 is put first, added if absent; used as given). For a
    count, candidates are the ZOLZ reflections of the true lattice (centring absences dropped) coupled
    to 000 (`_coupled_to_000`), ranked by

        rank_g = |g| + w · d_g,   d_g = min over the square of the distance of k_t from the Bragg line
                                   k_t·ĝ = −|g|/2, = max(0, |g|/2 − R(|ĝx| + |ĝy|)),

    R = half_width/λ the square's half-width in 1/Å, w = `excitation_weight` (|s_g| = λ|g| d_g at
    its closest, so d_g is the smallest excitation error in units of λ|g|): beams whose Bragg line
    crosses the range rank by |g| alone, the others later the farther they stay from Bragg. The first N
    are taken, then the rest of the last shell of equal rank, so the set keeps the pattern's symmetry.
    """
    lattice, frac, numbers = _arrays(structure)
    zone = three_index(zone)
    lam = wavelength(energy_keV)
    if half_width_mrad is None:
        half_width_mrad = tilt_half_width_mrad(structure, energy_keV)
    big_r = half_width_mrad * 1e-3 / lam
    axes = beam_axes(lattice, zone)

    def plane(hkl):
        return reciprocal_vectors(lattice, hkl) @ axes[:2].T  # (M, 2), g_z = 0 for ZOLZ

    def excitation(g2d):
        g = np.linalg.norm(g2d, axis=1)
        unit = np.abs(g2d) / np.where(g > 0, g, 1.0)[:, None]
        reach = big_r * unit.sum(axis=1)
        d = np.maximum(0.0, g / 2 - reach)
        return g, d, lam * g * d, lam * g * (g / 2 + reach)  # |g|, d_g, s_min, s_max

    if np.ndim(beams) == 0:
        n = int(beams)
        if n < 1:
            raise ValueError(f"beams must be at least 1, got {n}")
        translations = lattice_translations(lattice, frac, numbers)
        spacing = 1.0 / np.linalg.norm(lattice, axis=1).max()
        g_max = spacing * (2.0 + math.sqrt(n))
        while True:
            hkl = _zolz(lattice, zone, g_max, translations)
            g, d, _, _ = excitation(plane(hkl))
            rank = g + excitation_weight * d
            order = np.lexsort((hkl[:, 2], hkl[:, 1], hkl[:, 0], np.round(rank, 12)))
            hkl, rank = hkl[order], rank[order]
            keep = _coupled_to_000(_difference_u((lattice, frac, numbers), hkl, energy_keV, debye_waller))
            hkl, rank = hkl[keep], rank[keep]
            if len(hkl) > n:
                last = rank[n - 1]
                stop = n + int(np.sum(rank[n:] <= last + 1e-9 * (1.0 + last)))
                if stop < len(hkl) and last < g_max:  # beams beyond g_max rank >= |g| > g_max
                    hkl, rank = hkl[:stop], rank[:stop]
                    break
            g_max *= 1.5
            if len(hkl) <= n and g_max > 50.0:  # a tiny crystal with fewer coupled beams than asked
                break
    else:
        hkl = np.asarray(beams, dtype=int).reshape(-1, 3)
        zero = np.all(hkl == 0, axis=1)
        hkl = np.concatenate([np.zeros((1, 3), int), hkl[~zero]])
        if np.any(hkl @ np.asarray(zone) != 0):
            raise ValueError(f"beams {hkl[hkl @ np.asarray(zone) != 0].tolist()} are not in the ZOLZ of {zone}")
        n = len(hkl)
        g, d, _, _ = excitation(plane(hkl))
        rank = g + excitation_weight * d
    g2d = plane(hkl)
    _, _, s_min, s_max = excitation(g2d)
    u = _difference_u((lattice, frac, numbers), hkl, energy_keV, debye_waller)
    np.fill_diagonal(u, 0.0)
    return BeamSet(hkl, g2d, u, rank, s_min, s_max, n, float(energy_keV), zone, float(half_width_mrad))


# --------------------------------------------------------------------------------------------------
# Structure matrix, Bloch waves, amplitudes


def _real(dtype):
    return torch.float64 if dtype == torch.complex128 else torch.float32


@contextmanager
def _eigh_threads(device):
    """On the CPU, run the batched eigh with CPU_EIGH_THREADS threads, then restore the setting."""
    if device.type != "cpu" or CPU_EIGH_THREADS is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(CPU_EIGH_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def structure_matrix(beamset: BeamSet, tilts_mrad, device=None, dtype=torch.complex128) -> torch.Tensor:
    """A (P, N, N) for incident tilts (P, 2) mrad: A_gg = 2K s_g = −(2 k_t·g + |g|²), A_gh = U_{g−h}
    (1/Å²), Hermitian."""
    if dtype not in (torch.complex64, torch.complex128):
        raise ValueError(f"dtype must be torch.complex64 or torch.complex128, not {dtype}")
    lam = wavelength(beamset.energy_keV)
    kt = torch.as_tensor(np.asarray(tilts_mrad, float).reshape(-1, 2) * 1e-3 / lam, device=device)
    g = torch.as_tensor(beamset.g, device=kt.device)
    diagonal = -(2.0 * kt @ g.T + (g**2).sum(1))  # (P, N), float64
    a = torch.as_tensor(beamset.U, device=kt.device).to(dtype).expand(len(kt), -1, -1).clone()
    a.diagonal(dim1=-2, dim2=-1).add_(diagonal.to(_real(dtype)))
    return a


def bloch_waves(beamset: BeamSet, tilts_mrad, device=None, dtype=torch.complex128,
                surface_normal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(γ (P, N) in 1/Å, C (P, N, N)): eigenvalues γ_j = λ_j/(2K_n) of A and its eigenvectors, column j
    the Bloch wave j's coefficients C_g^j (orthonormal: A Hermitian). One call: see `amplitudes` for
    chunks."""
    a = structure_matrix(beamset, tilts_mrad, device, dtype)
    with _eigh_threads(a.device):
        values, vectors = torch.linalg.eigh(a)
    lam = wavelength(beamset.energy_keV)
    kt2 = torch.as_tensor((np.asarray(tilts_mrad, float).reshape(-1, 2) * 1e-3 / lam) ** 2,
                          device=values.device).sum(1)
    k_n = torch.sqrt(1.0 / lam**2 - kt2) if surface_normal else torch.full_like(kt2, 1.0 / lam)
    return values.to(torch.float64) / (2.0 * k_n[:, None]), vectors


def _amplitudes_of(gam, vectors, thicknesses, which) -> torch.Tensor:
    """ψ_g(t) = Σ_j C_g^j exp(2πi γ_j t) C_0^j*: (T, P, G) for the beam indices `which`."""
    t = torch.as_tensor(thicknesses, dtype=torch.float64, device=gam.device)
    cycles = torch.remainder(t[:, None, None] * gam[None], 1.0)  # (T, P, N), exact phases for any t
    phase = torch.polar(torch.ones_like(cycles), 2.0 * math.pi * cycles).to(vectors.dtype)
    weights = vectors[:, which, :] * vectors[:, 0, None, :].conj()  # (P, G, N)
    return torch.einsum("tpn,pgn->tpg", phase, weights)


def _chunk(n_beams: int, dtype) -> int:
    item = 16 if dtype == torch.complex128 else 8
    return max(1, int(CHUNK_BYTES // (3 * n_beams * n_beams * item)))


def amplitudes(beamset: BeamSet, tilts_mrad, thicknesses_A: Sequence[float], which=(0,), device=None,
               dtype=torch.complex64, surface_normal: bool = True, chunk: int | None = None,
               progress=None) -> torch.Tensor:
    """Complex amplitudes ψ_g(t) (T, P, G) of the beams with indices `which` (into beamset.hkl; 0 = 000)
    for tilts (P, 2) mrad and every thickness (Å), from one eigen-decomposition per tilt, computed in
    chunks of `chunk` tilts (default: CHUNK_BYTES of matrices) on `device`; `progress(done, total)` is
    called after each chunk with the tilts done."""
    tilts = np.asarray(tilts_mrad, float).reshape(-1, 2)
    which = torch.as_tensor(np.atleast_1d(np.asarray(which, dtype=int)))
    chunk = chunk or _chunk(len(beamset), dtype)
    parts = []
    for start in range(0, len(tilts), chunk):
        gam, vectors = bloch_waves(beamset, tilts[start:start + chunk], device, dtype, surface_normal)
        parts.append(_amplitudes_of(gam, vectors, thicknesses_A, which.to(gam.device)))
        if progress is not None:
            progress(min(start + chunk, len(tilts)), len(tilts))
    return torch.cat(parts, dim=1)


def intensities(beamset: BeamSet, tilts_mrad, thicknesses_A: Sequence[float], which=(0,), device=None,
                dtype=torch.complex64, surface_normal: bool = True, chunk: int | None = None,
                progress=None) -> torch.Tensor:
    """|ψ_g(t)|² (T, P, G) as fractions of the incident beam; arguments as `amplitudes`."""
    psi = amplitudes(beamset, tilts_mrad, thicknesses_A, which, device, dtype, surface_normal, chunk, progress)
    return psi.real**2 + psi.imag**2


# --------------------------------------------------------------------------------------------------
# Symmetry of the 000 pattern

# The eight orthogonal maps of the pixel square, acting on (θx, θy): the candidates for the pattern's
# point symmetry (each is used only where the beam set proves it exact, `pattern_symmetry`).
SQUARE_OPS = tuple(np.array(m) for m in ([[1, 0], [0, 1]], [[-1, 0], [0, 1]], [[1, 0], [0, -1]],
                                         [[-1, 0], [0, -1]], [[0, 1], [1, 0]], [[0, -1], [1, 0]],
                                         [[0, 1], [-1, 0]], [[0, -1], [-1, 0]]))


def _gauge(beamset: BeamSet, perm: np.ndarray) -> np.ndarray | None:
    """Phases d (N,) with U[π(a), π(b)] = d_a U[a, b] d_b* and d_0 = 1, or None where there are none.

    Found along the couplings from 000 (breadth first), then checked on the whole matrix."""
    u, moved = beamset.U, beamset.U[np.ix_(perm, perm)]
    scale = np.abs(u).max(initial=0.0)
    strong = np.abs(u) > ZERO_U * max(scale, 1e-300)
    d = np.full(len(u), np.nan + 0j)
    d[0] = 1.0
    frontier = [0]
    while frontier:
        b = frontier.pop()
        for a in np.flatnonzero(strong[:, b] & np.isnan(d)):
            d[a] = moved[a, b] * d[b] / u[a, b]
            frontier.append(a)
    d[np.isnan(d)] = 1.0  # beams 000 never reaches: any phase, the check below decides
    if np.abs(np.abs(d) - 1.0).max() > 1e-6:
        return None
    error = np.abs(moved - d[:, None] * u * d[None, :].conj()).max(initial=0.0)
    return d if error <= 1e-9 * max(scale, 1e-300) else None


def pattern_symmetry(beamset: BeamSet) -> list[np.ndarray]:
    """The maps R of SQUARE_OPS under which every beam intensity is exactly invariant, |ψ_Rg(R k_t)| =
    |ψ_g(k_t)|: R maps the beam set onto itself (a permutation π) and U_{Rg−Rh} = d_g U_{g−h} d_h* for
    phases d (a translation's e^{−2πi Rg·τ}, or none). Then A(R k_t) = Q A(k_t) Q† with Q = π·diag(d)
    unitary and Q fixing 000, so ψ(R k_t) = Q ψ(k_t) (and K_n depends on |k_t| only). The identity first.
    """
    g = beamset.g
    scale = 1e-6 * (1.0 + np.linalg.norm(g, axis=1).max(initial=0.0))
    found = []
    for op in SQUARE_OPS:
        moved = g @ op.T
        distance = np.linalg.norm(moved[:, None, :] - g[None, :, :], axis=-1)
        perm = distance.argmin(axis=1)
        if distance[np.arange(len(g)), perm].max() > scale or len(set(perm.tolist())) != len(g):
            continue
        if _gauge(beamset, perm) is not None:
            found.append(op)
    return found


def _pixel_orbits(size: int, ops) -> np.ndarray:
    """For each pixel (row-major), the smallest flat index of its images under `ops` that stay on the
    grid: (size²,). Pixel (r, c) is at doubled coordinates (2c − S, 2r − S) (integers; the maps keep them so)."""
    r, c = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    xy = np.stack([2 * c.ravel() - size, 2 * r.ravel() - size], axis=1)
    best = np.arange(size * size)
    for op in ops:
        x2, y2 = (xy @ op.T).T
        c2, r2 = (x2 + size) // 2, (y2 + size) // 2
        inside = (c2 >= 0) & (c2 < size) & (r2 >= 0) & (r2 < size)
        best = np.where(inside, np.minimum(best, r2 * size + c2), best)
    return best


def lacbed(structure, thicknesses_A: Sequence[float], size: int, energy_keV: float = 200.0, beams=BEAMS,
           tilt_range_mrad: float | None = None, zone=(0, 0, 1), device=None, dtype=torch.complex64,
           surface_normal: bool = True, chunk: int | None = None, debye_waller: float = 0.0,
           beamset: BeamSet | None = None, symmetry: bool = True, progress=None) -> torch.Tensor:
    """The 000 LACBED pattern by Bloch waves: float32 (T, size, size), fractions of the incident beam.

    Pixel (r, c) is the incident direction of `lacbed_tilts` (θx along columns, θy down the rows, about
    `zone`); `tilt_range_mrad` is the half-width, by default `tilt_half_width_mrad` (the K_RANGE / a
    rule). `beams` as `select_beams` (or pass a prepared `beamset`). With `symmetry`, only one pixel of
    each orbit under `pattern_symmetry` is computed (exact; 8x fewer for a cubic crystal along [001]).
    On `device` (the result too). `progress(done, total)`: the distinct pixels done, after each chunk.
    """
    half = tilt_half_width_mrad(structure, energy_keV) if tilt_range_mrad is None else float(tilt_range_mrad)
    if beamset is None:
        beamset = select_beams(structure, beams, zone, energy_keV, half, debye_waller=debye_waller)
    tilts = lacbed_tilts(size, half)
    orbit = _pixel_orbits(size, pattern_symmetry(beamset)) if symmetry else np.arange(size * size)
    unique, inverse = np.unique(orbit, return_inverse=True)
    out = intensities(beamset, tilts[unique], thicknesses_A, (0,), device, dtype, surface_normal, chunk, progress)
    out = out[:, torch.as_tensor(inverse.ravel(), device=out.device), 0]
    return out.reshape(len(thicknesses_A), size, size).to(torch.float32)


# --------------------------------------------------------------------------------------------------
# The same pattern by multislice


@dataclass(frozen=True)
class MultisliceLacbed:
    """`lacbed_multislice`'s result: patterns float32 (T, S, S), the thicknesses reached (whole slices),
    the slice thickness and the grid."""

    patterns: torch.Tensor
    thicknesses_A: tuple[float, ...]
    dz_A: float
    grid: waves.Grid


def lacbed_multislice(structure, thicknesses_A: Sequence[float], size: int, energy_keV: float = 200.0,
                      tilt_range_mrad: float | None = None, zone=(0, 0, 1), slice_A: float = MS_SLICE_A,
                      k_max: float = MS_K_MAX, projected: bool = True, device=None, dtype=torch.complex64,
                      chunk: int = 64, debye_waller: float = 0.0, progress=None) -> MultisliceLacbed:
    """The 000 LACBED pattern by the multislice engine with tilted plane waves, pixels as `lacbed`.

    One orthogonal cell (`orthogonal_supercell`) on a grid whose bandwidth limit reaches k_max (1/Å). Each
    incident tilt θ rides on the untilted envelope (`waves.plane_wave`) in the propagator
    (`waves.propagator(grid, dz, tilt_mrad=θ)`, batched (P, Nx, Ny)); the 000 beam is |ψ̃(k = 0)|² of the
    exit envelope. `projected=True` slices the cell's projected potential into equal parts (the ZOLZ
    physics of the Bloch waves, converging to them as slice_A → 0); False uses the real 3-D slices
    (HOLZ lines appear). Slices are Lz/n thick, n the whole number nearest Lz/slice_A; each thickness is
    reached to the nearest slice (reported). `progress(done, total)`: the tilts done, after each chunk.
    """
    half = tilt_half_width_mrad(structure, energy_keV) if tilt_range_mrad is None else float(tilt_range_mrad)
    cell = orthogonal_supercell(structure, zone)
    lam = wavelength(energy_keV)
    grid = waves.Grid(cell.extent[:2], waves.choose_gpts(cell.extent[:2], energy_keV, 1e3 * lam * k_max),
                      energy_keV)
    real = _real(dtype)
    n_slices, dz = potential.slice_geometry(cell.extent[2], slice_A)
    if projected:
        v = potential.projected_potential(cell, grid.gpts, device, torch.float64, debye_waller)[None] / n_slices
    else:
        v = potential.slice_potentials(cell, grid.gpts, slice_A, device, torch.float64, debye_waller)
    t = multislice.transmission(v.to(real), grid, interaction_parameter(energy_keV), dtype, device)
    counts = multislice.slice_counts(thicknesses_A, dz)
    tilts = lacbed_tilts(size, half)
    envelope = waves.plane_wave(grid, device=t.device, dtype=dtype)
    parts = []
    for start in range(0, len(tilts), chunk):
        part = tilts[start:start + chunk]
        prop = waves.propagator(grid, dz, tilt_mrad=part, device=t.device, dtype=dtype)
        exit_waves = multislice.propagate(envelope.expand(len(part), -1, -1), t, prop, counts)
        zero = exit_waves.sum(dim=(-2, -1)) / math.sqrt(grid.gpts[0] * grid.gpts[1])  # ψ̃(0), ortho FFT
        parts.append(zero.real**2 + zero.imag**2)
        if progress is not None:
            progress(min(start + chunk, len(tilts)), len(tilts))
    patterns = torch.cat(parts, dim=1).reshape(len(counts), size, size).to(torch.float32)
    return MultisliceLacbed(patterns, tuple(c * dz for c in counts), dz, grid)


# --------------------------------------------------------------------------------------------------
# Similarity


def zncc(a, b, eps: float = 0.0):
    """Zero-mean normalised cross-correlation over the last two axes: Σ(a − ā)(b − b̄) / (σ_a σ_b N), σ the
    population standard deviation (N the pixel count). 1 for identical patterns up to gain and offset.
    numpy arrays give a float (2-D) or an array (stacks); torch tensors a tensor (differentiable). NaN
    where an image is constant, unless `eps` (torch only) keeps it finite: σ_a σ_b becomes
    sqrt(σ_a² σ_b² + eps²), the ZNCC of a constant image 0 (a loss needs that)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        a = a - a.mean(dim=(-2, -1), keepdim=True)
        b = b - b.mean(dim=(-2, -1), keepdim=True)
        num = (a * b).mean(dim=(-2, -1))
        return num / torch.sqrt((a * a).mean(dim=(-2, -1)) * (b * b).mean(dim=(-2, -1)) + eps**2)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"zncc needs two images of one shape (..., H, W), got {a.shape} and {b.shape}")
    a = a - a.mean(axis=(-2, -1), keepdims=True)
    b = b - b.mean(axis=(-2, -1), keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (a * b).mean(axis=(-2, -1)) / np.sqrt((a * a).mean(axis=(-2, -1)) * (b * b).mean(axis=(-2, -1)))
    return float(out) if out.ndim == 0 else out
