"""`stemdl run` end to end on the tiny synthetic set: 1 and 2 MPI ranks, compliant logs, stop rules, seeds."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mpirun import mpiexec

from checks import check_log
from stemdl.cli import main


def run_smoke(tiny_data, log_dir, *extra) -> dict:
    assert main(["run", "--config", "smoke", "--data", str(tiny_data), "--log-dir", str(log_dir), *extra]) == 0
    logs = sorted(log_dir.glob("result_*.txt"))
    metrics = json.loads(logs[-1].with_suffix(".metrics.json").read_text())
    return {"log": logs[-1], "metrics": metrics}


def run_stop_status(log: Path) -> str:
    for line in log.read_text().splitlines():
        if '"key": "run_stop"' in line:
            return json.loads(line.split(":::MLLOG ", 1)[1])["metadata"]["status"]
    raise AssertionError(f"{log}: no run_stop")


def test_single_process_smoke_run_is_compliant_and_aborted(tiny_data, tmp_path, capsys):
    result = run_smoke(tiny_data, tmp_path / "runs")
    ok, messages = check_log(result["log"])
    assert ok, messages
    assert run_stop_status(result["log"]) == "aborted", "the smoke budget cannot reach F1 0.9"
    assert result["metrics"]["status"] == "aborted" and result["metrics"]["epochs"] == 2
    out = capsys.readouterr().out
    assert "stemdl: macro F1 0.9 NOT reached in 2 epochs" in out and "1 node(s)" in out
    assert f"compliance check of {result['log']}: PASSED" in out


def test_a_closed_run_that_never_reaches_the_target_says_so_and_fails(tiny_data, tmp_path, capsys):
    log_dir = tmp_path / "runs"
    args = ["run", "--config", "smoke", "--data", str(tiny_data), "--log-dir", str(log_dir)]
    assert main([*args, "--set", "submission_division=closed"]) == 1
    out = capsys.readouterr().out
    assert "compliance check of" in out and "FAILED: the target was never reached: a closed stemdl log needs " \
        "an evaluation with eval_accuracy (macro F1) >= 0.9; the best of 2 evaluation(s) was" in out
    assert "did not converge" in out
    ok, messages = check_log(log_dir / "result_0.txt")
    assert not ok and len(messages) == 1 and messages[0].startswith("the target was never reached")


def test_reaching_the_target_stops_the_run_with_success(tiny_data, tmp_path, capsys):
    result = run_smoke(tiny_data, tmp_path / "runs", "--target", "0.01", "--epochs", "5")
    assert "stemdl: time to macro F1 0.01: " in capsys.readouterr().out
    assert run_stop_status(result["log"]) == "success"
    assert result["metrics"]["epochs"] == 1, "stops at the first evaluation that reaches the target"
    assert '"key": "submission_division", "value": "open"' in result["log"].read_text(), \
        "a target other than the closed one makes an open-division run"
    ok, messages = check_log(result["log"])
    assert ok, messages


def test_same_seed_same_f1_history(tiny_data, tmp_path):
    first = run_smoke(tiny_data, tmp_path / "a", "--epochs", "3", "--seed", "5")
    second = run_smoke(tiny_data, tmp_path / "b", "--epochs", "3", "--seed", "5")
    history = [(h["epoch"], h["macro_f1"], h["loss"]) for h in first["metrics"]["history"]]
    assert history == [(h["epoch"], h["macro_f1"], h["loss"]) for h in second["metrics"]["history"]]
    assert len(history) == 3


def test_results_are_never_overwritten(tiny_data, tmp_path):
    log_dir = tmp_path / "runs"
    first = run_smoke(tiny_data, log_dir)["log"]
    before = first.read_bytes()
    second = run_smoke(tiny_data, log_dir)["log"]
    assert (first.name, second.name) == ("result_0.txt", "result_1.txt")
    assert first.read_bytes() == before


@pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (install the 'mpi' extra)")
def test_two_mpi_ranks_write_one_compliant_log(tiny_data, tmp_path):
    log_dir = tmp_path / "runs"
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.run([mpiexec(), "-n", "2", sys.executable, "-m", "stemdl", "run", "--config", "smoke",
                           "--data", str(tiny_data), "--log-dir", str(log_dir)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = sorted(log_dir.glob("result_*.txt"))
    assert [p.name for p in logs] == ["result_0.txt"], "only rank 0 writes"
    ok, messages = check_log(logs[0])
    assert ok, messages
    text = logs[0].read_text()
    assert '"key": "global_batch_size", "value": 4' in text, "2 ranks x batch 2"
    assert proc.stdout.count("stemdl: macro F1 0.9 NOT reached") == 1, "one summary line, from rank 0"
    metrics = json.loads(logs[0].with_suffix(".metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["number_of_nodes"] == 1


def test_bad_config_is_one_line_before_anything_runs(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: smoke\nbatch_sise: 3\n")
    assert main(["run", "--config", str(bad), "--log-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "batch_sise" in err[0]
    assert not (tmp_path / "runs").exists()
    assert main(["run", "--config", "smoke", "--set", "epochs=two"]) == 2
    assert "'epochs'" in capsys.readouterr().err


def test_data_errors_reach_every_rank_and_a_given_path_is_never_filled(tmp_path, capsys):
    missing = tmp_path / "typo"
    assert main(["run", "--config", "smoke", "--data", str(missing), "--log-dir", str(tmp_path / "r")]) == 2
    assert "no such folder" in capsys.readouterr().err and not missing.exists()
    other = tmp_path / "other"
    assert main(["synth", str(other), "--preset", "tiny", "--samples", "3", "--quiet"]) == 0
    # a synthetic folder made with other settings than the preset's is refused, not mixed
    assert main(["run", "--config", "smoke", "--set", f"data={other}", "--log-dir", str(tmp_path / "r")]) == 2
    assert "other settings" in capsys.readouterr().err


def test_single_view_torch_pipeline_and_resnet_run(tiny_data, tmp_path):
    # the reference recipe's code paths: one pattern per sample, logits averaged over 3 at evaluation;
    # with Friedel's split each view is that pattern's two halves (2 channels)
    result = run_smoke(tiny_data, tmp_path / "runs", "--set", "view=single", "--set", "pipeline=torch",
                       "--set", "model=resnet18", "--set", "friedel=split")
    ok, messages = check_log(result["log"])
    assert ok, messages
    assert len(result["metrics"]["history"]) == 2


def test_gpu_energy_is_logged_after_the_clock_when_nvml_is_there(tiny_data, tmp_path, monkeypatch):
    from test_energy import FakeNvml

    from stemdl.harness import energy

    class CountingNvml(FakeNvml):  # a GPU whose energy counter advances 1 J per reading
        def nvmlDeviceGetTotalEnergyConsumption(self, h):
            self.energy_mj[h] += 1000
            return self.energy_mj[h]

    fake = CountingNvml(power_mw=[150_000], energy_mj=[0])
    monkeypatch.setattr(energy, "open_nvml", lambda module=None: (fake, None))
    result = run_smoke(tiny_data, tmp_path / "runs")
    lines = [json.loads(line.split(":::MLLOG ", 1)[1]) for line in result["log"].read_text().splitlines()]
    keys = [line["key"] for line in lines]
    assert keys.index("gpu_energy") > keys.index("run_stop"), "logged outside the timed region"
    joules = lines[keys.index("gpu_energy")]["value"]
    assert joules >= 1.0 and lines[keys.index("gpu_energy")]["metadata"]["nodes"] == 1
    ok, messages = check_log(result["log"])
    assert ok, messages
    power = result["log"].parent / "power" / result["log"].stem / "node_0.txt"
    assert '"key": "power_reading"' in power.read_text()
    assert fake.shutdown_calls == 1
