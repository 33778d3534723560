"""The reconstruction data set: CBED stacks of a probe grid and their projected-potential targets, written
as HDF5 in the public style (`layout`), reproducible, resumable, on any number of ranks and processes.

    python -m stemdl.workloads.reconstruction.synth data/reconstruction/default          # the run's default
    mpiexec -n 4 python -m stemdl.workloads.reconstruction.synth OUT --preset ornl --samples 20000
    generate(out, preset_config("smoke"), workers=2)                                   # from code

Sample i of a split draws all its randomness from SeedSequence([seed, split, i]) (`generate.make_sample`),
so the bytes written do not depend on the ranks or the worker processes. The files are the unit of work:
each rank writes a disjoint set of them (the `todo` list dealt round-robin), its worker processes
computing the samples in order; a file is written under a temporary name and renamed when complete
(`harness.files`). `OUT/synth.json` records the configuration and each finished file's SHA-256; the same
command continues an interrupted run (a file under its final name is complete, and is hashed into the
manifest if the writer stopped before listing it); another configuration for an existing OUT is refused.
One writer job at a time (`OUT/.lock`, held by rank 0 for the whole job): a second first `stemdl run`
waits, then finds the set complete. A complete set is only read (it may sit on a read-only file system).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import os
import signal
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import h5py
import numpy as np
import yaml

from stemdl import __version__
from stemdl.harness import dist, files, locks
from stemdl.harness.errors import StemdlError
from stemdl.harness.progress import Progress
from stemdl.workloads.reconstruction import layout
from stemdl.workloads.reconstruction.generate import SampleSettings
# synth.json as the space-group generator writes it: its helpers, not copies
from stemdl.harness.synthset import MANIFEST, read_manifest, refuse_foreign, sha256, write_json_atomic

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


def _worker_init(in_pool: bool = True) -> None:
    """One thread per worker: the parallelism is across samples (oversubscribed cores only thrash)."""
    import torch
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if in_pool:  # the parent handles signals: it stops the pool and removes its partial file
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _task(args):
    cfg, split, index = args
    return (split, index, *make_sample(cfg, split, index))


# ---------------------------------------------------------------- the output folder (rank 0, locked)


def finished(out: Path, cfg: SynthConfig) -> dict | None:
    """The manifest when OUT already holds this set complete (read without the lock), else None."""
    try:
        manifest = read_manifest(out)
    except StemdlError:
        return None  # said under the lock
    if not manifest or manifest.get("status") != "complete" or manifest.get("config") != cfg.content():
        return None
    return manifest if all((out / relative_path(s, k)).is_file() for s, k, _ in file_plan(cfg)) else None


def _open(out: Path, cfg: SynthConfig) -> tuple[dict, list]:
    """Under the lock: the manifest (new, or the existing one if it describes the same data) and the files
    still to write. A file under its final name is complete (renamed after closing): listed if it is not."""
    manifest = read_manifest(out)
    if manifest is None:
        manifest = {"generator": f"stemdl {__version__}", "benchmark": "stemdl_reconstruction",
                    "preset": cfg.preset, "description": cfg.description, "config": cfg.content(),
                    "status": "incomplete", "files": {}}
    elif manifest.get("config") != cfg.content():
        raise StemdlError(f"{out} holds a reconstruction set made with other settings (see {out / MANIFEST}); "
                          "choose another OUT, or the same settings to resume")
    for stale in out.glob("*/.*.partial"):  # what a killed writer left: nobody else writes here now
        stale.unlink()
    todo = []
    for split, number, indices in file_plan(cfg):
        rel = relative_path(split, number)
        if not (out / rel).exists():
            todo.append((split, number, indices))
        elif rel not in manifest["files"]:
            manifest["files"][rel] = {"samples": len(indices), "sha256": sha256(out / rel)}
    write_json_atomic(out / MANIFEST, manifest)
    return manifest, todo


# ---------------------------------------------------------------- writing


def _write_share(out: Path, cfg: SynthConfig, todo: list, workers: int, bar: Progress,
                 manifest: dict | None) -> dict:
    """Write this rank's files; {relative path: entry}. `manifest` (rank 0's) is updated after each file."""
    tasks = [(cfg, split, i) for split, _, indices in todo for i in indices]
    pool = None
    if workers > 1 and len(tasks) > 1:
        pool = multiprocessing.get_context("fork").Pool(min(workers, len(tasks)), initializer=_worker_init)
        results = pool.imap(_task, tasks, chunksize=1)
    else:
        results = map(_task, tasks)
    written = {}
    try:
        for split, number, indices in todo:
            rel = relative_path(split, number)
            (out / split).mkdir(parents=True, exist_ok=True)
            with files.atomic_path(out / rel, durable=True) as tmp, h5py.File(tmp, "w") as h5:
                for index in indices:
                    _, got, cbed, potential, attrs = next(results)
                    assert got == index, "results arrive in task order"
                    layout.write_sample(h5, layout.group_name(index), cbed, potential, attrs)
                    bar.update(1)
            written[rel] = {"samples": len(indices), "sha256": sha256(out / rel)}
            if manifest is not None:
                manifest["files"][rel] = written[rel]
                write_json_atomic(out / MANIFEST, manifest)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return written


def _environment():
    try:
        return dist.current()
    except RuntimeError:  # no dist.setup(): this process alone
        return None


def _on_root(env, fn):
    return fn() if env is None else dist.on_root(fn)


def generate(out, cfg: SynthConfig, workers: int = 1, quiet: bool = False, wait: bool = True,
             timeout: float | None = None) -> dict:
    """Write (or finish) the set and return its manifest. Collective when `dist.setup()` was called: the
    ranks share the files, each with `workers` processes. While another job writes OUT, wait for it
    (`timeout` seconds at most; None: for ever), or with `wait=False` refuse at once."""
    out, env = Path(out), _environment()
    rank, size = (env.rank, env.world_size) if env is not None else (0, 1)
    with contextlib.ExitStack() as held:  # rank 0's lock, from the claim to the complete manifest

        def claim():
            done = finished(out, cfg)
            if done is not None:
                return done, []
            refuse_foreign(out, "a stemdl data set")
            files.check_folder(out, "OUT")
            held.enter_context(locks.folder_lock(out, wait=wait, timeout=timeout, what=f"writing {out}"))
            return _open(out, cfg)

        manifest, todo = _on_root(env, claim)
        if manifest.get("status") == "complete" and not todo:
            return manifest
        mine = todo[rank::size]
        total = sum(len(indices) for _, _, indices in mine)
        label = f"synth {out}" + (f" (rank 0's {len(mine)} of {len(todo)} files)" if size > 1 else "")
        outcome: object = None
        try:
            with Progress(total, what="samples", label=label, quiet=quiet or rank != 0) as bar:
                outcome = _write_share(out, cfg, mine, workers, bar, manifest if rank == 0 else None)
        except StemdlError as exc:
            outcome = exc
        except Exception:
            if size == 1:
                raise
            traceback.print_exc()  # a bug: end every rank rather than leave them waiting for this one
            dist.abort(1)
        outcomes = [outcome] if env is None else dist.allgather_object(outcome)
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if errors:
            raise errors[0]

        def complete():
            for written in outcomes:
                manifest["files"].update(written)
            manifest["status"] = "complete"
            write_json_atomic(out / MANIFEST, manifest)
            return manifest

        return _on_root(env, complete)


# ---------------------------------------------------------------- the command


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="output folder (created; an unfinished run there is resumed)")
    parser.add_argument("--preset", default="default", help="smoke, default or ornl (default: %(default)s)")
    parser.add_argument("--seed", type=int, help="random seed (default: the preset's)")
    parser.add_argument("--samples", type=int, help="total samples, split in the preset's proportions")
    parser.add_argument("--samples-per-file", type=int)
    parser.add_argument("--workers", type=int, help="processes per rank (default: the rank's share of the cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def default_workers(env) -> int:
    return max(1, (os.cpu_count() or 1) // (env.local_world_size if env is not None else 1))


def run(args: argparse.Namespace) -> int:
    cfg = preset_config(args.preset, args.seed, args.samples, args.samples_per_file)
    env = dist.setup(backend="gloo", device="cpu")  # the work is on CPUs; MPI only carries the outcomes
    try:
        workers = args.workers or default_workers(env)
        s = cfg.sample_settings()
        if env.is_root and not args.quiet:
            print(f"synth {args.out}: preset {cfg.preset}, seed {cfg.seed}, samples {cfg.samples}, "
                  f"{s.scan}x{s.scan} probes of {s.pattern_size}x{s.pattern_size} -> {s.target_size}x"
                  f"{s.target_size}, {env.world_size} rank(s) x {workers} worker(s)", file=sys.stderr)
        manifest = generate(args.out, cfg, workers=workers, quiet=args.quiet)
        if env.is_root:
            total = sum(f["samples"] for f in manifest["files"].values())
            print(f"{args.out}: {total} samples in {len(manifest['files'])} files ({manifest['status']})")
        return 0
    finally:
        dist.teardown()


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
