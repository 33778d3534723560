"""Which training samples each rank reads in an epoch, by name from SAMPLERS (config key `sampler`).

    idx = epoch_indices("sqrt", train_labels, seed, epoch, env.rank, env.world_size, batch_size)

    uniform   every sample once per epoch in a seeded random order: exactly `shard.train_shard`
    balanced  every class present equally likely, then a uniform sample within the class
    sqrt      class probability proportional to sqrt(class count), then uniform within the class

The contract is train_shard's: a pure function of its arguments, so every rank computes the same global
draw and keeps its own block, and nothing is communicated; every rank gets shard_size(n, world, batch)
positions, a whole number of batches, so an epoch has the same number of steps whatever the sampler and
budgets compare. balanced and sqrt draw with replacement (a rare class repeats within an epoch, a frequent
one is partly skipped) from their own random stream, seeded by (seed, epoch). Positions index `labels`,
i.e. the split's sample list, like train_shard's.
"""

from __future__ import annotations

import numpy as np

from stemdl.harness import sharding as shard
from stemdl.harness.errors import StemdlError

# Class probability is proportional to count ** power over the classes present. Power 1 is what uniform
# sampling gives on average; uniform draws it as a permutation instead (each sample once per epoch).
SAMPLERS = {"uniform": 1.0, "balanced": 0.0, "sqrt": 0.5}

# Third seed word of the drawn samplers' stream, so that it never repeats train_shard's [seed, epoch] one.
_STREAM = 0x5A3B1E


def class_probabilities(name: str, labels: np.ndarray) -> np.ndarray:
    """The probability of drawing each class (indexed by class, 0 where absent) under sampler `name`."""
    counts = np.bincount(_check_labels(labels)).astype(np.float64)
    if counts.sum() == 0:
        raise StemdlError("no training samples to draw from")
    weight = np.where(counts > 0, counts ** _power(name), 0.0)
    return weight / weight.sum()


def epoch_indices(name: str, labels: np.ndarray, seed: int, epoch: int, rank: int, world_size: int,
                  batch_size: int) -> np.ndarray:
    """This rank's positions (int64) into `labels` for `epoch`: shard_size(n, world_size, batch_size) of
    them, block `rank` of one draw that every rank computes alike."""
    power = _power(name)
    labels = _check_labels(labels)
    if name == "uniform":
        return shard.train_shard(len(labels), seed, epoch, rank, world_size, batch_size)
    if seed < 0 or epoch < 0:
        raise StemdlError(f"seed and epoch must be 0 or more, not {seed} and {epoch}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise StemdlError(f"rank {rank} of world size {world_size} is not a rank")
    size = shard.shard_size(len(labels), world_size, batch_size)
    if size == 0:
        raise StemdlError(f"{len(labels)} training samples give no full batches of {batch_size} to each of "
                          f"{world_size} ranks")
    drawn = _draw(labels, power, size * world_size, np.random.default_rng([seed, epoch, _STREAM]))
    return drawn[rank * size:(rank + 1) * size]


def _draw(labels: np.ndarray, power: float, total: int, rng: np.random.Generator) -> np.ndarray:
    """`total` positions: a class with probability ∝ count ** power, then a uniform member of it."""
    counts = np.bincount(labels)
    present = np.flatnonzero(counts)
    weight = counts[present].astype(np.float64) ** power
    classes = rng.choice(len(present), size=total, p=weight / weight.sum())
    # Members of each class are contiguous in the stable sort by label: start of the class + a uniform offset.
    by_class = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])[present]
    offsets = rng.integers(0, counts[present][classes])
    return by_class[starts[classes] + offsets].astype(np.int64, copy=False)


def _power(name: str) -> float:
    if name not in SAMPLERS:
        raise StemdlError(f"config key 'sampler': {name!r} is not one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise StemdlError("sampler labels must be a list of class indices (integers 0 or more)")
    return labels.astype(np.int64, copy=False)
