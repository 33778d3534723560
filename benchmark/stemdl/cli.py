"""The `stemdl` command: one subcommand per concern, each owned by its module.

    stemdl run [--benchmark NAME] [--config PRESET]  # the timed benchmark (mpiexec/srun/jsrun for many ranks)
    stemdl check LOG                            # MLPerf compliance check of a run's log
    stemdl summarize ORG                        # time to F1 per scale, efficiency, plots
    stemdl sysinfo --org ORG --system NAME      # the MLPerf system description of this machine
    stemdl synth OUT --preset tiny --seed 1     # synthetic data in the public layout
    stemdl validate DIR                         # check every sample, summarize, list the bad ones
    stemdl index DIR                            # build (or reuse) the cached index of a data directory
    stemdl convert DIR SHARDS --size 128        # preprocessed uint8 shards + manifest (mpiexec for many ranks)
    stemdl eda DIR --out report                 # exploratory analysis: counts, imbalance, lattices, PCA
    stemdl ablate imbalance --out results       # losses, samplers, ensembles on an imbalanced synthetic set
    stemdl simulate cbed --structure X.cif ...  # dynamical (multislice) CBED, or `potential`, of a crystal

Each module named in COMMANDS provides `configure(parser)` and `run(args) -> int`; it is imported only when
its command runs, so `stemdl validate` does not pay for importing torch or pyxtal. A `StemdlError` is
printed as one line on stderr with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from stemdl import __version__
from stemdl.harness.errors import StemdlError

# name -> (module, one-line help). The harness's commands serve every registered benchmark (their
# `run(args, registry)` is handed the registry); the others are the space-group workload's own.
HARNESS_COMMANDS = {
    "run": ("stemdl.harness.runner", "the timed benchmark: train to the target, writing an MLLOG"),
    "check": ("stemdl.harness.compliance", "run the MLPerf compliance checker on stemdl logs with our rule files"),
    "summarize": ("stemdl.harness.summarize", "scaling tables and plots (md, csv, json, png) from a submission's logs"),
}
COMMANDS = {
    **HARNESS_COMMANDS,
    "sysinfo": ("stemdl.harness.sysinfo", "write ORG/systems/NAME.json, the MLPerf HPC system description of this machine"),
    "synth": ("stemdl.workloads.spacegroup.synth.generate", "generate a synthetic data set in the public STEMDL layout"),
    "validate": ("stemdl.workloads.spacegroup.data.validate", "check every sample of a data directory and summarize it"),
    "index": ("stemdl.workloads.spacegroup.data.index", "build or reuse the cached sample index of a data directory"),
    "convert": ("stemdl.workloads.spacegroup.data.convert", "convert a data set to preprocessed shards (MPI-parallel, resumable)"),
    "eda": ("stemdl.workloads.spacegroup.eda", "exploratory data analysis report (Markdown, PNG, JSON) of a data set"),
    "ablate": ("stemdl.workloads.spacegroup.ablate", "ablations of the data challenge: imbalance methods, multi-task heads"),
    "bench": ("stemdl.workloads.spacegroup.bench", "measure the speed of a part of the harness (prints figures)"),
    "simulate": ("stemdl.physics.commands", "dynamical CBED patterns or projected potentials of a crystal from a CIF (multislice)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stemdl", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"stemdl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # Modules configure their own parsers lazily: only the chosen one is imported (see main()).
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    # Find the command first, then let its module define the arguments, then parse for real.
    known, _ = parser.parse_known_args(argv[:1] if argv and not argv[0].startswith("-") else argv)
    module = importlib.import_module(known._module)
    sub = argparse.ArgumentParser(prog=f"stemdl {known.command}", description=COMMANDS[known.command][1])
    module.configure(sub)
    args = sub.parse_args(argv[1:])
    try:
        if known.command in HARNESS_COMMANDS:
            from stemdl.workloads import REGISTRY

            return int(module.run(args, REGISTRY) or 0)
        return int(module.run(args) or 0)
    except StemdlError as exc:
        print(f"stemdl {known.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stemdl {known.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
