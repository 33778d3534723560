"""Random crystals: verified labels, standardized cells, exact absences, determinism, count independence."""

from __future__ import annotations

from importlib import resources
import json
import re
from collections import Counter
from functools import lru_cache

import numpy as np
import pytest
import spglib
from hypothesis import given, settings
from hypothesis import strategies as st

from stemdl.workloads.spacegroup.data.layout import Structure
from stemdl.harness.errors import StemdlError
from stemdl.workloads.spacegroup.synth import crystals
from stemdl.workloads.spacegroup.synth.crystals import ELEMENTS, Crystal, random_crystal, verify
from stemdl.workloads.spacegroup.synth.diffclass import systematic_absences

# spglib 2.x (old error handling) warns on every call, successful or not.
pytestmark = pytest.mark.filterwarnings("ignore:Set OLD_ERROR_HANDLING:DeprecationWarning")

HIGH_SYMMETRY = (225, 227, 229, 230, 191, 194, 166, 167, 221, 62, 14, 2, 1)
_others = sorted(set(range(1, 231)) - set(HIGH_SYMMETRY))
GROUPS = HIGH_SYMMETRY + tuple(int(g) for g in np.random.default_rng(2024).choice(_others, 47, replace=False))


@lru_cache(maxsize=None)
def crystal_for(space_group: int, seed: int = 0) -> Crystal:
    return random_crystal(space_group, np.random.default_rng(10_000 * seed + space_group))


@lru_cache(maxsize=1)
def default_hall_numbers() -> dict[int, int]:
    """Space group -> its first Hall setting in spglib's table, the ITA standard setting."""
    first: dict[int, int] = {}
    for hall in range(1, 531):
        first.setdefault(spglib.get_spacegroup_type(hall).number, hall)
    return first


def spglib_number(structure: Structure, symprec: float) -> int:
    return spglib.get_symmetry_dataset(structure.spglib_cell(), symprec=symprec).number


# ---------------------------------------------------------------------------------------------------
# Labels and cells


@pytest.mark.parametrize("sg", GROUPS)
def test_random_crystal_label_is_verified_by_spglib(sg):
    c = crystal_for(sg)
    assert c.space_group == sg
    for symprec in (1e-3, 0.1):
        assert spglib_number(c.structure, symprec) == sg, f"symprec {symprec}"
    assert verify(c.structure, sg)


@pytest.mark.parametrize("sg", GROUPS)
def test_structure_is_a_wrapped_standard_conventional_cell(sg):
    s = crystal_for(sg).structure
    n = len(s.numbers)
    assert s.lattice.shape == (3, 3) and s.frac_coords.shape == (n, 3) and s.numbers.shape == (n,)
    assert s.numbers.dtype.kind == "i" and np.all(np.isfinite(s.lattice))
    assert np.all(s.frac_coords >= 0.0) and np.all(s.frac_coords < 1.0)
    assert np.linalg.det(s.lattice) > 0
    # Already standardized: spglib's standardization of it changes neither the lattice nor the count.
    lattice, frac, numbers = spglib.standardize_cell(s.spglib_cell(), to_primitive=False, symprec=1e-3)
    assert len(numbers) == n
    np.testing.assert_allclose(lattice, s.lattice, atol=1e-6)
    # And it is in the default (ITA standard) setting of its group.
    dataset = spglib.get_symmetry_dataset(s.spglib_cell(), symprec=1e-3)
    assert dataset.hall_number == default_hall_numbers()[sg]


@pytest.mark.parametrize("sg", GROUPS)
def test_formula_counts_match_numbers(sg):
    c = crystal_for(sg)
    z_of = {sym: crystals.atomic_number(sym) for sym in ELEMENTS}
    parsed = [re.fullmatch(r"([A-Z][a-z]?)(\d+)", part).groups() for part in c.formula.split(" ")]
    assert Counter({z_of[sym]: int(k) for sym, k in parsed}) == Counter(int(z) for z in c.structure.numbers)
    assert 1 <= len(parsed) <= crystals.MAX_SPECIES
    # Symbols appear in palette (electronegativity) order, as in 'Fe8 O14 F2'.
    order = [ELEMENTS.index(sym) for sym, _ in parsed]
    assert order == sorted(order)


@pytest.mark.parametrize("sg", GROUPS)
def test_systematic_absences_are_exact(sg):
    """Every atom of the cell is listed and positions are symmetrized, so F vanishes where it must."""
    s = crystal_for(sg).structure
    dataset = spglib.get_symmetry_dataset(s.spglib_cell(), symprec=1e-3)
    r = np.arange(-4, 5)
    hkl = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    absent = systematic_absences(dataset.rotations, dataset.translations, hkl)
    f = np.exp(2j * np.pi * hkl @ s.frac_coords.T) @ s.numbers
    assert np.all(np.abs(f[absent]) < 1e-9 * s.numbers.sum())
    # Centred and glide/screw groups do have absences; the check above is not vacuous for them.
    if sg in (225, 227, 229, 230, 62, 14, 167):
        assert absent.any()


def test_abc_and_angles_follow_the_lattice():
    lattice = np.array([[3.0, 0, 0], [4.0 * np.cos(np.radians(100)), 4.0 * np.sin(np.radians(100)), 0],
                        [0.5, 0.3, 5.0]])
    c = Crystal(1, Structure(lattice, np.zeros((1, 3)), np.array([14])), "Si1")
    a, b, cc = lattice
    np.testing.assert_allclose(c.abc, [3.0, 4.0, np.linalg.norm(cc)])
    expect = [np.degrees(np.arccos(np.dot(u, v) / np.linalg.norm(u) / np.linalg.norm(v)))
              for u, v in ((b, cc), (a, cc), (a, b))]
    np.testing.assert_allclose(c.angles, expect)
    assert c.angles[2] == pytest.approx(100.0)


# ---------------------------------------------------------------------------------------------------
# Determinism and randomness


def _arrays(c: Crystal):
    return c.structure.lattice, c.structure.frac_coords, c.structure.numbers


def test_same_seed_same_crystal_whatever_the_global_state():
    np.random.seed(1)
    first = random_crystal(62, np.random.default_rng(7))
    np.random.seed(2)
    random_crystal(14, np.random.default_rng(99))  # unrelated work in between
    second = random_crystal(62, np.random.default_rng(7))
    for x, y in zip(_arrays(first), _arrays(second)):
        np.testing.assert_array_equal(x, y)
    assert first.formula == second.formula


def test_different_seeds_different_crystals():
    a, b = (random_crystal(225, np.random.default_rng(s)) for s in (1, 2))
    assert not (a.structure.lattice.shape == b.structure.lattice.shape
                and np.array_equal(a.structure.lattice, b.structure.lattice))


def test_the_generator_advances():
    rng = np.random.default_rng(5)
    a, b = random_crystal(2, rng), random_crystal(2, rng)
    assert not np.array_equal(a.structure.lattice, b.structure.lattice)


def test_atom_count_does_not_depend_on_the_group():
    """Same seeds for a low- and a high-symmetry group: the cell size must not give the label away."""
    counts = {sg: [len(random_crystal(sg, np.random.default_rng(500 + i)).structure.numbers)
                   for i in range(30)] for sg in (1, 2, 225)}
    medians = {sg: float(np.median(v)) for sg, v in counts.items()}
    for low in (1, 2):
        ratio = medians[225] / medians[low]
        assert 1 / 1.5 <= ratio <= 1.5, medians
    # The counts span the drawn range rather than sitting at one group-specific value.
    assert min(counts[225]) <= 8 and max(counts[225]) >= 40


# ---------------------------------------------------------------------------------------------------
# Elements, errors


def test_palette_has_electron_scattering_factors():
    table = resources.files("pymatgen.analysis.diffraction").joinpath("atomic_scattering_params.json")
    keys = set(json.loads(table.read_text()))
    assert set(ELEMENTS) <= keys, sorted(set(ELEMENTS) - keys)
    assert len(set(ELEMENTS)) == len(ELEMENTS)


def test_elements_restrict_the_species():
    c = random_crystal(194, np.random.default_rng(3), elements=["O", "Si"])
    assert set(int(z) for z in c.structure.numbers) <= {8, 14}
    with pytest.raises(StemdlError, match="Xx"):
        random_crystal(194, np.random.default_rng(3), elements=["Si", "Xx"])


@pytest.mark.parametrize("bad", [0, 231, -5])
def test_out_of_range_group_is_an_error(bad):
    with pytest.raises(StemdlError, match=str(bad)):
        random_crystal(bad, np.random.default_rng(0))


def test_exhausted_tries_name_the_group(monkeypatch):
    monkeypatch.setattr(crystals, "_pyxtal_structure", lambda *args: None)
    with pytest.raises(StemdlError, match="space group 62"):
        random_crystal(62, np.random.default_rng(0), max_tries=5)


def test_verify_needs_both_tolerances():
    a = 4.0
    frac = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0],
                     [0.5, 0.5, 0.5], [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]])
    numbers = np.array([11] * 4 + [17] * 4)
    rocksalt = Structure(np.eye(3) * a, frac, numbers)
    assert verify(rocksalt, 225) and not verify(rocksalt, 221)
    # A 0.02 angstrom displacement: lower symmetry at 1e-3, still Fm-3m at 0.1 -> no label is safe.
    shaken = Structure(rocksalt.lattice, frac + np.array([0.005, 0, 0]) * (numbers == 11)[:, None], numbers)
    assert spglib_number(shaken, 1e-3) != 225 and spglib_number(shaken, 0.1) == 225
    assert not verify(shaken, 225) and not verify(shaken, spglib_number(shaken, 1e-3))


# ---------------------------------------------------------------------------------------------------
# Wyckoff sets


def _brute_reachable(positions, limit):
    ok = {0}
    for wp in positions:
        uses = wp.max_uses if wp.max_uses is not None else limit // wp.multiplicity
        m = wp.multiplicity
        ok = {t + k * m for t in ok for k in range(uses + 1) if t + k * m <= limit}
    return ok


@pytest.mark.parametrize("sg", [2, 47, 139, 191, 225, 230])
def test_reachable_counts_match_brute_force(sg):
    positions = crystals.wyckoff_positions(sg)
    mask = crystals.reachable_counts(positions, 80)
    assert set(np.flatnonzero(mask)) == _brute_reachable(positions, 80)


@settings(max_examples=150, deadline=None)
@given(sg=st.integers(1, 230), target=st.integers(crystals.MIN_ATOMS, crystals.MAX_ATOMS),
       seed=st.integers(0, 2**32 - 1), need_general=st.booleans())
def test_choose_sites_respects_the_rules(sg, target, seed, need_general):
    positions = crystals.wyckoff_positions(sg)
    sites = crystals.choose_sites(target, positions, np.random.default_rng(seed), need_general)
    base = positions[0].multiplicity if need_general else 0
    assert sum(wp.multiplicity for wp in sites) == crystals.nearest_count(target, positions, base)
    uses = Counter(wp.label for wp in sites)
    for wp in positions:
        if wp.max_uses is not None:
            assert uses[wp.label] <= wp.max_uses
    assert all(uses[wp.label] <= 1 for wp in positions if not wp.free)
    if need_general:
        assert uses[positions[0].label] >= 1


def test_nearest_count_examples():
    assert crystals.nearest_count(4, crystals.wyckoff_positions(230)) == 16  # Ia-3d: nothing below 16
    assert crystals.nearest_count(37, crystals.wyckoff_positions(1)) == 37
    assert crystals.nearest_count(9, crystals.wyckoff_positions(225)) == 8  # tie 8/12 -> 8 is nearer
    assert crystals.nearest_count(10, crystals.wyckoff_positions(225)) == 8  # tie 8 vs 12 -> smaller
    assert crystals.nearest_count(4, crystals.wyckoff_positions(225), base=192) == 192


def test_atom_count_distribution_is_in_range():
    rng = np.random.default_rng(0)
    draws = np.array([crystals.draw_atom_count(rng) for _ in range(4000)])
    assert draws.min() == crystals.MIN_ATOMS and draws.max() == crystals.MAX_ATOMS
    # Log-uniform: about as many draws in 4..15 as in 16..64.
    assert 0.4 < np.mean(draws < 16) < 0.6
