"""The space-group workload's config section: preprocessing, model, heads, loss and sampler.

Every name (model, view, loss, sampler, tasks) is checked here, when the config is loaded, before any data
is read or generated. `tasks` and `task_weights` are parsed once, on first use of `task_names` and
`task_weight_map`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from stemdl.harness.errors import StemdlError


@dataclass(frozen=True)
class SpaceGroupConfig:
    # -- data and preprocessing (stemdl.workloads.spacegroup.preprocess)
    screen_pixels: bool = True  # screen raw HDF5 pixels (NaN, Inf, negative) during init, not only attributes
    image_size: int = 64
    log_floor: float = 1e-3
    log_ceiling: float = 1e4
    view: str = "stack"  # stack: 3 patterns as channels; single: one pattern, logits averaged at eval
    augment: str = "flip"  # flip: random left-right mirror per training sample; none
    friedel: str = "keep"  # keep | average (with its 180-degree turn) | split (that average and the rest, as channels)
    # -- model and heads
    model: str = "small_cnn"
    tasks: str = "space_group"  # heads on the shared trunk: space_group[,lattice,crystal_system,centring]
    task_weighting: str = "fixed"  # fixed (task_weights) | learned (homoscedastic uncertainty)
    task_weights: str = ""  # e.g. "lattice=0.5,crystal_system=0.3"; 1.0 for each task not named
    # -- class imbalance (stemdl.workloads.spacegroup.losses, .samplers)
    label_smoothing: float = 0.0
    loss: str = "ce"  # ce | weighted | class_balanced | focal | logit_adjusted | drw
    focal_gamma: float = 2.0
    cb_beta: float = 0.9999  # class_balanced and drw: effective-number beta
    la_tau: float = 1.0  # logit_adjusted: temperature of the log prior
    drw_epoch: int | None = None  # drw: first re-weighted epoch (None: the one after 80 % of the budget)
    sampler: str = "uniform"  # uniform (a permutation per epoch) | balanced | sqrt (class-aware, with replacement)

    @cached_property
    def task_names(self) -> tuple[str, ...]:
        from stemdl.workloads.spacegroup.heads import parse_tasks

        return parse_tasks(self.tasks)

    @cached_property
    def task_weight_map(self) -> dict[str, float]:
        from stemdl.workloads.spacegroup.heads import parse_task_weights

        return parse_task_weights(self.task_weights, self.task_names, self.task_weighting)

    @property
    def in_channels(self) -> int:
        return (3 if self.view == "stack" else 1) * (2 if self.friedel == "split" else 1)


def check(cfg) -> None:
    """The section's values, and its rules across the harness's (epoch budget, shard scope)."""
    from stemdl.workloads.spacegroup.losses import check_options
    from stemdl.workloads.spacegroup.models import MODELS
    from stemdl.workloads.spacegroup.preprocess import FRIEDEL
    from stemdl.workloads.spacegroup.samplers import SAMPLERS
    from stemdl.workloads.spacegroup.synth.generate import presets as synth_presets

    w, h = cfg.workload, cfg.harness
    rules = [
        (w.image_size >= 8, "image_size", "must be 8 or more"),
        (w.view in ("stack", "single"), "view", "must be stack or single"),
        (w.augment in ("flip", "none"), "augment", "must be flip or none"),
        (w.friedel in FRIEDEL, "friedel", f"must be one of {', '.join(FRIEDEL)}"),
        (0 < w.log_floor < w.log_ceiling, "log_floor", "0 < log_floor < log_ceiling"),
        (w.model in MODELS, "model", f"{w.model!r} is not one of {', '.join(MODELS)}"),
        (w.sampler in SAMPLERS, "sampler", f"{w.sampler!r} is not one of {', '.join(SAMPLERS)}"),
        (w.task_weighting in ("fixed", "learned"), "task_weighting", "must be fixed or learned"),
        (h.shard_scope == "global" or w.sampler == "uniform", "shard_scope",
         "node scope draws from each node's own samples: use sampler uniform"),
        (not h.synth_preset or h.synth_preset in synth_presets(), "synth_preset",
         f"{h.synth_preset!r} is not a preset of `stemdl synth` ({', '.join(synth_presets())})"),
    ]
    for ok, key, why in rules:
        if not ok:
            raise StemdlError(f"config key {key!r}: {why}")
    _check_generated_size(cfg, synth_presets())
    check_options(w.loss, label_smoothing=w.label_smoothing, focal_gamma=w.focal_gamma, cb_beta=w.cb_beta,
                  la_tau=w.la_tau, drw_epoch=w.drw_epoch, epochs=h.epochs)
    w.task_weight_map  # noqa: B018 (parses tasks and task_weights: a bad one raises here)


def _check_generated_size(cfg, synth_presets: dict) -> None:
    """A set still to be generated must have patterns at least image_size wide: said now, not after the
    minutes of generating it."""
    from pathlib import Path

    from stemdl.workloads.spacegroup.data.layout import IMAGE_SIZE

    h, w = cfg.harness, cfg.workload
    if not h.synth_preset or Path(h.data).exists():
        return
    size = int(synth_presets[h.synth_preset].get("image_size", IMAGE_SIZE))
    if w.image_size > size:
        raise StemdlError(f"config key 'image_size': {w.image_size} is larger than the {size}x{size} patterns "
                          f"the synth preset {h.synth_preset!r} would generate in {h.data}")
