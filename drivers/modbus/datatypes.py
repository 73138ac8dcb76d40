"""Register images <-> values: the sans-I/O decoding and encoding of Modbus points.

A register is an int 0..65535 as it travels on the wire (high byte first). A value of
``n`` registers is ``2n`` bytes; the *order* names how those wire bytes relate to the
big-endian bytes of the value, written as letters of the value's big-endian bytes
(A = most significant):

=====  ======  =======  ===========  ==========================================
order  16-bit  32-bit   64-bit       meaning
=====  ======  =======  ===========  ==========================================
ABCD   AB      AB CD    AB CD EF GH  big-endian, the Modbus standard
CDAB   AB      CD AB    GH EF CD AB  word (register) order reversed
BADC   BA      BA DC    BA DC FE HG  bytes swapped inside each register
DCBA   BA      DC BA    HG FE DC BA  little-endian (both of the above)
=====  ======  =======  ===========  ==========================================

(Each group of two letters is one register, first register = lowest address.) So for
``int32`` 123456789 = 0x075BCD15: ABCD [0x075B, 0xCD15], CDAB [0xCD15, 0x075B],
BADC [0x5B07, 0x15CD], DCBA [0x15CD, 0x5B07].

Every order is two independent switches, which is the whole table (`_ORDERS`): how a
register is turned into two bytes (high byte first, or swapped) and whether the bytes
so obtained are read as a big- or a little-endian value. Reading little-endian reverses
all bytes, which undoes a byte swap inside the words and reverses the word order
at once: ABCD = (">", ">"), CDAB = ("<", "<"), BADC = ("<", ">"), DCBA = (">", "<").

Other data types:

- ``bool`` on a register: register != 0 (order is irrelevant).
- ``bit``: bit ``bit`` (0 = least significant) of the register read as ``uint16`` in
  the given order (BADC/DCBA swap the register's bytes first) -> 0 or 1. Not writable.
- ``string``: 2 ASCII characters per register, high byte first for ABCD and CDAB, low
  byte first for BADC and DCBA (strings have no word order: CDAB reads like ABCD, DCBA
  like BADC). Trailing NULs and spaces are stripped, non-ASCII bytes become U+FFFD;
  decoding a string never fails on its content.

`decoder` builds one decoding function per (datatype, order, bit) — the driver calls it
once per point at startup and the returned function on every poll; `decode` is the
convenience wrapper. Decoders raise ValueError on a register image of the wrong length
or with a word outside 0..65535.

Scale and offset: ``value = raw * scale + offset`` (`engineering`, `to_engineering`; an
integer raw value with a decimal scale is divided by the power of ten, so 2301 with
scale 0.1 reads 230.1, not 230.10000000000002). The inverse
(`from_engineering`) refuses, for integer types, a value whose raw value is not an
integer (beyond float rounding: 1e-9 relative) or out of the type's range, naming the
nearest values the register can hold; the simulator asks it to round instead (half to
even, Python's ``round``), as a sensor's converter would.

"Not available" markers (`markers`): the raw values a device sends instead of a
reading. For integer types they are compared on the register bits, so a marker may be
written unsigned or signed (0x8000 and -32768 are the same int16 marker, 0xFFFFFFFF and
-1 the same uint32 one); for float types they are values (float32: rounded to float32),
and a NaN is always "not available".
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from functools import cache
from typing import TYPE_CHECKING

from drivers.scale import engineering

if TYPE_CHECKING:
    from drivers.modbus.settings import DataType, Order

__all__ = [
    "BIT_TABLES",
    "COMMON_MARKERS",
    "REGISTER_TABLES",
    "decode",
    "decoder",
    "encode",
    "from_engineering",
    "marker_text",
    "markers",
    "register_count",
    "to_engineering",
]

#: tables of single bits (function codes 1, 2, 5, 15)
BIT_TABLES: frozenset[str] = frozenset({"coil", "discrete_input"})
#: tables of 16-bit registers (function codes 3, 4, 6, 16)
REGISTER_TABLES: frozenset[str] = frozenset({"input_register", "holding_register"})

#: order -> (byte order of each register's two bytes, byte order of the value)
_ORDERS: dict[str, tuple[str, str]] = {
    "ABCD": (">", ">"),
    "CDAB": ("<", "<"),
    "BADC": ("<", ">"),
    "DCBA": (">", "<"),
}

#: numeric datatype -> (struct code, registers, min, max); min/max only for integers
_NUMERIC: dict[str, tuple[str, int, int | None, int | None]] = {
    "int16": ("h", 1, -(2**15), 2**15 - 1),
    "uint16": ("H", 1, 0, 2**16 - 1),
    "int32": ("i", 2, -(2**31), 2**31 - 1),
    "uint32": ("I", 2, 0, 2**32 - 1),
    "int64": ("q", 4, -(2**63), 2**63 - 1),
    "uint64": ("Q", 4, 0, 2**64 - 1),
    "float32": ("f", 2, None, None),
    "float64": ("d", 4, None, None),
}
#: the datatypes whose raw value is an int
INTEGER_TYPES = frozenset({"int16", "uint16", "int32", "uint32", "int64", "uint64", "bool", "bit"})

#: "not available" markers that devices commonly send (`citygw modbus read` checks them
#: when not told the device's own); NaN is always one for float types
COMMON_MARKERS: dict[str, tuple[int, ...]] = {
    "int16": (0x7FFF, 0x8000),
    "uint16": (0xFFFF,),
    "int32": (0x7FFF_FFFF, 0x8000_0000),
    "uint32": (0xFFFF_FFFF,),
    "int64": (0x7FFF_FFFF_FFFF_FFFF, 0x8000_0000_0000_0000),
    "uint64": (0xFFFF_FFFF_FFFF_FFFF,),
}
#: how far (relative) a raw value may be from an integer and still be that integer:
#: float rounding of (value - offset) / scale, not a value between two register steps
_EXACT = 1e-9

_Value = int | float | str
_Decoder = Callable[[Sequence[int]], _Value]


def register_count(datatype: DataType, length: int | None = None) -> int:
    """Registers a value of `datatype` occupies: bool/bit/int16/uint16 1, (u)int32 and
    float32 2, (u)int64 and float64 4, string `length`."""
    if datatype == "string":
        if length is None or length < 1:
            raise ValueError(f"a string takes `length` registers (>= 1), got {length!r}")
        return length
    if datatype in ("bool", "bit"):
        return 1
    try:
        return _NUMERIC[datatype][1]
    except KeyError:
        raise ValueError(f"unknown datatype {datatype!r}") from None


def _check_order(order: str) -> tuple[str, str]:
    try:
        return _ORDERS[order]
    except KeyError:
        raise ValueError(f"unknown order {order!r}; one of {', '.join(_ORDERS)}") from None


def _swaps_bytes(order: str) -> bool:
    """Whether `order` has the two bytes of each register swapped (BADC, DCBA): within
    one register, the two switches of `_ORDERS` cancel out when they agree."""
    word_end, value_end = _check_order(order)
    return word_end != value_end


def _bad_image(datatype: str, n: int, registers: Sequence[int]) -> ValueError:
    if len(registers) != n:
        return ValueError(f"{datatype} takes {n} register(s), got {len(registers)}")
    return ValueError(f"registers must be integers 0..65535, got {list(registers)!r}")


def _numeric_decoder(datatype: str, order: str) -> _Decoder:
    code, n, _lo, _hi = _NUMERIC[datatype]
    word_end, value_end = _check_order(order)
    if datatype == "uint16" and not _swaps_bytes(order):  # the commonest: no struct at all

        def decode_uint16(registers: Sequence[int]) -> _Value:
            if len(registers) != 1 or not 0 <= registers[0] <= 0xFFFF:
                raise _bad_image(datatype, 1, registers)
            return registers[0]

        return decode_uint16

    pack = struct.Struct(f"{word_end}{n}H").pack
    unpack = struct.Struct(f"{value_end}{code}").unpack

    def decode_numeric(registers: Sequence[int]) -> _Value:
        try:
            return unpack(pack(*registers))[0]
        except struct.error:
            raise _bad_image(datatype, n, registers) from None

    return decode_numeric


def _string_decoder(order: str) -> _Decoder:
    word_end = "<" if _swaps_bytes(order) else ">"

    def decode_string(registers: Sequence[int]) -> _Value:
        try:
            raw = struct.pack(f"{word_end}{len(registers)}H", *registers)
        except struct.error:
            raise _bad_image("string", len(registers), registers) from None
        return raw.decode("ascii", errors="replace").rstrip("\x00 ")

    return decode_string


def _bool_decoder(registers: Sequence[int]) -> _Value:
    if len(registers) != 1 or not 0 <= registers[0] <= 0xFFFF:
        raise _bad_image("bool", 1, registers)
    return registers[0] != 0


def _bit_decoder(order: str, bit: int | None) -> _Decoder:
    if bit is None or not 0 <= bit <= 15:
        raise ValueError(f"datatype 'bit' needs bit 0..15, got {bit!r}")
    swap = _swaps_bytes(order)
    shift = (bit + 8) % 16 if swap else bit  # bit N of the byte-swapped word

    def decode_bit(registers: Sequence[int]) -> _Value:
        if len(registers) != 1 or not 0 <= registers[0] <= 0xFFFF:
            raise _bad_image("bit", 1, registers)
        return (registers[0] >> shift) & 1

    return decode_bit


def decoder(datatype: DataType, order: Order = "ABCD", bit: int | None = None) -> _Decoder:
    """The function that decodes one value of `datatype` in `order` from its register
    image (the raw value, before scale and offset). Build it once per point; calling it
    is the hot path. `bit` is only for datatype "bit". ValueError for an unknown
    datatype or order, or a missing/out-of-range bit."""
    return _decoder(datatype, order, bit)


@cache
def _decoder(datatype: str, order: str, bit: int | None) -> _Decoder:
    if datatype in _NUMERIC:
        return _numeric_decoder(datatype, order)
    _check_order(order)
    if datatype == "string":
        return _string_decoder(order)
    if datatype == "bool":
        return _bool_decoder
    if datatype == "bit":
        return _bit_decoder(order, bit)
    raise ValueError(f"unknown datatype {datatype!r}")


def decode(
    registers: Sequence[int], datatype: DataType, order: Order = "ABCD", bit: int | None = None
) -> int | float | str:
    """The raw value (before scale and offset) of `datatype` in `order` from `registers`."""
    return decoder(datatype, order, bit)(registers)


def _as_int(value: int | float | str, datatype: str) -> int:
    if isinstance(value, str):
        raise ValueError(f"{datatype} takes a number, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{datatype} takes an integer, got {value!r}")
        return int(value)
    return int(value)


def encode(value: int | float | str, datatype: DataType, order: Order = "ABCD") -> list[int]:
    """The register image of `value` as `datatype` in `order` (the inverse of `decode`).

    Raises ValueError for a value the type cannot hold (naming value, type and range), a
    float32 beyond its range, a non-ASCII string, and for datatype "bit" (a single bit
    is written by writing its whole register, which is the caller's business)."""
    word_end, value_end = _check_order(order)
    if datatype in _NUMERIC:
        code, n, lo, hi = _NUMERIC[datatype]
        number: int | float
        if lo is not None and hi is not None:
            number = _as_int(value, datatype)
            if not lo <= number <= hi:
                raise ValueError(f"{value!r} is out of range for {datatype} ({lo}..{hi})")
        else:
            if isinstance(value, str):
                raise ValueError(f"{datatype} takes a number, got {value!r}")
            number = float(value)
        try:
            raw = struct.pack(f"{value_end}{code}", number)
        except (OverflowError, struct.error) as exc:
            raise ValueError(
                f"{value!r} is out of range for {datatype} (about ±3.4028235e38): {exc}"
            ) from None
        return list(struct.unpack(f"{word_end}{n}H", raw))
    if datatype == "bool":
        if isinstance(value, str):
            raise ValueError(f"bool takes a number, got {value!r}")
        return [1 if value else 0]
    if datatype == "string":
        if not isinstance(value, str):
            raise ValueError(f"string takes a str, got {value!r}")
        try:
            data = value.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"{value!r} is not ASCII, which a string point holds") from None
        if len(data) % 2:
            data += b"\0"
        text_end = "<" if _swaps_bytes(order) else ">"
        return list(struct.unpack(f"{text_end}{len(data) // 2}H", data))
    if datatype == "bit":
        raise ValueError(
            "datatype 'bit' is not writable on its own: write the whole register as uint16"
        )
    raise ValueError(f"unknown datatype {datatype!r}")


def markers(datatype: DataType, invalid: Sequence[int | float]) -> frozenset[int | float]:
    """The raw values, as `decode` returns them, that mean "not available" for a point
    of `datatype` declaring `invalid` (module docstring). NaN is not in the set (it is
    never equal to itself): test a decoded float with ``v != v``. ValueError naming the
    marker for one the datatype cannot hold: beyond its bits, a float for an integer
    type, a float beyond float32, or any marker on bool, bit or string."""
    out: set[int | float] = set()
    if datatype in ("bool", "bit", "string"):
        if invalid:
            raise ValueError(
                f'datatype {datatype!r} has no "not available" markers; '
                "remove invalid (markers are for numbers)"
            )
        return frozenset()
    if datatype not in _NUMERIC:
        raise ValueError(f"unknown datatype {datatype!r}")
    code, n, lo, _hi = _NUMERIC[datatype]
    for m in invalid:
        if isinstance(m, bool) or not isinstance(m, int | float):
            raise ValueError(f"marker {m!r} is not a number")
        if lo is None:  # float32/float64: values
            if math.isnan(m):
                continue  # always one
            try:
                out.add(struct.unpack(f">{code}", struct.pack(f">{code}", m))[0])
            except (OverflowError, struct.error):
                raise ValueError(f"marker {m!r} is beyond what {datatype} can hold") from None
            continue
        bits = 16 * n
        if not isinstance(m, int):
            raise ValueError(
                f"marker {m!r} is not an integer, which {datatype} holds (a marker is the "
                "raw register value, before scale and offset)"
            )
        if not -(1 << (bits - 1)) <= m < (1 << bits):
            raise ValueError(
                f"marker {m if m < 0 else _hex(m)} does not fit {datatype} ({bits} bits: "
                f"0..{_hex((1 << bits) - 1)}, or {-(1 << (bits - 1))}.."
                f"{(1 << (bits - 1)) - 1} signed)"
            )
        u = m & ((1 << bits) - 1)
        out.add(u - (1 << bits) if lo < 0 and u >> (bits - 1) else u)
    return frozenset(out)


def _hex(m: int) -> str:
    return f"0x{m:X}"


def marker_text(raw: int | float, datatype: DataType) -> str:
    """A decoded marker as its vendor's table prints it: the register bits in hex for
    integer types (int32 -1 -> 0xFFFFFFFF), the value for floats (NaN -> "NaN")."""
    if isinstance(raw, float):
        return "NaN" if math.isnan(raw) else repr(raw)
    bits = 16 * _NUMERIC[datatype][1] if datatype in _NUMERIC else 16
    return f"0x{raw & ((1 << bits) - 1):0{bits // 4}X}"


def to_engineering(raw: int | float, scale: float, offset: float) -> float:
    """``raw * scale + offset`` as `engineering` computes it for `raw`'s type."""
    return engineering(scale, offset, isinstance(raw, int))(raw)


def from_engineering(
    value: float, scale: float, offset: float, datatype: DataType, *, exact: bool = True
) -> int | float:
    """The raw value to encode for engineering `value`: ``(value - offset) / scale``;
    a float for float32/float64. For integer types (and bool, bit) an int: a raw value
    that is not an integer (beyond float rounding) or is out of the type's range is a
    ValueError giving the raw value it would need and the nearest values the register
    can hold, unless ``exact=False`` (the simulator), which rounds half to even. Also
    ValueError if scale is 0, for a string, or for a non-finite value of an integer
    type. A float type's range is checked by `encode`."""
    if scale == 0:
        raise ValueError("scale must not be 0 (value = raw * scale + offset)")
    if datatype == "string":
        raise ValueError("a string has no engineering value")
    raw = (value - offset) / scale
    if datatype in INTEGER_TYPES:
        if not math.isfinite(raw):
            raise ValueError(f"{value!r} gives raw value {raw!r}, which {datatype} cannot hold")
        whole = round(raw)
        if not exact:
            return whole
        lo, hi = _NUMERIC[datatype][2:] if datatype in _NUMERIC else (0, 1)
        assert lo is not None and hi is not None
        slack = _EXACT * max(1.0, abs(raw), (abs(value) + abs(offset)) / abs(scale))
        fits = abs(raw - whole) <= slack
        if fits and lo <= whole <= hi:
            return whole
        nearest = sorted(
            {
                to_engineering(r, scale, offset)
                for r in (math.floor(raw), math.ceil(raw))
                if lo <= r <= hi
            }
            or {to_engineering(lo if raw < lo else hi, scale, offset)}
        )
        why = "not an integer" if lo <= raw <= hi else f"range {lo}..{hi}"
        can = " or ".join(f"{v:.15g}" for v in nearest)
        raise ValueError(
            f"{value:.15g} needs raw value {raw:.15g}, which does not fit {datatype} ({why}); "
            f"the nearest writable {'values are' if len(nearest) > 1 else 'value is'} {can}"
        )
    if datatype in _NUMERIC:
        return raw
    raise ValueError(f"unknown datatype {datatype!r}")
