"""`stemdl lacbed generate`: distinct cubic materials split 85:10:5 by material, the same bytes whatever
the workers or ranks, each pattern the one `bloch.lacbed` computes for its material, bad requests one line."""

import json
import sys

import h5py
import numpy as np
import pytest

from mpirun import run_ranks
from stemdl.cli import main
from stemdl.harness.synthset import MANIFEST, sha256
from stemdl.physics import bloch, cubic
from stemdl.workloads.lacbed.synth import LacbedSettings, generate, material_keys, split_plan

SMALL = LacbedSettings(samples=20, size=16, beams=40, thicknesses_A=(500.0, 1000.0), samples_per_file=8)


def digests(root):
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*.h5"))}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("lacbed") / "small"
    generate(out, SMALL, workers=2, quiet=True)
    return out


def test_materials_are_distinct_and_split_by_material(small_set):
    keys = material_keys(SMALL)
    assert len({(name, tuple(sorted(el.items()))) for name, el in keys}) == 20
    plan = split_plan(SMALL)
    assert {s: len(r) for s, r in plan.items()} == {"train": 17, "dev": 2, "test": 1}
    assert sorted(sum(plan.values(), [])) == list(range(20))
    found = {}
    for split in ("train", "dev", "test"):
        for path in sorted((small_set / split).glob("*.h5")):
            with h5py.File(path) as h5:
                found[split] = found.get(split, []) + [h5[g].attrs["material"] for g in h5]
    assert {s: len(v) for s, v in found.items()} == {"train": 17, "dev": 2, "test": 1}
    every = sum(found.values(), [])
    assert len(set(every)) == 20, "no material in two splits"


def test_a_sample_is_its_materials_pattern_and_potential(small_set):
    with h5py.File(small_set / "dev" / "batch_dev_0.h5") as h5:
        g = h5["sample_1_0"]
        potential, patterns = g["potential"][()], g["lacbed"][()]
        elements = json.loads(g.attrs["elements"])
        name = str(g.attrs["structure_type"])
        assert potential.shape == (16, 16) and patterns.shape == (2, 16, 16) and patterns.dtype == np.float32
        assert list(g.attrs["thicknesses_A"]) == [500.0, 1000.0]
    material = cubic.build(name, elements)
    expected = bloch.lacbed(material.structure, [500.0, 1000.0], 16, beams=40).numpy()
    assert np.allclose(patterns, expected, atol=1e-5)
    assert np.all((patterns >= 0) & (patterns <= 1 + 1e-4))


def test_the_same_bytes_whatever_the_workers_or_ranks(small_set, tmp_path):
    generate(tmp_path / "one", SMALL, workers=1, quiet=True)
    assert digests(tmp_path / "one") == digests(small_set) and len(digests(small_set)) == 5
    proc = run_ranks([sys.executable, "-m", "stemdl", "lacbed", "generate", tmp_path / "two", "--samples", "20",
                      "--size", "16", "--beams", "40", "--thickness", "500,1000", "--samples-per-file", "8",
                      "--workers", "1", "--quiet"], timeout=300)
    assert proc.returncode == 0, proc.stdout
    assert digests(tmp_path / "two") == digests(small_set)
    manifest = json.loads((tmp_path / "two" / MANIFEST).read_text())
    assert manifest["benchmark"] == "stemdl_lacbed" and manifest["status"] == "complete"


@pytest.mark.parametrize("extra, words", [
    (["--samples", "100000"], "--samples 100000: between 1 and 880"),
    (["--size", "15"], "--size 15: an even number of pixels"),
    (["--thickness", "0"], "--thickness '0': expected positive numbers"),
])
def test_bad_requests_are_one_line(tmp_path, capsys, extra, words):
    assert main(["lacbed", "generate", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err and not (tmp_path / "out").exists()


def test_random_crystals_of_the_cubic_groups_as_a_second_source(tmp_path):
    settings = LacbedSettings(samples=3, size=16, beams=30, thicknesses_A=(500.0,), source="generator")
    keys = material_keys(settings)
    assert [k[0] for k in keys] == ["generator"] * 3 and [k[1]["draw"] for k in keys] == [0, 1, 2]
    assert all(195 <= k[1]["space_group"] <= 230 for k in keys)
    generate(tmp_path / "g", settings, workers=1, quiet=True)
    seen = []
    for path in sorted((tmp_path / "g").rglob("*.h5")):
        with h5py.File(path) as h5:
            for g in h5:
                assert 195 <= int(h5[g].attrs["space_group"]) <= 230 and h5[g]["lacbed"].shape == (1, 16, 16)
                seen.append(str(h5[g].attrs["material"]))
    assert len(set(seen)) == 3 and all(m.startswith("generator:seed=0,draw=") for m in seen)
    both = material_keys(LacbedSettings(samples=40, source="both"))
    assert 5 < sum(k[0] == "generator" for k in both) < 35, "each material from either source"
    assert LacbedSettings(samples=5000, source="generator").check() is None  # no 880 ceiling
    with pytest.raises(Exception, match="--source 'icsd'"):
        LacbedSettings(source="icsd").check()
