"""`stemdl run`: the timed benchmark. `setup()` then `timed_run()`, mirroring init and run in the log.

    stemdl run                                              # the main job: default synthetic set, CPU
    mpiexec -n 2 stemdl run --config smoke --log-dir runs/smoke
    srun -n 8 --gpus-per-task 1 stemdl run --config reference --data /lustre/stemdl --log-dir runs/ref

Setup (init_start..init_stop, untimed but at most 30 minutes): ranks and communicators, the index, the
input pipeline (which reads and preprocesses what it keeps in memory), the model and the optimizer.
Run (run_start..run_stop, the clock): train an epoch on every rank's shard, evaluate the dataset-level
macro F1 over the whole validation split (one all-reduce of the confusion matrices), stop as soon as it
reaches the target (`success`) or when the epoch budget is spent (`aborted`). Before each timestamp that
matters the device is synchronized and the ranks agree (barrier).

SIGTERM or SIGINT on any rank (a scheduler's time limit, scancel, bkill, Ctrl-C) stops every rank within
a step: during the run the handler only records the signal, every training and evaluation step the ranks
sum the flags (one MPI all-reduce of an integer, microseconds), and all leave together; rank 0 logs
run_stop with status `aborted` and the reason ("SIGTERM on rank 1"), and the command exits with 128 +
the signal number (143 for SIGTERM). During setup the signal interrupts the rank it reached, which ends
every rank (MPI_Abort) with that status, before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from stemdl.harness import checkpoint, dist, energy, mlperf
from stemdl.workloads.spacegroup import heads as tasks
from stemdl.harness import config as config_mod
from stemdl.workloads.spacegroup.data import prepare as prepare_mod
from stemdl.harness.errors import StemdlError
from stemdl.workloads.spacegroup.losses import build_loss
from stemdl.harness.metrics import ConfusionMatrix
from stemdl.workloads.spacegroup.models import build_model
from stemdl.harness.pipelines import NUM_CLASSES, build_pipeline
from stemdl.workloads.spacegroup.preprocess import eval_views, normalize, training_view
from stemdl.harness.signals import Interrupted, StopSignal


@dataclass
class Session:
    """Everything setup() builds and the timed run uses."""

    cfg: config_mod.RunConfig
    env: dist.DistributedEnv
    log: mlperf.MLLogger
    paths: dict
    pipe: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    power: energy.PowerSampler  # GPU power (NVML), not a data sampler
    criterion: torch.nn.Module  # tasks.TaskLoss: the space-group loss (stemdl.workloads.spacegroup.losses) plus any other heads
    prepared: prepare_mod.Prepared
    lattice: tasks.LatticeScale | None  # training mean/std of the lattice targets (lattice head only)
    stop: StopSignal | None = None  # None: no signal handling (the run cannot be stopped early)
    resumed: dict | None = None  # the checkpoint state this run continues from


def stop_requested(s: Session) -> bool:
    return s.stop is not None and s.stop.agreed()


# ---------------------------------------------------------------- setup


def next_result_paths(log_dir: Path) -> dict:
    """result_<i>.txt (the MLLOG) and its companions, with i the first index not taken: never overwrite."""
    log_dir.mkdir(parents=True, exist_ok=True)
    i = 0
    while (log_dir / f"result_{i}.txt").exists():
        i += 1
    stem = log_dir / f"result_{i}"
    return {"log": stem.with_suffix(".txt"), "config": Path(f"{stem}.config.json"),
            "metrics": Path(f"{stem}.metrics.json")}


def lr_lambda(cfg, steps_per_epoch: int):
    """Linear warmup over warmup_epochs, then cosine decay to zero at the end of the epoch budget."""
    warm = max(1, round(cfg.warmup_epochs * steps_per_epoch)) if cfg.warmup_epochs > 0 else 0
    total = max(cfg.epochs * steps_per_epoch, warm + 1)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / (total - warm)))

    return factor


def build_model_and_optimizer(cfg, env, steps_per_epoch: int, criterion: torch.nn.Module):
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg.model, NUM_CLASSES, in_channels=3 if cfg.view == "stack" else 1)
    names = tasks.parse_tasks(cfg.tasks)
    if len(names) > 1:  # space_group alone keeps the plain model (and its checkpoints' parameter names)
        model = tasks.MultiTaskHead(model, names)
    device = torch.device(env.device)
    # channels_last pays on GPUs (tensor cores) and on CPUs too (about 1.4x for small_cnn here)
    model = model.to(device, memory_format=torch.channels_last)
    if env.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    # The loss may learn too (task weights by homoscedastic uncertainty): same optimizer, no weight decay.
    groups = [{"params": list(model.parameters())}]
    if any(True for _ in criterion.parameters()):
        groups.append({"params": list(criterion.parameters()), "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate(env.world_size), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch))
    return model, optimizer, scheduler


def log_config(log, cfg, env, pipe) -> None:
    log.event(mlperf.GLOBAL_BATCH_SIZE, cfg.global_batch_size(env.world_size))
    log.event(mlperf.SEED, cfg.seed)
    log.event(mlperf.OPT_NAME, "adamw")
    log.event(mlperf.OPT_BASE_LR, cfg.learning_rate(env.world_size))
    log.event(mlperf.OPT_WEIGHT_DECAY, cfg.weight_decay)
    log.event(mlperf.OPT_LR_WARMUP_EPOCHS, cfg.warmup_epochs)
    log.event(mlperf.OPT_LR_DECAY_SCHEDULE, cfg.schedule)
    log.event(mlperf.TRAIN_SAMPLES, pipe.train_samples)
    log.event(mlperf.EVAL_SAMPLES, pipe.eval_samples)
    log.event(mlperf.NUMBER_OF_NODES, env.number_of_nodes)
    log.event(mlperf.ACCELERATORS_PER_NODE, env.accelerators_per_node)
    log.event(mlperf.TARGET_EVAL_ACCURACY, cfg.target)


def build_criterion(cfg, prepared, lattice: tasks.LatticeScale | None, device) -> torch.nn.Module:
    """The training loss: the space-group loss chosen by `loss` (weights from the training class counts,
    the same on every rank), combined with the other heads' losses when `tasks` names more."""
    class_loss = build_loss(cfg.loss, prepared.class_counts, label_smoothing=cfg.label_smoothing,
                            focal_gamma=cfg.focal_gamma, cb_beta=cfg.cb_beta, la_tau=cfg.la_tau,
                            drw_epoch=cfg.drw_epoch, epochs=cfg.epochs)
    names = tasks.parse_tasks(cfg.tasks)
    criterion = tasks.TaskLoss(names, cfg.task_weighting,
                               tasks.parse_task_weights(cfg.task_weights, names, cfg.task_weighting),
                               lattice=lattice, classification_loss=class_loss)
    return criterion.to(device)


def lattice_scale(cfg, prepared) -> tasks.LatticeScale | None:
    """Mean and std of the training lattices, which the lattice head predicts standardized."""
    if "lattice" not in tasks.parse_tasks(cfg.tasks):
        return None
    return tasks.LatticeScale.from_lattices(prepared.train.targets)


def as_outputs(outputs) -> dict:
    """The model's outputs by task: a plain model gives the space-group logits alone."""
    return outputs if isinstance(outputs, dict) else {"space_group": outputs}


def resume_state(cfg, env, where) -> dict | None:
    if where is None:
        return None
    path = checkpoint.resolve(where)
    return {**checkpoint.load(path, cfg.to_dict(), env.world_size), "path": str(path)}


def setup(cfg, env, power, resume=None) -> Session:
    if env.device == "cpu":  # ranks on one node share its cores; more threads than cores only thrash
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))
    paths = next_result_paths(Path(cfg.log_dir)) if env.is_root else {}
    paths = dist.broadcast_object(paths)
    log = mlperf.MLLogger(paths["log"], env.rank)
    # Only the closed target makes a closed run; any other target is an open-division run.
    division = cfg.submission_division or (None if cfg.target == config_mod.CLOSED_TARGET else "open")
    log.submission_info(cfg.submission_org, division, cfg.submission_status, cfg.submission_platform)
    root = prepare_mod.ensure_data(cfg)  # generating a synthetic set is not part of the benchmark's init
    log.cache_clear()
    log.start(mlperf.INIT_START)
    state = resume_state(cfg, env, resume)
    prepared = prepare_mod.prepare(root, cfg, env, log)
    try:
        pipe = build_pipeline(cfg.pipeline, prepared.train, prepared.eval, cfg, env, prepared.scope)
        lattice = lattice_scale(cfg, prepared)
        criterion = build_criterion(cfg, prepared, lattice, torch.device(env.device))
        model, optimizer, scheduler = build_model_and_optimizer(cfg, env, pipe.steps_per_epoch, criterion)
    except BaseException:
        prepare_mod.cleanup(prepared, cfg.keep_staged)
        raise
    if state is not None:
        checkpoint.restore(state, model=model, optimizer=optimizer, scheduler=scheduler)
        criterion.load_state_dict(state["criterion"])
        log.event(mlperf.RESUMED_FROM_CHECKPOINT, state["path"], metadata={"epoch_num": state["epoch"]})
    log_config(log, cfg, env, pipe)
    if env.is_root:
        paths["config"].write_text(config_mod.describe(cfg) + "\n")
    synchronize(env)
    log.end(mlperf.INIT_STOP)
    return Session(cfg, env, log, paths, pipe, model, optimizer, scheduler, power, criterion, prepared, lattice,
                   resumed=state)


def synchronize(env) -> None:
    if env.device.startswith("cuda"):
        torch.cuda.synchronize()
    dist.barrier()


# ---------------------------------------------------------------- the timed run


def to_input(x: torch.Tensor, s: Session) -> torch.Tensor:
    x = x.to(s.env.device, non_blocking=True)
    x = x if s.pipe.normalized else normalize(x)
    return x.contiguous(memory_format=torch.channels_last)


def augment(x: torch.Tensor, how: str, generator: torch.Generator) -> torch.Tensor:
    """Random left-right flips per sample ('flip'). A mirrored pattern is the pattern of the mirrored
    crystal, whose space group is the same or its enantiomorph, which kinematic diffraction cannot tell
    apart anyway (same diffraction class)."""
    if how == "none":
        return x
    flip = torch.rand(len(x), generator=generator) < 0.5
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)


def autocast(s: Session):
    on_gpu = s.env.device.startswith("cuda") and s.cfg.amp
    return torch.autocast("cuda" if on_gpu else "cpu", dtype=torch.bfloat16, enabled=on_gpu)


def train_epoch(s: Session, epoch: int) -> dict | None:
    """The epoch's mean loss and speed; None when a signal stopped it (on every rank at the same step)."""
    s.model.train()
    generator = torch.Generator().manual_seed(s.cfg.seed * 100003 + epoch * 1009 + s.env.rank)
    total, count, start = 0.0, 0, time.perf_counter()
    for x, y, t in s.pipe.train_batches(epoch):
        if stop_requested(s):
            return None
        x = augment(training_view(to_input(x, s), s.cfg.view, generator), s.cfg.augment, generator)
        y, t = y.to(s.env.device, non_blocking=True), t.to(s.env.device, non_blocking=True)
        with autocast(s):
            outputs = s.model(x)
        loss, _ = s.criterion(as_outputs(outputs), tasks.targets(y, t, s.criterion.tasks), epoch)
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        s.criterion.average_gradients()  # learned task weights: DDP does not see them
        s.optimizer.step()
        s.scheduler.step()
        total += float(loss.detach()) * len(y)
        count += len(y)
    seconds = time.perf_counter() - start
    return {"loss": total / max(count, 1), "samples_per_s": count * s.env.world_size / max(seconds, 1e-9)}


@torch.no_grad()
def evaluate(s: Session) -> tuple[ConfusionMatrix, object] | None:
    """The confusion matrix over the whole validation split and the other heads' metrics; None when a
    signal stopped it."""
    s.model.eval()
    cm = ConfusionMatrix(NUM_CLASSES, device=s.env.device)
    names = s.criterion.tasks
    extra = tasks.TaskMetrics(names, s.lattice, device=s.env.device)
    for x, y, t, mask in s.pipe.eval_batches():
        if stop_requested(s):
            return None
        views = eval_views(to_input(x, s), s.cfg.view)
        y, t, mask = y.to(s.env.device), t.to(s.env.device), mask.to(s.env.device)
        with autocast(s):
            outputs = tasks.average_outputs([as_outputs(s.model(v)) for v in views])
        cm.update(y, outputs["space_group"].argmax(dim=1), mask)
        extra.update(outputs, tasks.targets(y, t, names), mask)
    cm.all_reduce()
    extra.all_reduce()
    return cm, extra


def epoch_line(epoch: int, s: Session, stats: dict, cm: ConfusionMatrix | None, elapsed: float) -> str:
    text = (f"epoch {epoch}/{s.cfg.epochs}: loss {stats['loss']:.4f}, {stats['samples_per_s']:.0f} samples/s, "
            f"lr {s.scheduler.get_last_lr()[0]:.2e}")
    if cm is not None:
        text += (f", macro F1 {cm.macro_f1():.4f} (weighted {cm.weighted_f1():.4f}, "
                 f"top-1 {cm.accuracy():.4f})")
    return text + f", {elapsed / 60:.2f} min"


def history_entry(epoch: int, stats: dict, cm: ConfusionMatrix, extra) -> dict:
    return {"epoch": epoch, **stats, "macro_f1": cm.macro_f1(), "weighted_f1": cm.weighted_f1(),
            "top1": cm.accuracy(), **extra.results()}


def save_checkpoint(s: Session, epoch: int, history: list) -> None:
    """Every checkpoint_every epochs (rank 0 writes; after the evaluation, so history is complete)."""
    if not s.cfg.checkpoint_every or epoch % s.cfg.checkpoint_every or not s.env.is_root:
        return
    path = checkpoint.save(Path(s.cfg.checkpoint_dir), epoch, model=s.model, optimizer=s.optimizer,
                           scheduler=s.scheduler, history=history, config=s.cfg.to_dict(),
                           world_size=s.env.world_size, keep=s.cfg.checkpoint_keep,
                           extra={"criterion": s.criterion.state_dict()})
    print(f"stemdl run: checkpoint {path}", file=sys.stderr, flush=True)


def timed_run(s: Session) -> dict | None:
    """The run's result; None when a signal came before run_start (nothing logged then)."""
    first = 1 + (s.resumed["epoch"] if s.resumed else 0)
    history = list(s.resumed["history"]) if s.resumed else []
    status, final, reason, epoch = "aborted", None, None, first - 1
    prior_minutes = history[-1].get("elapsed_min", 0.0) if history else 0.0
    synchronize(s.env)
    if stop_requested(s):
        s.stop.reason()
        return None
    s.log.start(mlperf.RUN_START)
    s.power.mark(mlperf.RUN_START)
    start = time.time()
    for epoch in range(first, s.cfg.epochs + 1):
        s.log.start(mlperf.EPOCH_START, metadata={"epoch_num": epoch})
        stats = train_epoch(s, epoch)
        if stats is None:  # stopped inside the epoch: no epoch_stop (the rules allow that)
            reason = s.stop.reason()
            break
        s.log.end(mlperf.EPOCH_STOP, metadata={"epoch_num": epoch})
        cm = None
        if epoch % s.cfg.eval_every == 0 or epoch == s.cfg.epochs:
            s.log.start(mlperf.EVAL_START, metadata={"epoch_num": epoch})
            evaluated = evaluate(s)
            if evaluated is None:  # stopped inside the evaluation: no eval_stop
                reason = s.stop.reason()
                break
            cm, extra = evaluated
            final = cm
            s.log.log_eval(epoch, cm.macro_f1(), cm.weighted_f1(), cm.accuracy())
            s.log.end(mlperf.EVAL_STOP, metadata={"epoch_num": epoch})
            history.append({**history_entry(epoch, stats, cm, extra),
                            "elapsed_min": prior_minutes + (time.time() - start) / 60})
        if s.env.is_root:
            print(epoch_line(epoch, s, stats, cm, time.time() - start), flush=True)
        save_checkpoint(s, epoch, history)
        if cm is not None and cm.macro_f1() >= s.cfg.target:
            status = "success"
            if s.cfg.stop_at_target:
                break
        elif cm is not None:
            status = "aborted"  # without stop_at_target: success means the last evaluation is on target
    synchronize(s.env)
    s.power.mark(mlperf.RUN_STOP)
    if reason is None:
        s.log.run_stop(status)
    else:
        s.log.end(mlperf.RUN_STOP, metadata={mlperf.STATUS: mlperf.ABORTED, "reason": reason})
    log_energy(s)
    return {"status": status, "minutes": (time.time() - start) / 60, "epochs": epoch, "history": history,
            "final": final, "interrupted": reason}


def log_energy(s: Session) -> None:
    """After the clock: each node's first rank writes its power log beside the result, and rank 0 logs
    the GPU energy of run_start..run_stop summed over the nodes (nothing without NVML)."""
    joules = s.power.energy_joules()
    energy.log_power(s.paths["log"].parent / "power" / s.paths["log"].stem / f"node_{s.env.node_rank}.txt",
                     s.power, s.env.node_rank)
    total = torch.tensor([joules or 0.0, 1.0 if joules is not None else 0.0], dtype=torch.float64)
    dist.all_reduce_sum(total)
    if total[1] > 0:
        s.log.event(mlperf.GPU_ENERGY, round(float(total[0]), 3),
                    metadata={"nodes": int(total[1]), "between": [mlperf.RUN_START, mlperf.RUN_STOP]})


def report(s: Session, result: dict) -> bool:
    """The metrics JSON, the one line a user reads, and the compliance verdict on the log (rank 0)."""
    if not s.env.is_root:
        return True
    final = result["final"]
    metrics = {"status": result["status"], "time_to_train_min": result["minutes"], "epochs": result["epochs"],
               "target": s.cfg.target, "number_of_nodes": s.env.number_of_nodes, "world_size": s.env.world_size,
               "history": result["history"], "final": final.to_json() if final is not None else None}
    if result.get("interrupted"):
        metrics["interrupted"] = result["interrupted"]
    if s.resumed:
        metrics["resumed_from"] = {"checkpoint": s.resumed["path"], "epoch": s.resumed["epoch"]}
    if s.prepared.skipped:
        metrics["bad_samples_skipped"] = s.prepared.skipped
    tmp = s.paths["metrics"].with_name(s.paths["metrics"].name + ".partial")
    tmp.write_text(json.dumps(metrics, indent=1) + "\n")
    os.replace(tmp, s.paths["metrics"])
    f1 = final.macro_f1() if final is not None else float("nan")
    reached = "reached" if result["status"] == "success" else "NOT reached"
    print(f"stemdl: time to F1 {result['minutes']:.2f} min, {result['epochs']} epochs, final macro F1 {f1:.4f} "
          f"(target {s.cfg.target} {reached}), {s.env.number_of_nodes} node(s), {s.env.world_size} rank(s); "
          f"log {s.paths['log']}", flush=True)
    from stemdl.harness.compliance import check_log

    s.log.close()
    if s.resumed:  # the rules reject resumed_from_checkpoint: saying "FAILED" would only confuse
        print(f"stemdl: resumed from {s.resumed['path']} (epoch {s.resumed['epoch']}): the log is marked so and "
              f"is not a compliant timed run", flush=True)
        return True
    ok, messages = check_log(s.paths["log"])
    print(f"stemdl: compliance check of {s.paths['log']}: {'PASSED' if ok else 'FAILED'}", flush=True)
    for message in messages if not ok else []:
        print(f"  {message}", file=sys.stderr)
    return ok


# ---------------------------------------------------------------- the command


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="default",
                        help="a preset (default, smoke, reference) or a YAML file (default: %(default)s)")
    parser.add_argument("--log-dir", help="where the MLLOG result_<i>.txt goes (never overwritten)")
    parser.add_argument("--data", help="data folder in the public layout")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--target", type=float, help="macro F1 to reach (default 0.9)")
    parser.add_argument("--epochs", type=int, help="epoch budget")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key (YAML value), e.g. --set batch_size=64")
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
    import yaml

    values = {"log_dir": args.log_dir, "data": args.data, "seed": args.seed, "target": args.target,
              "epochs": args.epochs, "stage_dir": args.stage_dir, "keep_staged": args.keep_staged,
              "skip_bad": args.skip_bad}
    if args.data is not None:  # the user's own folder: never fill a mistyped path with synthetic data
        values["synth_preset"] = ""  # (None would mean "not given" and keep the preset's)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise StemdlError(f"--set {item!r}: expected KEY=VALUE")
        values[key.strip()] = yaml.safe_load(value)
    return values


def run(args: argparse.Namespace) -> int:
    cfg = config_mod.load_config(args.config, overrides(args))
    env = dist.setup()
    power = energy.PowerSampler(env=env)  # GPU power on each node's first rank (NVML)
    stop = StopSignal(env)
    session = None
    try:
        stop.install()
        if env.is_root:
            print(f"stemdl run: {env.world_size} rank(s) on {env.number_of_nodes} node(s), {env.device}; "
                  f"config:\n{config_mod.describe(cfg)}", file=sys.stderr, flush=True)
        message = power.start()
        if message and env.is_root:
            print(f"stemdl run: {message}", file=sys.stderr, flush=True)
        session = setup(cfg, env, power, resume=args.resume)
        session.stop = stop
        stop.defer()
        result = timed_run(session)
        if result is None:
            compliant = True
            if env.is_root:
                print(f"stemdl run: stopped before run_start by {stop.reason_text}", file=sys.stderr, flush=True)
        else:
            compliant = report(session, result)
            if result["interrupted"]:
                if env.is_root:
                    print(f"stemdl run: stopped by {result['interrupted']}: every rank left the run at the "
                          f"same step; run_stop aborted logged in {session.paths['log']}", file=sys.stderr,
                          flush=True)
                dist.barrier()  # no rank exits (non-zero) before rank 0 has written and checked the log
    except Interrupted as exc:  # during setup: other ranks may be waiting in a collective, so end them all
        stop.defer()  # a second signal now must not interrupt the stopping
        print(f"stemdl run: {exc} during setup: stopping every rank", file=sys.stderr, flush=True)
        if env.world_size > 1:
            dist.abort(128 + exc.signum)
        stop.signum = exc.signum
        compliant = True
    finally:
        stop.uninstall()
        power.stop()
        if session is not None:
            prepare_mod.cleanup(session.prepared, cfg.keep_staged)
        dist.teardown()
    return stop.exit_status() or (0 if compliant else 1)
