"""Where the timed run's samples come from: raw HDF5 through the index, or converted shards.

    train, dev = raw_splits(index, cfg, keep)        # the public HDF5 layout, preprocessed while reading
    train = ShardSet.open(root).split("train")       # converted shards (stemdl.harness.shards): already done

Every split the pipelines read offers the same small interface, whichever the storage:

    len(split); split.labels        # int64 class index (space group - 1), (n,)
    split.targets                   # float32 (n, 6): a, b, c (angstrom), alpha, beta, gamma (degrees)
    split.names                     # "file:group" of every sample, for error messages
    split.read(indices)             # (len(indices), 3, S, S), 0..255: uint8 (raw, uint8 shards) or float16

A raw split reads each sample's float32 stack from HDF5 and applies `stemdl.workloads.spacegroup.preprocess.Preprocess`, rounding
to uint8 exactly as `stemdl convert` does, so a raw run and a run on uint8 shards made with the same
parameters see identical tensors (tested).
"""

from __future__ import annotations

import numpy as np
import torch

from stemdl.workloads.spacegroup.data.reader import DataFile
from stemdl.workloads.spacegroup.preprocess import Preprocess


class RawSplit:
    """Samples of one split of a raw HDF5 data set, preprocessed as they are read."""

    def __init__(self, index, rows: np.ndarray, prep: Preprocess):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.paths = [str(index.file_path(i)) for i in self.rows]
        self.groups = [index.group_name(i) for i in self.rows]
        self.labels = index.label[self.rows].astype(np.int64) - 1
        self.targets = index.targets(self.rows)
        self.prep = prep
        self.image_shape = (3, prep.size, prep.size)
        self.dtype = np.dtype(np.uint8)
        self._files: dict[str, DataFile] = {}  # per process: each DataLoader worker opens its own

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def names(self) -> list[str]:
        return [f"{p}:{g}" for p, g in zip(self.paths, self.groups)]

    def __getstate__(self):  # open HDF5 handles do not cross into worker processes
        return {**self.__dict__, "_files": {}}

    def read(self, indices) -> np.ndarray:
        out = np.empty((len(indices),) + self.image_shape, dtype=np.uint8)
        for k, i in enumerate(np.asarray(indices, dtype=np.int64)):
            path = self.paths[i]
            if path not in self._files:
                self._files[path] = DataFile(path)
            stack = torch.from_numpy(self._files[path].stack(self.groups[i]))
            out[k] = self.prep(stack).round_().to(torch.uint8).numpy()
        return out


def raw_splits(index, cfg, keep: np.ndarray | None = None) -> tuple[RawSplit, RawSplit]:
    """The training and evaluation splits of `index`; `keep` (bool per index entry) leaves out bad samples."""
    prep = Preprocess(size=cfg.image_size, floor=cfg.log_floor, ceiling=cfg.log_ceiling)
    splits = []
    for name in (cfg.train_split, cfg.eval_split):
        rows = index.select(name)
        if keep is not None:
            rows = rows[keep[rows]]
        splits.append(RawSplit(index, rows, prep))
    return splits[0], splits[1]
