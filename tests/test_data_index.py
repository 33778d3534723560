"""The sample index: built once, reused, rescanning only changed files, saved where it can be."""

import dataclasses
import os
import re

import h5py
import numpy as np
import pytest

from stemdl.cli import main
from stemdl.workloads.spacegroup.data import index as index_mod
from stemdl.workloads.spacegroup.data.index import (FORMAT_VERSION, INDEX_NAME, PLACEHOLDER_VERSION, DataIndex, cache_path,
                               load_or_build)
from stemdl.harness.errors import DataError
from stemdl.workloads.spacegroup.synth import generate

TRAIN, DEV = "train/batch_train_0.h5", "dev/batch_dev_0.h5"


@pytest.fixture
def data(tmp_path, copy_fixture):
    return copy_fixture(tmp_path / "data")


@pytest.fixture
def scans(monkeypatch):
    """The files each in-process scan opened (use workers=1 so scans run in this process)."""
    opened = []
    real = index_mod._scan_file

    def counting(path, **kw):
        opened.append(os.path.relpath(path, os.path.dirname(os.path.dirname(path))))
        return real(path, **kw)

    monkeypatch.setattr(index_mod, "_scan_file", counting)
    return opened


def _build(root, **kw):
    return load_or_build(root, workers=1, quiet=True, **kw)


def test_build_then_reuse(data, scans):
    idx = _build(data)
    assert (idx.status, idx.rescanned, idx.path) == ("built", 2, data.resolve() / INDEX_NAME)
    assert idx.files == [TRAIN, DEV] and len(idx) == 3
    assert [idx.entry(i) for i in range(3)] == [
        (TRAIN, "sample_0_0", "train", 196, (3, 512, 512), -1),
        (TRAIN, "sample_1_0", "train", 63, (3, 512, 512), -1),
        (DEV, "sample_0_0", "dev", 71, (3, 512, 512), -1)]
    assert idx.file_path(2) == data.resolve() / DEV and idx.group_name(1) == "sample_1_0"
    assert idx.select("train").tolist() == [0, 1] and idx.select("test").tolist() == []
    assert np.flatnonzero(idx.class_counts("train")).tolist() == [63, 196]
    again = _build(data)
    assert (again.status, again.rescanned, again.path) == ("reused", 0, idx.path)
    assert scans == [TRAIN, DEV], "the second call scanned nothing"
    _assert_same(idx, again)


def test_changed_added_and_removed_files_are_the_only_ones_rescanned(data, scans):
    _build(data)
    st = (data / TRAIN).stat()
    os.utime(data / TRAIN, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    idx = _build(data)
    assert (idx.status, idx.rescanned, scans[2:]) == ("updated", 1, [TRAIN])
    with h5py.File(data / DEV, "r+") as h5:  # a new sample in the dev file
        h5.copy(h5["sample_0_0"], h5, name="sample_1_0")
        h5["sample_1_0"].attrs["space_group"] = np.bytes_(b"12")
    (data / "test").mkdir()
    with h5py.File(data / "test" / "batch_test_0.h5", "w") as h5, h5py.File(data / DEV, "r") as src:
        src.copy(src["sample_0_0"], h5, name="sample_0_0")
    idx = _build(data)
    assert (idx.status, idx.rescanned, scans[3:]) == ("updated", 2, [DEV, "test/batch_test_0.h5"])
    assert idx.label.tolist() == [196, 63, 71, 12, 71] and idx.split.tolist() == [0, 0, 1, 1, 2]
    (data / TRAIN).unlink()
    idx = _build(data)
    assert (idx.status, idx.rescanned, len(scans)) == ("updated", 0, 5)
    assert idx.files == [DEV, "test/batch_test_0.h5"] and idx.label.tolist() == [71, 12, 71]
    assert _build(data).status == "reused"


def test_rebuild_and_damaged_index_file_scan_everything(data, scans):
    _build(data)
    assert _build(data, rebuild=True).rescanned == 2
    (data / INDEX_NAME).write_bytes(b"garbage")
    assert _build(data).status == "built"
    assert len(scans) == 6


def test_explicit_cache_dir(data, tmp_path):
    idx = _build(data, cache_dir=tmp_path / "cache")
    assert idx.path == cache_path(data, tmp_path / "cache") and idx.path.is_file()
    assert idx.path.parent == tmp_path / "cache" and not (data / INDEX_NAME).exists()
    assert _build(data, cache_dir=tmp_path / "cache").status == "reused"


def test_unwritable_data_dir_falls_back_to_stemdl_cache(data, tmp_path, monkeypatch, scans):
    monkeypatch.setenv("STEMDL_CACHE", str(tmp_path / "cache"))
    _build(data)  # saved beside the data while it is writable: later calls may use it as a base
    real_save = DataIndex.save

    def save(self, path):
        if path.parent == data.resolve():  # root ignores permission bits, so refuse like a read-only mount
            raise PermissionError(13, "Permission denied")
        real_save(self, path)

    monkeypatch.setattr(DataIndex, "save", save)
    os.utime(data / DEV, ns=(0, 10**18))
    idx = _build(data)
    assert idx.path == cache_path(data, tmp_path / "cache" / "index")
    assert (idx.status, idx.rescanned, scans[2:]) == ("updated", 1, [DEV])
    again = _build(data)
    assert (again.status, again.path) == ("reused", idx.path), "the fresher cached index wins"


def test_one_or_two_workers_give_the_same_index(data, tmp_path):
    one = load_or_build(data, workers=1, cache_dir=tmp_path / "a", quiet=True)
    two = load_or_build(data, workers=2, cache_dir=tmp_path / "b", quiet=True)
    _assert_same(one, two)
    assert (tmp_path / "a" / one.path.name).read_bytes() == (tmp_path / "b" / two.path.name).read_bytes()


@pytest.mark.parametrize("workers", [1, 2])
def test_bad_sample_stops_indexing_naming_file_and_group(data, workers):
    with h5py.File(data / DEV, "r+") as h5:
        h5["sample_0_0"].attrs["space_group"] = np.bytes_(b"0")
    where = re.escape(f"{data.resolve() / DEV}:sample_0_0")
    with pytest.raises(DataError, match=f"^{where}: space_group 0 is outside 1..230$"):
        load_or_build(data, workers=workers, quiet=True)
    assert not (data / INDEX_NAME).exists()


def test_index_command(data, capsys):
    assert main(["index", str(data), "--workers", "1", "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"index: {data.resolve() / INDEX_NAME} (built, 2 files scanned)",
        "train: 2 samples, 2 classes", "dev: 1 samples, 1 classes", "all: 3 samples in 2 files, 3 classes"]
    assert main(["index", str(data), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith(f"index: {data.resolve() / INDEX_NAME} (reused, no file rescanned)")
    (data / TRAIN).write_bytes(b"junk")
    assert main(["index", str(data), "--quiet"]) == 2
    assert "batch_train_0.h5: not a readable HDF5 file (file signature not found)" in capsys.readouterr().err


# ---- --skip-bad: samples the scan cannot decode become placeholders --------------------------------------

LABEL_231 = "space_group 231 is outside 1..230"


def _damage(data, train=True, dev=True):
    """A label outside 1..230 in the train file's sample_1_0; no cbed_stack in the dev file's sample_0_0."""
    if train:
        with h5py.File(data / TRAIN, "r+") as h5:
            h5["sample_1_0"].attrs["space_group"] = np.bytes_(b"231")
    if dev:
        with h5py.File(data / DEV, "r+") as h5:
            del h5["sample_0_0/cbed_stack"]


def _saved_version(index: DataIndex) -> int:
    with np.load(index.path) as z:
        return int(z["version"])


def _refused(data, where, reason, **kw):
    where = re.escape(f"{data.resolve() / where}")
    with pytest.raises(DataError, match=f"^{where}: {re.escape(reason)}$"):
        _build(data, **kw)


def test_tolerant_scan_keeps_placeholders_and_a_later_strict_call_still_refuses(data, scans, capsys):
    _damage(data)
    _refused(data, f"{TRAIN}:sample_1_0", LABEL_231)
    assert not (data / INDEX_NAME).exists() and scans == [TRAIN]
    idx = _build(data, skip_bad=True)
    assert idx.placeholders().tolist() == [1, 2] and idx.label.tolist() == [196, 0, 0]
    assert idx.entry(1) == (TRAIN, "sample_1_0", "train", 0, (0, 0, 0), -1)
    assert idx.entry(2) == (DEV, "sample_0_0", "dev", 0, (0, 0, 0), -1)
    assert np.isnan(idx.targets([1, 2])).all() and np.isfinite(idx.targets([0])).all()
    assert (idx.status, _saved_version(idx)) == ("built", PLACEHOLDER_VERSION)
    # Strict after tolerant: the files holding placeholders count as changed and are rescanned strictly.
    _refused(data, f"{TRAIN}:sample_1_0", LABEL_231)
    assert scans == [TRAIN, TRAIN, DEV, TRAIN] and _saved_version(idx) == PLACEHOLDER_VERSION
    assert main(["index", str(data), "--workers", "1", "--quiet"]) == 2
    assert f"{TRAIN}:sample_1_0: {LABEL_231}" in capsys.readouterr().err
    again = _build(data, skip_bad=True)
    assert (again.status, len(scans)) == ("reused", 5), "a tolerant call reuses the placeholders"
    _assert_same(idx, again)
    with h5py.File(data / TRAIN, "r+") as h5:  # TRAIN repaired: only DEV is bad now
        h5["sample_1_0"].attrs["space_group"] = np.bytes_(b"63")
    _refused(data, f"{DEV}:sample_0_0", "missing dataset cbed_stack")
    assert scans[5:] == [TRAIN, DEV], "TRAIN changed, DEV holds a placeholder"


def test_strict_index_then_damage_then_tolerant_then_repair(data, scans, fixture_dir):
    clean = _build(data)
    assert _saved_version(clean) == FORMAT_VERSION and len(clean.placeholders()) == 0
    _damage(data, train=False)
    _refused(data, f"{DEV}:sample_0_0", "missing dataset cbed_stack")
    idx = _build(data, skip_bad=True)
    assert (idx.status, idx.rescanned, scans[2:]) == ("updated", 1, [DEV, DEV])
    assert idx.placeholders().tolist() == [2] and _saved_version(idx) == PLACEHOLDER_VERSION
    assert [idx.entry(i) for i in (0, 1)] == [clean.entry(i) for i in (0, 1)]
    (data / DEV).write_bytes((fixture_dir / "batch_dev_0.h5").read_bytes())  # repaired: a strict call is clean
    fixed = _build(data)
    assert (fixed.status, fixed.rescanned, _saved_version(fixed)) == ("updated", 1, FORMAT_VERSION)
    for name in ("group", "label", "shape", "kinematic_class", "abc", "angles"):
        np.testing.assert_array_equal(getattr(fixed, name), getattr(clean, name), err_msg=name)


def test_tolerant_scan_with_two_workers_matches_one(data, tmp_path):
    _damage(data)
    one = load_or_build(data, workers=1, cache_dir=tmp_path / "a", quiet=True, skip_bad=True)
    two = load_or_build(data, workers=2, cache_dir=tmp_path / "b", quiet=True, skip_bad=True)
    _assert_same(one, two)
    assert one.placeholders().tolist() == [1, 2]


def test_a_file_that_cannot_be_opened_stays_fatal_with_skip_bad(data):
    (data / TRAIN).write_bytes(b"junk")
    _refused(data, TRAIN, "not a readable HDF5 file (file signature not found) (--skip-bad leaves out samples, "
             "not a file whose samples cannot be counted)", skip_bad=True)
    _refused(data, TRAIN, "not a readable HDF5 file (file signature not found)")


def _attribute_lattices(index: DataIndex) -> np.ndarray:
    """(n, 6) float64: abc_angstrom then angles_degree of every entry, read straight from the files."""
    rows = []
    for i in range(len(index)):
        with h5py.File(index.file_path(i), "r") as h5:
            attrs = h5[index.group_name(i)].attrs
            rows.append(np.concatenate([attrs["abc_angstrom"], attrs["angles_degree"]]))
    return np.array(rows)


def test_lattice_fields_match_the_attributes_of_the_fixture(data):
    idx = _build(data)
    assert idx.abc.dtype == idx.angles.dtype == np.float32 and idx.abc.shape == idx.angles.shape == (3, 3)
    expected = _attribute_lattices(idx)
    np.testing.assert_array_equal(idx.targets(np.arange(3)), expected.astype(np.float32))
    np.testing.assert_allclose(idx.targets([2, 0]), expected[[2, 0]], rtol=1e-7)
    assert idx.targets([]).shape == (0, 6) and idx.targets(idx.select("dev")).dtype == np.float32
    np.testing.assert_array_equal(_build(data).targets([1]), idx.targets([1]))  # as saved and reloaded


def test_lattice_fields_match_the_attributes_of_a_synthetic_set(tmp_path):
    cfg = dataclasses.replace(generate.preset_config("tiny", seed=5), samples={"train": 4, "dev": 2, "test": 0})
    generate.generate(tmp_path / "syn", cfg, quiet=True)
    idx = _build(tmp_path / "syn")
    assert len(idx) == 6 and idx.kinematic_class.min() >= 0
    lattices = idx.targets(np.arange(len(idx)))
    np.testing.assert_array_equal(lattices, _attribute_lattices(idx).astype(np.float32))
    assert np.all(lattices[:, :3] > 0) and np.all((lattices[:, 3:] > 0) & (lattices[:, 3:] < 180))


def test_index_of_an_older_format_version_is_rebuilt(data, scans):
    idx = _build(data)
    with np.load(idx.path) as z:  # the same arrays under format version 1, which had no lattice
        old = {k: z[k] for k in z.files if k not in ("abc", "angles")}
    old["version"] = np.int64(1)
    with open(idx.path, "wb") as f:
        np.savez(f, **old)
    again = _build(data)
    assert (again.status, again.rescanned, len(scans)) == ("built", 2, 4)
    _assert_same(idx, again)


def _assert_same(a: DataIndex, b: DataIndex):
    assert a.files == b.files
    for name in ("file_size", "file_mtime_ns", "file_start", "group", "label", "shape", "kinematic_class", "abc",
                 "angles"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
