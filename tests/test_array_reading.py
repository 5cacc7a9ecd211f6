"""Reading Flower ``Array`` values: ``array_numpy`` gives exactly what ``Array.numpy()`` gives."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from flowerbed.weights import array_numpy, arrays_to_numpy, npy_header

CASES = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.array(3.5),
    np.zeros((0, 5), dtype=np.int64),
    np.array([True, False]),
    np.arange(24, dtype=np.float64).reshape(2, 3, 4).transpose(2, 0, 1),  # not contiguous: saved in C order
    np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3)),  # saved in Fortran order
    np.arange(4, dtype=">f4"),  # big-endian
]


@pytest.mark.parametrize("values", CASES, ids=lambda v: f"{v.dtype}{v.shape}")
def test_values_dtype_shape_and_order_match_flowers_reader(values):
    array = Array(values)
    for _ in range(2):  # the second read takes the kept header
        got, expected = array_numpy(array), array.numpy()
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert np.array_equal(got, expected)
        assert got.flags.writeable and got.flags.f_contiguous == expected.flags.f_contiguous


def test_each_read_is_a_fresh_copy():
    record = ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))})
    first = arrays_to_numpy(record)["w"]
    first[0] = 7.0
    assert arrays_to_numpy(record)["w"][0] == 1.0


def test_truncated_bytes_raise_as_numpy_does():
    array = Array(np.arange(10, dtype=np.float64))
    cut = Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=array.data[:-8])
    with pytest.raises(ValueError):
        cut.numpy()
    with pytest.raises(ValueError):
        array_numpy(cut)


def test_a_header_is_read_the_same_from_the_cache():
    data = Array(np.arange(6, dtype=np.int16).reshape(2, 3)).data
    assert npy_header(data) == npy_header(bytes(data)) == ((2, 3), False, np.dtype("<i2"), npy_header(data)[3])
    with pytest.raises(ValueError):
        npy_header(b"not an npy file at all")
