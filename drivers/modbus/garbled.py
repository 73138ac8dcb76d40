"""What a garbled Modbus RTU answer was (sans-I/O).

pymodbus's RTU framer drops an answer it cannot take without a word and the request
then times out, so a noisy line looked like a silent device. The client keeps the bytes
that arrived for the request; when it times out with bytes there, `garbled_kind` names
what they were, from the request alone:

- ``"truncated"``: the start of the answer (unit id, function code or its exception
  form, byte count) and fewer bytes than the answer has;
- ``"bad_crc"``: as many bytes as the answer has, its head right, the CRC wrong;
- ``"junk"``: anything else (bytes that are not the start of an answer to this request).
"""

from __future__ import annotations

from typing import Literal

__all__ = ["GARBLED_KINDS", "GarbledKind", "answer_length", "crc16", "garbled_kind"]

GarbledKind = Literal["truncated", "bad_crc", "junk"]
GARBLED_KINDS: tuple[GarbledKind, ...] = ("truncated", "bad_crc", "junk")

_EXCEPTION_LENGTH = 5  # unit, function | 0x80, exception code, CRC
_BYTE_COUNTED = frozenset({1, 2, 3, 4})  # reads: unit, function, byte count, data, CRC


def answer_length(function_code: int, count: int) -> int:
    """Bytes of the normal RTU answer (with CRC) to a request of `count` values."""
    if function_code in (1, 2):
        return 5 + (count + 7) // 8
    if function_code in (3, 4):
        return 5 + 2 * count
    return 8  # writes (5, 6, 15, 16) echo address and value or quantity


def crc16(data: bytes, crc: int = 0xFFFF) -> int:
    """Modbus RTU CRC-16 of `data` (continued from `crc`), as the two bytes after it
    read little-endian."""
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def garbled_kind(received: bytes, unit: int, function_code: int, count: int) -> GarbledKind:
    """What `received` (non-empty, not a valid answer) was, answering a request to `unit`
    with `function_code` for `count` values. See the module doc."""
    if not received or received[0] != unit:
        return "junk"
    if len(received) == 1:
        return "truncated"
    fc = received[1]
    if fc == function_code | 0x80:
        length = _EXCEPTION_LENGTH
    elif fc == function_code:
        length = answer_length(function_code, count)
        if function_code in _BYTE_COUNTED and len(received) >= 3 and received[2] != length - 5:
            return "junk"
    else:
        return "junk"
    if len(received) < length:
        return "truncated"
    body, crc = received[: length - 2], received[length - 2 : length]
    if len(received) == length and crc16(body) != int.from_bytes(crc, "little"):
        return "bad_crc"
    return "junk"
