"""`stemdl simulate`: dynamical CBED patterns and projected potentials of a crystal read from a CIF file.

    stemdl simulate cbed --structure Si.cif --zone 1,1,0 --energy 200 --semi-angle 2 --thickness 300 \\
        --max-angle 20 --size 128 --out si110.npy                        # float32 (128, 128)
    stemdl simulate cbed ... --thickness 100,200,400 --scan 8 --out stack.npy   # float32 (3, 128, 128)
    stemdl simulate potential --structure Si.cif --zone 1,1,0 --size 256 --out v.npy   # V·Å

The engine is `stemdl.physics.simulate`; this module only reads, checks and writes. Pixel (i, j) of a
pattern is centred on the angle ((j − S/2)·2A/S, (i − S/2)·2A/S) mrad, A = --max-angle: x (columns)
along the projection of a on the plane normal to the zone, y (rows) = zone × x, the beam along +zone.
A zone with a negative first index is written --zone=-1,1,0 (argparse reads "-1,..." as an option).
Every check that can fail runs before the simulation, and OUT appears whole or not at all (an existing
OUT is kept unless --force), so an error leaves nothing behind.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from stemdl.harness import files
from stemdl.harness.errors import StemdlError
from stemdl.harness.progress import Progress

MIN_SIZE = 8  # pixels a side: fewer cannot show a disc beside the central one
DTYPES = ("complex64", "complex128")


# ---- parsing and checking the arguments -------------------------------------------------------------------

def parse_zone(text: str) -> tuple[int, ...]:
    """'1,1,0' or hexagonal '2,-1,-1,0' -> three coprime integers [uvw] (four-index [UVTW] converted)."""
    from stemdl.physics.supercell import three_index

    try:
        zone = [int(x) for x in text.replace(" ", "").split(",")]
    except ValueError:
        zone = []
    if len(zone) not in (3, 4):
        raise StemdlError(f"--zone {text!r}: expected three (or four hexagonal) comma-separated integers, "
                          "e.g. 1,1,0 or 2,-1,-1,0")
    try:
        return three_index(zone)
    except ValueError as exc:
        raise StemdlError(f"--zone {text!r}: {exc}") from None


def parse_thicknesses(text: str) -> list[float]:
    """'300' or '100,200,400' -> positive thicknesses in Å."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(t) and t > 0 for t in values):
        raise StemdlError(f"--thickness {text!r}: expected positive numbers of Å, comma-separated")
    return values


def _positive(value: float, option: str, what: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise StemdlError(f"{option} {value:g}: must be a positive {what}")


def _finite(value: float, option: str) -> None:
    if not math.isfinite(value):
        raise StemdlError(f"{option} {value:g}: must be a finite number")


def _check_size(size: int, even: bool) -> None:
    if size < MIN_SIZE:
        raise StemdlError(f"--size {size}: must be at least {MIN_SIZE} pixels")
    if even and size % 2:
        # even: the optical axis (S/2, S/2) is then a pixel centre and the pattern symmetric about it
        raise StemdlError(f"--size {size}: must be even (the optical axis sits on pixel (S/2, S/2))")


def _check_out(path: Path, force: bool) -> None:
    """Before any work: OUT is a .npy name, not a folder, and not an existing file unless --force."""
    if path.suffix != ".npy":
        raise StemdlError(f"--out {path}: must end in .npy")
    if path.is_dir():
        raise StemdlError(f"--out {path}: is a folder")
    if path.parent.exists() and not path.parent.is_dir():
        raise StemdlError(f"--out {path}: {path.parent} is not a folder")
    if path.exists() and not force:
        raise StemdlError(f"--out {path}: exists (use --force to replace it)")


def _device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise StemdlError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(name)


def _structure(path: str):
    from stemdl.physics.supercell import load_structure

    try:
        return load_structure(path)
    except (OSError, ValueError) as exc:  # both name the file already
        raise StemdlError(str(exc).splitlines()[0]) from None


def crystal_inputs(args: argparse.Namespace) -> tuple[list[float], tuple[int, ...], object, object]:
    """(thicknesses, zone, device, structure) from --thickness, --zone, --device and --structure, each
    checked (the structure file read last: the cheap checks fail first)."""
    return parse_thicknesses(args.thickness), parse_zone(args.zone), _device(args.device), _structure(args.structure)


def _physics(call, *args, **kwargs):
    """A planning call whose ValueError is the user's doing (no orthogonal cell, partial occupancy)."""
    try:
        return call(*args, **kwargs)
    except ValueError as exc:
        raise StemdlError(str(exc).splitlines()[0]) from None


# ---- writing ----------------------------------------------------------------------------------------------

def save(path: Path, array: np.ndarray, force: bool) -> None:
    """`array` as OUT.npy under a temporary name, then renamed; never replaces a file without --force,
    even one that appeared while the simulation ran."""
    files.check_folder(path.parent, "--out folder")
    try:
        with files.atomic_path(path, replace=force) as tmp:
            with open(tmp, "wb") as fh:  # a file object: np.save would append .npy to the temporary name
                np.save(fh, array)
    except FileExistsError:
        raise StemdlError(f"--out {path}: exists (use --force to replace it)") from None


# ---- the subcommands --------------------------------------------------------------------------------------

def _describe_thickness(plan, asked: float) -> str:
    n = plan.repeats(asked)
    lz = plan.cell.extent[2]
    return f"thickness {asked:g} Å asked: {n} x {lz:.3f} Å = {n * lz:.1f} Å simulated (whole cell repeats)"


def run_cbed(args: argparse.Namespace) -> int:
    import torch

    from stemdl.physics import simulate

    out = Path(args.out)
    _check_out(out, args.force)
    _check_size(args.size, even=True)
    for value, option, what in ((args.energy, "--energy", "number of keV"),
                                (args.semi_angle, "--semi-angle", "number of mrad"),
                                (args.max_angle, "--max-angle", "number of mrad"),
                                (args.slice, "--slice", "number of Å"), (args.sampling, "--sampling", "number of Å"),
                                (args.max_strain, "--max-strain", "fraction")):
        _positive(value, option, what)
    _finite(args.defocus, "--defocus")
    _finite(args.cs, "--cs")
    if args.scan is not None and args.scan < 1:
        raise StemdlError(f"--scan {args.scan}: must be at least 1")
    thicknesses, zone, device, structure = crystal_inputs(args)

    start = time.perf_counter()
    plan = _physics(simulate.plan_cbed, structure, zone, energy_keV=args.energy, max_angle_mrad=args.max_angle,
                    size=args.size, slice_A=args.slice, sampling_A=args.sampling, max_strain=args.max_strain)
    if args.semi_angle > plan.grid.max_angle_mrad:
        raise StemdlError(f"--semi-angle {args.semi_angle:g} mrad: beyond the grid's bandwidth limit "
                          f"{plan.grid.max_angle_mrad:.1f} mrad (raise --max-angle)")
    print(f"plan: {plan.describe()}", flush=True)
    for t in thicknesses:
        print(_describe_thickness(plan, t), flush=True)
    positions = len(simulate.probe_positions(plan, args.scan))
    print(f"simulating {positions} probe position(s) on {device.type} in {args.dtype} ...", flush=True)
    with Progress(total=positions, what="probes", label="simulate", quiet=positions == 1) as bar:
        patterns, _ = simulate.cbed(structure, zone, energy_keV=args.energy, semi_angle_mrad=args.semi_angle,
                                    thicknesses_A=thicknesses, max_angle_mrad=args.max_angle, size=args.size,
                                    scan=args.scan, defocus_A=args.defocus, cs_mm=args.cs, device=device,
                                    dtype=getattr(torch, args.dtype), plan=plan, progress=bar.update)
    array = patterns[0] if len(thicknesses) == 1 else patterns
    save(out, array, args.force)
    inside = ", ".join(f"{float(p.sum()):.4f}" for p in patterns)
    print(f"wrote {out}: float32 {array.shape}, fraction of the beam on the detector {inside}; "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    return 0


def run_potential(args: argparse.Namespace) -> int:
    from stemdl.physics import simulate

    out = Path(args.out)
    _check_out(out, args.force)
    _check_size(args.size, even=False)
    _positive(args.max_strain, "--max-strain", "fraction")
    zone = parse_zone(args.zone)
    device = _device(args.device)
    structure = _structure(args.structure)

    start = time.perf_counter()
    image, cell = _physics(simulate.potential_image, structure, zone, args.size, device=device,
                           max_strain=args.max_strain)
    print(f"cell: {cell.describe()}", flush=True)
    save(out, image, args.force)
    lx, ly = cell.extent[0] / args.size, cell.extent[1] / args.size
    print(f"wrote {out}: float32 {image.shape} in V·Å (pixels {lx:.4f} x {ly:.4f} Å, x along columns), "
          f"{float(image.min()):.1f} to {float(image.max()):.1f} V·Å; {time.perf_counter() - start:.1f} s",
          flush=True)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--structure", required=True, metavar="FILE.cif", help="the crystal (first structure read)")
    p.add_argument("--zone", required=True, metavar="U,V,W",
                   help="zone axis [uvw] or hexagonal [UVTW], the beam direction (--zone=-1,1,0 if negative)")
    p.add_argument("--size", required=True, type=int, metavar="S", help="output pixels a side")
    p.add_argument("--out", required=True, metavar="OUT.npy", help="float32 array written here (atomically)")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: %(default)s")
    p.add_argument("--max-strain", type=float, default=1e-3, metavar="X",
                   help="largest strain allowed to make the cell orthogonal (default: %(default)g)")


def configure(parser: argparse.ArgumentParser) -> None:
    from stemdl.physics.simulate import SAMPLING_A, SLICE_A

    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    cbed = sub.add_parser("cbed", help="a dynamical (multislice) CBED pattern, fractions of the incident beam",
                          description="A dynamical CBED pattern: float32 (S, S), or (T, S, S) for T thicknesses.")
    _common(cbed)
    cbed.add_argument("--energy", required=True, type=float, metavar="KEV", help="beam energy in keV")
    cbed.add_argument("--semi-angle", required=True, type=float, metavar="MRAD", help="convergence semi-angle")
    cbed.add_argument("--thickness", required=True, metavar="A[,A...]",
                      help="in Å, rounded to whole cell repeats; a comma list gives a (T, S, S) stack")
    cbed.add_argument("--max-angle", required=True, type=float, metavar="MRAD",
                      help="the detector's half-width A: pixels are 2A/S mrad")
    cbed.add_argument("--scan", type=int, metavar="N", help="average N x N probe positions over one cell")
    cbed.add_argument("--defocus", type=float, default=0.0, metavar="A", help="Å, positive is underfocus")
    cbed.add_argument("--cs", type=float, default=0.0, metavar="MM", help="spherical aberration in mm")
    cbed.add_argument("--slice", type=float, default=SLICE_A, metavar="A",
                      help="slice thickness in Å (default: %(default)g)")
    cbed.add_argument("--sampling", type=float, default=SAMPLING_A, metavar="A",
                      help="largest real-space pixel in Å: the potential's cores resolved (default: %(default)g)")
    cbed.add_argument("--dtype", choices=DTYPES, default="complex64", help="default: %(default)s")
    cbed.set_defaults(_run=run_cbed)
    potential = sub.add_parser("potential", help="the projected potential of one orthogonal cell, in V·Å",
                               description="The projected potential of one orthogonal cell: float32 (S, S), V·Å.")
    _common(potential)
    potential.set_defaults(_run=run_potential)


def run(args: argparse.Namespace) -> int:
    return args._run(args)
