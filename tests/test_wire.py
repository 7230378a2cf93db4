"""fedvit.wire: the same bytes as Flower's own Array serialization, read back exactly."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array

from fedvit.wire import decode, encode, to_numpy, to_record

CASES = [
    np.random.default_rng(0).normal(size=(64, 3, 4, 4)).astype(np.float32),
    np.arange(5, dtype=np.int64),
    np.array(3.0, dtype=np.float32),  # 0-d stays 0-d
    np.random.default_rng(1).normal(size=(3, 4)).T,  # not C-contiguous
    np.zeros((0, 3), dtype=np.float16),
    np.array([True, False]),
]


@pytest.mark.parametrize("value", CASES, ids=lambda v: f"{v.dtype}{v.shape}")
def test_encode_writes_exactly_what_flower_writes_and_decode_reads_it_back(value: np.ndarray) -> None:
    ours, flowers = encode(value), Array(np.asarray(value, order="C"))
    assert (ours.dtype, tuple(ours.shape), ours.stype, ours.data) == (
        flowers.dtype,
        tuple(flowers.shape),
        flowers.stype,
        flowers.data,
    )
    back = decode(flowers)
    assert back.dtype == value.dtype and back.shape == value.shape
    np.testing.assert_array_equal(back, value)


def test_a_fortran_ordered_payload_is_read_by_flowers_own_path() -> None:
    value = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    buf = io.BytesIO()
    np.save(buf, value)  # header says fortran_order: True
    array = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=buf.getvalue())
    np.testing.assert_array_equal(decode(array), value)


def test_a_truncated_payload_is_never_misread() -> None:
    good = encode(np.arange(4, dtype=np.float32))
    short = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[:-4])
    with pytest.raises(ValueError):
        decode(short)


def test_records_round_trip_by_name() -> None:
    arrays = {"a": CASES[0], "b": CASES[1]}
    back = to_numpy(to_record(arrays))
    assert list(back) == ["a", "b"]
    for k in arrays:
        np.testing.assert_array_equal(back[k], arrays[k])


def test_a_batched_client_description_round_trips_through_flat_metric_lists() -> None:
    from fedvit.wire import pack_client_info, unpack_client_info

    rows = [
        {"num-train": 10, "train-hist": [7, 3], "tier": 2},
        {"num-train": 4, "train-hist": [0, 4], "tier": 4},
    ]
    packed = pack_client_info([5, 9], rows)
    assert packed["train-hist"] == [7, 3, 0, 4]  # metric records hold flat lists only
    assert unpack_client_info(packed) == {
        5: {"num_train": 10, "train_hist": [7, 3], "tier": 2},
        9: {"num_train": 4, "train_hist": [0, 4], "tier": 4},
    }
    assert pack_client_info([], []) == {}
