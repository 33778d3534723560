"""The compliance check: logs written through the wrapper pass, crafted faults fail, for both divisions."""

import argparse
import json
import os
import time
from pathlib import Path

import pytest
import yaml
from mlperf_logging.compliance_checker import mlp_compliance
from mlperf_logging.mllog import constants as mllog_constants

from stemdl.harness import compliance as check
from stemdl.harness import mlperf as M  # the log keys: M.RUN_START, M.NUMBER_OF_NODES, ...
from stemdl.harness import rules as R
from stemdl.harness.errors import StemdlError
from stemdl.harness.mlperf import MLLogger
from stemdl.workloads import REGISTRY
from stemdl.workloads.spacegroup.workload import WORKLOAD

T0 = 1_700_000_000_000
MINUTE = 60_000
EVAL_ACCURACY, TARGET_EVAL_ACCURACY = WORKLOAD.eval_key, WORKLOAD.target_key  # the space-group keys


def check_log(path, division=None):
    """(passed, messages) of the check against the registered benchmarks."""
    verdict = check.check_log(path, REGISTRY, division)
    return verdict.passed, verdict.messages


class Clock:
    """A second per logged line; `advance` jumps ahead (a slow init)."""

    def __init__(self):
        self.now = T0

    def __call__(self):
        self.now += 1000
        return self.now

    def advance(self, minutes):
        self.now += minutes * MINUTE


def simulate(path, division="closed", f1s=(0.41, 0.77, 0.92), status="success", opt="adamw", target=0.9,
             init_minutes=0, gap_minutes=0, skip=(), submission=None, metrics_inside_eval=False):
    """A short run logged as the benchmark logs it; `skip` leaves keys out, `submission` replaces the
    submission keys (written as plain events, so values the wrapper refuses can be tried), and
    `metrics_inside_eval` logs the metrics before eval_stop rather than after it."""
    clock = Clock()
    with MLLogger(path, rank=0, clock=clock) as full:

        class Log:  # the wrapper, minus the skipped keys
            def __getattr__(self, verb):
                return lambda key, *a, **kw: None if key in skip else getattr(full, verb)(key, *a, **kw)

        log = Log()
        if submission is None:
            full.submission_info("stemdl", "lab", division, "onprem", "cpu")
        else:
            for key, value in submission.items():
                log.event(key, value)
        log.event(M.CACHE_CLEAR, True)
        log.start(M.INIT_START)
        params = {M.GLOBAL_BATCH_SIZE: 64, M.SEED: 0, M.OPT_NAME: opt, M.OPT_BASE_LR: 1e-3,
                  M.OPT_WEIGHT_DECAY: 5e-5, M.OPT_LR_WARMUP_EPOCHS: 1.0, M.OPT_LR_DECAY_SCHEDULE: "cosine",
                  M.TRAIN_SAMPLES: 1000, M.EVAL_SAMPLES: 200, M.NUMBER_OF_NODES: 1,
                  M.ACCELERATORS_PER_NODE: 0, TARGET_EVAL_ACCURACY: target}
        full.log_params({key: value for key, value in params.items() if key not in skip})
        clock.advance(init_minutes)
        log.end(M.INIT_STOP)
        clock.advance(gap_minutes)
        log.start(M.RUN_START)
        for epoch, f1 in enumerate(f1s, start=1):
            meta = {M.EPOCH_NUM: epoch}
            log.start(M.EPOCH_START, metadata=meta)
            log.end(M.EPOCH_STOP, metadata=meta)
            log.start(M.EVAL_START, metadata=meta)
            if not metrics_inside_eval:
                log.end(M.EVAL_STOP, metadata=meta)
            if EVAL_ACCURACY not in skip:
                full.log_eval(epoch, {EVAL_ACCURACY: f1, "eval_weighted_f1": min(f1 + 0.01, 1.0),
                                      "eval_top1_accuracy": min(f1 + 0.02, 1.0)})
            if metrics_inside_eval:
                log.end(M.EVAL_STOP, metadata=meta)
        if M.RUN_STOP not in skip:
            full.run_stop(status)
    return path


def edit(path, fn):
    """Rewrite the log's records with fn(list of dicts) -> list of dicts."""
    records = [json.loads(x.removeprefix(":::MLLOG ")) for x in path.read_text().splitlines()]
    path.write_text("".join(f":::MLLOG {json.dumps(r)}\n" for r in fn(records)))
    return path


def failures(path, division=None):
    ok, messages = check_log(path, division)
    assert not ok
    return "\n".join(messages)


@pytest.fixture
def log(tmp_path):
    return tmp_path / "mllog.txt"


# -- logs that pass

@pytest.mark.parametrize("division", ["closed", "open"])
def test_successful_run_passes(log, division):
    assert check_log(simulate(log, division)) == (True, [])
    assert check_log(log, division) == (True, [])


def test_metrics_may_come_before_or_after_eval_stop(log):
    assert check_log(simulate(log, metrics_inside_eval=True)) == (True, [])


def test_open_aborted_run_below_the_target_passes(log):
    assert check_log(simulate(log, "open", f1s=(0.41, 0.77, 0.85), status="aborted")) == (True, [])


def test_closed_run_that_never_reached_the_target_fails_and_says_why(log):
    simulate(log, "closed", f1s=(0.41, 0.77, 0.85), status="aborted")
    verdict = check.check_log(log, REGISTRY)
    assert not verdict.passed and verdict.only_target_missed and verdict.reached is False
    assert (verdict.best, verdict.target) == (0.85, 0.9)
    assert verdict.problems == ["the target was never reached: a closed stemdl log needs an evaluation with "
                                "eval_accuracy (macro F1) >= 0.9; the best of 3 evaluation(s) was 0.8500"]
    assert verdict.summary().startswith("FAILED: the target was never reached")


def test_aborted_closed_run_that_reached_the_target_once_passes(log):
    # stop_at_target off: the last evaluation fell below again, but one reached it
    assert check_log(simulate(log, "closed", f1s=(0.91, 0.88), status="aborted")) == (True, [])


def test_open_division_takes_its_own_target_and_optimizer(log):
    simulate(log, "open", f1s=(0.5, 0.81), opt="sgd", target=0.8)
    assert check_log(log) == (True, [])
    assert "v['value'] in ['adamw']" in failures(log, "closed")


def test_division_argument_picks_the_rules_and_warns_when_the_log_says_otherwise(log):
    ok, messages = check_log(simulate(log, "closed"), "open")
    assert ok
    assert messages == ["warning: checked against the open rules; the log states submission_division 'closed'"]


# -- crafted failures

def test_no_run_stop_fails(log):
    text = failures(simulate(log, skip={M.RUN_STOP}))
    assert "Required EXACTLY_ONE occurrence of 'run_stop' but found 0" in text


@pytest.mark.parametrize("division", ["closed", "open"])
def test_success_below_the_target_fails(log, division):
    text = failures(simulate(log, division, f1s=(0.41, 0.85)))
    assert "CHECK for 'run_stop' failed" in text and "s['last_eval'] >= s['target']" in text


def test_success_without_any_eval_fails(log):
    assert "CHECK for 'run_stop' failed" in failures(simulate(log, f1s=(0.95,), skip={EVAL_ACCURACY}))


def test_open_success_below_its_logged_target_fails(log):
    assert "CHECK for 'run_stop' failed" in failures(simulate(log, "open", f1s=(0.85,), target=0.88))


def test_eval_accuracy_out_of_range_fails(log):
    text = failures(simulate(log, f1s=(0.41, 1.5)))
    assert "CHECK for 'eval_accuracy' failed" in text and '"value": 1.5' in text


def test_unknown_run_status_fails(log):
    simulate(log)
    edit(log, lambda rs: [{**r, "metadata": {**r["metadata"], "status": "done"}} if r["key"] == M.RUN_STOP
                          else r for r in rs])
    assert "status') in ['success', 'aborted']" in failures(log)


@pytest.mark.parametrize("division", ["closed", "open"])
@pytest.mark.parametrize("key", [M.NUMBER_OF_NODES, M.ACCELERATORS_PER_NODE, M.GLOBAL_BATCH_SIZE, M.SEED,
                                 M.TRAIN_SAMPLES, M.EVAL_SAMPLES, M.OPT_NAME, M.OPT_BASE_LR, M.OPT_WEIGHT_DECAY,
                                 TARGET_EVAL_ACCURACY, M.CACHE_CLEAR, M.INIT_START, M.INIT_STOP,
                                 M.RUN_START, M.EPOCH_START, M.EVAL_STOP, EVAL_ACCURACY])
def test_missing_required_key_fails(log, key, division):
    assert f"'{key}' but found 0" in failures(simulate(log, division, skip={key}))


def test_warmup_is_required_in_closed_only(log, tmp_path):
    text = failures(simulate(log, skip={M.OPT_LR_WARMUP_EPOCHS}))
    assert "'opt_learning_rate_warmup_epochs' but found 0" in text
    assert check_log(simulate(tmp_path / "open.txt", "open", skip={M.OPT_LR_WARMUP_EPOCHS}))[0]


def test_missing_submission_key_fails(log):
    submission = {M.SUBMISSION_BENCHMARK: "stemdl", M.SUBMISSION_DIVISION: "closed", M.SUBMISSION_STATUS: "onprem",
                  M.SUBMISSION_PLATFORM: "cpu"}
    assert "'submission_org' but found 0" in failures(simulate(log, submission=submission))


def test_two_run_starts_fail(log):
    # The checker only warns about an EXACTLY_ONE key repeated with the same value; our rule catches it.
    simulate(log)
    edit(log, lambda rs: [x for r in rs for x in ([r, r] if r["key"] == M.RUN_START else [r])])
    text = failures(log)
    assert "CHECK for 'run_start' failed" in text and "not s['run_started']" in text
    assert "warning: Required EXACTLY_ONE occurrence of 'run_start' but found 2" in text


def test_init_longer_than_30_minutes_fails(log, tmp_path):
    assert check_log(simulate(tmp_path / "ok.txt", init_minutes=29))[0]
    text = failures(simulate(log, init_minutes=31))
    assert "CHECK for 'init_stop' failed" in text and "CHECK for 'run_start' failed" in text


def test_init_stop_in_time_but_run_start_late_fails(log):
    # The official rules time init_stop only; stemdl also bounds the untimed gap before run_start.
    text = failures(simulate(log, init_minutes=10, gap_minutes=21))
    assert "CHECK for 'run_start' failed" in text and "CHECK for 'init_stop'" not in text


@pytest.mark.parametrize("division", ["foo", ""])
def test_unknown_division_fails(log, division):
    submission = {M.SUBMISSION_BENCHMARK: "stemdl", M.SUBMISSION_ORG: "lab", M.SUBMISSION_DIVISION: division,
                  M.SUBMISSION_STATUS: "onprem", M.SUBMISSION_PLATFORM: "cpu"}
    text = failures(simulate(log, submission=submission))
    assert "CHECK for 'submission_division' failed" in text
    assert "The stemdl rules were not applied" in text


def test_other_benchmark_fails(log):
    submission = {M.SUBMISSION_BENCHMARK: "cosmoflow", M.SUBMISSION_ORG: "lab", M.SUBMISSION_DIVISION: "closed",
                  M.SUBMISSION_STATUS: "onprem", M.SUBMISSION_PLATFORM: "cpu"}
    from stemdl.workloads import REGISTRY

    registered = ", ".join(REGISTRY)
    assert registered.startswith("stemdl, stemdl_reconstruction")
    assert f"submission_benchmark 'cosmoflow' is not a registered benchmark ({registered})" in \
        failures(simulate(log, submission=submission))


def test_closed_target_must_be_0_9(log):
    assert "CHECK for 'target_eval_accuracy' failed" in failures(simulate(log, target=0.8))


def test_events_after_run_stop_or_out_of_order_fail(log, tmp_path):
    simulate(log)
    edit(log, lambda rs: rs + [r for r in rs if r["key"] == EVAL_ACCURACY][-1:])
    assert "CHECK for 'eval_accuracy' failed" in failures(log)
    other = simulate(tmp_path / "epochs.txt")
    edit(other, lambda rs: [{**r, "metadata": {"file": "x.py", "lineno": 1}} if r["key"] == M.EPOCH_STOP else r
                            for r in rs])
    assert "CHECK for 'epoch_stop' failed" in failures(other)


def test_unparsable_line_and_empty_log_fail(log, tmp_path):
    simulate(log)
    with log.open("a") as f:
        f.write(':::MLLOG {"key": broken\n')
    assert "Log line does not parse" in failures(log)
    empty = tmp_path / "empty.txt"
    empty.write_text("no MLPerf lines here\n")
    assert "No log lines detected" in failures(empty)


def test_missing_or_unreadable_log_is_one_line_error(tmp_path):
    with pytest.raises(StemdlError, match=r"absent\.txt: cannot read the log \(No such file or directory\)"):
        check_log(tmp_path / "absent.txt")
    with pytest.raises(StemdlError, match="cannot read the log"):
        check_log(tmp_path)
    with pytest.raises(StemdlError, match="division 'foo'"):
        check_log(tmp_path / "absent.txt", "foo")
    with pytest.raises(StemdlError, match="give one or more logs"):
        run_cli([])


# -- the command

def run_cli(argv):
    parser = argparse.ArgumentParser()
    check.configure(parser)
    return check.run(parser.parse_args(argv), REGISTRY)


def test_cli_prints_a_verdict_per_log_and_exits_0_only_if_all_pass(tmp_path, capsys):
    good, bad = simulate(tmp_path / "good.txt"), simulate(tmp_path / "bad.txt", f1s=(0.41, 1.5))
    assert run_cli([str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: PASSED\n"
    assert run_cli([str(good), str(bad), "--division", "closed"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [f"{good}: PASSED", f"{bad}: FAILED"]
    assert out[2].startswith("  - CHECK for 'eval_accuracy' failed") and all(x.startswith("  ") for x in out[2:])
    with pytest.raises(StemdlError, match="absent"):
        run_cli([str(good), str(tmp_path / "absent.txt")])
    with pytest.raises(SystemExit):
        run_cli([str(good), "--division", "foo"])


# -- the rule files

def test_official_rules_alone_reject_stemdl(log):
    # mlperf-logging's own entry point: hpc_3.0.0/closed_common.yaml fails the benchmark name and enqueues
    # hpc_3.0.0/closed_stemdl.yaml, which the package lacks; the official checker then crashes on open().
    simulate(log)
    checker = mlp_compliance.make_checker("hpc", "3.0.0", quiet=True, werror=False)
    try:
        accepted = checker.check_file(str(log), "hpc_3.0.0/common.yaml")
    except FileNotFoundError:
        accepted = False
    assert not accepted
    assert check_log(log) == (True, [])  # and our check is not disturbed by the crash's leftovers


def _rules(division):
    records = R.rules(WORKLOAD, division)
    begin = [r["BEGIN"]["CODE"] for r in records if "BEGIN" in r]
    return begin, {r["KEY"]["NAME"]: r["KEY"] for r in records if "KEY" in r}


def test_closed_and_open_rules_differ_only_where_the_divisions_do():
    (closed_begin,), closed = _rules("closed")
    (open_begin,), open_ = _rules("open")
    assert closed_begin == open_begin, "the open target comes from the log (target_eval_accuracy's POST)"
    differ = {name for name in closed.keys() | open_.keys() if closed.get(name) != open_.get(name)}
    assert differ == {M.OPT_NAME, TARGET_EVAL_ACCURACY, M.OPT_LR_WARMUP_EPOCHS, EVAL_ACCURACY}
    assert closed[EVAL_ACCURACY] == {**open_[EVAL_ACCURACY], "ATLEAST_ONE_CHECK": "v['value'] >= s['target']"}


def test_rule_keys_are_known_constants():
    known = {v for n, v in vars(mllog_constants).items() if n.isupper()} | \
            {v for n, v in vars(M).items() if n.isupper() and isinstance(v, str)} | set(WORKLOAD.log_keys.values()) \
            | {TARGET_EVAL_ACCURACY}
    for division in R.DIVISIONS:
        assert set(_rules(division)[1]) <= known, division


def test_written_rule_files_are_what_the_check_uses_and_the_official_checker_takes(log, tmp_path, monkeypatch):
    written = check.write_rules(REGISTRY, tmp_path)
    assert sorted(p.name for p in written) == [f"{division}_{name}.yaml" for division in ("closed", "open")
                                               for name in sorted(REGISTRY)]
    for path in written:
        division, name = path.stem.split("_", 1)
        assert yaml.safe_load(path.read_text()) == R.rules(REGISTRY[name], division)
    # The official checker alone, its rule files beside ours (it looks beside its module), passes a good
    # log and fails one that never reached the target.
    official = Path(mlp_compliance.__file__).parent / "hpc_3.0.0"
    for name in ("common.yaml", "closed_common.yaml"):
        (tmp_path / "hpc_3.0.0" / name).write_text((official / name).read_text())
    monkeypatch.setattr(mlp_compliance, "__file__", str(tmp_path / "mlp_compliance.py"))
    for f1s, status, expected in (((0.5, 0.95), "success", True), ((0.5, 0.6), "aborted", False)):
        mlp_compliance.enqueued_configs.clear()
        checker = mlp_compliance.make_checker("hpc", "3.0.0", quiet=True, werror=False)
        assert checker.check_file(str(simulate(log, f1s=f1s, status=status)), "hpc_3.0.0/common.yaml") == expected


def test_every_resource_ships_with_the_package():
    # A non-editable install carries only the package-data globs of pyproject.toml: a data file outside
    # them (rule files, presets, tables) is missing there, and the run fails where the tests pass.
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package = root / "benchmark" / "stemdl"
    shipped = {p for name, patterns in globs.items() for pattern in patterns
               for p in (root / "benchmark" / name.replace(".", "/")).glob(pattern)}
    data = {p for p in package.rglob("*") if p.is_file() and p.suffix in (".yaml", ".csv", ".json")}
    assert data and data <= shipped, f"add {sorted(map(str, data - shipped))} to the package-data of pyproject.toml"


def test_stemdl_check_command(tmp_path, capsys):
    from stemdl import cli

    if "check" not in cli.COMMANDS:
        pytest.skip("stemdl check is not registered in cli.COMMANDS yet")
    good = simulate(tmp_path / "good.txt")
    assert cli.main(["check", str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: PASSED\n"
    assert cli.main(["check", str(tmp_path / "absent.txt")]) == 2
    absent = tmp_path / "absent.txt"
    assert capsys.readouterr().err == f"stemdl check: error: {absent}: cannot read the log (No such file or directory)\n"


def test_malformed_mllog_line_is_a_failure_naming_the_line_not_a_traceback(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text('some output\n:::MLLOG {"namespace": "", "key": "run_start"}\n')
    ok, messages = check_log(bad)
    assert not ok and messages == [
        'line 2 lacks time_ms, event_type, value, metadata: :::MLLOG {"namespace": "", "key": "run_start"}']


def insert_line(path, number, line):
    """The log with `line` as its line `number`."""
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:number - 1]) + line + "\n" + "".join(lines[number - 1:]))
    return path


@pytest.mark.parametrize("length", [200_000, 5_000_000])
def test_a_very_long_mllog_line_fails_at_once_naming_the_line(log, length):
    # The official parser is quadratic in a line's length (200 kB: 35 s): such a line must not reach it.
    insert_line(simulate(log), 5, ":::MLLOG " + "x" * (length - 9))
    start = time.perf_counter()
    ok, messages = check_log(log)
    assert time.perf_counter() - start < 5  # a hang guard, not a speed target
    assert not ok and messages == [f"line 5 is {length} characters long (over 65536): not an MLLOG record"]


def test_the_line_limit_is_exact_and_applies_to_mllog_lines_only(log, tmp_path):
    # The token last: the official parser is linear on such a line, so the boundary costs nothing.
    at_limit = insert_line(simulate(tmp_path / "at.txt"), 3, "x" * (check.MAX_LINE - 9) + ":::MLLOG ")
    assert "Log line does not parse" in failures(at_limit)
    over = insert_line(simulate(tmp_path / "over.txt"), 3, "x" * (check.MAX_LINE - 8) + ":::MLLOG ")
    assert failures(over) == f"line 3 is {check.MAX_LINE + 1} characters long (over 65536): not an MLLOG record"
    # Other output (a progress bar with no newline) is ignored, as the official parser ignores it.
    insert_line(simulate(log), 3, "progress " * 1_000_000)
    assert check_log(log) == (True, [])


def test_the_check_command_on_a_long_line_is_a_verdict_not_a_hang(log, capsys):
    insert_line(simulate(log), 2, ":::MLLOG " + "x" * 199_991)
    assert run_cli([str(log)]) == 1
    assert capsys.readouterr().out == (f"{log}: FAILED\n"
                                       "  - line 2 is 200000 characters long (over 65536): not an MLLOG record\n")


def not_files(where: Path) -> dict[str, str]:
    """Entries named like logs that are no file to read (made under where), and the reason each gives."""
    where.mkdir(exist_ok=True)
    (where / "loop.txt").symlink_to(where / "loop.txt")
    (where / "dangling.txt").symlink_to(where / "absent.txt")
    (where / "folder.txt").mkdir()
    os.mkfifo(where / "fifo.txt")  # opened, it would block the check for ever
    return {"loop.txt": "symbolic link loop", "dangling.txt": "dangling symbolic link",
            "folder.txt": "not a regular file", "fifo.txt": "not a regular file"}


def test_entries_that_are_not_files_are_one_line_errors(tmp_path, capsys):
    from stemdl import cli

    for name, reason in not_files(tmp_path / "bad").items():
        path = tmp_path / "bad" / name
        with pytest.raises(check.UnreadableLog) as exc:
            check_log(path)
        assert exc.value.reason == reason and str(exc.value) == f"{path}: cannot read the log ({reason})"
        assert cli.main(["check", str(path)]) == 2
        assert capsys.readouterr().err == f"stemdl check: error: {path}: cannot read the log ({reason})\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_a_file_without_read_permission_is_a_one_line_error(log):
    simulate(log).chmod(0)
    with pytest.raises(check.UnreadableLog, match=r"cannot read the log \(Permission denied\)$"):
        check_log(log)


REFERENCE_DIR = Path(__file__).resolve().parents[1] / "reference_logs"
REFERENCE_LOGS = sorted(REFERENCE_DIR.rglob("result_*.txt"))


@pytest.mark.parametrize("log", REFERENCE_LOGS, ids=lambda p: str(p.relative_to(REFERENCE_DIR)))
def test_every_reference_log_passes_and_reached_its_target(log):
    verdict = check.check_log(log, REGISTRY)
    assert verdict.passed, verdict.messages
    assert verdict.reached or verdict.division == "open", "a committed closed log converged"


def test_the_reference_logs_are_found():
    assert len(REFERENCE_LOGS) >= 10
