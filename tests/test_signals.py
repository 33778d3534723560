"""SIGTERM/SIGINT on one rank stops every rank: run_stop aborted with the reason, a compliant log, exit 128+N."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checks import check_log
from mpirun import mpiexec

ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1")
RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def stemdl_run(tiny_data, log_dir, *launcher, extra=()) -> subprocess.Popen:
    # 200 epochs: the run never ends by itself within the test (an epoch of the smoke preset takes ms)
    return subprocess.Popen([*launcher, sys.executable, "-m", "stemdl", "run", "--config", "smoke",
                             "--data", str(tiny_data), "--epochs", "200", "--log-dir", str(log_dir), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def wait_for_key(proc, log_dir: Path, key: str, timeout: float = 120) -> None:
    """Until the run's log has a `key` line: a first evaluation, since the rules want at least one."""
    deadline = time.monotonic() + timeout
    log = log_dir / "result_0.txt"
    while time.monotonic() < deadline:
        if log.exists() and f'"key": "{key}"' in log.read_text():
            return
        assert proc.poll() is None, f"the run ended early: {proc.communicate()[1][-3000:]}"
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"no {key} in {log} after {timeout} s")


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (the ranks are mpiexec's children or grandchildren)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def rank_pid(launcher_pid: int, rank: int) -> int:
    for pid in descendants(launcher_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        values = dict(item.decode(errors="replace").partition("=")[::2] for item in environ if b"=" in item)
        if any(values.get(var) == str(rank) for var in RANK_VARS) and "stemdl" in \
                Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            return pid
    pytest.fail(f"no process of rank {rank} below {launcher_pid}")


def last_run_stop(log: Path) -> dict:
    lines = [json.loads(line.split(":::MLLOG ", 1)[1]) for line in log.read_text().splitlines()]
    assert lines[-1]["key"] == "run_stop" or lines[-2]["key"] == "run_stop", "run_stop ends the log"
    return next(line for line in reversed(lines) if line["key"] == "run_stop")


def assert_stopped(proc, log_dir: Path, reason: str, status: int | None) -> str:
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"still running 30 s after the signal: {err[-3000:]}")
    assert proc.returncode != 0, err[-3000:]
    if status is not None:
        assert proc.returncode == status, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert f"stopped by {reason}" in err
    log = log_dir / "result_0.txt"
    stop = last_run_stop(log)
    assert stop["metadata"]["status"] == "aborted" and stop["metadata"]["reason"] == reason
    ok, messages = check_log(log)
    assert ok, messages
    metrics = json.loads(log.with_suffix(".metrics.json").read_text())
    assert metrics["status"] == "aborted" and metrics["interrupted"] == reason
    return out


@pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (install the 'mpi' extra)")
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_sigterm_on_one_of_two_ranks_stops_both_with_an_aborted_log(tiny_data, tmp_path):
    log_dir = tmp_path / "runs"
    proc = stemdl_run(tiny_data, log_dir, mpiexec(), "-n", "2")
    wait_for_key(proc, log_dir, "eval_accuracy")
    os.kill(rank_pid(proc.pid, 1), signal.SIGTERM)
    out = assert_stopped(proc, log_dir, "SIGTERM on rank 1", None)  # mpiexec passes on a non-zero status
    assert out.count("stemdl: macro F1 0.9 NOT reached") == 1


def test_sigint_stops_a_single_process_run_with_status_130(tiny_data, tmp_path):
    log_dir = tmp_path / "runs"
    proc = stemdl_run(tiny_data, log_dir)
    wait_for_key(proc, log_dir, "eval_accuracy")
    proc.send_signal(signal.SIGINT)
    assert_stopped(proc, log_dir, "SIGINT on rank 0", 128 + signal.SIGINT)


def test_sigterm_during_setup_stops_without_a_traceback(tiny_data, tmp_path):
    log_dir = tmp_path / "runs"
    proc = stemdl_run(tiny_data, log_dir)
    # the first line comes after the handlers are installed, before the log and the pipeline exist
    first = proc.stderr.readline()
    assert "rank(s)" in first, first
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "SIGTERM on rank 0" in err
    log = log_dir / "result_0.txt"
    if log.exists() and '"key": "run_start"' in log.read_text():  # setup was faster than the signal
        assert last_run_stop(log)["metadata"]["status"] == "aborted"


@pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (install the 'mpi' extra)")
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_a_killed_rank_ends_the_job_without_a_hang(tiny_data, tmp_path):
    # kill -9 cannot be caught: the launcher must notice the dead rank and end the other (no hang in a
    # collective until its timeout). The log stays as far as it got, without run_stop.
    log_dir = tmp_path / "runs"
    proc = stemdl_run(tiny_data, log_dir, mpiexec(), "-n", "2")
    wait_for_key(proc, log_dir, "epoch_start")
    os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
    killed = time.monotonic()
    proc.communicate(timeout=60)
    assert proc.returncode != 0 and time.monotonic() - killed < 30
    assert '"key": "run_stop"' not in (log_dir / "result_0.txt").read_text()


@pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (install the 'mpi' extra)")
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_sigterm_removes_the_node_local_staged_copy(tiny_data, tmp_path):
    from stemdl.cli import main

    shards, stage, log_dir = tmp_path / "shards", tmp_path / "stage", tmp_path / "runs"
    assert main(["convert", str(tiny_data), str(shards), "--size", "32", "--workers", "1", "--quiet"]) == 0
    stage.mkdir()
    proc = stemdl_run(shards, log_dir, mpiexec(), "-n", "2", extra=("--stage-dir", str(stage)))
    wait_for_key(proc, log_dir, "eval_accuracy")
    assert len(list(stage.iterdir())) == 1, "staged during init"
    os.kill(rank_pid(proc.pid, 1), signal.SIGTERM)
    assert_stopped(proc, log_dir, "SIGTERM on rank 1", None)
    assert list(stage.iterdir()) == [], "a stopped run removes what it staged"
