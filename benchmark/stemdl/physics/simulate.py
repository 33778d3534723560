"""Dynamical CBED, 4D-STEM and projected potentials of a crystal along a zone axis: the engine's front door.

    plan = plan_cbed(structure, (1, 1, 0), energy_keV=200, max_angle_mrad=40, size=256)
    patterns, plan = cbed(structure, (1, 1, 0), energy_keV=200, semi_angle_mrad=8, thicknesses_A=[200],
                          max_angle_mrad=40, size=256, scan=8)

A plan fixes the specimen and the grid from what is asked: the orthogonal cell of the zone
(`supercell`), tiled laterally until the diffraction-plane sampling λ/L is at least as fine as a detector
pixel and the probe has room, on an FFT-friendly grid whose 2/3 bandwidth limit reaches the detector's
edge (`waves.choose_gpts`). The potential of ONE orthogonal cell is computed and tiled, which is exact
(the tiled specimen has the cell's period) and costs the cell's atoms, not the supercell's. The crystal is
the cell repeated along the beam the whole number of times nearest each thickness asked. Units: Å, mrad,
keV, V·Å; intensities are fractions of the incident beam.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from stemdl.physics.multislice import cbed as _cbed
from stemdl.physics.multislice import four_d_stem as _four_d_stem
from stemdl.physics.multislice import position_grid, to_detector, transmission
from stemdl.physics.potential import projected_potential, slice_geometry, slice_potentials
from stemdl.physics.supercell import Supercell, orthogonal_supercell
from stemdl.physics.waves import FFT_PRIMES, Grid, propagator
from stemdl.physics.electrons import wavelength

SLICE_A = 2.0  # default slice thickness: 5e-4..2e-2 of the pattern (L1) from 0.25 Å slices (docs/physics.md)
# The finest real-space pixel the specimen needs whatever the detector: the potential's cores must be
# resolved. A grid sampled only for the detector's angle (0.4 Å at 20 mrad) is 30 % (Si) to 170 % (GaAs)
# off in L1 at 10 nm and gets the sign of GaAs's Friedel asymmetry wrong; 0.1 Å is within 1-5 %
# (docs/physics.md, "Convergence").
SAMPLING_A = 0.1
# Probes propagated as one batch, by device type. On a CPU one wave stays in the cache: a batch of 16 cost
# 2.7x more per probe and slice at 560x560 (docs/performance.md). The batch fixes the order of the sum.
CHUNK = {"cpu": 1, "cuda": 16}
MIN_EXTENT_A = 40.0  # a converged probe's tails (a few λ/α) stay inside the cell at the usual angles


@dataclass(frozen=True)
class Plan:
    """What a simulation runs on: the crystal's orthogonal cell, its lateral tiling, grid and slices."""

    cell: Supercell  # one orthogonal cell (not tiled)
    tiles: tuple[int, int]  # cell repeats along x and y
    grid: Grid  # the tiled specimen's grid
    n_slices: int  # slices per cell repeat along the beam
    dz_A: float  # their thickness

    @property
    def cell_gpts(self) -> tuple[int, int]:
        return (self.grid.gpts[0] // self.tiles[0], self.grid.gpts[1] // self.tiles[1])

    def repeats(self, thickness_A: float) -> int:
        """Cell repeats along the beam for a thickness in Å: the whole number nearest it, at least 1."""
        return max(1, int(round(float(thickness_A) / self.cell.extent[2])))

    def describe(self) -> str:
        g, (lx, ly) = self.grid, self.grid.extent
        return (f"cell {self.cell.describe()}; specimen {lx:.1f} x {ly:.1f} Å ({self.tiles[0]} x {self.tiles[1]} "
                f"cells) on {g.gpts[0]} x {g.gpts[1]} points ({g.sampling[0]:.4f} x {g.sampling[1]:.4f} Å, "
                f"{g.angular_sampling_mrad[0]:.3f} x {g.angular_sampling_mrad[1]:.3f} mrad a pixel, kept to "
                f"{g.max_angle_mrad:.1f} mrad); {self.n_slices} slice(s) of {self.dz_A:.3f} Å per cell")


def _smooth(n: int) -> bool:
    for p in FFT_PRIMES:
        while n % p == 0:
            n //= p
    return n == 1


def _next_smooth(n: int) -> int:
    while not _smooth(n):
        n += 1
    return n


def _axis(length: float, needed_extent: float, needed_gpts_per_A: float) -> tuple[int, int]:
    """(tiles, points per cell) along one axis: tiles x length >= needed_extent, and tiles x points even,
    2-3-5-7-smooth and at least needed_gpts_per_A x the tiled length."""
    tiles = _next_smooth(max(1, math.ceil(needed_extent / length - 1e-9)))
    per_cell = max(1, math.ceil(needed_gpts_per_A * length - 1e-9))
    while not (_smooth(tiles * per_cell) and (tiles * per_cell) % 2 == 0):
        per_cell += 1
    return tiles, per_cell


def plan_cbed(structure, zone, *, energy_keV: float, max_angle_mrad: float, size: int | None = None,
              slice_A: float = SLICE_A, min_extent_A: float = MIN_EXTENT_A, max_strain: float = 1e-3,
              max_repeat: int = 8, sampling_A: float | None = SAMPLING_A) -> Plan:
    """The specimen and grid for patterns out to max_angle_mrad (the detector's half-width) on a
    size x size detector (None: no detector, the simulation's own pixels), with real-space pixels no
    larger than sampling_A Å (None: only as fine as the detector's angle needs; fast, not converged).
    max_strain and max_repeat bound the search for the orthogonal cell (`supercell.orthogonal_supercell`)."""
    if not (energy_keV > 0 and max_angle_mrad > 0 and slice_A > 0):
        raise ValueError(f"energy {energy_keV} keV, max angle {max_angle_mrad} mrad and slice {slice_A} Å "
                         "must be positive")
    cell = orthogonal_supercell(structure, zone, max_strain=max_strain, max_repeat=max_repeat)
    lam = wavelength(energy_keV)
    # λ/L (rad) no coarser than a detector pixel 2A/S: each detector pixel gets at least one sample
    extent = max(min_extent_A, lam * size / (2e-3 * max_angle_mrad)) if size else min_extent_A
    per_A = 3.0 * max_angle_mrad * 1e-3 / lam  # the bandwidth limit (2/3 of Nyquist) reaches the detector
    if sampling_A is not None:
        if not sampling_A > 0:
            raise ValueError(f"sampling {sampling_A} Å must be positive")
        per_A = max(per_A, 1.0 / sampling_A)
    (tx, nx), (ty, ny) = (_axis(cell.extent[i], extent, per_A) for i in (0, 1))
    grid = Grid((tx * cell.extent[0], ty * cell.extent[1]), (tx * nx, ty * ny), energy_keV)
    n_slices, dz = slice_geometry(cell.extent[2], slice_A)
    return Plan(cell, (tx, ty), grid, n_slices, dz)


def specimen(plan: Plan, device=None, dtype=torch.complex64, debye_waller: float = 0.0) -> torch.Tensor:
    """Transmission functions (n_slices, Nx, Ny) of the tiled specimen, on `device`."""
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    v = slice_potentials(plan.cell, plan.cell_gpts, plan.dz_A, device=device, dtype=real,
                         debye_waller=debye_waller)
    return transmission(v.repeat(1, *plan.tiles), plan.grid, dtype=dtype)


def probe_positions(plan: Plan, scan: int | None) -> np.ndarray:
    """The probe at the specimen's centre, or an scan x scan grid over one cell centred there (Å)."""
    centre = np.array(plan.grid.extent) / 2.0
    if not scan:
        return centre[None]
    cell = np.array(plan.cell.extent[:2])
    return position_grid(tuple(cell), int(scan), origin_A=tuple(centre - cell / 2.0))


def default_chunk(device) -> int:
    """Probes a batch on `device` (None: the CPU): CHUNK's entry, 16 for device types it does not name."""
    return CHUNK.get(torch.device(device or "cpu").type, 16)


def _check_thicknesses(thicknesses_A: Sequence[float]) -> list[float]:
    values = [float(t) for t in np.atleast_1d(thicknesses_A)]
    if not values or not all(np.isfinite(t) and t > 0 for t in values):
        raise ValueError(f"thicknesses must be positive numbers of Å, got {list(values)}")
    return values


def _pass(plan: Plan, thicknesses_A, max_angle_mrad, size, device, dtype, debye_waller=0.0, tilt_mrad=(0.0, 0.0),
          center_mrad=(0.0, 0.0)):
    """What one multislice pass over `plan` needs: transmissions, propagator, the slice counts of the
    thicknesses (whole cell repeats) and the detector's resampling."""
    thicknesses = _check_thicknesses(thicknesses_A)
    t = specimen(plan, device, dtype, debye_waller=debye_waller)
    prop = propagator(plan.grid, plan.dz_A, tilt_mrad=tilt_mrad, device=t.device, dtype=dtype)
    save_at = [plan.repeats(x) * plan.n_slices for x in thicknesses]
    detector = lambda p: to_detector(p, plan.grid, max_angle_mrad, size, center_mrad)  # noqa: E731
    return t, prop, save_at, detector


def cbed(structure, zone, *, energy_keV: float, semi_angle_mrad: float, thicknesses_A: Sequence[float],
         max_angle_mrad: float, size: int, scan: int | None = None, defocus_A: float = 0.0, cs_mm: float = 0.0,
         slice_A: float = SLICE_A, sampling_A: float | None = SAMPLING_A, device=None, dtype=torch.complex64,
         chunk: int | None = None, plan: Plan | None = None, debye_waller: float = 0.0, tilt_mrad=(0.0, 0.0),
         center_mrad=(0.0, 0.0), progress=None) -> tuple[np.ndarray, Plan]:
    """CBED patterns float32 (len(thicknesses_A), size, size) and the plan, in one multislice pass.

    Pixel (i, j) is centred on the angle ((j − S/2)·2A/S, (i − S/2)·2A/S) mrad (`multislice.to_detector`),
    A = max_angle_mrad, the transmitted beam at center_mrad. One probe at the specimen's centre, or with
    `scan` the average over scan x scan positions spanning one cell (as the public data: 8 x 8).
    `debye_waller` is B in Å² for every atom; `tilt_mrad` tilts the beam off the zone axis along the
    specimen's (x, y) (carried by the propagator, `waves.propagator`): the pattern stays centred on the
    transmitted beam, pass center_mrad=tilt_mrad for the zone axis's frame instead. `progress(n)` is
    called with the probes of each chunk as it finishes (e.g. `Progress.update`); `chunk` probes go as
    one batch (None: `default_chunk(device)`).
    """
    plan = plan or plan_cbed(structure, zone, energy_keV=energy_keV, max_angle_mrad=max_angle_mrad,
                             size=size, slice_A=slice_A, sampling_A=sampling_A)
    t, prop, save_at, detector = _pass(plan, thicknesses_A, max_angle_mrad, size, device, dtype, debye_waller,
                                       tilt_mrad, center_mrad)
    out = _cbed(plan.grid, t, prop, probe_positions(plan, scan), save_at, semi_angle_mrad=semi_angle_mrad,
                defocus_A=defocus_A, cs_mm=cs_mm, chunk=chunk or default_chunk(device), detector=detector, progress=progress)
    return out.cpu().numpy().astype(np.float32), plan


def four_d_stem(structure, zone, *, energy_keV: float, semi_angle_mrad: float, thicknesses_A: Sequence[float],
                max_angle_mrad: float, size: int, positions_A, defocus_A: float = 0.0, cs_mm: float = 0.0,
                slice_A: float = SLICE_A, sampling_A: float | None = SAMPLING_A, device=None,
                dtype=torch.complex64, chunk: int | None = None, plan: Plan | None = None,
                progress=None) -> tuple[np.ndarray, Plan]:
    """One pattern per probe position: float32 (len(thicknesses_A), P, size, size), positions (P, 2) in Å
    of the specimen (`plan.grid.extent`; the cell's origin at 0). Detector and `progress` as in `cbed`."""
    plan = plan or plan_cbed(structure, zone, energy_keV=energy_keV, max_angle_mrad=max_angle_mrad,
                             size=size, slice_A=slice_A, sampling_A=sampling_A)
    t, prop, save_at, detector = _pass(plan, thicknesses_A, max_angle_mrad, size, device, dtype)
    out = _four_d_stem(plan.grid, t, prop, positions_A, save_at, semi_angle_mrad=semi_angle_mrad,
                       defocus_A=defocus_A, cs_mm=cs_mm, chunk=chunk or default_chunk(device), detector=detector, progress=progress)
    return out.numpy().astype(np.float32), plan


def potential_image(structure, zone, size: int, device=None, max_strain: float = 1e-3) -> tuple[np.ndarray, Supercell]:
    """The projected potential of one orthogonal cell, float32 (size, size) in V·Å, and the cell.

    Image convention: pixel (i, j) at x = j·Lx/S, y = i·Ly/S (rows along y, as the detector's).
    """
    if size < 2:
        raise ValueError(f"size must be at least 2, got {size}")
    cell = orthogonal_supercell(structure, zone, max_strain=max_strain)
    v = projected_potential(cell, (size, size), device=device, dtype=torch.float64)
    return v.T.contiguous().cpu().numpy().astype(np.float32), cell
