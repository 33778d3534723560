"""The `stemdl` command: one subcommand per concern, each owned by its module.

    stemdl run [--benchmark NAME] [--config PRESET]  # the timed benchmark (mpiexec/srun/jsrun for many ranks)
    stemdl check LOG                            # MLPerf compliance check of a run's log
    stemdl summarize ORG                        # time to F1 per scale, efficiency, plots
    stemdl sysinfo --org ORG --system NAME      # the MLPerf system description of this machine
    stemdl synth OUT --preset tiny --seed 1     # synthetic data in the public layout
    stemdl validate DIR                         # check every sample, summarize, list the bad ones
    stemdl synth OUT --benchmark stemdl_reconstruction   # the same for another benchmark's data
    stemdl index DIR                            # build (or reuse) the cached index of a data directory
    stemdl convert DIR SHARDS --size 128        # preprocessed uint8 shards + manifest (mpiexec for many ranks)
    stemdl eda DIR --out report                 # exploratory analysis: counts, imbalance, lattices, PCA
    stemdl ablate imbalance --out results       # losses, samplers, ensembles on an imbalanced synthetic set
    stemdl simulate cbed --structure X.cif ...  # dynamical (multislice) CBED, or `potential`, of a crystal
    stemdl lacbed simulate --structure X.cif --thickness 1000 --size 128 --out P.npy   # LACBED (Bloch waves)

`synth` and `validate` are the space-group benchmark's unless `--benchmark NAME` names another with its own
(PER_BENCHMARK); `validate` and `convert` also find the benchmark in the folder's synth.json.

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
    "ablate": ("stemdl.workloads.spacegroup.ablate", "ablations of the data challenge: imbalance methods, multi-task heads, dynamical against kinematic CBED"),
    "bench": ("stemdl.workloads.spacegroup.bench", "measure the speed of a part of the harness (prints figures)"),
    "simulate": ("stemdl.physics.commands", "dynamical CBED patterns or projected potentials of a crystal from a CIF (multislice)"),
    "lacbed": ("stemdl.workloads.lacbed.commands", "large-angle CBED of a crystal from a CIF, by Bloch waves or multislice"),
}

# Commands another benchmark provides for its own data: command -> {benchmark: module}. The command's
# module for the benchmark not listed here is the one in COMMANDS (the space-group benchmark's).
PER_BENCHMARK = {
    "synth": {"stemdl_reconstruction": "stemdl.workloads.reconstruction.synth"},
    "validate": {"stemdl_reconstruction": "stemdl.workloads.reconstruction.data"},
    "convert": {"stemdl_reconstruction": "stemdl.workloads.reconstruction.convert"},
}


def benchmark_module(command: str, rest: list[str]) -> tuple[str, list[str]]:
    """The module that serves `command` for the benchmark `rest` names (`--benchmark NAME`, removed from
    the arguments) or, for `validate` and `convert`, the one its folder's synth.json names; else COMMANDS's."""
    modules = PER_BENCHMARK.get(command)
    if not modules:
        return COMMANDS[command][0], rest
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--benchmark")
    known, rest = pre.parse_known_args(rest)
    name = known.benchmark
    if name is None and command in ("validate", "convert"):
        name = _recorded_benchmark(rest)
    if name is None or name not in modules:
        from stemdl.workloads import REGISTRY

        if name is not None and name != REGISTRY.default:
            raise StemdlError(f"--benchmark {name!r}: not one of {', '.join([REGISTRY.default, *modules])}")
        return COMMANDS[command][0], rest
    return modules[name], rest


def _recorded_benchmark(rest: list[str]) -> str | None:
    """The benchmark a data folder's synth.json names (its first positional argument), if any."""
    from pathlib import Path

    from stemdl.harness.synthset import read_manifest

    folders = [Path(a) for a in rest if not a.startswith("-") and Path(a).is_dir()]
    try:
        manifest = read_manifest(folders[0]) if folders else None
    except StemdlError:
        return None  # the command itself will say what is wrong with the folder
    return manifest.get("benchmark") if isinstance(manifest, dict) else None


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
    try:
        module_name, rest = benchmark_module(known.command, argv[1:])
    except StemdlError as exc:
        print(f"stemdl {known.command}: error: {exc}", file=sys.stderr)
        return 2
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"stemdl {known.command}", description=COMMANDS[known.command][1])
    if known.command in PER_BENCHMARK:
        sub.add_argument("--benchmark", metavar="NAME", help="whose data: stemdl (default) or "
                         + ", ".join(PER_BENCHMARK[known.command]))
    module.configure(sub)
    args = sub.parse_args(rest)
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
