"""A second benchmark (tests/toy_workload: linear regression, mean absolute error, lower is better) goes
through the harness's loop, logger, compliance checker, launchers and summarizer with no harness change:
it is registered only through $STEMDL_WORKLOADS, as a benchmark outside the package would be."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from checks import check_log
from mpirun import run_ranks
from stemdl.cli import main
from stemdl.harness import compliance, summarize
from stemdl.workloads import REGISTRY

TESTS = Path(__file__).resolve().parent
TOY = "toy=toy_workload"


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setenv("STEMDL_WORKLOADS", TOY)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    return REGISTRY["toy"]


def toy_run(log_dir: Path, *extra: str) -> int:
    return main(["run", "--benchmark", "toy", "--log-dir", str(log_dir), *extra])


def events(log: Path) -> list[dict]:
    return [json.loads(line.split(":::MLLOG ", 1)[1]) for line in log.read_text().splitlines() if ":::MLLOG" in line]


def test_the_toy_reaches_its_lower_is_better_target_in_a_closed_log(toy, tmp_path, capsys):
    assert toy_run(tmp_path) == 0
    out = capsys.readouterr().out
    assert "time to MAE 0.05" in out and "(target reached)" in out and "PASSED" in out
    log = tmp_path / "result_0.txt"
    logged = events(log)
    value = {e["key"]: e["value"] for e in logged}
    assert value["submission_benchmark"] == "toy" and value["submission_division"] == "closed"
    assert value["target_eval_error"] == 0.05
    errors = [e["value"] for e in logged if e["key"] == "eval_error"]
    assert errors[-1] <= 0.05 < min(errors[:-1]), "the run stops at the first evaluation at or below the target"
    assert [e for e in logged if e["key"] == "run_stop"][0]["metadata"]["status"] == "success"
    assert {"eval_rmse", "eval_error"} <= set(value) and "eval_accuracy" not in value
    assert check_log(log) == (True, [])
    metrics = json.loads((tmp_path / "result_0.metrics.json").read_text())
    assert metrics["final"]["mae"] == errors[-1], "the metrics file holds the evaluation itself, not a string"


def test_a_closed_toy_log_that_never_reaches_the_target_fails_in_words(toy, tmp_path, capsys):
    assert toy_run(tmp_path, "--set", "epochs=1") == 1
    verdict = compliance.check_log(tmp_path / "result_0.txt", REGISTRY)
    assert not verdict.passed and verdict.only_target_missed
    assert verdict.best > 0.05 and verdict.target == 0.05
    assert "never reached" in verdict.summary() and "<= 0.05" in verdict.summary()
    assert main(["check", str(tmp_path / "result_0.txt")]) == 1
    # the same log in the open division (another target) passes: direction decides what "reached" means
    assert toy_run(tmp_path, "--set", "epochs=1", "--set", "target=5.0") == 0
    assert check_log(tmp_path / "result_1.txt") == (True, [])


def test_the_toy_rules_are_written_for_both_divisions(toy, tmp_path):
    assert main(["check", "--write-rules", str(tmp_path)]) == 0
    written = {p.name for p in tmp_path.rglob("*.yaml")}
    assert any("toy" in name and "closed" in name for name in written), written
    assert any("toy" in name and "open" in name for name in written), written


def test_two_ranks_train_the_toy_to_its_target(toy, tmp_path):
    proc = run_ranks([sys.executable, "-m", "stemdl", "run", "--benchmark", "toy", "--log-dir", tmp_path])
    assert proc.returncode == 0, proc.stdout
    assert "2 rank(s)" in proc.stdout and "(target reached)" in proc.stdout
    assert check_log(tmp_path / "result_0.txt") == (True, [])
    assert json.loads((tmp_path / "result_0.metrics.json").read_text())["world_size"] == 2


def test_the_summarizer_reads_a_lower_is_better_benchmark(toy, tmp_path):
    folder = tmp_path / "ORG" / "results" / "cpu" / "strong" / "toy"
    for seed in range(5):
        assert toy_run(folder, "--set", f"seed={seed}") == 0
    assert toy_run(folder, "--set", "epochs=1") == 1  # closed, never reached: a non-converged run
    s = summarize.summarize(tmp_path / "ORG", REGISTRY)
    (row,) = s.strong
    assert (row.benchmark, row.runs, row.converged) == ("toy", 6, 5)
    finals = [json.loads((folder / f"result_{i}.metrics.json").read_text())["final"]["mae"] for i in range(6)]
    assert row.best_metric == min(finals), "the best of a lower-is-better metric is its smallest value"
    assert row.time_to_target_s is not None and s.titles["toy"] == "MAE"


def test_the_launchers_take_the_benchmark_name(tmp_path):
    env = {**os.environ, "STEMDL_ORG_DIR": str(tmp_path / "org"), "STEMDL_SYSTEM": "testsys",
           "STEMDL_PYTHON": sys.executable, "STEMDL_BENCHMARK": "toy"}
    for name in ("STEMDL_CONFIG", "STEMDL_DATA", "STEMDL_RESULT_SYSTEM", "SLURM_JOB_ID", "LSB_JOBID"):
        env.pop(name, None)
    proc = subprocess.run(["bash", str(TESTS.parent / "launchers" / "mpirun.sh"), "--dry-run", "--np", "2"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    run = next(line for line in proc.stdout.splitlines() if " -m stemdl run" in line)
    folder = str(tmp_path / "org" / "results" / "testsys" / "strong" / "toy")
    assert "--benchmark toy" in run and f"--log-dir {folder}" in run
    assert f"stemdl check {folder}/result_0.txt" in proc.stdout
