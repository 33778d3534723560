"""`stemdl simulate`: what it writes and prints, the detector's pixel convention checked on crystals whose
discs sit at known angles, and every user error as one line with exit status 2 and nothing written.

Pixel (i, j) is centred on ((j − S/2)·2A/S, (i − S/2)·2A/S) mrad, x along the projection of a, y = zone × x;
a disc of reflection g is centred on λ·(g·x̂, g·ŷ). Small grids, thin crystals: seconds on two cores.
"""

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter

from stemdl.cli import main
from stemdl.physics.electrons import wavelength

LAMBDA_200 = wavelength(200.0)  # Å
A_MRAD, SIZE = 16.0, 64  # detector half-width and pixels: 0.5 mrad a pixel
PIXEL_MRAD = 2 * A_MRAD / SIZE


def write_cif(folder, name, structure):
    path = folder / f"{name}.cif"
    CifWriter(structure).write_file(path)
    return path


@pytest.fixture(scope="module")
def cifs(tmp_path_factory):
    """CIF files: Si, GaAs, hcp Mg, a primitive orthorhombic lattice (a = 4 ≠ b = 6 Å), an oblique one
    (a = (4, 0, 0), b = (1, 5, 0), c = (0, 0, 3) Å: no mirror of its projection along c), and a C2/m
    crystal with β = 108° (no orthogonal cell along [001])."""
    folder = tmp_path_factory.mktemp("cif")
    structures = {
        "Si": Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.431), ["Si"], [[0, 0, 0]]),
        "GaAs": Structure.from_spacegroup("F-43m", Lattice.cubic(5.653), ["Ga", "As"], [[0, 0, 0], [0.25] * 3]),
        "Mg": Structure.from_spacegroup("P6_3/mmc", Lattice.hexagonal(3.209, 5.211), ["Mg"], [[1 / 3, 2 / 3, 0.25]]),
        "ortho": Structure(Lattice.orthorhombic(4.0, 6.0, 3.0), ["Si"], [[0, 0, 0]]),
        "oblique": Structure(Lattice([[4.0, 0, 0], [1.0, 5.0, 0], [0, 0, 3.0]]), ["Si"], [[0, 0, 0]]),
        "ortho2": Structure(Lattice.orthorhombic(4.0, 6.0, 3.0), ["Au", "C"], [[0, 0, 0], [0.5, 0, 0.5]]),
        "monoclinic": Structure.from_spacegroup("C2/m", Lattice.monoclinic(5.2, 3.6, 6.1, 108.0), ["Al", "O"],
                                                [[0.1, 0, 0.2], [0.3, 0, 0.6]]),
    }
    return {name: write_cif(folder, name, s) for name, s in structures.items()}


def cbed_args(cif, out, zone="0,0,1", thickness="30", semi_angle=1.5, size=SIZE, max_angle=A_MRAD, *extra):
    return ["simulate", "cbed", "--structure", str(cif), f"--zone={zone}", "--energy", "200",
            "--semi-angle", str(semi_angle), "--thickness", thickness, "--max-angle", str(max_angle),
            "--size", str(size), "--out", str(out), *extra]


def simulate_cbed(cif, tmp_path, **kw):
    out = tmp_path / "pattern.npy"
    assert main(cbed_args(cif, out, **kw)) == 0
    return np.load(out)


def disc_centre_px(theta_mrad):
    """(row, col) of the disc centred on the angle (θx, θy) mrad."""
    return SIZE / 2 + theta_mrad[1] / PIXEL_MRAD, SIZE / 2 + theta_mrad[0] / PIXEL_MRAD


def support_centroid(img, near, radius_px):
    """Centre (row, col) of the pixels within radius_px of `near` brighter than half the brightest there:
    the geometric centre of a disc, whatever its (slowly varying) dynamical contrast."""
    i, j = np.mgrid[:img.shape[0], :img.shape[1]]
    window = (i - near[0]) ** 2 + (j - near[1]) ** 2 <= radius_px**2
    lit = window & (img > 0.5 * img[window].max())
    return float(i[lit].mean()), float(j[lit].mean())


def disc_sum(img, centre, radius_px):
    i, j = np.mgrid[:img.shape[0], :img.shape[1]]
    return float(img[(i - centre[0]) ** 2 + (j - centre[1]) ** 2 <= radius_px**2].sum())


# ---- output and printed lines ---------------------------------------------------------------------------------

def test_cbed_writes_one_pattern_and_says_what_it_simulated(cifs, tmp_path, capsys):
    out = tmp_path / "si110.npy"
    assert main(cbed_args(cifs["Si"], out, zone="1,1,0", thickness="100", semi_angle=2, size=32, max_angle=20)) == 0
    lines = capsys.readouterr().out.splitlines()
    pattern = np.load(out)
    assert pattern.shape == (32, 32) and pattern.dtype == np.float32
    assert 0.5 < pattern.sum() <= 1.0 and pattern.min() >= 0.0  # fractions of the beam, some scattered out
    assert lines[0].startswith("plan: cell Si4 along [1 1 0]: 3.840 x 5.431 x 3.840 Å") and "exact" in lines[0]
    assert "slice(s) of 1.920 Å per cell" in lines[0]
    assert lines[1] == "thickness 100 Å asked: 26 x 3.840 Å = 99.8 Å simulated (whole cell repeats)"
    assert lines[2] == "simulating 1 probe position(s) on cpu in complex64 ..."
    assert lines[3].startswith(f"wrote {out}: float32 (32, 32), fraction of the beam on the detector 0.")
    assert [p.name for p in tmp_path.iterdir()] == ["si110.npy"]  # no temporary file left


def test_thickness_list_gives_the_stack_of_single_runs(cifs, tmp_path, capsys):
    """(T, S, S) in the order asked, each the pattern a run for that thickness alone writes (one pass
    through the crystal serves every thickness)."""
    stack = simulate_cbed(cifs["GaAs"], tmp_path, zone="1,1,0", thickness="120,40", semi_angle=2, size=32,
                          max_angle=20)
    thin = simulate_cbed(cifs["GaAs"], tmp_path / "..", zone="1,1,0", thickness="40", semi_angle=2, size=32,
                         max_angle=20)
    assert stack.shape == (2, 32, 32)
    np.testing.assert_allclose(stack[1], thin, atol=1e-7)
    assert not np.allclose(stack[0], stack[1], atol=1e-3)
    printed = capsys.readouterr().out
    assert "thickness 120 Å asked: 30 x 3.997 Å = 119.9 Å simulated" in printed
    assert "thickness 40 Å asked: 10 x 3.997 Å = 40.0 Å simulated" in printed


def test_scan_averages_over_probe_positions(cifs, tmp_path, capsys):
    out = tmp_path / "scan.npy"
    assert main(cbed_args(cifs["Si"], out, "1,1,0", "40", 2, 32, 20, "--scan", "2")) == 0
    captured = capsys.readouterr()
    assert "simulating 4 probe position(s)" in captured.out
    assert "simulate: 4/4 probes (100%)" in captured.err  # progress on stderr, a probe a chunk on a CPU
    assert np.load(out).shape == (32, 32)


def test_four_index_zone_is_the_three_index_one(cifs, tmp_path):
    """hcp [2 -1 -1 0] is [1 0 0] (supercell.three_index): the same potential either way."""
    images = []
    for zone in ("2,-1,-1,0", "1,0,0"):
        out = tmp_path / f"v{len(images)}.npy"
        assert main(["simulate", "potential", "--structure", str(cifs["Mg"]), f"--zone={zone}", "--size", "24",
                     "--out", str(out)]) == 0
        images.append(np.load(out))
    np.testing.assert_array_equal(images[0], images[1])


def test_potential_is_in_volt_angstrom_with_x_along_columns(cifs, tmp_path, capsys):
    """Orthorhombic Au at (0, 0) and C at (a/2, 0) along [001]: the mean of the image is the q = 0 Fourier
    term, h²/(2π m₀ e)·Σ f_e(0) / (a b) V·Å; the gold peak sits on pixel (0, 0) and the carbon one on
    row 0, column S/2 (x along columns), not on column 0, row S/2."""
    from stemdl.physics.parameters import fourier_projected_potential

    out = tmp_path / "v.npy"
    assert main(["simulate", "potential", "--structure", str(cifs["ortho2"]), "--zone", "0,0,1", "--size", "40",
                 "--out", str(out)]) == 0
    v = np.load(out)
    assert v.shape == (40, 40) and v.dtype == np.float32
    mean = (fourier_projected_potential("Au", 0.0) + fourier_projected_potential("C", 0.0)) / (4.0 * 6.0)
    assert v.mean() == pytest.approx(mean, rel=1e-4)
    assert np.unravel_index(np.argmax(v), v.shape) == (0, 0)
    assert v[0, 20] > 10 * v[20, 0]  # carbon's column, against a point between the atoms
    assert "in V·Å" in capsys.readouterr().out


# ---- the pixel convention, physically -------------------------------------------------------------------------

def test_discs_of_an_orthorhombic_crystal_tell_x_from_y(cifs, tmp_path):
    """a = 4 Å along x (columns), b = 6 Å along y (rows): the 100 disc at λ/a = 6.27 mrad right of the
    centre, the 010 disc at λ/b = 4.18 mrad below it, the optical axis on pixel (S/2, S/2). Discs of
    1 mrad (2 pixels) leave the gap between 010 and 020 dark, where 100 would be with x and y swapped."""
    img = simulate_cbed(cifs["ortho"], tmp_path, semi_angle=1.0)
    for g_xy in ((1 / 4.0, 0.0), (-1 / 4.0, 0.0), (0.0, 1 / 6.0), (0.0, -1 / 6.0), (0.0, 0.0)):
        expected = disc_centre_px(np.array(g_xy) * LAMBDA_200 * 1e3)
        found = support_centroid(img, expected, radius_px=4)
        assert found == pytest.approx(expected, abs=0.25), g_xy
    # x and y swapped would put a disc at (S/2 ± 12.5, S/2): there is only background there
    swapped = disc_centre_px((0.0, LAMBDA_200 / 4.0 * 1e3))
    assert disc_sum(img, swapped, 1) < 1e-3 * disc_sum(img, disc_centre_px((LAMBDA_200 / 4.0 * 1e3, 0)), 1)


@pytest.mark.parametrize("zone, y_sign", [("0,0,1", 1), ("0,0,-1", -1)])
def test_oblique_lattice_fixes_the_handedness(cifs, tmp_path, zone, y_sign):
    """a = (4, 0, 0), b = (1, 5, 0) Å: a* = (1/4, −1/20), b* = (0, 1/5) 1/Å. Along +c, y = c × x, so
    the 100 disc sits 1.25 mrad ABOVE the row of the centre (row S/2 − 2.5) and 010 below; reversing
    the zone flips y. A left-handed frame or transposed pixels would put 100 at row S/2 + 2.5, where
    this lattice has no reflection."""
    img = simulate_cbed(cifs["oblique"], tmp_path, zone=zone)
    for g_xy in ((1 / 4.0, -1 / 20.0), (0.0, 1 / 5.0), (1 / 4.0, 3 / 20.0)):
        theta = np.array([g_xy[0], y_sign * g_xy[1]]) * LAMBDA_200 * 1e3
        expected = disc_centre_px(theta)
        assert support_centroid(img, expected, radius_px=3) == pytest.approx(expected, abs=0.25), g_xy


def test_silicon_001_discs_where_the_reflections_are(cifs, tmp_path):
    """Si [001]: 220 discs on the diagonals at λ·2/a = 9.24 mrad per axis, 400 on the axes at 18.5 mrad;
    the 200 positions (forbidden: F = 0, and the allowed hk0 are closed under addition) stay dark."""
    img = simulate_cbed(cifs["Si"], tmp_path, thickness="50", size=80, max_angle=20.0)
    pixel = 2 * 20.0 / 80
    step = LAMBDA_200 / 5.431 * 1e3 / pixel  # pixels per unit of h/a

    def at(h, k):
        return 40 + k * step, 40 + h * step

    bright = [disc_sum(img, at(h, k), 3) for h, k in ((2, 2), (-2, 2), (2, -2), (-2, -2))]
    dark = [disc_sum(img, at(h, k), 3) for h, k in ((2, 0), (0, 2), (-2, 0), (0, -2))]
    assert min(bright) > 1e-3 and max(dark) < 1e-3 * min(bright)
    assert support_centroid(img, at(2, 2), 4) == pytest.approx(at(2, 2), abs=0.25)


# ---- errors: one line, exit 2, nothing written ----------------------------------------------------------------

def _error_cases():
    ok = dict(zone="1,1,0", thickness="50", semi_angle=2, size=32, max_angle=20)
    cases = {
        "missing CIF": ("missing", ok, [], "missing.cif"),
        "unreadable CIF": ("garbage", ok, [], "garbage.cif"),
        "zone syntax": ("Si", {**ok, "zone": "1,1"}, [], "--zone '1,1'"),
        "zone letters": ("Si", {**ok, "zone": "a,b,c"}, [], "--zone 'a,b,c'"),
        "zero zone": ("Si", {**ok, "zone": "0,0,0"}, [], "not all zero"),
        "bad four-index zone": ("Mg", {**ok, "zone": "1,1,1,0"}, [], "U + V + T must be 0"),
        "odd size": ("Si", {**ok, "size": 63}, [], "--size 63: must be even"),
        "tiny size": ("Si", {**ok, "size": 4}, [], "--size 4: must be at least"),
        "zero thickness": ("Si", {**ok, "thickness": "0"}, [], "--thickness '0'"),
        "negative thickness in a list": ("Si", {**ok, "thickness": "100,-5"}, [], "--thickness '100,-5'"),
        "zero semi-angle": ("Si", {**ok, "semi_angle": 0}, [], "--semi-angle 0: must be a positive number of mrad"),
        "negative max angle": ("Si", {**ok, "max_angle": -20}, [], "--max-angle -20: must be a positive"),
        "negative energy": ("Si", ok, ["--energy", "-200"], "--energy -200: must be a positive number of keV"),
        "semi-angle beyond the grid": ("Si", {**ok, "semi_angle": 400}, [], "beyond the grid's bandwidth limit"),
        "no orthogonal cell": ("monoclinic", {**ok, "zone": "0,0,1"}, ["--max-strain", "1e-6"],
                               "no orthogonal supercell along [0 0 1]"),
        "zero slice": ("Si", ok, ["--slice", "0"], "--slice 0"),
        "not npy": ("Si", ok, ["--out-name", "pattern.txt"], "must end in .npy"),
    }
    if not torch.cuda.is_available():
        cases["cuda without CUDA"] = ("Si", ok, ["--device", "cuda"], "no CUDA device")
    return cases


ERRORS = _error_cases()


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_errors_are_one_line_and_write_nothing(cifs, tmp_path, capsys, case):
    name, kw, extra, message = ERRORS[case]
    garbage = tmp_path / "garbage.cif"
    garbage.write_text("this is not a CIF\n")
    cif = {"missing": tmp_path / "missing.cif", "garbage": garbage}.get(name) or cifs[name]
    if "--out-name" in extra:
        extra = []
        out = tmp_path / "pattern.txt"
    else:
        out = tmp_path / "out" / "pattern.npy"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(cbed_args(cif, out, kw["zone"], kw["thickness"], kw["semi_angle"], kw["size"], kw["max_angle"],
                          *extra)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("stemdl simulate: error: ")
    assert message in captured.err and "Traceback" not in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # not even the --out folder


def test_potential_errors_are_one_line(cifs, tmp_path, capsys):
    out = tmp_path / "v.npy"
    for args, message in (((str(tmp_path / "nope.cif"), "1,1,0", "32"), "nope.cif"),
                          ((str(cifs["Si"]), "0,0,0", "32"), "not all zero"),
                          ((str(cifs["Si"]), "1,1,0", "2"), "--size 2")):
        assert main(["simulate", "potential", "--structure", args[0], f"--zone={args[1]}", "--size", args[2],
                     "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    assert not out.exists()


def test_existing_out_is_kept_unless_forced(cifs, tmp_path, capsys):
    out = tmp_path / "mine.npy"
    out.write_bytes(b"a user's own file")
    args = cbed_args(cifs["Si"], out, "1,1,0", "40", 2, 32, 20)
    assert main(args) == 2
    assert "exists (use --force to replace it)" in capsys.readouterr().err
    assert out.read_bytes() == b"a user's own file"
    assert main(args + ["--force"]) == 0
    assert np.load(out).shape == (32, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.npy"]


def test_out_appearing_during_the_run_is_not_replaced(cifs, tmp_path, monkeypatch, capsys):
    """The check before the work is repeated by the rename itself (a hard link fails on an existing name):
    a file someone writes while the simulation runs survives."""
    from stemdl.physics import simulate

    out = tmp_path / "race.npy"
    real = simulate.cbed

    def cbed_then_someone_writes(*args, **kwargs):
        result = real(*args, **kwargs)
        out.write_bytes(b"written meanwhile")
        return result

    monkeypatch.setattr(simulate, "cbed", cbed_then_someone_writes)
    assert main(cbed_args(cifs["Si"], out, "1,1,0", "40", 2, 32, 20)) == 2
    assert out.read_bytes() == b"written meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race.npy"]
