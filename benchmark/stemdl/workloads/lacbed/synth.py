"""LACBED training data: (projected potential, 000 LACBED pattern) pairs of cubic materials along [001],
by Bloch waves, written as HDF5 in the public style, reproducible, resumable, on any number of ranks.

    stemdl lacbed generate data/lacbed/small --samples 300 --size 32
    mpiexec -n 16 stemdl lacbed generate /lustre/lacbed --samples 880 --size 128 --beams 400

One sample a material: `--samples` distinct materials (`stemdl.physics.cubic`: a structure type and an
element for each of its roles; at most `cubic.material_count()` of them), drawn in order from one seeded
stream, duplicates drawn again, then shuffled and split 85:10:5 (train, dev, test) by material, so no
material of the test split was seen in training. Sample i's arrays are a function of its material and the
settings alone:

    OUT/{train,dev,test}/batch_{split}_{k}.h5, group sample_{i}_0:
        potential  float32 (S, S)     projected potential of one unit cell along [001], V·Å, rows along y
        lacbed     float32 (T, S, S)  000 LACBED intensity (fractions of the beam) at each thickness
        attrs: material (its key), structure_type, formula, elements (JSON), lattice_A, space_group,
               thicknesses_A (T), energy_keV, half_width_mrad, beams (the count used), size

The tilt square is `stemdl lacbed simulate`'s: half-width 1e3·λ·2/a mrad about [001] (features at fixed
pixels whatever a). Writing, the manifest (`synth.json`, with `benchmark: stemdl_lacbed`), resumption and
MPI are the harness's (`harness.sampleset.write_set`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from stemdl.harness.errors import StemdlError
from stemdl.harness.sampleset import SetSpec, write_set

SPLITS = ("train", "dev", "test")
# Where materials come from: the structure types of stemdl.physics.cubic (880 materials), random crystals
# of the 36 cubic space groups from the space-group generator (spglib-verified, every draw a new
# material), or each material from either with equal odds.
SOURCES = ("types", "generator", "both")
CUBIC_GROUPS = tuple(range(195, 231))
GENERATOR = "generator"  # the material "type" of a generator crystal
FRACTIONS = (0.85, 0.10, 0.05)
BENCHMARK = "stemdl_lacbed"


@dataclass(frozen=True)
class LacbedSettings:
    """What every sample of a set shares: everything that changes the bytes (with the seed)."""

    samples: int = 300
    size: int = 32  # pixels a side, potential and pattern
    thicknesses_A: tuple = (500.0, 1000.0, 1500.0, 2000.0)
    beams: int = 200  # requested (completed to a whole shell)
    energy_keV: float = 200.0
    samples_per_file: int = 64
    seed: int = 0
    source: str = "types"  # types | generator | both (see SOURCES)

    def check(self) -> None:
        from stemdl.physics.cubic import material_count

        if self.source not in SOURCES:
            raise StemdlError(f"--source {self.source!r}: one of {', '.join(SOURCES)}")
        limit = material_count() if self.source == "types" else None
        if self.samples < 1 or (limit is not None and self.samples > limit):
            raise StemdlError(f"--samples {self.samples}: between 1 and {limit} (one sample a distinct material "
                              f"of stemdl.physics.cubic; --source generator or both for more)")
        if self.size < 8 or self.size % 2:
            raise StemdlError(f"--size {self.size}: an even number of pixels, at least 8")
        if self.beams < 2 or self.samples_per_file < 1 or self.seed < 0 or self.energy_keV <= 0:
            raise StemdlError("--beams >= 2, --samples-per-file >= 1, --seed >= 0 and a positive energy")
        if not self.thicknesses_A or not all(t > 0 for t in self.thicknesses_A):
            raise StemdlError(f"--thickness {self.thicknesses_A}: positive numbers of Å")

    def content(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def material_keys(settings: LacbedSettings) -> list[tuple[str, dict]]:
    """The set's materials in sample order, `samples` distinct ones: (type, elements) of a structure type,
    or (GENERATOR, {"space_group": G, "draw": k}), the k-th generator draw, made in `make_sample`."""
    from stemdl.physics.cubic import draw

    rng = np.random.default_rng(np.random.SeedSequence([settings.seed, 1]))
    chosen, seen = [], set()
    while len(chosen) < settings.samples:
        from_generator = settings.source == "generator" or (settings.source == "both" and rng.random() < 0.5)
        if from_generator:
            name, elements = GENERATOR, {"space_group": int(CUBIC_GROUPS[int(rng.integers(len(CUBIC_GROUPS)))]),
                                         "draw": len(chosen)}
        else:
            name, elements = draw(rng)
        key = (name, tuple(sorted(elements.items())))
        if key not in seen:
            seen.add(key)
            chosen.append((name, elements))
    return chosen


def split_plan(settings: LacbedSettings) -> dict[str, list[int]]:
    """{split: the material numbers in it}: the materials shuffled and cut 85:10:5 (each split at least
    one material when there are three or more)."""
    order = np.random.default_rng(np.random.SeedSequence([settings.seed, 2])).permutation(settings.samples)
    n = settings.samples
    dev = max(1, round(n * FRACTIONS[1])) if n >= 3 else 0
    test = max(1, round(n * FRACTIONS[2])) if n >= 3 else 0
    train = n - dev - test
    cuts = {"train": order[:train], "dev": order[train:train + dev], "test": order[train + dev:]}
    return {split: sorted(int(i) for i in rows) for split, rows in cuts.items()}


def make_sample(settings: LacbedSettings, material: tuple[str, dict]):
    """(potential (S, S), lacbed (T, S, S), attrs) of one material: a pure function of its arguments."""
    from stemdl.physics import bloch, simulate

    name, elements = material
    structure, key, formula, a, space_group = _material(settings, name, elements)
    half = bloch.tilt_half_width_mrad(structure, settings.energy_keV)
    beamset = bloch.select_beams(structure, settings.beams, (0, 0, 1), settings.energy_keV, half)
    patterns = bloch.lacbed(structure, list(settings.thicknesses_A), settings.size, settings.energy_keV,
                            tilt_range_mrad=half, beamset=beamset).numpy()
    potential, _ = simulate.potential_image(structure, (0, 0, 1), settings.size)
    attrs = {"material": key, "structure_type": name, "formula": formula, "elements": json.dumps(elements),
             "lattice_A": a, "space_group": space_group,
             "thicknesses_A": np.asarray(settings.thicknesses_A, dtype=np.float64),
             "energy_keV": settings.energy_keV, "half_width_mrad": half, "beams": len(beamset), "size": settings.size}
    return potential.astype(np.float32), patterns.astype(np.float32), attrs


def _material(settings: LacbedSettings, name: str, elements: dict):
    """(structure, key, formula, a, space group) of a material of `material_keys`. A generator crystal is
    drawn from SeedSequence([seed, 3, draw]); a group that yields no verified crystal passes to the next
    cubic group, so every draw gives a crystal."""
    from stemdl.physics import cubic

    if name != GENERATOR:
        m = cubic.build(name, elements)
        return m.structure, m.key, m.formula, m.a, cubic.TYPES[name].number
    from stemdl.workloads.spacegroup.synth.crystals import random_crystal

    rng = np.random.default_rng(np.random.SeedSequence([settings.seed, 3, int(elements["draw"])]))
    first = CUBIC_GROUPS.index(int(elements["space_group"]))
    for k in range(len(CUBIC_GROUPS)):
        group = CUBIC_GROUPS[(first + k) % len(CUBIC_GROUPS)]
        try:
            crystal = random_crystal(group, rng)
        except StemdlError:
            continue
        a = float(np.linalg.norm(crystal.structure.lattice[0]))
        return (crystal.structure, f"{GENERATOR}:seed={settings.seed},draw={elements['draw']}", crystal.formula, a,
                group)
    raise StemdlError(f"no cubic space group gave a verified crystal for draw {elements['draw']}")


def _task(key):
    settings, split, index, material = key
    return (split, index, *make_sample(settings, material))


def _write(h5, key, sample) -> None:
    _, split, index, _ = key
    got_split, got, potential, patterns, attrs = sample
    assert (got_split, got) == (split, index), "results arrive in task order"
    group = h5.create_group(f"sample_{index}_0")
    group.create_dataset("potential", data=potential)
    group.create_dataset("lacbed", data=patterns)
    for name, value in attrs.items():
        group.attrs[name] = value


def set_spec(settings: LacbedSettings) -> SetSpec:
    materials = material_keys(settings)
    plan = []
    for split, rows in split_plan(settings).items():
        for k, start in enumerate(range(0, len(rows), settings.samples_per_file)):
            # a sample's number within its split is its position there; its material is rows[position]
            keys = [(settings, split, i, materials[rows[i]]) for i in range(start, min(start + settings.samples_per_file,
                                                                                        len(rows)))]
            plan.append((f"{split}/batch_{split}_{k}.h5", keys))
    return SetSpec(benchmark=BENCHMARK, preset="custom", description="LACBED pairs of cubic materials along [001]",
                   content=settings.content(), plan=plan, make=_task, write=_write,
                   what="a LACBED set")


def generate(out, settings: LacbedSettings, workers: int = 1, quiet: bool = False) -> dict:
    """Write (or finish) the set in OUT; its manifest. Collective under `dist.setup()`."""
    settings.check()
    return write_set(out, set_spec(settings), workers=workers, quiet=quiet, label="lacbed generate")
