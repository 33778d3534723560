"""Which three zone axes [uvw] a material is imaged along.

The public data show each material along three zone axes. We take the n shortest *inequivalent* lattice
directions: short real-space directions [uvw] are the low-index zones an experimenter would tilt to (their
reciprocal planes are dense in reflections), and skipping directions related by the crystal's own
rotations avoids imaging the same pattern twice (in a cubic crystal [100], [010] and [001] give the same
pattern up to rotation). A direction and its opposite are also treated as one, since kinematic patterns
along [uvw] and [-u-v-w] are mirror images (Friedel's law).

Everything is in the basis of the structure's cell: directions are integer triples of lattice vectors,
rotations are spglib's integer matrices acting on fractional coordinates (u -> W u).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from stemdl.workloads.spacegroup.data.layout import Structure
from stemdl.workloads.spacegroup.synth.crystals import symmetry_dataset
from stemdl.harness.errors import StemdlError

SYMPREC = 1e-3
# Lengths are compared after rounding, so that directions of equal length (up to floating point) tie
# and fall to the deterministic secondary key instead of to rounding noise.
LENGTH_DECIMALS = 6


def crystal_rotations(structure: Structure, symprec: float = SYMPREC) -> np.ndarray:
    """The distinct rotation parts (k, 3, 3) of the structure's space-group operations, from spglib."""
    dataset = symmetry_dataset(structure, symprec)
    if dataset is None:
        raise StemdlError("spglib found no symmetry for the structure (zone axes)")
    return _unique_rotations(dataset.rotations)


def _unique_rotations(rotations) -> np.ndarray:
    # Centring translations repeat every rotation; one copy of each is enough for directions.
    mats = np.asarray(rotations, dtype=np.int64).reshape(-1, 3, 3)
    return np.unique(mats, axis=0)


def _as_rotations(space_group_ops, structure: Structure) -> np.ndarray:
    """Rotations from `space_group_ops` (an array (k, 3, 3), a mapping or object with `rotations`, e.g.
    an spglib dataset) or, if None, from spglib on the structure."""
    if space_group_ops is None:
        return crystal_rotations(structure)
    if isinstance(space_group_ops, dict):
        return _unique_rotations(space_group_ops["rotations"])
    if hasattr(space_group_ops, "rotations"):
        return _unique_rotations(space_group_ops.rotations)
    return _unique_rotations(space_group_ops)


def equivalent_directions(uvw, rotations) -> np.ndarray:
    """All directions equivalent to `uvw` under `rotations` and reversal: the rows of {+-W u}, unique and
    sorted."""
    u = np.asarray(uvw, dtype=np.int64).reshape(3)
    images = np.einsum("kij,j->ki", np.asarray(rotations, dtype=np.int64).reshape(-1, 3, 3), u)
    return np.unique(np.concatenate([images, -images]), axis=0)


def _canonical_key(uvw: np.ndarray) -> tuple:
    # Fewest negative indices first, then lexicographic: <100>, <110>, <111> of a cubic crystal come out
    # as [001], [011], [111].
    return (int(np.sum(uvw < 0)), tuple(int(x) for x in uvw))


def canonical_direction(uvw, rotations, max_index: int | None = None) -> tuple[int, int, int]:
    """The representative of `uvw`'s equivalence class: first non-zero index positive, then fewest
    negative indices, then lexicographically smallest; among members with |indices| <= max_index if
    given (in hexagonal cells a rotation can turn [2-10] into [320], which would leave the box)."""
    members = [m for m in equivalent_directions(uvw, rotations) if m[np.flatnonzero(m)[0]] > 0
               and (max_index is None or np.max(np.abs(m)) <= max_index)]
    return min((tuple(int(x) for x in m) for m in members), key=lambda t: _canonical_key(np.array(t)))


@lru_cache(maxsize=8)
def candidate_directions(max_index: int) -> np.ndarray:
    """All primitive [uvw] (gcd 1) with |indices| <= max_index and first non-zero index positive."""
    r = range(-max_index, max_index + 1)
    out = [(u, v, w) for u in r for v in r for w in r
           if (u, v, w) != (0, 0, 0) and math.gcd(math.gcd(u, v), w) == 1
           and next(x for x in (u, v, w) if x != 0) > 0]
    result = np.array(out, dtype=np.int64)
    result.flags.writeable = False
    return result


def direction_length(uvw, lattice) -> float:
    """|u a + v b + w c| in angstrom (lattice rows a, b, c)."""
    return float(np.linalg.norm(np.asarray(uvw, dtype=np.float64) @ np.asarray(lattice, dtype=np.float64)))


def zone_axes(structure: Structure, space_group_ops=None, n: int = 3, max_index: int = 2) -> np.ndarray:
    """The `n` shortest mutually inequivalent zone axes [uvw] of `structure`, shape (n, 3), int.

    Candidates are primitive directions with |u|,|v|,|w| <= max_index. Two are equivalent if a rotation
    of the crystal (from `space_group_ops`, or spglib on the structure) or reversal maps one onto the
    other. Each class is represented by `canonical_direction`; classes are ordered by real-space length
    (rounded to LENGTH_DECIMALS), then by the canonical key, so the result is deterministic.
    """
    rotations = _as_rotations(space_group_ops, structure)
    classes: dict[tuple[int, int, int], float] = {}
    for uvw in candidate_directions(int(max_index)):
        rep = canonical_direction(uvw, rotations, max_index)
        if rep not in classes:
            classes[rep] = round(direction_length(rep, structure.lattice), LENGTH_DECIMALS)
    if len(classes) < n:
        raise StemdlError(f"only {len(classes)} inequivalent zone axes with |index| <= {max_index}, "
                          f"{n} requested")
    ordered = sorted(classes, key=lambda rep: (classes[rep], _canonical_key(np.array(rep))))
    return np.array(ordered[:n], dtype=np.int64)
