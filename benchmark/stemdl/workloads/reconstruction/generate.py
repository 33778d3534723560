"""One sample of the reconstruction data: the CBED patterns of an N x N probe grid over a square region of a
random crystal, and the projected-potential target of that same region.

    rng = np.random.default_rng(np.random.SeedSequence([seed, split, index]))
    cbed, potential, attributes = make_sample(rng, SampleSettings())
    # cbed float16 (N², S, S), each pattern z-scored; potential float16 (1, T, T), z-scored

Physics (ORNL's reference, as described to us, in our engine `stemdl.physics`): a random crystal of one of
`space_groups` (`spacegroup.synth.crystals.random_crystal`, spglib-verified), seen along one of its
`zones` shortest inequivalent zone axes (`zones.zone_axes`, drawn at random among those with an
orthogonal cell), a slab of `thickness_A` (whole cell repeats; ORNL 100 Å), energy uniform in
`energy_keV` (ORNL 100-200 keV), probe semi-angle uniform in `semi_angle_mrad`, spherical aberration
uniform in `cs_mm` (ORNL: random Cs), no defocus; dynamical multislice (`simulate.four_d_stem`) with the
engine's 2/3 bandwidth limit reaching the detector's edge `max_angle_mrad`.

Geometry (the target must be the image of what was scanned):
* the specimen is the crystal's orthogonal cell tiled laterally to at least 2·scan_A (and the engine's
  40 Å), periodic; `simulate.plan_cbed` fixes it. The scanned region is the square of side scan_A centred
  on the specimen's centre: the central half of it when the specimen is 2·scan_A wide, as ORNL's
  ([N/4:3N/4] of a 50 Å cell, their scan 25 Å);
* probes: an N x N grid over that square, left edge included, far edge left out (the engine's
  `position_grid` convention), in raster order: pattern p = iy·N + ix at
  (x0 + ix·scan_A/N, y0 + iy·scan_A/N), (x0, y0) the square's corner;
* target: T x T pixels of scan_A/T over the same square, pixel (row r, column c) sampling the point
  (x0 + c·scan_A/T, y0 + r·scan_A/T): rows along y, columns along x, as the detector's and
  `potential_image`'s. So probe (iy, ix) sits exactly on target pixel (iy·T/N, ix·T/N) when N divides T;
* the target is computed from the very slices the simulation transmits (the same `slice_potentials`
  call `simulate.specimen` makes, on the simulation's grid), one cell sufficing since the specimen is its
  periodic repetition: mean over the cell's slices of sin(σV), the periodic Gaussian of 1.2 target pixels,
  evaluated on the target grid (`target.target_image`), z-scored. A slab of whole cell repeats has the
  cell's slice mean, so the thickness does not enter.
Reproducible: every random number comes from `rng`, in a fixed order; the same generator state gives
the same bytes (checked across processes and 1 or 2 torch threads on one CPU; not promised across CPUs
or library versions, whose FFTs may round differently).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stemdl.harness.errors import StemdlError
from stemdl.physics import simulate
from stemdl.physics.electrons import interaction_parameter
from stemdl.physics.potential import slice_potentials
from stemdl.workloads.reconstruction.target import SIGMA_PX, phase_image, zscore, zscore_patterns
from stemdl.workloads.spacegroup.synth.crystals import random_crystal
from stemdl.workloads.spacegroup.synth.zones import zone_axes

# Space groups whose low-index zone axes have orthogonal cells (a few of every system from orthorhombic
# up): monoclinic and triclinic crystals rarely have one within the engine's strain limit.
DEFAULT_SPACE_GROUPS = (47, 62, 63, 123, 139, 141, 166, 191, 194, 221, 225, 227, 229)


@dataclass(frozen=True)
class SampleSettings:
    """What a sample is made of; ranges are (low, high), drawn uniformly. Defaults: the CPU size."""

    scan: int = 4  # N: an N x N probe grid, N² patterns
    pattern_size: int = 64  # S: detector pixels a side
    target_size: int = 32  # T: target pixels a side
    scan_A: float = 20.0  # side of the scanned square (ORNL: 25 Å, the central half of a 50 Å cell)
    max_angle_mrad: float = 40.0  # the detector's half-width (the simulation's band limit reaches it)
    thickness_A: float = 20.0  # slab thickness asked (whole cell repeats, nearest; ORNL: 100 Å)
    energy_keV: tuple[float, float] = (100.0, 200.0)
    semi_angle_mrad: tuple[float, float] = (15.0, 25.0)
    cs_mm: tuple[float, float] = (0.0, 0.01)  # spherical aberration (an aberration-corrected probe)
    space_groups: tuple[int, ...] = DEFAULT_SPACE_GROUPS
    elements: tuple[str, ...] | None = None  # None: the crystal generator's palette
    zones: int = 5  # draw the zone among this many shortest inequivalent axes (ORNL: up to 5)
    max_specimen_A: float = 60.0  # a zone whose tiled specimen is wider (a big cell) is passed over
    slice_A: float = simulate.SLICE_A
    max_tries: int = 20  # crystals drawn before giving up
    # the specimen's real-space pixel at most this (Å): the engine's converged default; None: only as fine
    # as the detector's angle needs (about 4x faster at the CPU sizes, not converged: `simulate.plan_cbed`)
    sampling_A: float | None = simulate.SAMPLING_A

    def check(self) -> None:
        problems = []
        if self.scan < 1 or self.pattern_size < 2 or self.target_size < 2:
            problems.append("scan >= 1, pattern_size >= 2 and target_size >= 2")
        if not (self.scan_A > 0 and self.max_angle_mrad > 0 and self.thickness_A > 0 and self.slice_A > 0):
            problems.append("scan_A, max_angle_mrad, thickness_A and slice_A positive")
        for name in ("energy_keV", "semi_angle_mrad", "cs_mm"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                problems.append(f"{name} a range 0 <= low <= high, got {(low, high)}")
        if self.semi_angle_mrad[1] > self.max_angle_mrad:
            problems.append("semi_angle_mrad within the detector (max_angle_mrad)")
        if not self.space_groups or not all(1 <= int(g) <= 230 for g in self.space_groups):
            problems.append("space_groups a non-empty list of numbers in 1..230")
        if self.sampling_A is not None and not self.sampling_A > 0:
            problems.append("sampling_A positive, or None")
        if self.max_specimen_A < 2 * self.scan_A or self.zones < 1 or self.max_tries < 1:
            problems.append("max_specimen_A >= 2·scan_A, zones >= 1, max_tries >= 1")
        if problems:
            raise StemdlError("reconstruction sample settings: need " + "; ".join(problems))


@dataclass(frozen=True)
class ScanGeometry:
    """The scanned square in the specimen frame (Å, the cell's origin at 0) and its two grids."""

    origin_A: tuple[float, float]  # (x0, y0), the square's corner
    side_A: float
    scan: int  # N
    target_size: int  # T

    @classmethod
    def centred(cls, plan: simulate.Plan, settings: SampleSettings) -> "ScanGeometry":
        lx, ly = plan.grid.extent
        half = settings.scan_A / 2.0
        return cls((lx / 2.0 - half, ly / 2.0 - half), settings.scan_A, settings.scan, settings.target_size)

    @property
    def step_A(self) -> float:
        return self.side_A / self.scan

    @property
    def pixel_A(self) -> float:
        return self.side_A / self.target_size

    def positions_A(self) -> np.ndarray:
        """(N², 2) probe positions (x, y) in Å, raster order: p = iy·N + ix."""
        iy, ix = np.divmod(np.arange(self.scan**2), self.scan)
        return np.stack([self.origin_A[0] + ix * self.step_A, self.origin_A[1] + iy * self.step_A], axis=1)

    def target_axes(self) -> tuple[np.ndarray, np.ndarray]:
        """(xs (T,), ys (T,)) in Å: target pixel (r, c) samples (xs[c], ys[r])."""
        k = np.arange(self.target_size)
        return self.origin_A[0] + k * self.pixel_A, self.origin_A[1] + k * self.pixel_A

    def target_pixel(self, positions_A) -> np.ndarray:
        """(P, 2) (row, column) target-pixel coordinates of points (P, 2) (x, y) Å (fractional)."""
        p = np.asarray(positions_A, dtype=np.float64).reshape(-1, 2)
        return np.stack([(p[:, 1] - self.origin_A[1]), (p[:, 0] - self.origin_A[0])], axis=1) / self.pixel_A


@dataclass(frozen=True)
class Conditions:
    """A sample's microscope: drawn from the settings' ranges."""

    energy_keV: float
    semi_angle_mrad: float
    cs_mm: float

    @classmethod
    def draw(cls, rng: np.random.Generator, settings: SampleSettings) -> "Conditions":
        return cls(*(float(rng.uniform(*getattr(settings, name)))
                     for name in ("energy_keV", "semi_angle_mrad", "cs_mm")))


@dataclass(frozen=True)
class Simulated:
    """The physics of one sample before storage: raw patterns, the target, and where they come from."""

    patterns: np.ndarray  # float32 (N², S, S), fractions of the incident beam
    phase: np.ndarray  # float64 (T, T): mean sin(σV), filtered, on the target grid, before the z-score
    target: np.ndarray  # float64 (T, T): the z-scored target
    plan: simulate.Plan
    geometry: ScanGeometry
    conditions: Conditions
    thickness_A: float  # the slab's actual thickness (whole cell repeats)


def plan_for(structure, zone, conditions: Conditions, settings: SampleSettings) -> simulate.Plan:
    """The specimen for a zone: ValueError where the zone has no orthogonal cell, is too big or too deep."""
    plan = simulate.plan_cbed(structure, zone, energy_keV=conditions.energy_keV,
                              max_angle_mrad=settings.max_angle_mrad, size=settings.pattern_size,
                              slice_A=settings.slice_A, sampling_A=settings.sampling_A,
                              min_extent_A=max(simulate.MIN_EXTENT_A, 2.0 * settings.scan_A))
    if max(plan.grid.extent) > settings.max_specimen_A or plan.cell.extent[2] > settings.thickness_A:
        raise ValueError(f"zone {tuple(zone)}: specimen {plan.grid.extent[0]:.1f} x {plan.grid.extent[1]:.1f} Å, "
                         f"cell depth {plan.cell.extent[2]:.1f} Å (limits {settings.max_specimen_A} Å wide, "
                         f"{settings.thickness_A} Å deep)")
    return plan


class FlatTarget(ValueError):
    """The target has no contrast at its resolution (a projected period below the filter's reach)."""


def simulate_sample(structure, zone, conditions: Conditions, settings: SampleSettings,
                    plan: simulate.Plan | None = None) -> Simulated:
    """The patterns and the target of one crystal along one zone (see the module docstring); FlatTarget,
    before any multislice, where the target would be constant."""
    plan = plan or plan_for(structure, zone, conditions, settings)
    geometry = ScanGeometry.centred(plan, settings)
    # the slices simulate.specimen transmits (same call, same dtype), of one cell: the specimen repeats it
    slices = slice_potentials(plan.cell, plan.cell_gpts, plan.dz_A, dtype=torch.float32).numpy()
    xs, ys = geometry.target_axes()
    phase = phase_image(slices, interaction_parameter(conditions.energy_keV), plan.cell.extent[:2], xs, ys)
    try:
        target = zscore(phase, what="target")
    except ValueError as exc:
        raise FlatTarget(str(exc)) from None
    out, _ = simulate.four_d_stem(structure, zone, energy_keV=conditions.energy_keV,
                                  semi_angle_mrad=conditions.semi_angle_mrad, thicknesses_A=[settings.thickness_A],
                                  max_angle_mrad=settings.max_angle_mrad, size=settings.pattern_size,
                                  positions_A=geometry.positions_A(), cs_mm=conditions.cs_mm, plan=plan)
    return Simulated(out[0], phase, target, plan, geometry, conditions,
                     plan.repeats(settings.thickness_A) * plan.cell.extent[2])


def draw_specimen(rng: np.random.Generator, settings: SampleSettings):
    """(crystal, zone, conditions, plan): a space group, a verified crystal of it, the microscope, then
    the zones in random order until one plans within the limits; a new crystal when none does."""
    groups = tuple(int(g) for g in settings.space_groups)
    for _ in range(settings.max_tries):
        try:
            crystal = random_crystal(groups[int(rng.integers(len(groups)))], rng, elements=settings.elements)
            conditions = Conditions.draw(rng, settings)
            zones = zone_axes(crystal.structure, n=settings.zones)
        except StemdlError:  # a group that yields no verified crystal, a lattice with too few zones
            continue
        for k in rng.permutation(len(zones)):
            zone = tuple(int(i) for i in zones[k])
            try:
                return crystal, zone, conditions, plan_for(crystal.structure, zone, conditions, settings)
            except ValueError:
                continue
    raise StemdlError(f"no crystal of space groups {list(groups)} had a zone axis within the limits in "
                      f"{settings.max_tries} tries (max_specimen_A {settings.max_specimen_A}, "
                      f"thickness_A {settings.thickness_A})")


def make_sample(rng: np.random.Generator, settings: SampleSettings = SampleSettings()):
    """(cbed float16 (N², S, S) z-scored per pattern, potential float16 (1, T, T) z-scored, attributes).

    Attributes: what made the sample and where its grids lie (Å, mrad, keV, mm), plain numbers and
    arrays; phase_mean/phase_std and cbed_mean/cbed_std undo the z-scores (the latter per pattern, of
    the intensities as fractions of the incident beam).
    """
    settings.check()
    for _ in range(settings.max_tries):  # a specimen whose target is flat is drawn again (rare)
        crystal, zone, conditions, plan = draw_specimen(rng, settings)
        try:
            sim = simulate_sample(crystal.structure, zone, conditions, settings, plan)
            break
        except FlatTarget:
            continue
    else:
        raise StemdlError(f"{settings.max_tries} specimens in a row had a flat target at "
                          f"{settings.target_size} px over {settings.scan_A} Å")
    geometry, patterns = sim.geometry, sim.patterns.astype(np.float64)
    attributes = {
        "space_group": crystal.space_group,
        "formula": crystal.formula,
        "lattice_A": np.asarray(crystal.structure.lattice, dtype=np.float64),
        "frac_coords": np.asarray(crystal.structure.frac_coords, dtype=np.float64),
        "numbers": np.asarray(crystal.structure.numbers, dtype=np.int64),
        "zone": np.asarray(zone, dtype=np.int64),
        "energy_keV": conditions.energy_keV,
        "semi_angle_mrad": conditions.semi_angle_mrad,
        "cs_mm": conditions.cs_mm,
        "defocus_A": 0.0,
        "thickness_A": sim.thickness_A,
        "max_angle_mrad": settings.max_angle_mrad,
        "cell_extent_A": np.asarray(plan.cell.extent, dtype=np.float64),
        "specimen_extent_A": np.asarray(plan.grid.extent, dtype=np.float64),
        "simulation_gpts": np.asarray(plan.grid.gpts, dtype=np.int64),
        "scan_origin_A": np.asarray(geometry.origin_A, dtype=np.float64),
        "scan_A": geometry.side_A,
        "scan_step_A": geometry.step_A,
        "target_pixel_A": geometry.pixel_A,
        "positions_A": geometry.positions_A(),
        "target_sigma_px": SIGMA_PX,
        "sigma_rad_per_VA": interaction_parameter(conditions.energy_keV),
        "phase_mean": float(sim.phase.mean()),
        "phase_std": float(sim.phase.std()),
        "cbed_mean": patterns.mean(axis=(-2, -1)).astype(np.float32),
        "cbed_std": patterns.std(axis=(-2, -1)).astype(np.float32),
    }
    cbed = zscore_patterns(patterns).astype(np.float16)
    return cbed, sim.target[None].astype(np.float16), attributes
