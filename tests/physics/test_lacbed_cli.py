"""`stemdl lacbed simulate`: Bloch waves and multislice give one pattern on a crystal no other test uses
(fluorite CaF2), the potential input image beside it, and user errors as one line with nothing written."""

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter

from stemdl.cli import main
from stemdl.physics import bloch

SIZE = 16


@pytest.fixture(scope="module")
def fluorite(tmp_path_factory):
    path = tmp_path_factory.mktemp("cif") / "CaF2.cif"
    crystal = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.4626), ["Ca", "F"], [[0, 0, 0], [0.25] * 3])
    CifWriter(crystal).write_file(path)
    return path


def simulate(cif, out, *extra):
    return main(["lacbed", "simulate", "--structure", str(cif), "--size", str(SIZE), "--out", str(out), *extra])


def test_bloch_and_multislice_agree_on_an_unseen_crystal(fluorite, tmp_path, capsys):
    """ZNCC >= 0.99 at 500 and 1000 Å with 200 beams against 1 Å slices to 4 1/Å (the settings of the
    MgO row of test_bloch; docs/physics.md has the defaults' figures)."""
    ms, blo = tmp_path / "ms.npy", tmp_path / "bloch.npy"
    assert simulate(fluorite, ms, "--thickness", "500,1000", "--method", "multislice", "--slice", "1",
                    "--k-max", "4") == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "lacbed simulate: 256/256 directions (100%)" in captured.err, "progress on stderr"
    reached = [float(line.split(", ")[1].split(" Å")[0]) for line in printed.splitlines()
               if line.startswith("thickness")]
    assert len(reached) == 2 and abs(reached[0] - 500) < 1 and abs(reached[1] - 1000) < 1
    assert simulate(fluorite, blo, "--thickness", ",".join(f"{t:.4f}" for t in reached), "--beams", "200",
                    "--potential-out", str(tmp_path / "v.npy")) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "beams: " in printed and "over ±" in printed and "distinct directions (100%)" in captured.err
    a, b = np.load(blo), np.load(ms)
    assert a.shape == b.shape == (2, SIZE, SIZE) and a.dtype == np.float32
    assert np.all(bloch.zncc(a, b) >= 0.99), bloch.zncc(a, b)
    assert 0 < a.mean() < 1
    v = np.load(tmp_path / "v.npy")
    assert v.shape == (SIZE, SIZE) and v.dtype == np.float32 and v.mean() > 0  # V·Å (band-limited: rings below 0)
    assert np.argmax(v) == 0 and v[0, 0] > 2 * v[2, 2], "a Ca column at the cell's origin, nothing between columns"


@pytest.mark.parametrize("extra, words", [
    (["--thickness", "-5"], "--thickness '-5': expected positive numbers"),
    (["--thickness", "100", "--beams", "1"], "--beams 1: must be at least 2"),
    (["--thickness", "100", "--energy", "0"], "--energy 0: must be a positive number of keV"),
    (["--thickness", "100", "--debye-waller", "-1"], "--debye-waller -1: must be 0 or more"),
])
def test_bad_arguments_are_one_line_and_write_nothing(fluorite, tmp_path, capsys, extra, words):
    out = tmp_path / "p.npy"
    assert simulate(fluorite, out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err and not out.exists()


def test_an_existing_output_is_kept(fluorite, tmp_path, capsys):
    out = tmp_path / "p.npy"
    out.write_bytes(b"mine")
    assert simulate(fluorite, out, "--thickness", "100") == 2
    assert "exists (use --force" in capsys.readouterr().err and out.read_bytes() == b"mine"
    assert simulate(fluorite, tmp_path / "q.npy", "--thickness", "100", "--potential-out", str(tmp_path / "q.npy")) == 2
    assert "the same file as --out" in capsys.readouterr().err and not (tmp_path / "q.npy").exists()
