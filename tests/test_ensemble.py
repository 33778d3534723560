"""Ensembles: the averaged logits of the members, and K equal contiguous rank groups."""

import pytest
import torch

from stemdl.workloads.spacegroup.ensemble import average_logits, rank_groups
from stemdl.harness.errors import StemdlError


def test_average_logits_is_the_mean_of_the_members():
    torch.manual_seed(0)
    members = [torch.nn.Linear(5, 4) for _ in range(3)]
    x = torch.randn(6, 5)
    want = (members[0](x) + members[1](x) + members[2](x)) / 3
    assert torch.allclose(average_logits(members, x), want, atol=1e-6)
    assert torch.equal(average_logits(members[:1], x), members[0](x))


def test_average_logits_is_float32_for_bf16_members():
    member = torch.nn.Linear(5, 4).bfloat16()
    assert average_logits([member, member], torch.randn(2, 5).bfloat16()).dtype == torch.float32
    with pytest.raises(StemdlError, match="at least one model"):
        average_logits([], torch.randn(2, 5))


def test_rank_groups_are_equal_contiguous_and_cover_every_rank():
    assert rank_groups(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert rank_groups(3, 3) == [[0], [1], [2]]
    assert rank_groups(5, 1) == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize("world, k, match", [(6, 4, "multiple of 4, not 6"), (4, 0, "1 or more"),
                                             (0, 1, "1 or more"), (2, 3, "multiple of 3")])
def test_rank_groups_refuse_uneven_splits(world, k, match):
    with pytest.raises(StemdlError, match=match):
        rank_groups(world, k)
