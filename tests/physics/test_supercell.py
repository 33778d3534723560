"""Orthogonal supercells for a zone axis: sizes of textbook cases, the beam frame, and that the cell is the
crystal (same density, every atom an atom of the crystal)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter

from stemdl.physics.supercell import (
    beam_axes,
    crystal_arrays,
    lattice_translations,
    load_structure,
    orthogonal_supercell,
    three_index,
    tile,
)

A_SI, A_GAAS = 5.431, 5.653
A_MG, C_MG = 3.209, 5.211


@pytest.fixture(scope="module")
def mg():
    """hcp Mg, P6_3/mmc, 2 atoms."""
    lattice = Lattice.hexagonal(A_MG, C_MG)
    return Structure.from_spacegroup("P6_3/mmc", lattice, ["Mg"], [[1 / 3, 2 / 3, 0.25]])


@pytest.fixture(scope="module")
def monoclinic():
    """A C2/m crystal with β = 108°: no lattice vector is exactly normal to c."""
    lattice = Lattice.monoclinic(5.2, 3.6, 6.1, 108.0)
    return Structure.from_spacegroup("C2/m", lattice, ["Al", "O"], [[0.1, 0, 0.2], [0.3, 0, 0.6]])


def test_si_001_is_the_cubic_cell(si):
    cell = orthogonal_supercell(si, [0, 0, 1])
    assert cell.extent == pytest.approx((A_SI,) * 3)
    assert len(cell.numbers) == 8 and cell.strain == 0.0


def test_si_110_uses_the_fcc_repeat(si):
    """[110]: Lz = a/√2 (the centring translation (a+b)/2), x along [1-10] (a's projection), y = -c."""
    cell = orthogonal_supercell(si, [1, 1, 0])
    assert cell.extent == pytest.approx((A_SI / math.sqrt(2), A_SI, A_SI / math.sqrt(2)))
    assert len(cell.numbers) == 4 and cell.strain == 0.0
    np.testing.assert_allclose(cell.cell_vectors, [[0.5, -0.5, 0], [0, 0, -1], [0.5, 0.5, 0]])
    assert "Si4 along [1 1 0]" in cell.describe() and "exact" in cell.describe()


def test_si_111_is_exact(si):
    """[111]: x along [2-1-1] (a√6/2), y along [01-1] (a/√2), z = a√3 (three {111} layers, ABC)."""
    cell = orthogonal_supercell(si, [1, 1, 1])
    expected = (A_SI * math.sqrt(6) / 2, A_SI / math.sqrt(2), A_SI * math.sqrt(3))
    assert cell.extent == pytest.approx(expected)
    assert len(cell.numbers) == 12 and cell.strain == 0.0


def test_zinc_blende_110_keeps_both_species(gaas):
    cell = orthogonal_supercell(gaas, [1, 1, 0])
    assert cell.extent == pytest.approx((A_GAAS / math.sqrt(2), A_GAAS, A_GAAS / math.sqrt(2)))
    assert sorted(cell.numbers) == [31, 31, 33, 33]


def test_hexagonal_0001(mg):
    """[0001]: x = a, y along a + 2b (a√3), z = c; the four-index form is accepted."""
    cell = orthogonal_supercell(mg, [0, 0, 0, 1])
    assert cell.zone == (0, 0, 1)
    assert cell.extent == pytest.approx((A_MG, A_MG * math.sqrt(3), C_MG))
    assert len(cell.numbers) == 4 and cell.strain == 0.0


def test_hexagonal_2_1_1_0_is_100(mg):
    """[2-1-10] = [100]: a lies along the zone, so x is b's projection (along a + 2b), y = c."""
    cell = orthogonal_supercell(mg, [2, -1, -1, 0])
    assert cell.zone == (1, 0, 0)
    assert cell.extent == pytest.approx((A_MG * math.sqrt(3), C_MG, A_MG))
    assert cell.strain == 0.0


def test_oblique_zone_reports_its_strain(monoclinic):
    """Along [101] of the monoclinic crystal no cell is exactly rectangular: one within 5e-3 is found,
    strained, and the strain is reported."""
    cell = orthogonal_supercell(monoclinic, [1, 0, 1], max_strain=5e-3)
    assert 0.0 < cell.strain <= 5e-3
    assert "strain" in cell.describe()


def test_oblique_zone_without_a_cell_raises_clearly(monoclinic):
    with pytest.raises(ValueError, match=r"along \[0 0 1\] within max_strain=1e-06 .* strain of \d"):
        orthogonal_supercell(monoclinic, [0, 0, 1], max_strain=1e-6, max_repeat=3)


CASES = [("si", (0, 0, 1)), ("si", (1, 1, 0)), ("si", (1, 1, 1)), ("si", (1, 1, 2)), ("gaas", (1, 1, 0)),
         ("mg", (0, 0, 1)), ("mg", (1, 0, 0)), ("mg", (1, 1, 0)), ("monoclinic", (1, 0, 1))]


@pytest.mark.parametrize("name, zone", CASES)
def test_number_density_is_the_crystals(request, name, zone):
    """Atoms per Å³ as in the crystal (to the strain: volume changes by at most 3·strain)."""
    structure = request.getfixturevalue(name)
    cell = orthogonal_supercell(structure, zone, max_strain=5e-3)
    assert len(cell.numbers) / cell.volume == pytest.approx(len(structure) / structure.volume,
                                                            rel=3 * cell.strain + 1e-9)
    assert np.all(cell.positions >= 0) and np.all(cell.positions < np.array(cell.extent))


@pytest.mark.parametrize("name, zone", [c for c in CASES if c[0] != "monoclinic"])
def test_every_atom_is_an_atom_of_the_crystal(request, name, zone):
    """Undo the beam-frame rotation: each supercell atom sits on a crystal site of its species; none is
    listed twice, and there are as many as lattice cells fit (the crystal's atoms times the cell's volume
    in input cells)."""
    structure = request.getfixturevalue(name)
    lattice, frac, numbers = crystal_arrays(structure)
    cell = orthogonal_supercell(structure, zone)
    back = cell.positions @ beam_axes(lattice, zone) @ np.linalg.inv(lattice)  # fractional in the crystal
    diff = back[:, None, :] - frac[None, :, :]
    dist = np.linalg.norm((diff - np.rint(diff)) @ lattice, axis=-1)
    dist[cell.numbers[:, None] != numbers[None, :]] = np.inf
    assert dist.min(axis=1).max() < 1e-6
    assert len(cell.numbers) == pytest.approx(len(structure) * abs(np.linalg.det(cell.cell_vectors)))
    pair = cell.positions[:, None] - cell.positions[None]
    pair -= np.rint(pair / cell.extent) * cell.extent
    assert np.linalg.norm(pair, axis=-1)[~np.eye(len(pair), dtype=bool)].min() > 1.0


@pytest.mark.parametrize("name, zone", CASES)
def test_beam_frame_convention(request, name, zone):
    """z along the zone; x along a's projection (positive), a in the xz plane; y = z × x."""
    structure = request.getfixturevalue(name)
    lattice = structure.lattice.matrix
    axes = beam_axes(lattice, zone)
    assert np.linalg.det(axes) == pytest.approx(1.0)
    np.testing.assert_allclose(axes @ axes.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.cross(axes[0], axes[1]), axes[2], atol=1e-12)
    zone_cart = np.asarray(zone, dtype=float) @ lattice
    assert zone_cart @ axes[2] == pytest.approx(np.linalg.norm(zone_cart))
    a = lattice[0] if np.linalg.norm(np.cross(lattice[0], zone_cart)) > 1e-6 else lattice[1]
    assert a @ axes[0] > 0 and a @ axes[1] == pytest.approx(0.0, abs=1e-9)
    cell = orthogonal_supercell(structure, zone, max_strain=5e-3)
    edges = cell.cell_vectors @ lattice  # each cell edge lies along its axis, pointing forwards
    assert np.all(np.einsum("ij,ij->i", edges, axes) > 0)
    assert np.abs(edges @ axes.T - np.diag(np.diag(edges @ axes.T))).max() <= 5e-3 * np.abs(edges).max()


def test_tile_and_min_extent(si):
    cell = orthogonal_supercell(si, [1, 1, 0])
    tiled = tile(cell, 3, 2)
    assert tiled.extent == pytest.approx((3 * cell.extent[0], 2 * cell.extent[1], cell.extent[2]))
    assert len(tiled.numbers) == 6 * len(cell.numbers)
    assert np.all(tiled.positions < np.array(tiled.extent)) and np.all(tiled.positions >= 0)
    np.testing.assert_allclose(tiled.cell_vectors[0], 3 * cell.cell_vectors[0])
    wide = orthogonal_supercell(si, [1, 1, 0], min_extent=20.0)
    assert min(wide.extent[:2]) >= 20.0 and wide.extent[0] < 20.0 + cell.extent[0]
    with pytest.raises(ValueError):
        tile(cell, 0, 1)


def test_translations_of_centred_cells(si, mg):
    assert len(lattice_translations(*crystal_arrays(si))) == 4  # F
    assert len(lattice_translations(*crystal_arrays(mg))) == 1  # P


def test_three_index():
    assert three_index([2, 2, 0]) == (1, 1, 0)
    assert three_index([1, 1, -2, 0]) == (1, 1, 0)
    with pytest.raises(ValueError):
        three_index([0, 0, 0])
    with pytest.raises(ValueError):
        three_index([1, 1, 1, 0])


def test_plain_arrays_are_accepted(si):
    """Anything with lattice, frac_coords and numbers arrays (the synthetic generator's Structure)."""
    plain = SimpleNamespace(lattice=si.lattice.matrix, frac_coords=si.frac_coords,
                            numbers=np.array(si.atomic_numbers))
    expected = orthogonal_supercell(si, [1, 1, 0]).extent
    assert orthogonal_supercell(plain, [1, 1, 0]).extent == pytest.approx(expected)


def test_load_structure_round_trip(tmp_path, gaas):
    path = tmp_path / "gaas.cif"
    CifWriter(gaas).write_file(path)
    loaded = load_structure(path)
    assert loaded.composition == gaas.composition
    assert orthogonal_supercell(Structure.from_file(path), [1, 1, 0]).extent == pytest.approx(
        orthogonal_supercell(loaded, [1, 1, 0]).extent)


def test_load_structure_errors_name_the_file(tmp_path):
    with pytest.raises(OSError, match="missing.cif"):
        load_structure(tmp_path / "missing.cif")
    bad = tmp_path / "bad.cif"
    bad.write_text("this is not a CIF\n")
    with pytest.raises(ValueError, match="bad.cif"):
        load_structure(bad)
