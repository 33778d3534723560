"""The layout module against the real-layout fixture: exact attribute types, and encode/decode round trips."""

import io

import h5py
import numpy as np
import pytest

from stemdl.workloads.spacegroup.data import layout
from stemdl.harness.errors import DataError


def _kind(value):
    return type(value), getattr(value, "dtype", None), getattr(value, "shape", None)


def test_encode_gives_the_exact_types_of_the_public_files(fixture_dir):
    with h5py.File(fixture_dir / "batch_train_0.h5", "r") as h5:
        for name in h5:
            attrs = h5[name].attrs
            rec = layout.decode_attrs(attrs, "batch_train_0.h5", name)
            encoded = layout.encode_attrs(rec)
            assert set(encoded) == set(attrs)
            for key in attrs:
                assert _kind(encoded[key]) == _kind(attrs[key]), key
                np.testing.assert_array_equal(encoded[key], attrs[key])


def test_write_sample_round_trip_through_h5py():
    rec = layout.SampleRecord(
        space_group=62, material="syn-1-train-0", formula="Fe4 O12", energy_keV=200,
        z_dirs=np.eye(3, dtype=int), y_dirs=np.eye(3)[[1, 2, 0]], semi_angles_rad=np.full(3, 2e-3),
        d_hkls_angstrom=np.array([3.1, 2.2, 1.9]), abc_angstrom=np.array([5.0, 6.0, 7.0]),
        angles_degree=np.full(3, 90.0), kinematic_class=40,
        structure=layout.Structure(np.diag([5.0, 6.0, 7.0]), np.random.rand(4, 3), np.array([26, 8, 8, 8])),
        thickness_nm=np.array([20.0, 40.0, 60.0]))
    stack = np.random.rand(3, 32, 32).astype(np.float32)
    with h5py.File(io.BytesIO(), "w") as h5:
        layout.write_sample(h5, "sample_0_0", stack, rec)
        back = layout.decode_attrs(h5["sample_0_0"].attrs, "mem.h5", "sample_0_0")
        np.testing.assert_array_equal(h5["sample_0_0/cbed_stack"][()], stack)
    assert (back.space_group, back.material, back.formula, back.energy_keV, back.kinematic_class) == \
        (62, "syn-1-train-0", "Fe4 O12", 200, 40)
    for field in ("z_dirs", "y_dirs", "semi_angles_rad", "d_hkls_angstrom", "abc_angstrom", "thickness_nm"):
        np.testing.assert_array_equal(getattr(back, field), getattr(rec, field))
    np.testing.assert_array_equal(back.structure.frac_coords, rec.structure.frac_coords)
    with h5py.File(io.BytesIO(), "w") as h5, pytest.raises(ValueError, match="float32"):
        layout.write_sample(h5, "sample_1_0", stack.astype(np.float64), rec)


@pytest.mark.parametrize("raw, ok", [(b"1", 1), (np.bytes_(b"230"), 230), ("62", 62), (14, 14),
                                     (b"0", None), (b"231", None), (b"abc", None), (b"", None), (1.5, None)])
def test_parse_label(raw, ok):
    if ok is None:
        with pytest.raises(ValueError):
            layout.parse_label(raw)
    else:
        assert layout.parse_label(raw) == ok


def test_decode_names_file_and_group_and_the_reason():
    with pytest.raises(DataError) as err:
        layout.decode_attrs({"space_group": b"12"}, "some/batch_dev_3.h5", "sample_4_0")
    message = str(err.value)
    assert message.startswith("some/batch_dev_3.h5:sample_4_0: missing attributes ")
    assert "z_dirs" in message and "\n" not in message
