"""The folder lock: one holder at a time, waiters told who holds it, nothing stale after kill -9."""

import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from stemdl.harness.errors import StemdlError
from stemdl.harness.locks import LOCK_NAME, NAMING_S, folder_lock

ME = f"{socket.gethostname()} pid {os.getpid()}"


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    # flock belongs to an open file, not to a process: a second open in this process contends like another.
    with folder_lock(tmp_path, what="writing the set"):
        assert (tmp_path / LOCK_NAME).read_text() == f"{socket.gethostname()} {os.getpid()}\n"
        with pytest.raises(StemdlError) as refused:
            with folder_lock(tmp_path, wait=False, what="writing the set"):
                pass
    assert str(refused.value) == f"{tmp_path}: {ME} is writing the set; try again when it has finished"
    assert (tmp_path / LOCK_NAME).read_text() == "", "never deleted (a waiter may hold it open); names nobody"
    with folder_lock(tmp_path, wait=False):
        pass


def test_timeout_gives_up_after_waiting(tmp_path, capsys):
    with folder_lock(tmp_path):
        start = time.monotonic()
        with pytest.raises(StemdlError, match=f"^{tmp_path}: {ME} is still writing {tmp_path} after 0.3 s"):
            with folder_lock(tmp_path, timeout=0.3):
                pass
        assert time.monotonic() - start >= 0.3
    assert capsys.readouterr().err == f"waiting for {ME}, which is writing {tmp_path}\n"


def test_a_waiter_says_so_once_and_gets_the_lock_when_it_is_freed(tmp_path, capsys):
    held, free = threading.Event(), threading.Event()

    def holder():
        with folder_lock(tmp_path):
            held.set()
            free.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(10)
    threading.Timer(0.5, free.set).start()
    start = time.monotonic()
    with folder_lock(tmp_path):
        assert time.monotonic() - start >= 0.4
    thread.join()
    assert capsys.readouterr().err == f"waiting for {ME}, which is writing {tmp_path}\n"


def test_a_holder_is_given_a_moment_to_name_itself(tmp_path):
    fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # locked, not yet named
        start = time.monotonic()
        with pytest.raises(StemdlError, match=f"^{tmp_path}: another process is writing"):
            with folder_lock(tmp_path, wait=False):
                pass
        assert time.monotonic() - start >= NAMING_S
    finally:
        os.close(fd)


def test_kill_9_leaves_no_stale_lock(tmp_path):
    code = ("import sys, time; from stemdl.harness.locks import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "locked\n"
        with pytest.raises(StemdlError, match=f"{socket.gethostname()} pid {proc.pid} is writing"):
            with folder_lock(tmp_path, wait=False):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / LOCK_NAME).read_text().split() == [socket.gethostname(), str(proc.pid)]
    with folder_lock(tmp_path, wait=False):  # the file is left, the lock is not
        assert (tmp_path / LOCK_NAME).read_text().split() == [socket.gethostname(), str(os.getpid())]


def test_a_folder_that_cannot_hold_the_lock_is_one_line(tmp_path):
    with pytest.raises(StemdlError, match=f"^{tmp_path}/absent/{LOCK_NAME}: cannot write it \\(No such file"):
        with folder_lock(tmp_path / "absent"):
            pass


def test_the_lock_is_benchmark_neutral():
    code = "import sys, stemdl.harness.locks; print([m for m in sys.modules if m.startswith('stemdl.workloads')])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
