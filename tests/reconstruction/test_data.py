"""Reading and checking the reconstruction data: the splits, and bad samples (NaN, wrong shapes or dtypes,
a stack that does not match its probe grid, a missing attribute) as one-line errors naming file and sample."""

import h5py
import numpy as np
import pytest

from stemdl.harness.errors import DataError, StemdlError
from stemdl.workloads.reconstruction.data import H5Split, Index, main, refuse_or_skip, screen, validate


def damage(root, rel, group, how):
    """Rewrite one sample of the file ROOT/REL with `how(cbed, potential, attrs)` -> (cbed, potential)."""
    with h5py.File(root / rel, "r+") as h5:
        g = h5[group]
        cbed, potential = g["cbed"][()], g["potential"][()]
        cbed, potential = how(cbed, potential, g.attrs)
        del g["cbed"], g["potential"]
        g.create_dataset("cbed", data=cbed)
        g.create_dataset("potential", data=potential)


def nan_pattern(cbed, potential, attrs):
    cbed[3, 5, 7] = np.nan
    return cbed, potential


def short_stack(cbed, potential, attrs):
    return cbed[:3], potential


def wrong_target(cbed, potential, attrs):
    return cbed, np.zeros((1, 12, 12), np.float16)


def float32_stack(cbed, potential, attrs):
    return cbed.astype(np.float32), potential


def no_grid(cbed, potential, attrs):
    del attrs["probe_grid"]
    return cbed, potential


def inf_target(cbed, potential, attrs):
    potential[0, 1, 1] = np.inf
    return cbed, potential


CASES = [
    (nan_pattern, "cbed pattern 3 has 1 NaN or infinite values"),
    (short_stack, "cbed holds 3 patterns, its probe_grid 2 needs 4"),
    (wrong_target, "potential shape (1, 12, 12) differs from the set's (1, 16, 16)"),
    (float32_stack, "cbed is float32, expected float16"),
    (no_grid, "attribute probe_grid is missing"),
    (inf_target, "potential has 1 NaN or infinite values"),
]


def test_the_splits_read_what_was_written(smoke_data):
    index = Index.build(smoke_data)
    assert len(index) == 20 and len(index.select("train")) == 12 and len(index.select("dev")) == 5
    rows = index.select("dev")
    bad, potentials, shapes = screen(index, rows)
    assert bad == [] and shapes == {"cbed": (4, 32, 32), "potential": (1, 16, 16)}
    split = H5Split(index, rows, potentials, shapes)
    x = split.read([4, 0])
    assert x.dtype == np.float16 and x.shape == (2, 4, 32, 32)
    with h5py.File(smoke_data / "dev" / "batch_dev_1.h5", "r") as h5:
        assert np.array_equal(x[0], h5["sample_4_0/cbed"][()])
        assert np.array_equal(split.fields["potential"][4], h5["sample_4_0/potential"][()])
    assert split.name_of(4).endswith("dev/batch_dev_1.h5:sample_4_0")
    assert validate(smoke_data) == (20, [])


@pytest.mark.parametrize("how, reason", CASES, ids=[c[0].__name__ for c in CASES])
def test_a_bad_sample_is_one_line_naming_file_and_sample(smoke_copy, how, reason):
    damage(smoke_copy, "train/batch_train_1.h5", "sample_5_0", how)
    samples, lines = validate(smoke_copy)
    where = f"{smoke_copy / 'train' / 'batch_train_1.h5'}:sample_5_0"
    # the file's bytes changed since synth.json: said too, on a line of its own
    assert samples == 20 and lines[-1] == f"{where}: {reason}", lines
    assert any("sha256 differs" in line for line in lines[:-1])
    index = Index.build(smoke_copy)
    bad, potentials, _ = screen(index, index.select("train"))
    assert [str(e) for e in bad] == [f"{where}: {reason}"] and "\n" not in str(bad[0])
    with pytest.raises(DataError) as caught:
        refuse_or_skip(bad, 12, skip_bad=False, max_bad=0.01)
    assert str(caught.value) == f"{where}: {reason}"
    refuse_or_skip(bad, 12, skip_bad=True, max_bad=0.1)  # 1 of 12 allowed
    with pytest.raises(StemdlError, match="1 of 12 samples are bad, more than max_bad 0.01"):
        refuse_or_skip(bad, 12, skip_bad=True, max_bad=0.01)
    assert np.isnan(potentials[5].astype(np.float32)).all() and np.isfinite(potentials[4]).all()


def test_several_bad_samples_name_the_first_and_count_the_rest(smoke_copy):
    damage(smoke_copy, "train/batch_train_0.h5", "sample_1_0", nan_pattern)
    damage(smoke_copy, "train/batch_train_2.h5", "sample_9_0", short_stack)
    index = Index.build(smoke_copy)
    bad, _, _ = screen(index, index.select("train"))
    with pytest.raises(DataError, match=r"batch_train_0.h5:sample_1_0: cbed pattern 3 .*\(and 1 more bad samples"):
        refuse_or_skip(bad, 12, skip_bad=False, max_bad=0.01)


def test_the_validate_command(smoke_copy, capsys):
    assert main(["validate", str(smoke_copy)]) == 0
    assert capsys.readouterr().out.startswith(f"{smoke_copy}: 20 samples, 0 problem(s)")
    damage(smoke_copy, "dev/batch_dev_1.h5", "sample_4_0", short_stack)
    assert main(["validate", str(smoke_copy), "--no-pixels"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{smoke_copy}: 20 samples, 2 problem(s)" and out[-1].endswith("sample_4_0: cbed holds 3 patterns, "
                                                                             "its probe_grid 2 needs 4")
    assert main(["validate", str(smoke_copy / "nothing")]) == 2


def test_the_stemdl_commands_serve_this_benchmark(smoke_copy, tmp_path, capsys):
    """`stemdl validate DIR` finds the benchmark in DIR's synth.json; `--benchmark` names it; a name that
    has no such command is one line."""
    from stemdl.cli import main as stemdl

    damage(smoke_copy, "dev/batch_dev_1.h5", "sample_4_0", short_stack)
    assert stemdl(["validate", str(smoke_copy), "--no-pixels"]) == 1
    assert capsys.readouterr().out.splitlines()[-1].endswith("sample_4_0: cbed holds 3 patterns, its probe_grid 2 needs 4")
    assert stemdl(["validate", "--benchmark", "stemdl_reconstruction", str(smoke_copy), "--no-pixels"]) == 1
    capsys.readouterr()
    assert stemdl(["validate", str(smoke_copy), "--benchmark", "nope"]) == 2
    assert capsys.readouterr().err.strip() == ("stemdl validate: error: --benchmark 'nope': not one of stemdl, "
                                               "stemdl_reconstruction")
    out = tmp_path / "made"
    assert stemdl(["synth", str(out), "--benchmark", "stemdl_reconstruction", "--preset", "smoke", "--samples", "4",
                   "--workers", "1", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == f"{out}: 4 samples in 2 files (complete)"
    assert validate(out) == (4, [])
