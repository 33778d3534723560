"""Electron-scattering physics for the synthetic CBED patterns: wavelength, atomic and crystal scattering.

Units: lengths in angstrom (Å), reciprocal lengths in 1/Å *without* a 2π (|g| = 1/d), energies in keV.

Electron scattering factors
    f_e(s) = Σ_{i=1..4} a_i exp(-b_i s²)   [Å],   s = sinθ/λ = |g|/2   [1/Å]

with the four-Gaussian fits of Doyle & Turner (1968, Acta Cryst. A24, 390; as tabulated in International
Tables for Crystallography Vol. C, Table 4.3.2.2, fitted for 0 ≤ s ≤ 2 Å⁻¹), for H..Cf (Z = 1..98). The
numbers are read from the copy pymatgen ships as `pymatgen/analysis/diffraction/atomic_scattering_params.json`
(a declared dependency; pyxtal needs it too). pymatgen uses the same table, through the Mott–Bethe formula, to get X-ray
factors f_x(s) = Z − 8π²a₀ s² f_e(s) (8π²a₀ = 41.78214 Å, a₀ the Bohr radius: the Mott–Bethe formula);
that only works if the table is f_e in Å, which it is: the sums Σa_i = f_e(0) are Si 5.82 Å, O 1.98 Å,
C 2.51 Å, Au 10.56 Å (Doyle–Turner / Kirkland give Si ≈ 5.8, O ≈ 2.0), and f_x(Si, s = 0.26) = 8.70,
the textbook X-ray factor of Si 220. The tabulated f_e are for the rest mass; the relativistic mass
increase enters as the factor γ in the extinction distance (and so in the interaction strength).

Structure factor of the conventional cell (every atom listed):
    F_g = Σ_j f_e,j(s) exp(−B s²) exp(2πi g·r_j)      [Å]

Extinction distance (two-beam theory):
    ξ_g = π V_cell / (λ γ |F_g|)                         [Å]
e.g. Si 220 at 100 kV, B = 0: 76 nm (textbook value 75.7 nm).
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

import numpy as np

# The electron's wavelength and γ live in stemdl.physics.electrons (shared with multislice).
from stemdl.physics.electrons import gamma as gamma_factor
from stemdl.physics.electrons import wavelength as wavelength_angstrom

ELEMENTS = (
    "H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se Br Kr "
    "Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho Er Tm Yb "
    "Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am Cm Bk Cf"
).split()
Z_MAX = len(ELEMENTS)  # 98: the table covers H..Cf

_PARAMS_FILE = "atomic_scattering_params.json"


@lru_cache(maxsize=1)
def _param_table() -> np.ndarray:
    """(Z_MAX + 1, 4, 2) array of Doyle–Turner (a_i [Å], b_i [Å²]); row 0 unused. Loaded once."""
    raw = resources.files("pymatgen.analysis.diffraction").joinpath(_PARAMS_FILE).read_text()
    data = json.loads(raw)
    table = np.zeros((Z_MAX + 1, 4, 2))
    for z, sym in enumerate(ELEMENTS, start=1):
        table[z] = np.asarray(data[sym], dtype=float)
    return table


def atomic_number(z_or_symbol) -> int:
    if isinstance(z_or_symbol, str):
        try:
            return ELEMENTS.index(z_or_symbol.strip().capitalize()) + 1
        except ValueError:
            raise ValueError(f"unknown element symbol {z_or_symbol!r}") from None
    z = int(z_or_symbol)
    if not 1 <= z <= Z_MAX:
        raise ValueError(f"no electron scattering factor for Z={z} (table covers 1..{Z_MAX})")
    return z


def scattering_factor(z_or_symbol, s) -> np.ndarray:
    """Electron scattering factor f_e(s) in Å of a neutral atom, s = sinθ/λ = |g|/2 in 1/Å."""
    p = _param_table()[atomic_number(z_or_symbol)]
    s2 = np.asarray(s, dtype=float)[..., None] ** 2
    return np.sum(p[:, 0] * np.exp(-p[:, 1] * s2), axis=-1)


def _species_factors(zs: np.ndarray, s: np.ndarray) -> np.ndarray:
    """f_e for each species in `zs` (S,) at each s (M,): (M, S)."""
    p = _param_table()[zs]  # (S, 4, 2)
    s2 = s[:, None, None] ** 2
    return np.sum(p[None, :, :, 0] * np.exp(-p[None, :, :, 1] * s2), axis=-1)


def reciprocal_lattice(lattice) -> np.ndarray:
    """Rows a*, b*, c* (1/Å, no 2π) of the lattice with rows a, b, c: a_i · a*_j = δ_ij."""
    return np.linalg.inv(np.asarray(lattice, dtype=float)).T


def cell_volume(lattice) -> float:
    return float(abs(np.linalg.det(np.asarray(lattice, dtype=float))))


# A reflection whose |F|² is below this fraction of the largest |F|² possible at its |g| (all atoms in phase,
# (Σ_j |f_j|)²) is a systematic absence: its phase sum cancels exactly in exact arithmetic, and what is left
# is float rounding (~1e-16 relative in float64, ~3e-7 with `fast`) or the ~1e-8 noise of symmetrised
# positions, so it is set to exactly zero. Relative to (Σ|f|)² rather than to the largest |F|² of the set
# asked for, so the verdict on a reflection does not depend on which others are computed with it.
ABSENCE_RTOL = 1e-10


def structure_factors(structure, hkl, B: float = 0.0, fast: bool = False, return_bound: bool = False):
    """F_g (complex, Å) for integer `hkl` (M, 3) of the full conventional cell `structure`.

    F_g = Σ_j f_e,j(|g|/2) exp(−B |g|²/4) exp(2πi (h x_j + k y_j + l z_j)); systematic absences come out as
    exactly 0 (see ABSENCE_RTOL). `fast` evaluates the phase factors in float32 (after reducing the phases
    modulo 1 in float64), ~20x faster and accurate to ~3e-7 of Σ_j |f_j|: the absences' leftover is then
    |F|² ≲ 1e-13 (Σ|f|)², still far below ABSENCE_RTOL. With `return_bound`, also Σ_j |f_j| exp(−B s²) (M,).
    """
    hkl = np.atleast_2d(np.asarray(hkl))
    frac = np.asarray(structure.frac_coords, dtype=float)
    numbers = np.asarray(structure.numbers, dtype=int)
    zs, inverse = np.unique(numbers, return_inverse=True)
    inverse = inverse.reshape(-1)
    g = hkl.astype(float) @ reciprocal_lattice(structure.lattice)
    s = 0.5 * np.sqrt(np.einsum("ij,ij->i", g, g))
    f = _species_factors(zs, s) * np.exp(-B * s * s)[:, None]  # (M, S), real, > 0
    cycles = hkl.astype(float) @ frac.T  # (M, N) g . r_j in cycles
    onehot = np.zeros((len(numbers), len(zs)))
    onehot[np.arange(len(numbers)), inverse] = 1.0
    if fast:
        phase = ((2.0 * np.pi) * (cycles - np.rint(cycles))).astype(np.float32)
        onehot32 = onehot.astype(np.float32)
        re = (np.cos(phase) @ onehot32).astype(float)  # (M, S) geometric sums per species
        im = (np.sin(phase) @ onehot32).astype(float)
    else:
        phase = (2.0 * np.pi) * cycles
        re = np.cos(phase) @ onehot
        im = np.sin(phase) @ onehot
    F = np.einsum("ms,ms->m", f, re) + 1j * np.einsum("ms,ms->m", f, im)
    bound = f @ onehot.sum(axis=0)  # Σ_j |f_j|
    F[np.abs(F) ** 2 < ABSENCE_RTOL * bound**2] = 0.0
    return (F, bound) if return_bound else F


# Wilson's statistic <|E²−1|> for N randomly placed atoms: 2/e = 0.736 when F is complex (acentric), 0.968
# when F is real (centric: the origin on an inversion centre). Wilson (1949) Acta Cryst. 2, 318; Howells,
# Phillips & Rogers (1950) Acta Cryst. 3, 210; the values as in International Tables Vol. B, 2.1.
WILSON_ACENTRIC = 0.736
WILSON_CENTRIC = 0.968


def wilson_statistic(structure, s_range: tuple[float, float] = (0.05, 0.5), hkl_max: int = 4) -> float:
    """<|E²−1|> over the reflections |h|,|k|,|l| <= hkl_max with s = |g|/2 in `s_range` (1/Å), systematic
    absences left out, E² = |F_g|² / Σ_j f_j(s)² (Wilson's normalization: the mean |F|² of randomly placed
    atoms). Near WILSON_CENTRIC for a centrosymmetric crystal, WILSON_ACENTRIC for a non-centrosymmetric
    one: the classical intensity test of a centre of symmetry, which needs no phases, so kinematic
    intensities carry it although they obey Friedel's law. Few atoms and special positions (atoms in
    phase) move both values up."""
    r = np.arange(-hkl_max, hkl_max + 1)
    hkl = np.array(np.meshgrid(r, r, r, indexing="ij")).reshape(3, -1).T
    g = hkl.astype(float) @ reciprocal_lattice(structure.lattice)
    s = 0.5 * np.sqrt(np.einsum("ij,ij->i", g, g))
    keep = (s > s_range[0]) & (s < s_range[1])
    if not keep.any():
        raise ValueError(f"no reflection with {s_range[0]} < s < {s_range[1]} 1/A within |hkl| <= {hkl_max}")
    F = structure_factors(structure, hkl[keep])
    zs, inverse = np.unique(np.asarray(structure.numbers, dtype=int), return_inverse=True)
    sigma2 = _species_factors(zs, s[keep]) ** 2 @ np.bincount(inverse.reshape(-1), minlength=len(zs))
    present = F != 0
    return float(np.mean(np.abs(np.abs(F[present]) ** 2 / sigma2[present] - 1.0)))


def extinction_distance(F, volume: float, energy_keV: float) -> np.ndarray:
    """ξ_g = π V / (λ γ |F_g|) in Å (inf where F_g = 0)."""
    absF = np.abs(np.asarray(F))
    with np.errstate(divide="ignore"):
        return np.pi * volume / (wavelength_angstrom(energy_keV) * gamma_factor(energy_keV) * absF)
