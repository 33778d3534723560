"""The screen before the clock: every bad sample named in one line, `--skip-bad` under its limit, ranks agree.

The damage is done after the index is built: a file damaged before it is refused by the strict index scan
itself (`test_damage_before_indexing_is_refused_by_the_scan`), so the screen sees what a saved index hides.
With `--skip-bad` the scan keeps such samples as placeholders, which the screen reports and leaves out
(`test_samples_the_scan_cannot_decode_are_left_out_with_their_reason` and the end-to-end run after it).
"""

import json
import os
import pickle
import re
import shutil
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from mpirun import SKIP_REASON, mpiexec, run_ranks

from stemdl.workloads.spacegroup.data import layout
from stemdl.workloads.spacegroup.data.index import load_or_build
from stemdl.workloads.spacegroup.data.reader import DataFile, read_record
from stemdl.cli import main
from stemdl.workloads.spacegroup.data.screen import (STALE_PLACEHOLDER, ScreenResult, decide, expected_shape, file_owners,
                                merge, screen, screen_distributed, screen_part)
from stemdl.harness.errors import DataError, StemdlError

TRAIN = "train/batch_train_0.h5"
HINT = " (use --skip-bad to leave out up to 1 % bad samples)"


@pytest.fixture
def data(tmp_path, copy_fixture):
    return copy_fixture(tmp_path / "data").resolve()


def _index(root):
    return load_or_build(root, workers=1, quiet=True)


def _screen(index, pixels=True, **kw):
    return screen(index, np.arange(len(index)), pixels=pixels, workers=1, quiet=True, **kw)


def _replace_stack(h5, data):
    del h5["sample_1_0/cbed_stack"]
    h5["sample_1_0"].create_dataset("cbed_stack", data=data)


def _edit_stack(value, where):
    def edit(h5):
        stack = h5["sample_1_0/cbed_stack"][()]
        stack[where] = value
        h5["sample_1_0/cbed_stack"][...] = stack
    return edit


def _set_attr(name, value):
    return lambda h5: h5["sample_1_0"].attrs.__setitem__(name, value)


# case: (damage to sample_1_0 of the train file, reason, whether only the pixel check finds it)
DAMAGE = {
    "nan": (_edit_stack(np.nan, (1, 5, 7)), "cbed_stack has 1 non-finite values (NaN or inf)", True),
    "inf": (_edit_stack(np.inf, (0, 0, slice(0, 2))), "cbed_stack has 2 non-finite values (NaN or inf)", True),
    "negative": (_edit_stack(-0.5, (2, slice(0, 3), 0)), "cbed_stack has 3 negative values (min -0.5)", True),
    "shape": (lambda h5: _replace_stack(h5, np.ones((3, 512, 256), np.float32)),
              "cbed_stack has shape (3, 512, 256), expected (3, 512, 512)", False),
    "patterns": (lambda h5: _replace_stack(h5, np.ones((2, 512, 512), np.float32)),
                 "cbed_stack has shape (2, 512, 512), expected (3, 512, 512)", False),
    "dtype": (lambda h5: _replace_stack(h5, np.ones((3, 512, 512), np.float64)),
              "cbed_stack has dtype float64, expected float32", False),
    "no cbed_stack": (lambda h5: h5["sample_1_0"].__delitem__("cbed_stack"), "missing dataset cbed_stack", False),
    "label 0": (_set_attr("space_group", np.bytes_(b"0")), "space_group 0 is outside 1..230", False),
    "label 231": (_set_attr("space_group", np.bytes_(b"231")), "space_group 231 is outside 1..230", False),
    "label abc": (_set_attr("space_group", np.bytes_(b"abc")), "space_group 'abc' is not a number", False),
    "no label": (lambda h5: h5["sample_1_0"].attrs.__delitem__("space_group"), "missing attribute space_group",
                 False),
}


def test_clean_data_keeps_everything(data):
    index = _index(data)
    for pixels in (True, False):
        result = _screen(index, pixels)
        assert result.keep.tolist() == [True, True, True] and result.bad == [] and result.checked == 3
        assert result.count() == 0
        assert decide(result, 3, skip_bad=False).tolist() == [True, True, True]


@pytest.mark.parametrize("case", list(DAMAGE))
def test_bad_sample_is_one_line_naming_file_and_group(data, case):
    damage, reason, pixels_only = DAMAGE[case]
    index = _index(data)
    with h5py.File(data / TRAIN, "r+") as h5:
        damage(h5)
    result = _screen(index)
    assert result.bad == [(str(data / TRAIN), "sample_1_0", reason)]
    assert result.keep.tolist() == [True, False, True] and result.count() == 1
    with pytest.raises(DataError) as err:
        decide(result, 3, skip_bad=False)
    assert str(err.value) == f"{data / TRAIN}:sample_1_0: {reason}{HINT}"
    quick = _screen(index, pixels=False)  # attributes, dtype and shape cost no image reads; values do
    assert quick.bad == ([] if pixels_only else result.bad)


def test_damage_before_indexing_is_refused_by_the_scan(data):
    """How a bad sample surfaces in a run when the index is (re)built: the scan's own one-line DataError."""
    with h5py.File(data / TRAIN, "r+") as h5:
        DAMAGE["label 231"][0](h5)
    with pytest.raises(DataError, match=r"batch_train_0.h5:sample_1_0: space_group 231 is outside 1..230$"):
        _index(data)


# ---- --skip-bad and samples the index scan cannot decode ------------------------------------------------

@pytest.fixture
def undecodable(tiny_data, tmp_path) -> tuple[Path, list[tuple[str, str, str]]]:
    """A copy of the tiny set (12 train+dev samples) with two samples the index scan cannot decode, and the
    (file, group, reason) of each. Only the .h5 files are copied: without synth.json no run regenerates it."""
    data = tmp_path / "data"
    for src in tiny_data.rglob("*.h5"):
        (data / src.relative_to(tiny_data)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, data / src.relative_to(tiny_data))
    train, dev = data / "train" / "batch_train_1.h5", data / "dev" / "batch_dev_0.h5"
    with h5py.File(train, "r+") as h5:
        h5["sample_5_0"].attrs["space_group"] = np.bytes_(b"231")
    with h5py.File(dev, "r+") as h5:
        del h5["sample_2_0/cbed_stack"]
    return data, [(str(train), "sample_5_0", "space_group 231 is outside 1..230"),
                  (str(dev), "sample_2_0", "missing dataset cbed_stack")]


def test_samples_the_scan_cannot_decode_are_left_out_with_their_reason(undecodable):
    data, bad = undecodable
    (file, group, reason) = bad[0]
    with pytest.raises(DataError, match=f"^{re.escape(f'{file}:{group}: {reason}')}$"):
        _index(data)
    index = load_or_build(data, workers=1, quiet=True, skip_bad=True)
    rows = np.concatenate([index.select("train"), index.select("dev")])
    assert len(rows) == 12 and [index.entry(i)[1] for i in index.placeholders()] == ["sample_5_0", "sample_2_0"]
    for pixels in (True, False):  # the screen decodes every sample again: the real reasons, not label 0
        result = screen(index, rows, pixels=pixels, workers=1, quiet=True)
        assert result.bad == bad and result.count() == 2
        assert rows[~result.keep].tolist() == index.placeholders().tolist()
    keep = decide(result, len(rows), skip_bad=True, max_bad=0.2)
    assert rows[keep].tolist() == np.setdiff1d(rows, index.placeholders()).tolist()
    assert (index.label[rows[keep]] > 0).all()
    with pytest.raises(StemdlError, match=r"^2 of 12 samples \(16.7 %\) are bad, above the max_bad 1 % limit \(--set max_bad=F\); "
                                          f"first: {re.escape(f'{file}:{group}: {reason}')}$"):
        decide(result, len(rows), skip_bad=True)
    with pytest.raises(DataError, match=f"^{re.escape(f'{file}:{group}: {reason}{HINT}')}$"):
        decide(result, len(rows), skip_bad=False)


def test_a_placeholder_that_decodes_now_is_still_left_out(data):
    """A read error at scan time that has gone: only a strict rescan can give the sample its label."""
    index = _index(data)
    index.label[[0, 1]] = 0
    index.shape[[0, 1]] = 0
    assert expected_shape(index, np.arange(3)) == (3, 512, 512), "placeholders do not vote"
    result = _screen(index)
    assert result.bad == [(str(data / TRAIN), f"sample_{i}_0", STALE_PLACEHOLDER) for i in (0, 1)]
    assert result.keep.tolist() == [False, False, True]


def test_run_with_skip_bad_leaves_out_samples_the_scan_cannot_decode(undecodable, tmp_path, capsys):
    data, bad = undecodable
    logs = tmp_path / "runs"
    assert main(["run", "--config", "smoke", "--data", str(data), "--log-dir", str(logs), "--skip-bad",
                 "--set", "max_bad=0.2", "--epochs", "1"]) == 0
    assert json.loads((logs / "result_0.metrics.json").read_text())["bad_samples_skipped"] == 2
    err = capsys.readouterr().err
    assert all(f"{file}:{group}: {reason}" in err for file, group, reason in bad)
    # The index it saved holds placeholders; a run without --skip-bad still stops before the clock, naming
    # one of them (files are scanned in parallel: whichever file's error comes first).
    assert main(["run", "--config", "smoke", "--data", str(data), "--log-dir", str(logs)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert any(last.endswith(f"{file}:{group}: {reason}") for file, group, reason in bad), last
    assert not (logs / "result_1.txt").exists(), "a run stopped before the clock leaves no result"


def test_all_reasons_of_a_sample_in_one_entry(data):
    index = _index(data)
    with h5py.File(data / TRAIN, "r+") as h5:
        DAMAGE["label 0"][0](h5)
        DAMAGE["nan"][0](h5)
    [(_, group, reason)] = _screen(index).bad
    assert (group, reason) == ("sample_1_0", "space_group 0 is outside 1..230; "
                                             "cbed_stack has 1 non-finite values (NaN or inf)")


def test_duplicate_names_across_files_of_a_split(data):
    later = data / "train" / "batch_train_1.h5"
    with h5py.File(data / TRAIN, "r") as src, h5py.File(later, "w") as h5:
        src.copy(src["sample_1_0"], h5, name="sample_1_0")
        src.copy(src["sample_0_0"], h5, name="sample_5_0")
    with h5py.File(data / "dev" / "batch_dev_0.h5", "r+") as h5:  # the same name in another split is fine
        h5.copy(h5["sample_0_0"], h5, name="sample_1_0")
    index = _index(data)
    result = _screen(index)
    assert result.bad == [(str(later), "sample_1_0", f"duplicate sample name, also in {data / TRAIN}")]
    assert index.group_name(2) == "sample_1_0" and np.flatnonzero(~result.keep).tolist() == [2]
    with pytest.raises(DataError, match=f"^{later}:sample_1_0: duplicate sample name, also in {data / TRAIN} "):
        decide(result, len(index), skip_bad=False)


def test_truncated_file_is_one_entry_and_all_its_samples_are_bad(data):
    index = _index(data)
    raw = (data / TRAIN).read_bytes()
    (data / TRAIN).write_bytes(raw[: len(raw) // 2])
    result = _screen(index)
    [(file, group, reason)] = result.bad
    assert (file, group) == (str(data / TRAIN), None)
    assert reason.startswith(f"not a readable HDF5 file (truncated file: eof = {len(raw) // 2}")
    assert result.keep.tolist() == [False, False, True] and result.count() == 2 and result.checked == 3
    with pytest.raises(DataError) as err:
        decide(result, 3, skip_bad=False)
    assert str(err.value) == f"{data / TRAIN}: {reason}{HINT}" and "\n" not in str(err.value)
    with pytest.raises(DataError, match=r"batch_train_0.h5: not a readable HDF5 file \(truncated"):
        _index(data)  # its size changed: in a run, the index rescans it and refuses first


def test_file_made_unreadable_after_indexing(data):
    index = _index(data)
    os.chmod(data / TRAIN, 0)
    if os.access(data / TRAIN, os.R_OK):
        pytest.skip("root reads anything: the permission case cannot be made here")
    assert _index(data).status == "reused", "chmod keeps size and mtime: the saved index hides it"
    result = _screen(index)
    assert result.bad == [(str(data / TRAIN), None, "not a readable HDF5 file (Permission denied)")]
    assert result.keep.tolist() == [False, False, True]


def _result(n: int, bad_rows: list[int]) -> ScreenResult:
    keep = np.ones(n, bool)
    keep[bad_rows] = False
    return ScreenResult(np.arange(n), keep, [("d/batch_train_0.h5", f"sample_{i}_0", "cbed_stack has 1 non-finite "
                                              "values (NaN or inf)") for i in bad_rows], n)


def test_skip_bad_keeps_the_rest_up_to_the_limit():
    result = _result(200, [3, 150])  # exactly 1 %: not above the limit
    keep = decide(result, 200, skip_bad=True)
    assert np.flatnonzero(~keep).tolist() == [3, 150] and result.count() == 2
    with pytest.raises(StemdlError) as err:
        decide(_result(200, [3, 7, 150]), 200, skip_bad=True)
    assert str(err.value) == ("3 of 200 samples (1.5 %) are bad, above the max_bad 1 % limit (--set max_bad=F); first: "
                              "d/batch_train_0.h5:sample_3_0: cbed_stack has 1 non-finite values (NaN or inf)")
    assert decide(_result(200, [3, 7, 150]), 200, skip_bad=True, max_bad=0.02).sum() == 197
    assert decide(_result(200, []), 200, skip_bad=False).all()


def test_skip_bad_on_damaged_data(data):
    index = _index(data)
    with h5py.File(data / TRAIN, "r+") as h5:
        DAMAGE["negative"][0](h5)
    result = _screen(index)
    assert decide(result, 3, skip_bad=True, max_bad=0.5).tolist() == [True, False, True]
    with pytest.raises(StemdlError, match=r"^1 of 3 samples \(33.3 %\) are bad, above the max_bad 1 % limit \(--set max_bad=F\); "
                                          f"first: {data / TRAIN}:sample_1_0: cbed_stack has 3 negative"):
        decide(result, 3, skip_bad=True)
    with pytest.raises(DataError, match=r"\(use --skip-bad to leave out up to 50 % bad samples\)$"):
        decide(result, 3, skip_bad=False, max_bad=0.5)


def test_without_pixels_no_image_data_is_read(data, monkeypatch):
    index = _index(data)

    def refuse(*args, **kwargs):
        raise OSError("image data read")

    for name in ("read_direct", "__getitem__", "__array__"):
        monkeypatch.setattr(h5py.Dataset, name, refuse)
    monkeypatch.setattr(DataFile, "stack", refuse)
    assert _screen(index, pixels=False).bad == []
    # The same patches do stop the pixel check, so the line above would have noticed a read.
    assert [b[2] for b in _screen(index, pixels=True).bad] == ["unreadable cbed_stack (image data read)"] * 3


# ---- several files, shared among ranks ------------------------------------------------------------------

def _small_set(root: Path, fixture_dir: Path, sizes: dict[str, list[int]]) -> Path:
    """Files of tiny (3, 8, 8) samples with the fixture's attributes: sizes[split][n] samples in file n."""
    rec = read_record(fixture_dir / "batch_train_0.h5", "sample_0_0")
    rng = np.random.default_rng(0)
    for split, counts in sizes.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for n, count in enumerate(counts):
            with h5py.File(root / split / f"batch_{split}_{n}.h5", "w") as h5:
                for i in range(count):
                    stack = rng.random((3, 8, 8), dtype=np.float32)
                    layout.write_sample(h5, f"sample_{n}_{i}", stack, rec)
    return root.resolve()


def _damage_some(root: Path) -> None:
    with h5py.File(root / "train" / "batch_train_1.h5", "r+") as h5:
        h5["sample_1_2/cbed_stack"][0, 0, 0] = np.nan
        h5["sample_1_4"].attrs["space_group"] = np.bytes_(b"0")
    with h5py.File(root / "train" / "batch_train_3.h5", "r+") as h5:
        h5["sample_3_0/cbed_stack"][1, 2, 3] = -1.0
    (root / "dev" / "batch_dev_1.h5").write_bytes(b"\0" * 64)


def _same(a: ScreenResult, b: ScreenResult) -> None:
    assert a.rows.tolist() == b.rows.tolist() and a.keep.tolist() == b.keep.tolist()
    assert a.bad == b.bad and a.checked == b.checked


def test_files_are_shared_contiguously_and_balanced_by_samples():
    assert file_owners([5, 1, 1, 1, 1, 1], 2).tolist() == [0, 1, 1, 1, 1, 1]
    owners = file_owners([120] * 20, 3)
    assert np.all(np.diff(owners) >= 0) and np.bincount(owners).tolist() == [7, 6, 7]
    assert file_owners([3, 4], 4).tolist() == [0, 2]  # more ranks than files: some screen nothing
    assert file_owners([0, 0], 2).tolist() == [0, 0]


def test_two_ranks_simulated_give_the_same_result_as_one(tmp_path, fixture_dir):
    root = _small_set(tmp_path / "d", fixture_dir, {"train": [3, 6, 2, 5, 4], "dev": [3, 3]})
    index = _index(root)
    _damage_some(root)
    rows = np.concatenate([index.select("dev"), index.select("train")[::-1]])  # any order of rows
    whole = screen(index, rows, pixels=True, workers=2, quiet=True)
    assert [(Path(f).name, g) for f, g, _ in whole.bad] == [
        ("batch_train_1.h5", "sample_1_2"), ("batch_train_1.h5", "sample_1_4"), ("batch_train_3.h5", "sample_3_0"),
        ("batch_dev_1.h5", None)]
    assert whole.count() == 6 and whole.checked == len(rows) == 26
    # train files hold entries 0-2, 3-8, 9-10, 11-15, 16-19; dev files 20-22, 23-25
    assert sorted(rows[~whole.keep].tolist()) == [5, 7, 11, 23, 24, 25]
    parts = [screen_part(index, rows, pixels=True, rank=r, world_size=2, workers=1, quiet=True) for r in (0, 1)]
    assert parts[0].checked + parts[1].checked == 26 and min(parts[0].checked, parts[1].checked) >= 10
    assert not set(parts[0].samples) & set(parts[1].samples)
    _same(merge(index, rows, parts), whole)
    for rank in (0, 1):
        _same(screen_distributed(index, rows, pixels=True, rank=rank, world_size=2, workers=1, quiet=True,
                                 allgather=lambda part, rank=rank: [part if r == rank else parts[r] for r in (0, 1)]),
              whole)


MPI_SCRIPT = textwrap.dedent("""
    import json, pickle, sys
    import numpy as np
    from stemdl.harness import dist
    from stemdl.workloads.spacegroup.data.screen import screen_distributed
    env = dist.setup(timeout_s=60)
    with open(sys.argv[1], "rb") as f:  # the index as it was before the damage, like a reused saved index
        index = pickle.load(f)
    rows = np.arange(len(index))
    res = screen_distributed(index, rows, pixels=True, rank=env.rank, world_size=env.world_size, workers=1,
                             quiet=True)
    found = {"keep": res.keep.tolist(), "bad": res.bad, "checked": res.checked}
    with open(f"{sys.argv[2]}/rank_{env.rank}.json", "w") as f:  # not stdout, where the ranks' lines mix
        json.dump(found, f)
    dist.teardown()
""")


def test_two_ranks_under_mpiexec_agree_with_one(tmp_path, fixture_dir):
    if mpiexec() is None:
        pytest.skip(SKIP_REASON)
    root = _small_set(tmp_path / "d", fixture_dir, {"train": [3, 6, 2, 5, 4], "dev": [3, 3]})
    index = _index(root)
    (tmp_path / "index.pkl").write_bytes(pickle.dumps(index))
    _damage_some(root)
    whole = screen(index, np.arange(len(index)), pixels=True, workers=1, quiet=True)
    proc = run_ranks([sys.executable, "-c", MPI_SCRIPT, tmp_path / "index.pkl", tmp_path])
    out = proc.stdout
    assert proc.returncode == 0, out
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank_{rank}.json").read_text())
        assert r["keep"] == whole.keep.tolist() and r["checked"] == whole.checked
        assert [tuple(b) for b in r["bad"]] == whole.bad
