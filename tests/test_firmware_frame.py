"""firmware_bridge codec: CRC-32C, COBS, frames and every message type."""

from __future__ import annotations

import math
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge import cobs
from firmware_bridge import messages as m
from firmware_bridge.crc import CHECK_VALUE, crc32c
from firmware_bridge.frame import (
    DEFAULT_MAX_FRAME,
    Flags,
    Frame,
    FrameDecoder,
    FrameError,
    encode,
    encode_raw,
)

# -- CRC-32C ---------------------------------------------------------------------------


def _crc_bitwise(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    return c ^ 0xFFFFFFFF


def test_crc_check_value() -> None:
    assert crc32c(b"123456789") == CHECK_VALUE == 0xE3069283


def test_crc_rfc3720_vectors() -> None:
    # iSCSI (RFC 3720, B.4): 32 bytes of zeros, of 0xFF, ascending, descending
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C


@given(st.binary(max_size=300), st.integers(0, 300))
def test_crc_matches_bitwise_and_continues(data: bytes, cut: int) -> None:
    assert crc32c(data) == _crc_bitwise(data)
    cut = min(cut, len(data))
    assert crc32c(data[cut:], crc32c(data[:cut])) == crc32c(data)


# -- COBS ------------------------------------------------------------------------------

# the examples of the COBS article on Wikipedia (without the trailing delimiter)
COBS_VECTORS = [
    (b"\x00", b"\x01\x01"),
    (b"\x00\x00", b"\x01\x01\x01"),
    (b"\x00\x11\x00", b"\x01\x02\x11\x01"),
    (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
    (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
    (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
    (bytes(range(1, 255)), b"\xff" + bytes(range(1, 255))),
    (bytes(range(0, 255)), b"\x01\xff" + bytes(range(1, 255))),
    (bytes(range(1, 256)), b"\xff" + bytes(range(1, 255)) + b"\x02\xff"),
    (bytes(range(2, 256)) + b"\x00", b"\xff" + bytes(range(2, 256)) + b"\x01\x01"),
    (bytes(range(3, 256)) + b"\x00\x01", b"\xfe" + bytes(range(3, 256)) + b"\x02\x01"),
    (b"", b"\x01"),
]


@pytest.mark.parametrize(("raw", "encoded"), COBS_VECTORS)
def test_cobs_vectors(raw: bytes, encoded: bytes) -> None:
    assert cobs.encode(raw) == encoded
    assert cobs.decode(encoded) == raw


@given(st.binary(max_size=1200))
def test_cobs_round_trip(data: bytes) -> None:
    enc = cobs.encode(data)
    assert b"\x00" not in enc
    assert len(enc) <= cobs.max_encoded_len(len(data))
    assert cobs.decode(enc) == data


def test_cobs_rejects_bad_input() -> None:
    with pytest.raises(cobs.CobsError):
        cobs.decode(b"\x05\x11\x22")  # code runs past the end
    with pytest.raises(cobs.CobsError):
        cobs.decode(b"\x02\x00")


# -- frames ----------------------------------------------------------------------------


def test_frame_layout_worked_example() -> None:
    # the HEARTBEAT example of docs/firmware-protocol.md
    raw = encode_raw(m.MsgType.HEARTBEAT, 7, m.Heartbeat(1000, True).encode_payload())
    assert raw[:5] == bytes([1, 0x03, 7, 0, 0])
    assert raw[5:14] == struct.pack("<QB", 1000, 1)
    assert raw[14:] == crc32c(raw[:14]).to_bytes(4, "little")
    line = encode(m.MsgType.HEARTBEAT, 7, m.Heartbeat(1000, True).encode_payload())
    assert line.endswith(b"\x00") and b"\x00" not in line[:-1]
    assert FrameDecoder().feed(line) == [Frame(0x03, 7, 0, raw[5:14])]


def test_decoder_byte_by_byte_and_split_anywhere() -> None:
    lines = [encode(0x10, i, bytes([i]) * (i * 7), Flags.ACK_REQUESTED) for i in range(20)]
    stream = b"".join(lines)
    for step in (1, 3, 64, len(stream)):
        dec = FrameDecoder()
        out = []
        for i in range(0, len(stream), step):
            out += dec.feed(stream[i : i + step])
        assert [f.seq for f in out if isinstance(f, Frame)] == list(range(20))
        assert dec.counts["frames"] == 20 and sum(dec.counts.values()) == 20


def test_garbage_truncation_bad_crc_oversize_then_resync() -> None:
    good = encode(0x03, 1, b"\x01" * 9)
    corrupted = bytearray(good)
    corrupted[3] ^= 0x40
    stream = (
        b"\x13\x37garbage\xff" + b"\x00"  # garbage up to a delimiter
        + good[:6] + b"\x00"  # a truncated frame
        + bytes(corrupted)  # a bit error
        + b"\x01" * 5000  # a run with no delimiter: oversize
        + b"\x00"
        + good
    )  # fmt: skip
    dec = FrameDecoder()
    out = dec.feed(stream)
    frames = [f for f in out if isinstance(f, Frame)]
    errors = [f.reason for f in out if isinstance(f, FrameError)]
    assert frames == [Frame(0x03, 1, 0, b"\x01" * 9)]
    assert errors.count("oversize") == 1
    assert "bad_crc" in errors
    assert set(errors) <= {"cobs", "short", "bad_crc", "oversize"}
    assert len(errors) == 4
    assert dec.counts["frames"] == 1


def test_oversize_fed_in_pieces_is_bounded() -> None:
    dec = FrameDecoder(max_frame=64)
    errs = []
    for _ in range(100):
        errs += dec.feed(b"\x05" * 100)
    assert [e.reason for e in errs if isinstance(e, FrameError)] == ["oversize"]
    assert len(dec._buf) <= 100
    assert dec.feed(b"\x00" + encode(1, 2, b"")) == [Frame(1, 2, 0, b"")]


def test_decoded_frame_above_max_frame_is_rejected() -> None:
    line = encode(0x10, 1, bytes(300))  # zeros: encodes to about its own size
    assert FrameDecoder(max_frame=DEFAULT_MAX_FRAME).feed(line)[0] == FrameError(
        "oversize", len(line) - 1
    )
    assert isinstance(FrameDecoder(max_frame=400).feed(line)[0], Frame)


def test_bad_version() -> None:
    body = bytes([2, 3, 0, 0, 0])
    line = cobs.encode(body + crc32c(body).to_bytes(4, "little")) + b"\x00"
    assert FrameDecoder().feed(line) == [FrameError("bad_version", len(line) - 1)]


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=400), max_size=8), st.binary(max_size=60))
def test_fuzz_garbage_never_raises_and_valid_frames_survive(
    garbage: list[bytes], payload: bytes
) -> None:
    dec = FrameDecoder(max_frame=1024)
    good = encode(0x11, 42, payload)
    out = []
    for g in garbage:
        out += dec.feed(g)
        out += dec.feed(b"\x00" + good)  # a delimiter, then a valid frame
    for item in out:
        assert isinstance(item, Frame | FrameError)
    assert sum(1 for f in out if f == Frame(0x11, 42, 0, payload)) == len(garbage)


@settings(max_examples=300)
@given(st.integers(0, 255), st.binary(max_size=200))
def test_fuzz_message_decode_raises_only_message_error(type_: int, payload: bytes) -> None:
    try:
        msg = m.decode(Frame(type_, 0, 0, payload))
    except m.MessageError as e:
        assert isinstance(e.reason, m.NackReason)
    else:
        assert type_ == msg.TYPE
        assert m.decode_payload(type_, msg.encode_payload()) == msg


# -- messages --------------------------------------------------------------------------

V = m.Version(2, 1, 300)
ALL_MESSAGES: list[m.Message] = [
    m.Hello(1, 1024, 500),
    m.Capabilities(
        protocol_version=1,
        firmware=V,
        active_slot=1,
        slot_state=m.SlotState.TRIAL,
        boot_reason=m.BootReason.ROLLED_BACK,
        max_frame=1024,
        uptime_ms=2**40 + 5,
        sampling_interval_ms=1000,
        failed_version=m.Version(2, 2, 0),
        hardware_id="citygw-mcu-r2",
        request_seq=65535,
    ),
    m.Heartbeat(123456, False),
    m.Ack(),
    m.Nack(m.NackReason.BUSY),
    m.Readings(
        (
            m.Reading(1, 10, m.ValueType.F32, 12.5),
            m.Reading(2, 11, m.ValueType.I32, -7),
            m.Reading(3, 12, m.ValueType.F64, math.pi),
            m.Reading(4, 2**63, m.ValueType.BOOL, True),
            m.Reading(65535, 13, m.ValueType.F32, 3.25, fault=True),
        )
    ),
    m.Readings(()),
    m.Log(m.LogLevel.WARNING, 99, "sensor 3: open loop (2.1 mA) — café"),
    m.Command.set_interval(250),
    m.Command(m.Opcode.READ_CONFIG),
    m.Command(m.Opcode.REBOOT),
    m.Command(77, b"\x01"),
    m.CommandResult(m.Opcode.READ_CONFIG, m.CommandStatus.OK, b"abc", request_seq=9),
    m.OtaBegin(7, 200_000, os.urandom(32), V, 1000, os.urandom(64), "citygw-mcu-r2"),
    m.OtaBeginResult(7, m.OtaBeginStatus.ACCEPTED, 4000, request_seq=3),
    m.OtaChunk(7, 4000, os.urandom(1000)),
    m.OtaChunkAck(7, 5000),
    m.OtaEnd(7),
    m.OtaEndResult(7, m.OtaEndStatus.SHA_MISMATCH, request_seq=4),
    m.OtaStatusReq(7),
    m.OtaStatus(7, 5000, 200_000, m.OtaState.RECEIVING, request_seq=5),
]


VARIABLE_TAIL = {m.MsgType.LOG, m.MsgType.OTA_CHUNK, m.MsgType.COMMAND, m.MsgType.COMMAND_RESULT}


def test_every_type_has_a_round_trip_case() -> None:
    assert {msg.TYPE for msg in ALL_MESSAGES} == set(m.MsgType)


@pytest.mark.parametrize("msg", ALL_MESSAGES, ids=lambda msg: type(msg).__name__)
def test_message_round_trip(msg: m.Message) -> None:
    line = encode(msg.TYPE, 1234, msg.encode_payload(), Flags.ACK_REQUESTED)
    (frame,) = FrameDecoder(max_frame=2048).feed(line)
    assert isinstance(frame, Frame)
    assert frame.seq == 1234 and frame.flags == Flags.ACK_REQUESTED
    assert m.decode(frame) == msg
    payload = msg.encode_payload()
    if msg.TYPE in VARIABLE_TAIL:  # their last field is "the rest of the payload"
        return
    if payload:  # truncation is always an error, never a shorter message
        with pytest.raises(m.MessageError):
            m.decode_payload(msg.TYPE, payload[:-1])
    if msg.TYPE != m.MsgType.READINGS or msg.encode_payload() != b"\x00":
        with pytest.raises(m.MessageError):  # neither are trailing bytes accepted
            m.decode_payload(msg.TYPE, payload + b"\x00")


def test_config_report_round_trip() -> None:
    rep = m.ConfigReport(1000, 500, ((1, m.ValueType.F32), (2, m.ValueType.BOOL)))
    assert m.ConfigReport.decode(rep.encode()) == rep
    with pytest.raises(m.MessageError):
        m.ConfigReport.decode(rep.encode()[:-1])


def test_unknown_type_and_bad_enum() -> None:
    with pytest.raises(m.MessageError) as e:
        m.decode(Frame(0x7F, 0, 0, b""))
    assert e.value.reason is m.NackReason.UNKNOWN_TYPE
    with pytest.raises(m.MessageError) as e:
        m.decode(Frame(m.MsgType.NACK, 0, 0, b"\xee"))
    assert e.value.reason is m.NackReason.BAD_PAYLOAD


def test_version_parse() -> None:
    assert m.Version.parse("1.2.3") == (1, 2, 3) and str(m.Version(1, 2, 3)) == "1.2.3"
    for bad in ("1.2", "a.b.c", "1.2.70000"):
        with pytest.raises(ValueError):
            m.Version.parse(bad)
