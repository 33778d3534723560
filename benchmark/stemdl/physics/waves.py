"""The simulation grid and the waves on it: probes, plane waves, Fresnel propagators, the bandwidth limit.

Everything a multislice run needs before the specimen enters, in torch so one code serves CPU and CUDA.
Units: Å, 1/Å without 2π, mrad, keV. Index [i, j] is x = i·Lx/Nx, y = j·Ly/Ny (x the first axis);
frequencies in FFT order. Angles are paraxial: θ = λ·k. Conventions (Kirkland 2010, 2nd ed.):
* χ(k) = π λ k² (½ Cs λ² k² − Δf), probe ψ̃ = A exp(−iχ) (ch. 3): Δf > 0 is underfocus, the focus Δf
  below the entrance surface (a test propagates such a probe by Δf and finds the focused one).
* The 2/3 bandwidth limit (ch. 6), isotropic at the coarser axis's Nyquist: products of two limited
  functions alias only onto frequencies the limit removes again.
* Tilts: `plane_wave` snaps to grid frequencies; an arbitrary tilt θ rides in the propagator on the
  periodic envelope φ of exp(2πi θ/λ·r)·φ(r) (ch. 6), its pattern then displaced by θ (`to_detector`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from stemdl.physics.electrons import wavelength

BANDWIDTH_FRACTION = 2.0 / 3.0  # of the Nyquist frequency, the anti-aliasing limit of the multislice product
FFT_PRIMES = (2, 3, 5, 7)  # radices that pocketfft/MKL and cuFFT handle with fast kernels


@dataclass(frozen=True)
class Grid:
    """A periodic simulation cell: extent (Lx, Ly) in Å, gpts (Nx, Ny), beam energy in keV."""

    extent: tuple[float, float]
    gpts: tuple[int, int]
    energy_keV: float

    def __post_init__(self):
        object.__setattr__(self, "extent", (float(self.extent[0]), float(self.extent[1])))
        object.__setattr__(self, "gpts", (int(self.gpts[0]), int(self.gpts[1])))
        object.__setattr__(self, "energy_keV", float(self.energy_keV))
        if min(self.extent) <= 0 or min(self.gpts) < 2 or self.energy_keV <= 0:
            raise ValueError(f"bad grid {self}: extent and energy must be positive, at least 2 points an axis")

    @property
    def sampling(self) -> tuple[float, float]:
        """Real-space pixel size (Lx/Nx, Ly/Ny) in Å."""
        return (self.extent[0] / self.gpts[0], self.extent[1] / self.gpts[1])

    @property
    def wavelength(self) -> float:
        """Relativistic electron wavelength λ in Å."""
        return wavelength(self.energy_keV)

    @property
    def k_limit(self) -> float:
        """The bandwidth limit (2/3)·k_Nyquist in 1/Å, k_Nyquist = 1/(2·sampling) of the coarser axis."""
        return BANDWIDTH_FRACTION / (2.0 * max(self.sampling))

    @property
    def max_angle_mrad(self) -> float:
        """The largest scattering angle kept after the bandwidth limit, λ·k_limit, in mrad."""
        return self.wavelength * self.k_limit * 1e3

    @property
    def angular_sampling_mrad(self) -> tuple[float, float]:
        """One pixel of the diffraction plane, (λ/Lx, λ/Ly) in mrad."""
        return (self.wavelength / self.extent[0] * 1e3, self.wavelength / self.extent[1] * 1e3)

    def frequencies(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(kx (Nx, 1), ky (1, Ny)) in 1/Å, FFT order, float64 (phases are formed in double, then cast)."""
        kx = torch.fft.fftfreq(self.gpts[0], d=self.sampling[0], dtype=torch.float64, device=device)
        ky = torch.fft.fftfreq(self.gpts[1], d=self.sampling[1], dtype=torch.float64, device=device)
        return kx[:, None], ky[None, :]

    def k2(self, device=None) -> torch.Tensor:
        """|k|² (Nx, Ny) in 1/Å², float64."""
        kx, ky = self.frequencies(device)
        return kx**2 + ky**2

    def bandlimit(self, device=None) -> torch.Tensor:
        """The 2/3 anti-aliasing mask (Nx, Ny): 1.0 where |k| <= k_limit, else 0.0 (float64)."""
        return (self.k2(device) <= self.k_limit**2).to(torch.float64)


def _fft_size(n_min: float) -> int:
    """The smallest even integer >= n_min whose only prime factors are 2, 3, 5, 7."""
    n = max(2, math.ceil(n_min - 1e-9))
    while True:
        m = n
        for p in FFT_PRIMES:
            while m % p == 0:
                m //= p
        if m == 1 and n % 2 == 0:
            return n
        n += 1


def choose_gpts(extent: tuple[float, float], energy_keV: float, max_angle_mrad: float) -> tuple[int, int]:
    """The smallest FFT-friendly (Nx, Ny) whose bandwidth-limited angle reaches max_angle_mrad.

    Per axis λ·(2/3)·N/(2L) >= θ, i.e. N >= 3 L θ / λ. Sizes are even with prime factors 2, 3, 5, 7 only,
    not powers of two: both CPU FFTs and cuFFT have fast kernels for these radices, and a power of two
    can cost up to 2x points an axis (4x a pattern) for no physics gained. Even, so that fftshift puts the
    optical axis on a pixel at N/2 with the pattern symmetric about it.
    """
    lam = wavelength(energy_keV)
    theta = max_angle_mrad * 1e-3
    return tuple(_fft_size(3.0 * float(length) * theta / lam) for length in extent)


def aperture(grid: Grid, semi_angle_mrad: float, device=None) -> torch.Tensor:
    """Objective (probe-forming) aperture A(k) (Nx, Ny), float64, cut-off k_a = α/λ.

    Soft edge: A falls linearly from 1 to 0 over one diffraction-plane pixel centred on k_a (about the
    fraction of each pixel that lies inside the disc), so the disc area is right to sub-pixel accuracy and
    the sharp-edge ringing of a stair-cased disc is avoided.
    """
    k_a = semi_angle_mrad * 1e-3 / grid.wavelength
    dk = 1.0 / math.sqrt(grid.extent[0] * grid.extent[1])
    return ((k_a - grid.k2(device).sqrt()) / dk + 0.5).clamp(0.0, 1.0)


def aberration(grid: Grid, defocus_A: float = 0.0, cs_mm: float = 0.0, device=None) -> torch.Tensor:
    """χ(k) = π λ k² (½ Cs λ² k² − Δf) in rad (Nx, Ny), float64; Δf > 0 is underfocus (Kirkland ch. 3)."""
    lam, k2 = grid.wavelength, grid.k2(device)
    cs_A = cs_mm * 1e7
    return math.pi * lam * k2 * (0.5 * cs_A * lam**2 * k2 - defocus_A)


def as_positions(positions_A, device=None) -> torch.Tensor:
    """Probe positions as a float64 tensor (P, 2) in Å, from a tensor, an array or a list of pairs."""
    if not isinstance(positions_A, torch.Tensor):
        positions_A = torch.as_tensor(np.asarray(positions_A, dtype=np.float64))
    return positions_A.to(device=device, dtype=torch.float64).reshape(-1, 2)


def _shift_phase(grid: Grid, positions_A: torch.Tensor) -> torch.Tensor:
    """exp(−2πi k·r0) (P, Nx, Ny) complex128: moves a wave by r0 (Fourier shift theorem)."""
    kx, ky = grid.frequencies(positions_A.device)
    x0, y0 = positions_A[:, 0, None, None], positions_A[:, 1, None, None]
    return torch.exp(-2j * math.pi * kx[None] * x0) * torch.exp(-2j * math.pi * ky[None] * y0)


def probe(grid: Grid, semi_angle_mrad: float, positions_A, defocus_A: float = 0.0, cs_mm: float = 0.0,
          device=None, dtype=torch.complex64) -> torch.Tensor:
    """Convergent-beam probes (P, Nx, Ny) centred on positions_A (P, 2) in Å, Σ|ψ|² = 1 each.

    ψ(r) = IFFT[A(k) exp(−iχ(k)) exp(−2πi k·r0)] (Kirkland ch. 3, STEM probe), bandwidth-limited, normalised so
    intensities are fractions of the incident beam. Off-grid positions are exact: the shift is a phase.
    """
    if semi_angle_mrad > grid.max_angle_mrad:
        raise ValueError(f"semi-angle {semi_angle_mrad} mrad exceeds the grid's bandwidth-limited angle "
                         f"{grid.max_angle_mrad:.2f} mrad: use more grid points (choose_gpts)")
    pos = as_positions(positions_A, device)
    amp = aperture(grid, semi_angle_mrad, pos.device) * grid.bandlimit(pos.device)
    # with torch's ifft (1/N), Σ_r |ψ|² = Σ_k |ψ̃|² / N: scale the spectrum once instead of each probe
    amp = amp * math.sqrt(grid.gpts[0] * grid.gpts[1] / float((amp**2).sum()))
    spectrum = amp * torch.exp(-1j * aberration(grid, defocus_A, cs_mm, pos.device))
    return torch.fft.ifft2(spectrum[None] * _shift_phase(grid, pos)).to(dtype)


def snap_tilt(grid: Grid, tilts_mrad) -> np.ndarray:
    """Tilts (T, 2) in mrad moved to the nearest grid frequency k = round(θ L / λ) / L, in mrad."""
    tilts = np.asarray(tilts_mrad, dtype=np.float64).reshape(-1, 2)
    step = np.asarray(grid.angular_sampling_mrad)
    return np.round(tilts / step) * step


def plane_wave(grid: Grid, tilts_mrad=((0.0, 0.0),), device=None, dtype=torch.complex64) -> torch.Tensor:
    """Tilted plane waves exp(2πi k_t·r) (T, Nx, Ny), Σ|ψ|² = 1, tilts snapped to the grid (`snap_tilt`).

    For an arbitrary tilt use the untilted wave as the envelope and `propagator(..., tilt_mrad=θ)`.
    """
    kt = torch.as_tensor(snap_tilt(grid, tilts_mrad) * 1e-3 / grid.wavelength, device=device)
    x = torch.arange(grid.gpts[0], dtype=torch.float64, device=device) * grid.sampling[0]
    y = torch.arange(grid.gpts[1], dtype=torch.float64, device=device) * grid.sampling[1]
    phase = kt[:, 0, None, None] * x[None, :, None] + kt[:, 1, None, None] * y[None, None, :]
    norm = 1.0 / math.sqrt(grid.gpts[0] * grid.gpts[1])
    return (torch.exp(2j * math.pi * phase) * norm).to(dtype)


def propagator(grid: Grid, dz_A: float, tilt_mrad=(0.0, 0.0), device=None,
               dtype=torch.complex64) -> torch.Tensor:
    """Fresnel propagator over dz_A in Å, times the bandwidth mask: (Nx, Ny), or (T, Nx, Ny) for T tilts.

    P(k) = exp(−iπλk²Δz) (Kirkland ch. 6) for the envelope of a beam tilted by θ (mrad, paraxial):
    P(q) = exp(−iπλq²Δz − 2πiΔz q·θ), which moves the envelope by +Δz·θ per slice (Kirkland ch. 6, tilt).
    """
    kx, ky = grid.frequencies(device)
    phase = -math.pi * grid.wavelength * (kx**2 + ky**2) * dz_A
    tilts = np.asarray(tilt_mrad, dtype=np.float64)
    theta = torch.as_tensor(tilts.reshape(-1, 2) * 1e-3, device=kx.device)
    phase = phase - 2.0 * math.pi * dz_A * (kx * theta[:, 0, None, None] + ky * theta[:, 1, None, None])
    prop = torch.exp(1j * phase) * grid.bandlimit(kx.device)
    return (prop[0] if tilts.ndim == 1 else prop).to(dtype)
