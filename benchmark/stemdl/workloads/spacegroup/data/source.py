"""The raw split: samples of the public HDF5 layout, read through the index and preprocessed as they are read.

    train, dev = raw_splits(index, cfg, keep)     # keep: bool per index entry, False for bad samples

It offers the split protocol of `stemdl.harness.pipelines`, as converted shards do:

    len(split); split.read(indices)   # (len(indices), 3, S, S) uint8 in 0..255
    split.fields["labels"]            # int64 class index (space group - 1), (n,)
    split.fields["targets"]           # float32 (n, 6): a, b, c (angstrom), alpha, beta, gamma (degrees)
    split.name_of(i)                  # "file:group", for error messages

Each sample's float32 stack gets `Preprocess` and is rounded to uint8 exactly as `stemdl convert` rounds
it, so a raw run and a run on uint8 shards made with the same parameters see identical tensors (tested).
"""

from __future__ import annotations

import numpy as np
import torch

from stemdl.workloads.spacegroup.data import layout
from stemdl.workloads.spacegroup.data.reader import DataFile
from stemdl.workloads.spacegroup.preprocess import Preprocess


class RawSplit:
    """Samples of one split of a raw HDF5 data set, preprocessed as they are read."""

    def __init__(self, index, rows: np.ndarray, prep: Preprocess):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.paths = [str(index.file_path(i)) for i in self.rows]
        self.groups = [index.group_name(i) for i in self.rows]
        self.fields = {"labels": layout.class_index(index.label[self.rows]), "targets": index.targets(self.rows)}
        self.prep = prep
        self.image_shape = (3, prep.size, prep.size)
        self.dtype = np.dtype(np.uint8)
        self._files: dict[str, DataFile] = {}  # per process: each DataLoader worker opens its own

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def names(self) -> list[str]:
        return [f"{p}:{g}" for p, g in zip(self.paths, self.groups)]

    def name_of(self, i: int) -> str:
        return f"{self.paths[i]}:{self.groups[i]}"

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
    w = cfg.workload
    prep = Preprocess(size=w.image_size, floor=w.log_floor, ceiling=w.log_ceiling)
    splits = []
    for name in (cfg.harness.train_split, cfg.harness.eval_split):
        rows = index.select(name)
        if keep is not None:
            rows = rows[keep[rows]]
        splits.append(RawSplit(index, rows, prep))
    return splits[0], splits[1]
