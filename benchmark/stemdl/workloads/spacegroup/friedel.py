"""Friedel asymmetry of CBED patterns: how much a pattern differs from its 180-degree turn, and how well that
one number tells two space groups of one diffraction class apart (`stemdl ablate dynamical`).

Kinematic patterns keep Friedel's law, I(g) = I(-g), up to dose noise and mistilt; a dynamical pattern of
a non-centrosymmetric crystal breaks it (Spence & Zuo, "Electron Microdiffraction", ch. 5: how CBED finds
polarity and the point group). The synthetic patterns have the optical axis at the image centre, so the
turn is a flip of both axes. The asymmetry is measured on the amplitude sqrt(I / mean I): the square root
keeps the dark pixels' dose noise from dominating, as it does on a log scale.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from stemdl.harness.errors import StemdlError
from stemdl.workloads.spacegroup.data import layout


def amplitude(pattern: np.ndarray) -> np.ndarray:
    """sqrt(I / mean I), float64."""
    pattern = np.maximum(np.asarray(pattern, dtype=np.float64), 0.0)
    mean = pattern.mean()
    return np.sqrt(pattern / mean) if mean > 0 else pattern


def antisymmetric(image: np.ndarray) -> np.ndarray:
    """(x - x turned 180 degrees about the image centre) / 2: the part Friedel's law forbids."""
    return 0.5 * (image - image[..., ::-1, ::-1])


def asymmetry(image: np.ndarray) -> float:
    """L1 of twice the antisymmetric part of `image` over L1 of its contrast (image - its mean): 0 for a
    pattern that keeps Friedel's law, at most 2."""
    contrast = np.abs(image - image.mean()).sum()
    return float(2.0 * np.abs(antisymmetric(image)).sum() / contrast) if contrast else 0.0


def sample_asymmetries(root: Path, split: str) -> dict[int, np.ndarray]:
    """{space group: the asymmetry of each sample of `split` (the mean over its patterns' amplitudes)}."""
    paths = sorted((Path(root) / split).glob("*.h5"), key=lambda p: (len(p.name), p.name))
    if not paths:
        raise StemdlError(f"{Path(root) / split}: no .h5 files")
    found: dict[int, list[float]] = {}
    for path in paths:
        with h5py.File(path, "r") as h5:
            for name in h5:
                stack = h5[name][layout.DATASET][()]
                found.setdefault(int(h5[name].attrs["space_group"]), []).append(
                    float(np.mean([asymmetry(amplitude(p)) for p in stack])))
    return {sg: np.asarray(v) for sg, v in found.items()}


def threshold_rule(first: np.ndarray, second: np.ndarray) -> tuple[float, bool]:
    """The threshold t and side that best split two groups' values (training accuracy, ties: the first
    found): a value above t is called `second` when the bool is True, `first` when it is False."""
    values = np.concatenate([first, second])
    is_second = np.r_[np.zeros(len(first), bool), np.ones(len(second), bool)]
    best = (-1.0, 0.0, True)
    for t in np.unique(values):
        above = values > t
        for upper_is_second in (True, False):
            accuracy = float(np.mean(above == is_second if upper_is_second else above != is_second))
            if accuracy > best[0]:
                best = (accuracy, float(t), upper_is_second)
    return best[1], best[2]


def pair_f1(train: dict[int, np.ndarray], dev: dict[int, np.ndarray], pair: tuple[int, int]) -> float | None:
    """Macro F1 on `dev` of the threshold rule fitted on `train` for the two space groups of `pair`
    (0.5 is chance); None when a split lacks one of them."""
    from stemdl.harness.metrics import ClassScores

    a, b = pair
    if any(sg not in split for split in (train, dev) for sg in pair):
        return None
    t, upper_is_second = threshold_rule(train[a], train[b])
    matrix = np.zeros((2, 2), dtype=np.int64)
    for truth, values in enumerate((dev[a], dev[b])):
        called_second = (values > t) == upper_is_second
        matrix[truth, 1] += int(called_second.sum())
        matrix[truth, 0] += int((~called_second).sum())
    return ClassScores(matrix).macro_f1()
