"""Raw MQTT 3.1.1 packets, sans-I/O: what the rig's tests and the ingest load generator
(bench/mqtt_load.py) write on a socket without an MQTT client library, and a reader that
splits a byte stream back into packets."""

from __future__ import annotations

import struct
from typing import Final

CONNECT: Final = 1
CONNACK: Final = 2
PUBLISH: Final = 3
PUBACK: Final = 4
DISCONNECT_PACKET: Final = b"\xe0\x00"
_U16: Final = struct.Struct(">H")


def remaining_length(n: int) -> bytes:
    """The fixed header's variable-length "remaining length" field."""
    if not 0 <= n <= 268_435_455:
        raise ValueError(f"remaining length {n} out of range")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_string(data: bytes) -> bytes:
    return _U16.pack(len(data)) + data


def connect_packet(client_id: str, keepalive: int = 0) -> bytes:
    """CONNECT, MQTT 3.1.1, clean session, no will, no credentials."""
    variable = mqtt_string(b"MQTT") + bytes((4, 0x02)) + _U16.pack(keepalive)
    body = variable + mqtt_string(client_id.encode())
    return bytes((CONNECT << 4,)) + remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes, packet_id: int, *, retain: bool = False) -> bytes:
    """PUBLISH at QoS 1."""
    body = mqtt_string(topic.encode()) + _U16.pack(packet_id) + payload
    first = (PUBLISH << 4) | 0x02 | (0x01 if retain else 0)
    return bytes((first,)) + remaining_length(len(body)) + body


def packet_id(body: bytes) -> int:
    """The packet id at the start of a PUBACK's body."""
    return int(_U16.unpack_from(body)[0])


class PacketReader:
    """Bytes in, (packet type, flags, body) out; keeps a partial packet between feeds."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        self._buf += data
        buf = self._buf
        out: list[tuple[int, int, bytes]] = []
        pos = 0
        while True:
            header = _remaining(buf, pos + 1)
            if header is None:
                break
            length, start = header
            if start + length > len(buf):
                break
            out.append((buf[pos] >> 4, buf[pos] & 0x0F, bytes(buf[start : start + length])))
            pos = start + length
        del buf[:pos]
        return out


def _remaining(buf: bytearray, i: int) -> tuple[int, int] | None:
    """The remaining length starting at buf[i] and where the body starts, or None
    if the field is not complete yet."""
    length = shift = 0
    while i < len(buf):
        byte = buf[i]
        length |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            return length, i
        shift += 7
        if shift > 21:
            raise ValueError("malformed remaining length")
    return None
