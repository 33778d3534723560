"""Training losses for the imbalanced space groups, chosen by name from LOSSES (config key `loss`).

    counts = layout.class_counts(train_labels)               # (230,) from the TRAINING split's labels
    criterion = build_loss("class_balanced", counts, cb_beta=0.9999).to(device)
    loss = criterion(model(x), y, epoch)                     # scalar: the mean over the batch

    ce              cross entropy
    weighted        cross entropy, each sample weighted by 1 / (its class's training count)
    class_balanced  the same with Cui et al.'s weights (1 - beta) / (1 - beta ** count) (CVPR 2019)
    focal           Lin et al.'s focal loss (1 - p_t) ** gamma * cross entropy (ICCV 2017), no alpha
    logit_adjusted  Menon et al.'s logit-adjusted cross entropy, logits + tau * log(prior) (ICLR 2021)
    drw             Cao et al.'s deferred re-weighting (NeurIPS 2019): ce, then class_balanced weights

Every weight comes once from the training class counts, so every rank of a DistributedDataParallel run
builds the same module without communicating; the weights are float32 buffers that follow `.to(device)`.
The loss is computed in float32 whatever the autocast dtype of the logits. Label smoothing applies to
the cross entropy inside every loss (per sample, before any class weight or focal factor).

Class weights are scaled so that they average to 1 over the training samples: with the uniform sampler
the expected loss is on the scale of plain cross entropy, so the learning rate need not change. The batch
loss is the plain mean of the weighted per-sample losses (not torch's sum(w * l) / sum(w), which would
undo that scale batch by batch). Combining a re-weighting loss with a class-balancing sampler corrects
twice; pick one.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from stemdl.harness.errors import StemdlError

DRW_FRACTION = 0.2  # drw re-weights the last 20 % of the epoch budget, as Cao et al. (160 of 200 epochs)


def normalized_weights(raw: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """raw per-class weights scaled so that sum(counts * w) / sum(counts) = 1; 0 where counts is 0."""
    raw = np.where(counts > 0, raw, 0.0)
    return raw * counts.sum() / (counts * raw).sum()


def inverse_frequency_weights(counts: np.ndarray) -> np.ndarray:
    return normalized_weights(1.0 / np.maximum(counts, 1), counts)


def class_balanced_weights(counts: np.ndarray, beta: float) -> np.ndarray:
    """Cui et al.: the inverse of the effective number of samples (1 - beta ** n) / (1 - beta)."""
    # -expm1(n log beta) is 1 - beta ** n without the cancellation that loses beta = 0.9999 at small n.
    effective = -np.expm1(counts * math.log(beta)) / (1.0 - beta) if beta > 0 else np.ones(len(counts))
    return normalized_weights(1.0 / np.maximum(effective, 1e-300), counts)


class ClassLoss(torch.nn.Module):
    """loss(logits (B, C), y (B,), epoch) -> the mean over the batch of per_sample(). Subclasses set
    `name` and override per_sample; `epoch` is train.py's 1-based epoch (only drw reads it)."""

    name = "ce"

    def __init__(self, counts: np.ndarray, options: dict):
        super().__init__()
        self.label_smoothing = options["label_smoothing"]

    def cross_entropy(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, reduction="none", label_smoothing=self.label_smoothing)

    def per_sample(self, logits: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
        return self.cross_entropy(logits, y)

    def forward(self, logits: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
        return self.per_sample(logits.float(), y, epoch).mean()

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}"


class WeightedCrossEntropy(ClassLoss):
    name = "weighted"

    def __init__(self, counts, options):
        super().__init__(counts, options)
        self.register_buffer("weight", torch.tensor(self.class_weights(counts, options), dtype=torch.float32))

    def class_weights(self, counts: np.ndarray, options: dict) -> np.ndarray:
        return inverse_frequency_weights(counts)

    def per_sample(self, logits, y, epoch):
        return self.weight[y] * self.cross_entropy(logits, y)


class ClassBalancedCrossEntropy(WeightedCrossEntropy):
    name = "class_balanced"

    def class_weights(self, counts, options):
        return class_balanced_weights(counts, options["cb_beta"])


class DeferredReweighting(ClassBalancedCrossEntropy):
    """Plain cross entropy before `drw_epoch`, class-balanced weights from it on: the features are learnt
    on the natural distribution, then the re-weighting moves the decision boundaries (Cao et al.)."""

    name = "drw"

    def __init__(self, counts, options):
        super().__init__(counts, options)
        self.drw_epoch = options["drw_epoch"]

    def per_sample(self, logits, y, epoch):
        return super().per_sample(logits, y, epoch) if epoch >= self.drw_epoch else self.cross_entropy(logits, y)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, drw_epoch={self.drw_epoch}"


class FocalLoss(ClassLoss):
    """Plain focal loss, without Lin et al.'s alpha: their alpha balances the two classes of a binary
    detector; for class balance here use class_balanced or drw instead."""

    name = "focal"

    def __init__(self, counts, options):
        super().__init__(counts, options)
        self.gamma = options["focal_gamma"]

    def per_sample(self, logits, y, epoch):
        log_pt = torch.log_softmax(logits, dim=1).gather(1, y[:, None])[:, 0]
        # 1 - p_t from log p_t without cancellation; the floor keeps the gradient of (1 - p_t) ** gamma
        # finite for gamma < 1 once a sample is learnt (p_t rounds to 1).
        modulator = (-torch.expm1(log_pt)).clamp_min(1e-12) ** self.gamma
        return modulator * self.cross_entropy(logits, y)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}"


class LogitAdjustedCrossEntropy(ClassLoss):
    """Cross entropy on logits + tau * log(prior). The adjustment is only in the loss: evaluation and
    inference use the raw logits, which then estimate the class-balanced posterior (Menon et al.).

    A class absent from training gets the prior of the rarest class present, not 0: log(0) would make its
    adjusted logit -inf (NaN with label smoothing or tau = 0), and a much smaller floor would all but stop
    the gradient that pushes its raw logit down, leaving an untrained logit to win at evaluation."""

    name = "logit_adjusted"

    def __init__(self, counts, options):
        super().__init__(counts, options)
        self.tau = options["la_tau"]
        prior = counts / counts.sum()
        prior = np.where(counts > 0, prior, prior[counts > 0].min())
        self.register_buffer("offset", torch.tensor(self.tau * np.log(prior), dtype=torch.float32))

    def per_sample(self, logits, y, epoch):
        return self.cross_entropy(logits + self.offset, y)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tau={self.tau}"


LOSSES = {cls.name: cls for cls in (ClassLoss, WeightedCrossEntropy, ClassBalancedCrossEntropy, FocalLoss,
                                     LogitAdjustedCrossEntropy, DeferredReweighting)}


def default_drw_epoch(epochs: int) -> int:
    """The first re-weighted epoch (1-based): the last DRW_FRACTION of the budget, at least one epoch.
    A time-to-target run that stops earlier never re-weights, so set drw_epoch for such runs."""
    return epochs - max(1, round(DRW_FRACTION * epochs)) + 1


def check_options(name: str, *, label_smoothing: float = 0.0, focal_gamma: float = 2.0, cb_beta: float = 0.9999,
                  la_tau: float = 1.0, drw_epoch: int | None = None, epochs: int | None = None) -> dict:
    """The options as build_loss uses them (drw_epoch resolved), or a StemdlError naming the config key."""
    if name not in LOSSES:
        raise StemdlError(f"config key 'loss': {name!r} is not one of {', '.join(LOSSES)}")
    rules = [
        (0.0 <= label_smoothing < 1.0, "label_smoothing", "must be in [0, 1)"),
        (math.isfinite(focal_gamma) and focal_gamma >= 0, "focal_gamma", "must be 0 or more"),
        (0.0 <= cb_beta < 1.0, "cb_beta", "must be in [0, 1)"),
        (math.isfinite(la_tau) and la_tau >= 0, "la_tau", "must be 0 or more"),
        (drw_epoch is None or drw_epoch >= 1, "drw_epoch", "must be 1 or more (the first re-weighted epoch)"),
    ]
    for ok, key, why in rules:
        if not ok:
            raise StemdlError(f"config key {key!r}: {why}")
    if name == "drw":
        if drw_epoch is None and epochs is None:
            raise StemdlError("config key 'drw_epoch': needed when the epoch budget is unknown")
        drw_epoch = default_drw_epoch(epochs) if drw_epoch is None else drw_epoch
        if epochs is not None and drw_epoch > epochs:
            raise StemdlError(f"config key 'drw_epoch': {drw_epoch} is after the last epoch ({epochs}), "
                              "so the loss would never re-weight")
    return {"label_smoothing": label_smoothing, "focal_gamma": focal_gamma, "cb_beta": cb_beta,
            "la_tau": la_tau, "drw_epoch": drw_epoch, "epochs": epochs}


def build_loss(name: str, class_counts: np.ndarray, **options) -> ClassLoss:
    """The loss `name` for these training class counts; options are check_options()'s keywords."""
    resolved = check_options(name, **options)
    counts = np.asarray(class_counts)
    if counts.ndim != 1 or counts.size == 0 or (counts < 0).any() or counts.sum() <= 0:
        raise StemdlError("training class counts must be non-negative with at least one sample")
    return LOSSES[name](counts.astype(np.float64), resolved)
