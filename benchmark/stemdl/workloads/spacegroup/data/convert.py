"""`stemdl convert SRC DST`: the raw HDF5 set, preprocessed once and offline, as shards (`stemdl.harness.shards`).

    stemdl convert data/real /scratch/shards128                          # 128x128 uint8, every split
    stemdl convert data/real /scratch/shards64 --size 64 --dtype float16 --splits train,dev
    mpiexec -n 8 stemdl convert data/real /lustre/shards128 --skip-bad    # the ranks share out the files

Training at 128x128 from the 512x512 float32 originals reads 64x the bytes it uses, so the run's
preprocessing (`Preprocess`, rounded to uint8 as the raw pipeline rounds, or kept as float16) is applied
once, here. One shard per input file: the file is the unit of work, of parallelism (ranks, then
`--workers` processes per rank) and of resumption (a finished shard has a sidecar, and the same command
run again converts the rest). A bad sample stops the conversion with one line naming file:group (exit 2);
with --skip-bad it is left out and listed in the manifest, up to --max-bad. Under MPI an error on one rank
ends every rank with the same line; SIGTERM or SIGINT stops cleanly (exit 143 or 130), and so does a full
disk (exit 2, one line naming the file and the mount point); workers end with a killed parent. Resumption,
bad samples and what a conversion costs, in full: docs/performance.md.
"""

from __future__ import annotations

import argparse
import heapq
import json
import multiprocessing
import os
import signal
import sys
import traceback
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from stemdl import __version__
from stemdl.harness import dist
from stemdl.workloads.spacegroup.data import layout
from stemdl.workloads.spacegroup.data.index import load_or_build
from stemdl.workloads.spacegroup.data.reader import DataFile, data_files, die_with_parent, imap_files, shape_problem
from stemdl.harness import files
from stemdl.harness.shards import FORMAT, MANIFEST, VERSION, Kind, ShardWriter, verify_files
from stemdl.workloads.spacegroup.data.validate import CEILING, value_problems
from stemdl.harness.errors import DataError, StemdlError
from stemdl.workloads.spacegroup.preprocess import Preprocess
from stemdl.harness.progress import Progress
from stemdl.harness.signals import Interrupted, StopSignal

PUBLIC_SAMPLES = 187_155  # the public set (train 148,006 / dev 20,400 / test 18,749): the size projections
STARTED = "convert.json"
SIDECAR = ".done.json"
PARTIAL = files.SUFFIX
DTYPES = ("uint8", "float16")  # stored pixels: rounded as the raw pipeline rounds, or kept as float16
WORKLOAD = "stemdl"  # the shards are this benchmark's (the manifest says so)


def shard_kinds(preprocess: dict) -> list[Kind]:
    """The arrays of a space-group shard: the preprocessed stacks (the mapped input), the class index
    (0..229), the lattice (a, b, c in angstrom, alpha, beta, gamma in degrees) and "file:group"."""
    size = int(preprocess["size"])
    return [Kind("images", preprocess["dtype"], (layout.N_PATTERNS, size, size), mapped=True),
            Kind("labels", "int16", (), low=0, high=layout.N_SPACE_GROUPS - 1),
            Kind("targets", "float32", (6,)), Kind("names", "S")]


@dataclass(frozen=True)
class Options:
    size: int = 128
    dtype: str = "uint8"  # or "float16"
    floor: float = 1e-3
    ceiling: float = 1e4
    splits: tuple | None = None  # None: every split SRC has
    workers: int | None = None  # processes per rank; None: the rank's share of the node's cores
    skip_bad: bool = False
    max_bad: float = 0.01  # with skip_bad: the largest fraction of bad samples accepted
    quiet: bool = False

    def preprocess(self) -> dict:
        return {"size": int(self.size), "floor": float(self.floor), "ceiling": float(self.ceiling),
                "dtype": self.dtype}


@dataclass(frozen=True)
class ShardJob:
    """One source file to convert into shard `name`: everything a worker process needs."""

    src: str  # SRC, absolute
    dst: str  # DST, absolute
    name: str  # e.g. "train/00000"
    source: str  # the file, relative to SRC
    samples: int  # as planned, for the balance
    expected: tuple  # the image shape every sample must have
    preprocess: dict
    skip_bad: bool


@dataclass(frozen=True)
class Plan:
    src: Path
    dst: Path
    identity: dict  # what convert.json and the manifest say about the folder
    jobs: tuple  # every shard of the chosen splits, in order
    done: dict  # shard name -> sidecar, for the shards a previous run finished
    total: int  # samples of the chosen splits


# ---- planning (rank 0) ----------------------------------------------------------------------------------

def _file_shapes(path: str) -> list:
    """The image shape of every group of one file (None where unreadable): attributes not needed."""
    shapes = []
    with DataFile(path) as f:
        for g in f.groups:
            try:
                shapes.append(f.shape(g))
            except DataError:
                shapes.append(None)
    return shapes


def _inventory(src: Path, opts: Options) -> list[tuple[str, list]]:
    """(file relative to SRC, image shape of each of its samples) for every file, in natural order."""
    try:
        index = load_or_build(src, workers=opts.workers, quiet=opts.quiet)
    except DataError:
        if not opts.skip_bad:
            raise
        # The index refuses a set with a bad sample; --skip-bad converts around it, so count here instead.
        paths = data_files(src)
        shapes: list = [None] * len(paths)
        for pos, found in imap_files(_file_shapes, [str(p) for p in paths], opts.workers, label="scan",
                                     quiet=opts.quiet):
            shapes[pos] = found
        return [(p.relative_to(src).as_posix(), s) for p, s in zip(paths, shapes)]
    rows = [tuple(s) for s in index.shape.tolist()]
    start = index.file_start.tolist()
    return [(f, rows[start[k]:start[k + 1]]) for k, f in enumerate(index.files)]


def _select(src: Path, inventory: list, splits: tuple | None) -> list:
    chosen = [(f, s) for f, s in inventory if splits is None or layout.split_of(Path(f).name) in splits]
    present = {layout.split_of(Path(f).name) for f, _ in chosen}
    missing = [s for s in splits or () if s not in present]
    if missing:
        raise StemdlError(f"--splits: {src} has no {', '.join(missing)} files")
    return chosen


def _expected_shape(src: Path, chosen: list, size: int) -> tuple:
    """The most common valid (3, S, S) shape, as `stemdl validate` expects it; other shapes are bad."""
    counts = Counter(s for _, shapes in chosen for s in shapes if s is not None and shape_problem(s) is None)
    if not counts:
        raise DataError(src, f"no sample has a ({layout.N_PATTERNS}, S, S) image stack")
    expected = counts.most_common(1)[0][0]
    if expected[-1] < size:
        raise StemdlError(f"--size {size} is larger than the data's {expected[-1]}x{expected[-1]} patterns")
    return expected


def _describe(identity: dict) -> str:
    prep = identity.get("preprocess") or {}
    return (f"{identity.get('source')} at size {prep.get('size')} {prep.get('dtype')}, floor {prep.get('floor')}, "
            f"ceiling {prep.get('ceiling')}")


def _check_destination(dst: Path, identity: dict) -> None:
    """Refuse a DST that holds anything but shards of this SRC with this preprocessing."""
    if dst.exists() and not dst.is_dir():
        raise StemdlError(f"{dst}: exists and is not a folder")
    marked = False
    for name in (MANIFEST, STARTED):
        path = dst / name
        if not path.exists():
            continue
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise StemdlError(f"{path}: unreadable ({exc}); remove it or choose another DST") from None
        if not isinstance(found, dict) or found.get("format") != FORMAT:
            raise StemdlError(f"{dst}: its {name} is not a stemdl shard manifest; refusing to write into it")
        if found.get("version") != identity["version"]:
            raise StemdlError(f"{dst} holds shards of format version {found.get('version')}; this stemdl writes "
                              f"version {identity['version']}: choose another DST")
        if any(found.get(k) != identity[k] for k in ("source", "preprocess")):
            raise StemdlError(f"{dst} holds shards of {_describe(found)}, not of {_describe(identity)}: choose "
                              f"another DST, or the same SRC and settings to resume")
        marked = True
    if not marked and dst.is_dir() and any(dst.iterdir()):
        raise StemdlError(f"{dst} exists and is not a stemdl shard folder (no {MANIFEST} or {STARTED}); "
                          f"refusing to write into it")


def _write_json(path: Path, obj) -> None:
    try:
        files.write_atomic(path, json.dumps(obj, indent=1) + "\n", durable=True)
    except OSError as exc:
        raise files.write_error(path, exc) from None


def _claim(dst: Path, identity: dict) -> None:
    try:
        dst.mkdir(parents=True, exist_ok=True)
        if not (dst / STARTED).exists():
            _write_json(dst / STARTED, {**identity, "started": _now(), "stemdl_version": __version__})
    except OSError as exc:
        raise StemdlError(f"{dst}: cannot write ({exc.strerror or exc})") from None


def _remove_partials(dst: Path, jobs=None) -> None:
    """Temporary files: all of them (before any rank writes), or those of `jobs` (which one rank owns)."""
    if jobs is None:
        stale = [*dst.glob(f".*{PARTIAL}"), *dst.glob(f"*/.*{PARTIAL}")]
    else:
        stale = [p for job in jobs for p in (dst / job.name).parent.glob(f".{Path(job.name).name}.*{PARTIAL}")]
    for path in stale:
        path.unlink(missing_ok=True)


def _source_stat(path: Path) -> list[int]:
    try:
        st = path.stat()
    except OSError as exc:
        raise DataError(path, f"cannot read ({exc.strerror or exc})") from None
    return [st.st_size, st.st_mtime_ns]


def _reusable(dst: Path, job: ShardJob) -> dict | None:
    """The sidecar of a shard a previous run finished for this very source and preprocessing, else None."""
    try:
        side = json.loads((dst / f"{job.name}{SIDECAR}").read_text())
        entry = side["entry"]
        same = (side["preprocess"] == job.preprocess and entry["name"] == job.name
                and entry["source"] == job.source and (job.skip_bad or not side["skipped"])
                and [side["source_size"], side["source_mtime_ns"]] == _source_stat(Path(job.src) / job.source))
        if same:
            verify_files(dst, [entry["files"][kind.name] for kind in shard_kinds(job.preprocess)], "size")
        return side if same else None
    except (OSError, ValueError, KeyError, TypeError, DataError):
        return None


def make_plan(src, dst, opts: Options) -> Plan:
    """Check SRC, DST and the options, claim DST, and find what is left to convert (rank 0 only)."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    Preprocess(opts.size, opts.floor, opts.ceiling)  # its checks, before anything is read
    identity = {"format": FORMAT, "version": VERSION, "workload": WORKLOAD, "source": str(src),
                "preprocess": opts.preprocess(), "kinds": [k.to_json() for k in shard_kinds(opts.preprocess())]}
    _check_destination(dst, identity)
    chosen = _select(src, _inventory(src, opts), opts.splits)
    expected = _expected_shape(src, chosen, opts.size)
    jobs, seen = [], Counter()
    for split in layout.SPLITS:
        for f, shapes in chosen:
            if layout.split_of(Path(f).name) == split:
                jobs.append(ShardJob(str(src), str(dst), f"{split}/{seen[split]:05d}", f, len(shapes), expected,
                                     opts.preprocess(), opts.skip_bad))
                seen[split] += 1
    _claim(dst, identity)
    _remove_partials(dst)
    done = {job.name: side for job in jobs if (side := _reusable(dst, job)) is not None}
    if len(done) < len(jobs):  # the old manifest will not describe the files any more
        (dst / MANIFEST).unlink(missing_ok=True)
    return Plan(src, dst, identity, tuple(jobs), done, sum(job.samples for job in jobs))


def assign(jobs, world_size: int) -> list[list[ShardJob]]:
    """Jobs dealt to ranks by sample count: largest first, each to the least loaded rank (ties: lowest)."""
    shares: list[list[ShardJob]] = [[] for _ in range(world_size)]
    loads = [(0, r) for r in range(world_size)]
    for job in sorted(jobs, key=lambda j: (-j.samples, j.name)):
        load, r = heapq.heappop(loads)
        shares[r].append(job)
        heapq.heappush(loads, (load + job.samples, r))
    return shares


# ---- converting one file (in a worker process) -------------------------------------------------------

_STOP = None  # in worker processes: the parent's stop event
_PARENT = None  # in worker processes: the parent's pid


class _Cancelled(Exception):
    """The parent asked the workers to stop (a signal): the shard is dropped, its temporary files removed."""


def _read_sample(f: DataFile, group: str, buf: np.ndarray):
    """(record, stack) of one sample, checked as the reader and the validator check it; else DataError."""
    rec = f.record(group)
    stack = f.stack(group, out=buf)  # wrong dtype, or a shape other than the set's: DataError
    lo, hi = stack.min(), stack.max()  # both propagate NaN: a clean sample costs two vector passes
    if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0 and hi <= CEILING):
        reasons = value_problems(f.dataset(group))  # rare: the validator's words for what is wrong
        raise DataError(f.name, "; ".join(reasons) or "non-finite, negative or implausible values", group)
    return rec, stack


def _fill(f: DataFile, job: ShardJob, writer: ShardWriter) -> tuple[list[int], list[dict]]:
    """Every sample of the file into `writer`; returns the space groups written and the samples skipped
    (with --skip-bad)."""
    p = job.preprocess
    prep = Preprocess(p["size"], p["floor"], p["ceiling"])
    buf = np.empty(job.expected, dtype=np.float32)
    groups, skipped = [], []
    for group in f.groups:
        if _STOP is not None and _STOP.is_set():
            raise _Cancelled
        if _PARENT is not None and os.getppid() != _PARENT:  # killed (-9): nobody will read this shard
            writer.discard()
            os._exit(1)
        try:
            rec, stack = _read_sample(f, group, buf)
        except DataError as exc:
            if not job.skip_bad:
                raise
            skipped.append({"sample": f"{job.source}:{group}", "reason": exc.reason})
            continue
        u = prep(torch.from_numpy(stack))
        # Exactly what the raw pipeline does to a sample (stemdl.workloads.spacegroup.data.source), so both give the same tensors.
        image = u.round_().to(torch.uint8) if p["dtype"] == "uint8" else u.to(torch.float16)
        writer.add({"images": image.numpy(), "labels": layout.class_index(rec.space_group),
                    "targets": np.concatenate([rec.abc_angstrom, rec.angles_degree]),
                    "names": f"{job.source}:{group}".encode()})
        groups.append(rec.space_group)
    return groups, skipped


def convert_shard(job: ShardJob) -> dict:
    """Convert one source file into shard `job.name`; returns the shard's sidecar (written last)."""
    src, dst = Path(job.src) / job.source, Path(job.dst)
    before = _source_stat(src)
    writer = None
    try:
        with DataFile(src) as f:
            writer = ShardWriter(dst, job.name, len(f.groups), shard_kinds(job.preprocess))
            labels, skipped = _fill(f, job, writer)
        if _source_stat(src) != before:
            raise DataError(src, "changed while it was being converted; run the conversion again")
        written = writer.finish()
        side = {"entry": {"name": job.name, "samples": len(labels), "source": job.source, "files": written},
                "class_counts": {str(g): n for g, n in sorted(Counter(labels).items())}, "skipped": skipped,
                "source_size": before[0], "source_mtime_ns": before[1], "preprocess": job.preprocess}
        _write_json(dst / f"{job.name}{SIDECAR}", side)  # without it the shard is not done: discarded below
    except OSError as exc:  # full disk, no permission: the shard being written is named
        if writer is not None:
            writer.discard()
        raise StemdlError(f"{dst / job.name}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    return side


def _worker_init(stop, parent: int) -> None:
    global _STOP, _PARENT
    _STOP, _PARENT = stop, parent
    die_with_parent(parent)
    # Ctrl-C reaches the whole process group: the parent decides. A SIGTERM just ends a worker (not the
    # parent's handler, inherited through fork): the parent then removes what the worker left.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(1)  # the parallelism is across files


# ---- one rank's share ------------------------------------------------------------------------------------

def _in_process(jobs):
    for job in jobs:
        yield convert_shard(job)


def _as_completed(futures):
    pending = set(futures)
    while pending:
        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
        for fut in finished:
            try:
                yield fut.result()
            except BrokenProcessPool:
                raise StemdlError("a conversion worker process died (killed, or out of memory?); finished "
                                  "shards are kept, run the same command to resume") from None


@contextmanager
def _sidecars(jobs: list[ShardJob], workers: int, dst: Path):
    """The sidecars of `jobs` as each finishes, converted by `workers` processes (1: in this process).
    On leaving, early or not, the workers stop within a sample and no temporary file of `jobs` is left."""
    threads = torch.get_num_threads()
    pool = stop = None
    try:
        if workers <= 1 or len(jobs) <= 1:
            torch.set_num_threads(1)
            yield _in_process(jobs)
        else:
            # fork, as the index and the DataLoader do: workers start at once, whatever the main script.
            ctx = multiprocessing.get_context("fork")
            stop = ctx.Event()
            pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                       initargs=(stop, os.getpid()))
            yield _as_completed([pool.submit(convert_shard, job) for job in jobs])
    finally:
        if pool is not None:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)
        _remove_partials(dst, jobs)


def _too_many_bad(skipped: list, total: int, max_bad: float) -> StemdlError:
    first = skipped[0]
    return StemdlError(f"{len(skipped)} of {total} samples are bad ({len(skipped) / max(total, 1):.2%}), more "
                       f"than --max-bad {max_bad:g}; the first: {first['sample']}: {first['reason']}")


def _convert_share(plan: Plan, mine: list, workers: int, opts: Options, env) -> tuple:
    """(error or None, {shard name: sidecar}) of this rank's jobs. Signals propagate (Interrupted)."""
    done, skipped = {}, []
    jobs = sorted(mine, key=lambda j: (-j.samples, j.name))  # the longest first: the pool ends together
    bar = Progress(sum(j.samples for j in jobs), what="samples", label="convert", quiet=opts.quiet or not env.is_root)
    try:
        with bar, _sidecars(jobs, workers, plan.dst) as results:
            for side in results:
                done[side["entry"]["name"]] = side
                skipped += side["skipped"]
                bar.update(side["entry"]["samples"] + len(side["skipped"]))
                if len(skipped) > opts.max_bad * plan.total:  # this rank alone is over: stop now
                    raise _too_many_bad(skipped, plan.total, opts.max_bad)
    except StemdlError as exc:
        return exc, done
    except Exception:
        if env.world_size == 1:
            raise
        traceback.print_exc()  # a bug: end every rank now rather than leave them waiting for this one
        dist.abort(1)
    return None, done


# ---- the manifest (rank 0) -------------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_manifest(plan: Plan, sidecars: dict) -> dict:
    """manifest.json from every shard's sidecar, once every listed file is seen here with its size."""
    splits: dict = {}
    for job in plan.jobs:
        side = sidecars[job.name]
        split = splits.setdefault(job.name.split("/")[0], {"samples": 0, "class_counts": Counter(), "shards": []})
        split["samples"] += side["entry"]["samples"]
        split["class_counts"].update(side["class_counts"])
        split["shards"].append(side["entry"])
    for split in splits.values():
        split["class_counts"] = {g: n for g, n in sorted(split["class_counts"].items(), key=lambda kv: int(kv[0]))}
    manifest = {**plan.identity, "splits": splits,
                "skipped": [s for job in plan.jobs for s in sidecars[job.name]["skipped"]],
                "created": _now(), "stemdl_version": __version__}
    # On several nodes DST must be one shared folder: a file rank 0 cannot see is an error, not a manifest.
    verify_files(plan.dst, [meta for s in splits.values() for sh in s["shards"] for meta in sh["files"].values()],
                 "size")
    path = plan.dst / MANIFEST
    try:
        old = json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError):
        old = None
    if old is None or {**old, "created": None} != {**manifest, "created": None}:  # a no-op rerun changes nothing
        _write_json(path, manifest)
    else:
        manifest = old
    return manifest


def convert(src, dst, opts: Options, env: dist.DistributedEnv) -> dict:
    """Convert SRC into DST; collective over the ranks of `env` (dist.setup() done). Returns the manifest."""
    plan = dist.on_root(make_plan, src, dst, opts)
    todo = [j for j in plan.jobs if j.name not in plan.done]
    workers = opts.workers or default_workers(env)
    if env.is_root and not opts.quiet:
        print(f"stemdl convert: {plan.total:,} samples in {len(plan.jobs)} files of {plan.src}; "
              f"{len(plan.done)} shards already done, {len(todo)} to convert on {env.world_size} rank(s) x "
              f"{workers} worker(s)", file=sys.stderr, flush=True)
    outcome = _convert_share(plan, assign(todo, env.world_size)[env.rank], workers, opts, env)
    outcomes = dist.allgather_object(outcome)
    errors = [error for error, _ in outcomes if error is not None]
    if errors:
        raise errors[0]  # the lowest failing rank's, on every rank
    sidecars = dict(plan.done)
    for _, done in outcomes:
        sidecars.update(done)
    skipped = [s for job in plan.jobs for s in sidecars[job.name]["skipped"]]
    if len(skipped) > opts.max_bad * plan.total:
        raise _too_many_bad(skipped, plan.total, opts.max_bad)
    return dist.on_root(write_manifest, plan, sidecars)


# ---- the command -----------------------------------------------------------------------------------------

def default_workers(env) -> int:
    """This rank's share of the node's cores: the cores it is bound to if a launcher bound it to fewer
    than the node has, else the node's cores over its ranks."""
    cores = os.cpu_count() or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return max(1, allowed if allowed < cores else cores // env.local_world_size)


def _gib(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def summary(manifest: dict, dst) -> list[str]:
    """One line per split (samples, shards, bytes per sample, bytes, the public set's projected size),
    then the total."""
    prep = manifest["preprocess"]
    at = f"{prep['size']}x{prep['size']} {prep['dtype']}"
    lines, samples = [], 0
    for split, entry in manifest["splits"].items():
        total = sum(meta["bytes"] for shard in entry["shards"] for meta in shard["files"].values())
        per = total / entry["samples"] if entry["samples"] else 0.0
        samples += entry["samples"]
        lines.append(f"{split}: {entry['samples']:,} samples in {len(entry['shards'])} shards, "
                     f"{per:,.0f} bytes/sample, {total:,} bytes ({_gib(total)}); the public set's "
                     f"{PUBLIC_SAMPLES:,} samples at {at}: {_gib(per * PUBLIC_SAMPLES)}")
    lines.append(f"{dst}: {samples:,} samples at {at}, {len(manifest['skipped'])} bad samples skipped")
    return lines


def options(args: argparse.Namespace) -> Options:
    splits = None
    if args.splits is not None:
        splits = tuple(dict.fromkeys(s.strip() for s in args.splits.split(",") if s.strip()))
        unknown = [s for s in splits if s not in layout.SPLITS]
        if unknown or not splits:
            raise StemdlError(f"--splits {args.splits!r}: choose from {', '.join(layout.SPLITS)}")
    if not 0 <= args.max_bad <= 1:
        raise StemdlError(f"--max-bad {args.max_bad}: a fraction of the samples, 0..1")
    if args.workers is not None and args.workers < 1:
        raise StemdlError(f"--workers {args.workers}: need 1 or more")
    if args.size < 1:
        raise StemdlError(f"--size {args.size}: need 1 or more")
    return Options(args.size, args.dtype, args.floor, args.ceiling, splits, args.workers, args.skip_bad,
                   args.max_bad, args.quiet)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="raw data directory (train/, dev/, test/ folders or flat)")
    parser.add_argument("dst", metavar="DST", help="shard folder to write (created; an unfinished one is resumed)")
    parser.add_argument("--size", type=int, default=128, metavar="S",
                        help="image height and width (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, default="uint8",
                        help="stored pixels: uint8 (rounded, as the raw pipeline) or float16 (default: %(default)s)")
    parser.add_argument("--floor", type=float, default=1e-3, metavar="X",
                        help="log floor, x the mean pixel (default: %(default)s)")
    parser.add_argument("--ceiling", type=float, default=1e4, metavar="X",
                        help="log ceiling, x the mean pixel (default: %(default)s)")
    parser.add_argument("--splits", metavar="LIST", help="comma-separated, e.g. train,dev (default: every split)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="processes per rank (default: the rank's share of the node's cores)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave bad samples out (listed in the manifest) instead of stopping")
    parser.add_argument("--max-bad", type=float, default=0.01, metavar="F",
                        help="with --skip-bad: refuse if more than this fraction of the samples is bad "
                             "(default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def run(args: argparse.Namespace) -> int:
    opts = options(args)
    env = dist.setup(backend="gloo", device="cpu")  # the work is on CPUs; MPI only carries the outcomes
    stop = StopSignal(env)
    try:
        stop.install()
        manifest = convert(args.src, args.dst, opts, env)
        if env.is_root:
            print("\n".join(summary(manifest, Path(args.dst))), flush=True)
        return 0
    except Interrupted as exc:
        stop.defer()  # a second signal must not interrupt the stopping
        print(f"stemdl convert: {exc}: stopped; finished shards are kept (run the same command to resume)",
              file=sys.stderr, flush=True)
        if env.world_size > 1:
            dist.abort(128 + exc.signum)  # the other ranks may be waiting for this one
        return 128 + exc.signum
    finally:
        stop.uninstall()
        dist.teardown()
