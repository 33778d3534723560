"""`stemdl bench physics`: the multislice engine's speed against the FFTs it cannot avoid, its memory, and
what a dynamical synthetic sample costs against a kinematic one. Prints figures, never a verdict.

    stemdl bench physics                                  # 512x512, 200 kV, 20 nm, single probe and 8x8 scan
    stemdl bench physics --device cuda --json physics.json
    stemdl bench physics --size 128 --thickness 5 --scan 2 --rounds 1 --samples 0   # a quick look

Per crystal (Si [110], and a generated P2_1/c crystal along its first zone axis) and probe (one, and the
average over a scan x scan grid of one cell): patterns/s of `simulate.cbed`, the potential included, and
the time of the FFTs the propagation needs (fft2 + ifft2 per slice per probe, same grid, same batches),
timed in alternating rounds, their ratio being the fraction of that limit reached. Peak memory of one
pattern in a fresh process (CPU: VmHWM over VmRSS before it; CUDA: max_memory_allocated). Then seconds
per sample of a synth preset (`--preset`, the default one unless told), kinematic and multislice, as
`stemdl synth` makes them (one torch thread per worker on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from functools import lru_cache

import numpy as np
import torch

from stemdl.harness.errors import StemdlError

ENERGY_KEV = 200.0
DETECTOR_MRAD = 50.0  # the synth's detector half-width
A_SI = 5.431  # Å
CHUNK = 16  # probes a batch: simulate.cbed's default on a GPU (1 on a CPU, `simulate.CHUNK`)


def silicon():
    """Diamond-cubic Si, the conventional cell (8 atoms), as lattice / frac_coords / numbers arrays."""
    from types import SimpleNamespace

    fcc = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    frac = np.concatenate([fcc, fcc + 0.25])
    return SimpleNamespace(lattice=np.eye(3) * A_SI, frac_coords=frac, numbers=np.full(8, 14))


@lru_cache(maxsize=1)
def cases() -> dict:
    """name -> (structure, zone axis): Si [110] and a generated low-symmetry (P2_1/c) crystal."""
    from stemdl.workloads.spacegroup.synth import crystals, zones  # the synth's own random crystals

    low = crystals.random_crystal(14, np.random.default_rng(0)).structure
    return {"Si [110]": (silicon(), (1, 1, 0)), "P2_1/c": (low, tuple(int(x) for x in zones.zone_axes(low, n=1)[0]))}


def plan_for(structure, zone, size: int):
    """The plan of a size x size detector out to DETECTOR_MRAD (the least strained cell, as the synth's)."""
    from stemdl.workloads.spacegroup.synth import cbed, dynamical

    alpha, _ = cbed.semi_angle(structure, zone, ENERGY_KEV)
    spec = cbed.PatternSpec(zone_axis=zone, energy_keV=ENERGY_KEV, semi_angle_rad=alpha, thickness_nm=1.0,
                            size=size, max_angle_rad=DETECTOR_MRAD * 1e-3)
    return dynamical.plan(structure, spec, DETECTOR_MRAD, 2.0 * DETECTOR_MRAD / size), 1e3 * alpha


def pattern_job(structure, zone, args, scan, device):
    """(run one pattern, run its FFTs, what it is): two callables and a dict of sizes."""
    from stemdl.physics import simulate

    plan, alpha = plan_for(structure, zone, args.size)
    thickness_A = 10.0 * args.thickness
    probes = len(simulate.probe_positions(plan, scan))
    slices = plan.repeats(thickness_A) * plan.n_slices

    def pattern():
        return simulate.cbed(structure, plan.cell.zone, energy_keV=ENERGY_KEV, semi_angle_mrad=alpha,
                             thicknesses_A=[thickness_A], max_angle_mrad=DETECTOR_MRAD, size=args.size,
                             scan=scan, device=device, chunk=args.chunk, plan=plan)

    def ffts():
        for start in range(0, probes, args.chunk):
            psi = torch.ones((min(args.chunk, probes - start), *plan.grid.gpts), dtype=torch.complex64,
                             device=device)
            for _ in range(slices):
                psi = torch.fft.ifft2(torch.fft.fft2(psi))

    info = {"gpts": list(plan.grid.gpts), "slices": slices, "probes": probes, "ffts": 2 * slices * probes,
            "thickness_A": plan.repeats(thickness_A) * plan.cell.extent[2], "cell_strain": plan.cell.strain}
    return pattern, ffts, info


def _timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def speed(pattern, ffts, rounds: int, device) -> dict:
    """Median seconds of the pattern and of its FFTs, alternating rounds (on CUDA after one untimed run of
    each, for cuFFT's plans and the allocator; on a CPU `warm_up` did what the first call costs)."""
    if torch.device(device).type == "cuda":
        pattern()
        ffts()
    t_pattern, t_fft = [], []
    for _ in range(rounds):
        t_pattern.append(_timed(pattern, device))
        t_fft.append(_timed(ffts, device))
    sim, fft = statistics.median(t_pattern), statistics.median(t_fft)
    return {"seconds": sim, "patterns_per_s": 1.0 / sim, "fft_seconds": fft, "fraction_of_fft_limit": fft / sim}


def warm_up(device) -> None:
    """What only the first pattern pays, untimed: imports, the scattering-factor table, FFT set-up."""
    from stemdl.physics import simulate

    simulate.cbed(silicon(), (0, 0, 1), energy_keV=ENERGY_KEV, semi_angle_mrad=2.0, thicknesses_A=[10.0],
                  max_angle_mrad=20.0, size=32, scan=2, device=device)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def child(text: str) -> None:
    """In a fresh process: one pattern, then {"peak_MB", "delta_MB"} on stdout (VmHWM, and its rise over
    VmRSS before the pattern, the high-water mark reset there where the kernel allows it)."""
    job = json.loads(text)
    torch.set_num_threads(job["threads"])
    structure, zone = cases()[job["case"]]
    args = argparse.Namespace(size=job["size"], thickness=job["thickness"], chunk=job.get("chunk", CHUNK))
    pattern, _, _ = pattern_job(structure, zone, args, job["scan"], "cpu")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
    except OSError:
        pass
    before = _status_kib("VmRSS")
    pattern()
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_MB": peak / 1024, "delta_MB": (peak - before) / 1024}))


def memory(case: str, args, scan, device) -> dict:
    """Peak memory of one pattern: CUDA's allocator peak in this process, or a fresh CPU process's."""
    if torch.device(device).type == "cuda":
        structure, zone = cases()[case]
        pattern, _, _ = pattern_job(structure, zone, args, scan, device)
        torch.cuda.reset_peak_memory_stats(device)
        pattern()
        return {"peak_MB": torch.cuda.max_memory_allocated(device) / 2**20, "how": "torch.cuda.max_memory_allocated"}
    job = json.dumps({"case": case, "size": args.size, "thickness": args.thickness, "scan": scan,
                      "chunk": args.chunk, "threads": torch.get_num_threads()})
    proc = subprocess.run([sys.executable, "-c", "import sys; from stemdl.physics.bench import child; "
                           "child(sys.argv[1])", job], capture_output=True, text=True, check=True)
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "how": "VmHWM of a fresh process"}


def sample_costs(args, device) -> dict:
    """Seconds per sample of a synth preset (`--preset`), kinematic then multislice, the same samples."""
    from stemdl.workloads.spacegroup.synth import generate

    kin = generate.preset_config(args.preset, physics="kinematic", scan=args.scan)
    labels = generate.split_labels(kin, "train")
    picks = [int(i) for i in np.linspace(0, len(labels) - 1, args.samples + 2)[1:-1].round()]
    out = {"preset": args.preset, "labels": [int(labels[i]) for i in picks], "image_size": kin.image_size,
           "scan": args.scan}
    generate.make_sample(kin, "train", picks[0], int(labels[picks[0]]))  # imports and caches: not timed
    for physics in ("kinematic", "multislice"):
        cfg = generate.preset_config(args.preset, physics=physics, scan=args.scan)
        seconds = [_timed(lambda i=i: generate.make_sample(cfg, "train", i, int(labels[i]), device), device)
                   for i in picks]
        out[f"{physics}_s_per_sample"] = sum(seconds) / len(seconds)
    out["ratio"] = out["multislice_s_per_sample"] / out["kinematic_s_per_sample"]
    return out


def _device(name: str) -> str:
    if torch.device(name).type == "cuda" and not torch.cuda.is_available():
        raise StemdlError(f"--device {name}: CUDA is not available on this machine")
    return name


def _print_pattern(name: str, probe: str, r: dict) -> None:
    print(f"  {name:<9} {probe:<12} {r['patterns_per_s']:9.4f} patterns/s ({r['seconds']:.3f} s; grid "
          f"{r['gpts'][0]}x{r['gpts'][1]}, {r['slices']} slices, {r['probes']} probes, {r['ffts']} FFTs in "
          f"{r['fft_seconds']:.3f} s: {r['fraction_of_fft_limit']:.2f} of the FFT limit); peak "
          f"{r['memory']['peak_MB']:.0f} MB" + (f" (+{r['memory']['delta_MB']:.0f} MB during it)"
                                              if "delta_MB" in r["memory"] else ""))


def measure(args, device) -> dict:
    """Every figure, printed as it comes; returned for --json."""
    results = {"patterns": {}}
    warm_up(device)
    for name, (structure, zone) in cases().items():
        for probe, scan in (("single", None), (f"{args.scan}x{args.scan} scan", args.scan)):
            pattern, ffts, info = pattern_job(structure, zone, args, scan, device)
            r = {**info, **speed(pattern, ffts, args.rounds, device), "memory": memory(name, args, scan, device),
                 "zone": list(zone)}
            results["patterns"][f"{name}, {probe}"] = r
            _print_pattern(name, probe, r)
    if args.samples > 0:
        s = results["sample"] = sample_costs(args, device)
        print(f"  {s['preset']}-preset sample ({s['image_size']}x{s['image_size']}, scan {s['scan']}, space groups "
              f"{s['labels']}): kinematic {s['kinematic_s_per_sample']:.3f} s, multislice "
              f"{s['multislice_s_per_sample']:.1f} s per sample: {s['ratio']:.0f}x")
    return results


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, alternating (default: %(default)s)")
    parser.add_argument("--size", type=int, default=512, help="detector pixels a side (default: %(default)s)")
    parser.add_argument("--thickness", type=float, default=20.0, help="crystal thickness in nm (default: %(default)s)")
    parser.add_argument("--scan", type=int, default=8, help="probe positions per cell edge (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=1,
                        help="samples of --preset timed each way (0: skip; default: %(default)s)")
    parser.add_argument("--preset", default="default", help="the synth preset of those samples (default: %(default)s)")
    parser.add_argument("--chunk", type=int, default=CHUNK,
                        help="probes propagated as one batch, in the engine and its FFT limit (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, the core count)")
    parser.add_argument("--json", metavar="OUT", help="also write every figure as JSON")


def run(args: argparse.Namespace) -> int:
    device = _device(args.device)
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    if min(args.rounds, args.scan, args.chunk) < 1 or args.size < 16 or args.thickness <= 0 or args.samples < 0:
        raise StemdlError("--rounds, --scan and --chunk must be >= 1, --size >= 16, --thickness > 0, --samples >= 0")
    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    print(f"machine: {where}; torch {torch.__version__}")
    print(f"CBED at {args.size}x{args.size} (±{DETECTOR_MRAD:g} mrad), {ENERGY_KEV:g} kV, {args.thickness:g} nm, "
          f"{args.chunk} probes a batch, median of {args.rounds} round(s):")
    results = {"device": device, "machine": where, "size": args.size, "energy_keV": ENERGY_KEV,
               "thickness_nm": args.thickness, "scan": args.scan, "chunk": args.chunk, "rounds": args.rounds,
               **measure(args, device)}
    if args.json:
        from stemdl.harness import files

        files.write_atomic(args.json, json.dumps(results, indent=1) + "\n")
    return 0
