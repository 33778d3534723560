"""Ensembles of K classifiers: their averaged logits, and the rank groups that train them in one run.

    groups = rank_groups(world_size=8, k=2)        # [[0, 1, 2, 3], [4, 5, 6, 7]]: member m on groups[m]
    logits = average_logits([model_a, model_b], x)

The "one run on K rank groups" variant trains member m on the ranks of groups[m] (its own
torch.distributed group, hence its own gradient all-reduce). torch.distributed.new_group must be called
by every rank for every group in the same order, which is why this returns all the groups, not just the
caller's. Contiguous groups keep a member on as few nodes as possible, so its all-reduce stays local.
"""

from __future__ import annotations

import torch

from stemdl.harness.errors import StemdlError


def average_logits(models: list[torch.nn.Module], x: torch.Tensor) -> torch.Tensor:
    """The mean of the members' logits (float32, whatever the autocast dtype), the ensemble's logits."""
    if not models:
        raise StemdlError("an ensemble needs at least one model")
    return torch.stack([model(x).float() for model in models]).mean(dim=0)


def rank_groups(world_size: int, k: int) -> list[list[int]]:
    """K contiguous groups of world_size // k ranks each; world_size must be a multiple of k."""
    if k < 1 or world_size < 1:
        raise StemdlError(f"an ensemble of {k} members on {world_size} ranks: both must be 1 or more")
    if world_size % k:
        raise StemdlError(f"an ensemble of {k} members needs a world size that is a multiple of {k}, "
                          f"not {world_size}")
    size = world_size // k
    return [list(range(m * size, (m + 1) * size)) for m in range(k)]
