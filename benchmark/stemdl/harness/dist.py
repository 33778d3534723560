"""The distributed environment: ranks, nodes, device and the torch process group, found once.

    mpirun -n 8 python -m stemdl ...          # or srun / jsrun / mpiexec; or plain python for one rank

    env = dist.setup()                        # DistributedEnv (frozen); process group ready
    ...
    dist.all_reduce_sum(correct)              # torch collective (NCCL on GPUs, gloo on CPUs)
    cfg = dist.broadcast_object(cfg)          # small Python objects over MPI
    dist.teardown()

This is the only module that talks to MPI or reads launcher variables (OMPI_*, SLURM_*, PMI_*, JSM_*);
everyone else asks the `DistributedEnv` it returns, or `node_comm()` for node-local work such as staging.

How it works. Ranks come from MPI's COMM_WORLD, whichever launcher started them. The ranks of one node
are those sharing memory (`Split_type(COMM_TYPE_SHARED)`); nodes are numbered by their lowest world rank.
Rank 0 picks the rendezvous (127.0.0.1 on one node, else an address of its host that other hosts can
reach; `MASTER_ADDR`/`MASTER_PORT` on rank 0 override) and a free TCP port, sends both over MPI, and
every rank joins `torch.distributed` through `tcp://addr:port`. Even one rank gets a process group, so
collectives work the same at every scale. Without mpi4py, or when MPI cannot start, it runs as one rank
with a warning, unless a launcher says it started several tasks: then N copies would each think they
are rank 0, so it refuses.

torch and mpi4py are imported on first use: `import stemdl.harness.dist` stays cheap.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import traceback
from dataclasses import dataclass

from stemdl.harness.errors import StemdlError

BACKENDS = ("nccl", "gloo")

# Variables in which launchers publish how many tasks they started (Open MPI, MPICH/Intel MPI/Cray PALS
# and srun's PMI, MVAPICH, Slurm job steps, IBM jsrun). Only read to catch an MPI that sees fewer ranks.
LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS",
                      "JSM_NAMESPACE_SIZE")


@dataclass(frozen=True)
class DistributedEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0              # rank among the ranks of this node
    local_world_size: int = 1
    node_rank: int = 0               # nodes numbered by their lowest world rank
    number_of_nodes: int = 1
    accelerators_per_node: int = 0   # distinct GPUs used by the ranks of this node; 0 on CPUs
    device: str = "cpu"              # "cuda:N" or "cpu"
    backend: str = "gloo"            # torch.distributed backend: "nccl" or "gloo"
    hostname: str = ""
    mpi: bool = False                # MPI is initialized (a singleton counts) and carries the helpers

    @property
    def is_root(self) -> bool:
        return self.rank == 0


# Set by setup(), cleared by teardown(). COMM_WORLD and the node communicator are None without MPI.
_env: DistributedEnv | None = None
_comm = None
_node = None


# ---- setup and teardown ---------------------------------------------------------------------------------

def setup(timeout_s: float = 600, backend: str | None = None, device: str | None = None) -> DistributedEnv:
    """Find ranks, nodes and this rank's device, join the torch process group, and return the result.

    backend ("nccl" or "gloo") and device ("cpu", "cuda", "cuda:N") override the defaults: NCCL with
    one GPU per local rank (cuda:{local_rank % visible GPUs}) where CUDA is available, else gloo on CPU.
    Collective: every rank must call it. A problem on any rank raises the same StemdlError on all.
    """
    global _env, _comm, _node
    if _env is not None:
        raise RuntimeError("stemdl.harness.dist.setup() was already called; call teardown() first")
    host = socket.gethostname()
    comm = _world_comm()
    rank, world = (comm.Get_rank(), comm.Get_size()) if comm else (0, 1)
    node = comm.Split_type(_import_mpi().COMM_TYPE_SHARED, key=rank) if comm else None
    local_rank, local_size = (node.Get_rank(), node.Get_size()) if node else (0, 1)
    leader = node.bcast(rank, root=0) if node else 0  # the node's lowest world rank names it
    node_rank, nodes = _node_numbers(leader, comm.allgather(leader) if comm else [leader])
    try:
        device, backend, problem = _choose_device(local_rank, backend, device)
        uuids, problem = _node_gpus(node, device, problem)
        gpus = [g for g in uuids if g is not None]
        if problem is None and backend == "nccl" and len(set(gpus)) < len(gpus):
            problem = (f"{len(gpus)} ranks share {len(set(gpus))} GPU(s) on this node, but NCCL needs one "
                       f"GPU per rank: launch one rank per GPU, or use backend 'gloo'")
        _agree(comm, rank, host, problem)
        addr, port = _rendezvous(comm, rank, host, single_node=nodes == 1)
        _join(backend, device, addr, port, rank, world, host, timeout_s)
    except BaseException:
        if node is not None:
            node.Free()
        raise
    _comm, _node = comm, node
    _env = DistributedEnv(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_size,
                          node_rank=node_rank, number_of_nodes=nodes,
                          accelerators_per_node=len(set(gpus)) if device.startswith("cuda") else 0,
                          device=device, backend=backend, hostname=host, mpi=comm is not None)
    return _env


def teardown() -> None:
    """Leave the torch process group and drop the node communicator; safe to call twice, or without setup."""
    global _env, _comm, _node
    if "torch.distributed" in sys.modules:
        import torch.distributed as tdist
        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()
    if _node is not None:
        _node.Free()
    _env = _comm = _node = None


# ---- helpers for the rest of stemdl --------------------------------------------------------------------

def barrier() -> None:
    """Wait for every rank (over MPI; a no-op for one rank without MPI)."""
    _require()
    if _comm is not None:
        _comm.Barrier()


def broadcast_object(obj, root: int = 0):
    """`obj` as rank `root` has it, on every rank (pickled over MPI): configs, paths, small results."""
    _require()
    return _comm.bcast(obj, root=root) if _comm is not None else obj


def current() -> DistributedEnv:
    """The environment setup() returned (raises RuntimeError before setup)."""
    _require()
    return _env


def current_or_none() -> DistributedEnv | None:
    """The environment setup() returned, or None when this process runs alone (no setup)."""
    return _env


def allgather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled over MPI): small per-rank results."""
    _require()
    return _comm.allgather(obj) if _comm is not None else [obj]


def on_root(fn, *args, root: int = 0):
    """fn(*args) run on rank `root` only; its result, or the StemdlError it raised (with its type: a bad
    sample stays a DataError), reaches every rank. A bug (any other exception) on the root ends every rank
    (MPI_Abort) after printing its traceback.

    For work one rank does for all (generating data, building the index, planning a conversion): without
    this, an error on the root would leave the other ranks waiting in the next collective until its timeout.
    """
    outcome = None
    if _env is None or _env.rank == root:
        try:
            outcome = ("ok", fn(*args))
        except StemdlError as exc:
            outcome = ("error", exc)
        except Exception:
            if _env is None or _env.world_size == 1:
                raise
            traceback.print_exc()
            abort(1)
    outcome = broadcast_object(outcome, root=root)
    if outcome[0] == "error":
        raise outcome[1]
    return outcome[1]


def on_every_rank(fn, *args):
    """fn(*args) run on every rank; when it raised a StemdlError on any of them (a node-local folder, a
    slice of the files), every rank raises the first one's message. Collective."""
    problem = None
    try:
        fn(*args)
    except StemdlError as exc:
        problem = str(exc)
    problems = [p for p in allgather_object(problem) if p]
    if problems:
        raise StemdlError(problems[0])


def process_group_ready() -> bool:
    """True once a torch.distributed process group is up (without importing torch when nothing has)."""
    if "torch.distributed" not in sys.modules:
        return False
    import torch.distributed as tdist
    return tdist.is_available() and tdist.is_initialized()


def all_reduce_sum(tensor, group=None):
    """Sum `tensor` over the ranks of `group` in place and return it; a no-op without a process group.
    Under NCCL a CPU tensor goes through this rank's GPU and the sum is copied back into it."""
    if not process_group_ready():
        return tensor
    import torch.distributed as tdist
    if tdist.get_backend(group) == "nccl" and tensor.device.type != "cuda":
        import torch
        on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        tdist.all_reduce(on_device, op=tdist.ReduceOp.SUM, group=group)
        tensor.copy_(on_device)
    else:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM, group=group)
    return tensor


def sum_ints(values) -> list[int]:
    """Element-wise sums of a few integers over all ranks, as a list (collective). Over MPI: a few
    microseconds and no device synchronization, cheap enough for every training step, where a torch
    all-reduce costs about 100x more through gloo on CPUs and a copy to the GPU and back under NCCL."""
    _require()
    if _comm is None:  # one rank without MPI
        return [int(v) for v in values]
    import numpy as np
    send = np.asarray(values, dtype=np.int64)
    recv = np.empty_like(send)
    _comm.Allreduce(send, recv, op=_import_mpi().SUM)
    return recv.tolist()


def node_comm():
    """The MPI communicator of this node's ranks (ordered by world rank), or None without MPI."""
    _require()
    return _node


def abort(errorcode: int = 1) -> None:
    """End every rank now (MPI_Abort), e.g. when one rank fails where the others would wait forever."""
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.COMM_WORLD.Abort(errorcode)
    os._exit(errorcode)


def _require() -> None:
    if _env is None:
        raise RuntimeError("call stemdl.harness.dist.setup() first")


# ---- ranks and nodes ------------------------------------------------------------------------------------

def _import_mpi():
    """mpi4py's MPI module; importing it initializes MPI (a singleton rank when no launcher started us)."""
    from mpi4py import MPI
    return MPI


def _launcher_tasks() -> tuple[str, int] | None:
    """(variable, count) where a launcher says it started more than one task, else None."""
    for var in LAUNCHER_SIZE_VARS:
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 1:
            return var, int(value)
    return None


def _world_comm():
    """MPI's COMM_WORLD, or None (with a warning) where MPI is missing and no launcher started us."""
    launched = _launcher_tasks()
    try:
        comm = _import_mpi().COMM_WORLD
        size = comm.Get_size()
    except Exception as exc:  # ImportError without mpi4py; RuntimeError when libmpi cannot load or start
        if launched:
            raise StemdlError(f"the launcher started {launched[1]} tasks ({launched[0]}) but MPI is "
                              f"unavailable here ({_first_line(exc)}); install mpi4py built against the "
                              f"launcher's MPI") from exc
        print(f"stemdl: warning: MPI unavailable ({_first_line(exc)}); running as a single rank",
              file=sys.stderr)
        return None
    if size == 1 and launched:
        raise StemdlError(f"the launcher started {launched[1]} tasks ({launched[0]}) but MPI sees one "
                          f"rank: mpi4py is built against another MPI than the launcher's (rebuild it "
                          f"against the site MPI, or pick the matching srun --mpi plugin)")
    return comm


def _node_numbers(leader: int, leaders: list[int]) -> tuple[int, int]:
    """(node_rank, number_of_nodes) from this node's leader and every rank's leader (world ranks)."""
    distinct = sorted(set(leaders))
    return distinct.index(leader), len(distinct)


# ---- device and backend ---------------------------------------------------------------------------------

def _choose_device(local_rank: int, backend: str | None, device: str | None) -> tuple[str, str, str | None]:
    """(device, backend, problem or None) for this rank."""
    import torch
    cuda = torch.cuda.is_available()
    if device is None or device == "cuda":
        device = f"cuda:{local_rank % torch.cuda.device_count()}" if cuda else (device or "cpu")
    backend = backend or ("nccl" if device.startswith("cuda") else "gloo")
    try:
        kind = torch.device(device)
    except RuntimeError:
        return device, backend, f"device {device!r} is not a torch device (use 'cpu' or 'cuda:N')"
    if backend not in BACKENDS:
        return device, backend, f"backend {backend!r} is not one of {', '.join(BACKENDS)}"
    if kind.type not in ("cpu", "cuda"):
        return device, backend, f"device {device!r}: only 'cpu' and 'cuda' devices are supported"
    if kind.type == "cuda" and not cuda:
        return device, backend, f"device {device!r} asked for, but CUDA is not available"
    if kind.type == "cuda" and kind.index is not None and kind.index >= torch.cuda.device_count():
        return device, backend, f"device {device!r}: only {torch.cuda.device_count()} GPU(s) are visible"
    if backend == "nccl" and kind.type != "cuda":
        return device, backend, f"backend 'nccl' needs a CUDA device, not {device!r}"
    return device, backend, None


def _node_gpus(node, device: str, problem: str | None) -> tuple[list[str | None], str | None]:
    """Claim this rank's GPU; return the GPU (UUID, None on CPU) of every rank of this node, and this
    rank's problem. UUIDs, not indices, since a launcher may show each rank a different GPU as cuda:0
    (jsrun, srun --gpus-per-task). Collective over the node."""
    uuid = None
    if problem is None and device.startswith("cuda"):
        import torch
        try:
            torch.cuda.set_device(device)
            torch.zeros(1, device=device)  # creates the context: a busy or broken GPU fails here, not later
            uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        except RuntimeError as exc:  # torch.AcceleratorError and CUDA errors are RuntimeErrors
            problem = f"cannot use {device}: {_first_line(exc)}"
    return (node.allgather(uuid) if node is not None else [uuid]), problem


def _agree(comm, rank: int, host: str, problem: str | None) -> None:
    """Raise the first rank's problem on every rank, so none is left waiting in a collective."""
    problems = comm.allgather(problem and f"rank {rank} on {host}: {problem}") if comm else [problem]
    first = next((p for p in problems if p), None)
    if first:
        raise StemdlError(first)


# ---- rendezvous -----------------------------------------------------------------------------------------

def _rendezvous(comm, rank: int, host: str, single_node: bool) -> tuple[str, int]:
    """(address, port) of rank 0's torch store, chosen there and sent to all."""
    found = problem = None
    if rank == 0:
        try:
            found = (os.environ.get("MASTER_ADDR") or _reachable_address(single_node),
                     int(os.environ.get("MASTER_PORT") or _free_port()))
        except (OSError, ValueError) as exc:
            problem = f"no rendezvous address or port ({_first_line(exc)})"
    found, problem = comm.bcast((found, problem), root=0) if comm else (found, problem)
    if problem:
        raise StemdlError(f"rank 0: {problem}")
    return found


def _reachable_address(single_node: bool) -> str:
    """An address of this host that the other nodes can reach: loopback on one node, else the hostname's
    first non-loopback IPv4 address, else the source address of the default route, else the hostname."""
    if single_node:
        return "127.0.0.1"
    host = socket.gethostname()
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
        addresses = [info[4][0] for info in infos]
    except OSError:
        addresses = []
    for addr in addresses:
        if not addr.startswith("127."):
            return addr
    # The hostname maps to loopback (Debian's 127.0.1.1 in /etc/hosts): ask which local address would
    # route outwards. Connecting a UDP socket sends nothing.
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 1))
            addr = probe.getsockname()[0]
        if not addr.startswith(("127.", "0.")):
            return addr
    except OSError:
        pass
    return host  # other hosts resolve it through DNS, not through our /etc/hosts


def _free_port() -> int:
    """A TCP port free on this host now; the store binds it a moment later (a race we accept)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _join(backend, device, addr, port, rank, world, host, timeout_s) -> None:
    """Join the torch process group and run one all-reduce, so broken communicators fail in setup."""
    import torch
    import torch.distributed as tdist
    url = f"tcp://[{addr}]:{port}" if ":" in addr else f"tcp://{addr}:{port}"
    try:
        tdist.init_process_group(backend, init_method=url, rank=rank, world_size=world,
                                 timeout=datetime.timedelta(seconds=timeout_s))
        probe = torch.ones(1, device=device)
        tdist.all_reduce(probe)
        if probe.item() != world:
            raise RuntimeError(f"a test all-reduce gave {probe.item()} instead of {world}")
    except RuntimeError as exc:  # torch's DistError and store timeouts are RuntimeErrors
        if tdist.is_initialized():
            tdist.destroy_process_group()
        raise StemdlError(f"rank {rank} on {host}: joining the {backend} process group at {url} failed: "
                          f"{_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
