"""Register decoding/encoding of the Modbus driver (drivers/modbus/datatypes.py).

Expected register images come from hand-derived IEEE 754 / two's complement encodings
and from pymodbus's own converter, never from our encoder."""

from __future__ import annotations

import math
import struct
from typing import get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.modbus.datatypes import (
    BIT_TABLES,
    REGISTER_TABLES,
    decode,
    decoder,
    encode,
    from_engineering,
    marker_text,
    markers,
    register_count,
    to_engineering,
)
from drivers.modbus.settings import DataType, Order, Table

ORDERS: tuple[Order, ...] = get_args(Order)
INT_RANGES: dict[DataType, tuple[int, int]] = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}
SIZES: dict[DataType, int] = {
    "int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2,
    "int64": 4, "uint64": 4, "float64": 4,
}  # fmt: skip

registers = st.integers(0, 0xFFFF)


def test_tables() -> None:
    assert set(get_args(Table)) == BIT_TABLES | REGISTER_TABLES
    assert not BIT_TABLES & REGISTER_TABLES


@pytest.mark.parametrize(
    ("datatype", "expected"),
    [
        ("bool", 1),
        ("bit", 1),
        ("int16", 1),
        ("uint16", 1),
        ("int32", 2),
        ("uint32", 2),
        ("float32", 2),
        ("int64", 4),
        ("uint64", 4),
        ("float64", 4),
    ],
)
def test_register_count(datatype: DataType, expected: int) -> None:
    assert register_count(datatype) == expected


def test_register_count_string() -> None:
    assert register_count("string", 8) == 8
    with pytest.raises(ValueError, match="length"):
        register_count("string")


# -- known images: order -> registers, per value ---------------------------------------
# each is the big-endian image (Modbus standard, ABCD) transformed by hand per the table
# in the module docstring: CDAB words reversed, BADC bytes swapped, DCBA both
KNOWN: list[tuple[DataType, int | float, dict[str, list[int]]]] = [
    # 123456789 = 0x075BCD15
    ("int32", 123456789, {
        "ABCD": [0x075B, 0xCD15], "CDAB": [0xCD15, 0x075B],
        "BADC": [0x5B07, 0x15CD], "DCBA": [0x15CD, 0x5B07]}),
    ("uint32", 123456789, {
        "ABCD": [0x075B, 0xCD15], "CDAB": [0xCD15, 0x075B],
        "BADC": [0x5B07, 0x15CD], "DCBA": [0x15CD, 0x5B07]}),
    ("uint32", 0xDEADBEEF, {
        "ABCD": [0xDEAD, 0xBEEF], "CDAB": [0xBEEF, 0xDEAD],
        "BADC": [0xADDE, 0xEFBE], "DCBA": [0xEFBE, 0xADDE]}),
    # -2 = 0xFFFFFFFE
    ("int32", -2, {
        "ABCD": [0xFFFF, 0xFFFE], "CDAB": [0xFFFE, 0xFFFF],
        "BADC": [0xFFFF, 0xFEFF], "DCBA": [0xFEFF, 0xFFFF]}),
    ("int32", -(2**31), {
        "ABCD": [0x8000, 0x0000], "CDAB": [0x0000, 0x8000],
        "BADC": [0x0080, 0x0000], "DCBA": [0x0000, 0x0080]}),
    # 1.5 = 0x3FC00000
    ("float32", 1.5, {
        "ABCD": [0x3FC0, 0x0000], "CDAB": [0x0000, 0x3FC0],
        "BADC": [0xC03F, 0x0000], "DCBA": [0x0000, 0xC03F]}),
    # 230.0 = 0x43660000 (a mains voltage, as SDM630 meters report it)
    ("float32", 230.0, {
        "ABCD": [0x4366, 0x0000], "CDAB": [0x0000, 0x4366],
        "BADC": [0x6643, 0x0000], "DCBA": [0x0000, 0x6643]}),
    # -0.0 = 0x80000000
    ("float32", -0.0, {
        "ABCD": [0x8000, 0x0000], "CDAB": [0x0000, 0x8000],
        "BADC": [0x0080, 0x0000], "DCBA": [0x0000, 0x0080]}),
    # pi = 0x400921FB54442D18
    ("float64", math.pi, {
        "ABCD": [0x4009, 0x21FB, 0x5444, 0x2D18], "CDAB": [0x2D18, 0x5444, 0x21FB, 0x4009],
        "BADC": [0x0940, 0xFB21, 0x4454, 0x182D], "DCBA": [0x182D, 0x4454, 0xFB21, 0x0940]}),
    # 0x0102030405060708
    ("int64", 0x0102030405060708, {
        "ABCD": [0x0102, 0x0304, 0x0506, 0x0708], "CDAB": [0x0708, 0x0506, 0x0304, 0x0102],
        "BADC": [0x0201, 0x0403, 0x0605, 0x0807], "DCBA": [0x0807, 0x0605, 0x0403, 0x0201]}),
    ("uint64", 0x0102030405060708, {
        "ABCD": [0x0102, 0x0304, 0x0506, 0x0708], "CDAB": [0x0708, 0x0506, 0x0304, 0x0102],
        "BADC": [0x0201, 0x0403, 0x0605, 0x0807], "DCBA": [0x0807, 0x0605, 0x0403, 0x0201]}),
    ("int64", -(2**63), {
        "ABCD": [0x8000, 0, 0, 0], "CDAB": [0, 0, 0, 0x8000],
        "BADC": [0x0080, 0, 0, 0], "DCBA": [0, 0, 0, 0x0080]}),
    ("int64", -1, {o: [0xFFFF] * 4 for o in ORDERS}),
    ("uint64", 2**64 - 1, {o: [0xFFFF] * 4 for o in ORDERS}),
    ("float64", 0.0, {o: [0] * 4 for o in ORDERS}),
    # 16-bit: word order does not apply, byte swap does
    ("int16", -2, {"ABCD": [0xFFFE], "CDAB": [0xFFFE], "BADC": [0xFEFF], "DCBA": [0xFEFF]}),
    ("int16", -32768, {"ABCD": [0x8000], "CDAB": [0x8000], "BADC": [0x0080], "DCBA": [0x0080]}),
    ("int16", 32767, {"ABCD": [0x7FFF], "CDAB": [0x7FFF], "BADC": [0xFF7F], "DCBA": [0xFF7F]}),
    ("uint16", 0x1234, {"ABCD": [0x1234], "CDAB": [0x1234], "BADC": [0x3412], "DCBA": [0x3412]}),
    ("uint16", 65535, {o: [0xFFFF] for o in ORDERS}),
]  # fmt: skip

KNOWN_CASES = [
    pytest.param(dt, value, order, regs, id=f"{dt}-{value!r}-{order}")
    for dt, value, images in KNOWN
    for order, regs in images.items()
]


@pytest.mark.parametrize(("datatype", "value", "order", "regs"), KNOWN_CASES)
def test_decode_known(datatype: DataType, value: float, order: Order, regs: list[int]) -> None:
    got = decode(regs, datatype, order)
    assert got == value
    assert type(got) is type(value)
    if isinstance(value, float) and isinstance(got, float):  # -0.0 == 0.0: the sign too
        assert math.copysign(1.0, got) == math.copysign(1.0, value)


@pytest.mark.parametrize(("datatype", "value", "order", "regs"), KNOWN_CASES)
def test_encode_known(datatype: DataType, value: float, order: Order, regs: list[int]) -> None:
    assert encode(value, datatype, order) == regs


def test_every_type_and_order_has_a_known_image() -> None:
    covered = {(dt, o) for dt, _v, images in KNOWN for o in images}
    numeric = [dt for dt in get_args(DataType) if dt in SIZES]
    assert {(dt, o) for dt in numeric for o in ORDERS} <= covered


def test_float32_known_inexact() -> None:
    # -123.456 as float32 is 0xC2F6E979
    assert decode([0xC2F6, 0xE979], "float32") == pytest.approx(-123.456, rel=1e-7)
    assert decode([0xE979, 0xC2F6], "float32", "CDAB") == pytest.approx(-123.456, rel=1e-7)
    assert encode(-123.456, "float32") == [0xC2F6, 0xE979]


@pytest.mark.parametrize("order", ORDERS)
def test_float_specials(order: Order) -> None:
    inf = decode(encode(math.inf, "float32", order), "float32", order)
    assert inf == math.inf
    # 0x7FC00000: the quiet NaN
    nan_image = {"ABCD": [0x7FC0, 0], "CDAB": [0, 0x7FC0], "BADC": [0xC07F, 0], "DCBA": [0, 0xC07F]}
    assert math.isnan(decode(nan_image[order], "float32", order))  # type: ignore[arg-type]
    assert math.isnan(decode([0x7FF8, 0, 0, 0], "float64"))  # type: ignore[arg-type]


@pytest.mark.parametrize("order", ORDERS)
def test_bool(order: Order) -> None:
    assert decode([0], "bool", order) is False
    assert decode([1], "bool", order) is True
    assert decode([0x8000], "bool", order) is True
    assert encode(True, "bool", order) == [1]
    assert encode(0, "bool", order) == [0]


def test_bit() -> None:
    assert [decode([0b1010], "bit", "ABCD", n) for n in range(4)] == [0, 1, 0, 1]
    assert decode([0x8000], "bit", bit=15) == 1
    assert decode([0x8000], "bit", bit=7) == 0
    assert decode([0x8000], "bit", "CDAB", 15) == 1
    # byte-swapped register: 0x0080 reads as 0x8000
    assert decode([0x0080], "bit", "BADC", 15) == 1
    assert decode([0x0080], "bit", "DCBA", 7) == 0
    assert decode([0x0001], "bit", "BADC", 8) == 1
    with pytest.raises(ValueError, match="bit"):
        decoder("bit", "ABCD", None)
    with pytest.raises(ValueError, match="bit"):
        decoder("bit", "ABCD", 16)
    with pytest.raises(ValueError, match="not writable"):
        encode(1, "bit")


@given(registers, st.integers(0, 15), st.sampled_from(ORDERS))
def test_bit_is_bit_of_uint16(reg: int, n: int, order: Order) -> None:
    word = decode([reg], "uint16", order)
    assert isinstance(word, int)
    assert decode([reg], "bit", order, n) == (word >> n) & 1


# -- strings ---------------------------------------------------------------------------

SDM630 = [0x5344, 0x4D36, 0x3330, 0x0000]  # "SD" "M6" "30" NUL NUL


def test_string_known() -> None:
    assert decode(SDM630, "string") == "SDM630"
    assert decode(SDM630, "string", "CDAB") == "SDM630"  # no word order for strings
    swapped = [0x4453, 0x364D, 0x3033, 0x0000]
    assert decode(swapped, "string", "BADC") == "SDM630"
    assert decode(swapped, "string", "DCBA") == "SDM630"
    assert decode([0x4142, 0x4300], "string") == "ABC"
    assert decode([0x4142, 0x2020, 0x2000], "string") == "AB"  # trailing spaces and NULs
    assert decode([0x2041, 0x0000], "string") == " A"  # leading space kept
    assert decode([0, 0], "string") == ""
    assert decode([], "string") == ""
    assert decode([0x41FF, 0x8042], "string") == "A\ufffd\ufffdB"  # non-ASCII replaced
    assert encode("SDM630", "string") == [0x5344, 0x4D36, 0x3330]
    assert encode("ABC", "string", "BADC") == [0x4241, 0x0043]
    with pytest.raises(ValueError, match="ASCII"):
        encode("Straße", "string")


@given(st.lists(registers, max_size=20), st.sampled_from(ORDERS))
def test_string_never_raises(regs: list[int], order: Order) -> None:
    text = decode(regs, "string", order)
    assert isinstance(text, str)
    assert len(text) <= 2 * len(regs)
    assert not text.endswith(("\x00", " "))


@given(
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30),
    st.sampled_from(ORDERS),
)
def test_string_round_trip(text: str, order: Order) -> None:
    assert decode(encode(text, "string", order), "string", order) == text


# -- independent implementation: pymodbus ----------------------------------------------


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return struct.pack(">d", a) == struct.pack(">d", b)
    return a == b and type(a) is type(b)


@given(st.data())
@pytest.mark.parametrize("datatype", list(SIZES))
@pytest.mark.parametrize(("order", "word_order"), [("ABCD", "big"), ("CDAB", "little")])
def test_matches_pymodbus(
    datatype: DataType, order: Order, word_order: str, data: st.DataObject
) -> None:
    from pymodbus.client.mixin import ModbusClientMixin

    regs = data.draw(st.lists(registers, min_size=SIZES[datatype], max_size=SIZES[datatype]))
    theirs = ModbusClientMixin.convert_from_registers(
        regs,
        ModbusClientMixin.DATATYPE[datatype.upper()],
        word_order=word_order,  # type: ignore[arg-type]
    )
    assert _same(decode(regs, datatype, order), theirs)


PRINTABLE_WORDS = st.builds(
    lambda hi, lo: hi << 8 | lo, st.integers(0x20, 0x7E), st.integers(0x20, 0x7E)
)


@given(st.lists(PRINTABLE_WORDS, max_size=10))
def test_string_matches_pymodbus(regs: list[int]) -> None:
    from pymodbus.client.mixin import ModbusClientMixin

    theirs = ModbusClientMixin.convert_from_registers(regs, ModbusClientMixin.DATATYPE.STRING)
    assert isinstance(theirs, str)
    assert decode(regs, "string") == theirs.rstrip(" ")


# -- round trips -----------------------------------------------------------------------


@given(st.data())
@pytest.mark.parametrize("datatype", list(INT_RANGES))
@pytest.mark.parametrize("order", ORDERS)
def test_int_round_trip(datatype: DataType, order: Order, data: st.DataObject) -> None:
    lo, hi = INT_RANGES[datatype]
    value = data.draw(st.integers(lo, hi))
    regs = encode(value, datatype, order)
    assert len(regs) == register_count(datatype)
    assert all(0 <= r <= 0xFFFF for r in regs)
    assert decode(regs, datatype, order) == value


@given(st.data())
@pytest.mark.parametrize(
    ("datatype", "width", "code"), [("float32", 32, "f"), ("float64", 64, "d")]
)
@pytest.mark.parametrize("order", ORDERS)
def test_float_round_trip(
    datatype: DataType, width: int, code: str, order: Order, data: st.DataObject
) -> None:
    value = data.draw(st.floats(width=width))  # type: ignore[arg-type]
    got = decode(encode(value, datatype, order), datatype, order)
    assert isinstance(got, float)
    assert struct.pack(f">{code}", got) == struct.pack(f">{code}", value)  # NaN, -0.0 too


@given(st.data())
@pytest.mark.parametrize("datatype", list(SIZES))
@pytest.mark.parametrize("order", ORDERS)
def test_image_round_trip(datatype: DataType, order: Order, data: st.DataObject) -> None:
    """Every register image decodes to a value that encodes back to the same image
    (float32 NaN images aside: C's float conversion may quiet a signalling NaN)."""
    regs = data.draw(st.lists(registers, min_size=SIZES[datatype], max_size=SIZES[datatype]))
    value = decode(regs, datatype, order)
    if datatype == "float32" and isinstance(value, float) and math.isnan(value):
        return
    assert encode(value, datatype, order) == regs


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", list(INT_RANGES))
def test_encode_out_of_range(datatype: DataType) -> None:
    lo, hi = INT_RANGES[datatype]
    for value in (lo - 1, hi + 1):
        with pytest.raises(ValueError) as info:
            encode(value, datatype)
        message = str(info.value)
        assert str(value) in message
        assert datatype in message
        assert f"{lo}..{hi}" in message


def test_encode_errors() -> None:
    with pytest.raises(ValueError, match="float32"):
        encode(1e39, "float32")
    with pytest.raises(ValueError, match="integer"):
        encode(1.5, "int16")
    with pytest.raises(ValueError, match="integer"):
        encode(math.nan, "int32")
    assert encode(7.0, "int16") == [7]
    with pytest.raises(ValueError):
        encode("1", "int16")
    with pytest.raises(ValueError, match="order"):
        encode(1, "int16", "XYZW")  # type: ignore[arg-type]
    assert encode(math.inf, "float32") == [0x7F80, 0]
    assert encode(1e300, "float64") == list(struct.unpack(">4H", struct.pack(">d", 1e300)))


@pytest.mark.parametrize("datatype", list(SIZES))
def test_decode_wrong_length(datatype: DataType) -> None:
    n = SIZES[datatype]
    for regs in ([0] * (n + 1), [0] * (n - 1)):
        with pytest.raises(ValueError, match=datatype):
            decode(regs, datatype)
    with pytest.raises(ValueError):
        decode([0x10000] + [0] * (n - 1), datatype)
    with pytest.raises(ValueError):
        decode([-1] + [0] * (n - 1), datatype)


def test_decoder_errors() -> None:
    with pytest.raises(ValueError, match="datatype"):
        decoder("int24", "ABCD")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="order"):
        decoder("int32", "ABDC")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        decode([1, 2], "bool")
    with pytest.raises(ValueError):
        decode([0x10000], "string")


def test_decoder_is_built_once() -> None:
    assert decoder("float32", "CDAB") is decoder("float32", "CDAB")
    fn = decoder("float32", "CDAB")
    assert fn([0x0000, 0x3FC0]) == 1.5
    assert fn((0x0000, 0x3FC0)) == 1.5  # any sequence, e.g. a slice of a response


# -- scale and offset ------------------------------------------------------------------


def test_a_decimal_scale_gives_the_decimal_the_device_means() -> None:
    # 2301 * 0.1 is 230.10000000000002: the codec would store it bit-exactly in ~40 bits
    # instead of a few, and a user would see it so
    assert 2301 * 0.1 != 230.1
    assert to_engineering(2301, 0.1, 0.0) == 230.1
    assert to_engineering(2301, 0.1, -40.0) == 190.1  # an offset in whole steps
    assert to_engineering(-12345, 0.001, 0.0) == -12.345
    assert to_engineering(2301, 0.01, 0.5) == 23.51
    # a float register is a binary value: its product stays; so does an offset that
    # is not a whole number of steps
    assert to_engineering(2301.0, 0.1, 0.0) == 2301.0 * 0.1
    assert to_engineering(2301, 0.1, 0.05) == 2301 * 0.1 + 0.05
    assert to_engineering(1, 0.1, -1e308) == -1e308  # its steps would not be finite
    # every raw value of a uint16 with scale 0.1 round-trips through the write path
    for raw in range(0, 65536, 7):
        assert from_engineering(to_engineering(raw, 0.1, 0.0), 0.1, 0.0, "uint16") == raw


def test_engineering_examples() -> None:
    assert to_engineering(2305, 0.1, 0.0) == pytest.approx(230.5)
    assert to_engineering(100, 1.0, -40.0) == 60.0
    assert isinstance(to_engineering(3, 1.0, 0.0), float)
    assert from_engineering(230.5, 0.1, 0.0, "uint16") == 2305
    assert from_engineering(60.0, 1.0, -40.0, "int16") == 100
    # the simulator's quantizing: round half to even
    assert from_engineering(2.5, 1.0, 0.0, "int16", exact=False) == 2
    assert from_engineering(3.5, 1.0, 0.0, "int16", exact=False) == 4
    assert from_engineering(-2.5, 1.0, 0.0, "int16", exact=False) == -2
    assert from_engineering(1.25, 0.5, 0.0, "float32") == 2.5
    assert isinstance(from_engineering(3.0, 1.0, 0.0, "float64"), float)
    assert isinstance(from_engineering(3.0, 1.0, 0.0, "int32"), int)
    with pytest.raises(ValueError, match="scale"):
        from_engineering(1.0, 0.0, 0.0, "int16")
    with pytest.raises(ValueError):
        from_engineering(math.inf, 1.0, 0.0, "int16")
    with pytest.raises(ValueError):
        from_engineering(math.nan, 1.0, 0.0, "int32")
    with pytest.raises(ValueError):
        from_engineering(1.0, 1.0, 0.0, "string")


SCALES = st.sampled_from([1.0, 0.1, 0.01, 0.001, 10.0, 100.0, -1.0, 0.5, 2.0, 1 / 3])
OFFSETS = st.floats(-1000, 1000, allow_nan=False)


@given(st.integers(-(2**31), 2**31 - 1), SCALES, OFFSETS)
def test_engineering_inverse_int(raw: int, scale: float, offset: float) -> None:
    value = to_engineering(raw, scale, offset)
    assert from_engineering(value, scale, offset, "int32") == raw


@given(st.floats(-1e12, 1e12), SCALES, OFFSETS)
def test_engineering_inverse_float(raw: float, scale: float, offset: float) -> None:
    value = to_engineering(raw, scale, offset)
    back = from_engineering(value, scale, offset, "float64")
    assert back == pytest.approx(raw, rel=1e-9, abs=1e-9 * (abs(offset) + 1) / abs(scale))


# -- writes: exactly what the register can hold ----------------------------------------


def test_a_value_between_two_register_steps_is_refused() -> None:
    """10.5 to an int16 with scale 1 was written as 10 and reported as 10.5 (issue 13)."""
    with pytest.raises(ValueError) as err:
        from_engineering(10.5, 1.0, 0.0, "int16")
    assert str(err.value) == (
        "10.5 needs raw value 10.5, which does not fit int16 (not an integer); "
        "the nearest writable values are 10 or 11"
    )
    with pytest.raises(ValueError, match=r"raw value 200\.5.* values are 20 or 20\.1$"):
        from_engineering(20.05, 0.1, 0.0, "int16")
    with pytest.raises(ValueError, match=r"raw value -0\.5.* values are 0 or 0\.5$"):
        from_engineering(0.25, -0.5, 0.0, "int16")  # a negative scale: still in order


def test_float_rounding_of_the_inverse_is_not_a_refusal() -> None:
    # (2.3 - 0) / 0.1 is 22.999999999999996 in floats: the register step is 23
    assert (2.3 - 0.0) / 0.1 != 23
    assert from_engineering(2.3, 0.1, 0.0, "int16") == 23
    assert from_engineering(0.7, 0.1, 0.0, "uint16") == 7
    assert from_engineering(10.5, 0.1, 0.0, "int16") == 105
    assert from_engineering(25.0, 0.01, -273.15, "uint16") == 29815
    assert from_engineering(-12.3, 0.1, 0.0, "int16") == -123


def test_a_value_out_of_the_type_range_names_the_nearest_writable() -> None:
    with pytest.raises(ValueError) as err:
        from_engineering(4000.0, 0.1, 0.0, "int16")
    assert str(err.value) == (
        "4000 needs raw value 40000, which does not fit int16 (range -32768..32767); "
        "the nearest writable value is 3276.7"
    )
    with pytest.raises(ValueError, match=r"does not fit uint16 \(range 0\.\.65535\).* is 0$"):
        from_engineering(-1.0, 1.0, 0.0, "uint16")


# -- "not available" markers -------------------------------------------------------------


def test_markers_compare_the_register_bits() -> None:
    # 0x8000 and -32768 are one int16 marker; as decode returns them (signed)
    assert markers("int16", [0x8000, -32768, 0x7FFF]) == {-32768, 32767}
    assert decode([0x8000], "int16") in markers("int16", [0x8000])
    assert markers("uint32", [-1]) == {0xFFFFFFFF}
    assert markers("int32", [0xFFFFFFFF]) == {-1}
    assert markers("int64", [0x8000_0000_0000_0000]) == {-(2**63)}
    # float markers are values, float32 ones rounded to what the register holds
    assert markers("float32", [-999.9, math.nan]) == {float(np_f32(-999.9))}
    assert markers("float64", [-9999]) == {-9999.0}
    assert markers("uint16", []) == frozenset()


def np_f32(x: float) -> float:
    return float(struct.unpack(">f", struct.pack(">f", x))[0])


@pytest.mark.parametrize(
    ("datatype", "marker", "message"),
    [
        ("uint16", 0x1FFFF, "marker 0x1FFFF does not fit uint16"),
        ("int16", -32769, "marker -32769 does not fit int16"),
        ("int32", 1.5, "marker 1.5 is not an integer, which int32 holds"),
        ("float32", 1e39, "marker 1e+39 is beyond what float32 can hold"),
        ("bool", 1, "datatype 'bool' has no \"not available\" markers"),
        ("bit", 0, "datatype 'bit' has no"),
        ("string", 0, "datatype 'string' has no"),
    ],
)
def test_markers_a_datatype_cannot_hold_are_refused(
    datatype: DataType, marker: float, message: str
) -> None:
    with pytest.raises(ValueError) as err:
        markers(datatype, [marker])
    assert message in str(err.value)


def test_marker_text_is_the_vendor_s_hex() -> None:
    assert marker_text(-1, "int32") == "0xFFFFFFFF"
    assert marker_text(2**31 - 1, "int32") == "0x7FFFFFFF"
    assert marker_text(-32768, "int16") == "0x8000"
    assert marker_text(math.nan, "float32") == "NaN"
    assert marker_text(-9999.0, "float64") == "-9999.0"
