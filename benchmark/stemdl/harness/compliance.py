"""The compliance check of MLPerf logs, and the `stemdl check` command.

    stemdl check runs/result_*.txt                 # one line per log: LOG: PASSED, or LOG: FAILED and why
    stemdl check run.log --division open           # the open rules, whatever division the log states

    ok, messages = check_log("runs/result_0.txt")  # what the run and the summarizer call

The official `mlperf_logging.compliance_checker` does the work, with the MLPerf HPC v3.0 rules: its
hpc_3.0.0/common.yaml, then {division}_common.yaml, then {division}_stemdl.yaml. The last one is ours
(resources/compliance/hpc_3.0.0/): the official package does not know stemdl, so the checker is given a
way to find rule files it lacks, and nothing else about it changes. Exit status: 0 when every log passes,
1 when one fails, 2 when a log cannot be read.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from mlperf_logging.compliance_checker import mlp_compliance, mlp_parser

from stemdl.harness import mlperf
from stemdl.harness.errors import StemdlError

USAGE, RULESET = "hpc", "3.0.0"
ENTRY_RULES = f"{USAGE}_{RULESET}/common.yaml"
OFFICIAL_RULES_DIR = Path(mlp_compliance.__file__).resolve().parent
STEMDL_RULES_DIR = Path(__file__).resolve().parents[1] / "workloads" / "spacegroup" / "resources" / "compliance"


class _Checker(mlp_compliance.ComplianceChecker):
    """The official checker, looking up rule files first in the package and then in ours.

    Unlike the official `check_loglines`, a rule file found nowhere is a failure message, not a
    FileNotFoundError, and the queue of rule files (a module global there) starts empty for each log.
    With `division`, the division rules that common.yaml enqueues are that division's, whatever the log says.
    """

    def __init__(self, division: str | None = None):
        super().__init__(USAGE, RULESET, quiet=False, werror=False)
        self.division = division
        self.loaded: list[str] = []

    def check_loglines(self, loglines, config):
        if not loglines:
            self.put_message("No log lines detected")
        queue = mlp_compliance.enqueued_configs  # rule files append to it (enqueue_config in POST code)
        queue[:] = [config]
        try:
            while queue:
                name = self._rename(queue.pop(0))
                path = next((d / name for d in (OFFICIAL_RULES_DIR, STEMDL_RULES_DIR) if (d / name).is_file()),
                            None)
                if path is None:
                    self.put_message(f"Could not find config file: {name}")
                    continue
                self.loaded.append(name)
                self.configured_checks(loglines, str(path))
        finally:
            queue.clear()

    def _rename(self, name: str) -> str:
        division_rules = re.fullmatch(re.escape(f"{USAGE}_{RULESET}/") + r"\w+_common\.yaml", name)
        if self.division and division_rules and name != ENTRY_RULES:
            return f"{USAGE}_{RULESET}/{self.division}_common.yaml"
        return name


def check_log(path: Path | str, division: str | None = None) -> tuple[bool, list[str]]:
    """(passed, messages) for one log, checked against the rules of `division` (closed or open; by default
    the one the log states). Warnings, which do not fail a log, start with "warning:"."""
    if division is not None and division not in mlperf.DIVISIONS:
        raise StemdlError(f"division {division!r} is not one of {', '.join(mlperf.DIVISIONS)}")
    path = Path(path)
    try:
        loglines, errors = mlp_parser.parse_file(str(path), ruleset=RULESET)
    except OSError as exc:
        raise StemdlError(f"{path}: cannot read the log ({exc.strerror or exc})") from None
    except (KeyError, ValueError, TypeError) as exc:  # the official parser gives up on a malformed line
        return False, [_first_malformed_line(path) or f"the log does not parse ({type(exc).__name__}: {exc})"]

    checker = _Checker(division)
    for line, error in errors:
        checker.put_message(f"Log line does not parse ({error}): {line}")
    checker.check_loglines(loglines, ENTRY_RULES)

    logged = {ll.key: ll.value["value"] for ll in reversed(loglines) if ll.key.startswith("submission_")}
    benchmark = logged.get(mlperf.SUBMISSION_BENCHMARK)
    logged_division = logged.get(mlperf.SUBMISSION_DIVISION)
    if not any(name.endswith(f"_{mlperf.STEMDL}.yaml") for name in checker.loaded):
        checker.put_message(f"The stemdl rules were not applied: submission_benchmark is {benchmark!r} and "
                            f"submission_division {logged_division!r} (want 'stemdl' and closed or open)")

    messages = [*checker.not_overwritable, *checker.overwritable.values()]
    warnings = [f"warning: {w}" for w in checker.warnings.values()]
    if division is not None and logged_division != division:
        warnings.append(f"warning: checked against the {division} rules; the log states submission_division "
                        f"{logged_division!r}")
    return not messages, [_condense(m) for m in messages + warnings]


_LINE_FIELDS = ("namespace", "time_ms", "event_type", "key", "value", "metadata")


def _first_malformed_line(path: Path) -> str | None:
    """Which :::MLLOG line the official parser choked on, and why, in one line."""
    with open(path, errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if ":::MLLOG" not in line:
                continue
            try:
                record = json.loads(line.split(":::MLLOG", 1)[1])
            except ValueError:
                return f"line {number} is not JSON after ':::MLLOG': {line.strip()[:200]}"
            missing = [k for k in _LINE_FIELDS if not isinstance(record, dict) or k not in record]
            if missing:
                return f"line {number} lacks {', '.join(missing)}: {line.strip()[:200]}"
    return None


def _condense(message: str) -> str:
    # The checker appends pretty-printed dumps of the rule file's state and of the line's value to a
    # message; the state goes on one line (it holds what a rule compared, e.g. last_eval_accuracy and
    # target), the value is already in the quoted log line.
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
    parser.add_argument("logs", nargs="+", metavar="LOG", help="MLPerf log files (:::MLLOG lines)")
    parser.add_argument("--division", choices=mlperf.DIVISIONS, default=None,
                        help="check against this division's rules (default: the one each log states)")


def run(args: argparse.Namespace) -> int:
    # Read every log first, so an unreadable one stops the command before any verdict is printed.
    results = [(log, *check_log(log, args.division)) for log in args.logs]
    for log, ok, messages in results:
        print(f"{log}: {'PASSED' if ok else 'FAILED'}")
        for message in messages:
            print("  - " + message.replace("\n", "\n    "))
    return 0 if all(ok for _, ok, _ in results) else 1
