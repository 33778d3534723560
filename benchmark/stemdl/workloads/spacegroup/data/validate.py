"""`stemdl validate`: check every sample of a data set, summarize it, and list every bad sample.

    stemdl validate data/real                         # a directory (train/, dev/, test/ folders or flat)
    stemdl validate a/batch_train_0.h5 a/batch_dev_0.h5 --image-size 512 --json report.json

Each file is checked in a worker process, one sample at a time and one pattern at a time, so memory stays
at one image whatever the file size. A sample's checks are independent of each other (a bad attribute
does not hide a bad image) and all its reasons are joined with "; ". A file that is not readable HDF5 is
one bad entry and the other files are still checked. Output: the summary, then one `file:group: reason`
line per bad sample, in natural file and group order whatever the number of workers. Exit status 0 if
nothing is bad, 1 otherwise (2 if the arguments name no data, as for any stemdl error).

Damage that leaves values finite and non-negative (a flipped exponent bit turns 0.0039 into 1.3e36) is
caught two ways: values above a physical ceiling are bad in any data, and a folder made by `stemdl synth`
has each file's SHA-256 in its synth.json, which is checked, so that any changed byte is found.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np

from stemdl.workloads.spacegroup.data import layout
from stemdl.harness.synthset import MANIFEST, recorded_digests
from stemdl.harness.synthset import sha256 as synth_sha256
from stemdl.workloads.spacegroup.data.reader import (H5_ERRORS, DataFile, data_files, dataset_problems, default_workers, file_key,
                                h5_reason, imap_files, shape_problem)
from stemdl.harness import files
from stemdl.harness.errors import DataError, StemdlError

# No measured intensity comes near this. The public patterns are normalized to sum to 1 (docs/data.md), so
# every value is <= 1; raw detector counts would be < 1e12. The preprocessing multiplies by the pixel count
# (262,144 at 512x512) before its log, so a float32 above 3.4e38 / 262,144 = 1.3e33 turns into inf there.
# 1e30 sits far above any real value and below that overflow.
CEILING = 1e30
SHA_MISMATCH = "sha256 differs from synth.json: changed or damaged since it was generated"


@dataclass
class BadEntry:
    file: str
    group: str | None  # None: the whole file
    reason: str

    def line(self) -> str:
        file, group = _shown(self.file), None if self.group is None else _shown(self.group)
        return f"{file}: {self.reason}" if group is None else f"{file}:{group}: {self.reason}"


def _shown(name: str) -> str:
    """The name as it is, or escaped and quoted if it holds a line break or other unprintable character."""
    return name if name.isprintable() else ascii(name)


@dataclass
class SampleCheck:
    """What a worker found in one sample; the shape is judged later, once the common shape is known."""

    group: str
    label: int = -1  # -1 when the attributes are bad
    material: str | None = None
    shape: tuple | None = None  # None when there is no readable dataset
    reasons: list[str] = field(default_factory=list)


@dataclass
class FileCheck:
    name: str  # as the report names it
    split: str
    error: str | None = None  # the file as a whole is unreadable
    sha256_ok: bool | None = None  # None: synth.json lists no checksum for it
    samples: list[SampleCheck] = field(default_factory=list)
    others: list[str] = field(default_factory=list)  # top-level names that are not sample_I_J


@dataclass
class Report:
    summary: dict
    bad: list[BadEntry]

    @property
    def ok(self) -> bool:
        return not self.bad


# ---- per-file checks (run in workers) -------------------------------------------------------------------

def _slabs(ds: h5py.Dataset):
    """The dataset one slab of axis 0 (one pattern) at a time, read into one reused buffer."""
    if ds.ndim <= 1:  # not an image stack at all; small in practice, read whole
        yield np.asarray(ds[()])
        return
    buf = np.empty(ds.shape[1:], dtype=ds.dtype)
    for i in range(ds.shape[0] if buf.size else 0):
        ds.read_direct(buf, np.s_[i])
        yield buf


def value_problems(ds: h5py.Dataset) -> list[str]:
    """Non-finite, negative and implausibly large intensities, with memory for one pattern whatever the
    dataset's size."""
    if ds.dtype.kind not in "iuf":
        return []
    nonfinite = negative = implausible = 0
    lowest, highest = np.inf, -np.inf
    for slab in _slabs(ds):
        if not slab.size:
            continue
        lo, hi = slab.min(), slab.max()  # both propagate NaN: a clean slab costs two vector passes
        values = slab
        if not (np.isfinite(lo) and np.isfinite(hi)):
            finite = np.isfinite(slab)
            nonfinite += int(slab.size - np.count_nonzero(finite))
            values = slab[finite]
            lo, hi = (values.min(), values.max()) if values.size else (0, 0)
        if lo < 0:
            negative += int(np.count_nonzero(values < 0))
            lowest = min(lowest, float(lo))
        if hi > CEILING:
            implausible += int(np.count_nonzero(values > CEILING))
            highest = max(highest, float(hi))
    problems = []
    if nonfinite:
        problems.append(f"{layout.DATASET} has {nonfinite} non-finite values (NaN or inf)")
    if negative:
        problems.append(f"{layout.DATASET} has {negative} negative values (min {lowest:g})")
    if implausible:
        problems.append(f"{layout.DATASET} has {implausible} implausible values "
                        f"(max {highest:.2g}, above {CEILING:g})")
    return problems


def check_sample(f: DataFile, name: str, values: bool = True) -> SampleCheck:
    """Every problem of one sample (attributes, dataset, and with `values` its intensities); never raises
    for bad data. `values=False` reads no image data: the run's quick screen (`stemdl.workloads.spacegroup.data.screen`)."""
    check = SampleCheck(name)
    try:
        group = f.group(name)
    except DataError as exc:
        check.reasons.append(exc.reason)
        return check
    try:
        rec = f.record(name)
        check.label, check.material = rec.space_group, rec.material
    except DataError as exc:
        check.reasons.append(exc.reason)
    try:
        check.reasons += dataset_problems(group)
        ds = group.get(layout.DATASET)
        # A wrong dtype still gets its shape and values checked; a null dataspace has neither.
        if isinstance(ds, h5py.Dataset) and ds.shape is not None:
            check.shape = tuple(int(n) for n in ds.shape)
            if values:
                check.reasons += value_problems(ds)
    except H5_ERRORS as exc:
        check.reasons.append(f"unreadable {layout.DATASET} ({h5_reason(exc)})")
    except MemoryError:  # a tiny file can declare a huge, never-written dataset: one pattern will not fit
        check.reasons.append(f"{layout.DATASET} of shape {check.shape} is too large to check")
    return check


def _check_file(job: tuple[str, str, str | None]) -> FileCheck:
    path, name, digest = job
    check = FileCheck(name, layout.split_of(Path(path).name))
    try:
        if digest is not None:  # first: the HDF5 reads below then come from the page cache
            check.sha256_ok = synth_sha256(path) == digest
    except OSError as exc:
        check.error = f"unreadable ({exc.strerror or exc})"
        return check
    try:
        with DataFile(path, name) as f:
            check.others = f.other_names()
            check.samples = [check_sample(f, g) for g in f.groups]
    except DataError as exc:  # the file itself: not HDF5, truncated, unreadable, unlistable
        check.error = exc.reason
    return check


# ---- combining the files --------------------------------------------------------------------------------

def _named_files(sources: Sequence[str | os.PathLike]) -> list[tuple[Path, str]]:
    """(path, name in the report): relative to the root for one directory, else as given."""
    if len(sources) == 1 and Path(sources[0]).is_dir():
        root = Path(sources[0])
        return [(p, p.relative_to(root).as_posix()) for p in data_files(root)]
    named = {}
    for src in sources:
        paths = data_files(src) if Path(src).is_dir() else data_files([src])
        named.update((p, str(p)) for p in paths)
    return sorted(named.items(), key=lambda item: file_key(item[0]))


def _shapes(checks: list[FileCheck], image_size: int | None) -> tuple[tuple | None, tuple | None, int]:
    """(expected shape, most common shape, its count). The most common must be (3, S, S) to be expected."""
    counts = Counter(s.shape for c in checks for s in c.samples if s.shape is not None)
    common, n = counts.most_common(1)[0] if counts else (None, 0)
    if image_size is not None:
        return (layout.N_PATTERNS, image_size, image_size), common, n
    return (common if common is not None and shape_problem(common) is None else None), common, n


def _bad_entries(checks: list[FileCheck], expected: tuple | None) -> list[BadEntry]:
    bad, first_seen = [], {}
    for c in checks:
        whole = [r for r in (c.error, SHA_MISMATCH if c.sha256_ok is False else None) if r]
        if whole:
            bad.append(BadEntry(c.name, None, "; ".join(whole)))
        for s in c.samples:
            reasons = list(s.reasons)
            if s.shape is not None and (problem := shape_problem(s.shape, expected)):
                reasons.append(problem)
            # Names are unique within a split in the real set: a repeat means a file copied or mixed in twice.
            other = first_seen.setdefault((c.split, s.group), c.name)
            if other != c.name:
                reasons.append(f"duplicate sample name, also in {other}")
            if reasons:
                bad.append(BadEntry(c.name, s.group, "; ".join(reasons)))
        bad += [BadEntry(c.name, n, "not a sample group (name is not sample_I_J)") for n in c.others]
    return bad


def _split_summary(checks: list[FileCheck], bad: list[BadEntry]) -> dict:
    bad_per_file = Counter(b.file for b in bad)
    summary = {}
    for split in layout.SPLITS:
        mine = [c for c in checks if c.split == split]
        if not mine:
            continue
        samples = [s for c in mine for s in c.samples]
        classes = Counter(s.label for s in samples if s.label > 0)
        materials = Counter(s.material for s in samples if s.material is not None)
        summary[split] = {
            "files": len(mine),
            "samples": len(samples),
            "bad": sum(bad_per_file[c.name] for c in mine),
            "classes": len(classes),
            "imbalance": max(classes.values()) / min(classes.values()) if classes else None,
            "repeated_materials": sum(n - 1 for n in materials.values()),
            "class_counts": {str(k): v for k, v in sorted(classes.items())},
        }
    return summary


def _digests(sources: Sequence[str | os.PathLike]) -> tuple[dict[str, str], list[BadEntry]]:
    """The SHA-256 that a data folder's synth.json records per file (relative names), and its own problem."""
    if len(sources) != 1 or not Path(sources[0]).is_dir():
        return {}, []
    try:
        return recorded_digests(Path(sources[0])), []
    except DataError as exc:
        return {}, [BadEntry(MANIFEST, None, exc.reason)]


def validate(sources: Sequence[str | os.PathLike], workers: int | None = None, image_size: int | None = None,
             quiet: bool = False, checksums: bool = True) -> Report:
    """Check every sample of the data directory or files in `sources`; see the module docstring.
    `checksums=False` skips comparing files with the SHA-256 in a synth.json."""
    named = _named_files(list(sources))
    digests, manifest_bad = _digests(sources) if checksums else ({}, [])
    checks: list[FileCheck | None] = [None] * len(named)
    jobs = [(str(p), name, digests.get(name)) for p, name in named]
    for pos, check in imap_files(_check_file, jobs, workers, label="validate", quiet=quiet):
        checks[pos] = check
    expected, common, n_common = _shapes(checks, image_size)
    bad = manifest_bad + _bad_entries(checks, expected)
    summary = {
        "ok": not bad,
        "files": len(checks),
        "samples": sum(len(c.samples) for c in checks),
        "bad": len(bad),
        "image_shape": list(expected) if expected else None,
        "image_shape_from": "--image-size" if image_size is not None else "most common",
        "most_common_shape": list(common) if common else None,
        "most_common_count": n_common,
        "sha256_checked": sum(c.sha256_ok is not None for c in checks),
        "sha256_differ": sum(c.sha256_ok is False for c in checks),
        "splits": _split_summary(checks, bad),
    }
    return Report(summary, bad)


# ---- output ---------------------------------------------------------------------------------------------

def _shape_text(summary: dict) -> str:
    common = summary["most_common_shape"]
    if common is None:
        return "none (no readable image)"
    counted = f"{summary['most_common_count']} of {summary['samples']} samples"
    if summary["image_shape_from"] == "--image-size":
        return f"{tuple(summary['image_shape'])} (from --image-size; most common {tuple(common)}: {counted})"
    if summary["image_shape"] is None:
        return f"none valid (most common {tuple(common)}: {counted}; expected ({layout.N_PATTERNS}, S, S))"
    return f"{tuple(common)} (the most common: {counted})"


def format_summary(summary: dict) -> list[str]:
    lines = [f"{summary['files']} files, {summary['samples']} samples",
             f"{'split':<6} {'files':>6} {'samples':>8} {'classes':>8} {'max/min':>8} {'bad':>6}"]
    for split, s in summary["splits"].items():
        ratio = f"{s['imbalance']:.1f}" if s["imbalance"] is not None else "-"
        lines.append(f"{split:<6} {s['files']:>6} {s['samples']:>8} {s['classes']:>8} {ratio:>8} {s['bad']:>6}")
    lines.append(f"image shape: {_shape_text(summary)}")
    repeats = ", ".join(f"{k} {s['repeated_materials']}" for k, s in summary["splits"].items())
    lines.append(f"samples repeating a material of their split (warning only): {repeats}")
    if summary["sha256_checked"]:
        lines.append(f"sha256: {summary['sha256_checked']} of {summary['files']} files checked against "
                     f"{MANIFEST}, {summary['sha256_differ']} differ")
    lines.append("result: all samples good" if summary["ok"] else f"result: {summary['bad']} bad entries")
    return lines


def check_json_target(path: str | os.PathLike) -> None:
    """Before the work: --json FILE can be written (its folder made if absent), or one line naming it."""
    path = Path(path)
    if path.is_dir():
        raise StemdlError(f"--json {path}: is a folder")
    if path.parent.exists() and not path.parent.is_dir():
        raise StemdlError(f"--json {path}: {path.parent} is not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = files.partial_path(path)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StemdlError(f"--json {path}: cannot write it ({files.write_problem(exc, path)})") from None


def write_json(path: str | os.PathLike, report: Report) -> None:
    """The summary and the bad list as JSON, written under a temporary name then renamed."""
    text = json.dumps({"summary": report.summary, "bad": [asdict(b) for b in report.bad]}, indent=1)
    try:
        files.write_atomic(path, text)
    except OSError as exc:  # what atomic_path does not say in words already (a folder put there since)
        raise files.write_error(path, exc) from None


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="+", metavar="DIR_OR_FILES",
                        help="a data directory, or batch_{train|dev|test}_N.h5 files")
    parser.add_argument("--workers", type=int, default=default_workers(), metavar="N",
                        help="processes checking files in parallel (default: %(default)s)")
    parser.add_argument("--image-size", type=int, metavar="S",
                        help="require images of shape (3, S, S) (default: the most common shape)")
    parser.add_argument("--json", metavar="FILE", help="also write the summary and the bad list as JSON")
    parser.add_argument("--no-checksums", action="store_true",
                        help="do not compare the files with the SHA-256 in a synth.json (quicker, finds less)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def run(args: argparse.Namespace) -> int:
    if args.json:
        check_json_target(args.json)
    report = validate(args.sources, workers=args.workers, image_size=args.image_size, quiet=args.quiet,
                      checksums=not args.no_checksums)
    print("\n".join(format_summary(report.summary)))
    for entry in report.bad:
        print(entry.line())
    if args.json:
        write_json(args.json, report)
    return 0 if report.ok else 1
