"""Codec fuzzing, versions 2 and 3: whatever the bytes, decode raises CodecError or returns
a batch, never anything else, on both implementations. The CRC-32 must catch truncation and random
corruption; forged CRCs put the parser itself under fire, and there both implementations
must agree (both refuse, or both return the same rows)."""

from __future__ import annotations

import random
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hil.datasets import sensor_batch
from native.batch import Batch
from native.codec import CodecError, decode, encode
from tests.helpers import IMPLEMENTATIONS, load_kernels


def both() -> list[str]:
    for name in IMPLEMENTATIONS:
        for pair in ("codec", "codec3"):
            load_kernels(name, pair)  # fails when the compiled one is not built
    return IMPLEMENTATIONS


def rows_of(b: Batch) -> list[tuple[int, int, bytes, int]]:
    return [(p, t, struct.pack("<d", v), q) for p, t, v, q in b.rows()]


def outcome(data: bytes, impl: str) -> list[tuple[int, int, bytes, int]] | None:
    """The decoded rows, or None for CodecError; any other exception fails the test."""
    try:
        return rows_of(decode(data, implementation=impl))
    except CodecError:
        return None


def forge(data: bytes) -> bytes:
    """data[:-4] with a CRC that matches it."""
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


def samples(version: int) -> list[bytes]:
    rng = random.Random(3)
    noise = Batch()
    for i in range(300):
        noise.append(i % 3, 1_700_000_000_000 + i * 1000 + rng.randrange(9), rng.gauss(0, 1), i % 2)
    tiny = Batch.from_rows([(1, 1000, 1.5, 0), (3, 900, -0.0, 2)])
    return [
        encode(tiny, gateway="gw", seq=5, version=version),
        encode(sensor_batch(20, 8), gateway="gw-0042", seq=300, version=version),
        encode(noise, version=version),
        encode(Batch(), version=version),
    ]


SAMPLES = samples(2) + samples(3)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_every_truncation_is_refused(impl: str) -> None:
    both()
    for data in SAMPLES:
        for i in range(len(data)):
            with pytest.raises(CodecError):
                decode(data[:i], implementation=impl)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_bit_flips_are_caught(impl: str) -> None:
    """CRC-32 catches every error of up to 3 flipped bits in messages this small."""
    both()
    rng = random.Random(11)
    for data in SAMPLES:
        for _ in range(150):
            m = bytearray(data)
            for bit in rng.sample(range(len(m) * 8), rng.randrange(1, 4)):  # distinct bits
                m[bit // 8] ^= 1 << (bit % 8)
            with pytest.raises(CodecError):
                decode(bytes(m), implementation=impl)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_garbage_is_refused(impl: str) -> None:
    both()
    rng = random.Random(12)
    for _ in range(500):
        junk = rng.randbytes(rng.randrange(80))
        for data in (junk, b"CGB\x03" + junk, b"CGB\x02" + junk, b"CGB\x01" + junk):
            with pytest.raises(CodecError):
                decode(data, implementation=impl)


def test_forged_crc_mutations_never_crash() -> None:
    """Mutate the body, then fix the CRC: the parser meets the damage itself."""
    rng = random.Random(13)
    kernels = both()
    refused = 0
    total = 0
    for data in SAMPLES:
        for _ in range(400):
            m = bytearray(data[:-4])
            for _ in range(rng.randrange(1, 4)):
                op, i = rng.randrange(3), rng.randrange(4, len(m) + 1)
                if op == 0 and i < len(m):
                    m[i] = rng.randrange(256)
                elif op == 1:
                    m[i:i] = bytes([rng.randrange(256)])
                elif i < len(m):
                    del m[i]
            forged = forge(bytes(m) + b"\x00\x00\x00\x00")
            results = [outcome(forged, k) for k in kernels]
            assert results[0] == results[-1], forged.hex()
            total += 1
            refused += results[0] is None
    assert refused > total // 2  # most damage breaks the structure


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=120))
def test_hypothesis_bytes_never_crash(payload: bytes) -> None:
    kernels = both()
    for data in (
        payload,
        b"CGB\x02" + payload,
        forge(b"CGB\x02" + payload + b"\x00" * 4),
        forge(b"CGB\x03" + payload + b"\x00" * 4),
    ):
        results = [outcome(data, k) for k in kernels]
        assert results[0] == results[-1]


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=1, max_size=60), st.integers(0, len(SAMPLES) - 1))
def test_hypothesis_splices_into_valid_messages(chunk: bytes, which: int) -> None:
    """Valid header, then a random tail with a good CRC: deep parser paths."""
    data = SAMPLES[which]
    cut = 7 + len(chunk) % max(1, len(data) - 11)
    forged = forge(data[:cut] + chunk + b"\x00" * 4)
    results = [outcome(forged, k) for k in both()]
    assert results[0] == results[-1]


def test_huge_claims_fail_fast() -> None:
    """Tiny blobs claiming up to 2**64 series or readings: refused, nothing allocated."""
    for head in (
        b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # 2**62 series
        b"\x04\x00\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # 1 series of 2**64 readings
        b"\x06\x40\x00\x7f\x00",  # integer-block table: huge widths
    ):
        for version in (b"\x02", b"\x03"):
            forged = forge(b"CGB" + version + b"\x00\x00" + head + b"\x00" * 8)
            for k in both():
                with pytest.raises(CodecError):
                    decode(forged, implementation=k)
