"""`stemdl bench io`: what the input path costs, from the bytes on disk to the training step, in one run.

    stemdl bench io                                    # data/default, converted to 64x64 uint8 in a temp folder
    stemdl bench io --samples 640 --steps 20 --json io.json
    stemdl bench io --shards /scratch/shards64         # an existing conversion (made with --size 64)

Samples/s and MB/s (10^6 bytes) of the training split (the first --samples of it): 1. the read limit, from
the page cache and from disk; 2. raw HDF5 through the `torch` pipeline; 3. and 4. the shards through `torch`
and `dali`, each as a fraction of the shards' page-cache limit (target: SHARD_TARGET); 5. the real training
step (`stemdl.harness.loop.train_epoch`) on batches held in memory and fed by each pipeline (target: within
STEP_TARGET of the in-memory step). Memory speed on a shared machine drifts within minutes, so the limit
and rows 3 and 4 are measured in --rounds paired rounds, and each step configuration --rounds times in
alternating order. The figures are printed, never judged by the exit status; progress and notes go to
stderr. What each row measures, and how: docs/performance.md.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stemdl.harness import files
from stemdl.harness.errors import StemdlError
from stemdl.harness.progress import Progress

CHUNK = 8 << 20  # plain reads: 8 MiB a call, large enough that the syscall count does not matter
MB = 1e6
SHARD_TARGET = 0.8  # shard pipelines: at least this fraction of the read limit for their bytes
EPOCH_SAMPLES = 148_006 // 8  # rows 3 and 4: an epoch of one rank of 8 on the public training set
STEP_TARGET = 0.05  # a step with the loader: at most this much slower than on batches in memory


def _note(text: str) -> None:
    print(f"stemdl bench io: {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Rate:
    """One throughput row: `samples` and `bytes` (what MB/s counts) moved in `seconds`."""

    row: str
    what: str
    samples: int
    bytes: int
    seconds: float
    note: str = ""
    out_bytes: int | None = None  # bytes handed on, where they differ from what was read
    limit: float | None = None  # fraction of the row-1 page-cache limit for the same bytes
    steady_samples_per_s: float | None = None  # pipelines: leaving out each epoch's first batch

    @property
    def samples_per_s(self) -> float:
        return self.samples / max(self.seconds, 1e-12)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / MB / max(self.seconds, 1e-12)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "samples_per_s": self.samples_per_s, "mb_per_s": self.mb_per_s}


@dataclass(frozen=True)
class Steps:
    """One training-step row, pooled over rounds: seconds per step after warm-up (the wait for the batch
    included), the waits alone, and each measurement's first wait (the pipeline starting an epoch)."""

    what: str
    step_s: tuple
    wait_s: tuple
    start_s: tuple
    steps_per_epoch: int

    @property
    def median(self) -> float:
        return float(np.median(self.step_s))

    @property
    def mean(self) -> float:
        return float(np.mean(self.step_s))

    @property
    def per_epoch(self) -> float:
        """The mean step with the epoch's start shared out over its steps: what a run's epoch sees."""
        return self.mean + float(np.mean(self.start_s)) / self.steps_per_epoch

    def to_json(self) -> dict:
        return {"what": self.what, "median_s": self.median, "mean_s": self.mean, "per_epoch_s": self.per_epoch,
                "wait_mean_s": float(np.mean(self.wait_s)), "epoch_start_s": list(self.start_s),
                "steps_per_epoch": self.steps_per_epoch, "step_s": list(self.step_s)}


# ---- the page cache ---------------------------------------------------------------------------------------

_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _LIBC = libc
    return _LIBC


def cached_fraction(paths) -> float | None:
    """The fraction of the files' pages in the page cache (mincore(2) on a mapping never touched, so
    asking does not read anything in); None where mincore is not available."""
    libc, page = _libc(), os.sysconf("SC_PAGE_SIZE")
    cached = total = 0
    for path in paths:
        size = os.path.getsize(path)
        if size == 0:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            pages = -(-size // page)
            vec = np.zeros(pages, dtype=np.uint8)
            rc = libc.mincore(addr, size, vec.ctypes.data)
            libc.munmap(addr, size)
        finally:
            os.close(fd)
        if rc != 0:
            return None
        cached += int(np.count_nonzero(vec & 1))
        total += pages
    return cached / total if total else 0.0


def evict(paths) -> str:
    """Drop the files from the page cache; returns how, with what was left (checked, not assumed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages go; no root needed
        finally:
            os.close(fd)
    left = cached_fraction(paths)
    if left is not None and left <= 0.01:
        return f"posix_fadvise DONTNEED ({left:.1%} left cached)"
    try:  # the whole machine's cache: only when the per-file way did not work
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        shown = "unknown" if left is None else f"{left:.1%}"
        return f"posix_fadvise DONTNEED ({shown} left cached; drop_caches refused: {exc.strerror or exc})"
    after = cached_fraction(paths)
    return f"drop_caches ({'unknown' if after is None else f'{after:.1%}'} left cached)"


# ---- row 1: the read limit --------------------------------------------------------------------------------

def read_files(paths) -> int:
    """Every byte of the files, sequentially, in CHUNK reads into one buffer; returns the bytes read."""
    buf = memoryview(bytearray(CHUNK))
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


def read_stacks(samples) -> int:
    """Every cbed_stack by h5py read_direct (the raw pipeline's read), (path, group) in natural order."""
    from stemdl.workloads.spacegroup.data.reader import DataFile

    total, buf = 0, None
    for path, groups in itertools.groupby(samples, key=lambda s: s[0]):
        with DataFile(path) as f:
            for _, group in groups:
                shape = f.shape(group)
                if buf is None or buf.shape != shape:
                    buf = np.empty(shape, dtype=np.float32)
                total += f.stack(group, out=buf).nbytes
    return total


def _timed(fn, *args) -> tuple[int, float]:
    start = time.perf_counter()
    n = fn(*args)
    return n, time.perf_counter() - start


def limit_rows(what: str, paths, samples: int, read, *args) -> tuple[list[Rate], str]:
    """`read(*args)` from the page cache (second of two reads) and from disk (after evicting `paths`)."""
    read(*args)
    warm, warm_s = _timed(read, *args)
    how = evict(paths)
    cold, cold_s = _timed(read, *args)
    return [Rate("1", f"{what}, page cache", samples, warm, warm_s),
            Rate("1", f"{what}, disk", samples, cold, cold_s, note=how)], how


# ---- rows 2-4: pipelines ---------------------------------------------------------------------------------

class Head:
    """The first n samples of a split, with the interface the pipelines read (stemdl.workloads.spacegroup.data.source)."""

    def __init__(self, split, n: int):
        self.split, self.n = split, n
        self.fields = {name: values[:n] for name, values in split.fields.items()}
        self.dtype, self.image_shape = split.dtype, split.image_shape
        self.reads_are_copies = getattr(split, "reads_are_copies", False)
        self.reads_into = getattr(split, "reads_into", False)

    def __len__(self) -> int:
        return self.n

    def read(self, indices, **out) -> np.ndarray:
        return self.split.read(indices, **out)


class Repeated(Head):
    """The first n samples of a split repeated to `length`: sample i is sample i mod n. An epoch as long as
    a rank's of the public set, read from the same shard bytes (so the same page-cache limit applies), so
    that an epoch's start (DALI's reset and read-ahead, a first map of each shard) weighs what it would."""

    def __init__(self, split, n: int, length: int):
        super().__init__(split, n)
        self.length = length
        self.fields = {name: np.resize(values, (length, *values.shape[1:])) for name, values in self.fields.items()}

    def __len__(self) -> int:
        return self.length

    def read(self, indices, **out) -> np.ndarray:
        return self.split.read(np.asarray(indices) % self.n, **out)


def epoch_rate(pipe, epochs: int) -> tuple[int, float, int, float, float]:
    """Samples and seconds of `epochs` training epochs of `pipe`, batches only pulled (no step), after one
    untimed epoch (a run's first, with the one-time costs of a fresh pipeline: DALI's buffers, first maps);
    then the samples and seconds of each timed epoch's first batch (starting workers), summed; and the
    seconds of the untimed epoch."""
    warm = time.perf_counter()
    for _ in pipe.train_batches(epochs + 1):  # an epoch the timed ones do not repeat
        pass
    warm = time.perf_counter() - warm
    samples = first_samples = 0
    first_s, start = 0.0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        for k, (x, _) in enumerate(pipe.train_batches(epoch)):
            samples += len(x)
            if k == 0:
                first_samples, first_s = first_samples + len(x), first_s + time.perf_counter() - t0
    return samples, time.perf_counter() - start, first_samples, first_s, warm


def gather_row(split, cfg, env, epochs: int, bytes_per: int, limit: float) -> Rate:
    """The shards' own cost in a pipeline: each batch of the run's order gathered by `split.read` in this
    process, nothing else (no worker, no hand-over); what rows 3 and 4 add on top shows against it."""
    from stemdl.workloads.spacegroup import samplers

    b = cfg.harness.batch_size
    orders = [samplers.epoch_indices(cfg.workload.sampler, split.fields["labels"], cfg.harness.seed, epoch,
                                     env.rank, env.world_size, b) for epoch in range(1, epochs + 1)]
    split.read(np.arange(split.n))  # maps every shard first, as a run's first epoch does for the rest
    samples, start = 0, time.perf_counter()
    for order in orders:
        for k in range(0, len(order), b):
            samples += len(split.read(order[k:k + b]))
    seconds = time.perf_counter() - start
    return Rate("-", "shards, batch gathers (split.read), no pipeline", samples, samples * bytes_per, seconds,
                limit=samples * bytes_per / MB / seconds / limit)


def pipeline_row(row: str, what: str, name: str, splits, cfg, env, epochs: int, bytes_per: tuple,
                 limit: float | None) -> Rate:
    """Epochs of pipeline `name`; bytes_per = (read, handed on) bytes per sample."""
    from stemdl.harness.pipelines import build_pipeline

    start = time.perf_counter()
    pipe = build_pipeline(name, *splits, cfg, env, feed=_feed(cfg, env))
    built = time.perf_counter() - start
    samples, seconds, first_samples, first_s, warm = epoch_rate(pipe, epochs)
    # Leaving out each epoch's first wait, and every batch read during it (DALI reads prefetch x group ahead).
    read_ahead = first_samples * getattr(pipe, "read_ahead", 1)
    steady = (samples - min(read_ahead, samples)) / max(seconds - first_s, 1e-12)
    note = f"steady {steady:,.0f}/s"
    if limit:
        note += f" = {steady * bytes_per[0] / MB / limit:.2f} of the limit"
    note += f"; first batch {1e3 * first_s / epochs:.0f} ms an epoch; built in {built:.2f} s, first epoch {warm:.2f} s"
    return Rate(row, what, samples, samples * bytes_per[0], seconds, note=note, out_bytes=samples * bytes_per[1],
                limit=samples * bytes_per[0] / MB / seconds / limit if limit else None, steady_samples_per_s=steady)


# ---- row 5: the training step ----------------------------------------------------------------------------

class StepClock:
    """A pipeline for `train_epoch` that hands out `n` batches from `source()` and notes when each is
    asked for: the interval between two requests is one wait for a batch plus one training step."""

    def __init__(self, source, normalized: bool, n: int, steps_per_epoch: int):
        self.source, self.normalized, self.n = source, normalized, n
        self.steps_per_epoch = steps_per_epoch
        self.marks: list[float] = []
        self.waits: list[float] = []

    def train_batches(self, epoch: int):
        batches = self.source()
        try:
            for _ in range(self.n):
                self.marks.append(time.perf_counter())
                batch = next(batches)
                self.waits.append(time.perf_counter() - self.marks[-1])
                yield batch
            self.marks.append(time.perf_counter())
        finally:
            batches.close()  # a DataLoader's workers end here, before the next measurement starts


def chained(pipe):
    """The pipeline's training batches, epoch after epoch, as a run pulls them."""
    def batches():
        for epoch in itertools.count(1):
            yield from pipe.train_batches(epoch)
    return batches


def cycled(batches: list):
    def source():
        yield from itertools.cycle(batches)
    return source


def _feed(cfg, env):
    """How the run feeds a pipeline: the uniform order (the bench's default sampler) and DALI's normalization."""
    from stemdl.harness.pipelines import Feed
    from stemdl.workloads.spacegroup.workload import WORKLOAD

    return Feed(normalization=WORKLOAD.input_normalization)


def time_steps(source, normalized: bool, steps: int, ctx) -> StepClock:
    """The real training step (stemdl.harness.loop.train_epoch, fresh model and optimizer) on `source`'s batches:
    ctx["warmup"] + `steps` of them."""
    from stemdl.harness import loop
    from stemdl.workloads.spacegroup.workload import WORKLOAD

    clock = StepClock(source, normalized, ctx["warmup"] + steps, ctx["steps_per_epoch"])
    loop.train_epoch(loop.training_session(WORKLOAD, ctx["cfg"], ctx["env"], ctx["prepared"], clock), 1)
    return clock


def _with_workers(cfg, workers: int):
    return dataclasses.replace(cfg, harness=dataclasses.replace(cfg.harness, loader_workers=workers))


def step_plan(inp, cfg, env, held: list, step_workers) -> list:
    """(what, make) of every configuration; make() -> (batch source, normalized), a fresh pipeline."""
    from stemdl.harness.pipelines import build_pipeline

    def pipe(name, workers, splits=inp.shards):
        def make():
            built = build_pipeline(name, *splits, _with_workers(cfg, workers), env, feed=_feed(cfg, env))
            return chained(built), built.normalized
        return make

    plan = [("in memory (batches held)", lambda: (cycled(held), False)),
            ("memory pipeline", pipe("memory", cfg.harness.loader_workers)),
            ("torch on shards, in process", pipe("torch", 0))]
    plan += [(f"dali, {t} threads", pipe("dali", t)) for t in sorted({max(1, w) for w in step_workers})]
    # The one loader that works for its batches (HDF5 reads and preprocessing), on the cores the step uses.
    workers = cfg.harness.loader_workers
    plan.append((f"torch on raw HDF5, {workers} workers", pipe("torch", workers, inp.raw)))
    return plan


def step_rows(inp, cfg, env, args, bar: Progress) -> list[Steps]:
    """Row 5, every configuration measured --rounds times, in alternating order (ABC CBA ABC) so that a
    machine whose load drifts biases none of them."""
    from stemdl.harness.data import Prepared
    from stemdl.harness.pipelines import build_pipeline

    splits = inp.shards
    first = build_pipeline("torch", *splits, _with_workers(cfg, 0), env)
    ctx = {"cfg": cfg, "env": env, "warmup": args.warmup, "steps_per_epoch": first.steps_per_epoch,
           "prepared": Prepared(splits[0], splits[1])}
    held = list(itertools.islice(chained(first)(), min(first.steps_per_epoch, args.warmup + args.steps)))
    plan = step_plan(inp, cfg, env, held, args.step_workers)
    per_round = -(-args.steps // args.rounds)
    clocks: dict[str, list[StepClock]] = {what: [] for what, _ in plan}
    for k in range(args.rounds):
        for what, make in plan if k % 2 == 0 else plan[::-1]:
            if clocks[what] is None:
                continue
            _note(f"row 5, round {k + 1}/{args.rounds}: training step, {what}")
            try:
                source, normalized = make()
            except StemdlError as exc:  # DALI not installed: the other rows still stand
                _note(f"row 5: {what} skipped: {exc}")
                clocks[what] = None
                continue
            finally:
                bar.update(1)
            clocks[what].append(time_steps(source, normalized, per_round, ctx))
    return [pooled(what, found, args.warmup) for what, found in clocks.items() if found]


def pooled(what: str, clocks: list[StepClock], warmup: int) -> Steps:
    steps, waits = [], []
    for clock in clocks:
        steps += np.diff(clock.marks)[warmup:].tolist()
        waits += clock.waits[warmup:]
    return Steps(what, tuple(steps), tuple(waits), tuple(c.waits[0] for c in clocks), clocks[0].steps_per_epoch)


# ---- the data -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Inputs:
    """The samples measured: the first n of the training split, raw and converted."""

    index: object  # stemdl.workloads.spacegroup.data.index.DataIndex
    rows: np.ndarray  # index entries of the n training samples
    raw: tuple  # (train, eval) RawSplit, train cut to n
    shards: tuple  # (train, eval) ShardSplit, train cut to n
    shard_train: object  # the whole ShardSplit (its files)
    long_shards: tuple  # (train, eval): train's n samples Repeated to --epoch-samples, for rows 3 and 4

    @property
    def n(self) -> int:
        return len(self.rows)

    def raw_files(self) -> tuple[list[Path], int]:
        """The .h5 files holding the n samples, and how many samples those files hold."""
        numbers = np.unique(self.index.file_index[self.rows])
        held = np.diff(self.index.file_start)[numbers]
        return [self.index.root / self.index.files[k] for k in numbers], int(held.sum())

    def shard_files(self) -> tuple[list[Path], int]:
        """The .images.npy files holding the n samples, and how many samples those files hold."""
        split = self.shard_train
        shards = np.unique(split.shard_of[:self.n])
        paths = [split.root / split.shards[k]["files"]["images"]["path"] for k in shards]
        return paths, int(sum(split.shards[k]["samples"] for k in shards))

    def raw_sample_bytes(self) -> int:
        return int(np.prod(self.index.shape[self.rows[0]])) * 4  # float32 stacks


def convert_into(src, dst: Path, size: int) -> None:
    """`stemdl convert SRC DST --size S` of the run's splits, in a child process (MPI stays out of this one);
    its progress on stderr, its summary too."""
    import subprocess

    _note(f"converting {src} to {size}x{size} uint8 shards in {dst}")
    command = [sys.executable, "-m", "stemdl", "convert", str(src), str(dst), "--size", str(size),
               "--splits", "train,dev"]
    done = subprocess.run(command, stdout=sys.stderr, check=False)
    if done.returncode != 0:
        raise StemdlError(f"converting {src} into {dst} failed (exit {done.returncode}; its message is above)")


def open_inputs(args, cfg, shard_root: Path) -> Inputs:
    from stemdl.workloads.spacegroup.data.index import load_or_build
    from stemdl.harness.shards import ShardSet
    from stemdl.workloads.spacegroup.data.source import raw_splits

    index = load_or_build(args.data, quiet=True)
    shard_set = ShardSet.open(shard_root)
    if int(shard_set.preprocess["size"]) != args.size:
        raise StemdlError(f"--shards {shard_root}: holds {shard_set.preprocess['size']}x"
                          f"{shard_set.preprocess['size']} shards, --size asks for {args.size}")
    raw_train, raw_eval = raw_splits(index, cfg)
    shard_train, shard_eval = shard_set.split(cfg.harness.train_split), shard_set.split(cfg.harness.eval_split)
    if len(shard_train) != len(raw_train):
        raise StemdlError(f"--shards {shard_root}: {len(shard_train)} training samples, --data {args.data} "
                          f"has {len(raw_train)}: not a conversion of it")
    n = len(raw_train) if args.samples is None else args.samples
    if not args.batch <= n <= len(raw_train):
        raise StemdlError(f"--samples {n}: the training split of {args.data} has {len(raw_train)}, "
                          f"and a batch needs {args.batch}")
    rows = index.select(cfg.harness.train_split)[:n]
    long_train = Repeated(shard_train, n, max(n, args.epoch_samples))
    return Inputs(index, rows, (Head(raw_train, n), raw_eval), (Head(shard_train, n), shard_eval), shard_train,
                  (long_train, shard_eval))


# ---- rows 1-4 -------------------------------------------------------------------------------------------

def fastest(measured: list[Rate]) -> Rate:
    """The best of repeated measurements of one row (the least disturbed on a shared machine), noted so."""
    best = max(measured, key=lambda r: r.samples_per_s)
    note = f"best of {len(measured)}" + (f"; {best.note}" if best.note else "")
    return dataclasses.replace(best, note=note)


def middle(measured: list[Rate]) -> Rate:
    """The round whose fraction of its own round's limit is the median of the rounds', noted so."""
    ranked = sorted(measured, key=lambda r: r.limit)
    mid = ranked[(len(ranked) - 1) // 2]
    spread = f"{ranked[0].limit:.2f}-{ranked[-1].limit:.2f}" if len(ranked) > 1 else f"{mid.limit:.2f}"
    note = f"median of {len(measured)} rounds ({spread} of each round's limit)" + (f"; {mid.note}" if mid.note else "")
    return dataclasses.replace(mid, note=note)


def process_reads(split, n: int) -> Head:
    """`split` as the `torch` pipeline would see it if its reads were not copies: DataLoader worker processes."""
    head = Head(split, n)
    head.reads_are_copies = False
    return head


def paired_rounds(inp: Inputs, cfg, env, args, jobs: list) -> list[Rate]:
    """--rounds rounds of: the shards' page-cache and disk limit, then each of `jobs` ((key, what, measure
    with a limit in MB/s -> Rate)) in alternating order (ABC CBA ...), each judged against its own round's
    limit: this VM's memory speed drifts 2x within minutes, so a limit and a pipeline measured far apart do
    not compare. Returns the fastest page-cache and disk limits, then each job's median round (jobs skipped
    in every round left out)."""
    paths, held = inp.shard_files()
    limits, measured, skipped = [], {key: [] for key, _, _ in jobs}, set()
    for r in range(args.rounds):
        _note(f"round {r + 1}/{args.rounds}: shard limit, then " + ", ".join(w for _, w, _ in jobs))
        inp.shard_train.close()  # the previous round's maps would keep the shards' pages from being evicted
        limits.append(limit_rows("shard .images.npy, 8 MiB reads", paths, held, read_files, paths)[0])
        for key, what, measure in (jobs if r % 2 == 0 else jobs[::-1]):
            if key in skipped:
                continue
            try:
                measured[key].append(measure(limits[-1][0].mb_per_s))
            except StemdlError as exc:  # DALI not installed: the other rows still stand
                _note(f"{what}: skipped: {exc}")
                skipped.add(key)
    return [fastest([r[k] for r in limits]) for k in (0, 1)] + [middle(m) for m in measured.values() if m]


def throughput(inp: Inputs, cfg, env, args, bar: Progress) -> list[Rate]:
    h5_files, held = inp.raw_files()
    samples = [(str(inp.index.file_path(i)), inp.index.group_name(i)) for i in inp.rows]
    _note("row 1: sequential reads, page cache then disk")
    rates = limit_rows("raw .h5 files, 8 MiB reads", h5_files, held, read_files, h5_files)[0]
    rates += limit_rows("cbed_stack, h5py read_direct", h5_files, inp.n, read_stacks, samples)[0]
    bar.update(1)
    pixels = int(np.prod(inp.shard_train.image_shape))
    shard = pixels * inp.shard_train.dtype.itemsize
    w = args.workers
    dali_out = 4 * pixels if env.device != "cpu" else shard  # float32 normalized on a GPU, stored values on a CPU
    dali_ops = "GPU" if env.device != "cpu" else "CPU"
    long = inp.long_shards
    row3 = ("3", "shards -> torch, read in the training process", "torch", long, (shard, shard))
    row4 = ("4", f"shards -> dali ({dali_ops} ops), {max(1, w)} threads", "dali", long, (shard, dali_out))
    # The shards' limit is what rows 3 and 4 are judged against: measured in every round, beside them.
    jobs = [("gather", "batch gathers", lambda mb: gather_row(long[0], cfg, env, args.epochs, shard, mb))]
    jobs += [(spec[0], spec[1], lambda mb, spec=spec: pipeline_row(*spec[:4], cfg, env, args.epochs, spec[4], mb))
             for spec in (row3, row4)]
    paired = paired_rounds(inp, cfg, env, args, jobs)
    limit = paired[0].mb_per_s  # the fastest page-cache read of the shards: the reference rows below use it
    bar.update(3)
    shards_by_processes = (process_reads(long[0], len(long[0])), long[1])
    plan = [("2", f"raw HDF5 -> preprocess, torch, {w} workers", "torch", inp.raw,
             (inp.raw_sample_bytes(), shard), None),
            ("-", f"shards -> torch DataLoader, {w} worker processes (not used)", "torch", shards_by_processes,
             (shard, shard), limit),
            ("-", "shards -> memory pipeline, epochs after init", "memory", long, (shard, shard), limit)]
    later = []
    for row, what, name, splits, bytes_per, ref in plan:
        _note(f"row {row}: {what}")
        later.append(pipeline_row(row, what, name, splits, cfg, env, args.epochs, bytes_per, ref))
        bar.update(1)
    # limits, the gathers, row 2, rows 3-4, then the reference pipelines
    return rates + paired[:3] + later[:1] + paired[3:] + later[1:]


# ---- the report -----------------------------------------------------------------------------------------

def _first_line_of(path: str, key: str) -> str | None:
    try:
        with open(path) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(key)), None)
    except OSError:
        return None


def _mount_of(path: Path) -> str:
    """'device on mount point (fs type)' of the file system holding `path`."""
    best = ("?", "/", "?")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                device, point, kind = line.split()[:3]
                if str(path).startswith(point) and len(point) >= len(best[1]):
                    best = (device, point, kind)
    except OSError:
        pass
    return f"{best[0]} on {best[1]} ({best[2]})"


def machine(data) -> dict:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    available = _first_line_of("/proc/meminfo", "MemAvailable")
    return {"cpu": _first_line_of("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "memory_gib": round(total / 2**30, 1), "memory_available": available,
            "data_disk": _mount_of(Path(data).resolve()), "load_average": list(os.getloadavg()),
            "python": platform.python_version(), "torch": torch.__version__}


def rate_table(rates: list[Rate]) -> list[str]:
    lines = [f"{'row':<4}{'what':<58}{'samples/s':>11}{'MB/s':>10}{'of limit':>10}  note"]
    for r in rates:
        note = r.note
        if r.out_bytes is not None and r.out_bytes != r.bytes:
            note = f"{r.out_bytes / MB / r.seconds:,.1f} MB/s out; {note}"
        limit = f"{r.limit:.2f}" if r.limit is not None else ""
        lines.append(f"{r.row:<4}{r.what:<58}{r.samples_per_s:>11,.0f}{r.mb_per_s:>10,.1f}{limit:>10}  {note}")
    return lines


def step_table(steps: list[Steps]) -> list[str]:
    base = steps[0].per_epoch if steps else float("nan")
    lines = [f"{'row':<4}{'training step':<30}{'median ms':>10}{'mean ms':>9}{'wait ms':>9}{'start ms':>10}"
             f"{'epoch ms':>10}{'/memory':>9}"]
    for s in steps:
        lines.append(f"{'5':<4}{s.what:<30}{1e3 * s.median:>10.1f}{1e3 * s.mean:>9.1f}"
                     f"{1e3 * float(np.mean(s.wait_s)):>9.2f}{1e3 * float(np.mean(s.start_s)):>10.1f}"
                     f"{1e3 * s.per_epoch:>10.1f}{s.per_epoch / base:>9.3f}")
    return lines


def verdicts(rates: list[Rate], steps: list[Steps]) -> list[str]:
    lines = []
    for r in rates:
        if r.row in ("3", "4"):
            steady = r.limit * r.steady_samples_per_s / r.samples_per_s
            met = "met" if r.limit >= SHARD_TARGET else "NOT met"
            lines.append(f"target: {r.what}: {r.limit:.2f} of its round's read limit over whole epochs (median "
                         f"round), {steady:.2f} leaving out their first batches (>= {SHARD_TARGET}): {met}")
    for s in steps[1:]:
        slower = s.per_epoch / steps[0].per_epoch - 1
        met = "met" if slower <= STEP_TARGET else "NOT met"
        lines.append(f"target: step with {s.what}: {slower:+.1%} vs in memory (epoch ms; <= +{STEP_TARGET:.0%}): "
                     f"{met}")
    return lines


def header(host: dict, inp, args, cfg, env) -> list[str]:
    split = inp.shard_train
    shard = int(np.prod(split.image_shape)) * split.dtype.itemsize
    return [f"machine: {host['cpu']}, {host['cores']} cores, {host['memory_gib']} GiB memory, data on "
            f"{host['data_disk']}; load average {host['load_average'][0]:.2f} before, "
            f"{host['load_average_after'][0]:.2f} after",
            f"data: {inp.n:,} training samples of {args.data} ({inp.raw_sample_bytes():,} B raw a sample), "
            f"shards {args.size}x{args.size} {split.dtype.name} ({shard:,} B a sample), batch {args.batch}",
            f"step: model {cfg.workload.model} on {env.device}, {torch.get_num_threads()} torch threads, {args.rounds} "
            f"round(s) of {-(-args.steps // args.rounds)} steps after {args.warmup} of warm-up"]


def write_json(path: Path, report: dict) -> None:
    files.write_atomic(path, json.dumps(report, indent=1) + "\n")


# ---- the command ----------------------------------------------------------------------------------------

def _workers_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(dict.fromkeys(int(v) for v in text.split(",") if v.strip()))
    except ValueError:
        values = ()
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of worker counts, e.g. 0,1,2")
    return values


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="data/default", help="raw data set (default: %(default)s)")
    parser.add_argument("--size", type=int, default=64, help="image size of the run (default: %(default)s)")
    parser.add_argument("--samples", type=int, help="the first N training samples (default: all)")
    parser.add_argument("--batch", type=int, default=64, help="batch size (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2,
                        help="DataLoader workers / DALI threads of rows 2-4 (default: %(default)s)")
    parser.add_argument("--step-workers", type=_workers_list, default=(1, 2), metavar="LIST",
                        help="DALI thread counts tried in row 5, 0 counting as 1 (default: 1,2)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs timed in rows 2-4 (default: %(default)s)")
    parser.add_argument("--epoch-samples", type=int, default=EPOCH_SAMPLES, metavar="N",
                        help="samples in an epoch of rows 3 and 4: the --samples repeated (default: %(default)s, "
                             "a rank's epoch of the public set's 148,006 training samples on 8 ranks)")
    parser.add_argument("--steps", type=int, default=30, help="training steps timed in row 5 (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps before each measurement of row 5, 1 or more: the first holds the "
                             "pipeline's start (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of the shard limit with rows 3-4, and of every row-5 configuration "
                             "(--steps split among them) (default: %(default)s)")
    parser.add_argument("--shards", help="converted shards of --data at --size (default: convert into a "
                                         "temporary folder, removed after)")
    parser.add_argument("--threads", type=int, help="torch threads of this process (default: every core, as "
                                                      "`stemdl run` on one rank)")
    parser.add_argument("--model", help="model of the step (default: the default run's, small_cnn)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the step and DALI run (default: %(default)s)")
    parser.add_argument("--json", help="also write the figures here (never overwritten)")


def _check(args) -> None:
    if args.json and Path(args.json).exists():
        raise StemdlError(f"--json {args.json}: exists; results are never overwritten, choose another name")
    if args.size < 8 or args.batch < 1 or args.workers < 0 or args.epochs < 1 or args.steps < 1 \
            or args.warmup < 1 or args.rounds < 1 \
            or (args.threads is not None and args.threads < 1):
        raise StemdlError("need --size >= 8, --batch >= 1, --workers >= 0, --epochs >= 1, --steps >= 1, "
                          "--warmup >= 1, --rounds >= 1, --threads >= 1")
    if args.epoch_samples < args.batch:
        raise StemdlError(f"--epoch-samples {args.epoch_samples}: fewer than one batch of {args.batch}")
    if args.samples is not None and args.samples < args.batch:
        raise StemdlError(f"--samples {args.samples}: fewer than one batch of {args.batch}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise StemdlError("--device cuda: no CUDA GPU visible to torch")
    if not Path(args.data).is_dir():
        raise StemdlError(f"--data {args.data}: no such folder")


def _setup(args):
    from stemdl.harness import dist
    from stemdl.harness.config import load_config
    from stemdl.workloads.spacegroup.workload import WORKLOAD

    cfg = load_config(WORKLOAD, "default", {"data": args.data, "synth_preset": "", "image_size": args.size,
                                  "batch_size": args.batch, "loader_workers": args.workers, "model": args.model})
    gpu = args.device == "cuda"
    env = dist.DistributedEnv(device="cuda:0" if gpu else "cpu", backend="nccl" if gpu else "gloo",
                              accelerators_per_node=int(gpu), hostname=platform.node())
    return cfg, env


def measure(args, cfg, env, shard_root: Path) -> dict:
    inp = open_inputs(args, cfg, shard_root)
    _note(f"{inp.n:,} training samples of {args.data}, shards in {shard_root}")
    configurations = 4 + len({max(1, w) for w in args.step_workers})
    with Progress(7 + args.rounds * configurations, what="measurements", label="bench io") as bar:
        rates = throughput(inp, cfg, env, args, bar)
        steps = step_rows(inp, cfg, env, args, bar)
    return {"inputs": inp, "rates": rates, "steps": steps}


def run(args: argparse.Namespace) -> int:
    _check(args)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)  # all cores: `stemdl run` on one rank does so
    cfg, env = _setup(args)
    host = machine(args.data)
    tmp = None
    try:
        if args.shards is None:
            tmp = Path(tempfile.mkdtemp(prefix="stemdl-bench-io-"))
            convert_into(args.data, tmp / "shards", args.size)
        result = measure(args, cfg, env, Path(args.shards) if args.shards else tmp / "shards")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    inp, rates, steps = result["inputs"], result["rates"], result["steps"]
    host["load_average_after"] = list(os.getloadavg())
    lines = [*header(host, inp, args, cfg, env), *rate_table(rates), *step_table(steps), *verdicts(rates, steps)]
    print("\n".join(lines), flush=True)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "func"}
        write_json(Path(args.json), {"machine": host, "settings": settings, "samples": inp.n,
                                     "rates": [r.to_json() for r in rates], "steps": [s.to_json() for s in steps],
                                     "targets": {"shard_of_limit": SHARD_TARGET, "step_slower": STEP_TARGET}})
    return 0
