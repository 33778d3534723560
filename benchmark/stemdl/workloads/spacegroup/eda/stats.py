"""The numbers of the EDA report that need no image: crystal systems, class imbalance, attributes, the draw.

    crystal_system(225)                               # 'cubic'
    system_codes(index.label)                         # int8 index into CRYSTAL_SYSTEMS, per entry
    imbalance(index.class_counts("train"))            # Imbalance(samples=..., max_min_ratio=..., ...)
    draw(codes, 2000, seed=0, how="stratified")       # sorted entry numbers for the pattern pass
    describe(values)                                  # n, mean, std, min, quartiles, max

The effective number of classes is exp(H), H the Shannon entropy (natural log) of the class distribution:
the number of equally frequent classes that would be as unpredictable. It equals the number of classes when
they are balanced and approaches 1 when one class dominates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from stemdl.workloads.spacegroup.data.layout import CRYSTAL_SYSTEMS, SYSTEM_LAST_GROUP
from stemdl.harness.errors import StemdlError

_LAST_GROUP = np.array(SYSTEM_LAST_GROUP)
DRAWS = ("stratified", "uniform")
TOP = 10  # the "share of the top-10 classes" of the issue


def system_codes(space_groups) -> np.ndarray:
    """The crystal system of each space group (1..230) as an index into CRYSTAL_SYSTEMS (int8)."""
    sg = np.asarray(space_groups)
    if sg.size and (sg.min() < 1 or sg.max() > _LAST_GROUP[-1]):
        raise ValueError(f"space groups must be 1..230, got {sg.min()}..{sg.max()}")
    return np.searchsorted(_LAST_GROUP, sg).astype(np.int8)


def crystal_system(space_group: int) -> str:
    return CRYSTAL_SYSTEMS[int(system_codes([space_group])[0])]


@dataclass(frozen=True)
class Imbalance:
    """How unequal the classes of one set are; counts of absent classes are ignored."""

    samples: int
    classes: int  # classes with at least one sample
    largest: int
    smallest: int
    max_min_ratio: float  # largest / smallest class
    top10_share: float  # fraction of the samples in the TOP largest classes
    entropy_nats: float
    effective_classes: float  # exp(entropy): see the module docstring


def imbalance(counts) -> Imbalance:
    """The imbalance figures of a samples-per-class vector (zeros allowed); an empty set gives zeros."""
    c = np.asarray(counts, dtype=np.int64)
    c = np.sort(c[c > 0])[::-1]
    if c.size == 0:
        return Imbalance(0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0)
    p = c / c.sum()
    entropy = float(-(p * np.log(p)).sum())
    return Imbalance(samples=int(c.sum()), classes=int(c.size), largest=int(c[0]), smallest=int(c[-1]),
                     max_min_ratio=float(c[0] / c[-1]), top10_share=float(c[:TOP].sum() / c.sum()),
                     entropy_nats=entropy, effective_classes=math.exp(entropy))


def describe(values) -> dict:
    """Summary statistics of a 1-D sample (NaN-free); an empty one gives {'n': 0}."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"n": 0}
    q = np.percentile(v, [0, 25, 50, 75, 100])
    return {"n": int(v.size), "mean": float(v.mean()), "std": float(v.std()), "min": float(q[0]),
            "q25": float(q[1]), "median": float(q[2]), "q75": float(q[3]), "max": float(q[4])}


def fair_shares(sizes, n: int) -> np.ndarray:
    """n split as evenly as possible over groups of the given sizes, none taking more than it has.

    The share a small group cannot fill goes to the others, so the result sums to min(n, sum(sizes)).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    quota = np.zeros_like(sizes)
    left = min(int(n), int(sizes.sum()))
    while left > 0:
        open_groups = np.flatnonzero(quota < sizes)
        share = max(left // len(open_groups), 1)  # below one each, the first groups take one each
        for i in open_groups:
            take = min(share, int(sizes[i] - quota[i]), left)
            quota[i] += take
            left -= take
            if left == 0:
                break
    return quota


def draw(codes: np.ndarray, n: int, seed: int, how: str = "stratified") -> np.ndarray:
    """Sorted entry numbers of at most n samples, drawn reproducibly from `seed`.

    `uniform`: a uniform draw over all samples (rare crystal systems may get none). `stratified`: an
    equal share per crystal system present (see `fair_shares`), uniform within each, so that the mean
    pattern of a rare system rests on as many samples as that of a common one.
    """
    if how not in DRAWS:
        raise StemdlError(f"--draw {how!r}: choose {' or '.join(DRAWS)}")
    codes = np.asarray(codes)
    if n >= len(codes):
        return np.arange(len(codes))
    rng = np.random.default_rng(seed)
    if how == "uniform":
        return np.sort(rng.choice(len(codes), size=n, replace=False))
    members = [np.flatnonzero(codes == s) for s in range(len(CRYSTAL_SYSTEMS))]
    quota = fair_shares([len(m) for m in members], n)
    picks = [rng.choice(m, size=q, replace=False) for m, q in zip(members, quota) if q]
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64)
