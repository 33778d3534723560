"""`stemdl bench WHAT`: measure one part of the harness and print the figures (never a pass/fail test).

    stemdl bench synth                      # generator throughput at 512x512, all cores
    stemdl bench synth --image-size 256 --samples 60 --workers 1
    stemdl bench io                         # read limits, pipelines, training step with each loader
    stemdl bench physics                    # the multislice engine: patterns/s against the FFT limit, memory
    stemdl bench io-reconstruction          # the reconstruction input path: bytes a sample, pipelines, step
    stemdl bench lacbed                     # the LACBED surrogate's speed-up over Bloch waves

Each benchmark lives in its own module here, registered in BENCHMARKS.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "synth": ("stemdl.workloads.spacegroup.bench.synth", "synthetic generator: samples/s end to end, and time per stage"),
    "io": ("stemdl.workloads.spacegroup.bench.io", "input path: read limits, pipelines, and the training step with each loader"),
    "io-reconstruction": ("stemdl.workloads.reconstruction.bench", "reconstruction input path: bytes a sample, "
                          "pipelines against the read limit and the training step"),
    "lacbed": ("stemdl.workloads.lacbed.bench", "LACBED surrogate: Bloch-wave s/pattern against the networks' "
               "ms/pattern, the speed-up"),
    "physics": ("stemdl.physics.bench", "multislice engine: patterns/s against the FFT limit, peak memory, cost of a sample"),
}


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (module, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).configure(p)
        p.set_defaults(_bench=module)


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(args._bench).run(args)
