"""A second benchmark for the tests: linear regression on generated tensors, lower-is-better.

    STEMDL_WORKLOADS=toy=toy_workload PYTHONPATH=tests stemdl run --benchmark toy

It lives outside the package and reaches the harness only through the contract (`Workload`) and the
registry's environment variable: the harness runs, logs, checks and summarizes it with no line of its own
about it. The target metric is the mean absolute error over the validation split (direction "min"), logged
as `eval_error` with the root-mean-square error beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stemdl.harness.data import Prepared
from stemdl.harness.errors import StemdlError
from stemdl.harness.metrics import Sums, all_reduce
from stemdl.harness.workload import Built, Evaluation, Workload


@dataclass(frozen=True)
class ToyConfig:
    features: int = 8
    train_samples: int = 512
    eval_samples: int = 128
    noise: float = 0.01  # standard deviation of the targets' noise
    data_seed: int = 1234


class TensorSplit:
    """The split protocol of stemdl.harness.pipelines over tensors in memory."""

    reads_are_copies = True  # reading is a numpy gather: no DataLoader workers

    def __init__(self, name: str, x: np.ndarray, y: np.ndarray):
        self.name, self.x = name, x
        self.fields = {"targets": y}
        self.dtype, self.image_shape = x.dtype, x.shape[1:]

    def __len__(self) -> int:
        return len(self.x)

    def read(self, indices) -> np.ndarray:
        return self.x[np.asarray(indices)]

    def name_of(self, i: int) -> str:
        return f"{self.name}:{i}"


def make_splits(section: ToyConfig) -> tuple[TensorSplit, TensorSplit]:
    """y = x . w + noise, with w and both splits drawn from data_seed."""
    rng = np.random.default_rng(section.data_seed)
    w = rng.normal(size=section.features).astype(np.float32)
    splits = []
    for name, n in (("train", section.train_samples), ("dev", section.eval_samples)):
        x = rng.normal(size=(n, section.features)).astype(np.float32)
        y = (x @ w + section.noise * rng.normal(size=n)).astype(np.float32)
        splits.append(TensorSplit(name, x, y))
    return splits[0], splits[1]


class SquaredLoss(torch.nn.Module):
    def forward(self, outputs, targets, epoch):
        return torch.nn.functional.mse_loss(outputs.squeeze(1).float(), targets)


class ErrorSums(Sums):
    """Sum of |error|, sum of error^2 and the count of the real (unmasked) samples."""

    def __init__(self, device):
        super().__init__(3, torch.float64, device)

    def update(self, error: torch.Tensor, mask: torch.Tensor) -> None:
        self._adding()
        e = error.double()[mask]
        self.sums += torch.stack([e.abs().sum(), (e * e).sum(), e.new_tensor(float(len(e)))])


class ErrorEvaluator:
    def __init__(self, ctx):
        self.ctx, self.sums = ctx, ErrorSums(ctx.env.device)

    def update(self, model, x, fields, mask) -> None:
        (y,) = fields
        device = self.ctx.device
        self.sums.update(model(x.to(device)).squeeze(1) - y.to(device), mask.to(device))

    def result(self) -> Evaluation:
        all_reduce(self.sums)
        abs_sum, sq_sum, n = self.sums.host()
        return Evaluation({"mae": abs_sum / n, "rmse": float(np.sqrt(sq_sum / n))}, details={"samples": int(n)})


class ToyRegression(Workload):
    name = "toy"
    title = "linear regression on generated tensors (a test workload)"
    target_metric = "mae"
    target_title = "MAE"
    target_value = 0.05
    target_range = (0.0, 10.0)
    direction = "min"
    log_keys = {"mae": "eval_error", "rmse": "eval_rmse"}
    log_bounds = {"eval_error": (0.0, None), "eval_rmse": (0.0, None)}
    config_section = ToyConfig

    def check_config(self, cfg) -> None:
        w = cfg.workload
        for key in ("features", "train_samples", "eval_samples"):
            if getattr(w, key) < 1:
                raise StemdlError(f"config key 'workload.{key}': must be at least 1, got {getattr(w, key)}")

    def ensure_data(self, cfg, env) -> Path:
        return Path(cfg.harness.data)  # nothing on disk: the tensors are drawn in prepare

    def prepare(self, root, cfg, env, log) -> Prepared:
        train, dev = make_splits(cfg.workload)
        return Prepared(train, dev)

    def build(self, cfg, prepared) -> Built:
        return Built(torch.nn.Linear(cfg.workload.features, 1), SquaredLoss(), ErrorEvaluator)

    def training_batch(self, ctx, x, fields, generator):
        return x.to(ctx.device), fields[0].to(ctx.device)

    def describe(self, evaluation) -> str:
        return f"MAE {evaluation['mae']:.4f} (RMSE {evaluation['rmse']:.4f})"


WORKLOAD = ToyRegression()
