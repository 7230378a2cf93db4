"""Arrays on the wire: ``ArrayRecord`` ⇄ ``{name: numpy array}``, bit-identical to Flower's own
(``Array.numpy()`` / ``Array(ndarray)``: the ``.npy`` format), without its per-array cost.

Flower parses and writes each array's ``.npy`` header with ``np.load`` / ``np.save`` (~50–70 µs an
array); a ViT has ~50 tensors, so each message paid a few milliseconds both ways. Here the header
for a (dtype, shape) is built once and compared byte for byte; the payload is a zero-copy view.
Anything that does not match exactly (another serialization, Fortran order, another header version)
goes through Flower's own path, so nothing is ever misread.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

NUMPY_STYPE = "numpy.ndarray"

#: Query-reply key of a simulated node that serves any client (a *virtual worker*), and the
#: query-config key that asks it to describe a list of clients (``fedvit.client_app`` answers,
#: ``strategies.base`` asks).
VIRTUAL_WORKER, DESCRIBE = "virtual-worker", "describe-clients"

#: Records of a *pipelined* ``train`` message (``strategies.pipeline``): the evaluation of the round
#: before rides on it. ``eval-config`` is that evaluation's config, ``eval-arrays`` its arrays when
#: they differ from the training ones; the client evaluates first, then trains, and its reply adds
#: ``eval-metrics`` (what an ``evaluate`` reply's ``metrics`` would hold).
EVAL_CONFIG, EVAL_ARRAYS, EVAL_METRICS = "eval-config", "eval-arrays", "eval-metrics"


@lru_cache(maxsize=4096)
def npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered array of ``dtype`` and ``shape``."""
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def decode(array: Array) -> np.ndarray:
    """``array.numpy()``, fast for what :func:`encode` (or Flower, for small headers) writes."""
    if array.stype == NUMPY_STYPE:
        shape = tuple(int(s) for s in array.shape)
        head = npy_header(array.dtype, shape)
        data = array.data
        dtype = np.dtype(array.dtype)
        if data[: len(head)] == head and len(data) - len(head) == dtype.itemsize * int(np.prod(shape)):
            return np.frombuffer(data, dtype=dtype, offset=len(head)).reshape(shape)
    return array.numpy()


def encode(value: np.ndarray) -> Array:
    """``Array(value)``: the same bytes as ``np.save``, written without it."""
    value = np.asarray(value, order="C")  # (ascontiguousarray would turn a 0-d array into 1-d)
    if value.dtype.hasobject:
        raise TypeError("object arrays cannot be sent")
    head = npy_header(str(value.dtype), tuple(value.shape))
    data = head + value.tobytes()
    return Array(dtype=str(value.dtype), shape=tuple(value.shape), stype=NUMPY_STYPE, data=data)


def pack_client_info(ids: list[int], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A virtual worker's batched description of clients ``ids`` as ``MetricRecord`` values:
    ``clients`` lists the ids; every other key holds one value per client, or for ``*-hist`` keys
    the histograms one after the other (metrics hold flat lists only)."""
    if not rows:
        return {}
    out: dict[str, Any] = {"clients": list(ids)}
    for key in rows[0]:
        values = [r[key] for r in rows]
        out[key] = [v for vs in values for v in vs] if key.endswith("-hist") else values
    return out


def unpack_client_info(metrics: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """``{client id: {key_with_underscores: value}}`` from :func:`pack_client_info`'s output."""
    ids = [int(c) for c in metrics.get("clients", [])]
    out: dict[int, dict[str, Any]] = {c: {} for c in ids}
    for key, values in metrics.items():
        if key in ("clients", VIRTUAL_WORKER) or not ids:
            continue
        values = list(values) if isinstance(values, list) else [values] * len(ids)
        width = len(values) // len(ids)
        for i, c in enumerate(ids):
            chunk = values[i * width : (i + 1) * width]
            out[c][key.replace("-", "_")] = chunk if key.endswith("-hist") else chunk[0]
    return out


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``{name: array}`` of a record (read-only views of the message's bytes)."""
    return {k: decode(v) for k, v in record.items()}


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ``ArrayRecord`` of ``arrays`` (C-contiguous copies in ``.npy`` format)."""
    return ArrayRecord({k: encode(v) for k, v in arrays.items()})
