"""Input pipelines behind one contract, chosen by name from PIPELINES.

    pipe = build_pipeline("torch", train, dev, cfg, env)   # splits from stemdl.workloads.spacegroup.data.source / data.shards
    for x, y, t in pipe.train_batches(epoch): ...          # x (B, 3, S, S), y int64 class index, t (B, 6)
    for x, y, t, mask in pipe.eval_batches(): ...          # mask False on padding
    x = normalize(x) unless pipe.normalized                # DALI normalizes on its device already

Every pipeline takes its samples in the harness's order: each epoch's training positions come from
`stemdl.workloads.spacegroup.samplers.epoch_indices` (by default `stemdl.harness.sharding.train_shard`: one seeded permutation per
epoch, equal shards of whole batches per rank) and the validation split is cut by `shard.eval_shard` so
that every sample is counted once. The same seed, epoch and world size give the same samples in the same
order in every pipeline (tested), and the same values: uint8 (raw data, uint8 shards) or float16 (float16
shards) in 0..255, or, from `dali`, those values normalized to float32.

- `memory`: everything is read once, during init (outside the clock); epochs then index tensors in memory.
  For sets that fit in memory (the synthetic default: 2,400 samples are 30 MB at 64x64).
- `torch`: torch tensors read during the epoch, one `split.read` per batch. From raw HDF5 (per-sample reads,
  log scaling, resizing: CPU work) a DataLoader's `loader_workers` worker processes do it. From shards a
  read is a memory copy from memory-mapped files (about 0.1 ms a batch of 64 at 64x64), so it runs in the
  training process: handing a batch over from a worker process cost about 1.5 ms on the project's machine,
  15 times the read itself (docs/performance.md), and `loader_workers` does not apply.
- `dali`: NVIDIA DALI (stemdl.harness.dali): images fed in the harness's order by an external source,
  cast and normalized on the GPU. With no GPU (`device_id=None`, how CI tests it) DALI hands the stored
  values on and the step normalizes them, as for the torch pipelines: on a CPU both run on the same
  device, and DALI's float32 output would be 4 bytes a pixel to copy instead of 1.
"""

from __future__ import annotations

import numpy as np
import torch

from dataclasses import dataclass

from stemdl.workloads.spacegroup import samplers
from stemdl.harness import sharding as shard
from stemdl.harness.errors import StemdlError

NUM_CLASSES = 230


@dataclass(frozen=True)
class NodeScope:
    """`shard_scope: node`: the training positions this node owns, and how many of them every node uses
    per epoch (the smallest node's count)."""

    rows: np.ndarray
    common: int


class BatchReads(torch.utils.data.Dataset):
    """Item k is batch k of `order`: (x, y, t) read from `split` in one call."""

    def __init__(self, split, order: np.ndarray, batch_size: int):
        self.split, self.order, self.batch_size = split, np.asarray(order, dtype=np.int64), batch_size

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __getitem__(self, k: int):
        rows = self.order[k * self.batch_size:(k + 1) * self.batch_size]
        return (torch.from_numpy(np.ascontiguousarray(self.split.read(rows))),
                torch.from_numpy(self.split.labels[rows]), torch.from_numpy(self.split.targets[rows]))


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
    """What every pipeline shares: the splits, the shards and the batch arithmetic."""

    name = ""
    normalized = False  # True: x is already normalized float32 (stemdl.workloads.spacegroup.preprocess.normalize)

    def __init__(self, train, evaluation, cfg, env, scope: NodeScope | None = None):
        self.cfg, self.env, self.scope = cfg, env, scope
        self.train, self.eval = train, evaluation
        # global: all samples over all ranks; node scope: the node's common count over the node's ranks
        available, ranks = (len(train), env.world_size) if scope is None else (scope.common, env.local_world_size)
        if available < ranks * cfg.batch_size:
            raise StemdlError(f"{cfg.data}: {available} training samples{' per node' if scope else ''} cannot "
                              f"fill one batch of {cfg.batch_size} on each of {ranks} ranks")
        self.steps_per_epoch = shard.shard_size(available, ranks, cfg.batch_size) // cfg.batch_size
        if len(self.eval) == 0:
            raise StemdlError(f"{cfg.data}: the {cfg.eval_split} split has no samples to evaluate on")
        self.eval_indices, self.eval_mask = shard.eval_shard(len(self.eval), env.rank, env.world_size,
                                                             cfg.batch_size)

    @property
    def train_samples(self) -> int:
        """Samples trained on per epoch, over all ranks (the remainder of the permutation is dropped)."""
        return self.steps_per_epoch * self.cfg.batch_size * self.env.world_size

    @property
    def eval_samples(self) -> int:
        return len(self.eval)

    def train_shard(self, epoch: int) -> np.ndarray:
        if self.scope is not None:
            env = self.env
            mine = shard.node_train_shard(len(self.scope.rows), self.scope.common, self.cfg.seed, epoch,
                                          env.node_rank, env.local_rank, env.local_world_size, self.cfg.batch_size)
            return self.scope.rows[mine]
        return samplers.epoch_indices(self.cfg.sampler, self.train.labels, self.cfg.seed, epoch, self.env.rank,
                                      self.env.world_size, self.cfg.batch_size)

    def _eval_chunks(self, x, y, t):
        mask = torch.from_numpy(self.eval_mask)
        for start in range(0, len(mask), self.cfg.batch_size):
            end = start + self.cfg.batch_size
            yield x[start:end], y[start:end], t[start:end], mask[start:end]


class MemoryPipeline(_Pipeline):
    name = "memory"

    def __init__(self, train, evaluation, cfg, env, scope: NodeScope | None = None):
        super().__init__(train, evaluation, cfg, env, scope)
        rows = np.arange(len(self.train)) if scope is None else scope.rows  # a node keeps only its own
        self.slot = np.full(len(self.train), -1, dtype=np.int64)
        self.slot[rows] = np.arange(len(rows))
        self.train_xyt = self._read_all(self.train, rows)
        self.eval_xyt = self._read_all(self.eval, self.eval_indices)

    def _read_all(self, split, order):
        parts = list(_loader(split, order, 64, self.cfg.loader_workers))
        return tuple(torch.cat([p[k] for p in parts]) for k in range(3))

    def train_batches(self, epoch: int):
        rows = torch.from_numpy(self.slot[self.train_shard(epoch)])
        for start in range(0, len(rows), self.cfg.batch_size):
            take = rows[start:start + self.cfg.batch_size]
            yield tuple(part[take] for part in self.train_xyt)

    def eval_batches(self):
        yield from self._eval_chunks(*self.eval_xyt)


class TorchPipeline(_Pipeline):
    name = "torch"

    def train_batches(self, epoch: int):
        yield from _loader(self.train, self.train_shard(epoch), self.cfg.batch_size, self.cfg.loader_workers)

    def eval_batches(self):
        mask = torch.from_numpy(self.eval_mask)
        loader = _loader(self.eval, self.eval_indices, self.cfg.batch_size, self.cfg.loader_workers)
        for k, (x, y, t) in enumerate(loader):
            yield x, y, t, mask[k * self.cfg.batch_size:(k + 1) * self.cfg.batch_size]


class DaliPipeline(_Pipeline):
    name = "dali"

    def __init__(self, train, evaluation, cfg, env, scope: NodeScope | None = None):
        super().__init__(train, evaluation, cfg, env, scope)
        from stemdl.harness.dali import DaliBatches

        device_id = int(env.device.split(":")[1]) if env.device.startswith("cuda") else None
        threads = max(1, cfg.loader_workers)
        self._train = DaliBatches(train, cfg.batch_size, device_id, num_threads=threads, seed=cfg.seed)
        self._eval = DaliBatches(evaluation, cfg.batch_size, device_id, num_threads=threads, seed=cfg.seed)
        self.normalized = self._train.normalized
        self.read_ahead = self._train.read_ahead  # batches read before an epoch's first is handed over

    def train_batches(self, epoch: int):
        yield from self._train.epoch(self.train_shard(epoch))

    def eval_batches(self):
        yield from self._eval.epoch(self.eval_indices, self.eval_mask)


PIPELINES = {cls.name: cls for cls in (MemoryPipeline, TorchPipeline, DaliPipeline)}


def build_pipeline(name: str, train, evaluation, cfg, env, scope: NodeScope | None = None):
    if name not in PIPELINES:
        raise StemdlError(f"config key 'pipeline': {name!r} is not one of {', '.join(PIPELINES)}")
    return PIPELINES[name](train, evaluation, cfg, env, scope)
