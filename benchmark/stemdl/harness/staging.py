"""Node-local staging: copy the shard files each node reads to its own fast storage, before the clock.

    tag = dist.broadcast_object(staging.new_job_tag())                 # the same on every rank of the job
    staged = staging.stage(src_root, entries, Path("/dev/shm"), tag)   # collective over all ranks
    try:
        ...                                   # read staged.root / relative_path instead of src_root / ...
    finally:
        staging.cleanup(staged)               # node-local rank 0 removes stage_dir/stemdl-<tag>

MLPerf HPC (v3.0) lets a run copy its data to node-local storage (RAM disk, NVMe, a burst buffer) inside
init, outside the clock, between `staging_start` and `staging_stop`. `entries` are (relative path, bytes,
sha256 or None) as the shard manifest lists them. Every rank passes its node's list, the same on all ranks
of a node: the whole set, or the node's part from `node_split` when each node reads only its own.

How it works. Node-local rank 0 checks the folder, creates stage_dir/stemdl-<tag> and checks that the
files still missing fit in the free space. The node's ranks then share the list (`node_split` again:
about the same bytes each, largest first). A rank copies a file in BUFFER_BYTES chunks to a temporary name
beside the target, hashing the bytes as they pass when `verify` and the entry has a sha256 (one read),
and renames it only when it is complete and its size and checksum match. A file already there with the
right size (and checksum) is kept, so a job restarted on a persistent burst buffer copies only what is
missing; only copied bytes are counted. No fsync: the staged copy is scratch, the source stays the truth.

The outcomes then meet twice: over the node (an allgather, which is also the barrier that keeps a rank
from training before all of its node's files are there) and over the world (one `dist.sum_ints`), so an
error on any rank raises the same one-line StemdlError on every rank instead of leaving the others waiting
in the next collective. On an error the partial folder is removed. Rank 0 prints one line per node (and a
total over several nodes) to stderr; node-local rank 0 shows a progress line for large sets.

Cleanup. `cleanup` uses no collective, since callers run it in `finally`, possibly while another rank has
failed or died, where a barrier could hang: the node-local rank 0 (`owner`) removes the whole folder and
the other ranks do nothing. Call it after the run's own final barrier, so no rank of the node still opens
staged files. Should the caller never get to it (an exception before its `try`), an atexit hook removes
the folder at interpreter exit. A job ended by MPI_Abort or SIGKILL runs no atexit hooks and leaves
stage_dir/stemdl-<tag> behind: RAM disks are cleared at reboot or by the scheduler's epilogue, else remove
it by hand.

Keeping the files (`--keep-staged`): pass keep=True and do not call `cleanup`; then no atexit hook is set
and a failed staging leaves the complete files. To reuse them in a later job (a restart on a persistent
burst buffer), pass the same tag again (e.g. one derived from the data set, not from the pid).

stage_dir should be node-local. On a shared file system the nodes write into one folder (temporary names
carry host and pid, so copies do not collide) and every node's rank 0 removes it at cleanup.
"""

from __future__ import annotations

import atexit
import hashlib
import heapq
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from stemdl.harness import dist, files
from stemdl.harness.errors import DataError, StemdlError
from stemdl.harness.progress import Progress

# Measured from a page-cached /tmp to /dev/shm (500 MB, 1 and 2 ranks): 1 and 4 MiB buffers copy as fast as
# 16 MiB and faster than 64 MiB ones, since a chunk stays in the CPU cache from the read through the hash to
# the write; 4 MiB keeps the number of reads low on parallel file systems.
BUFFER_BYTES = 4 << 20
PROGRESS_MIN_BYTES = 1 << 30  # node-local rank 0 shows progress when its share is at least this
FOLDER_PREFIX = "stemdl-"

Entry = tuple[str, int, "str | None"]  # (path relative to the source root, bytes, sha256 hex or None)

_TAG = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")

# Folders this process staged and must remove at exit unless cleanup() did it first (not with keep=True).
_pending: set[Path] = set()
_atexit_set = False


@dataclass(frozen=True)
class Staged:
    root: Path           # where the staged files are (same relative paths as the source root)
    bytes: int           # bytes this node copied (sum over its ranks); 0 if nothing to do
    files: int           # files this node copied
    seconds: float       # from the start of staging to the end of the agreement over all ranks
    owner: bool          # True on the node rank that removes the folder at cleanup (node-local rank 0)
    rank_bytes: int = 0  # bytes this rank copied
    rank_files: int = 0
    total_bytes: int = 0  # bytes all nodes copied, for the log
    total_files: int = 0


# ---- public API -----------------------------------------------------------------------------------------

def new_job_tag() -> str:
    """A tag for this job's stage folder: time, pid and randomness. Make it on rank 0 and broadcast it."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{os.urandom(3).hex()}"


def stage(src_root: Path, entries: list[Entry], stage_dir: Path, job_tag: str, verify: bool = True,
          keep: bool = False) -> Staged:
    """Copy the files `entries` (relative path, bytes, sha256 or None) this node needs from src_root to
    stage_dir/stemdl-<job_tag>/, with the same relative paths. Collective over ALL ranks: call it on every
    rank with that rank's node's list (the same list on every rank of a node) and the same job_tag.
    An error on any rank raises the same one-line StemdlError on all of them."""
    env = dist.current()
    node = dist.node_comm()
    local_rank, local_size = (node.Get_rank(), node.Get_size()) if node is not None else (0, 1)
    src_root, stage_dir, entries = Path(src_root), Path(stage_dir), list(entries)
    root = stage_dir / f"{FOLDER_PREFIX}{_check_tag(job_tag)}"
    owner, where = local_rank == 0, f"rank {env.rank} on {env.hostname}"
    start = time.perf_counter()

    problem = _prepare(stage_dir, root, entries, keep) if owner else None
    problem = problem and f"{where}: {problem}"
    if node is not None:
        problem = node.bcast(problem, root=0)
    counts, kept = (0, 0), 0
    if problem is None:
        mine = node_split(entries, local_size)[local_rank]
        counts, kept, problem = _copy_share(src_root, root, mine, verify, show=owner)
        problem = problem and f"{where}: {problem}"
    # The node's barrier: after it every file of the node is in place, or some rank has a problem.
    outcomes = node.allgather((counts, kept)) if node is not None else [(counts, kept)]
    node_bytes, node_files = (sum(o[0][i] for o in outcomes) for i in (0, 1))
    node_kept = sum(o[1] for o in outcomes)
    seconds = time.perf_counter() - start

    first_failed, per_node = _agree(env, owner, problem, (node_bytes, node_files, node_kept, seconds))
    if first_failed is not None:
        message = dist.broadcast_object(problem, root=first_failed)
        if owner and not keep:
            _remove(root)
        raise StemdlError(message)
    if env.is_root:
        _print_summary(per_node, root)
    return Staged(root=root, bytes=node_bytes, files=node_files, seconds=time.perf_counter() - start,
                  owner=owner, rank_bytes=counts[0], rank_files=counts[1],
                  total_bytes=sum(n[0] for n in per_node), total_files=sum(n[1] for n in per_node))


def cleanup(staged: Staged) -> None:
    """Remove the staged folder: the owner (node-local rank 0) does, the other ranks do nothing. Uses no
    collective, so it cannot hang after a failure elsewhere; safe to call twice. A folder that cannot be
    removed is a warning on stderr, not an error: the run's own outcome matters more."""
    if staged.owner:
        _remove(staged.root)


def node_split(entries: list[Entry], n_parts: int) -> list[list[Entry]]:
    """`entries` cut into n_parts lists of nearly equal bytes (largest file first, each to the part with
    the fewest bytes so far, ties to the lower part), each in the input's order. Deterministic: the same
    files give the same parts whatever their order, so every rank computes the split on its own. The
    fullest part exceeds the emptiest by at most the largest file."""
    if n_parts < 1:
        raise StemdlError(f"cannot split files into {n_parts} parts")
    loads = [(0, part) for part in range(n_parts)]
    where = {}
    for entry in sorted(entries, key=lambda e: (-e[1], e[0])):
        load, part = heapq.heappop(loads)
        where[entry[0]] = part
        heapq.heappush(loads, (load + entry[1], part))
    parts: list[list[Entry]] = [[] for _ in range(n_parts)]
    for entry in entries:
        parts[where[entry[0]]].append(entry)
    return parts


# ---- the owner's checks ---------------------------------------------------------------------------------

def _check_tag(job_tag: str) -> str:
    if not isinstance(job_tag, str) or not _TAG.fullmatch(job_tag):
        raise StemdlError(f"staging tag {job_tag!r}: use 1 to 64 letters, digits, '.', '_' or '-'")
    return job_tag


def _prepare(stage_dir: Path, root: Path, entries: list[Entry], keep: bool) -> str | None:
    """Check the list and the folder, create the stage root and check the free space (node-local rank 0).
    Returns the problem, or None."""
    problem = _check_entries(entries)
    if problem:
        return problem
    if not stage_dir.is_dir():
        return f"staging folder {stage_dir} does not exist or is not a folder"
    if not os.access(stage_dir, os.W_OK | os.X_OK):
        return f"staging folder {stage_dir} is not writable"
    try:
        root.mkdir(exist_ok=True)
    except OSError as exc:
        return f"cannot create {root}: {exc.strerror}"
    if not keep:
        _remove_at_exit(root)
    missing = sum(size for rel, size, _ in entries if not _has_size(root / rel, size))
    free = shutil.disk_usage(root).free
    if missing > free:
        return (f"staging folder {stage_dir}: this node's files need {_size_text(missing)} more but only "
                f"{_size_text(free)} is free")
    return None


def _check_entries(entries: list[Entry]) -> str | None:
    seen = set()
    for entry in entries:
        rel, size, sha = entry
        parts = PurePosixPath(rel).parts
        if not rel or PurePosixPath(rel).is_absolute() or ".." in parts or "\\" in rel:
            return f"manifest entry {rel!r}: not a relative path inside the data folder"
        if not isinstance(size, int) or size < 0:
            return f"manifest entry {rel}: size {size!r} is not a byte count"
        if sha is not None and not _SHA256.fullmatch(str(sha)):
            return f"manifest entry {rel}: {sha!r} is not a sha256 hex digest"
        if rel in seen:
            return f"manifest entry {rel} is listed twice"
        seen.add(rel)
    return None


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


# ---- copying --------------------------------------------------------------------------------------------

def _copy_share(src_root: Path, root: Path, mine: list[Entry], verify: bool, show: bool):
    """Stage this rank's files: ((bytes, files) copied, files kept as they were, problem or None)."""
    buffer = bytearray(BUFFER_BYTES)  # one per rank, reused for every file
    copied_bytes = copied_files = kept = done = 0
    total = sum(size for _, size, _ in mine)
    with Progress(total=-(-total // 10**6), what="MB", label="staging",
                  quiet=not show or total < PROGRESS_MIN_BYTES) as bar:
        for rel, size, sha in mine:
            try:
                copied = _stage_file(src_root / rel, root / rel, size, sha if verify else None, buffer)
            except DataError as exc:
                return (copied_bytes, copied_files), kept, str(exc)
            except OSError as exc:  # reading the source or writing the stage folder (full, I/O error)
                return (copied_bytes, copied_files), kept, str(DataError(exc.filename or src_root / rel,
                                                                          exc.strerror or exc))
            if copied:
                copied_bytes, copied_files = copied_bytes + size, copied_files + 1
            else:
                kept += 1
            done += size
            bar.update(-(-done // 10**6) - bar.done)  # whole MB, rounded up so that the end shows 100 %
    return (copied_bytes, copied_files), kept, None


def _stage_file(src: Path, dst: Path, size: int, sha: str | None, buffer: bytearray) -> bool:
    """Copy src to dst unless dst already holds it; False when kept. The copy goes to a temporary name
    and replaces dst only once its size and checksum match the manifest."""
    if _has_size(dst, size) and (sha is None or _sha256(dst, buffer) == sha):
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(dst) as tmp:
        digest = _copy_bytes(src, tmp, size, sha is not None, buffer)
        if sha is not None and digest != sha:
            raise DataError(src, f"sha256 {digest[:16]}... differs from the manifest's {sha[:16]}... "
                                 f"(changed or damaged since it was listed)")
    return True


def _copy_bytes(src: Path, tmp: Path, size: int, hashing: bool, buffer: bytearray) -> str | None:
    """Copy src to tmp through `buffer`, hashing on the way if asked; the sha256 hex digest, or None."""
    try:
        fin = open(src, "rb", buffering=0)
    except FileNotFoundError:
        raise DataError(src, "listed in the manifest but missing") from None
    digest = hashlib.sha256() if hashing else None
    copied, view = 0, memoryview(buffer)
    with fin, open(tmp, "wb") as fout:  # a buffered writer writes each chunk whole
        actual = os.fstat(fin.fileno()).st_size
        if actual != size:
            raise DataError(src, f"{actual} bytes, but the manifest says {size}")
        while n := fin.readinto(view):
            if digest is not None:
                digest.update(view[:n])
            fout.write(view[:n])
            copied += n
    if copied != size:
        raise DataError(src, f"read {copied} bytes, but the manifest says {size} (changed while copied)")
    return digest.hexdigest() if digest is not None else None


def _sha256(path: Path, buffer: bytearray) -> str:
    digest, view = hashlib.sha256(), memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            digest.update(view[:n])
    return digest.hexdigest()


# ---- agreement, summary and removal ---------------------------------------------------------------------

def _agree(env, owner: bool, problem: str | None, node_stats: tuple[int, int, int, float]):
    """(lowest world rank with a problem or None, [(bytes, files, kept, seconds)] per node) on every rank,
    from one sum over all ranks: a failure flag per rank, then the node-local rank 0's stats per node."""
    flags = [0] * env.world_size
    flags[env.rank] = int(problem is not None)
    stats = [0] * (4 * env.number_of_nodes)
    if owner:
        bytes_, files, kept, seconds = node_stats
        stats[4 * env.node_rank:4 * env.node_rank + 4] = [bytes_, files, kept, round(seconds * 1e6)]
    summed = dist.sum_ints(flags + stats)
    failed = next((rank for rank, flag in enumerate(summed[:env.world_size]) if flag), None)
    per_node = [(b, f, k, us / 1e6) for b, f, k, us in zip(*[iter(summed[env.world_size:])] * 4)]
    return failed, per_node


def _print_summary(per_node, root: Path) -> None:
    for node_rank, (bytes_, copied, kept, seconds) in enumerate(per_node):
        also = f" ({kept} already there)" if kept else ""
        print(f"staging: node {node_rank} copied {copied} files{also}, {_size_text(bytes_)} in {seconds:.1f} s "
              f"({_size_text(bytes_ / max(seconds, 1e-9))}/s) to {root}", file=sys.stderr, flush=True)
    if len(per_node) > 1:
        total, copied = sum(n[0] for n in per_node), sum(n[1] for n in per_node)
        print(f"staging: {len(per_node)} nodes copied {copied} files, {_size_text(total)} in "
              f"{max(n[3] for n in per_node):.1f} s (slowest node)", file=sys.stderr, flush=True)


def _size_text(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _remove_at_exit(root: Path) -> None:
    global _atexit_set
    _pending.add(root)
    if not _atexit_set:
        atexit.register(_remove_pending)
        _atexit_set = True


def _remove_pending() -> None:
    for root in list(_pending):
        _remove(root)


def _remove(root: Path) -> None:
    _pending.discard(root)
    try:
        shutil.rmtree(root)
    except FileNotFoundError:
        pass
    except OSError as exc:
        print(f"stemdl: warning: could not remove the staged folder {root}: {exc.strerror}", file=sys.stderr,
              flush=True)
