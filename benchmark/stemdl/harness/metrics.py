"""Dataset-level metrics from one confusion matrix, summed over ranks: the target metric is macro F1.

    cm = ConfusionMatrix(num_classes, device)
    for x, y, mask in dev_batches:                  # mask: False for padding samples
        cm.update(y, model(x).argmax(1), mask)
    cm.all_reduce()                                 # SUM over ranks (no-op without a process group)
    cm.macro_f1(), cm.weighted_f1(), cm.accuracy(), cm.per_class(), cm.to_json()

Counting stays on the device and never synchronizes: labels outside 0..C-1 land in an overflow bin that is
checked when a metric is read. Every metric is a pure function of the summed matrix, so the score does not
depend on how samples were split over ranks or batches.

The values equal scikit-learn's (`f1_score(y_true, y_pred, average="macro" | "weighted")`, `accuracy_score`)
to the last bits: per class, F1 = 2 tp / (2 tp + fp + fn), averaged over the classes that occur in the
targets or the predictions (sklearn's labels = y_true U y_pred); classes seen in neither do not count. A
class in that set always has 2 tp + fp + fn > 0, so its F1 is defined; per-class precision or recall with a
zero denominator is 0 (sklearn's zero_division default), without sklearn's warning.
"""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.distributed as dist

from stemdl.harness.errors import StemdlError


class ConfusionMatrix:
    """Counts of (target, prediction) pairs over C classes, as int64 on `device`."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        if num_classes < 1:
            raise StemdlError(f"confusion matrix: num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        # C*C cells, then one bin for labels outside 0..C-1 and one for masked-out samples.
        self.counts = torch.zeros(num_classes * num_classes + 2, dtype=torch.int64, device=device)
        self.reduced = False

    def update(self, targets: torch.Tensor, predictions: torch.Tensor, mask: torch.Tensor | None = None):
        """Add a batch: targets (B,) class indices; predictions (B,) indices or (B, C) scores (argmax
        taken); mask (B,) bool, False for padding samples that must not count."""
        if self.reduced:
            raise RuntimeError("ConfusionMatrix.update after all_reduce: the counts are already summed")
        c = self.num_classes
        if predictions.ndim == 2:
            predictions = predictions.argmax(1)
        device = self.counts.device
        t = targets.reshape(-1).to(device=device, dtype=torch.int64)
        p = predictions.reshape(-1).to(device=device, dtype=torch.int64)
        if t.shape != p.shape:
            raise ValueError(f"targets {tuple(targets.shape)} and predictions {tuple(predictions.shape)} differ")
        valid = (t >= 0) & (t < c) & (p >= 0) & (p < c)
        cell = torch.where(valid, t * c + p, c * c)
        if mask is not None:
            cell = torch.where(mask.reshape(-1).to(device=device, dtype=torch.bool), cell, c * c + 1)
        self.counts += torch.bincount(cell, minlength=c * c + 2)
        return self

    def all_reduce(self, group=None):
        """Sum the counts over all ranks of `group` (a no-op when no process group is initialized).
        Call it once, after the last update; the metrics then read the global matrix on every rank."""
        if self.reduced:
            raise RuntimeError("ConfusionMatrix.all_reduce called twice: the counts would be summed again")
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts, op=dist.ReduceOp.SUM, group=group)
        self.reduced = True
        return self

    # ---- reading ----------------------------------------------------------------------------------------

    def matrix(self) -> np.ndarray:
        """(C, C) int64 counts, rows = targets, columns = predictions."""
        counts = self.counts.cpu().numpy()
        c = self.num_classes
        if counts[c * c]:
            raise StemdlError(f"{counts[c * c]} evaluated samples have a label or prediction outside "
                              f"0..{c - 1} (num_classes={c}): the label map does not fit the model")
        return counts[:c * c].reshape(c, c)

    @property
    def samples(self) -> int:
        """Samples counted (padding excluded)."""
        return int(self.matrix().sum())

    def _class_stats(self):
        m = self.matrix()
        tp, true, pred = np.diag(m), m.sum(axis=1), m.sum(axis=0)
        present = np.flatnonzero(true + pred)  # sklearn's labels: y_true U y_pred
        tp, true, pred = tp[present], true[present], pred[present]
        # sklearn's form: 2 tp / (true + pred) in float64 (not 2 p r / (p + r)), so the bits agree.
        f1 = 2.0 * tp.astype(np.float64) / (true.astype(np.float64) + pred.astype(np.float64))
        return present, tp, true, pred, f1

    def macro_f1(self) -> float:
        """Unweighted mean of the per-class F1 over the classes present; 0.0 for an empty matrix."""
        f1 = self._class_stats()[4]
        return float(np.average(f1)) if f1.size else 0.0

    def weighted_f1(self) -> float:
        """Per-class F1 averaged with the class supports (true counts) as weights; 0.0 when empty."""
        _, _, true, _, f1 = self._class_stats()
        return float(np.average(f1, weights=true)) if true.sum() else 0.0

    def accuracy(self) -> float:
        """Top-1 accuracy; 0.0 when empty."""
        m = self.matrix()
        n = m.sum()
        return float(np.trace(m) / n) if n else 0.0

    def per_class(self) -> list[dict]:
        """One dict per class present (in the targets or the predictions): class, precision, recall,
        f1, support (true count). Undefined precision or recall is 0.0."""
        present, tp, true, pred, f1 = self._class_stats()
        rows = []
        for k, (cls, t) in enumerate(zip(present, tp)):
            rows.append({"class": int(cls),
                         "precision": float(t / pred[k]) if pred[k] else 0.0,
                         "recall": float(t / true[k]) if true[k] else 0.0,
                         "f1": float(f1[k]),
                         "support": int(true[k])})
        return rows

    def to_dict(self) -> dict:
        return {"num_classes": self.num_classes, "samples": self.samples, "accuracy": self.accuracy(),
                "macro_f1": self.macro_f1(), "weighted_f1": self.weighted_f1(),
                "per_class": self.per_class()}

    def to_json(self, **dumps_kwargs) -> str:
        """The summary and per-class table as a JSON string (`json.dumps` options pass through)."""
        return json.dumps(self.to_dict(), **dumps_kwargs)
