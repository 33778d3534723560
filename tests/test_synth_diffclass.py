"""Diffraction classes: 122 classes computed from spglib's settings, with the textbook memberships."""

from __future__ import annotations


import numpy as np
import pytest

from stemdl.harness.errors import StemdlError
from stemdl.workloads.spacegroup.synth import diffclass
from stemdl.workloads.spacegroup.synth.diffclass import (all_classes, class_members, diffraction_class, distinguishable,
                                    representatives, systematic_absences)

# spglib 2.x (old error handling) warns on every call, successful or not.
pytestmark = pytest.mark.filterwarnings("ignore:Set OLD_ERROR_HANDLING:DeprecationWarning")


def test_exactly_122_classes_covering_every_group_once():
    classes = all_classes()
    assert len(classes) == 122
    assert sorted(classes) == list(range(1, 123))
    members = [sg for sgs in classes.values() for sg in sgs]
    assert sorted(members) == list(range(1, 231))


def test_class_ids_follow_smallest_member():
    classes = all_classes()
    smallest = [min(classes[c]) for c in sorted(classes)]
    assert smallest == sorted(smallest)
    assert class_members(1) == (1, 2)
    assert all(diffraction_class(sg) == c for c, sgs in classes.items() for sg in sgs)


@pytest.mark.parametrize("together", [
    (1, 2),            # P1, P-1: Friedel's law hides the inversion centre
    (33, 62),          # Pna2_1 and Pnma (as Pnam): both Pna-
    (76, 78),          # P4_1, P4_3: enantiomorphs
    (3, 6, 10),        # P2, Pm, P2/m
    (16, 25, 47),      # P222, Pmm2, Pmmm
    (195, 200),        # P23, Pm-3
    (207, 215, 221),   # P432, P-43m, Pm-3m
    (209, 216, 225),   # F432, F-43m, Fm-3m
    (211, 217, 229),   # I432, I-43m, Im-3m
    (146, 148),        # R3, R-3
])
def test_known_classes_are_joined(together):
    assert len({diffraction_class(sg) for sg in together}) == 1


@pytest.mark.parametrize("apart", [
    (225, 229),  # Fm-3m vs Im-3m: different centring
    (62, 14),    # Pnma vs P2_1/c: different Laue group
    (149, 150),  # P312 vs P321: -31m and -3m1 Laue groups are oriented differently on the lattice
    (14, 13),    # P2_1/c vs P2/c: the 0k0 screw condition
    (227, 225),  # Fd-3m vs Fm-3m: d-glide conditions
    (198, 205),  # P2_13 vs Pa-3
])
def test_different_symbols_stay_apart(apart):
    a, b = apart
    assert diffraction_class(a) != diffraction_class(b)


def test_distinguishable():
    assert distinguishable([14, 225, 2, 62])
    assert not distinguishable([1, 2])
    assert not distinguishable([62, 33, 14])
    assert distinguishable([62, 62])  # the same group twice is one label, not two


def test_representatives_are_one_per_class():
    reps = representatives()
    assert len(reps) == 122 and distinguishable(reps)
    assert reps[0] == 1
    sub = representatives([62, 33, 2, 1, 225])
    assert sub == (1, 33, 225)


def test_errors():
    for bad in (0, 231):
        with pytest.raises(StemdlError):
            diffraction_class(bad)
    with pytest.raises(StemdlError):
        class_members(123)


def test_map_is_computed_once():
    # Speed belongs in benchmarks; what matters here is that lookups reuse one computed table.
    diffclass._class_table.cache_clear()
    first = all_classes()
    for sg in range(1, 231):
        diffraction_class(sg)
    info = diffclass._class_table.cache_info()
    assert info.misses == 1 and info.hits >= 230
    assert all_classes() == first


def _ops(symbols):
    """(rotations, translations) from short 'x,y,z' strings."""
    rots, trans = [], []
    for op in symbols:
        r, t = np.zeros((3, 3), int), np.zeros(3)
        for i, expr in enumerate(op.split(",")):
            for j, axis in enumerate("xyz"):
                if f"-{axis}" in expr:
                    r[i, j] = -1
                elif axis in expr:
                    r[i, j] = 1
            if "+1/2" in expr:
                t[i] = 0.5
        rots.append(r)
        trans.append(t)
    return np.array(rots), np.array(trans)


def test_absences_of_p21c():
    # P 1 2_1/c 1: h0l absent for l odd (c glide), 0k0 absent for k odd (2_1 screw); nothing else.
    rots, trans = _ops(["x,y,z", "-x,y+1/2,-z+1/2", "-x,-y,-z", "x,-y+1/2,z+1/2"])
    hkl = np.array([[1, 0, 1], [1, 0, 2], [0, 1, 0], [0, 2, 0], [1, 1, 1], [0, 0, 1], [2, 0, 3]])
    absent = systematic_absences(rots, trans, hkl)
    assert absent.tolist() == [True, False, True, False, False, True, True]


def test_absences_of_body_centring():
    rots, trans = _ops(["x,y,z", "x+1/2,y+1/2,z+1/2"])
    hkl = np.array([[1, 0, 0], [1, 1, 0], [1, 1, 1], [2, 1, 1]])
    assert systematic_absences(rots, trans, hkl).tolist() == [True, False, True, False]


def test_intensity_statistics_tell_p1_from_p_1_although_friedel_puts_them_in_one_class():
    """Wilson's <|E²-1|>: 0.736 acentric, 0.968 centric. One diffraction class, yet the random crystals'
    kinematic intensities differ in distribution: why a classifier beats chance on P1/P-1 kinematically."""
    from stemdl.workloads.spacegroup.synth import scattering
    from stemdl.workloads.spacegroup.synth.crystals import random_crystal

    rng = np.random.default_rng(5)
    p1, p_1 = ([scattering.wilson_statistic(random_crystal(sg, rng).structure) for _ in range(12)] for sg in (1, 2))
    assert abs(np.mean(p1) - scattering.WILSON_ACENTRIC) < 0.08
    assert abs(np.mean(p_1) - scattering.WILSON_CENTRIC) < 0.08
    assert sum(v < 0.85 for v in p1) >= 10 and sum(v > 0.85 for v in p_1) >= 10
    assert diffraction_class(1) == diffraction_class(2)
