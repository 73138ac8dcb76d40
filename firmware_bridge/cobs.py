"""Consistent Overhead Byte Stuffing (Cheshire & Baker, 1999).

COBS removes every 0x00 from a frame at a cost of at most one byte per 254, so 0x00
can delimit frames on the serial line: a receiver that lost sync (garbage, a cut
frame) needs only to wait for the next 0x00. Both directions work block-wise with
`bytes.split` and slicing rather than byte by byte (Python loops per byte are slow).
"""

from __future__ import annotations

__all__ = ["CobsError", "decode", "encode", "max_encoded_len"]


class CobsError(ValueError):
    """The input is not valid COBS (a zero byte, or a code running past the end)."""


def max_encoded_len(n: int) -> int:
    """The longest COBS encoding of `n` bytes (without the 0x00 delimiter)."""
    return n + n // 254 + 1


def encode(data: bytes | bytearray) -> bytes:
    """COBS encoding of `data` (no delimiter). Matches the canonical encoder: a run of
    254 non-zero bytes at the very end is not followed by a 0x01 code."""
    out = bytearray()
    blocks = bytes(data).split(b"\x00")
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        # each block stands for "these bytes, then a zero" (the last one: no zero)
        n = len(block)
        pos = 0
        while n - pos >= 254:
            out.append(0xFF)
            out += block[pos : pos + 254]
            pos += 254
        if pos and pos == n and i == last:
            break  # a full 0xFF block ends the data: no trailing 0x01
        out.append(n - pos + 1)
        out += block[pos:]
    return bytes(out)


def decode(data: bytes | bytearray) -> bytes:
    """Inverse of `encode` (input without the delimiter). Raises CobsError."""
    if b"\x00" in data:
        raise CobsError("zero byte inside a COBS frame")
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        code = data[i]
        j = i + code
        if j > n:
            raise CobsError(f"code {code} at {i} runs past the end ({n} bytes)")
        out += data[i + 1 : j]
        i = j
        if code != 0xFF and i < n:
            out.append(0)
    return bytes(out)
