"""`stemdl eda`: the report's numbers against hand computations, numpy and sklearn; its files and refusals."""

import argparse
import json
import math

import h5py
import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from stemdl import cli
from stemdl.workloads.spacegroup import eda
from stemdl.workloads.spacegroup.data.index import load_or_build
from stemdl.workloads.spacegroup.data.reader import DataFile
from stemdl.workloads.spacegroup.eda.patterns import chunk_bounds, n_components
from stemdl.workloads.spacegroup.eda.stats import crystal_system, draw, fair_shares, imbalance, system_codes
from stemdl.harness.errors import DataError, StemdlError
from stemdl.workloads.spacegroup.preprocess import Preprocess

SIZE = 32  # smaller than the default 64: the same code, a quarter of the pixels


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    # The fixture folder is read-only: its index goes to the cache, which must not be the user's home.
    monkeypatch.setenv("STEMDL_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def no_render(monkeypatch):
    """Figures built but not rasterized: for tests of numbers (the report tests render every figure)."""
    monkeypatch.setattr(eda.report.fg, "png", lambda fig: b"\x89PNG (not rendered)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny synthetic set: 16 samples of space groups 14, 62, 194, 225 (4 crystal systems) at 128x128."""
    out = tmp_path_factory.mktemp("eda") / "tiny"
    assert cli.main(["synth", str(out), "--preset", "tiny", "--quiet"]) == 0
    return out


def run_eda(data, out, *extra) -> int:
    parser = argparse.ArgumentParser()
    eda.configure(parser)
    return eda.run(parser.parse_args([str(data), "--out", str(out), "--quiet", "--workers", "1",
                                      "--size", str(SIZE), *map(str, extra)]))


@pytest.fixture(scope="module")
def tiny_report(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("eda") / "report"
    assert run_eda(tiny, out) == 0
    return out


def preprocessed(data) -> tuple[np.ndarray, np.ndarray]:
    """(patterns (n, 3, S, S), space groups) of every sample, through the harness's preprocessing."""
    index = load_or_build(data, workers=1, quiet=True)
    prep = Preprocess(size=SIZE)
    stacks = []
    for i in range(len(index)):
        with DataFile(index.file_path(i)) as f:
            stacks.append(prep(torch.from_numpy(f.stack(index.group_name(i)))).numpy())
    return np.stack(stacks), index.label.astype(int)


def report_of(out) -> tuple[dict, dict]:
    with np.load(out / "eda_patterns.npz") as z:
        arrays = dict(z)
    return json.loads((out / "eda.json").read_text()), arrays


# ---- the numbers ----------------------------------------------------------------------------------------

def test_crystal_systems_follow_the_international_tables():
    edges = {1: "triclinic", 2: "triclinic", 3: "monoclinic", 15: "monoclinic", 16: "orthorhombic",
             74: "orthorhombic", 75: "tetragonal", 142: "tetragonal", 143: "trigonal", 167: "trigonal",
             168: "hexagonal", 194: "hexagonal", 195: "cubic", 230: "cubic"}
    assert {g: crystal_system(g) for g in edges} == edges
    for bad in (0, 231):
        with pytest.raises(ValueError):
            system_codes([bad])


def test_imbalance_equals_a_hand_computation():
    counts = np.zeros(231, int)
    counts[1:13] = np.arange(1, 13)  # 12 classes of 1..12 samples, 78 in all
    imb = imbalance(counts)
    p = np.arange(1, 13) / 78
    assert (imb.samples, imb.classes, imb.largest, imb.smallest) == (78, 12, 12, 1)
    assert imb.max_min_ratio == 12.0
    assert imb.top10_share == pytest.approx((78 - 1 - 2) / 78)
    assert imb.effective_classes == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)))
    balanced = imbalance([0, 5, 5, 5, 0])
    assert balanced.effective_classes == pytest.approx(3.0) and balanced.max_min_ratio == 1.0
    assert imbalance([0, 0]).classes == 0


def test_draw_gives_each_crystal_system_a_fair_share_reproducibly():
    assert fair_shares([1, 10, 10], 9).tolist() == [1, 4, 4]
    assert fair_shares([5, 5], 3).tolist() == [2, 1] and fair_shares([2, 3], 99).tolist() == [2, 3]
    codes = np.repeat([0, 3, 6], [2, 50, 100])
    picked = draw(codes, 30, seed=1)
    assert np.bincount(codes[picked], minlength=7)[[0, 3, 6]].tolist() == [2, 14, 14]
    assert np.all(np.diff(picked) > 0) and np.array_equal(picked, draw(codes, 30, seed=1))
    assert not np.array_equal(picked, draw(codes, 30, seed=2))
    uniform = draw(codes, 30, seed=1, how="uniform")
    assert len(uniform) == 30 and len(np.unique(uniform)) == 30
    assert np.array_equal(draw(codes, 500, seed=0), np.arange(len(codes)))
    with pytest.raises(StemdlError, match="--draw"):
        draw(codes, 3, seed=0, how="random")


def test_pca_chunks_hold_enough_rows_and_components_are_capped():
    for n, chunk, k in [(48, 10, 10), (100, 7, 3), (5, 1024, 4), (2049, 1024, 10)]:
        bounds = chunk_bounds(n, chunk, k)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert all(hi - lo >= k for lo, hi in bounds)
    assert n_components(10, rows=9, features=4096) == 8 and n_components(10, 1, 4) == 0


# ---- reports --------------------------------------------------------------------------------------------

def test_fixture_report(fixture_dir, tmp_path, capsys):
    out = tmp_path / "fx"
    assert run_eda(fixture_dir, out) == 0
    assert "3 samples in 2 files" in capsys.readouterr().out
    doc, arrays = report_of(out)
    md = (out / "report.md").read_text()
    figures = sorted(p.name for p in out.glob("*.png"))
    assert figures and all(f"]({name})" in md for name in figures)
    assert set(doc["figures"]) == set(figures)
    assert doc["splits"]["train"]["space_groups"] == {"63": 1, "196": 1} and doc["all"]["samples"] == 3
    assert list(doc["lattice"]) == ["orthorhombic", "cubic"]  # systems without samples are left out
    assert arrays["systems"].tolist() == ["orthorhombic", "cubic"]
    ratio = np.array(doc["pca"]["explained_variance_ratio"])
    assert len(ratio) == 8, "9 patterns allow 8 components after centring"
    assert np.all((ratio > 0) & (ratio <= 1)) and np.all(np.diff(ratio) <= 0)
    assert not list(tmp_path.glob(".fx*")), "no temporary folder left"


def test_counts_and_imbalance_equal_the_index(tiny, tiny_report):
    doc, _ = report_of(tiny_report)
    index = load_or_build(tiny, workers=1, quiet=True)
    for split in ("train", "dev", "test"):
        counts = index.class_counts(split)
        block = doc["splits"][split]
        assert block["samples"] == len(index.select(split)) == counts.sum()
        assert block["space_groups"] == {str(g): int(counts[g]) for g in np.flatnonzero(counts)}
    assert doc["all"]["samples"] == len(index) == 16
    # 4 space groups of 4 samples each: balanced, so exactly 4 effective classes.
    imb = doc["all"]["imbalance"]
    assert (imb["classes"], imb["max_min_ratio"], imb["top10_share"]) == (4, 1.0, 1.0)
    assert imb["effective_classes"] == pytest.approx(4.0)
    assert doc["splits"]["train"]["crystal_systems"] == {"monoclinic": 2, "orthorhombic": 2, "hexagonal": 2,
                                                         "cubic": 2}


def test_mean_and_variance_patterns_equal_numpy(tiny, tiny_report):
    _, arrays = report_of(tiny_report)
    patterns, labels = preprocessed(tiny)
    systems = np.array([crystal_system(g) for g in labels])
    for k, name in enumerate(arrays["systems"]):
        mine = patterns[systems == name]  # (samples, 3, S, S): the mean is over samples and the 3 patterns
        np.testing.assert_allclose(arrays["mean"][k], mine.mean(axis=(0, 1)), atol=1e-4)
        np.testing.assert_allclose(arrays["var"][k], mine.var(axis=(0, 1)), rtol=1e-4, atol=1e-3)
        assert arrays["patterns"][k] == 3 * len(mine)


def test_pca_in_one_chunk_equals_sklearn_pca(tiny, tiny_report):
    doc, arrays = report_of(tiny_report)
    ratio = np.array(doc["pca"]["explained_variance_ratio"])
    assert doc["pca"]["chunks"] == 1 and len(ratio) == 10
    assert np.all((ratio > 0) & (ratio <= 1)) and np.all(np.diff(ratio) <= 0)
    rows = preprocessed(tiny)[0].reshape(-1, SIZE * SIZE).astype(np.float64)
    np.testing.assert_allclose(ratio, PCA(n_components=len(ratio)).fit(rows).explained_variance_ratio_, atol=1e-3)
    assert arrays["pca_coords"].shape == (48, 2) and arrays["pca_components"].shape == (10, SIZE, SIZE)


def test_many_chunks_and_two_workers(tiny, tiny_report, tmp_path, no_render):
    out = tmp_path / "chunked"
    assert run_eda(tiny, out, "--chunk", 12, "--components", 5, "--workers", 2) == 0
    doc, arrays = report_of(out)
    ref, ref_arrays = report_of(tiny_report)
    # 48 rows, 10 components tracked for 5: 12, 12, 12, and the last 12 (alone too few for 10 components)
    assert (doc["pca"]["chunks"], doc["pca"]["tracked"], doc["pca"]["n_components"]) == (4, 10, 5)
    ratio = np.array(doc["pca"]["explained_variance_ratio"])
    assert np.all((ratio > 0) & (ratio <= 1)) and np.all(np.diff(ratio) <= 0)
    # Workers finishing in any order must not change what was read, nor where it went.
    assert doc["splits"] == ref["splits"] and doc["lattice"] == ref["lattice"]
    np.testing.assert_array_equal(arrays["mean"], ref_arrays["mean"])


def test_max_samples_limits_the_pattern_pass(tiny, tmp_path, monkeypatch, no_render):
    read = []
    real = DataFile.stack
    monkeypatch.setattr(DataFile, "stack", lambda self, group, out=None: read.append(group) or real(self, group, out))
    out = tmp_path / "few"
    assert run_eda(tiny, out, "--max-samples", 8, "--seed", 3) == 0
    doc, arrays = report_of(out)
    assert len(read) == 8 and doc["patterns"]["samples"] == 8 and len(arrays["picked"]) == 8
    assert {s["samples"] for s in doc["patterns"]["per_crystal_system"].values()} == {2}, "stratified: 2 each"
    assert doc["all"]["samples"] == 16 and sum(v["a"]["n"] for v in doc["lattice"].values()) == 16
    assert arrays["pca_coords"].shape == (24, 2)


def test_single_split_without_patterns(copy_fixture, tmp_path, no_render):
    data = copy_fixture(tmp_path / "data")
    (data / "dev" / "batch_dev_0.h5").unlink()
    out = tmp_path / "out"
    assert run_eda(data, out, "--max-samples", 0) == 0
    doc = json.loads((out / "eda.json").read_text())
    assert list(doc["splits"]) == ["train"] and doc["patterns"] is None and "skipped" in doc["pca"]
    assert sorted(p.name for p in out.glob("*.png")) == ["crystal_systems.png", "lattice.png", "space_groups.png"]
    assert not (out / "eda_patterns.npz").exists() and "No PCA" in (out / "report.md").read_text()


# ---- refusals -------------------------------------------------------------------------------------------

def test_existing_folder_is_refused_unless_force(fixture_dir, tmp_path, no_render):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "eda.json").write_text("stale")
    with pytest.raises(StemdlError, match="not empty; use --force"):
        run_eda(fixture_dir, out, "--max-samples", 0)
    assert sorted(p.name for p in out.iterdir()) == ["eda.json", "notes.txt"]
    assert run_eda(fixture_dir, out, "--max-samples", 0, "--force") == 0
    assert (out / "notes.txt").read_text() == "mine" and json.loads((out / "eda.json").read_text())["all"]
    assert (out / "report.md").is_file()
    (tmp_path / "file").write_text("")
    with pytest.raises(StemdlError, match="not a folder"):
        run_eda(fixture_dir, tmp_path / "file")


def test_bad_data_is_one_line_exit_2_and_no_report(copy_fixture, tmp_path, monkeypatch, capsys):
    data = copy_fixture(tmp_path / "data")
    with h5py.File(data / "dev" / "batch_dev_0.h5", "r+") as h5:
        h5["sample_0_0/cbed_stack"][0, 10, 10] = np.nan
    with pytest.raises(DataError, match=r"batch_dev_0\.h5:sample_0_0: cbed_stack has non-finite"):
        run_eda(data, tmp_path / "out")
    monkeypatch.setitem(cli.COMMANDS, "eda", ("stemdl.workloads.spacegroup.eda", "exploratory data analysis report"))
    assert cli.main(["eda", str(data), "--out", str(tmp_path / "out"), "--quiet", "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stemdl eda: error: ") and "sample_0_0" in err[0]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*")), "no report, no temporary folder"


def test_bad_options_name_the_option(tiny, tmp_path):
    with pytest.raises(StemdlError, match="--max-samples -1: must be at least 0"):
        run_eda(tiny, tmp_path / "a", "--max-samples", -1)
    with pytest.raises(StemdlError, match=r"--size 256: .*batch_\w+\.h5:sample_\d+_\d+ has 128x128 patterns"):
        parser = argparse.ArgumentParser()
        eda.configure(parser)
        eda.run(parser.parse_args([str(tiny), "--out", str(tmp_path / "b"), "--quiet", "--size", "256"]))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
