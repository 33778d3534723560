"""The dynamical study's figure: Friedel asymmetry arithmetic, the figure from two renderings, its errors."""

import numpy as np
import pytest

from stemdl.harness.errors import StemdlError
from stemdl.workloads.spacegroup import figures

TINY_GROUPS = (14, 62, 194, 225)  # the tiny preset's


def test_antisymmetric_part_and_asymmetry():
    rng = np.random.default_rng(0)
    x = rng.random((6, 6))
    odd = figures.antisymmetric(x)
    np.testing.assert_allclose(odd, -odd[::-1, ::-1])
    np.testing.assert_allclose(x - odd, (x - odd)[::-1, ::-1])  # what is left keeps Friedel's law
    symmetric = x + x[::-1, ::-1]
    assert figures.asymmetry(symmetric) == 0.0 and figures.asymmetry(np.ones((4, 4))) == 0.0
    assert 0.0 < figures.asymmetry(x) <= 2.0


def test_figure_of_two_renderings_of_one_seed(tiny_data, tmp_path, capsys):
    data = tmp_path / "pairs"
    data.mkdir()
    for kind in ("kinematic", "multislice"):  # the wiring only: the same set stands for both renderings
        (data / kind).symlink_to(tiny_data, target_is_directory=True)
    out = tmp_path / "fig" / "friedel.png"
    figures.friedel_figure(out, data, groups=TINY_GROUPS)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and capsys.readouterr().out.strip() == str(out)


def test_figure_errors_name_the_folder(tiny_data, tmp_path):
    with pytest.raises(StemdlError, match="no .h5 files"):
        figures.friedel_figure(tmp_path / "f.png", tmp_path, groups=TINY_GROUPS)
    data = tmp_path / "pairs"
    data.mkdir()
    for kind in ("kinematic", "multislice"):
        (data / kind).symlink_to(tiny_data, target_is_directory=True)
    with pytest.raises(StemdlError, match=r"no sample of space group\(s\) \[2\]"):
        figures.friedel_figure(tmp_path / "f.png", data, groups=(14, 2))
    assert not (tmp_path / "f.png").exists()
