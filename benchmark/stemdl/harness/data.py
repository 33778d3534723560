"""What the timed run does to its data during init, before the clock: converted shards checked, staged, split.

    root = workload.ensure_data(cfg, env)                  # before init_start: making a synthetic set is not init
    prepared = prepare(workload, root, cfg, env, log)      # collective: every rank calls it
    prepared.train, prepared.eval                          # splits for stemdl.harness.pipelines
    cleanup(prepared, cfg.harness.keep_staged)             # in `finally`: removes the staged copy

Raw data is the workload's to read (`Workload.prepare`). Converted shards (`stemdl.harness.shards`) are
the harness's: the workload checks that they were made for this run (`Workload.check_shards`), then every
file is checked against its manifest entry (`verify_shards`: size, or sha256 split over the ranks), and with
`stage_dir` copied to node-local storage (logged as staging_start / staging_stop with the bytes moved).
Every node stages all the files of both splits (each epoch's permutation is global), or with
`shard_scope: node` only its own part of the training shards (plus the validation split).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stemdl.harness import dist, mlperf
from stemdl.harness.errors import StemdlError


@dataclass(frozen=True)
class NodeScope:
    """`shard_scope: node`: the training positions this node owns, and how many of them every node uses
    per epoch (the smallest node's count)."""

    rows: np.ndarray
    common: int


@dataclass
class Prepared:
    train: object  # a split (stemdl.harness.pipelines: len, read, fields)
    eval: object
    skipped: int = 0  # bad samples left out (skip_bad)
    staged: object = None  # stemdl.harness.staging.Staged, or None
    scope: NodeScope | None = None  # with shard_scope node, else None


def prepare(workload, root: Path, cfg, env, log) -> Prepared:
    """The run's splits from the data folder `root` (as `Workload.ensure_data` returned it)."""
    from stemdl.harness.shards import is_shard_dir

    return _shards(workload, root, cfg, env, log) if is_shard_dir(root) else workload.prepare(root, cfg, env, log)


def node_scope(units: np.ndarray, unit_bytes: list[int], env) -> tuple[NodeScope, list[int]]:
    """`shard_scope: node`: the units (files or shards) of the training split cut into one part per node
    of nearly equal bytes (the same cut on every rank), this node's training positions, and the count
    every node uses per epoch (the smallest node's). Returns (NodeScope, this node's unit numbers)."""
    from stemdl.harness.staging import node_split

    parts = node_split([(str(u), b, None) for u, b in enumerate(unit_bytes)], env.number_of_nodes)
    mine = sorted(int(entry[0]) for entry in parts[env.node_rank])
    rows = np.flatnonzero(np.isin(units, mine))
    counts = dist.allgather_object((len(rows), env.local_world_size))
    if len({ranks for _, ranks in counts}) > 1:
        raise StemdlError("config key 'shard_scope': node scope needs the same number of ranks on every node")
    return NodeScope(rows, min(n for n, _ in counts)), mine


def _shards(workload, root: Path, cfg, env, log) -> Prepared:
    from stemdl.harness.shards import ShardSet

    h = cfg.harness
    shards = ShardSet.open(root, verify="none")
    if shards.manifest["workload"] != workload.name:
        raise StemdlError(f"{root}: shards of the {shards.manifest['workload']} benchmark, not of {workload.name}")
    workload.check_shards(shards, cfg)
    train, evaluation = shards.split(h.train_split), shards.split(h.eval_split)
    scope, mine = None, None
    if h.shard_scope == "node":  # units: the shards, which a node then stages and reads alone
        sizes = [train.mapped_bytes(k) for k in range(len(train.shards))]
        scope, mine = node_scope(train.shard_of, sizes, env)
    needed = _run_files(shards, h, mine)
    staged = None
    if h.stage_dir:
        staged = _stage(shards, needed, h, env, log)
        # the small arrays are already in memory: only the mapped ones are read from the staged copy
        train, evaluation = train.relocated(staged.root), evaluation.relocated(staged.root)
    elif h.verify_shards != "none":
        _verify(shards, needed, h.verify_shards, env)
    return Prepared(train, evaluation, 0, staged, scope)


def _run_files(shards, h, train_shards: list[int] | None = None) -> list:
    """The manifest entries (path, bytes, sha256) of the files this node reads: every training shard (each
    epoch's permutation is global) or, with node scope, the node's own; and, being small, the whole
    validation split rather than only the blocks of the node's ranks."""
    chosen = []
    for name in (h.train_split, h.eval_split):
        entries = shards.manifest["splits"][name]["shards"]
        keep = set(range(len(entries)) if name != h.train_split or train_shards is None else train_shards)
        chosen += [shard_entry for k, shard_entry in enumerate(entries) if k in keep]
    return [(meta["path"], int(meta["bytes"]), meta.get("sha256")) for shard_entry in chosen
            for meta in shard_entry["files"].values()]


def _stage(shards, entries, h, env, log):
    from stemdl.harness import staging

    tag = dist.broadcast_object(staging.new_job_tag())
    log.start(mlperf.STAGING_START)
    staged = staging.stage(shards.root, entries, Path(h.stage_dir), tag,
                           verify=h.verify_shards == "checksum", keep=bool(h.keep_staged))
    log.end(mlperf.STAGING_STOP, metadata={"bytes": staged.total_bytes, "files": staged.total_files,
                                           "nodes": env.number_of_nodes, "stage_dir": str(h.stage_dir)})
    return staged


def _verify(shards, entries, how: str, env) -> None:
    """Every rank checks a slice of the files (a sha256 of a 9 GB set, or a stat of thousands of files on
    a shared file system, split over the ranks); a mismatch anywhere stops every rank with the same line."""
    from stemdl.harness.shards import verify_files

    dist.on_every_rank(verify_files, shards.root, entries[env.rank::env.world_size], how)


def cleanup(prepared: Prepared | None, keep: bool) -> None:
    if prepared is not None and prepared.staged is not None and not keep:
        from stemdl.harness import staging

        staging.cleanup(prepared.staged)
