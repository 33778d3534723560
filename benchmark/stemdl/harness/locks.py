"""One writer at a time in a folder: an exclusive `flock` on `FOLDER/.lock`, held for a whole block.

    with folder_lock(out):                        # waits for another holder, saying so once on stderr
    with folder_lock(out, timeout=60):            # ... for a minute at most, then a one-line StemdlError
    with folder_lock(out, wait=False):            # that StemdlError at once, naming the holder

flock dies with its process (kill -9 included), so a lock file left behind is not a stale lock: the next
writer simply locks it again. The file is never deleted, even when free: a waiter may hold it open, and a
fresh file in its place would let two processes each hold "the" lock. While held it names its holder
("host pid") for the message of those who wait.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
import time
from pathlib import Path

from stemdl.harness import files
from stemdl.harness.errors import StemdlError

LOCK_NAME = ".lock"
POLL_S = 0.1
# flock refused by the file system itself (Lustre mounted without -o flock, some FUSE mounts): no lock.
UNSUPPORTED = frozenset({errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL})


UNNAMED = "another process"
NAMING_S = 0.5  # a new holder names itself within microseconds of locking; a waiter allows it this long


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it; UNNAMED in the instant before it has."""
    words = os.pread(fd, 256, 0).decode(errors="replace").split()
    return f"{words[0]} pid {words[1]}" if len(words) == 2 else UNNAMED


def _acquire(fd: int, folder: Path, wait: bool, timeout: float | None, what: str) -> bool:
    """True once this process holds the lock; False where the file system has no flock."""
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno not in UNSUPPORTED:
                raise
            print(f"stemdl: warning: {folder}: the file system cannot lock ({exc.strerror}); going on "
                  "unlocked: run one writer at a time there", file=sys.stderr)
            return False
        holder = _holder(fd)
        naming = holder == UNNAMED and time.monotonic() - start < NAMING_S
        if not wait and not naming:
            raise StemdlError(f"{folder}: {holder} is {what}; try again when it has finished")
        if deadline is not None and time.monotonic() >= deadline:
            raise StemdlError(f"{folder}: {holder} is still {what} after {timeout:g} s of waiting")
        if wait and not told and not naming:
            print(f"waiting for {holder}, which is {what}", file=sys.stderr, flush=True)
            told = True
        time.sleep(POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic())))


@contextlib.contextmanager
def folder_lock(path: Path | str, *, wait: bool = True, timeout: float | None = None, what: str | None = None):
    """Hold the exclusive lock of the folder `path` (which must exist) for the block; see the module
    docstring. `timeout`: seconds to wait (None: for ever); `what` completes "..., which is WHAT"."""
    folder = Path(path)
    what = what or f"writing {folder}"
    lock = folder / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise files.write_error(lock, exc) from None
    locked = False
    try:
        locked = _acquire(fd, folder, wait, timeout, what)
        try:  # the name is for the messages of waiters only: a full disk must not stop the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{socket.gethostname()} {os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        yield lock
    finally:
        if locked:
            with contextlib.suppress(OSError):  # a free lock names nobody
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)  # for forked children that share the descriptor too
        os.close(fd)
