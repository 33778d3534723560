"""Synthetic generator throughput: end-to-end samples/s through `stemdl synth`, then time per stage.

    stemdl bench synth [--image-size 512] [--samples 120] [--workers N] [--space-groups real]

End to end runs the real command path (workers, HDF5 writing, checksums) into a temporary folder that is
removed afterwards. The stage breakdown runs single-threaded in this process on fresh samples.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from stemdl.workloads.spacegroup.synth import generate


def _config(args, total: int) -> generate.SynthConfig:
    return generate.preset_config("full", seed=args.seed, distribution="real", samples_per_file=20,
                                  image_size=args.image_size, space_groups=args.space_groups, samples=total)


def end_to_end(args) -> float:
    cfg = _config(args, args.samples)
    tmp = Path(tempfile.mkdtemp(prefix="stemdl-bench-"))
    try:
        start = time.perf_counter()
        generate.generate(tmp / "set", cfg, workers=args.workers, quiet=True)
        seconds = time.perf_counter() - start
        size = sum(p.stat().st_size for p in (tmp / "set").rglob("*.h5"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rate = args.samples / seconds
    print(f"end to end: {args.samples} samples at {args.image_size}x{args.image_size} with {args.workers} "
          f"workers in {seconds:.1f} s = {rate:.2f} samples/s ({size / seconds / 1e6:.1f} MB/s written)")
    return rate


def stages(args) -> None:
    """Where the time goes, per sample, on one core."""
    from threadpoolctl import threadpool_limits

    from stemdl.workloads.spacegroup.synth import cbed, crystals, zones

    warnings.filterwarnings("ignore")
    cfg = _config(args, args.stage_samples)
    labels = generate.split_labels(cfg, "train")
    rng = np.random.default_rng(args.seed)
    picks = rng.choice(labels, size=args.stage_samples, replace=True)
    t = {"crystal": 0.0, "zone axes": 0.0, "render (3 patterns)": 0.0}
    with threadpool_limits(1):
        for label in picks:
            t0 = time.perf_counter()
            crystal = crystals.random_crystal(int(label), rng)
            t1 = time.perf_counter()
            axes = zones.zone_axes(crystal.structure, n=3)
            t2 = time.perf_counter()
            for axis in axes:
                alpha, _ = cbed.semi_angle(crystal.structure, axis, 200)
                spec = cbed.PatternSpec(zone_axis=tuple(int(v) for v in axis), energy_keV=200,
                                        semi_angle_rad=alpha, thickness_nm=50.0, size=args.image_size,
                                        dose=cfg.dose)
                cbed.render(crystal.structure, spec, rng)
            t3 = time.perf_counter()
            t["crystal"] += t1 - t0
            t["zone axes"] += t2 - t1
            t["render (3 patterns)"] += t3 - t2
    total = sum(t.values())
    print(f"per sample on one core ({args.stage_samples} samples, labels drawn like the public data):")
    for name, seconds in t.items():
        print(f"  {name:<20} {1e3 * seconds / len(picks):8.1f} ms  ({100 * seconds / total:4.1f} %)")
    print(f"  {'total':<20} {1e3 * total / len(picks):8.1f} ms  -> {len(picks) / total:.2f} samples/s per core")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--samples", type=int, default=120, help="samples for the end-to-end run")
    parser.add_argument("--stage-samples", type=int, default=30, help="samples for the per-stage breakdown")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--space-groups", default="real", help="as for stemdl synth (default: the 200 real)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}")
    end_to_end(args)
    stages(args)
    return 0
