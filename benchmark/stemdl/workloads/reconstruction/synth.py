"""The reconstruction data set: CBED stacks of a probe grid and their projected-potential targets, written
as HDF5 in the public style (`layout`), reproducible, resumable, on any number of ranks and processes.

    python -m stemdl.workloads.reconstruction.synth data/reconstruction/default          # the run's default
    mpiexec -n 4 python -m stemdl.workloads.reconstruction.synth OUT --preset ornl --samples 20000
    generate(out, preset_config("smoke"), workers=2)                                   # from code

Sample i of a split draws all its randomness from SeedSequence([seed, split, i]) (`generate.make_sample`),
so the bytes written do not depend on the ranks or the worker processes. The writing is the harness's
(`harness.sampleset.write_set`: files shared over the ranks, each written under a temporary name and
renamed, `OUT/synth.json` with the configuration and every finished file's SHA-256, an interrupted set
continued, another configuration refused, one writer job at a time: a second first `stemdl run` waits,
then finds the set complete).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from stemdl.harness.errors import StemdlError
from stemdl.workloads.reconstruction import layout
from stemdl.workloads.reconstruction.generate import SampleSettings
# synth.json as the space-group generator writes it: its helpers, not copies
from stemdl.harness.sampleset import SetSpec, run_writer, write_set
from stemdl.harness.synthset import MANIFEST

__all__ = ["MANIFEST", "SynthConfig", "generate", "preset_config"]


@dataclass(frozen=True)
class SynthConfig:
    """What a set is made of: everything that changes the bytes is a field here (`settings` overrides
    `generate.SampleSettings`)."""

    preset: str = "default"
    description: str = ""
    seed: int = 0
    samples: dict = field(default_factory=lambda: {"train": 8, "dev": 4, "test": 4})
    samples_per_file: int = 64
    settings: dict = field(default_factory=dict)

    def sample_settings(self) -> SampleSettings:
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in self.settings.items()}
        return SampleSettings(**values)

    def content(self) -> dict:
        """The fields that determine the data, the sample settings complete: compared when resuming."""
        return json.loads(json.dumps({"seed": self.seed, "samples": dict(self.samples),
                                      "samples_per_file": self.samples_per_file,
                                      "settings": dataclasses.asdict(self.sample_settings())}))

    def check(self) -> None:
        if set(self.samples) - set(layout.SPLITS) or any(int(n) < 0 for n in self.samples.values()):
            raise StemdlError(f"samples: expected counts for {', '.join(layout.SPLITS)}, got {self.samples}")
        if sum(self.samples.values()) <= 0 or self.samples_per_file < 1 or self.seed < 0:
            raise StemdlError("samples: something to generate, samples_per_file >= 1 and a seed >= 0")
        unknown = set(self.settings) - {f.name for f in dataclasses.fields(SampleSettings)}
        if unknown:
            raise StemdlError(f"preset {self.preset}: unknown sample setting(s) {', '.join(sorted(unknown))}")
        self.sample_settings().check()


def presets() -> dict:
    text = resources.files("stemdl.workloads.reconstruction").joinpath("resources", "synth_presets.yaml")
    return yaml.safe_load(text.read_text())


def preset_config(preset: str, seed: int | None = None, samples: int | None = None,
                  samples_per_file: int | None = None) -> SynthConfig:
    """A preset of resources/synth_presets.yaml, then the options given (`samples`: a total, split in the
    preset's proportions)."""
    table = presets()
    if preset not in table:
        raise StemdlError(f"--preset {preset!r}: choose one of {', '.join(table)}")
    values = dict(table[preset], preset=preset)
    if seed is not None:
        values["seed"] = seed
    if samples_per_file is not None:
        values["samples_per_file"] = samples_per_file
    if samples is not None:
        splits = list(values["samples"])
        weights = np.array([values["samples"][s] for s in splits], dtype=np.float64)
        counts = np.floor(samples * weights / weights.sum()).astype(int)
        counts[0] += samples - counts.sum()  # the rest to train
        values["samples"] = dict(zip(splits, counts.tolist()))
    cfg = SynthConfig(**values)
    cfg.check()
    return cfg


# ---------------------------------------------------------------- the plan and one sample


def file_plan(cfg: SynthConfig) -> list[tuple[str, int, range]]:
    """(split, file number, sample numbers) of every file of the set."""
    plan = []
    for split in layout.SPLITS:
        n = int(cfg.samples.get(split, 0))
        plan += [(split, k, range(start, min(start + cfg.samples_per_file, n)))
                 for k, start in enumerate(range(0, n, cfg.samples_per_file))]
    return plan


def relative_path(split: str, number: int) -> str:
    return f"{split}/{layout.file_name(split, number)}"


def make_sample(cfg: SynthConfig, split: str, index: int):
    """(cbed, potential, attrs) of sample `index` of `split`: a pure function of its arguments."""
    from stemdl.workloads.reconstruction.generate import make_sample as simulate

    settings = cfg.sample_settings()
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, layout.SPLIT_IDS[split], index]))
    cbed, potential, attrs = simulate(rng, settings)
    attrs = {"probe_grid": settings.scan, "material": f"syn-{cfg.seed}-{split}-{index}",
             "pattern_size": settings.pattern_size, "target_size": settings.target_size, **attrs}
    return cbed, potential, attrs


def _task(args):
    cfg, split, index = args
    return (split, index, *make_sample(cfg, split, index))


# ---------------------------------------------------------------- the set


def _write(h5, key, sample) -> None:
    _, split, index = key
    got_split, got, cbed, potential, attrs = sample
    assert (got_split, got) == (split, index), "results arrive in task order"
    layout.write_sample(h5, layout.group_name(index), cbed, potential, attrs)


def set_spec(cfg: SynthConfig) -> SetSpec:
    """The set `cfg` describes, for the harness's writer."""
    return SetSpec(benchmark="stemdl_reconstruction", preset=cfg.preset, description=cfg.description,
                   content=cfg.content(), what="a reconstruction set",
                   plan=[(relative_path(split, number), [(cfg, split, i) for i in indices])
                         for split, number, indices in file_plan(cfg)],
                   make=_task, write=_write)


def generate(out, cfg: SynthConfig, workers: int = 1, quiet: bool = False, wait: bool = True,
             timeout: float | None = None) -> dict:
    """Write (or finish) the set and return its manifest (`harness.sampleset.write_set`). Collective when
    `dist.setup()` was called: the ranks share the files, each with `workers` processes. While another
    job writes OUT, wait for it (`timeout` seconds at most; None: for ever), or with `wait=False` refuse."""
    return write_set(out, set_spec(cfg), workers=workers, quiet=quiet, wait=wait, timeout=timeout)


# ---------------------------------------------------------------- the command


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="output folder (created; an unfinished run there is resumed)")
    parser.add_argument("--preset", default="default", help="smoke, default or ornl (default: %(default)s)")
    parser.add_argument("--seed", type=int, help="random seed (default: the preset's)")
    parser.add_argument("--samples", type=int, help="total samples, split in the preset's proportions")
    parser.add_argument("--samples-per-file", type=int)
    parser.add_argument("--workers", type=int, help="processes per rank (default: the rank's share of the cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def run(args: argparse.Namespace) -> int:
    cfg = preset_config(args.preset, args.seed, args.samples, args.samples_per_file)
    s = cfg.sample_settings()

    def announce(env, workers):
        return (f"synth {args.out}: preset {cfg.preset}, seed {cfg.seed}, samples {cfg.samples}, "
                f"{s.scan}x{s.scan} probes of {s.pattern_size}x{s.pattern_size} -> {s.target_size}x"
                f"{s.target_size}, {env.world_size} rank(s) x {workers} worker(s)")

    return run_writer(args.out, args.workers, lambda n: generate(args.out, cfg, workers=n, quiet=args.quiet),
                      None if args.quiet else announce)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stemdl.workloads.reconstruction.synth",
                                     description=__doc__.split("\n\n")[0])
    configure(parser)
    try:
        return run(parser.parse_args(argv))
    except StemdlError as exc:
        print(f"synth: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
