"""`stemdl bench lacbed`: the surrogate's speed-up, measured in one run: Bloch-wave seconds per pattern
against the networks' milliseconds per pattern (batched inference), on this machine.

    stemdl bench lacbed                                  # 32x32, 200 beams, 4 thicknesses, 3 materials
    stemdl bench lacbed --size 128 --beams 400 --materials 2 --device cuda --json lacbed.json

The simulator row is `lacbed.synth.make_sample` (one eigen-decomposition per distinct incident direction
serving every thickness, then the potential image) on `--materials` materials of the set's stream, per
sample and per pattern (a sample holds one pattern per thickness). The surrogate rows run each network in
evaluation mode on a batch of `--batch` potentials (untrained weights: the speed does not depend on them),
`--rounds` times, the best round kept; on CUDA with a synchronize around each round. The speed-up is the
simulator's seconds per pattern over the network's.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from stemdl.harness.errors import StemdlError


def simulator_seconds(size: int, beams: int, thicknesses: tuple, materials: int) -> tuple[float, int]:
    """(seconds a sample, patterns a sample) of the generator's Bloch-wave samples."""
    from stemdl.workloads.lacbed.synth import LacbedSettings, make_sample, material_keys

    settings = LacbedSettings(samples=materials, size=size, beams=beams, thicknesses_A=thicknesses)
    keys = material_keys(settings)
    make_sample(settings, keys[0])  # imports, caches
    start = time.perf_counter()
    for key in keys:
        make_sample(settings, key)
    return (time.perf_counter() - start) / len(keys), len(thicknesses)


def network_ms(name: str, size: int, batch: int, rounds: int, device: str) -> float:
    """Milliseconds a pattern of network `name` in evaluation mode, batched."""
    from stemdl.workloads.lacbed.models import build_model

    model = build_model(name, size).to(device).eval()
    x = torch.randn(batch, 1, size, size, device=device)
    best = float("inf")
    with torch.no_grad():
        model(x)
        for _ in range(rounds):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return 1e3 * best / batch


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=32, help="pixels a side (default: %(default)s)")
    parser.add_argument("--beams", type=int, default=200, help="Bloch beams requested (default: %(default)s)")
    parser.add_argument("--thickness", default="500,1000,1500,2000", help="Å (default: %(default)s)")
    parser.add_argument("--materials", type=int, default=3, help="materials simulated (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=256, help="surrogate batch (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="surrogate rounds, best kept (default: %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the networks run")
    parser.add_argument("--threads", type=int, help="torch threads (default: every core)")
    parser.add_argument("--json", help="also write the figures here (never overwritten)")


def run(args: argparse.Namespace) -> int:
    from stemdl.physics.commands import parse_thicknesses

    if args.json and Path(args.json).exists():
        raise StemdlError(f"--json {args.json}: exists; results are never overwritten, choose another name")
    if args.size < 8 or args.size % 4 or min(args.beams - 1, args.materials, args.batch, args.rounds) < 1:
        raise StemdlError("need --size a multiple of 4 (at least 8), --beams >= 2, --materials, --batch, --rounds >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise StemdlError("--device cuda: no CUDA GPU visible to torch")
    thicknesses = tuple(parse_thicknesses(args.thickness))
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    sample_s, patterns = simulator_seconds(args.size, args.beams, thicknesses, args.materials)
    pattern_s = sample_s / patterns
    rows = {name: network_ms(name, args.size, args.batch, args.rounds, args.device) for name in ("vae", "unet")}
    print(f"stemdl bench lacbed: {args.size}x{args.size}, {args.beams} beams, {len(thicknesses)} thicknesses, "
          f"{args.materials} materials; simulator on cpu, networks on {args.device}; {torch.get_num_threads()} "
          f"torch threads, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print("")
    print("| what | per pattern | speed-up |")
    print("|---|---:|---:|")
    print(f"| Bloch waves (lacbed.synth.make_sample: {sample_s:.2f} s a sample of {patterns} patterns) | "
          f"{pattern_s:.3f} s | 1 |")
    for name, ms in rows.items():
        print(f"| {name}, batch {args.batch} | {ms:.4f} ms | {pattern_s * 1e3 / ms:,.0f}x |")
    if args.json:
        from stemdl.harness import files

        report = {"settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                  "simulator_s_per_sample": sample_s, "simulator_s_per_pattern": pattern_s,
                  "network_ms_per_pattern": rows, "speedup": {n: pattern_s * 1e3 / ms for n, ms in rows.items()}}
        files.write_atomic(args.json, json.dumps(report, indent=1), replace=False)
    return 0
