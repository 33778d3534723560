"""`stemdl eda`: an exploratory data analysis of a data set, as a Markdown report with PNG figures.

    stemdl eda data/default --out eda/default
    stemdl eda /lustre/stemdl --out eda/real --max-samples 5000 --workers 16
    stemdl eda data/tiny --out eda/tiny --force        # replace the report's files in an existing folder

Writes DIR/report.md, DIR/eda.json (every number), DIR/*.png and DIR/eda_patterns.npz (mean and variance
patterns, PCA components and coordinates). Counts, class imbalance and the lattice constants and angles
come from every sample (attributes only); the mean and variance pattern per crystal system and the PCA
come from at most --max-samples samples of a seeded draw, preprocessed like the timed run and streamed
through float64 sums and sklearn's IncrementalPCA, so memory stays bounded on the 548 GiB public set.

The report is built in a hidden folder beside DIR and moved into place at the end, so an error (bad data
is one line naming file:sample, exit status 2) leaves no partial report. An existing non-empty DIR is
refused unless --force; then only the report's own files in it are replaced.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from stemdl.workloads.spacegroup.data.index import load_or_build
from stemdl.workloads.spacegroup.data.reader import default_workers
from stemdl.workloads.spacegroup.eda.analysis import Analysis, Options, analyse
from stemdl.workloads.spacegroup.eda.patterns import CHUNK
from stemdl.workloads.spacegroup.eda.report import report_files
from stemdl.workloads.spacegroup.eda.stats import DRAWS
from stemdl.harness import files
from stemdl.harness.errors import StemdlError

__all__ = ["Analysis", "Options", "analyse", "configure", "run"]
SCRATCH = "rows.tmp.npy"  # the preprocessed patterns, spilled to disk; never part of the report


def configure(parser: argparse.ArgumentParser) -> None:
    defaults = Options()
    parser.add_argument("data", metavar="DATA", help="data directory (train/, dev/, test/ folders or flat files)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the report")
    parser.add_argument("--max-samples", type=int, default=defaults.max_samples, metavar="N",
                        help="samples whose patterns are read for the mean/variance patterns and the PCA "
                             "(default: %(default)s; 0: counts and attributes only)")
    parser.add_argument("--draw", choices=DRAWS, default=defaults.draw,
                        help="how those samples are drawn: an equal share per crystal system, or uniformly "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the draw (default: %(default)s)")
    parser.add_argument("--size", type=int, default=defaults.size, metavar="S",
                        help="patterns are log-scaled and area-resized to S x S (default: %(default)s)")
    parser.add_argument("--components", type=int, default=defaults.components, metavar="K",
                        help="principal components to compute, at most (default: %(default)s)")
    parser.add_argument("--chunk", type=int, default=CHUNK, metavar="N",
                        help="patterns per IncrementalPCA step; bounds the memory (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=default_workers(), metavar="N",
                        help="processes reading files in parallel (default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="write into an existing non-empty DIR, replacing only the report's files")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def options(args: argparse.Namespace) -> Options:
    """The command line as Options; a value out of range is a one-line error naming the option."""
    minimum = {"max_samples": 0, "size": 1, "components": 1, "chunk": 1, "workers": 1}
    for name, low in minimum.items():
        if getattr(args, name) < low:
            raise StemdlError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least {low}")
    return Options(max_samples=args.max_samples, seed=args.seed, draw=args.draw, size=args.size,
                   components=args.components, chunk=args.chunk, workers=args.workers, quiet=args.quiet)


def _is_busy(out: Path) -> bool:
    """True if `out` holds anything (so writing there could overwrite a user's files)."""
    if out.exists() and not out.is_dir():
        raise StemdlError(f"{out}: exists and is not a folder")
    return out.is_dir() and any(out.iterdir())


def check_out(out: Path, force: bool) -> None:
    if _is_busy(out) and not force:
        raise StemdlError(f"{out}: folder exists and is not empty; use --force to replace the report in it")


def publish(tmp: Path, out: Path, names: list[str], force: bool) -> None:
    """Move the finished report into place: the whole folder if `out` is missing or empty, else (--force)
    file by file, each replaced atomically, leaving every other file in `out` alone."""
    if not _is_busy(out):
        os.replace(tmp, out)  # rename(2) may replace an empty folder
        return
    check_out(out, force)  # it may have filled up while we worked
    for name in names:
        os.replace(tmp / name, out / name)


def summary(a: Analysis, out: Path, seconds: float) -> str:
    text = (f"stemdl eda: {len(a.labels)} samples in {len(a.files)} files, {len(set(a.labels.tolist()))} space "
            f"groups, {len(a.present)} crystal systems; patterns of {len(a.picked)} samples at "
            f"{a.options.size}x{a.options.size}")
    if a.pca is not None:
        text += f"; PCA: {len(a.pca.ratio)} components explain {100 * a.pca.ratio.sum():.1f} %"
    return f"{text}; {seconds:.1f} s; report {out / 'report.md'}"


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    opts = options(args)
    out = Path(args.out)
    check_out(out, args.force)
    index = load_or_build(args.data, workers=opts.workers, quiet=opts.quiet)
    tmp = files.partial_path(out)  # a folder of this process's own, beside the report's
    try:
        tmp.mkdir(parents=True)
        a = analyse(index, opts, tmp / SCRATCH)
        (tmp / SCRATCH).unlink(missing_ok=True)
        report = report_files(a)
        for name, data in report.items():
            (tmp / name).write_bytes(data)
        publish(tmp, out, list(report), args.force)
    except OSError as exc:
        raise StemdlError(f"{out}: cannot write the report ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(summary(a, out, time.perf_counter() - start))
    return 0
