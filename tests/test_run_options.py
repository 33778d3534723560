"""`stemdl run` with its optional machinery: checkpoints and resume, --skip-bad, losses, samplers, heads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from mpirun import MPI_ENV, mpiexec

from checks import check_log
from stemdl.cli import main


def mpi_env() -> dict:
    return {**os.environ, **MPI_ENV}


def run(data, log_dir, *extra, status=0) -> dict:
    assert main(["run", "--config", "smoke", "--data", str(data), "--log-dir", str(log_dir), *extra]) == status
    logs = sorted(log_dir.glob("result_*.txt"))
    return {"log": logs[-1], "metrics": json.loads(logs[-1].with_suffix(".metrics.json").read_text())}


def keys(log: Path) -> list[str]:
    return [json.loads(line.split(":::MLLOG ", 1)[1])["key"] for line in log.read_text().splitlines()
            if ":::MLLOG" in line]


# ---- checkpoints and resume

def test_resume_repeats_the_uninterrupted_history_and_is_marked(tiny_data, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    common = ["--epochs", "4", "--target", "1.0", "--set", "checkpoint_every=1", "--set", "checkpoint_keep=9",
              "--set", "batch_size=4"]
    full = run(tiny_data, tmp_path / "full", *common, "--set", f"checkpoint_dir={ckpt}")
    assert [p.name for p in sorted(ckpt.glob("epoch_*.pt"))] == [f"epoch_{e:04d}.pt" for e in range(1, 5)]
    assert not list(ckpt.glob(".*partial")), "checkpoints are renamed into place"
    resumed = run(tiny_data, tmp_path / "resumed", *common, "--set", f"checkpoint_dir={tmp_path / 'ckpt2'}",
                  "--resume", str(ckpt / "epoch_0002.pt"))
    want = [(h["epoch"], h["loss"], h["macro_f1"]) for h in full["metrics"]["history"]]
    got = [(h["epoch"], h["loss"], h["macro_f1"]) for h in resumed["metrics"]["history"]]
    assert got == want, "same data order, same weights: the same history, bit for bit on CPU"
    assert resumed["metrics"]["resumed_from"]["epoch"] == 2
    assert "resumed_from_checkpoint" in keys(resumed["log"])
    ok, messages = check_log(resumed["log"])
    assert not ok and any("resumed_from_checkpoint" in m for m in messages), "a resumed run is never compliant"
    assert "not a compliant timed run" in capsys.readouterr().out


def test_resume_refuses_another_config_or_a_foreign_file(tiny_data, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    run(tiny_data, tmp_path / "a", "--set", f"checkpoint_dir={ckpt}", "--set", "checkpoint_every=1")
    assert main(["run", "--config", "smoke", "--data", str(tiny_data), "--log-dir", str(tmp_path / "b"),
                 "--seed", "7", "--resume", str(ckpt)]) == 2
    assert "config key 'harness.seed' is 0 in the checkpoint but 7 now" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["run", "--config", "smoke", "--data", str(tiny_data), "--log-dir", str(tmp_path / "b"),
                 "--resume", str(tmp_path / "junk.pt")]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
    assert main(["run", "--config", "smoke", "--data", str(tiny_data), "--log-dir", str(tmp_path / "b"),
                 "--resume", str(tmp_path / "empty")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


# ---- bad samples

@pytest.fixture
def one_nan(tiny_data, tmp_path) -> tuple[Path, str]:
    """A copy of the tiny set whose first training sample has a NaN."""
    data = tmp_path / "data"
    for src in tiny_data.rglob("*.h5"):
        out = data / src.relative_to(tiny_data)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(src.read_bytes())
    first = sorted((data / "train").glob("*.h5"))[0]
    with h5py.File(first, "r+") as h5:
        group = sorted(h5)[0]
        stack = h5[group]["cbed_stack"][...]
        stack[0, 0, 0] = np.nan
        h5[group]["cbed_stack"][...] = stack
    return data, f"{first}:{group}"


def test_a_nan_stops_the_run_before_the_clock_naming_the_sample(one_nan, tmp_path, capsys):
    data, where = one_nan
    assert main(["run", "--config", "smoke", "--data", str(data), "--log-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert where in err and "non-finite" in err and "--skip-bad" in err
    assert not list((tmp_path / "runs").glob("result_*")), "a run that fails before the clock leaves no result"


def test_skip_bad_leaves_the_sample_out_logs_the_count_and_respects_the_limit(one_nan, tmp_path, capsys):
    data, where = one_nan
    result = run(data, tmp_path / "runs", "--skip-bad", "--set", "max_bad=0.1")
    assert result["metrics"]["bad_samples_skipped"] == 1
    assert '"key": "bad_samples_skipped", "value": 1' in result["log"].read_text()
    assert check_log(result["log"])[0]
    assert where in capsys.readouterr().err
    # 1 of 12 train+dev samples is above the default 1 %: refused, with the count
    assert main(["run", "--config", "smoke", "--data", str(data), "--log-dir", str(tmp_path / "r2"),
                 "--skip-bad"]) == 2
    assert "1 of 12 samples" in capsys.readouterr().err


# ---- imbalance and multitask options run end to end

@pytest.mark.parametrize("options", [
    ["--set", "loss=logit_adjusted", "--set", "sampler=balanced"],
    ["--set", "loss=drw", "--set", "drw_epoch=2", "--set", "sampler=sqrt"],
    ["--set", "tasks=space_group,lattice,crystal_system,centring", "--set", "task_weighting=learned"],
])
def test_imbalance_and_multitask_options_run_compliantly(tiny_data, tmp_path, options):
    result = run(tiny_data, tmp_path / "runs", *options)
    assert check_log(result["log"])[0]
    last = result["metrics"]["history"][-1]
    if "tasks=space_group,lattice,crystal_system,centring" in options:
        assert {"crystal_system_accuracy", "centring_accuracy", "lattice_mae_a"} <= set(last)
        assert last["lattice_mae_a"] > 0


def test_bad_imbalance_options_are_config_errors(tiny_data, tmp_path, capsys):
    for option, key in (("loss=hinge", "loss"), ("sampler=random", "sampler"), ("tasks=lattice", "tasks"),
                        ("focal_gamma=-1", "focal_gamma")):
        assert main(["run", "--config", "smoke", "--data", str(tiny_data), "--log-dir", str(tmp_path),
                     "--set", option]) == 2
        assert f"config key '{key}'" in capsys.readouterr().err
    assert not list(tmp_path.glob("result_*")), "refused before anything was written"


# ---- converted shards and staging

@pytest.fixture(scope="module")
def shards(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "tiny32"
    assert main(["convert", str(tiny_data), str(out), "--size", "32", "--workers", "1", "--quiet"]) == 0
    return out


def run_files(shards: Path) -> list[Path]:
    """What a run stages: the train and dev shards (not test)."""
    return [p for split in ("train", "dev") for p in (shards / split).glob("*.npy")]


def staging_stop(log: Path) -> dict:
    for line in log.read_text().splitlines():
        if '"key": "staging_stop"' in line:
            return json.loads(line.split(":::MLLOG ", 1)[1])["metadata"]
    raise AssertionError("no staging_stop")


def test_a_run_on_staged_shards_logs_the_bytes_and_removes_the_copy(shards, tmp_path):
    stage = tmp_path / "stage"
    stage.mkdir()
    result = run(shards, tmp_path / "runs", "--stage-dir", str(stage))
    meta = staging_stop(result["log"])
    files = run_files(shards)
    assert meta["bytes"] == sum(p.stat().st_size for p in files) and meta["files"] == len(files)
    order = keys(result["log"])
    assert order.index("staging_start") < order.index("staging_stop") < order.index("init_stop")
    assert check_log(result["log"])[0]
    assert list(stage.iterdir()) == [], "the staged copy is removed at exit"
    run(shards, tmp_path / "kept", "--stage-dir", str(stage), "--keep-staged")
    assert len(list(stage.iterdir())) == 1, "--keep-staged leaves it"


def test_shards_that_disagree_with_their_manifest_or_the_run_stop_it_before_the_clock(shards, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    for src in shards.rglob("*"):
        if src.is_file():
            out = damaged / src.relative_to(shards)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(src.read_bytes())
    images = sorted((damaged / "train").glob("*.images.npy"))[0]
    data = bytearray(images.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    images.write_bytes(bytes(data))
    args = ["run", "--config", "smoke", "--data", str(damaged), "--log-dir", str(tmp_path / "runs")]
    assert main(args + ["--set", "verify_shards=checksum"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(images) in err and "sha256" in err
    assert not list((tmp_path / "runs").glob("result_*")), "nothing was timed, no result is left"
    with open(images, "ab") as handle:  # now the size disagrees too: the default check sees it
        handle.write(b"x")
    assert main(args) == 2
    assert "manifest says" in capsys.readouterr().err
    assert main(["run", "--config", "smoke", "--data", str(shards), "--log-dir", str(tmp_path / "r2"),
                 "--set", "image_size=16"]) == 2
    assert "image_size" in capsys.readouterr().err


@pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (install the 'mpi' extra)")
def test_two_ranks_stage_once_per_node_and_train_on_shards(shards, tmp_path):
    stage = tmp_path / "stage"
    stage.mkdir()
    cmd = [mpiexec(), "-n", "2", sys.executable, "-m", "stemdl", "run", "--config", "smoke", "--data", str(shards),
           "--log-dir", str(tmp_path / "runs"), "--stage-dir", str(stage), "--set", "pipeline=torch"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=mpi_env())
    assert done.returncode == 0, done.stderr[-2000:]
    log = next((tmp_path / "runs").glob("result_*.txt"))
    assert staging_stop(log)["bytes"] == sum(p.stat().st_size for p in run_files(shards)), "once per node"
    assert check_log(log)[0]
    assert list(stage.iterdir()) == []


def test_node_scope_splits_the_shards_between_nodes_by_bytes(shards):
    from dataclasses import dataclass

    from stemdl.harness import dist
    from stemdl.workloads.spacegroup.data.prepare import node_scope
    from stemdl.harness.shards import ShardSet

    @dataclass(frozen=True)
    class TwoNodes:  # what one rank of node `node_rank` of a 2-node job sees (no second node here)
        node_rank: int
        number_of_nodes: int = 2
        local_world_size: int = 1

    train = ShardSet.open(shards).split("train")
    sizes = [int(sh["files"]["images"]["bytes"]) for sh in train.shards]
    dist.setup(timeout_s=30)
    try:
        scopes = [node_scope(train.shard_of, sizes, TwoNodes(n)) for n in (0, 1)]
    finally:
        dist.teardown()
    (first, mine0), (second, mine1) = scopes
    assert sorted(mine0 + mine1) == list(range(len(sizes))) and not set(mine0) & set(mine1)
    assert set(first.rows) == set(np.flatnonzero(np.isin(train.shard_of, mine0)))
    assert sorted(np.concatenate([first.rows, second.rows]).tolist()) == list(range(len(train)))


def test_a_node_scoped_run_stages_only_its_part(shards, tmp_path):
    stage = tmp_path / "stage"
    stage.mkdir()
    result = run(shards, tmp_path / "runs", "--stage-dir", str(stage), "--set", "shard_scope=node")
    assert check_log(result["log"])[0]
    assert staging_stop(result["log"])["files"] == len(run_files(shards)), "one node: all of it is its part"
    assert main(["run", "--config", "smoke", "--data", str(shards), "--log-dir", str(tmp_path / "r2"),
                 "--set", "shard_scope=node", "--set", "sampler=balanced"]) == 2
