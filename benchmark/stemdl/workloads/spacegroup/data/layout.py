"""The on-disk layout of the public STEMDL data set, in both directions.

The SMC 2019/2020 data challenge set (DOI 10.13139/OLCF/1510313) keeps `batch_{train|dev|test}_N.h5` files
in `train/`, `dev/`, `test/` folders; one HDF5 group `sample_I_J` per sample holding the dataset
`cbed_stack` (float32, 3 x 512 x 512, contiguous) and the attributes in `REQUIRED_ATTRS`, typed exactly as
h5py returns them from the real files (space_group and material are numpy bytes, formula is str, ...).

The synthetic generator writes the same layout plus the attributes in `OPTIONAL_ATTRS` (the verified
crystal structure, the diffraction class, the thickness, and for multislice patterns how they were
simulated), which a reader of the real data never needs.
This module is the only place that knows the names and types; `encode_attrs` and `decode_attrs` are
inverse to each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from stemdl.harness.errors import DataError

SPLITS = ("train", "dev", "test")
# ASCII digits only (a str \d also matches '١٢'), and \Z, since '$' would also accept a trailing newline.
FILE_RE = re.compile(r"^batch_(train|dev|test)_(\d+)\.h5\Z", re.ASCII)
GROUP_RE = re.compile(r"^sample_(\d+)_(\d+)\Z", re.ASCII)
DATASET = "cbed_stack"
N_PATTERNS = 3
IMAGE_SIZE = 512
N_SPACE_GROUPS = 230
CRYSTAL_SYSTEMS = ("triclinic", "monoclinic", "orthorhombic", "tetragonal", "trigonal", "hexagonal", "cubic")
SYSTEM_LAST_GROUP = (2, 15, 74, 142, 167, 194, 230)  # the last space group of each crystal system (ITA vol. A)


def class_index(space_groups) -> np.ndarray:
    """Space groups 1..230 (as stored) -> class indices 0..229 (what labels, models and metrics use):
    the one place the two numberings meet."""
    return np.asarray(space_groups, dtype=np.int64) - 1


def class_counts(classes) -> np.ndarray:
    """Samples per class index, (230,) int64, from class indices 0..229."""
    classes = np.asarray(classes, dtype=np.int64)
    if classes.size and (classes.min() < 0 or classes.max() >= N_SPACE_GROUPS):
        raise ValueError(f"class indices must lie in 0..{N_SPACE_GROUPS - 1}")
    return np.bincount(classes, minlength=N_SPACE_GROUPS)


@dataclass(frozen=True)
class AttrSpec:
    """One group attribute: `kind` is how h5py returns it, `shape` its array shape (None: any length)."""

    name: str
    kind: str  # "bytes" | "str" | "int" | "int_array" | "float_array"
    shape: tuple | None = ()
    meaning: str = ""


REQUIRED_ATTRS = (
    AttrSpec("space_group", "bytes", (), "the label, 1..230, as numpy bytes e.g. b'196'"),
    AttrSpec("material", "bytes", (), "Materials Project id (synthetic: 'syn-...')"),
    AttrSpec("energy_keV", "int", (), "beam energy in keV"),
    AttrSpec("z_dirs", "int_array", (1, 3, 3), "zone axis [uvw] of each of the 3 patterns"),
    AttrSpec("y_dirs", "float_array", (1, 3, 3), "transverse (image 'up') direction of each pattern"),
    AttrSpec("semi_angles_rad", "float_array", (3,), "convergence semi-angle per pattern"),
    AttrSpec("d_hkls_angstrom", "float_array", (3,), "d-spacing used per pattern"),
    AttrSpec("abc_angstrom", "float_array", (3,), "lattice constants a, b, c"),
    AttrSpec("angles_degree", "float_array", (3,), "lattice angles alpha, beta, gamma"),
    AttrSpec("formula", "str", (), "chemical formula, e.g. 'Fe8 O14 F2'"),
)

OPTIONAL_ATTRS = (
    AttrSpec("kinematic_class", "int", (), "diffraction class id (Laue group + reflection conditions)"),
    AttrSpec("structure_lattice", "float_array", (3, 3), "verified cell, rows a, b, c in angstrom"),
    AttrSpec("structure_frac_coords", "float_array", None, "fractional positions, (N, 3)"),
    AttrSpec("structure_numbers", "int_array", None, "atomic numbers, (N,)"),
    AttrSpec("thickness_nm", "float_array", (3,), "specimen thickness per pattern"),
    AttrSpec("physics", "str", (), "how the patterns were simulated: 'multislice' (absent: kinematic)"),
    AttrSpec("scan", "int", (), "multislice: the probe averaged over scan x scan positions of one cell"),
    AttrSpec("slice_angstrom", "float_array", (3,), "multislice: slice thickness per pattern"),
    AttrSpec("grid_gpts", "int_array", (3, 2), "multislice: simulation grid points (Nx, Ny) per pattern"),
    AttrSpec("grid_extent_angstrom", "float_array", (3, 2), "multislice: simulated specimen (Lx, Ly) per pattern"),
    AttrSpec("cell_strain", "float_array", (3,), "multislice: strain that made the cell orthogonal, per pattern"),
)

ATTRS = {spec.name: spec for spec in REQUIRED_ATTRS + OPTIONAL_ATTRS}


@dataclass(frozen=True, eq=False)
class Structure:
    """A crystal structure as stored with a synthetic sample, enough to re-run spglib on it."""

    lattice: np.ndarray  # (3, 3) float, rows are a, b, c in angstrom
    frac_coords: np.ndarray  # (N, 3) float
    numbers: np.ndarray  # (N,) int, atomic numbers

    def spglib_cell(self):
        return (self.lattice, self.frac_coords, self.numbers)


@dataclass(frozen=True, eq=False)
class Simulation:
    """How the patterns of a sample were simulated, where not kinematically: one entry per pattern."""

    physics: str  # "multislice"
    scan: int  # the probe averaged over scan x scan positions spanning one orthogonal cell
    slice_angstrom: np.ndarray  # (3,) slice thickness in angstrom
    grid_gpts: np.ndarray  # (3, 2) int, grid points (Nx, Ny) of the simulated specimen
    grid_extent_angstrom: np.ndarray  # (3, 2) its lateral extent (Lx, Ly) in angstrom
    cell_strain: np.ndarray  # (3,) strain applied to make the cell orthogonal (0: exact)


@dataclass(frozen=True, eq=False)
class SampleRecord:
    """Everything stored about one sample except its image stack."""

    space_group: int
    material: str
    formula: str
    energy_keV: int
    z_dirs: np.ndarray  # (3, 3) int, one zone axis per row
    y_dirs: np.ndarray  # (3, 3) float
    semi_angles_rad: np.ndarray  # (3,)
    d_hkls_angstrom: np.ndarray  # (3,)
    abc_angstrom: np.ndarray  # (3,)
    angles_degree: np.ndarray  # (3,)
    kinematic_class: int | None = None
    structure: Structure | None = None
    thickness_nm: np.ndarray | None = None
    simulation: Simulation | None = None  # None: kinematic


def split_of(filename: str) -> str | None:
    """'train', 'dev' or 'test' for a file named like the public set, else None."""
    m = FILE_RE.match(filename)
    return m.group(1) if m else None


def encode_attrs(rec: SampleRecord) -> dict:
    """The group attributes for `rec`, with the exact types of the public files."""
    attrs = {
        "space_group": np.bytes_(str(int(rec.space_group)).encode()),
        "material": np.bytes_(rec.material.encode()),
        "energy_keV": np.int64(rec.energy_keV),
        "z_dirs": np.asarray(rec.z_dirs, dtype=np.int64).reshape(1, 3, 3),
        "y_dirs": np.asarray(rec.y_dirs, dtype=np.float64).reshape(1, 3, 3),
        "semi_angles_rad": np.asarray(rec.semi_angles_rad, dtype=np.float64).reshape(3),
        "d_hkls_angstrom": np.asarray(rec.d_hkls_angstrom, dtype=np.float64).reshape(3),
        "abc_angstrom": np.asarray(rec.abc_angstrom, dtype=np.float64).reshape(3),
        "angles_degree": np.asarray(rec.angles_degree, dtype=np.float64).reshape(3),
        "formula": str(rec.formula),
    }
    if rec.kinematic_class is not None:
        attrs["kinematic_class"] = np.int64(rec.kinematic_class)
    if rec.structure is not None:
        attrs["structure_lattice"] = np.asarray(rec.structure.lattice, dtype=np.float64).reshape(3, 3)
        attrs["structure_frac_coords"] = np.asarray(rec.structure.frac_coords, dtype=np.float64).reshape(-1, 3)
        attrs["structure_numbers"] = np.asarray(rec.structure.numbers, dtype=np.int64).reshape(-1)
    if rec.thickness_nm is not None:
        attrs["thickness_nm"] = np.asarray(rec.thickness_nm, dtype=np.float64).reshape(3)
    if rec.simulation is not None:
        attrs.update(_simulation_attrs(rec.simulation))
    return attrs


def _simulation_attrs(sim: Simulation) -> dict:
    return {"physics": str(sim.physics), "scan": np.int64(sim.scan),
            "slice_angstrom": np.asarray(sim.slice_angstrom, dtype=np.float64).reshape(3),
            "grid_gpts": np.asarray(sim.grid_gpts, dtype=np.int64).reshape(3, 2),
            "grid_extent_angstrom": np.asarray(sim.grid_extent_angstrom, dtype=np.float64).reshape(3, 2),
            "cell_strain": np.asarray(sim.cell_strain, dtype=np.float64).reshape(3)}


def parse_label(raw) -> int:
    """The space-group number from the stored attribute (bytes, str or int); ValueError if not 1..230."""
    if isinstance(raw, np.ndarray) and raw.shape == ():
        raw = raw[()]
    if isinstance(raw, (bytes, np.bytes_)):
        raw = raw.decode("ascii", errors="replace")
    if isinstance(raw, (str, np.str_)):
        text = str(raw).strip()
        if not text.isdigit():
            raise ValueError(f"space_group {text!r} is not a number")
        value = int(text)
    elif isinstance(raw, (int, np.integer)):
        value = int(raw)
    else:
        raise ValueError(f"space_group has type {type(raw).__name__}, expected bytes")
    if not 1 <= value <= N_SPACE_GROUPS:
        raise ValueError(f"space_group {value} is outside 1..{N_SPACE_GROUPS}")
    return value


def _text(raw, name: str) -> str:
    if isinstance(raw, np.ndarray) and raw.shape == ():
        raw = raw[()]
    if isinstance(raw, (bytes, np.bytes_)):
        return raw.decode("utf-8", errors="replace")
    if isinstance(raw, (str, np.str_)):
        return str(raw)
    raise ValueError(f"attribute {name} has type {type(raw).__name__}, expected text")


def _array(raw, spec: AttrSpec) -> np.ndarray:
    arr = np.asarray(raw)
    if arr.dtype.kind not in "iuf" or (spec.kind == "int_array" and arr.dtype.kind == "f"):
        raise ValueError(f"attribute {spec.name} has dtype {arr.dtype}, expected {spec.kind.split('_')[0]}")
    if spec.shape is not None and arr.shape != spec.shape:
        raise ValueError(f"attribute {spec.name} has shape {arr.shape}, expected {spec.shape}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError(f"attribute {spec.name} is not finite")
    return arr


def _int(raw, name: str) -> int:
    arr = np.asarray(raw)
    if arr.shape not in ((), (1,)) or arr.dtype.kind not in "iu":
        raise ValueError(f"attribute {name} is {arr.dtype} {arr.shape}, expected an integer")
    return int(arr.reshape(-1)[0])


def _collect(problems: list, fn, *args):
    """fn(*args), or None with its ValueError noted: one bad attribute must not hide the others."""
    try:
        return fn(*args)
    except ValueError as exc:
        problems.append(str(exc))
        return None


def _structure(attrs, arrays) -> Structure | None:
    if "structure_lattice" not in attrs:
        return None
    lattice, frac, numbers = (arrays.get(k) for k in ("structure_lattice", "structure_frac_coords",
                                                      "structure_numbers"))
    if lattice is None or frac is None or numbers is None or frac.ndim != 2 or frac.shape[1] != 3 \
            or numbers.shape != (frac.shape[0],):
        raise ValueError("stored structure is incomplete or inconsistent")
    return Structure(lattice, frac, numbers)


SIMULATION_ARRAYS = ("slice_angstrom", "grid_gpts", "grid_extent_angstrom", "cell_strain")


def _simulation(attrs, arrays) -> Simulation | None:
    if "physics" not in attrs:
        return None
    physics = _text(attrs["physics"], "physics")
    if "scan" not in attrs or any(arrays.get(k) is None for k in SIMULATION_ARRAYS):
        raise ValueError(f"stored {physics} simulation is incomplete")
    return Simulation(physics, _int(attrs["scan"], "scan"), *(arrays[k] for k in SIMULATION_ARRAYS))


def decode_attrs(attrs, path, group) -> SampleRecord:
    """A `SampleRecord` from a group's attributes (any mapping).

    Raises one `DataError` naming file:group and every problem found, joined with '; '.
    """
    problems: list[str] = []
    missing = [s.name for s in REQUIRED_ATTRS if s.name not in attrs]
    if missing:
        problems.append(f"missing attribute{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    arrays = {s.name: _collect(problems, _array, attrs[s.name], s) for s in REQUIRED_ATTRS + OPTIONAL_ATTRS
              if s.kind.endswith("_array") and s.name in attrs}
    present = {k: v for k, v in arrays.items() if v is not None}
    values = {
        "space_group": _collect(problems, parse_label, attrs["space_group"]) if "space_group" in attrs else None,
        "material": _collect(problems, _text, attrs["material"], "material") if "material" in attrs else None,
        "formula": _collect(problems, _text, attrs["formula"], "formula") if "formula" in attrs else None,
        "energy_keV": _collect(problems, _int, attrs["energy_keV"], "energy_keV") if "energy_keV" in attrs else None,
        "kinematic_class": _collect(problems, _int, attrs["kinematic_class"], "kinematic_class")
        if "kinematic_class" in attrs else None,
        "structure": _collect(problems, _structure, attrs, present),
        "simulation": _collect(problems, _simulation, attrs, present),
    }
    if problems:
        raise DataError(path, "; ".join(problems), group)
    return SampleRecord(
        z_dirs=arrays["z_dirs"].reshape(3, 3).astype(np.int64),
        y_dirs=arrays["y_dirs"].reshape(3, 3).astype(np.float64),
        semi_angles_rad=arrays["semi_angles_rad"].astype(np.float64),
        d_hkls_angstrom=arrays["d_hkls_angstrom"].astype(np.float64),
        abc_angstrom=arrays["abc_angstrom"].astype(np.float64),
        angles_degree=arrays["angles_degree"].astype(np.float64),
        thickness_nm=arrays.get("thickness_nm"),
        **values,
    )


def write_sample(h5, name: str, stack: np.ndarray, rec: SampleRecord) -> None:
    """Write one sample group into the open h5py file `h5`, contiguous and uncompressed like the real set."""
    stack = np.asarray(stack)
    if stack.dtype != np.float32 or stack.ndim != 3 or stack.shape[0] != N_PATTERNS:
        raise ValueError(f"{name}: cbed_stack must be float32 ({N_PATTERNS}, H, W), got {stack.dtype} {stack.shape}")
    group = h5.create_group(name)
    group.create_dataset(DATASET, data=stack)
    for key, value in encode_attrs(rec).items():
        group.attrs[key] = value
