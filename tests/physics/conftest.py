"""Crystals the physics tests share: textbook structures built with pymatgen (lattice constants in Å)."""

import pytest
from pymatgen.core import Lattice, Structure

A_SI, A_GAAS = 5.431, 5.653  # room-temperature lattice constants (Å)


@pytest.fixture(scope="session")
def si():
    """Diamond-structure Si, Fd-3m: centrosymmetric."""
    return Structure.from_spacegroup("Fd-3m", Lattice.cubic(A_SI), ["Si"], [[0, 0, 0]])


@pytest.fixture(scope="session")
def gaas():
    """Zinc-blende GaAs, F-43m: no centre of symmetry."""
    return Structure.from_spacegroup("F-43m", Lattice.cubic(A_GAAS), ["Ga", "As"], [[0, 0, 0], [0.25] * 3])
