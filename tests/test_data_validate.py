"""`stemdl validate` on the fixture and on damaged copies of it: every bad sample named, exit status 1."""

import contextlib
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from stemdl.cli import main
from stemdl.workloads.spacegroup.data.validate import validate, value_problems

TRAIN = "train/batch_train_0.h5"


def _cli(capsys, *argv) -> tuple[int, list[str]]:
    code = main(["validate", *map(str, argv), "--workers", "1", "--quiet"])
    return code, capsys.readouterr().out.splitlines()


def _replace_stack(h5, data):
    del h5["sample_1_0/cbed_stack"]
    h5["sample_1_0"].create_dataset("cbed_stack", data=data)


def _edit_stack(h5, edit):
    stack = h5["sample_1_0/cbed_stack"][()]
    edit(stack)
    h5["sample_1_0/cbed_stack"][...] = stack


def _set_attr(name, value):
    return lambda h5: h5["sample_1_0"].attrs.__setitem__(name, value)


def test_fixture_passes_as_folder_and_as_files(fixture_dir, capsys):
    code, out = _cli(capsys, fixture_dir)
    assert code == 0, out
    assert out[0] == "2 files, 3 samples"
    assert out[2].split() == ["train", "1", "2", "2", "1.0", "0"]
    assert out[3].split() == ["dev", "1", "1", "1", "1.0", "0"]
    assert "image shape: (3, 512, 512) (the most common: 3 of 3 samples)" in out
    assert out[-1] == "result: all samples good"
    code, out_files = _cli(capsys, fixture_dir / "batch_dev_0.h5", fixture_dir / "batch_train_0.h5")
    assert code == 0 and out_files == out


# (damage to the copied train file, the expected bad line(s) after "train/batch_train_0.h5:sample_1_0: ")
SAMPLE_DAMAGE = {
    "missing cbed_stack": (lambda h5: h5["sample_1_0"].__delitem__("cbed_stack"), "missing dataset cbed_stack"),
    "shape 3x512x256": (lambda h5: _replace_stack(h5, np.ones((3, 512, 256), np.float32)),
                        "cbed_stack has shape (3, 512, 256), expected (3, 512, 512)"),
    "shape 2x512x512": (lambda h5: _replace_stack(h5, np.ones((2, 512, 512), np.float32)),
                        "cbed_stack has shape (2, 512, 512), expected (3, 512, 512)"),
    "float64": (lambda h5: _replace_stack(h5, np.ones((3, 512, 512), np.float64)),
                "cbed_stack has dtype float64, expected float32"),
    "nan": (lambda h5: _edit_stack(h5, lambda s: s.__setitem__((1, 5, 7), np.nan)),
            "cbed_stack has 1 non-finite values (NaN or inf)"),
    "negative": (lambda h5: _edit_stack(h5, lambda s: s.__setitem__((2, slice(0, 3), 0), -0.5)),
                 "cbed_stack has 3 negative values (min -0.5)"),
    "implausible": (lambda h5: _edit_stack(h5, lambda s: s.__setitem__((0, 7, 9), 1.3e36)),
                    "cbed_stack has 1 implausible values (max 1.3e+36, above 1e+30)"),
    "label 0": (_set_attr("space_group", np.bytes_(b"0")), "space_group 0 is outside 1..230"),
    "label 231": (_set_attr("space_group", np.bytes_(b"231")), "space_group 231 is outside 1..230"),
    "label abc": (_set_attr("space_group", np.bytes_(b"abc")), "space_group 'abc' is not a number"),
    "no z_dirs": (lambda h5: h5["sample_1_0"].attrs.__delitem__("z_dirs"), "missing attribute z_dirs"),
    "z_dirs shape": (_set_attr("z_dirs", np.zeros((3, 3), np.int64)),
                     "attribute z_dirs has shape (3, 3), expected (1, 3, 3)"),
}


@pytest.mark.parametrize("case", list(SAMPLE_DAMAGE))
def test_damaged_sample_is_named_with_its_reason(tmp_path, copy_fixture, capsys, case):
    damage, reason = SAMPLE_DAMAGE[case]
    data = copy_fixture(tmp_path / "data")
    with h5py.File(data / TRAIN, "r+") as h5:
        damage(h5)
    code, out = _cli(capsys, data)
    assert code == 1
    assert out[out.index("result: 1 bad entries") + 1:] == [f"{TRAIN}:sample_1_0: {reason}"]


def test_all_reasons_of_a_sample_are_reported_together(tmp_path, copy_fixture):
    data = copy_fixture(tmp_path / "data")
    with h5py.File(data / TRAIN, "r+") as h5:
        h5["sample_1_0"].attrs["space_group"] = np.bytes_(b"231")
        _edit_stack(h5, lambda s: s.__setitem__((0, 0, 0), -np.inf))
        _edit_stack(h5, lambda s: s.__setitem__((0, 0, 1), -2.0))
    [bad] = validate([data], workers=1, quiet=True).bad
    assert (bad.file, bad.group) == (TRAIN, "sample_1_0")
    assert bad.reason == ("space_group 231 is outside 1..230; cbed_stack has 1 non-finite values (NaN or inf); "
                          "cbed_stack has 1 negative values (min -2)")


def test_unreadable_files_are_one_entry_each_and_the_rest_is_checked(tmp_path, copy_fixture, capsys):
    data = copy_fixture(tmp_path / "data")
    raw = (data / TRAIN).read_bytes()
    (data / TRAIN).write_bytes(raw[: len(raw) // 2])
    (data / "train" / "batch_train_9.h5").write_text("not an HDF5 file\n")
    code, out = _cli(capsys, data)
    assert code == 1
    bad = out[out.index("result: 2 bad entries") + 1:]
    assert bad[0].startswith(f"{TRAIN}: not a readable HDF5 file (truncated file: eof = {len(raw) // 2}")
    assert bad[1] == "train/batch_train_9.h5: not a readable HDF5 file (file signature not found)"
    assert out[3].split() == ["dev", "1", "1", "1", "1.0", "0"], "the dev file is still checked"


def test_other_groups_and_duplicate_names_are_bad_repeated_materials_only_counted(tmp_path, copy_fixture, capsys):
    data = copy_fixture(tmp_path / "data")
    with h5py.File(data / TRAIN, "r+") as h5, h5py.File(data / "train" / "batch_train_1.h5", "w") as h5b:
        h5.create_group("metadata")
        for name in ("sample_2_0", "sample_3_0"):  # more samples of class 196, with the same material
            h5.copy(h5["sample_0_0"], h5, name=name)
        h5.copy(h5["sample_1_0"], h5b, name="sample_1_0")
    code, out = _cli(capsys, data)
    assert code == 1
    assert out[2].split() == ["train", "2", "5", "2", "1.5", "2"]  # 196: 3 samples, 63: 2 samples
    assert "samples repeating a material of their split (warning only): train 3, dev 0" in out
    assert out[out.index("result: 2 bad entries") + 1:] == [
        f"{TRAIN}:metadata: not a sample group (name is not sample_I_J)",
        "train/batch_train_1.h5:sample_1_0: duplicate sample name, also in train/batch_train_0.h5",
    ]


def test_same_report_whatever_the_worker_count_and_json(tmp_path, copy_fixture, capsys):
    data = copy_fixture(tmp_path / "data", flat=True)
    for n in (1, 2):  # more files than samples per file, so the two workers really interleave
        with h5py.File(data / f"batch_test_{n}.h5", "w") as h5, h5py.File(data / "batch_dev_0.h5", "r") as src:
            src.copy(src["sample_0_0"], h5, name=f"sample_{n}_0")
            h5[f"sample_{n}_0"].attrs["space_group"] = np.bytes_(b"999" if n == 1 else b"5")
    (data / "batch_dev_3.h5").write_bytes(b"\0" * 100)
    reports = [validate([data], workers=w, quiet=True) for w in (1, 2)]
    assert reports[0] == reports[1]
    assert [b.line() for b in reports[0].bad] == [
        "batch_dev_3.h5: not a readable HDF5 file (file signature not found)",
        "batch_test_1.h5:sample_1_0: space_group 999 is outside 1..230"]
    code = main(["validate", str(data), "--quiet", "--workers", "2", "--json", str(tmp_path / "r.json")])
    stored = json.loads((tmp_path / "r.json").read_text())
    assert code == 1 and stored["summary"] == reports[0].summary
    assert stored["bad"][1] == {"file": "batch_test_1.h5", "group": "sample_1_0",
                                "reason": "space_group 999 is outside 1..230"}
    assert stored["summary"]["splits"]["test"]["class_counts"] == {"5": 1}
    assert capsys.readouterr().out.splitlines()[-1] == "batch_test_1.h5:sample_1_0: space_group 999 is outside 1..230"


def test_image_size_option_and_wrong_arguments(fixture_dir, tmp_path, capsys):
    code, out = _cli(capsys, fixture_dir, "--image-size", "256")
    assert code == 1
    assert "image shape: (3, 256, 256) (from --image-size; most common (3, 512, 512): 3 of 3 samples)" in out
    assert "batch_dev_0.h5:sample_0_0: cbed_stack has shape (3, 512, 512), expected (3, 256, 256)" in out
    assert main(["validate", str(tmp_path)]) == 2
    assert f"{tmp_path}: no batch_" in capsys.readouterr().err


def test_value_checks_on_odd_datasets():
    with h5py.File(io.BytesIO(), "w") as h5:
        assert value_problems(h5.create_dataset("ok", data=np.ones((3, 4, 4), np.float32))) == []
        assert value_problems(h5.create_dataset("ints", data=np.array([[[1, -3], [-4, 0]]], np.int16))) == \
            ["cbed_stack has 2 negative values (min -4)"]
        assert value_problems(h5.create_dataset("flat", data=np.array([np.inf, np.nan, -1.0]))) == \
            ["cbed_stack has 2 non-finite values (NaN or inf)", "cbed_stack has 1 negative values (min -1)"]
        assert value_problems(h5.create_dataset("empty", data=np.zeros((3, 0, 4), np.float32))) == []
        assert value_problems(h5.create_dataset("text", data="abc")) == []


# ---- damage that stays finite and non-negative: checksums of a synthetic set, and a ceiling for any data

SYNTH_FILE = "train/batch_train_1.h5"


def _flip_exponent_bit(path, group):
    """Flip the top exponent bit of the largest value of one pattern: 0.0039 becomes about 1.3e36."""
    with h5py.File(path, "r+") as h5:
        ds = h5[f"{group}/cbed_stack"]
        stack = ds[()]
        at = np.unravel_index(np.argmax(stack[1]), stack[1].shape)
        stack[1].view(np.uint32)[at] ^= np.uint32(1 << 30)
        ds[...] = stack
        return float(stack[1][at])


@pytest.fixture
def tiny_copy(tmp_path, tiny_data):
    return shutil.copytree(tiny_data, tmp_path / "tiny")


def test_a_flipped_bit_is_found_by_checksum_and_by_the_ceiling(tiny_copy, capsys):
    with h5py.File(tiny_copy / SYNTH_FILE, "r") as h5:
        group = sorted(h5)[0]
    flipped = _flip_exponent_bit(tiny_copy / SYNTH_FILE, group)
    assert 1e30 < flipped < np.finfo(np.float32).max
    code, out = _cli(capsys, tiny_copy)
    assert code == 1
    assert "sha256: 4 of 4 files checked against synth.json, 1 differ" in out
    assert out[out.index("result: 2 bad entries") + 1:] == [
        f"{SYNTH_FILE}: sha256 differs from synth.json: changed or damaged since it was generated",
        f"{SYNTH_FILE}:{group}: cbed_stack has 1 implausible values (max {flipped:.2g}, above 1e+30)"]


def test_a_small_change_is_found_by_the_checksum_alone(tiny_copy, capsys):
    with h5py.File(tiny_copy / SYNTH_FILE, "r+") as h5:
        group = sorted(h5)[0]
        h5[f"{group}/cbed_stack"][0, 0, 0] += np.float32(1e-4)  # plausible: only the checksum can tell
    code, out = _cli(capsys, tiny_copy)
    assert code == 1
    assert out[out.index("result: 1 bad entries") + 1:] == [
        f"{SYNTH_FILE}: sha256 differs from synth.json: changed or damaged since it was generated"]
    code, out = _cli(capsys, tiny_copy, "--no-checksums")
    assert code == 0 and out[-1] == "result: all samples good" and not any(x.startswith("sha256:") for x in out)


def test_an_intact_synthetic_set_is_checked_and_good(tiny_data, capsys):
    code, out = _cli(capsys, tiny_data)
    assert code == 0
    assert out[-2:] == ["sha256: 4 of 4 files checked against synth.json, 0 differ", "result: all samples good"]
    code, out = _cli(capsys, tiny_data / SYNTH_FILE)  # files named one by one: no folder, no synth.json
    assert code == 0 and not any(line.startswith("sha256:") for line in out)


def test_an_unreadable_synth_json_is_one_bad_entry(tiny_copy, capsys):
    (tiny_copy / "synth.json").write_text("{not json")
    code, out = _cli(capsys, tiny_copy)
    assert code == 1
    [line] = out[out.index("result: 1 bad entries") + 1:]
    assert line.startswith("synth.json: unreadable (Expecting property name")


def test_the_ceiling_flags_large_values_alongside_others():
    with h5py.File(io.BytesIO(), "w") as h5:
        data = np.full((3, 4, 4), 1e-3, np.float32)
        data[0, 0, :3] = [np.nan, 2e31, 3e36]
        data[2, 1, 1] = 1e30  # at the ceiling, not above
        assert value_problems(h5.create_dataset("big", data=data)) == [
            "cbed_stack has 1 non-finite values (NaN or inf)",
            "cbed_stack has 2 implausible values (max 3e+36, above 1e+30)"]


def _remount_read_only(disk):
    proc = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot remount read-only here ({proc.stderr.strip()})")


@pytest.mark.parametrize("case", ["proc", "a folder", "under a file", "read-only"])
def test_an_unwritable_json_is_one_line_before_any_work(tmp_path, fixture_dir, small_disk, capsys, case):
    if case == "proc":
        target, why = Path("/proc/x.json"), "cannot write it (No such file or directory)"
    elif case == "a folder":
        target, why = tmp_path, "is a folder"
    elif case == "under a file":
        (tmp_path / "f").write_text("precious")
        target, why = tmp_path / "f" / "r.json", f"{tmp_path / 'f'} is not a folder"
    else:
        disk = small_disk(64)
        _remount_read_only(disk)
        target, why = disk / "r.json", "cannot write it (Read-only file system)"
    code = main(["validate", str(fixture_dir), "--workers", "1", "--quiet", "--json", str(target)])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err == f"stemdl validate: error: --json {target}: {why}\n"


def test_a_json_on_a_full_disk_is_one_line_and_leaves_nothing(fixture_dir, small_disk, capsys):
    disk = small_disk(64)
    with open(disk / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:  # the disk full to the last block
            f.write(b"\0" * 4096)
    filler = (disk / "filler").stat().st_size
    code = main(["validate", str(fixture_dir), "--workers", "1", "--quiet", "--json", str(disk / "r.json")])
    err = capsys.readouterr().err
    assert code == 2
    assert re.fullmatch(f"stemdl validate: error: {re.escape(str(disk / 'r.json'))}: cannot write it "
                        r"\(no space left on device[^\n]*\)\n", err), err
    assert sorted(p.name for p in disk.iterdir()) == ["filler"] and (disk / "filler").stat().st_size == filler
