"""Benchmark 1, `stemdl`: the space group of a crystal from a stack of three CBED patterns.

    stemdl run                                   # this workload's `default` preset (the registry's default)
    stemdl run --benchmark stemdl --config reference --data /lustre/stemdl

The contract: the dataset-level macro F1 over the whole validation split, 0.9 in the closed division,
evaluated every epoch and logged as `eval_accuracy` (with the weighted F1 and the top-1 accuracy beside
it). Imports are lazy, so that naming the workload costs no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass

from stemdl.harness.workload import Workload
from stemdl.workloads.spacegroup.config import SpaceGroupConfig
from stemdl.workloads.spacegroup.config import check as check_section


@dataclass
class Built:
    model: object
    loss: object
    lattice: object  # heads.LatticeScale of the training split (lattice head only), else None
    section: SpaceGroupConfig

    def evaluator(self, ctx):
        from stemdl.workloads.spacegroup.steps import Evaluator

        return Evaluator(ctx, self.section, self.lattice)


class SpaceGroupClassification(Workload):
    name = "stemdl"
    title = "space-group classification from stacks of three CBED patterns"
    target_metric = "macro_f1"
    target_title = "macro F1"
    target_value = 0.9
    target_range = (0.0, 1.0)
    direction = "max"
    eval_every = 1
    log_keys = {"macro_f1": "eval_accuracy", "weighted_f1": "eval_weighted_f1", "top1": "eval_top1_accuracy"}
    log_bounds = {key: (0.0, 1.0) for key in log_keys.values()}
    config_section = SpaceGroupConfig
    channels_last = True  # tensor cores on GPUs, and about 1.4x for small_cnn on CPUs

    @property
    def input_normalization(self) -> tuple[float, float]:
        from stemdl.workloads.spacegroup.preprocess import NORM_MEAN, NORM_STD

        return NORM_MEAN, NORM_STD

    def check_config(self, cfg) -> None:
        check_section(cfg)

    def ensure_data(self, cfg, env):
        from stemdl.workloads.spacegroup.data.prepare import ensure_data

        return ensure_data(cfg)

    def prepare(self, root, cfg, env, log):
        from stemdl.workloads.spacegroup.data.prepare import prepare_raw

        return prepare_raw(root, cfg, env, log)

    def check_shards(self, shards, cfg) -> None:
        from stemdl.workloads.spacegroup.data.prepare import check_preprocessing

        check_preprocessing(shards, cfg)

    def epoch_order(self, prepared, cfg, env):
        """Class-aware samplers draw from the training labels; `uniform` is the harness's permutation."""
        if cfg.workload.sampler == "uniform":
            return None
        from stemdl.workloads.spacegroup.samplers import epoch_indices

        labels, h = prepared.train.fields["labels"], cfg.harness
        return lambda epoch: epoch_indices(cfg.workload.sampler, labels, h.seed, epoch, env.rank, env.world_size,
                                           h.batch_size)

    def build(self, cfg, prepared) -> Built:
        """The loss (weights from the training class counts, the same on every rank), then the model: the
        harness has seeded torch, so every rank starts from the same weights."""
        from stemdl.workloads.spacegroup import heads
        from stemdl.workloads.spacegroup.data.layout import N_SPACE_GROUPS, class_counts
        from stemdl.workloads.spacegroup.losses import build_loss
        from stemdl.workloads.spacegroup.models import build_model

        w = cfg.workload
        lattice = heads.lattice_scale(prepared.train) if "lattice" in w.task_names else None
        class_loss = build_loss(w.loss, class_counts(prepared.train.fields["labels"]),
                                label_smoothing=w.label_smoothing, focal_gamma=w.focal_gamma, cb_beta=w.cb_beta,
                                la_tau=w.la_tau, drw_epoch=w.drw_epoch, epochs=cfg.harness.epochs)
        loss = heads.TaskLoss(w.task_names, w.task_weighting, w.task_weight_map, lattice=lattice,
                              classification_loss=class_loss)
        model = build_model(w.model, N_SPACE_GROUPS, in_channels=w.in_channels)
        if len(w.task_names) > 1:  # space_group alone keeps the plain model (and its checkpoints' names)
            model = heads.MultiTaskHead(model, w.task_names)
        return Built(model, loss, lattice, w)

    def training_batch(self, ctx, x, fields, generator):
        from stemdl.workloads.spacegroup.steps import training_batch

        return training_batch(ctx, x, fields, generator, ctx.cfg.workload)

    def describe(self, evaluation) -> str:
        m = evaluation.metrics
        return f"macro F1 {m['macro_f1']:.4f} (weighted {m['weighted_f1']:.4f}, top-1 {m['top1']:.4f})"


WORKLOAD = SpaceGroupClassification()
