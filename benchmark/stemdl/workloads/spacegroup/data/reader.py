"""Finding and reading the HDF5 files of the public STEMDL layout (names and attributes: `layout`).

    files = data_files("data/real", split="train")        # natural order: batch_train_2 before _10
    with DataFile(files[0]) as f:
        for group in f.groups:                               # sample_2_0 before sample_10_0
            record, stack = f.record(group), f.stack(group)  # SampleRecord, float32 (3, H, W)

    read_record(path, "sample_0_0"); read_stack(path, "sample_0_0")   # one-off reads

Everything that can go wrong with a file (missing, not HDF5, truncated, unreadable, malformed sample)
surfaces as one `DataError` line naming the file and the group, never as an h5py traceback.
`imap_files` runs one function per file in worker processes; the indexer and the validator share it.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import h5py
import numpy as np

from stemdl.workloads.spacegroup.data import layout
from stemdl.harness.errors import DataError
from stemdl.harness.progress import Progress

PathLike = str | os.PathLike
FILE_PATTERN = "batch_{train|dev|test}_N.h5"

# h5py errors that mean "this file or object cannot be read", as opposed to a bug in stemdl.
H5_ERRORS = (OSError, RuntimeError, KeyError, TypeError, ValueError)


# ---- file discovery -------------------------------------------------------------------------------------

def file_key(path: PathLike) -> tuple:
    """Sort key of a data file: split (train, dev, test), then N numerically, then the full path."""
    m = layout.FILE_RE.match(Path(path).name)
    if m is None:
        return (len(layout.SPLITS), 0, str(path))
    return (layout.SPLITS.index(m.group(1)), int(m.group(2)), str(path))


def group_key(name: str) -> tuple:
    """Sort key of a sample group: (I, J) numerically; HDF5 itself lists sample_10_0 before sample_2_0."""
    m = layout.GROUP_RE.match(name)
    return (int(m.group(1)), int(m.group(2)), name) if m else (-1, -1, name)


def _files_in_dir(root: Path) -> list[Path]:
    # The real set keeps train/, dev/, test/ folders; synthetic or hand-made sets may be flat. Accept both.
    found = [p for p in root.iterdir() if layout.FILE_RE.match(p.name) and p.is_file()]
    for split in layout.SPLITS:
        sub = root / split
        if sub.is_dir():
            found += [p for p in sub.iterdir() if layout.FILE_RE.match(p.name) and p.is_file()]
    return found


def _listed_files(paths: Iterable[PathLike]) -> list[Path]:
    found = []
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise DataError(path, "no such file" if not path.exists() else "not a file")
        if not layout.FILE_RE.match(path.name):
            raise DataError(path, f"not a data file name (expected {FILE_PATTERN})")
        found.append(path)
    return list(dict.fromkeys(found))  # the same file twice would count its samples twice


def data_files(source: PathLike | Iterable[PathLike], split: str | None = None) -> list[Path]:
    """The data files of a directory (with split folders or flat) or of a list of paths, in natural order.

    A missing directory, a directory without data files, a listed file that is missing or misnamed, or no
    file of the requested split raises `DataError` naming it.
    """
    if isinstance(source, (str, os.PathLike)):
        where = root = Path(source)
        if not root.is_dir():
            raise DataError(root, "no such directory" if not root.exists() else "not a directory")
        files = _files_in_dir(root)
        if not files:
            raise DataError(root, f"no {FILE_PATTERN} files here or in its train/, dev/, test/ folders")
    else:
        files = _listed_files(source)
        if not files:
            raise DataError("(no files)", "no data files given")
        where = files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more files)"
    if split is not None:
        if split not in layout.SPLITS:
            raise DataError(where, f"unknown split {split!r} (expected one of {', '.join(layout.SPLITS)})")
        files = [p for p in files if layout.split_of(p.name) == split]
        if not files:
            raise DataError(where, f"no {split} files")
    return sorted(files, key=file_key)


# ---- opening and reading --------------------------------------------------------------------------------

def h5_reason(exc: BaseException) -> str:
    """The informative part of an h5py/HDF5 error, e.g. 'truncated file: eof = 10, ...' or 'Permission denied'."""
    text = str(exc)
    m = re.search(r"error message = '([^']*)'", text)  # OS-level failures carry errno text here
    if m:
        return m.group(1)
    m = re.search(r"\(([^()]*)\)", text)  # HDF5 puts the cause in parentheses after its own words
    if m:
        return m.group(1).strip()
    return text.splitlines()[0].strip() if text.strip() else type(exc).__name__


def open_h5(path: PathLike, name: str | None = None) -> h5py.File:
    """The file opened read-only; `DataError` ('not a readable HDF5 file (...)') if that fails."""
    try:
        return h5py.File(path, "r")
    except H5_ERRORS as exc:
        raise DataError(name or path, f"not a readable HDF5 file ({h5_reason(exc)})") from None


def sample_groups(h5: h5py.Group) -> list[str]:
    """Names of the `sample_I_J` members in natural order; anything else is not a sample and is skipped."""
    return sorted((n for n in h5 if layout.GROUP_RE.match(n)), key=group_key)


def dataset_problems(group: h5py.Group) -> list[str]:
    """What is wrong with the group's image dataset apart from its shape (see `shape_problem`)."""
    obj = group.get(layout.DATASET)
    if obj is None:
        return [f"missing dataset {layout.DATASET}"]
    if not isinstance(obj, h5py.Dataset):
        return [f"{layout.DATASET} is not a dataset"]
    if obj.shape is None:  # an HDF5 null dataspace (h5py.Empty): no shape, no data
        return [f"{layout.DATASET} is empty (null dataspace)"]
    if obj.dtype != np.float32:
        return [f"{layout.DATASET} has dtype {obj.dtype}, expected float32"]
    return []


def shape_problem(shape: tuple, expected: tuple | None = None) -> str | None:
    """Why `shape` is not the expected (3, H, W) image shape, or None. `expected=None`: any square H = W."""
    shape = tuple(int(n) for n in shape)
    if expected is not None:
        ok = shape == tuple(expected)
        want = str(tuple(expected))
    else:
        ok = len(shape) == 3 and shape[0] == layout.N_PATTERNS and shape[1] == shape[2] > 0
        want = f"({layout.N_PATTERNS}, S, S)"
    return None if ok else f"{layout.DATASET} has shape {shape}, expected {want}"


class DataFile:
    """One data file held open, to read many samples without reopening it. A context manager.

    `name` is what error messages call the file (default: the path as given).
    """

    def __init__(self, path: PathLike, name: str | None = None):
        self.path = Path(path)
        self.name = name or str(path)
        self.split = layout.split_of(self.path.name)
        self._h5 = open_h5(self.path, self.name)
        self._groups: list[str] | None = None

    def __enter__(self) -> DataFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._h5.close()

    @property
    def groups(self) -> list[str]:
        """The sample groups in natural order."""
        if self._groups is None:
            try:
                self._groups = sample_groups(self._h5)
            except H5_ERRORS as exc:
                raise DataError(self.name, f"cannot list the samples ({h5_reason(exc)})") from None
        return self._groups

    def other_names(self) -> list[str]:
        """Top-level names that are not sample groups (the validator reports them)."""
        try:
            return sorted(n for n in self._h5 if not layout.GROUP_RE.match(n))
        except H5_ERRORS as exc:
            raise DataError(self.name, f"cannot list the samples ({h5_reason(exc)})") from None

    def group(self, group: str) -> h5py.Group:
        try:
            obj = self._h5.get(group)
        except H5_ERRORS as exc:
            raise DataError(self.name, f"unreadable ({h5_reason(exc)})", group) from None
        if obj is None:
            raise DataError(self.name, "no such sample", group)
        if not isinstance(obj, h5py.Group):
            raise DataError(self.name, "is not an HDF5 group", group)
        return obj

    def record(self, group: str) -> layout.SampleRecord:
        """The sample's attributes, decoded and checked by `layout.decode_attrs`."""
        g = self.group(group)
        try:
            attrs = dict(g.attrs)
        except H5_ERRORS as exc:
            raise DataError(self.name, f"unreadable attributes ({h5_reason(exc)})", group) from None
        return layout.decode_attrs(attrs, self.name, group)

    def dataset(self, group: str) -> h5py.Dataset:
        """The sample's image dataset, checked to be float32 (3, H, W) without reading it."""
        g = self.group(group)
        try:
            problems = dataset_problems(g)
            ds = None if problems else g[layout.DATASET]
        except H5_ERRORS as exc:
            raise DataError(self.name, f"unreadable {layout.DATASET} ({h5_reason(exc)})", group) from None
        if ds is not None and (len(ds.shape) != 3 or ds.shape[0] != layout.N_PATTERNS):
            problems = [f"{layout.DATASET} has shape {ds.shape}, expected ({layout.N_PATTERNS}, H, W)"]
        if problems:
            raise DataError(self.name, "; ".join(problems), group)
        return ds

    def shape(self, group: str) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.dataset(group).shape)

    def stack(self, group: str, out: np.ndarray | None = None) -> np.ndarray:
        """The float32 (3, H, W) image stack, read straight into `out` (allocated if None, else reused)."""
        ds = self.dataset(group)
        if out is None:
            try:
                out = np.empty(ds.shape, dtype=np.float32)
            except MemoryError:  # a tiny file can declare a huge, never-written dataset
                raise DataError(self.name, f"{layout.DATASET} of shape {ds.shape} does not fit in memory",
                                group) from None
        elif out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 array, got {out.dtype}")
        elif out.shape != ds.shape:  # the data disagrees with the size the caller planned for
            raise DataError(self.name, f"{layout.DATASET} has shape {ds.shape}, expected {out.shape}", group)
        try:
            # One contiguous read into the caller's buffer: no temporary array, no copy.
            ds.read_direct(out)
        except H5_ERRORS as exc:
            raise DataError(self.name, f"unreadable {layout.DATASET} ({h5_reason(exc)})", group) from None
        return out


def read_record(path: PathLike, group: str) -> layout.SampleRecord:
    """One sample's attributes (opens and closes the file; use `DataFile` for many)."""
    with DataFile(path) as f:
        return f.record(group)


def read_stack(path: PathLike, group: str) -> np.ndarray:
    """One sample's float32 (3, H, W) image stack (opens and closes the file; use `DataFile` for many)."""
    with DataFile(path) as f:
        return f.stack(group)


# ---- parallel work over files ---------------------------------------------------------------------------

def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def die_with_parent(parent: int) -> None:
    """A pool worker's initializer: be killed with the parent (`parent`, its pid). A worker outlives a
    parent killed by SIGKILL, and then waits for work forever; on Linux the kernel ends it instead
    (PR_SET_PDEATHSIG), and a parent already gone by now ends it here."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # no prctl: the callers' own os.getppid() checks remain
    if os.getppid() != parent:
        os._exit(1)


def imap_files(fn: Callable, items: Sequence, workers: int | None = None, label: str = "",
               quiet: bool = False) -> Iterator[tuple[int, object]]:
    """Yield (position, fn(item)) for every item as each finishes, with progress over files on stderr.

    fn must be a module-level function (it runs in worker processes). A `DataError` from fn is raised
    here; leaving the loop (that error included) cancels the items not yet started.
    """
    workers = max(1, min(workers or default_workers(), len(items)))
    with Progress(len(items), what="files", label=label, quiet=quiet) as bar:
        if workers == 1:  # in-process: no start-up cost, and tracebacks stay readable
            for i, item in enumerate(items):
                result = fn(item)
                bar.update(1)
                yield i, result
            return
        pool = ProcessPoolExecutor(max_workers=workers, initializer=die_with_parent, initargs=(os.getpid(),))
        try:
            pending = {pool.submit(fn, item): i for i, item in enumerate(items)}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    result = fut.result()  # a worker's DataError is raised here, intact
                    bar.update(1)
                    yield i, result
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
