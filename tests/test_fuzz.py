"""Fuzzing the reader, the validator and the indexer with malformed groups, attributes, datasets and files.

Whatever is in a data file, they raise nothing but `StemdlError` (the validator raises nothing at all and
reports one line per bad entry naming the file and the group), and a good sample is never reported bad.
"""

import os
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stemdl.workloads.spacegroup.data import layout
from stemdl.workloads.spacegroup.data.index import load_or_build
from stemdl.workloads.spacegroup.data.reader import DataFile
from stemdl.workloads.spacegroup.data.validate import validate
from stemdl.harness.errors import DataError, StemdlError

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "stemdl_layout" / "batch_train_0.h5"
SMALL = (layout.N_PATTERNS, 8, 8)  # small images keep every example fast; the validator accepts any (3, S, S)
N_GOOD = 4  # more good samples than fuzzed ones, so the most common image shape is the good one
SCALE = float(os.environ.get("STEMDL_FUZZ_SCALE", "1"))  # e.g. 20 for a long hunt; 1 keeps the file ~10 s

pytestmark = pytest.mark.skipif(not FIXTURE.is_file(), reason=f"fixture {FIXTURE} is absent")


def _good_attrs() -> dict:
    with h5py.File(FIXTURE, "r") as f:
        return dict(f["sample_0_0"].attrs)


GOOD_ATTRS = _good_attrs() if FIXTURE.is_file() else {}
NAMES = [s.name for s in layout.REQUIRED_ATTRS + layout.OPTIONAL_ATTRS]

# ---- strategies -----------------------------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
any_float = st.floats(width=64)
label_text = st.one_of(st.integers(-10**30, 10**30).map(str), st.sampled_from(
    ["", " ", "0", "1", "230", "231", "-5", " 12 ", "1e2", "12.0", "0x10", "abc", "١٢", "²", "\n7\n", "196\x00"]))
byte_strings = st.one_of(st.binary(max_size=12), label_text.map(lambda s: s.encode("utf-8")),
                         st.sampled_from([b"\xff\xfe", b"\x80196", b"19\xc3", b"\x00"]))
numeric_dtypes = st.sampled_from(["i1", "i2", "i4", "i8", "u1", "u2", "u8", "f2", "f4", "f8", ">f8", ">i4",
                                  "c8", "c16", "?"])
small_shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)
near_shapes = st.sampled_from([(), (0,), (1,), (3,), (9,), (3, 3), (1, 3, 3), (2, 3, 3), (1, 3, 3, 1), (1, 9)])


@st.composite
def numeric_arrays(draw):
    dtype = np.dtype(draw(numeric_dtypes))
    shape = draw(st.one_of(near_shapes, small_shapes))
    return draw(hnp.arrays(dtype, shape))


def _python_value():
    """Values as any mapping could hold them, including ones h5py cannot store."""
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), any_float, st.text(max_size=8),
                        byte_strings, st.complex_numbers(max_magnitude=1e6))
    nested = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=12)
    return st.one_of(scalars, nested, numeric_arrays(), byte_strings.map(np.bytes_),
                     st.text(max_size=8).map(np.str_), st.integers(-2**63, 2**63 - 1).map(np.int64),
                     st.lists(byte_strings, max_size=3).map(lambda xs: np.array(xs, dtype="S")),
                     st.lists(st.text(max_size=4), max_size=3).map(lambda xs: np.array(xs, dtype=object)))


def _h5_value():
    """Values h5py can (mostly) store as attributes; a few it rejects, and those are skipped."""
    return st.one_of(
        numeric_arrays(), byte_strings.map(np.bytes_), st.text(max_size=8), label_text,
        st.integers(-2**63, 2**64 - 1).map(lambda n: np.uint64(n) if n >= 2**63 else np.int64(n)),
        any_float.map(np.float64), st.booleans().map(np.bool_), st.sampled_from([np.nan, np.inf, -np.inf]),
        st.lists(byte_strings, max_size=3).map(lambda xs: np.array(xs, dtype="S")),
        st.lists(st.text(max_size=4), max_size=3).map(lambda xs: np.array(xs, dtype=h5py.string_dtype())),
        st.just(h5py.Empty("f8")), st.just(h5py.Empty("S5")),
        st.sampled_from([np.array([[[0, 1, -1], [1, -1, -1], [0, 2, -1]]], dtype=np.float64),
                         np.array([np.nan, 1, 2]), np.zeros((1, 3, 3), np.int8), np.zeros((3, 3), np.int64)]),
    )


attr_names = st.one_of(st.sampled_from(NAMES), st.text(min_size=1, max_size=10).filter(lambda s: "\x00" not in s))


@st.composite
def attr_edits(draw, values):
    """Fixture attributes with some deleted, replaced by junk, or joined by extra ones."""
    attrs = dict(GOOD_ATTRS)
    for _ in range(draw(st.integers(0, 4))):
        name = draw(attr_names)
        if draw(st.booleans()) and name in attrs:
            del attrs[name]
        else:
            attrs[name] = draw(values)
    if draw(st.integers(0, 9)) == 0:  # sometimes a group with hardly any attributes at all
        attrs = {k: v for k, v in attrs.items() if draw(st.booleans())}
    return attrs


def _stack_kinds():
    weird_values = st.sampled_from([np.nan, np.inf, -np.inf, -1.0, -1e30, 0.0])
    return st.one_of(
        st.tuples(st.just("good"), st.just(None)),
        st.tuples(st.just("missing"), st.just(None)),
        st.tuples(st.just("group"), st.just(None)),
        st.tuples(st.just("scalar"), any_float),
        st.tuples(st.just("null"), st.just(None)),
        st.tuples(st.just("strings"), st.lists(st.text(max_size=3), min_size=1, max_size=3)),
        st.tuples(st.just("values"), st.lists(weird_values, min_size=1, max_size=5)),
        st.tuples(st.just("array"), numeric_arrays()),
        st.tuples(st.just("array"), hnp.arrays(np.float32, st.sampled_from(
            [(3, 8), (3, 8, 8, 1), (2, 8, 8), (4, 8, 8), (3, 0, 0), (0, 8, 8), (3, 8, 4), (3, 1, 1), (9,)]))),
        st.tuples(st.just("array"), hnp.arrays(st.sampled_from(["f8", "i2", "u1", "c8", "f2"]), st.just(SMALL))),
    )


weird_group_names = st.sampled_from(["sample_0", "sample_a_b", "Sample_0_0", "sample_0_0_0", "sample_-1_0",
                                     "sample_0_0 ", " sample_0_0", "sample_0_0\n", "sample_١_٢", "sample_٣_0",
                                     "junk", "cbed_stack", "sample_\n_0", "line\nbreak", "tab\there", "é"])
group_names = st.one_of(
    st.tuples(st.integers(0, 10**20), st.integers(0, 10**6)).map(lambda ij: f"sample_{ij[0]}_{ij[1]}"),
    weird_group_names,
    st.text(min_size=1, max_size=12).filter(lambda s: "/" not in s and "\x00" not in s and s != "."),
)


@st.composite
def fuzz_groups(draw):
    """One member of the fuzzed file: its name, whether it is a group or a dataset, attributes and image."""
    return {
        "name": draw(group_names),
        "as_dataset": draw(st.integers(0, 12)) == 0,
        "attrs": draw(attr_edits(_h5_value())),
        "stack": draw(_stack_kinds()),
        "nested": draw(st.integers(0, 5)) == 0,
    }


# ---- writing files --------------------------------------------------------------------------------------

def _good_stack(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(SMALL, dtype=np.float32)


def _write_good(path: Path) -> list[str]:
    names = [f"sample_0_{j}" for j in range(N_GOOD)]
    with h5py.File(path, "w") as h5:
        for j, name in enumerate(names):
            g = h5.create_group(name)
            g.create_dataset(layout.DATASET, data=_good_stack(j))
            for k, v in GOOD_ATTRS.items():
                g.attrs[k] = v
    return names


def _write_stack(g: h5py.Group, kind: str, data) -> None:
    if kind == "good":
        g.create_dataset(layout.DATASET, data=_good_stack())
    elif kind == "group":
        g.create_group(layout.DATASET).create_dataset("inner", data=_good_stack())
    elif kind == "scalar":
        with np.errstate(over="ignore"):
            g.create_dataset(layout.DATASET, data=np.float32(data))
    elif kind == "null":
        g.create_dataset(layout.DATASET, data=h5py.Empty("f4"))
    elif kind == "strings":
        g.create_dataset(layout.DATASET, data=np.array(data, dtype=h5py.string_dtype()))
    elif kind == "values":
        stack = _good_stack()
        stack.reshape(-1)[: len(data)] = data
        g.create_dataset(layout.DATASET, data=stack)
    elif kind == "array":
        g.create_dataset(layout.DATASET, data=data)


def _write_fuzzed(path: Path, members: list[dict]) -> list[str]:
    """The fuzzed file; returns the names actually written (h5py refuses a few names and values: skipped)."""
    written = []
    with h5py.File(path, "w") as h5:
        for m in members:
            name = m["name"]
            if name in h5:
                continue
            try:
                if m["as_dataset"]:
                    h5.create_dataset(name, data=_good_stack())
                    written.append(name)
                    continue
                g = h5.create_group(name)
            except (ValueError, TypeError, KeyError, OSError):
                continue
            written.append(name)
            for k, v in m["attrs"].items():
                try:
                    g.attrs[k] = v
                except (ValueError, TypeError, KeyError, OSError):
                    pass
            try:
                _write_stack(g, *m["stack"])
            except (ValueError, TypeError):  # e.g. a NUL inside a variable-length string: h5py refuses it
                pass
            if m["nested"]:
                inner = g.create_group("sample_0_0")
                inner.create_dataset(layout.DATASET, data=_good_stack())
    return written


def _damage(path: Path, how: str, data: bytes, cut: float) -> None:
    if how == "random":
        path.write_bytes(data)
    elif how == "truncate":
        raw = path.read_bytes()
        path.write_bytes(raw[: int(len(raw) * cut)])
    elif how == "hdf5_header":  # a valid signature followed by junk
        path.write_bytes(b"\x89HDF\r\n\x1a\n" + data)


# ---- checks ---------------------------------------------------------------------------------------------

def _expect_only_stemdl_errors(fn, *args):
    try:
        return fn(*args)
    except StemdlError:
        return None


def _check_reader(path: Path, names: list[str]) -> None:
    f = _expect_only_stemdl_errors(DataFile, path)
    if f is None:
        return
    with f:
        listed = _expect_only_stemdl_errors(lambda: f.groups) or []
        _expect_only_stemdl_errors(f.other_names)
        for g in dict.fromkeys(listed + names + ["sample_9_9", ""]):
            for read in (f.record, f.stack, f.shape):
                try:
                    read(g)
                except DataError as exc:
                    assert exc.path == str(path)
                except StemdlError:
                    pass


def _check_validate(root: Path, files: dict[str, str | None], good: list[str], good_file: str) -> None:
    report = validate([root], workers=1, quiet=True)
    assert report.ok == (not report.bad) and report.summary["bad"] == len(report.bad)
    for entry in report.bad:
        line = entry.line()
        assert "\n" not in line and "\r" not in line, line
        assert entry.file in files, entry
        assert line.startswith(entry.file), line
        assert entry.reason.strip(), entry
        if entry.group is not None:
            assert f"{entry.file}:" in line and (entry.group in line or ascii(entry.group) in line), line
    bad_good = [e for e in report.bad if e.file == good_file and e.group in good]
    assert not bad_good, [e.line() for e in bad_good]


# ---- the tests ------------------------------------------------------------------------------------------

@settings(max_examples=int(1000 * SCALE), deadline=None)
@given(attrs=attr_edits(_python_value()))
def test_decode_attrs_raises_only_data_error(attrs):
    try:
        rec = layout.decode_attrs(attrs, "f.h5", "sample_0_0")
    except DataError as exc:
        assert str(exc).startswith("f.h5:sample_0_0: ") and "\n" not in str(exc), str(exc)
        return
    assert isinstance(rec, layout.SampleRecord)
    assert 1 <= rec.space_group <= layout.N_SPACE_GROUPS
    assert rec.z_dirs.shape == (3, 3) and rec.y_dirs.shape == (3, 3)


@settings(max_examples=int(300 * SCALE), deadline=None)
@given(attrs=attr_edits(_h5_value()))
def test_decode_attrs_as_h5py_returns_them(attrs):
    """The same, on values after a round trip through an HDF5 attribute (what the reader really sees)."""
    with tempfile.TemporaryDirectory() as tmp:
        with h5py.File(Path(tmp) / "a.h5", "w") as h5:
            g = h5.create_group("sample_0_0")
            for k, v in attrs.items():
                try:
                    g.attrs[k] = v
                except (ValueError, TypeError, KeyError, OSError):
                    pass
            stored = dict(g.attrs)
    try:
        layout.decode_attrs(stored, "f.h5", "sample_0_0")
    except DataError as exc:
        assert "\n" not in str(exc), str(exc)


def test_good_fixture_attributes_decode():
    rec = layout.decode_attrs(GOOD_ATTRS, "f.h5", "sample_0_0")
    assert rec.space_group == 196


@settings(max_examples=int(300 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(members=st.lists(fuzz_groups(), min_size=0, max_size=3),
       fuzz_file=st.sampled_from(["batch_train_1.h5", "batch_dev_0.h5", "dev/batch_dev_3.h5", "batch_test_0.h5"]),
       damage=st.sampled_from([None] * 6 + ["random", "truncate", "hdf5_header"]),
       junk=st.binary(max_size=600), cut=st.floats(0, 0.99))
def test_reader_validator_indexer_on_fuzzed_files(members, fuzz_file, damage, junk, cut):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        good_file = "batch_train_0.h5"
        good = _write_good(root / good_file)
        path = root / fuzz_file
        path.parent.mkdir(exist_ok=True)
        names = _write_fuzzed(path, members)
        if damage:
            _damage(path, damage, junk, cut)
        _check_reader(path, names + [m["name"] for m in members])
        _check_reader(root / good_file, good)
        _check_validate(root, {good_file: None, fuzz_file: None}, good, good_file)
        try:
            index = load_or_build(root, workers=1, quiet=True)
        except StemdlError:
            return
        assert len(index) >= N_GOOD
        for i in range(len(index)):
            index.entry(i)


@pytest.mark.parametrize("content", [b"", b"not hdf5 at all", b"\x89HDF\r\n\x1a\n", bytes(range(256)) * 4])
def test_unreadable_files_are_one_bad_entry(tmp_path, content):
    _write_good(tmp_path / "batch_train_0.h5")
    (tmp_path / "batch_train_1.h5").write_bytes(content)
    report = validate([tmp_path], workers=1, quiet=True)
    assert [(e.file, e.group) for e in report.bad] == [("batch_train_1.h5", None)]
    assert "\n" not in report.bad[0].line()
    with pytest.raises(DataError, match="batch_train_1.h5"):
        load_or_build(tmp_path, workers=1, quiet=True)


@pytest.mark.parametrize("name", ["sample_١_٢", "sample_0_0\n", "sample_\n_0", "line\nbreak"])
def test_odd_group_names_are_not_samples(tmp_path, name):
    """Only sample_I_J with ASCII digits is a sample; anything else is one escaped bad-entry line."""
    _write_good(tmp_path / "batch_train_0.h5")
    with h5py.File(tmp_path / "batch_train_1.h5", "w") as h5:
        g = h5.create_group(name)
        g.create_dataset(layout.DATASET, data=_good_stack())
        for k, v in GOOD_ATTRS.items():
            g.attrs[k] = v
    with DataFile(tmp_path / "batch_train_1.h5") as f:
        assert f.groups == []
    report = validate([tmp_path], workers=1, quiet=True)
    assert [(e.file, e.group) for e in report.bad] == [("batch_train_1.h5", name)]
    line = report.bad[0].line()
    assert "\n" not in line and (name in line or ascii(name) in line), line
    assert len(load_or_build(tmp_path, workers=1, quiet=True)) == N_GOOD


def test_null_dataspace_stack_is_a_data_error(tmp_path):
    _write_good(tmp_path / "batch_train_0.h5")
    with h5py.File(tmp_path / "batch_train_0.h5", "a") as h5:
        del h5["sample_0_1/cbed_stack"]
        h5["sample_0_1"].create_dataset(layout.DATASET, data=h5py.Empty("f4"))
    with DataFile(tmp_path / "batch_train_0.h5") as f, pytest.raises(DataError, match="sample_0_1: cbed_stack is empty"):
        f.stack("sample_0_1")
    report = validate([tmp_path], workers=1, quiet=True)
    assert [e.line() for e in report.bad] == ["batch_train_0.h5:sample_0_1: cbed_stack is empty (null dataspace)"]
    with pytest.raises(DataError, match="sample_0_1"):
        load_or_build(tmp_path, workers=1, quiet=True)


def test_huge_declared_stack_is_a_data_error(tmp_path):
    """A 2 kB file can declare a never-written (3, 10^6, 10^6) dataset: reported, not a MemoryError."""
    _write_good(tmp_path / "batch_train_0.h5")
    with h5py.File(tmp_path / "batch_train_0.h5", "a") as h5:
        del h5["sample_0_1/cbed_stack"]
        h5["sample_0_1"].create_dataset(layout.DATASET, shape=(3, 10**6, 10**6), dtype="f4", chunks=(1, 64, 64))
    with DataFile(tmp_path / "batch_train_0.h5") as f, pytest.raises(DataError, match="sample_0_1: .*memory"):
        f.stack("sample_0_1")
    report = validate([tmp_path], workers=1, quiet=True)
    assert [(e.group, "too large to check" in e.reason) for e in report.bad] == [("sample_0_1", True)]
