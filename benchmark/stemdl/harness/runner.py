"""The `stemdl run` command: the config resolved, the ranks found, the loop run, the result reported.

    stemdl run [--benchmark NAME] [--config PRESET|FILE] [--set KEY=VALUE ...]
    outcome = execute(workload, cfg)       # the same from Python (`stemdl ablate` runs its methods so)

The report is rank 0's: the metrics file beside the log (written atomically), one line saying whether the
target was reached and how fast, and the compliance verdict on the log in words. Exit status: 0 when the
run's log passes the check; 1 when it fails it (a closed run that never reached the target among them:
its log is a faithful record, but not a valid result); 2 for a bad config or bad data; 128 + N when
signal N stopped the run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from stemdl.harness import dist, energy, files
from stemdl.harness import config as config_mod
from stemdl.harness import data as data_mod
from stemdl.harness.errors import StemdlError
from stemdl.harness.loop import Result, Session, setup, timed_run
from stemdl.harness.signals import Interrupted, StopSignal


@dataclass
class Outcome:
    """What a run ended with (rank 0's view; other ranks see status and paths only)."""

    exit_status: int
    result: Result | None = None  # None: stopped before run_start
    paths: dict | None = None
    verdict: object = None  # stemdl.harness.compliance.Verdict, on rank 0 after the check


def metrics_document(s: Session, result: Result) -> dict:
    """The metrics file: the run's figures, its history and the last evaluation (its metrics, then its
    details, e.g. per-class scores; no JSON in JSON)."""
    w = s.workload
    doc = {"benchmark": w.name, "target_metric": w.target_metric, "status": result.status,
           "time_to_train_min": result.minutes, "epochs": result.epochs, "target": s.cfg.harness.target,
           "number_of_nodes": s.env.number_of_nodes, "world_size": s.env.world_size, "history": result.history,
           "final": {**result.final.metrics, **result.final.details} if result.final is not None else None}
    if result.interrupted:
        doc["interrupted"] = result.interrupted
    if result.diverged:
        doc["diverged"] = result.diverged
    if s.resumed:
        doc["resumed_from"] = {"checkpoint": s.resumed["path"], "epoch": s.resumed["epoch"]}
    if s.prepared.skipped:
        doc["bad_samples_skipped"] = s.prepared.skipped
    return finite(doc)


def finite(value):
    """`value` with every float that is not finite replaced by None: the file stays valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def result_line(s: Session, result: Result) -> str:
    w, h = s.workload, s.cfg.harness
    final = f"{result.final[w.target_metric]:.4f}" if result.final is not None else "n/a"
    where = f"{s.env.number_of_nodes} node(s), {s.env.world_size} rank(s); log {s.paths['log']}"
    if result.status == "success":
        return (f"stemdl: time to {w.target_title} {h.target:g}: {result.minutes:.2f} min, {result.epochs} epochs, "
                f"final {w.target_title} {final} (target reached), {where}")
    return (f"stemdl: {w.target_title} {h.target:g} NOT reached in {result.epochs} epochs ({result.minutes:.2f} min), "
            f"final {w.target_title} {final}, {where}")


def report(s: Session, result: Result, registry) -> tuple[bool, object]:
    """(log passes the check, verdict): the metrics JSON, the one line a user reads, the verdict (rank 0)."""
    if not s.env.is_root:
        return True, None
    from stemdl.harness.compliance import check_log

    files.write_atomic(s.paths["metrics"], json.dumps(metrics_document(s, result), indent=1, allow_nan=False) + "\n")
    print(result_line(s, result), flush=True)
    if result.diverged:
        print(f"stemdl: the run stopped: {result.diverged} (run_stop aborted)", flush=True)
    s.log.close()
    if s.resumed:  # the rules reject resumed_from_checkpoint: saying "FAILED" would only confuse
        print(f"stemdl: resumed from {s.resumed['path']} (epoch {s.resumed['epoch']}): the log is marked so and "
              f"is not a compliant timed run", flush=True)
        return True, None
    verdict = check_log(s.paths["log"], registry)
    print(f"stemdl: compliance check of {s.paths['log']}: {verdict.summary()}", flush=True)
    if verdict.only_target_missed:
        print("stemdl: the log is a faithful record of a run that did not converge: the summarizer counts it as "
              "such, but alone it is not a valid result", flush=True)
    for message in verdict.messages[1:] if not verdict.passed else []:
        print(f"  {message}", file=sys.stderr)
    return verdict.passed, verdict


def _announce(env, cfg, power) -> None:
    if env.is_root:
        print(f"stemdl run: {cfg.benchmark} on {env.world_size} rank(s), {env.number_of_nodes} node(s), "
              f"{env.device}; config:\n{config_mod.describe(cfg)}", file=sys.stderr, flush=True)
    message = power.start()
    if message and env.is_root:
        print(f"stemdl run: {message}", file=sys.stderr, flush=True)


def _finish(session: Session, result: Result | None, stop: StopSignal, registry) -> tuple[bool, object]:
    env = session.env
    if result is None:
        if env.is_root:
            print(f"stemdl run: stopped before run_start by {stop.reason_text}", file=sys.stderr, flush=True)
        return True, None
    compliant, verdict = report(session, result, registry)
    if result.interrupted:
        if env.is_root:
            print(f"stemdl run: stopped by {result.interrupted}: every rank left the run at the same step; "
                  f"run_stop aborted logged in {session.paths['log']}", file=sys.stderr, flush=True)
        dist.barrier()  # no rank exits (non-zero) before rank 0 has written and checked the log
    return compliant, verdict


def preflight(cfg, resume=None) -> None:
    """What the user gave that can be checked before any work: the checkpoint to resume exists, staging
    has converted shards to copy, the checkpoint and staging folders can be written (the log folder is
    checked when the result index is claimed, next)."""
    from stemdl.harness import checkpoint
    from stemdl.harness.shards import is_shard_dir

    h = cfg.harness
    if resume is not None:
        checkpoint.resolve(resume)
    if h.stage_dir and not is_shard_dir(Path(h.data)):
        raise StemdlError(f"--stage-dir {h.stage_dir}: staging copies converted shards (stemdl convert), and "
                          f"{h.data} is not a shard folder")
    for folder, what in ((h.checkpoint_dir, "config key 'checkpoint_dir':"), (h.stage_dir, "--stage-dir")):
        if folder:
            files.check_folder(Path(folder), what)


def execute(workload, cfg, registry, resume=None) -> Outcome:
    """One benchmark run on every rank of this MPI job: setup, the timed run, the report."""
    env = dist.setup()
    try:
        dist.on_every_rank(preflight, cfg, resume)  # a node-local folder may fail on one node only
    except StemdlError:
        dist.teardown()
        raise
    power = energy.PowerSampler(env=env)  # GPU power on each node's first rank (NVML)
    stop = StopSignal(env)
    session, result, verdict, compliant = None, None, None, True
    try:
        stop.install()
        _announce(env, cfg, power)
        session = setup(workload, cfg, env, power, resume=resume)
        session.stop = stop
        stop.defer()
        result = timed_run(session)
        compliant, verdict = _finish(session, result, stop, registry)
    except Interrupted as exc:  # during setup: other ranks may be waiting in a collective, so end them all
        stop.defer()  # a second signal now must not interrupt the stopping
        print(f"stemdl run: {exc} during setup: stopping every rank", file=sys.stderr, flush=True)
        if env.world_size > 1:
            dist.abort(128 + exc.signum)
        stop.signum = exc.signum
    except StemdlError as exc:
        if session is not None and env.world_size > 1:  # after setup, the other ranks would wait forever
            print(f"stemdl run: error on rank {env.rank}: {exc}; stopping every rank", file=sys.stderr, flush=True)
            dist.abort(2)
        raise
    finally:
        stop.uninstall()
        power.stop()
        if session is not None:
            data_mod.cleanup(session.prepared, cfg.harness.keep_staged)
        dist.teardown()
    status = stop.exit_status() or (0 if compliant else 1)
    return Outcome(status, result, session.paths if session else None, verdict)


# ---------------------------------------------------------------- the command


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--benchmark", metavar="NAME",
                        help="the registered workload to run (default: the registry's default)")
    parser.add_argument("--config", default="default",
                        help="a preset of the benchmark (default, smoke, reference, ...) or a YAML file "
                             "(default: %(default)s)")
    parser.add_argument("--log-dir", help="where the MLLOG result_<i>.txt goes (never overwritten)")
    parser.add_argument("--data", help="data folder in the benchmark's layout, or converted shards")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--target", type=float, help="the target metric's value to reach (default: the closed one)")
    parser.add_argument("--epochs", type=int, help="epoch budget")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key (YAML value), e.g. --set batch_size=64 or workload.model=resnet18")
    parser.add_argument("--stage-dir", help="node-local folder ($TMPDIR, /dev/shm) to copy converted shards to "
                                            "during init, outside the clock")
    parser.add_argument("--keep-staged", action="store_true", default=None,
                        help="leave the staged copy in place at exit")
    parser.add_argument("--skip-bad", action="store_true", default=None,
                        help="leave out bad samples (counted and logged) instead of refusing to run; refuses "
                             "above max_bad (1 %% by default)")
    parser.add_argument("--resume", metavar="CHECKPOINT",
                        help="continue from a checkpoint file, or the newest in a folder (not a compliant run)")


def overrides(args: argparse.Namespace) -> dict:
    values = {"log_dir": args.log_dir, "data": args.data, "seed": args.seed, "target": args.target,
              "epochs": args.epochs, "stage_dir": args.stage_dir, "keep_staged": args.keep_staged,
              "skip_bad": args.skip_bad}
    values = {f"harness.{k}": v for k, v in values.items()}
    if args.data is not None:  # the user's own folder: never fill a mistyped path with synthetic data
        values["harness.synth_preset"] = ""  # (None would mean "not given" and keep the preset's)
    return {**values, **config_mod.parse_set(args.set)}


def run(args: argparse.Namespace, registry) -> int:
    workload = registry[args.benchmark or registry.default]
    cfg = config_mod.load_config(workload, args.config, overrides(args))
    return execute(workload, cfg, registry, resume=args.resume).exit_status
