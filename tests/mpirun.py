"""What the multi-rank tests share: finding mpiexec, and running ranks without ever hanging the suite.

    if mpiexec() is None: pytest.skip(...)
    out = run_ranks([sys.executable, "script.py", ...])   # 2 ranks; stdout and stderr together; fails on a hang
"""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# Ranks share this machine's cores; Open MPI needs the root and oversubscribe switches in CI (MPICH ignores them).
MPI_ENV = {"OMP_NUM_THREADS": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1", "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe"}
SKIP_REASON = "no mpiexec beside the interpreter or on PATH (pip install mpich)"


def mpiexec() -> str | None:
    """The venv's own mpiexec (the mpich wheel) before any on PATH: the one mpi4py was installed with."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec") or shutil.which("mpirun")


def run_ranks(argv: list, n: int = 2, timeout: int = 120) -> subprocess.CompletedProcess:
    """`mpiexec -n N *argv`, its output (stdout and stderr together) in .stdout; a run that outlives `timeout`
    is killed with every rank it started and fails the test."""
    launcher = mpiexec()
    if launcher is None:
        pytest.skip(SKIP_REASON)
    command = [launcher, "-n", str(n), *map(str, argv)]
    proc = subprocess.Popen(command, env={**os.environ, **MPI_ENV}, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # mpiexec and the ranks it started
        out, _ = proc.communicate()
        pytest.fail(f"mpiexec -n {n} did not finish in {timeout} s (a hang):\n{out}")
    return subprocess.CompletedProcess(command, proc.returncode, out)
