"""The figure of docs/results.md's dynamical study: where multislice patterns break Friedel's law.

    python -m stemdl.workloads.spacegroup.figures docs/friedel-pairs.png --data data/pairs

DATA holds `kinematic/` and `multislice/`, one seed of the `pairs` synth preset rendered both ways (as
`stemdl ablate dynamical` reads it). One row per space group: the first dev sample of that group (the
same crystal, zone, thickness and tilt in both sets), its first pattern kinematic and multislice on a log
scale, and beside each the antisymmetric part of its amplitude sqrt(I) (the square root tames the dose
noise of the dark pixels, which dominates on the log scale), (x - x turned 180 degrees) / 2: what
`friedel: average` removes. The number over each difference is the pattern's Friedel asymmetry
(`spacegroup.friedel.asymmetry`: 0 where Friedel's law holds; noise and mistilt leave some).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py
import matplotlib
import numpy as np
from matplotlib.figure import Figure

from stemdl.harness import files
from stemdl.harness.errors import StemdlError
from stemdl.workloads.spacegroup import friedel
from stemdl.workloads.spacegroup.data import layout

matplotlib.use("Agg")

GROUPS = {1: "P1", 2: "P-1", 33: "Pna2_1", 62: "Pnma", 216: "F-43m", 225: "Fm-3m"}
LOG_FLOOR = 1e-3  # of the mean pixel, as the preprocessing's floor


def log_pattern(image: np.ndarray) -> np.ndarray:
    """log10 of the pattern over its mean pixel, floored at LOG_FLOOR."""
    image = np.asarray(image, dtype=np.float64)
    return np.log10(np.maximum(image / image.mean(), LOG_FLOOR))


def first_of_each(root: Path, groups, split: str = "dev") -> dict[int, tuple[str, np.ndarray]]:
    """{space group: (sample name, its first pattern)} for the first sample of each group in `split`."""
    found: dict[int, tuple[str, np.ndarray]] = {}
    paths = sorted((root / split).glob("*.h5"), key=lambda p: (len(p.name), p.name))
    if not paths:
        raise StemdlError(f"{root / split}: no .h5 files (make the set with stemdl synth ... --preset pairs)")
    for path in paths:
        with h5py.File(path, "r") as h5:
            for name in h5:
                sg = int(h5[name].attrs["space_group"])
                if sg in groups and sg not in found:
                    found[sg] = (f"{path.name}:{name}", h5[name][layout.DATASET][0])
        if len(found) == len(groups):
            break
    missing = sorted(set(groups) - set(found))
    if missing:
        raise StemdlError(f"{root / split}: no sample of space group(s) {missing}")
    return found


def friedel_figure(out: Path, data: Path, groups=tuple(GROUPS)) -> None:
    kinds = ("kinematic", "multislice")
    picked = {kind: first_of_each(data / kind, groups) for kind in kinds}
    for sg in groups:
        if picked["kinematic"][sg][0] != picked["multislice"][sg][0]:
            raise StemdlError(f"{data}: the two sets' first dev samples of space group {sg} differ "
                              f"({picked['kinematic'][sg][0]} and {picked['multislice'][sg][0]}): not one seed")
    fig = Figure(figsize=(9.5, 2.25 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), 4, squeeze=False)
    for row, sg in enumerate(groups):
        for k, kind in enumerate(kinds):
            pattern = picked[kind][sg][1]
            image, amp = log_pattern(pattern), friedel.amplitude(pattern)
            diff = friedel.antisymmetric(amp)
            a = axes[row, 2 * k]
            a.imshow(image, cmap="magma")
            a.set_title(f"{GROUPS.get(sg, sg)} ({sg}), {kind}", fontsize=9)
            limit = max(float(np.abs(diff).max()), 1e-6)
            d = axes[row, 2 * k + 1]
            d.imshow(diff, cmap="RdBu_r", vmin=-limit, vmax=limit)
            d.set_title(f"antisymmetric part of sqrt I: {friedel.asymmetry(amp):.2f}", fontsize=9)
    for a in axes.flat:
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle("The same crystals rendered kinematically and by multislice: log intensity and the part "
                 "that breaks Friedel's law", fontsize=10)
    files.write_figure(fig, out)
    print(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stemdl.workloads.spacegroup.figures",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--data", type=Path, required=True, help="the folder of kinematic/ and multislice/")
    args = parser.parse_args(argv)
    try:
        friedel_figure(args.out, args.data)
    except StemdlError as exc:
        print(f"figures: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
