"""The reconstruction target (the projected potential of the scanned region) and the CBED normalization.

Source: ORNL's reference generator (NAMSA, TF1 era), as described to us, not copied:
* each slice's transmission function is exp(iσV), V its projected potential in V·Å and σ the interaction
  parameter in rad/(V·Å) (`stemdl.physics.electrons.interaction_parameter`); the target is the mean over
  the slices of its imaginary part sin(σV) (unitless: a phase's sine, about σV for weak slices);
* Gaussian filtered with σ = 1.2 pixels; the central half cropped ([N/4:3N/4] of an N-pixel cell);
  then z-scored (mean 0, std 1 over the image): the target is unitless;
* every CBED pattern is z-scored on its own when the data are written.

`ornl_target` is that recipe on the slices' own grid (the cell and the target share the pixel). The
generator needs the target on another grid (T x T pixels over the scanned square, whatever the
simulation's grid), so `phase_image` (z-scored: `target_image`) does the same at any sample points:
the mean of sin(σV) on the periodic cell's grid, filtered, is a trigonometric polynomial (the grid's
exact interpolant), evaluated wherever asked (`fourier_resample`). The filter is a Gaussian of 1.2
TARGET pixels on the periodic cell (the crystal is periodic, so the boundary is too); it also removes
what the target grid cannot hold (its transfer at the target's Nyquist frequency is
exp(−2π²·1.2²/4) ≈ 8e-4), so the sampling does not alias. On the slices' own grid and crop the two
agree (tests).

Numpy, float64 throughout; callers cast for storage. Image axes as the arrays come in: the physics
engine's potentials are [x, y] (x the first axis); `target_image` returns rows along y, columns along x,
as the detector and `stemdl.physics.simulate.potential_image`.
"""

from __future__ import annotations

import numpy as np

SIGMA_PX = 1.2  # ORNL's Gaussian filter, in target pixels
ZSCORE_RTOL = 1e-7  # an image whose std is below this fraction of its mean's size is constant (rounding)


def mean_sin_phase(slices_V, sigma: float) -> np.ndarray:
    """Mean over the slices (n, ...) of sin(σ·V): Im of the transmission functions exp(iσV), averaged.
    V in V·Å, σ in rad/(V·Å); unitless."""
    v = np.asarray(slices_V, dtype=np.float64)
    if v.ndim < 3:
        raise ValueError(f"slices must be (n_slices, ...) projected potentials, got shape {v.shape}")
    return np.sin(sigma * v).mean(axis=0)


def gaussian_transfer(shape, sigma_samples) -> np.ndarray:
    """The Fourier transfer function exp(−2π² Σ (σ_i f_i)²) of a Gaussian of σ_i samples along each of
    the last two axes, on the DFT frequencies f_i of `shape` (cycles a sample). Multiplying a DFT by it
    is the convolution with the periodically wrapped Gaussian: a periodic boundary, exactly."""
    sx, sy = np.broadcast_to(np.asarray(sigma_samples, dtype=np.float64), (2,))
    fx = np.fft.fftfreq(shape[-2])[:, None]
    fy = np.fft.fftfreq(shape[-1])[None, :]
    return np.exp(-2.0 * np.pi**2 * ((sx * fx) ** 2 + (sy * fy) ** 2))


def gaussian_filter_periodic(image, sigma_px: float = SIGMA_PX) -> np.ndarray:
    """`image` (..., H, W) convolved with a Gaussian of sigma_px pixels, periodic boundary (via the FFT)."""
    img = np.asarray(image, dtype=np.float64)
    return np.fft.ifft2(np.fft.fft2(img) * gaussian_transfer(img.shape, sigma_px)).real


def crop_central_half(image) -> np.ndarray:
    """[..., N/4:3N/4, M/4:3M/4] (ORNL's crop, integer division)."""
    n, m = image.shape[-2], image.shape[-1]
    return image[..., n // 4:3 * n // 4, m // 4:3 * m // 4]


def zscore(image, what: str = "image") -> np.ndarray:
    """(image − mean) / std over the last two axes, float64; ValueError for a constant image (std 0)."""
    img = np.asarray(image, dtype=np.float64)
    mean = img.mean(axis=(-2, -1), keepdims=True)
    std = img.std(axis=(-2, -1), keepdims=True)
    flat = ~(np.isfinite(std) & (std > ZSCORE_RTOL * np.abs(mean)) & (std > 0))
    if flat.any():
        where = np.argwhere(flat.reshape(flat.shape[:-2]))
        first = f" (first at index {tuple(int(i) for i in where[0])})" if where.size else ""
        raise ValueError(f"cannot z-score a constant or non-finite {what}: std 0{first}, "
                         f"{int(flat.sum())} of {flat.size}")
    return (img - mean) / std


def zscore_patterns(cbed) -> np.ndarray:
    """Each pattern of a stack (..., S, S) z-scored on its own (ORNL: at write time), float64."""
    return zscore(cbed, what="CBED pattern")


def ornl_target(slices_V, sigma: float, sigma_px: float = SIGMA_PX) -> np.ndarray:
    """ORNL's recipe literally, on the slices' own grid (n, N, M) -> (N/2, M/2): mean of sin(σV), periodic
    Gaussian of sigma_px pixels, central half, z-score. Axes as given."""
    return zscore(crop_central_half(gaussian_filter_periodic(mean_sin_phase(slices_V, sigma), sigma_px)),
                  what="target")


def fourier_resample(image, extent_A, xs_A, ys_A, sigma_A: float = 0.0) -> np.ndarray:
    """The periodic image (Nx, Ny) on the cell [0, Lx) x [0, Ly) (index [i, j] at x = i·Lx/Nx, y = j·Ly/Ny),
    Gaussian filtered with sigma_A Å, evaluated at the points (xs_A[c], ys_A[r]): (len(ys), len(xs)),
    rows along y. Exact trigonometric interpolation (a point beyond the cell is its periodic image); an
    even axis's Nyquist term is taken as its cosine, the real interpolant that matches every sample."""
    img = np.asarray(image, dtype=np.float64)
    (nx, ny), (lx, ly) = img.shape, (float(extent_A[0]), float(extent_A[1]))
    spectrum = np.fft.fft2(img) * gaussian_transfer(img.shape, (sigma_A * nx / lx, sigma_A * ny / ly))
    fx, fy = np.fft.fftfreq(nx, d=lx / nx), np.fft.fftfreq(ny, d=ly / ny)  # 1/Å
    ex = np.exp(2j * np.pi * np.outer(np.asarray(xs_A, dtype=np.float64), fx))  # (X, Nx)
    ey = np.exp(2j * np.pi * np.outer(np.asarray(ys_A, dtype=np.float64), fy))  # (Y, Ny)
    return (ey @ (ex @ spectrum).T).real / (nx * ny)


def phase_image(slices_V, sigma: float, extent_A, xs_A, ys_A, sigma_px: float = SIGMA_PX) -> np.ndarray:
    """The target before its z-score, from one periodic cell's slices (n, Nx, Ny) in V·Å on [0, Lx) x
    [0, Ly) (`extent_A`), on an arbitrary square-pixel grid: mean of sin(σV), the periodic Gaussian of
    sigma_px pixels of the sample grid (xs_A's spacing), evaluated at (xs_A[c], ys_A[r]): (len(ys),
    len(xs)), rows along y, columns along x; unitless."""
    xs = np.asarray(xs_A, dtype=np.float64)
    pixel_A = float(xs[1] - xs[0]) if len(xs) > 1 else 0.0
    return fourier_resample(mean_sin_phase(slices_V, sigma), extent_A, xs, ys_A, sigma_A=sigma_px * pixel_A)


def target_image(slices_V, sigma: float, extent_A, xs_A, ys_A, sigma_px: float = SIGMA_PX) -> np.ndarray:
    """ORNL's target on an arbitrary grid: `phase_image`, z-scored."""
    return zscore(phase_image(slices_V, sigma, extent_A, xs_A, ys_A, sigma_px), what="target")
