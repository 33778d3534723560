"""Friedel asymmetry: its arithmetic, the one-threshold rule on it, and the dynamical study's figure."""

import numpy as np
import pytest

from stemdl.harness.errors import StemdlError
from stemdl.workloads.spacegroup import figures, friedel

TINY_GROUPS = (14, 62, 194, 225)  # the tiny preset's


def test_antisymmetric_part_and_asymmetry():
    rng = np.random.default_rng(0)
    x = rng.random((6, 6))
    odd = friedel.antisymmetric(x)
    np.testing.assert_allclose(odd, -odd[::-1, ::-1])
    np.testing.assert_allclose(x - odd, (x - odd)[::-1, ::-1])  # what is left keeps Friedel's law
    symmetric = x + x[::-1, ::-1]
    assert friedel.asymmetry(symmetric) == 0.0 and friedel.asymmetry(np.ones((4, 4))) == 0.0
    assert 0.0 < friedel.asymmetry(x) <= 2.0


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


def test_threshold_rule_and_its_pair_f1():
    low, high = np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.6, 0.7])
    assert friedel.threshold_rule(low, high) == (0.3, True)  # above 0.3: the second group
    assert friedel.threshold_rule(high, low) == (0.3, False)
    train = {1: low, 2: high}
    assert friedel.pair_f1(train, {1: np.array([0.15]), 2: np.array([0.65])}, (1, 2)) == 1.0
    assert friedel.pair_f1(train, {1: np.array([0.65]), 2: np.array([0.15])}, (1, 2)) == 0.0
    assert friedel.pair_f1(train, {1: low}, (1, 2)) is None


def test_asymmetry_of_the_synthetic_samples(tiny_data):
    values = friedel.sample_asymmetries(tiny_data, "train")
    assert sorted(values) == list(TINY_GROUPS) and sum(len(v) for v in values.values()) == 8
    assert all(0.0 < v < 2.0 for group in values.values() for v in group)  # noise and mistilt: above 0
