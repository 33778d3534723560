"""The benchmark contract: what the harness asks of a workload, and the registry that finds one by name.

    class MyBenchmark(Workload):                  # stemdl/workloads/<name>/__init__.py: WORKLOAD = MyBenchmark()
        name = "my_benchmark"                     # logged as submission_benchmark
        target_metric, target_value, direction = "mae", 0.05, "min"
        log_keys = {"mae": "eval_error"}          # the target metric's key first
        ...
    registry = Registry({"my_benchmark": "stemdl.workloads.my_benchmark"})
    workload = registry["my_benchmark"]           # imported on first use

The class attributes are the contract MLPerf's rules speak of (algorithmic-efficiency's `Workload`): the
metric that decides a run, its closed-division target, its direction, the evaluation cadence, the log keys.
The methods are what only the workload knows, called by `stemdl.harness.loop` in the order of the log:
`ensure_data` before init; `prepare` and `build` inside it; `training_batch` and the built evaluator in
the timed run. Nothing in `stemdl.harness` imports a workload: the command line hands the
registry in.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from stemdl.harness.errors import StemdlError

DIRECTIONS = ("max", "min")  # higher is better | lower is better


@dataclass(frozen=True)
class Evaluation:
    """One evaluation over the whole validation split, computed once from the all-reduced sums: the log
    line, the stop test, the history and the metrics file all read this object."""

    metrics: Mapping[str, float]  # every figure, by name (the workload's target metric among them)
    details: Mapping[str, Any] = field(default_factory=dict)  # what the metrics file keeps of the last one

    def __getitem__(self, name: str) -> float:
        return self.metrics[name]


class Evaluator(Protocol):
    """Accumulates one evaluation: `update` per batch (on the device, no synchronization), then `result`
    once (collective: one all-reduce)."""

    def update(self, model, x, fields: tuple, mask) -> None: ...

    def result(self) -> Evaluation: ...


@dataclass(frozen=True)
class StepContext:
    """What the harness hands a workload's per-batch hooks."""

    cfg: Any  # stemdl.harness.config.RunConfig
    env: Any  # stemdl.harness.dist.DistributedEnv
    normalized: bool  # the pipeline's x is already normalized (DALI on a GPU)

    @property
    def device(self):
        import torch

        return torch.device(self.env.device)

    @property
    def on_gpu(self) -> bool:
        return self.env.device.startswith("cuda")

    def autocast(self):
        """bf16 autocast on GPUs when `amp` is on; a no-op context on CPUs."""
        import torch

        on = self.on_gpu and self.cfg.harness.amp
        return torch.autocast("cuda" if on else "cpu", dtype=torch.bfloat16, enabled=on)


@dataclass
class Built:
    """What `Workload.build` returns when the evaluator needs nothing but the step context: the model, the
    loss and the evaluator's class (called with the context for each evaluation)."""

    model: Any
    loss: Any
    evaluator_type: Any

    def evaluator(self, ctx) -> Evaluator:
        return self.evaluator_type(ctx)


class Workload:
    """A benchmark on the harness. Subclasses set the class attributes and implement the hooks."""

    name: ClassVar[str]  # submission_benchmark, the registry key and the results folder
    title: ClassVar[str]  # one line: what is learned from what
    target_metric: ClassVar[str]  # the key of Evaluation.metrics that decides the run
    target_title: ClassVar[str]  # how people write it ("macro F1")
    target_value: ClassVar[float]  # the closed division's target
    target_range: ClassVar[tuple[float, float]] = (0.0, 1.0)  # an open target must lie in (low, high]
    direction: ClassVar[str] = "max"  # "max": reached at >= target; "min": at <= target
    eval_every: ClassVar[int] = 1  # epochs between evaluations, unless the config says otherwise
    # Evaluation metric -> MLLOG key, the target metric's first (the rules call it the eval key); the target
    # itself is logged before the clock as "target_" + that key. Bounds: (low, high) each logged value obeys.
    log_keys: ClassVar[Mapping[str, str]]
    log_bounds: ClassVar[Mapping[str, tuple[float | None, float | None]]] = {}
    # Closed-division rules beyond the harness's: {log key: [CHECK expressions]} (hyperparameters fixed there).
    closed_rules: ClassVar[Mapping[str, list[str]]] = {}
    config_section: ClassVar[type]  # a frozen dataclass: the workload's config keys and defaults
    presets_file: ClassVar[str] = "presets.yaml"  # beside the workload's module, in resources/
    channels_last: ClassVar[bool] = False  # move the model to channels_last (2-D convolutions)
    input_normalization: ClassVar[tuple[float, float] | None] = None  # (mean, std) of x / 255, for DALI on a GPU

    # ---- the contract ----------------------------------------------------------------------------------
    def has_reached_target(self, value: float, target: float | None = None) -> bool:
        target = self.target_value if target is None else target
        return value >= target if self.direction == "max" else value <= target

    @property
    def eval_key(self) -> str:
        return self.log_keys[self.target_metric]

    @property
    def target_key(self) -> str:
        return f"target_{self.eval_key}"

    def presets(self) -> dict[str, dict]:
        import yaml

        path = Path(importlib.import_module(type(self).__module__).__file__).parent / "resources" / self.presets_file
        return yaml.safe_load(path.read_text())

    # ---- the hooks -------------------------------------------------------------------------------------
    def check_config(self, cfg) -> None:
        """Check the workload's section (and its rules across sections); raise a StemdlError naming the key."""

    def ensure_data(self, cfg, env) -> Path:
        """The data folder, generated first if the config asks for synthetic data (before init: not timed)."""
        raise NotImplementedError

    def prepare(self, root: Path, cfg, env, log):
        """The run's splits from raw data (inside init): a `stemdl.harness.data.Prepared`. Converted
        shards are the harness's (`stemdl.harness.data.prepare`), checked by `check_shards`."""
        raise NotImplementedError

    def check_shards(self, shards, cfg) -> None:
        """Refuse shards made for another run of this workload (other preprocessing)."""

    def epoch_order(self, prepared, cfg, env):
        """None (one seeded permutation per epoch) or `order(epoch) -> this rank's training positions`."""
        return None

    def build(self, cfg, prepared):
        """What the run trains, with the harness's torch seed set (the same weights on every rank): an
        object with `model` (an nn.Module on the CPU; the harness moves it and wraps it for DDP), `loss`
        (an nn.Module: loss(outputs, targets, epoch) -> scalar tensor; its parameters, if any, are trained
        too, without weight decay, their gradients averaged over the ranks) and `evaluator(ctx)` (a fresh
        `Evaluator` per evaluation)."""
        raise NotImplementedError

    def training_batch(self, ctx: StepContext, x, fields: tuple, generator):
        """(model input, targets) of a training batch, on ctx.device: preprocessing and augmentation."""
        raise NotImplementedError

    def describe(self, evaluation: Evaluation) -> str:
        """The evaluation in the epoch line."""
        return f"{self.target_title} {evaluation[self.target_metric]:.4f}"


class Registry(Mapping):
    """Workload name -> workload, each module imported on first use (a module holding `WORKLOAD`).

    `$STEMDL_WORKLOADS` ("name=module,name=module") adds workloads that live outside the package.
    """

    ENV = "STEMDL_WORKLOADS"

    def __init__(self, modules: Mapping[str, str], default: str):
        self._modules = dict(modules)
        self._loaded: dict[str, Workload] = {}
        self.default = default

    def _all(self) -> dict[str, str]:
        extra = {}
        for item in filter(None, (part.strip() for part in os.environ.get(self.ENV, "").split(","))):
            name, sep, module = item.partition("=")
            if not sep or not name.strip() or not module.strip():
                raise StemdlError(f"${self.ENV}: {item!r} is not NAME=MODULE")
            extra[name.strip()] = module.strip()
        return {**self._modules, **extra}

    def __getitem__(self, name: str) -> Workload:
        modules = self._all()
        if name not in modules:
            raise StemdlError(f"unknown benchmark {name!r} (registered: {', '.join(modules)})")
        if name not in self._loaded:
            try:
                workload = importlib.import_module(modules[name]).WORKLOAD
            except (ImportError, AttributeError) as exc:
                raise StemdlError(f"benchmark {name!r}: cannot load {modules[name]}.WORKLOAD ({exc})") from None
            if workload.name != name:
                raise StemdlError(f"benchmark {name!r}: {modules[name]}.WORKLOAD is named {workload.name!r}")
            self._loaded[name] = workload
        return self._loaded[name]

    def __contains__(self, name) -> bool:
        return name in self._all()

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    @contextlib.contextmanager
    def added(self, name: str, module: str):
        """A workload registered for the duration of a block (tests)."""
        self._modules[name] = module
        try:
            yield self[name]
        finally:
            self._modules.pop(name, None)
            self._loaded.pop(name, None)
