"""Input pipelines behind one contract, chosen by name from PIPELINES.

    pipe = build_pipeline("memory", index, cfg, env)      # during init: reads and preprocesses
    for x, y in pipe.train_batches(epoch): ...            # x uint8 (B, 3, S, S), y int64 class index
    for x, y, mask in pipe.eval_batches(): ...            # mask False on padding

Both pipelines read the public HDF5 layout through the index, apply `stemdl.preprocess.Preprocess`
(log with a floor, scale, clip to 0..255, area-resize), round to uint8, and cut the data with
`stemdl.data.shard`: one seeded permutation per epoch, equal shards per rank; the validation split is
divided so that every sample is counted once. They differ only in when they read:

- `memory`: everything is read and preprocessed once, during init (outside the clock); epochs then
  index tensors in memory. For sets that fit in memory (the synthetic default: 2,400 samples are 30 MB
  at 64x64).
- `stream`: a torch DataLoader with worker processes reads each epoch's shard from HDF5.

Class indices are space group - 1, so every data set shares the same 230 outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stemdl.data import shard
from stemdl.data.reader import DataFile
from stemdl.errors import StemdlError
from stemdl.preprocess import Preprocess

NUM_CLASSES = 230


@dataclass(frozen=True)
class SplitData:
    """Where every sample of one split is, and its class index."""

    paths: tuple
    groups: tuple
    labels: np.ndarray  # int64 class index = space group - 1

    def __len__(self) -> int:
        return len(self.labels)


def split_data(index, split: str) -> SplitData:
    rows = index.select(split)
    return SplitData(tuple(str(index.file_path(i)) for i in rows), tuple(index.group_name(i) for i in rows),
                     index.label[rows].astype(np.int64) - 1)


class StackSource(torch.utils.data.Dataset):
    """Sample i of a split, read from HDF5 and preprocessed: (uint8 (3, S, S), class index)."""

    def __init__(self, data: SplitData, prep: Preprocess):
        self.data, self.prep = data, prep
        self._files: dict[str, DataFile] = {}  # per process (each DataLoader worker opens its own)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        path = self.data.paths[i]
        if path not in self._files:
            self._files[path] = DataFile(path)
        stack = torch.from_numpy(self._files[path].stack(self.data.groups[i]))
        image = self.prep(stack).round_().to(torch.uint8)
        return image, int(self.data.labels[i])


def _loader(source, indices, batch_size: int, workers: int):
    subset = torch.utils.data.Subset(source, [int(i) for i in indices])
    return torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       persistent_workers=False, drop_last=False)


class _Pipeline:
    """What both pipelines share: the sources, the shards and the batch arithmetic."""

    name = ""

    def __init__(self, index, cfg, env):
        self.cfg, self.env = cfg, env
        prep = Preprocess(size=cfg.image_size, floor=cfg.log_floor, ceiling=cfg.log_ceiling)
        self.train = StackSource(split_data(index, cfg.train_split), prep)
        self.eval = StackSource(split_data(index, cfg.eval_split), prep)
        if len(self.train) < env.world_size * cfg.batch_size:
            raise StemdlError(f"{cfg.data}: {len(self.train)} training samples cannot fill one batch of "
                              f"{cfg.batch_size} on each of {env.world_size} ranks")
        self.eval_indices, self.eval_mask = shard.eval_shard(len(self.eval), env.rank, env.world_size,
                                                             cfg.batch_size)

    @property
    def train_samples(self) -> int:
        """Samples trained on per epoch, over all ranks (the remainder of the permutation is dropped)."""
        return shard.shard_size(len(self.train), self.env.world_size, self.cfg.batch_size) * self.env.world_size

    @property
    def steps_per_epoch(self) -> int:
        return shard.shard_size(len(self.train), self.env.world_size, self.cfg.batch_size) // self.cfg.batch_size

    @property
    def eval_samples(self) -> int:
        return len(self.eval)

    def train_shard(self, epoch: int) -> np.ndarray:
        return shard.train_shard(len(self.train), self.cfg.seed, epoch, self.env.rank, self.env.world_size,
                                 self.cfg.batch_size)


class MemoryPipeline(_Pipeline):
    name = "memory"

    def __init__(self, index, cfg, env):
        super().__init__(index, cfg, env)
        self.train_x, self.train_y = self._read_all(self.train, np.arange(len(self.train)))
        self.eval_x, self.eval_y = self._read_all(self.eval, self.eval_indices)

    def _read_all(self, source, indices):
        xs, ys = [], []
        for x, y in _loader(source, indices, 64, self.cfg.loader_workers):
            xs.append(x)
            ys.append(y)
        return torch.cat(xs), torch.cat(ys)

    def train_batches(self, epoch: int):
        rows = torch.from_numpy(self.train_shard(epoch))
        for start in range(0, len(rows), self.cfg.batch_size):
            take = rows[start:start + self.cfg.batch_size]
            yield self.train_x[take], self.train_y[take]

    def eval_batches(self):
        mask = torch.from_numpy(self.eval_mask)
        for start in range(0, len(mask), self.cfg.batch_size):
            end = start + self.cfg.batch_size
            yield self.eval_x[start:end], self.eval_y[start:end], mask[start:end]


class StreamPipeline(_Pipeline):
    name = "stream"

    def train_batches(self, epoch: int):
        yield from _loader(self.train, self.train_shard(epoch), self.cfg.batch_size, self.cfg.loader_workers)

    def eval_batches(self):
        mask = torch.from_numpy(self.eval_mask)
        loader = _loader(self.eval, self.eval_indices, self.cfg.batch_size, self.cfg.loader_workers)
        for k, (x, y) in enumerate(loader):
            yield x, y, mask[k * self.cfg.batch_size:(k + 1) * self.cfg.batch_size]


PIPELINES = {cls.name: cls for cls in (MemoryPipeline, StreamPipeline)}


def build_pipeline(name: str, index, cfg, env):
    if name not in PIPELINES:
        raise StemdlError(f"config key 'pipeline': {name!r} is not one of {', '.join(PIPELINES)}")
    return PIPELINES[name](index, cfg, env)
