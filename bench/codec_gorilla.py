"""Gorilla (Pelkonen et al., "Gorilla: A Fast, Scalable, In-Memory Time Series Database",
VLDB 2015, section 4.1) in pure Python: a baseline for bench/codec.py's sizes.

Faithful to the paper's two encodings, with the block header adapted to millisecond
timestamps of any range (the paper aligns a 2-hour block of second timestamps and stores
the first one as a 14-bit delta):

* header: the count (32 bits) and the first timestamp (64 bits);
* timestamps: delta-of-delta D (the first delta's D is the delta itself), written as
  ``0`` when D = 0, ``10`` + 7 bits for D in [-63, 64], ``110`` + 9 bits for
  [-255, 256], ``1110`` + 12 bits for [-2047, 2048], else ``1111`` + 32 bits;
* values: the first value's 64 bits, then per value the XOR with the previous one:
  ``0`` when it is zero; ``10`` + the meaningful bits when they fall inside the previous
  value's window of leading/trailing zeros; else ``11`` + 5 bits of leading zeros
  (capped at 31) + 6 bits of meaningful length (64 written as 0) + the meaningful bits.

Bits are written most significant first, as in the paper's figures.
"""

from __future__ import annotations

import struct
from array import array


class _Writer:
    __slots__ = ("acc", "nb", "out")

    def __init__(self) -> None:
        self.out = bytearray()
        self.acc = 0
        self.nb = 0

    def put(self, v: int, n: int) -> None:
        self.acc = (self.acc << n) | v
        self.nb += n
        while self.nb >= 8:
            self.nb -= 8
            self.out.append((self.acc >> self.nb) & 0xFF)
        self.acc &= (1 << self.nb) - 1

    def bytes(self) -> bytes:
        if self.nb:
            return bytes(self.out) + bytes([(self.acc << (8 - self.nb)) & 0xFF])
        return bytes(self.out)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def get(self, n: int) -> int:
        v, pos, data = 0, self.pos, self.data
        while n:
            off = pos & 7
            take = min(8 - off, n)
            v = (v << take) | ((data[pos >> 3] >> (8 - off - take)) & ((1 << take) - 1))
            pos += take
            n -= take
        self.pos = pos
        return v


_BUCKETS = ((7, 0b10, 2), (9, 0b110, 3), (12, 0b1110, 4))


def encode(timestamps: array[int], values: array[float]) -> bytes:
    n = len(timestamps)
    w = _Writer()
    w.put(n, 32)
    if n == 0:
        return w.bytes()
    bits = array("Q", values.tobytes())
    w.put(timestamps[0] & (2**64 - 1), 64)
    prev_t, prev_d = timestamps[0], 0
    for t in timestamps[1:]:
        d = t - prev_t
        dod = d - prev_d
        prev_t, prev_d = t, d
        if dod == 0:
            w.put(0, 1)
            continue
        for nbits, code, clen in _BUCKETS:
            if -(1 << (nbits - 1)) < dod <= 1 << (nbits - 1):
                w.put(code, clen)
                w.put(dod & ((1 << nbits) - 1), nbits)
                break
        else:
            if not -(2**31) <= dod < 2**31:
                raise ValueError(f"Gorilla: delta-of-delta {dod} does not fit 32 bits")
            w.put(0b1111, 4)
            w.put(dod & 0xFFFFFFFF, 32)
    w.put(bits[0], 64)
    prev = bits[0]
    lead_w, trail_w = -1, -1
    for b in bits[1:]:
        x = b ^ prev
        prev = b
        if x == 0:
            w.put(0, 1)
            continue
        lead = min(31, 64 - x.bit_length())
        trail = (x & -x).bit_length() - 1
        if lead_w >= 0 and lead >= lead_w and trail >= trail_w:
            w.put(0b10, 2)
            w.put(x >> trail_w, 64 - lead_w - trail_w)
        else:
            length = 64 - lead - trail
            w.put(0b11, 2)
            w.put(lead, 5)
            w.put(length & 63, 6)
            w.put(x >> trail, length)
            lead_w, trail_w = lead, trail
    return w.bytes()


def decode(data: bytes) -> tuple[array[int], array[float]]:
    r = _Reader(data)
    n = r.get(32)
    ts: array[int] = array("q")
    if n == 0:
        return ts, array("d")
    t = struct.unpack("<q", struct.pack("<Q", r.get(64)))[0]
    ts.append(t)
    d = 0
    for _ in range(n - 1):
        if r.get(1) == 0:
            dod = 0
        elif r.get(1) == 0:
            dod = r.get(7)
            dod -= 1 << 7 if dod > 64 else 0
        elif r.get(1) == 0:
            dod = r.get(9)
            dod -= 1 << 9 if dod > 256 else 0
        elif r.get(1) == 0:
            dod = r.get(12)
            dod -= 1 << 12 if dod > 2048 else 0
        else:
            dod = r.get(32)
            dod -= 1 << 32 if dod >= 2**31 else 0
        d += dod
        t += d
        ts.append(t)
    bits: array[int] = array("Q", [r.get(64)])
    lead_w, trail_w = -1, -1
    for _ in range(n - 1):
        if r.get(1) == 0:
            bits.append(bits[-1])
            continue
        if r.get(1) == 0:
            x = r.get(64 - lead_w - trail_w) << trail_w
        else:
            lead_w = r.get(5)
            length = r.get(6) or 64
            trail_w = 64 - lead_w - length
            x = r.get(length) << trail_w
        bits.append(bits[-1] ^ x)
    return ts, array("d", bits.tobytes())
