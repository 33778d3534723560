"""`stemdl convert SRC DST --benchmark stemdl_reconstruction`: a reconstruction set as shards
(`stemdl.harness.shards`), so that the harness's pipelines, staging and DALI read it as they read the
classification shards.

    stemdl convert data/reconstruction/default /scratch/recon --benchmark stemdl_reconstruction
    mpiexec -n 8 stemdl convert data/reconstruction/ornl /lustre/recon --benchmark stemdl_reconstruction
    stemdl run --benchmark stemdl_reconstruction --data /scratch/recon --stage-dir /dev/shm

The samples are stored as they are: no preprocessing (the stacks and targets are already z-scored float16
at write time), so the shards hold the same bytes per sample as the HDF5 set, in three kinds:

    cbed       float16 (N², S, S)   mapped: what each batch reads
    potential  float16 (1, T, T)    read once into memory (as float32)
    names      bytes                "file:group" of each sample, for messages

One shard per source file, the unit of work of the ranks (file k goes to rank k mod ranks) and of
resumption: a finished shard has a sidecar, and the same command run again converts the rest. Every sample
is screened first (the checks of `stemdl validate`); a bad one stops the conversion with its one line
(exit 2), or with --skip-bad is left out and listed in the manifest, up to --max-bad of the samples. The
manifest is written last, by rank 0, so a folder with one is complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from stemdl import __version__
from stemdl.harness import dist, files, locks
from stemdl.harness.errors import DataError, StemdlError
from stemdl.harness.progress import Progress
from stemdl.harness.shards import FORMAT, MANIFEST, NAMES, VERSION, Kind, ShardWriter
from stemdl.workloads.reconstruction import layout
from stemdl.workloads.reconstruction.data import Index, refuse_or_skip, screen

WORKLOAD = "stemdl_reconstruction"
PREPROCESS = {"stored": "as generated: z-scored float16 stacks and targets"}  # check_shards compares it
SIDECAR = ".done.json"


def shard_kinds(shapes: dict) -> list[Kind]:
    return [Kind(layout.CBED, "float16", tuple(shapes[layout.CBED]), mapped=True),
            Kind(layout.POTENTIAL, "float16", tuple(shapes[layout.POTENTIAL])),
            Kind(NAMES, "S")]


def check_shards(shards) -> None:
    """Refuse shards that are not this workload's stored samples (another preprocessing, other kinds)."""
    manifest = shards.manifest
    names = [k["name"] for k in manifest.get("kinds", [])]
    if manifest.get("preprocess") != PREPROCESS or names != [layout.CBED, layout.POTENTIAL, NAMES]:
        raise StemdlError(f"{shards.root}: not reconstruction shards made by this version of `stemdl convert "
                          f"--benchmark {WORKLOAD}` (kinds {names}, preprocess {manifest.get('preprocess')}); "
                          f"convert the data again")


def _plan(src: Path, splits: list[str], skip_bad: bool, max_bad: float, quiet: bool) -> dict:
    """Rank 0: the index, every sample screened, the verdict; {"shapes", "files": [(split, rel, rows)], ...}."""
    index = Index.build(src)
    rows = np.concatenate([index.select(s) for s in splits])
    if not len(rows):
        raise StemdlError(f"{src}: no samples in the splits {', '.join(splits)}")
    bad, shapes = [], None
    with Progress(len(rows), "samples", f"convert {src}: screening", quiet=quiet) as progress:
        for start in range(0, len(rows), 64):  # in blocks, for progress
            block = rows[start:start + 64]
            found, _, block_shapes = screen(index, block)
            bad += found
            shapes = shapes or block_shapes
            progress.update(len(block))
    refuse_or_skip(bad, len(rows), skip_bad, max_bad)
    if shapes is None:
        raise DataError(src, "no good sample to convert")
    bad_names = {(str(e.path), e.group) for e in bad}
    groups: dict = {}  # (split, file) -> the file's good groups, in order; every file holds one split
    for i in rows:
        if (str(index.path(i)), index.groups[i]) not in bad_names:
            groups.setdefault((str(index.split[i]), int(index.file_of[i])), []).append(index.groups[i])
    plan = [(split, index.files[f], groups[(split, f)]) for split in splits for f in range(len(index.files))
            if (split, f) in groups]
    shapes = {k: tuple(shapes[k]) for k in (layout.CBED, layout.POTENTIAL)}
    return {"shapes": shapes, "files": plan, "skipped": [{"sample": str(e.path) + ":" + e.group,
                                                          "reason": e.reason} for e in bad]}


def _shard_names(plan: dict) -> list[str]:
    counts, names = {}, []
    for split, _, _ in plan["files"]:
        names.append(f"{split}/{counts.get(split, 0):05d}")
        counts[split] = counts.get(split, 0) + 1
    return names


def _finished(dst: Path, name: str, source: str, groups: list[str]) -> dict | None:
    """The shard's entry when an earlier run finished it from the same samples, else None."""
    try:
        entry = json.loads((dst / f"{name}{SIDECAR}").read_text())
    except (OSError, ValueError):
        return None
    if entry.get("source") != source or entry.get("groups") != groups:
        return None
    if not all((dst / meta["path"]).is_file() and (dst / meta["path"]).stat().st_size == meta["bytes"]
               for meta in entry["files"].values()):
        return None
    return entry


def _convert_file(src: Path, dst: Path, name: str, rel: str, groups: list[str], kinds: list[Kind]) -> dict:
    """One source file's chosen samples as shard `name`; its manifest entry (also left as its sidecar)."""
    writer = ShardWriter(dst, name, len(groups), kinds)
    try:
        with h5py.File(src / rel, "r") as h5:
            for group in groups:
                g = h5[group]
                writer.add({layout.CBED: g[layout.CBED][()], layout.POTENTIAL: g[layout.POTENTIAL][()],
                            NAMES: f"{src / rel}:{group}".encode()})
        file_entries = writer.finish()
    except OSError as exc:
        writer.discard()
        raise DataError(src / rel, f"unreadable ({' '.join(str(exc).split())})") from None
    except BaseException:
        writer.discard()
        raise
    entry = {"name": name, "samples": len(groups), "source": rel, "groups": groups, "files": file_entries}
    files.write_atomic(dst / f"{name}{SIDECAR}", json.dumps(entry))
    return entry


def convert(src, dst, splits=("train", "dev", "test"), skip_bad: bool = False, max_bad: float = 0.01,
            quiet: bool = False, wait: bool = True) -> dict:
    """SRC's samples as shards in DST (resumed where an earlier run stopped); the manifest. Collective when
    `dist.setup()` was called: the ranks share the files. Rank 0 holds DST's lock throughout, so a second
    conversion into DST waits for this one (or with `wait=False` is refused at once)."""
    src, dst, env = Path(src), Path(dst), dist.current_or_none()
    rank, size = (env.rank, env.world_size) if env is not None else (0, 1)

    def on_root(fn, *args):
        return fn(*args) if env is None else dist.on_root(fn, *args)

    if not src.is_dir():
        raise StemdlError(f"SRC {src}: no such folder")
    with contextlib.ExitStack() as held:
        def claim():
            _check_destination(dst, src)
            held.enter_context(locks.folder_lock(dst, wait=wait, what=f"converting into {dst}"))
            _check_destination(dst, src)  # again: what a conversion that held the lock before left

        on_root(claim)
        plan = on_root(_plan, src, list(splits), skip_bad, max_bad, quiet)
        kinds = shard_kinds(plan["shapes"])
        names = _shard_names(plan)
        mine = list(range(rank, len(names), size))
        entries, problem = {}, None
        with Progress(len(mine), "shards", f"convert {dst}", quiet=quiet or rank != 0) as progress:
            try:
                for k in mine:
                    _, rel, groups = plan["files"][k]
                    entries[k] = (_finished(dst, names[k], rel, groups)
                                  or _convert_file(src, dst, names[k], rel, groups, kinds))
                    progress.update(1)
            except StemdlError as exc:
                if env is None:
                    raise
                problem = str(exc)
        gathered = [(entries, problem)] if env is None else dist.allgather_object((entries, problem))
        problems = [p for _, p in gathered if p]
        if problems:
            raise StemdlError(problems[0])
        every = {k: e for part, _ in gathered for k, e in part.items()}
        return on_root(_write_manifest, src, dst, plan, names, every, kinds)


def _check_destination(dst: Path, src: Path) -> None:
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise StemdlError(f"DST {dst}: inside SRC {src}; choose a folder outside the data set")
    files.check_folder(dst, "DST")
    if (dst / MANIFEST).exists():
        try:
            manifest = json.loads((dst / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise StemdlError(f"DST {dst}: its {MANIFEST} is unreadable ({exc}); remove it or choose another DST") from None
        if manifest.get("workload") != WORKLOAD or manifest.get("source") != str(src.resolve()):
            raise StemdlError(f"DST {dst}: already holds shards of {manifest.get('source')} "
                              f"({manifest.get('workload')}); choose another DST")
    elif any(not files.is_transient(p.name) and p.name not in (*layout.SPLITS, locks.LOCK_NAME) for p in dst.iterdir()):
        raise StemdlError(f"DST {dst}: holds other files; choose an empty or new folder")


def _write_manifest(src: Path, dst: Path, plan: dict, names: list[str], entries: dict, kinds: list[Kind]) -> dict:
    splits: dict = {}
    for k, name in enumerate(names):
        split = plan["files"][k][0]
        e = entries[k]
        shard = {"name": name, "samples": e["samples"], "source": e["source"], "files": e["files"]}
        part = splits.setdefault(split, {"samples": 0, "shards": []})
        part["samples"] += e["samples"]
        part["shards"].append(shard)
    manifest = {"format": FORMAT, "version": VERSION, "workload": WORKLOAD, "source": str(src.resolve()),
                "preprocess": PREPROCESS, "kinds": [k.to_json() for k in kinds], "splits": splits,
                "skipped": plan["skipped"], "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "stemdl_version": __version__}
    files.write_atomic(dst / MANIFEST, json.dumps(manifest, indent=1), durable=True)
    return manifest


# ---------------------------------------------------------------- the command


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="a reconstruction data folder (train/, dev/, test/)")
    parser.add_argument("dst", type=Path, help="the shard folder (created; an unfinished conversion is resumed)")
    parser.add_argument("--splits", default="train,dev,test", help="comma-separated (default: %(default)s)")
    parser.add_argument("--skip-bad", action="store_true", help="leave bad samples out (listed in the manifest)")
    parser.add_argument("--max-bad", type=float, default=0.01, help="with --skip-bad: the most of the samples "
                        "that may be bad (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def run(args: argparse.Namespace) -> int:
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    unknown = [s for s in splits if s not in layout.SPLITS]
    if unknown or not splits:
        raise StemdlError(f"--splits {args.splits!r}: each must be one of {', '.join(layout.SPLITS)}")
    env = dist.setup(backend="gloo", device="cpu")
    try:
        manifest = convert(args.src, args.dst, splits, args.skip_bad, args.max_bad, args.quiet)
        if env.is_root:
            parts = ", ".join(f"{name} {part['samples']}" for name, part in manifest["splits"].items())
            total = sum(m["bytes"] for part in manifest["splits"].values() for s in part["shards"]
                        for m in s["files"].values())
            print(f"{args.dst}: {parts} samples in shards ({total / 1e6:.1f} MB), "
                  f"{len(manifest['skipped'])} skipped")
        return 0
    finally:
        dist.teardown()

