"""Multislice propagation through a periodic specimen, and the diffraction patterns made from exit waves.

The specimen is the n slices of one cell repeat along the beam (projected potentials in V·Å), repeated
as often as the deepest requested thickness needs; every requested depth comes out of the same pass.
Probes are run in chunks of positions so device memory stays bounded whatever the scan. One code for
CPU and CUDA: the device and precision are those of the transmission functions (complex64 by default).
Patterns are fractions of the incident beam, fftshifted so the optical axis sits at (N/2, N/2).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from stemdl.physics.electrons import interaction_parameter
from stemdl.physics.waves import Grid, as_positions, probe


def transmission(potential_slices, grid: Grid, sigma: float | None = None, dtype=torch.complex64,
                 device=None) -> torch.Tensor:
    """Transmission functions t = exp(iσv) (n, Nx, Ny) of projected potentials v (n, Nx, Ny) in V·Å.

    σ in rad/(V·Å), by default the interaction parameter at the grid's energy (Kirkland eq. 5.6). t is
    bandwidth-limited like the propagator (Kirkland ch. 6): the product t·ψ then stays free of aliasing.
    The grid is needed for that limit, which depends on the extent, not only on the array shape. On
    `device` (default: that of the potential), complex64 or complex128.
    """
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    v = torch.as_tensor(potential_slices).to(device=device, dtype=real)
    if tuple(v.shape[-2:]) != grid.gpts:
        raise ValueError(f"potential slices {tuple(v.shape)} do not match the grid's gpts {grid.gpts}")
    sigma = interaction_parameter(grid.energy_keV) if sigma is None else float(sigma)
    t = torch.polar(torch.ones_like(v), sigma * v)
    return torch.fft.ifft2(torch.fft.fft2(t) * grid.bandlimit(v.device).to(real))


def slice_counts(thicknesses_A: Sequence[float], dz_A: float) -> list[int]:
    """Slices to pass for each thickness in Å at slice thickness dz_A (rounded to the nearest slice)."""
    return [int(round(t / dz_A)) for t in thicknesses_A]


def propagate(waves: torch.Tensor, transmissions: torch.Tensor, propagator: torch.Tensor,
              save_at: Sequence[int]) -> torch.Tensor:
    """Exit waves (len(save_at), B, Nx, Ny) after save_at[m] slices, for entrance waves (B, Nx, Ny).

    Each slice transmits then propagates, ψ_{s+1} = IFFT[P · FFT[t_s ψ_s]] (Kirkland ch. 6), cycling
    through the n transmissions of one cell; save_at counts slices from the entrance (0 = the incident
    wave) in any order. The propagator (Nx, Ny), or (B, Nx, Ny) for per-wave tilts, serves every slice,
    so the slices of a cell must be equally thick. Memory: the B waves plus the saved ones.
    """
    counts = [int(c) for c in save_at]
    if not counts or min(counts) < 0:
        raise ValueError(f"save_at must list slice counts >= 0, got {list(save_at)}")
    n_cell = transmissions.shape[0]
    saved: dict[int, torch.Tensor] = {}
    psi = waves
    for s in range(max(counts) + 1):
        if s > 0:
            psi = torch.fft.ifft2(torch.fft.fft2(psi * transmissions[(s - 1) % n_cell]).mul_(propagator))
        if s in counts:
            saved[s] = psi  # psi is rebound, never written in place, so keeping the reference is safe
    return torch.stack([saved[c] for c in counts])


def diffraction(waves: torch.Tensor) -> torch.Tensor:
    """|FFT ψ|² (..., Nx, Ny), fftshifted (k = 0 at index N//2), as fractions of the incident beam.

    The orthonormal FFT keeps Σ_k |ψ̃|² = Σ_r |ψ|² (Parseval), which is 1 for a normalised incident wave.
    """
    spectrum = torch.fft.fft2(waves, norm="ortho")
    return torch.fft.fftshift(spectrum.real**2 + spectrum.imag**2, dim=(-2, -1))


def position_grid(extent_A: tuple[float, float], n: int, origin_A=(0.0, 0.0)) -> np.ndarray:
    """(n², 2) probe positions in Å on an n x n grid spanning the rectangle origin + [0, L): x-major.

    The far edges are left out, so for a rectangle that is one unit cell every position is distinct
    modulo the lattice and the average is a fair average over the cell.
    """
    fx, fy = np.meshgrid(np.arange(n) / n, np.arange(n) / n, indexing="ij")
    pos = np.stack([fx.ravel() * extent_A[0], fy.ravel() * extent_A[1]], axis=1)
    return pos + np.asarray(origin_A, dtype=np.float64)


def _scan(grid, transmissions, propagator, positions_A, save_at, optics, chunk, detector, progress=None):
    """Yields the patterns (len(save_at), b, ...) of successive chunks of at most `chunk` probes, calling
    progress(b) after each chunk when given."""
    pos = as_positions(positions_A)
    for start in range(0, len(pos), chunk):
        waves = probe(grid, positions_A=pos[start:start + chunk], device=transmissions.device,
                      dtype=transmissions.dtype, **optics)
        patterns = diffraction(propagate(waves, transmissions, propagator, save_at))
        yield detector(patterns) if detector is not None else patterns
        if progress is not None:
            progress(len(waves))


def cbed(grid: Grid, transmissions: torch.Tensor, propagator: torch.Tensor, positions_A, save_at,
         *, semi_angle_mrad: float, defocus_A: float = 0.0, cs_mm: float = 0.0, chunk: int = 16,
         detector: Callable | None = None, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """CBED patterns (len(save_at), Nx, Ny) averaged over the probe positions_A (P, 2) Å, or one (2,).

    Probe optics as in `waves.probe` (mrad, Å, mm). `detector` maps patterns (..., Nx, Ny) to the
    output pixels chunk by chunk (e.g. functools.partial(to_detector, grid=..., ...)); `progress(n)` is
    called with the probes of each chunk once it is done. On the device of the transmissions.
    """
    optics = dict(semi_angle_mrad=semi_angle_mrad, defocus_A=defocus_A, cs_mm=cs_mm)
    n_pos = as_positions(positions_A).shape[0]
    total = None
    for patterns in _scan(grid, transmissions, propagator, positions_A, save_at, optics, chunk, detector, progress):
        part = patterns.sum(dim=1)
        total = part if total is None else total + part
    return total / n_pos


def four_d_stem(grid: Grid, transmissions: torch.Tensor, propagator: torch.Tensor, positions_A, save_at,
                *, semi_angle_mrad: float, defocus_A: float = 0.0, cs_mm: float = 0.0, chunk: int = 16,
                detector: Callable | None = None, out_device="cpu",
                progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """One pattern per probe position: (len(save_at), P, ...) for positions_A (P, 2) in Å.

    As `cbed` (and its `progress`) without the average. Each chunk's patterns move to out_device (the host by default) as
    they come, so the device holds one chunk whatever the scan.
    """
    optics = dict(semi_angle_mrad=semi_angle_mrad, defocus_A=defocus_A, cs_mm=cs_mm)
    chunks = [p.to(out_device) for p in
              _scan(grid, transmissions, propagator, positions_A, save_at, optics, chunk, detector, progress)]
    return torch.cat(chunks, dim=1)


def _overlap_weights(n_sim: int, step_sim: float, offset: float, size: int, step_det: float) -> torch.Tensor:
    """(size, n_sim) fraction of each simulation pixel (box of width step_sim centred on
    (i − n_sim//2)·step_sim + offset) that falls in each detector pixel (box centred on (c − size/2)·step_det)."""
    centre_sim = (np.arange(n_sim) - n_sim // 2) * step_sim + offset
    centre_det = (np.arange(size) - size / 2) * step_det
    lo = np.maximum(centre_det[:, None] - step_det / 2, centre_sim[None, :] - step_sim / 2)
    hi = np.minimum(centre_det[:, None] + step_det / 2, centre_sim[None, :] + step_sim / 2)
    return torch.as_tensor(np.clip(hi - lo, 0.0, None) / step_sim)


def to_detector(pattern: torch.Tensor, grid: Grid, max_angle_mrad: float, size: int,
                center_mrad=(0.0, 0.0)) -> torch.Tensor:
    """Resample fftshifted patterns (..., Nx, Ny) onto a detector: float32 (..., size, size).

    Detector pixel (r, c) is centred on the angle (θx, θy) = ((c − S/2)·2A/S, (r − S/2)·2A/S) mrad: x to
    the right along columns, y down along rows, the optical axis at (S/2, S/2) (a pixel centre for even
    S, so the field of view is [−A − d/2, A − d/2), d = 2A/S, as fftshift's). Note the transpose: the
    simulation's first axis is x, the detector's first axis (rows) is y. center_mrad is the angle of the
    simulation's k = 0 (a tilt carried by the propagator). Each pixel's intensity is spread uniformly
    over its box of angles and integrated over the detector pixel boxes (area weighting): intensity in
    the field of view is conserved exactly, at any ratio of pixel sizes; detector pixels finer than the
    simulation's show the simulation's pixels as blocks (no interpolation invents detail).
    """
    step_x, step_y = grid.angular_sampling_mrad
    step_det = 2.0 * max_angle_mrad / size
    wx = _overlap_weights(grid.gpts[0], step_x, center_mrad[0], size, step_det).to(pattern.device)
    wy = _overlap_weights(grid.gpts[1], step_y, center_mrad[1], size, step_det).to(pattern.device)
    p = pattern.to(torch.float64)
    out = wx @ (p @ wy.T)  # (..., c = x, r = y)
    return out.transpose(-2, -1).to(torch.float32)
