"""Random crystal structures whose space-group label is verified, not assumed.

A label is only as good as the structure behind it. pyxtal places atoms on the Wyckoff positions of the
requested group, but a random arrangement can have more symmetry than asked for (atoms on special
positions, a lattice that happens to be nearly metrically higher): unverified, 39 % of pyxtal's
structures with its default Wyckoff choice, and still about 14 % with the choice made here, carry the
wrong label. So every structure is checked with spglib at a tight (1e-3) and a
loose (0.1) tolerance, both of which must return the requested number, and is then stored in spglib's
standardized conventional cell (the ITA standard setting) with every atom of that cell listed and the
positions symmetrized, so that structure-factor sums over the atoms give exact systematic absences.

The number of atoms in the conventional cell is drawn from one distribution for all groups and the
Wyckoff positions are then chosen to fit it, so that the cell size does not give the label away (with
pyxtal's default choice a high-symmetry group means a large cell).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import spglib

from stemdl.workloads.spacegroup.data.layout import Structure
from stemdl.harness.errors import StemdlError

# Common elements, ordered by Pauling electronegativity (most electropositive first) so that formulas
# read like the public data's ('Fe8 O14 F2'). Every one has electron scattering factors in pymatgen's
# table (tests check this) and radii in pyxtal's tables. Hydrogen and noble gases are left out: H
# scatters too weakly to matter, noble gases hardly form crystals.
ELEMENTS: tuple[str, ...] = (
    "Cs", "K", "Ba", "Na", "Sr", "Li", "Ca", "La", "Y", "Mg", "Zr", "Sc", "Ta", "Ti", "Mn", "Be",
    "Nb", "Al", "V", "Zn", "Cr", "Cd", "In", "Ga", "Fe", "Co", "Si", "Cu", "Ni", "Ag", "Sn", "Ge",
    "Bi", "B", "Sb", "Mo", "As", "P", "Pd", "Pt", "W", "Au", "Se", "C", "S", "I", "Br", "N", "Cl",
    "O", "F",
)
MIN_ATOMS, MAX_ATOMS = 4, 64
MAX_SPECIES = 3
SYMPRECS = (1e-3, 0.1)
# Retry policy. Some atom counts cannot carry the group at all (a 4-atom C2 cell is always C2/m; 4
# atoms in P23 form a tetrahedron of symmetry P-43m), so after KEEP_COUNT_TRIES rejected candidates
# each try draws a fresh count from the same distribution: the accepted counts are then that
# distribution conditioned on the group being realizable, which is the least a label can leak. Some
# groups need the general position whatever the count (every special orbit of F432 is also an orbit
# of Fm-3m), so from GENERAL_AFTER on every candidate occupies it at least once.
KEEP_COUNT_TRIES = 4
GENERAL_AFTER = 12
# How often one crystal may occupy a Wyckoff position, by its number of free coordinates: a point once
# (two orbits there would coincide); a line or a plane a few times (more crowd it: pyxtal then places
# atoms slowly or not at all); the general position (3) without limit, so that every count near the
# target stays reachable.
MAX_USES = {0: 1, 1: 2, 2: 4}
# Relative weight of the kinds of position (by free coordinates) when the next orbit is chosen: about
# half the orbits go to the general position where it fits, so that groups with many special positions
# (Pmmm has 26) do not produce crystals made mostly of atoms on special lines and points.
KIND_WEIGHT = {0: 1.0, 1: 1.0, 2: 2.0, 3: 4.0}


@dataclass(frozen=True, eq=False)
class Crystal:
    """A verified random crystal: `structure` has space group `space_group` at both SYMPRECS."""

    space_group: int
    structure: Structure
    formula: str

    @property
    def abc(self) -> np.ndarray:
        """Lattice constants a, b, c in angstrom."""
        return np.linalg.norm(self.structure.lattice, axis=1)

    @property
    def angles(self) -> np.ndarray:
        """Lattice angles alpha (b^c), beta (a^c), gamma (a^b) in degrees."""
        a, b, c = self.structure.lattice
        pairs = ((b, c), (a, c), (a, b))
        cosines = [np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)) for u, v in pairs]
        return np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0)))


@dataclass(frozen=True)
class WyckoffPosition:
    """One Wyckoff position of a group in pyxtal's (standard) setting."""

    label: str  # e.g. '4a'
    multiplicity: int  # in the conventional cell
    dof: int  # free coordinates: 3 on the general position, 0 on a point

    @property
    def free(self) -> bool:
        """Has free coordinates, so it may be occupied more than once."""
        return self.dof > 0

    @property
    def max_uses(self) -> int | None:
        """How many orbits one crystal may put here; None: any number (the general position)."""
        return MAX_USES.get(self.dof)


# --------------------------------------------------------------------------------------------------
# Verification


def symmetry_dataset(structure: Structure, symprec: float):
    """spglib's symmetry dataset of `structure` at `symprec`, or None if spglib finds none."""
    with warnings.catch_warnings():
        # spglib 2.x with its default (old) error handling warns on every call; a failure is just "no".
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return spglib.get_symmetry_dataset(structure.spglib_cell(), symprec=symprec)
        except spglib.SpglibError:
            return None


def spacegroup_number(structure: Structure, symprec: float) -> int | None:
    """spglib's space-group number of `structure` at `symprec`, or None if spglib finds none."""
    dataset = symmetry_dataset(structure, symprec)
    return None if dataset is None else int(dataset.number)


def verify(structure: Structure, space_group: int) -> bool:
    """True if spglib finds exactly `space_group` at every tolerance in SYMPRECS (1e-3 and 0.1).

    The tight tolerance rejects structures pyxtal got wrong; the loose one rejects structures that are
    within 0.1 angstrom of higher symmetry, whose label a real instrument could not confirm.
    """
    return all(spacegroup_number(structure, p) == int(space_group) for p in SYMPRECS)


def standardize(structure: Structure) -> Structure:
    """The spglib-standardized conventional cell (ITA standard setting), positions idealized and
    wrapped into [0, 1)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            result = spglib.standardize_cell(structure.spglib_cell(), to_primitive=False,
                                             no_idealize=False, symprec=SYMPRECS[0])
        except spglib.SpglibError:
            result = None
    if result is None:
        raise StemdlError("spglib could not standardize a generated structure")
    lattice, frac, numbers = result
    frac = np.mod(np.asarray(frac, dtype=np.float64), 1.0)
    frac[frac >= 1.0] = 0.0  # mod of a tiny negative number rounds up to exactly 1.0
    return Structure(np.asarray(lattice, dtype=np.float64), frac, np.asarray(numbers, dtype=np.int64))


# --------------------------------------------------------------------------------------------------
# Atom count and Wyckoff sets


@lru_cache(maxsize=None)
def wyckoff_positions(space_group: int) -> tuple[WyckoffPosition, ...]:
    """The Wyckoff positions of `space_group`, general position first (pyxtal's order)."""
    return tuple(WyckoffPosition(wp.get_label(), int(wp.multiplicity), int(wp.get_dof()))
                 for wp in _pyxtal_group(space_group).Wyckoff_positions)


def draw_atom_count(rng: np.random.Generator) -> int:
    """Atoms in the conventional cell, log-uniform on MIN_ATOMS..MAX_ATOMS, the same for every group."""
    value = np.exp(rng.uniform(np.log(MIN_ATOMS), np.log(MAX_ATOMS + 1)))
    return int(min(np.floor(value), MAX_ATOMS))


def reachable_counts(positions: Sequence[WyckoffPosition], limit: int,
                     used: Mapping[str, int] | None = None) -> np.ndarray:
    """Boolean mask over 0..limit: which totals the positions can still make, each used at most its
    `max_uses` minus the uses in `used` (by label), the general position without limit. Read-only."""
    used = used or {}
    bounded = tuple(sorted(wp.multiplicity for wp in positions if wp.max_uses is not None
                           for _ in range(wp.max_uses - used.get(wp.label, 0))))
    unbounded = tuple(sorted({wp.multiplicity for wp in positions if wp.max_uses is None}))
    return _reachable(bounded, unbounded, int(limit))


@lru_cache(maxsize=65536)
def _reachable(bounded: tuple[int, ...], unbounded: tuple[int, ...], limit: int) -> np.ndarray:
    # Keyed by multiplicities only: positions of equal multiplicity are interchangeable for counting,
    # which keeps the many feasibility checks of `choose_sites` cheap.
    ok = np.zeros(limit + 1, dtype=bool)
    ok[0] = True
    for m in unbounded:
        for _ in range(limit // m):  # shifting limit/m times lets the orbit be reused that often
            ok[m:] |= ok[:-m].copy()
    for m in bounded:
        if m <= limit:
            ok[m:] |= ok[:-m].copy()  # one shift per available use (0/1 knapsack)
    ok.flags.writeable = False
    return ok


def nearest_count(target: int, positions: Sequence[WyckoffPosition], base: int = 0) -> int:
    """The total closest to `target` that is `base` plus a reachable count (ties: the smaller).

    The general position can be used any number of times, so some total within one general
    multiplicity of the target is always reachable.
    """
    general = positions[0].multiplicity
    limit = max(target - base, 0) + general
    ok = reachable_counts(positions, limit)
    totals = base + np.flatnonzero(ok)
    totals = totals[totals > 0]
    return int(totals[np.argmin(np.abs(totals - target) * 2 + (totals > target))])


def _weights(candidates: Sequence[WyckoffPosition], positions: Sequence[WyckoffPosition]) -> np.ndarray:
    """Selection probabilities: each kind of position (point, line, plane, general) gets the weight in
    KIND_WEIGHT, shared among the group's positions of that kind. Per-position weights would make a
    structure mostly atoms on inversion centres and two-fold axes just because a group (P-1, P222, Pmmm)
    has many of them; crowded special positions are also where pyxtal's placement is slow or fails."""
    per_kind = Counter(wp.dof for wp in positions)
    w = np.array([KIND_WEIGHT[wp.dof] / per_kind[wp.dof] for wp in candidates])
    return w / w.sum()


def choose_sites(target: int, positions: Sequence[WyckoffPosition], rng: np.random.Generator,
                 need_general: bool = False) -> list[WyckoffPosition]:
    """A random multiset of Wyckoff positions whose multiplicities sum to the reachable total nearest to
    `target`, each position at most `max_uses` times; with `need_general` the general position (always
    `positions[0]`) at least once. Each step only offers positions after which the remainder can still
    be completed, so the walk never dead-ends."""
    chosen = [positions[0]] if need_general else []
    base = positions[0].multiplicity if need_general else 0
    remaining = nearest_count(target, positions, base) - base
    used: Counter[str] = Counter()
    while remaining > 0:
        candidates = []
        for wp in positions:
            if wp.multiplicity > remaining or (wp.max_uses is not None and used[wp.label] >= wp.max_uses):
                continue
            rest = remaining - wp.multiplicity
            if reachable_counts(positions, rest, used + Counter({wp.label: 1}))[rest]:
                candidates.append(wp)
        pick = candidates[rng.choice(len(candidates), p=_weights(candidates, positions))]
        chosen.append(pick)
        used[pick.label] += 1
        remaining -= pick.multiplicity
    return chosen


def assign_species(sites: Sequence[WyckoffPosition], rng: np.random.Generator,
                   palette: Sequence[str]) -> dict[str, list[WyckoffPosition]]:
    """1..MAX_SPECIES distinct elements from `palette`, each on at least one of `sites`."""
    n_species = int(rng.integers(1, min(MAX_SPECIES, len(sites), len(palette)) + 1))
    elements = [palette[i] for i in rng.choice(len(palette), size=n_species, replace=False)]
    order = rng.permutation(len(sites))
    # The first n_species orbits (in random order) guarantee every element a site; the rest go anywhere.
    owner = np.concatenate([np.arange(n_species), rng.integers(0, n_species, len(sites) - n_species)])
    by_element: dict[str, list[WyckoffPosition]] = {el: [] for el in elements}
    for site_index, species_index in zip(order, owner):
        by_element[elements[species_index]].append(sites[site_index])
    return by_element


# --------------------------------------------------------------------------------------------------
# Building and checking one candidate


@lru_cache(maxsize=None)
def atomic_number(symbol: str) -> int:
    """Z of an element symbol, from pyxtal's element table."""
    from pyxtal.database.element import Element

    return int(Element(symbol).z)


@lru_cache(maxsize=None)
def _pyxtal_group(space_group: int):
    """pyxtal's Group, built once per group: building it takes a few ms, a large part of the cost of a
    small structure. pyxtal only reads it while generating (results do not depend on call order)."""
    from pyxtal.symmetry import Group

    return Group(int(space_group))


@lru_cache(maxsize=1)
def _pyxtal_tolerances():
    """pyxtal's default atomic distance tolerances (what from_random builds on every call), built once."""
    from pyxtal.tolerance import Tol_matrix

    return Tol_matrix(prototype="atomic", factor=1.0)


def _pyxtal_structure(space_group: int, by_element: dict[str, list[WyckoffPosition]],
                      seed: int) -> Structure | None:
    """pyxtal's random structure with these Wyckoff sites, or None if pyxtal gives up."""
    from pyxtal import pyxtal

    group, tolerances = _pyxtal_group(space_group), _pyxtal_tolerances()
    species = list(by_element)
    num_ions = [sum(wp.multiplicity for wp in sites) for sites in by_element.values()]
    sites = [[wp.label for wp in site_list] for site_list in by_element.values()]
    xtal = pyxtal()
    # pyxtal prints and warns freely (volume resets, failed attempts); none of it is ours to show.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            # max_count=1: one pyxtal attempt (itself 40 lattices x 10 placements); if a Wyckoff set
            # does not fit it is cheaper to draw a new set than to insist on this one.
            xtal.from_random(3, group, species, num_ions, sites=sites, max_count=1, tm=tolerances,
                             random_state=np.random.default_rng(seed))
        except Exception:  # pyxtal signals "could not place the atoms" with several exception types
            return None
        if not xtal.valid:
            return None
        frac, symbols = xtal._get_coords_and_species(absolute=False)
    numbers = np.array([atomic_number(s) for s in symbols], dtype=np.int64)
    return Structure(np.array(xtal.lattice.matrix, dtype=np.float64), np.asarray(frac, float), numbers)


def formula_of(numbers: np.ndarray, palette: Sequence[str] = ELEMENTS) -> str:
    """'Fe8 O14 F2': symbol and count per element, in palette (electronegativity) order."""
    counts = Counter(int(z) for z in numbers)
    symbols = sorted((s for s in palette if atomic_number(s) in counts), key=palette.index)
    return " ".join(f"{s}{counts[atomic_number(s)]}" for s in symbols)


def _try_once(space_group: int, rng: np.random.Generator, palette: Sequence[str],
              target: int, need_general: bool) -> Structure | None:
    """One candidate: Wyckoff set, species, pyxtal coordinates; the standardized cell if it verifies."""
    positions = wyckoff_positions(space_group)
    by_element = assign_species(choose_sites(target, positions, rng, need_general), rng, palette)
    raw = _pyxtal_structure(space_group, by_element, int(rng.integers(2**63)))
    if raw is None or not verify(raw, space_group):
        return None
    try:
        cell = standardize(raw)
    except StemdlError:
        return None
    # Fewer atoms after standardizing means spglib found extra lattice translations: the Wyckoff set was
    # a supercell of a smaller crystal (e.g. 1a+1b+3c+3d of one element in Pm-3m is simple cubic of
    # half the edge). Its label may be right, but the drawn atom count would silently not hold.
    if len(cell.numbers) != len(raw.numbers):
        return None
    return cell if verify(cell, space_group) else None


def _palette(elements: Sequence[str] | None) -> tuple[str, ...]:
    if elements is None:
        return ELEMENTS
    wanted = set(elements)
    unknown = sorted(wanted - set(ELEMENTS))
    if unknown or not wanted:
        raise StemdlError(f"elements must be a non-empty subset of ELEMENTS; not allowed: {unknown}")
    return tuple(s for s in ELEMENTS if s in wanted)  # palette order keeps formulas consistent


def random_crystal(space_group: int, rng: np.random.Generator, *, elements: Sequence[str] | None = None,
                   max_tries: int = 50) -> Crystal:
    """A random crystal of `space_group` (1..230), verified by spglib at symprec 1e-3 and 0.1.

    All randomness comes from `rng`, so the same generator state gives the same crystal. The atom count
    is drawn independently of the group and kept for the first KEEP_COUNT_TRIES candidates, later ones
    draw a fresh count, and from GENERAL_AFTER on they also occupy the general position. Raises
    StemdlError naming the group if `max_tries` candidates all fail.
    """
    sg = int(space_group)
    if not 1 <= sg <= 230:
        raise StemdlError(f"space group {space_group} is outside 1..230")
    palette = _palette(elements)
    target = draw_atom_count(rng)
    for attempt in range(max_tries):
        if attempt >= KEEP_COUNT_TRIES:
            target = draw_atom_count(rng)
        cell = _try_once(sg, rng, palette, target, need_general=attempt >= GENERAL_AFTER)
        if cell is not None:
            return Crystal(sg, cell, formula_of(cell.numbers, palette))
    raise StemdlError(f"space group {sg}: no structure passed spglib verification in {max_tries} tries")
