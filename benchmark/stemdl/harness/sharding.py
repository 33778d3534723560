"""Which samples each rank reads: one shuffled shard per epoch for training, padded blocks for evaluation.

    idx = train_shard(n_train, seed, epoch, env.rank, env.world_size, batch_size)   # this epoch's samples
    idx, mask = eval_shard(n_eval, env.rank, env.world_size, batch_size)            # mask False = padding

Pure functions of their arguments: every rank computes the same permutation on its own, so no rank waits
on another and nothing is communicated. Positions are into the split's sample list (e.g. the entries of
`DataIndex.select("train")`), not into the files. Ranks must run the same numpy version, since the
permutation of a given seed is only guaranteed within one.
"""

from __future__ import annotations

import numpy as np

from stemdl.harness.errors import StemdlError


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(n) (int64) determined by (seed, epoch) alone; a new order every epoch."""
    _check_non_negative(n=n, seed=seed, epoch=epoch)
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64, copy=False)


def shard_size(n: int, world_size: int, batch_size: int | None = None) -> int:
    """Samples per rank per training epoch: n // world_size, or with batch_size the largest multiple of
    it that every rank can fill, so all ranks run the same number of full batches."""
    _check_non_negative(n=n)
    _check_ranks(0, world_size)
    if batch_size is None:
        return n // world_size
    _check_batch(batch_size)
    return n // (world_size * batch_size) * batch_size


def train_shard(n: int, seed: int, epoch: int, rank: int, world_size: int,
                batch_size: int | None = None) -> np.ndarray:
    """This rank's training samples for `epoch`: block `rank` of the epoch's permutation, cut into
    world_size equal blocks of shard_size(). The few samples left over are skipped for this epoch only
    (they are other samples next epoch), so each sample is seen at most once per epoch over all ranks."""
    _check_non_negative(n=n, seed=seed, epoch=epoch)
    _check_ranks(rank, world_size)
    size = shard_size(n, world_size, batch_size)
    if size == 0:
        batch = f" full batches of {batch_size}" if batch_size is not None else " samples"
        raise StemdlError(f"{n} training samples give no{batch} to each of {world_size} ranks")
    return epoch_permutation(n, seed, epoch)[rank * size:(rank + 1) * size]


def node_train_shard(n_node: int, n_common: int, seed: int, epoch: int, node: int, local_rank: int,
                     local_world_size: int, batch_size: int) -> np.ndarray:
    """Node-scoped sharding (`shard_scope: node`): positions into this node's own samples (0..n_node-1).
    Each epoch the node permutes its samples (seeded by seed, epoch and node), keeps the first n_common
    (the smallest node's count, so every node runs the same number of steps) and its ranks take equal
    blocks of whole batches. A node never reads another node's samples, so it stages only its part."""
    _check_non_negative(n=n_node, seed=seed, epoch=epoch)
    _check_ranks(local_rank, local_world_size)
    if not 0 <= n_common <= n_node:
        raise StemdlError(f"node {node}: {n_common} common samples of {n_node}")
    size = shard_size(n_common, local_world_size, batch_size)
    if size == 0:
        raise StemdlError(f"{n_common} training samples per node give no full batches of {batch_size} to each "
                          f"of {local_world_size} ranks of a node")
    perm = np.random.default_rng([seed, epoch, 1, node]).permutation(n_node)[:n_common]
    return perm[local_rank * size:(local_rank + 1) * size].astype(np.int64, copy=False)


def eval_shard(n: int, rank: int, world_size: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, mask) of this rank's evaluation samples: a contiguous block (sizes differ by at most
    one over ranks; contiguous keeps reads within few files), padded by repeating its last sample to a
    length, equal on all ranks, that is a multiple of batch_size. mask is False on the padding, so each
    of the n samples counts exactly once over all ranks."""
    _check_non_negative(n=n)
    _check_ranks(rank, world_size)
    _check_batch(batch_size)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    count = base + (rank < extra)
    longest = base + (extra > 0)
    length = -(-longest // batch_size) * batch_size
    indices = np.empty(length, dtype=np.int64)
    indices[:count] = np.arange(start, start + count)
    # A rank with no sample of its own (n < world_size) repeats sample 0, which exists whenever length > 0.
    indices[count:] = start + count - 1 if count else 0
    mask = np.zeros(length, dtype=bool)
    mask[:count] = True
    return indices, mask


def _check_non_negative(**values: int) -> None:
    for name, value in values.items():
        if value < 0:
            raise StemdlError(f"{name} must be 0 or more, not {value}")


def _check_ranks(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise StemdlError(f"rank {rank} of world size {world_size} is not a rank")


def _check_batch(batch_size: int) -> None:
    if batch_size < 1:
        raise StemdlError(f"batch size must be 1 or more, not {batch_size}")
