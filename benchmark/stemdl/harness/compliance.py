"""The compliance check of MLPerf logs, and the `stemdl check` command.

    stemdl check runs/result_*.txt                 # one line per log: LOG: PASSED, or LOG: FAILED and why
    stemdl check run.log --division open           # the open rules, whatever division the log states
    stemdl check --write-rules DIR                 # the rule files of every benchmark, for the official checker

    verdict = check_log("runs/result_0.txt", registry)   # what the run and the summarizer call
    verdict.passed, verdict.problems, verdict.reached

The official `mlperf_logging.compliance_checker` does the work, with the MLPerf HPC v3.0 rules: its
hpc_3.0.0/common.yaml, then {division}_common.yaml, then {division}_{benchmark}.yaml, which
`stemdl.harness.rules` makes from the workload the log names (the official package does not know our
benchmarks), and nothing else about the checker changes. A closed log whose evaluations never reached the
target fails (as the official closed rules make such logs fail), and says so in words: `reached` is False
and the problems say what was needed and what was best. Exit status: 0 when every log passes, 1 when one
fails, 2 when a log cannot be read. A line over MAX_LINE characters that holds :::MLLOG fails the log
before the official parser sees it (the parser's cost grows with the square of a line's length).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import itertools
import json
import re
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mlperf_logging.compliance_checker import mlp_compliance, mlp_parser

from stemdl.harness import files, mlperf
from stemdl.harness.errors import StemdlError
from stemdl.harness.rules import RULES_FOLDER, RULESET, USAGE, reaches, rule_files

ENTRY_RULES = f"{RULES_FOLDER}/common.yaml"
OFFICIAL_RULES_DIR = Path(mlp_compliance.__file__).resolve().parent
_OFFICIAL_PARSER = importlib.import_module(f"{mlp_parser.__name__}.ruleset_{RULESET.replace('.', '')}")

# The official parser strips each :::MLLOG line with re.sub(".*:::MLLOG ", ...), quadratic in the line's
# length (200 kB: 15-35 s; 50 MB: killed after 746 s), and holds a line whole however long it is. Real
# records are a few hundred characters (a few kB with many GPUs per node); 64 KiB is far above any of
# them, and a line that long still parses in about a second.
MAX_LINE = 64 * 1024
TOKEN = ":::MLLOG"


class UnreadableLog(StemdlError):
    """A log that is no file to read (exit 2 from `stemdl check`); `reason`, in a few words, is what the
    summarizer lists."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: cannot read the log ({reason})")


class _TooLong(Exception):
    """A line too long to be an MLLOG record: the log fails, without the official parser seeing it."""


@dataclass
class Verdict:
    """The check of one log."""

    path: Path
    problems: list[str] = field(default_factory=list)  # what fails the log, one message each
    warnings: list[str] = field(default_factory=list)  # what does not
    benchmark: str | None = None  # as the log states it
    division: str | None = None  # the rules applied
    reached: bool | None = None  # did an evaluation reach the target (None: no known benchmark)
    best: float | None = None  # the best value of the target metric logged
    target: float | None = None

    @property
    def passed(self) -> bool:
        return not self.problems

    @property
    def only_target_missed(self) -> bool:
        """The log is well formed and its one fault is a closed run that never reached the target: a run
        that did not converge, which the summarizer counts as such."""
        return self.reached is False and len(self.problems) == 1 and self.division == mlperf.CLOSED

    @property
    def messages(self) -> list[str]:
        return self.problems + [f"warning: {w}" for w in self.warnings]

    def summary(self) -> str:
        """The verdict in words, one line."""
        if self.passed:
            return "PASSED"
        return f"FAILED: {self.problems[0].splitlines()[0]}" + (f" (and {len(self.problems) - 1} more)"
                                                                 if len(self.problems) > 1 else "")


class _Checker(mlp_compliance.ComplianceChecker):
    """The official checker, looking up rule files first in the package and then among ours.

    Unlike the official `check_loglines`, a rule file found nowhere is a failure message, not a
    FileNotFoundError, and the queue of rule files (a module global there) starts empty for each log.
    With `division`, the division rules that common.yaml enqueues are that division's, whatever the log says.
    """

    def __init__(self, ours: Path, division: str | None = None):
        super().__init__(USAGE, RULESET, quiet=False, werror=False)
        self.ours, self.division = ours, division
        self.loaded: list[str] = []

    def check_loglines(self, loglines, config):
        if not loglines:
            self.put_message("No log lines detected")
        queue = mlp_compliance.enqueued_configs  # rule files append to it (enqueue_config in POST code)
        queue[:] = [config]
        try:
            while queue:
                name = self._rename(queue.pop(0))
                path = next((d / name for d in (OFFICIAL_RULES_DIR, self.ours) if (d / name).is_file()), None)
                if path is None:
                    self.put_message(f"Could not find config file: {name}")
                    continue
                self.loaded.append(name)
                self.configured_checks(loglines, str(path))
        finally:
            queue.clear()

    def _rename(self, name: str) -> str:
        division_rules = re.fullmatch(re.escape(f"{RULES_FOLDER}/") + r"\w+_common\.yaml", name)
        if self.division and division_rules and name != ENTRY_RULES:
            return f"{RULES_FOLDER}/{self.division}_common.yaml"
        return name


def write_rules(workloads, folder: Path) -> list[Path]:
    """The rule files of every workload under folder/hpc_3.0.0/ (for the official checker, by hand)."""
    written = []
    for name in workloads:
        for rel, text in rule_files(workloads[name]).items():
            path = Path(folder) / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            files.write_atomic(path, text)
            written.append(path)
    return written


def not_a_file(path: Path) -> str | None:
    """Why path is no file to read a log from, or None. Asked before opening it: a FIFO would block."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        if exc.errno == errno.ENOENT and path.is_symlink():
            return "dangling symbolic link"
        return exc.strerror or str(exc)
    return None if stat.S_ISREG(mode) else "not a regular file"


def _records(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of each :::MLLOG line, read as the official parser reads the file (latin-1,
    universal newlines) but in pieces, so that no line over MAX_LINE is held whole. Such a line without
    :::MLLOG (a progress bar) is skipped, as the parser skips it; with :::MLLOG, it raises _TooLong."""
    reason = not_a_file(path)
    if reason:
        raise UnreadableLog(path, reason)
    records = []
    try:
        with open(path, encoding="latin-1") as f:
            for number in itertools.count(1):
                line = f.readline(MAX_LINE + 1)
                if not line:
                    return records
                if len(line) > MAX_LINE and not line.endswith("\n"):
                    length, mllog = _rest_of_line(f, line)
                    if mllog:
                        raise _TooLong(f"line {number} is {length} characters long (over {MAX_LINE}): "
                                       "not an MLLOG record")
                elif TOKEN in line:
                    records.append((number, line))
    except OSError as exc:
        raise UnreadableLog(path, exc.strerror or str(exc)) from None


def _rest_of_line(f, head: str) -> tuple[int, bool]:
    """(length, holds :::MLLOG) of the line whose first piece is head, reading on to its end."""
    length, mllog, piece = len(head), TOKEN in head, head
    while not piece.endswith("\n"):
        following = f.readline(MAX_LINE)
        if not following:
            return length, mllog
        mllog = mllog or TOKEN in piece[-len(TOKEN):] + following  # the token may straddle two pieces
        length, piece = length + len(following), following
    return length - 1, mllog


def parse_log(path: Path | str):
    """(loglines, errors) of the official parser, given the :::MLLOG lines of `_records`."""
    try:
        records = _records(Path(path))
    except _TooLong as exc:
        raise StemdlError(f"{path}: {exc}") from None
    return _OFFICIAL_PARSER.parse_generator(line for _, line in records)


def _stated(loglines) -> dict:
    """The submission keys as the log states them (the first of each)."""
    return {ll.key: ll.value["value"] for ll in reversed(loglines) if ll.key.startswith("submission_")}


def check_log(path: Path | str, workloads, division: str | None = None) -> Verdict:
    """The verdict on one log, checked against the rules of `division` (closed or open; by default the one
    the log states) of the benchmark it names, found in `workloads` (name -> Workload)."""
    if division is not None and division not in mlperf.DIVISIONS:
        raise StemdlError(f"division {division!r} is not one of {', '.join(mlperf.DIVISIONS)}")
    path = Path(path)
    try:
        records = _records(path)
    except _TooLong as exc:
        return Verdict(path, [str(exc)])
    try:
        loglines, errors = _OFFICIAL_PARSER.parse_generator(line for _, line in records)
    except (KeyError, ValueError, TypeError) as exc:  # the official parser gives up on a malformed line
        return Verdict(path, [_first_malformed_line(records)
                              or f"the log does not parse ({type(exc).__name__}: {exc})"])
    stated = _stated(loglines)
    verdict = Verdict(path, benchmark=stated.get(mlperf.SUBMISSION_BENCHMARK),
                      division=division or stated.get(mlperf.SUBMISSION_DIVISION))
    workload = workloads[verdict.benchmark] if verdict.benchmark in workloads else None
    with tempfile.TemporaryDirectory(prefix="stemdl-rules-") as ours:
        for rel, text in (rule_files(workload) if workload else {}).items():
            (Path(ours) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(ours) / rel).write_text(text)
        checker = _Checker(Path(ours), division)
        for line, error in errors:
            checker.put_message(f"Log line does not parse ({error}): {line}")
        checker.check_loglines(loglines, ENTRY_RULES)
    problems = [*checker.not_overwritable, *checker.overwritable.values()]
    if workload is None:
        problems.append(f"submission_benchmark {verdict.benchmark!r} is not a registered benchmark "
                        f"({', '.join(workloads)}): no rules to check it against")
    elif not any(name.endswith(f"_{workload.name}.yaml") for name in checker.loaded):
        problems.append(f"The {workload.name} rules were not applied: submission_division is "
                        f"{stated.get(mlperf.SUBMISSION_DIVISION)!r} (want closed or open)")
    else:
        problems = _judge_target(verdict, workload, loglines, problems)
    verdict.problems = [_condense(m) for m in problems]
    verdict.warnings = [_condense(w) for w in checker.warnings.values()]
    if division is not None and stated.get(mlperf.SUBMISSION_DIVISION) != division:
        verdict.warnings.append(f"checked against the {division} rules; the log states submission_division "
                                f"{stated.get(mlperf.SUBMISSION_DIVISION)!r}")
    return verdict


def _judge_target(verdict: Verdict, workload, loglines, problems: list[str]) -> list[str]:
    """Fill reached, best and target from the log; the checker's terse message for a closed run that never
    reached the target becomes one that says what was needed and what was best."""
    values = [ll.value["value"] for ll in loglines if ll.key == workload.eval_key
              and isinstance(ll.value.get("value"), (int, float))]
    targets = [ll.value["value"] for ll in loglines if ll.key == workload.target_key]
    verdict.target = workload.target_value if verdict.division == mlperf.CLOSED or not targets else targets[-1]
    verdict.best = (max if workload.direction == "max" else min)(values) if values else None
    verdict.reached = any(workload.has_reached_target(v, verdict.target) for v in values)
    expression = reaches(workload, "v['value']", "s['target']")  # the closed rules' ATLEAST_ONE_CHECK
    terse = f"Failed checks for {workload.eval_key} : {expression}"
    if terse not in problems:
        return problems
    best = f"the best of {len(values)} evaluation(s) was {verdict.best:.4f}" if values else "no evaluation"
    sign = ">=" if workload.direction == "max" else "<="
    return [m for m in problems if m != terse] + [
        f"the target was never reached: a closed {workload.name} log needs an evaluation with "
        f"{workload.eval_key} ({workload.target_title}) {sign} {verdict.target:g}; {best}"]


_LINE_FIELDS = ("namespace", "time_ms", "event_type", "key", "value", "metadata")


def _first_malformed_line(records: list[tuple[int, str]]) -> str | None:
    """Which :::MLLOG line the official parser choked on, and why, in one line."""
    for number, line in records:
        try:
            record = json.loads(line.split(TOKEN, 1)[1])
        except ValueError:
            return f"line {number} is not JSON after '{TOKEN}': {line.strip()[:200]}"
        missing = [k for k in _LINE_FIELDS if not isinstance(record, dict) or k not in record]
        if missing:
            return f"line {number} lacks {', '.join(missing)}: {line.strip()[:200]}"
    return None


def _condense(message: str) -> str:
    # The checker appends pretty-printed dumps of the rule file's state and of the line's value to a
    # message; the state goes on one line (it holds what a rule compared, e.g. last_eval and target),
    # the value is already in the quoted log line.
    head, sep, rest = message.partition("\ncurrent context[s]=")
    if not sep:
        return message.strip()
    state = rest.split("\ncurrent line[v]=", 1)[0]
    try:
        state = json.dumps(json.loads(state), separators=(", ", ": "))
    except ValueError:
        state = " ".join(state.split())
    return f"{head.strip()}\nstate: {state}"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("logs", nargs="*", metavar="LOG", help="MLPerf log files (:::MLLOG lines)")
    parser.add_argument("--division", choices=mlperf.DIVISIONS, default=None,
                        help="check against this division's rules (default: the one each log states)")
    parser.add_argument("--write-rules", metavar="DIR", type=Path,
                        help="write every benchmark's rule files to DIR/hpc_3.0.0/ (for the official checker)")


def run(args: argparse.Namespace, registry) -> int:
    if args.write_rules is not None:
        for path in write_rules(registry, args.write_rules):
            print(path)
    if not args.logs:
        if args.write_rules is None:
            raise StemdlError("give one or more logs to check (or --write-rules DIR)")
        return 0
    # Read every log first, so an unreadable one stops the command before any verdict is printed.
    verdicts = [check_log(log, registry, args.division) for log in args.logs]
    for verdict in verdicts:
        print(f"{verdict.path}: {'PASSED' if verdict.passed else 'FAILED'}")
        for message in verdict.messages:
            print("  - " + message.replace("\n", "\n    "))
    return 0 if all(v.passed for v in verdicts) else 1
