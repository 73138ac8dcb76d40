"""Codec v2, what gateways before codec v3 send (the platform decodes it for as long as
such gateways exist): exact wire bytes, bit-exact round trips on both implementations (compiled and
pure twin, byte-identical output), v1 blobs still readable, header fields, the paths the
encoder picks, and rejection of malformed input with clear messages.
Fuzzing lives in tests/test_codec_fuzz.py."""

from __future__ import annotations

import math
import random
import re
import struct
import zlib
from array import array
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from native import codec
from native.batch import Batch
from native.codec import CodecError, decode, decode_message
from tests.helpers import IMPLEMENTATIONS, load_kernels

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@pytest.fixture(params=IMPLEMENTATIONS)
def kernels(request: pytest.FixtureRequest) -> str:
    """One implementation of the body codec ("cython" fails here when not built)."""
    load_kernels(request.param, "codec")
    return str(request.param)


def both() -> list[str]:
    for name in IMPLEMENTATIONS:
        load_kernels(name, "codec")  # fails when the compiled one is not built
    return IMPLEMENTATIONS


def encode(b: Batch, **kwargs: Any) -> bytes:
    """A version-2 message: what gateways before codec v3 send."""
    return codec.encode(b, version=2, **kwargs)


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
    data = [encode(b, gateway=gateway, seq=seq, implementation=k) for k in both()]
    assert data[0] == data[-1], "the implementations' bytes differ"
    for k in both():
        m = decode_message(data[0], implementation=k)
        assert (m.version, m.gateway, m.seq) == (2, gateway, seq)
        assert rows_of(m.batch) == grouped(b)
    return data[0]


# -- exact bytes -----------------------------------------------------------------------------

TINY = Batch.from_rows([(1, 1000, 1.5, 0), (3, 900, -0.0, 2)])


def test_tiny_batch_wire_bytes(kernels: str) -> None:
    data = encode(TINY, implementation=kernels)
    body = bytes.fromhex(
        "434742" "02"   # magic, version
        "00" "00"       # gateway "" (length 0), seq 0
        "0b"            # 2 series << 2 | 1 << 1 (table in integer blocks) | 1 (some quality
                        # is not GOOD)
        "0103"          # ids 1, 3 as (first id, then gap - 1): [1, 1], width 1, packed 0b11
        "00"            # counts - 1: [0, 0], width 0
        # timestamp block, D mode, both rows start a series: zz(1000 - 0) = 2000,
        # zz(900 - 1000) = 199; width 11 (no exceptions), 22 bits packed LSB-first
        "0b" "d03f06"
        # value block: -0.0 has no decimal form, so XOR (0x40); per row (both start a
        # series, so XOR with 0): code 1, lead code 0, length 13, 0x7ff (1.5 =
        # 0x3ff8 << 48); code 1, lead code 0, length 1, 1 (-0.0 = 1 << 63); 36 bits
        "40" "a1f93f2108"
        "02" "0001" "0201"  # quality: 2 runs, (GOOD, 1) and (2, 1)
    )  # fmt: skip
    assert data == body + struct.pack("<I", zlib.crc32(body))
    assert rows_of(decode(data, implementation=kernels)) == rows_of(TINY)


def test_empty_batch(kernels: str) -> None:
    data = encode(Batch(), implementation=kernels)
    assert data[:-4] == b"CGB\x02\x00\x00\x00"  # no series, all GOOD
    assert data[-4:] == struct.pack("<I", zlib.crc32(data[:-4]))
    m = decode_message(data, implementation=kernels)
    assert (m.version, m.gateway, m.seq, len(m.batch)) == (2, "", 0, 0)


# -- version 1 stays readable ----------------------------------------------------------------

# Made by the version-1 encoder (zlib level 6) from V1_ROWS before version 2 existed.
V1_BLOB = bytes.fromhex(
    "434742012e000000789c637e010409848998ff20c0c00c041f882020aa41e03f110439aa339e9eef666460"
    "6064800018fd0f22fd1fc67fc98c5d1c5d3d4c1d2e7360f433347543d5de1535520625fffed7ff4755d700"
    "e3b341d5c3f80cf2b631d5b3765cff26621c54d8bfeeec1b2e4d8fb4d625871fc224aab96669eef0b80e32"
    "877116432b57bfc84cb9c51aeb8c77d81e723f13783de661daeb82af55300991eb3363e41e2e065b3193e1"
    "f5f543eb66b616c4b81bcb717d7d7866c7e2feaab4405b0d1198c4bac533fb5bab0ade4354072efeea3ef3"
    "b56dff43e3d6eb1a5567e40a0e89a4ede08a590793702f9879e8b588ed3e88ea1d051a0f6706721daa327e"
    "bd3846e44cabedd7756972d7fbdd61120f6d677e0d5cc7b516a23a6eaf4cd54d8be95f43360b169cd7eb79"
    "edb5823deda872d34387797f637649565c97f2aa5c7183ddfc1e58b5898989a9a9a9999999b9b9858585a5"
    "a5a59595b5b5b58d8d8dadadad9d9dbdbdbd0308383afef8f0818161a70391a0befe7f03833d03231351088"
    "881b902002e845cd2"
)


def v1_rows() -> list[tuple[int, int, float, int]]:
    t0 = 1_700_000_000_000
    rows = [
        (i % 5 * 1000 + 3, t0 + (i // 5) * 1000 + i % 3, round(20 + i * 0.37, 2), i % 3)
        for i in range(40)
    ]
    specials = [f64(0x7FF8DEADBEEF0001), math.inf, -math.inf, -0.0, f64(1), 0.1]
    ts = [INT64_MIN, INT64_MAX, 0, -1, 5, 4]
    quality = [0, 1, 2, 255, 0, 0]
    rows += [(2**32 - 1 - j, ts[j], v, quality[j]) for j, v in enumerate(specials)]
    return rows


def test_v1_blob_still_decodes(kernels: str) -> None:
    m = decode_message(V1_BLOB, implementation=kernels)
    assert (m.version, m.gateway, m.seq) == (1, "", 0)
    assert rows_of(m.batch) == rows_of(Batch.from_rows(v1_rows()))  # v1 keeps row order
    assert rows_of(decode(V1_BLOB)) == rows_of(m.batch)


def test_decoder_table_and_error_type() -> None:
    assert set(codec._DECODERS) == {1, 2, 3}
    assert issubclass(CodecError, ValueError)
    data = encode(TINY)
    for form in (data, bytearray(data), memoryview(data)):
        assert rows_of(decode(form)) == rows_of(TINY)
    assert rows_of(decode(memoryview(b"xx" + data)[2:])) == rows_of(TINY)


# -- header fields -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gateway", "seq"),
    [("", 0), ("gw-0042", 127), ("gw-0042", 128), ("Zürich-Süd", 2**64 - 1), ("g" * 255, 2**40)],
)
def test_gateway_and_seq_round_trip(kernels: str, gateway: str, seq: int) -> None:
    b = Batch.from_rows([(5, 1000, 20.5, 0)])
    m = decode_message(
        encode(b, gateway=gateway, seq=seq, implementation=kernels), implementation=kernels
    )
    assert (m.version, m.gateway, m.seq) == (2, gateway, seq)
    assert rows_of(m.batch) == rows_of(b)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gateway": "g" * 256}, "gateway id of 256 UTF-8 bytes: at most 255 fit"),
        ({"gateway": "ü" * 128}, "gateway id of 256 UTF-8 bytes: at most 255 fit"),
        ({"seq": -1}, "seq -1 is outside 0 .. 2**64-1"),
        ({"seq": 2**64}, f"seq {2**64} is outside 0 .. 2**64-1"),
    ],
)
def test_unencodable_header(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(CodecError, match="^" + re.escape(message)):
        encode(TINY, **kwargs)  # type: ignore[arg-type]


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
    ]
    ts = [INT64_MAX, INT64_MIN, INT64_MAX, 0, -1, INT64_MIN, INT64_MIN, 5, 4, 4, INT64_MAX]
    rows = [(7, ts[i % len(ts)], v, i % 256) for i, v in enumerate(specials * 20)]
    rows += [(0, t, 1.0, 255) for t in ts] + [(2**32 - 1, t, -0.0, 1) for t in ts]
    round_trip(Batch.from_rows(rows))


def test_rows_grouped_by_point_each_in_its_order(kernels: str) -> None:
    rows = [(9, 30, 1.0, 0), (2, 10, 2.0, 0), (9, 20, 3.0, 1), (5, 5, 4.0, 0), (2, 10, 5.0, 2)]
    out = decode(encode(Batch.from_rows(rows), implementation=kernels), implementation=kernels)
    assert list(out.rows()) == [
        (2, 10, 2.0, 0), (2, 10, 5.0, 2), (5, 5, 4.0, 0), (9, 30, 1.0, 0), (9, 20, 3.0, 1)
    ]  # fmt: skip


@pytest.mark.parametrize("seed", range(12))
def test_random_batches_identical_bytes(seed: int) -> None:
    rng = random.Random(seed)
    kind = seed % 4
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
        else:  # full-precision noise
            t += 997
            v = rng.gauss(0, 1)
        b.append(pid, t, v, rng.choice([0, 0, 0, 0, 1, 2, 255]) if seed % 2 else 0)
    round_trip(b)


finite_or_not = st.one_of(
    st.integers(0, 2**64 - 1).map(f64),  # any bit pattern: NaN payloads, subnormals
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan, f64(1)]),
    st.builds(lambda i, k: round(i / 10**k, k), st.integers(-(10**9), 10**9), st.integers(0, 9)),
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
    walks with steps and spikes, the odd special value."""
    npts = draw(st.integers(1, 4))
    polls = draw(st.integers(1, 300))
    period = draw(st.sampled_from([1, 1000, 60_000, 3_600_000, 2**40]))
    jitter = draw(st.sampled_from([0, 1, 10, 50]))
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
            v = round(level[p], k) if r > 0.005 else rng.choice([math.nan, -0.0, 1e300])
            b.append(p * 7, t, v, 0 if r < 0.99 else 1)
    return b


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(polled())
def test_hypothesis_polled_series(b: Batch) -> None:
    round_trip(b)


# -- paths the encoder picks -----------------------------------------------------------------


def series(values: list[float], ts: list[int] | None = None) -> Batch:
    n = len(values)
    times = ts if ts is not None else [1_700_000_000_000 + 1000 * i for i in range(n)]
    return Batch(array("I", [3]) * n, array("q", times), array("d", values), array("B", bytes(n)))


def test_decimal_path_for_centi_resolution(kernels: str) -> None:
    rng = random.Random(5)
    level, values = 20.0, []
    for _ in range(1280):
        level += rng.gauss(0, 0.03)
        values.append(round(level, 2))
    data = encode(series(values), implementation=kernels)
    assert all(m.startswith("decimal 2") for m in codec.value_block_modes(data))
    assert len(data) / 1280 < 1.0  # raw columns: 16 bytes a reading
    assert rows_of(decode(data, implementation=kernels)) == rows_of(series(values))


def test_second_differences_for_smooth_data(kernels: str) -> None:
    values = [round(10 * math.sin(i / 40), 3) for i in range(1280)]
    data = encode(series(values), implementation=kernels)
    assert all(m == "decimal 3 order 2" for m in codec.value_block_modes(data)[1:])


def test_xor_path_for_full_precision_noise(kernels: str) -> None:
    rng = random.Random(6)
    values = [rng.gauss(20, 3) for _ in range(640)]
    data = encode(series(values), implementation=kernels)
    assert codec.value_block_modes(data) == ["xor"] * 5
    assert rows_of(decode(data, implementation=kernels)) == rows_of(series(values))


def test_xor_path_keeps_special_values(kernels: str) -> None:
    values = [f64(0x7FF8DEADBEEF0001), -0.0, math.inf, 1.5] * 40
    data = encode(series(values), implementation=kernels)
    assert codec.value_block_modes(data) == ["xor", "xor"]
    assert rows_of(decode(data, implementation=kernels)) == rows_of(series(values))


def test_constant_series_costs_almost_nothing(kernels: str) -> None:
    data = encode(series([21.5] * 6000), gateway="gw-0042", implementation=kernels)
    assert len(data) < 200  # 47 value blocks and 47 timestamp blocks of a few bytes


def test_grid_timestamps_for_poll_jitter(kernels: str) -> None:
    """Polls on a fixed 1 s schedule answered 0..9 ms late: residuals against the grid
    take 4 bits (726 bytes in all); delta-of-delta of the same jitter spans -18..18 and
    needs over 5 bits a reading (about 870 bytes)."""
    rng = random.Random(7)
    ts = [1_700_000_000_000 + 1000 * i + rng.randrange(10) for i in range(1280)]
    data = encode(series([1.0] * 1280, ts), implementation=kernels)
    assert len(data) < 1280 * 4.8 / 8
    assert list(decode(data, implementation=kernels).timestamps) == ts


def test_spikes_and_steps_become_exceptions(kernels: str) -> None:
    values = [12.5] * 1280
    for i in (100, 101, 700):
        values[i] = 480.0
    for i in range(900, 1280):
        values[i] = 30.0
    data = encode(series(values), implementation=kernels)
    assert len(data) < 120
    assert rows_of(decode(data, implementation=kernels)) == rows_of(series(values))


def test_many_points_with_one_reading_each_share_blocks(kernels: str) -> None:
    """A 1 s flush of 500 points polled once: blocks span series, so no per-point
    block headers."""
    rng = random.Random(8)
    b = Batch()
    for p in range(500):
        b.append(p, 1_700_000_000_000 + (p // 20) * 37, round(rng.uniform(0, 100), 1))
    data = encode(b, implementation=kernels)
    assert len(data) / 500 < 3.5
    assert rows_of(decode(data, implementation=kernels)) == grouped(b)


def test_kernels_check_their_columns() -> None:
    for k in both():
        with pytest.raises(ValueError, match="columns differ in length"):
            load_kernels(k, "codec").encode_body(
                array("I", [1]), array("q"), array("d"), array("B")
            )


# -- rejections ------------------------------------------------------------------------------

GOOD = encode(TINY, gateway="gw", seq=3)


def sealed(body: bytes) -> bytes:
    """``body`` with a valid CRC: reaches the parser."""
    return body + struct.pack("<I", zlib.crc32(body))


def v2(payload: bytes) -> bytes:
    return sealed(b"CGB\x02" + payload)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated: 0 bytes, a batch starts with 4"),
        (b"CG", "truncated: 2 bytes, a batch starts with 4"),
        (b"XYZ\x02" + GOOD[4:], "bad magic b'XYZ', expected b'CGB': not a citygw batch"),
        (b"CGB\x07" + GOOD[4:], "codec version 7 is not supported (this build reads 1, 2, 3)"),
        (b"CGB\x00", "codec version 0 is not supported (this build reads 1, 2, 3)"),
        (b"CGB\x02\x00\x00\x00", "truncated: 7 bytes, a version-2 batch has at least 11"),
        (GOOD[:-1], "CRC-32 mismatch"),
        (GOOD + b"\x00", "CRC-32 mismatch"),
        (GOOD[:10] + bytes([GOOD[10] ^ 4]) + GOOD[11:], "CRC-32 mismatch"),
        (v2(b"\x05gw"), "truncated"),
        (v2(b"\x02\xff\xfe\x00\x00"), "corrupt: the gateway id is not UTF-8"),
        (v2(GOOD[4:-4] + b"\x00"), "corrupt: trailing data after the last block"),
        (v2(b"\x00\x00\x04\x01"), "truncated"),  # 1 series, the table ends
        (v2(b"\x00\x00\x06\x01"), "truncated"),  # the same, table in integer blocks
        (v2(b"\x00\x00\x80\x80\x80\x80\x10"), "corrupt: 1073741824 series in a body"),
        (v2(b"\x00\x00\x04\x80\x80\x80\x80\x10\x00"), "corrupt: point id 4294967296"),
        (v2(b"\x00\x00\x08\xff\xff\xff\xff\x0f\x00\x00\x00"), "corrupt: point id 4294967296"),
        (v2(b"\x00\x00\x04\x01\xff\xff\xff\xff\xff\x1f"), "corrupt: the series table claims"),
        (v2(b"\x00\x00\x04\x01\x01\x00\x00"), "truncated"),  # 2 readings: ts, no values
        (v2(b"\x00\x00\x04\x01\x00\x41\x00\x00"), "corrupt: bit width > 64"),
        (v2(b"\x00\x00\x04\x01\x00\x00\x0a\x00"), "corrupt: unknown value block mode"),
        (v2(b"\x00\x00\x05\x01\x00\x00\x00\x00\x01\x00\x02"), "corrupt: quality runs"),
        (v2(b"\x00\x00\x04\x01\x00\xff\x00\x00\x00\x00\x00"), "corrupt: a grid timestamp"),
        (v2(b"\x00\x00\x04\x01\x00\x00\x40\x02"), "corrupt: XOR value reuses"),
        (v2(b"\x00\x00\x04\x01\x00\x80\x00"), "truncated"),
        (v2(b"\x00\x00\x04\x01\x00\x80\x01\x00\x01"), "corrupt: more exceptions than values"),
    ],
)
def test_rejections(kernels: str, data: bytes, message: str) -> None:
    with pytest.raises(CodecError) as info:
        decode(data, implementation=kernels)
    assert str(info.value).startswith(message)


def test_unknown_version_names_it() -> None:
    with pytest.raises(CodecError, match=r"^codec version 4 is not supported"):
        decode_message(b"CGB\x04" + GOOD[4:])


def test_huge_claim_fails_fast(kernels: str) -> None:
    """A 20-byte blob claiming 2**40 readings is refused before anything is allocated."""
    claim = v2(b"\x00\x00\x04\x01" + bytes([0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F]) + b"\x00" * 6)
    with pytest.raises(CodecError, match="claims over 1099511627776 readings"):
        decode(claim, implementation=kernels)
