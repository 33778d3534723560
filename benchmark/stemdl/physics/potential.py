"""Projected potentials of the slices of a supercell on a grid, in V·Å, computed in Fourier space.

The sum over the grid's frequencies makes the potential exactly periodic in the cell and band-limited to
the grid (no atom is cut at the cell edge, no real-space aliasing), at the cost of one complex product
per species and slice. Array index [i, j] is x = i·Lx/Nx, y = j·Ly/Ny, x the first axis (as in
`waves`); frequencies in 1/Å without 2π.
"""

from __future__ import annotations

import torch

from stemdl.physics.parameters import fourier_projected_potential
from stemdl.physics.supercell import Supercell

# Atoms per chunk of the structure-factor products: (chunk, Nx + Ny) complex numbers at a time.
ATOM_CHUNK = 1024


def slice_geometry(lz: float, slice_thickness: float) -> tuple[int, float]:
    """(number of slices, actual thickness in Å) for a cell of depth `lz` Å: the whole number of slices
    nearest lz / slice_thickness (at least one), all equal."""
    if lz <= 0 or slice_thickness <= 0:
        raise ValueError(f"cell depth {lz} Å and slice thickness {slice_thickness} Å must be positive")
    n = max(1, round(lz / slice_thickness))
    return n, lz / n


def _frequencies(gpts, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer frequency indices (mx (Nx,), my (Ny,)) in FFT order, float64: q = (mx/Lx, my/Ly)."""
    mx = torch.fft.fftfreq(gpts[0], d=1.0 / gpts[0], dtype=torch.float64, device=device)
    my = torch.fft.fftfreq(gpts[1], d=1.0 / gpts[1], dtype=torch.float64, device=device)
    return mx, my


def _nyquist_mask(gpts, device) -> torch.Tensor:
    """1 everywhere but the Nyquist row/column of an even axis, which has no Hermitian partner on the
    grid: keeping it would make the potential complex (its imaginary part sin(π N x/L) per atom)."""
    mask = torch.ones(gpts, dtype=torch.float64, device=device)
    if gpts[0] % 2 == 0:
        mask[gpts[0] // 2, :] = 0.0
    if gpts[1] % 2 == 0:
        mask[:, gpts[1] // 2] = 0.0
    return mask


def _phases(frac: torch.Tensor, m: torch.Tensor, ctype) -> torch.Tensor:
    """exp(−2πi m·s) for fractional coordinates s (n,) and frequency indices m (M,): (n, M).

    The phase is reduced modulo one cycle in float64 first, so float32 keeps full accuracy at the edge
    of a 512-point grid (where m·s reaches 256 cycles).
    """
    cycles = torch.remainder(frac[:, None] * m[None, :], 1.0)
    return torch.polar(torch.ones_like(cycles), -2.0 * torch.pi * cycles).to(ctype)


def _structure_factor(frac_xy: torch.Tensor, mx, my, ctype) -> torch.Tensor:
    """Σ_j exp(−2πi (mx x_j/Lx + my y_j/Ly)) over atoms j: (Nx, Ny) complex. The phase of one atom is a
    product of an x and a y factor, so the sum over atoms is one matrix product per chunk."""
    total = torch.zeros((len(mx), len(my)), dtype=ctype, device=mx.device)
    for start in range(0, len(frac_xy), ATOM_CHUNK):
        chunk = frac_xy[start:start + ATOM_CHUNK]
        total += _phases(chunk[:, 0], mx, ctype).T @ _phases(chunk[:, 1], my, ctype)
    return total


def _species_spectra(supercell: Supercell, gpts, device, debye_waller: float):
    """(species (S,), V_s(q)/A on the grid (S, Nx, Ny) in V·Å): one atom's projected potential divided by
    the cell area, h²/(2π m₀ e) f_e(q) exp(−B q²/4) / (Lx Ly), float64, Nyquist row/column zeroed."""
    lx, ly = supercell.extent[0], supercell.extent[1]
    mx, my = _frequencies(gpts, device)
    q = torch.sqrt((mx[:, None] / lx) ** 2 + (my[None, :] / ly) ** 2)
    species = sorted({int(z) for z in supercell.numbers})
    spectra = torch.stack([fourier_projected_potential(z, q, debye_waller) for z in species])
    return species, spectra * _nyquist_mask(gpts, device) / (lx * ly)


def _slice_fields(supercell: Supercell, gpts, n_slices: int, device, dtype, debye_waller: float):
    """Yield each slice's Fourier sum (below) in real space, complex (Nx, Ny); real to rounding."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, not {dtype}")
    ctype = torch.complex128 if dtype == torch.float64 else torch.complex64
    species, spectra = _species_spectra(supercell, gpts, device, debye_waller)
    spectra = spectra.to(ctype)
    mx, my = _frequencies(gpts, device)
    positions = torch.as_tensor(supercell.positions, dtype=torch.float64, device=device)
    frac_xy = positions[:, :2] / torch.tensor(supercell.extent[:2], dtype=torch.float64, device=device)
    thickness = supercell.extent[2] / n_slices
    layer = torch.clamp((positions[:, 2] / thickness).floor().long(), 0, n_slices - 1)
    numbers = torch.as_tensor(supercell.numbers, device=device)
    for k in range(n_slices):
        spectrum = torch.zeros(gpts, dtype=ctype, device=device)
        for s, z in enumerate(species):
            atoms = (layer == k) & (numbers == z)
            if atoms.any():
                spectrum += spectra[s] * _structure_factor(frac_xy[atoms], mx, my, ctype)
        # ifft2 divides by Nx·Ny; the Fourier sum has no such factor
        yield torch.fft.ifft2(spectrum) * (gpts[0] * gpts[1])


def slice_potentials(supercell: Supercell, gpts, slice_thickness: float, device=None,
                     dtype=torch.float32, debye_waller: float = 0.0) -> torch.Tensor:
    """Projected potentials of the slices of one cell repeat along z: (n_slices, Nx, Ny) in V·Å.

    v_k(r) = h²/(2π m₀ e) / A · Σ_q f_e(|q|) e^{−B q²/4} Σ_{j in slice k} exp(2πi q·(r − r_j))
    (Kirkland 2010, ch. 5-6: the projected atomic potential as the 2-D Fourier transform of f_e), the
    sum over the grid's frequencies q, A = Lx·Ly. The slices are `slice_geometry(Lz, slice_thickness)`:
    equal, Lz / n_slices thick; an atom belongs to the slice containing its z. `debye_waller` is B in Å²
    for every atom. Index [k, i, j] is slice k (from the entrance surface), x = i·Lx/Nx, y = j·Ly/Ny.
    """
    gpts = (int(gpts[0]), int(gpts[1]))
    n_slices, _ = slice_geometry(supercell.extent[2], slice_thickness)
    fields = _slice_fields(supercell, gpts, n_slices, device, dtype, debye_waller)
    return torch.stack([field.real for field in fields])


def projected_potential(supercell: Supercell, gpts, device=None, dtype=torch.float32,
                        debye_waller: float = 0.0) -> torch.Tensor:
    """The whole cell's projected potential (all atoms, one slice): (Nx, Ny) in V·Å."""
    gpts = (int(gpts[0]), int(gpts[1]))
    return next(_slice_fields(supercell, gpts, 1, device, dtype, debye_waller)).real
