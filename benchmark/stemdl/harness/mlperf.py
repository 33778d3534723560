"""The MLPerf compliance log: the only module that talks to `mllog`.

    log = mlperf.MLLogger(run_dir / "mllog.txt", rank=env.rank)   # only rank 0 writes; other ranks: no-ops
    log.submission_info(workload.name, org, division, status, platform)
    log.cache_clear()
    log.start(mlperf.INIT_START)
    log.log_params({mlperf.GLOBAL_BATCH_SIZE: 256, mlperf.SEED: 0, workload.target_key: 0.9, ...})
    log.end(mlperf.INIT_STOP)
    log.start(mlperf.RUN_START)
    log.start(mlperf.EPOCH_START, metadata={mlperf.EPOCH_NUM: 1})
    ...
    log.log_eval(1, {"eval_accuracy": 0.42, "eval_weighted_f1": 0.47})   # the workload's eval keys
    log.run_stop(mlperf.SUCCESS)

Three verbs (`start`, `end`, `event`) write one `:::MLLOG {...}` line each; the other methods are shorthands
on the same path. Keys come from `mllog.constants` (those stemdl uses are re-exported here) or, where it
lacks them, from the one block of constants below. Each logger owns a private `logging.Logger`, so several
in one process (tests) never share handlers, and the file is flushed after every line, so a killed run
keeps all it logged. Timestamps are mllog's (ms since the epoch) unless a `clock` is given (tests freeze it).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from mlperf_logging.mllog import mllog as _mllog

# The keys and values stemdl logs that mllog.constants has, re-exported: the harness writes mlperf.RUN_START.
from mlperf_logging.mllog.constants import (  # noqa: F401
    ABORTED, ADAMW, CACHE_CLEAR, CLOSED, CLOUD, EPOCH_NUM, EPOCH_START, EPOCH_STOP, EVAL_SAMPLES,
    EVAL_START, EVAL_STOP, GLOBAL_BATCH_SIZE, INIT_START, INIT_STOP, ONPREM, OPEN, OPT_BASE_LR,
    OPT_LR_DECAY_SCHEDULE, OPT_LR_WARMUP_EPOCHS, OPT_NAME, OPT_WEIGHT_DECAY, RESEARCH, RUN_START, RUN_STOP, SEED,
    STAGING_START, STAGING_STOP, STATUS, SUBMISSION_BENCHMARK, SUBMISSION_DIVISION, SUBMISSION_ORG,
    SUBMISSION_PLATFORM, SUBMISSION_STATUS, SUCCESS, TRAIN_SAMPLES,
)

from stemdl.harness.errors import StemdlError
from stemdl.harness.files import write_problem

# -- Keys and values that mllog.constants lacks (MLPerf HPC ones and stemdl's own). If mllog ever adds one
#    of these names, tests/test_mlperf.py checks that it means the same string.
PREVIEW = "preview"  # a submission_status of MLPerf HPC
NUMBER_OF_NODES = "number_of_nodes"
ACCELERATORS_PER_NODE = "accelerators_per_node"
GPU_ENERGY = "gpu_energy"  # joules used by the GPUs between run_start and run_stop (NVML)
BAD_SAMPLES_SKIPPED = "bad_samples_skipped"  # samples left out by --skip-bad
RESUMED_FROM_CHECKPOINT = "resumed_from_checkpoint"  # a resumed run: never a compliant timed run

DIVISIONS = (CLOSED, OPEN)
STATUSES = (CLOUD, ONPREM, PREVIEW, RESEARCH)
RUN_STATUSES = (SUCCESS, ABORTED)

# mllog names the caller of its verb at offset 1; our _emit and public method add two frames, so the
# metadata's file and lineno are those of the harness line that called us.
_STACK_OFFSET = 3
# File names in the metadata are relative to the folder holding the stemdl package ("stemdl/train.py").
_ROOT_DIR = str(Path(__file__).resolve().parents[2])


class MLLogger:
    """A rank-aware writer of one MLPerf log. `path=None` writes to stdout; `echo` copies lines to stdout.

    `clock` returns the time in ms since the epoch (tests freeze it); by default mllog reads the time.
    """

    def __init__(self, path: Path | str | None, rank: int = 0, *, echo: bool = False,
                 clock: Callable[[], int] | None = None):
        self.path = None if path is None else Path(path)
        self.rank = rank
        self._clock = clock
        self._handlers: list[logging.Handler] = []
        self._mllog = None
        if rank != 0:
            return
        # Not logging.getLogger(): an unregistered logger has no parent and no shared handlers.
        logger = logging.Logger(f"stemdl.harness.mlperf.{id(self):x}", logging.INFO)  # noqa: LOG001
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._handlers.append(_StrictFileHandler(self.path, mode="a", encoding="utf-8"))
            except OSError as exc:
                raise StemdlError(f"{self.path}: cannot open the MLPerf log ({exc.strerror or exc})") from None
        if self.path is None or echo:
            self._handlers.append(logging.StreamHandler(sys.stdout))
        for handler in self._handlers:  # the default formatter writes the bare message; emit() flushes
            logger.addHandler(handler)
        # mllog puts root_dir into a regular expression unescaped.
        self._mllog = _mllog.MLLogger(logger=logger, default_stack_offset=_STACK_OFFSET,
                                      root_dir=re.escape(_ROOT_DIR))

    @property
    def enabled(self) -> bool:
        """True on the rank that writes."""
        return self._mllog is not None

    # -- the three verbs
    def start(self, key: str, value=None, metadata: Mapping | None = None) -> None:
        self._emit("start", key, value, metadata)

    def end(self, key: str, value=None, metadata: Mapping | None = None) -> None:
        self._emit("end", key, value, metadata)

    def event(self, key: str, value=None, metadata: Mapping | None = None) -> None:
        self._emit("event", key, value, metadata)

    # -- shorthands for the run (each writes through _emit directly, so the call site stays the caller's)
    def submission_info(self, benchmark: str, org: str | None = None, division: str | None = None,
                        status: str | None = None, platform: str | None = None) -> None:
        """submission_benchmark (the workload's name) and the four submission keys. An argument that is
        None or "" falls back to $STEMDL_SUBMISSION_ORG (DIVISION, STATUS, PLATFORM), then to stemdl,
        closed, onprem, the host name."""
        values = {
            SUBMISSION_BENCHMARK: benchmark,
            SUBMISSION_ORG: _pick(org, "ORG", "stemdl"),
            SUBMISSION_DIVISION: _pick(division, "DIVISION", CLOSED),
            SUBMISSION_STATUS: _pick(status, "STATUS", ONPREM),
            SUBMISSION_PLATFORM: _pick(platform, "PLATFORM", socket.gethostname() or "unknown"),
        }
        for key, allowed in ((SUBMISSION_DIVISION, DIVISIONS), (SUBMISSION_STATUS, STATUSES)):
            if values[key] not in allowed:
                env = f"$STEMDL_{key.upper()}"
                raise StemdlError(f"{key} {values[key]!r} (argument or {env}) is not one of {', '.join(allowed)}")
        for key, value in values.items():
            self._emit("event", key, value)

    def cache_clear(self) -> None:
        self._emit("event", CACHE_CLEAR, True)

    def log_params(self, params: Mapping[str, object]) -> None:
        """One event per key, in the mapping's order (the config values logged during init)."""
        for key, value in params.items():
            self._emit("event", key, value)

    def log_eval(self, epoch: int, values: Mapping[str, float]) -> None:
        """One event per eval key (the workload's, its target metric's first), with the epoch number."""
        meta = {EPOCH_NUM: epoch}
        for key, value in values.items():
            self._emit("event", key, float(value), meta)

    def run_stop(self, status: str) -> None:
        if status not in RUN_STATUSES:
            raise ValueError(f"run_stop status {status!r} is not one of {', '.join(RUN_STATUSES)}")
        self._emit("end", RUN_STOP, None, {STATUS: status})

    def close(self) -> None:
        for handler in self._handlers:
            handler.close()
        self._handlers.clear()
        self._mllog = None

    def __enter__(self) -> MLLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _emit(self, verb: str, key: str, value, metadata: Mapping | None = None) -> None:
        if self._mllog is None:
            return
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(f"{key}: metadata must be a mapping, not {type(metadata).__name__}")
        metadata = None if metadata is None else dict(metadata)
        # mllog swallows an encoding error and writes an error line instead of the key; fail loudly here.
        try:
            json.dumps([value, metadata], default=_to_json)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{key}: value or metadata is not JSON-serializable ({exc})") from None
        time_ms = None if self._clock is None else int(self._clock())
        getattr(self._mllog, verb)(key, value, metadata=metadata, time_ms=time_ms)
        for handler in self._handlers:
            if isinstance(handler, _StrictFileHandler) and handler.failure is not None:
                exc, handler.failure = handler.failure, None
                raise StemdlError(f"{self.path}: cannot write the MLPerf log ({_why(exc)}): the run stops here, "
                                  f"its log would be incomplete") from None


class _StrictFileHandler(logging.FileHandler):
    """A log line that cannot be written (a full disk) is kept as `failure` for the logger to raise,
    instead of logging's traceback on stderr and a run that goes on with lines missing."""

    failure: BaseException | None = None

    def handleError(self, record) -> None:  # noqa: N802 (logging's name)
        self.failure = sys.exc_info()[1]


def _why(exc) -> str:
    return write_problem(exc) if isinstance(exc, OSError) else str(exc)


def _pick(value: str | None, env_name: str, default: str) -> str:
    return value or os.environ.get(f"STEMDL_SUBMISSION_{env_name}") or default


def _to_json(obj):
    # numpy scalars and arrays, which mllog's own encoder accepts
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON-serializable")
