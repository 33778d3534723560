"""The DALI pipeline (on DALI's CPU ops) gives the torch path's batches, in the harness's order, every epoch."""

import sys

import numpy as np
import pytest
import torch

from stemdl.harness.dali import DaliBatches
from stemdl.harness.sharding import eval_shard, train_shard
from stemdl.harness.errors import DataError, StemdlError
from stemdl.workloads.spacegroup.preprocess import NORM_MEAN, NORM_STD, normalize

BATCH = 4


def _have_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


# Every test but the last needs DALI (an optional extra: pip install -e '.[dali]'); its CPU ops need no GPU.
needs_dali = pytest.mark.skipif(not _have_dali(), reason="nvidia.dali is not installed")


class ArraySplit:
    """A stand-in for a converted split (stemdl.harness.shards): images, labels and targets in memory."""

    def __init__(self, n: int, dtype=np.uint8, size: int = 16, seed: int = 0, bad: int | None = None,
                 into: bool = False):
        rng = np.random.default_rng(seed)
        shape = (n, 3, size, size)
        self.image_shape = shape[1:]
        self.reads_into = into  # read(indices, out=) as shards do: the source reuses its buffers
        self.images = (rng.random(shape) * 255 if dtype == np.float16 else rng.integers(0, 256, shape)).astype(dtype)
        self.labels = rng.integers(0, 230, n).astype(np.int64)
        self.targets = rng.normal(5.0, 2.0, (n, 6)).astype(np.float32)
        self.fields = {"labels": self.labels, "targets": self.targets}  # handed on with every batch
        self.dtype = self.images.dtype
        self.bad = bad  # a sample whose read fails, like a damaged shard
        self.reads = 0

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        self.reads += 1
        if self.bad is not None and self.bad in indices:
            raise DataError("train/00000.images.npy", "shorter than the manifest says", f"sample {self.bad}")
        if out is None:
            return self.images[indices]
        assert self.reads_into and out.shape == (len(indices), *self.image_shape)
        out[...] = self.images[indices]
        return out


def expected(split: ArraySplit, order: np.ndarray, normalized: bool):
    for k in range(0, len(order), BATCH):
        rows = order[k:k + BATCH]
        x = torch.from_numpy(split.read(rows))
        yield normalize(x) if normalized else x, torch.from_numpy(split.labels[rows]), torch.from_numpy(split.targets[rows])


def assert_batches(got: list, split: ArraySplit, order: np.ndarray, mask: np.ndarray | None = None,
                   normalized: bool = False) -> None:
    """`got` holds the images of `order` (normalized, or the stored values as they are), then the fields
    (labels, targets), then the mask when given."""
    assert len(got) == len(order) // BATCH
    for k, (batch, (x, y, t)) in enumerate(zip(got, expected(split, order, normalized), strict=True)):
        assert len(batch) == (2 if mask is None else 3) and len(batch[1]) == 2
        batch = (batch[0], *batch[1], *batch[2:])
        assert batch[0].dtype == x.dtype and batch[0].shape == x.shape
        if normalized:
            assert torch.allclose(batch[0], x, rtol=0, atol=1e-5)
        else:
            assert torch.equal(batch[0], x)
        assert batch[1].dtype == torch.int64 and torch.equal(batch[1], y)
        assert batch[2].dtype == torch.float32 and torch.equal(batch[2], t)
        if mask is not None:
            assert torch.equal(batch[3], torch.from_numpy(mask[k * BATCH:(k + 1) * BATCH]))


@needs_dali
@pytest.mark.parametrize("dtype", [np.uint8, np.float16])
@pytest.mark.parametrize("norm", [None, True], ids=["cpu-default", "gpu-normalize-on-cpu-ops"])
@pytest.mark.parametrize("group", [1, 2, None])  # 5 batches: 5 runs of 1, 3 runs the last of 1, 1 run of 5
@pytest.mark.parametrize("into", [False, True], ids=["arrays", "ring"])
def test_train_and_eval_batches_follow_the_harness_order(dtype, norm, group, into):
    split = ArraySplit(40, dtype, into=into)
    feed = DaliBatches(split, BATCH, device_id=None, num_threads=1, normalize=norm, group=group,
                       normalization=(NORM_MEAN, NORM_STD))
    assert feed.normalized is bool(norm), "on the CPU DALI hands on the stored values unless asked to normalize"
    order = train_shard(len(split), 5, 1, 1, 2, BATCH)  # rank 1 of 2: 20 samples, 5 batches
    got = list(feed.epoch(order))  # every batch held to the end: later batches must not overwrite them
    assert feed.group == (group or (4 << 20) // (BATCH * 3 * 16 * 16 * split.dtype.itemsize))
    assert split.reads == -(-5 // feed.group), "one read per DALI run, for all of its batches"
    assert_batches(got, split, order, normalized=feed.normalized)
    indices, mask = eval_shard(len(split) - 5, 1, 2, BATCH)  # 17 for rank 1, padded to 20
    assert not mask.all()
    assert_batches(list(feed.epoch(indices, mask)), split, indices, mask, normalized=feed.normalized)


@needs_dali
@pytest.mark.parametrize("into", [False, True], ids=["arrays", "ring"])
def test_the_source_arrays_stay_untouched_while_dali_holds_them(into):
    """no_copy: DALI reads the source's arrays in place, so a read must never reuse a buffer DALI still holds."""
    split = ArraySplit(64, into=into)
    reads = []
    original = split.read
    split.read = lambda rows, **out: reads.append(original(rows, **out)) or reads[-1]
    feed = DaliBatches(split, BATCH, device_id=None, prefetch=3, group=2)
    order = train_shard(len(split), 2, 1, 0, 1, BATCH)
    got = list(feed.epoch(order))
    assert len(reads) == len(got) // 2  # a read of 2 batches per DALI run
    assert len({r.ctypes.data for r in reads}) == (3 + 2 if into else len(reads)), "a ring of prefetch + 2"
    batch_bytes = reads[0].nbytes // 2
    read_ptrs = {r.ctypes.data + j * batch_bytes for r in reads for j in range(2)}
    assert not read_ptrs & {x.data_ptr() for x, _ in got}, "x is torch's own copy"
    assert_batches(got, split, order)


@needs_dali
def test_every_epoch_follows_its_own_order():
    split = ArraySplit(48)
    feed = DaliBatches(split, BATCH, device_id=None, prefetch=3)
    orders = [train_shard(len(split), 7, epoch, 0, 1, BATCH) for epoch in (1, 2, 3)]
    assert not np.array_equal(orders[0], orders[1])
    for order in orders:
        assert_batches(list(feed.epoch(order)), split, order)
    assert list(feed.epoch(np.empty(0, dtype=np.int64))) == []
    assert_batches(list(feed.epoch(orders[0][:8])), split, orders[0][:8])


@needs_dali
def test_an_abandoned_epoch_leaves_nothing_behind():
    split = ArraySplit(40)
    feed = DaliBatches(split, BATCH, device_id=None, prefetch=2, group=1)
    first, second = train_shard(40, 1, 1, 0, 1, BATCH), train_shard(40, 1, 2, 0, 1, BATCH)
    feed.epoch(first)  # never iterated
    assert split.reads == 0  # nothing is read before the first epoch is iterated
    stopped = feed.epoch(first)
    assert_batches([next(stopped), next(stopped)], split, first[:2 * BATCH])  # a signal stops the run here
    reads = split.reads
    batches = feed.epoch(second)
    assert split.reads - reads == 2  # the rest of the abandoned epoch is not read, just the new prefetch
    assert_batches(list(batches), split, second)
    with pytest.raises(RuntimeError, match="newer epoch"):
        next(stopped)
    early = feed.epoch(second)
    for _ in range(len(second) // BATCH):  # every batch taken, but not the end of the epoch
        next(early)
    assert_batches(list(feed.epoch(first)), split, first)


@needs_dali
def test_a_read_error_surfaces_as_is_and_the_next_epoch_works():
    split = ArraySplit(24, bad=13)
    feed = DaliBatches(split, BATCH, device_id=None, group=1)
    order = np.arange(24)
    with pytest.raises(DataError, match="00000.images.npy:sample 13: shorter"):
        list(feed.epoch(order))  # in the fourth batch, read ahead while the caller takes the first
    assert_batches(list(feed.epoch(order[:12])), split, order[:12])
    with pytest.raises(DataError, match="sample 13"):
        list(feed.epoch(order[12:]))  # in the first batch, read as soon as the epoch starts
    split.bad = None
    assert_batches(list(feed.epoch(order[::-1].copy())), split, order[::-1])


@needs_dali
def test_after_an_error_inside_dali_the_pipeline_is_rebuilt(monkeypatch):
    split = ArraySplit(24)
    feed = DaliBatches(split, BATCH, device_id=None, prefetch=2, group=1)
    read = split.read
    # float32 images break the contract: DALI's own check fails, and its pipeline is dead after that
    monkeypatch.setattr(split, "read", lambda rows: read(rows).astype(np.float32 if 9 in rows else np.uint8))
    with pytest.raises(RuntimeError, match="float"):
        list(feed.epoch(np.arange(24)))
    assert_batches(list(feed.epoch(np.arange(8))), split, np.arange(8))
    batches = feed.epoch(np.arange(24))
    next(batches)  # batch 3 (samples 8..11) is read ahead now; DALI fails on it only when its turn comes
    assert_batches(list(feed.epoch(np.arange(8))), split, np.arange(8))  # abandoned with that failure inside


@needs_dali
def test_user_errors_are_one_line():
    with pytest.raises(StemdlError, match="images are float32, need one of uint8, float16"):
        DaliBatches(ArraySplit(8, np.float32), BATCH, device_id=None)
    feed = DaliBatches(ArraySplit(8), BATCH, device_id=None)
    with pytest.raises(StemdlError, match="6 samples are not whole batches of 4"):
        feed.epoch(np.arange(6))
    with pytest.raises(StemdlError, match="mask of 4 for 8 samples"):
        feed.epoch(np.arange(8), np.ones(4, dtype=bool))


@needs_dali
def test_a_gpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(StemdlError, match="GPU 0 requested but 0 GPU"):
        DaliBatches(ArraySplit(8), BATCH, device_id=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(StemdlError, match="GPU 2 requested but 2 GPU"):
        DaliBatches(ArraySplit(8), BATCH, device_id=2)


def test_without_dali_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    with pytest.raises(StemdlError, match=r"needs NVIDIA DALI: pip install nvidia-dali-cuda130"):
        DaliBatches(ArraySplit(8), BATCH, device_id=None)
