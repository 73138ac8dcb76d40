"""The batch codec: a batch to compact bytes and back, bit-exact.

``encode`` writes version 3 (version 2 on request, for tests and comparisons); ``decode``
reads versions 1, 2 and 3 (dispatch on the version byte through ``_DECODERS``: a later
version adds an entry and keeps reading the older ones). Any malformed input raises
``CodecError`` (a ValueError): wrong magic, unknown version, truncated, corrupt, trailing
bytes, counts that do not add up.

Wire format, version 3
======================

Version 3 keeps version 2's frame, series table, row order, 128-row blocks and
predictors (below), and codes every residual with an adaptive binary range coder instead
of bit-packing it. Notation as in version 2.

Message::

    "CGB"                       magic
    u8        3                 version
    u8        L                 gateway id length, then L bytes of UTF-8
    varint    seq
    varint    S << 2 | T << 1 | Q, and the series table    exactly as in version 2
    if Q: the quality runs                                  as in version 2 (here, before
                                                            the coded data)
    varint    U >= 1            timestamp unit: every delta within a series is a
                                multiple of U (the encoder writes their GCD, 1 if none)
    varint    C                 length of the range-coded stream
    C bytes                     range-coded stream
    the raw bit stream          LSB-first (as in version 2), to the CRC; the decoder
                                refuses 8 or more bits left over
    u32le     crc               zlib.crc32 of every byte before it

Range coder (LZMA's binary coder). Probabilities are 11-bit: p in 1..2047 is the chance
of a 0 in 2048ths, every one starts at 1024 in every message. The decoder holds
``range`` (32 bits, starts 0xFFFFFFFF) and ``code`` (32 bits: the stream's first 4 bytes,
big-endian). To decode a bit with probability p: ``bound = (range >> 11) * p``; if
``code < bound``: bit 0, ``range = bound``, ``p += (2048 - p) >> 4``; else bit 1,
``code -= bound``, ``range -= bound``, ``p -= p >> 4``. Then, while ``range < 2**24``:
``range <<= 8``, ``code = (code << 8 | next byte) mod 2**32``. Reading past the C bytes
gives zeros, at most 4 of them (the encoder drops up to 4 trailing zero bytes, and the
first byte of LZMA's output, always 0); a fifth is "truncated".

Integer model. An unsigned 64-bit u is coded against a model M, which holds the bit
length ``pb`` of its previous integer (0 at first) and its own probabilities. With
``b = bit length of u``: a bit "b != pb" [ctx (pb, same)]; if 1, a bit "b > pb" [ctx
(pb, up)], then for d = 1, 2 ...: a bit "continue" [ctx (pb, direction, min(d, 8))]
until a 0 or until b would leave 0..64 (then the stop is implied; a decoder that would
go past 64, or below 0, has corrupt input); ``b = pb +- d``. Then, if b >= 2: the bit
below the leading one [ctx (b)] and the b - 2 lower bits from the raw stream. u = 0 and
1 have b = 0 and 1. M.pb = b.

A message uses these models, each fresh: T0 (a series' first timestamp), T1 (a first
delta), T2 (delta-of-delta), TG (grid residuals), TP (grid parameters), V0 (a series'
first value, j = 0), V (other value residuals; V0 and V serve both value modes), X
(extra digits), XR (class-1 residuals), XD (divisors), A (adjustments), S (seasons);
and flag probabilities: the timestamp mode (2, by the previous block's mode), the value
mode (2, by the previous block's), "k changed", "order 2", "season", "escapes",
"float32", "fraction", and the row class (4 x 3, by the class of the last row that
had one in the message, 0 at first).

Rows: as in version 2 (grouped by point id; j = position in its series). Blocks of 128
rows, each its timestamp part then its value part, coded in order.

Timestamp part. If the block has a row with j >= 1: a flag "grid" (0: D). If grid:
``zz(P - P')`` and ``zz(B - B')`` with TP, P, P' and B' as in version 2 (B' is taken
from the row before the block's first row with j >= 1, so a decoder computes B when it
reaches that row). Then per row:

* j = 0: T0, ``zz(t - F)``, F = the previous series' first timestamp (0 at first);
* grid, j >= 1: TG, ``t - (B + k * P)`` mod 2**64 (k: the row's index in the block);
* D, j = 1: T1, ``zz(d / U - D')`` with d = t - t[-1] (a signed 64-bit delta, a
  multiple of U) and D' the last j = 1 row's d / U in the message (0 at first; every
  j = 1 row, grid or not, sets it): series polled alike share their period;
* D, j >= 2: T2, ``zz(d / U - d' / U)`` (d' the delta before; mod 2**64).

Value part. A flag "ordered bits" (by the previous block's value mode).

* Ordered bits: a flag "float32". Per row, V (V0 when j = 0) codes
  ``zz(o(x) - o(x'))`` where x is the value's float64 bits (or float32 bits when the
  flag is set: every value of the block is exactly a float32, NaN payloads included;
  differences mod 2**32, zigzag over 32 bits), x' the previous row's (float32: its
  float32 bits when it is exactly one, else 0) or 0 when j = 0, and ``o(x)`` maps bits
  to order: ``x XOR all-ones`` when the sign bit is set, else ``x OR sign bit``.
* Decimal: a flag "k changed", and if set 4 raw bits k (0..15; the message starts with
  k = 0); if some row has j >= 2 and index >= 2 in the block: a flag "order 2", and if
  it is 0 a flag "season", and if that is 1, S codes ``zz(P - P')`` (P' the last
  season in the message, 0 at first; 2 <= P <= 2**20); a flag "escapes". Per row (with
  "escapes": a class of two flag bits, high then low [ctx (previous class, node)];
  otherwise class 0):

  - class 0: V (V0 when j = 0) codes ``zz(s - pred)``, the value is ``s / 10**k``
    (double division);
  - class 1 (apart), a flag "fraction", then either more decimals: X codes e - 1
    (e >= 1, k + e <= 15), XR codes ``zz(s' - pred * 10**e)`` (mod 2**64), the value
    is ``s' / 10**(k+e)``; or a fraction (an average of d readings, however its digits
    were printed): XD codes d - 2 (2 <= d <= 17, d * 10**k <= 2**53), XR codes
    ``zz(N - pred * d)`` (mod 2**64, ``|N| < 2**53``), A codes ``zz(a)``, and the value's
    bits are ``o^-1(o(bits of N / (d * 10**k)) + a)`` (a finite value); either way the
    row's ``s = floor(value * 10**k + 0.5)`` and the value becomes the escape register
    E;
  - class 2: the value's bits are E (at first the canonical NaN 0x7FF8000000000000);
  - class 3: 64 raw bits (low 32 first) are the value; it becomes E.

  Every ``|s|``, ``|s'|`` is below 2**53. ``pred``, with h = class-0/1 rows of this
  series so far in the block: h = 0: ``floor(G * 10**k + 0.5)`` with G the series' last
  finite value of a class-0/1 row (any finite value in an ordered-bits block) when there
  is one and the result is below 2**53 in magnitude, else 0; h = 1 or no order 2: the
  last s; else ``2 * s[-1] - s[-2]``. With a season P, a row with j > P adds
  ``floor(y1 * 10**k + 0.5) - floor(y2 * 10**k + 0.5)`` (each 0 when not below 2**53
  in magnitude) for the values y1, y2 of the rows P and P + 1 before it, when both are
  finite: the change one period ago. Classes 2 and 3 change neither s nor G.

Encoder choices (none affects decoding): the unit is the GCD of the deltas; D or grid by
an estimate in bit lengths (as version 2 chooses, with P from the block or P'); per value
block, decimal at the k covering all, 7/8, 3/4 and half of the block's decimal values,
with first or second differences, or a season (the rows in a day at the block's first
delta, 12 for months, 7 for days), or ordered bits, whichever has the smallest estimate
(bit lengths of the residuals; a row apart: the cheaper form; a raw value 66). A decoder
refuses a body of N bytes that claims more than ``min(2**20, 400 * (N + 16))``
readings (a row costs at least two coded bits of probability 2033/2048), and checks
every length, width, digit count and range.

Measured on 14 real series (bench/codec.py): 0.58 of pcodec's size at 600-reading
messages (geometric mean; version 2: 1.37) and 0.60 on whole series (version 2: 1.69);
what version 2 paid most for (calendar timestamps, NaN gaps, averages printed with 15
digits, all on XOR before) now costs a few bits.

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
city series; on 14 real series v2 is 1.37x pcodec's size at 600-reading messages, which
version 3 addressed):
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

import importlib
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

FORMAT_VERSION = 3
MAGIC = b"CGB"

_PREFIX = len(MAGIC) + 1  # magic + version byte
_COUNT = struct.Struct("<I")
_CRC = struct.Struct("<I")
_ROW_BYTES = 4 + 8 + 8 + 1  # id, timestamp, value, quality
_BIG_ENDIAN = sys.byteorder == "big"
_U64 = 2**64


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


# version -> the kernel pair (native/_<pair>.pyx, native/<pair>_py.py) of its body
_BODY_KERNELS = {2: "codec", 3: "codec3"}


def _kernels(version: int, implementation: str | None) -> ModuleType:
    """The body codec of ``version`` in ``implementation`` ("cython" or "python"; None:
    the one in use, see native.impl)."""
    pair = _BODY_KERNELS[version]
    if implementation is None:
        return impl.kernels(pair)
    if implementation not in ("cython", "python"):
        raise ValueError(f"implementation {implementation!r}: 'cython' or 'python'")
    prefix = "native._" if implementation == "cython" else "native."
    return importlib.import_module(prefix + pair + ("" if implementation == "cython" else "_py"))


@lru_cache(maxsize=64)
def _header(gateway: str, version: int) -> bytes:
    """Magic, version and the length-prefixed gateway id."""
    gw = gateway.encode("utf-8")
    if len(gw) > 255:
        raise CodecError(f"gateway id of {len(gw)} UTF-8 bytes: at most 255 fit")
    return MAGIC + bytes((version, len(gw))) + gw


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
    batch: Batch,
    *,
    gateway: str = "",
    seq: int = 0,
    implementation: str | None = None,
    version: int = FORMAT_VERSION,
) -> bytes:
    """The batch as bytes of ``version`` (3; 2 is what gateways before codec v3 send,
    kept for tests and comparisons), readings grouped by point id (see the module doc).
    ``implementation``: "cython" or "python" (default: the compiled one when built)."""
    if not 0 <= seq < _U64:
        raise CodecError(f"seq {seq} is outside 0 .. 2**64-1")
    if version not in _BODY_KERNELS:
        raise CodecError(f"codec version {version} cannot be written (2 or 3)")
    mod = _kernels(version, implementation)
    try:
        msg: bytes = mod.encode_body(
            batch.point_ids,
            batch.timestamps,
            batch.values,
            batch.quality,
            _header(gateway, version) + _varint(seq),
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


def _message_v1(data: Buffer, implementation: str | None) -> tuple[str, int, Batch]:
    return "", 0, _decode_v1(memoryview(data)[_PREFIX:])


# the fewest bytes of a message: gateway length, seq, series head (version 3: the
# timestamp unit and the range-coded length too), CRC
_MIN_SIZE = {2: _PREFIX + 3 + _CRC.size, 3: _PREFIX + 5 + _CRC.size}


def _message(
    data: Buffer, implementation: str | None, modes: list[object] | None = None
) -> tuple[str, int, Batch]:
    """A version-2 or -3 message (``data``: the whole of it, magic checked)."""
    n = len(data)
    version = data[len(MAGIC)]
    if n < _MIN_SIZE[version]:
        raise CodecError(
            f"truncated: {n} bytes, a version-{version} batch has at least {_MIN_SIZE[version]}"
        )
    end = n - _CRC.size
    stored = int.from_bytes(data[end:], "little")
    computed = zlib.crc32(data[:end])
    if stored != computed:
        raise CodecError(
            f"CRC-32 mismatch (stored {stored:#010x}, computed {computed:#010x}): "
            "the message is truncated, corrupt or has trailing bytes"
        )
    mod = _kernels(version, implementation)
    try:
        gateway, seq, ids, ts, values, quality = mod.decode_payload(data, _PREFIX, end, modes)
    except ValueError as exc:
        raise CodecError(str(exc)) from None
    return gateway, seq, Batch(ids, ts, values, quality)


# version -> decoder of the whole message, giving (gateway, seq, batch)
_DECODERS: dict[int, Callable[[Buffer, str | None], tuple[str, int, Batch]]] = {
    1: _message_v1,
    2: _message,
    3: _message,
}


def _decode(
    data: bytes | bytearray | memoryview, implementation: str | None
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
    return (version, *decoder(buf, implementation))


def decode_message(
    data: bytes | bytearray | memoryview, *, implementation: str | None = None
) -> DecodedBatch:
    """The message in ``data`` with its header fields; raises CodecError for anything
    but a whole, valid message of a supported version."""
    return DecodedBatch(*_decode(data, implementation))


def decode(data: bytes | bytearray | memoryview, *, implementation: str | None = None) -> Batch:
    """The batch in ``data``; raises CodecError for anything but a whole, valid message."""
    return _decode(data, implementation)[3]


def value_block_modes(data: bytes | bytearray | memoryview) -> list[str]:
    """The path of each value block of a version-2 or -3 message, in order. Version 2:
    "decimal k" (k digits, " order 2": second differences) or "xor"; version 3 also
    " season P" (the change P rows before), " esc" (the block has rows coded apart from
    its decimals), "float32", "float64" (ordered-bits differences). For tests and tools;
    raises CodecError like decode."""
    version = decode_message(data).version  # validates everything, the CRC first
    if version not in _BODY_KERNELS:
        raise CodecError("value blocks exist in version-2 and -3 messages only")
    modes: list[object] = []
    _message(bytes(data), None, modes)
    if version == 3:
        return [str(m) for m in modes]
    return [
        "xor" if m == 0x40 else f"decimal {int(m) & 0x0F}" + (" order 2" if int(m) & 0x10 else "")
        for m in modes
        if isinstance(m, int)
    ]
