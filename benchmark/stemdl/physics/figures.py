"""The montage of docs/physics.md: multislice CBED of textbook crystals next to the kinematic renderer's.

    python -m stemdl.physics.figures docs/physics-montage.png      # a few minutes on 2 cores

Rows are crystals and zones, columns thicknesses (dynamical), the last column the kinematic pattern of the
thickest one. Patterns are shown on a log scale, each panel scaled to its own range; the optical axis is
at the centre, x to the right, y down (the `stemdl simulate cbed` convention).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from stemdl.harness import files
from stemdl.physics import simulate

matplotlib.use("Agg")  # no display on a compute node; the Figure API needs none anyway

ENERGY_KEV = 200.0
SEMI_ANGLE_MRAD = 4.0  # discs apart along every zone below: Friedel pairs can be compared by eye
MAX_ANGLE_MRAD = 30.0
SIZE = 256
THICKNESSES_A = (50.0, 200.0, 500.0)


def crystals() -> list[tuple[str, object, tuple[int, int, int]]]:
    """(label, pymatgen Structure, zone): centrosymmetric Si and non-centrosymmetric GaAs, and wurtzite."""
    from pymatgen.core import Lattice, Structure

    si = Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.431), ["Si"], [[0, 0, 0]])
    gaas = Structure.from_spacegroup("F-43m", Lattice.cubic(5.653), ["Ga", "As"], [[0, 0, 0], [0.25, 0.25, 0.25]])
    zno = Structure.from_spacegroup("P6_3mc", Lattice.hexagonal(3.25, 5.207), ["Zn", "O"],
                                    [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, 0.382]])
    return [("Si [001]", si, (0, 0, 1)), ("Si [110]", si, (1, 1, 0)), ("GaAs [110]", gaas, (1, 1, 0)),
            ("ZnO [2-1-10]", zno, (1, 0, 0))]


def kinematic(structure, zone, thickness_A: float) -> np.ndarray:
    """The kinematic renderer's pattern for the same optics, noiseless, in the same pixel frame."""
    from stemdl.workloads.spacegroup.data.layout import Structure
    from stemdl.workloads.spacegroup.synth import cbed as kcbed

    structure = Structure(structure.lattice.matrix, structure.frac_coords, np.asarray(structure.atomic_numbers))
    spec = kcbed.PatternSpec(zone_axis=tuple(zone), energy_keV=ENERGY_KEV, semi_angle_rad=SEMI_ANGLE_MRAD * 1e-3,
                             thickness_nm=thickness_A / 10.0, size=SIZE, max_angle_rad=MAX_ANGLE_MRAD * 1e-3)
    image, _ = kcbed.render(structure, spec)
    # The renderer's frame has a's projection up and looks from the source; the engine's has it to the
    # right, looking along the beam: the same pattern is the renderer's transposed through the centre.
    return np.asarray(image, dtype=np.float64)[::-1, ::-1].T


def montage(out: Path) -> None:
    rows = crystals()
    cols = len(THICKNESSES_A) + 1
    fig = Figure(figsize=(2.4 * cols, 2.5 * len(rows)))
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (label, structure, zone) in enumerate(rows):
        start = time.perf_counter()
        patterns, plan = simulate.cbed(structure, zone, energy_keV=ENERGY_KEV, semi_angle_mrad=SEMI_ANGLE_MRAD,
                                       thicknesses_A=THICKNESSES_A, max_angle_mrad=MAX_ANGLE_MRAD, size=SIZE)
        print(f"{label}: {plan.describe()}; {time.perf_counter() - start:.1f} s", file=sys.stderr)
        panels = [*patterns, kinematic(structure, zone, THICKNESSES_A[-1])]
        titles = [f"{label}, {plan.repeats(t) * plan.cell.extent[2] / 10:.0f} nm" for t in THICKNESSES_A]
        titles.append(f"{label}, kinematic")
        for c, (image, title) in enumerate(zip(panels, titles)):
            ax = axes[r, c]
            ax.imshow(np.log10(np.maximum(image, image.max() * 1e-5)), cmap="magma")
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"CBED at {ENERGY_KEV:.0f} kV, semi-angle {SEMI_ANGLE_MRAD:g} mrad, ±{MAX_ANGLE_MRAD:g} mrad, "
                 "log scale: multislice (left), kinematic (right)", fontsize=9)
    fig.tight_layout()
    files.write_figure(fig, out, dpi=72)


if __name__ == "__main__":
    montage(Path(sys.argv[1] if len(sys.argv) > 1 else "physics-montage.png"))
