"""`stemdl bench io` runs end to end on a tiny set and prints (and writes) every row; no timing is judged."""

import json
import os
import tempfile

import numpy as np
import pytest

from test_convert import make_raw, run_convert

from stemdl.workloads.spacegroup.bench import io as bench_io
from stemdl.cli import main
from stemdl.harness.shards import ShardSet

# The smallest useful run: 16x16 shards, batches of 4, one round of 2 timed steps, one forked worker, and one
# torch thread (two spinning threads on a busy 2-core machine make a 16x16 step take half a second).
TINY = ["--size", "16", "--batch", "4", "--steps", "2", "--rounds", "1", "--warmup", "1", "--epochs", "1",
        "--workers", "1", "--step-workers", "1", "--threads", "1"]

ROWS = ["raw .h5 files, 8 MiB reads, page cache", "raw .h5 files, 8 MiB reads, disk",
        "cbed_stack, h5py read_direct, page cache", "cbed_stack, h5py read_direct, disk",
        "shard .images.npy, 8 MiB reads, page cache", "shard .images.npy, 8 MiB reads, disk",
        "raw HDF5 -> preprocess, torch, 1 workers", "shards -> torch, read in the training process",
        "shards, batch gathers (split.read), no pipeline", "shards -> dali (CPU ops), 1 threads",
        "shards -> torch DataLoader, 1 worker processes (not used)", "shards -> memory pipeline"]
STEPS = ["in memory (batches held)", "memory pipeline", "torch on shards, in process", "dali, 1 threads",
         "torch on raw HDF5, 1 workers"]


@pytest.fixture(scope="module")
def report(tiny_data, tmp_path_factory):
    """One run into a private temp folder (to see that the converted shards are removed after)."""
    tmp = tmp_path_factory.mktemp("benchio")
    out = tmp / "io.json"
    old = tempfile.tempdir
    tempfile.tempdir = str(tmp)
    try:
        import contextlib
        import io

        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            rc = main(["bench", "io", "--data", str(tiny_data), *TINY, "--json", str(out)])
    finally:
        tempfile.tempdir = old
    return rc, stdout.getvalue(), out, tmp


def test_prints_every_row_and_the_targets(report):
    rc, text, _, _ = report
    assert rc == 0
    for what in ROWS + STEPS:
        assert what in text, what
    assert "posix_fadvise" in text or "drop_caches" in text  # the cold rows say how the cache was emptied
    assert text.count("target: ") == 2 + len(STEPS) - 1


def test_json_holds_the_same_rows_with_finite_figures(report):
    _, _, out, _ = report
    found = json.loads(out.read_text())
    assert [r["what"] for r in found["rates"]][:6] == ROWS[:6]
    assert [s["what"] for s in found["steps"]] == STEPS
    assert all(np.isfinite(r["samples_per_s"]) and r["samples_per_s"] > 0 for r in found["rates"])
    assert all(len(s["step_s"]) == 2 and s["per_epoch_s"] >= s["mean_s"] > 0 for s in found["steps"])
    assert found["samples"] == 8 and found["machine"]["cores"] == os.cpu_count()


def test_the_temporary_shards_are_removed(report):
    _, _, out, tmp = report
    assert out.exists() and not list(tmp.glob("stemdl-bench-io-*"))


def test_an_existing_json_is_never_overwritten(tiny_data, tmp_path, capsys):
    out = tmp_path / "io.json"
    out.write_text("mine")
    assert main(["bench", "io", "--data", str(tiny_data), *TINY, "--json", str(out)]) == 2
    assert out.read_text() == "mine"
    assert f"--json {out}: exists" in capsys.readouterr().err


def test_shards_of_another_size_are_refused(tiny_data, tmp_path, capsys):
    assert main(["convert", str(tiny_data), str(tmp_path / "s"), "--size", "8", "--splits", "train,dev",
                 "--workers", "1", "--quiet"]) == 0
    assert main(["bench", "io", "--data", str(tiny_data), *TINY, "--shards", str(tmp_path / "s")]) == 2
    assert "holds 8x8 shards, --size asks for 16" in capsys.readouterr().err


def test_fewer_samples_than_a_batch_are_refused(tiny_data, capsys):
    assert main(["bench", "io", "--data", str(tiny_data), *TINY, "--samples", "3"]) == 2
    assert "--samples 3: fewer than one batch of 4" in capsys.readouterr().err


def test_cached_fraction_sees_a_file_read_and_evicted(tmp_path):
    path = tmp_path / "blob"
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())  # clean pages: what posix_fadvise can drop
    bench_io.read_files([path])
    assert bench_io.cached_fraction([path]) == 1.0
    how = bench_io.evict([path])
    assert how.startswith(("posix_fadvise", "drop_caches"))
    if how.startswith("posix_fadvise DONTNEED (0"):
        assert bench_io.cached_fraction([path]) <= 0.01


def test_a_closed_split_lets_its_shards_be_evicted(tmp_path):
    """bench io evicts the shards before each round's disk read: a split's open maps must not pin them."""
    make_raw(tmp_path / "raw")
    assert run_convert(tmp_path / "raw", tmp_path / "shards", "--size", "16") == 0
    train = ShardSet.open(tmp_path / "shards").split("train")
    paths = [tmp_path / "shards" / p for p in train.files() if p.endswith(".images.npy")]
    for path in paths:  # written files: clean pages once on disk
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
    before = train.read(np.arange(len(train)))  # maps and touches every page of the images
    bench_io.evict(paths)
    if bench_io.cached_fraction(paths) is None:
        pytest.skip("mincore(2) is not available here")
    assert bench_io.cached_fraction(paths) > 0.5, "mapped pages stay in the page cache"
    train.close()
    if not bench_io.evict(paths).startswith("posix_fadvise DONTNEED (0"):
        pytest.skip("this file system keeps clean pages despite posix_fadvise")
    assert bench_io.cached_fraction(paths) <= 0.01
    assert np.array_equal(train.read(np.arange(len(train))), before)  # reopened on demand
