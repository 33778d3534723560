"""The preprocessing of the timed run, in torch: every input pipeline calls `Preprocess` and `normalize`.

    prep = Preprocess(size=128)                    # floor 1e-3, ceiling 1e4 (the defaults)
    u = prep(stacks)                               # float32 (B, 3, 512, 512) -> float32 (B, 3, 128, 128), 0..255
    x = normalize(training_view(u, "stack", gen))  # what the model sees

A raw pattern x (H x W, non-negative, normalized to sum to 1, so the mean pixel is 1/(H*W)) becomes

    v = log10(max(x * H*W, floor))                                     # intensity / mean pixel, floored
    u = clip((v - log10(floor)) * 255 / (log10(ceiling) - log10(floor)), 0, 255)
    u = area-resize(u) to size x size                                  # mean over each input block

With floor = 1e-3 and ceiling = 1e4 the scale spans 7 decades at 255/7 = 36.43 per decade: a pixel at
1/1000 of the mean pixel or darker maps to 0, a pixel at the mean to 3 * 255/7 = 109.29, and 10^4 x the
mean or brighter to 255. H*W is the size of the pattern as given, so 512, 256 and 128 pixel sets land on
the same scale. The log and clip come before the resize, as in the reference (the mean of the logs, not
the log of the mean), and the output stays float32 in 0..255 so that it can be stored as uint8.
`normalize(u) = (u / 255 - NORM_MEAN) / NORM_STD` then runs on the device, after any uint8 storage.

Views: `stack` feeds the three patterns of a sample as three channels; `single` feeds one pattern: a random
one of the three in training, and all three at evaluation, whose logits the caller averages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stemdl.harness.errors import StemdlError

# Mean and std of u / 255 over the train split of the default synthetic set (`stemdl synth`, 1,920
# samples) at 64x64: 0.0466 and 0.1133. Most of a kinematic pattern is dark background (u = 0), hence the
# small mean. Fixed, so that every run and rank normalizes alike; on other data (the public set has a
# background) BatchNorm after the first conv absorbs the mismatch.
NORM_MEAN = 0.047
NORM_STD = 0.113

VIEW_CHANNELS = {"stack": 3, "single": 1}  # view -> input channels of the model


@dataclass(frozen=True)
class Preprocess:
    """Log-scale, clip to 0..255 and area-resize patterns; see the module docstring for the formula."""

    size: int = 128  # output height and width
    floor: float = 1e-3  # intensities below floor x the mean pixel map to 0
    ceiling: float = 1e4  # intensities above ceiling x the mean pixel map to 255

    def __post_init__(self):
        if not (isinstance(self.size, int) and self.size >= 1):
            raise StemdlError(f"preprocess: size must be a positive integer, got {self.size!r}")
        if not 0 < self.floor < self.ceiling < math.inf:
            raise StemdlError(f"preprocess: need 0 < floor < ceiling, got floor={self.floor} "
                              f"ceiling={self.ceiling}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(3, H, W) or (B, 3, H, W) patterns -> float32 (.., size, size) in 0..255, on x's device."""
        if x.ndim not in (3, 4):
            raise StemdlError(f"preprocess: expected (3, H, W) or (B, 3, H, W), got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if self.size > min(h, w):
            raise StemdlError(f"preprocess: cannot shrink {h}x{w} patterns to {self.size}x{self.size} "
                              f"(size is larger than the data)")
        lo = math.log10(self.floor)
        scale = 255.0 / (math.log10(self.ceiling) - lo)
        # The first op copies (x is never modified); the rest work in place on that copy.
        u = x.to(torch.float32).mul(h * w).clamp_min_(self.floor).log10_()
        u = u.sub_(lo).mul_(scale).clamp_(0.0, 255.0)
        if (h, w) != (self.size, self.size):
            u = F.adaptive_avg_pool2d(u, self.size)  # = F.interpolate(mode="area")
        return u


def normalize(u: torch.Tensor) -> torch.Tensor:
    """(u / 255 - NORM_MEAN) / NORM_STD as float32; u is float or uint8 in 0..255, any shape."""
    return (u.to(torch.float32) / 255.0 - NORM_MEAN) / NORM_STD


def _check_mode(mode: str) -> None:
    if mode not in VIEW_CHANNELS:
        raise StemdlError(f"unknown view {mode!r}; choices: {', '.join(VIEW_CHANNELS)}")


def training_view(batch: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, S, S) -> (B, C, S, S): the stack itself, or one pattern per sample drawn with `generator`
    (on the generator's device, so a CPU generator gives the same picks whatever device holds batch)."""
    _check_mode(mode)
    if mode == "stack":
        return batch
    n = batch.shape[0]
    pick = torch.randint(batch.shape[1], (n,), generator=generator,
                         device=generator.device if generator is not None else "cpu")
    rows = torch.arange(n, device=batch.device)
    return batch[rows, pick.to(batch.device)].unsqueeze(1)


def eval_views(batch: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The views to evaluate, whose logits the caller averages: [the stack], or the 3 patterns alone."""
    _check_mode(mode)
    if mode == "stack":
        return [batch]
    return [batch[:, i:i + 1] for i in range(batch.shape[1])]


FRIEDEL = ("keep", "average", "split")  # how `friedel` treats the patterns: see its docstring


def friedel(x: torch.Tensor, how: str) -> torch.Tensor:
    """(..., C, S, S) patterns and their 180-degree turn about the image centre, where the synthetic
    patterns have the optical axis: 'keep' gives x itself; 'average' replaces each pattern by the mean of
    it and its turn (C channels); 'split' gives that mean and the other half, x minus the mean, as
    channels (..., 2C, S, S): the C symmetric channels first, then the C antisymmetric ones.

    Kinematic patterns keep Friedel's law, I(g) = I(-g), so the average changes them only by their noise
    and mistilt; a dynamical pattern of a non-centrosymmetric crystal breaks it, and the average removes
    exactly that part. Training on averaged multislice patterns therefore measures what the broken
    Friedel's law is worth to a classifier, against the same patterns kept whole. 'split' loses nothing
    (the two halves add up to x) but puts x(g) - x(-g) at pixel g: a convolution sees there what it
    could otherwise compare only across the whole pattern, since g and -g lie on opposite sides of the
    centre."""
    if how == "keep":
        return x
    if how not in FRIEDEL:
        raise StemdlError(f"friedel: {how!r} is not one of {', '.join(FRIEDEL)}")
    symmetric = 0.5 * (x + x.flip(-2, -1))
    if how == "average":
        return symmetric
    return torch.cat([symmetric, x - symmetric], dim=-3)


def augment(x: torch.Tensor, how: str, generator: torch.Generator) -> torch.Tensor:
    """Random left-right flips per sample ('flip'). A mirrored pattern is the pattern of the mirrored
    crystal, whose space group is the same or its enantiomorph, which kinematic diffraction cannot tell
    apart anyway (same diffraction class)."""
    if how == "none":
        return x
    flip = torch.rand(len(x), generator=generator) < 0.5
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
