"""The run's configuration: the harness's section and the workload's, resolved once, frozen, printed, saved.

    cfg = load_config(workload, "smoke", {"epochs": 3, "log_dir": "runs/x"})
    cfg.harness.batch_size, cfg.workload.model      # sections: dinov2's cfg.optim.*, cfg.train.*
    cfg.global_batch_size(world_size=4)             # derived values are computed here, once

Values come from a preset of the workload (its `presets.yaml`), then a YAML file (which may name the
`preset` it starts from), then the command line. In files and `--set` a key may be written bare
(`batch_size`), when one section has it, or as `section.key` (`harness.batch_size`, `workload.model`);
a file may also nest the sections. An unknown key, a value of the wrong type or a name that is not one of
the choices (model, pipeline, loss, ...) is a one-line `StemdlError` naming the key, before any data is
read or generated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from stemdl.harness.errors import StemdlError

SECTIONS = ("harness", "workload")


@dataclass(frozen=True)
class HarnessConfig:
    """What the harness itself reads: the run's contract, its data delivery, optimizer and outputs."""

    # -- the contract: what is measured and when it is reached (None: the workload's own)
    target: float | None = None  # the target metric's value to reach; another than the workload's is open division
    eval_every: int | None = None  # epochs between evaluations
    epochs: int = 40  # budget: the run is aborted if the target is not reached by then
    stop_at_target: bool = True  # False: train the whole budget (ablations compare final metrics)
    # -- data
    data: str = "data/default"  # a folder in the workload's layout, or converted shards
    synth_preset: str | None = None  # generate the data with this preset of the workload's generator when absent
    train_split: str = "train"
    eval_split: str = "dev"
    pipeline: str = "memory"  # input pipeline: memory | torch | dali (stemdl.harness.pipelines.PIPELINES)
    loader_workers: int = 2  # raw files: DataLoader worker processes; dali: its threads; shards are read in process
    shard_scope: str = "global"  # global: one permutation over all samples; node: each node reads only its part
    stage_dir: str | None = None  # node-local folder to copy converted shards to during init ($TMPDIR, /dev/shm)
    keep_staged: bool = False  # leave the staged copy in place at exit (a persistent burst buffer)
    verify_shards: str = "size"  # none | size | checksum: check converted shards against their manifest
    skip_bad: bool = False  # leave out bad samples (counted and logged) instead of refusing to run
    max_bad: float = 0.01  # ... but refuse above this fraction of the samples
    # -- optimization (AdamW; lr scaled linearly with the number of ranks, as the reference does)
    batch_size: int = 32  # per rank
    base_lr: float = 1e-3  # per rank; the run uses base_lr * world_size
    weight_decay: float = 5e-5
    warmup_epochs: float = 1.0
    schedule: str = "cosine"  # cosine (to zero at the end of the epoch budget) | constant, after warmup
    amp: bool = True  # bf16 autocast and channels_last on GPUs (ignored on CPUs)
    seed: int = 0
    # -- where results go and how the submission is described
    log_dir: str = "runs"
    checkpoint_dir: str | None = None  # write checkpoints here (long non-benchmark training; see --resume)
    checkpoint_every: int = 0  # epochs between checkpoints; 0: none
    checkpoint_keep: int = 2  # newest checkpoints kept
    # None: from $STEMDL_SUBMISSION_ORG, _DIVISION, _STATUS, _PLATFORM, else stemdl, closed, onprem, host name
    submission_org: str | None = None
    submission_division: str | None = None
    submission_status: str | None = None
    submission_platform: str | None = None


# Harness keys that may differ between a checkpoint and the run resuming it: where things go and how data
# is delivered, none of which changes the training trajectory (stemdl.harness.checkpoint).
DELIVERY_KEYS = frozenset({
    "log_dir", "checkpoint_dir", "checkpoint_every", "checkpoint_keep", "pipeline", "loader_workers",
    "stage_dir", "keep_staged", "verify_shards", "submission_org", "submission_division", "submission_status",
    "submission_platform", "synth_preset",
})


@dataclass(frozen=True)
class RunConfig:
    benchmark: str  # the workload's name (submission_benchmark)
    harness: HarnessConfig
    workload: typing.Any  # the workload's own section (a frozen dataclass, `Workload.config_section`)

    def global_batch_size(self, world_size: int) -> int:
        return self.harness.batch_size * world_size

    def learning_rate(self, world_size: int) -> float:
        return self.harness.base_lr * world_size

    def to_dict(self) -> dict:
        return {"benchmark": self.benchmark, "harness": dataclasses.asdict(self.harness),
                "workload": dataclasses.asdict(self.workload)}

    def flat(self) -> dict:
        """{"harness.key": value, "workload.key": value}: what a checkpoint compares."""
        return {f"{section}.{k}": v for section in SECTIONS for k, v in self.to_dict()[section].items()}


# ---- values: types and sections -----------------------------------------------------------------------

def _kinds(hint) -> tuple:
    origin = typing.get_origin(hint)
    return typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)


def _number(value):
    """A YAML 1.1 reader reads `1e-3` (no dot) as a string: take it as the number the user wrote."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_type(key: str, value, hint):
    """`value` converted to the field's type, or a StemdlError naming the key."""
    allowed = _kinds(hint)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _number(value) if kind is float else value
        if kind is float and isinstance(number, (int, float)) and not isinstance(number, bool):
            return float(number)
        if kind is str and isinstance(value, str):
            return value
    names = " or ".join("null" if k is type(None) else k.__name__ for k in allowed)
    raise StemdlError(f"config key {key!r}: expected {names}, got {value!r}")


def _fields(section_type) -> dict:
    return typing.get_type_hints(section_type)


def _section_of(key: str, types_: dict, source: str) -> tuple[str, str]:
    """(section, field) of a key written bare or as section.key."""
    section, dot, name = key.partition(".")
    if dot:
        if section not in types_ or name not in _fields(types_[section]):
            raise StemdlError(f"{source}: unknown config key {key!r}")
        return section, name
    owners = [s for s in SECTIONS if key in _fields(types_[s])]
    if len(owners) == 1:
        return owners[0], key
    if owners:
        raise StemdlError(f"{source}: config key {key!r} is in both sections: write harness.{key} or workload.{key}")
    known = ", ".join(k for s in SECTIONS for k in _fields(types_[s]))
    raise StemdlError(f"{source}: unknown config key {key!r} (known: {known})")


def sectioned(values: dict, types_: dict, source: str) -> dict:
    """{section: {field: value}} from a mapping of bare, dotted or nested keys."""
    out: dict = {s: {} for s in SECTIONS}
    for key, value in values.items():
        if key in SECTIONS and isinstance(value, dict):
            for name, inner in value.items():
                out[key][_section_of(f"{key}.{name}", types_, source)[1]] = inner
            continue
        section, name = _section_of(str(key), types_, source)
        out[section][name] = value
    return out


def _build(section_type, values: dict, defaults=None):
    hints = _fields(section_type)
    base = dataclasses.asdict(defaults) if defaults is not None else {}
    return section_type(**{**base, **{k: _check_type(k, v, hints[k]) for k, v in values.items()}})


# ---- presets and files ----------------------------------------------------------------------------------

class _UniqueKeys(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""


def _mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def read_yaml(path: Path) -> dict:
    """A config file's mapping; a one-line StemdlError if it is unreadable, empty, not a mapping or repeats a key."""
    try:
        values = yaml.load(path.read_text(), Loader=_UniqueKeys)  # noqa: S506 (a SafeLoader subclass)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise StemdlError(f"{path}: cannot read the config ({' '.join(str(exc).split())})") from None
    if values is None:
        raise StemdlError(f"{path}: the config file is empty (write `preset: NAME` to run a preset as it is)")
    if not isinstance(values, dict):
        raise StemdlError(f"{path}: a config file holds a mapping of keys to values")
    return values


def _start(workload, name_or_file: str) -> tuple[dict, str]:
    """(values, source) of a preset name or of a file on top of the preset it names."""
    table = workload.presets()
    if name_or_file in table:
        return dict(table[name_or_file]), f"preset {name_or_file}"
    path = Path(name_or_file)
    if not path.is_file():
        raise StemdlError(f"--config {name_or_file}: neither a preset of {workload.name} ({', '.join(table)}) "
                          f"nor a file")
    values = read_yaml(path)
    base = values.pop("preset", "default")
    if base not in table:
        raise StemdlError(f"{path}: preset {base!r} is not one of {', '.join(table)}")
    return _merge(table[base], values), str(path)


def _merge(base: dict, top: dict) -> dict:
    """`top` over `base`, section by section where either nests."""
    merged = dict(base)
    for key, value in top.items():
        if key in SECTIONS and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def parse_set(items: list[str]) -> dict:
    """`--set KEY=VALUE` items as {KEY: YAML value} (what `stemdl run` and `stemdl ablate` take)."""
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise StemdlError(f"--set {item!r}: expected KEY=VALUE")
        try:
            values[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise StemdlError(f"--set {item!r}: the value is not YAML") from None
    return values


# ---- resolution -----------------------------------------------------------------------------------------

def load_config(workload, name_or_file: str = "default", overrides: dict | None = None) -> RunConfig:
    """The run's config: a preset of `workload` or a YAML file, then `overrides` (None values: not given),
    resolved (the target and cadence default to the workload's) and checked."""
    types_ = {"harness": HarnessConfig, "workload": workload.config_section}
    values, source = _start(workload, name_or_file)
    values.pop("description", None)
    parts = sectioned(values, types_, source)
    harness, section = _build(HarnessConfig, parts["harness"]), _build(workload.config_section, parts["workload"])
    if overrides:
        given = sectioned({k: v for k, v in overrides.items() if v is not None}, types_, "command line")
        harness, section = _build(HarnessConfig, given["harness"], harness), \
            _build(workload.config_section, given["workload"], section)
    harness = dataclasses.replace(
        harness, target=workload.target_value if harness.target is None else harness.target,
        eval_every=workload.eval_every if harness.eval_every is None else harness.eval_every)
    cfg = RunConfig(workload.name, harness, section)
    check(cfg, workload)
    workload.check_config(cfg)
    return cfg


def check(cfg: RunConfig, workload) -> None:
    """Harness values that have the right type but no meaning."""
    from stemdl.harness.pipelines import PIPELINES  # torch is only needed once a run is configured

    h = cfg.harness
    closed = workload.target_value
    low, high = workload.target_range
    rules = [
        (math.isfinite(h.target) and low < h.target <= high, "target", f"must be in ({low:g}, {high:g}]"),
        (h.epochs >= 1 and h.eval_every >= 1, "epochs", "epochs and eval_every must be >= 1"),
        (h.batch_size >= 1, "batch_size", "must be >= 1"),
        (h.seed >= 0, "seed", "must be 0 or more"),
        (h.loader_workers >= 0, "loader_workers", "must be 0 or more"),
        (h.pipeline in PIPELINES, "pipeline", f"{h.pipeline!r} is not one of {', '.join(PIPELINES)}"),
        (h.schedule in ("cosine", "constant"), "schedule", "must be cosine or constant"),
        (h.base_lr > 0 and h.weight_decay >= 0, "base_lr", "base_lr > 0 and weight_decay >= 0"),
        (h.verify_shards in ("none", "size", "checksum"), "verify_shards", "must be none, size or checksum"),
        (h.shard_scope in ("global", "node"), "shard_scope", "must be global or node"),
        (0.0 <= h.max_bad < 1.0, "max_bad", "must be in [0, 1)"),
        (h.checkpoint_every >= 0 and h.checkpoint_keep >= 1, "checkpoint_every",
         "checkpoint_every >= 0 and checkpoint_keep >= 1"),
        (h.checkpoint_every == 0 or h.checkpoint_dir, "checkpoint_dir", "checkpoint_every needs a checkpoint_dir"),
        (h.submission_division in (None, "closed", "open"), "submission_division", "must be closed or open"),
        (h.submission_division != "closed" or h.target == closed, "target",
         f"the closed division's target is {closed}; other targets are open-division runs"),
    ]
    for ok, key, why in rules:
        if not ok:
            raise StemdlError(f"config key {key!r}: {why}")


def describe(cfg: RunConfig) -> str:
    """The config as printed at start and saved with the run."""
    return json.dumps(cfg.to_dict(), indent=1, sort_keys=True)
