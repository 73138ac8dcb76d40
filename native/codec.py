"""The batch codec: a batch to compact bytes and back, bit-exact.

``encode`` writes version 2; ``decode`` reads versions 1 and 2 (dispatch on the version
byte through ``_DECODERS``: a later version adds an entry and keeps reading the older
ones). Any malformed input raises ``CodecError`` (a ValueError): wrong magic, unknown
version, truncated, corrupt, trailing bytes, counts that do not add up.

Wire format, version 2
======================

Notation: ``u8`` one byte; ``u32le`` four bytes little-endian; ``varint`` unsigned
LEB128 (7 bits a byte, lowest group first, high bit = "more follows", at most 10 bytes,
value < 2**64); ``zz(x)`` zigzag of a signed 64-bit integer: ``(x << 1) ^ (x >> 63)``
(0, -1, 1, -2 ... -> 0, 1, 2, 3 ...). Timestamp arithmetic wraps mod 2**64, so every
int64 sequence (backwards, repeated, extremes) round-trips. Bit streams are LSB-first:
each field of n bits takes the next n bit positions, lowest bit first; byte i of a
stream holds positions 8i..8i+7; a stream ends at a byte boundary (zero padding).

Message::

    "CGB"                       magic
    u8        2                 version
    u8        L                 gateway id length (0..255), then L bytes of UTF-8
    varint    seq               sender's sequence number (0..2**64-1)
    varint    S << 2 | T << 1 | Q
                                S = number of series (points); T = 1: the table is in
                                integer blocks; Q = 1: some quality is not GOOD
    series table                S ids and S counts (below)
    ceil(n/128) timestamp blocks      n = the sum of the counts
    ceil(n/128) value blocks
    if Q: varint R >= 1, R x (u8 quality, varint run >= 1), runs adding up to n
    u32le     crc               zlib.crc32 of every byte before it

Rows: the readings grouped by point id, ascending (a stable sort: each point's readings
keep their batch order); row i has a position j in its series (j = 0: the series starts
there). The order across points is not kept: the platform stores by point and time.
Timestamp and value blocks cover 128 consecutive rows each (the last may be shorter),
wherever series begin, so a message of many points with one reading each shares blocks.

Series table: id elements (the first id, then each id minus the previous one minus 1)
and count elements (count - 1). T = 0: S x (varint id element, varint count element).
T = 1: ceil(S/128) integer blocks of the id elements, then as many of the counts. The
encoder picks the smaller (ties: T = 0).

Integer block of m (1..128) unsigned 64-bit values u[0..m-1] (PFOR)::

    u8        w | E << 7        bit width w (0..64); E = 1 when there are exceptions
    if E: u8  ne - 1            ne (1..m) exceptions; never with w = 64
    ceil(m*w/8) bytes           bit stream of the low w bits of every u[j], in order
    ne x (u8 j, varint h)       exception: u[j] = low bits | h << w; j ascending, h != 0

The encoder picks the w with the smallest exact byte size (from the histogram of the
values' bit lengths; ties: the larger w): rare steps and spikes become exceptions
instead of widening the whole block, and a block of zeros costs one byte.

Timestamp block, rows k = 0..m-1 of the block. A row with j = 0 always holds
``zz(t - F)``, F = the previous series' first timestamp (0 for the first series).

* D (the block starts with an integer block's header byte): an integer block where a
  row with j = 1 holds ``zz(t[i] - t[i-1])`` and j >= 2 the delta-of-delta
  ``zz((t[i] - t[i-1]) - (t[i-1] - t[i-2]))``.
* G, grid (first byte 0xFF): ``varint zz(P - P')``, ``varint zz(B - B')``, an integer
  block where a row with j >= 1 holds ``t - (B + k * P)`` (unsigned). P is the period
  and P' the previous G block's (0 before the first); B is the grid base, and
  ``B' = t[f-1] + (1 - f) * P`` with f the block's first row with j >= 1 (a G block
  has one). Fixed-rate polls answered after a variable delay then cost the bits of the
  delay alone, where delta-of-delta pays for the difference of three delays.

The encoder takes the smallest of D, G with P estimated from the block (the rounded mean
delta over its first run of one series) and G with P' (when different and not 0).

Value block (m rows), one mode byte then:

* ``k | o`` with k in 0..9 and o in (0, 0x10), decimal: the readings are
  ``s / 10**k`` with integers ``|s| < 2**53``, ``s = floor(v * 10**k + 0.5)`` (double
  arithmetic) and ``s / 10**k`` giving v back bit-exactly (so -0.0, NaN, inf never
  qualify). An integer block follows of zz(s - prediction). With h = the number of rows
  of the same series before it in the block: h = 0 and j = 0: 0; h = 0 and j > 0 (the
  block's first row continues a series): ``floor(prev * 10**k + 0.5)`` of the previous
  row's value when finite and below 2**53 in magnitude, else 0; h = 1, or o = 0: the
  previous s; else (o = 0x10, second differences) ``2 * s[-1] - s[-2]``. The encoder
  uses the smallest k that qualifies, and o = 0x10 only when strictly smaller.
* ``0x40``, XOR: a bit stream; per row, x = its value's IEEE-754 bits XOR the previous
  row's (0 when j = 0), and a 2-bit code: 0: x = 0; 1: x has more than 6 trailing zeros:
  a 3-bit lead code, a 6-bit length c (1..57), the c bits of x above its trailing zeros;
  2: the low 64-lead bits of x, with lead from the lead state; 3: a 3-bit lead code, the
  low 64-lead bits of x. A lead code indexes (0, 8, 12, 16, 18, 20, 22, 24), the
  leading-zero count rounded down to one of them; codes 1 and 3 set the lead state (none
  at the message's start; code 2 without one is corrupt). Bit-exact for any float64,
  NaN payloads included.

The encoder writes the smaller of the two (decimal on ties; XOR is not computed when
the decimal block is no larger than XOR's floor of 2 bits a row). The decoder checks
every length, width, position and count against the message; a body of N bytes can
hold at most 43 * N readings and 64 * N series, so a small blob cannot make it allocate
much; the CRC-32 is checked before any of it.

Design notes (measured with an earlier bench/codec.py, on two real and five synthetic
city series; the current one, on 14 real series, finds v2 1.37x pcodec's size at
600-reading messages: the next version adds an entropy stage):
polled timestamps are regular (delta-of-delta mostly 0) or a fixed-rate grid plus a
response delay (grid blocks: 4 bits a reading for 0..9 ms of delay against 5.3 for
delta-of-delta); sensor values are decimals with few digits, so scaled-integer
differences take a few bits where XOR of their binary fractions takes 20-50; smooth
hourly series (air temperature) gain about a bit a reading from second differences; the
XOR path keeps full-precision and special values exact. Blocks spanning series and the
integer-block table keep the runtime's usual message (every point polled once or twice
since the last flush) near 2.5 bytes a reading instead of 7 with per-series blocks.

Wire format, version 1 (all integers little-endian)::

    b"CGB"  version:u8 = 1  count:u32  zlib( ids | timestamps | values | quality )

    ids         count x u32: delta to the previous id (first: to 0) mod 2**32, byte-shuffled
    timestamps  count x u64: delta to the previous timestamp (first: to 0) mod 2**64
    values      count x f64: the raw IEEE-754 bits, byte-shuffled
    quality     count x u8

Version 1 keeps the batch's row order and carries no gateway id or seq.
"""

from __future__ import annotations

import struct
import sys
import zlib
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import TypeAlias

from native import impl
from native.batch import Batch

FORMAT_VERSION = 2
MAGIC = b"CGB"

_PREFIX = len(MAGIC) + 1  # magic + version byte
_COUNT = struct.Struct("<I")
_CRC = struct.Struct("<I")
_ROW_BYTES = 4 + 8 + 8 + 1  # id, timestamp, value, quality
_BIG_ENDIAN = sys.byteorder == "big"
_U64 = 2**64
_V2_HEAD = MAGIC + bytes((2,))


Buffer: TypeAlias = bytes | memoryview


class CodecError(ValueError):
    """The bytes are not a batch this build can decode (or a batch cannot be encoded)."""


class UnknownVersionError(CodecError):
    """A batch of a codec version this build does not read (a newer gateway)."""


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    """A decoded message: its format version, the sender's gateway id and sequence
    number (version 1 carries neither: "" and 0) and the readings."""

    version: int
    gateway: str
    seq: int
    batch: Batch


def _codec_kernels() -> ModuleType:
    """The compiled body codec, or its twin (tests replace this to pick one)."""
    return impl.kernels("codec")


@lru_cache(maxsize=64)
def _header(gateway: str) -> bytes:
    """Magic, version and the length-prefixed gateway id."""
    gw = gateway.encode("utf-8")
    if len(gw) > 255:
        raise CodecError(f"gateway id of {len(gw)} UTF-8 bytes: at most 255 fit")
    return _V2_HEAD + bytes((len(gw),)) + gw


def _varint(v: int) -> bytes:
    if v < 0x80:
        return _SMALL[v]
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


_SMALL = [bytes((i,)) for i in range(0x80)]


def encode(
    batch: Batch, *, gateway: str = "", seq: int = 0, kernels: ModuleType | None = None
) -> bytes:
    """The batch as version-2 bytes, readings grouped by point id (see the module doc).
    ``kernels``: the body codec module to use (default: compiled when built)."""
    if not 0 <= seq < _U64:
        raise CodecError(f"seq {seq} is outside 0 .. 2**64-1")
    mod = kernels if kernels is not None else _codec_kernels()
    try:
        msg: bytes = mod.encode_body(
            batch.point_ids,
            batch.timestamps,
            batch.values,
            batch.quality,
            _header(gateway) + _varint(seq),
        )
    except ValueError as exc:
        raise CodecError(str(exc)) from None
    return msg + _CRC.pack(zlib.crc32(msg))


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


def _unshuffle(data: bytes, width: int) -> bytes:
    n = len(data) // width
    out = bytearray(len(data))
    for i in range(width):
        out[i::width] = data[i * n : (i + 1) * n]
    return bytes(out)


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


def _message_v1(data: Buffer, kernels: ModuleType | None) -> tuple[str, int, Batch]:
    return "", 0, _decode_v1(memoryview(data)[_PREFIX:])


def _message_v2(data: Buffer, kernels: ModuleType | None) -> tuple[str, int, Batch]:
    """``data``: the whole message (magic and version checked)."""
    n = len(data)
    if n < _PREFIX + 1 + 1 + 1 + _CRC.size:  # gateway length, seq, series count, CRC
        raise CodecError(f"truncated: {n} bytes, a version-2 batch has at least 11")
    end = n - _CRC.size
    stored = int.from_bytes(data[end:], "little")
    computed = zlib.crc32(data[:end])
    if stored != computed:
        raise CodecError(
            f"CRC-32 mismatch (stored {stored:#010x}, computed {computed:#010x}): "
            "the message is truncated, corrupt or has trailing bytes"
        )
    mod = kernels if kernels is not None else _codec_kernels()
    try:
        gateway, seq, ids, ts, values, quality = mod.decode_payload(data, _PREFIX, end)
    except ValueError as exc:
        raise CodecError(str(exc)) from None
    return gateway, seq, Batch(ids, ts, values, quality)


# version -> decoder of the whole message, giving (gateway, seq, batch)
_DECODERS: dict[int, Callable[[Buffer, ModuleType | None], tuple[str, int, Batch]]] = {
    1: _message_v1,
    2: _message_v2,
}


def _decode(
    data: bytes | bytearray | memoryview, kernels: ModuleType | None
) -> tuple[int, str, int, Batch]:
    buf: Buffer
    if type(data) is bytes:
        buf = data
    else:
        try:
            buf = memoryview(data).cast("B")
        except TypeError as exc:  # a non-contiguous or multi-dimensional buffer
            raise CodecError(f"not a byte buffer: {exc}") from None
    if len(buf) < _PREFIX:
        raise CodecError(f"truncated: {len(buf)} bytes, a batch starts with {_PREFIX}")
    magic = bytes(buf[: len(MAGIC)])
    if magic != MAGIC:
        raise CodecError(f"bad magic {magic!r}, expected {MAGIC!r}: not a citygw batch")
    version = buf[len(MAGIC)]
    decoder = _DECODERS.get(version)
    if decoder is None:
        readable = ", ".join(str(v) for v in sorted(_DECODERS))
        raise UnknownVersionError(
            f"codec version {version} is not supported (this build reads {readable})"
        )
    return (version, *decoder(buf, kernels))


def decode_message(
    data: bytes | bytearray | memoryview, *, kernels: ModuleType | None = None
) -> DecodedBatch:
    """The message in ``data`` with its header fields; raises CodecError for anything
    but a whole, valid message of a supported version."""
    return DecodedBatch(*_decode(data, kernels))


def decode(data: bytes | bytearray | memoryview, *, kernels: ModuleType | None = None) -> Batch:
    """The batch in ``data``; raises CodecError for anything but a whole, valid message."""
    return _decode(data, kernels)[3]


def value_block_modes(data: bytes | bytearray | memoryview) -> list[str]:
    """The path of each value block of a version-2 message, in order: "decimal k" (k
    digits) or "xor". For tests and tools; raises CodecError like decode."""
    if decode_message(data).version != 2:  # validates everything, the CRC first
        raise CodecError("value blocks exist in version-2 messages only")
    modes: list[int] = []
    _codec_kernels().decode_payload(data, _PREFIX, len(data) - _CRC.size, modes)
    return [
        "xor" if m == 0x40 else f"decimal {m & 0x0F}" + (" order 2" if m & 0x10 else "")
        for m in modes
    ]
