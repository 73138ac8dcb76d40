"""Codec v1: exact wire bytes, bit-exact round trips, and rejection of anything malformed."""

from __future__ import annotations

import random
import struct
import zlib
from array import array
from types import ModuleType

import pytest

from hil.datasets import sensor_batch
from native import codec, impl
from native.batch import Batch
from native.codec import CodecError, decode, encode
from tests.helpers import load_kernels

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def use(monkeypatch: pytest.MonkeyPatch, mod: ModuleType) -> None:
    for name in ("delta_encode", "delta_decode"):
        monkeypatch.setattr(impl, name, getattr(mod, name))


@pytest.fixture(params=["cython", "python"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Routes the codec through one implementation."""
    mod = load_kernels(request.param)
    use(monkeypatch, mod)
    return mod


def f64(bits: int) -> float:
    value: float = struct.unpack("<d", struct.pack("<Q", bits))[0]
    return value


def bits(values: array[float]) -> list[bytes]:
    return [struct.pack("<d", v) for v in values]


def assert_same(a: Batch, b: Batch) -> None:
    assert list(a.point_ids) == list(b.point_ids)
    assert list(a.timestamps) == list(b.timestamps)
    assert bits(a.values) == bits(b.values)  # bit-exact: NaN payloads, -0.0
    assert list(a.quality) == list(b.quality)


TINY = Batch.from_rows([(1, 1000, 1.5, 0), (3, 900, -0.0, 2)])


def test_tiny_batch_wire_bytes(kernels: ModuleType) -> None:
    data = encode(TINY)
    assert data[:8] == b"CGB" + b"\x01" + b"\x02\x00\x00\x00"  # magic, version, count LE
    body = zlib.decompress(data[8:])
    assert body == bytes.fromhex(
        # ids 1, 3 -> deltas 1, 2 as u32 LE, byte-shuffled (4 planes of 2 bytes)
        "0102" "0000" "0000" "0000"
        # timestamps 1000, 900 -> deltas 1000, -100 mod 2**64, u64 LE
        "e803000000000000" "9cffffffffffffff"
        # values 1.5 = 0x3ff8000000000000, -0.0 = 0x8000000000000000, byte-shuffled
        "0000" "0000" "0000" "0000" "0000" "0000" "f800" "3f80"
        # quality
        "0002"
    )  # fmt: skip
    assert_same(decode(data), TINY)


def test_special_floats_bit_exact(kernels: ModuleType) -> None:
    specials = [
        f64(0x7FF8000000000000),  # quiet NaN
        f64(0x7FF8DEADBEEF0001),  # NaN with a payload
        f64(0xFFF8000000000001),  # negative NaN
        f64(0x7FF0000000000001),  # signalling NaN
        float("inf"),
        float("-inf"),
        -0.0,
        0.0,
        f64(1),  # smallest subnormal
        f64(0x7FEFFFFFFFFFFFFF),  # largest finite
        -1.7976931348623157e308,
        0.1,
    ]
    b = Batch.from_rows([(i, i, v, 0) for i, v in enumerate(specials)])
    out = decode(encode(b))
    assert bits(out.values) == [struct.pack("<d", v) for v in specials]
    assert_same(out, b)


def test_extreme_ids_and_timestamps_wrap(kernels: ModuleType) -> None:
    ts = [INT64_MAX, INT64_MIN, INT64_MAX, 0, -1, INT64_MIN, INT64_MIN, 5, 4, 4, INT64_MAX]
    ids = [0, 2**32 - 1, 0, 2**32 - 1, 7, 7, 1, 0, 2**31, 3, 2]
    b = Batch.from_rows([(i, t, 1.0, 0) for i, t in zip(ids, ts, strict=True)])
    b.quality[0] = 255
    assert_same(decode(encode(b)), b)


def test_empty_batch(kernels: ModuleType) -> None:
    data = encode(Batch())
    assert data[:8] == b"CGB\x01\x00\x00\x00\x00"
    assert len(decode(data)) == 0


def test_sensor_data_compresses(kernels: ModuleType) -> None:
    b = sensor_batch()
    data = encode(b)
    assert_same(decode(data), b)
    assert len(data) / len(b) < 3.0  # raw columns are 21 bytes a reading


@pytest.mark.parametrize("seed", range(10))
def test_both_implementations_same_bytes(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    b = Batch()
    for _ in range(rng.randrange(0, 2000)):
        b.append(
            rng.randrange(2**32),
            rng.randrange(INT64_MIN, INT64_MAX + 1),
            f64(rng.getrandbits(64)),
            rng.randrange(256),
        )
    encoded = []
    for name in ("cython", "python"):
        use(monkeypatch, load_kernels(name))
        encoded.append(encode(b))
        assert_same(decode(encoded[-1]), b)
    assert encoded[0] == encoded[1]


# -- rejections ----------------------------------------------------------------------------

GOOD = encode(TINY)


def with_body(body: bytes, count: int = 2, version: int = 1) -> bytes:
    return b"CGB" + bytes((version,)) + struct.pack("<I", count) + zlib.compress(body)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated: 0 bytes, a batch starts with 4"),
        (b"CG", "truncated: 2 bytes, a batch starts with 4"),
        (b"XYZ\x01" + GOOD[4:], "bad magic b'XYZ', expected b'CGB': not a citygw batch"),
        (b"CGB\x07" + GOOD[4:], "codec version 7 is not supported (this build reads 1)"),
        (b"CGB\x00", "codec version 0 is not supported (this build reads 1)"),
        (b"CGB\x01\x02\x00", "truncated: 2 bytes after the version, need 4 for the count"),
        (GOOD[:8], "truncated: the compressed data ends early"),
        (GOOD[:-1], "truncated: the compressed data ends early"),
        (GOOD + b"\x00junk", "5 bytes of trailing garbage after the batch"),
        (GOOD[:4] + b"\x03\x00\x00\x00" + GOOD[8:], "count mismatch: header says 3 readings"),
        (GOOD[:4] + b"\x01\x00\x00\x00" + GOOD[8:], "count mismatch: header says 1 readings"),
        (with_body(b"\x00" * 41), "count mismatch: header says 2 readings (42 bytes)"),
        (GOOD[:8] + b"\x78\x9c\xff\xff", "corrupt compressed data"),
        (GOOD[:-2] + bytes([GOOD[-2] ^ 1, GOOD[-1]]), "corrupt compressed data"),  # checksum
    ],
)
def test_rejections(data: bytes, message: str) -> None:
    with pytest.raises(CodecError) as info:
        decode(data)
    assert str(info.value).startswith(message)


def test_decoder_table_and_error_type() -> None:
    assert codec.FORMAT_VERSION == 1 and set(codec._DECODERS) == {1}
    assert issubclass(CodecError, ValueError)
    assert_same(decode(bytearray(GOOD)), TINY)
    assert_same(decode(memoryview(GOOD)), TINY)


def test_fuzz_only_codec_errors(kernels: ModuleType) -> None:
    rng = random.Random(1234)
    valid = [encode(TINY), encode(sensor_batch(20, 5)), encode(Batch())]
    inputs: list[bytes] = []
    for v in valid:
        inputs += [v[:i] for i in range(len(v))]  # every truncation
        for _ in range(300):  # byte mutations, insertions, deletions
            m = bytearray(v)
            for _ in range(rng.randrange(1, 4)):
                op, i = rng.randrange(3), rng.randrange(len(m) + 1)
                if op == 0 and i < len(m):
                    m[i] = rng.randrange(256)
                elif op == 1:
                    m[i:i] = bytes([rng.randrange(256)])
                elif i < len(m):
                    del m[i]
            inputs.append(bytes(m))
    inputs += [rng.randbytes(rng.randrange(64)) for _ in range(300)]
    inputs += [b"CGB\x01" + rng.randbytes(rng.randrange(64)) for _ in range(300)]
    decoded = 0
    for data in inputs:
        try:
            out = decode(data)
        except CodecError:
            continue
        decoded += 1
        assert isinstance(out, Batch)
    assert decoded < len(inputs) // 10  # nearly every damaged input is refused
