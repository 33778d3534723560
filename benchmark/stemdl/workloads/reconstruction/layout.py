"""The reconstruction data on disk: HDF5 files in the public STEMDL style, and the checks of one sample.

    OUT/{train,dev,test}/batch_{split}_{k}.h5      # as the classification set (spacegroup.data.layout)
        sample_{i}_0/                              # one group per sample, i its number within the split
            cbed        float16 (N², S, S)         # the patterns of the N x N probe grid, raster order,
                                                   # each z-scored (generate.make_sample)
            potential   float16 (1, T, T)          # the target: projected potential, z-scored
            attrs: probe_grid (N), space_group, formula, material, lattice_A, zone, energy_keV, cs_mm, ...

Datasets are contiguous and uncompressed (as the public set), so a reader pays no decompression. The
attributes are `generate.make_sample`'s (what made the sample and where its grids lie) plus `probe_grid`,
`material` and the sizes; `REQUIRED_ATTRS` are those the benchmark reads or checks.

`sample_problems` is every check of one sample, each reason a few words; callers join them into the
one-line errors `FILE:GROUP: reason; reason` (stemdl.harness.errors.DataError).
"""

from __future__ import annotations

import re

import numpy as np

SPLITS = ("train", "dev", "test")
SPLIT_IDS = {"train": 0, "dev": 1, "test": 2}
FILE_RE = re.compile(r"^batch_(train|dev|test)_(\d+)\.h5\Z", re.ASCII)
GROUP_RE = re.compile(r"^sample_(\d+)_(\d+)\Z", re.ASCII)
CBED, POTENTIAL = "cbed", "potential"
DTYPE = np.dtype(np.float16)
# name -> (what it must be, its meaning); checked by sample_problems
REQUIRED_ATTRS = {
    "probe_grid": ("int", "N: the probes form an N x N grid, so cbed holds N² patterns"),
    "space_group": ("int", "of the crystal, 1..230"),
    "energy_keV": ("float", "beam energy"),
    "cs_mm": ("float", "spherical aberration"),
    "zone": ("int (3,)", "zone axis [uvw] the crystal is seen along"),
    "lattice_A": ("float (3, 3)", "the crystal's cell, rows a, b, c"),
}


def group_name(index: int) -> str:
    return f"sample_{index}_0"


def file_name(split: str, number: int) -> str:
    return f"batch_{split}_{number}.h5"


def group_number(name: str) -> int | None:
    m = GROUP_RE.match(name)
    return int(m.group(1)) if m else None


def write_sample(h5, name: str, cbed: np.ndarray, potential: np.ndarray, attrs: dict) -> None:
    """One sample group into the open h5py file `h5`; the arrays as they are (float16), contiguous."""
    group = h5.create_group(name)
    group.create_dataset(CBED, data=cbed)
    group.create_dataset(POTENTIAL, data=potential)
    for key, value in attrs.items():
        group.attrs[key] = value


def _attr_problems(attrs) -> list[str]:
    problems = []
    for name, (kind, _) in REQUIRED_ATTRS.items():
        if name not in attrs:
            problems.append(f"attribute {name} is missing")
            continue
        value = np.asarray(attrs[name])
        base, _, shape = kind.partition(" ")
        numeric = np.issubdtype(value.dtype, np.integer) if base == "int" else np.issubdtype(value.dtype, np.number)
        if not numeric or (shape and str(value.shape) != shape) or (not shape and value.shape != ()):
            problems.append(f"attribute {name} is {value.dtype} {value.shape}, expected {kind}")
        elif not np.isfinite(value).all():
            problems.append(f"attribute {name} is not finite")
    return problems


def _dataset(group, name: str, problems: list):
    node = group.get(name)
    if node is None or not hasattr(node, "shape"):
        problems.append(f"no dataset {name!r}")
        return None
    if node.dtype != DTYPE:
        problems.append(f"{name} is {node.dtype}, expected float16")
        return None
    return node


def _not_finite(name: str, values: np.ndarray) -> str | None:
    bad = int(np.count_nonzero(~np.isfinite(values)))
    return f"{name} has {bad} NaN or infinite values" if bad else None


def sample_problems(group, shapes: dict | None = None, pixels: bool = True) -> tuple[list[str], dict]:
    """(reasons, found) of one sample group: its attributes, the datasets' dtype and shape, the stack's
    length against probe_grid², the set's shapes (`shapes`: {"cbed": (N², S, S), "potential": (1, T, T)}
    or None), and with `pixels` every value finite. `found` holds what was read: the shapes, and the
    potential (float16) when it is good."""
    problems = _attr_problems(group.attrs)
    found: dict = {}
    cbed = _dataset(group, CBED, problems)
    if cbed is not None:
        found[CBED] = tuple(cbed.shape)
        if cbed.ndim != 3 or cbed.shape[1] != cbed.shape[2] or cbed.shape[1] < 2:
            problems.append(f"cbed shape {tuple(cbed.shape)} is not (N², S, S)")
        elif "probe_grid" in group.attrs and cbed.shape[0] != int(np.asarray(group.attrs["probe_grid"])) ** 2:
            n = int(np.asarray(group.attrs["probe_grid"]))
            problems.append(f"cbed holds {cbed.shape[0]} patterns, its probe_grid {n} needs {n * n}")
        elif shapes and found[CBED] != tuple(shapes[CBED]):
            problems.append(f"cbed shape {found[CBED]} differs from the set's {tuple(shapes[CBED])}")
        elif pixels:
            for k in range(cbed.shape[0]):  # one pattern at a time: memory stays at one pattern
                reason = _not_finite(f"cbed pattern {k}", cbed[k])
                if reason:
                    problems.append(reason)
                    break
    potential = _dataset(group, POTENTIAL, problems)
    if potential is not None:
        found[POTENTIAL] = tuple(potential.shape)
        if potential.ndim != 3 or potential.shape[0] != 1 or potential.shape[1] != potential.shape[2]:
            problems.append(f"potential shape {tuple(potential.shape)} is not (1, T, T)")
        elif shapes and found[POTENTIAL] != tuple(shapes[POTENTIAL]):
            problems.append(f"potential shape {found[POTENTIAL]} differs from the set's {tuple(shapes[POTENTIAL])}")
        else:
            values = potential[()]
            reason = _not_finite("potential", values)
            if reason:
                problems.append(reason)
            else:
                found["values"] = values
    return problems, found
