"""Dataset-level metrics: sums kept on the device and summed over the ranks once, never means of batch means.

    cm = ConfusionMatrix(num_classes, device)
    for x, y, mask in dev_batches:                  # mask: False for padding samples
        cm.update(y, model(x).argmax(1), mask)
    all_reduce(cm, other)                           # one SUM over ranks for every meter (no-op without a group)
    cm.summary()                                    # macro/weighted F1, accuracy, per class: one host copy

`Sums` is the base of every meter: a tensor of sums that `update` adds to without synchronizing and that
`all_reduce` sums over the ranks exactly once (several meters in one collective). Every metric is then a
pure function of the summed tensor, so a score does not depend on how samples were split over ranks or
batches.

The confusion matrix's values equal scikit-learn's (`f1_score(average="macro" | "weighted")`,
`accuracy_score`) to the last bits: per class, F1 = 2 tp / (2 tp + fp + fn), averaged over the classes that
occur in the targets or the predictions (sklearn's labels = y_true U y_pred). Per-class precision or recall
with a zero denominator is 0 (sklearn's zero_division default), without sklearn's warning.
"""

from __future__ import annotations

import numpy as np
import torch

from stemdl.harness import dist
from stemdl.harness.errors import StemdlError


class Sums:
    """A tensor of sums on a device, added to by `update` and summed over the ranks once."""

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.sums = torch.zeros(size, dtype=dtype, device=device)
        self.reduced = False

    def _adding(self) -> None:
        if self.reduced:
            raise RuntimeError(f"{type(self).__name__}.update after all_reduce: the sums are already over all ranks")

    def all_reduce(self, group=None):
        """Sum over the ranks (a no-op without a process group); once, after the last update."""
        all_reduce(self, group=group)
        return self

    def host(self) -> np.ndarray:
        """The sums as a numpy array (one copy from the device)."""
        return self.sums.cpu().numpy()


def all_reduce(*meters: Sums, group=None) -> None:
    """Sum every meter over the ranks in one collective (float64, exact for counts below 2**53)."""
    for meter in meters:
        if meter.reduced:
            raise RuntimeError(f"{type(meter).__name__}.all_reduce called twice: the sums would be summed again")
    if meters and dist.process_group_ready():
        device = meters[0].sums.device
        flat = dist.all_reduce_sum(torch.cat([m.sums.to(device=device, dtype=torch.float64) for m in meters]),
                                   group=group)
        for m, part in zip(meters, flat.split([m.sums.numel() for m in meters])):
            m.sums.copy_(part if m.sums.dtype.is_floating_point else part.round())
    for meter in meters:
        meter.reduced = True


class ConfusionMatrix(Sums):
    """Counts of (target, prediction) pairs over C classes, as int64 on `device`."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        if num_classes < 1:
            raise StemdlError(f"confusion matrix: num_classes must be >= 1, got {num_classes}")
        # C*C cells, then one bin for labels outside 0..C-1 and one for masked-out samples.
        super().__init__(num_classes * num_classes + 2, torch.int64, device)
        self.num_classes = num_classes

    @property
    def counts(self) -> torch.Tensor:
        return self.sums

    def update(self, targets: torch.Tensor, predictions: torch.Tensor, mask: torch.Tensor | None = None):
        """Add a batch: targets (B,) class indices; predictions (B,) indices or (B, C) scores (argmax
        taken); mask (B,) bool, False for padding samples that must not count."""
        self._adding()
        c = self.num_classes
        if predictions.ndim == 2:
            predictions = predictions.argmax(1)
        device = self.sums.device
        t = targets.reshape(-1).to(device=device, dtype=torch.int64)
        p = predictions.reshape(-1).to(device=device, dtype=torch.int64)
        if t.shape != p.shape:
            raise ValueError(f"targets {tuple(targets.shape)} and predictions {tuple(predictions.shape)} differ")
        valid = (t >= 0) & (t < c) & (p >= 0) & (p < c)
        cell = torch.where(valid, t * c + p, c * c)
        if mask is not None:
            cell = torch.where(mask.reshape(-1).to(device=device, dtype=torch.bool), cell, c * c + 1)
        self.sums += torch.bincount(cell, minlength=c * c + 2)
        return self

    # ---- reading ----------------------------------------------------------------------------------------

    def matrix(self) -> np.ndarray:
        """(C, C) int64 counts, rows = targets, columns = predictions."""
        return _matrix(self.host(), self.num_classes)

    @property
    def samples(self) -> int:
        """Samples counted (padding excluded)."""
        return int(self.matrix().sum())

    def macro_f1(self) -> float:
        return ClassScores(self.matrix()).macro_f1()

    def weighted_f1(self) -> float:
        return ClassScores(self.matrix()).weighted_f1()

    def accuracy(self) -> float:
        return ClassScores(self.matrix()).accuracy()

    def per_class(self) -> list[dict]:
        return ClassScores(self.matrix()).per_class()

    def summary(self) -> dict:
        """Every figure from one copy of the counts: num_classes, samples, accuracy, macro_f1, weighted_f1,
        per_class (see ClassScores), and confusion: the matrix's nonzero cells as [target, prediction,
        count] rows (a few hundred numbers where the dense 230x230 matrix would be 52,900)."""
        scores = ClassScores(self.matrix())
        return {"num_classes": self.num_classes, "samples": int(scores.matrix.sum()), "accuracy": scores.accuracy(),
                "macro_f1": scores.macro_f1(), "weighted_f1": scores.weighted_f1(), "per_class": scores.per_class(),
                "confusion": [[int(t), int(p), int(scores.matrix[t, p])] for t, p in zip(*np.nonzero(scores.matrix))]}


def _matrix(counts: np.ndarray, c: int) -> np.ndarray:
    if counts[c * c]:
        raise StemdlError(f"{counts[c * c]} evaluated samples have a label or prediction outside "
                          f"0..{c - 1} (num_classes={c}): the label map does not fit the model")
    return counts[:c * c].reshape(c, c)


def dense_confusion(cells: list, num_classes: int) -> np.ndarray:
    """The (C, C) int64 matrix (rows: targets) of `summary()["confusion"]`'s [target, prediction, count] rows."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    for t, p, n in cells:
        matrix[t, p] += n
    return matrix


class ClassScores:
    """The per-class figures of a (C, C) confusion matrix (rows: targets), computed once."""

    def __init__(self, matrix: np.ndarray):
        self.matrix = matrix
        tp, true, pred = np.diag(matrix), matrix.sum(axis=1), matrix.sum(axis=0)
        self.present = np.flatnonzero(true + pred)  # sklearn's labels: y_true U y_pred
        self.tp, self.true, self.pred = tp[self.present], true[self.present], pred[self.present]
        # sklearn's form: 2 tp / (true + pred) in float64 (not 2 p r / (p + r)), so the bits agree.
        self.f1 = 2.0 * self.tp.astype(np.float64) / (self.true.astype(np.float64) + self.pred.astype(np.float64))

    def macro_f1(self) -> float:
        """Unweighted mean of the per-class F1 over the classes present; 0.0 for an empty matrix."""
        return float(np.average(self.f1)) if self.f1.size else 0.0

    def weighted_f1(self) -> float:
        """Per-class F1 averaged with the class supports (true counts) as weights; 0.0 when empty."""
        return float(np.average(self.f1, weights=self.true)) if self.true.sum() else 0.0

    def accuracy(self) -> float:
        """Top-1 accuracy; 0.0 when empty."""
        n = self.matrix.sum()
        return float(np.trace(self.matrix) / n) if n else 0.0

    def per_class(self) -> list[dict]:
        """One dict per class present (in the targets or the predictions): class, precision, recall, f1,
        support (true count). Undefined precision or recall is 0.0."""
        rows = []
        for k, (cls, t) in enumerate(zip(self.present, self.tp)):
            rows.append({"class": int(cls),
                         "precision": float(t / self.pred[k]) if self.pred[k] else 0.0,
                         "recall": float(t / self.true[k]) if self.true[k] else 0.0,
                         "f1": float(self.f1[k]),
                         "support": int(self.true[k])})
        return rows
