"""The sample index of a data directory, built once and reused, and the `stemdl index` command.

    stemdl index data/real                     # build, or reuse and rescan only changed files
    stemdl index data/real --rebuild --workers 16 --cache-dir /scratch/idx

    index = load_or_build("data/real")         # DataIndex: one entry per sample, natural order
    index = load_or_build("data/real", skip_bad=True)   # a sample it cannot decode becomes a placeholder
    train = index.select("train")              # entry numbers
    index.file_path(i), index.group_name(i), index.label[i], index.shape[i], index.kinematic_class[i]
    index.targets(train)                       # (n, 6) float32: a, b, c (angstrom), alpha, beta, gamma (degrees)

Scanning the real set's 187,155 samples means opening every group of a few thousand files, so the result is
saved beside the data (`DIR/.stemdl_index.npz`) or, where DIR is not writable, in the cache folder
(`--cache-dir`, else `$STEMDL_CACHE/index`, else `~/.cache/stemdl/index`, as `<hash of DIR>.npz`). A saved
index is reused while every file keeps its size and mtime_ns; otherwise only the changed or new files
are rescanned. Scanning reads attributes and dataset shapes, never the images.

A sample whose attributes or dataset cannot be decoded (space_group missing or outside 1..230, no
`cbed_stack`, a dtype or shape that is not float32 (3, H, W), ...) stops the scan with a one-line
`DataError` naming file:group. With `skip_bad` (the run's `--skip-bad`) it is kept instead as a placeholder
entry: label 0 (which no real sample has), shape (0, 0, 0), kinematic class -1, NaN lattice. The run's
screen (`stemdl.workloads.spacegroup.data.screen`) decodes it again, reports the real reason and leaves it out, counted against
`max_bad`. A strict call treats a saved file holding placeholders as changed and rescans it, so it raises
that sample's error as if the tolerant call had never happened. A file that cannot be opened or listed stays
fatal in both modes: its samples cannot be counted, so no share of bad samples can be honoured.

File format (numpy .npz, uncompressed, no pickles): `version`, `root`; per file `files` (paths relative
to the root), `file_size`, `file_mtime_ns`, `file_start` (entries of file k are file_start[k]:file_start[k+1]);
per entry `group` (bytes), `label` (int16), `shape` (int32, (n, 3)), `kinematic_class` (int32, -1 if absent),
`abc` (float32, (n, 3): the attribute abc_angstrom) and `angles` (float32, (n, 3): angles_degree), which the
multi-task heads learn (`stemdl.workloads.spacegroup.heads`). An index saved in an older format version is rebuilt. An index
holding placeholders is saved as version 3 (otherwise the same format), so that an older stemdl, which
does not know them, rebuilds it strictly instead of reading label 0 as a class.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import sys
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np

from stemdl.workloads.spacegroup.data import layout
from stemdl.workloads.spacegroup.data.reader import DataFile, data_files, default_workers, imap_files
from stemdl.harness import files
from stemdl.harness.errors import DataError

INDEX_NAME = ".stemdl_index.npz"
FORMAT_VERSION = 2  # 2: per-entry abc and angles
PLACEHOLDER_VERSION = 3  # version 2 with placeholders; an older stemdl refuses it and rebuilds strictly
PLACEHOLDER_LABEL = 0  # the label of a sample a tolerant scan could not decode; never a real space group
_FILE_FIELDS = ("file_size", "file_mtime_ns", "file_start")
_ENTRY_FIELDS = ("group", "label", "shape", "kinematic_class", "abc", "angles")


class IndexEntry(NamedTuple):
    file: str  # relative to the data root
    group: str
    split: str
    label: int
    shape: tuple[int, int, int]
    kinematic_class: int  # -1 where the sample has none (the real data)


@dataclass(eq=False)
class DataIndex:
    """One entry per sample, in natural file then group order; per-entry fields are numpy arrays."""

    root: Path
    files: list[str]
    file_size: np.ndarray
    file_mtime_ns: np.ndarray
    file_start: np.ndarray
    group: np.ndarray
    label: np.ndarray
    shape: np.ndarray
    kinematic_class: np.ndarray
    abc: np.ndarray  # float32 (n, 3), angstrom
    angles: np.ndarray  # float32 (n, 3), degrees
    path: Path | None = None  # where it is saved; None if it could not be
    status: str = "built"  # "built", "updated" (some files rescanned) or "reused"
    rescanned: int = 0  # files scanned by the call that returned this index

    def __len__(self) -> int:
        return len(self.group)

    @cached_property
    def file_index(self) -> np.ndarray:
        """The file number of every entry."""
        return np.repeat(np.arange(len(self.files), dtype=np.int32), np.diff(self.file_start))

    @cached_property
    def split(self) -> np.ndarray:
        """The split of every entry as an index into `layout.SPLITS` (int8)."""
        codes = np.array([layout.SPLITS.index(layout.split_of(Path(f).name)) for f in self.files], np.int8)
        return codes[self.file_index]

    def select(self, split: str) -> np.ndarray:
        """Entry numbers of one split."""
        return np.flatnonzero(self.split == layout.SPLITS.index(split))

    def file_path(self, i: int) -> Path:
        return self.root / self.files[self.file_index[i]]

    def group_name(self, i: int) -> str:
        return self.group[i].decode()

    def entry(self, i: int) -> IndexEntry:
        return IndexEntry(self.files[self.file_index[i]], self.group_name(i), layout.SPLITS[self.split[i]],
                          int(self.label[i]), tuple(int(n) for n in self.shape[i]), int(self.kinematic_class[i]))

    def placeholders(self) -> np.ndarray:
        """Entry numbers of the samples a tolerant scan (`skip_bad`) could not decode."""
        return np.flatnonzero(self.label == PLACEHOLDER_LABEL)

    def class_counts(self, split: str | None = None) -> np.ndarray:
        """Samples per space group, indexed by label (length 231; entry 0 counts placeholders)."""
        labels = self.label if split is None else self.label[self.select(split)]
        return np.bincount(labels, minlength=layout.N_SPACE_GROUPS + 1)

    def targets(self, rows) -> np.ndarray:
        """The lattice of entries `rows` as float32 (len(rows), 6): a, b, c in angstrom, alpha, beta, gamma
        in degrees (the order of the attributes abc_angstrom and angles_degree)."""
        rows = np.asarray(rows, dtype=np.int64)
        return np.concatenate([self.abc[rows], self.angles[rows]], axis=1)

    def file_block(self, k: int) -> dict[str, np.ndarray]:
        """The entry fields of file k (what a scan of that file returns)."""
        lo, hi = self.file_start[k], self.file_start[k + 1]
        return {name: getattr(self, name)[lo:hi] for name in _ENTRY_FIELDS}

    def save(self, path: Path) -> None:
        """Write atomically: a reader sees the old index or the new one, never half of one."""
        version = PLACEHOLDER_VERSION if len(self.placeholders()) else FORMAT_VERSION
        with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, version=np.int64(version), root=np.str_(str(self.root)),
                     files=np.array(self.files, dtype=str),
                     **{name: getattr(self, name) for name in _FILE_FIELDS + _ENTRY_FIELDS})

    @classmethod
    def load(cls, path: Path, root: Path) -> DataIndex | None:
        """The index saved at `path`, or None if it is missing, damaged or of another format version."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["version"]) not in (FORMAT_VERSION, PLACEHOLDER_VERSION):
                    return None
                arrays = {name: z[name] for name in _FILE_FIELDS + _ENTRY_FIELDS}
                files = z["files"].tolist()
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
            return None
        index = cls(root=root, files=files, path=path, **arrays)
        consistent = (len(index.file_start) == len(files) + 1 and index.file_start[-1] == len(index.group)
                      and all(len(arrays[name]) == len(index.group) for name in _ENTRY_FIELDS))
        return index if consistent else None


# ---- where the index lives ------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """`$STEMDL_CACHE/index`, else `$XDG_CACHE_HOME/stemdl/index`, else `~/.cache/stemdl/index`."""
    if os.environ.get("STEMDL_CACHE"):
        return Path(os.environ["STEMDL_CACHE"]) / "index"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "stemdl" / "index"


def cache_path(root: Path, cache_dir: Path | str | None = None) -> Path:
    """The index file of `root` in a cache folder, named by a hash of its absolute path."""
    digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{digest}.npz"


def save_locations(root: Path, cache_dir: Path | str | None = None) -> list[Path]:
    """Where to save, in order of preference: an explicit cache folder, else beside the data, else the cache."""
    if cache_dir is not None:
        return [cache_path(root, cache_dir)]
    return [root / INDEX_NAME, cache_path(root)]


def _save_first(index: DataIndex, locations: list[Path]) -> Path | None:
    errors = []
    for path in locations:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            index.save(path)
            return path
        except OSError as exc:  # read-only data folder, full disk, no home: try the next place
            errors.append(f"{path}: {exc.strerror or exc}")
    print(f"stemdl: warning: index not saved ({'; '.join(errors)})", file=sys.stderr)
    return None


# ---- building -------------------------------------------------------------------------------------------

_PLACEHOLDER = (PLACEHOLDER_LABEL, (0, 0, 0), -1, (np.nan,) * 3, (np.nan,) * 3)


def _sample_row(f: DataFile, group: str, skip_bad: bool) -> tuple:
    """(group, label, shape, kinematic class, abc, angles) of one sample, or its placeholder."""
    try:
        rec, shape = f.record(group), f.shape(group)
    except DataError:
        if not skip_bad:
            raise
        return (group,) + _PLACEHOLDER  # the screen decodes it again and reports why
    kc = -1 if rec.kinematic_class is None else rec.kinematic_class
    return (group, rec.space_group, shape, kc, rec.abc_angstrom, rec.angles_degree)


def _scan_file(path: str, skip_bad: bool = False) -> dict[str, np.ndarray]:
    """Labels, shapes, kinematic classes and lattices of one file's samples: attributes and shapes only."""
    try:
        with DataFile(path) as f:
            rows = [_sample_row(f, g, skip_bad) for g in f.groups]
    except DataError as exc:
        if not skip_bad or exc.group is not None:
            raise
        raise DataError(exc.path, f"{exc.reason} (--skip-bad leaves out samples, not a file whose samples "
                                  "cannot be counted)") from None
    return {
        "group": np.array([r[0] for r in rows], dtype="S") if rows else np.zeros(0, "S1"),
        "label": np.array([r[1] for r in rows], dtype=np.int16),
        "shape": np.array([r[2] for r in rows], dtype=np.int32).reshape(-1, 3),
        "kinematic_class": np.array([r[3] for r in rows], dtype=np.int32),
        "abc": np.array([r[4] for r in rows], dtype=np.float32).reshape(-1, 3),
        "angles": np.array([r[5] for r in rows], dtype=np.float32).reshape(-1, 3),
    }


def _changed(saved: DataIndex, files: list[str], stats: np.ndarray, strict: bool) -> list[int]:
    """Numbers of the files (in `files`) that the saved index does not hold as they are now. For a strict
    call a file with placeholders is stale too: its strict rescan raises the sample's own error."""
    known = {f: (s, m) for f, s, m in zip(saved.files, saved.file_size.tolist(), saved.file_mtime_ns.tolist())}
    if strict:
        for k in np.unique(saved.file_index[saved.placeholders()]).tolist():
            del known[saved.files[k]]
    return [k for k, f in enumerate(files) if known.get(f) != tuple(stats[k].tolist())]


def _best_saved(root: Path, cache_dir, files: list[str], stats: np.ndarray,
                strict: bool) -> tuple[DataIndex | None, list[int]]:
    """The saved index needing the fewest rescans (beside the data or in the cache) and its stale files."""
    candidates = dict.fromkeys(save_locations(root, cache_dir) + [root / INDEX_NAME])
    best, best_todo = None, list(range(len(files)))
    for path in candidates:
        saved = DataIndex.load(path, root) if path.is_file() else None
        todo = _changed(saved, files, stats, strict) if saved is not None else None
        if todo is not None and (best is None or len(todo) < len(best_todo)):
            best, best_todo = saved, todo
    return best, best_todo


def _assemble(root: Path, files: list[str], stats: np.ndarray, blocks: list[dict]) -> DataIndex:
    sizes = np.array([len(b["label"]) for b in blocks], dtype=np.int64)
    start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    fields = {name: np.concatenate([b[name] for b in blocks]) for name in _ENTRY_FIELDS}
    return DataIndex(root=root, files=files, file_size=stats[:, 0].copy(), file_mtime_ns=stats[:, 1].copy(),
                     file_start=start, **fields)


def load_or_build(root: str | os.PathLike, workers: int | None = None, rebuild: bool = False,
                  cache_dir: str | os.PathLike | None = None, quiet: bool = False,
                  skip_bad: bool = False) -> DataIndex:
    """The index of `root`: reused if saved and current, else (re)built by scanning only what changed.

    A bad file or sample raises `DataError` naming file:group (`stemdl validate` lists every problem).
    With `skip_bad` a sample that cannot be decoded becomes a placeholder instead (see the module docstring).
    """
    root = Path(root).resolve()
    paths = data_files(root)
    files = [p.relative_to(root).as_posix() for p in paths]
    stats = np.array([(st.st_size, st.st_mtime_ns) for st in (p.stat() for p in paths)], dtype=np.int64)
    saved, todo = ((None, list(range(len(files)))) if rebuild
                   else _best_saved(root, cache_dir, files, stats, strict=not skip_bad))
    if saved is not None and not todo and saved.files == files:
        saved.status, saved.rescanned = "reused", 0
        return saved
    blocks: list[dict | None] = [None] * len(files)
    if saved is not None:
        where = {f: k for k, f in enumerate(saved.files)}
        for k in set(range(len(files))) - set(todo):
            blocks[k] = saved.file_block(where[files[k]])
    if todo:
        jobs = [str(paths[k]) for k in todo]
        scan = functools.partial(_scan_file, skip_bad=True) if skip_bad else _scan_file
        for pos, block in imap_files(scan, jobs, workers, label="index", quiet=quiet):
            blocks[todo[pos]] = block
    index = _assemble(root, files, stats, blocks)
    index.status = "built" if saved is None else "updated"
    index.rescanned = len(todo)
    index.path = _save_first(index, save_locations(root, cache_dir))
    return index


# ---- the `stemdl index` command -------------------------------------------------------------------------

def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="data directory (train/, dev/, test/ folders or flat files)")
    parser.add_argument("--workers", type=int, default=default_workers(), metavar="N",
                        help="processes scanning files in parallel (default: %(default)s)")
    parser.add_argument("--rebuild", action="store_true", help="ignore any saved index and scan every file")
    parser.add_argument("--cache-dir", metavar="D", help="keep the index in D instead of beside the data")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def describe(index: DataIndex) -> list[str]:
    """What `stemdl index` prints: where the index is, how it was obtained, and samples per split."""
    n_files = len(index.files)
    how = {"reused": "reused, no file rescanned",
           "updated": f"updated, {index.rescanned} of {n_files} files rescanned",
           "built": f"built, {n_files} files scanned"}[index.status]
    lines = [f"index: {index.path or 'not saved'} ({how})"]
    for split in layout.SPLITS:
        counts = index.class_counts(split)
        if counts.sum():
            lines.append(f"{split}: {counts.sum()} samples, {np.count_nonzero(counts)} classes")
    counts = index.class_counts()
    lines.append(f"all: {counts.sum()} samples in {n_files} files, {np.count_nonzero(counts)} classes")
    return lines


def run(args: argparse.Namespace) -> int:
    index = load_or_build(args.dir, workers=args.workers, rebuild=args.rebuild, cache_dir=args.cache_dir,
                          quiet=args.quiet)
    print("\n".join(describe(index)))
    return 0
