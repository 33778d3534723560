"""Node-local staging: copies, reuse, checksum and space errors, cleanup, node_split, and 2 ranks under mpiexec."""

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mpirun import run_ranks

from stemdl.harness import dist, staging
from stemdl.harness.errors import StemdlError

CHECK_SCRIPT = Path(__file__).resolve().parent / "mpi" / "staging_check.py"
SIZES = {"train/shard_000.bin": 300_000, "train/shard_001.bin": 120_000, "dev/shard_000.bin": 70_000,
         "test/empty.bin": 0}


@pytest.fixture(scope="module", autouse=True)
def one_rank():
    """One rank for the whole module (stage() is collective), without a launcher's variables."""
    with pytest.MonkeyPatch.context() as mp:
        for var in dist.LAUNCHER_SIZE_VARS:
            mp.delenv(var, raising=False)
        dist.setup(timeout_s=30)
        yield
        dist.teardown()


def make_source(root: Path, sizes: dict[str, int] = SIZES, seed: int = 0) -> list[tuple[str, int, str]]:
    """Files of random bytes under root; their manifest entries (relative path, bytes, sha256)."""
    rng = random.Random(seed)
    entries = []
    for rel, size in sizes.items():
        data = rng.randbytes(size)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        entries.append((rel, size, hashlib.sha256(data).hexdigest()))
    return entries


@pytest.fixture
def src(tmp_path) -> tuple[Path, list]:
    return tmp_path / "src", make_source(tmp_path / "src")


@pytest.fixture
def stage_dir(tmp_path) -> Path:
    (tmp_path / "local").mkdir()
    return tmp_path / "local"


def staged_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_stage_copies_every_file_and_counts_the_bytes(src, stage_dir, capsys):
    root, entries = src
    staged = staging.stage(root, entries, stage_dir, "job-1")
    assert staged.root == stage_dir / "stemdl-job-1" and staged.owner
    assert (staged.bytes, staged.files) == (490_000, 4) == (staged.rank_bytes, staged.rank_files)
    assert (staged.total_bytes, staged.total_files) == (490_000, 4) and staged.seconds > 0
    assert staged_files(staged.root) == sorted(SIZES), "same relative paths, no temporary files"
    for rel, _, _ in entries:
        assert (staged.root / rel).read_bytes() == (root / rel).read_bytes()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("staging: node 0 copied 4 files, 490.0 kB in ")
    assert err[0].endswith(f"to {staged.root}")
    staging.cleanup(staged)


def test_progress_is_shown_for_large_shares_only(src, stage_dir, capsys, monkeypatch):
    root, entries = src
    monkeypatch.setattr(staging, "PROGRESS_MIN_BYTES", 400_000)
    staging.cleanup(staging.stage(root, entries, stage_dir, "big"))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("staging: 1/1 MB (100%) ")
    assert lines[1].startswith("staging: node 0 copied 4 files")
    staging.cleanup(staging.stage(root, entries[1:], stage_dir, "small"))  # 190 kB: no progress
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_files_already_there_are_kept_and_not_counted(src, stage_dir, capsys):
    root, entries = src
    first = staging.stage(root, entries, stage_dir, "again", keep=True)
    again = staging.stage(root, entries, stage_dir, "again", keep=True)
    assert (again.bytes, again.files, again.total_bytes) == (0, 0, 0)
    assert "copied 0 files (4 already there), 0 B" in capsys.readouterr().err.splitlines()[-1]

    damaged = first.root / "dev/shard_000.bin"
    damaged.write_bytes(bytes(70_000))  # right size, wrong bytes: only the checksum tells
    assert staging.stage(root, entries, stage_dir, "again", verify=False, keep=True).files == 0
    redone = staging.stage(root, entries, stage_dir, "again", keep=True)
    assert (redone.bytes, redone.files) == (70_000, 1)
    assert damaged.read_bytes() == (root / "dev/shard_000.bin").read_bytes()
    (first.root / "train/shard_001.bin").unlink()
    assert staging.stage(root, entries, stage_dir, "again", verify=False, keep=True).bytes == 120_000
    staging.cleanup(first)


def test_checksum_mismatch_names_the_source_file_and_removes_the_folder(src, stage_dir):
    root, entries = src
    bad = [(rel, size, "0" * 64 if rel == "train/shard_001.bin" else sha) for rel, size, sha in entries]
    message = r"^rank 0 on .*: .*/src/train/shard_001\.bin: sha256 [0-9a-f]{16}\.\.\. differs from the manifest's 0{16}"
    with pytest.raises(StemdlError, match=message) as caught:
        staging.stage(root, bad, stage_dir, "bad")
    assert "\n" not in str(caught.value)
    assert not (stage_dir / "stemdl-bad").exists()
    unverified = staging.stage(root, bad, stage_dir, "bad", verify=False)
    assert unverified.files == 4, "verify=False skips checksums"
    staging.cleanup(unverified)

    with pytest.raises(StemdlError):
        staging.stage(root, bad, stage_dir, "kept", keep=True)
    left = staged_files(stage_dir / "stemdl-kept")
    assert "train/shard_001.bin" not in left and not [f for f in left if f.endswith(".partial")]


def test_size_mismatch_and_missing_source_are_one_line_errors(src, stage_dir):
    root, entries = src
    longer = [(rel, size + (rel == "dev/shard_000.bin"), sha) for rel, size, sha in entries]
    with pytest.raises(StemdlError, match=r"src/dev/shard_000\.bin: 70000 bytes, but the manifest says 70001$"):
        staging.stage(root, longer, stage_dir, "size", verify=False)
    (root / "train/shard_000.bin").unlink()
    with pytest.raises(StemdlError, match=r"src/train/shard_000\.bin: listed in the manifest but missing$"):
        staging.stage(root, entries, stage_dir, "gone")
    assert os.listdir(stage_dir) == []


def test_not_enough_space_is_refused_before_copying(src, stage_dir, monkeypatch):
    root, entries = src
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 400_000, 400_000))
    with pytest.raises(StemdlError, match=r"this node's files need 490\.0 kB more but only 400\.0 kB is free$"):
        staging.stage(root, entries, stage_dir, "full")
    assert os.listdir(stage_dir) == []
    staged = staging.stage(root, entries[1:], stage_dir, "fits", keep=True)  # 190 kB
    assert staging.stage(root, entries, stage_dir, "fits").files == 1, "files already there need no space"
    staging.cleanup(staged)


@pytest.mark.parametrize("how, message", [
    ("missing", r"staging folder .*/nowhere does not exist or is not a folder$"),
    ("file", r"staging folder .*/a_file does not exist or is not a folder$"),
    ("tag", r"staging tag 'a/b': use 1 to 64 letters"),
    ("parent", r"manifest entry '\.\./x\.bin': not a relative path inside the data folder$"),
    ("absolute", r"manifest entry '/etc/passwd': not a relative path"),
    ("twice", r"manifest entry dev/shard_000\.bin is listed twice$"),
    ("sha", r"manifest entry dev/shard_000\.bin: 'abc' is not a sha256 hex digest$"),
])
def test_bad_folder_tag_or_entries_are_refused(src, tmp_path, how, message):
    root, entries = src
    folder, tag = tmp_path / "local", "t"
    folder.mkdir()
    dev = entries[2]
    if how == "missing":
        folder = tmp_path / "nowhere"
    elif how == "file":
        folder = tmp_path / "a_file"
        folder.write_text("")
    elif how == "tag":
        tag = "a/b"
    else:
        extra = {"parent": ("../x.bin", 1, None), "absolute": ("/etc/passwd", 1, None), "twice": dev,
                 "sha": (dev[0], dev[1], "abc")}[how]
        entries = entries + [extra] if how != "sha" else [extra]
    with pytest.raises(StemdlError, match=message):
        staging.stage(root, entries, folder, tag)
    assert not (tmp_path / "etc").exists() and not (tmp_path / "x.bin").exists()


def test_cleanup_removes_the_folder_once_and_only_on_the_owner(src, stage_dir):
    root, entries = src
    staged = staging.stage(root, entries, stage_dir, "clean")
    assert staged.root in staging._pending, "the atexit safety net knows the folder"
    other = staging.Staged(root=staged.root, bytes=0, files=0, seconds=0.0, owner=False)
    staging.cleanup(other)
    assert staged.root.is_dir(), "only the node's owner removes"
    staging.cleanup(staged)
    staging.cleanup(staged)
    assert not staged.root.exists() and staged.root not in staging._pending
    kept = staging.stage(root, entries, stage_dir, "keep", keep=True)
    assert kept.root not in staging._pending, "--keep-staged: no atexit removal"
    staging.cleanup(kept)
    assert os.listdir(stage_dir) == []


def test_atexit_removes_what_cleanup_did_not_unless_kept(src, stage_dir):
    root, entries = src
    code = ("import sys; from pathlib import Path; from stemdl.harness import dist, staging; dist.setup(); "
            "e = [tuple(x) for x in __import__('json').loads(sys.argv[1])]; "
            "staging.stage(Path(sys.argv[2]), e, Path(sys.argv[3]), 'lost'); "
            "staging.stage(Path(sys.argv[2]), e, Path(sys.argv[3]), 'kept', keep=True); "
            "raise RuntimeError('the caller failed before its try')")
    env = {k: v for k, v in os.environ.items() if k not in dist.LAUNCHER_SIZE_VARS}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(entries), str(root), str(stage_dir)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1 and "the caller failed" in proc.stderr, proc.stderr
    assert os.listdir(stage_dir) == ["stemdl-kept"]
    assert staged_files(stage_dir / "stemdl-kept") == sorted(SIZES)


# ---- node_split -----------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 10**9), max_size=40), n_parts=st.integers(1, 9), seed=st.integers(0, 99))
def test_node_split_balances_bytes_and_is_deterministic(sizes, n_parts, seed):
    entries = [(f"shard_{i:03d}.h5", size, None) for i, size in enumerate(sizes)]
    parts = staging.node_split(entries, n_parts)
    assert len(parts) == n_parts
    assert sorted(e for part in parts for e in part) == sorted(entries), "each file in exactly one part"
    for part in parts:
        assert part == [e for e in entries if e in part], "input order kept within a part"
    loads = [sum(e[1] for e in part) for part in parts]
    assert max(loads) - min(loads) <= max(sizes, default=0)
    shuffled = entries[:]
    random.Random(seed).shuffle(shuffled)
    assert [sorted(p) for p in staging.node_split(shuffled, n_parts)] == [sorted(p) for p in parts]


def test_node_split_examples():
    entries = [("a", 5, None), ("b", 4, None), ("c", 3, None), ("d", 3, None), ("e", 1, None)]
    assert staging.node_split(entries, 2) == [[("a", 5, None), ("d", 3, None)],
                                              [("b", 4, None), ("c", 3, None), ("e", 1, None)]]
    assert staging.node_split(entries[:1], 3) == [[("a", 5, None)], [], []]
    with pytest.raises(StemdlError, match="cannot split files into 0 parts"):
        staging.node_split(entries, 0)


# ---- two ranks under mpiexec ----------------------------------------------------------------------------

def run_two_ranks(tmp_path: Path, entries: list, src: Path) -> subprocess.CompletedProcess:
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(entries))
    return run_ranks([sys.executable, CHECK_SCRIPT, manifest, src, tmp_path / "local", "mpi"])


MPI_SIZES = {f"train/shard_{i:03d}.bin": 20_000 + 7_000 * i for i in range(6)}


def test_two_ranks_share_the_copying_of_their_node(tmp_path, stage_dir):
    entries = make_source(tmp_path / "src", MPI_SIZES)
    proc = run_two_ranks(tmp_path, entries, tmp_path / "src")
    out = proc.stdout
    assert proc.returncode == 0, out
    total = sum(MPI_SIZES.values())
    shares = staging.node_split(entries, 2)
    for rank, share in enumerate(shares):
        assert len(share) > 0
        assert (f"rank {rank}/2 copied {len(share)} files {sum(e[1] for e in share)} bytes, node 6 files "
                f"{total} bytes, owner {rank == 0}") in out, out
    assert "complete" in out and "removed" in out, out
    assert out.count("staging: node 0 copied 6 files") == 1, "one summary line, from rank 0"


def test_an_error_on_rank_1_stops_both_ranks_with_the_same_line(tmp_path, stage_dir):
    entries = make_source(tmp_path / "src", MPI_SIZES)
    victim = staging.node_split(entries, 2)[1][0][0]  # a file that local rank 1 copies
    (tmp_path / "src" / victim).write_bytes(b"x" * dict(MPI_SIZES)[victim])  # damaged after it was listed
    proc = run_two_ranks(tmp_path, entries, tmp_path / "src")
    assert proc.returncode != 0, proc.stdout
    errors = sorted(line for line in proc.stdout.splitlines() if " error: " in line)
    assert len(errors) == 2, proc.stdout
    assert errors[0].startswith("rank 0/2 error: ") and errors[1].startswith("rank 1/2 error: ")
    assert errors[0].split(" error: ", 1)[1] == errors[1].split(" error: ", 1)[1]
    assert "rank 1 on " in errors[0] and f"src/{victim}: sha256 " in errors[0], errors
    assert os.listdir(stage_dir) == [], "the failed staging left nothing behind"
