"""The batch codec: a batch to compact bytes and back, bit-exact.

Wire format, version 1 (all integers little-endian)::

    b"CGB"  version:u8 = 1  count:u32  zlib( ids | timestamps | values | quality )

    ids         count x u32: delta to the previous id (first: to 0) mod 2**32, byte-shuffled
    timestamps  count x u64: delta to the previous timestamp (first: to 0) mod 2**64
    values      count x f64: the raw IEEE-754 bits, byte-shuffled
    quality     count x u8

Why: ids cycle through the same points, so their deltas are a few repeating small numbers;
timestamp deltas are 0 within one poll and the poll period between polls; shuffling puts
the sign/exponent/high-mantissa bytes of all values together, where they repeat. Deltas
wrap, so any int64 sequence (backwards, extremes) round-trips. Byte-shuffled timestamps
compressed worse than plain deltas on sensor-like data, so they are not shuffled.

Decoding dispatches on the version byte through ``_DECODERS``: a later version adds an
entry and keeps reading version 1. Any malformed input raises ``CodecError``.
"""

from __future__ import annotations

import struct
import sys
import zlib
from array import array
from collections.abc import Callable

from native import impl
from native.batch import Batch

FORMAT_VERSION = 1
MAGIC = b"CGB"
DEFAULT_LEVEL = 6  # zlib level; the decoder does not care which one was used

_PREFIX = len(MAGIC) + 1  # magic + version byte
_COUNT = struct.Struct("<I")
_ROW_BYTES = 4 + 8 + 8 + 1  # id, timestamp, value, quality
_BIG_ENDIAN = sys.byteorder == "big"


class CodecError(ValueError):
    """The bytes are not a batch this build can decode (or a batch cannot be encoded)."""


def _le(col: array[int] | array[float]) -> bytes:
    """The column's bytes in little-endian order whatever the host."""
    if _BIG_ENDIAN:
        col = array(col.typecode, col)
        col.byteswap()
    return col.tobytes()


def _from_le(typecode: str, data: bytes) -> array[int]:
    col: array[int] = array(typecode, data)
    if _BIG_ENDIAN:
        col.byteswap()
    return col


def _shuffle(data: bytes, width: int) -> bytes:
    """Byte plane i holds byte i of every item."""
    return b"".join(data[i::width] for i in range(width))


def _unshuffle(data: bytes, width: int) -> bytes:
    n = len(data) // width
    out = bytearray(len(data))
    for i in range(width):
        out[i::width] = data[i * n : (i + 1) * n]
    return bytes(out)


def encode(batch: Batch, level: int = DEFAULT_LEVEL) -> bytes:
    """The batch as version-1 bytes. ``level`` is zlib's (1 fastest .. 9 smallest)."""
    n = len(batch)
    if n > 0xFFFFFFFF:
        raise CodecError(f"batch of {n} readings is too large for one message")
    ids = array("I", batch.point_ids)
    impl.delta_encode(ids)
    ts = array("Q", batch.timestamps.tobytes())  # reinterpret: deltas wrap as unsigned
    impl.delta_encode(ts)
    body = b"".join(
        (
            _shuffle(_le(ids), 4),
            _le(ts),
            _shuffle(_le(batch.values), 8),
            batch.quality.tobytes(),
        )
    )
    return MAGIC + bytes((FORMAT_VERSION,)) + _COUNT.pack(n) + zlib.compress(body, level)


def _decode_v1(body: memoryview) -> Batch:
    if len(body) < _COUNT.size:
        raise CodecError(f"truncated: {len(body)} bytes after the version, need 4 for the count")
    (n,) = _COUNT.unpack_from(body)
    expected = n * _ROW_BYTES
    d = zlib.decompressobj()
    try:
        # Never inflate more than the header announces (plus one byte to notice excess).
        raw = d.decompress(body[_COUNT.size :], expected + 1)
    except zlib.error as exc:
        raise CodecError(f"corrupt compressed data: {exc}") from None
    if len(raw) > expected:
        raise CodecError(f"count mismatch: header says {n} readings, the data holds more")
    if not d.eof:
        raise CodecError("truncated: the compressed data ends early")
    if d.unused_data:
        raise CodecError(f"{len(d.unused_data)} bytes of trailing garbage after the batch")
    if len(raw) != expected:
        raise CodecError(
            f"count mismatch: header says {n} readings ({expected} bytes), "
            f"the data holds {len(raw)} bytes"
        )
    o_ts = 4 * n
    o_values = o_ts + 8 * n
    o_quality = o_values + 8 * n
    ids = _from_le("I", _unshuffle(raw[:o_ts], 4))
    impl.delta_decode(ids)
    ts = _from_le("Q", raw[o_ts:o_values])
    impl.delta_decode(ts)
    values: array[float] = array("d", _unshuffle(raw[o_values:o_quality], 8))
    if _BIG_ENDIAN:
        values.byteswap()
    return Batch(ids, array("q", ts.tobytes()), values, array("B", raw[o_quality:]))


# version -> decoder of what follows the version byte
_DECODERS: dict[int, Callable[[memoryview], Batch]] = {1: _decode_v1}


def decode(data: bytes | bytearray | memoryview) -> Batch:
    """The batch in ``data``; raises CodecError for anything but a whole, valid message."""
    try:
        view = memoryview(data).cast("B")
    except TypeError as exc:  # a non-contiguous or multi-dimensional buffer
        raise CodecError(f"not a byte buffer: {exc}") from None
    if len(view) < _PREFIX:
        raise CodecError(f"truncated: {len(view)} bytes, a batch starts with {_PREFIX}")
    magic = bytes(view[: len(MAGIC)])
    if magic != MAGIC:
        raise CodecError(f"bad magic {magic!r}, expected {MAGIC!r}: not a citygw batch")
    version = view[len(MAGIC)]
    decoder = _DECODERS.get(version)
    if decoder is None:
        readable = ", ".join(str(v) for v in sorted(_DECODERS))
        raise CodecError(f"codec version {version} is not supported (this build reads {readable})")
    return decoder(view[_PREFIX:])
