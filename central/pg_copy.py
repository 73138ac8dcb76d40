"""PostgreSQL binary COPY data for `reading_blocks`, built column-wise with numpy.

One row per uplink, its readings as four parallel arrays, so the cost per reading is a
few vectorised byte copies, not a Python call (see store_postgres.py for why blocks).
Binary COPY keeps float8 bits exactly (NaN payloads, -0.0). Formats: PostgreSQL's
"COPY ... (FORMAT BINARY)" file layout and array_send's wire layout (both big-endian).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Final

import numpy as np

from native.batch import Batch

HEADER: Final = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
TRAILER: Final = b"\xff\xff"

#: the columns, in the order `rows` writes them
COLUMNS: Final = (
    "gateway",
    "seq",
    "t_min",
    "t_max",
    "received_ms",
    "point_ids",
    "timestamps",
    "vals",
    "qualities",
)

_OID_INT2: Final = 21
_OID_INT8: Final = 20
_OID_FLOAT8: Final = 701
_N_FIELDS: Final = struct.Struct(">h")
_INT8_FIELD: Final = struct.Struct(">iq")  # length 8, value
_LEN: Final = struct.Struct(">i")
_ARRAY_HEAD: Final = struct.Struct(">iiiiii")  # field length, ndim, flags, oid, n, lbound


def _array(values: np.ndarray, oid: int, dtype: str) -> bytes:
    """A one-dimensional array field (length prefix included); no NULL elements."""
    n = len(values)
    size = np.dtype(dtype).itemsize
    elements = np.empty(n, dtype=[("len", ">i4"), ("v", dtype)])
    elements["len"] = size
    elements["v"] = values
    body = elements.tobytes()
    return _ARRAY_HEAD.pack(20 + len(body), 1, 0, oid, n, 1) + body


def time_range(batch: Batch) -> tuple[int, int]:
    """(t_min, t_max) of a block: its readings' first and last time (`batch` not empty)."""
    ts = np.frombuffer(batch.timestamps, dtype=np.int64)
    return int(ts.min()), int(ts.max())


def block_row(gateway: str, seq: int, batch: Batch, received_ms: int) -> bytes:
    """One COPY row: the uplink's readings (`batch` must not be empty)."""
    ids = np.frombuffer(batch.point_ids, dtype=np.uint32)
    ts = np.frombuffer(batch.timestamps, dtype=np.int64)
    t_min, t_max = time_range(batch)
    values = np.frombuffer(batch.values, dtype=np.float64)
    quality = np.frombuffer(batch.quality, dtype=np.uint8)
    name = gateway.encode()
    return b"".join(
        (
            _N_FIELDS.pack(len(COLUMNS)),
            _LEN.pack(len(name)),
            name,
            _INT8_FIELD.pack(8, seq),
            _INT8_FIELD.pack(8, t_min),
            _INT8_FIELD.pack(8, t_max),
            _INT8_FIELD.pack(8, received_ms),
            _array(ids, _OID_INT8, ">i8"),
            _array(ts, _OID_INT8, ">i8"),
            # float64 -> big-endian float64 is a byte swap: bits (NaN payloads) kept
            _array(values, _OID_FLOAT8, ">f8"),
            _array(quality, _OID_INT2, ">i2"),
        )
    )


def copy_data(rows: Iterable[bytes]) -> bytes:
    """The whole COPY stream for the given rows."""
    return b"".join((HEADER, *rows, TRAILER))
