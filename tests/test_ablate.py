"""`stemdl ablate`: each study end to end on the tiny set (tiny budgets), and its arithmetic."""

import json
import shutil

import numpy as np
import pytest

from stemdl.workloads.spacegroup.ablate import (class_top1, ensemble_seeds, mean_rows, pair_f1, summarize_run,
                                               tail_classes)
from stemdl.cli import main


def ablate(tiny_data, out, *args) -> dict:
    assert main(["ablate", *args, "--out", str(out), "--config", "smoke", "--data", str(tiny_data),
                 "--set", "epochs=1"]) == 0
    return json.loads((out / "ablation.json").read_text())


def test_imbalance_study_runs_each_method_and_the_ensemble_and_resumes(tiny_data, tmp_path):
    out = tmp_path / "imb"
    result = ablate(tiny_data, out, "imbalance", "--methods", "ce,logit_adjusted", "--ensemble", "2")
    assert list(result["rows"]) == ["ce", "logit_adjusted", "ensemble (2 x ce)"]
    assert result["config"]["members"] == [0, 1]
    for row in result["rows"].values():
        assert 0.0 <= row["macro_f1"] <= 1.0 and 0.0 <= row["top1"] <= 1.0
    md = (out / "ablation.md").read_text()
    assert "| logit_adjusted |" in md and "tail macro F1" in md
    logs = sorted(out.glob("runs/*/seed_*/result_*.txt"))
    assert len(logs) == 3  # ce seeds 0 and 1 (ensemble members), logit_adjusted seed 0
    stamps = [p.stat().st_mtime_ns for p in logs]
    ablate(tiny_data, out, "imbalance", "--methods", "ce,logit_adjusted", "--ensemble", "2")
    assert [p.stat().st_mtime_ns for p in sorted(out.glob("runs/*/seed_*/result_*.txt"))] == stamps, \
        "finished methods are not run again"


def test_multitask_study_reports_the_extra_heads(tiny_data, tmp_path):
    result = ablate(tiny_data, tmp_path / "mt", "multitask", "--methods", "space_group,heads_learned")
    assert "lattice_mae_a" not in result["rows"]["space_group"]
    assert result["rows"]["heads_learned"]["lattice_mae_a"] > 0
    assert 0 <= result["rows"]["heads_learned"]["crystal_system_accuracy"] <= 1


def test_dynamical_study_trains_each_rendering_and_scores_the_pairs(tiny_data, tmp_path, capsys):
    # The wiring, not the physics: both renderings are the tiny kinematic set here (docs/results.md has
    # the real comparison, on the pairs preset rendered both ways).
    data = tmp_path / "pairs"
    data.mkdir()
    for name in ("kinematic", "multislice"):
        (data / name).symlink_to(tiny_data, target_is_directory=True)
    result = ablate(data, tmp_path / "dyn", "dynamical")
    trained = ["kinematic", "kinematic_friedel_average", "multislice", "multislice_friedel_average",
               "kinematic_friedel_split", "multislice_friedel_split", "kinematic_to_multislice"]
    assert list(result["rows"]) == trained + ["kinematic: Friedel asymmetry alone",
                                              "multislice: Friedel asymmetry alone"]
    assert result["config"]["data"] == str(data)
    for method in trained:
        row = result["rows"][method]
        assert all(0.0 <= row[name] <= 1.0 for name in ("P1/P-1", "Pna2_1/Pnma", "F-43m/Fm-3m", "class_top1"))
    # the tiny set holds none of the pairs' groups: the threshold rows say so rather than invent a score
    assert result["rows"]["multislice: Friedel asymmetry alone"] == {"P1/P-1": None, "Pna2_1/Pnma": None,
                                                                      "F-43m/Fm-3m": None}
    saved = {m: json.loads(next((tmp_path / "dyn" / "runs" / m / "seed_0").glob("result_*.config.json"))
                           .read_text()) for m in trained}
    assert [saved[m]["workload"]["friedel"] for m in trained] == ["keep", "average"] * 2 + ["split"] * 2 + ["keep"]
    # the transfer row: the kinematic training, its final weights scored on the multislice folder, which
    # here holds the very same samples: so the score is the run's own last one, recomputed from the weights
    run_dir = tmp_path / "dyn" / "runs" / "kinematic_to_multislice" / "seed_0"
    transfer = json.loads((run_dir / "transfer.json").read_text())
    assert transfer["data"] == str(data / "multislice")
    own = json.loads(next(run_dir.glob("result_*.metrics.json")).read_text())["final"]
    assert transfer["final"]["confusion"] == own["confusion"]
    assert result["rows"]["kinematic_to_multislice"]["macro_f1"] == pytest.approx(own["macro_f1"])
    assert saved["kinematic_to_multislice"]["harness"]["data"] == str(data / "kinematic")
    # a finished run whose weights were removed cannot be scored: one line, and nothing trained again
    (run_dir / "transfer.json").unlink()
    shutil.rmtree(run_dir / "model")
    assert main(["ablate", "dynamical", "--out", str(tmp_path / "dyn"), "--config", "smoke", "--data", str(data),
                 "--methods", "kinematic_to_multislice", "--set", "epochs=1"]) == 2
    err = capsys.readouterr().err
    assert f"{run_dir / 'model'}: the final weights of kinematic_to_multislice (seed 0) are gone" in err
    assert f"remove {run_dir} to train it again" in err
    assert {saved[m]["harness"]["data"] for m in trained} == {str(data / "kinematic"), str(data / "multislice")}
    assert "P1/P-1 F1" in (tmp_path / "dyn" / "ablation.md").read_text()


def test_dynamical_study_needs_both_renderings(tmp_path, capsys):
    assert main(["ablate", "dynamical", "--out", str(tmp_path / "o")]) == 2
    assert "--data is required" in capsys.readouterr().err
    assert main(["ablate", "dynamical", "--out", str(tmp_path / "o"), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'kinematic'}: no data set here" in err and "--physics kinematic" in err


def test_pair_f1_reads_the_pairs_block_of_the_confusion_matrix():
    # space groups 1 and 2 are classes 0 and 1; the cells into or from class 5 are outside the block
    final = {"num_classes": 230, "confusion": [[0, 0, 8], [0, 1, 2], [1, 1, 5], [1, 0, 5], [0, 5, 9], [5, 1, 7]]}
    f1_p1, f1_pm1 = 2 * 8 / (10 + 13), 2 * 5 / (10 + 7)
    assert pair_f1(final, (1, 2)) == pytest.approx((f1_p1 + f1_pm1) / 2)
    # 8 + 2 + 5 + 5 of the 36 samples are called a group of their own pair (classes 0 and 1); the 9
    # of class 0 called 5 and the 7 of class 5 called 1 are not
    assert class_top1(final, [(1, 2)]) == pytest.approx(20 / 36)
    assert pair_f1(final, (33, 62)) == 0.0  # neither present


def test_bad_arguments_are_one_line(tiny_data, tmp_path, capsys):
    assert main(["ablate", "imbalance", "--out", str(tmp_path), "--methods", "ce,magic"]) == 2
    assert "--methods: 'magic'" in capsys.readouterr().err
    assert main(["ablate", "imbalance", "--out", str(tmp_path), "--seeds", "a"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["ablate", "imbalance", "--out", str(tmp_path), "--set", "lossy=1"]) == 2
    assert "unknown config key 'lossy'" in capsys.readouterr().err


def test_tail_classes_and_ensemble_seeds():
    counts = np.zeros(230, dtype=np.int64)
    counts[[0, 13, 61, 224]] = [100, 50, 10, 5]
    assert tail_classes(counts).tolist() == [61, 224]  # median 30
    assert ensemble_seeds([0], 3) == [0, 1, 2]
    assert ensemble_seeds([5, 2], 3) == [5, 2, 6]
    assert ensemble_seeds([0, 1], 1) == []


def test_summary_of_a_run_and_mean_over_seeds():
    final = {"macro_f1": 0.5, "weighted_f1": 0.6, "accuracy": 0.7,
             "per_class": [{"class": 0, "f1": 1.0}, {"class": 61, "f1": 0.25}, {"class": 224, "f1": 0.75}]}
    history = [{"epoch": 1, "macro_f1": 0.3, "elapsed_min": 1.0}, {"epoch": 2, "macro_f1": 0.95, "elapsed_min": 2.0}]
    row = summarize_run({"final": final, "history": history}, np.array([61, 224]), 0.9)
    assert row["tail_macro_f1"] == 0.5 and row["minutes_to_target"] == 2.0 and row["minutes"] == 2.0
    other = {**row, "macro_f1": 0.7, "minutes_to_target": None, "epochs_to_target": None}
    mean = mean_rows([row, other])
    assert mean["macro_f1"] == pytest.approx(0.6) and mean["minutes_to_target"] == 2.0 and mean["reached"] == "1/2"
