"""The generator end to end: layout, labels, reproducibility across worker counts, resume, refusals."""

import hashlib
import json
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from stemdl.cli import main
from stemdl.workloads.spacegroup.data import layout
from stemdl.harness.errors import StemdlError
from stemdl.workloads.spacegroup.synth import crystals, diffclass, generate


def tiny_config(**overrides) -> generate.SynthConfig:
    return generate.preset_config("tiny", **{"seed": 7, **overrides})


def digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.h5"))}


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "tiny"
    assert main(["synth", str(out), "--preset", "tiny", "--seed", "7", "--workers", "1", "--quiet"]) == 0
    return out


def test_tiny_set_has_the_public_layout(tiny_set):
    cfg = tiny_config()
    files = sorted(p.relative_to(tiny_set).as_posix() for p in tiny_set.rglob("*.h5"))
    assert files == ["dev/batch_dev_0.h5", "test/batch_test_0.h5",
                     "train/batch_train_0.h5", "train/batch_train_1.h5"]
    with h5py.File(tiny_set / "train" / "batch_train_0.h5", "r") as h5:
        group = h5["sample_0_0"]
        stack = group[layout.DATASET]
        assert stack.dtype == np.float32 and stack.shape == (3, cfg.image_size, cfg.image_size)
        assert stack.chunks is None and stack.compression is None
        assert isinstance(group.attrs["space_group"], np.bytes_) and isinstance(group.attrs["formula"], str)
        images = stack[()]
    assert np.all(np.isfinite(images)) and images.min() >= 0
    np.testing.assert_allclose(images.sum(axis=(1, 2)), 1.0, rtol=1e-3)
    manifest = json.loads((tiny_set / generate.MANIFEST).read_text())
    assert manifest["status"] == "complete" and len(manifest["files"]) == 4


def test_tiny_set_passes_validate(tiny_set, capsys):
    assert main(["validate", str(tiny_set)]) == 0


def test_labels_follow_the_plan_and_structures_audit(tiny_set):
    cfg = tiny_config()
    for split in layout.SPLITS:
        expected = generate.split_labels(cfg, split)
        got = []
        for path in sorted((tiny_set / split).glob("*.h5"), key=lambda p: int(p.stem.split("_")[-1])):
            with h5py.File(path, "r") as h5:
                for name in sorted(h5, key=lambda n: int(n.split("_")[1])):
                    rec = layout.decode_attrs(h5[name].attrs, path, name)
                    got.append(rec.space_group)
                    # The stored structure re-analysed by spglib gives the stored label, at both tolerances.
                    for symprec in (1e-3, 0.1):
                        assert crystals.spacegroup_number(rec.structure, symprec) == rec.space_group
                    assert rec.kinematic_class == diffclass.diffraction_class(rec.space_group)
                    assert rec.z_dirs.shape == (3, 3) and np.all(np.abs(rec.z_dirs) <= 2)
                    assert np.all((rec.semi_angles_rad >= 1e-3 - 1e-12) & (rec.semi_angles_rad <= 4e-3 + 1e-12))
        assert got == list(expected)


def test_same_seed_same_bytes_whatever_the_worker_count(tmp_path, tiny_set):
    out = tmp_path / "two_workers"
    assert main(["synth", str(out), "--preset", "tiny", "--seed", "7", "--workers", "2", "--quiet"]) == 0
    assert digests(out) == digests(tiny_set)


def test_other_seed_other_data(tmp_path, tiny_set):
    cfg = tiny_config(seed=8, samples=4)
    generate.generate(tmp_path / "s8", cfg, quiet=True)
    with h5py.File(tmp_path / "s8" / "train" / "batch_train_0.h5", "r") as a, \
            h5py.File(tiny_set / "train" / "batch_train_0.h5", "r") as b:
        assert not np.array_equal(a["sample_0_0/cbed_stack"][()], b["sample_0_0/cbed_stack"][()])


def test_interrupted_run_resumes_without_redoing_finished_files(tmp_path, monkeypatch, tiny_set):
    out = tmp_path / "resumed"
    cfg = tiny_config()
    real_task = generate._task
    calls = {"n": 0}

    def dying_task(args):
        calls["n"] += 1
        if calls["n"] > 6:  # after the first file (4 samples) and part of the second
            raise KeyboardInterrupt
        return real_task(args)

    monkeypatch.setattr(generate, "_task", dying_task)
    with pytest.raises(KeyboardInterrupt):
        generate.generate(out, cfg, quiet=True)
    finished = sorted(p.name for p in out.rglob("*.h5"))
    assert finished == ["batch_train_0.h5"]
    assert not list(out.rglob("*.partial")), "no partial file is left behind"
    assert json.loads((out / generate.MANIFEST).read_text())["status"] == "incomplete"
    first = out / "train" / "batch_train_0.h5"
    mtime = first.stat().st_mtime_ns

    monkeypatch.setattr(generate, "_task", real_task)
    calls["n"] = 0
    counting = lambda args: (calls.__setitem__("n", calls["n"] + 1), real_task(args))[1]  # noqa: E731
    monkeypatch.setattr(generate, "_task", counting)
    generate.generate(out, cfg, quiet=True)
    assert calls["n"] == 12, "only the 12 samples of the unfinished files are computed again"
    assert first.stat().st_mtime_ns == mtime
    assert digests(out) == digests(tiny_set)


def test_complete_set_is_reused(tiny_set, capsys):
    before = digests(tiny_set)
    assert main(["synth", str(tiny_set), "--preset", "tiny", "--seed", "7", "--quiet"]) == 0
    assert digests(tiny_set) == before


def test_refuses_foreign_folder_and_other_settings(tmp_path, tiny_set, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    assert main(["synth", str(foreign), "--preset", "tiny", "--quiet"]) == 2
    assert "not a stemdl synthetic data set" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "precious"
    assert main(["synth", str(tiny_set), "--preset", "tiny", "--seed", "8", "--quiet"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_real_distribution_and_space_group_parsing():
    assert generate.parse_space_groups("1-3,14") == (1, 2, 3, 14)
    assert len(generate.parse_space_groups("real")) == 200
    assert len(generate.parse_space_groups("all")) == 230
    for bad in ("0", "231", "x", "3-"):
        with pytest.raises(StemdlError):
            generate.parse_space_groups(bad)
    assert list(generate.apportion(10, [1, 1, 1])) == [4, 3, 3]
    cfg = tiny_config(space_groups="14,225,62", distribution="real", samples=3000)
    train = generate.split_labels(cfg, "train")
    counts = {g: int((train == g).sum()) for g in (14, 225, 62)}
    real = generate.real_class_counts()
    total = sum(real[g]["total"] for g in counts)
    for g, n in counts.items():
        assert abs(n - len(train) * real[g]["total"] / total) <= 1
    assert list(train) == sorted(train), "like the public files, samples are ordered by label"
    with pytest.raises(StemdlError, match="do not occur"):
        tiny_config(space_groups="16,228", distribution="real")


def test_distinguishable_keeps_one_group_per_diffraction_class():
    # P1 is more frequent than P-1 in the public data, Pnma more than Pna2_1.
    cfg = tiny_config(space_groups="1,2,33,62,14", distinguishable=True)
    assert cfg.space_groups == (1, 14, 62)
    default = generate.preset_config("default")
    assert diffclass.distinguishable(default.space_groups)
    assert default.distribution == "real"
    # As its description says: the most frequent group of each crystal system in the public data.
    counts = generate.real_class_counts()
    systems = [(1, 2), (3, 15), (16, 74), (75, 142), (143, 167), (168, 194), (195, 230)]
    most_frequent = [max(range(lo, hi + 1), key=lambda g: counts[g]["total"]) for lo, hi in systems]
    assert sorted(default.space_groups) == most_frequent


def test_without_rotation_the_image_frame_follows_the_lattice(tmp_path):
    cfg = tiny_config(samples=3, rotate=False)
    generate.generate(tmp_path / "norot", cfg, quiet=True)
    with h5py.File(tmp_path / "norot" / "train" / "batch_train_0.h5", "r") as h5:
        rec = layout.decode_attrs(h5["sample_0_0"].attrs, "f", "sample_0_0")
    lattice = rec.structure.lattice
    for uvw, y_dir in zip(rec.z_dirs, rec.y_dirs):
        z = uvw @ lattice
        z = z / np.linalg.norm(z)
        assert abs(y_dir @ z) < 1e-9 and abs(np.linalg.norm(y_dir) - 1) < 1e-9
        # "up" is the in-plane part of a lattice vector, not a random direction
        in_plane = [v - (v @ z) * z for v in lattice]
        assert any(np.linalg.norm(np.cross(y_dir, w)) < 1e-9 * np.linalg.norm(w) for w in in_plane
                   if np.linalg.norm(w) > 1e-6)


def test_sigterm_stops_workers_and_leaves_no_partial_file(tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "stemdl", "synth", str(out), "--preset", "tiny",
                             "--samples", "400", "--workers", "2", "--quiet"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.rglob("batch_*.h5")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, "still running when a scheduler would stop it"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err and "interrupted" in err
    assert not list(out.rglob("*.partial"))
    assert json.loads((out / generate.MANIFEST).read_text())["status"] == "incomplete"
