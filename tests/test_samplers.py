"""Samplers: uniform is train_shard; the class-balancing ones keep its contract (equal whole-batch shards,
one draw shared by the ranks, fixed by seed and epoch) and hit their class frequencies."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stemdl.harness.sharding import shard_size, train_shard
from stemdl.harness.errors import StemdlError
from stemdl.workloads.spacegroup.samplers import SAMPLERS, class_probabilities, epoch_indices

# A skewed label set in a shuffled order, with gaps: class 0 has 3000 samples, class 9 one.
SKEWED = np.random.default_rng(5).permutation(np.repeat([0, 2, 3, 7, 9], [3000, 300, 30, 3, 1]))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 400), world=st.integers(1, 8), batch=st.integers(1, 16), seed=st.integers(0, 2**32 - 1),
       epoch=st.integers(0, 100))
def test_uniform_is_train_shard(n, world, batch, seed, epoch):
    labels = np.arange(n) % 7
    if shard_size(n, world, batch) == 0:
        with pytest.raises(StemdlError, match="training samples"):
            epoch_indices("uniform", labels, seed, epoch, 0, world, batch)
        return
    for rank in range(world):
        assert np.array_equal(epoch_indices("uniform", labels, seed, epoch, rank, world, batch),
                              train_shard(n, seed, epoch, rank, world, batch))


@pytest.mark.parametrize("name", ["balanced", "sqrt"])
@pytest.mark.parametrize("world, batch", [(1, 8), (3, 5), (4, 32)])
def test_ranks_get_equal_whole_batches_of_one_shared_draw(name, world, batch):
    size = shard_size(len(SKEWED), world, batch)
    shards = [epoch_indices(name, SKEWED, 11, 3, rank, world, batch) for rank in range(world)]
    assert all(len(s) == size and s.dtype == np.int64 for s in shards) and size % batch == 0
    union = np.concatenate(shards)
    assert union.min() >= 0 and union.max() < len(SKEWED)
    # One rank with all the batches of every rank draws the same sequence: the global draw.
    assert np.array_equal(union, epoch_indices(name, SKEWED, 11, 3, 0, 1, world * batch))


@pytest.mark.parametrize("name", ["balanced", "sqrt"])
def test_the_draw_is_fixed_by_seed_and_epoch(name):
    draw = epoch_indices(name, SKEWED, 1, 2, 0, 2, 16)
    assert np.array_equal(draw, epoch_indices(name, SKEWED, 1, 2, 0, 2, 16))
    for other in (epoch_indices(name, SKEWED, 1, 3, 0, 2, 16), epoch_indices(name, SKEWED, 2, 2, 0, 2, 16)):
        assert not np.array_equal(draw, other)


@pytest.mark.parametrize("name, target", [
    ("balanced", [0.2] * 5),
    ("sqrt", np.sqrt([3000, 300, 30, 3, 1]) / np.sqrt([3000, 300, 30, 3, 1]).sum()),
    ("uniform", np.array([3000, 300, 30, 3, 1]) / 3334),
])
def test_class_frequencies_hit_their_targets(name, target):
    assert np.allclose(class_probabilities(name, SKEWED)[[0, 2, 3, 7, 9]], target)
    drawn = np.concatenate([epoch_indices(name, SKEWED, 0, epoch, rank, 2, 16)
                            for epoch in range(6) for rank in range(2)])
    freq = np.bincount(SKEWED[drawn], minlength=10)[[0, 2, 3, 7, 9]] / len(drawn)
    # About 20,000 draws: a binomial standard deviation is at most 0.0035; allow about 5 of them.
    assert np.allclose(freq, target, atol=0.018)


def test_members_of_a_class_are_drawn_uniformly():
    drawn = np.concatenate([epoch_indices("balanced", SKEWED, 4, epoch, 0, 1, 32) for epoch in range(6)])
    rare = np.flatnonzero(SKEWED == 7)  # 3 samples, about 4,000 draws
    hits = np.array([(drawn == i).sum() for i in rare])
    assert hits.sum() > 3000 and np.all(np.abs(hits / hits.sum() - 1 / 3) < 0.05)
    # ~4,000 uniform draws from the 3,000 of class 0 reach 3000 * (1 - exp(-4/3)) = 2,200 of them on average.
    frequent = drawn[SKEWED[drawn] == 0]
    assert abs(len(np.unique(frequent)) - 3000 * (1 - np.exp(-len(frequent) / 3000))) < 100


def test_the_drawn_stream_is_not_the_uniform_one():
    labels = np.zeros(64, dtype=np.int64)  # one class: balanced draws samples, with replacement
    assert not np.array_equal(epoch_indices("balanced", labels, 0, 1, 0, 1, 64), train_shard(64, 0, 1, 0, 1, 64))


def test_errors_name_the_sampler_or_the_shortfall():
    with pytest.raises(StemdlError, match=r"'sampler': 'inverse' is not one of uniform, balanced, sqrt"):
        epoch_indices("inverse", SKEWED, 0, 1, 0, 1, 8)
    assert set(SAMPLERS) == {"uniform", "balanced", "sqrt"}
    with pytest.raises(StemdlError, match="7 training samples give no full batches of 4 to each of 2 ranks"):
        epoch_indices("sqrt", np.arange(7), 0, 1, 0, 2, 4)
    with pytest.raises(StemdlError, match="rank 2 of world size 2"):
        epoch_indices("balanced", SKEWED, 0, 1, 2, 2, 4)
    with pytest.raises(StemdlError, match="class indices"):
        epoch_indices("balanced", np.array([0.5, 1.0]), 0, 1, 0, 1, 1)
