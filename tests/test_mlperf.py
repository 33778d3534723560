"""The MLPerf log wrapper: golden lines with time frozen, rank 0 only, one line flushed per call."""

import inspect
import json
import subprocess
import sys

import numpy as np
import pytest
from mlperf_logging.mllog import constants as mllog_constants

from stemdl.harness import mlperf
from stemdl.harness.errors import StemdlError
from stemdl.harness.mlperf import MLLogger

T0 = 1_700_000_000_123
HERE = json.dumps(__file__)  # the call site mllog puts in the metadata, JSON-quoted


def golden(event_type, key, value, lineno, time_ms=T0, **extra):
    """The line mllog writes, spelled out (key order included) rather than built with mllog's encoder."""
    meta = "".join(f", {json.dumps(k)}: {json.dumps(v)}" for k, v in extra.items())
    return (f':::MLLOG {{"namespace": "", "time_ms": {time_ms}, "event_type": "{event_type}", "key": "{key}", '
            f'"value": {json.dumps(value)}, "metadata": {{"file": {HERE}, "lineno": {lineno}{meta}}}}}')


def here() -> int:
    """The line number of the line after the caller's: where the logging call under test sits."""
    return inspect.currentframe().f_back.f_lineno + 1


def lines(path):
    return path.read_text().splitlines()


def test_three_verbs_write_golden_lines(tmp_path):
    path = tmp_path / "mllog.txt"
    with MLLogger(path, rank=0, clock=lambda: T0) as log:
        n1 = here()
        log.start(mlperf.RUN_START)
        n2 = here()
        log.event("eval_accuracy", 0.5, metadata={mlperf.EPOCH_NUM: 3})
        n3 = here()
        log.end(mlperf.RUN_STOP, metadata={mlperf.STATUS: mlperf.ABORTED})
    assert lines(path) == [
        golden("INTERVAL_START", "run_start", None, n1),
        golden("POINT_IN_TIME", "eval_accuracy", 0.5, n2, epoch_num=3),
        golden("INTERVAL_END", "run_stop", None, n3, status="aborted"),
    ]


def test_shorthands_write_golden_lines_at_the_callers_line(tmp_path, monkeypatch):
    monkeypatch.setenv("STEMDL_SUBMISSION_PLATFORM", "cpu-box")
    monkeypatch.delenv("STEMDL_SUBMISSION_STATUS", raising=False)
    ticks = iter(range(T0, T0 + 100))
    path = tmp_path / "mllog.txt"
    with MLLogger(path, rank=0, clock=lambda: next(ticks)) as log:
        n1 = here()
        log.submission_info("stemdl", org="lab", division="open", status=None, platform="")
        n2 = here()
        log.cache_clear()
        n3 = here()
        log.log_params({mlperf.SEED: 7, mlperf.NUMBER_OF_NODES: 2})
        n4 = here()
        log.log_eval(4, {"eval_accuracy": np.float32(0.75), "eval_weighted_f1": 0.5, "eval_top1_accuracy": 0.25})
        n5 = here()
        log.run_stop(mlperf.SUCCESS)
    assert lines(path) == [
        golden("POINT_IN_TIME", "submission_benchmark", "stemdl", n1, T0),
        golden("POINT_IN_TIME", "submission_org", "lab", n1, T0 + 1),
        golden("POINT_IN_TIME", "submission_division", "open", n1, T0 + 2),
        golden("POINT_IN_TIME", "submission_status", "onprem", n1, T0 + 3),  # the default
        golden("POINT_IN_TIME", "submission_platform", "cpu-box", n1, T0 + 4),  # "" falls back to the env
        golden("POINT_IN_TIME", "cache_clear", True, n2, T0 + 5),
        golden("POINT_IN_TIME", "seed", 7, n3, T0 + 6),
        golden("POINT_IN_TIME", "number_of_nodes", 2, n3, T0 + 7),
        golden("POINT_IN_TIME", "eval_accuracy", 0.75, n4, T0 + 8, epoch_num=4),
        golden("POINT_IN_TIME", "eval_weighted_f1", 0.5, n4, T0 + 9, epoch_num=4),
        golden("POINT_IN_TIME", "eval_top1_accuracy", 0.25, n4, T0 + 10, epoch_num=4),
        golden("INTERVAL_END", "run_stop", None, n5, T0 + 11, status="success"),
    ]


def test_real_clock_is_milliseconds_since_the_epoch(tmp_path):
    import time

    path = tmp_path / "mllog.txt"
    before = int(time.time() * 1000)
    with MLLogger(path, rank=0) as log:
        log.event(mlperf.SEED, 1)
    stamp = json.loads(lines(path)[0].removeprefix(":::MLLOG "))["time_ms"]
    assert before <= stamp <= int(time.time() * 1000)


def test_other_ranks_write_nothing(tmp_path, capsys):
    path = tmp_path / "mllog.txt"
    for out in (path, None):
        log = MLLogger(out, rank=1, echo=True, clock=lambda: T0)
        assert not log.enabled
        log.submission_info("stemdl")
        log.start(mlperf.RUN_START)
        log.log_eval(1, {"eval_accuracy": 0.5})
        log.run_stop(mlperf.ABORTED)
        log.close()
    assert not path.exists()
    assert capsys.readouterr().out == ""


def test_stdout_when_no_path_and_echo_with_one(tmp_path, capsys):
    MLLogger(None, rank=0, clock=lambda: T0).event(mlperf.SEED, 1)
    with MLLogger(tmp_path / "a.txt", rank=0, echo=True, clock=lambda: T0) as log:
        log.event(mlperf.SEED, 2)
    out = capsys.readouterr().out.splitlines()
    assert [json.loads(x.removeprefix(":::MLLOG "))["value"] for x in out] == [1, 2]
    assert lines(tmp_path / "a.txt") == out[1:]


def test_loggers_in_one_process_keep_apart(tmp_path, capsys):
    a, b = MLLogger(tmp_path / "a.txt", 0, clock=lambda: T0), MLLogger(tmp_path / "b.txt", 0, clock=lambda: T0)
    a.event(mlperf.SEED, 1)
    b.event(mlperf.SEED, 2)
    a.event(mlperf.SEED, 3)
    a.close()
    b.close()
    values = {p: [json.loads(x.removeprefix(":::MLLOG "))["value"] for x in lines(tmp_path / p)]
              for p in ("a.txt", "b.txt")}
    assert values == {"a.txt": [1, 3], "b.txt": [2]}
    assert capsys.readouterr().out == ""


def test_each_line_reaches_the_file_before_a_kill(tmp_path):
    # The child logs two lines, then dies by SIGKILL: no close, no atexit, no buffer flush on exit.
    path = tmp_path / "mllog.txt"
    code = (
        "import os, signal\n"
        "from stemdl.harness import mlperf\n"
        f"log = mlperf.MLLogger({str(path)!r}, 0)\n"
        "log.start(mlperf.INIT_START)\n"
        "log.event(mlperf.SEED, 5)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == -9, proc.stderr
    assert [json.loads(x.removeprefix(":::MLLOG "))["key"] for x in lines(path)] == ["init_start", "seed"]


def test_unserializable_value_raises_instead_of_an_error_line(tmp_path):
    path = tmp_path / "mllog.txt"
    with MLLogger(path, 0, clock=lambda: T0) as log:
        with pytest.raises(TypeError, match="seed"):
            log.event(mlperf.SEED, object())
        with pytest.raises(TypeError, match="metadata"):
            log.event(mlperf.SEED, 1, metadata=[1])
        log.event(mlperf.TRAIN_SAMPLES, np.int64(12))
        log.event(mlperf.SEED, np.array([1, 2]))
    assert [json.loads(x.removeprefix(":::MLLOG "))["value"] for x in lines(path)] == [12, [1, 2]]


def test_submission_info_checks_division_and_status(monkeypatch, tmp_path):
    log = MLLogger(tmp_path / "x.txt", 0)
    with pytest.raises(StemdlError, match="submission_division 'foo'"):
        log.submission_info("stemdl", division="foo")
    monkeypatch.setenv("STEMDL_SUBMISSION_STATUS", "sold")
    with pytest.raises(StemdlError, match=r"submission_status 'sold' \(argument or \$STEMDL_SUBMISSION_STATUS\)"):
        log.submission_info("stemdl")
    with pytest.raises(ValueError, match="run_stop status"):
        log.run_stop("done")
    # other ranks refuse the same values: every rank fails alike
    with pytest.raises(StemdlError):
        MLLogger(None, 3).submission_info("stemdl", division="foo")
    log.close()
    assert (tmp_path / "x.txt").read_text() == ""


def test_unwritable_path_is_a_stemdl_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(StemdlError, match="cannot open the MLPerf log"):
        MLLogger(tmp_path / "file" / "mllog.txt", 0)


def test_our_constants_are_only_what_mllog_lacks():
    ours = {name: getattr(mlperf, name) for name in
            ("PREVIEW", "NUMBER_OF_NODES", "ACCELERATORS_PER_NODE", "GPU_ENERGY", "BAD_SAMPLES_SKIPPED",
             "RESUMED_FROM_CHECKPOINT")}
    theirs = {n: v for n, v in vars(mllog_constants).items() if n.isupper()}
    for name, value in ours.items():
        # should mllog add one of these, it must be the same name for the same string
        assert theirs.get(name, value) == value, name
        assert [n for n, v in theirs.items() if v == value and n != name] == [], name
    assert len(set(ours.values())) == len(ours)
