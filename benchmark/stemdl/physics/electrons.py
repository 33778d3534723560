"""The fast electron: relativistic wavelength, mass factor and interaction parameter.

The one home of these formulas for the package (the kinematic generator imports them from here). Plain
floats, no torch, so that code without a tensor in sight can use them. Energies in keV, λ in Å, σ in
rad/(V·Å). Constants: CODATA 2018 (h, e and c are exact in the SI since 2019; m₀ is measured).
"""

from __future__ import annotations

import math

H_PLANCK = 6.62607015e-34  # J s
M_ELECTRON = 9.1093837015e-31  # kg, rest mass m₀
E_CHARGE = 1.602176634e-19  # C
C_LIGHT = 299792458.0  # m/s
M0C2_KEV = M_ELECTRON * C_LIGHT**2 / E_CHARGE / 1e3  # 510.999 keV, rest energy


def gamma(energy_keV: float) -> float:
    """Relativistic mass factor γ = m/m₀ = 1 + E/(m₀c²) for an electron accelerated through E keV."""
    return 1.0 + float(energy_keV) / M0C2_KEV


def wavelength(energy_keV: float) -> float:
    """Relativistic wavelength λ = h / sqrt(2 m₀ e V (1 + eV / 2m₀c²)) in Å (Kirkland 2010, ch. 2).

    100 keV: 0.03701 Å, 200 keV: 0.02508 Å, 300 keV: 0.01969 Å.
    """
    e_joule = float(energy_keV) * 1e3 * E_CHARGE
    momentum = math.sqrt(2.0 * M_ELECTRON * e_joule * (1.0 + e_joule / (2.0 * M_ELECTRON * C_LIGHT**2)))
    return H_PLANCK / momentum * 1e10


def interaction_parameter(energy_keV: float) -> float:
    """σ = 2π m e λ / h² in rad/(V·Å), with the relativistic mass m = γ m₀ (Kirkland 2010, eq. 5.6).

    The phase a projected potential v (V·Å) gives the wave is σ v (the transmission function exp(iσv)).
    200 keV: 7.288e-4, 100 keV: 9.244e-4 rad/(V·Å), i.e. 0.729 and 0.924 rad/(kV·Å).
    """
    lam_m = wavelength(energy_keV) * 1e-10
    sigma_per_volt_metre = 2.0 * math.pi * gamma(energy_keV) * M_ELECTRON * E_CHARGE * lam_m / H_PLANCK**2
    return sigma_per_volt_metre * 1e-10  # 1/(V·m) -> 1/(V·Å)
