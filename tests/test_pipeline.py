"""The pipelines behind the factory give the same batches for the same seed and epoch, from raw HDF5 and from
converted shards; DALI's CPU ops give the torch path's values."""

import multiprocessing
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from stemdl.harness import config
from stemdl.harness.data import Prepared
from stemdl.workloads.spacegroup.data.index import load_or_build
from stemdl.harness.shards import ShardSet
from stemdl.workloads.spacegroup.data.source import raw_splits
from stemdl.harness.errors import StemdlError
from stemdl.harness.pipelines import PIPELINES, Feed, build_pipeline, reads_in_process
from stemdl.workloads.spacegroup.preprocess import normalize
from stemdl.workloads.spacegroup.synth import generate
from stemdl.workloads.spacegroup.workload import WORKLOAD


def load_config(name, overrides=None):
    return config.load_config(WORKLOAD, name, overrides)


@dataclass(frozen=True)
class Env:
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "tiny"
    generate.generate(out, generate.preset_config("tiny", seed=3), quiet=True)
    return out


@pytest.fixture(scope="module")
def index(tiny):
    return load_or_build(tiny, workers=1, quiet=True)


@pytest.fixture(scope="module")
def shards(tiny, tmp_path_factory):
    from stemdl.cli import main

    out = tmp_path_factory.mktemp("pipe") / "shards"
    assert main(["convert", str(tiny), str(out), "--size", "32", "--workers", "1", "--quiet"]) == 0
    return ShardSet.open(out)


def flat(batch) -> tuple:
    """(x, fields) or (x, fields, mask) as (x, *fields[, mask]), each tensor copied."""
    return tuple(part.clone() for part in (batch[0], *batch[1], *batch[2:]))


def batches(pipe, epoch):
    return [flat(b) for b in pipe.train_batches(epoch)], [flat(b) for b in pipe.eval_batches()]


def assert_same(a, b, normalized_b=False):
    """Same samples in the same order: equal labels, targets and masks; equal images (b maybe normalized)."""
    assert len(a) == len(b)
    for left, right in zip(a, b):
        x = normalize(left[0]) if normalized_b else left[0]
        assert x.shape == right[0].shape
        if normalized_b:
            torch.testing.assert_close(x, right[0], atol=1e-5, rtol=0)
        else:
            assert torch.equal(x, right[0])
        for k in range(1, len(left)):
            assert torch.equal(left[k], right[k])


def test_memory_torch_and_dali_give_the_same_batches_from_raw_data(index):
    pytest.importorskip("nvidia.dali")
    cfg = load_config("smoke", {"batch_size": 2})
    train, dev = raw_splits(index, cfg)
    memory, torch_pipe, dali = (build_pipeline(name, train, dev, cfg, Env()) for name in ("memory", "torch", "dali"))
    assert not dali.normalized and not memory.normalized, "on the CPU every pipeline leaves normalizing to the step"
    for epoch in (1, 2):
        a_train, a_eval = batches(memory, epoch)
        assert len(a_train) == memory.steps_per_epoch == 4
        assert a_train[0][0].dtype == torch.uint8 and a_train[0][0].shape == (2, 3, cfg.workload.image_size, cfg.workload.image_size)
        assert a_train[0][2].shape == (2, 6), "lattice targets travel with every batch"
        for other in (torch_pipe, dali):
            b_train, b_eval = batches(other, epoch)
            assert_same(a_train, b_train, other.normalized)
            assert_same(a_eval, b_eval, other.normalized)
    assert [b[1][0].tolist() for b in memory.train_batches(1)] != [b[1][0].tolist() for b in memory.train_batches(2)]


def test_uint8_shards_hold_exactly_what_the_raw_pipeline_computes(index, shards):
    cfg = load_config("smoke", {"batch_size": 2})
    raw = build_pipeline("memory", *raw_splits(index, cfg), cfg, Env())
    converted = build_pipeline("torch", shards.split("train"), shards.split("dev"), cfg, Env())
    for epoch in (1, 3):
        a_train, a_eval = batches(raw, epoch)
        b_train, b_eval = batches(converted, epoch)
        assert_same(a_train, b_train)
        assert_same(a_eval, b_eval)


def test_shards_are_read_in_the_training_process_and_raw_data_by_workers(index, shards):
    """A shard batch is a memory copy: no DataLoader (whose worker hand-over costs 15x the read) for shards."""
    cfg = load_config("smoke", {"batch_size": 2, "loader_workers": 2})
    train = shards.split("train")
    assert reads_in_process(train) and not reads_in_process(raw_splits(index, cfg)[0])
    pipe = build_pipeline("torch", train, shards.split("dev"), cfg, Env())
    first = next(pipe.train_batches(1))
    assert not multiprocessing.active_children(), "no worker process was started for shards"
    assert first[0].dtype == torch.uint8 and first[0].shape == (2, 3, cfg.workload.image_size, cfg.workload.image_size)


def test_dali_on_shards_equals_the_torch_path(shards):
    pytest.importorskip("nvidia.dali")
    cfg = load_config("smoke", {"batch_size": 2})
    splits = shards.split("train"), shards.split("dev")
    torch_pipe, dali = (build_pipeline(name, *splits, cfg, Env()) for name in ("torch", "dali"))
    for epoch in (1, 2):
        a_train, a_eval = batches(torch_pipe, epoch)
        b_train, b_eval = batches(dali, epoch)
        assert_same(a_train, b_train, dali.normalized)
        assert_same(a_eval, b_eval, dali.normalized)


def test_ranks_split_the_validation_set_exactly_once(index):
    cfg = load_config("smoke", {"batch_size": 3})
    train, dev = raw_splits(index, cfg)
    seen = []
    for rank in range(2):
        pipe = build_pipeline("memory", train, dev, cfg, Env(rank, 2))
        for _, (y, _), mask in pipe.eval_batches():
            seen.extend(y[mask].tolist())
    assert sorted(seen) == sorted((index.label[index.select("dev")] - 1).tolist())


def test_class_aware_samplers_keep_the_epoch_length(index):
    cfg = load_config("smoke", {"batch_size": 2, "sampler": "balanced"})
    train, dev = raw_splits(index, cfg)
    feed = Feed(order=WORKLOAD.epoch_order(Prepared(train, dev), cfg, Env()))  # the workload draws its own
    pipe = build_pipeline("memory", train, dev, cfg, Env(), feed=feed)
    labels = np.concatenate([b[1][0].numpy() for b in pipe.train_batches(1)])
    assert len(labels) == pipe.steps_per_epoch * 2 == 8
    uniform = build_pipeline("memory", train, dev, cfg, Env())
    assert not np.array_equal(labels, np.concatenate([b[1][0].numpy() for b in uniform.train_batches(1)]))


def test_unknown_pipeline_and_too_little_data(index):
    assert set(PIPELINES) == {"memory", "torch", "dali"}
    cfg = load_config("smoke")
    with pytest.raises(StemdlError, match="pipeline"):
        build_pipeline("stream", *raw_splits(index, cfg), cfg, Env())
    cfg = load_config("smoke", {"batch_size": 8})
    with pytest.raises(StemdlError, match="cannot fill one batch"):
        build_pipeline("memory", *raw_splits(index, cfg), cfg, Env(0, 2))
