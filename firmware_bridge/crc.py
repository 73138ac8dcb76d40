"""CRC-32C (Castagnoli): the frame check of the serial link protocol.

Parameters (the "CRC-32/ISCSI" entry of the CRC catalogue): polynomial 0x1EDC6F41
(reflected 0x82F63B78), init 0xFFFFFFFF, input and output reflected, final XOR
0xFFFFFFFF, check value of ``b"123456789"`` = 0xE3069283. It is the CRC that SSE4.2
and ARMv8 compute in hardware, and at the link's frame sizes (up to a few KiB) it
keeps a Hamming distance of 6 up to 655 bytes, where CRC-16 and CRC-32/IEEE fall to 4.

Pure Python, slicing-by-4: one interpreter iteration per 4 bytes with four table
lookups, about 3x faster than the byte-wise loop (there is no C CRC-32C in the
standard library; zlib.crc32 is the IEEE polynomial).
"""

from __future__ import annotations

__all__ = ["CHECK_VALUE", "crc32c"]

POLY_REFLECTED = 0x82F63B78
CHECK_VALUE = 0xE3069283  # crc32c(b"123456789")


def _tables() -> tuple[tuple[int, ...], ...]:
    t0 = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ POLY_REFLECTED if c & 1 else c >> 1
        t0.append(c)
    tables = [t0]
    for _ in range(3):  # t[k][n]: the CRC of byte n followed by k zero bytes
        prev = tables[-1]
        tables.append([(prev[n] >> 8) ^ t0[prev[n] & 0xFF] for n in range(256)])
    return tuple(tuple(t) for t in tables)


_T0, _T1, _T2, _T3 = _tables()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C of `data`; pass a previous result as `crc` to continue over more data."""
    t0, t1, t2, t3 = _T0, _T1, _T2, _T3
    c = crc ^ 0xFFFFFFFF
    mv = memoryview(data).cast("B")
    n4 = len(mv) & ~3
    if n4:
        # the words are read little-endian: the reflected CRC consumes the low byte first
        for w in memoryview(mv[:n4]).cast("I") if _NATIVE_LE else _words(mv[:n4]):
            c ^= w
            c = t3[c & 0xFF] ^ t2[(c >> 8) & 0xFF] ^ t1[(c >> 16) & 0xFF] ^ t0[c >> 24]
    for b in mv[n4:]:
        c = (c >> 8) ^ t0[(c ^ b) & 0xFF]
    return c ^ 0xFFFFFFFF


def _words(mv: memoryview) -> list[int]:
    b = bytes(mv)
    return [int.from_bytes(b[i : i + 4], "little") for i in range(0, len(b), 4)]


_NATIVE_LE = memoryview(b"\x01\x00\x00\x00").cast("I")[0] == 1
