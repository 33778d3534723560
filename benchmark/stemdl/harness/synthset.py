"""A generated data folder's manifest and who may write into the folder, for every workload's generator.

    OUT/synth.json    {"config": ..., "status": "incomplete" | "complete", "files": {REL: {"sha256": ...}}}

The manifest is what makes a folder a generated set: a run may generate into a folder that has one, or
that holds nothing yet but a writer's traces (its lock, partial files), and into nothing else. Each
finished file's SHA-256 lets `validate` find any byte changed since. The generators keep the rest (their
config, plan and writers); the folder lock is `locks.folder_lock`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from stemdl.harness import files, locks
from stemdl.harness.errors import DataError, StemdlError

MANIFEST = "synth.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj) -> None:
    files.write_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_manifest(out: Path) -> dict | None:
    """OUT's manifest, None without one; an unreadable one is a StemdlError naming it."""
    path = Path(out) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StemdlError(f"{path}: unreadable ({exc}); remove it or choose another OUT") from None


def recorded_digests(out: Path) -> dict[str, str]:
    """{path relative to OUT: SHA-256} of the finished files synth.json lists; {} without a synth.json."""
    path = Path(out) / MANIFEST
    if not path.exists():
        return {}
    try:
        listed = json.loads(path.read_text())["files"]
        return {str(rel): str(f["sha256"]) for rel, f in listed.items()}
    except (OSError, ValueError) as exc:
        raise DataError(path, f"unreadable ({exc})") from None
    except (KeyError, TypeError, AttributeError):
        raise DataError(path, "not a stemdl synth manifest (no sha256 per file)") from None


def being_started(out: Path) -> bool:
    """OUT holds nothing yet but a writer's traces (its lock, partials): a set some writer is starting, or
    an empty folder. A run that finds its synthetic folder so must generate (wait for the writer) too."""
    out = Path(out)
    return out.is_dir() and not (out / MANIFEST).exists() and all(
        p.name == locks.LOCK_NAME or files.is_transient(p.name) for p in out.iterdir())


def wants_generating(root: Path) -> bool:
    """A run's synthetic data folder must be generated or finished: absent, a generated set (complete or
    not: the generator decides), or one that another writer is starting."""
    root = Path(root)
    return not root.exists() or (root / MANIFEST).exists() or being_started(root)


def refuse_foreign(out: Path, what: str = "a stemdl synthetic data set") -> None:
    """Refuse an OUT folder that holds something other than a generated set (a lock, a writer's partials
    aside): a folder of the user's is never written into."""
    out = Path(out)
    if out.is_dir() and not (out / MANIFEST).exists() and not being_started(out):
        raise StemdlError(f"{out} exists and is not {what} (no {MANIFEST}); refusing to write into it")
