"""Zone axes: shortest inequivalent directions, canonical and deterministic."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import pytest
import spglib

from stemdl.workloads.spacegroup.data.layout import Structure
from stemdl.harness.errors import StemdlError
from stemdl.workloads.spacegroup.synth.crystals import random_crystal
from stemdl.workloads.spacegroup.synth.zones import (candidate_directions, canonical_direction, crystal_rotations,
                                direction_length, equivalent_directions, zone_axes)

# spglib 2.x (old error handling) warns on every call, successful or not.
pytestmark = pytest.mark.filterwarnings("ignore:Set OLD_ERROR_HANDLING:DeprecationWarning")


def rocksalt(a: float = 5.6) -> Structure:
    frac = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0],
                     [0.5, 0.5, 0.5], [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]])
    return Structure(np.eye(3) * a, frac, np.array([11] * 4 + [17] * 4))


def orthorhombic(a: float, b: float, c: float) -> Structure:
    """One atom at the origin: Pmmm with the given edges."""
    return Structure(np.diag([a, b, c]), np.zeros((1, 3)), np.array([26]))


def hexagonal(a: float = 3.0, c: float = 5.0) -> Structure:
    lattice = np.array([[a, 0, 0], [-a / 2, a * math.sqrt(3) / 2, 0], [0, 0, c]])
    return Structure(lattice, np.zeros((1, 3)), np.array([12]))  # P6/mmm


def family(uvw, rotations) -> set[tuple[int, ...]]:
    return {tuple(int(x) for x in m) for m in equivalent_directions(uvw, rotations)}


def test_cubic_gives_100_110_111():
    s = rocksalt()
    rot = crystal_rotations(s)
    axes = zone_axes(s)
    assert axes.dtype.kind == "i" and axes.shape == (3, 3)
    assert axes.tolist() == [[0, 0, 1], [0, 1, 1], [1, 1, 1]]
    for axis, expected in zip(axes, ([1, 0, 0], [1, 1, 0], [1, 1, 1])):
        assert tuple(expected) in family(axis, rot)


def test_cubic_families_have_textbook_sizes():
    rot = crystal_rotations(rocksalt())
    assert len(rot) == 48
    assert len(family([1, 0, 0], rot)) == 6
    assert len(family([1, 1, 0], rot)) == 12
    assert len(family([1, 1, 1], rot)) == 8


def test_orthorhombic_axes_in_order_of_edge_length():
    # |[110]| = 6.02 > c = 5, so the three edges come first, shortest first.
    assert zone_axes(orthorhombic(4.0, 4.5, 5.0)).tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    # With a long c the face diagonal [110] (5.0) is shorter than c (6.0) and takes the third place.
    assert zone_axes(orthorhombic(3.0, 4.0, 6.0)).tolist() == [[1, 0, 0], [0, 1, 0], [1, 1, 0]]
    # Order follows length, not the name of the axis.
    assert zone_axes(orthorhombic(5.0, 4.5, 4.0)).tolist() == [[0, 0, 1], [0, 1, 0], [1, 0, 0]]


def test_orthorhombic_mirror_images_are_one_axis():
    rot = crystal_rotations(orthorhombic(3.0, 4.0, 6.0))
    assert family([1, 1, 0], rot) == {(1, 1, 0), (1, -1, 0), (-1, 1, 0), (-1, -1, 0)}
    axes = zone_axes(orthorhombic(3.0, 4.0, 6.0), n=6)
    assert [1, -1, 0] not in axes.tolist()


def test_hexagonal_representatives_stay_in_the_box():
    s = hexagonal()
    rot = crystal_rotations(s)
    axes = zone_axes(s, n=8)
    assert np.abs(axes).max() <= 2
    assert canonical_direction([2, -1, 0], rot, max_index=2) in family([2, -1, 0], rot)
    assert max(abs(x) for x in canonical_direction([2, -1, 0], rot, max_index=2)) <= 2
    assert axes[0].tolist() == [0, 1, 0] and axes[1].tolist() == [0, 0, 1]  # a = 3 < c = 5


def test_explicit_ops_match_spglib_default():
    s = rocksalt()
    expected = zone_axes(s)
    sym = spglib.get_symmetry(s.spglib_cell(), symprec=1e-3)
    np.testing.assert_array_equal(zone_axes(s, space_group_ops=sym), expected)
    np.testing.assert_array_equal(zone_axes(s, space_group_ops=sym["rotations"]), expected)
    dataset = spglib.get_symmetry_dataset(s.spglib_cell(), symprec=1e-3)
    np.testing.assert_array_equal(zone_axes(s, space_group_ops=dataset), expected)
    # Without the crystal's rotations (identity only) the cubic edges are three different axes.
    assert zone_axes(s, space_group_ops=np.eye(3, dtype=int)[None]).tolist() == [[0, 0, 1], [0, 1, 0],
                                                                                  [1, 0, 0]]


def test_candidates_are_primitive_and_sign_canonical():
    cands = candidate_directions(2)
    assert len(cands) == len({tuple(c) for c in cands})
    for u, v, w in cands:
        assert math.gcd(math.gcd(int(u), int(v)), int(w)) == 1
        assert next(x for x in (u, v, w) if x != 0) > 0
    assert len(cands) == 49  # 98 primitive vectors in the 5^3 box, one of each +-pair


def test_too_few_axes_is_an_error():
    with pytest.raises(StemdlError, match="inequivalent"):
        zone_axes(rocksalt(), n=4, max_index=1)


@lru_cache(maxsize=None)
def _crystal(sg: int):
    return random_crystal(sg, np.random.default_rng(700 + sg))


@pytest.mark.parametrize("sg", [1, 2, 14, 62, 139, 166, 194, 225, 227, 230])
@pytest.mark.parametrize("max_index", [1, 2])
def test_random_crystals_axes_are_shortest_and_inequivalent(sg, max_index):
    s = _crystal(sg).structure
    rot = crystal_rotations(s)
    axes = zone_axes(s, max_index=max_index)
    assert axes.shape == (3, 3)
    for axis in axes:
        assert math.gcd(math.gcd(int(axis[0]), int(axis[1])), int(axis[2])) == 1
        assert np.abs(axis).max() <= max_index
    families = [family(a, rot) for a in axes]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not families[i] & families[j]
    lengths = [direction_length(a, s.lattice) for a in axes]
    assert lengths == sorted(lengths)
    # The first axis is the shortest of all candidates; the set of the three is the set of shortest classes.
    all_lengths = sorted(direction_length(c, s.lattice) for c in candidate_directions(max_index))
    assert lengths[0] == pytest.approx(all_lengths[0])
    np.testing.assert_array_equal(zone_axes(s, max_index=max_index), axes)  # deterministic
