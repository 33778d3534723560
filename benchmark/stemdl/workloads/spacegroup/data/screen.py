"""Screening the samples a run will read, before the clock starts, and the `--skip-bad` verdict.

    index = load_or_build(root, skip_bad=cfg.harness.skip_bad)       # placeholders for undecodable samples
    rows = np.concatenate([index.select("train"), index.select("dev")])
    result = screen_distributed(index, rows, pixels=True, rank=env.rank, world_size=env.world_size,
                                quiet=not env.is_root)             # or, on one process: screen(index, rows, ...)
    keep = decide(result, len(rows), skip_bad=False)                 # raises for the first bad sample
    keep = decide(result, len(rows), skip_bad=True)                  # or leaves out up to 1 % of them

Why: the `torch` and `dali` pipelines read raw samples during the timed run, where a NaN or an unreadable
group would end the run mid-clock. The screen runs the validator's per-sample checks
(`validate.check_sample`) on every sample the run will read: attributes, dtype and shape always, and the
intensities with `pixels=True`, the expensive part, in parallel over files and ranks. Later copies of a
sample name in another file of the split are bad too. With `skip_bad` (`stemdl run --skip-bad`) bad samples
are left out, up to `max_bad` of them (`--set max_bad=0.05` or a config file; default 1 %). What the
screen finds that the index scan does not: docs/performance.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from stemdl.workloads.spacegroup.data.reader import DataFile, imap_files, shape_problem
from stemdl.workloads.spacegroup.data.validate import check_sample
from stemdl.harness.errors import DataError, StemdlError

MAX_BAD = 0.01  # the share of bad samples `--skip-bad` tolerates
STALE_PLACEHOLDER = ("could not be decoded when the index was built but decodes now (index it again: "
                     "stemdl index DIR)")


@dataclass(frozen=True, eq=False)
class ScreenResult:
    rows: np.ndarray  # the index entries screened, as given
    keep: np.ndarray  # bool, aligned with rows: True = usable
    bad: list[tuple[str, str | None, str]]  # (file, group or None for the whole file, reason), index order
    checked: int  # samples screened (those of an unreadable file included)

    def count(self) -> int:
        """Samples left out."""
        return int(len(self.keep) - np.count_nonzero(self.keep))

    def lines(self) -> list[str]:
        """One `file:group: reason` line per bad entry, as `stemdl validate` prints them."""
        return [str(DataError(file, reason, group)) for file, group, reason in self.bad]


@dataclass(frozen=True)
class ScreenPart:
    """What one rank found: picklable and small (only the problems travel)."""

    files: list[tuple[int, str]]  # (file number, why it cannot be read)
    samples: list[tuple[int, str]]  # (index entry, its reasons joined with "; ")
    checked: int


@dataclass(frozen=True)
class _FileJob:
    path: str
    groups: tuple[str, ...]
    expected: tuple | None  # the shape every stack must have; None: any (3, S, S)
    pixels: bool


# ---- per file (runs in worker processes) ----------------------------------------------------------------

def _screen_file(job: _FileJob) -> tuple[str | None, list[tuple[int, str]]]:
    """(why the file cannot be opened, or None; [(position in job.groups, reasons)]) for one file."""
    try:
        with DataFile(job.path) as f:
            found = []
            for pos, group in enumerate(job.groups):
                check = check_sample(f, group, values=job.pixels)
                reasons = list(check.reasons)
                if check.shape is not None and (problem := shape_problem(check.shape, job.expected)):
                    reasons.append(problem)
                if reasons:
                    found.append((pos, "; ".join(reasons)))
            return None, found
    except DataError as exc:  # opening failed: missing, not HDF5, truncated, no permission
        return exc.reason, []


# ---- which rank screens what ----------------------------------------------------------------------------

def _file_name(index, k: int) -> str:
    return str(index.root / index.files[k])


def _by_file(index, rows: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The files holding `rows` (ascending) and, per file, the positions in `rows` of its entries."""
    if not len(rows):
        return np.zeros(0, np.int64), []
    order = np.argsort(rows, kind="stable")
    files = index.file_index[rows[order]]
    cuts = np.flatnonzero(np.diff(files)) + 1
    return files[np.r_[0, cuts]], np.split(order, cuts)


def file_owners(sizes: Sequence[int], world_size: int) -> np.ndarray:
    """The rank that screens each file: contiguous runs of files with about equal numbers of samples
    (a file goes to the rank whose share holds its middle sample)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    total = sizes.sum()
    if total == 0:
        return np.zeros(len(sizes), dtype=np.int64)
    middle = np.cumsum(sizes) - sizes / 2
    return np.minimum((middle * world_size / total).astype(np.int64), world_size - 1)


def expected_shape(index, rows: np.ndarray) -> tuple | None:
    """The most common stack shape among `rows` if it is a valid (3, S, S), else None (any (3, S, S)).
    Placeholders have no shape and do not vote."""
    rows = np.setdiff1d(rows, index.placeholders())
    if not len(rows):
        return None
    shapes, counts = np.unique(index.shape[rows], axis=0, return_counts=True)
    common = tuple(int(n) for n in shapes[np.argmax(counts)])
    return common if shape_problem(common) is None else None


def screen_part(index, rows: np.ndarray, *, pixels: bool, rank: int = 0, world_size: int = 1,
                workers: int | None = None, quiet: bool = False, image_shape: tuple | None = None) -> ScreenPart:
    """Screen rank `rank`'s share of the files of `rows`; `merge` the parts of all ranks."""
    rows = np.asarray(rows, dtype=np.int64)
    expected = tuple(image_shape) if image_shape is not None else expected_shape(index, rows)
    files, positions = _by_file(index, rows)
    mine = np.flatnonzero(file_owners([len(p) for p in positions], world_size) == rank)
    jobs = [_FileJob(_file_name(index, files[j]), tuple(g.decode() for g in index.group[rows[positions[j]]]),
                     expected, pixels) for j in mine]
    broken, samples = [], []
    for n, (why, found) in imap_files(_screen_file, jobs, workers, label="screen", quiet=quiet):
        j = mine[n]
        if why is not None:
            broken.append((int(files[j]), why))
        samples += [(int(rows[positions[j][pos]]), reasons) for pos, reasons in found]
    return ScreenPart(sorted(broken), sorted(samples), sum(len(positions[j]) for j in mine))


# ---- combining ------------------------------------------------------------------------------------------

def _repeats(index) -> list[tuple[int, int]]:
    """(entry of a later copy, file number of the first copy) for every sample name that occurs in more
    than one file of a split. Names are unique within a split of the real set: a repeat means a file
    copied or mixed in twice, and training on both copies would count the sample twice."""
    wanted = np.arange(len(index))
    first: dict[tuple[int, bytes], int] = {}
    found = []
    for i, code, k, name in zip(wanted.tolist(), index.split[wanted].tolist(),
                                index.file_index[wanted].tolist(), index.group[wanted].tolist()):
        seen = first.setdefault((code, name), k)
        if seen != k:
            found.append((i, seen))
    return found


def merge(index, rows: np.ndarray, parts: Sequence[ScreenPart]) -> ScreenResult:
    """The result of screening `rows` from the parts of all ranks (duplicate names are found here)."""
    rows = np.asarray(rows, dtype=np.int64)
    broken = dict(f for part in parts for f in part.files)
    reasons: dict[int, list[str]] = {}
    for part in parts:
        for i, why in part.samples:
            reasons.setdefault(i, []).append(why)
    # Never train on a placeholder: its label is unknown even where its sample now decodes cleanly (a read
    # error at scan time that has gone, or a file repaired without a change of size and mtime).
    for i in np.intersect1d(rows, index.placeholders()).tolist():
        reasons.setdefault(i, [STALE_PLACEHOLDER])
    screened = set(rows.tolist())
    for i, k in _repeats(index):
        if i in screened:
            reasons.setdefault(i, []).append(f"duplicate sample name, also in {_file_name(index, k)}")
    in_broken = np.isin(index.file_index[rows], list(broken))
    keep = ~in_broken & ~np.isin(rows, list(reasons))
    # Sorted by entry, a file's own problem just before its samples' problems.
    found = [((int(index.file_start[k]), 0), _file_name(index, k), None, why) for k, why in broken.items()]
    found += [((i, 1), _file_name(index, index.file_index[i]), index.group_name(i), "; ".join(why))
              for i, why in reasons.items() if int(index.file_index[i]) not in broken]
    bad = [(file, group, why) for _, file, group, why in sorted(found, key=lambda e: e[0])]
    return ScreenResult(rows, keep, bad, sum(part.checked for part in parts))


def screen(index, rows: np.ndarray, *, pixels: bool, workers: int | None = None, quiet: bool = False,
           image_shape: tuple | None = None) -> ScreenResult:
    """Screen the samples `rows` of `index` in this process (and its `workers`); see the module docstring."""
    part = screen_part(index, rows, pixels=pixels, workers=workers, quiet=quiet, image_shape=image_shape)
    return merge(index, rows, [part])


def screen_distributed(index, rows: np.ndarray, *, pixels: bool, rank: int, world_size: int,
                       workers: int | None = None, quiet: bool = False, image_shape: tuple | None = None,
                       allgather: Callable[[ScreenPart], list[ScreenPart]] | None = None) -> ScreenResult:
    """`screen` with the files shared among the ranks; every rank gets the whole result. Collective.

    `allgather(part) -> [part of rank 0, part of rank 1, ...]`; default: `stemdl.harness.dist.allgather_object`.
    Only the problems travel, so the gather stays small whatever the number of samples.
    """
    if allgather is None:
        from stemdl.harness import dist
        allgather = dist.allgather_object
    part = screen_part(index, rows, pixels=pixels, rank=rank, world_size=world_size, workers=workers,
                       quiet=quiet, image_shape=image_shape)
    parts = allgather(part)
    if len(parts) != world_size:
        raise ValueError(f"allgather gave {len(parts)} parts for world_size {world_size}")
    return merge(index, rows, parts)


# ---- the verdict ----------------------------------------------------------------------------------------

def _percent(share: float) -> str:
    return f"{100 * share:g} %"


def decide(result: ScreenResult, total: int, skip_bad: bool, max_bad: float = MAX_BAD) -> np.ndarray:
    """The keep mask of `result.rows`, or the error that stops the run before the clock.

    Without `skip_bad` any bad sample raises a `DataError` naming the first one. With it, up to `max_bad`
    (a share of `total`) bad samples are left out; more raise a `StemdlError` with the count.
    """
    if not result.bad:
        return result.keep
    file, group, reason = result.bad[0]
    if not skip_bad:
        raise DataError(file, f"{reason} (use --skip-bad to leave out up to {_percent(max_bad)} bad samples)",
                        group)
    share = result.count() / total if total else 1.0
    if share > max_bad:
        first = str(DataError(file, reason, group))
        raise StemdlError(f"{result.count()} of {total} samples ({100 * share:.1f} %) are bad, above the "
                          f"max_bad {_percent(max_bad)} limit (--set max_bad=F); first: {first}")
    return result.keep
