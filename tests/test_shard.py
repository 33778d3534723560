"""Sharding: disjoint equal training shards of one shared permutation; evaluation counts each sample once."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stemdl.harness.sharding import epoch_permutation, eval_shard, node_train_shard, shard_size, train_shard
from stemdl.harness.errors import StemdlError

sizes = st.integers(0, 5000)
worlds = st.integers(1, 64)
seeds = st.integers(0, 2**32 - 1)
epochs = st.integers(0, 1000)
batches = st.integers(1, 64)


@settings(max_examples=200, deadline=None)
@given(n=sizes, seed=seeds, epoch=epochs)
def test_permutation_is_a_permutation_fixed_by_seed_and_epoch(n, seed, epoch):
    perm = epoch_permutation(n, seed, epoch)
    assert perm.dtype == np.int64
    assert np.array_equal(np.sort(perm), np.arange(n))
    assert np.array_equal(perm, epoch_permutation(n, seed, epoch))  # what every other rank computes


def test_permutation_changes_with_epoch_and_seed():
    base = epoch_permutation(1000, 7, 0)
    assert not np.array_equal(base, epoch_permutation(1000, 7, 1))
    assert not np.array_equal(base, epoch_permutation(1000, 8, 0))


@settings(max_examples=200, deadline=None)
@given(n=sizes, world=worlds, seed=seeds, epoch=epochs, batch=st.none() | batches)
def test_train_shards_are_disjoint_equal_and_within_range(n, world, seed, epoch, batch):
    size = shard_size(n, world, batch)
    if size == 0:
        with pytest.raises(StemdlError, match=f"{n} training samples"):
            train_shard(n, seed, epoch, 0, world, batch)
        return
    shards = [train_shard(n, seed, epoch, rank, world, batch) for rank in range(world)]
    assert all(len(s) == size for s in shards)
    if batch is not None:
        assert size % batch == 0
    union = np.concatenate(shards)
    assert len(np.unique(union)) == len(union) == size * world  # each sample at most once per epoch
    assert union.min() >= 0 and union.max() < n
    assert n - len(union) < world * (batch or 1)  # only a remainder too small for another round is left
    assert np.array_equal(union, epoch_permutation(n, seed, epoch)[:len(union)])


def test_dropped_remainder_changes_every_epoch():
    # 10 samples on 3 ranks: one left out per epoch, not always the same one.
    left_out = {int(np.setdiff1d(np.arange(10), np.concatenate(
        [train_shard(10, 0, epoch, r, 3) for r in range(3)]))[0]) for epoch in range(30)}
    assert len(left_out) > 3


@settings(max_examples=300, deadline=None)
@given(n=sizes, world=worlds, batch=batches)
def test_eval_counts_every_sample_exactly_once(n, world, batch):
    parts = [eval_shard(n, rank, world, batch) for rank in range(world)]
    lengths = {len(idx) for idx, _ in parts}
    assert len(lengths) == 1 and lengths.pop() % batch == 0  # same number of batches on every rank
    counted = np.concatenate([idx[mask] for idx, mask in parts])
    assert np.array_equal(np.sort(counted), np.arange(n))  # the union is range(n), no duplicates
    for idx, mask in parts:
        assert idx.dtype == np.int64 and mask.dtype == bool and len(idx) == len(mask)
        assert np.all((idx >= 0) & (idx < n))  # padding repeats a real sample
        real = int(mask.sum())
        assert mask[:real].all() and not mask[real:].any()  # padding only at the end


def test_eval_blocks_are_contiguous_and_padded_at_the_end():
    idx, mask = eval_shard(10, 1, 3, 4)
    assert idx.tolist() == [4, 5, 6, 6] and mask.tolist() == [True, True, True, False]
    idx, mask = eval_shard(2, 2, 3, 4)  # more ranks than samples: all padding
    assert idx.tolist() == [0, 0, 0, 0] and not mask.any()
    idx, mask = eval_shard(0, 0, 2, 4)
    assert len(idx) == len(mask) == 0


@pytest.mark.parametrize("call, message", [
    (lambda: train_shard(10, 0, 0, 2, 2), "rank 2 of world size 2"),
    (lambda: train_shard(10, -1, 0, 0, 2), "seed must be 0 or more"),
    (lambda: train_shard(10, 0, 0, 0, 2, batch_size=0), "batch size must be 1 or more"),
    (lambda: train_shard(10, 0, 0, 0, 4, batch_size=4), "10 training samples give no full batches of 4"),
    (lambda: eval_shard(-1, 0, 1, 1), "n must be 0 or more"),
    (lambda: eval_shard(10, 0, 0, 1), "world size 0"),
])
def test_bad_arguments_raise_one_line(call, message):
    with pytest.raises(StemdlError, match=message):
        call()


@settings(max_examples=100, deadline=None)
@given(rounds=st.integers(1, 20), world=worlds, batch=batches, seed=seeds, epoch=epochs)
def test_every_sample_lands_in_exactly_one_shard_when_the_set_divides(rounds, world, batch, seed, epoch):
    n = rounds * world * batch
    union = np.concatenate([train_shard(n, seed, epoch, rank, world, batch) for rank in range(world)])
    assert np.array_equal(np.sort(union), np.arange(n))


def test_node_scope_keeps_each_node_in_its_own_samples_with_equal_steps():
    # two nodes of 2 ranks, owning 11 and 9 samples: every node uses 9 per epoch, rotating its own
    owned = {0: np.arange(0, 11), 1: np.arange(11, 20)}
    for epoch in (1, 2):
        seen = {}
        for node, rows in owned.items():
            for local in range(2):
                picked = rows[node_train_shard(len(rows), 9, 7, epoch, node, local, 2, 2)]
                assert len(picked) == 4 and set(picked) <= set(rows)
                seen[node, local] = picked
        everything = np.concatenate(list(seen.values()))
        assert len(set(everything.tolist())) == len(everything), "no sample twice in an epoch"
    first = node_train_shard(11, 9, 7, 1, 0, 0, 2, 2)
    assert not np.array_equal(first, node_train_shard(11, 9, 7, 2, 0, 0, 2, 2)), "a new order every epoch"
    assert not np.array_equal(first, node_train_shard(11, 9, 7, 1, 1, 0, 2, 2)), "each node its own order"
    with pytest.raises(StemdlError, match="per node give no full batches"):
        node_train_shard(3, 3, 0, 1, 0, 0, 2, 2)
