"""The space-group workload's data during init: the synthetic default made, raw HDF5 indexed, screened, split.

    root = ensure_data(cfg)                  # before init_start: making a synthetic set is not init
    prepared = prepare_raw(root, cfg, env, log)   # collective: every rank calls it

Raw HDF5 (`--data` in the public layout): rank 0 builds or refreshes the index and broadcasts it; then the
ranks screen the samples they will read (each a disjoint slice of the files: attributes, and pixels unless
`screen_pixels: false`), so that a NaN or a truncated file stops the run here, named, and not an hour into
the clock. `skip_bad` leaves the bad samples out instead (counted, logged as `bad_samples_skipped`), up to
`max_bad` of them. Converted shards are the harness's (`stemdl.harness.data`); `check_preprocessing`
refuses shards converted for another run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from stemdl.harness import dist, mlperf, synthset
from stemdl.harness.data import Prepared, node_scope
from stemdl.harness.errors import StemdlError


def ensure_data(cfg) -> Path:
    """The data folder. A synthetic one (absent, or made by `stemdl synth`) is generated or finished
    first, by every rank together (each writes its share of the files; an error anywhere is raised on
    every rank). A folder that another run has only just started to generate (nothing but its lock yet)
    counts as synthetic: this run waits for it."""
    from stemdl.harness.sampleset import default_workers
    from stemdl.workloads.spacegroup.synth import generate

    root, preset = Path(cfg.harness.data), cfg.harness.synth_preset
    if preset and synthset.wants_generating(root):
        generate.generate(root, generate.preset_config(preset), workers=default_workers(dist.current_or_none()))
    if not root.exists():
        raise StemdlError(f"--data {root}: no such folder")
    return root


def prepare_raw(root: Path, cfg, env, log) -> Prepared:
    from functools import partial

    from stemdl.workloads.spacegroup.data import screen
    from stemdl.workloads.spacegroup.data.index import load_or_build
    from stemdl.workloads.spacegroup.data.source import raw_splits

    h = cfg.harness
    # One reader of the file system, not N. With skip_bad, samples it cannot decode become placeholders
    # that the screen reports and leaves out.
    index = dist.on_root(partial(load_or_build, skip_bad=h.skip_bad), root)
    rows = np.concatenate([index.select(h.train_split), index.select(h.eval_split)])
    # Every rank screens a slice of the files; all get the same verdict (so all raise, or none).
    result = screen.screen_distributed(index, rows, pixels=cfg.workload.screen_pixels, rank=env.rank,
                                       world_size=env.world_size, quiet=not env.is_root,
                                       workers=max(1, (os.cpu_count() or 1) // env.local_world_size))
    mask = screen.decide(result, len(rows), h.skip_bad, h.max_bad)
    keep = np.zeros(len(index), dtype=bool)
    keep[rows[mask]] = True
    skipped = result.count()
    if h.skip_bad:
        log.event(mlperf.BAD_SAMPLES_SKIPPED, skipped)
        if skipped and env.is_root:
            print(f"stemdl run: leaving out {skipped} bad sample(s) of {len(rows)} (--skip-bad):", file=sys.stderr)
            for line in result.lines()[:10]:
                print(f"  {line}", file=sys.stderr)
    train, evaluation = raw_splits(index, cfg, keep)
    scope = None
    if h.shard_scope == "node":  # units: the files, which a node then reads alone
        files, units = np.unique(index.file_index[train.rows], return_inverse=True)
        scope, _ = node_scope(units, [int(n) for n in index.file_size[files]], env)
    return Prepared(train, evaluation, skipped, scope=scope)


def check_preprocessing(shards, cfg) -> None:
    """Refuse shards converted with other preprocessing than the run asks for."""
    w, stored = cfg.workload, shards.preprocess
    wanted = {"size": ("image_size", w.image_size), "floor": ("log_floor", w.log_floor),
              "ceiling": ("log_ceiling", w.log_ceiling)}
    for key, (config_key, value) in wanted.items():
        if not np.isclose(float(stored.get(key, float("nan"))), float(value)):
            raise StemdlError(f"{shards.root}: shards were converted with {key} {stored.get(key)}, the run asks for "
                              f"{config_key} {value} (convert again, or --set {config_key}={stored.get(key)})")
