"""Reading the LACBED pairs (`lacbed.synth`'s layout) into memory: the sets are small (a 32x32 pair is
20 KB), so a split is two arrays.

    split = load_split(root, "train", thickness_index=1)
    split.read([0, 5])            # potentials, float32 (2, 1, S, S): the model's input
    split.fields["pattern"]       # the 000 patterns at that thickness, float32 (n, 1, S, S): the targets

Every sample is checked as it is read; a bad one is one line `FILE:GROUP: reason` (stemdl.harness.errors
.DataError): a missing dataset, a wrong dtype or shape, a thickness index beyond the stack, NaN or
infinite values. A run refuses bad data with the first of them.
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np

from stemdl.harness.errors import DataError, StemdlError

FILE_RE = re.compile(r"^batch_(train|dev|test)_(\d+)\.h5\Z")
GROUP_RE = re.compile(r"^sample_(\d+)_0\Z")


def sample_problem(group, thickness_index: int, size: int | None) -> str | None:
    """The reason a sample group is bad, or None."""
    for name, ndim in (("potential", 2), ("lacbed", 3)):
        node = group.get(name)
        if node is None or not hasattr(node, "shape"):
            return f"no dataset {name!r}"
        if node.dtype != np.float32:
            return f"{name} is {node.dtype}, expected float32"
        if node.ndim != ndim or node.shape[-1] != node.shape[-2]:
            return f"{name} shape {tuple(node.shape)} is not {'(S, S)' if ndim == 2 else '(T, S, S)'}"
    s = group["potential"].shape[-1]
    if group["lacbed"].shape[-1] != s:
        return f"lacbed is {group['lacbed'].shape[-1]} pixels a side, potential {s}"
    if size is not None and s != size:
        return f"{s} pixels a side, the set's first sample {size}"
    if not 0 <= thickness_index < group["lacbed"].shape[0]:
        return f"thickness index {thickness_index} beyond its {group['lacbed'].shape[0]} thicknesses"
    for name in ("potential", "lacbed"):
        bad = int(np.count_nonzero(~np.isfinite(group[name][()])))
        if bad:
            return f"{name} has {bad} NaN or infinite values"
    return None


class PairSplit:
    """One split in memory: `read(indices)` the potentials, `fields["pattern"]` the targets."""

    reads_are_copies = True

    def __init__(self, potentials: np.ndarray, patterns: np.ndarray, names: list[str]):
        self.potentials = potentials
        self.fields = {"pattern": patterns}
        self.names = names
        self.image_shape = tuple(potentials.shape[1:])
        self.dtype = potentials.dtype

    def __len__(self) -> int:
        return len(self.potentials)

    def name_of(self, i: int) -> str:
        return self.names[i]

    def head(self, n: int) -> "PairSplit":
        """The first n samples (the materials are in a seeded random order, so any n is a random subset)."""
        return PairSplit(self.potentials[:n], self.fields["pattern"][:n], self.names[:n])

    def read(self, indices, out=None) -> np.ndarray:
        return self.potentials[np.asarray(indices, dtype=np.int64)]


def load_split(root, split: str, thickness_index: int) -> PairSplit:
    """Every sample of `split` under ROOT, in file and sample order; a bad one raises its one line."""
    root = Path(root)
    files = sorted((p for p in (root / split).glob("batch_*.h5") if FILE_RE.match(p.name)),
                   key=lambda p: int(FILE_RE.match(p.name).group(2)))
    if not files:
        raise StemdlError(f"--data {root}: no {split}/batch_{split}_N.h5 files (make them: stemdl lacbed generate)")
    potentials, patterns, names, size = [], [], [], None
    for path in files:
        try:
            with h5py.File(path, "r") as h5:
                for name in sorted((g for g in h5 if GROUP_RE.match(g)), key=lambda g: int(GROUP_RE.match(g).group(1))):
                    reason = sample_problem(h5[name], thickness_index, size)
                    if reason:
                        raise DataError(path, reason, name)
                    potentials.append(h5[name]["potential"][()][None])
                    patterns.append(h5[name]["lacbed"][thickness_index][None])
                    names.append(f"{path}:{name}")
                    size = potentials[-1].shape[-1]
        except OSError as exc:
            raise DataError(path, f"not a readable HDF5 file ({' '.join(str(exc).split())})") from None
    if not names:
        raise StemdlError(f"--data {root}: no samples in the {split} split")
    return PairSplit(np.stack(potentials), np.stack(patterns), names)
