"""Codec v3, what the agent sends: exact header bytes, bit-exact round trips on both
implementations (compiled and pure twin, byte-identical output), the paths the encoder
picks and what they cost, and rejection of malformed input with clear messages.
Version 2 (older gateways) is in tests/test_codec_v2.py, fuzzing in
tests/test_codec_fuzz.py, the twins' equivalence on many more inputs in
tests/test_codec3_kernels.py."""

from __future__ import annotations

import math
import random
import re
import struct
import zlib
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from native import codec
from native.batch import Batch
from native.codec import CodecError, decode, decode_message, encode
from tests.helpers import IMPLEMENTATIONS, load_kernels

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request: pytest.FixtureRequest) -> str:
    """One implementation of the body codec ("cython" fails here when not built)."""
    load_kernels(request.param, "codec3")
    return str(request.param)


def f64(bits: int) -> float:
    value: float = struct.unpack("<d", struct.pack("<Q", bits))[0]
    return value


def rows_of(b: Batch) -> list[tuple[int, int, bytes, int]]:
    """Rows with values as their IEEE-754 bytes (bit-exact: NaN payloads, -0.0)."""
    return [(p, t, struct.pack("<d", v), q) for p, t, v, q in b.rows()]


def grouped(b: Batch) -> list[tuple[int, int, bytes, int]]:
    """The rows as decode returns them: by point id, each point's rows in batch order."""
    rows = rows_of(b)
    return [rows[i] for i in sorted(range(len(rows)), key=lambda i: rows[i][0])]


def round_trip(b: Batch, gateway: str = "gw-0042", seq: int = 9) -> bytes:
    """Encodes with both implementations (identical bytes) and decodes with both."""
    for name in IMPLEMENTATIONS:
        load_kernels(name, "codec3")
    data = [encode(b, gateway=gateway, seq=seq, implementation=k) for k in IMPLEMENTATIONS]
    assert data[0] == data[-1], "the implementations' bytes differ"
    for k in IMPLEMENTATIONS:
        m = decode_message(data[0], implementation=k)
        assert (m.version, m.gateway, m.seq) == (3, gateway, seq)
        assert rows_of(m.batch) == grouped(b)
    return data[0]


def series(values: list[float], ts: list[int] | None = None) -> Batch:
    n = len(values)
    times = ts if ts is not None else [1_700_000_000_000 + 1000 * i for i in range(n)]
    return Batch(array("I", [3]) * n, array("q", times), array("d", values), array("B", bytes(n)))


# -- the frame -------------------------------------------------------------------------------

TINY = Batch.from_rows([(1, 1000, 1.5, 0), (3, 900, -0.0, 2)])


def test_tiny_batch_header_bytes(impl: str) -> None:
    data = encode(TINY, implementation=impl)
    head = bytes.fromhex(
        "434742" "03"   # magic, version
        "00" "00"       # gateway "" (length 0), seq 0
        "0b"            # 2 series << 2 | 1 << 1 (table in integer blocks) | 1 (quality)
        "0103"          # ids 1, 3 as (first id, then gap - 1): [1, 1], width 1, packed 0b11
        "00"            # counts - 1: [0, 0], width 0
        "02" "0001" "0201"  # quality: 2 runs, (GOOD, 1) and (2, 1)
        "01"            # timestamp unit: 1 (no deltas within a series)
    )  # fmt: skip
    assert data.startswith(head)
    # then the range-coded stream's length and bytes, the raw bits, the CRC
    assert data[-4:] == struct.pack("<I", zlib.crc32(data[:-4]))
    assert rows_of(decode(data, implementation=impl)) == rows_of(TINY)
    # -0.0 has no decimal form: a row apart (0 / 2, one ordered step down)
    assert codec.value_block_modes(data) == ["decimal 1 esc"]


def test_empty_batch(impl: str) -> None:
    data = encode(Batch(), implementation=impl)
    # no series, all GOOD, unit 1, an empty range-coded stream
    assert data[:-4] == b"CGB\x03\x00\x00\x00\x01\x00"
    assert data[-4:] == struct.pack("<I", zlib.crc32(data[:-4]))
    m = decode_message(data, implementation=impl)
    assert (m.version, m.gateway, m.seq, len(m.batch)) == (3, "", 0, 0)


def test_decoder_table_and_version() -> None:
    assert codec.FORMAT_VERSION == 3 and set(codec._DECODERS) == {1, 2, 3}
    assert decode_message(encode(TINY)).version == 3


@pytest.mark.parametrize(
    ("gateway", "seq"), [("", 0), ("gw-0042", 1), ("ü" * 127, 2**64 - 1), ("x" * 255, 300)]
)
def test_gateway_and_seq_round_trip(impl: str, gateway: str, seq: int) -> None:
    m = decode_message(encode(TINY, gateway=gateway, seq=seq, implementation=impl))
    assert (m.gateway, m.seq) == (gateway, seq)


# -- round trips -----------------------------------------------------------------------------


def test_special_values_and_extreme_timestamps() -> None:
    specials = [
        f64(0x7FF8000000000000),  # quiet NaN
        f64(0x7FF8DEADBEEF0001),  # NaN with a payload
        f64(0xFFF8000000000001),  # negative NaN
        f64(0x7FF0000000000001),  # signalling NaN
        math.inf,
        -math.inf,
        -0.0,
        0.0,
        f64(1),  # smallest subnormal
        f64(0x7FEFFFFFFFFFFFFF),  # largest finite
        -1.7976931348623157e308,
        0.1,
        2.0**53,
        -(2.0**53) + 1,
        123456.789,
        616.333333333333,
        3.4028234663852886e38,  # the largest float32
        3.4028235677973366e38,  # just above it
    ]
    ts = [INT64_MAX, INT64_MIN, INT64_MAX, 0, -1, INT64_MIN, INT64_MIN, 5, 4, 4, INT64_MAX]
    rows = [(7, ts[i % len(ts)], v, i % 256) for i, v in enumerate(specials * 20)]
    rows += [(0, t, 1.0, 255) for t in ts] + [(2**32 - 1, t, -0.0, 1) for t in ts]
    round_trip(Batch.from_rows(rows))


def test_rows_grouped_by_point_each_in_its_order(impl: str) -> None:
    rows = [(9, 30, 1.0, 0), (2, 10, 2.0, 0), (9, 20, 3.0, 1), (5, 5, 4.0, 0), (2, 10, 5.0, 2)]
    out = decode(encode(Batch.from_rows(rows), implementation=impl), implementation=impl)
    assert list(out.rows()) == [
        (2, 10, 2.0, 0), (2, 10, 5.0, 2), (5, 5, 4.0, 0), (9, 30, 1.0, 0), (9, 20, 3.0, 1)
    ]  # fmt: skip


@pytest.mark.parametrize("seed", range(16))
def test_random_batches_identical_bytes(seed: int) -> None:
    rng = random.Random(seed)
    kind = seed % 6
    b = Batch()
    n = rng.randrange(1, 1500)
    t = rng.randrange(INT64_MIN, INT64_MAX)
    level = rng.uniform(-100, 100)
    points = rng.choice([1, 3, 50, 2**32 - 1])
    for i in range(n):
        pid = rng.randrange(points) if points < 100 else rng.randrange(2**32)
        if kind == 0:  # anything at all
            t, v = rng.randrange(INT64_MIN, INT64_MAX + 1), f64(rng.getrandbits(64))
        elif kind == 1:  # polls with jitter, decimal values
            t = 1_700_000_000_000 + (i // 3) * 1000 + rng.randrange(25)
            level += rng.gauss(0, 0.3)
            v = round(level, rng.randrange(4))
        elif kind == 2:  # backwards and repeated timestamps, specials
            t += rng.choice([0, 0, -7, 1000, 2**40, -(2**62)])
            t = max(INT64_MIN, min(INT64_MAX, t))
            v = rng.choice([math.nan, math.inf, -0.0, 1e-300, round(level, 2), 5e-324])
        elif kind == 3:  # full-precision noise
            t += 997
            v = rng.gauss(0, 1)
        elif kind == 4:  # float32 registers, calendar days
            t += 86_400_000 * rng.choice([28, 30, 31])
            v = struct.unpack("<f", struct.pack("<f", level + rng.gauss(0, 1)))[0]
        else:  # averages printed to 15 digits, gaps
            t += 960_000 + rng.choice([-1000, 0, 1000])
            v = rng.choice([round(level, 2), float(f"{level + 1 / 3:.15g}"), math.nan])
        b.append(pid, t, v, rng.choice([0, 0, 0, 0, 1, 2, 255]) if seed % 2 else 0)
    round_trip(b)


finite_or_not = st.one_of(
    st.integers(0, 2**64 - 1).map(f64),  # any bit pattern: NaN payloads, subnormals
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(width=32),
    st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan, f64(1)]),
    st.builds(lambda i, k: round(i / 10**k, k), st.integers(-(10**12), 10**12), st.integers(0, 15)),
)
row = st.tuples(
    st.one_of(st.integers(0, 3), st.integers(0, 2**32 - 1)),
    st.one_of(st.integers(INT64_MIN, INT64_MAX), st.integers(-5, 5)),
    finite_or_not,
    st.one_of(st.just(0), st.integers(0, 255)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(row, max_size=300))
def test_hypothesis_any_rows(rows: list[tuple[int, int, float, int]]) -> None:
    round_trip(Batch.from_rows(rows))


@st.composite
def polled(draw: st.DrawFn) -> Batch:
    """Interleaved polls of a few points: a period, poll jitter, missed ticks, decimal
    walks with steps and spikes, the odd special value and gap."""
    npts = draw(st.integers(1, 4))
    polls = draw(st.integers(1, 300))
    period = draw(st.sampled_from([1, 1000, 60_000, 3_600_000, 86_400_000, 2**40]))
    jitter = draw(st.sampled_from([0, 1, 10, 50, 1000]))
    k = draw(st.integers(0, 6))
    seed = draw(st.integers(0, 2**32))
    rng = random.Random(seed)
    t0 = draw(st.sampled_from([0, 1_700_000_000_000, INT64_MAX - 10**6, INT64_MIN]))
    level = [rng.uniform(-50, 50) for _ in range(npts)]
    b = Batch()
    tick = 0
    for _ in range(polls):
        tick += 1 if rng.random() > 0.02 else rng.randrange(2, 5)  # missed ticks
        for p in range(npts):
            t = (t0 + tick * period + rng.randrange(jitter + 1) + 2**63) % 2**64 - 2**63
            r = rng.random()
            level[p] += rng.gauss(0, 0.1) + (rng.choice([-20, 20]) if r < 0.01 else 0)
            v = round(level[p], k) if r > 0.02 else rng.choice([math.nan, -0.0, 1e300, 0.1])
            b.append(p * 7, t, v, 0 if r < 0.99 else 1)
    return b


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(polled())
def test_hypothesis_polled_series(b: Batch) -> None:
    round_trip(b)


# -- paths the encoder picks, and what they cost ---------------------------------------------


def test_decimal_path_for_centi_resolution(impl: str) -> None:
    rng = random.Random(5)
    level, values = 20.0, []
    for _ in range(1280):
        level += rng.gauss(0, 0.03)
        values.append(round(level, 2))
    data = encode(series(values), implementation=impl)
    assert all(m.startswith("decimal 2") for m in codec.value_block_modes(data))
    # steps of about 3 hundredths: their entropy is 3.6 bits; v2 took 0.93 B/r
    assert len(data) / 1280 < 0.55
    assert rows_of(decode(data, implementation=impl)) == rows_of(series(values))


def test_second_differences_for_smooth_data(impl: str) -> None:
    values = [round(10 * math.sin(i / 40), 3) for i in range(1280)]
    data = encode(series(values), implementation=impl)
    assert all(m == "decimal 3 order 2" for m in codec.value_block_modes(data)[1:])


def test_float64_path_for_full_precision_noise(impl: str) -> None:
    rng = random.Random(6)
    values = [rng.gauss(20, 3) for _ in range(640)]
    data = encode(series(values), implementation=impl)
    assert codec.value_block_modes(data) == ["float64"] * 5
    assert rows_of(decode(data, implementation=impl)) == rows_of(series(values))


def test_float32_path_for_float32_registers(impl: str) -> None:
    """A Modbus float32 register's value: differences of the float32's ordered bits
    (about 17 bits for this walk, against 40 and more for its float64 bits)."""
    rng = random.Random(16)
    level, values = 230.0, []
    for _ in range(640):
        level += rng.gauss(0, 0.05)
        values.append(struct.unpack("<f", struct.pack("<f", level))[0])
    data = encode(series(values), implementation=impl)
    assert codec.value_block_modes(data) == ["float32"] * 5
    assert len(data) / 640 < 2.6
    assert rows_of(decode(data, implementation=impl)) == rows_of(series(values))


def test_nan_gaps_cost_a_bit_or_two(impl: str) -> None:
    """A weekly series at one decimal with runs of missing values: the block stays
    decimal, a NaN after the first of its run is "the last escape" (v2 fell back to XOR
    for the whole block: 2.2 bytes a reading on the CO2 record)."""
    rng = random.Random(17)
    level, values = 316.0, []
    for i in range(1280):
        level += rng.gauss(0, 0.4)
        values.append(math.nan if 300 <= i % 400 < 330 else round(level, 1))
    with_gaps = encode(series(values), implementation=impl)
    without = encode(series([v for v in values if v == v]), implementation=impl)
    assert all(m.startswith("decimal 1") for m in codec.value_block_modes(with_gaps))
    assert len(with_gaps) - len(without) < 90 * 2 / 8 + 16  # 90 NaN: under 2 bits each
    assert rows_of(decode(with_gaps, implementation=impl)) == rows_of(series(values))


def test_averages_and_more_decimals_are_escapes(impl: str) -> None:
    """Two-decimal readings with the odd average of three (printed to 15 digits, or the
    double nearest to it) and the odd reading of four decimals: the block keeps 2
    decimals and codes those rows apart, an average as a fraction N / (3 * 10**2) and a
    few bits of adjustment (about 40 bits as a decimal of 12 digits)."""
    rng = random.Random(18)
    level, plain, values = 610.0, [], []
    for i in range(640):
        level += rng.gauss(0, 0.05)
        v = round(level, 2)
        plain.append(v)
        if i % 20 == 0:
            v = float(f"{(3 * v + 0.01) / 3:.15g}") if i % 40 else (3 * v + 0.01) / 3
        elif i % 20 == 10:
            v = round(level, 4)
        values.append(v)
    data = encode(series(values), implementation=impl)
    assert all(m.startswith("decimal 2") and "esc" in m for m in codec.value_block_modes(data))
    base = encode(series(plain), implementation=impl)
    assert len(data) - len(base) < 64 * 20 / 8  # 64 rows apart: under 20 bits each
    assert rows_of(decode(data, implementation=impl)) == rows_of(series(values))


def test_seasonal_predictor_for_daily_cycles(impl: str) -> None:
    """Hourly readings of a daily cycle: a block predicts each change from the change a
    day before (24 rows back), which leaves the weather's own noise."""
    rng = random.Random(19)
    ts = [1_700_000_000_000 + 3_600_000 * i for i in range(1280)]
    values = [
        round(12 + 6 * math.sin(2 * math.pi * i / 24) + 0.02 * rng.gauss(0, 1), 1)
        for i in range(1280)
    ]
    data = encode(series(values, ts), implementation=impl)
    assert "decimal 1 season 24" in codec.value_block_modes(data)[1:]
    assert len(data) / 1280 < 0.3
    assert rows_of(decode(data, implementation=impl)) == rows_of(series(values, ts))


def test_calendar_months_cost_a_few_bits(impl: str) -> None:
    """Monthly records: deltas of 28..31 days are multiples of a day, so the message's
    unit is a day and a delta-of-delta takes -3..3 units."""
    ts, t = [], 0
    for i in range(600):
        t += 86_400_000 * (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)[i % 12]
        ts.append(t)
    data = encode(series([1.0] * 600, ts), implementation=impl)
    assert len(data) < 600 * 3 / 8
    assert list(decode(data, implementation=impl).timestamps) == ts


def test_constant_series_costs_almost_nothing(impl: str) -> None:
    data = encode(series([21.5] * 6000), gateway="gw-0042", implementation=impl)
    assert len(data) < 80  # v2: under 200


def test_grid_timestamps_for_poll_jitter(impl: str) -> None:
    """Polls on a fixed 1 s schedule answered 0..9 ms late: the delay against the grid
    has an entropy of log2(10) = 3.3 bits; delta-of-delta spans -18..18 (v2: 726 bytes)."""
    rng = random.Random(7)
    ts = [1_700_000_000_000 + 1000 * i + rng.randrange(10) for i in range(1280)]
    data = encode(series([1.0] * 1280, ts), implementation=impl)
    assert len(data) < 1280 * 4.1 / 8
    assert list(decode(data, implementation=impl).timestamps) == ts


def test_spikes_and_steps_cost_little(impl: str) -> None:
    values = [12.5] * 1280
    for i in (100, 101, 700):
        values[i] = 480.0
    for i in range(900, 1280):
        values[i] = 30.0
    data = encode(series(values), implementation=impl)
    assert len(data) < 80  # v2: under 120
    assert rows_of(decode(data, implementation=impl)) == rows_of(series(values))


def test_many_points_with_one_reading_each_share_blocks(impl: str) -> None:
    """A 1 s flush of 500 points polled once: blocks span series, so no per-point
    block headers."""
    rng = random.Random(8)
    b = Batch()
    for p in range(500):
        b.append(p, 1_700_000_000_000 + (p // 20) * 37, round(rng.uniform(0, 100), 1))
    data = encode(b, implementation=impl)
    assert len(data) / 500 < 2.0
    assert rows_of(decode(data, implementation=impl)) == grouped(b)


def test_kernels_check_their_columns() -> None:
    for name in IMPLEMENTATIONS:
        k = load_kernels(name, "codec3")
        with pytest.raises(ValueError, match="columns differ in length"):
            k.encode_body(array("I", [1]), array("q"), array("d"), array("B"))


# -- rejections ------------------------------------------------------------------------------

GOOD = encode(TINY, gateway="gw", seq=3)


def v3(payload: bytes) -> bytes:
    """A version-3 message of ``payload`` with a valid CRC: reaches the parser."""
    body = b"CGB\x03" + payload
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"CGB\x03\x00\x00\x00\x01", "truncated: 8 bytes, a version-3 batch has at least 13"),
        (GOOD[:-1], "CRC-32 mismatch"),
        (GOOD + b"\x00", "CRC-32 mismatch"),
        (v3(b"\x02\xff\xfe\x00\x00\x01\x00"), "corrupt: the gateway id is not UTF-8"),
        (v3(b"\x00\x00\x00\x00\x00"), "corrupt: timestamp unit 0"),
        (v3(b"\x00\x00\x00\x01\x05"), "truncated: the body ends inside the range-coded stream"),
        (v3(b"\x00\x00\x00\x01\x00\x00"), "corrupt: trailing data after the raw bit stream"),
        (v3(b"\x00\x00\x04\x80\x80\x80\x80\x10\x00"), "corrupt: point id 4294967296"),
        (v3(b"\x00\x00\x04\x01\xff\xff\xff\xff\x1f\x01\x00"), "corrupt: the series table claims"),
        (v3(b"\x00\x00\x05\x00\x01\x00\x02\x01\x00"), "corrupt: quality runs"),
    ],
)
def test_rejections(impl: str, data: bytes, message: str) -> None:
    with pytest.raises(CodecError) as info:
        decode(data, implementation=impl)
    assert str(info.value).startswith(message)


def test_huge_claim_fails_fast(impl: str) -> None:
    """A short blob claiming 2**20 + 1 readings is refused before anything is allocated,
    whatever its size: the agent never sends more than 100,000 in a message."""
    claim = v3(b"\x00\x00\x04\x00\x80\x80\x40" + b"\x01\x00" + bytes(64))
    with pytest.raises(CodecError, match=re.escape("claims over 1048577 readings")):
        decode(claim, implementation=impl)
