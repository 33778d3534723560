"""Writing a file so that nobody ever sees half of it: a temporary name beside it, then one rename.

    write_atomic(path, text_or_bytes)                      # configs, metrics, reports, summaries
    write_atomic(path, data, durable=True)                 # fsync first: manifests, sidecars, checkpoints
    write_atomic(path, data, replace=False)                # FileExistsError rather than replace a file
    with atomic_path(path) as tmp: np.save(tmp, arrays)    # for writers that want a path of their own
    tmp = partial_path(path); ...; commit(tmp, path)       # a file written over many calls (shards)

The temporary name is `.<name>.<host>-<pid>.partial`: hidden, never matched by the globs that find results,
its own for each process (two writers of one name never share a temporary file), and recognised by
`is_partial`, so that cleanup finds what a killed writer left. On an error the temporary file goes, and a
failed write (a full disk, a read-only file system) is a StemdlError naming the file.

    check_folder(path, "--log-dir")                        # before any work: made, and writable, or one line
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import tempfile
from pathlib import Path

from stemdl.harness.errors import StemdlError

SUFFIX = ".partial"
WRITE_TEST_PREFIX = ".stemdl-write-test."  # check_folder's probe, there for microseconds
# What a write can fail with that is the storage's doing, not the program's: said in words, as StemdlError.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                          errno.EFBIG})


def _mount_of(path: Path | str) -> Path:
    """The mount point holding `path` (which need not exist yet)."""
    path = Path(os.path.abspath(path))
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def write_problem(exc: OSError, path: Path | str | None = None) -> str:
    """Why a write failed, in words ("no space left on device (/scratch: 172 KiB free)", "Read-only file
    system", ...); a full disk names the mount point of `path` and what is left on it."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        if path is None:
            return "no space left on device"
        mount = _mount_of(path)
        try:
            free = f"{shutil.disk_usage(mount).free // 1024:,} KiB free"
        except OSError:
            free = "free space unknown"
        return f"no space left on device ({mount}: {free})"
    return exc.strerror or str(exc)


def write_error(path: Path | str, exc: OSError) -> StemdlError:
    """A failed write of `path` in one line naming it."""
    return StemdlError(f"{path}: cannot write it ({write_problem(exc, path)})")


def check_folder(path: Path | str, what: str) -> Path:
    """`path` as a folder this process can write into (made if absent), or a StemdlError that names it
    and says why: what a run checks of its output folders before any work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StemdlError(f"{what} {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=WRITE_TEST_PREFIX, dir=path)  # a unique name: no race
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise StemdlError(f"{what} {path}: cannot write there ({write_problem(exc)})") from None
    return path


def partial_path(path: Path | str) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}{SUFFIX}")


def is_partial(name: str) -> bool:
    return name.startswith(".") and name.endswith(SUFFIX)


def is_transient(name: str) -> bool:
    """A file some writer has in flight (a partial, or check_folder's probe): not content of the folder."""
    return is_partial(name) or name.startswith(WRITE_TEST_PREFIX)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path | str, path: Path | str, durable: bool = False, replace: bool = True) -> None:
    """Rename the finished temporary file over `path`; `durable`: its bytes and the rename reach the disk.
    `replace=False` never replaces a file: FileExistsError if `path` exists, even if another process has
    just made it (a hard link, then the temporary name goes)."""
    if durable:
        _fsync(Path(tmp))
    if replace:
        os.replace(tmp, path)
    else:
        os.link(tmp, path)
        os.unlink(tmp)
    if durable:
        _fsync(Path(path).parent)


@contextlib.contextmanager
def atomic_path(path: Path | str, durable: bool = False, replace: bool = True):
    """A temporary path to write; renamed to `path` when the block ends without an error, removed if not."""
    tmp = partial_path(path)
    try:
        yield tmp
        commit(tmp, path, durable, replace)
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise write_error(path, exc) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_figure(fig, out: Path | str, dpi: int = 100) -> None:
    """A matplotlib figure as a PNG at `out`, its folder made, written atomically (never half a picture)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def write_atomic(path: Path | str, data: str | bytes, durable: bool = False, replace: bool = True) -> None:
    with atomic_path(path, durable, replace) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
