"""An orthogonal supercell of a crystal for a zone axis, with its atoms in the beam frame.

Multislice needs a rectangular periodic cell whose third edge is the beam direction. This module finds
the smallest one made of lattice translations of the crystal (centring included, so Si along [110] gets
the a/√2 repeat), straining it slightly where the lattice has no exactly orthogonal cell, and reports
that strain. Lengths in Å.

Beam frame: z along the zone axis [uvw] (the real-space direction u a + v b + w c), the beam travelling
towards +z and entering at z = 0; x along the projection of a on the plane normal to the zone (of b if a
lies along the zone); y = z × x, so (x, y, z) is right-handed.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import numpy as np

from stemdl.physics.parameters import elements

# Two atoms of one species closer than this (Å) are the same site when looking for the crystal's pure
# translations (centring vectors): well above the rounding of CIF coordinates (~1e-4 of a cell edge).
TRANSLATION_TOL = 0.01
# Below this a strain is rounding, reported as exact.
EXACT = 1e-9
# Per direction, at most this many of the best in-plane lattice vectors are paired up: the smallest
# cells use short vectors, and pairing is quadratic in the count.
MAX_CANDIDATES = 256


@dataclass(frozen=True, eq=False)
class Supercell:
    """Atoms of a rectangular periodic cell in the beam frame (see the module docstring).

    extent: (Lx, Ly, Lz) in Å; positions: (N, 3) Cartesian Å, each coordinate in [0, L); numbers: (N,)
    atomic numbers; zone: the zone axis [uvw] in the basis of the input structure's a, b, c;
    cell_vectors: (3, 3), row i the cell's edge along x, y, z as a combination of a, b, c (integers for
    a primitive input, halves or thirds for a centred one); strain: the largest relative deformation
    (spectral norm of the displacement gradient) applied to make the cell exactly rectangular.
    """

    extent: tuple[float, float, float]
    positions: np.ndarray
    numbers: np.ndarray
    zone: tuple[int, int, int]
    cell_vectors: np.ndarray
    strain: float

    @property
    def volume(self) -> float:
        return float(np.prod(self.extent))

    @property
    def formula(self) -> str:
        counts = Counter(int(z) for z in self.numbers)
        return "".join(f"{elements()[z - 1]}{n}" for z, n in sorted(counts.items()))

    def describe(self) -> str:
        """One line: formula, zone, extent, atoms, edges in a, b, c and strain."""
        edges = ", ".join("[" + " ".join(_fraction(x) for x in row) + "]" for row in self.cell_vectors)
        size = " x ".join(f"{length:.3f}" for length in self.extent)
        strain = "exact" if self.strain < EXACT else f"strain {self.strain:.1e}"
        return (f"{self.formula} along [{' '.join(map(str, self.zone))}]: {size} Å, {len(self.numbers)} "
                f"atoms, edges (x, y, z) {edges} of (a, b, c), {strain}")


def _fraction(x: float) -> str:
    return str(Fraction(float(x)).limit_denominator(48))


# --------------------------------------------------------------------------------------------------
# The crystal


def load_structure(path):
    """The first structure in the CIF file `path`, as a pymatgen Structure (conventional cell).

    Raises FileNotFoundError (an OSError) for a missing file and ValueError naming the file when pymatgen
    cannot read a structure from it.
    """
    from pymatgen.io.cif import CifParser  # pymatgen is slow to import; only this needs its CIF reader

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such CIF file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pymatgen warns on every rounded coordinate
            structures = CifParser(str(path)).parse_structures(primitive=False)
    except Exception as err:  # pymatgen raises many kinds (ValueError, KeyError, IndexError, ...)
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a readable CIF ({message})") from err
    if not structures:
        raise ValueError(f"{path}: no structure in the CIF")
    return structures[0]


def crystal_arrays(structure) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lattice (3, 3) rows a, b, c in Å, fractional coordinates (N, 3) in [0, 1), atomic numbers (N,))
    of a pymatgen Structure, or of anything with `lattice`, `frac_coords` and `numbers` arrays."""
    if hasattr(structure, "is_ordered") and not structure.is_ordered:
        raise ValueError(f"{structure.composition.reduced_formula}: partial occupancies are not supported")
    lattice = getattr(structure.lattice, "matrix", structure.lattice)
    numbers = getattr(structure, "atomic_numbers", None)
    numbers = structure.numbers if numbers is None else numbers
    frac = np.mod(np.asarray(structure.frac_coords, dtype=float), 1.0)
    frac[frac >= 1.0] = 0.0  # the mod of a tiny negative number rounds up to exactly 1.0
    return np.asarray(lattice, dtype=float), frac, np.asarray(numbers, dtype=int)


def _snap(t: np.ndarray) -> np.ndarray:
    """Pure translations are rational (denominators divide the number of primitive cells in the input
    cell); snapping them makes the zone repeat and the cell edges exact."""
    snapped = np.array([float(Fraction(float(x)).limit_denominator(48)) for x in t])
    return np.where(np.abs(snapped - t) < 1e-4, snapped, t) % 1.0


def lattice_translations(lattice, frac, numbers, tol: float = TRANSLATION_TOL) -> np.ndarray:
    """The pure translations of the crystal within one input cell: (K, 3) fractional, in [0, 1), the
    first being 0 (K = 1 for a primitive cell, 2 for I or C centring, 4 for F, 3 for R in hexagonal axes).

    Candidates are the vectors from one atom of the rarest species to the others of that species; one
    is kept if it maps every atom onto an atom of the same species within `tol` Å.
    """
    species, counts = np.unique(numbers, return_counts=True)
    rare = np.flatnonzero(numbers == species[np.argmin(counts)])
    found = [np.zeros(3)]
    for j in rare[1:]:
        t = _snap((frac[j] - frac[rare[0]]) % 1.0)
        diff = (frac[:, None, :] + t) - frac[None, :, :]
        dist = np.linalg.norm((diff - np.rint(diff)) @ lattice, axis=-1)  # (N, N), minimum image
        dist[numbers[:, None] != numbers[None, :]] = np.inf
        if np.all(dist.min(axis=1) < tol):
            found.append(t)
    return np.array(found)


# --------------------------------------------------------------------------------------------------
# The beam frame and the cell


def three_index(zone) -> tuple[int, int, int]:
    """[uvw] reduced to coprime integers; a four-index hexagonal [UVTW] becomes [U−T, V−T, W]."""
    zone = [int(x) for x in zone]
    if len(zone) == 4:
        if zone[0] + zone[1] + zone[2] != 0:
            raise ValueError(f"four-index zone {zone}: U + V + T must be 0")
        zone = [zone[0] - zone[2], zone[1] - zone[2], zone[3]]
    if len(zone) != 3 or not any(zone):
        raise ValueError(f"zone axis {zone}: need three (or four hexagonal) integers, not all zero")
    g = math.gcd(*zone)
    return tuple(x // g for x in zone)


def beam_axes(lattice, zone) -> np.ndarray:
    """(3, 3) rows x̂, ŷ, ẑ of the beam frame in the lattice's Cartesian frame (module docstring)."""
    lattice = np.asarray(lattice, dtype=float)
    z = np.asarray(three_index(zone), dtype=float) @ lattice
    z /= np.linalg.norm(z)
    for vector in lattice[:2]:  # a, or b if a lies along the zone
        p = vector - (vector @ z) * z
        if np.linalg.norm(p) > 1e-6 * np.linalg.norm(vector):
            x = p / np.linalg.norm(p)
            return np.stack([x, np.cross(z, x), z])
    raise ValueError(f"zone {zone}: a and b both lie along it (degenerate lattice)")


def _zone_repeat(zone, translations) -> np.ndarray:
    """The shortest lattice vector along [uvw], fractional: λ·[uvw] with λ = j/K the smallest that lands
    on a translation (K·t is integer for every translation t, so j/K covers every candidate)."""
    u = np.asarray(zone, dtype=float)
    k = len(translations)
    for j in range(1, k + 1):
        r = (j / k * u) % 1.0
        d = np.abs(r - translations)
        if np.any(np.all(np.minimum(d, 1.0 - d) < 1e-6, axis=1)):
            return j / k * u
    return u  # unreachable: j = K gives u itself


def _lattice_vectors(translations, max_repeat: int) -> np.ndarray:
    """Every nonzero lattice vector (fractional) with all coordinates within ±max_repeat."""
    r = np.arange(-max_repeat, max_repeat + 1, dtype=float)
    grid = np.stack(np.meshgrid(r, r, r, indexing="ij"), axis=-1).reshape(-1, 1, 3)
    vectors = (grid + translations[None]).reshape(-1, 3)
    keep = np.all(np.abs(vectors) <= max_repeat + 1e-9, axis=1) & np.any(np.abs(vectors) > 1e-9, axis=1)
    return vectors[keep]


def _candidates(vectors, cart, axis) -> tuple[np.ndarray, np.ndarray]:
    """Lattice vectors pointing along +axis, shortest first, with their relative deviation
    |v − (v·ê)ê| / |v|, the least strain a cell edge v can need to lie along ê: (fractional (M, 3),
    deviation (M,))."""
    along = cart @ axis
    ok = along > 1e-9
    length = np.linalg.norm(cart[ok], axis=1)
    dev = np.linalg.norm(cart[ok] - along[ok, None] * axis, axis=1) / length
    order = np.lexsort((dev, length))
    return vectors[ok][order], dev[order]


def _strains(edges1, edges2, edge3, lattice, axes) -> tuple[np.ndarray, np.ndarray]:
    """For every pair (edges1[i], edges2[j]) with edge3: (strain (I, J), in-plane area (I, J) in Å²).

    The cell T (rows t1, t2, t3) becomes the box E (rows L_i ê_i, L_i = t_i·ê_i) under r -> r T⁻¹E; the
    strain is the spectral norm of T⁻¹E − 1.
    """
    t1, t2, t3 = edges1 @ lattice, edges2 @ lattice, edge3 @ lattice
    n1, n2 = len(t1), len(t2)
    cells = np.empty((n1, n2, 3, 3))
    cells[:, :, 0], cells[:, :, 1], cells[:, :, 2] = t1[:, None], t2[None, :], t3
    lengths = np.einsum("ijkl,kl->ijk", cells, axes)  # (n1, n2, 3): t_i·ê_i
    boxes = lengths[..., None] * axes  # rows L_i ê_i
    # far-off candidates can be coplanar with each other and the zone: no cell at all
    flat = np.abs(np.linalg.det(cells)) < 1e-9 * np.prod(np.linalg.norm(cells, axis=-1), axis=-1)
    cells[flat] = boxes[flat] = np.eye(3)
    gradient = np.linalg.solve(cells, boxes) - np.eye(3)
    strain = np.where(flat, np.inf, np.linalg.norm(gradient, ord=2, axis=(-2, -1)))
    return strain, lengths[..., 0] * lengths[..., 1]


def _best_cell(lattice, translations, zone, max_strain, max_repeat):
    """(cell_vectors (3, 3) fractional, strain): the smallest-area in-plane pair within max_strain."""
    axes = beam_axes(lattice, zone)
    edge3 = _zone_repeat(zone, translations)
    vectors = _lattice_vectors(translations, max_repeat)
    cart = vectors @ lattice
    (c1, d1), (c2, d2) = (_candidates(vectors, cart, axes[i]) for i in (0, 1))
    ok1, ok2 = c1[d1 <= max_strain][:MAX_CANDIDATES], c2[d2 <= max_strain][:MAX_CANDIDATES]
    if len(ok1) and len(ok2):
        strain, area = _strains(ok1, ok2, edge3, lattice, axes)
        area = np.where(strain <= max_strain, area, np.inf)
        if np.isfinite(area).any():
            # smallest area; among equal areas (to rounding) the least strain
            i, j = np.unravel_index(np.lexsort((strain.ravel(), np.round(area.ravel(), 6)))[0], area.shape)
            return np.stack([ok1[i], ok2[j], edge3]), float(strain[i, j])
    best = np.inf
    if len(c1) and len(c2):  # for the message: pair up the vectors that deviate least
        near1, near2 = c1[np.argsort(d1, kind="stable")[:64]], c2[np.argsort(d2, kind="stable")[:64]]
        best = _strains(near1, near2, edge3, lattice, axes)[0].min()
    raise ValueError(f"no orthogonal supercell along [{' '.join(map(str, zone))}] within max_strain="
                     f"{max_strain:g} and max_repeat={max_repeat}: "
                     f"the best found needs a strain of {best:.2e}")


def _fill(frac, numbers, cell_vectors) -> tuple[np.ndarray, np.ndarray]:
    """Atoms of the supercell: (fractional coordinates in the cell (M, 3) in [0, 1), numbers (M,)).

    Every image of every atom whose cell coordinates fall in [0, 1) (to rounding) is kept once.
    """
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=float)
    span = corners @ cell_vectors
    lo, hi = np.floor(span.min(axis=0)).astype(int) - 1, np.ceil(span.max(axis=0)).astype(int) + 1
    shifts = np.stack(np.meshgrid(*(np.arange(a, b + 1) for a, b in zip(lo, hi)), indexing="ij"), -1)
    images = frac[:, None, :] + shifts.reshape(1, -1, 3)  # (N, S, 3)
    s = (images @ np.linalg.inv(cell_vectors)).reshape(-1, 3)
    z = np.repeat(numbers, shifts.reshape(-1, 3).shape[0])
    inside = np.all((s > -1e-6) & (s < 1.0 + 1e-6), axis=1)
    s, z = s[inside] % 1.0, z[inside]
    keys = np.rint(s * 1e6).astype(np.int64) % 1_000_000  # 0.9999999 and 0.0 are one site
    _, first = np.unique(np.column_stack([keys, z]), axis=0, return_index=True)
    s, z = s[np.sort(first)], z[np.sort(first)]
    s[s >= 1.0 - 1e-9] = 0.0
    expected = len(numbers) * abs(np.linalg.det(cell_vectors))
    if abs(len(z) - expected) > 1e-6 * expected + 1e-3:
        raise ValueError(f"supercell holds {len(z)} atoms, expected {expected:.3f} (atoms closer than 1e-6?)")
    return s, z


def orthogonal_supercell(structure, zone, max_strain: float = 1e-3, max_repeat: int = 8,
                         min_extent: float = 0.0) -> Supercell:
    """The smallest rectangular cell of `structure` (a pymatgen Structure, any setting) for `zone`.

    Lz is the shortest lattice vector along [uvw] (exact); x and y are the shortest lattice vectors
    (coordinates within ±max_repeat cells) that lie along x̂ and ŷ after a strain of at most
    `max_strain`, the smallest in-plane area winning. The strain is applied to the atoms (each keeps its
    fractional position in the cell) and reported. Then tiled laterally to at least `min_extent` Å.
    Raises ValueError naming the zone and the best strain found when no cell fits.
    """
    lattice, frac, numbers = crystal_arrays(structure)
    zone = three_index(zone)
    translations = lattice_translations(lattice, frac, numbers)
    cell_vectors, strain = _best_cell(lattice, translations, zone, max_strain, max_repeat)
    axes = beam_axes(lattice, zone)
    extent = np.einsum("ij,ij->i", cell_vectors @ lattice, axes)  # L_i = t_i·ê_i
    s, z = _fill(frac, numbers, cell_vectors)
    positions = np.minimum(s * extent, np.nextafter(extent, 0))  # stay in [0, L) after rounding
    cell = Supercell(tuple(float(x) for x in extent), positions, z, zone, cell_vectors,
                     0.0 if strain < EXACT else strain)
    nx, ny = (max(1, math.ceil(min_extent / length - 1e-9)) for length in extent[:2])
    return tile(cell, nx, ny)


def tile(supercell: Supercell, nx: int, ny: int) -> Supercell:
    """`supercell` repeated nx times along x and ny times along y (the probe needs room)."""
    if nx < 1 or ny < 1:
        raise ValueError(f"tile counts must be positive, got {nx} x {ny}")
    lx, ly, lz = supercell.extent
    shifts = np.array([[i * lx, j * ly, 0.0] for i in range(nx) for j in range(ny)])
    positions = (supercell.positions[None] + shifts[:, None]).reshape(-1, 3)
    return replace(supercell, extent=(lx * nx, ly * ny, lz), positions=positions,
                   numbers=np.tile(supercell.numbers, nx * ny),
                   cell_vectors=supercell.cell_vectors * np.array([[nx], [ny], [1]]))
