"""The compliance check as tests use it: (passed, messages) of a log, against the registered benchmarks."""

from stemdl.harness import compliance
from stemdl.workloads import REGISTRY


def check_log(path, division=None) -> tuple[bool, list[str]]:
    verdict = compliance.check_log(path, REGISTRY, division)
    return verdict.passed, verdict.messages
