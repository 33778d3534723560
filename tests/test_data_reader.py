"""The reader against the real-layout fixture: file discovery, natural order, records, stacks, and errors."""

import os
import re

import h5py
import numpy as np
import pytest

from stemdl.workloads.spacegroup.data import layout
from stemdl.workloads.spacegroup.data.reader import DataFile, data_files, read_record, read_stack
from stemdl.harness.errors import DataError


def test_fixture_records_and_stacks(fixture_dir):
    train, dev = fixture_dir / "batch_train_0.h5", fixture_dir / "batch_dev_0.h5"
    with DataFile(train) as f:
        assert f.groups == ["sample_0_0", "sample_1_0"] and f.split == "train"
        assert [f.record(g).space_group for g in f.groups] == [196, 63]
        rec = f.record("sample_0_0")
        for g in f.groups:
            stack = f.stack(g)
            assert stack.dtype == np.float32 and stack.shape == (3, 512, 512)
    assert read_record(dev, "sample_0_0").space_group == 71
    assert (rec.material, rec.formula, rec.energy_keV) == ("mp-100000", "Si4 O8", 100)
    assert rec.z_dirs.shape == (3, 3) and rec.z_dirs.dtype.kind == "i"
    np.testing.assert_array_equal(rec.z_dirs, [[0, 1, -1], [1, -1, -1], [0, 2, -1]])
    assert rec.y_dirs.shape == (3, 3) and rec.y_dirs.dtype.kind == "f"
    np.testing.assert_allclose(rec.abc_angstrom, [12.26202106] * 3)
    np.testing.assert_allclose(rec.angles_degree, [90, 90, 90])
    np.testing.assert_allclose(rec.semi_angles_rad, [0.0028, 0.0029, 0.0037])
    assert rec.kinematic_class is None


def test_stack_is_the_stored_array_and_reuses_the_buffer(fixture_dir):
    path = fixture_dir / "batch_train_0.h5"
    with h5py.File(path, "r") as h5:
        expected = h5["sample_1_0/cbed_stack"][()]
    np.testing.assert_array_equal(read_stack(path, "sample_1_0"), expected)
    buf = np.zeros((3, 512, 512), np.float32)
    with DataFile(path) as f:
        assert f.stack("sample_1_0", out=buf) is buf
        with pytest.raises(DataError, match=r"sample_0_0: cbed_stack has shape \(3, 512, 512\), expected \(3, 4, 4\)"):
            f.stack("sample_0_0", out=np.zeros((3, 4, 4), np.float32))
    np.testing.assert_array_equal(buf, expected)


def test_groups_in_natural_order_and_non_samples_skipped(tmp_path, fixture_dir):
    rec = read_record(fixture_dir / "batch_train_0.h5", "sample_0_0")
    path = tmp_path / "batch_train_0.h5"
    with h5py.File(path, "w") as h5:
        for name in ("sample_10_0", "sample_2_1", "sample_2_0", "sample_1_0"):
            layout.write_sample(h5, name, np.zeros((3, 4, 4), np.float32), rec)
        h5.create_group("metadata")
    with DataFile(path) as f:
        assert f.groups == ["sample_1_0", "sample_2_0", "sample_2_1", "sample_10_0"]
        assert f.other_names() == ["metadata"]
        assert f.shape("sample_10_0") == (3, 4, 4)


def _touch(*paths):
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


def test_data_files_in_folders_flat_and_listed(tmp_path):
    nested, flat = tmp_path / "nested", tmp_path / "flat"
    names = ["batch_test_1.h5", "batch_train_10.h5", "batch_dev_0.h5", "batch_train_2.h5"]
    _touch(*(nested / n.split("_")[1] / n for n in names), nested / "train" / "notes.txt",
           nested / "train" / ".batch_train_3.h5.partial")
    _touch(*(flat / n for n in names), flat / "synth.json")
    order = ["batch_train_2.h5", "batch_train_10.h5", "batch_dev_0.h5", "batch_test_1.h5"]
    assert [p.name for p in data_files(nested)] == order
    assert [p.name for p in data_files(flat)] == order
    assert data_files([nested / "train" / "batch_train_2.h5"]) == [nested / "train" / "batch_train_2.h5"]
    assert [p.name for p in data_files([flat / n for n in names])] == order
    assert [p.name for p in data_files(nested, split="train")] == order[:2]
    assert [p.name for p in data_files([flat / n for n in names], split="test")] == ["batch_test_1.h5"]


def test_data_files_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / 'nope'))}: no such directory"):
        data_files(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / 'empty'))}: no batch_"):
        data_files(tmp_path / "empty")
    _touch(tmp_path / "d" / "batch_train_0.h5", tmp_path / "data.h5")
    with pytest.raises(DataError, match="no test files"):
        data_files(tmp_path / "d", split="test")
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / 'data.h5'))}: not a data file name"):
        data_files([tmp_path / "data.h5"])
    with pytest.raises(DataError, match="batch_dev_0.h5: no such file"):
        data_files([tmp_path / "batch_dev_0.h5"])


def test_unreadable_files_raise_one_line_data_errors(tmp_path, fixture_dir):
    junk = tmp_path / "batch_train_9.h5"
    junk.write_text("not hdf5\n")
    with pytest.raises(DataError) as err:
        DataFile(junk)
    assert str(err.value) == f"{junk}: not a readable HDF5 file (file signature not found)"
    cut = tmp_path / "batch_train_0.h5"
    data = (fixture_dir / "batch_train_0.h5").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"batch_train_0.h5: not a readable HDF5 file \(truncated file"):
        read_record(cut, "sample_0_0")
    cut.write_bytes(data)
    os.chmod(cut, 0)
    if os.access(cut, os.R_OK):
        return  # root reads anything: the permission case cannot be made here
    with pytest.raises(DataError, match=r"not a readable HDF5 file \(Permission denied\)"):
        DataFile(cut)


@pytest.mark.parametrize("damage, message", [
    (lambda g: g.__delitem__("cbed_stack"), "missing dataset cbed_stack"),
    (lambda g: _replace(g, np.zeros((3, 512, 512), np.float64)), "cbed_stack has dtype float64, expected float32"),
    (lambda g: _replace(g, np.zeros((2, 512, 512), np.float32)),
     r"cbed_stack has shape \(2, 512, 512\), expected \(3, H, W\)"),
])
def test_bad_stack_names_file_and_group(tmp_path, copy_fixture, damage, message):
    path = copy_fixture(tmp_path, flat=True) / "batch_train_0.h5"
    with h5py.File(path, "r+") as h5:
        damage(h5["sample_1_0"])
    with DataFile(path) as f:
        assert f.stack("sample_0_0").shape == (3, 512, 512)
        with pytest.raises(DataError, match=f"^{re.escape(str(path))}:sample_1_0: {message}$"):
            f.stack("sample_1_0")
        with pytest.raises(DataError, match=f"^{re.escape(str(path))}:sample_7_0: no such sample$"):
            f.record("sample_7_0")


def _replace(group, data):
    del group["cbed_stack"]
    group.create_dataset("cbed_stack", data=data)
