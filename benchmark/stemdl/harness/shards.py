"""The shard format: a workload's samples, preprocessed once, as .npy files every input pipeline reads.

    shards = ShardSet.open("/scratch/shards128")          # checks every file's size against the manifest
    train = shards.split("train")                          # ShardSplit: the split protocol of the pipelines
    x = train.read(np.array([5, 17, 3]))                   # the input kind, gathered from memory maps
    train.fields["labels"][[5, 17, 3]]                     # the small kinds, in memory
    writer = ShardWriter(dst, "train/00000", capacity, kinds)   # what a workload's conversion writes with

A shard folder holds one shard per source file, numbered within its split, with the samples in order:

    DST/manifest.json            written last, atomically: what the folder holds; its presence means the
                                 conversion finished
    DST/train/00000.<kind>.npy   one .npy per kind the workload declares, (k, *shape) of its dtype
    DST/train/00000.done.json    the shard's sidecar (the workload's conversion resumes from these)

The workload declares its kinds (`Kind`: name, dtype, per-sample shape, mapped or not, an optional range
for integers), and the manifest stores them: exactly one kind is mapped, the input that `read` gathers
per batch from memory maps; the others are small, read once into `fields` (integers as int64, floats as
float32) in the declared order; a kind named "names" holds each sample's "file:group" for messages. The
manifest:

    {"format": "stemdl-shards", "version": 2, "workload": "stemdl", "source": "/abs/path/of/SRC",
     "preprocess": {...},                                   # the workload's own, checked by the workload
     "kinds": [{"name": "images", "dtype": "uint8", "shape": [3, 128, 128], "mapped": true}, ...],
     "splits": {"train": {"samples": n, "shards": [{"name": "train/00000", "samples": k, "source": "...",
                          "files": {"images": {"path": "train/00000.images.npy", "bytes": B, "sha256": "..."},
                                    ...}}, ...], ...the workload's summary (class counts)...}, ...},
     "skipped": [{"sample": "...", "reason": "..."}], "created": "...", "stemdl_version": "0.1.0"}

Every array is a plain .npy (format 1.0), so `np.load(path, mmap_mode="r")`, DALI and any other reader take
it as it is. Mapped files are opened lazily in each process (at most MAX_OPEN at a time, the earliest
opened closed first, since every map holds a file descriptor), so a split can be forked or pickled without
copying them; `read` copies a batch out of the maps from a view per sample of the open maps.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import operator
import os
import re
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np

from stemdl.harness import files as files_mod
from stemdl.harness.errors import DataError, StemdlError

FORMAT = "stemdl-shards"
VERSION = 2  # 2: the kinds are declared in the manifest (1: the space-group kinds, labels 1..230)
MANIFEST = "manifest.json"
NAMES = "names"  # the kind holding "file:group" of each sample
VERIFY = ("none", "size", "checksum")
MAX_OPEN = 256  # memory maps held open per split and process (each holds a file descriptor)
_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")
_DTYPES = ("uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64", "S")


@dataclass(frozen=True)
class Kind:
    """One array of every sample: its dtype ("S" for bytes), its per-sample shape, whether it is the
    mapped input, and for integers the range its values must lie in (inclusive)."""

    name: str
    dtype: str
    shape: tuple = ()
    mapped: bool = False
    low: int | None = None
    high: int | None = None

    def to_json(self) -> dict:
        out = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "mapped": self.mapped}
        return out if self.low is None else {**out, "range": [self.low, self.high]}

    @classmethod
    def from_json(cls, d: dict) -> Kind:
        low, high = d.get("range") or (None, None)
        return cls(d["name"], d["dtype"], tuple(d["shape"]), bool(d.get("mapped")), low, high)

    def empty(self, n: int = 0) -> np.ndarray:
        return np.zeros((n, *self.shape), dtype="S1" if self.dtype == "S" else self.dtype)


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


def _shard_problem(split: str, k: int, shard, kinds: list[str]) -> str | None:
    where = f"split {split} shard {k}"
    if not isinstance(shard, dict) or not isinstance(shard.get("name"), str) \
            or not isinstance(shard.get("source"), str):
        return f"{where}: needs a name and a source"
    if not _is_int(shard.get("samples")):
        return f"{where}: samples is not a count"
    files = shard.get("files")
    if not isinstance(files, dict):
        return f"{where}: files is missing"
    return next((p for p in (_file_problem(where, kind, files.get(kind)) for kind in kinds) if p), None)


def _split_problem(split: str, entry, kinds: list[str]) -> str | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list) or not _is_int(entry.get("samples")):
        return f"split {split}: needs samples and shards"
    for k, shard in enumerate(entry["shards"]):
        problem = _shard_problem(split, k, shard, kinds)
        if problem:
            return problem
    total = sum(shard["samples"] for shard in entry["shards"])
    if total != entry["samples"]:
        return f"split {split}: says {entry['samples']} samples, its shards hold {total}"
    return None


def _kind_problem(d) -> str | None:
    if not isinstance(d, dict) or not isinstance(d.get("name"), str) or d.get("dtype") not in _DTYPES \
            or not isinstance(d.get("shape"), list) or not all(_is_int(n, 1) for n in d["shape"]):
        return f"kind {d!r}: needs a name, a dtype ({', '.join(_DTYPES)}) and a shape of positive sizes"
    low, high = d.get("range") or (0, 0)
    if not (_is_int(low, -2**62) and _is_int(high, -2**62) and low <= high):
        return f"kind {d['name']}: range {d.get('range')!r} is not [low, high]"
    return None


def manifest_problem(manifest) -> str | None:
    """Why `manifest` is not a usable stemdl-shards manifest of this version, or None."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f"not a {FORMAT} manifest"
    if manifest.get("version") != VERSION:
        return (f"format version {manifest.get('version')!r} (this stemdl reads version {VERSION}: convert the "
                f"data again)")
    kinds = manifest.get("kinds")
    if not isinstance(kinds, list) or not kinds:
        return "no kinds: the manifest must declare its arrays"
    problem = next((p for p in map(_kind_problem, kinds) if p), None)
    if problem:
        return problem
    names = [d["name"] for d in kinds]
    if len(set(names)) < len(names) or sum(bool(d.get("mapped")) for d in kinds) != 1:
        return "kinds must have distinct names and exactly one mapped (the input)"
    if not isinstance(manifest.get("preprocess"), dict) or not isinstance(manifest.get("workload"), str):
        return "needs the workload's name and its preprocess"
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not splits:
        return "no splits"
    return next((p for p in (_split_problem(s, e, names) for s, e in splits.items()) if p), None)


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

def _load_small(path: Path, kind: Kind, samples: int) -> np.ndarray:
    """A small per-shard array, checked against the manifest."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(path, f"not a readable .npy file ({exc})") from None
    expected = kind.empty().dtype.kind
    if arr.shape != (samples, *kind.shape) or arr.dtype.kind != expected:
        raise DataError(path, f"holds {arr.dtype} {arr.shape}, the manifest says {samples} samples "
                              f"({kind.dtype} {(samples, *kind.shape)})")
    return arr


def _in_memory(values: np.ndarray) -> np.ndarray:
    """What a split hands on: integers as int64, floats as float32 (what models and losses take)."""
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    return values.astype(np.float32) if values.dtype.kind == "f" else values


def _image_header(path: Path) -> tuple[tuple, bool, np.dtype]:
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            return read(f)
    except (OSError, ValueError) as exc:
        raise DataError(path, f"not a readable .npy file ({exc})") from None


class ShardSplit:
    """The samples of one split: small kinds in memory (`fields`), the input kind memory-mapped by shard."""

    reads_are_copies = True  # a read copies mapped bytes: pipelines read in the training process
    reads_into = True  # read(indices, out=buffer) fills a given buffer (stemdl.harness.dali reuses a ring of them)

    def __init__(self, root: Path, name: str, entry: dict, kinds: list[Kind]):
        self.root, self.name = Path(root), name
        self.shards: list[dict] = entry["shards"]
        counts = np.array([s["samples"] for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # shard k: offsets[k:k+2]
        self.shard_of = np.repeat(np.arange(len(self.shards), dtype=np.int32), counts)
        self.input = next(k for k in kinds if k.mapped)
        self.kinds = kinds
        self.dtype, self.image_shape = np.dtype(self.input.dtype), self.input.shape
        small = {k.name: [] for k in kinds if not k.mapped}
        for shard in self.shards:
            for kind in kinds:
                path = self.root / shard["files"][kind.name]["path"]
                if kind.mapped:
                    self._check_input(path, shard["samples"])
                else:
                    small[kind.name].append(_load_small(path, kind, shard["samples"]))
        arrays = {k.name: np.concatenate(small[k.name]) if self.shards else k.empty() for k in kinds if not k.mapped}
        self._names = arrays.pop(NAMES, np.zeros(len(self.shard_of), "S1"))
        for kind in kinds:
            if kind.low is not None and kind.name in arrays:
                self._check_range(kind, arrays[kind.name])
        self.fields = {name: _in_memory(values) for name, values in arrays.items()}
        self._forget_maps()

    def _check_range(self, kind: Kind, values: np.ndarray) -> None:
        """A value out of its declared range names its shard file and its sample."""
        bad = np.flatnonzero((values < kind.low) | (values > kind.high))
        if bad.size:
            i = int(bad[0])
            path = self.root / self.shards[int(self.shard_of[i])]["files"][kind.name]["path"]
            more = f" (and {bad.size - 1} more)" if bad.size > 1 else ""
            raise DataError(path, f"{kind.name} {values[i]} of sample {i - self.offsets[self.shard_of[i]]} "
                                  f"({self.name_of(i)}) is outside {kind.low}..{kind.high}{more}")

    def _forget_maps(self) -> None:
        """This process's maps (none yet): shard k -> its images, and one (1, 3, S, S) view per sample of the
        open shards (None elsewhere), which is what `read` concatenates."""
        self._maps: OrderedDict = OrderedDict()
        self._rows: list = [None] * len(self.shard_of)
        self._viewed = np.zeros(len(self.shards), dtype=bool)
        self._pid = os.getpid()

    def close(self) -> None:
        """Close this process's maps of the images (the next read opens what it needs again); a mapped page
        cannot be evicted from the page cache while any process maps it."""
        self._forget_maps()

    def _check_input(self, path: Path, samples: int) -> None:
        shape, fortran, dtype = _image_header(path)
        if shape != (samples, *self.image_shape) or fortran or dtype != self.dtype:
            raise DataError(path, f"holds {dtype} {shape}{' (Fortran order)' if fortran else ''}, the manifest "
                                  f"says {self.dtype} {(samples, *self.image_shape)}")

    def __len__(self) -> int:
        return len(self.shard_of)

    @cached_property
    def names(self) -> np.ndarray:
        """"file:group" of every sample, as str."""
        return np.char.decode(self._names, "utf-8") if len(self._names) else np.zeros(0, str)

    def name_of(self, i: int) -> str:
        return self._names[i].decode("utf-8", errors="replace")

    def files(self, shard_numbers=None) -> list[str]:
        """Relative paths of the files of these shards (default: all), as the manifest lists them."""
        numbers = range(len(self.shards)) if shard_numbers is None else shard_numbers
        return [self.shards[int(k)]["files"][kind.name]["path"] for k in numbers for kind in self.kinds]

    def mapped_bytes(self, k: int) -> int:
        """Bytes of shard k's input file (what a node reads per epoch)."""
        return int(self.shards[k]["files"][self.input.name]["bytes"])

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
        path = self.root / self.shards[k]["files"][self.input.name]["path"]
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

    @cached_property
    def kinds(self) -> list[Kind]:
        return [Kind.from_json(d) for d in self.manifest["kinds"]]

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def files(self) -> list[FileEntry]:
        """Every data file of every split: (relative path, bytes, sha256)."""
        return [_as_entry(shard["files"][kind.name]) for entry in self.manifest["splits"].values()
                for shard in entry["shards"] for kind in self.kinds]

    def split(self, name: str) -> ShardSplit:
        if name not in self.manifest["splits"]:
            raise DataError(self.root / MANIFEST, f"no split {name!r} (it has {', '.join(self.splits)})")
        if name not in self._splits:
            self._splits[name] = ShardSplit(self.root, name, self.manifest["splits"][name], self.kinds)
        return self._splits[name]

    def with_root(self, new_root: str | os.PathLike, verify: str = "none") -> ShardSet:
        """The same manifest with files read from `new_root` (a staged copy); checked by `verify`."""
        moved = ShardSet(Path(new_root), self.manifest)
        verify_files(moved.root, moved.files(), verify)
        return moved


class ShardWriter:
    """One shard's files, written under temporary names and renamed once complete (fsynced: a shard under
    its final name is whole). The mapped kind's file has its space reserved before it is mapped (a sparse
    map on a full disk is a SIGBUS on some later row; a reservation fails at once), so a shard of any size
    costs no memory; where the file system cannot reserve, its rows are written in order instead. The small
    kinds are gathered and saved at the end. A failed write is a StemdlError naming the file, and leaves
    none of the shard's files (`discard`)."""

    def __init__(self, dst: Path, name: str, capacity: int, kinds: list[Kind]):
        self.base, self.kinds, self.capacity = Path(dst) / name, kinds, capacity
        self.input = next(k for k in kinds if k.mapped)
        self.small: dict[str, list] = {k.name: [] for k in kinds if not k.mapped}
        self.count, self.rows, self._file, self._committed = 0, None, None, []
        with self._writing(self.input.name):
            self.base.parent.mkdir(parents=True, exist_ok=True)
            self._open()

    def _open(self) -> None:
        dtype, shape = np.dtype(self.input.dtype), (self.capacity, *self.input.shape)
        path = self._partial(self.input.name)
        f = open(path, "wb")
        try:
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
            f.flush()
            self._offset = f.tell()
            os.posix_fallocate(f.fileno(), 0, self._offset + dtype.itemsize * int(np.prod(shape)))
        except (AttributeError, OSError) as exc:  # AttributeError: no posix_fallocate (macOS)
            if isinstance(exc, OSError) and exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                f.close()
                raise
            self._file = f  # rows appended after the header: a full disk fails the write, not a page fault
            return
        f.close()
        self.rows = np.lib.format.open_memmap(path, mode="r+")

    @contextmanager
    def _writing(self, kind: str):
        try:
            yield
        except OSError as exc:
            self.discard()
            raise files_mod.write_error(self.path(kind), exc) from None

    def _partial(self, kind: str) -> Path:
        return files_mod.partial_path(self.path(kind))

    def path(self, kind: str) -> Path:
        return self.base.with_name(f"{self.base.name}.{kind}.npy")

    def add(self, values: dict) -> None:
        """One sample: {kind name: its value}, every kind given."""
        row = values[self.input.name]
        if self.rows is not None:
            self.rows[self.count] = row
        else:
            if self.count >= self.capacity:
                raise IndexError(f"shard {self.base}: {self.capacity} samples already written")
            with self._writing(self.input.name):
                self._file.write(np.broadcast_to(np.asarray(row, self.input.dtype), self.input.shape).tobytes())
        for name, gathered in self.small.items():
            gathered.append(values[name])
        self.count += 1

    def _save(self, kind: Kind, values) -> None:
        if kind.dtype == "S":
            arr = np.array(values, dtype="S") if values else kind.empty()
        else:
            arr = np.array(values, dtype=kind.dtype).reshape(len(values), *kind.shape)
        with open(self._partial(kind.name), "wb") as f:
            np.save(f, arr, allow_pickle=False)

    def _close_input(self) -> None:
        if self.rows is not None:
            self.rows.flush()
        elif self._file is not None:
            self._file.close()
        self.rows = self._file = None
        if self.count < self.capacity:  # samples were skipped: keep the rows written
            path = self._partial(self.input.name)
            kind = self.input
            kept = np.fromfile(path, kind.dtype, self.count * int(np.prod(kind.shape)), offset=self._offset)
            with open(path, "wb") as f:
                np.save(f, kept.reshape(self.count, *kind.shape), allow_pickle=False)

    def finish(self) -> dict:
        """Rename every file to its final name; the manifest's "files" entry of the shard."""
        with self._writing(self.input.name):
            self._close_input()
        for kind in self.kinds:
            with self._writing(kind.name):
                if not kind.mapped:
                    self._save(kind, self.small[kind.name])
                files_mod.commit(self._partial(kind.name), self.path(kind.name), durable=True)
            self._committed.append(self.path(kind.name))
        root = self.base.parents[1]
        return {kind.name: {"path": self.path(kind.name).relative_to(root).as_posix(),
                            "bytes": self.path(kind.name).stat().st_size, "sha256": file_sha256(self.path(kind.name))}
                for kind in self.kinds}

    def discard(self) -> None:
        """Remove the shard's files: the temporary ones, and those `finish` renamed (a shard is only
        finished once its caller has recorded it, e.g. in a sidecar)."""
        self.rows = None
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass  # the full disk that brought us here: the file goes anyway
            self._file = None
        for path in [self._partial(kind.name) for kind in self.kinds] + self._committed:
            path.unlink(missing_ok=True)
        self._committed = []
