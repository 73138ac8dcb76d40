"""Frames of the serial link protocol (docs/firmware-protocol.md, "Framing").

On the line a frame is ``COBS(header | payload | crc32c) 0x00``. The header is five
bytes: protocol version, message type, sequence number (u16 LE), flags. The payload
length is what remains before the 4-byte CRC (LE), which covers header and payload.

`FrameDecoder` is sans-I/O: feed it whatever bytes arrived and it returns the frames
and the errors found, keeping a bounded partial frame between calls. Any error makes
it drop what it holds and restart at the next 0x00, so one bad frame costs one frame.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass
from enum import IntFlag

from firmware_bridge import cobs
from firmware_bridge.crc import crc32c

__all__ = [
    "DEFAULT_MAX_FRAME",
    "DELIMITER",
    "HEADER_SIZE",
    "MIN_MAX_FRAME",
    "OVERHEAD",
    "PROTOCOL_VERSION",
    "Flags",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "FrameFormatError",
    "encode",
    "encode_decode",
    "encode_raw",
    "parse",
]

PROTOCOL_VERSION = 1
DELIMITER = b"\x00"
HEADER_SIZE = 5
CRC_SIZE = 4
OVERHEAD = HEADER_SIZE + CRC_SIZE  # bytes of a frame that are not payload
DEFAULT_MAX_FRAME = 256  # frame limit (header + payload + CRC) until HELLO negotiates one
MIN_MAX_FRAME = 64  # no side may announce less
MAX_MAX_FRAME = 65535  # the field is a u16

_HEADER = struct.Struct("<BBHB")


class Flags(IntFlag):
    NONE = 0
    ACK_REQUESTED = 0x01  # the receiver must answer with ACK or NACK of this seq
    IS_RESPONSE = 0x02  # ACK/NACK: the header seq is the answered frame's seq
    RETRANSMIT = 0x04  # a repeat of an earlier frame (diagnostics only)


@dataclass(frozen=True, slots=True)
class Frame:
    type: int
    seq: int
    flags: int
    payload: bytes
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class FrameError:
    """A rejected frame (returned by the decoder, not raised). Reasons: ``cobs``,
    ``short``, ``bad_crc``, ``bad_version``, ``oversize``."""

    reason: str
    size: int  # bytes of the frame on the line (encoded, without the delimiter)


class FrameFormatError(ValueError):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def encode_raw(type_: int, seq: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """The unencoded frame: header | payload | CRC (what the CRC and max_frame see)."""
    body = _HEADER.pack(PROTOCOL_VERSION, type_, seq & 0xFFFF, flags) + payload
    return body + crc32c(body).to_bytes(4, "little")


def encode(type_: int, seq: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """A frame as it goes on the line: COBS-encoded and terminated by 0x00."""
    return cobs.encode(encode_raw(type_, seq, payload, flags)) + DELIMITER


def parse(raw: bytes) -> Frame:
    """An unencoded frame (COBS already removed) -> Frame. Raises FrameFormatError."""
    if len(raw) < OVERHEAD:
        raise FrameFormatError("short", f"{len(raw)} bytes")
    body = raw[:-CRC_SIZE]
    if crc32c(body) != int.from_bytes(raw[-CRC_SIZE:], "little"):
        raise FrameFormatError("bad_crc")
    version, type_, seq, flags = _HEADER.unpack_from(body)
    if version != PROTOCOL_VERSION:
        raise FrameFormatError("bad_version", f"version {version}")
    return Frame(type_, seq, flags, body[HEADER_SIZE:], version)


class FrameDecoder:
    """Bytes from the line in, frames (and errors) out.

    `max_frame` bounds a decoded frame; the partial frame kept between `feed` calls is
    bounded by its longest COBS encoding, so garbage without a 0x00 cannot grow memory:
    the excess is dropped (one ``oversize`` error) and decoding resumes after the next
    0x00. `counts` holds every error by reason, plus ``frames``.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._buf = bytearray()
        self._skipping = False  # inside an oversize frame: drop until the next 0x00
        self.counts: Counter[str] = Counter()
        self.max_frame = max_frame

    @property
    def max_frame(self) -> int:
        return self._max_frame

    @max_frame.setter
    def max_frame(self, value: int) -> None:
        self._max_frame = value
        self._max_encoded = cobs.max_encoded_len(value)

    def reset(self) -> None:
        """Forget a partial frame (after the line was reopened, say)."""
        self._buf.clear()
        self._skipping = False

    def feed(self, data: bytes | bytearray) -> list[Frame | FrameError]:
        out: list[Frame | FrameError] = []
        if not data:
            return out
        parts = bytes(data).split(DELIMITER)
        limit = self._max_encoded
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if self._skipping:
                if not last:
                    self._skipping = False  # the 0x00 ending the oversize frame
                continue
            if i == 0 and self._buf:
                self._buf += part
                chunk = bytes(self._buf)
                self._buf.clear()
            else:
                chunk = part
            if last:
                if len(chunk) > limit:
                    self._oversize(out, len(chunk))
                    self._skipping = True
                else:
                    self._buf += chunk
                break
            if chunk:  # empty: two delimiters in a row (idle fill, resync): ignore
                out.append(self._decode(chunk, limit))
        return out

    def _oversize(self, out: list[Frame | FrameError], size: int) -> None:
        self.counts["oversize"] += 1
        out.append(FrameError("oversize", size))

    def _decode(self, chunk: bytes, limit: int) -> Frame | FrameError:
        if len(chunk) > limit:
            self.counts["oversize"] += 1
            return FrameError("oversize", len(chunk))
        try:
            raw = cobs.decode(chunk)
        except cobs.CobsError:
            self.counts["cobs"] += 1
            return FrameError("cobs", len(chunk))
        if len(raw) > self._max_frame:
            self.counts["oversize"] += 1
            return FrameError("oversize", len(chunk))
        try:
            frame = parse(raw)
        except FrameFormatError as e:
            self.counts[e.reason] += 1
            return FrameError(e.reason, len(chunk))
        self.counts["frames"] += 1
        return frame


def encode_decode(payloads: list[bytes], type_: int = 0x10) -> int:
    """Encodes every payload as a frame into one stream and decodes it again; returns
    the number of frames decoded (bench/serial.py measures frames per second by it)."""
    stream = b"".join([encode(type_, i, p) for i, p in enumerate(payloads)])
    longest = max((len(p) for p in payloads), default=0) + OVERHEAD
    decoder = FrameDecoder(max(longest, DEFAULT_MAX_FRAME))
    return sum(1 for f in decoder.feed(stream) if isinstance(f, Frame))
