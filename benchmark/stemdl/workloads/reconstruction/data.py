"""Reading and checking the reconstruction data: the index of a folder, the screen, the splits, `validate`.

    index = Index.build(root)                          # files and sample groups, per split
    problems, potentials = screen(index, rows)         # every sample checked (layout.sample_problems)
    split = H5Split(index, rows, potentials)           # the split protocol of stemdl.harness.pipelines
    stemdl validate data/reconstruction/default       # the command (the benchmark read from synth.json)

The split: `read(indices)` is the CBED stacks, float16 (n, N², S, S) as stored; `fields["potential"]` the
targets, float16 (n, 1, T, T), held in memory (read once by the screen); `name_of(i)` is "file:group".

Every bad sample is one line `FILE:GROUP: reason; reason` (NaN or infinite values, a wrong dtype or
shape, a stack whose length is not probe_grid², a missing attribute); a run refuses bad data with the
first of them (and how many more), or with `skip_bad` leaves them out, up to `max_bad` of the samples.
The set's shapes are the synth.json's where there is one, else the first readable sample's.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from stemdl.harness import dist
from stemdl.harness.errors import DataError, StemdlError
from stemdl.workloads.reconstruction import layout
from stemdl.harness.synthset import MANIFEST, recorded_digests, sha256


@dataclass
class Index:
    """Every sample of a folder: its file, its group and its split, in file and sample order."""

    root: Path
    files: list[str]  # relative to root
    file_of: np.ndarray  # (samples,) int64: index into files
    groups: list[str]
    split: np.ndarray  # (samples,) str
    shapes: dict | None  # the set's shapes from its synth.json, or None

    @classmethod
    def build(cls, root) -> "Index":
        root = Path(root)
        if not root.is_dir():
            raise StemdlError(f"--data {root}: no such folder")
        found = sorted((p for p in root.glob("*/batch_*.h5") if layout.FILE_RE.match(p.name)),
                       key=lambda p: (layout.SPLITS.index(layout.FILE_RE.match(p.name).group(1)),
                                      int(layout.FILE_RE.match(p.name).group(2))))
        if not found:
            raise StemdlError(f"--data {root}: no batch_{{train,dev,test}}_N.h5 files in its split folders")
        names, file_of, groups, splits = [], [], [], []
        for path in found:
            try:
                with h5py.File(path, "r") as h5:
                    members = sorted((g for g in h5 if layout.group_number(g) is not None), key=layout.group_number)
            except OSError as exc:
                raise DataError(path, f"not a readable HDF5 file ({' '.join(str(exc).split())})") from None
            names.append(str(path.relative_to(root)))
            file_of += [len(names) - 1] * len(members)
            groups += members
            splits += [layout.FILE_RE.match(path.name).group(1)] * len(members)
        return cls(root, names, np.asarray(file_of, dtype=np.int64), groups, np.asarray(splits), _synth_shapes(root))

    def __len__(self) -> int:
        return len(self.groups)

    def select(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    def path(self, i: int) -> Path:
        return self.root / self.files[self.file_of[i]]

    def name_of(self, i: int) -> str:
        return f"{self.path(i)}:{self.groups[i]}"


def _synth_shapes(root: Path) -> dict | None:
    """The shapes a synthetic set's synth.json promises: {"cbed": (N², S, S), "potential": (1, T, T)}."""
    import json

    try:
        settings = json.loads((root / MANIFEST).read_text())["config"]["settings"]
        n, s, t = int(settings["scan"]), int(settings["pattern_size"]), int(settings["target_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {layout.CBED: (n * n, s, s), layout.POTENTIAL: (1, t, t)}


def screen(index: Index, rows, pixels: bool = True) -> tuple[list[DataError], np.ndarray | None, dict | None]:
    """(bad samples, the potentials of `rows` (float16, NaN-filled where bad), the set's shapes): every
    sample of `rows` checked in order, one file open at a time."""
    rows = np.asarray(rows, dtype=np.int64)
    shapes = index.shapes
    bad: list[DataError] = []
    potentials = None
    h5, open_file = None, -1
    try:
        for k, i in enumerate(rows):
            if index.file_of[i] != open_file:
                if h5 is not None:
                    h5.close()
                open_file = index.file_of[i]
                h5 = h5py.File(index.path(i), "r")
            problems, found = layout.sample_problems(h5[index.groups[i]], shapes, pixels)
            if shapes is None and not problems:  # a set without synth.json: the first good sample's shapes
                shapes = {key: found[key] for key in (layout.CBED, layout.POTENTIAL)}
            if problems:
                bad.append(DataError(index.path(i), "; ".join(problems), index.groups[i]))
                continue
            if potentials is None:
                potentials = np.full((len(rows), *shapes[layout.POTENTIAL]), np.nan, dtype=layout.DTYPE)
            potentials[k] = found["values"]
    except OSError as exc:
        raise DataError(index.path(i), f"unreadable ({' '.join(str(exc).split())})", index.groups[i]) from None
    finally:
        if h5 is not None:
            h5.close()
    return bad, potentials, shapes


class H5Split:
    """Samples of one split: CBED stacks read from the files as asked, potentials in memory."""

    reads_are_copies = False  # h5py reads: DataLoader workers may share them out

    def __init__(self, index: Index, rows: np.ndarray, potentials: np.ndarray, shapes: dict):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.paths = [str(index.path(i)) for i in self.rows]
        self.groups = [index.groups[i] for i in self.rows]
        self.fields = {"potential": potentials}
        self.image_shape = tuple(shapes[layout.CBED])
        self.dtype = layout.DTYPE
        self._files: dict[str, h5py.File] = {}  # per process: each DataLoader worker opens its own

    def __len__(self) -> int:
        return len(self.rows)

    def name_of(self, i: int) -> str:
        return f"{self.paths[i]}:{self.groups[i]}"

    def __getstate__(self):  # open HDF5 handles do not cross into worker processes
        return {**self.__dict__, "_files": {}}

    def read(self, indices) -> np.ndarray:
        out = np.empty((len(indices), *self.image_shape), dtype=self.dtype)
        for k, i in enumerate(np.asarray(indices, dtype=np.int64)):
            path = self.paths[i]
            if path not in self._files:
                self._files[path] = h5py.File(path, "r")
            self._files[path][self.groups[i]][layout.CBED].read_direct(out, dest_sel=np.s_[k])
        return out


def refuse_or_skip(bad: list[DataError], total: int, skip_bad: bool, max_bad: float) -> None:
    """Raise the first bad sample's one line (with how many more), unless skip_bad allows them all."""
    if not bad:
        return
    more = f" (and {len(bad) - 1} more bad samples: `stemdl validate DIR` " \
           f"lists them)" if len(bad) > 1 else ""
    if not skip_bad:
        raise DataError(bad[0].path, f"{bad[0].reason}{more}", bad[0].group)
    if len(bad) > max_bad * total:
        raise StemdlError(f"{len(bad)} of {total} samples are bad, more than max_bad {max_bad:g} allows; "
                          f"the first: {bad[0]}")


def load_splits(root: Path, cfg, env) -> tuple[H5Split, H5Split, int]:
    """(train, eval, samples left out): the index built by rank 0, the samples of both splits screened by
    every rank on its share of them (contiguous blocks: few files each), the verdict and the potentials
    gathered, so that every rank raises the same line or builds the same splits. Collective."""
    h = cfg.harness
    index = dist.on_root(Index.build, root)
    rows = {name: index.select(name) for name in (h.train_split, h.eval_split)}
    every = np.concatenate(list(rows.values()))
    shares = np.array_split(every, env.world_size)
    try:
        mine = screen(index, shares[env.rank], cfg.workload.screen_pixels)
    except StemdlError as exc:
        mine = exc
    except Exception:
        if env.world_size == 1:
            raise
        traceback.print_exc()  # a bug: end every rank rather than leave them waiting for this one
        dist.abort(1)
    parts = dist.allgather_object(mine)
    failed = [part for part in parts if isinstance(part, StemdlError)]
    if failed:
        raise failed[0]
    bad = [e for errors, _, _ in parts for e in errors]
    found = [s for _, _, s in parts if s is not None]
    if not found:
        raise DataError(root, f"no good sample in the {h.train_split} and {h.eval_split} splits; the first "
                              f"bad one: {bad[0] if bad else 'none'}")
    shapes = found[0]
    if any(s != shapes for s in found):  # a set without synth.json: the ranks' first good samples differ
        raise DataError(root, f"samples of different shapes in one set: {shapes} and "
                              f"{next(s for s in found if s != shapes)}")
    refuse_or_skip(bad, len(every), h.skip_bad, h.max_bad)
    potentials = np.concatenate([v if v is not None else np.full((len(share), *shapes[layout.POTENTIAL]), np.nan,
                                                                 dtype=layout.DTYPE)
                                 for (_, v, _), share in zip(parts, shares)])
    good = np.isfinite(potentials.reshape(len(potentials), -1)).all(axis=1)
    splits, start = [], 0
    for name in (h.train_split, h.eval_split):
        n = len(rows[name])
        keep = good[start:start + n]
        splits.append(H5Split(index, rows[name][keep], potentials[start:start + n][keep], shapes))
        start += n
    return splits[0], splits[1], int((~good).sum())


# ---------------------------------------------------------------- validate


def validate(root, pixels: bool = True) -> tuple[int, list[str]]:
    """(samples, one line per bad sample or file): every sample of every split, and each file's SHA-256
    against the synth.json's where there is one."""
    index = Index.build(root)
    lines = []
    for rel, digest in recorded_digests(Path(root)).items():
        path = Path(root) / rel
        if not path.is_file():
            lines.append(f"{path}: listed in {MANIFEST} but missing")
        elif sha256(path) != digest:
            lines.append(f"{path}: sha256 differs from {MANIFEST}: changed or damaged since it was generated")
    bad, _, _ = screen(index, np.arange(len(index)), pixels)
    return len(index), lines + [str(e) for e in bad]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", type=Path, help="a reconstruction data folder (train/, dev/, test/)")
    parser.add_argument("--no-pixels", action="store_true", help="check attributes and shapes, not every value")


def run(args: argparse.Namespace) -> int:
    samples, lines = validate(args.data, pixels=not args.no_pixels)
    print(f"{args.data}: {samples} samples, {len(lines)} problem(s)")
    for line in lines:
        print(line)
    return 1 if lines else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m stemdl.workloads.reconstruction.data",
                                     description="check every sample of a reconstruction data folder")
    sub = parser.add_subparsers(dest="command", required=True)
    configure(sub.add_parser("validate", help="check every sample; one line per bad one"))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except StemdlError as exc:
        print(f"validate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
