"""`stemdl run` against what schedulers and users do to it: runs released at one instant into one folder,
a disk that fills during the run, a loss that diverges, outputs that cannot be written, settings that
would fail late. Each ends with one line naming the file, a non-zero exit and nothing partial left.
The runs use the test workload (tests/toy_workload: seconds each)."""

import json
import multiprocessing
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from stemdl.cli import main
from stemdl.harness import loop

TESTS = Path(__file__).resolve().parent
TOY_ENV = {"STEMDL_WORKLOADS": "toy=toy_workload",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}


@pytest.fixture
def toy(monkeypatch):
    for key, value in TOY_ENV.items():
        monkeypatch.setenv(key, value)


def toy_run(log_dir, *extra) -> int:
    return main(["run", "--benchmark", "toy", "--log-dir", str(log_dir), *extra])


def last_error_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_claims_released_at_once_never_share_an_index(tmp_path):
    barrier, claimed = threading.Barrier(16), []

    def claim():
        barrier.wait()
        claimed.append(loop.result_paths(tmp_path)["log"].name)

    threads = [threading.Thread(target=claim) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed, key=lambda n: int(n[7:-4])) == [f"result_{i}.txt" for i in range(16)]


def test_an_index_whose_config_or_metrics_exist_is_not_reused(tmp_path):
    (tmp_path / "result_0.metrics.json").write_text("{}")  # a user's file, result_0.txt gone
    assert loop.result_paths(tmp_path)["log"].name == "result_1.txt"
    assert (tmp_path / "result_0.metrics.json").read_text() == "{}"


def _release(barrier, log_dir, queue):
    os.environ.update(TOY_ENV)
    sys.path.insert(0, str(TESTS))
    barrier.wait()
    queue.put(main(["run", "--benchmark", "toy", "--log-dir", str(log_dir)]))


def test_two_runs_released_by_one_barrier_write_two_compliant_logs(tmp_path):
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, as a job array starts them
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_release, args=(barrier, tmp_path, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [queue.get(timeout=5) for _ in procs] == [0, 0]
    assert sorted(p.name for p in tmp_path.glob("result_*.txt")) == ["result_0.txt", "result_1.txt"]
    for i in range(2):
        lines = (tmp_path / f"result_{i}.txt").read_text().splitlines()
        assert sum('"key": "run_start"' in line for line in lines) == 1, "each log is one run's"
        assert json.loads((tmp_path / f"result_{i}.metrics.json").read_text())["status"] == "success"


def test_a_run_that_fails_before_the_clock_leaves_no_result(toy, tmp_path, capsys):
    assert main(["run", "--config", "smoke", "--data", str(tmp_path / "missing"),
                 "--log-dir", str(tmp_path / "runs")]) == 2
    assert "missing" in last_error_line(capsys)
    assert list((tmp_path / "runs").iterdir()) == [], "no stub result_<i>.txt piles up"


def test_a_disk_that_fills_during_the_run_stops_it_with_the_reason(toy, small_disk, capsys):
    disk = small_disk(16)
    filler = disk / "filler"
    with open(filler, "wb") as f:  # leave about 3 KiB: the log's first lines fit, the epochs do not
        f.write(b"\0" * (13 * 1024))
    assert toy_run(disk / "runs", "--set", "epochs=12", "--set", "target=0.0001") == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert "result_0.txt" in line and "no space left on device" in line and "the run stops" in line
    assert "Traceback" not in err and "Logging error" not in err
    assert not [p for p in (disk / "runs").iterdir() if "partial" in p.name]


def test_a_diverging_loss_stops_the_run_and_the_metrics_stay_valid_json(toy, tmp_path, capsys):
    assert toy_run(tmp_path, "--set", "base_lr=1.0e+30") == 1
    out = capsys.readouterr().out
    assert "the run stopped: the training loss is" in out and "epoch 1" in out and "run_stop aborted" in out
    doc = json.loads((tmp_path / "result_0.metrics.json").read_text())  # bare NaN would not parse
    assert doc["status"] == "aborted" and doc["diverged"].startswith("the training loss is")
    stops = [json.loads(line.split(":::MLLOG ", 1)[1]) for line in (tmp_path / "result_0.txt").read_text().splitlines()
             if '"key": "run_stop"' in line]
    assert stops[0]["metadata"]["status"] == "aborted" and "loss" in stops[0]["metadata"]["reason"]


def test_two_ranks_stop_together_when_the_loss_diverges(tmp_path):
    from mpirun import run_ranks

    env_before = dict(os.environ)
    os.environ.update(TOY_ENV)
    try:
        proc = run_ranks([sys.executable, "-m", "stemdl", "run", "--benchmark", "toy", "--log-dir", tmp_path,
                          "--set", "base_lr=1.0e+30"])
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    assert proc.returncode == 1, proc.stdout
    assert "the run stopped: the training loss is" in proc.stdout and "Traceback" not in proc.stdout


@pytest.mark.parametrize("where, says", [("/proc/x", "cannot write there"), ("FILE", "exists and is not a folder")])
def test_an_unwritable_log_dir_is_one_line_before_any_work(toy, tmp_path, capsys, where, says):
    if where == "FILE":
        where = tmp_path / "a_file"
        where.write_text("mine")
    assert toy_run(where) == 2
    line = last_error_line(capsys)
    assert line.startswith("stemdl run: error: --log-dir") and says in line


def test_a_read_only_log_dir_is_one_line(toy, small_disk, capsys):
    disk = small_disk(64)
    proc = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot remount read-only here ({proc.stderr.strip()})")
    assert toy_run(disk / "runs") == 2
    assert "Read-only file system" in last_error_line(capsys)


def test_settings_that_would_fail_late_are_refused_first(toy, tmp_path, capsys):
    assert toy_run(tmp_path / "r", "--resume", str(tmp_path / "nothing.pt")) == 2
    line = last_error_line(capsys)
    assert "--resume" in line and "no such file" in line
    assert main(["run", "--config", "smoke", "--stage-dir", str(tmp_path / "stage"),
                 "--log-dir", str(tmp_path / "r")]) == 2
    line = last_error_line(capsys)
    assert "--stage-dir" in line and "not a shard folder" in line
    assert not (tmp_path / "stage").exists() and not list((tmp_path / "r").glob("result_*"))


def test_an_image_size_the_data_to_generate_cannot_give_is_refused_before_generating(tmp_path):
    from stemdl.harness.config import load_config
    from stemdl.harness.errors import StemdlError
    from stemdl.workloads import REGISTRY

    values = {"harness.data": str(tmp_path / "absent"), "harness.synth_preset": "tiny"}
    with pytest.raises(StemdlError, match=r"'image_size': 256 is larger than the 128x128 patterns .* 'tiny'"):
        load_config(REGISTRY["stemdl"], "smoke", {**values, "workload.image_size": 256})
    assert load_config(REGISTRY["stemdl"], "smoke", {**values, "workload.image_size": 128}).workload.image_size == 128
    assert not (tmp_path / "absent").exists(), "checking generates nothing"
