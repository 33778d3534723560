"""The reconstruction workload's steps: the loss, the model's input, and the evaluation's sums.

    sums = ErrorSums(device); sums.update(outputs, targets, mask)   # per batch, on the device
    all_reduce(sums); evaluation(sums.host())                       # once: MAE, RMSE, PSNR

The metrics are functions of five sums over the whole validation split (sums of |error| and error², the
pixel count, the targets' squared peak-to-peak ranges, the sample count), so they do not depend on how
the samples were split over ranks or batches; padding (mask False) counts nowhere.
"""

from __future__ import annotations

import math

import torch

from stemdl.harness.metrics import Sums, all_reduce
from stemdl.harness.workload import Evaluation


class L1Loss(torch.nn.Module):
    """The mean absolute error of a batch, in float32 (the model may run in bf16)."""

    def forward(self, outputs, targets, epoch):
        return torch.nn.functional.l1_loss(outputs.float(), targets)


def model_input(ctx, x: torch.Tensor) -> torch.Tensor:
    """The stored float16 stack (B, N², S, S) as the model's float32 input on the device, channels_last."""
    return x.to(ctx.device, non_blocking=True).float().contiguous(memory_format=torch.channels_last)


class ErrorSums(Sums):
    """|error|, error², pixels, the targets' squared ranges and the samples, summed over unmasked samples."""

    def __init__(self, device):
        super().__init__(5, torch.float64, device)

    def update(self, outputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> None:
        self._adding()
        keep = mask.to(device=outputs.device, dtype=torch.bool)
        t = targets.double()[keep]
        e = outputs.double()[keep] - t
        span = t.flatten(1).amax(1) - t.flatten(1).amin(1)
        self.sums += torch.stack([e.abs().sum(), (e * e).sum(), e.new_tensor(float(e.numel())),
                                  (span * span).sum(), e.new_tensor(float(len(t)))])


def evaluation(sums) -> Evaluation:
    """MAE, RMSE and PSNR (10 log10(mean squared range / MSE), in dB) of all-reduced sums."""
    abs_sum, sq_sum, pixels, range_sq, samples = (float(v) for v in sums)
    mse = sq_sum / pixels
    psnr = 10.0 * math.log10(range_sq / samples / mse) if mse > 0 else float("inf")
    return Evaluation({"mae": abs_sum / pixels, "rmse": math.sqrt(mse), "psnr": psnr},
                      details={"samples": int(samples), "pixels": int(pixels)})


class ErrorEvaluator:
    """One evaluation: `update` per batch (no synchronization), `result` once (one all-reduce)."""

    def __init__(self, ctx):
        self.ctx, self.sums = ctx, ErrorSums(ctx.env.device)

    def update(self, model, x, fields, mask) -> None:
        with self.ctx.autocast():
            outputs = model(model_input(self.ctx, x))
        self.sums.update(outputs.float(), fields[0].to(self.ctx.device).float(), mask.to(self.ctx.device))

    def result(self) -> Evaluation:
        all_reduce(self.sums)
        return evaluation(self.sums.host())

