"""Multi-task prediction: a shared trunk, one head per structural property, and their combined loss.

    tasks = parse_tasks("space_group,lattice,crystal_system")     # cfg.tasks; space_group always first
    scale = lattice_scale(train_split)                            # training mean/std of the lattice targets
    model = MultiTaskHead(build_model("small_cnn", 230), tasks)   # forward(x) -> {task: output}
    loss_fn = TaskLoss(tasks, "learned", lattice=scale)           # its log-variances go to the optimizer
    total = loss_fn(as_outputs(model(x)), targets(y, lattice), epoch)
    metrics = TaskMetrics(tasks, scale).update(outputs, targets(y, lattice), mask).all_reduce()
    metrics.results()  # {"crystal_system_accuracy": .., "lattice_mae_a": .. (angstrom), ..}

The tasks (TASKS) are all functions of what every sample stores: its space group (the class index, space
group - 1) and its lattice (`DataIndex.targets`: a, b, c in angstrom, alpha, beta, gamma in degrees).

- space_group: the benchmark's 230-way classification, scored by the confusion matrix (`stemdl.harness.metrics`).
- crystal_system: 7 classes, by space-group number ranges (CRYSTAL_SYSTEMS).
- centring: 7 classes, the first letter of the Hermann-Mauguin symbol of the standard setting (CENTRINGS).
  "B" never occurs in a standard setting, so its output only ever learns to stay low.
- lattice: regression of log a, log b, log c (angstrom) and the angles in radians. Logs, because cell
  edges span an order of magnitude and an error of 0.5 angstrom matters more at 3 than at 30; radians put
  the angles on the same order of magnitude. The loss standardizes them with the training set's mean and std, and
  the head's output is that standardized value (`LatticeScale.decode` turns it back into angstrom and
  degrees).

With tasks == ("space_group",) a run need not use any of this: the plain model and its loss stay as they
are. MultiTaskHead with space_group alone does reproduce the plain model exactly (its space_group
head is the model's own classifier), but under other parameter names (`heads.space_group.*`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stemdl.harness.metrics import Sums
from stemdl.workloads.spacegroup import models
from stemdl.workloads.spacegroup.data.layout import CRYSTAL_SYSTEMS, SYSTEM_LAST_GROUP
from stemdl.harness.errors import DataError, StemdlError


CENTRINGS = ("P", "A", "B", "C", "I", "F", "R")
# The first letter of the short Hermann-Mauguin symbol of space groups 1..230 in their standard setting
# (spglib: the first Hall number of each group), 50 groups a line; tests/test_tasks.py checks it against spglib.
_CENTRING_LETTERS = ("PPPPCPPCCPPCPPCPPPPCCFIIPPPPPPPPPPCCCAAAAFFIIIPPPP"    # 1-50
                     "PPPPPPPPPPPPCCCCCCFFIIIIPPPPIIPIPPPPIIPPPPPPPPIIPP"   # 51-100
                     "PPPPPPIIIIPPPPPPPPIIIIPPPPPPPPPPPPPPPPIIIIPPPRPRPP"   # 101-150
                     "PPPPRPPPPRRPPPPRRPPPPPPPPPPPPPPPPPPPPPPPPPPPPFIPIP"   # 151-200
                     "PFFIPIPPFFIPPIPFIPFIPPPPFFFFII")                      # 201-230

# Indexed by class index (space group - 1).
CRYSTAL_SYSTEM_OF = np.searchsorted(SYSTEM_LAST_GROUP, np.arange(1, 231)).astype(np.int64)
CENTRING_OF = np.array([CENTRINGS.index(c) for c in _CENTRING_LETTERS], dtype=np.int64)

LATTICE = ("a", "b", "c", "alpha", "beta", "gamma")  # a, b, c in angstrom; angles in degrees
WEIGHTINGS = ("fixed", "learned")


# ---- targets --------------------------------------------------------------------------------------------

def _floating(values: torch.Tensor) -> torch.Tensor:
    return values if values.dtype in (torch.float32, torch.float64) else values.float()


def lattice_transform(lattice: torch.Tensor) -> torch.Tensor:
    """(B, 6) angstrom and degrees -> log a, log b, log c, then the angles in radians (float32, or float64
    for float64 input)."""
    lattice = _floating(lattice)
    return torch.cat([lattice[:, :3].log(), torch.deg2rad(lattice[:, 3:])], dim=1)


def lattice_inverse(values: torch.Tensor) -> torch.Tensor:
    """The inverse of `lattice_transform`: back to angstrom and degrees."""
    values = _floating(values)
    return torch.cat([values[:, :3].exp(), torch.rad2deg(values[:, 3:])], dim=1)


@cache
def _table(name: str, device: torch.device) -> torch.Tensor:
    # One copy per device, so a step on a GPU does not send the table again.
    return torch.from_numpy({"crystal_system": CRYSTAL_SYSTEM_OF, "centring": CENTRING_OF}[name]).to(device)


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "class" (cross entropy, accuracy) or "regression" (smooth L1, MAE)
    size: int  # outputs of its head
    target: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (class index (B,), lattice (B, 6)) -> target


TASKS = {t.name: t for t in (
    Task("space_group", "class", 230, lambda y, lattice: y),
    Task("lattice", "regression", len(LATTICE), lambda y, lattice: lattice_transform(lattice)),
    Task("crystal_system", "class", len(CRYSTAL_SYSTEMS), lambda y, lattice: _table("crystal_system", y.device)[y]),
    Task("centring", "class", len(CENTRINGS), lambda y, lattice: _table("centring", y.device)[y]),
)}


def targets(class_index: torch.Tensor, lattice: torch.Tensor,
            tasks: Sequence[str] = tuple(TASKS)) -> dict[str, torch.Tensor]:
    """Every task's target for a batch: class index (B,) int64 and lattice (B, 6) in angstrom and degrees.
    space_group: the class index; crystal_system, centring: 0..6; lattice: (B, 6) `lattice_transform`."""
    return {name: TASKS[name].target(class_index, lattice) for name in tasks}


def parse_tasks(text: str) -> tuple[str, ...]:
    """The config key `tasks` ("space_group,lattice") as task names: space_group first (it is the
    benchmark), the others in TASKS order, whatever order they were given in."""
    names = [n.strip() for n in text.split(",")]
    for name in names:
        if name not in TASKS:
            raise StemdlError(f"config key 'tasks': unknown task {name!r} in {text!r} (choices: {', '.join(TASKS)})")
    if len(set(names)) < len(names):
        raise StemdlError(f"config key 'tasks': a task is named twice in {text!r}")
    if "space_group" not in names:
        raise StemdlError(f"config key 'tasks': space_group is mandatory (it is the benchmark), got {text!r}")
    return tuple(n for n in TASKS if n in names)


def parse_task_weights(text: str, tasks: Sequence[str], weighting: str = "fixed") -> dict[str, float]:
    """The config key `task_weights` ("lattice=0.5,crystal_system=0.3") as a weight for every task of
    `tasks` (1.0 where not given). Only "fixed" weighting takes weights: "learned" finds its own."""
    weights = dict.fromkeys(tasks, 1.0)
    if not text.strip():
        return weights
    if weighting != "fixed":
        raise StemdlError(f"config key 'task_weights': only task_weighting 'fixed' takes weights, got {weighting!r}")
    given = set()
    for item in text.split(","):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or name not in tasks or name in given:
            why = "expected TASK=WEIGHT" if not sep else f"{name!r} is named twice" if name in given \
                else f"{name!r} is not one of the tasks ({', '.join(tasks)})"
            raise StemdlError(f"config key 'task_weights': {why} in {text!r}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise StemdlError(f"config key 'task_weights': {value!r} is not a number in {text!r}") from None
        if not math.isfinite(weights[name]) or weights[name] < 0:
            raise StemdlError(f"config key 'task_weights': weight {value} of {name} must be finite and >= 0")
        given.add(name)
    return weights


# ---- lattice standardization ----------------------------------------------------------------------------

@dataclass(frozen=True)
class LatticeScale:
    """Mean and std of the transformed lattice targets over the training set (6 floats each)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_lattices(cls, lattices: np.ndarray) -> LatticeScale:
        """From raw lattices (n, 6) in angstrom and degrees. A component that never varies (all angles 90
        degrees in a cubic-only set) keeps std 1, so standardizing it does not divide by zero."""
        if len(lattices) == 0:
            raise StemdlError("lattice task: no training samples to take the lattice's mean and std from")
        values = lattice_transform(torch.as_tensor(np.asarray(lattices, dtype=np.float64)))
        std = values.std(dim=0, unbiased=False)
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        return cls(tuple(values.mean(dim=0).tolist()), tuple(std.tolist()))

    def tensors(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(self.mean, dtype=torch.float32, device=device),
                torch.tensor(self.std, dtype=torch.float32, device=device))

    def decode(self, output: torch.Tensor) -> torch.Tensor:
        """The lattice head's (standardized) output -> angstrom and degrees."""
        mean, std = self.tensors(output.device)
        return lattice_inverse(output.float() * std + mean)


def lattice_scale(split) -> LatticeScale:
    """The `LatticeScale` of a training split's lattices (`split.fields["targets"]`), after checking that
    every one is a cell (a, b, c > 0, angles strictly between 0 and 180): a DataError names the first sample
    that is not."""
    lattices = np.asarray(split.fields["targets"])
    ok = np.all(np.isfinite(lattices), axis=1) & np.all(lattices[:, :3] > 0, axis=1) \
        & np.all((lattices[:, 3:] > 0) & (lattices[:, 3:] < 180), axis=1)
    if not ok.all():
        i = int(np.argmin(ok))
        shown = ", ".join(f"{v:g}" for v in lattices[i])
        raise DataError(split.name_of(i), f"lattice ({shown}) is not a cell: the lattice task needs "
                        "a, b, c > 0 and angles in (0, 180) degrees")
    return LatticeScale.from_lattices(lattices)


# ---- the heads ------------------------------------------------------------------------------------------

# The attribute holding each model's final classifier (a Linear on the pooled features): a new model
# registers its own here.
CLASSIFIER_ATTR: dict[type, str] = {models.ResNet: "fc", models.SmallCNN: "fc"}


def _classifier_attr(model: nn.Module) -> str:
    for cls in type(model).__mro__:
        if cls in CLASSIFIER_ATTR:
            return CLASSIFIER_ATTR[cls]
    raise StemdlError(f"multi-task heads: model {type(model).__name__} has no classifier registered in "
                      f"stemdl.workloads.spacegroup.heads.CLASSIFIER_ATTR")


class MultiTaskHead(nn.Module):
    """A trunk (the model with its classifier replaced by the identity) and one Linear per task on its
    pooled features. The space_group head is the model's own classifier, so the 230 logits are computed
    exactly as before; the other heads are new (PyTorch's default initialization)."""

    def __init__(self, model: nn.Module, tasks: Sequence[str], feature_dim: int | None = None):
        super().__init__()
        attr = _classifier_attr(model)
        classifier = getattr(model, attr)
        if not isinstance(classifier, nn.Linear) or classifier.out_features != TASKS["space_group"].size:
            raise StemdlError(f"multi-task heads: {type(model).__name__}.{attr} is not a Linear with "
                              f"{TASKS['space_group'].size} outputs")
        if feature_dim is not None and feature_dim != classifier.in_features:
            raise StemdlError(f"multi-task heads: feature_dim {feature_dim} differs from the "
                              f"{classifier.in_features} features of {type(model).__name__}")
        tasks = parse_tasks(tasks if isinstance(tasks, str) else ",".join(tasks))
        setattr(model, attr, nn.Identity())
        self.trunk = model
        self.tasks = tasks
        self.feature_dim = classifier.in_features
        self.heads = nn.ModuleDict({name: classifier if name == "space_group"
                                    else nn.Linear(self.feature_dim, TASKS[name].size) for name in tasks})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.trunk(x)
        return {name: head(features) for name, head in self.heads.items()}


def as_outputs(outputs) -> dict[str, torch.Tensor]:
    """The model's outputs by task: a plain model gives the space-group logits alone."""
    return outputs if isinstance(outputs, dict) else {"space_group": outputs}


def average_outputs(outputs: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of several views' outputs, task by task, in float32 (test-time views of one batch)."""
    return {name: sum(o[name].float() for o in outputs) / len(outputs) for name in outputs[0]}


class Ensemble(nn.Module):
    """K trained models as one: their outputs averaged task by task, in float32 (a seed ensemble)."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if not members:
            raise StemdlError("an ensemble needs at least one model")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return average_outputs([as_outputs(m(x)) for m in self.members])


# ---- the loss -------------------------------------------------------------------------------------------

def _cross_entropy(logits: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
    return F.cross_entropy(logits, y)


class TaskLoss(nn.Module):
    """The training loss of all tasks.

    Per task: space_group uses `classification_loss(logits, y, epoch)` (default: cross entropy);
    crystal_system and centring cross entropy; lattice smooth L1 (beta 1) between the head's output and the
    standardized targets, averaged over the 6 components. They combine as
      fixed:   sum_t w_t L_t
      learned: sum_t exp(-s_t) L_t + s_t, with s_t = log sigma_t^2 learned (0 at the start), the
               homoscedastic-uncertainty weighting of Kendall, Gal & Cipolla (CVPR 2018). Their regression
               term is exp(-s) L / 2 + s / 2; dropping the common factor 1/2 changes no minimum. For the
               classification tasks the same form is their approximation of a softmax with temperature
               sigma^2. The optimizer must hold `parameters()` (without weight decay, which would pull
               every s_t to 0), and with several ranks their gradients are averaged after backward
               (the harness does that for any loss with parameters).
    forward(outputs, targets, epoch) returns the total; `task_losses` each task's unweighted loss.
    """

    def __init__(self, tasks: Sequence[str], weighting: str = "fixed", weights: Mapping[str, float] | None = None,
                 lattice: LatticeScale | None = None,
                 classification_loss: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None):
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise StemdlError(f"config key 'task_weighting': expected {' or '.join(WEIGHTINGS)}, got {weighting!r}")
        self.tasks = parse_tasks(tasks if isinstance(tasks, str) else ",".join(tasks))
        if "lattice" in self.tasks and lattice is None:
            raise StemdlError("lattice task: TaskLoss needs the LatticeScale of the training set")
        self.weighting = weighting
        self.weights = dict.fromkeys(self.tasks, 1.0) | dict(weights or {})
        if set(self.weights) != set(self.tasks):
            raise StemdlError(f"task weights {dict(weights)} name tasks outside {', '.join(self.tasks)}")
        if weighting == "learned" and set(self.weights.values()) != {1.0}:
            raise StemdlError("config key 'task_weights': only task_weighting 'fixed' takes weights")
        self.classification_loss = classification_loss or _cross_entropy
        mean, std = (lattice or LatticeScale((0.0,) * 6, (1.0,) * 6)).tensors()
        self.register_buffer("lattice_mean", mean)
        self.register_buffer("lattice_std", std)
        self.register_buffer("task_weights", torch.tensor([self.weights[n] for n in self.tasks]))
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks))) if weighting == "learned" else None

    def task_losses(self, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor],
                    epoch: int = 0) -> list[torch.Tensor]:
        """The unweighted loss of every task, in `self.tasks` order."""
        losses = []
        for name in self.tasks:
            out, target = outputs[name].float(), targets[name]
            if name == "space_group":
                losses.append(self.classification_loss(out, target, epoch))
            elif TASKS[name].kind == "class":
                losses.append(F.cross_entropy(out, target))
            else:
                losses.append(F.smooth_l1_loss(out, (target.float() - self.lattice_mean) / self.lattice_std))
        return losses

    def forward(self, outputs: Mapping[str, torch.Tensor] | torch.Tensor, targets: Mapping[str, torch.Tensor],
                epoch: int = 0) -> torch.Tensor:
        losses = torch.stack(self.task_losses(as_outputs(outputs), targets, epoch))
        if self.log_vars is None:
            return (self.task_weights * losses).sum()
        return (torch.exp(-self.log_vars) * losses + self.log_vars).sum()


# ---- metrics --------------------------------------------------------------------------------------------

def _abs_errors(lattice: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """|error| per sample and component (B, 6) in angstrom and degrees: lattice in angstrom and degrees."""
    return (lattice.double() - true.double()).abs()


def regression_errors(pred_lattice: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """Mean absolute error of each lattice component: pred_lattice (N, 6) in the transformed space of
    `targets` (log angstrom, radians; `LatticeScale.decode` already undoes the standardization), true (N, 6)
    in angstrom and degrees. Returns {"a": .., "b": .., "c": .. (angstrom), "alpha": .., .. (degrees)}."""
    errors = _abs_errors(lattice_inverse(pred_lattice), true).mean(dim=0)
    return dict(zip(LATTICE, errors.tolist()))


class TaskMetrics(Sums):
    """Accuracy of the crystal_system and centring heads and MAE of the lattice head, summed on the device
    and over ranks like `ConfusionMatrix` (space_group is the confusion matrix's, not counted here)."""

    def __init__(self, tasks: Sequence[str], lattice: LatticeScale | None = None, device="cpu"):
        self.classes = [n for n in tasks if n != "space_group" and TASKS[n].kind == "class"]
        self.lattice = "lattice" in tasks
        if self.lattice and lattice is None:
            raise StemdlError("lattice task: TaskMetrics needs the LatticeScale of the training set")
        self.mean, self.std = (lattice or LatticeScale((0.0,) * 6, (1.0,) * 6)).tensors(device)
        # [samples, correct per class task..., |error| sums of a, b, c, alpha, beta, gamma]
        super().__init__(1 + len(self.classes) + len(LATTICE), torch.float64, device)

    def update(self, outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor],
               mask: torch.Tensor | None = None) -> TaskMetrics:
        """Add a batch: the heads' outputs, the `targets()` of its samples, mask False for padding."""
        self._adding()
        n = len(next(iter(targets.values())))
        keep = (torch.ones(n, dtype=torch.bool) if mask is None else mask.reshape(-1).bool()).to(self.sums.device)
        parts = [keep.sum(dtype=torch.float64)[None]]
        for name in self.classes:
            right = outputs[name].argmax(dim=1).to(self.sums.device) == targets[name].to(self.sums.device)
            parts.append((right & keep).sum(dtype=torch.float64)[None])
        if self.lattice:
            pred = lattice_inverse(outputs["lattice"].float().to(self.sums.device) * self.std + self.mean)
            errors = _abs_errors(pred, lattice_inverse(targets["lattice"].to(self.sums.device)))
            parts.append((errors * keep[:, None]).sum(dim=0))
        else:
            parts.append(torch.zeros(len(LATTICE), dtype=torch.float64, device=self.sums.device))
        self.sums += torch.cat(parts)
        return self

    @property
    def samples(self) -> int:
        return int(self.sums[0].item())

    def results(self) -> dict[str, float]:
        """{"<task>_accuracy": .., "lattice_mae_a": .. (angstrom), .., "lattice_mae_gamma": .. (degrees)};
        every value 0.0 when nothing was counted."""
        sums = self.sums.cpu().tolist()
        n = max(sums[0], 1.0)
        out = {f"{name}_accuracy": sums[1 + k] / n for k, name in enumerate(self.classes)}
        if self.lattice:
            errors = sums[1 + len(self.classes):]
            out |= {f"lattice_mae_{name}": errors[k] / n for k, name in enumerate(LATTICE)}
        return out
