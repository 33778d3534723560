"""The summarizer, on logs the harness really wrote (tests/data/summarize/ORG) and on damaged copies of them.

The committed logs: `stemdl run --config smoke --data TINY --target 0.01` (open division, converges at epoch 1)
5 times with 1 rank under cpu_n1/strong, 5 times with `mpiexec -n 2` under cpu_2ranks/strong (also 1 node:
the scale is told apart by the world size from result_<i>.metrics.json), and 2 concurrent runs under
cpu_n1/weak.
"""

import argparse
import csv
import json
import math
import os
import shutil
import time
from pathlib import Path

import pytest

from stemdl.harness import summarize as S
from stemdl.harness.errors import StemdlError
from stemdl.workloads import REGISTRY


def summarize(org, division=None):
    return S.summarize(org, REGISTRY, division)

ORG = Path(__file__).resolve().parent / "data" / "summarize" / "ORG"
ONE_RANK = ORG / "results" / "cpu_n1" / "strong" / "stemdl"
TWO_RANKS = ORG / "results" / "cpu_2ranks" / "strong" / "stemdl"


def copy_runs(src: Path, dest: Path, indices=range(5)) -> Path:
    """Copies of result_<i>.{txt,config.json,metrics.json}, in a plain folder."""
    dest.mkdir(parents=True, exist_ok=True)
    for i in indices:
        for f in src.glob(f"result_{i}.*"):
            shutil.copy(f, dest / f.name)
    return dest


def edit(log: Path, old: str, new: str = "", drop_key: str | None = None) -> None:
    lines = log.read_text().splitlines(keepends=True)
    if drop_key:
        lines = [ln for ln in lines if f'"key": "{drop_key}"' not in ln]
    text = "".join(lines)
    assert not old or old in text
    log.write_text(text.replace(old, new) if old else text)


def abort(log: Path) -> None:
    edit(log, '"status": "success"', '"status": "aborted"')


def strong(summary, ranks=1):
    return next(r for r in summary.strong if r.world_size == ranks)


# -- the arithmetic

def test_olympic_mean_drops_best_and_worst():
    score = S.olympic_mean([5.0, 1.0, 3.0, 2.0, 4.0], [True] * 5)
    assert score.valid and score.time_s == 3.0  # mean of 2, 3, 4
    score = S.olympic_mean([10.0, 1.0, 2.0, 4.0, 7.0, 100.0], [True] * 6)
    assert score.time_s == (2.0 + 4.0 + 7.0 + 10.0) / 4


def test_one_failed_run_is_the_dropped_worst_even_if_fast():
    score = S.olympic_mean([0.5, 1.0, 2.0, 3.0, 4.0], [False, True, True, True, True])
    assert score.valid and score.time_s == 3.0  # 0.5 counts as inf: drop it and 1.0, mean of 2, 3, 4


def test_two_failed_runs_are_invalid():
    score = S.olympic_mean([1.0, 2.0, 3.0, 4.0, 5.0], [True, False, True, False, True])
    assert not score.valid and score.time_s is None and "INVALID" in score.note and "2 of 5" in score.note


def test_fewer_than_five_runs_give_the_plain_mean_flagged():
    score = S.olympic_mean([1.0, 2.0, 6.0], [True] * 3)
    assert not score.valid and score.time_s == 3.0 and "not enough runs for an MLPerf result" in score.note
    score = S.olympic_mean([1.0, 2.0, 6.0], [True, True, False])
    assert score.time_s == 1.5 and "1 did not converge" in score.note


def _run(system, ranks, t_s, status="success", epochs=2, samples=100, start=0.0, nodes=1):
    return S.Run(path=f"{system}/{t_s}", benchmark="stemdl", system=system, scaling="strong", number_of_nodes=nodes,
                 accelerators_per_node=0, world_size=ranks, run_start_ms=start, run_stop_ms=start + t_s * 1000,
                 status=status, epochs=epochs, final_metric=0.9, best_metric=0.9, train_samples=samples,
                 energy_j=None)


def test_speedup_and_efficiency_against_the_smallest_scale():
    runs = [_run("a", 1, t) for t in (8, 9, 10, 11, 12)] + [_run("b", 4, t) for t in (2, 3, 4, 5, 6)]
    rows = S.strong_rows(runs)
    assert [(r.world_size, r.time_to_target_s) for r in rows] == [(1, 10.0), (4, 4.0)]
    assert rows[0].speedup == 1.0 and rows[0].efficiency == 1.0
    assert rows[1].speedup == 2.5 and rows[1].efficiency == 2.5 / 4
    assert (rows[1].min_s, rows[1].median_s, rows[1].max_s) == (2.0, 4.0, 6.0)
    assert rows[0].samples_per_s == pytest.approx(sum(200 / t for t in (8, 9, 10, 11, 12)) / 5)


def test_weak_time_spans_all_models():
    runs = [_run("w", 2, 10.0, start=0.0), _run("w", 2, 4.0, start=8000.0, status="aborted")]
    [row] = S.weak_rows(runs)
    assert (row.models, row.converged, row.time_s, row.samples) == (2, 1, 12.0, 400)
    assert row.samples_per_s == 400 / 12.0


# -- the committed logs the harness wrote

def test_real_logs_pass_and_are_read():
    summary = summarize(ORG)
    assert summary.excluded == []
    assert len(summary.runs) == 12
    one, two = strong(summary, 1), strong(summary, 2)
    for row in (one, two):
        assert (row.number_of_nodes, row.runs, row.converged, row.valid, row.epochs_to_target) == (1, 5, 5, True, 1.0)
    assert (one.system, two.system) == ("cpu_n1", "cpu_2ranks")
    times = sorted(r.time_s for r in summary.runs if r.system == "cpu_n1" and r.scaling == "strong")
    assert one.time_to_target_s == pytest.approx(sum(times[1:4]) / 3)
    assert two.speedup == pytest.approx(one.time_to_target_s / two.time_to_target_s)
    assert two.efficiency == pytest.approx(two.speedup / 2)
    assert all(r.energy_j is None for r in summary.runs) and one.energy_to_target_j is None
    [weak] = summary.weak
    wruns = [r for r in summary.runs if r.scaling == "weak"]
    assert weak.models == 2
    assert weak.time_s == (max(r.run_stop_ms for r in wruns) - min(r.run_start_ms for r in wruns)) / 1000


def test_world_size_without_metrics_file_is_one_rank_per_node(tmp_path):
    d = copy_runs(TWO_RANKS, tmp_path / "logs")
    for f in d.glob("*.metrics.json"):
        f.unlink()
    assert strong(summarize(d), 1).runs == 5


def test_energy_keys_are_summed_over_nodes(tmp_path):
    d = copy_runs(ONE_RANK, tmp_path / "logs", [0])
    log = d / "result_0.txt"
    line = ':::MLLOG {"namespace": "", "time_ms": 1, "event_type": "POINT_IN_TIME", "key": "gpu_energy", ' \
           '"value": %s, "metadata": {"node": %d}}\n'
    log.write_text(log.read_text() + line % (100.5, 0) + line % (50.0, 1))
    summary = summarize(d)
    assert summary.runs[0].energy_j == 150.5 and summary.strong[0].energy_to_target_j == 150.5


# -- damaged copies

def test_one_aborted_run_dropped_as_worst_is_valid(tmp_path):
    d = copy_runs(ONE_RANK, tmp_path / "logs")
    abort(d / "result_0.txt")
    row = summarize(d).strong[0]
    assert (row.runs, row.converged, row.valid) == (5, 4, True)
    assert row.time_to_target_s is not None and "olympic" in row.note


def test_two_aborted_runs_are_invalid(tmp_path):
    d = copy_runs(ONE_RANK, tmp_path / "logs")
    abort(d / "result_0.txt")
    abort(d / "result_3.txt")
    row = summarize(d).strong[0]
    assert (row.converged, row.valid, row.time_to_target_s, row.speedup) == (3, False, None, None)
    assert row.note.startswith("INVALID")
    assert "INVALID" in S.to_markdown(summarize(d))


def test_a_closed_log_that_never_reached_the_target_counts_as_not_converged(tmp_path):
    d = copy_runs(ONE_RANK, tmp_path / "logs")
    log = d / "result_4.txt"
    edit(log, '"key": "submission_division", "value": "open"', '"key": "submission_division", "value": "closed"')
    edit(log, '"key": "target_eval_accuracy", "value": 0.01', '"key": "target_eval_accuracy", "value": 0.9')
    abort(log)  # the official checker fails it; the summary keeps it, as the run that did not converge
    summary = summarize(d)
    assert summary.excluded == []
    row = summary.strong[0]
    assert (row.runs, row.converged, row.valid) == (5, 4, True)
    assert row.best_metric == max(r.best_metric for r in summary.runs)


def test_log_without_run_stop_is_excluded_with_its_reason(tmp_path):
    d = copy_runs(ONE_RANK, tmp_path / "logs")
    edit(d / "result_2.txt", "", drop_key="run_stop")
    summary = summarize(d)
    [ex] = summary.excluded
    assert ex["path"].endswith("result_2.txt") and "run_stop" in ex["reason"]
    row = summary.strong[0]
    assert row.runs == 4 and not row.valid and "not enough runs" in row.note
    assert "result_2.txt" in S.to_markdown(summary)


def test_log_missing_its_target_is_excluded(tmp_path):
    d = copy_runs(ONE_RANK, tmp_path / "logs")
    log = d / "result_1.txt"
    text = log.read_text()
    f1 = next(ln for ln in text.splitlines() if '"key": "eval_accuracy"' in ln)
    log.write_text(text.replace(f1, json_value(f1, 0.001)))  # "success" below the 0.01 target
    [ex] = summarize(d).excluded
    assert ex["path"].endswith("result_1.txt") and "last_eval" in ex["reason"]
    assert "\n" not in ex["reason"]


@pytest.mark.parametrize("length", [200_000, 5_000_000])
def test_log_with_a_very_long_line_is_excluded_at_once(tmp_path, length):
    d = copy_runs(ONE_RANK, tmp_path / "logs")
    log = d / "result_2.txt"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:6]) + ":::MLLOG " + "x" * (length - 9) + "\n" + "".join(lines[6:]))
    start = time.perf_counter()
    summary = summarize(d)
    assert time.perf_counter() - start < 10  # a hang guard (the official parser alone: 35 s at 200 kB)
    assert summary.excluded == [{"path": str(log), "reason": f"line 7 is {length} characters long "
                                                              f"(over 65536): not an MLLOG record"}]
    assert summary.strong[0].runs == 4


def test_entries_that_are_not_logs_are_excluded_and_the_report_goes_on(tmp_path, capsys):
    from stemdl import cli

    d = copy_runs(ONE_RANK, tmp_path / "logs", range(3))
    (d / "result_3.txt").symlink_to(d / "result_3.txt")
    (d / "result_4.txt").symlink_to(d / "absent.txt")
    (d / "result_5.txt").mkdir()
    os.mkfifo(d / "result_6.txt")  # opened, it would block the report for ever
    os.mkfifo(d / "result_7.metrics.json")  # beside a good log: not read, the world size is the log's
    shutil.copy(d / "result_0.txt", d / "result_7.txt")
    summary = summarize(d)
    assert [(Path(e["path"]).name, e["reason"]) for e in summary.excluded] == [
        ("result_3.txt", "cannot read the log (symbolic link loop)"),
        ("result_4.txt", "cannot read the log (dangling symbolic link)"),
        ("result_5.txt", "cannot read the log (not a regular file)"),
        ("result_6.txt", "cannot read the log (not a regular file)")]
    assert summary.strong[0].runs == 4
    assert cli.main(["summarize", str(d), "--out", str(tmp_path / "out")]) == 0
    assert "`: cannot read the log (symbolic link loop)" in capsys.readouterr().out


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_a_log_without_read_permission_is_excluded(tmp_path):
    d = copy_runs(ONE_RANK, tmp_path / "logs", range(3))
    (d / "result_1.txt").chmod(0)
    summary = summarize(d)
    assert [e["reason"] for e in summary.excluded] == ["cannot read the log (Permission denied)"]
    assert summary.strong[0].runs == 2


def json_value(line: str, value) -> str:
    head, body = line.split(":::MLLOG", 1)
    record = json.loads(body)
    record["value"] = value
    return f"{head}:::MLLOG {json.dumps(record)}"


def test_fewer_than_five_runs_are_flagged(tmp_path):
    d = copy_runs(ONE_RANK, tmp_path / "logs", range(3))
    summary = summarize(d)
    row = summary.strong[0]
    assert row.runs == 3 and not row.valid and "not enough runs for an MLPerf result" in row.note
    assert row.time_to_target_s == pytest.approx(sum(r.time_s for r in summary.runs) / 3)


def test_missing_or_empty_org_is_one_line_error(tmp_path):
    with pytest.raises(StemdlError, match="no such folder"):
        summarize(tmp_path / "absent")
    (tmp_path / "empty" / "results" / "x" / "strong" / "stemdl").mkdir(parents=True)
    with pytest.raises(StemdlError, match="no result_") as exc:
        summarize(tmp_path / "empty")
    assert "\n" not in str(exc.value)


# -- the outputs

def _md_rows(md: str, header: str) -> list[dict]:
    lines = md.splitlines()
    start = lines.index(next(ln for ln in lines if ln.startswith(header)))
    names = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append(dict(zip(names, (c.strip() for c in ln.strip("|").split("|")))))
    return rows


def test_outputs_are_written_and_agree(tmp_path, capsys):
    org = tmp_path / "ORG"
    shutil.copytree(ORG, org)
    (org / "summary").mkdir()
    (org / "summary" / "summary.md").write_text("stale")  # the summary folder is ours: rewritten
    assert S.run(argparse.Namespace(org=org, out=None, division=None), REGISTRY) == 0
    out = org / "summary"
    names = {"summary.md", "summary.csv", "summary.json", "time_to_target.png", "efficiency.png",
             "epochs_to_target.png"}
    assert {p.name for p in out.iterdir()} == names  # no temporary files left
    for png in names - {"summary.md", "summary.csv", "summary.json"}:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "summary.md").read_text()
    assert capsys.readouterr().out == md

    doc = json.loads((out / "summary.json").read_text())
    table = _md_rows(md, "| system | nodes | ranks")
    assert len(table) == len(doc["strong"]) == 2
    for cells, row in zip(table, doc["strong"]):
        assert cells["system"] == row["system"] and int(cells["ranks"]) == row["world_size"]
        for header, attr, fmt in S.STRONG_COLUMNS:
            expected = "n/a" if row[attr] is None else fmt.format(row[attr])
            assert cells[header] == expected, header
    [weak_cells] = _md_rows(md, "| system | models")
    assert float(weak_cells["time (s)"]) == pytest.approx(doc["weak"][0]["time_s"], abs=5e-4)

    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["scaling"] for r in rows] == ["strong", "strong", "weak"]
    for r, row in zip(rows, doc["strong"]):
        assert math.isclose(float(r["time_to_target_s"]), row["time_to_target_s"])


def test_division_is_passed_to_the_check(tmp_path):
    d = copy_runs(ONE_RANK, tmp_path / "logs", [0])
    summary = summarize(d, division="closed")  # a 0.01 target is not a closed-division run
    assert summary.runs == [] and len(summary.excluded) == 1


def test_through_the_cli(tmp_path, monkeypatch, capsys):
    from stemdl import cli
    assert cli.main(["summarize", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such folder" in err
    d = copy_runs(ONE_RANK, tmp_path / "logs")
    assert cli.main(["summarize", str(d), "--out", str(tmp_path / "out"), "--division", "open"]) == 0
    assert "| cpu_n1 |" not in capsys.readouterr().out  # a plain folder: the system is the folder's name
    assert (tmp_path / "out" / "summary.json").is_file()
