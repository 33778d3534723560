"""Writing a generated set of HDF5 sample files: reproducible, resumable, on any number of ranks and
worker processes, one writer job at a time. What every workload's generator shares; the generator says
what its set is (`SetSpec`), this module writes it.

    spec = SetSpec(benchmark="stemdl_reconstruction", preset="default", description="...",
                   content=cfg.content(), plan=[("train/batch_train_0.h5", [("train", 0), ...]), ...],
                   make=make_task, write=write_sample, worker_init=one_thread)
    manifest = write_set(out, spec, workers=2)

`make(key)` computes one sample as a pure function of its key (picklable, top-level: it runs in worker
processes), `write(h5, key, sample)` stores it in the open file. The files are the unit of work: each rank
writes a disjoint set of them (the files still to write, dealt round-robin), its worker processes
computing the samples in order; a file is written under a temporary name and renamed when complete
(`harness.files`). `OUT/synth.json` (`synthset`) records `content` and each finished file's SHA-256; the
same call continues an interrupted set (a file under its final name is complete, and is hashed into the
manifest if the writer stopped before listing it); another `content` for an existing OUT is refused. One
writer job at a time (`OUT/.lock`, held by rank 0 for the whole job): a second job waits, then finds the
set complete. A complete set is only read (it may sit on a read-only file system).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py

from stemdl import __version__
from stemdl.harness import dist, files, locks
from stemdl.harness.errors import StemdlError
from stemdl.harness.progress import Progress
from stemdl.harness.synthset import MANIFEST, read_manifest, refuse_foreign, sha256, write_json_atomic


def one_thread(in_pool: bool = True) -> None:
    """A worker's initializer: one thread (the parallelism is across samples; oversubscribed cores only
    thrash), no warnings, and signals left to the parent, which stops the pool and removes its partial file."""
    import signal
    import warnings

    import torch
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if in_pool:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def default_workers(env) -> int:
    """Worker processes per rank: the rank's share of the node's cores."""
    import os

    return max(1, (os.cpu_count() or 1) // (env.local_world_size if env is not None else 1))


def summary_line(out, manifest: dict) -> str:
    total = sum(f["samples"] for f in manifest["files"].values())
    return f"{out}: {total} samples in {len(manifest['files'])} files ({manifest['status']})"


def run_writer(out, workers: int | None, write: Callable[[int], dict],
               announce: Callable[[object, int], str] | None = None) -> int:
    """A generator command on every rank: MPI set up (gloo on the CPUs: the work is CPU work, MPI only
    carries the outcomes), `workers` processes a rank (None: `default_workers`), rank 0 printing
    announce(env, workers) on stderr first and the set's summary line at the end; write(workers) writes
    the set and returns its manifest. The command's exit status."""
    import sys

    env = dist.setup(backend="gloo", device="cpu")
    try:
        n = workers or default_workers(env)
        if env.is_root and announce is not None:
            print(announce(env, n), file=sys.stderr, flush=True)
        manifest = write(n)
        if env.is_root:
            print(summary_line(out, manifest))
        return 0
    finally:
        dist.teardown()


@dataclass(frozen=True)
class SetSpec:
    """What a generated set is: everything the writer needs."""

    benchmark: str  # recorded in synth.json: `stemdl validate` and `convert` find the benchmark there
    preset: str
    description: str
    content: dict  # the fields that decide the bytes (JSON): compared when resuming
    plan: list  # [(path relative to OUT, [sample keys])]: every file of the set, in order
    make: Callable  # make(key) -> sample; top-level and picklable
    write: Callable  # write(h5py.File, key, sample)
    worker_init: Callable | None = one_thread  # run in each worker process of a pool (threads, signals)
    what: str = "data set"  # how messages name the set ("a reconstruction data set")
    extra: dict = field(default_factory=dict)  # more fields for the complete manifest (JSON), e.g. class counts
    matches: Callable | None = None  # matches(stored config) -> bool; None: equal to `content`

    def same_data(self, stored) -> bool:
        """A manifest's `config` describes this set (resuming it, or finding it complete, is safe)."""
        return self.matches(stored) if self.matches is not None else stored == self.content


def finished(out: Path, spec: SetSpec) -> dict | None:
    """The manifest when OUT already holds this set complete (read without the lock), else None."""
    try:
        manifest = read_manifest(out)
    except StemdlError:
        return None  # said under the lock
    if not manifest or manifest.get("status") != "complete" or not spec.same_data(manifest.get("config")):
        return None
    return manifest if all((out / rel).is_file() for rel, _ in spec.plan) else None


def _open(out: Path, spec: SetSpec) -> tuple[dict, list]:
    """Under the lock: the manifest (new, or the existing one if it describes the same data) and the files
    still to write. A file under its final name is complete (renamed after closing): listed if it is not."""
    manifest = read_manifest(out)
    stored = None if manifest is None else dict(manifest, files=dict(manifest.get("files", {})))
    if manifest is None:
        manifest = {"generator": f"stemdl {__version__}", "benchmark": spec.benchmark, "preset": spec.preset,
                    "description": spec.description, "config": spec.content, "status": "incomplete", "files": {}}
    elif not spec.same_data(manifest.get("config")):
        raise StemdlError(f"{out} holds {spec.what} made with other settings (see {out / MANIFEST}); "
                          "choose another OUT, or the same settings to resume")
    for stale in out.glob("*/.*.partial"):  # what a killed writer left: nobody else writes here now
        stale.unlink()
    todo = []
    for rel, keys in spec.plan:
        if not (out / rel).exists():
            todo.append((rel, keys))
        elif rel not in manifest["files"]:
            manifest["files"][rel] = {"samples": len(keys), "sha256": sha256(out / rel)}
    if manifest != stored:  # a job that waited for another and finds the set complete rewrites nothing
        write_json_atomic(out / MANIFEST, manifest)
    return manifest, todo


def storage_error(exc: BaseException) -> OSError | None:
    """The OSError of the storage behind an h5py error, if any. After a failed write (a full disk) h5py's
    close raises a RuntimeError of its own, with the write's errno only in its text."""
    for e in (exc, exc.__context__):
        if isinstance(e, OSError) and e.errno:
            return e
    found = re.search(r"errno = (\d+)", str(exc))
    return OSError(int(found.group(1)), os.strerror(int(found.group(1)))) if found else None


def _write_share(out: Path, spec: SetSpec, todo: list, workers: int, bar: Progress, manifest: dict | None) -> dict:
    """Write this rank's files; {relative path: entry}. `manifest` (rank 0's) is updated after each file."""
    keys = [key for _, file_keys in todo for key in file_keys]
    pool = None
    if workers > 1 and len(keys) > 1:
        pool = multiprocessing.get_context("fork").Pool(min(workers, len(keys)), initializer=spec.worker_init)
        results = pool.imap(spec.make, keys, chunksize=1)
    else:
        results = map(spec.make, keys)
    written = {}
    try:
        for rel, file_keys in todo:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            with files.atomic_path(out / rel, durable=True) as tmp:
                try:
                    with h5py.File(tmp, "w") as h5:
                        for key in file_keys:
                            spec.write(h5, key, next(results))
                            bar.update(1)
                except (OSError, RuntimeError) as exc:  # as the storage's OSError, which atomic_path words
                    cause = storage_error(exc)
                    if cause is None:
                        raise
                    raise cause from None
            written[rel] = {"samples": len(file_keys), "sha256": sha256(out / rel)}
            if manifest is not None:
                manifest["files"][rel] = written[rel]
                write_json_atomic(out / MANIFEST, manifest)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return written


def _on_root(env, fn):
    return fn() if env is None else dist.on_root(fn)


def write_set(out, spec: SetSpec, workers: int = 1, quiet: bool = False, wait: bool = True,
              timeout: float | None = None, label: str = "synth") -> dict:
    """Write (or finish) the set and return its manifest. Collective when `dist.setup()` was called: the
    ranks share the files, each with `workers` processes. While another job writes OUT, wait for it
    (`timeout` seconds at most; None: for ever), or with `wait=False` refuse at once."""
    out, env = Path(out), dist.current_or_none()
    rank, size = (env.rank, env.world_size) if env is not None else (0, 1)
    with contextlib.ExitStack() as held:  # rank 0's lock, from the claim to the complete manifest

        def claim():
            done = finished(out, spec)
            if done is not None:
                return done, []
            refuse_foreign(out, "a stemdl data set")
            files.check_folder(out, "OUT")
            held.enter_context(locks.folder_lock(out, wait=wait, timeout=timeout, what=f"writing {out}"))
            return _open(out, spec)

        manifest, todo = _on_root(env, claim)
        if manifest.get("status") == "complete" and not todo:
            return manifest
        mine = todo[rank::size]
        total = sum(len(keys) for _, keys in mine)
        text = f"{label} {out}" + (f" (rank 0's {len(mine)} of {len(todo)} files)" if size > 1 else "")
        outcome: object = None
        try:
            with Progress(total, what="samples", label=text, quiet=quiet or rank != 0) as bar:
                outcome = _write_share(out, spec, mine, workers, bar, manifest if rank == 0 else None)
        except StemdlError as exc:
            outcome = exc
        except Exception:
            if size == 1:
                raise
            traceback.print_exc()  # a bug: end every rank rather than leave them waiting for this one
            dist.abort(1)
        outcomes = [outcome] if env is None else dist.allgather_object(outcome)
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if errors:
            raise errors[0]

        def complete():
            for written in outcomes:
                manifest["files"].update(written)
            manifest.update(spec.extra, status="complete")
            write_json_atomic(out / MANIFEST, manifest)
            return manifest

        return _on_root(env, complete)
