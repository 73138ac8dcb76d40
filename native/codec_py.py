"""Pure-Python twin of ``_codec.pyx``: the body of a version-2 batch message.

This is the readable reference; the compiled module gives byte-identical output and
identical decoded columns. ``native.codec`` owns the message frame (magic, version,
gateway id, seq, CRC-32) and documents the wire format; this module writes and reads
the *body*: the series table, the timestamp blocks, the value blocks and the quality
runs. The compiled module performs the same operations in the same order: integer
steps wrap mod 2**64, float steps are IEEE double operations (no fused multiply-add).

Rows are grouped by point id (a stable sort), and every stream (timestamps, values)
is cut into blocks of 128 rows regardless of where series begin; row ``i`` knows its
position ``j`` in its series (``j == 0``: the series starts there). A batch of many
points with one or two readings each thus shares blocks instead of paying each
block's header per point.

Encoder choices, all deterministic (ties go to the earlier option):

* timestamp block: delta-of-delta (D) or grid (G) with the period estimated from the
  block, or with the previous grid block's period; the smallest in bytes;
* value block: decimal (the smallest k that represents every value) with first or
  second differences, or XOR; XOR is not computed when the decimal block is no larger
  than XOR's floor of 2 bits a value;
* integer block (PFOR): the bit width with the smallest exact size, from the histogram
  of the values' bit lengths.
"""

from __future__ import annotations

import math
from array import array
from typing import TypeAlias

BLOCK = 128  # rows per timestamp/value block
MAX_DECIMALS = 9  # the decimal path tries k = 0 .. MAX_DECIMALS
ORDER2 = 0x10  # value mode bit: second differences
MODE_XOR = 0x40  # value mode; decimal modes are k | (ORDER2 or 0)
GRID = 0xFF  # first byte of a grid timestamp block (an integer block's is w | E << 7)
MAX_READS_PER_BYTE = 43  # a body of N bytes holds at most 42.7 * N readings
MAX_SERIES_PER_BYTE = 64  # and at most 64 * N series (2 bytes a table block of 128)

_M64 = (1 << 64) - 1
_TWO53 = 9007199254740992.0  # 2**53: decimal scaled integers stay below it in magnitude
_POW10 = [10.0**k for k in range(MAX_DECIMALS + 1)]  # exact doubles
# XOR path: a leading-zero count is rounded down to one of these; its index is the code
_LEAD = (0, 8, 12, 16, 18, 20, 22, 24)
_LEAD_CODE = [max(i for i, z in enumerate(_LEAD) if z <= lead) for lead in range(65)]
_NO_LEAD = 255  # "no leading-zero count yet" in the XOR state


def _zz(x: int) -> int:
    """Zigzag of a signed integer in [-2**63, 2**63)."""
    return (x << 1) if x >= 0 else ((-x << 1) - 1)


def _unzz(u: int) -> int:
    return (u >> 1) if not u & 1 else -((u + 1) >> 1)


def _s64(x: int) -> int:
    """x mod 2**64 as a signed 64-bit integer."""
    x &= _M64
    return x - (1 << 64) if x >> 63 else x


def _vlen(v: int) -> int:
    """Bytes of the varint of v >= 0."""
    return max(1, (v.bit_length() + 6) // 7)


def _put_varint(out: bytearray, v: int) -> None:
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def _float(bits: int) -> float:
    return array("d", array("Q", [bits]).tobytes())[0]


# -- integer blocks (PFOR) -----------------------------------------------------------------


def pfor_choose(u: list[int]) -> tuple[int, int]:
    """(w, size in bytes) of the cheapest encoding of the block ``u``; ties keep the
    larger width. Size = header byte + exception-count byte (if any exceptions) + the
    packed ``ceil(m*w/8)`` bytes + per exception its position byte and varint."""
    m = len(u)
    hist = [0] * 65
    for v in u:
        hist[v.bit_length()] += 1
    maxbl = 64
    while maxbl > 0 and hist[maxbl] == 0:
        maxbl -= 1
    best_w = maxbl
    best = 1 + (m * maxbl + 7) // 8
    bins = [b for b in range(1, maxbl + 1) if hist[b]]
    for w in range(maxbl - 1, -1, -1):
        exc = 0
        for b in bins:
            if b > w:
                exc += hist[b] * (1 + max(1, (b - w + 6) // 7))
        cost = 2 + (m * w + 7) // 8 + exc
        if cost < best:
            best, best_w = cost, w
    return best_w, best


def pfor_write(out: bytearray, u: list[int], w: int) -> None:
    """Header byte ``w | 0x80 if exceptions``; if exceptions, a byte ``count - 1``; the
    low ``w`` bits of each value bit-packed; each exception: position byte, varint of
    ``value >> w`` (never 0)."""
    mask = (1 << w) - 1
    exc = [j for j, v in enumerate(u) if v >> w]
    out.append(w | (0x80 if exc else 0))
    if exc:
        out.append(len(exc) - 1)
    if w:
        acc = 0
        for j, v in enumerate(u):
            acc |= (v & mask) << (j * w)
        out += acc.to_bytes((len(u) * w + 7) // 8, "little")
    for j in exc:
        out.append(j)
        _put_varint(out, u[j] >> w)


# -- timestamps --------------------------------------------------------------------------


def _ts_dod(ts: array[int], jpos: list[int], firsts: list[int], i: int) -> int:
    """The D element of row i: zz of (first ts - previous series' first ts), of the
    first delta, or of the delta-of-delta; ``firsts[i]``: that previous first ts."""
    j = jpos[i]
    if j == 0:
        return _zz(_s64(ts[i] - firsts[i]))
    if j == 1:
        return _zz(_s64(ts[i] - ts[i - 1]))
    return _zz(_s64((ts[i] - ts[i - 1]) - (ts[i - 1] - ts[i - 2])))


def _grid(
    ts: array[int], jpos: list[int], dod: list[int], i0: int, m: int, f: int, p: int
) -> tuple[list[int], int]:
    """(elements, base) of a grid block with period p: rows with j >= 1 hold
    ``t - (base + k*p)`` (k: index in the block), base the smallest ``t - k*p``."""
    base = min(_s64(ts[i0 + k] - k * p) for k in range(f, m) if jpos[i0 + k])
    el = [((ts[i0 + k] - k * p - base) & _M64) if jpos[i0 + k] else dod[k] for k in range(m)]
    return el, base


def _encode_ts_block(
    out: bytearray,
    ts: array[int],
    jpos: list[int],
    firsts: list[int],
    i0: int,
    m: int,
    state: list[int],
) -> None:
    """One timestamp block of rows i0 .. i0+m-1; ``state`` = [grid period]."""
    dod = [_ts_dod(ts, jpos, firsts, i0 + k) for k in range(m)]
    w, best = pfor_choose(dod)
    choice: tuple[int, int, int, list[int], int] | None = None  # (p, base, bpred, el, w)
    f = next((k for k in range(m) if jpos[i0 + k]), -1)
    if f >= 0:
        last = f
        while last + 1 < m and jpos[i0 + last + 1] == jpos[i0 + last] + 1:
            last += 1
        if last > f:
            d = _s64(ts[i0 + last] - ts[i0 + f])
            q = (abs(d) + (last - f) // 2) // (last - f)
            p_est = q if d >= 0 else -q
        else:
            p_est = _s64(ts[i0 + f] - ts[i0 + f - 1])
        p_state = state[0]
        cands = [p_est] if p_state in (0, p_est) else [p_est, p_state]
        for p in cands:
            el, base = _grid(ts, jpos, dod, i0, m, f, p)
            bpred = _s64(ts[i0 + f - 1] + (1 - f) * p)
            gw, size = pfor_choose(el)
            cost = 1 + _vlen(_zz(_s64(p - p_state))) + _vlen(_zz(_s64(base - bpred))) + size
            if cost < best:
                best = cost
                choice = (p, base, bpred, el, gw)
    if choice is None:
        pfor_write(out, dod, w)
        return
    p, base, bpred, el, gw = choice
    out.append(GRID)
    _put_varint(out, _zz(_s64(p - state[0])))
    _put_varint(out, _zz(_s64(base - bpred)))
    pfor_write(out, el, gw)
    state[0] = _s64(p)


# -- values ----------------------------------------------------------------------------------


def _decimal(vals: list[float], bits: list[int], k: int) -> list[int] | None:
    """The scaled integers s = floor(v * 10**k + 0.5) of the block if every one is below
    2**53 in magnitude and gives back v bit-exactly as s / 10**k, else None."""
    p = _POW10[k]
    out = []
    for v, b in zip(vals, bits, strict=True):
        y = v * p + 0.5
        if not abs(y) < _TWO53:  # also NaN and +-inf
            return None
        s = math.floor(y)
        back = float(s) / p
        if back != v or (s == 0 and b >> 63):  # -0.0 comes back as +0.0
            return None
        out.append(s)
    return out


def _predict(prev: float, k: int) -> int:
    """Predictor of a block's first scaled integer from the series' previous value."""
    y = prev * _POW10[k] + 0.5
    return math.floor(y) if abs(y) < _TWO53 else 0


def _dec_elements(s: list[int], js: list[int], pred: int, order2: bool) -> list[int]:
    """zz of each scaled integer minus its prediction: h = rows of the same series
    before it in the block; h = 0: ``pred`` (the block's first row continuing a series)
    or 0 (a series' first row); h = 1 or first differences: the previous one; else
    (second differences) ``2 * previous - the one before``."""
    out = []
    for k, x in enumerate(s):
        h = min(js[k], k)
        if h == 0:
            e = x - (pred if js[k] else 0)
        elif h == 1 or not order2:
            e = x - s[k - 1]
        else:
            e = x - 2 * s[k - 1] + s[k - 2]
        out.append(_zz(e))
    return out


def _xor_bits(
    bits: list[int], js: list[int], prev_bits: int, lead_state: int
) -> tuple[int, int, int]:
    """(stream, length in bits, lead state) of the block in the XOR path.

    Per value, x = its bits ^ the previous row's bits (0 at a series' first row); a 2-bit
    code, then:
      0: x == 0                            (nothing more)
      1: more than 6 trailing zeros        3-bit lead code, 6-bit length c, the c bits
                                           of x above its trailing zeros
      2: lead code same as the state       the low 64 - lead bits of x
      3: otherwise                         3-bit lead code, the low 64 - lead bits of x
    where lead is the leading-zero count rounded down to one of _LEAD. Codes 1 and 3
    set the lead state; code 2 needs one (a message starts without).
    """
    acc = 0
    pos = 0
    for b, j in zip(bits, js, strict=True):
        x = b ^ (prev_bits if j else 0)
        prev_bits = b
        if x == 0:
            pos += 2  # code 0
            continue
        code = _LEAD_CODE[64 - x.bit_length()]
        lead = _LEAD[code]
        trail = (x & -x).bit_length() - 1
        if trail > 6:
            c = 64 - lead - trail
            acc |= (1 | code << 2 | c << 5 | (x >> trail) << 11) << pos
            pos += 11 + c
            lead_state = lead
        elif lead == lead_state:
            acc |= (2 | x << 2) << pos
            pos += 2 + 64 - lead
        else:
            acc |= (3 | code << 2 | x << 5) << pos
            pos += 5 + 64 - lead
            lead_state = lead
    return acc, pos, lead_state


def _encode_value_block(
    out: bytearray,
    vals: list[float],
    bits: list[int],
    js: list[int],
    prev_bits: int,
    state: list[int],
) -> None:
    """One value block; ``prev_bits``: the previous row's value bits; ``state`` = [XOR
    lead state]."""
    m = len(vals)
    dec: tuple[int, list[int], int, int] | None = None  # (mode, elements, w, size)
    for k in range(MAX_DECIMALS + 1):
        s = _decimal(vals, bits, k)
        if s is not None:
            pred = _predict(_float(prev_bits), k) if js[0] else 0
            el = _dec_elements(s, js, pred, False)
            w, size = pfor_choose(el)
            dec = (k, el, w, 1 + size)
            if any(min(j, i) >= 2 for i, j in enumerate(js)):
                el2 = _dec_elements(s, js, pred, True)
                w2, size2 = pfor_choose(el2)
                if 1 + size2 < dec[3]:
                    dec = (k | ORDER2, el2, w2, 1 + size2)
            break
    xor = None
    if dec is None or dec[3] > 1 + (2 * m + 7) // 8:  # XOR can't beat 2 bits a value
        acc, nbits, lead = _xor_bits(bits, js, prev_bits, state[0])
        xor = (acc, nbits, lead, 1 + (nbits + 7) // 8)
    if dec is not None and (xor is None or dec[3] <= xor[3]):
        mode, el, w, _ = dec
        out.append(mode)
        pfor_write(out, el, w)
    else:
        assert xor is not None
        acc, nbits, lead, _ = xor
        out.append(MODE_XOR)
        out += acc.to_bytes((nbits + 7) // 8, "little")
        state[0] = lead


# -- rows -------------------------------------------------------------------------------------


Rows: TypeAlias = (
    "tuple[array[int], array[int], array[float], array[int], list[int], list[int], list[int]]"
)


def group_rows(
    point_ids: array[int], timestamps: array[int], values: array[float], quality: array[int]
) -> Rows:
    """(ids, ts, values, quality, jpos, firsts, starts): the rows grouped by point id (a
    stable sort), each row's position in its series, the previous series' first
    timestamp of each row (0 for the first series) and the row where each series starts.
    Versions 2 and 3 both send rows in this order."""
    n = len(point_ids)
    if not (len(timestamps) == len(values) == len(quality) == n):
        raise ValueError("encode_body: columns differ in length")
    if all(point_ids[i - 1] <= point_ids[i] for i in range(1, n)):
        ids, ts, vs, qs = point_ids, timestamps, values, quality
    else:
        order = sorted(range(n), key=point_ids.__getitem__)  # sorted() is stable
        ids = array("I", [point_ids[i] for i in order])
        ts = array("q", [timestamps[i] for i in order])
        vs = array("d", [values[i] for i in order])
        qs = array("B", [quality[i] for i in order])
    jpos = [0] * n
    firsts = [0] * n
    starts = []
    prev_first = 0
    for i in range(n):
        if i and ids[i] == ids[i - 1]:
            jpos[i] = jpos[i - 1] + 1
        else:
            starts.append(i)
            firsts[i] = prev_first
            prev_first = ts[i]
    return ids, ts, vs, qs, jpos, firsts, starts


# -- encode ---------------------------------------------------------------------------------


def encode_body(
    point_ids: array[int],
    timestamps: array[int],
    values: array[float],
    quality: array[int],
    prefix: bytes = b"",
) -> bytes:
    """``prefix`` followed by the body of a version-2 message for these columns (see
    native.codec): the series table, the blocks and the quality runs."""
    ids, ts, vs, qs, jpos, firsts, starts = group_rows(point_ids, timestamps, values, quality)
    n = len(ids)
    vbits = list(array("Q", vs.tobytes()))
    qflag = 1 if any(qs) else 0
    out = bytearray(prefix)
    write_series_table(out, ids, starts, n, qflag)
    grid_state = [0]
    for i0 in range(0, n, BLOCK):
        _encode_ts_block(out, ts, jpos, firsts, i0, min(BLOCK, n - i0), grid_state)
    lead_state = [_NO_LEAD]
    for i0 in range(0, n, BLOCK):
        e = min(i0 + BLOCK, n)
        prev_bits = vbits[i0 - 1] if i0 else 0
        _encode_value_block(out, list(vs[i0:e]), vbits[i0:e], jpos[i0:e], prev_bits, lead_state)
    if qflag:
        write_quality_runs(out, qs)
    return bytes(out)


# -- decode ---------------------------------------------------------------------------------


class _Reader:
    """Bounds-checked reads from data[pos:end]; every failure is a ValueError."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.data, self.pos, self.end = data, pos, end

    def byte(self, what: str) -> int:
        if self.pos >= self.end:
            raise ValueError(f"truncated: the body ends inside {what}")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def varint(self, what: str) -> int:
        v = shift = 0
        while True:
            b = self.byte(what)
            if shift == 63 and b > 1:
                raise ValueError("corrupt: varint over 64 bits")
            v |= (b & 0x7F) << shift
            if b < 0x80:
                return v
            shift += 7

    def take(self, n: int, what: str) -> bytes:
        if n > self.end - self.pos:
            raise ValueError(f"truncated: the body ends inside {what}")
        self.pos += n
        return self.data[self.pos - n : self.pos]


def _pfor_read(r: _Reader, m: int, what: str, h: int | None = None) -> list[int]:
    """An integer block of m values (``h``: its header byte, when already read)."""
    if h is None:
        h = r.byte(what)
    w = h & 0x7F
    if w > 64:
        raise ValueError("corrupt: bit width > 64 in an integer block")
    ne = r.byte(what) + 1 if h & 0x80 else 0
    if ne > m or (ne and w == 64):
        raise ValueError("corrupt: more exceptions than values in an integer block")
    mask = (1 << w) - 1
    acc = int.from_bytes(r.take((m * w + 7) // 8, what), "little")
    u = [(acc >> (j * w)) & mask for j in range(m)]
    last = -1
    for _ in range(ne):
        j = r.byte(what)
        if j <= last or j >= m:
            raise ValueError("corrupt: exception position out of order in an integer block")
        hi = r.varint(what)
        if hi == 0 or hi.bit_length() + w > 64:
            raise ValueError("corrupt: exception value out of range in an integer block")
        u[j] |= hi << w
        last = j
    return u


def _xor_read(r: _Reader, js: list[int], prev_bits: int, lead_state: int) -> tuple[list[int], int]:
    """Decodes a block of the XOR path; returns (bits, lead state)."""
    m = len(js)
    avail = r.end - r.pos
    chunk = r.data[r.pos : r.pos + min(avail, (m * 69 + 7) // 8)]
    acc = int.from_bytes(chunk, "little")
    limit = len(chunk) * 8
    pos = 0
    out = []
    for j in js:
        if pos + 2 > limit:
            raise ValueError("truncated: the body ends inside an XOR value block")
        code = (acc >> pos) & 3
        pos += 2
        if code == 0:
            x = 0
        elif code == 1:
            lead = _LEAD[(acc >> pos) & 7]
            c = (acc >> (pos + 3)) & 63
            pos += 9
            if c == 0 or lead + c > 64:
                raise ValueError("corrupt: XOR length out of range")
            x = ((acc >> pos) & ((1 << c) - 1)) << (64 - lead - c)
            pos += c
            lead_state = lead
        else:
            if code == 3:
                lead_state = _LEAD[(acc >> pos) & 7]
                pos += 3
            elif lead_state == _NO_LEAD:
                raise ValueError("corrupt: XOR value reuses a leading-zero count it lacks")
            nb = 64 - lead_state
            x = (acc >> pos) & ((1 << nb) - 1)
            pos += nb
        if pos > limit:
            raise ValueError("truncated: the body ends inside an XOR value block")
        prev_bits = x ^ (prev_bits if j else 0)
        out.append(prev_bits)
    r.pos += (pos + 7) // 8
    return out, lead_state


# -- series table and quality runs (shared with version 3) -------------------------------


def write_series_table(
    out: bytearray, ids: array[int], starts: list[int], n: int, qflag: int
) -> None:
    """The series head varint ``S << 2 | T << 1 | Q`` and the table: ids as (first id,
    then gaps - 1) and counts - 1, as varint pairs or as integer blocks, whichever is
    smaller (blocks win when many points share a message)."""
    id_el = [ids[a] - (ids[starts[s - 1]] + 1 if s else 0) for s, a in enumerate(starts)]
    cnt_el = [b - a - 1 for a, b in zip(starts, [*starts[1:], n][: len(starts)], strict=True)]
    var_size = sum(_vlen(x) for x in id_el) + sum(_vlen(x) for x in cnt_el)
    blocks = [col[j : j + BLOCK] for col in (id_el, cnt_el) for j in range(0, len(col), BLOCK)]
    table = 1 if sum(pfor_choose(blk)[1] for blk in blocks) < var_size else 0
    _put_varint(out, len(starts) << 2 | table << 1 | qflag)
    if table:
        for blk in blocks:
            pfor_write(out, blk, pfor_choose(blk)[0])
    else:
        for x, c in zip(id_el, cnt_el, strict=True):
            _put_varint(out, x)
            _put_varint(out, c)


def write_quality_runs(out: bytearray, qs: array[int]) -> None:
    runs: list[list[int]] = []
    for q in qs:
        if runs and runs[-1][0] == q:
            runs[-1][1] += 1
        else:
            runs.append([q, 1])
    _put_varint(out, len(runs))
    for q, r in runs:
        out.append(q)
        _put_varint(out, r)


def read_series_table(r: _Reader, size: int, max_reads: int) -> tuple[list[int], list[int], int]:
    """(point id per row, position in its series per row, Q) of a body of ``size``
    bytes that can hold at most ``max_reads`` readings."""
    head = r.varint("the series table")
    nseries, table, qflag = head >> 2, (head >> 1) & 1, head & 1
    if nseries > MAX_SERIES_PER_BYTE * size:
        raise ValueError(f"corrupt: {nseries} series in a body of {size} bytes")
    id_el: list[int] = []
    cnt_el: list[int] = []
    if table:
        for col in (id_el, cnt_el):
            for j in range(0, nseries, BLOCK):
                col += _pfor_read(r, min(BLOCK, nseries - j), "the series table")
    else:
        for _ in range(nseries):
            id_el.append(r.varint("the series table"))
            cnt_el.append(r.varint("the series table"))
    ids: list[int] = []
    jpos: list[int] = []
    total = 0
    pid = -1
    for x, c in zip(id_el, cnt_el, strict=True):
        pid += 1 + x
        if pid > 0xFFFFFFFF:
            raise ValueError(f"corrupt: point id {pid} does not fit 32 bits")
        count = c + 1
        if total + count > max_reads:
            raise ValueError(
                f"corrupt: the series table claims over {total + count} readings, more "
                f"than a body of {size} bytes can hold"
            )
        total += count
        ids += [pid] * count
        jpos += range(count)
    return ids, jpos, qflag


def read_quality_runs(r: _Reader, n: int) -> list[int]:
    nruns = r.varint("the quality runs")
    if nruns == 0 or nruns > n:
        raise ValueError("corrupt: quality runs do not add up to the count")
    qs: list[int] = []
    for _ in range(nruns):
        q = r.byte("the quality runs")
        run = r.varint("the quality runs")
        if run == 0 or run > n - len(qs):
            raise ValueError("corrupt: quality runs do not add up to the count")
        qs += [q] * run
    if len(qs) != n:
        raise ValueError("corrupt: quality runs do not add up to the count")
    return qs


def decode_payload(
    data: bytes | bytearray | memoryview, start: int, end: int, modes: list[int] | None = None
) -> tuple[str, int, array[int], array[int], array[float], array[int]]:
    """(gateway, seq, point_ids, timestamps, values, quality) from data[start:end]: what
    follows a version-2 message's version byte up to its CRC, which must be consumed
    exactly. Raises ValueError for anything malformed. When ``modes`` is a list, each
    value block's mode byte is appended to it (for tests and tools)."""
    r, gateway, seq = read_header(data, start, end)
    return (gateway, seq, *_decode_body(r, end - start, modes))


def read_header(
    data: bytes | bytearray | memoryview, start: int, end: int
) -> tuple[_Reader, str, int]:
    """(a reader after them, gateway id, seq): the fields that open the body of a
    version-2 or -3 message in data[start:end]."""
    buf = bytes(data)
    if not 0 <= start <= end <= len(buf):
        raise ValueError("decode_payload: bad range")
    r = _Reader(buf, start, end)
    glen = r.byte("the gateway id")
    try:
        gateway = r.take(glen, "the gateway id").decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("corrupt: the gateway id is not UTF-8") from None
    return r, gateway, r.varint("the seq")


def _decode_body(
    r: _Reader, size: int, modes: list[int] | None
) -> tuple[array[int], array[int], array[float], array[int]]:
    ids, jpos, qflag = read_series_table(r, size, MAX_READS_PER_BYTE * size)
    n = len(ids)
    # timestamps
    ts: list[int] = []
    first = 0  # the current series' first timestamp
    p_state = 0
    for i0 in range(0, n, BLOCK):
        m = min(BLOCK, n - i0)
        first_byte = r.byte("a timestamp block")
        grid = first_byte == GRID
        h: int | None = first_byte
        if grid:
            p = _s64(p_state + _unzz(r.varint("a timestamp block")))
            dbase = _unzz(r.varint("a timestamp block"))
            p_state = p
            h = None
        el = _pfor_read(r, m, "a timestamp block", h)
        base = None
        for k in range(m):
            i = i0 + k
            j = jpos[i]
            if j == 0:
                t = _s64(first + _unzz(el[k]))
                first = t
            elif grid:
                if base is None:
                    base = _s64(ts[i - 1] + (1 - k) * p + dbase)
                t = _s64(base + k * p + el[k])
            elif j == 1:
                t = _s64(ts[i - 1] + _unzz(el[k]))
            else:
                t = _s64(2 * ts[i - 1] - ts[i - 2] + _unzz(el[k]))
            ts.append(t)
        if grid and base is None:
            raise ValueError("corrupt: a grid timestamp block without a grid row")
    # values
    bits: list[int] = []
    lead_state = _NO_LEAD
    for i0 in range(0, n, BLOCK):
        m = min(BLOCK, n - i0)
        js = jpos[i0 : i0 + m]
        mode = r.byte("a value block")
        if modes is not None:
            modes.append(mode)
        prev_bits = bits[-1] if i0 else 0
        if mode == MODE_XOR:
            block, lead_state = _xor_read(r, js, prev_bits, lead_state)
        elif (mode & ~ORDER2) <= MAX_DECIMALS:
            k = mode & ~ORDER2
            p10 = _POW10[k]
            el = _pfor_read(r, m, "a value block")
            pred = _predict(_float(prev_bits), k) if js[0] else 0
            s: list[int] = []
            vals = []
            for kk in range(m):
                e = _unzz(el[kk])
                h = min(js[kk], kk)
                if h == 0:
                    x = e + (pred if js[kk] else 0)
                elif h == 1 or not mode & ORDER2:
                    x = e + s[kk - 1]
                else:
                    x = e + 2 * s[kk - 1] - s[kk - 2]
                if not -(2**53) < x < 2**53:
                    raise ValueError("corrupt: decimal value out of range")
                s.append(x)
                vals.append(float(x) / p10)
            block = list(array("Q", array("d", vals).tobytes()))
        else:
            raise ValueError("corrupt: unknown value block mode")
        bits += block
    # quality
    qs = read_quality_runs(r, n) if qflag else [0] * n
    if r.pos != r.end:
        raise ValueError("corrupt: trailing data after the last block")
    return (
        array("I", ids),
        array("q", ts),
        array("d", array("Q", bits).tobytes()),
        array("B", qs),
    )
