"""The reconstruction tests' data: the smoke set (20 samples, 2x2 probes of 32x32 patterns, 16x16
targets), generated once per session, read-only (tests that damage data copy it first)."""

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory) -> Path:
    from stemdl.workloads.reconstruction.synth import generate, preset_config

    out = tmp_path_factory.mktemp("reconstruction") / "smoke"
    generate(out, preset_config("smoke"), workers=2, quiet=True)
    return out


@pytest.fixture
def smoke_copy(smoke_data, tmp_path) -> Path:
    """A writable copy of the smoke set."""
    return Path(shutil.copytree(smoke_data, tmp_path / "smoke"))
