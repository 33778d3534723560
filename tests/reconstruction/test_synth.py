"""The reconstruction data set writer: the public-style layout, the same bytes whatever the workers,
resumption after an interruption, refusal of a foreign or different folder."""

import dataclasses
import json

import h5py
import numpy as np
import pytest

from stemdl.harness.errors import StemdlError
from stemdl.workloads.reconstruction import layout
from stemdl.harness.synthset import MANIFEST, sha256
from stemdl.workloads.reconstruction.synth import file_plan, generate, preset_config


def small(seed: int = 0):
    """6 samples, 2 a file: train files 0 and 1, dev 0, test 0."""
    return dataclasses.replace(preset_config("smoke", seed=seed), samples={"train": 4, "dev": 1, "test": 1},
                               samples_per_file=2)


def digests(out):
    return {str(p.relative_to(out)): sha256(p) for p in sorted(out.rglob("*.h5"))}


def test_the_layout_holds_stacks_targets_and_attributes(smoke_data):
    manifest = json.loads((smoke_data / MANIFEST).read_text())
    assert manifest["status"] == "complete" and manifest["benchmark"] == "stemdl_reconstruction"
    assert sorted(manifest["files"]) == sorted(digests(smoke_data)) and len(manifest["files"]) == 6
    assert all(manifest["files"][rel]["sha256"] == d for rel, d in digests(smoke_data).items())
    with h5py.File(smoke_data / "dev" / "batch_dev_1.h5", "r") as h5:
        assert list(h5) == ["sample_4_0"]  # dev samples 0..3 in file 0, 4 in file 1
        group = h5["sample_4_0"]
        assert group["cbed"].dtype == np.float16 and group["cbed"].shape == (4, 32, 32)
        assert group["potential"].dtype == np.float16 and group["potential"].shape == (1, 16, 16)
        attrs = dict(group.attrs)
    assert attrs["probe_grid"] == 2 and attrs["material"] == "syn-0-dev-4"
    assert {"space_group", "formula", "lattice_A", "zone", "energy_keV", "cs_mm", "semi_angle_mrad",
            "thickness_A", "positions_A"} <= set(attrs)
    assert attrs["positions_A"].shape == (4, 2) and attrs["lattice_A"].shape == (3, 3)


def test_the_same_seed_gives_the_same_bytes_whatever_the_workers(tmp_path):
    generate(tmp_path / "one", small(), workers=1, quiet=True)
    generate(tmp_path / "two", small(), workers=2, quiet=True)
    assert digests(tmp_path / "one") == digests(tmp_path / "two") and len(digests(tmp_path / "one")) == 4
    assert (tmp_path / "one" / MANIFEST).read_bytes() == (tmp_path / "two" / MANIFEST).read_bytes()
    generate(tmp_path / "other", small(seed=1), workers=2, quiet=True)
    assert digests(tmp_path / "other") != digests(tmp_path / "one")


def test_an_interrupted_set_is_finished_with_the_same_bytes(tmp_path, monkeypatch):
    import stemdl.workloads.reconstruction.synth as synth

    full, out = tmp_path / "full", tmp_path / "set"
    generate(full, small(), workers=1, quiet=True)
    real = synth.make_sample

    def stop_at_the_third(cfg, split, index):
        if (split, index) == ("train", 2):
            raise KeyboardInterrupt  # Ctrl-C (or SIGTERM) in the middle of the second file
        return real(cfg, split, index)

    monkeypatch.setattr(synth, "make_sample", stop_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        generate(out, small(), workers=1, quiet=True)
    monkeypatch.undo()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["status"] == "incomplete" and list(manifest["files"]) == ["train/batch_train_0.h5"]
    assert digests(out) == {"train/batch_train_0.h5": digests(full)["train/batch_train_0.h5"]}
    assert not list(out.rglob("*.partial")), "the interrupted file's temporary is gone"
    # what a kill -9 leaves: a partial, and a file renamed but not yet listed
    (out / "train" / ".batch_train_1.h5.host-1.partial").write_bytes(b"half a file")
    (out / "dev").mkdir()
    (out / "dev" / "batch_dev_0.h5").write_bytes((full / "dev" / "batch_dev_0.h5").read_bytes())
    result = generate(out, small(), workers=2, quiet=True)
    assert result["status"] == "complete" and digests(out) == digests(full)
    assert (out / MANIFEST).read_bytes() == (full / MANIFEST).read_bytes()
    assert not list(out.rglob("*.partial"))


def test_a_different_or_foreign_folder_is_refused(tmp_path):
    generate(tmp_path / "set", small(), workers=1, quiet=True)
    with pytest.raises(StemdlError, match="other settings"):
        generate(tmp_path / "set", small(seed=3), workers=1, quiet=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(StemdlError, match="not a stemdl data set"):
        generate(tmp_path / "mine", small(), workers=1, quiet=True)


def test_the_plan_and_the_presets():
    cfg = small()
    assert [(s, k, list(r)) for s, k, r in file_plan(cfg)] == [
        ("train", 0, [0, 1]), ("train", 1, [2, 3]), ("dev", 0, [0]), ("test", 0, [0])]
    default = preset_config("default").sample_settings()
    assert (default.scan, default.pattern_size, default.target_size) == (8, 32, 16)
    ornl = preset_config("ornl").sample_settings()
    assert (ornl.scan, ornl.pattern_size, ornl.target_size) == (8, 256, 64)
    with pytest.raises(StemdlError, match="choose one of"):
        preset_config("huge")
    assert layout.group_number("sample_12_0") == 12 and layout.group_number("sample_x") is None
