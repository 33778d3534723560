"""The distributed environment: one rank in this process, two ranks under mpiexec, and the failure modes."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mpirun import run_ranks

from stemdl.harness import dist
from stemdl.harness.errors import StemdlError

CHECK_SCRIPT = Path(__file__).resolve().parent / "mpi" / "dist_check.py"


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    """No launcher or rendezvous variables from whatever runs pytest; no process group left behind."""
    for var in (*dist.LAUNCHER_SIZE_VARS, "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    yield
    dist.teardown()


def test_import_is_cheap():
    code = "import sys, stemdl.harness.dist; print('torch' in sys.modules, 'mpi4py' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_single_rank_setup_and_helpers():
    env = dist.setup(timeout_s=30)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (0, 1, 0, 1)
    assert (env.node_rank, env.number_of_nodes, env.accelerators_per_node) == (0, 1, 0)
    assert (env.backend, env.device, env.hostname) == ("gloo", "cpu", socket.gethostname())
    assert env.is_root and env.mpi  # mpi4py's singleton init
    with pytest.raises(AttributeError):
        env.rank = 1  # frozen
    assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1
    assert dist.all_reduce_sum(torch.ones(3)).tolist() == [1.0, 1.0, 1.0]
    assert dist.broadcast_object({"a": [1, 2]}) == {"a": [1, 2]}
    dist.barrier()
    assert dist.node_comm().Get_size() == 1
    with pytest.raises(RuntimeError, match="already called"):
        dist.setup()

    dist.teardown()
    dist.teardown()
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="setup"):
        dist.barrier()
    assert dist.setup().rank == 0  # and again after teardown


def test_without_mpi_runs_as_one_rank_with_a_warning(monkeypatch, capsys):
    def no_mpi():
        raise ImportError("No module named 'mpi4py'")

    monkeypatch.setattr(dist, "_import_mpi", no_mpi)
    env = dist.setup(timeout_s=30)
    assert (env.rank, env.world_size, env.number_of_nodes, env.mpi) == (0, 1, 1, False)
    assert dist.node_comm() is None and dist.broadcast_object(5) == 5
    assert dist.all_reduce_sum(torch.tensor([2.0])).item() == 2.0
    err = capsys.readouterr().err
    assert err == "stemdl: warning: MPI unavailable (No module named 'mpi4py'); running as a single rank\n"

    dist.teardown()
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")  # launched as 4 tasks: 4 copies of rank 0 would be wrong
    with pytest.raises(StemdlError, match=r"started 4 tasks \(OMPI_COMM_WORLD_SIZE\) but MPI is unavailable"):
        dist.setup()


def test_launcher_and_mpi_disagreeing_is_refused(monkeypatch):
    dist._import_mpi()  # initialize MPI before faking the launcher's variables
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    with pytest.raises(StemdlError, match="started 8 tasks .* but MPI sees one rank"):
        dist.setup()
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert dist.setup().world_size == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"backend": "nccl"}, "backend 'nccl' needs a CUDA device"),
    ({"backend": "mpi"}, "backend 'mpi' is not one of nccl, gloo"),
    ({"device": "cuda:0"}, "CUDA is not available"),
    ({"device": "tpu"}, "not a torch device"),
])
def test_bad_backend_or_device(kwargs, message):
    if torch.cuda.is_available():
        pytest.skip("these are the errors of a machine without CUDA")
    with pytest.raises(StemdlError, match=f"^rank 0 on .*{message}"):
        dist.setup(**kwargs)
    assert not torch.distributed.is_initialized()


def test_gpu_per_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert dist._choose_device(5, None, None) == ("cuda:1", "nccl", None)
    assert dist._choose_device(2, None, "cuda") == ("cuda:2", "nccl", None)
    assert dist._choose_device(2, "gloo", None) == ("cuda:2", "gloo", None)
    assert dist._choose_device(2, None, "cpu") == ("cpu", "gloo", None)
    assert "only 4 GPU(s)" in dist._choose_device(0, None, "cuda:7")[2]


def test_nccl_ranks_sharing_a_gpu_are_refused(monkeypatch):
    monkeypatch.setattr(dist, "_choose_device", lambda *args: ("cuda:0", "nccl", None))
    monkeypatch.setattr(dist, "_node_gpus", lambda node, device, problem: (["GPU-a", "GPU-a", "GPU-b"], None))
    with pytest.raises(StemdlError, match=r"3 ranks share 2 GPU\(s\) on this node"):
        dist.setup()


def test_nodes_are_numbered_by_their_lowest_rank():
    leaders = [0, 0, 0, 3, 3, 3, 6, 6, 6]
    assert [dist._node_numbers(lead, leaders) for lead in (0, 3, 6)] == [(0, 3), (1, 3), (2, 3)]
    assert dist._node_numbers(2, [5, 2, 5, 2]) == (0, 2)


def test_rendezvous(monkeypatch):
    host = socket.gethostname()
    addr, port = dist._rendezvous(None, 0, host, single_node=True)
    assert addr == "127.0.0.1" and 0 < port < 65536
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
    monkeypatch.setenv("MASTER_PORT", "29555")
    assert dist._rendezvous(None, 0, host, single_node=False) == ("10.1.2.3", 29555)
    monkeypatch.setenv("MASTER_PORT", "http")
    with pytest.raises(StemdlError, match="rank 0: no rendezvous address or port"):
        dist._rendezvous(None, 0, host, single_node=True)


def test_address_for_other_nodes_is_not_loopback():
    addr = dist._reachable_address(single_node=False)
    if addr == socket.gethostname():
        return  # no non-loopback address known here: other hosts resolve the name themselves
    assert not addr.startswith("127.")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))  # an address of this host


def test_two_ranks_under_mpiexec():
    proc = run_ranks([sys.executable, CHECK_SCRIPT])
    out = proc.stdout
    assert proc.returncode == 0, out
    for rank in (0, 1):
        assert f"rank {rank}/2 ok local {rank}/2 node 0/1 sum 3" in out, out
