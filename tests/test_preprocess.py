"""The preprocessing formula on hand-made patterns, the area resize, and the views."""

import math

import pytest
import torch
import torch.nn.functional as F

from stemdl.harness.errors import StemdlError
from stemdl.workloads.spacegroup.preprocess import (NORM_MEAN, NORM_STD, VIEW_CHANNELS, Preprocess, eval_views, friedel,
                               normalize, training_view)

PER_DECADE = 255 / 7  # default floor 1e-3 .. ceiling 1e4: 7 decades


def pattern(rel, size=16):
    """A (3, size, size) stack whose pixels are `rel` times the mean pixel (rel broadcasts)."""
    return torch.as_tensor(rel, dtype=torch.float64).expand(3, size, size).float() / (size * size)


def test_known_values():
    prep = Preprocess(size=16)
    assert prep(pattern(1.0)).unique().tolist() == [pytest.approx(3 * PER_DECADE, rel=1e-6)]  # 109.29
    assert prep(pattern(10.0))[0, 0, 0].item() == pytest.approx(4 * PER_DECADE, rel=1e-6)
    assert prep(pattern(1e-3))[0, 0, 0].item() == pytest.approx(0.0, abs=1e-4)  # the floor itself
    assert prep(pattern(1e4))[0, 0, 0].item() == pytest.approx(255.0, rel=1e-6)  # the ceiling itself
    assert prep(pattern(1e-5)).eq(0).all() and prep(pattern(0.0)).eq(0).all()  # below the floor
    assert prep(pattern(1e6)).eq(255).all()  # above the ceiling


def test_floor_and_ceiling_parameters():
    prep = Preprocess(size=16, floor=1e-2, ceiling=1e2)  # 4 decades
    assert prep(pattern(1.0))[0, 0, 0].item() == pytest.approx(127.5, rel=1e-6)
    assert prep(pattern(1e-3)).eq(0).all() and prep(pattern(1e3)).eq(255).all()


def test_relative_to_the_mean_pixel_whatever_the_size():
    # The same relative intensity gives the same value at 512, 256 and 128 pixels.
    values = [Preprocess(size=s)(pattern(100.0, size=s)) for s in (128, 256, 512)]
    assert all(v.unique().tolist() == [pytest.approx(5 * PER_DECADE, rel=1e-6)] for v in values)


def test_shapes_dtype_range_and_input_untouched():
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64) ** 8
    x /= x.sum(dim=(-2, -1), keepdim=True)
    copy = x.clone()
    u = Preprocess(size=16)(x)
    assert u.shape == (2, 3, 16, 16) and u.dtype == torch.float32
    assert u.min() >= 0 and u.max() <= 255
    assert torch.equal(x, copy)
    assert Preprocess(size=16)(x[0]).shape == (3, 16, 16)
    torch.testing.assert_close(Preprocess(size=16)(x[1]), u[1])
    assert Preprocess(size=64)(x).shape == (2, 3, 64, 64)  # no resize needed


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_area_resize_is_the_block_mean_of_the_log_image(factor):
    torch.manual_seed(factor)
    x = torch.rand(2, 3, 64, 64) ** 6
    prep = Preprocess(size=64 // factor)
    full = Preprocess(size=64)(x)  # log and clip, no resize
    blocks = full.reshape(2, 3, 64 // factor, factor, 64 // factor, factor).mean(dim=(3, 5))
    torch.testing.assert_close(prep(x), blocks, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(prep(x), F.interpolate(full, size=64 // factor, mode="area"))


def test_bad_arguments_are_user_errors():
    with pytest.raises(StemdlError):
        Preprocess(floor=10.0, ceiling=1.0)
    with pytest.raises(StemdlError):
        Preprocess(size=0)
    with pytest.raises(StemdlError, match="larger than the data"):
        Preprocess(size=128)(torch.rand(3, 64, 64))
    with pytest.raises(StemdlError):
        Preprocess(size=8)(torch.rand(64, 64))


def test_normalize_float_and_uint8():
    u = torch.tensor([0.0, 127.0, 255.0])
    expected = (u / 255 - NORM_MEAN) / NORM_STD
    torch.testing.assert_close(normalize(u), expected)
    torch.testing.assert_close(normalize(u.to(torch.uint8)), expected)
    assert normalize(u.to(torch.uint8)).dtype == torch.float32
    assert math.isclose(normalize(torch.tensor(255.0 * NORM_MEAN)).item(), 0.0, abs_tol=1e-6)


def test_views():
    batch = torch.arange(5 * 3 * 2 * 2, dtype=torch.float32).reshape(5, 3, 2, 2)
    assert training_view(batch, "stack", torch.Generator().manual_seed(0)) is batch
    assert [v.shape for v in eval_views(batch, "stack")] == [(5, 3, 2, 2)]
    views = eval_views(batch, "single")
    assert len(views) == 3 and all(v.shape == (5, 1, 2, 2) for v in views)
    for i, v in enumerate(views):
        assert torch.equal(v[:, 0], batch[:, i])
    assert VIEW_CHANNELS == {"stack": 3, "single": 1}
    with pytest.raises(StemdlError, match="choices: stack, single"):
        eval_views(batch, "pairs")


def test_single_training_view_is_deterministic_for_a_seeded_generator():
    batch = torch.randn(64, 3, 4, 4)
    a = training_view(batch, "single", torch.Generator().manual_seed(123))
    b = training_view(batch, "single", torch.Generator().manual_seed(123))
    assert a.shape == (64, 1, 4, 4) and torch.equal(a, b)
    picks = torch.randint(3, (64,), generator=torch.Generator().manual_seed(123))
    assert torch.equal(a[:, 0], batch[torch.arange(64), picks])
    assert set(picks.tolist()) == {0, 1, 2}  # all three patterns get used
    c = training_view(batch, "single", torch.Generator().manual_seed(124))
    assert not torch.equal(a, c)


def test_friedel_average_imposes_the_half_turn_symmetry_about_the_image_centre():
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    assert friedel(x, "keep") is x
    avg = friedel(x, "average")
    # pixel (i, j) pairs with (S-1-i, S-1-j): the synthetic optical axis is at ((S-1)/2, (S-1)/2)
    assert avg[1, 2, 0, 1] == pytest.approx(0.5 * float(x[1, 2, 0, 1] + x[1, 2, 5, 4]))
    torch.testing.assert_close(avg, avg.flip(-2, -1))  # Friedel's law holds for the result
    torch.testing.assert_close(friedel(avg, "average"), avg)  # a symmetric pattern is left alone
    torch.testing.assert_close(x - avg, -(x - avg).flip(-2, -1))  # only the antisymmetric part went


def test_friedel_split_gives_the_symmetric_then_the_antisymmetric_halves_as_channels():
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    split = friedel(x, "split")
    assert split.shape == (2, 6, 6, 6)
    sym, anti = split[:, :3], split[:, 3:]
    torch.testing.assert_close(sym, friedel(x, "average"))
    torch.testing.assert_close(anti, -anti.flip(-2, -1))
    torch.testing.assert_close(sym + anti, x)  # nothing is lost
    # a pattern that keeps Friedel's law (a kinematic one) has nothing in its antisymmetric channels
    assert torch.count_nonzero(friedel(sym, "split")[:, 3:]) == 0
    one = friedel(x[:, :1], "split")  # one pattern alone (view single): 2 channels
    assert one.shape == (2, 2, 6, 6) and torch.equal(one, split[:, [0, 3]])
    with pytest.raises(StemdlError, match="'half' is not one of keep, average, split"):
        friedel(x, "half")
