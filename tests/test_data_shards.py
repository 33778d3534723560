"""The shard reader: what it reads equals what was written, and every damage is one line naming the file."""

import copy
import errno
import json
import multiprocessing
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_convert import make_raw, run_convert

from stemdl.harness import shards as shards_mod
from stemdl.harness.shards import ShardSet, is_shard_dir, verify_files
from stemdl.harness.errors import DataError, StemdlError


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """Shards at 16x16 of 3 train files (3, 1 and 4 samples) and 1 dev file of 2."""
    base = tmp_path_factory.mktemp("shards")
    raw = make_raw(base / "raw", files=(("train", 3), ("train", 1), ("train", 4), ("dev", 2)), size=32)
    assert run_convert(raw, base / "shards", "--size", "16", "--workers", "1", "--quiet") == 0
    return base / "shards"


@pytest.fixture
def root(converted, tmp_path) -> Path:
    """A copy this test may damage."""
    return Path(shutil.copytree(converted, tmp_path / "shards"))


def stored_images(root: Path, split: str) -> np.ndarray:
    return np.concatenate([np.load(p) for p in sorted((root / split).glob("*.images.npy"))])


def dig(tree, keys):
    for key in keys:
        tree = tree[key]
    return tree


def _read_in_child(split, indices):
    return split.read(indices)


def test_read_gathers_any_indices_from_the_shards(converted):
    shards = ShardSet.open(converted, verify="checksum")
    train = shards.split("train")
    assert (len(train), train.image_shape, train.dtype) == (8, (3, 16, 16), np.uint8)
    assert train.shard_of.tolist() == [0, 0, 0, 1, 2, 2, 2, 2] and train.offsets.tolist() == [0, 3, 4, 8]
    everything = stored_images(converted, "train")
    # runs within a shard, runs across a shard's end, repeats, reversed runs, one sample, none
    for indices in ([7, 0, 3, 3, 5], [], np.arange(8)[::-1], [4], [1, 2, 3, 4, 5, 6], [5, 6, 0, 1, 2], [2, 2]):
        assert np.array_equal(train.read(indices), everything[np.asarray(indices, dtype=np.int64)])
    out = np.full((4, 3, 16, 16), 7, dtype=np.uint8)
    assert train.read([6, 4, 5, 0], out=out) is out and np.array_equal(out, everything[[6, 4, 5, 0]])
    with pytest.raises(ValueError, match=r"out is uint8 \(3, 3, 16, 16\), needs uint8 \(4, 3, 16, 16\)"):
        train.read([0, 1, 2, 3], out=out[:3])
    with pytest.raises(IndexError, match="has 8 samples; asked for 0..8"):
        train.read([0, 8])
    labels, targets = train.fields["labels"], train.fields["targets"]
    assert list(train.fields) == ["labels", "targets"], "the small kinds but the names, in the declared order"
    assert labels.dtype == np.int64 and labels.tolist() == [13, 61, 193, 224, 13, 61, 193, 224]
    assert targets.dtype == np.float32 and targets.shape == (8, 6)
    assert train.names[4] == "train/batch_train_2.h5:sample_4_0" == train.name_of(4)
    assert train.files([1]) == [f"train/00001.{kind}.npy" for kind in ("images", "labels", "targets", "names")]
    assert len(train.files()) == 12 and len(shards.files()) == 16
    assert all((converted / e.path).stat().st_size == e.bytes for e in shards.files())
    assert shards.preprocess["size"] == 16 and shards.splits == ["train", "dev"]


def test_a_split_crosses_into_workers_without_its_memory_maps(converted):
    train = ShardSet.open(converted).split("train")
    train.read(np.arange(8))  # maps every shard in this process
    assert len(pickle.dumps(train)) < 8 * 3 * 16 * 16, "the images are not pickled"
    again = pickle.loads(pickle.dumps(train))
    assert np.array_equal(again.read([6, 1]), train.read([6, 1]))
    with multiprocessing.get_context("fork").Pool(1) as pool:  # a forked DataLoader worker, in short
        assert np.array_equal(pool.apply(_read_in_child, (train, [2, 7])), train.read([2, 7]))


def test_open_maps_are_bounded(converted, monkeypatch):
    monkeypatch.setattr(shards_mod, "MAX_OPEN", 1)
    train = ShardSet.open(converted).split("train")
    everything = stored_images(converted, "train")
    assert np.array_equal(train.read([0, 3, 5]), everything[[0, 3, 5]])  # 3 shards, read one at a time
    assert len(train._maps) == 1
    monkeypatch.setattr(shards_mod, "MAX_OPEN", 2)
    rng = np.random.default_rng(0)
    for _ in range(20):  # shards opened and closed again, batch after batch
        rows = rng.integers(0, 8, rng.integers(1, 9))
        assert np.array_equal(train.read(rows), everything[rows])
        assert len(train._maps) <= 2
        closed = [k for k in range(3) if k not in train._maps]
        assert not train._viewed[closed].any()
        assert all(train._rows[i] is None for i in range(8) if train.shard_of[i] in closed), "no view keeps a map"


def test_truncated_flipped_and_missing_files_are_named(root):
    images = root / "train" / "00002.images.npy"
    data = bytearray(images.read_bytes())
    data[-1] ^= 0xFF
    images.write_bytes(bytes(data))
    ShardSet.open(root, verify="size")  # the size is right
    with pytest.raises(DataError) as err:
        ShardSet.open(root, verify="checksum")
    assert str(err.value).startswith(f"{images}: sha256 ") and "\n" not in str(err.value)
    assert "differs from the manifest's" in str(err.value)
    files = ShardSet.open(root, verify="none").files()
    bad = [k for k, e in enumerate(files) if e.path == "train/00002.images.npy"]
    verify_files(root, files, "checksum", subset=[k for k in range(len(files)) if k not in bad])  # others fine
    with pytest.raises(DataError, match="sha256"):
        verify_files(root, files, "checksum", subset=bad)
    images.write_bytes(bytes(data[:-10]))
    with pytest.raises(DataError, match=rf"^{images}: size {len(data) - 10} bytes, manifest says {len(data)}$"):
        ShardSet.open(root)
    (root / "dev" / "00000.names.npy").unlink()
    with pytest.raises(DataError, match=r"00002.images.npy: size .* \(and 1 more bad file\(s\)\)"):
        ShardSet.open(root)
    with pytest.raises(DataError, match=r"dev/00000.names.npy: missing \(the manifest lists it\)"):
        verify_files(root, files[-4:], "size")
    with pytest.raises(StemdlError, match="verify: 'sizes' is not one of none, size, checksum"):
        ShardSet.open(root, verify="sizes")


def test_a_shard_that_disagrees_with_the_manifest_is_refused_when_its_split_is_read(root):
    labels = root / "dev" / "00000.labels.npy"
    np.save(labels, np.array([14], dtype=np.int16))  # one label for two samples
    shards = ShardSet.open(root, verify="none")
    shards.split("train")
    with pytest.raises(DataError, match=r"00000.labels.npy: holds int16 \(1,\), the manifest says 2 samples"):
        shards.split("dev")
    np.save(root / "train" / "00001.images.npy", np.zeros((1, 3, 8, 8), np.uint8))
    with pytest.raises(DataError, match=r"00001.images.npy: holds uint8 \(1, 3, 8, 8\), the manifest says uint8 "
                                        r"\(1, 3, 16, 16\)"):
        ShardSet.open(root, verify="none").split("train")


def test_a_label_out_of_its_declared_range_names_the_shard_and_the_sample(root):
    labels = root / "train" / "00002.labels.npy"
    values = np.load(labels)
    values[1] = 230  # one past the last class index
    np.save(labels, values)
    with pytest.raises(DataError) as err:
        ShardSet.open(root, verify="none").split("train")
    assert str(err.value) == (f"{labels}: labels 230 of sample 1 (train/batch_train_2.h5:sample_5_0) is outside "
                              f"0..229")


def test_missing_damaged_or_inconsistent_manifests(root, tmp_path):
    assert is_shard_dir(root) and not is_shard_dir(tmp_path) and not is_shard_dir(tmp_path / "absent")
    with pytest.raises(DataError, match=r"manifest.json: no split 'test' \(it has train, dev\)$"):
        ShardSet.open(root).split("test")
    manifest = json.loads((root / "manifest.json").read_text())

    def changed(edit) -> dict:
        bad = copy.deepcopy(manifest)
        edit(bad)
        return bad

    labels = ("splits", "train", "shards", 1, "files", "labels")
    cases = [
        (changed(lambda m: m.update(format="other")), "not a stemdl-shards manifest"),
        (changed(lambda m: m.update(version=1)), "format version 1 .*convert the data again"),
        (changed(lambda m: m["kinds"][0].update(dtype="int9")), "dtype"),
        (changed(lambda m: m["kinds"][1].update(mapped=True)), "exactly one mapped"),
        (changed(lambda m: m.pop("kinds")), "must declare its arrays"),
        (changed(lambda m: m["splits"]["train"].update(samples=9)), "split train: says 9 samples, its shards hold 8"),
        (changed(lambda m: dig(m, labels).update(path="../00001.labels.npy")),
         "'../00001.labels.npy' leaves the shard folder"),
        (changed(lambda m: dig(m, labels).update(bytes="136")), "bytes is not a byte count"),
        (changed(lambda m: dig(m, labels).pop("sha256")), "sha256 is not a sha256 hex digest"),
    ]
    for bad, words in cases:
        (root / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(DataError, match=f"^{root / 'manifest.json'}: .*{words}") as err:
            ShardSet.open(root)
        assert "\n" not in str(err.value)
    (root / "manifest.json").write_text("{half")
    with pytest.raises(DataError, match="manifest.json: unreadable manifest"):
        ShardSet.open(root)
    assert not is_shard_dir(root)
    (root / "manifest.json").unlink()
    with pytest.raises(DataError, match="not a stemdl shard folder"):
        ShardSet.open(root)
    with pytest.raises(DataError, match="no such folder"):
        ShardSet.open(tmp_path / "absent")


def test_with_root_reads_a_staged_copy(converted, tmp_path):
    shards = ShardSet.open(converted)
    staged = tmp_path / "staged"
    for entry in shards.files():
        (staged / entry.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(converted / entry.path, staged / entry.path)
    moved = shards.with_root(staged, verify="checksum")
    assert moved.root == staged and moved.manifest is shards.manifest
    assert np.array_equal(moved.split("train").read([1, 6]), shards.split("train").read([1, 6]))
    (staged / "dev" / "00000.targets.npy").unlink()
    with pytest.raises(DataError, match="00000.targets.npy: missing"):
        shards.with_root(staged, verify="size")


KINDS = [shards_mod.Kind("images", "uint8", (3, 32, 32), mapped=True), shards_mod.Kind("labels", "int16"),
         shards_mod.Kind("names", "S")]


def write_shard(dst: Path, capacity: int, samples: int) -> dict:
    writer = shards_mod.ShardWriter(dst, "train/00000", capacity, KINDS)
    for k in range(samples):
        writer.add({"images": np.full((3, 32, 32), k, np.uint8), "labels": k, "names": f"f:{k}".encode()})
    return writer.finish()


def no_reservation(fd, offset, length):
    raise OSError(errno.EOPNOTSUPP, "Operation not supported")


@pytest.mark.parametrize("samples", [4, 3])  # every row, or one skipped
def test_a_shard_written_where_space_cannot_be_reserved_is_the_same(tmp_path, monkeypatch, samples):
    mapped = write_shard(tmp_path / "mapped", 4, samples)
    monkeypatch.setattr(os, "posix_fallocate", no_reservation)
    assert write_shard(tmp_path / "plain", 4, samples) == mapped
    assert np.load(tmp_path / "plain" / "train" / "00000.images.npy")[:, 0, 0, 0].tolist() == list(range(samples))
    monkeypatch.delattr(os, "posix_fallocate")  # not on macOS
    assert write_shard(tmp_path / "none", 4, samples) == mapped


@pytest.mark.parametrize("reserve", [True, False])
def test_a_full_disk_is_a_one_line_error_naming_the_file_and_leaves_nothing(small_disk, monkeypatch, reserve):
    disk = small_disk(64)  # a shard of 32 samples holds 96 KiB of images
    if not reserve:
        monkeypatch.setattr(os, "posix_fallocate", no_reservation)
    with pytest.raises(StemdlError) as err:
        write_shard(disk, 32, 32)
    assert str(err.value).startswith(f"{disk}/train/00000.images.npy: cannot write it (no space left on device ({disk}: ")
    assert "\n" not in str(err.value) and not list(disk.rglob("*.*"))
