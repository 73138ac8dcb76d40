"""Pure-Python twin of ``_codec3.pyx``: the body of a version-3 batch message.

The readable reference; the compiled module gives byte-identical output and identical
decoded columns. ``native.codec`` owns the message frame and documents the wire format
("Wire format, version 3"); this module writes and reads the body after the seq.

Version 3 keeps version 2's modelling (rows grouped by point, blocks of 128 rows that
span series, delta-of-delta or grid timestamps, verified decimal scaling) and codes
every residual with an adaptive binary range coder (LZMA's: 11-bit probabilities,
32-bit range, carry through a cache byte) instead of bit-packing it:

* an integer u >= 0 is its bit length b (the "bucket") coded against the previous
  bucket of the same model (same? up or down? then unary steps), the bit below its
  leading one coded in a context of b, and its b - 2 lower bits raw in a separate bit
  stream (they are close to uniform; coding them would cost time for nothing);
* a stream of regular timestamps or repeated values costs a fraction of a bit a row,
  a run of NaN costs a bit or two a row (class "same as the last escape");
* a block's modes cost a bit or two (coded against the previous block's).

What version 2 lacked, added where the real corpus (bench/codec.py) showed the bytes:
a timestamp unit (calendar months become days); rows of a decimal block coded apart
(more decimals, an average of d readings as a fraction, NaN and specials) instead of
XOR for the whole block; ordered-bits differences for values that are not decimals
(float32 registers); a seasonal predictor (the change a day, or a year of months,
before); a separate model for a series' first value (many points a message).

Every model starts afresh in every message: a message decodes alone.

Encoder choices are deterministic and use integer cost estimates (bit lengths), so the
compiled twin takes the same ones; ties go to the earlier option.
"""

from __future__ import annotations

import math
from array import array
from math import gcd

from native.codec_py import (
    BLOCK,
    _float,
    _put_varint,
    _s64,
    _unzz,
    _zz,
    group_rows,
    read_header,
    read_quality_runs,
    read_series_table,
    write_quality_runs,
    write_series_table,
)

MAX_K = 15  # decimal digits: 10**15 < 2**53, so s / 10**k is one correctly rounded division
MAX_READS_PER_BYTE = 400  # a row costs 2 coded bits of >= 0.0106 bits: cap 400 * (size + 16)
MAX_READS = 1 << 20  # per message (the agent sends at most 100,000)
MAX_PAD = 4  # the range coder's trailing zero bytes the encoder may drop
CANONICAL_NAN = 0x7FF8000000000000

_M64 = (1 << 64) - 1
_M32 = (1 << 32) - 1
_TWO53 = 9007199254740992.0
_POW10 = [10.0**k for k in range(MAX_K + 1)]  # exact doubles
_IPOW10 = [10**k for k in range(MAX_K + 1)]
_FLT_MAX = 3.4028234663852886e38
_TWO53_INT = 1 << 53
MAX_DIV = 17  # the fraction form's largest divisor
_MAX_ADJ = 1 << 16  # the fraction form's largest adjustment (ordered bits) the encoder takes

# range coder
_PROB_BITS = 11
_PROB_INIT = 1 << (_PROB_BITS - 1)
_ADAPT = 4  # probability update shift: fast, for messages of a few hundred rows
_TOP = 1 << 24

# integer model layout: per previous bucket pb (0..64) 18 probabilities: same, up, 8 up
# steps, 8 down steps; then one probability per bucket for the bit below the leading one
_PB_STRIDE = 18
_MANT = 65 * _PB_STRIDE
_INT_PROBS = _MANT + 65

# block-flag probabilities (one array per message)
F_TSMODE = 0  # 2: by the previous block's timestamp mode
F_VMODE = 2  # 2: by the previous block's value mode
F_KNEW = 4
F_ORDER2 = 5
F_ESC = 6
F_WIDTH = 7
F_CLASS = 8  # 4 contexts (previous class) x 3 tree nodes
F_FRACTION = F_CLASS + 12
F_SEASON = F_FRACTION + 1
N_FLAGS = F_SEASON + 1

# value modes (as reported by decode_payload's ``modes``)
VM_DEC = 0
VM_ORD = 1


class RangeEncoder:
    """LZMA's binary range encoder; raw bits go to a separate LSB-first bit stream."""

    __slots__ = ("cache", "cache_size", "low", "out", "raw", "raw_n", "rng")

    def __init__(self) -> None:
        self.low = 0
        self.rng = 0xFFFFFFFF
        self.cache = 0
        self.cache_size = 1
        self.out = bytearray()
        self.raw = 0
        self.raw_n = 0

    def _shift_low(self) -> None:
        low = self.low
        if low < 0xFF000000 or low > 0xFFFFFFFF:
            carry = low >> 32
            temp = self.cache
            while True:
                self.out.append((temp + carry) & 0xFF)
                temp = 0xFF
                self.cache_size -= 1
                if self.cache_size == 0:
                    break
            self.cache = (low >> 24) & 0xFF
        self.cache_size += 1
        self.low = (low & 0x00FFFFFF) << 8

    def bit(self, probs: list[int], i: int, b: int) -> None:
        p = probs[i]
        bound = (self.rng >> _PROB_BITS) * p
        if b:
            self.low += bound
            self.rng -= bound
            probs[i] = p - (p >> _ADAPT)
        else:
            self.rng = bound
            probs[i] = p + (((1 << _PROB_BITS) - p) >> _ADAPT)
        while self.rng < _TOP:
            self.rng = (self.rng << 8) & 0xFFFFFFFF
            self._shift_low()

    def put_raw(self, v: int, n: int) -> None:
        self.raw |= v << self.raw_n
        self.raw_n += n

    def finish(self) -> tuple[bytes, bytes]:
        """(range-coded bytes, raw bit stream bytes). The code value is moved to the
        number in [low, low + range) with the most trailing zero bytes, and up to
        MAX_PAD trailing zero bytes are dropped (the decoder reads zeros past the end);
        the first byte, always 0, is not sent."""
        for nbytes in (4, 3, 2, 1):
            mask = (1 << (8 * nbytes)) - 1
            v = (self.low + mask) & ~mask
            if v < self.low + self.rng:
                self.low = v
                break
        for _ in range(5):
            self._shift_low()
        out = self.out
        cut = 0
        while cut < MAX_PAD and len(out) - cut > 1 and out[len(out) - 1 - cut] == 0:
            cut += 1
        rc = bytes(out[1 : len(out) - cut])
        return rc, self.raw.to_bytes((self.raw_n + 7) // 8, "little")


class RangeDecoder:
    __slots__ = ("code", "data", "end", "pos", "raw", "raw_end", "raw_pos", "rng")

    def __init__(self, data: bytes, pos: int, end: int, raw_pos: int, raw_end: int) -> None:
        self.data, self.pos, self.end = data, pos, end
        self.rng = 0xFFFFFFFF
        self.code = 0
        for _ in range(4):
            self.code = (self.code << 8) | self._next()
        self.raw = int.from_bytes(data[raw_pos:raw_end], "little")
        self.raw_pos = 0
        self.raw_end = 8 * (raw_end - raw_pos)

    def _next(self) -> int:
        pos = self.pos
        self.pos += 1
        if pos < self.end:
            return self.data[pos]
        if pos >= self.end + MAX_PAD:
            raise ValueError("truncated: the body ends inside the range-coded stream")
        return 0

    def bit(self, probs: list[int], i: int) -> int:
        p = probs[i]
        bound = (self.rng >> _PROB_BITS) * p
        if self.code < bound:
            self.rng = bound
            probs[i] = p + (((1 << _PROB_BITS) - p) >> _ADAPT)
            b = 0
        else:
            self.code -= bound
            self.rng -= bound
            probs[i] = p - (p >> _ADAPT)
            b = 1
        while self.rng < _TOP:
            self.rng = (self.rng << 8) & 0xFFFFFFFF
            self.code = ((self.code << 8) | self._next()) & 0xFFFFFFFF
        return b

    def get_raw(self, n: int) -> int:
        if self.raw_pos + n > self.raw_end:
            raise ValueError("truncated: the body ends inside the raw bit stream")
        v = (self.raw >> self.raw_pos) & ((1 << n) - 1)
        self.raw_pos += n
        return v


class IntModel:
    """Adaptive model of unsigned 64-bit integers (see the module doc)."""

    __slots__ = ("pb", "probs")

    def __init__(self) -> None:
        self.probs = [_PROB_INIT] * _INT_PROBS
        self.pb = 0

    def put(self, rc: RangeEncoder, u: int) -> None:
        b = u.bit_length()
        pb = self.pb
        base = pb * _PB_STRIDE
        probs = self.probs
        if b == pb:
            rc.bit(probs, base, 0)
        else:
            rc.bit(probs, base, 1)
            if b > pb:
                rc.bit(probs, base + 1, 1)
                d, lim, off = b - pb, 64 - pb, base + 2
            else:
                rc.bit(probs, base + 1, 0)
                d, lim, off = pb - b, pb, base + 10
            for s in range(1, d):
                rc.bit(probs, off + min(s - 1, 7), 1)
            if d < lim:
                rc.bit(probs, off + min(d - 1, 7), 0)
        self.pb = b
        if b >= 2:
            rc.bit(probs, _MANT + b, (u >> (b - 2)) & 1)
            rc.put_raw(u & ((1 << (b - 2)) - 1), b - 2)

    def get(self, rd: RangeDecoder) -> int:
        pb = self.pb
        base = pb * _PB_STRIDE
        probs = self.probs
        if rd.bit(probs, base):
            if rd.bit(probs, base + 1):
                lim, off, sign = 64 - pb, base + 2, 1
            else:
                lim, off, sign = pb, base + 10, -1
            if lim == 0:
                raise ValueError("corrupt: an integer's bit length is out of range")
            d = 1
            while d < lim and rd.bit(probs, off + min(d - 1, 7)):
                d += 1
            b = pb + sign * d
        else:
            b = pb
        self.pb = b
        if b < 2:
            return b
        hi = 2 | rd.bit(probs, _MANT + b)
        return (hi << (b - 2)) | rd.get_raw(b - 2)


def _bl(u: int) -> int:
    return u.bit_length()


# -- timestamps ------------------------------------------------------------------------------


class _TsState:
    """Timestamp coding state across the blocks of a message."""

    __slots__ = ("first", "grid_p", "mode", "models", "prev_delta")

    def __init__(self) -> None:
        self.first = 0  # the current series' first timestamp
        self.grid_p = 0  # the previous grid block's period
        self.prev_delta = 0  # the previous series' first delta / unit
        self.mode = 0  # the previous block's mode (0 D, 1 G)
        self.models = [IntModel() for _ in range(5)]  # T0, T1, T2, grid, params


def _ts_unit(ts: array[int], jpos: list[int]) -> int:
    """The greatest common divisor of every delta within a series (1 if none is
    nonzero): calendar months become days, seconds become 1."""
    g = 0
    for i, j in enumerate(jpos):
        if j:
            d = _s64(ts[i] - ts[i - 1])
            g = gcd(g, -d if d < 0 else d)
            if g == 1:
                return 1
    return g or 1


def _dod(ts: array[int], i: int, unit: int) -> int:
    """zz of the delta-of-delta of row i in units (each delta is a multiple of the
    unit; their difference wraps mod 2**64)."""
    d1 = _s64(ts[i] - ts[i - 1]) // unit
    d2 = _s64(ts[i - 1] - ts[i - 2]) // unit
    return _zz(_s64(d1 - d2))


def _encode_ts_block(
    rc: RangeEncoder,
    ts: array[int],
    jpos: list[int],
    firsts: list[int],
    i0: int,
    m: int,
    unit: int,
    st: _TsState,
    flags: list[int],
) -> None:
    t0, t1, t2, tg, tp = st.models
    f = next((k for k in range(m) if jpos[i0 + k]), -1)
    grid: tuple[int, int, int] | None = None  # (p, base, bpred)
    if f >= 0:
        # D costs (bit lengths) of the rows with j >= 1
        d_cost = 0
        prev_delta = st.prev_delta
        for k in range(f, m):
            i = i0 + k
            if jpos[i] >= 2:
                d_cost += _bl(_dod(ts, i, unit))
            elif jpos[i] == 1:
                d = _s64(ts[i] - ts[i - 1]) // unit
                d_cost += _bl(_zz(_s64(d - prev_delta)))
                prev_delta = d
        last = f
        while last + 1 < m and jpos[i0 + last + 1] == jpos[i0 + last] + 1:
            last += 1
        if last > f:
            d = _s64(ts[i0 + last] - ts[i0 + f])
            q = (abs(d) + (last - f) // 2) // (last - f)
            p_est = q if d >= 0 else -q
        else:
            p_est = _s64(ts[i0 + f] - ts[i0 + f - 1])
        cands = [p_est] if st.grid_p in (0, p_est) else [p_est, st.grid_p]
        best = d_cost
        for p in cands:
            base = min(_s64(ts[i0 + k] - k * p) for k in range(f, m) if jpos[i0 + k])
            bpred = _s64(ts[i0 + f - 1] + (1 - f) * p)
            cost = _bl(_zz(_s64(p - st.grid_p))) + _bl(_zz(_s64(base - bpred)))
            for k in range(f, m):
                if jpos[i0 + k]:
                    cost += _bl((ts[i0 + k] - k * p - base) & _M64)
            if cost < best:
                best = cost
                grid = (p, base, bpred)
        mode = 1 if grid is not None else 0
        rc.bit(flags, F_TSMODE + st.mode, mode)
        st.mode = mode
        if grid is not None:
            p, base, bpred = grid
            tp.put(rc, _zz(_s64(p - st.grid_p)))
            tp.put(rc, _zz(_s64(base - bpred)))
            st.grid_p = p
    for k in range(m):
        i = i0 + k
        j = jpos[i]
        if j == 0:
            t0.put(rc, _zz(_s64(ts[i] - firsts[i])))
            continue
        if grid is not None:
            tg.put(rc, (ts[i] - k * grid[0] - grid[1]) & _M64)
        elif j == 1:
            t1.put(rc, _zz(_s64(_s64(ts[i] - ts[i - 1]) // unit - st.prev_delta)))
        else:
            t2.put(rc, _dod(ts, i, unit))
        if j == 1:
            st.prev_delta = _s64(ts[i] - ts[i - 1]) // unit


def _decode_ts_block(
    rd: RangeDecoder,
    out: list[int],
    jpos: list[int],
    i0: int,
    m: int,
    unit: int,
    st: _TsState,
    flags: list[int],
) -> None:
    t0, t1, t2, tg, tp = st.models
    f = next((k for k in range(m) if jpos[i0 + k]), -1)
    grid = False
    p = base = dbase = 0
    if f >= 0:
        grid = bool(rd.bit(flags, F_TSMODE + st.mode))
        st.mode = int(grid)
        if grid:
            p = _s64(st.grid_p + _unzz(tp.get(rd)))
            st.grid_p = p
            dbase = _unzz(tp.get(rd))
    for k in range(m):
        i = i0 + k
        j = jpos[i]
        if j == 0:
            t = _s64(st.first + _unzz(t0.get(rd)))
            st.first = t
        elif grid:
            if k == f:  # the grid base is predicted from the row before the first grid row
                base = _s64(out[i - 1] + (1 - f) * p + dbase)
            t = _s64(base + k * p + tg.get(rd))
        elif j == 1:
            t = _s64(out[i - 1] + (st.prev_delta + _unzz(t1.get(rd))) * unit)
        else:
            d2 = _s64(out[i - 1] - out[i - 2]) // unit
            t = _s64(out[i - 1] + (d2 + _unzz(t2.get(rd))) * unit)
        if j == 1:
            st.prev_delta = _s64(t - out[i - 1]) // unit
        out.append(t)


# -- values ----------------------------------------------------------------------------------


def _dec_k(v: float, bits: int) -> int:
    """The fewest decimals k <= MAX_K with s = floor(v * 10**k + 0.5), |s| < 2**53 and
    s / 10**k == v bit-exactly; MAX_K + 1 if none (NaN, inf, -0.0, binary fractions)."""
    for k in range(MAX_K + 1):
        if _exact(v, bits, k) is not None:
            return k
    return MAX_K + 1


def _exact(v: float, bits: int, k: int) -> int | None:
    """s when v is exactly s / 10**k (as in _dec_k), else None."""
    y = v * _POW10[k] + 0.5
    if not abs(y) < _TWO53:  # also NaN and +-inf
        return None
    s = math.floor(y)
    if float(s) / _POW10[k] != v or (s == 0 and bits >> 63):  # -0.0 comes back as +0.0
        return None
    return s


def _scale(v: float, k: int) -> int:
    """A prediction of v's scaled integer at k (0 when it has none)."""
    y = v * _POW10[k] + 0.5
    return math.floor(y) if abs(y) < _TWO53 else 0


def _f32_bits(v: float, bits: int) -> int | None:
    """The float32 bits of v when v is exactly a float32 (NaN payloads included)."""
    if v == v and abs(v) > _FLT_MAX and abs(v) != math.inf:
        return None
    f = array("f", [v])
    if array("Q", array("d", f).tobytes())[0] != bits:
        return None
    return array("I", f.tobytes())[0]


def _f32_pred(prev: int) -> int:
    """The float32 bits of the previous value when it is one, else 0."""
    x = _f32_bits(_float(prev), prev)
    return 0 if x is None else x


def _track_finite(st: _ValState, j: int, v: float) -> None:
    """After a row of an ordered-bits block: the next decimal block predicts from the
    series' last finite value."""
    if j == 0:
        st.last_good = None
    if v == v and abs(v) != math.inf:
        st.last_good = v


def _ord64(b: int) -> int:
    """IEEE-754 bits to an unsigned integer in the order of the values."""
    return b ^ _M64 if b >> 63 else b | (1 << 63)


def _unord64(o: int) -> int:
    return o & ((1 << 63) - 1) if o >> 63 else o ^ _M64


def _ord32(b: int) -> int:
    return b ^ _M32 if b >> 31 else b | (1 << 31)


def _unord32(o: int) -> int:
    return o & ((1 << 31) - 1) if o >> 31 else o ^ _M32


def _zz32(x: int) -> int:
    x &= _M32
    x = x - (1 << 32) if x >> 31 else x
    return ((x << 1) ^ (x >> 31)) & _M32


def _unzz32(u: int) -> int:
    return ((u >> 1) ^ -(u & 1)) & _M32


class _ValState:
    """Value coding state across the blocks of a message."""

    __slots__ = ("cls", "esc", "k", "last_good", "mode", "models", "season", "smodel")

    def __init__(self) -> None:
        self.mode = VM_DEC  # the previous block's value mode
        self.k = 0  # the previous decimal block's k
        self.cls = 0  # the previous row's class
        self.esc = CANONICAL_NAN  # bits of the last escaped value
        self.last_good: float | None = None  # the current series' last decimal value
        # residuals, extra digits, class-1 residuals, divisors, adjustments
        self.models = [IntModel() for _ in range(6)]
        self.season = 0
        self.smodel = IntModel()


def _near(v: float, bits: int, kr: int, k: int, pred: int) -> tuple[int, int, int, int, int] | None:
    """(cost, 1, a, b, c) of the cheapest class-1 form of a value that is not a decimal at
    k, or None: more decimals e (a = e - 1, b = zz residual at k + e, c = -1), or a
    fraction: the double nearest N / (d * 10**k), 2 <= d <= 17, and an adjustment of its
    ordered bits (a = d, b = zz(N - pred * d), c = zz adjustment): an average of d
    readings, however its digits were printed."""
    best: tuple[int, int, int, int, int] | None = None
    if k < kr <= MAX_K:
        ex = kr - k
        big = math.floor(v * _POW10[kr] + 0.5)
        u = _zz(_s64(big - pred * _IPOW10[ex]))
        best = (_bl(u) + 8, 1, ex - 1, u, -1)
    if v != v or abs(v) == math.inf:
        return best
    o = _ord64(bits)
    for d in range(2, MAX_DIV + 1):
        den = d * _IPOW10[k]
        if den > _TWO53_INT:
            break
        y = v * float(den) + 0.5
        if not abs(y) < _TWO53:
            break
        n = math.floor(y)
        w = float(n) / float(den)
        adj = _s64(o - _ord64(_bits(w)))
        if -_MAX_ADJ < adj < _MAX_ADJ:
            u = _zz(_s64(n - pred * d))
            a = _zz(adj)
            cost = _bl(u) + _bl(a) + 10
            if best is None or cost < best[0]:
                best = (cost, 1, d, u, a)
    return best


def _seasonal(vals: list[float], i: int, p: int, k: int) -> int:
    """The change one period ago, at k: scaled value p rows back minus p + 1 rows back
    (0 when either is not finite)."""
    a, b = vals[i - p], vals[i - p - 1]
    if a != a or b != b or abs(a) == math.inf or abs(b) == math.inf:
        return 0
    return _scale(a, k) - _scale(b, k)


def _period(delta: int) -> int:
    """The rows in a day (or a year of months, a week of days) at this delta, 0 if none."""
    if 28 * 86_400_000 <= delta <= 31 * 86_400_000:
        return 12
    if delta == 86_400_000:
        return 7
    if 0 < delta < 86_400_000 and 86_400_000 % delta == 0 and 86_400_000 // delta <= 1440:
        return 86_400_000 // delta
    return 0


def _bits(v: float) -> int:
    return array("Q", array("d", [v]).tobytes())[0]


def _dec_rows(
    vals: list[float],
    bits: list[int],
    js: list[int],
    kr: list[int],
    k: int,
    order2: bool,
    last_good: float | None,
    esc: int,
    season: int,
    allvals: list[float],
    i0: int,
) -> tuple[int, list[tuple[int, int, int, int]], bool]:
    """(cost in bits, per-row (class, a, b, c), escapes?) of a decimal block at k with
    first or second differences, or first differences plus the change ``season`` rows
    before. Classes: 0 exact at k (a = zz residual); 1 apart (see _near); 2 the last
    escaped value's bits; 3 raw bits."""
    p10 = _POW10[k]
    cost = 0
    rows: list[tuple[int, int, int, int]] = []
    s1 = s2 = 0
    h = 0
    escapes = False
    for idx, v in enumerate(vals):
        j = js[idx]
        if j == 0 or idx == 0:
            h = 0
            if j == 0:
                last_good = None
        if h == 0:
            pred = _scale(last_good, k) if last_good is not None else 0
        elif h == 1 or not order2:
            pred = s1
        else:
            pred = 2 * s1 - s2
        if season and j > season:
            pred += _seasonal(allvals, i0 + idx, season, k)
        s = _exact(v, bits[idx], k)
        if s is not None:
            u = _zz(s - pred)
            rows.append((0, u, 0, 0))
            cost += _bl(u) + 1
        elif bits[idx] == esc:
            rows.append((2, 0, 0, 0))
            cost += 3
            escapes = True
            continue
        elif (near := _near(v, bits[idx], kr[idx], k, pred)) is not None:
            rows.append(near[1:])
            cost += near[0]
            escapes = True
            esc = bits[idx]
            s = math.floor(v * p10 + 0.5)
        else:
            rows.append((3, 0, 0, 0))
            cost += 66
            escapes = True
            esc = bits[idx]
            continue
        s2, s1 = s1, s
        h += 1
        last_good = v
    if escapes:
        cost += (len(vals) + 3) // 4
    return cost, rows, escapes


def _encode_value_block(
    rc: RangeEncoder,
    vals: list[float],
    bits: list[int],
    js: list[int],
    prev_bits: int,
    st: _ValState,
    flags: list[int],
    allvals: list[float],
    i0: int,
    delta: int,
) -> None:
    m = len(vals)
    kr = [_dec_k(v, b) for v, b in zip(vals, bits, strict=True)]
    dec_ks = sorted(k for k in kr if k <= MAX_K)
    best: tuple[int, int, int, bool, list[tuple[int, int, int, int]], bool, int] | None = None
    has_h2 = any(js[i] >= 2 and i >= 2 for i in range(m))
    if dec_ks:
        # candidate digit counts: those covering half, 3/4, 7/8 and all of the values
        nd = len(dec_ks)
        cands: list[int] = []
        for q in (nd - 1, (7 * nd - 1) // 8, (3 * nd - 1) // 4, (nd - 1) // 2):
            if dec_ks[q] not in cands:
                cands.append(dec_ks[q])
        season = _period(delta)
        if not any(js[i] > season for i in range(m)):
            season = 0
        for k in cands:
            for order2 in (False, True) if has_h2 else (False,):
                cost, rows, escapes = _dec_rows(
                    vals, bits, js, kr, k, order2, st.last_good, st.esc, 0, allvals, i0
                )
                if best is None or cost < best[0]:
                    best = (cost, VM_DEC, k, order2, rows, escapes, 0)
            if season and has_h2:
                cost, rows, escapes = _dec_rows(
                    vals, bits, js, kr, k, False, st.last_good, st.esc, season, allvals, i0
                )
                cost += 8
                assert best is not None
                if cost < best[0]:
                    best = (cost, VM_DEC, k, False, rows, escapes, season)
    # ordered-bits differences, as float32 when every value is one
    f32 = [_f32_bits(v, b) for v, b in zip(vals, bits, strict=True)]
    width32 = all(x is not None for x in f32)
    ords: list[int] = []
    prev = prev_bits
    for idx in range(m):
        b = bits[idx]
        if width32:
            x = f32[idx]
            assert x is not None
            u = _zz32(_ord32(x) - _ord32(_f32_pred(prev) if js[idx] else 0))
        else:
            u = _zz(_s64(_ord64(b) - _ord64(prev if js[idx] else 0)))
        ords.append(u)
        prev = b
    ord_cost = sum(_bl(u) + 1 for u in ords)
    if best is None or ord_cost < best[0]:
        rc.bit(flags, F_VMODE + st.mode, 1)
        st.mode = VM_ORD
        rc.bit(flags, F_WIDTH, int(width32))
        for idx, u in enumerate(ords):
            st.models[5 if js[idx] == 0 else 0].put(rc, u)
        for idx in range(m):
            _track_finite(st, js[idx], vals[idx])
        return
    _, _, k, order2, rows, escapes, season = best
    rc.bit(flags, F_VMODE + st.mode, 0)
    st.mode = VM_DEC
    rc.bit(flags, F_KNEW, int(k != st.k))
    if k != st.k:
        rc.put_raw(k, 4)
        st.k = k
    if has_h2:
        rc.bit(flags, F_ORDER2, int(order2))
        if not order2:
            rc.bit(flags, F_SEASON, int(season > 0))
            if season:
                st.smodel.put(rc, _zz(season - st.season))
                st.season = season
    rc.bit(flags, F_ESC, int(escapes))
    vm, xm, xr, xd, am, _ = st.models
    for idx, (cls, a, b, c) in enumerate(rows):
        if js[idx] == 0:
            st.last_good = None
        if escapes:
            ctx = F_CLASS + 3 * st.cls
            rc.bit(flags, ctx, cls >> 1)
            rc.bit(flags, ctx + 1 + (cls >> 1), cls & 1)
            st.cls = cls
        if cls == 0:
            (st.models[5] if js[idx] == 0 else vm).put(rc, a)
        elif cls == 1:
            rc.bit(flags, F_FRACTION, int(c >= 0))
            if c >= 0:
                xd.put(rc, a - 2)
                xr.put(rc, b)
                am.put(rc, c)
            else:
                xm.put(rc, a)
                xr.put(rc, b)
        elif cls == 3:
            rc.put_raw(bits[idx] & _M32, 32)
            rc.put_raw(bits[idx] >> 32, 32)
        if cls == 1 or cls == 3:
            st.esc = bits[idx]
        if cls <= 1:
            st.last_good = vals[idx]


def _decode_value_block(
    rd: RangeDecoder,
    out: list[int],
    js: list[int],
    st: _ValState,
    flags: list[int],
    modes: list[str] | None,
) -> None:
    m = len(js)
    has_h2 = any(js[i] >= 2 and i >= 2 for i in range(m))
    if rd.bit(flags, F_VMODE + st.mode):
        st.mode = VM_ORD
        width32 = rd.bit(flags, F_WIDTH)
        if modes is not None:
            modes.append("float32" if width32 else "float64")
        i0 = len(out)
        for idx in range(m):
            u = st.models[5 if js[idx] == 0 else 0].get(rd)
            prev = out[i0 + idx - 1] if js[idx] else 0
            if width32:
                if u >> 32:
                    raise ValueError("corrupt: a float32 difference over 32 bits")
                pf = _f32_pred(prev) if js[idx] else 0
                x = _unord32((_ord32(pf) + _unzz32(u)) & _M32)
                b = array("Q", array("d", array("f", array("I", [x]).tobytes())).tobytes())[0]
            else:
                b = _unord64((_ord64(prev) + _unzz(u)) & _M64)
            out.append(b)
            _track_finite(st, js[idx], _float(b))
        return
    st.mode = VM_DEC
    if rd.bit(flags, F_KNEW):
        k = rd.get_raw(4)
        if k > MAX_K:
            raise ValueError(f"corrupt: a decimal block of {k} digits")
        st.k = k
    k = st.k
    order2 = bool(rd.bit(flags, F_ORDER2)) if has_h2 else False
    season = 0
    if has_h2 and not order2 and rd.bit(flags, F_SEASON):
        season = _s64(st.season + _unzz(st.smodel.get(rd)))
        if not 2 <= season <= MAX_READS:
            raise ValueError(f"corrupt: a season of {season} rows")
        st.season = season
    i0 = len(out)
    escapes = rd.bit(flags, F_ESC)
    if modes is not None:
        modes.append(
            f"decimal {k}"
            + (" order 2" if order2 else "")
            + (f" season {season}" if season else "")
            + (" esc" if escapes else "")
        )
    p10 = _POW10[k]
    vm, xm, xr, xd, am, _ = st.models
    s1 = s2 = 0
    h = 0
    for idx in range(m):
        j = js[idx]
        if j == 0 or idx == 0:
            h = 0
            if j == 0:
                st.last_good = None
        cls = 0
        if escapes:
            ctx = F_CLASS + 3 * st.cls
            hi = rd.bit(flags, ctx)
            cls = hi << 1 | rd.bit(flags, ctx + 1 + hi)
            st.cls = cls
        if cls == 2:
            out.append(st.esc)
            continue
        if cls == 3:
            b = rd.get_raw(32)
            b |= rd.get_raw(32) << 32
            out.append(b)
            st.esc = b
            continue
        if h == 0:
            pred = _scale(st.last_good, k) if st.last_good is not None else 0
        elif h == 1 or not order2:
            pred = s1
        else:
            pred = 2 * s1 - s2
        if season and j > season:
            a_, b_ = _float(out[i0 + idx - season]), _float(out[i0 + idx - season - 1])
            if a_ == a_ and b_ == b_ and abs(a_) != math.inf and abs(b_) != math.inf:
                pred += _scale(a_, k) - _scale(b_, k)
        if cls == 0:
            s = _s64(pred + _unzz((st.models[5] if j == 0 else vm).get(rd)))
            if not -(2**53) < s < 2**53:
                raise ValueError("corrupt: decimal value out of range")
            v = float(s) / p10
        elif rd.bit(flags, F_FRACTION):
            d = xd.get(rd) + 2
            den = d * _IPOW10[k]
            if d > MAX_DIV or den > _TWO53_INT:
                raise ValueError(f"corrupt: a fraction of {d} * 10**{k}")
            n = _s64(pred * d + _unzz(xr.get(rd)))
            if not -(2**53) < n < 2**53:
                raise ValueError("corrupt: a fraction's numerator out of range")
            w = _ord64(_bits(float(n) / float(den)))
            v = _float(_unord64((w + _unzz(am.get(rd))) & _M64))
            if v != v or abs(v) == math.inf:
                raise ValueError("corrupt: a fraction adjusted to a special value")
            y = v * p10 + 0.5
            if abs(y) == math.inf:
                raise ValueError("corrupt: a fraction adjusted out of range")
            s = math.floor(y)
        else:
            ex = xm.get(rd) + 1
            if k + ex > MAX_K:
                raise ValueError(f"corrupt: a value of {k + ex} decimals")
            big = _s64(pred * _IPOW10[ex] + _unzz(xr.get(rd)))
            if not -(2**53) < big < 2**53:
                raise ValueError("corrupt: decimal value out of range")
            v = float(big) / _POW10[k + ex]
            s = math.floor(v * p10 + 0.5)
        b = array("Q", array("d", [v]).tobytes())[0]
        out.append(b)
        if cls == 1:
            st.esc = b
        s2, s1 = s1, s
        h += 1
        st.last_good = v


# -- body ------------------------------------------------------------------------------------


def encode_body(
    point_ids: array[int],
    timestamps: array[int],
    values: array[float],
    quality: array[int],
    prefix: bytes = b"",
) -> bytes:
    """``prefix`` followed by the body of a version-3 message for these columns."""
    ids, ts, vs, qs, jpos, firsts, starts = group_rows(point_ids, timestamps, values, quality)
    n = len(ids)
    if n > MAX_READS:
        raise ValueError(f"encode_body: {n} readings, a message holds at most {MAX_READS}")
    vbits = list(array("Q", vs.tobytes()))
    allv = list(vs)
    qflag = 1 if any(qs) else 0
    out = bytearray(prefix)
    write_series_table(out, ids, starts, n, qflag)
    if qflag:
        write_quality_runs(out, qs)
    unit = _ts_unit(ts, jpos)
    _put_varint(out, unit)
    rc = RangeEncoder()
    flags = [_PROB_INIT] * N_FLAGS
    tst = _TsState()
    vst = _ValState()
    for i0 in range(0, n, BLOCK):
        e = min(i0 + BLOCK, n)
        _encode_ts_block(rc, ts, jpos, firsts, i0, e - i0, unit, tst, flags)
        prev_bits = vbits[i0 - 1] if i0 else 0
        f = next((i for i in range(i0, e) if jpos[i]), -1)
        delta = _s64(ts[f] - ts[f - 1]) if f >= 0 else 0
        _encode_value_block(
            rc, list(vs[i0:e]), vbits[i0:e], jpos[i0:e], prev_bits, vst, flags, allv, i0, delta
        )
    coded, raw = rc.finish()
    _put_varint(out, len(coded))
    out += coded
    out += raw
    return bytes(out)


def decode_payload(
    data: bytes | bytearray | memoryview, start: int, end: int, modes: list[str] | None = None
) -> tuple[str, int, array[int], array[int], array[float], array[int]]:
    """(gateway, seq, point_ids, timestamps, values, quality) from data[start:end]: what
    follows a version-3 message's version byte up to its CRC. Raises ValueError for
    anything malformed. When ``modes`` is a list, each value block's mode is appended."""
    r, gateway, seq = read_header(data, start, end)
    size = end - start
    ids, jpos, qflag = read_series_table(r, size, min(MAX_READS, MAX_READS_PER_BYTE * (size + 16)))
    n = len(ids)
    qs = read_quality_runs(r, n) if qflag else [0] * n
    unit = r.varint("the timestamp unit")
    if unit == 0 or unit > 1 << 63:
        raise ValueError(f"corrupt: timestamp unit {unit}")
    rc_len = r.varint("the range-coded stream")
    if rc_len > r.end - r.pos:
        raise ValueError("truncated: the body ends inside the range-coded stream")
    rd = RangeDecoder(r.data, r.pos, r.pos + rc_len, r.pos + rc_len, r.end)
    flags = [_PROB_INIT] * N_FLAGS
    tst = _TsState()
    vst = _ValState()
    ts: list[int] = []
    bits: list[int] = []
    for i0 in range(0, n, BLOCK):
        e = min(i0 + BLOCK, n)
        _decode_ts_block(rd, ts, jpos, i0, e - i0, unit, tst, flags)
        _decode_value_block(rd, bits, jpos[i0:e], vst, flags, modes)
    if rd.raw_end - rd.raw_pos >= 8:
        raise ValueError("corrupt: trailing data after the raw bit stream")
    return (
        gateway,
        seq,
        array("I", ids),
        array("q", ts),
        array("d", array("Q", bits).tobytes()),
        array("B", qs),
    )
