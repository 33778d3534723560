"""The 230 space groups grouped into the 122 classes that kinematic diffraction can tell apart.

Kinematic (single-scattering) intensities obey Friedel's law, |F(h)| = |F(-h)|, so a CBED pattern
computed kinematically shows the Laue group (the point group plus inversion), the lattice centring and
the reflection conditions of glide planes and screw axes, but not the point group itself. Two space
groups whose Laue group and systematic absences coincide in some setting therefore produce kinematic
data of the same symmetry (their intensity statistics can still differ: `scattering.wilson_statistic`); the ITA calls this common information the *diffraction symbol*. Grouping the 230 groups
by it gives 122 classes, e.g. {P1, P-1} and {Pna2_1, Pnma} (both Pn-a in the Pnam setting).

Nothing here is tabulated by hand: for each of spglib's 530 Hall settings we take the operations of the
group in that setting, compute a signature (Laue group as matrices + the set of systematically absent
hkl in a box), and join every pair of space-group numbers that share a signature in any setting
(union-find). Settings matter: P4_1 and P4_3 agree in every setting, Pna2_1 and Pnma only when the
Pnma is written as Pnam, so comparing one setting per group would split classes that are really one.

Class ids are 1..122, numbered in order of each class's smallest member, so class 1 is {1, 2}.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from functools import lru_cache

import numpy as np
import spglib

from stemdl.harness.errors import StemdlError

N_HALL = 530
N_SPACE_GROUPS = 230
N_CLASSES = 122
# |h|,|k|,|l| <= 6 contains the first reflection that separates every pair of conditions in the ITA:
# the strongest are 00l: l = 4n (4_1, d glides) and 00l: l = 6n (6_1), so 6 suffices.
HKL_RANGE = 6
_PHASE_TOL = 1e-6


@lru_cache(maxsize=1)
def _hkl_grid() -> np.ndarray:
    """All hkl with |h|,|k|,|l| <= HKL_RANGE except 000, as integer rows, in a fixed order."""
    r = np.arange(-HKL_RANGE, HKL_RANGE + 1)
    grid = np.stack(np.meshgrid(r, r, r, indexing="ij"), axis=-1).reshape(-1, 3)
    return grid[np.any(grid != 0, axis=1)]


def systematic_absences(rotations: np.ndarray, translations: np.ndarray, hkl: np.ndarray) -> np.ndarray:
    """Boolean mask over `hkl`: True where F(hkl) vanishes for every structure with these operations.

    For a general position x, F(h) = sum_g exp(2 pi i h.(R_g x + t_g)). Grouping the sum by cosets of the
    stabiliser S_h = {g : h R_g = h} factors it into exp(2 pi i h.x) * sum_{g in S_h} exp(2 pi i h.t_g)
    times a sum over cosets; g -> exp(2 pi i h.t_g) is a character of S_h, and a character sum vanishes
    exactly when the character is non-trivial. So h is absent iff some op fixes h (h R = h) with h.t not an
    integer. Atoms on special positions contribute a multiple of the same orbit sum, so they are absent
    too. Centring vectors appear as operations (R = 1) and are handled by the same rule.
    """
    hkl = np.asarray(hkl, dtype=np.int64)
    absent = np.zeros(len(hkl), dtype=bool)
    for rot, trans in zip(rotations, translations):
        fixed = np.all(hkl @ rot == hkl, axis=1)
        phase = hkl @ trans
        absent |= fixed & (np.abs(phase - np.round(phase)) > _PHASE_TOL)
    return absent


def laue_group(rotations: np.ndarray) -> frozenset:
    """The Laue group {R} u {-R} as a set of hashable matrices (in the setting's basis)."""
    mats = np.concatenate([rotations, -rotations]).astype(np.int64)
    return frozenset(tuple(m.reshape(-1)) for m in mats)


def _setting_signature(hall_number: int) -> tuple[frozenset, bytes]:
    """(Laue group, packed absence mask) of the space group in Hall setting `hall_number`."""
    ops = spglib.get_symmetry_from_database(hall_number)
    rotations = np.asarray(ops["rotations"], dtype=np.int64)
    translations = np.asarray(ops["translations"], dtype=np.float64)
    absent = systematic_absences(rotations, translations, _hkl_grid())
    return laue_group(rotations), np.packbits(absent).tobytes()


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]  # path halving keeps the trees flat
        i = parent[i]
    return i


@lru_cache(maxsize=1)
def _class_table() -> tuple[dict[int, int], dict[int, tuple[int, ...]]]:
    """(space group -> class id, class id -> members), computed once from spglib's Hall settings."""
    parent = list(range(N_SPACE_GROUPS + 1))
    first_with: dict[tuple[frozenset, bytes], int] = {}
    with warnings.catch_warnings():
        # spglib 2.x with its default (old) error handling warns on every call, even successful ones.
        warnings.simplefilter("ignore", DeprecationWarning)
        for hall in range(1, N_HALL + 1):
            number = int(spglib.get_spacegroup_type(hall).number)
            sig = _setting_signature(hall)
            other = first_with.setdefault(sig, number)
            a, b = _find(parent, number), _find(parent, other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = {}
    for sg in range(1, N_SPACE_GROUPS + 1):
        members.setdefault(_find(parent, sg), []).append(sg)
    # Roots are the smallest members (union keeps the min as root), so sorting roots numbers the
    # classes in order of their smallest member.
    classes = {cid: tuple(members[root]) for cid, root in enumerate(sorted(members), start=1)}
    of_group = {sg: cid for cid, sgs in classes.items() for sg in sgs}
    if len(classes) != N_CLASSES:
        raise StemdlError(f"diffraction classes: spglib gave {len(classes)} classes, expected {N_CLASSES}")
    return of_group, classes


def _check_group(space_group: int) -> int:
    sg = int(space_group)
    if not 1 <= sg <= N_SPACE_GROUPS:
        raise StemdlError(f"space group {space_group} is outside 1..{N_SPACE_GROUPS}")
    return sg


def diffraction_class(space_group: int) -> int:
    """The diffraction-class id (1..122) of `space_group`."""
    return _class_table()[0][_check_group(space_group)]


def class_members(class_id: int) -> tuple[int, ...]:
    """The space groups (ascending) of diffraction class `class_id`."""
    classes = _class_table()[1]
    if class_id not in classes:
        raise StemdlError(f"diffraction class {class_id} is outside 1..{len(classes)}")
    return classes[class_id]


def all_classes() -> dict[int, tuple[int, ...]]:
    """Every class id mapped to its members; a fresh dict the caller may modify."""
    return dict(_class_table()[1])


def distinguishable(space_groups: Iterable[int]) -> bool:
    """True if no two of `space_groups` (distinct numbers) share a diffraction class.

    A label set that fails this cannot be learned from the symmetry of kinematic patterns: two groups of
    one class give patterns of the same symmetry and absences. They can still differ in distribution:
    the intensity statistics of a centrosymmetric crystal are centric (`scattering.wilson_statistic`),
    which a classifier can learn from enough reflections (docs/results.md, issue 14).
    """
    groups = sorted({_check_group(sg) for sg in space_groups})
    classes = [diffraction_class(sg) for sg in groups]
    return len(set(classes)) == len(classes)


def representatives(space_groups: Iterable[int] | None = None) -> tuple[int, ...]:
    """One space group per class: for each class hit by `space_groups` (default all 230), its smallest
    member among them. Useful for turning any label list into a kinematically distinguishable one."""
    chosen: dict[int, int] = {}
    pool = range(1, N_SPACE_GROUPS + 1) if space_groups is None else space_groups
    for sg in sorted({_check_group(s) for s in pool}):
        chosen.setdefault(diffraction_class(sg), sg)
    return tuple(chosen[c] for c in sorted(chosen))


def wilson_table(space_groups: Iterable[int], crystals: int = 60, seed: int = 0) -> list[dict]:
    """Per space group: Wilson's <|E²-1|> (`scattering.wilson_statistic`) over `crystals` random crystals
    of the generator (mean, standard deviation) and their median atom count. What the kinematic
    intensities of one diffraction class's groups still tell apart."""
    from stemdl.workloads.spacegroup.synth import scattering
    from stemdl.workloads.spacegroup.synth.crystals import random_crystal

    rows = []
    for sg in space_groups:
        rng = np.random.default_rng([seed, _check_group(sg)])
        made = [random_crystal(sg, rng).structure for _ in range(crystals)]
        values = np.array([scattering.wilson_statistic(s) for s in made])
        rows.append({"space_group": int(sg), "class": diffraction_class(sg), "mean": float(values.mean()),
                     "sd": float(values.std()), "atoms": float(np.median([len(s.numbers) for s in made]))})
    return rows


def main(argv=None) -> int:
    """python -m stemdl.workloads.spacegroup.synth.diffclass [GROUPS] [--crystals N]: Wilson's statistic
    of the generator's crystals per group (default: the pairs preset's six groups)."""
    import argparse
    import sys

    from stemdl.workloads.spacegroup.synth import scattering

    parser = argparse.ArgumentParser(prog="python -m stemdl.workloads.spacegroup.synth.diffclass",
                                     description="Wilson's <|E^2-1|> of the generator's random crystals per "
                                                 "space group, with each group's diffraction class")
    parser.add_argument("groups", nargs="?", default="1,2,33,62,216,225", help="comma list (default: %(default)s)")
    parser.add_argument("--crystals", type=int, default=60, help="crystals a group (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        groups = [int(g) for g in args.groups.split(",")]
        if args.crystals < 1:
            raise StemdlError(f"--crystals {args.crystals}: at least 1")
        print(f"Wilson's <|E^2-1|>: {scattering.WILSON_ACENTRIC} acentric, {scattering.WILSON_CENTRIC} centric "
              f"(random atoms); {args.crystals} crystals a group")
        print("| space group | diffraction class | <abs(E^2-1)> mean | sd | median atoms |\n|---|---|---|---|---|")
        for row in wilson_table(groups, args.crystals, args.seed):
            print(f"| {row['space_group']} | {row['class']} | {row['mean']:.3f} | {row['sd']:.3f} | {row['atoms']:.0f} |",
                  flush=True)
    except ValueError:
        print(f"diffclass: error: {args.groups!r}: expected a comma list of space group numbers", file=sys.stderr)
        return 2
    except StemdlError as exc:
        print(f"diffclass: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
