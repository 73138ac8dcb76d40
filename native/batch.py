"""The columnar batch: the unit that moves through the whole data path.

A batch is four parallel arrays: point ids (uint32), timestamps (int64 ms since the
epoch, UTC), values (float64) and quality flags (uint8). Drivers build batches,
the pipeline filters them, the codec packs them. Only a batch's edges touch Python
objects; the kernels in ``native/`` work on the arrays (``array.array`` supports
the buffer protocol, so Cython typed memoryviews read them without copies).
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

# Quality flags. GOOD must stay 0 so that the common case compresses to nothing.
GOOD = 0
BAD = 1  # the device reported an error or the reading failed validation
UNCERTAIN = 2  # a value is present but not trusted (e.g. sensor warming up)
#: the device itself said it has no value (a Modbus "not available" marker such as
#: 0x7FFFFFFF, a NaN float): the value is NaN; no stage turns it into a number or GOOD,
#: and a range stage leaves it as it is (it is not out of range, it is absent)
UNAVAILABLE = 3

QUALITY_NAMES = {GOOD: "good", BAD: "bad", UNCERTAIN: "uncertain", UNAVAILABLE: "unavailable"}

ID_TYPECODE = "I"  # uint32
TS_TYPECODE = "q"  # int64
VALUE_TYPECODE = "d"  # float64
QUALITY_TYPECODE = "B"  # uint8

assert array(ID_TYPECODE).itemsize == 4, "platform 'I' is not 32-bit"

#: the raw form of a batch (`to_bytes`): magic, reading count, then the four columns
#: little-endian. Not a wire format: the buffer's intake keeps batches in it.
_RAW_MAGIC = b"CGR1"
_RAW_HEADER = struct.Struct("<4sI")
_ROW_BYTES = 4 + 8 + 8 + 1


def _ids() -> array[int]:
    return array(ID_TYPECODE)


def _ts() -> array[int]:
    return array(TS_TYPECODE)


def _values() -> array[float]:
    return array(VALUE_TYPECODE)


def _quality() -> array[int]:
    return array(QUALITY_TYPECODE)


@dataclass(slots=True)
class Batch:
    """Parallel arrays of readings. All four arrays always have the same length."""

    point_ids: array[int] = field(default_factory=_ids)
    timestamps: array[int] = field(default_factory=_ts)
    values: array[float] = field(default_factory=_values)
    quality: array[int] = field(default_factory=_quality)

    def __post_init__(self) -> None:
        n = len(self.point_ids)
        if not (len(self.timestamps) == len(self.values) == len(self.quality) == n):
            raise ValueError(
                "batch columns differ in length: "
                f"ids={n} timestamps={len(self.timestamps)} "
                f"values={len(self.values)} quality={len(self.quality)}"
            )
        for name, col, code in (
            ("point_ids", self.point_ids, ID_TYPECODE),
            ("timestamps", self.timestamps, TS_TYPECODE),
            ("values", self.values, VALUE_TYPECODE),
            ("quality", self.quality, QUALITY_TYPECODE),
        ):
            if col.typecode != code:
                raise TypeError(f"batch column {name} has typecode {col.typecode!r}, need {code!r}")

    def __len__(self) -> int:
        return len(self.point_ids)

    def append(self, point_id: int, timestamp_ms: int, value: float, quality: int = GOOD) -> None:
        self.point_ids.append(point_id)
        self.timestamps.append(timestamp_ms)
        self.values.append(value)
        self.quality.append(quality)

    def extend(self, other: Batch) -> None:
        self.point_ids.extend(other.point_ids)
        self.timestamps.extend(other.timestamps)
        self.values.extend(other.values)
        self.quality.extend(other.quality)

    def slice(self, start: int, stop: int) -> Batch:
        return Batch(
            self.point_ids[start:stop],
            self.timestamps[start:stop],
            self.values[start:stop],
            self.quality[start:stop],
        )

    def rows(self) -> Iterator[tuple[int, int, float, int]]:
        """One tuple per reading: for tests, tools and the batch's edges, not hot paths."""
        return zip(self.point_ids, self.timestamps, self.values, self.quality, strict=True)

    def to_bytes(self) -> bytes:
        """The columns' raw bytes (see `from_bytes`): a copy per column, no per-reading work."""
        cols: list[array[Any]] = [self.point_ids, self.timestamps, self.values, self.quality]
        if sys.byteorder == "big":
            cols = [array(c.typecode, c) for c in cols]
            for c in cols:
                c.byteswap()
        return _RAW_HEADER.pack(_RAW_MAGIC, len(self)) + b"".join(c.tobytes() for c in cols)

    @classmethod
    def from_bytes(cls, data: bytes) -> Batch:
        """The batch `to_bytes` made; ValueError if `data` is not one."""
        if len(data) < _RAW_HEADER.size:
            raise ValueError(f"raw batch too short: {len(data)} bytes")
        magic, n = _RAW_HEADER.unpack_from(data)
        if magic != _RAW_MAGIC or len(data) != _RAW_HEADER.size + n * _ROW_BYTES:
            raise ValueError(f"not a raw batch (magic {magic!r}, {len(data)} bytes for {n})")
        ids, ts, values = _ids(), _ts(), _values()
        at = _RAW_HEADER.size
        cols: tuple[array[Any], ...] = (ids, ts, values)
        for col in cols:
            size = n * col.itemsize
            col.frombytes(data[at : at + size])
            at += size
            if sys.byteorder == "big":
                col.byteswap()
        return cls(ids, ts, values, array(QUALITY_TYPECODE, data[at:]))

    @classmethod
    def at(cls, timestamp_ms: int, point_ids: Iterable[int], values: Iterable[float]) -> Batch:
        """Good readings of several points taken at one moment (one poll, one response)."""
        ids = array(ID_TYPECODE, point_ids)
        n = len(ids)
        return cls(
            ids,
            array(TS_TYPECODE, [timestamp_ms]) * n,
            array(VALUE_TYPECODE, values),
            array(QUALITY_TYPECODE, bytes(n)),
        )

    @classmethod
    def concat(cls, batches: Iterable[Batch]) -> Batch:
        out = cls()
        for b in batches:
            out.extend(b)
        return out

    @classmethod
    def regroup(cls, batches: Iterable[Batch], rows: int) -> list[Batch]:
        """The readings of ``batches``, in order, as new batches of ``rows`` readings
        (the last one fewer): consecutive small batches joined, big ones cut, as slicing
        their concatenation would, without ever copying more than ``rows`` readings at
        once. The results are new arrays: a caller may modify them."""
        if rows <= 0:
            raise ValueError(f"rows must be > 0, got {rows}")
        out: list[Batch] = []
        cur = cls()
        for b in batches:
            at, n = 0, len(b)
            while at < n:
                take = min(rows - len(cur), n - at)
                cur.extend(b if take == n else b.slice(at, at + take))
                at += take
                if len(cur) == rows:
                    out.append(cur)
                    cur = cls()
        if len(cur):
            out.append(cur)
        return out

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[int, int, float, int]]) -> Batch:
        out = cls()
        for pid, ts, value, q in rows:
            out.append(pid, ts, value, q)
        return out
