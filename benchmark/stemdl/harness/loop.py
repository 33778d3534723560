"""`stemdl run`: the timed benchmark loop of any workload. `setup()` then `timed_run()`, mirroring init and run.

    stemdl run                                              # the main job: the default workload's default preset
    mpiexec -n 2 stemdl run --config smoke --log-dir runs/smoke
    srun -n 8 --gpus-per-task 1 stemdl run --benchmark stemdl --config reference --data /lustre/stemdl

Setup (init_start..init_stop, untimed but at most 30 minutes): the workload's data, the input pipeline
(which reads what it keeps in memory), the model and the optimizer. Run (run_start..run_stop, the clock):
train an epoch on every rank's shard, evaluate over the whole validation split (the workload's sums,
all-reduced once), stop as soon as the target metric reaches the target (`success`) or when the epoch
budget is spent (`aborted`). Before each timestamp that matters the device is synchronized and the ranks
agree (barrier).

SIGTERM or SIGINT on any rank stops every rank within a step: the handler only records the signal, the
ranks sum the flags every step (one MPI all-reduce of an integer) and leave together; rank 0 logs run_stop
`aborted` with the reason, and the command exits with 128 + the signal number. During setup the signal
ends every rank (MPI_Abort) with that status, before anything is timed.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stemdl.harness import checkpoint, dist, energy, files, mlperf
from stemdl.harness import config as config_mod
from stemdl.harness import data as data_mod
from stemdl.harness.errors import StemdlError
from stemdl.harness.pipelines import Feed, build_pipeline
from stemdl.harness.signals import StopSignal
from stemdl.harness.workload import Evaluation, StepContext


@dataclass
class Session:
    """Everything setup() builds and the timed run uses."""

    workload: object  # stemdl.harness.workload.Workload
    cfg: config_mod.RunConfig
    env: dist.DistributedEnv
    log: mlperf.MLLogger
    paths: dict
    pipe: object
    built: object  # what Workload.build made: model (unwrapped), loss, evaluator
    model: torch.nn.Module  # the built model on its device, wrapped for DDP on several ranks
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    power: energy.PowerSampler  # GPU power (NVML), not a data sampler
    prepared: data_mod.Prepared
    ctx: StepContext
    stop: StopSignal | None = None  # None: no signal handling (the run cannot be stopped early)
    resumed: dict | None = None  # the checkpoint state this run continues from


@dataclass
class Result:
    status: str  # success | aborted
    minutes: float
    epochs: int  # the last epoch started
    history: list = field(default_factory=list)  # one entry per evaluation
    final: Evaluation | None = None
    interrupted: str | None = None  # which signal stopped the run, on which ranks
    diverged: str | None = None  # why a loss or metric that is not finite stopped it


class Diverged(StemdlError):
    """A loss or a logged metric that is not finite, on any rank: every rank stops at the same step."""


def stop_requested(s: Session) -> bool:
    return s.stop is not None and s.stop.agreed()


def step_agreement(s: Session, bad: str | None) -> bool:
    """Collective each step (one MPI sum): True when a signal came to any rank. Raises Diverged on every
    rank when any rank's loss was not finite (`bad`: where, on this rank)."""
    if s.stop is None:
        if bad:
            raise Diverged(bad)
        return False
    signalled, diverged = dist.sum_ints([1 if s.stop.signum else 0, 1 if bad else 0])
    if diverged:
        ranks = dist.allgather_object(bad)
        raise Diverged(next(r for r in ranks if r))
    return signalled > 0


# ---------------------------------------------------------------- setup


def result_paths(log_dir: Path) -> dict:
    """result_<i>.txt (the MLLOG) and its companions, with i the first index none of them takes, claimed
    by creating the log exclusively: two runs started at once into one folder (a job array) never share
    an index, and nothing is overwritten."""
    files.check_folder(log_dir, "--log-dir")
    i = 0
    while True:
        stem = log_dir / f"result_{i}"
        paths = {"log": stem.with_suffix(".txt"), "config": Path(f"{stem}.config.json"),
                 "metrics": Path(f"{stem}.metrics.json")}
        if not (paths["config"].exists() or paths["metrics"].exists()):
            try:
                os.close(os.open(paths["log"], os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                return paths
            except FileExistsError:
                pass
        i += 1


def discard_results(paths: dict) -> None:
    """A run that fails before run_start leaves no result behind: its claimed log and config go."""
    for path in (paths.get("log"), paths.get("config")):
        if path is not None:
            Path(path).unlink(missing_ok=True)


def lr_lambda(h, steps_per_epoch: int):
    """Linear warmup over warmup_epochs, then cosine decay to zero at the end of the epoch budget."""
    warm = max(1, round(h.warmup_epochs * steps_per_epoch)) if h.warmup_epochs > 0 else 0
    total = max(h.epochs * steps_per_epoch, warm + 1)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if h.schedule == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / (total - warm)))

    return factor


def place_model(model: torch.nn.Module, workload, env) -> torch.nn.Module:
    """The model on this rank's device (channels_last where the workload asks), in DDP on several ranks."""
    device = torch.device(env.device)
    model = model.to(device, memory_format=torch.channels_last) if workload.channels_last else model.to(device)
    if env.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def build_optimizer(cfg, env, model: torch.nn.Module, loss: torch.nn.Module, steps_per_epoch: int):
    """AdamW over the model and, without weight decay, the loss's own parameters (learned task weights)."""
    groups = [{"params": list(model.parameters())}]
    if any(True for _ in loss.parameters()):
        groups.append({"params": list(loss.parameters()), "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate(env.world_size), weight_decay=cfg.harness.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.harness, steps_per_epoch))


def log_config(log, workload, cfg, env, pipe) -> None:
    h = cfg.harness
    log.log_params({
        mlperf.GLOBAL_BATCH_SIZE: cfg.global_batch_size(env.world_size), mlperf.SEED: h.seed,
        mlperf.OPT_NAME: "adamw", mlperf.OPT_BASE_LR: cfg.learning_rate(env.world_size),
        mlperf.OPT_WEIGHT_DECAY: h.weight_decay, mlperf.OPT_LR_WARMUP_EPOCHS: h.warmup_epochs,
        mlperf.OPT_LR_DECAY_SCHEDULE: h.schedule, mlperf.TRAIN_SAMPLES: pipe.train_samples,
        mlperf.EVAL_SAMPLES: pipe.eval_samples, mlperf.NUMBER_OF_NODES: env.number_of_nodes,
        mlperf.ACCELERATORS_PER_NODE: env.accelerators_per_node, workload.target_key: h.target,
    })


def division(workload, cfg) -> str | None:
    """Only the workload's target makes a closed run; any other target is an open-division run."""
    h = cfg.harness
    return h.submission_division or (None if h.target == workload.target_value else "open")


def resume_state(cfg, env, where) -> dict | None:
    if where is None:
        return None
    path = checkpoint.resolve(where)
    return {**checkpoint.load(path, cfg, env.world_size), "path": str(path)}


def open_log(workload, cfg, env) -> tuple[dict, mlperf.MLLogger]:
    """Rank 0 claims the result files; every rank learns them, or the reason it could not (all raise)."""
    paths = dist.on_root(result_paths, Path(cfg.harness.log_dir))
    log = mlperf.MLLogger(paths["log"], env.rank)
    h = cfg.harness
    log.submission_info(workload.name, h.submission_org, division(workload, cfg), h.submission_status,
                        h.submission_platform)
    return paths, log


def build_training(workload, cfg, env, prepared, steps_per_epoch: int) -> tuple:
    """(built, model, optimizer, scheduler): the workload's model and loss, placed, and their optimizer."""
    torch.manual_seed(cfg.harness.seed)  # the same initial weights on every rank
    built = workload.build(cfg, prepared)
    built.loss = built.loss.to(torch.device(env.device))
    model = place_model(built.model, workload, env)
    optimizer, scheduler = build_optimizer(cfg, env, model, built.loss, steps_per_epoch)
    return built, model, optimizer, scheduler


def build_run(workload, cfg, env, prepared) -> tuple:
    """(pipeline, built, model, optimizer, scheduler): everything of init after the data."""
    feed = Feed(order=workload.epoch_order(prepared, cfg, env), normalization=workload.input_normalization)
    pipe = build_pipeline(cfg.harness.pipeline, prepared.train, prepared.eval, cfg, env, prepared.scope, feed)
    return (pipe, *build_training(workload, cfg, env, prepared, pipe.steps_per_epoch))


def training_session(workload, cfg, env, prepared, pipe) -> Session:
    """A session for `train_epoch` alone, on any `pipe` (with train_batches, steps_per_epoch, normalized):
    no log, no signals, no data preparation. What benchmarks of the training step time."""
    built, model, optimizer, scheduler = build_training(workload, cfg, env, prepared, pipe.steps_per_epoch)
    return Session(workload, cfg, env, None, {}, pipe, built, model, optimizer, scheduler, None, prepared,
                   StepContext(cfg, env, normalized=pipe.normalized))


def setup(workload, cfg, env, power, resume=None) -> Session:
    """Init, logged; a failure on the way removes the result files it claimed (rank 0)."""
    if env.device == "cpu":  # ranks on one node share its cores; more threads than cores only thrash
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))
    paths, log = open_log(workload, cfg, env)
    try:
        return _init(workload, cfg, env, power, resume, paths, log)
    except BaseException:
        log.close()
        if env.is_root:
            discard_results(paths)
        raise


def _init(workload, cfg, env, power, resume, paths, log) -> Session:
    root = workload.ensure_data(cfg, env)  # generating a synthetic set is not part of the benchmark's init
    log.cache_clear()
    log.start(mlperf.INIT_START)
    state = resume_state(cfg, env, resume)
    prepared = data_mod.prepare(workload, root, cfg, env, log)
    try:
        pipe, built, model, optimizer, scheduler = build_run(workload, cfg, env, prepared)
    except BaseException:
        data_mod.cleanup(prepared, cfg.harness.keep_staged)
        raise
    if state is not None:
        checkpoint.restore(state, model=model, optimizer=optimizer, scheduler=scheduler, loss=built.loss)
        log.event(mlperf.RESUMED_FROM_CHECKPOINT, state["path"], metadata={mlperf.EPOCH_NUM: state["epoch"]})
    log_config(log, workload, cfg, env, pipe)
    if env.is_root:
        files.write_atomic(paths["config"], config_mod.describe(cfg) + "\n")
    synchronize(env)
    log.end(mlperf.INIT_STOP)
    ctx = StepContext(cfg, env, normalized=pipe.normalized)
    return Session(workload, cfg, env, log, paths, pipe, built, model, optimizer, scheduler, power, prepared, ctx,
                   resumed=state)


def synchronize(env) -> None:
    if env.device.startswith("cuda"):
        torch.cuda.synchronize()
    dist.barrier()


# ---------------------------------------------------------------- the timed run


def average_loss_gradients(loss: torch.nn.Module, world_size: int) -> None:
    """A loss that learns (task weights) is not in DDP: average its gradients over the ranks as DDP does
    for the model's, so that every rank's copy stays the same."""
    if world_size < 2:
        return
    for p in loss.parameters():
        if p.grad is not None:
            dist.all_reduce_sum(p.grad).div_(world_size)


def train_epoch(s: Session, epoch: int) -> dict | None:
    """The epoch's mean loss and speed; None when a signal stopped it (on every rank at the same step).
    A loss that is not finite raises Diverged on every rank at the next step (its backward still runs:
    the other ranks' gradients wait for it)."""
    s.model.train()
    generator = torch.Generator().manual_seed(s.cfg.harness.seed * 100003 + epoch * 1009 + s.env.rank)
    total, count, start, bad = 0.0, 0, time.perf_counter(), None
    for step, (x, fields) in enumerate(s.pipe.train_batches(epoch), start=1):
        if step_agreement(s, bad):
            return None
        inputs, targets = s.workload.training_batch(s.ctx, x, fields, generator)
        with s.ctx.autocast():
            outputs = s.model(inputs)
        loss = s.built.loss(outputs, targets, epoch)
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_loss_gradients(s.built.loss, s.env.world_size)
        s.optimizer.step()
        s.scheduler.step()
        value = float(loss.detach())
        if not math.isfinite(value) and bad is None:
            bad = f"the training loss is {value} at epoch {epoch}, step {step} on rank {s.env.rank}"
        total += value * len(x)
        count += len(x)
    if step_agreement(s, bad):
        return None
    seconds = time.perf_counter() - start
    return {"loss": total / max(count, 1), "samples_per_s": count * s.env.world_size / max(seconds, 1e-9)}


@torch.no_grad()
def evaluate(model: torch.nn.Module, pipe, evaluator, stop=None) -> Evaluation | None:
    """One evaluation of `model` over the pipeline's whole validation split; None when `stop()` says a
    signal came (every rank at the same batch)."""
    model.eval()
    for x, fields, mask in pipe.eval_batches():
        if stop is not None and stop():
            return None
        evaluator.update(model, x, fields, mask)
    return evaluator.result()


def epoch_line(epoch: int, s: Session, stats: dict, evaluation: Evaluation | None, elapsed: float) -> str:
    text = (f"epoch {epoch}/{s.cfg.harness.epochs}: loss {stats['loss']:.4f}, {stats['samples_per_s']:.0f} "
            f"samples/s, lr {s.scheduler.get_last_lr()[0]:.2e}")
    if evaluation is not None:
        text += f", {s.workload.describe(evaluation)}"
    return text + f", {elapsed / 60:.2f} min"


def save_checkpoint(s: Session, epoch: int, history: list) -> None:
    """Every checkpoint_every epochs (rank 0 writes; after the evaluation, so history is complete)."""
    h = s.cfg.harness
    if not h.checkpoint_every or epoch % h.checkpoint_every or not s.env.is_root:
        return
    path = checkpoint.save(Path(h.checkpoint_dir), epoch, model=s.model, optimizer=s.optimizer,
                           scheduler=s.scheduler, loss=s.built.loss, history=history, cfg=s.cfg,
                           world_size=s.env.world_size, keep=h.checkpoint_keep)
    print(f"stemdl run: checkpoint {path}", file=sys.stderr, flush=True)


def run_epoch(s: Session, epoch: int, result: Result, clock) -> bool:
    """Train and, on the cadence, evaluate one epoch, logged; False when a signal stopped it."""
    s.log.start(mlperf.EPOCH_START, metadata={mlperf.EPOCH_NUM: epoch})
    stats = train_epoch(s, epoch)
    if stats is None:  # stopped inside the epoch: no epoch_stop (the rules allow that)
        return False
    s.log.end(mlperf.EPOCH_STOP, metadata={mlperf.EPOCH_NUM: epoch})
    evaluation = None
    if epoch % s.cfg.harness.eval_every == 0 or epoch == s.cfg.harness.epochs:
        s.log.start(mlperf.EVAL_START, metadata={mlperf.EPOCH_NUM: epoch})
        evaluation = evaluate(s.model, s.pipe, s.built.evaluator(s.ctx), lambda: stop_requested(s))
        if evaluation is None:  # stopped inside the evaluation: no eval_stop
            return False
        logged = {key: evaluation[metric] for metric, key in s.workload.log_keys.items()}
        bad = [f"{key} {value}" for key, value in logged.items() if not math.isfinite(value)]
        if bad:  # the same on every rank: the sums were all-reduced
            raise Diverged(f"the evaluation at epoch {epoch} gave {', '.join(bad)}")
        s.log.log_eval(epoch, logged)
        s.log.end(mlperf.EVAL_STOP, metadata={mlperf.EPOCH_NUM: epoch})
        result.final = evaluation
        result.history.append({"epoch": epoch, **stats, **evaluation.metrics, "elapsed_min": clock()})
        reached = s.workload.has_reached_target(evaluation[s.workload.target_metric], s.cfg.harness.target)
        result.status = "success" if reached else "aborted"  # without stop_at_target: the last one decides
    if s.env.is_root:
        print(epoch_line(epoch, s, stats, evaluation, clock.seconds()), flush=True)
    save_checkpoint(s, epoch, result.history)
    return True


class _Clock:
    """Minutes since run_start, plus those of the runs a resumed run continues."""

    def __init__(self, prior_minutes: float):
        self.prior, self.start = prior_minutes, time.time()

    def seconds(self) -> float:
        """Seconds of this run since run_start."""
        return time.time() - self.start

    def __call__(self) -> float:
        return self.prior + self.seconds() / 60


def timed_run(s: Session) -> Result | None:
    """The run's result; None when a signal came before run_start (nothing logged then)."""
    first = 1 + (s.resumed["epoch"] if s.resumed else 0)
    result = Result("aborted", 0.0, first - 1, list(s.resumed["history"]) if s.resumed else [])
    synchronize(s.env)
    if stop_requested(s):
        s.stop.reason()
        return None
    s.log.start(mlperf.RUN_START)
    s.power.mark(mlperf.RUN_START)
    clock = _Clock(result.history[-1].get("elapsed_min", 0.0) if result.history else 0.0)
    for epoch in range(first, s.cfg.harness.epochs + 1):
        result.epochs = epoch
        try:
            if not run_epoch(s, epoch, result, clock):
                result.interrupted = s.stop.reason()
                break
        except Diverged as exc:
            result.status, result.diverged = "aborted", str(exc)
            break
        if result.status == "success" and s.cfg.harness.stop_at_target:
            break
    synchronize(s.env)
    s.power.mark(mlperf.RUN_STOP)
    reason = result.interrupted or result.diverged
    if reason is None:
        s.log.run_stop(result.status)
    else:
        s.log.end(mlperf.RUN_STOP, metadata={mlperf.STATUS: mlperf.ABORTED, "reason": reason})
    log_energy(s)
    result.minutes = clock.seconds() / 60
    return result


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
