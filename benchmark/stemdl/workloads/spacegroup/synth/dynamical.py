"""Dynamical (multislice) CBED patterns in the kinematic renderer's frame: `stemdl synth --physics multislice`.

`render` takes the same `cbed.PatternSpec` as `cbed.render` (zone axis, energy, semi-angle, thickness,
mistilt, in-plane rotation, detector, dose, Debye-Waller B) and returns the same thing: a float32 pattern
summing to 1 and its 'up' direction, in the frame `cbed.zone_frame` defines (seen from the source, the
beam at pixel ((S-1)/2, (S-1)/2)), so `y_dirs` means the same in both kinds of data. The pattern is
`stemdl.physics.simulate.cbed`'s: the beam travels along -[uvw] as in cbed.py; the mistilt tilts the
beam in the propagator (`waves.propagator`), the detector staying centred on the transmitted beam as the
kinematic discs do; the engine's detector (x along the cell's x, y down along its y) is then resampled
onto the pattern's frame (bilinear; exact where the two frames differ by quarter turns), from a square
large enough that the rotated image's corners are simulated too. Dose noise is `cbed`'s.

Crystals with oblique lattices have no exactly orthogonal cell along most zone axes: the cell is
searched with a growing strain bound (`CELL_SEARCH`) and the strain used is recorded per pattern.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np

from stemdl.workloads.spacegroup.synth import cbed

# (largest strain, largest repeat of a, b, c per edge) tried in turn for the orthogonal cell: exact cells
# first, then the smallest strain that a search within 8 (then 16) repeats finds. Monoclinic and
# triclinic random crystals need 1-3 % along most axes; a few need up to 10 %.
CELL_SEARCH = ((1e-3, 8), (1e-2, 8), (3e-2, 16), (1e-1, 16))
MARGIN_PX = 2  # detector pixels simulated beyond the rotated image's corners (the bilinear neighbours)


@dataclass(frozen=True)
class Simulated:
    """What one multislice pattern was simulated on."""

    thickness_nm: float  # the whole number of cell repeats nearest the drawn thickness
    slice_A: float
    gpts: tuple[int, int]
    extent_A: tuple[float, float]
    strain: float


def plan(structure, spec: cbed.PatternSpec, reach_mrad: float, pixel_mrad: float):
    """`simulate.plan_cbed` for the beam along -[uvw], reaching reach_mrad in every direction at a
    diffraction-plane sampling no coarser than pixel_mrad, on the least strained cell `CELL_SEARCH` finds."""
    from stemdl.physics.simulate import plan_cbed

    zone = tuple(-int(x) for x in spec.zone_axis)
    size = math.ceil(2.0 * reach_mrad / pixel_mrad)
    for max_strain, max_repeat in CELL_SEARCH:
        try:
            return plan_cbed(structure, zone, energy_keV=spec.energy_keV, max_angle_mrad=reach_mrad, size=size,
                             max_strain=max_strain, max_repeat=max_repeat)
        except ValueError:
            continue
    raise ValueError(f"no orthogonal cell along {list(spec.zone_axis)} within a strain of {CELL_SEARCH[-1][0]}")


def resampling(axes_ms: np.ndarray, frame: cbed.ZoneFrame, size: int, big: int) -> tuple[np.ndarray, np.ndarray]:
    """(matrix (2, 2), offset (2,)) taking a pixel (row, col) of the pattern in `frame` (x right, y up,
    the beam at (size-1)/2) to its place in the engine's big x big detector (columns along the cell's x,
    rows along its y, the beam at (big-1)/2): `scipy.ndimage.affine_transform`'s convention."""
    x_ms, y_ms = axes_ms[0], axes_ms[1]
    matrix = np.array([[-frame.y_hat @ y_ms, frame.x_hat @ y_ms],
                       [-frame.y_hat @ x_ms, frame.x_hat @ x_ms]])
    c0, c0_big = (size - 1) / 2.0, (big - 1) / 2.0
    return matrix, c0_big - matrix @ np.array([c0, c0])


def _big_size(size: int) -> int:
    """The engine's detector side: covers the pattern's rotated corners, size + an even number of pixels
    so both share the beam's sub-pixel position."""
    pad = math.ceil((math.sqrt(2.0) - 1.0) * size / 2.0) + MARGIN_PX
    return size + 2 * pad


@contextlib.contextmanager
def one_thread():
    """Torch on one thread while rendering: the bytes then cannot depend on how many threads split a
    reduction, and the worker processes are the parallelism (as for the kinematic path's BLAS)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def simulate(structure, spec: cbed.PatternSpec, scan: int, device=None):
    """(the pattern float64 (big, big) on the engine's detector, the cell's axes x, y, z (3, 3) in the
    lattice's Cartesian frame, the pattern's `cbed.ZoneFrame`, `Simulated`)."""
    from stemdl.physics import simulate as engine
    from stemdl.physics.supercell import beam_axes

    pixel = 2e3 * spec.max_angle_rad / spec.size
    big = _big_size(spec.size)
    the_plan = plan(structure, spec, (big / 2.0 + 1.0) * pixel, pixel)
    axes_ms = beam_axes(np.asarray(structure.lattice, dtype=float), the_plan.cell.zone)
    frame = cbed.zone_frame(structure, spec.zone_axis, spec.rotation_rad)
    tilt = 1e3 * (spec.mistilt_rad[0] * frame.x_hat + spec.mistilt_rad[1] * frame.y_hat)
    patterns, _ = engine.cbed(structure, the_plan.cell.zone, energy_keV=spec.energy_keV,
                              semi_angle_mrad=1e3 * spec.semi_angle_rad, thicknesses_A=[10.0 * spec.thickness_nm],
                              max_angle_mrad=big * pixel / 2.0, size=big, scan=scan, device=device,
                              plan=the_plan, debye_waller=spec.debye_waller,
                              tilt_mrad=(float(tilt @ axes_ms[0]), float(tilt @ axes_ms[1])),
                              center_mrad=(-pixel / 2.0, -pixel / 2.0))
    done = Simulated(the_plan.repeats(10.0 * spec.thickness_nm) * the_plan.cell.extent[2] / 10.0, the_plan.dz_A,
                     the_plan.grid.gpts, the_plan.grid.extent, the_plan.cell.strain)
    return patterns[0].astype(np.float64), axes_ms, frame, done


def render(structure, spec: cbed.PatternSpec, rng=None, scan: int = 8, device=None):
    """(pattern float32 (size, size) >= 0 summing to 1, y_dir (3,), `Simulated`): as `cbed.render`, by
    multislice with the probe averaged over scan x scan positions of one cell. `rng` only draws the
    Poisson noise when `spec.dose` is set."""
    from scipy.ndimage import affine_transform

    with one_thread():
        big_image, axes_ms, frame, done = simulate(structure, spec, scan, device)
    matrix, offset = resampling(axes_ms, frame, spec.size, big_image.shape[0])
    img = np.clip(affine_transform(big_image, matrix, offset, output_shape=(spec.size, spec.size), order=1), 0, None)
    if spec.dose is not None:
        img = cbed._counted(img, float(spec.dose), rng)
    return (img / img.sum()).astype(np.float32), frame.y_hat.copy(), done
