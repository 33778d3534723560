"""The generator end to end: layout, labels, reproducibility across worker counts, resume, refusals."""

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpirun import run_ranks
from stemdl.cli import main
from stemdl.harness import locks, sampleset
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


def test_two_ranks_write_the_same_bytes_and_manifest_as_one(tiny_set, tmp_path):
    proc = run_ranks([sys.executable, "-m", "stemdl", "synth", tmp_path / "two", "--preset", "tiny", "--seed", "7",
                      "--workers", "1", "--quiet"], timeout=300)
    assert proc.returncode == 0, proc.stdout
    assert digests(tmp_path / "two") == digests(tiny_set) and len(digests(tiny_set)) == 4
    one, two = (json.loads((root / generate.MANIFEST).read_text()) for root in (tiny_set, tmp_path / "two"))
    assert two == one and two["status"] == "complete" and two["benchmark"] == "stemdl"
    assert sum(two["class_counts"]["train"].values()) == 8
    assert proc.stdout.count("samples in 4 files (complete)") == 1, "rank 0 alone says it"


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
    assert "not a stemdl data set" in capsys.readouterr().err
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


# ---- one writer at a time, and storage that refuses writes

def _manifest_digests(root):
    return {rel: f["sha256"] for rel, f in json.loads((root / generate.MANIFEST).read_text())["files"].items()}


def _synth_after(barrier, argv, err_path):
    # A child of the test: its stderr (tracebacks included) into a file, started with its twin.
    err = os.open(err_path, os.O_WRONLY | os.O_CREAT)
    os.dup2(err, 2)
    barrier.wait(60)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    raise SystemExit(main(argv))


def test_two_writers_at_once_both_succeed_with_the_set_made_alone(tmp_path, tiny_data):
    out = tmp_path / "shared"
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    argv = ["synth", str(out), "--preset", "tiny", "--quiet", "--workers", "2"]
    procs = [ctx.Process(target=_synth_after, args=(barrier, argv, tmp_path / f"err{k}")) for k in range(2)]
    for proc in procs:
        proc.start()
    for k, proc in enumerate(procs):
        proc.join(300)
        err = (tmp_path / f"err{k}").read_text()
        assert proc.exitcode == 0 and "Traceback" not in err, err
        assert err == "" or re.fullmatch(rf"waiting for \S+ pid \d+, which is writing {re.escape(str(out))}\n", err)
    assert json.loads((out / generate.MANIFEST).read_text())["status"] == "complete"
    assert _manifest_digests(out) == _manifest_digests(tiny_data)
    assert digests(out) == digests(tiny_data)
    assert not list(out.rglob("*.partial"))


def test_a_writer_that_starts_mid_run_waits_instead_of_breaking_the_first(tmp_path):
    # Without the lock the second one's cleanup deleted the first one's open .partial file.
    out = tmp_path / "set"
    argv = [sys.executable, "-m", "stemdl", "synth", str(out), "--preset", "tiny", "--samples", "64",
            "--workers", "1", "--quiet"]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.rglob("batch_*.h5")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "still writing when the second one starts"
    second = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (_, err2), (_, err1) = second.communicate(timeout=300), first.communicate(timeout=300)
    assert (first.returncode, err1) == (0, "")
    assert second.returncode == 0
    assert err2 == f"waiting for {socket.gethostname()} pid {first.pid}, which is writing {out}\n"
    alone = tmp_path / "alone"
    generate.generate(alone, generate.preset_config("tiny", samples=64), workers=2, quiet=True)
    assert _manifest_digests(out) == _manifest_digests(alone) and digests(out) == digests(alone)


def test_a_second_writer_waits_for_the_first_then_finds_the_set_complete(tmp_path, tiny_data):
    out = tmp_path / "set"
    shutil.copytree(tiny_data, out)
    manifest = json.loads((out / generate.MANIFEST).read_text())
    (out / generate.MANIFEST).write_text(json.dumps(dict(manifest, status="incomplete")))  # still being written
    (out / "test" / "batch_test_0.h5").unlink()
    proc = None
    with locks.folder_lock(out):
        proc = subprocess.Popen([sys.executable, "-m", "stemdl", "synth", str(out), "--preset", "tiny", "--quiet"],
                                stderr=subprocess.PIPE, text=True)
        me = f"{socket.gethostname()} pid {os.getpid()}"
        assert proc.stderr.readline() == f"waiting for {me}, which is writing {out}\n"
        time.sleep(0.3)
        assert proc.poll() is None, "it waits while the lock is held"
        # the holder finishes its set meanwhile
        shutil.copy(tiny_data / "test" / "batch_test_0.h5", out / "test" / "batch_test_0.h5")
        (out / generate.MANIFEST).write_text(json.dumps(manifest))
        mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != locks.LOCK_NAME}
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and err == ""
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes, "complete when it got the lock: nothing rewritten"


def test_a_waiting_writer_leaves_the_live_writers_partial_files_alone(tmp_path):
    out, cfg = tmp_path / "set", tiny_config()
    out.mkdir()
    with locks.folder_lock(out):
        sampleset._open(out, generate.set_spec(cfg))  # what the live writer has done so far
        live = out / "train" / ".batch_train_0.h5.otherhost-1.partial"
        live.parent.mkdir()
        live.write_bytes(b"half a file")
        with pytest.raises(StemdlError, match=f"is still writing {out} after 0.2 s"):
            generate.generate(out, cfg, quiet=True, timeout=0.2)
        with pytest.raises(StemdlError, match=f"pid {os.getpid()} is writing {out}; try again"):
            generate.generate(out, cfg, quiet=True, wait=False)
        assert live.read_bytes() == b"half a file"
    generate.generate(out, cfg, quiet=True)  # the lock free: what a killed writer left is cleaned up
    assert not live.exists() and not list(out.rglob("*.partial"))


def _read_only(disk):
    proc = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot remount read-only here ({proc.stderr.strip()})")
    return disk


@pytest.mark.parametrize("case", ["proc", "read-only", "read-only inside", "a regular file"])
def test_unwritable_output_is_one_line(tmp_path, small_disk, capsys, case):
    if case == "proc":
        out, why = Path("/proc/x"), "cannot write there (No such file or directory)"
    elif case.startswith("read-only"):
        disk = _read_only(small_disk(64))
        out, why = (disk / "x" if case.endswith("inside") else disk), "cannot write there (Read-only file system)"
    else:
        out, why = tmp_path / "notes.txt", "exists and is not a folder"
        out.write_text("precious")
    assert main(["synth", str(out), "--preset", "tiny", "--quiet"]) == 2
    assert capsys.readouterr().err == f"stemdl synth: error: OUT {out}: {why}\n"
    if case == "a regular file":
        assert out.read_text() == "precious"


def test_full_disk_is_one_line_leaves_no_partial_and_keeps_the_finished_files(small_disk, capsys, tiny_data):
    out = small_disk(1024) / "set"  # room for synth.json and one 0.8 MB file of the tiny set, not two
    assert main(["synth", str(out), "--preset", "tiny", "--quiet", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(f"stemdl synth: error: {re.escape(str(out))}/train/batch_train_1.h5: cannot write it "
                        r"\(no space left on device[^\n]*\)\n", err), err
    assert not list(out.rglob("*.partial"))
    manifest = json.loads((out / generate.MANIFEST).read_text())
    assert manifest["status"] == "incomplete"
    assert _manifest_digests(out) == {"train/batch_train_0.h5": _manifest_digests(tiny_data)["train/batch_train_0.h5"]}
    assert digests(out) == {"train/batch_train_0.h5": digests(tiny_data)["train/batch_train_0.h5"]}


def test_a_complete_set_on_read_only_storage_is_used_as_it_is(small_disk, tiny_data):
    disk = small_disk(8192)
    shutil.copytree(tiny_data, disk / "set")
    _read_only(disk)
    manifest = generate.generate(disk / "set", generate.preset_config("tiny"), quiet=True)
    assert manifest["status"] == "complete" and _manifest_digests(disk / "set") == _manifest_digests(tiny_data)


@pytest.mark.parametrize("traces", [[], [locks.LOCK_NAME], [locks.LOCK_NAME, ".synth.json.host-1.partial"],
                                    [".stemdl-write-test.abc123"]])
def test_a_run_arriving_while_another_starts_the_set_generates_too(tmp_path, monkeypatch, traces):
    # The race of two first runs: the second found the folder made, no synth.json in it yet, and went on to
    # read a folder with no data. A folder holding only a starting writer's traces is synthetic: generate.
    from types import SimpleNamespace

    from stemdl.workloads.spacegroup.data import prepare

    root = tmp_path / "default"
    root.mkdir()
    for name in traces:
        (root / name).write_text("")
    calls = []
    monkeypatch.setattr(generate, "generate", lambda r, cfg, workers: calls.append((r, cfg.preset)))
    cfg = SimpleNamespace(harness=SimpleNamespace(data=str(root), synth_preset="tiny"))
    assert prepare.ensure_data(cfg) == root and calls == [(root, "tiny")]
    (root / "mine.txt").write_text("a user's file")
    calls.clear()
    prepare.ensure_data(cfg)
    assert calls == [], "a folder with other content is the user's data, never generated into"


def test_a_first_run_on_two_ranks_generates_its_set_together(tiny_data, tmp_path):
    proc = run_ranks([sys.executable, "-m", "stemdl", "run", "--config", "smoke", "--set",
                      f"data={tmp_path / 'tiny'}", "--set", f"log_dir={tmp_path / 'runs'}"], timeout=300)
    assert proc.returncode == 0, proc.stdout
    assert digests(tmp_path / "tiny") == digests(tiny_data), "the ranks wrote the one process's bytes"
    assert json.loads((tmp_path / "tiny" / generate.MANIFEST).read_text())["status"] == "complete"
    assert "2 rank(s)" in proc.stdout
