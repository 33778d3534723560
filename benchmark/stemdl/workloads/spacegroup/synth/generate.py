"""`stemdl synth OUT`: a synthetic data set in the public STEMDL layout, from crystal physics.

    stemdl synth data/tiny --preset tiny --seed 1          # 16 samples in seconds, for tests
    stemdl synth data/default                              # the set `stemdl run` trains on
    stemdl synth data/mine --preset full --samples 20000 --space-groups 1-230 --distribution uniform

Each sample is one random crystal of the requested space group, verified with spglib (crystals.py), seen
along its three shortest inequivalent zone axes (zones.py) as kinematic/two-beam CBED patterns (cbed.py),
or with `--physics multislice` as dynamical ones (dynamical.py: minutes a sample on a CPU core).
Files are `OUT/{train,dev,test}/batch_{split}_N.h5` like the public set, and like it they are not shuffled:
samples are ordered by space group within a split.

Reproducible and resumable by construction: sample i of a split draws all its randomness from
SeedSequence([seed, split, i]), so the bytes written depend neither on the number of workers nor on the
ranks (`mpiexec -n N stemdl synth ...` deals the files round-robin, `harness.sampleset`); workers only
compute samples, each rank writes its files under a temporary name and renames them when complete, and
`OUT/synth.json` records the configuration and every finished file. Re-running the same command continues
an interrupted run; a different configuration for an existing OUT is refused rather than mixed in. One
writer at a time (`OUT/.lock`): a second one, e.g. a second first `stemdl run`, waits for the first and
then finds the set complete. A complete set is only read, so it may sit on a read-only file system.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import signal
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from stemdl.harness import files
from stemdl.harness.errors import StemdlError
from stemdl.harness.sampleset import SetSpec, run_writer, write_set
from stemdl.harness.synthset import MANIFEST  # noqa: F401 (where callers and tests find the manifest's name)
from stemdl.workloads.spacegroup.data import layout

SPLIT_IDS = {"train": 0, "dev": 1, "test": 2}


@dataclass(frozen=True)
class SynthConfig:
    """What a synthetic set is made of. Everything that changes the bytes written is a field here."""

    preset: str = "tiny"
    description: str = ""
    seed: int = 0
    space_groups: tuple = ()
    distribution: str = "uniform"  # uniform | real (the public data's class mix)
    samples: dict = field(default_factory=lambda: {"train": 8, "dev": 4, "test": 4})
    samples_per_file: int = 100
    image_size: int = layout.IMAGE_SIZE
    energies_keV: tuple = (100, 120, 160, 200)
    thickness_nm: tuple = (20.0, 80.0)
    dose: float | None = 1.0e6  # electrons per pattern (Poisson noise); None: noiseless
    mistilt_mrad: float = 1.0  # largest beam tilt off the zone axis (uniform in a disc)
    rotate: bool = True  # random in-plane rotation of each pattern (False: y_dirs from the lattice)
    detector_mrad: float = 50.0  # scattering angle at the image edge (half-width)
    debye_waller: tuple = (0.3, 1.0)  # B in angstrom^2, drawn per material
    physics: str = "kinematic"  # kinematic | multislice (RENDERERS)
    scan: int = 8  # multislice: the probe averaged over scan x scan positions of one cell (public data: 8)

    def content(self) -> dict:
        """The fields that determine the data (not the description): compared when resuming. `scan`
        only where it changes the bytes (multislice)."""
        d = dataclasses.asdict(self)
        d.pop("description")
        d.pop("preset")
        if self.physics == "kinematic":
            d.pop("scan")
        return json.loads(json.dumps(d))  # tuples -> lists, as stored in the manifest

    def same_data(self, stored: dict | None) -> bool:
        """A manifest's `config` describes this data; one written before `physics` existed is kinematic."""
        return isinstance(stored, dict) and {"physics": "kinematic", **stored} == self.content()


# ---------------------------------------------------------------- configuration


def real_class_counts() -> dict[int, dict[str, int]]:
    """Samples per space group and split in the public data set (packaged copy of the shared table)."""
    text = resources.files("stemdl.workloads.spacegroup").joinpath("resources", "real_class_counts.csv").read_text()
    rows = csv.DictReader(text.splitlines())
    return {int(r["space_group"]): {k: int(r[k]) for k in ("train", "dev", "test", "total")} for r in rows}


def parse_space_groups(spec) -> tuple[int, ...]:
    """'real' (the 200 groups of the public data), 'all', a list of ints, or text like '1-10,14,62'."""
    if isinstance(spec, (list, tuple)):
        groups = [int(g) for g in spec]
    elif str(spec).strip() == "real":
        groups = [g for g, c in real_class_counts().items() if c["total"] > 0]
    elif str(spec).strip() == "all":
        groups = list(range(1, layout.N_SPACE_GROUPS + 1))
    else:
        groups = []
        for part in str(spec).replace(" ", "").split(","):
            lo, dash, hi = part.partition("-")
            if not lo.isdigit() or (dash and not hi.isdigit()):
                raise StemdlError(f"--space-groups: cannot read {part!r} (use e.g. '1-10,14,62', 'real' or 'all')")
            groups.extend(range(int(lo), int(hi or lo) + 1))
    bad = [g for g in groups if not 1 <= g <= layout.N_SPACE_GROUPS]
    if bad or not groups:
        raise StemdlError(f"--space-groups: {bad or 'nothing'} is not a space group number 1..230")
    return tuple(sorted(set(groups)))


def one_per_class(groups) -> tuple[int, ...]:
    """Keep one space group per diffraction class: the one most frequent in the public data."""
    from stemdl.workloads.spacegroup.synth.diffclass import diffraction_class

    counts = real_class_counts()
    best: dict[int, int] = {}
    for g in groups:
        c = diffraction_class(g)
        if c not in best or counts[g]["total"] > counts[best[c]]["total"]:
            best[c] = g
    return tuple(sorted(best.values()))


def presets() -> dict:
    text = resources.files("stemdl.workloads.spacegroup").joinpath("resources", "synth_presets.yaml").read_text()
    return yaml.safe_load(text)


def resolve_config(args: argparse.Namespace) -> SynthConfig:
    """Preset, then command-line options; checked once here."""
    table = presets()
    if args.preset not in table:
        raise StemdlError(f"--preset {args.preset!r}: choose one of {', '.join(table)}")
    values = dict(table[args.preset], preset=args.preset)
    unknown = set(values) - {f.name for f in dataclasses.fields(SynthConfig)}
    if unknown:
        raise StemdlError(f"preset {args.preset}: unknown key(s) {', '.join(sorted(unknown))}")
    for name in ("seed", "distribution", "samples_per_file", "image_size", "physics", "scan"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.space_groups is not None:
        values["space_groups"] = args.space_groups
    if args.samples is not None:
        values["samples"] = split_sizes(args.samples, values["samples"])
    if args.no_noise:
        values["dose"] = None
    if args.rotate is not None:
        values["rotate"] = args.rotate
    groups = parse_space_groups(values["space_groups"])
    if args.distinguishable:
        groups = one_per_class(groups)
    values["space_groups"] = groups
    for key in ("energies_keV", "thickness_nm", "debye_waller"):
        if key in values:
            values[key] = tuple(values[key])
    cfg = SynthConfig(**values)
    check_config(cfg)
    return cfg


def preset_config(preset: str, **options) -> SynthConfig:
    """`resolve_config` for callers in code: a preset, then options named as on the command line."""
    values = dict(preset=preset, seed=None, distribution=None, space_groups=None, samples=None,
                  samples_per_file=None, image_size=None, no_noise=False, distinguishable=False, rotate=None,
                  physics=None, scan=None)
    unknown = set(options) - set(values)
    if unknown:
        raise TypeError(f"preset_config: unknown option(s) {', '.join(sorted(unknown))}")
    return resolve_config(argparse.Namespace(**{**values, **options}))


def split_sizes(total: int, proportions: dict) -> dict:
    """`total` samples split in the preset's train/dev/test proportions."""
    keys = list(proportions)
    counts = apportion(total, [proportions[k] for k in keys])
    return {k: int(n) for k, n in zip(keys, counts)}


def check_config(cfg: SynthConfig) -> None:
    if cfg.distribution not in ("uniform", "real"):
        raise StemdlError(f"--distribution {cfg.distribution!r}: choose uniform or real")
    if cfg.distribution == "real":
        counts = real_class_counts()
        absent = [g for g in cfg.space_groups if counts[g]["total"] == 0]
        if absent:
            raise StemdlError(f"--distribution real: space group(s) {absent} do not occur in the public data; "
                              "drop them or use --distribution uniform")
    if set(cfg.samples) - set(layout.SPLITS) or any(int(n) < 0 for n in cfg.samples.values()):
        raise StemdlError(f"samples: expected counts for {', '.join(layout.SPLITS)}, got {cfg.samples}")
    if sum(cfg.samples.values()) <= 0:
        raise StemdlError("samples: nothing to generate")
    if cfg.samples_per_file < 1 or not 16 <= cfg.image_size <= 4096:
        raise StemdlError("--samples-per-file must be >= 1 and --image-size within 16..4096")
    if cfg.physics not in RENDERERS or int(cfg.scan) < 1:
        raise StemdlError(f"--physics {cfg.physics!r}, --scan {cfg.scan}: choose {' or '.join(RENDERERS)}, "
                          "and a scan of 1 or more")


# ---------------------------------------------------------------- the plan


def apportion(n: int, weights) -> np.ndarray:
    """Split n into integers proportional to weights (largest remainder; ties go to the earlier entry)."""
    w = np.asarray(weights, dtype=np.float64)
    if n <= 0 or w.sum() <= 0:
        return np.zeros(len(w), dtype=np.int64)
    exact = n * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return counts


def split_labels(cfg: SynthConfig, split: str) -> np.ndarray:
    """The label of every sample of a split, sorted like the (unshuffled) public files."""
    groups = list(cfg.space_groups)
    if cfg.distribution == "real":
        counts = real_class_counts()
        weights = [counts[g]["total"] for g in groups]
    else:
        weights = [1.0] * len(groups)
    per_class = apportion(int(cfg.samples.get(split, 0)), weights)
    return np.repeat(np.asarray(groups, dtype=np.int64), per_class)


def file_plan(cfg: SynthConfig) -> list[tuple[str, int, range]]:
    """(split, file number, sample indices) for every file of the set."""
    plan = []
    for split in layout.SPLITS:
        n = int(cfg.samples.get(split, 0))
        for k, start in enumerate(range(0, n, cfg.samples_per_file)):
            plan.append((split, k, range(start, min(start + cfg.samples_per_file, n))))
    return plan


def file_path(out: Path, split: str, number: int) -> Path:
    return out / split / f"batch_{split}_{number}.h5"


# ---------------------------------------------------------------- one sample


def _kinematic(structure, spec, rng, cfg: SynthConfig, device=None):
    from stemdl.workloads.spacegroup.synth import cbed

    image, y_dir = cbed.render(structure, spec, rng)
    return image, y_dir, None


def _multislice(structure, spec, rng, cfg: SynthConfig, device=None):
    from stemdl.workloads.spacegroup.synth import cbed, dynamical

    noise = rng.spawn(1)[0]  # this pattern's own noise stream: it leaves rng where it was
    if spec.dose is not None:
        # The kinematic pattern's Poisson noise takes a data-dependent number of draws from rng: replaying it
        # (a few ms against the multislice's seconds) keeps every later draw, so every later pattern's
        # thickness, rotation and mistilt, the same as the kinematic set's of the same seed.
        cbed.render(structure, spec, rng)
    return dynamical.render(structure, spec, noise, scan=cfg.scan, device=device)


# physics -> renderer(structure, spec, rng, cfg, device) -> (image, y_dir, dynamical.Simulated or None)
RENDERERS = {"kinematic": _kinematic, "multislice": _multislice}


def _simulation(cfg: SynthConfig, done) -> layout.Simulation | None:
    """The sample's record of how its patterns were simulated (None for kinematic ones)."""
    if cfg.physics == "kinematic":
        return None
    return layout.Simulation(cfg.physics, cfg.scan, np.array([d.slice_A for d in done]),
                             np.array([d.gpts for d in done]), np.array([d.extent_A for d in done]),
                             np.array([d.strain for d in done]))


def make_sample(cfg: SynthConfig, split: str, index: int, label: int, device=None):
    """The image stack and record of sample `index` of `split`: a pure function of its arguments.
    `device` is where multislice runs (the synth's own runs stay on the CPU; `stemdl bench physics`)."""
    from stemdl.workloads.spacegroup.synth import cbed, crystals, diffclass, zones

    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, SPLIT_IDS[split], index]))
    crystal = crystals.random_crystal(int(label), rng)
    axes = zones.zone_axes(crystal.structure, n=layout.N_PATTERNS)
    energy = int(rng.choice(cfg.energies_keV))
    b_factor = float(rng.uniform(*cfg.debye_waller))
    images, y_dirs, alphas, d_hkls, thickness, done = [], [], [], [], [], []
    for axis in axes:
        spec = cbed.random_spec(crystal.structure, axis, energy, rng, debye_waller=b_factor,
                                size=cfg.image_size, max_angle_rad=cfg.detector_mrad * 1e-3,
                                thickness_nm=cfg.thickness_nm, max_mistilt_rad=cfg.mistilt_mrad * 1e-3,
                                dose=cfg.dose)
        if not cfg.rotate:
            spec = dataclasses.replace(spec, rotation_rad=0.0)
        image, y_dir, simulated = RENDERERS[cfg.physics](crystal.structure, spec, rng, cfg, device)
        images.append(image)
        y_dirs.append(y_dir)
        alphas.append(spec.semi_angle_rad)
        d_hkls.append(cbed.semi_angle(crystal.structure, axis, energy)[1])
        thickness.append(spec.thickness_nm if simulated is None else simulated.thickness_nm)
        done.append(simulated)
    record = layout.SampleRecord(
        space_group=crystal.space_group, material=f"syn-{cfg.seed}-{split}-{index}", formula=crystal.formula,
        energy_keV=energy, z_dirs=np.asarray(axes, dtype=np.int64), y_dirs=np.asarray(y_dirs),
        semi_angles_rad=np.asarray(alphas), d_hkls_angstrom=np.asarray(d_hkls),
        abc_angstrom=np.asarray(crystal.abc), angles_degree=np.asarray(crystal.angles),
        kinematic_class=diffclass.diffraction_class(crystal.space_group), structure=crystal.structure,
        thickness_nm=np.asarray(thickness), simulation=_simulation(cfg, done))
    return np.stack(images).astype(np.float32), record


def _worker_init(in_pool: bool = True) -> None:
    # One BLAS thread per worker: the parallelism is across samples, and oversubscribing 2 cores hurts.
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    warnings.filterwarnings("ignore")
    if in_pool:  # signals are the parent's to handle: it stops the pool and cleans up, quietly
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # pool.terminate() must just end a worker


def _task(args):
    cfg, split, index, label = args
    stack, record = make_sample(cfg, split, index, label)
    return split, index, stack, record


# ---------------------------------------------------------------- the set and its writer


def _write_sample(h5, key, sample) -> None:
    _, split, index, _ = key
    got_split, got, stack, record = sample
    assert (got_split, got) == (split, index), "results arrive in task order"
    layout.write_sample(h5, f"sample_{index}_0", stack, record)


def set_spec(cfg: SynthConfig) -> SetSpec:
    """The set `cfg` describes, for `sampleset.write_set`: its files, each sample's key (cfg, split, index,
    space group), the class counts recorded in the complete manifest."""
    labels = {split: split_labels(cfg, split) for split in layout.SPLITS}
    plan = [(str(file_path(Path(), split, number)), [(cfg, split, i, int(labels[split][i])) for i in indices])
            for split, number, indices in file_plan(cfg)]
    counts = {split: {str(g): int(n) for g, n in zip(*np.unique(labels[split], return_counts=True))}
              for split in layout.SPLITS}
    # `_task` is looked up now, not at import: a test may stand in for it
    return SetSpec(benchmark="stemdl", preset=cfg.preset, description=cfg.description, content=cfg.content(),
                   plan=plan, make=_task, write=_write_sample, worker_init=_worker_init,
                   what="a synthetic set", extra={"class_counts": counts}, matches=cfg.same_data)


def generate(out: Path, cfg: SynthConfig, workers: int = 1, quiet: bool = False, wait: bool = True,
             timeout: float | None = None) -> dict:
    """Write (or finish writing) the set; returns the manifest. Collective when `dist.setup()` was called:
    the ranks share the files (`sampleset.write_set`), each with `workers` processes. While another job
    writes OUT, wait for it (`timeout` seconds at most; None: for ever), or with `wait=False` refuse at once."""
    if workers <= 1:
        _worker_init(in_pool=False)
    try:
        return write_set(Path(out), set_spec(cfg), workers=workers, quiet=quiet, wait=wait, timeout=timeout)
    except OSError as exc:  # storage errors outside an atomic write (a split folder, a checksum)
        if exc.errno not in files.WRITE_ERRNOS:
            raise
        raise files.write_error(exc.filename or out, exc) from None


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="output folder (created; an unfinished run there is resumed)")
    parser.add_argument("--preset", default="default",
                        help=f"one of {', '.join(presets())} (default: %(default)s)")
    parser.add_argument("--seed", type=int, help="random seed (default: the preset's, 0)")
    parser.add_argument("--space-groups", help="e.g. '14,62,225', '1-230', 'real' (the 200 of the public set)")
    parser.add_argument("--distinguishable", action="store_true",
                        help="keep one space group per diffraction class (kinematically distinguishable)")
    parser.add_argument("--distribution", choices=("uniform", "real"), help="class mix")
    parser.add_argument("--samples", type=int, help="total samples, split in the preset's proportions")
    parser.add_argument("--samples-per-file", type=int)
    parser.add_argument("--image-size", type=int, help="pattern size in pixels (public set: 512)")
    parser.add_argument("--no-noise", action="store_true", help="no Poisson dose noise")
    parser.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=None,
                        help="random in-plane rotation of each pattern (default: the preset's)")
    parser.add_argument("--physics", choices=tuple(RENDERERS),
                        help="kinematic (fast, the presets' default) or multislice (dynamical, minutes a sample)")
    parser.add_argument("--scan", type=int, help="multislice: probe positions per cell edge, averaged "
                                                 "(default: the preset's, else 8 as the public data)")
    parser.add_argument("--workers", type=int,
                        help="worker processes a rank (default: the rank's share of the node's cores); the "
                             "output depends neither on them nor on the ranks (mpiexec -n N stemdl synth ...)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _stop(signum, frame):
    # A scheduler's SIGTERM ends the run like Ctrl-C: the pool stops and no partial file is left.
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _stop)
    cfg = resolve_config(args)

    def announce(env, workers):
        return (f"stemdl synth {args.out}: preset {cfg.preset}, seed {cfg.seed}, {len(cfg.space_groups)} space "
                f"groups ({cfg.distribution}), samples {cfg.samples}, {cfg.image_size}x{cfg.image_size}, "
                f"{cfg.physics}, {env.world_size} rank(s) x {workers} worker(s)")

    return run_writer(args.out, args.workers, lambda n: generate(args.out, cfg, workers=n, quiet=args.quiet),
                      None if args.quiet else announce)
