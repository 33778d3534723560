"""What the space-group workload does to a batch: the model's input and targets, and the evaluation's sums.

    inputs, targets = training_batch(ctx, x, (labels, lattices), generator, cfg.workload)
    meter = Evaluator(ctx, cfg.workload, lattice_scale); meter.update(model, x, fields, mask); meter.result()

An evaluation counts the confusion matrix of the 230 space groups (the target metric, macro F1) and the
other heads' sums on the device, then all-reduces both in one collective and reads every figure once.
"""

from __future__ import annotations

import torch

from stemdl.harness.metrics import ConfusionMatrix, all_reduce
from stemdl.harness.workload import Evaluation, StepContext
from stemdl.workloads.spacegroup.data.layout import N_SPACE_GROUPS
from stemdl.workloads.spacegroup.heads import TaskMetrics, as_outputs, average_outputs, targets
from stemdl.workloads.spacegroup.preprocess import augment, eval_views, friedel, normalize, training_view


def to_input(x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """A batch as the model takes it: on the device, normalized, channels_last."""
    x = x.to(ctx.device, non_blocking=True)
    x = x if ctx.normalized else normalize(x)
    return x.contiguous(memory_format=torch.channels_last)


def training_batch(ctx: StepContext, x, fields: tuple, generator: torch.Generator, section):
    """(model input, {task: target}) of a training batch: the view (stack, or a random pattern), its
    Friedel treatment, then the random mirror, drawn from the epoch's `generator`."""
    y, t = fields
    x = friedel(training_view(to_input(x, ctx), section.view, generator), section.friedel)
    x = augment(x, section.augment, generator)
    y, t = y.to(ctx.device, non_blocking=True), t.to(ctx.device, non_blocking=True)
    return x, targets(y, t, section.task_names)


class Evaluator:
    """One evaluation over the validation split: the confusion matrix and the other heads' metrics."""

    def __init__(self, ctx: StepContext, section, lattice=None):
        self.ctx, self.section = ctx, section
        self.cm = ConfusionMatrix(N_SPACE_GROUPS, device=ctx.env.device)
        self.heads = TaskMetrics(section.task_names, lattice, device=ctx.env.device)

    def update(self, model, x, fields: tuple, mask) -> None:
        """Add a batch: the views' outputs averaged (one pattern alone: the three patterns' logits)."""
        device = self.ctx.device
        how = self.section.friedel
        views = [friedel(v, how) for v in eval_views(to_input(x, self.ctx), self.section.view)]
        y, t = (f.to(device) for f in fields)
        mask = mask.to(device)
        with self.ctx.autocast():
            outputs = average_outputs([as_outputs(model(v)) for v in views])
        self.cm.update(y, outputs["space_group"].argmax(dim=1), mask)
        self.heads.update(outputs, targets(y, t, self.section.task_names), mask)

    def result(self) -> Evaluation:
        """Collective: the sums over every rank, in one all-reduce, and every figure read once."""
        all_reduce(self.cm, self.heads)
        summary = self.cm.summary()
        metrics = {"macro_f1": summary["macro_f1"], "weighted_f1": summary["weighted_f1"],
                   "top1": summary["accuracy"], **self.heads.results()}
        return Evaluation(metrics, details=summary)
