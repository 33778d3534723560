"""Everything the timed run does to its data during init, before the clock: find, check, stage, split.

    root = ensure_data(cfg)                  # before init_start: making a synthetic set is not init
    prepared = prepare(root, cfg, env, log)  # collective: every rank calls it
    prepared.train, prepared.eval            # splits for stemdl.harness.pipelines (see stemdl.workloads.spacegroup.data.source)
    cleanup(prepared)                        # in `finally`: removes the staged copy (unless keep_staged)

Raw HDF5 (`--data` in the public layout): rank 0 builds or refreshes the index and broadcasts it; sample
names found in two files of a split are refused; then the ranks screen the samples they will read (each
a disjoint slice of the files: attributes, and pixels unless `screen_pixels: false`) so a NaN or a
truncated file stops the run here, named, and not an hour into the clock. `skip_bad` leaves the bad
samples out instead (counted, logged as `bad_samples_skipped`), up to `max_bad` of them.

Converted shards (`stemdl convert`): the manifest is checked against the run's preprocessing, every file
against its manifest entry (`verify_shards`: size, or sha256 split over the ranks), and with `stage_dir`
the files are copied to node-local storage (logged as staging_start / staging_stop with the bytes moved).
Every node stages all the files of both splits (each epoch's permutation is global), or with
`shard_scope: node` only its own part of the training shards (plus the validation split): the shards are
cut into one part per node of nearly equal bytes, and each epoch a node permutes only its own samples.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stemdl.harness import dist, mlperf
from stemdl.harness.errors import StemdlError


@dataclass
class Prepared:
    train: object
    eval: object
    skipped: int = 0
    staged: object = None  # stemdl.harness.staging.Staged, or None
    scope: object = None  # stemdl.harness.pipelines.NodeScope with shard_scope node, else None

    @property
    def class_counts(self) -> np.ndarray:
        """Training samples per class index (230,): what the class-imbalance losses weigh by."""
        return np.bincount(self.train.labels, minlength=230)


def _generate(root: Path, preset: str) -> None:
    from stemdl.workloads.spacegroup.synth import generate

    generate.generate(root, generate.preset_config(preset), workers=os.cpu_count() or 1)


def ensure_data(cfg) -> Path:
    """The data folder. A synthetic one (absent, or made by `stemdl synth`) is generated or finished
    first by rank 0 (the others wait; an error there is raised on every rank)."""
    root = Path(cfg.data)
    if cfg.synth_preset and (not root.exists() or (root / "synth.json").exists()):
        dist.on_root(_generate, root, cfg.synth_preset)
    if not root.exists():
        raise StemdlError(f"--data {root}: no such folder")
    return root


def prepare(root: Path, cfg, env, log) -> Prepared:
    """The run's splits from the data folder `root` (as `ensure_data` returned it)."""
    from stemdl.harness.shards import is_shard_dir

    return _shards(root, cfg, env, log) if is_shard_dir(root) else _raw(root, cfg, env, log)


# ---- raw HDF5 ---------------------------------------------------------------------------------------------

def _raw(root: Path, cfg, env, log) -> Prepared:
    from functools import partial

    from stemdl.workloads.spacegroup.data import screen
    from stemdl.workloads.spacegroup.data.index import load_or_build
    from stemdl.workloads.spacegroup.data.source import raw_splits

    # One reader of the file system, not N. With skip_bad, samples it cannot decode become placeholders
    # that the screen reports and leaves out.
    index = dist.on_root(partial(load_or_build, skip_bad=cfg.skip_bad), root)
    rows = np.concatenate([index.select(cfg.train_split), index.select(cfg.eval_split)])
    # Every rank screens a slice of the files; all get the same verdict (so all raise, or none).
    result = screen.screen_distributed(index, rows, pixels=cfg.screen_pixels, rank=env.rank,
                                       world_size=env.world_size, quiet=not env.is_root,
                                       workers=max(1, (os.cpu_count() or 1) // env.local_world_size))
    mask = screen.decide(result, len(rows), cfg.skip_bad, cfg.max_bad)
    keep = np.zeros(len(index), dtype=bool)
    keep[rows[mask]] = True
    skipped = result.count()
    if cfg.skip_bad:
        log.event(mlperf.BAD_SAMPLES_SKIPPED, skipped)
        if skipped and env.is_root:
            print(f"stemdl run: leaving out {skipped} bad sample(s) of {len(rows)} (--skip-bad):", file=sys.stderr)
            for line in result.lines()[:10]:
                print(f"  {line}", file=sys.stderr)
    train, evaluation = raw_splits(index, cfg, keep)
    scope = None
    if cfg.shard_scope == "node":  # units: the files, which a node then reads alone
        files, units = np.unique(index.file_index[train.rows], return_inverse=True)
        scope, _ = node_scope(units, [int(n) for n in index.file_size[files]], env)
    return Prepared(train, evaluation, skipped, scope=scope)


# ---- converted shards -------------------------------------------------------------------------------------

def _shards(root: Path, cfg, env, log) -> Prepared:
    from stemdl.harness.shards import ShardSet

    shards = ShardSet.open(root, verify="none")
    _check_preprocessing(root, shards.preprocess, cfg)
    train, evaluation = shards.split(cfg.train_split), shards.split(cfg.eval_split)
    scope, mine = None, None
    if cfg.shard_scope == "node":  # units: the shards, which a node then stages and reads alone
        sizes = [int(sh["files"]["images"]["bytes"]) for sh in train.shards]
        scope, mine = node_scope(train.shard_of, sizes, env)
    needed = _run_files(shards, cfg, mine)
    staged = None
    if cfg.stage_dir:
        staged = _stage(shards, needed, cfg, env, log)
        # labels and targets are already in memory: only the images are read from the staged copy
        train, evaluation = train.relocated(staged.root), evaluation.relocated(staged.root)
    elif cfg.verify_shards != "none":
        _verify(shards, needed, cfg.verify_shards, env)
    return Prepared(train, evaluation, 0, staged, scope)


def node_scope(units: np.ndarray, unit_bytes: list[int], env):
    """`shard_scope: node`: the units (files or shards) of the training split cut into one part per node
    of nearly equal bytes (the same cut on every rank), this node's training positions, and the count
    every node uses per epoch (the smallest node's). Returns (NodeScope, this node's unit numbers)."""
    from stemdl.harness.pipelines import NodeScope
    from stemdl.harness.staging import node_split

    parts = node_split([(str(u), b, None) for u, b in enumerate(unit_bytes)], env.number_of_nodes)
    mine = sorted(int(entry[0]) for entry in parts[env.node_rank])
    rows = np.flatnonzero(np.isin(units, mine))
    counts = dist.allgather_object((len(rows), env.local_world_size))
    if len({ranks for _, ranks in counts}) > 1:
        raise StemdlError("config key 'shard_scope': node scope needs the same number of ranks on every node")
    return NodeScope(rows, min(n for n, _ in counts)), mine


def _check_preprocessing(root: Path, stored: dict, cfg) -> None:
    wanted = {"size": cfg.image_size, "floor": cfg.log_floor, "ceiling": cfg.log_ceiling}
    for key, value in wanted.items():
        if not np.isclose(float(stored.get(key, float("nan"))), float(value)):
            config_key = {"size": "image_size", "floor": "log_floor", "ceiling": "log_ceiling"}[key]
            raise StemdlError(f"{root}: shards were converted with {key} {stored.get(key)}, the run asks for "
                              f"{config_key} {value} (convert again, or --set {config_key}={stored.get(key)})")


def _run_files(shards, cfg, train_shards: list[int] | None = None) -> list:
    """The manifest entries (path, bytes, sha256) of the files this node reads: every training shard (each
    epoch's permutation is global) or, with node scope, the node's own; and, being small, the whole
    validation split rather than only the blocks of the node's ranks."""
    chosen = []
    for name in (cfg.train_split, cfg.eval_split):
        entries = shards.manifest["splits"][name]["shards"]
        keep = set(range(len(entries)) if name != cfg.train_split or train_shards is None else train_shards)
        chosen += [shard_entry for k, shard_entry in enumerate(entries) if k in keep]
    return [(meta["path"], int(meta["bytes"]), meta.get("sha256")) for shard_entry in chosen
            for meta in shard_entry["files"].values()]


def _stage(shards, entries, cfg, env, log):
    from stemdl.harness import staging

    tag = dist.broadcast_object(staging.new_job_tag())
    log.start(mlperf.STAGING_START)
    staged = staging.stage(shards.root, entries, Path(cfg.stage_dir), tag,
                           verify=cfg.verify_shards == "checksum", keep=bool(cfg.keep_staged))
    log.end(mlperf.STAGING_STOP, metadata={"bytes": staged.total_bytes, "files": staged.total_files,
                                           "nodes": env.number_of_nodes, "stage_dir": str(cfg.stage_dir)})
    return staged


def _verify(shards, entries, how: str, env) -> None:
    """Every rank checks a slice of the files (a sha256 of a 9 GB set, or a stat of thousands of files on
    a shared file system, split over the ranks); a mismatch anywhere stops every rank with the same line."""
    from stemdl.harness.shards import verify_files

    problem = None
    try:
        verify_files(shards.root, entries[env.rank::env.world_size], how)
    except StemdlError as exc:
        problem = str(exc)
    problems = [p for p in dist.allgather_object(problem) if p]
    if problems:
        raise StemdlError(problems[0])


def cleanup(prepared: Prepared | None, keep: bool) -> None:
    if prepared is not None and prepared.staged is not None and not keep:
        from stemdl.harness import staging

        staging.cleanup(prepared.staged)
