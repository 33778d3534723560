"""Electron scattering factors of neutral atoms, and the projected-potential constant that turns them
into volts.

The table is Lobato & Van Dyck (2014), five terms per element for H..Lr, read from
`resources/lobato_van_dyck_2014.csv` (its header says where the numbers come from). Their form is the
exact hydrogen-like one, so each element has the right Mott–Bethe tail f_e(q) -> Z / (2π² a₀ q²) at large
q, which the multislice needs up to the grid's edge; Doyle–Turner Gaussians (the kinematic simulator's
table) decay too fast there. q = |g| in 1/Å without 2π throughout.
"""

from __future__ import annotations

import csv
from functools import lru_cache
from importlib import resources

import numpy as np
import torch

from stemdl.physics.electrons import E_CHARGE, H_PLANCK, M_ELECTRON

_TABLE_FILE = "resources/lobato_van_dyck_2014.csv"
N_TERMS = 5

# h² / (2π m₀ e) in V·Å²: the factor between the electron scattering factor f_e (Å) and the Fourier
# transform of the atom's potential, V(q) = h²/(2π m₀ e) · f_e(q) (Kirkland 2010, ch. 5; the
# same constant is 2π a₀ e²/(4πε₀) = 2π · 0.5292 Å · 14.40 V·Å): 47.8776 with CODATA 2018.
H2_OVER_2PI_M0_E = H_PLANCK**2 / (2.0 * np.pi * M_ELECTRON * E_CHARGE) * 1e20
BOHR_RADIUS = 0.529177210903  # a₀ in Å (CODATA 2018), for the Mott–Bethe limit Z / (2π² a₀ q²)


@lru_cache(maxsize=1)
def _table() -> tuple[tuple[str, ...], np.ndarray]:
    """(symbols of Z = 1..Z_MAX, coefficients (Z_MAX + 1, 2, 5) = (a_i [Å], b_i [Å²]); row 0 unused)."""
    text = resources.files("stemdl.physics").joinpath(_TABLE_FILE).read_text()
    rows = list(csv.reader(line for line in text.splitlines() if line and not line.startswith("#")))
    header, body = rows[0], rows[1:]
    if header[:2] != ["Z", "symbol"] or len(header) != 2 + 2 * N_TERMS:
        raise ValueError(f"{_TABLE_FILE}: unexpected header {header}")
    coefficients = np.zeros((len(body) + 1, 2, N_TERMS))
    for z, row in enumerate(body, start=1):
        if int(row[0]) != z:
            raise ValueError(f"{_TABLE_FILE}: row {z} is for Z={row[0]}")
        coefficients[z] = np.asarray(row[2:], dtype=float).reshape(2, N_TERMS)
    coefficients.setflags(write=False)
    return tuple(row[1] for row in body), coefficients


def elements() -> tuple[str, ...]:
    """Element symbols covered by the table, index z - 1 for atomic number z (H..Lr)."""
    return _table()[0]


def z_max() -> int:
    return len(elements())


def atomic_number(z_or_symbol) -> int:
    """Atomic number of `z_or_symbol` (an int or a symbol such as 'Si'), checked against the table."""
    if isinstance(z_or_symbol, str):
        symbol = z_or_symbol.strip().capitalize()
        if symbol not in elements():
            raise ValueError(f"unknown element symbol {z_or_symbol!r}")
        return elements().index(symbol) + 1
    z = int(z_or_symbol)
    if not 1 <= z <= z_max():
        raise ValueError(f"no electron scattering factor for Z={z} (the table covers 1..{z_max()})")
    return z


def coefficients(z_or_symbol) -> np.ndarray:
    """Lobato–Van Dyck (a_i [Å], b_i [Å²]) of one element: (2, 5), read-only."""
    return _table()[1][atomic_number(z_or_symbol)]


def _lobato_sum(a, b, q2):
    """Σ_i a_i (2 + b_i q²) / (1 + b_i q²)²; a, b (..., 5) broadcast against q2 (..., 1)."""
    x = b * q2
    return (a * (2.0 + x) / (1.0 + x) ** 2).sum(-1)


def scattering_factor(z_or_symbol, q):
    """Electron scattering factor f_e(q) in Å of a neutral atom at q = |g| in 1/Å (no 2π).

    f_e(q) = Σ_{i=1..5} a_i (2 + b_i q²) / (1 + b_i q²)²   (Lobato & Van Dyck 2014)

    `q` may be a number, a numpy array (float64 result) or a torch tensor (result on its device, in its
    floating dtype; evaluated in float64: the published a_i cancel by two orders of magnitude, e.g.
    C: 124.5 − 220.4 + 195.2 − 98.1 ≈ 1.25).
    """
    if isinstance(q, torch.Tensor):
        return species_factors([z_or_symbol], q)[0]
    p = coefficients(z_or_symbol)
    q2 = np.asarray(q, dtype=float)[..., None] ** 2
    return _lobato_sum(p[0], p[1], q2)


def species_factors(zs, q: torch.Tensor) -> torch.Tensor:
    """f_e of every species in `zs` (S,) on the torch grid `q` (any shape): (S, *q.shape), in Å."""
    table = _table()[1][[atomic_number(z) for z in zs]]  # (S, 2, 5)
    wide = torch.float64  # the cancellation above; f_e is evaluated once per grid, so this is cheap
    p = torch.as_tensor(table, dtype=wide, device=q.device)
    q2 = q.to(wide).reshape(1, *q.shape, 1) ** 2
    shape = (len(zs),) + (1,) * q.dim() + (N_TERMS,)
    f = _lobato_sum(p[:, 0].reshape(shape), p[:, 1].reshape(shape), q2)
    return f.to(q.dtype if q.is_floating_point() else torch.get_default_dtype())


def fourier_projected_potential(z_or_symbol, q, debye_waller: float = 0.0):
    """Fourier transform of one atom's projected potential, V(q) = h²/(2π m₀ e) f_e(q) e^{-B q²/4},
    in V·Å³ (so that v_z(r) = ∫ V(q) e^{2πi q·r} d²q is in V·Å; Kirkland 2010, ch. 5).

    `debye_waller` is B in Å² (the factor is exp(-B s²) with s = q/2). numpy or torch like
    `scattering_factor`.
    """
    damping = (torch if isinstance(q, torch.Tensor) else np).exp(-debye_waller * q**2 / 4.0)
    return H2_OVER_2PI_M0_E * scattering_factor(z_or_symbol, q) * damping
