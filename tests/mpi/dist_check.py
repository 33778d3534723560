"""Run by tests/test_dist.py under `mpiexec -n N` on one machine: each rank sets up, checks what it found,
talks over gloo and over MPI, tears down, and prints one `rank R/N ok ...` line. A failing rank aborts the
job, so the others never wait for it."""

import traceback

import torch

from stemdl.harness import dist


def check() -> str:
    env = dist.setup(timeout_s=60)
    n = env.world_size
    assert n > 1 and 0 <= env.rank < n and env.is_root == (env.rank == 0), env
    assert (env.local_rank, env.local_world_size) == (env.rank, n), env  # all ranks on this one machine
    assert (env.node_rank, env.number_of_nodes) == (0, 1), env
    assert (env.backend, env.device, env.accelerators_per_node, env.mpi) == ("gloo", "cpu", 0, True), env
    assert dist.node_comm().Get_size() == n

    total = dist.all_reduce_sum(torch.tensor([env.rank + 1.0]))
    assert total.item() == n * (n + 1) / 2, total
    sent = dist.broadcast_object({"data": "/scratch/stemdl", "from": env.rank})
    assert sent == {"data": "/scratch/stemdl", "from": 0}, sent
    dist.barrier()
    dist.teardown()
    dist.teardown()
    assert not torch.distributed.is_initialized()
    return f"rank {env.rank}/{n} ok local {env.local_rank}/{env.local_world_size} node {env.node_rank}/" \
           f"{env.number_of_nodes} sum {total.item():g}"


if __name__ == "__main__":
    try:
        print(check(), flush=True)
    except BaseException:
        traceback.print_exc()
        dist.abort(1)
