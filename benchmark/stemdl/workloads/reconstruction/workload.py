"""Benchmark 2, `stemdl_reconstruction`: the projected potential of a scanned region from the CBED patterns
of an N x N probe grid over it (issue 15).

    stemdl run --benchmark stemdl_reconstruction                  # the CPU default: data generated once
    stemdl run --benchmark stemdl_reconstruction --config smoke   # seconds (tests)
    srun -n 8 stemdl run --benchmark stemdl_reconstruction --config ornl

The contract: the dataset-level mean absolute error between the predicted and the true (z-scored)
potential over every pixel of the whole validation split (sums of absolute errors and pixel counts
all-reduced once, padding masked: never a mean of batch means), lower is better, logged as `eval_error`
with the RMSE (`eval_rmse`) and the PSNR (`eval_psnr`) beside it. Training: the FC-DenseNet (`models`) on
the stack of N² patterns as channels, L1 loss, Adam (the harness's AdamW with weight decay 0).

PSNR, dataset-level like the others: 10 log10(R² / MSE), R² the mean over the split's samples of the
squared peak-to-peak range of the target (a z-scored target has no fixed peak), MSE over every pixel.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from stemdl.harness import mlperf
from stemdl.harness.errors import StemdlError
from stemdl.harness.workload import Workload


@dataclass(frozen=True)
class ReconstructionConfig:
    """The workload's config keys (`workload.KEY`); a None size takes the model preset's."""

    model: str = "cpu"  # a preset of models.PRESETS: cpu | ornl
    growth: int | None = None  # channels each dense layer adds
    kernel: int | None = None  # the dense layers' kernel (odd)
    init_width: int | None = None  # channels of the first convolution
    bottleneck: int | None = None  # layers in the bottleneck block
    down: str | None = None  # layers per dense block on the way down, e.g. "1,2,4"
    up: str | None = None  # ... and up, e.g. "4,2,1"
    dropout: float | None = None
    screen_pixels: bool = True  # check every value of every sample during init (NaN, inf)


def model_overrides(w: ReconstructionConfig) -> dict:
    """The sizes the config sets, as models.DenseNetSpec fields."""
    sizes = {key: getattr(w, key) for key in ("growth", "kernel", "init_width", "bottleneck", "dropout")
             if getattr(w, key) is not None}
    for key in ("down", "up"):
        text = getattr(w, key)
        if text is not None:
            try:
                sizes[key] = tuple(int(part) for part in str(text).split(","))
            except ValueError:
                raise StemdlError(f"config key 'workload.{key}': {text!r} is not a list like 1,2,4") from None
    return sizes


class Reconstruction(Workload):
    name = "stemdl_reconstruction"
    title = "the projected potential of a scanned region from the CBED patterns of its probe grid"
    target_metric = "mae"
    target_title = "MAE"
    # Chosen as MLPerf chooses, from measured convergence (docs/reconstruction.md, "The target"): 5 seeds of
    # the default recipe on the default data, 40 epochs each, not stopped, plateaued at 0.541-0.559 (a
    # constant prediction: 0.80); 0.58 is the value every seed reached, at epochs 21-27 of the 40.
    target_value = 0.58
    target_range = (0.0, 10.0)
    direction = "min"
    eval_every = 1
    log_keys = {"mae": "eval_error", "rmse": "eval_rmse", "psnr": "eval_psnr"}
    log_bounds = {"eval_error": (0.0, None), "eval_rmse": (0.0, None)}
    config_section = ReconstructionConfig
    channels_last = True

    def check_config(self, cfg) -> None:
        import torch

        from stemdl.workloads.reconstruction.models import PRESETS, build_model

        w = cfg.workload
        if w.model not in PRESETS:
            raise StemdlError(f"config key 'workload.model': {w.model!r} is not one of {', '.join(PRESETS)}")
        with torch.device("meta"):  # every size checked now, before any data: nothing allocated
            try:
                build_model(w.model, 1, None, **model_overrides(w))
            except StemdlError as exc:
                raise StemdlError(f"config key 'workload.model' and its sizes: {exc}") from None

    def ensure_data(self, cfg, env) -> Path:
        """The data folder; a synthetic one (absent, or made by the synth) generated or finished first,
        by every rank together (each writes its share of the files)."""
        from stemdl.harness.synthset import wants_generating
        from stemdl.harness.sampleset import default_workers
        from stemdl.workloads.reconstruction.synth import generate, preset_config

        root, preset = Path(cfg.harness.data), cfg.harness.synth_preset
        if preset and wants_generating(root):
            generate(root, preset_config(preset), workers=default_workers(env))
        if not root.exists():
            raise StemdlError(f"--data {root}: no such folder")
        return root

    def prepare(self, root, cfg, env, log):
        from stemdl.harness.data import Prepared
        from stemdl.workloads.reconstruction.data import load_splits

        train, evaluation_split, skipped = load_splits(Path(root), cfg, env)
        if cfg.harness.skip_bad:
            log.event(mlperf.BAD_SAMPLES_SKIPPED, skipped)
        return Prepared(train, evaluation_split, skipped)

    def check_shards(self, shards, cfg) -> None:
        from stemdl.workloads.reconstruction.convert import check_shards

        check_shards(shards)

    def build(self, cfg, prepared):
        from stemdl.harness import dist
        from stemdl.workloads.reconstruction.models import build_model, flops_per_sample, parameter_count
        from stemdl.harness.workload import Built
        from stemdl.workloads.reconstruction.steps import ErrorEvaluator, L1Loss

        shape = tuple(prepared.train.image_shape)
        out_size = int(prepared.train.fields["potential"].shape[-1])
        model = build_model(cfg.workload.model, shape[0], out_size, **model_overrides(cfg.workload))
        try:
            root = dist.current().is_root
        except RuntimeError:  # built outside a run (no dist.setup): this process alone
            root = True
        if root:
            print(f"{self.name}: FC-DenseNet {cfg.workload.model}, {parameter_count(model):,} parameters, "
                  f"{flops_per_sample(model, shape) / 1e9:.3f} GMAC a sample ({shape[0]}x{shape[1]}x{shape[2]} -> "
                  f"1x{out_size}x{out_size})", file=sys.stderr, flush=True)
        return Built(model, L1Loss(), ErrorEvaluator)

    def training_batch(self, ctx, x, fields, generator):
        from stemdl.workloads.reconstruction.steps import model_input

        return model_input(ctx, x), fields[0].to(ctx.device, non_blocking=True).float()

    def describe(self, evaluation) -> str:
        m = evaluation.metrics
        return f"MAE {m['mae']:.4f} (RMSE {m['rmse']:.4f}, PSNR {m['psnr']:.2f} dB)"


WORKLOAD = Reconstruction()
