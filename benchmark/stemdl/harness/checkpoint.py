"""Checkpoints for long, non-benchmark training: written atomically, resumed exactly.

    stemdl run --set checkpoint_dir=ckpt --set checkpoint_every=5      # ckpt/epoch_0005.pt, ... (keeps 2)
    stemdl run --set checkpoint_dir=ckpt --resume ckpt                 # from the newest one in the folder

A checkpoint holds what the next epoch depends on: the weights, the optimizer and LR-schedule state, the
torch RNG state, the epoch it ends and the metric history so far. The data order needs nothing: each
epoch's permutation is a function of (seed, epoch) alone (stemdl.harness.sharding), and so is each epoch's
augmentation generator, so a run resumed after epoch e trains epoch e + 1 on the same samples in the same
order as the uninterrupted run did, and on CPU reproduces its metric history exactly.

A resumed run is logged with `resumed_from_checkpoint` and is never a compliant timed run (the rule files
reject that key): its clock started in another process. Checkpoints are written by rank 0 (the weights are
the same on every rank) under a temporary name and renamed, so a job killed while writing leaves the
previous checkpoint intact, and every rank reads the same file when resuming.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from stemdl.harness import files
from stemdl.harness.config import DELIVERY_KEYS
from stemdl.harness.errors import StemdlError

FORMAT = "stemdl-checkpoint"
VERSION = 2  # 2: the config in sections (harness, workload), the loss's state
_NAME = re.compile(r"epoch_(\d{4,})\.pt\Z")

# Config keys that may differ between a checkpoint and the run resuming it: where things go and how data
# is delivered, none of which changes the training trajectory. Every other key must match.
FREE_KEYS = frozenset(f"harness.{key}" for key in DELIVERY_KEYS)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel, whose state_dict has no `module.` prefixes."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def path_for(folder: Path, epoch: int) -> Path:
    return Path(folder) / f"epoch_{epoch:04d}.pt"


def save(folder: Path, epoch: int, *, model, optimizer, scheduler, loss, history: list, cfg,
         world_size: int, keep: int = 2) -> Path:
    """Write folder/epoch_NNNN.pt atomically and remove all but the newest `keep` checkpoints."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "version": VERSION, "epoch": epoch, "history": history, "config": cfg.flat(),
             "world_size": world_size, "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "loss": loss.state_dict(), "torch_rng": torch.get_rng_state()}
    final = path_for(folder, epoch)
    with files.atomic_path(final, durable=True) as tmp:
        torch.save(state, tmp)
    for old in checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return final


def checkpoints(folder: Path) -> list[Path]:
    """The checkpoints in `folder`, oldest first (temporary files of an interrupted write are not ones)."""
    found = [p for p in Path(folder).iterdir() if _NAME.match(p.name)] if Path(folder).is_dir() else []
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def resolve(where: str | os.PathLike) -> Path:
    """A checkpoint file, or the newest checkpoint in a folder."""
    where = Path(where)
    if where.is_file():
        return where
    if where.is_dir():
        found = checkpoints(where)
        if not found:
            raise StemdlError(f"--resume {where}: no checkpoint (epoch_NNNN.pt) in this folder")
        return found[-1]
    raise StemdlError(f"--resume {where}: no such file or folder")


def read(path: Path) -> dict:
    """A checkpoint's state (on the CPU), or a one-line StemdlError for a file that is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file: torch raises several kinds
        raise StemdlError(f"{path}: not a readable checkpoint ({str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
        raise StemdlError(f"{path}: not a stemdl checkpoint of version {VERSION} (an older stemdl's cannot be "
                          f"resumed: start the run again)")
    return state


def load(path: Path, cfg, world_size: int) -> dict:
    """The checkpoint's state, after checking it belongs to this run: same config (but FREE_KEYS) and
    the same number of ranks (the shards, hence the data order, depend on it)."""
    state = read(path)
    config = cfg.flat()
    differ = sorted(k for k in set(config) | set(state["config"])
                    if k not in FREE_KEYS and config.get(k) != state["config"].get(k))
    if differ:
        key = differ[0]
        raise StemdlError(f"{path}: config key {key!r} is {state['config'].get(key)!r} in the checkpoint but "
                          f"{config.get(key)!r} now; resume with the checkpoint's config")
    if state["world_size"] != world_size:
        raise StemdlError(f"{path}: written by a run on {state['world_size']} rank(s), resumed on {world_size}; "
                          f"the data order depends on the number of ranks")
    return state


def restore(state: dict, *, model, optimizer, scheduler, loss) -> None:
    unwrap(model).load_state_dict(state["model"])
    loss.load_state_dict(state["loss"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
