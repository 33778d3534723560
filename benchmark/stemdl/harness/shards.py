"""The shard format `stemdl convert` writes, and the reader every input pipeline uses.

    shards = ShardSet.open("/scratch/shards128")          # checks every file's size against the manifest
    train = shards.split("train")                          # ShardSplit
    x = train.read(np.array([5, 17, 3]))                   # uint8 (3, 3, 128, 128), gathered from memory maps
    y, t = train.labels[[5, 17, 3]], train.targets[[5, 17, 3]]    # class index (space group - 1), lattice
    verify_files(shards.root, shards.files(), "checksum", subset=range(rank, n_files, world_size))

A shard folder (DST of `stemdl convert SRC DST`) holds one shard per source HDF5 file, numbered within its
split in the natural file order, with the samples in the natural group order:

    DST/manifest.json            written last, atomically: what the folder holds (below); its presence
                                 means the conversion finished
    DST/convert.json             written first: the source and preprocessing, so that a rerun resumes or
                                 refuses (never mixes)
    DST/train/00000.images.npy   (k, 3, S, S) uint8 or float16, C order: `Preprocess(size, floor, ceiling)`
                                 of the raw stacks, rounded to uint8 (as the raw pipeline does) or float16
    DST/train/00000.labels.npy   (k,) int16: space group 1..230
    DST/train/00000.targets.npy  (k, 6) float32: a, b, c (angstrom), alpha, beta, gamma (degrees)
    DST/train/00000.names.npy    (k,) fixed-width bytes "source_file:group" (messages, tracing)
    DST/train/00000.done.json    the shard's sidecar, written after its files: what a rerun checks to skip it

Every array is a plain .npy (format 1.0, little-endian, header padded to 64 bytes), so `np.load(path,
mmap_mode="r")`, DALI and any other .npy reader take it as it is. The manifest:

    {"format": "stemdl-shards", "version": 1, "source": "/abs/path/of/SRC",
     "preprocess": {"size": 128, "floor": 0.001, "ceiling": 10000.0, "dtype": "uint8"},
     "splits": {"train": {"samples": n, "class_counts": {"14": 412, ...},
                          "shards": [{"name": "train/00000", "samples": k, "source": "train/batch_train_0.h5",
                                      "files": {"images": {"path": "train/00000.images.npy", "bytes": B,
                                                           "sha256": "..."},
                                                "labels": {...}, "targets": {...}, "names": {...}}}, ...]},
                ...},
     "skipped": [{"sample": "train/batch_train_3.h5:sample_7_0", "reason": "..."}],   # --skip-bad
     "created": "2025-01-01T00:00:00+00:00", "stemdl_version": "0.1.0"}

Labels, targets and names of a split are small and read once; images stay memory-mapped, opened lazily in
each process (at most MAX_OPEN at a time, the earliest opened closed first, since every map holds a file
descriptor), so a split can be handed to DataLoader workers, forked or pickled, without copying the images.
`read` copies a batch out of the maps in the order asked for, from a view per sample of the open maps.
"""

from __future__ import annotations

import copy
import hashlib
import json
import operator
import os
import re
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np

from stemdl.workloads.spacegroup.data import layout
from stemdl.harness.errors import DataError, StemdlError

FORMAT = "stemdl-shards"
VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("images", "labels", "targets", "names")  # the files of a shard, in the order they are written
DTYPES = {"uint8": np.dtype(np.uint8), "float16": np.dtype(np.float16)}
VERIFY = ("none", "size", "checksum")
N_TARGETS = 6
MAX_OPEN = 256  # memory maps held open per split and process (each holds a file descriptor)
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")


class FileEntry(NamedTuple):
    """One file of the manifest: path relative to the shard folder, size in bytes, sha256 hex digest."""

    path: str
    bytes: int
    sha256: str | None


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def is_shard_dir(path: str | os.PathLike) -> bool:
    """True if `path` holds a manifest.json of the stemdl-shards format (a finished conversion)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


# ---- the manifest -------------------------------------------------------------------------------------

def _is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _path_problem(path) -> str | None:
    """Why a manifest path is unusable: it must stay inside the shard folder."""
    if not isinstance(path, str) or not path:
        return "a file path is not text"
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or "\\" in path:
        return f"file path {path!r} leaves the shard folder"
    return None


def _file_problem(where: str, kind: str, meta) -> str | None:
    if not isinstance(meta, dict):
        return f"{where}: files.{kind} is missing"
    if not _is_int(meta.get("bytes")):
        return f"{where}: files.{kind}.bytes is not a byte count"
    sha = meta.get("sha256")
    if not (isinstance(sha, str) and _SHA256.match(sha)):
        return f"{where}: files.{kind}.sha256 is not a sha256 hex digest"
    return _path_problem(meta.get("path"))


def _shard_problem(split: str, k: int, shard) -> str | None:
    where = f"split {split} shard {k}"
    if not isinstance(shard, dict) or not isinstance(shard.get("name"), str) \
            or not isinstance(shard.get("source"), str):
        return f"{where}: needs a name and a source"
    if not _is_int(shard.get("samples")):
        return f"{where}: samples is not a count"
    files = shard.get("files")
    if not isinstance(files, dict):
        return f"{where}: files is missing"
    return next((p for p in (_file_problem(where, kind, files.get(kind)) for kind in KINDS) if p), None)


def _split_problem(split: str, entry) -> str | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list) \
            or not isinstance(entry.get("class_counts"), dict) or not _is_int(entry.get("samples")):
        return f"split {split}: needs samples, class_counts and shards"
    for k, shard in enumerate(entry["shards"]):
        problem = _shard_problem(split, k, shard)
        if problem:
            return problem
    total = sum(shard["samples"] for shard in entry["shards"])
    counted = sum(n for n in entry["class_counts"].values() if _is_int(n))
    if total != entry["samples"] or counted != entry["samples"]:
        return (f"split {split}: says {entry['samples']} samples, its shards hold {total} and its "
                f"class_counts {counted}")
    return None


def manifest_problem(manifest) -> str | None:
    """Why `manifest` is not a usable stemdl-shards manifest of this version, or None."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f"not a {FORMAT} manifest"
    if manifest.get("version") != VERSION:
        return f"format version {manifest.get('version')!r} (this stemdl reads version {VERSION})"
    prep = manifest.get("preprocess")
    if not isinstance(prep, dict) or not _is_int(prep.get("size"), 1) or prep.get("dtype") not in DTYPES \
            or not all(isinstance(prep.get(k), (int, float)) for k in ("floor", "ceiling")):
        return f"preprocess must give size, floor, ceiling and dtype ({' or '.join(DTYPES)})"
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not splits:
        return "no splits"
    unknown = set(splits) - set(layout.SPLITS)
    if unknown:
        return f"unknown split(s) {', '.join(sorted(unknown))}"
    return next((p for p in (_split_problem(s, e) for s, e in splits.items()) if p), None)


def read_manifest(root: str | os.PathLike) -> dict:
    """The checked manifest of a shard folder; a one-line DataError if it is missing, unreadable or
    inconsistent."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        if not root.is_dir():
            raise DataError(root, "no such folder" if not root.exists() else "not a folder")
        raise DataError(root, f"not a stemdl shard folder (no {MANIFEST}; is the conversion finished?)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise DataError(path, f"unreadable manifest ({exc})") from None
    problem = manifest_problem(manifest)
    if problem:
        raise DataError(path, problem)
    return manifest


# ---- verification -------------------------------------------------------------------------------------

def _as_entry(entry) -> FileEntry:
    if isinstance(entry, dict):
        return FileEntry(entry["path"], int(entry["bytes"]), entry.get("sha256"))
    path, size, sha = entry
    return FileEntry(path, int(size), sha)


def _size_problem(root: Path, entry: FileEntry) -> str | None:
    try:
        size = (root / entry.path).stat().st_size
    except FileNotFoundError:
        return "missing (the manifest lists it)"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    return None if size == entry.bytes else f"size {size} bytes, manifest says {entry.bytes}"


def _checksum_problem(root: Path, entry: FileEntry) -> str | None:
    if entry.sha256 is None:
        return None
    try:
        digest = file_sha256(root / entry.path)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    return None if digest == entry.sha256 else \
        f"sha256 {digest[:16]}... differs from the manifest's {entry.sha256[:16]}..."


def verify_files(root: str | os.PathLike, entries, how: str = "size", subset=None, workers: int = 4) -> None:
    """Check manifest file entries ((path, bytes, sha256) tuples or the manifest's dicts) under `root`.

    how: "none", "size" (stat each file: cheap) or "checksum" (size, then sha256 of every byte, on
    `workers` threads). subset: the positions in `entries` to check (e.g. range(rank, n, world_size), so
    that ranks share the work); default all. Raises one DataError naming the first bad file in entry
    order, with the count of the others.
    """
    if how not in VERIFY:
        raise StemdlError(f"verify: {how!r} is not one of {', '.join(VERIFY)}")
    if how == "none":
        return
    root = Path(root)
    chosen = [_as_entry(entries[i]) for i in subset] if subset is not None else [_as_entry(e) for e in entries]
    problems = [_size_problem(root, e) for e in chosen]
    if how == "checksum":
        todo = [k for k, p in enumerate(problems) if p is None]
        with ThreadPoolExecutor(max(1, min(workers, len(todo) or 1))) as pool:  # hashlib releases the GIL
            for k, problem in zip(todo, pool.map(lambda k: _checksum_problem(root, chosen[k]), todo)):
                problems[k] = problem
    bad = [(e, p) for e, p in zip(chosen, problems) if p is not None]
    if bad:
        entry, reason = bad[0]
        more = f" (and {len(bad) - 1} more bad file(s))" if len(bad) > 1 else ""
        raise DataError(root / entry.path, reason + more)


# ---- reading ------------------------------------------------------------------------------------------

def _load_small(path: Path, dtype_kind: str, shape_tail: tuple, samples: int) -> np.ndarray:
    """A small per-shard array (labels, targets, names), checked against the manifest."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(path, f"not a readable .npy file ({exc})") from None
    if arr.shape != (samples, *shape_tail) or arr.dtype.kind != dtype_kind:
        raise DataError(path, f"holds {arr.dtype} {arr.shape}, the manifest says {samples} samples "
                              f"({dtype_kind} {(samples, *shape_tail)})")
    return arr


def _image_header(path: Path) -> tuple[tuple, bool, np.dtype]:
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            return read(f)
    except (OSError, ValueError) as exc:
        raise DataError(path, f"not a readable .npy file ({exc})") from None


class ShardSplit:
    """The samples of one split: small arrays in memory, images memory-mapped shard by shard."""

    reads_are_copies = True  # a read copies mapped bytes: pipelines read in the training process (stemdl.harness.pipelines)
    reads_into = True  # read(indices, out=buffer) fills a given buffer (stemdl.harness.dali reuses a ring of them)

    def __init__(self, root: Path, name: str, entry: dict, preprocess: dict):
        self.root, self.name = Path(root), name
        self.shards: list[dict] = entry["shards"]
        counts = np.array([s["samples"] for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # shard k: offsets[k:k+2]
        self.shard_of = np.repeat(np.arange(len(self.shards), dtype=np.int32), counts)
        self.dtype = DTYPES[preprocess["dtype"]]
        self.image_shape = (layout.N_PATTERNS, int(preprocess["size"]), int(preprocess["size"]))
        labels, targets, names = [], [], []
        for shard in self.shards:
            k, files = shard["samples"], shard["files"]
            labels.append(_load_small(self.root / files["labels"]["path"], "i", (), k))
            targets.append(_load_small(self.root / files["targets"]["path"], "f", (N_TARGETS,), k))
            names.append(_load_small(self.root / files["names"]["path"], "S", (), k))
            self._check_images(self.root / files["images"]["path"], k)
        raw = np.concatenate(labels) if labels else np.zeros(0, np.int16)
        if raw.size and not (1 <= raw.min() and raw.max() <= layout.N_SPACE_GROUPS):
            raise DataError(self.root, f"split {name}: a label is outside 1..{layout.N_SPACE_GROUPS}")
        self.labels = raw.astype(np.int64) - 1  # class index, as every pipeline uses
        self.targets = np.concatenate(targets).astype(np.float32) if targets else np.zeros((0, N_TARGETS), np.float32)
        self._names = np.concatenate(names) if names else np.zeros(0, "S1")
        self.fields = {"labels": self.labels, "targets": self.targets}
        self._forget_maps()

    def _forget_maps(self) -> None:
        """This process's maps (none yet): shard k -> its images, and one (1, 3, S, S) view per sample of the
        open shards (None elsewhere), which is what `read` concatenates."""
        self._maps: OrderedDict = OrderedDict()
        self._rows: list = [None] * len(self.labels)
        self._viewed = np.zeros(len(self.shards), dtype=bool)
        self._pid = os.getpid()

    def close(self) -> None:
        """Close this process's maps of the images (the next read opens what it needs again); a mapped page
        cannot be evicted from the page cache while any process maps it."""
        self._forget_maps()

    def _check_images(self, path: Path, samples: int) -> None:
        shape, fortran, dtype = _image_header(path)
        if shape != (samples, *self.image_shape) or fortran or dtype != self.dtype:
            raise DataError(path, f"holds {dtype} {shape}{' (Fortran order)' if fortran else ''}, the manifest "
                                  f"says {self.dtype} {(samples, *self.image_shape)}")

    def __len__(self) -> int:
        return len(self.labels)

    @cached_property
    def names(self) -> np.ndarray:
        """"file:group" of every sample, as str."""
        return np.char.decode(self._names, "utf-8") if len(self._names) else np.zeros(0, str)

    def name_of(self, i: int) -> str:
        return self._names[i].decode("utf-8", errors="replace")

    def files(self, shard_numbers=None) -> list[str]:
        """Relative paths of the files of these shards (default: all), as the manifest lists them."""
        numbers = range(len(self.shards)) if shard_numbers is None else shard_numbers
        return [self.shards[int(k)]["files"][kind]["path"] for k in numbers for kind in KINDS]

    def __getstate__(self):
        # A pickled split (spawned DataLoader workers) must not carry its memory maps: they would be copied.
        state = self.__dict__.copy()
        for key in ("_maps", "_rows", "_viewed", "names"):
            state.pop(key, None)
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self._forget_maps()

    def _open(self, shards) -> None:
        """Map these shards (a map already open is kept, and counted as the latest opened)."""
        if self._pid != os.getpid():  # forked: maps are per process
            self._forget_maps()
        for k in shards:
            if k in self._maps:
                self._maps.move_to_end(k)
            else:
                self._map(k)

    def _map(self, k: int) -> np.ndarray:
        path = self.root / self.shards[k]["files"]["images"]["path"]
        try:
            mm = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(path, f"cannot map the images ({exc})") from None
        if mm.shape != (self.shards[k]["samples"], *self.image_shape) or mm.dtype != self.dtype:
            raise DataError(path, f"holds {mm.dtype} {mm.shape}, the manifest says {self.dtype} "
                                  f"{(self.shards[k]['samples'], *self.image_shape)}")
        mm = mm.view(np.ndarray)  # a plain array on the same map: np.memmap's Python-level indexing costs ~2 us
        self._maps[k] = mm
        start, end = self.offsets[k:k + 2].tolist()
        self._rows[start:end], self._viewed[k] = list(mm[:, None]), True  # ~165 B a sample
        if len(self._maps) > MAX_OPEN:
            gone = self._maps.popitem(last=False)[0]
            start, end = self.offsets[gone:gone + 2].tolist()
            self._rows[start:end], self._viewed[gone] = [None] * (end - start), False  # the map closes with them
        return mm

    def relocated(self, root) -> ShardSplit:
        """The same split reading its images from `root`: a staged copy holding (at least) the shards read."""
        moved = copy.copy(self)
        moved.root = Path(root)
        moved._forget_maps()
        return moved

    def read(self, indices, out: np.ndarray | None = None) -> np.ndarray:
        """Images of samples `indices` (positions in the split), (len, 3, S, S) of the stored dtype, in the
        order asked for, written into `out` when given (e.g. a reused or shared buffer). One C loop copies
        the batch from per-sample views of the shards' maps (np.concatenate over a tuple that
        operator.itemgetter picks): ~0.35 us a sample besides its bytes, against ~0.75 us for a view made per
        sample in Python, which is what a 12 KB (64x64 uint8) sample's copy costs."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"split {self.name} has {len(self)} samples; asked for {idx.min()}..{idx.max()}")
        shape = (len(idx), *self.image_shape)
        if out is None:
            out = np.empty(shape, dtype=self.dtype)
        elif out.shape != shape or out.dtype != self.dtype:
            raise ValueError(f"split {self.name}: out is {out.dtype} {out.shape}, needs {self.dtype} {shape}")
        if not idx.size:
            return out
        if self._pid != os.getpid() or not self._viewed[self.shard_of[idx]].all():
            needed = np.unique(self.shard_of[idx])
            if len(needed) > MAX_OPEN:  # more shards than may be open at once: half the batch at a time
                half = len(idx) // 2
                self.read(idx[:half], out[:half])
                self.read(idx[half:], out[half:])
                return out
            self._open(needed.tolist())
        rows = idx.tolist()
        np.concatenate((self._rows[rows[0]],) if len(rows) == 1 else operator.itemgetter(*rows)(self._rows), out=out)
        return out


@dataclass(frozen=True, eq=False)
class ShardSet:
    """A finished shard folder: its manifest, and its splits on demand."""

    root: Path
    manifest: dict
    _splits: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, root: str | os.PathLike, verify: str = "size", workers: int = 4) -> ShardSet:
        """The shard folder at `root`, its files checked by `verify` ("none", "size", "checksum")."""
        if verify not in VERIFY:
            raise StemdlError(f"verify: {verify!r} is not one of {', '.join(VERIFY)}")
        shards = cls(Path(root), read_manifest(root))
        verify_files(shards.root, shards.files(), verify, workers=workers)
        return shards

    @property
    def preprocess(self) -> dict:
        return self.manifest["preprocess"]

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def files(self) -> list[FileEntry]:
        """Every data file of every split: (relative path, bytes, sha256)."""
        return [_as_entry(shard["files"][kind]) for entry in self.manifest["splits"].values()
                for shard in entry["shards"] for kind in KINDS]

    def split(self, name: str) -> ShardSplit:
        if name not in self.manifest["splits"]:
            raise DataError(self.root / MANIFEST, f"no split {name!r} (it has {', '.join(self.splits)})")
        if name not in self._splits:
            self._splits[name] = ShardSplit(self.root, name, self.manifest["splits"][name], self.preprocess)
        return self._splits[name]

    def with_root(self, new_root: str | os.PathLike, verify: str = "none") -> ShardSet:
        """The same manifest with files read from `new_root` (a staged copy); checked by `verify`."""
        moved = ShardSet(Path(new_root), self.manifest)
        verify_files(moved.root, moved.files(), verify)
        return moved
