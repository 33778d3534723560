"""`stemdl convert`: shards equal to the run's preprocessing of every raw sample, resumable, refusing what
it must, bad samples stopped or skipped, and the same bytes from 2 MPI ranks as from one process."""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from mpirun import MPI_ENV, mpiexec

from stemdl.workloads.spacegroup.data import convert, layout
from stemdl.workloads.spacegroup.data.index import load_or_build
from stemdl.workloads.spacegroup.data.reader import read_record, read_stack
from stemdl.harness.shards import ShardSet
from stemdl.harness.errors import DataError, StemdlError
from stemdl.workloads.spacegroup.preprocess import Preprocess
from stemdl.harness.progress import Progress

CHECK_SCRIPT = Path(__file__).resolve().parent / "mpi" / "convert_check.py"
ENV = {**os.environ, **MPI_ENV}


GROUPS = (14, 62, 194, 225)


def make_raw(root: Path, files=(("train", 4), ("train", 4), ("dev", 4), ("test", 4)), size: int = 128,
             seed: int = 0) -> Path:
    """A raw set in the public layout in milliseconds (the generator's physics is not needed here):
    normalized random patterns with some dark pixels, and valid attributes. `files`: (split, samples)."""
    rng = np.random.default_rng(seed)
    numbers, samples = Counter(), Counter()
    for split, n in files:
        path = root / split / f"batch_{split}_{numbers[split]}.h5"
        numbers[split] += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as h5:
            for i in range(samples[split], samples[split] + n):
                stack = rng.exponential(1.0, (3, size, size)) * (rng.random((3, size, size)) < 0.7)
                stack /= stack.sum(axis=(1, 2), keepdims=True)
                rec = layout.SampleRecord(
                    space_group=GROUPS[i % len(GROUPS)], material=f"syn-{split}-{i}", formula="Fe2 O3",
                    energy_keV=200, z_dirs=np.eye(3, dtype=np.int64), y_dirs=np.eye(3),
                    semi_angles_rad=np.full(3, 0.01), d_hkls_angstrom=np.ones(3),
                    abc_angstrom=rng.uniform(3, 10, 3), angles_degree=np.array([90.0, rng.uniform(90, 120), 90.0]))
                layout.write_sample(h5, f"sample_{i}_0", stack.astype(np.float32), rec)
        samples[split] += n
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """16 samples of 128x128 in 4 files of 4 (train 8, dev 4, test 4), like `stemdl synth --preset tiny`."""
    return make_raw(tmp_path_factory.mktemp("raw") / "tiny")


@pytest.fixture
def src(tiny, tmp_path) -> Path:
    """A copy of the tiny set this test may damage."""
    return Path(shutil.copytree(tiny, tmp_path / "src"))


def run_convert(*argv) -> int:
    parser = argparse.ArgumentParser()
    convert.configure(parser)
    return convert.run(parser.parse_args([str(a) for a in argv]))


def files_of(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def no_partials(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.endswith(".partial")]


def set_pixel(path: Path, group: str, value: float) -> None:
    with h5py.File(path, "r+") as h5:
        h5[group]["cbed_stack"][0, 5, 5] = value


def check_against_raw(src: Path, dst: Path, size: int, dtype: str) -> None:
    """Every stored sample equals Preprocess of its raw stack, stored as the raw pipeline stores it."""
    shards, index = ShardSet.open(dst, verify="checksum"), load_or_build(src, quiet=True)
    prep = Preprocess(size)
    for split in shards.splits:
        rows, data = index.select(split), shards.split(split)
        assert len(data) == len(rows) and data.image_shape == (3, size, size)
        images = data.read(np.arange(len(rows)))
        for k, i in enumerate(rows):
            path, group = index.file_path(i), index.group_name(i)
            u = prep(torch.from_numpy(read_stack(path, group)))
            want = u.round().to(torch.uint8) if dtype == "uint8" else u.to(torch.float16)
            assert np.array_equal(images[k], want.numpy()), (split, k)
            rec = read_record(path, group)
            assert data.fields["labels"][k] == rec.space_group - 1
            assert np.array_equal(data.fields["targets"][k], np.concatenate([rec.abc_angstrom, rec.angles_degree])
                                  .astype(np.float32))
            assert data.names[k] == f"{index.files[index.file_index[i]]}:{group}"
        counts = {str(g): int(n) for g, n in enumerate(index.class_counts(split)) if n}
        assert shards.manifest["splits"][split]["class_counts"] == counts


def test_uint8_shards_equal_the_runs_preprocessing_and_the_summary_gives_the_sizes(src, tmp_path, capsys):
    dst = tmp_path / "shards"
    assert run_convert(src, dst, "--size", "64", "--workers", "1", "--quiet") == 0
    check_against_raw(src, dst, 64, "uint8")
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["source"] == str(src.resolve()) and manifest["skipped"] == []
    assert manifest["preprocess"] == {"size": 64, "floor": 0.001, "ceiling": 10000.0, "dtype": "uint8"}
    assert [s["name"] for s in manifest["splits"]["train"]["shards"]] == ["train/00000", "train/00001"]
    assert [s["source"] for s in manifest["splits"]["train"]["shards"]] == ["train/batch_train_0.h5",
                                                                            "train/batch_train_1.h5"]
    assert {k: v["samples"] for k, v in manifest["splits"].items()} == {"train": 8, "dev": 4, "test": 4}
    lines = capsys.readouterr().out.strip().splitlines()
    train = manifest["splits"]["train"]
    total = sum(m["bytes"] for s in train["shards"] for m in s["files"].values())
    assert 64 * 64 * 3 < total / 8 < 64 * 64 * 3 + 200, "images, plus labels, targets, names and headers"
    assert lines[0] == (f"train: 8 samples in 2 shards, {total / 8:,.0f} bytes/sample, {total:,} bytes "
                        f"({convert._gib(total)}); the public set's 187,155 samples at 64x64 uint8: "
                        f"{convert._gib(total / 8 * 187_155)}")
    assert len(lines) == 4 and lines[3].endswith("16 samples at 64x64 uint8, 0 bad samples skipped")


def test_float16_from_two_worker_processes(src, tmp_path):
    dst = tmp_path / "f16"
    assert run_convert(src, dst, "--size", "32", "--dtype", "float16", "--workers", "2", "--quiet") == 0
    check_against_raw(src, dst, 32, "float16")
    assert ShardSet.open(dst).split("dev").dtype == np.float16


def test_real_layout_512_to_128_and_chosen_splits(copy_fixture, tmp_path):
    raw = copy_fixture(tmp_path / "raw")
    dst = tmp_path / "shards"
    assert run_convert(raw, dst, "--splits", "train", "--workers", "1", "--quiet") == 0
    check_against_raw(raw, dst, 128, "uint8")
    shards = ShardSet.open(dst)
    assert shards.splits == ["train"] and len(shards.split("train")) == 2
    with pytest.raises(StemdlError, match="has no test files"):
        run_convert(raw, tmp_path / "other", "--splits", "train,test", "--quiet")
    with pytest.raises(StemdlError, match=r"--splits 'train,tset'"):
        run_convert(raw, tmp_path / "other", "--splits", "train,tset", "--quiet")


def test_sigterm_leaves_finished_shards_and_a_rerun_converts_only_the_rest(src, tmp_path, monkeypatch, capsys):
    dst = tmp_path / "shards"
    real, calls = convert.convert_shard, []

    def second_one_is_interrupted(job):
        calls.append(job.name)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises in this process, mid-shard
        return real(job)

    monkeypatch.setattr(convert, "convert_shard", second_one_is_interrupted)
    assert run_convert(src, dst, "--size", "32", "--workers", "1", "--quiet") == 143
    assert "SIGTERM on rank 0: stopped" in capsys.readouterr().err
    monkeypatch.setattr(convert, "convert_shard", real)
    assert not (dst / "manifest.json").exists() and no_partials(dst)
    done = sorted(p.name for p in dst.rglob("*.done.json"))
    first = calls[0]
    assert [f"{first.split('/')[1]}.done.json"] == done
    assert not list((dst / calls[1].split("/")[0]).glob(f"{calls[1].split('/')[1]}.*")), "nothing of the 2nd"
    kept = {name: p.stat().st_mtime_ns for name, p in files_of(dst).items() if name.startswith(first)}
    assert len(kept) == 5
    stray = dst / "train" / ".00001.images.npy.partial"
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"half a shard")
    leftover = dst / "train" / "00001.images.npy"  # renamed, but stopped before its sidecar: redone
    leftover.write_bytes(b"not an array")
    assert run_convert(src, dst, "--size", "32", "--workers", "1", "--quiet") == 0
    assert {name: p.stat().st_mtime_ns for name, p in files_of(dst).items() if name.startswith(first)} == kept
    assert no_partials(dst)
    check_against_raw(src, dst, 32, "uint8")
    manifest = (dst / "manifest.json").stat().st_mtime_ns
    assert run_convert(src, dst, "--size", "32", "--quiet") == 0
    assert (dst / "manifest.json").stat().st_mtime_ns == manifest, "a rerun with nothing to do changes nothing"


class SignalAfterFirstShard(Progress):
    """Progress that sends this process SIGTERM when the first shard is reported done."""

    def update(self, n: int = 1) -> None:
        super().update(n)
        if self.done == n:
            os.kill(os.getpid(), signal.SIGTERM)


def terminated(job):  # module level: pickled by name into the (forked) worker
    os.kill(os.getpid(), signal.SIGTERM)  # a worker ends on SIGTERM; the parent reports it and cleans up
    time.sleep(30)


def test_sigterm_stops_the_worker_processes_and_leaves_no_partial_file(src, tmp_path, monkeypatch):
    dst = tmp_path / "shards"
    monkeypatch.setattr(convert, "Progress", SignalAfterFirstShard)
    assert run_convert(src, dst, "--size", "32", "--workers", "2", "--quiet") == 143
    assert not (dst / "manifest.json").exists() and no_partials(dst)
    assert 1 <= len(list(dst.rglob("*.done.json"))) <= 4
    monkeypatch.setattr(convert, "Progress", Progress)
    assert run_convert(src, dst, "--size", "32", "--workers", "2", "--quiet") == 0
    check_against_raw(src, dst, 32, "uint8")
    monkeypatch.setattr(convert, "convert_shard", terminated)
    with pytest.raises(StemdlError, match="a conversion worker process died"):
        run_convert(src, tmp_path / "other", "--size", "32", "--workers", "2", "--quiet")
    assert no_partials(tmp_path / "other")


def test_a_changed_source_file_is_converted_again(src, tmp_path):
    dst = tmp_path / "shards"
    assert run_convert(src, dst, "--size", "16", "--workers", "1", "--quiet") == 0
    before = {n: p.stat().st_mtime_ns for n, p in files_of(dst).items() if n.endswith(".images.npy")}
    set_pixel(src / "test" / "batch_test_0.h5", "sample_1_0", 0.5)
    assert run_convert(src, dst, "--size", "16", "--workers", "1", "--quiet") == 0
    after = {n: p.stat().st_mtime_ns for n, p in files_of(dst).items() if n.endswith(".images.npy")}
    assert [n for n in before if before[n] != after[n]] == ["test/00000.images.npy"]
    check_against_raw(src, dst, 16, "uint8")


def test_other_settings_another_source_and_foreign_folders_are_refused(src, tmp_path, tiny):
    dst = tmp_path / "shards"
    assert run_convert(src, dst, "--size", "16", "--quiet") == 0
    before = files_of(dst)
    for argv, words in [((src, dst, "--size", "32"), "size 16 uint8"),
                        ((src, dst, "--size", "16", "--dtype", "float16"), "not of"),
                        ((tiny, dst, "--size", "16"), f"not of {tiny.resolve()} at size 16")]:
        with pytest.raises(StemdlError, match=words) as err:
            run_convert(*argv, "--quiet")
        assert "\n" not in str(err.value) and "choose another DST" in str(err.value)
    assert files_of(dst) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(StemdlError, match="is not a stemdl shard folder"):
        run_convert(src, foreign, "--quiet")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    with pytest.raises(StemdlError, match="exists and is not a folder"):
        run_convert(src, foreign / "notes.txt", "--quiet")
    with pytest.raises(StemdlError, match="--size 256 is larger than the data's 128x128"):
        run_convert(src, tmp_path / "big", "--size", "256", "--quiet")
    assert not (tmp_path / "big").exists(), "nothing is created before the checks pass"


def test_bad_sample_stops_with_one_line_or_is_skipped_below_max_bad(src, tmp_path, capsys):
    dst = tmp_path / "shards"
    set_pixel(src / "train" / "batch_train_1.h5", "sample_6_0", np.nan)
    with pytest.raises(DataError) as err:
        run_convert(src, dst, "--size", "16", "--workers", "1", "--quiet")
    message = str(err.value)
    assert "\n" not in message and "batch_train_1.h5:sample_6_0: cbed_stack has 1 non-finite values" in message
    assert not (dst / "manifest.json").exists() and no_partials(dst)
    finished = {n: p.stat().st_mtime_ns for n, p in files_of(dst).items() if n.endswith(".done.json")}
    assert finished and "train/00001.done.json" not in finished
    with pytest.raises(StemdlError, match=r"1 of 16 samples are bad \(6.25%\), more than --max-bad 0.01; the "
                                          r"first: train/batch_train_1.h5:sample_6_0: cbed_stack has 1 non-finite"):
        run_convert(src, dst, "--size", "16", "--workers", "1", "--skip-bad", "--quiet")
    assert run_convert(src, dst, "--size", "16", "--skip-bad", "--max-bad", "0.1", "--quiet") == 0
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["skipped"] == [{"sample": "train/batch_train_1.h5:sample_6_0",
                                    "reason": "cbed_stack has 1 non-finite values (NaN or inf)"}]
    assert manifest["splits"]["train"]["samples"] == 7
    assert {n: p.stat().st_mtime_ns for n, p in files_of(dst).items() if n in finished} == finished, "resumed"
    assert capsys.readouterr().out.strip().endswith("1 bad samples skipped")
    train = ShardSet.open(dst).split("train")
    assert "train/batch_train_1.h5:sample_6_0" not in train.names and len(train) == 7
    with pytest.raises(DataError, match="sample_6_0: cbed_stack has 1 non-finite"):  # never silently reused
        run_convert(src, dst, "--size", "16", "--quiet")


def test_negative_values_and_bad_attributes_are_named_and_skippable(src, tmp_path):
    set_pixel(src / "dev" / "batch_dev_0.h5", "sample_2_0", -1.0)
    with pytest.raises(DataError, match=r"batch_dev_0.h5:sample_2_0: cbed_stack has 1 negative values \(min -1\)"):
        run_convert(src, tmp_path / "a", "--size", "16", "--quiet")
    with h5py.File(src / "test" / "batch_test_0.h5", "r+") as h5:
        h5["sample_0_0"].attrs["space_group"] = np.bytes_(b"999")
    # The index refuses the attribute; --skip-bad converts around it.
    with pytest.raises(DataError, match="batch_test_0.h5:sample_0_0: space_group 999 is outside 1..230"):
        run_convert(src, tmp_path / "b", "--size", "16", "--quiet")
    assert run_convert(src, tmp_path / "c", "--size", "16", "--skip-bad", "--max-bad", "0.2", "--quiet") == 0
    skipped = json.loads((tmp_path / "c" / "manifest.json").read_text())["skipped"]
    assert [(s["sample"], s["reason"]) for s in skipped] == [
        ("dev/batch_dev_0.h5:sample_2_0", "cbed_stack has 1 negative values (min -1)"),
        ("test/batch_test_0.h5:sample_0_0", "space_group 999 is outside 1..230")]


def test_a_flipped_exponent_that_stays_finite_is_named_not_converted(src, tmp_path):
    # 0.0039 with an exponent bit flipped is 1.3e36: finite and positive, but no measured intensity.
    set_pixel(src / "train" / "batch_train_0.h5", "sample_1_0", 1.3e36)
    with pytest.raises(DataError, match=r"batch_train_0.h5:sample_1_0: cbed_stack has 1 implausible values "
                                        r"\(max 1.3e\+36, above 1e\+30\)"):
        run_convert(src, tmp_path / "a", "--size", "16", "--quiet")
    left = sorted(p.name for p in (tmp_path / "a" / "train").iterdir())
    assert not [n for n in left if n.startswith("00000.") or n.endswith(".partial")], \
        "the damaged sample's shard is not written, not even in part; the others are kept for a rerun"


def test_shards_are_dealt_by_sample_count():
    jobs = [convert.ShardJob("s", "d", f"train/{k:05d}", "f", n, (3, 8, 8), {}, False)
            for k, n in enumerate([5, 1, 9, 4, 4])]
    shares = convert.assign(jobs, 2)
    assert [[j.samples for j in share] for share in shares] == [[9, 4], [5, 4, 1]]
    assert sorted(j.name for s in shares for j in s) == sorted(j.name for j in jobs)
    assert convert.assign(jobs, 3) == [[jobs[2]], [jobs[0], jobs[1]], [jobs[3], jobs[4]]]
    assert convert.assign([], 2) == [[], []]


@pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (install the 'mpi' extra)")
def test_two_mpi_ranks_write_the_same_bytes_and_share_an_error(src, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_convert(src, one, "--size", "32", "--workers", "1", "--quiet") == 0
    cmd = [mpiexec(), "-n", "2", sys.executable, str(CHECK_SCRIPT), str(src), str(two), "--size", "32",
           "--workers", "1", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("bad samples skipped") == 1, "only rank 0 prints the summary"
    a, b = files_of(one), files_of(two)
    assert a.keys() == b.keys()
    for name in a:
        if name in ("manifest.json", "convert.json"):
            ja, jb = (json.loads(p.read_text()) for p in (a[name], b[name]))
            assert {**ja, "created": 0, "started": 0} == {**jb, "created": 0, "started": 0}
        else:
            assert a[name].read_bytes() == b[name].read_bytes(), name
    set_pixel(src / "test" / "batch_test_0.h5", "sample_3_0", np.inf)
    cmd = [mpiexec(), "-n", "2", sys.executable, str(CHECK_SCRIPT), str(src), str(tmp_path / "bad"), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2, proc.stderr[-3000:]
    # Every rank ends with the same line (counted, not split into lines: the ranks' stderr may interleave).
    line = "stemdl convert: error: {}:sample_3_0: cbed_stack has 1 non-finite values (NaN or inf)"
    assert proc.stderr.count(line.format(src.resolve() / "test" / "batch_test_0.h5")) == 2, proc.stderr[-3000:]


def _remount(where: Path, kib: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={kib}k", str(where)], check=True, capture_output=True)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_full_disk_is_one_line_naming_the_file_keeps_finished_shards_and_resumes(tiny_data, small_disk, workers,
                                                                                capfd):
    from stemdl.cli import main

    disk = small_disk(160)  # convert.json and two shards at 64x64 (68 KiB each on a tmpfs), not four
    dst = disk / "shards"
    assert main(["convert", str(tiny_data), str(dst), "--size", "64", "--workers", workers, "--quiet"]) == 2
    err = capfd.readouterr().err  # fd-level: what the worker processes print too
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"stemdl convert: error: {dst.resolve()}/") and f": cannot write it (no space left on device ({disk}: " in err, err
    assert no_partials(dst) and not (dst / "manifest.json").exists()
    done = sorted(n[:-len(".done.json")] for n in files_of(dst) if n.endswith(".done.json"))
    shards = {n.split(".")[0] for n in files_of(dst) if n.endswith(".npy")}
    assert done and sorted(shards) == done, "finished shards whole, nothing of the failed ones"
    kept = {n: p.stat().st_mtime_ns for n, p in files_of(dst).items() if n != "convert.json"}
    _remount(disk, 1024)
    assert main(["convert", str(tiny_data), str(dst), "--size", "64", "--workers", workers, "--quiet"]) == 0
    assert {n: p.stat().st_mtime_ns for n, p in files_of(dst).items() if n in kept} == kept, "resumed"
    assert len(ShardSet.open(dst, verify="checksum").split("train")) == 8


# The parent of a slow conversion: 0.2 s a sample, so that its workers are mid-shard when it is killed.
SLOW_CONVERT = """import sys, time
from stemdl.workloads.spacegroup.data import convert
read = convert._read_sample
convert._read_sample = lambda *a: (time.sleep(0.2), read(*a))[1]
if sys.argv[1] == "no-pdeathsig":  # only the workers' own os.getppid() check is left
    convert.die_with_parent = lambda parent: None
from stemdl.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("guard", ["pdeathsig", "no-pdeathsig"])
def test_the_workers_of_a_killed_convert_end_within_a_second(tmp_path, guard):
    raw = make_raw(tmp_path / "raw", files=(("train", 8),) * 4, size=32)
    dst = tmp_path / "shards"
    log = open(tmp_path / "log", "w")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, guard, "convert", str(raw), str(dst), "--size",
                             "16", "--workers", "2", "--quiet"], stdout=log, stderr=subprocess.STDOUT)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while not (len(workers) >= 2 and not no_partials(dst)):  # both workers started, a shard being written
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
            workers = _children(proc.pid)
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        gone = time.monotonic() + 3
        while any(map(_alive, workers)) and time.monotonic() < gone:
            time.sleep(0.05)
        assert not [w for w in workers if _alive(w)], "workers outlived their killed parent"
        assert not list(dst.rglob("*.done.json")), "no shard was finished after the kill"
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        log.close()
