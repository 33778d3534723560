"""Shared test fixtures: the real-layout fixture files and writable copies of them."""

from pathlib import Path

import h5py
import pytest

FIXTURE_DIR = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "stemdl_layout"


@pytest.fixture
def fixture_dir() -> Path:
    """The read-only fixture folder (batch_train_0.h5: 2 samples, batch_dev_0.h5: 1 sample)."""
    if not FIXTURE_DIR.is_dir():
        pytest.skip(f"fixture folder {FIXTURE_DIR} is absent (CI clones shared/ beside the repository)")
    return FIXTURE_DIR


@pytest.fixture
def copy_fixture(fixture_dir):
    """copy_fixture(dest, flat=False) -> dest: writable copies of the fixture files, in train/ and dev/
    folders like the real set (or flat), rewritten group by group with h5py so tests can damage them."""

    def copy(dest: Path, flat: bool = False) -> Path:
        for src in sorted(fixture_dir.glob("batch_*.h5")):
            split = src.name.split("_")[1]
            out = dest / src.name if flat else dest / split / src.name
            out.parent.mkdir(parents=True, exist_ok=True)
            with h5py.File(src, "r") as h_in, h5py.File(out, "w") as h_out:
                for name in h_in:
                    h_in.copy(h_in[name], h_out, name=name)
        return dest

    return copy


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The tiny synthetic set (16 samples, 4 space groups, 128x128), generated once per test session.
    Read-only: tests that damage data copy it first."""
    from stemdl.cli import main

    out = tmp_path_factory.mktemp("data") / "tiny"
    assert main(["synth", str(out), "--preset", "tiny", "--quiet"]) == 0
    return out


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(kib) -> a folder on a file system of that many KiB (a tmpfs), to fill up for real.
    Unmounted at the end; skips where this user may not mount (not root)."""
    import subprocess

    mounted = []

    def make(kib: int, name: str = "disk") -> Path:
        where = tmp_path / name
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(kib)}k", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip() or proc.returncode})")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
