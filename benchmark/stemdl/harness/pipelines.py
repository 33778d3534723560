"""Input pipelines behind one contract, chosen by name from PIPELINES.

    pipe = build_pipeline("torch", train, dev, cfg, env)   # splits: the workload's, or stemdl.harness.shards'
    for x, fields in pipe.train_batches(epoch): ...        # x (B, ...) the input; fields: per-sample tensors
    for x, fields, mask in pipe.eval_batches(): ...        # mask False on padding

A split is what a workload's data gives the harness: `len(split)`, `split.read(indices) -> array` (the
input of those samples, in the order asked for), `split.fields` (an ordered {name: array} of per-sample
values handed on with every batch, e.g. labels and targets), `split.dtype`, `split.image_shape` and
`split.name_of(i)`. A split whose read is a memory copy (shards) says so with `reads_are_copies`.

Every pipeline takes its samples in the harness's order: each epoch's training positions come from
`order(epoch)` (by default `stemdl.harness.sharding.train_shard`: one seeded permutation per epoch, equal
shards of whole batches per rank; a workload may draw its own) and the validation split is cut by
`sharding.eval_shard` so that every sample is counted once. The same seed, epoch and world size give the
same samples in the same order in every pipeline (tested), and the same values.

- `memory`: everything is read once, during init (outside the clock); epochs then index tensors in memory.
- `torch`: one `split.read` per batch during the epoch. Raw files (per-sample reads and preprocessing) are
  read by a DataLoader's `loader_workers` processes; shards in the training process, since handing a batch
  over from a worker costs more than the copy itself (docs/performance.md).
- `dali`: NVIDIA DALI (stemdl.harness.dali): the input fed in the harness's order by an external source,
  cast and normalized on the GPU; on the CPU it hands the stored values on and the step normalizes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from stemdl.harness import sharding
from stemdl.harness.data import NodeScope
from stemdl.harness.errors import StemdlError


@dataclass(frozen=True)
class Feed:
    """How the run wants its batches: the order of the training samples and DALI's normalization."""

    order: Callable[[int], np.ndarray] | None = None  # epoch -> this rank's positions; None: train_shard
    normalization: tuple[float, float] | None = None  # (mean, std) of x / 255 for DALI on a GPU; None: none


class BatchReads(torch.utils.data.Dataset):
    """Item k is batch k of `order`: (x, fields) read from `split` in one call."""

    def __init__(self, split, order: np.ndarray, batch_size: int):
        self.split, self.order, self.batch_size = split, np.asarray(order, dtype=np.int64), batch_size

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __getitem__(self, k: int):
        rows = self.order[k * self.batch_size:(k + 1) * self.batch_size]
        return (torch.from_numpy(np.ascontiguousarray(self.split.read(rows))),
                tuple(torch.from_numpy(values[rows]) for values in self.split.fields.values()))


def reads_in_process(split) -> bool:
    """True for splits whose read is a memory copy (shards): worker processes would cost more than they save."""
    return bool(getattr(split, "reads_are_copies", False))


def _loader(split, order, batch_size: int, workers: int):
    """The batches of `order`: read in this process for shards, by a DataLoader with `workers` otherwise."""
    reads = BatchReads(split, order, batch_size)
    if reads_in_process(split):
        return (reads[k] for k in range(len(reads)))
    return torch.utils.data.DataLoader(reads, batch_size=None, shuffle=False, num_workers=workers,
                                       persistent_workers=False)


class _Pipeline:
    """What every pipeline shares: the splits, the order and the batch arithmetic."""

    name = ""
    normalized = False  # True: x is already normalized float32 (DALI on a GPU)

    def __init__(self, train, evaluation, cfg, env, scope: NodeScope | None = None, feed: Feed = Feed()):
        h = cfg.harness
        self.cfg, self.env, self.scope, self.feed, self.batch_size = cfg, env, scope, feed, h.batch_size
        self.train, self.eval = train, evaluation
        # global: all samples over all ranks; node scope: the node's common count over the node's ranks
        available, ranks = (len(train), env.world_size) if scope is None else (scope.common, env.local_world_size)
        if available < ranks * h.batch_size:
            raise StemdlError(f"{h.data}: {available} training samples{' per node' if scope else ''} cannot "
                              f"fill one batch of {h.batch_size} on each of {ranks} ranks")
        self.steps_per_epoch = sharding.shard_size(available, ranks, h.batch_size) // h.batch_size
        if len(self.eval) == 0:
            raise StemdlError(f"{h.data}: the {h.eval_split} split has no samples to evaluate on")
        self.eval_indices, self.eval_mask = sharding.eval_shard(len(self.eval), env.rank, env.world_size,
                                                                h.batch_size)

    @property
    def train_samples(self) -> int:
        """Samples trained on per epoch, over all ranks (the remainder of the permutation is dropped)."""
        return self.steps_per_epoch * self.batch_size * self.env.world_size

    @property
    def eval_samples(self) -> int:
        return len(self.eval)

    def train_shard(self, epoch: int) -> np.ndarray:
        env, seed = self.env, self.cfg.harness.seed
        if self.scope is not None:
            mine = sharding.node_train_shard(len(self.scope.rows), self.scope.common, seed, epoch, env.node_rank,
                                             env.local_rank, env.local_world_size, self.batch_size)
            return self.scope.rows[mine]
        if self.feed.order is not None:
            return self.feed.order(epoch)
        return sharding.train_shard(len(self.train), seed, epoch, env.rank, env.world_size, self.batch_size)

    def _eval_chunks(self, x, fields):
        mask = torch.from_numpy(self.eval_mask)
        for start in range(0, len(mask), self.batch_size):
            end = start + self.batch_size
            yield x[start:end], tuple(f[start:end] for f in fields), mask[start:end]


class MemoryPipeline(_Pipeline):
    name = "memory"

    def __init__(self, train, evaluation, cfg, env, scope: NodeScope | None = None, feed: Feed = Feed()):
        super().__init__(train, evaluation, cfg, env, scope, feed)
        rows = np.arange(len(self.train)) if scope is None else scope.rows  # a node keeps only its own
        self.slot = np.full(len(self.train), -1, dtype=np.int64)
        self.slot[rows] = np.arange(len(rows))
        self.train_data = self._read_all(self.train, rows)
        self.eval_data = self._read_all(self.eval, self.eval_indices)

    def _read_all(self, split, order):
        parts = list(_loader(split, order, 64, self.cfg.harness.loader_workers))
        x = torch.cat([p[0] for p in parts])
        return x, tuple(torch.cat([p[1][k] for p in parts]) for k in range(len(split.fields)))

    def train_batches(self, epoch: int):
        rows = torch.from_numpy(self.slot[self.train_shard(epoch)])
        x, fields = self.train_data
        for start in range(0, len(rows), self.batch_size):
            take = rows[start:start + self.batch_size]
            yield x[take], tuple(f[take] for f in fields)

    def eval_batches(self):
        yield from self._eval_chunks(*self.eval_data)


class TorchPipeline(_Pipeline):
    name = "torch"

    def train_batches(self, epoch: int):
        yield from _loader(self.train, self.train_shard(epoch), self.batch_size, self.cfg.harness.loader_workers)

    def eval_batches(self):
        mask = torch.from_numpy(self.eval_mask)
        loader = _loader(self.eval, self.eval_indices, self.batch_size, self.cfg.harness.loader_workers)
        for k, (x, fields) in enumerate(loader):
            yield x, fields, mask[k * self.batch_size:(k + 1) * self.batch_size]


class DaliPipeline(_Pipeline):
    name = "dali"

    def __init__(self, train, evaluation, cfg, env, scope: NodeScope | None = None, feed: Feed = Feed()):
        super().__init__(train, evaluation, cfg, env, scope, feed)
        from stemdl.harness.dali import DaliBatches

        device_id = int(env.device.split(":")[1]) if env.device.startswith("cuda") else None
        threads, seed = max(1, cfg.harness.loader_workers), cfg.harness.seed
        self._train = DaliBatches(train, self.batch_size, device_id, num_threads=threads, seed=seed,
                                  normalization=feed.normalization)
        self._eval = DaliBatches(evaluation, self.batch_size, device_id, num_threads=threads, seed=seed,
                                 normalization=feed.normalization)
        self.normalized = self._train.normalized
        self.read_ahead = self._train.read_ahead  # batches read before an epoch's first is handed over

    def train_batches(self, epoch: int):
        yield from self._train.epoch(self.train_shard(epoch))

    def eval_batches(self):
        yield from self._eval.epoch(self.eval_indices, self.eval_mask)


PIPELINES = {cls.name: cls for cls in (MemoryPipeline, TorchPipeline, DaliPipeline)}


def build_pipeline(name: str, train, evaluation, cfg, env, scope: NodeScope | None = None, feed: Feed = Feed()):
    if name not in PIPELINES:
        raise StemdlError(f"config key 'pipeline': {name!r} is not one of {', '.join(PIPELINES)}")
    return PIPELINES[name](train, evaluation, cfg, env, scope, feed)
