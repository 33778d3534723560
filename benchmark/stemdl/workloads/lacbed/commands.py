"""`stemdl lacbed`: large-angle CBED (LACBED) of a crystal, by Bloch waves or by multislice, and sets of
(potential, pattern) pairs of cubic materials for training a surrogate (`generate`, `lacbed.synth`).

    stemdl lacbed simulate --structure MgO.cif --thickness 1000 --size 128 --out mgo.npy
    stemdl lacbed simulate --structure MgO.cif --thickness 500,1000,2000 --size 128 --out stack.npy \\
        --potential-out mgo_v.npy                             # (3, 128, 128) and the (128, 128) input image
    stemdl lacbed simulate ... --method multislice --slice 0.5 --k-max 5 --out ms.npy
    stemdl lacbed generate data/lacbed/small --samples 300 --size 32     # HDF5 pairs, 85:10:5 by material

OUT is the 000 (transmitted) beam's intensity, float32 (S, S) (or (T, S, S) for T thicknesses), fractions
of the incident beam, over a square of incident directions about the zone axis (default [001]): pixel
(r, c) is the tilt ((c − S/2)·d, (r − S/2)·d) mrad, d = 2W/S, with the half-width W = 1e3·λ·2/a mrad
(`bloch.K_RANGE` / a, a = |a| the lattice parameter): the range shrinks as the lattice grows, so the
{200} Bragg lines of a cubic crystal along [001] cross at 1/4 and 3/4 of the width and the {400} lines at
its edges, whatever a (the rule of Thorn et al., MMC 2021: features at fixed places in reciprocal space).
`--potential-out` writes the network input of that work: the projected potential of one unit cell along
the zone, float32 (S, S) in V·Å, rows along y (`stemdl simulate potential`'s image).

`bloch` (default): `stemdl.physics.bloch.lacbed`, `--beams` beams (completed to a whole shell; the count
used is printed), one eigen-decomposition per incident direction serving every thickness, one pixel per
orbit of the pattern's exact symmetry. `multislice`: the engine with tilted plane waves, `--slice` Å
slices of the projected potential, bandwidth to `--k-max` 1/Å; thicknesses rounded to whole slices
(printed). The two agree to ZNCC >= 0.99 at the defaults (docs/physics.md, tests). Every check runs before
the simulation; OUT appears whole or not at all, an existing one kept unless --force.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from stemdl.harness.errors import StemdlError
from stemdl.physics.commands import (_check_out, _check_size, _physics, _positive, crystal_inputs, parse_thicknesses,
                                     save)

METHODS = ("bloch", "multislice")


class _Bar:
    """A `Progress` on stderr made on the first report (the engine knows the total, the command does not)."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar, self.started = quiet, None, time.perf_counter()

    def to(self, what: str):
        def report(done: int, total: int) -> None:
            from stemdl.harness.progress import Progress

            if self.bar is None:
                self.bar = Progress(total, what=what, label="lacbed simulate", quiet=self.quiet)
                self.bar.start = self.started  # rates and the eta count from the simulation's start
            self.bar.update(done - self.bar.done)
        return report

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


def run_simulate(args: argparse.Namespace) -> int:
    import torch

    from stemdl.physics import bloch, simulate

    out = Path(args.out)
    _check_out(out, args.force)
    potential_out = Path(args.potential_out) if args.potential_out else None
    if potential_out is not None:
        _check_out(potential_out, args.force)
        if potential_out.resolve() == out.resolve():
            raise StemdlError(f"--potential-out {potential_out}: the same file as --out")
    _check_size(args.size, even=True)
    for value, option, what in ((args.energy, "--energy", "number of keV"), (args.slice, "--slice", "number of Å"),
                                (args.k_max, "--k-max", "number of 1/Å")):
        _positive(value, option, what)
    if args.tilt_range is not None:
        _positive(args.tilt_range, "--tilt-range", "number of mrad")
    if args.debye_waller < 0:
        raise StemdlError(f"--debye-waller {args.debye_waller:g}: must be 0 or more (Å²)")
    if args.beams < 2:
        raise StemdlError(f"--beams {args.beams}: must be at least 2")
    thicknesses, zone, device, structure = crystal_inputs(args)

    start = time.perf_counter()
    bar = _Bar(quiet=args.quiet)
    half = args.tilt_range or _physics(bloch.tilt_half_width_mrad, structure, args.energy)
    print(f"tilts: {args.size}x{args.size} incident directions over ±{half:.3f} mrad about "
          f"[{' '.join(map(str, zone))}], {args.energy:g} keV", flush=True)
    if args.method == "bloch":
        beamset = _physics(bloch.select_beams, structure, args.beams, zone, args.energy, half,
                           debye_waller=args.debye_waller)
        print(f"beams: {beamset.describe()}", flush=True)
        patterns = _physics(bloch.lacbed, structure, thicknesses, args.size, args.energy, tilt_range_mrad=half,
                            zone=zone, device=device, beamset=beamset, debye_waller=args.debye_waller,
                            progress=bar.to("distinct directions"))
        reached = thicknesses
    else:
        result = _physics(bloch.lacbed_multislice, structure, thicknesses, args.size, args.energy,
                          tilt_range_mrad=half, zone=zone, slice_A=args.slice, k_max=args.k_max, device=device,
                          debye_waller=args.debye_waller, progress=bar.to("directions"))
        g = result.grid
        print(f"multislice: {g.gpts[0]}x{g.gpts[1]} grid, slices of {result.dz_A:.4f} Å", flush=True)
        patterns, reached = result.patterns, result.thicknesses_A
    bar.close()
    for asked, got in zip(thicknesses, reached):
        print(f"thickness {asked:g} Å asked, {got:.2f} Å simulated", flush=True)
    patterns = patterns.cpu().numpy()
    array = patterns[0] if len(thicknesses) == 1 else patterns
    image = None
    if potential_out is not None:
        image, _ = _physics(simulate.potential_image, structure, zone, args.size, device=device)
    save(out, array, args.force)
    if image is not None:
        save(potential_out, image, args.force)
        print(f"wrote {potential_out}: float32 {image.shape} projected potential in V·Å", flush=True)
    mean = ", ".join(f"{float(p.mean()):.4f}" for p in patterns)
    print(f"wrote {out}: float32 {array.shape}, mean 000 intensity {mean}; {args.method}, "
          f"{time.perf_counter() - start:.1f} s on {device.type} ({torch.get_num_threads()} threads)", flush=True)
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from stemdl.harness.sampleset import run_writer
    from stemdl.workloads.lacbed.synth import LacbedSettings, generate

    settings = LacbedSettings(samples=args.samples, size=args.size, beams=args.beams, energy_keV=args.energy,
                              samples_per_file=args.samples_per_file, seed=args.seed, source=args.source,
                              thicknesses_A=tuple(parse_thicknesses(args.thickness)))
    settings.check()
    return run_writer(args.out, args.workers, lambda n: generate(args.out, settings, workers=n, quiet=args.quiet))


def configure(parser: argparse.ArgumentParser) -> None:
    from stemdl.physics.bloch import BEAMS, MS_K_MAX, MS_SLICE_A

    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    p = sub.add_parser("simulate", help="the 000 LACBED pattern of a crystal (Bloch waves or multislice)",
                       description="The 000 LACBED pattern: float32 (S, S), or (T, S, S) for T thicknesses.")
    p.add_argument("--structure", required=True, metavar="FILE.cif", help="the crystal (first structure read)")
    p.add_argument("--thickness", required=True, metavar="A[,A...]", help="in Å; a comma list gives (T, S, S)")
    p.add_argument("--size", required=True, type=int, metavar="S", help="pixels a side (even)")
    p.add_argument("--out", required=True, metavar="OUT.npy", help="float32 pattern(s), written atomically")
    p.add_argument("--potential-out", metavar="V.npy", help="also the projected potential of one cell, (S, S) V·Å")
    p.add_argument("--method", choices=METHODS, default="bloch", help="default: %(default)s")
    p.add_argument("--beams", type=int, default=BEAMS, metavar="N",
                   help="Bloch waves: beams requested (completed to a whole shell) (default: %(default)s)")
    p.add_argument("--zone", default="0,0,1", metavar="U,V,W", help="the zone axis (default: %(default)s)")
    p.add_argument("--energy", type=float, default=200.0, metavar="KEV", help="default: %(default)g keV")
    p.add_argument("--tilt-range", type=float, metavar="MRAD",
                   help="half-width of the tilt square (default: 1e3·λ·2/a, see above)")
    p.add_argument("--slice", type=float, default=MS_SLICE_A, metavar="A", help="multislice: slice thickness (default: "
                                                                          "%(default)g Å)")
    p.add_argument("--k-max", type=float, default=MS_K_MAX, metavar="INV_A",
                   help="multislice: bandwidth in 1/Å (default: %(default)g)")
    p.add_argument("--debye-waller", type=float, default=0.0, metavar="B", help="B in Å² (default: 0, static)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default: %(default)s")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(_run=run_simulate)

    g = sub.add_parser("generate", help="(potential, LACBED) pairs of distinct cubic materials as HDF5, split by material",
                       description="(potential, LACBED) pairs of cubic materials along [001] (lacbed.synth).")
    g.add_argument("out", help="output folder (created; an unfinished set there is finished)")
    g.add_argument("--samples", type=int, default=300, help="distinct materials, one sample each (default: %(default)s)")
    g.add_argument("--size", type=int, default=32, metavar="S", help="pixels a side (default: %(default)s)")
    g.add_argument("--thickness", default="500,1000,1500,2000", metavar="A[,A...]",
                   help="thicknesses of every pattern, Å (default: %(default)s)")
    g.add_argument("--beams", type=int, default=200, metavar="N", help="Bloch beams requested (default: %(default)s)")
    g.add_argument("--energy", type=float, default=200.0, metavar="KEV", help="default: %(default)g keV")
    g.add_argument("--samples-per-file", type=int, default=64, help="default: %(default)s")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--source", choices=("types", "generator", "both"), default="types",
                   help="materials: cubic structure types (880), random crystals of the 36 cubic space groups, "
                        "or both (default: %(default)s)")
    g.add_argument("--workers", type=int, help="processes per rank (default: the rank's share of the cores)")
    g.add_argument("--quiet", action="store_true", help="no progress on stderr")
    g.set_defaults(_run=run_generate)


def run(args: argparse.Namespace) -> int:
    return args._run(args)
