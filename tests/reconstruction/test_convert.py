"""Reconstruction shards (`stemdl convert --benchmark stemdl_reconstruction`): the stored float16 bytes of
every sample, a run from them equal to a run from the HDF5 set, bad samples as one line or skipped and
listed, resumption, foreign folders refused, and two MPI ranks writing the same shards as one process."""

import json
import os
import sys

import numpy as np
import pytest

from mpirun import run_ranks
from stemdl.cli import main
from stemdl.harness.errors import DataError, StemdlError
from stemdl.harness.shards import ShardSet
from stemdl.workloads.reconstruction.convert import convert
from stemdl.workloads.reconstruction.data import Index, screen

from .test_data import damage, nan_pattern

NAME = "stemdl_reconstruction"


def shard_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.npy"))}


def test_the_shards_hold_every_sample_as_stored(smoke_data, tmp_path):
    manifest = convert(smoke_data, tmp_path / "shards", quiet=True)
    assert [k["name"] for k in manifest["kinds"]] == ["cbed", "potential", "names"]
    assert {s: manifest["splits"][s]["samples"] for s in ("train", "dev", "test")} == {"train": 12, "dev": 5, "test": 3}
    shards = ShardSet.open(tmp_path / "shards", verify="checksum")
    dev = shards.split("dev")
    index = Index.build(smoke_data)
    rows = index.select("dev")
    _, potentials, _ = screen(index, rows)
    x = dev.read(np.arange(5))
    assert x.dtype == np.float16 and x.shape == (5, 4, 32, 32)
    assert np.array_equal(dev.fields["potential"], potentials.astype(np.float32))
    import h5py

    with h5py.File(smoke_data / "dev" / "batch_dev_1.h5") as h5:
        assert np.array_equal(x[4], h5["sample_4_0/cbed"][()])
    assert dev.name_of(4).endswith("dev/batch_dev_1.h5:sample_4_0")
    # bytes per sample: the stack's float16 values, as in the HDF5 file, plus a .npy header per shard
    per_sample = 4 * 32 * 32 * 2
    cbed_bytes = sum(s["files"]["cbed"]["bytes"] for s in manifest["splits"]["train"]["shards"])
    assert 12 * per_sample < cbed_bytes <= 12 * per_sample + 128 * len(manifest["splits"]["train"]["shards"])


def dali_installed() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def test_a_run_from_shards_equals_the_run_from_the_hdf5_set(smoke_data, tmp_path):
    convert(smoke_data, tmp_path / "shards", quiet=True)
    runs = [(smoke_data, "memory", []), (tmp_path / "shards", "memory", []),
            (tmp_path / "shards", "torch", ["--stage-dir", str(tmp_path / "stage")])]
    if dali_installed():
        runs.append((tmp_path / "shards", "dali", []))
    histories = []
    for k, (data, pipeline, extra) in enumerate(runs):
        log = tmp_path / f"log{k}"
        assert main(["run", "--benchmark", NAME, "--config", "smoke", "--data", str(data), "--log-dir", str(log),
                     "--set", f"pipeline={pipeline}", *extra]) == 0
        metrics = json.loads((log / "result_0.metrics.json").read_text())
        histories.append([(h["loss"], h["mae"], h["rmse"]) for h in metrics["history"]])
    assert all(h == histories[0] for h in histories[1:]), histories
    assert not list((tmp_path / "stage").iterdir()), "the staged copy is removed at exit"


def test_classification_shards_are_refused_by_name(smoke_data, tmp_path):
    convert(smoke_data, tmp_path / "shards", quiet=True)
    manifest_path = tmp_path / "shards" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["preprocess"] = {"size": 64}
    manifest_path.write_text(json.dumps(manifest))
    assert main(["run", "--benchmark", NAME, "--config", "smoke", "--data", str(tmp_path / "shards"),
                 "--log-dir", str(tmp_path / "log")]) == 2


def test_a_bad_sample_stops_the_conversion_in_one_line_or_is_skipped(smoke_copy, tmp_path, capsys):
    damage(smoke_copy, "train/batch_train_1.h5", "sample_5_0", nan_pattern)
    where = f"{smoke_copy / 'train' / 'batch_train_1.h5'}:sample_5_0"
    with pytest.raises(DataError) as caught:
        convert(smoke_copy, tmp_path / "a", quiet=True)
    assert str(caught.value) == f"{where}: cbed pattern 3 has 1 NaN or infinite values"
    assert not (tmp_path / "a" / "manifest.json").exists() and not list((tmp_path / "a").rglob("*.npy"))
    assert main(["convert", str(smoke_copy), str(tmp_path / "a"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == f"stemdl convert: error: {where}: cbed pattern 3 has 1 NaN or infinite values"
    with pytest.raises(StemdlError, match="1 of 20 samples are bad, more than max_bad 0.01"):
        convert(smoke_copy, tmp_path / "a", skip_bad=True, quiet=True)
    manifest = convert(smoke_copy, tmp_path / "b", skip_bad=True, max_bad=0.1, quiet=True)
    assert manifest["skipped"] == [{"sample": where, "reason": "cbed pattern 3 has 1 NaN or infinite values"}]
    assert manifest["splits"]["train"]["samples"] == 11
    names = ShardSet.open(tmp_path / "b").split("train").names
    assert not any(n.endswith("batch_train_1.h5:sample_5_0") for n in names) and len(names) == 11


def test_an_interrupted_conversion_is_finished_and_others_are_refused(smoke_data, tmp_path):
    dst = tmp_path / "shards"
    convert(smoke_data, dst, quiet=True)
    whole = shard_bytes(dst)
    kept = dst / "train" / "00000.cbed.npy"
    stamp = kept.stat().st_mtime_ns
    (dst / "manifest.json").unlink()  # the run stopped before its end: one shard and the manifest missing
    for p in (dst / "dev").glob("00001.*"):
        p.unlink()
    convert(smoke_data, dst, quiet=True)
    assert shard_bytes(dst) == whole and kept.stat().st_mtime_ns == stamp, "finished shards are kept"
    other = tmp_path / "other"
    other.mkdir()
    os.symlink(smoke_data / "train", other / "train")
    with pytest.raises(StemdlError, match="already holds shards of"):
        convert(other, dst, quiet=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(StemdlError, match="holds other files"):
        convert(smoke_data, tmp_path / "mine", quiet=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_two_ranks_write_the_shards_of_one_process(smoke_data, tmp_path):
    convert(smoke_data, tmp_path / "one", quiet=True)
    proc = run_ranks([sys.executable, "-m", "stemdl", "convert", smoke_data, tmp_path / "two", "--quiet"], timeout=300)
    assert proc.returncode == 0, proc.stdout
    assert shard_bytes(tmp_path / "two") == shard_bytes(tmp_path / "one")
    one, two = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two"))
    assert one["splits"] == two["splits"]
