"""The reconstruction benchmark on the harness: `stemdl run --benchmark stemdl_reconstruction` end to end
from nothing (data generated, log compliant), the same seed giving the same MAE history, two MPI ranks
(the MAE equal to the one of every prediction gathered in one place; the data they write together equal
to one process's), the evaluator's sums, the rules, bad configs and bad samples as one line."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from checks import check_log
from mpirun import run_ranks
from stemdl.cli import main
from stemdl.harness.workload import Evaluation
from stemdl.workloads import REGISTRY
from stemdl.workloads.reconstruction.steps import ErrorSums, evaluation
from stemdl.harness.synthset import sha256

from .test_data import damage, short_stack

HERE = Path(__file__).resolve().parent
NAME = "stemdl_reconstruction"


def events(log: Path) -> list[dict]:
    return [json.loads(line.split(":::MLLOG ", 1)[1]) for line in log.read_text().splitlines() if ":::MLLOG" in line]


def run(log_dir, *extra) -> int:
    return main(["run", "--benchmark", NAME, "--config", "smoke", "--log-dir", str(log_dir), *extra])


def test_the_smoke_run_from_nothing_generates_its_data_and_logs_a_compliant_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a fresh clone: no data folder yet
    assert run("runs") == 0
    captured = capsys.readouterr()
    assert (tmp_path / "data" / "reconstruction" / "smoke" / "synth.json").is_file()
    assert "parameters" in captured.err and "GMAC a sample (4x32x32 -> 1x16x16)" in captured.err
    assert "MAE" in captured.out and "PASSED" in captured.out
    log = tmp_path / "runs" / "result_0.txt"
    assert check_log(log) == (True, [])
    logged = events(log)
    value = {e["key"]: e["value"] for e in logged}
    assert value["submission_benchmark"] == NAME and value["submission_division"] == "open"
    assert value["target_eval_error"] == REGISTRY[NAME].target_value
    assert value["eval_samples"] == 5 and value["train_samples"] == 12 and value["opt_weight_decay"] == 0.0
    errors = [e["value"] for e in logged if e["key"] == "eval_error"]
    assert len(errors) == 2 and all(0 < v < 5 for v in errors)
    assert {"eval_rmse", "eval_psnr"} <= set(value)
    metrics = json.loads((tmp_path / "runs" / "result_0.metrics.json").read_text())
    assert metrics["final"]["mae"] == errors[-1] and metrics["final"]["samples"] == 5
    assert metrics["final"]["pixels"] == 5 * 16 * 16 and metrics["target_metric"] == "mae"


def test_the_same_seed_gives_the_same_mae_history(smoke_data, tmp_path):
    histories = []
    for folder in ("a", "b"):
        assert run(tmp_path / folder, "--data", str(smoke_data), "--set", "seed=7") == 0
        metrics = json.loads((tmp_path / folder / "result_0.metrics.json").read_text())
        histories.append([(h["epoch"], h["loss"], h["mae"], h["rmse"], h["psnr"]) for h in metrics["history"]])
    assert histories[0] == histories[1] and len(histories[0]) == 2


def test_two_ranks_mae_equals_the_mae_of_the_gathered_predictions(smoke_data, tmp_path):
    out = tmp_path / "mae.json"
    proc = run_ranks([sys.executable, HERE / "mae_check.py", tmp_path / "fresh", out], timeout=300)
    assert proc.returncode == 0, proc.stdout
    r = json.loads(out.read_text())
    assert r["world_size"] == 2 and r["shares"] == [3, 2] and r["padded"] == [4, 4], "uneven shares, padded"
    assert sorted(r["order"]) == list(range(5)) and r["samples"] == 5
    assert r["mae"] == pytest.approx(r["gathered_mae"], rel=1e-6)
    assert r["rmse"] == pytest.approx(r["gathered_rmse"], rel=1e-6)
    # the two ranks generated the set together (disjoint files): the bytes of one process's
    written = {str(p.relative_to(tmp_path / "fresh")): sha256(p) for p in (tmp_path / "fresh").rglob("*.h5")}
    assert written == {str(p.relative_to(smoke_data)): sha256(p) for p in smoke_data.rglob("*.h5")}


def test_two_ranks_run_the_benchmark(smoke_data, tmp_path):
    proc = run_ranks([sys.executable, "-m", "stemdl", "run", "--benchmark", NAME, "--config", "smoke",
                      "--data", smoke_data, "--log-dir", tmp_path], timeout=300)
    assert proc.returncode == 0, proc.stdout
    assert "2 rank(s)" in proc.stdout and check_log(tmp_path / "result_0.txt") == (True, [])
    assert json.loads((tmp_path / "result_0.metrics.json").read_text())["world_size"] == 2


def test_the_sums_equal_numpy_over_the_unmasked_samples():
    rng = np.random.default_rng(0)
    y, p = rng.normal(size=(7, 1, 4, 4)), rng.normal(size=(7, 1, 4, 4))
    sums = ErrorSums("cpu")
    mask = np.array([True, True, True, True, True, False, False])  # the last two are padding
    for start in (0, 3, 6):  # batches of 3, 3, 1
        rows = slice(start, start + 3)
        sums.update(torch.from_numpy(p[rows]).float(), torch.from_numpy(y[rows]).float(), torch.from_numpy(mask[rows]))
    result = evaluation(sums.host())
    e = p[:5].astype(np.float32).astype(np.float64) - y[:5].astype(np.float32).astype(np.float64)
    assert result["mae"] == pytest.approx(np.abs(e).mean(), rel=1e-12)
    assert result["rmse"] == pytest.approx(np.sqrt((e**2).mean()), rel=1e-12)
    t = y[:5].astype(np.float32).astype(np.float64).reshape(5, -1)
    peak = ((t.max(1) - t.min(1)) ** 2).mean()
    assert result["psnr"] == pytest.approx(10 * math.log10(peak / (e**2).mean()), rel=1e-12)
    assert result.details == {"samples": 5, "pixels": 80} and isinstance(result, Evaluation)


def test_the_contract_and_its_rules(tmp_path):
    w = REGISTRY[NAME]
    assert (w.target_metric, w.direction, w.eval_key) == ("mae", "min", "eval_error")
    assert w.has_reached_target(w.target_value) and not w.has_reached_target(w.target_value + 1e-6)
    assert main(["check", "--write-rules", str(tmp_path)]) == 0
    closed = (tmp_path / "hpc_3.0.0" / f"closed_{NAME}.yaml").read_text()
    assert "v['value'] <= s['target']" in closed and (tmp_path / "hpc_3.0.0" / f"open_{NAME}.yaml").is_file()
    assert set(w.presets()) >= {"default", "smoke", "ornl"}


@pytest.mark.parametrize("setting, words", [("model=huge", "'workload.model': 'huge' is not one of cpu, ornl"),
                                            ("kernel=4", "kernel 4 must be odd"),
                                            ("down=1,x", "'workload.down': '1,x' is not a list")])
def test_a_bad_config_is_one_line_before_anything_runs(tmp_path, capsys, setting, words):
    assert run(tmp_path / "runs", "--data", str(tmp_path / "none"), "--set", setting) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "none").exists()


def test_a_bad_sample_stops_the_run_in_one_line(smoke_copy, tmp_path, capsys):
    damage(smoke_copy, "dev/batch_dev_1.h5", "sample_4_0", short_stack)
    assert run(tmp_path / "runs", "--data", str(smoke_copy)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f"{smoke_copy / 'dev' / 'batch_dev_1.h5'}:sample_4_0: cbed holds 3 patterns, its "
                        "probe_grid 2 needs 4"), err
    assert not list((tmp_path / "runs").glob("result_*")), "a run that fails before run_start leaves no result"
