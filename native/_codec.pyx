# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True
"""Compiled body of a version-2 batch message; ``codec_py.py`` is the twin and the
reference (algorithms there, wire format in ``native.codec``). Same signatures,
byte-identical output, identical decoded columns: the same float operations in the same
order (setup.py builds with -ffp-contract=off, so ``v * p + 0.5`` rounds twice as in
Python) and every integer step in wrapping unsigned 64-bit arithmetic.

The decoder copies the body into a buffer with zeroed slack so the bit readers may load
8 bytes at a time; every read is checked against the body's end before it is used.
"""

from cpython.array cimport array, clone
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.math cimport fabs, floor
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

# zigzag, varints, bit streams, PFOR integer blocks, the grouping by point id, the series
# table and the quality runs, shared with _codec3.pyx
include "_codec_common.pxi"

# Same values as in codec_py (BLOCK, MAX_SERIES_PER_BYTE and SLACK: _codec_common.pxi).
cdef enum:
    MAX_DECIMALS = 9
    ORDER2 = 0x10
    MODE_XOR = 0x40
    GRID = 0xFF
    MAX_READS_PER_BYTE = 43
    NO_LEAD = 255


cdef double TWO53 = 9007199254740992.0
cdef double POW10[10]
POW10[:] = [1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0, 10000000.0,
            100000000.0, 1000000000.0]
cdef int LEAD[8]
LEAD[:] = [0, 8, 12, 16, 18, 20, 22, 24]
cdef uint8_t LEAD_CODE[65]


cdef void _init_lead_code():
    cdef int lead, i
    for lead in range(65):
        for i in range(8):
            if LEAD[i] <= lead:
                LEAD_CODE[lead] = i


_init_lead_code()


# error codes of the nogil decoder (the shared ones: _codec_common.pxi), raised as
# ValueError once the GIL is back
cdef enum:
    ERR_TRUNC_SEQ = 32
    ERR_TRUNC_TS
    ERR_TRUNC_VALUES
    ERR_TRUNC_XOR
    ERR_GRID
    ERR_XOR_LEN
    ERR_XOR_LEAD
    ERR_DEC_RANGE
    ERR_MODE
    ERR_TRAILING

_ERRORS = {
    **_COMMON_ERRORS,
    ERR_TRUNC_SEQ: "truncated: the payload ends inside the seq",
    ERR_TRUNC_TS: "truncated: the body ends inside a timestamp block",
    ERR_TRUNC_VALUES: "truncated: the body ends inside a value block",
    ERR_TRUNC_XOR: "truncated: the body ends inside an XOR value block",
    ERR_GRID: "corrupt: a grid timestamp block without a grid row",
    ERR_XOR_LEN: "corrupt: XOR length out of range",
    ERR_XOR_LEAD: "corrupt: XOR value reuses a leading-zero count it lacks",
    ERR_DEC_RANGE: "corrupt: decimal value out of range",
    ERR_MODE: "corrupt: unknown value block mode",
    ERR_TRAILING: "corrupt: trailing data after the last block",
}


# -- timestamps --------------------------------------------------------------------------

cdef uint8_t *encode_ts_block(uint8_t *p, const int64_t *ts, const uint32_t *js,
                              Py_ssize_t i0, int m, uint64_t *cur_first,
                              uint64_t *p_state) noexcept nogil:
    """One timestamp block (see codec_py._encode_ts_block); js = positions of its rows."""
    cdef uint64_t dod[BLOCK]
    cdef uint64_t el[BLOCK]
    cdef uint64_t best_el[BLOCK]
    cdef uint64_t cand[2]
    cdef uint64_t t, P, base, bpred, a, q, best_p = 0, best_base = 0, best_bpred = 0
    cdef int64_t d, g, gmin
    cdef int k, w, gw, best_w, best, cost, f = -1, last, c, ncand, chosen = 0
    cdef const int64_t *tb = ts + i0
    for k in range(m):
        t = <uint64_t>tb[k]
        if js[k] == 0:
            dod[k] = zz(t - cur_first[0])
            cur_first[0] = t
        elif js[k] == 1:
            dod[k] = zz(t - <uint64_t>tb[k - 1])
        else:
            dod[k] = zz((t - <uint64_t>tb[k - 1]) - (<uint64_t>tb[k - 1] - <uint64_t>tb[k - 2]))
    best = pfor_choose(dod, m, &w)
    best_w = w
    for k in range(m):
        if js[k]:
            f = k
            break
    if f >= 0:
        last = f
        while last + 1 < m and js[last + 1] == js[last] + 1:
            last += 1
        if last > f:
            d = <int64_t>(<uint64_t>tb[last] - <uint64_t>tb[f])
            a = (<uint64_t>0 - <uint64_t>d) if d < 0 else <uint64_t>d
            q = (a + <uint64_t>((last - f) // 2)) // <uint64_t>(last - f)
            cand[0] = q if d >= 0 else <uint64_t>0 - q
        else:
            cand[0] = <uint64_t>tb[f] - <uint64_t>tb[f - 1]
        ncand = 1
        if p_state[0] != 0 and p_state[0] != cand[0]:
            cand[1] = p_state[0]
            ncand = 2
        for c in range(ncand):
            P = cand[c]
            gmin = 0
            for k in range(f, m):
                if js[k]:
                    g = <int64_t>(<uint64_t>tb[k] - <uint64_t>k * P)
                    if k == f or g < gmin:
                        gmin = g
            base = <uint64_t>gmin
            for k in range(m):
                el[k] = (<uint64_t>tb[k] - <uint64_t>k * P - base) if js[k] else dod[k]
            bpred = <uint64_t>tb[f - 1] + <uint64_t>(<int64_t>(1 - f)) * P
            cost = (1 + vlen(zz(P - p_state[0])) + vlen(zz(base - bpred))
                    + pfor_choose(el, m, &gw))
            if cost < best:
                best = cost
                best_w = gw
                best_p = P
                best_base = base
                best_bpred = bpred
                memcpy(best_el, el, m * sizeof(uint64_t))
                chosen = 1
    if not chosen:
        return pfor_write(p, dod, m, best_w)
    p[0] = GRID
    p = put_varint(p + 1, zz(best_p - p_state[0]))
    p = put_varint(p, zz(best_base - best_bpred))
    p_state[0] = best_p
    return pfor_write(p, best_el, m, best_w)


# -- values ----------------------------------------------------------------------------------

cdef inline int decimal_scale(const double *v, const uint64_t *bits, int m, int k,
                              int64_t *s) noexcept nogil:
    """1 and the scaled integers in s when the block qualifies for k digits, else 0."""
    cdef double p = POW10[k]
    cdef double y, t
    cdef int64_t x
    cdef int j
    for j in range(m):
        y = v[j] * p + 0.5
        if not (fabs(y) < TWO53):
            return 0
        t = floor(y)
        x = <int64_t>t
        if cg_dbits(<double>x / p) != bits[j]:
            return 0
        s[j] = x
    return 1


cdef inline int64_t predict(double prev, int k) noexcept nogil:
    cdef double y = prev * POW10[k] + 0.5
    if fabs(y) < TWO53:
        return <int64_t>floor(y)
    return 0


cdef inline void dec_elements(const int64_t *s, const uint32_t *js, int m, int64_t pred,
                              int order2, uint64_t *el) noexcept nogil:
    """See codec_py._dec_elements."""
    cdef int k
    cdef uint32_t h
    cdef int64_t e
    for k in range(m):
        h = js[k] if js[k] < <uint32_t>k else <uint32_t>k
        if h == 0:
            e = s[k] - (pred if js[k] else 0)
        elif h == 1 or not order2:
            e = s[k] - s[k - 1]
        else:
            e = s[k] - 2 * s[k - 1] + s[k - 2]
        el[k] = zz(<uint64_t>e)


cdef uint8_t *xor_write(uint8_t *p, const uint64_t *bits, const uint32_t *js, int m,
                        uint64_t prev_bits, int *lead_state, int64_t *nbits_out) noexcept nogil:
    """The XOR stream of the block at p (see codec_py._xor_bits); returns its end."""
    cdef BitWriter bw
    cdef int j, code, lead, trail, c, ls = lead_state[0]
    cdef uint64_t x
    cdef int64_t nbits = 0
    bw_init(&bw, p)
    for j in range(m):
        x = bits[j] ^ (prev_bits if js[j] else 0)
        prev_bits = bits[j]
        if x == 0:
            bw_put(&bw, 0, 2)
            nbits += 2
            continue
        code = LEAD_CODE[64 - cg_bitlen(x)]
        lead = LEAD[code]
        trail = cg_ctz(x)
        if trail > 6:
            c = 64 - lead - trail
            bw_put(&bw, <uint64_t>(1 | (code << 2) | (c << 5)), 11)
            bw_put(&bw, x >> trail, c)
            nbits += 11 + c
            ls = lead
        elif lead == ls:
            bw_put(&bw, 2, 2)
            bw_put(&bw, x, 64 - lead)
            nbits += 66 - lead
        else:
            bw_put(&bw, <uint64_t>(3 | (code << 2)), 5)
            bw_put(&bw, x, 64 - lead)
            nbits += 69 - lead
            ls = lead
    lead_state[0] = ls
    nbits_out[0] = nbits
    return bw_flush(&bw)


cdef int xor_read(const uint8_t *buf, Py_ssize_t *pos, Py_ssize_t end, const uint32_t *js,
                  int m, uint64_t prev_bits, int *lead_state, uint64_t *out) noexcept nogil:
    cdef uint64_t limit = <uint64_t>(end - pos[0]) * 8
    cdef const uint8_t *base = buf + pos[0]
    cdef uint64_t bp = 0, x, f
    cdef int j, code, lead, c, n, ls = lead_state[0]
    for j in range(m):
        if bp + 2 > limit:
            return ERR_TRUNC_XOR
        code = <int>get_bits(base, bp, 2)
        bp += 2
        if code == 0:
            x = 0
        elif code == 1:
            f = get_bits(base, bp, 9)
            bp += 9
            lead = LEAD[f & 7]
            c = <int>(f >> 3)
            if c == 0 or lead + c > 64:
                return ERR_XOR_LEN
            x = get_bits(base, bp, c) << (64 - lead - c)
            bp += c
            ls = lead
        else:
            if code == 3:
                ls = LEAD[get_bits(base, bp, 3)]
                bp += 3
            elif ls == NO_LEAD:
                return ERR_XOR_LEAD
            n = 64 - ls
            x = get_bits(base, bp, n)
            bp += n
        if bp > limit:
            return ERR_TRUNC_XOR
        prev_bits = x ^ (prev_bits if js[j] else 0)
        out[j] = prev_bits
    pos[0] += <Py_ssize_t>((bp + 7) >> 3)
    lead_state[0] = ls
    return ERR_NONE


cdef uint8_t *encode_value_block(uint8_t *p, const double *v, const uint64_t *bits,
                                 const uint32_t *js, int m, uint64_t prev_bits,
                                 int *lead_state) noexcept nogil:
    """One value block (see codec_py._encode_value_block)."""
    cdef int64_t s[BLOCK]
    cdef uint64_t el1[BLOCK]
    cdef uint64_t el2[BLOCK]
    cdef uint64_t *el = el1
    cdef int k, j, mode = -1, w = 0, w2, dec_size = 0, size2, lead, has2 = 0
    cdef int64_t pred, nbits = 0, xor_size
    cdef uint8_t *xend
    for k in range(MAX_DECIMALS + 1):
        if decimal_scale(v, bits, m, k, s):
            pred = predict(cg_bitsd(prev_bits), k) if js[0] else 0
            dec_elements(s, js, m, pred, 0, el1)
            dec_size = 1 + pfor_choose(el1, m, &w)
            mode = k
            for j in range(2, m):
                if js[j] >= 2:
                    has2 = 1
                    break
            if has2:
                dec_elements(s, js, m, pred, 1, el2)
                size2 = 1 + pfor_choose(el2, m, &w2)
                if size2 < dec_size:
                    dec_size = size2
                    w = w2
                    mode = k | ORDER2
                    el = el2
            break
    if mode >= 0 and dec_size <= 1 + (2 * m + 7) // 8:
        p[0] = <uint8_t>mode
        return pfor_write(p + 1, el, m, w)
    lead = lead_state[0]
    xend = xor_write(p + 1, bits, js, m, prev_bits, &lead, &nbits)
    xor_size = 1 + (nbits + 7) // 8
    if mode >= 0 and dec_size <= xor_size:
        p[0] = <uint8_t>mode
        return pfor_write(p + 1, el, m, w)
    p[0] = MODE_XOR
    lead_state[0] = lead
    return xend


# -- encode ---------------------------------------------------------------------------------

cdef Py_ssize_t encode_all(uint8_t *out, const uint32_t *ids, const int64_t *ts,
                           const double *vals, const uint8_t *qs, uint32_t *jpos,
                           uint64_t *tab, Py_ssize_t n) noexcept nogil:
    """The body (see codec_py.encode_body); tab: scratch of 2n table elements."""
    cdef uint8_t *p = out
    cdef Py_ssize_t i0
    cdef int qflag = 0, m
    cdef uint64_t cur_first = 0, p_state = 0
    cdef int lead = NO_LEAD
    cdef const uint64_t *vbits = <const uint64_t *>vals
    p = write_series_table(p, ids, qs, jpos, tab, n, &qflag)
    i0 = 0
    while i0 < n:
        m = <int>min(<Py_ssize_t>BLOCK, n - i0)
        p = encode_ts_block(p, ts, jpos + i0, i0, m, &cur_first, &p_state)
        i0 += m
    i0 = 0
    while i0 < n:
        m = <int>min(<Py_ssize_t>BLOCK, n - i0)
        p = encode_value_block(p, vals + i0, vbits + i0, jpos + i0, m,
                               vbits[i0 - 1] if i0 else 0, &lead)
        i0 += m
    if qflag:
        p = write_quality_runs(p, qs, n)
    return p - out


def encode_body(array point_ids, array timestamps, array values, array quality,
                bytes prefix=b""):
    """See codec_py.encode_body. The columns are array.array of typecodes I, q, d, B."""
    cdef Py_ssize_t n = len(point_ids), cap, size = 0, npre = len(prefix)
    cdef int grouped = 0
    cdef uint8_t *out = NULL
    cdef uint8_t *scratch = NULL
    cdef uint32_t *jpos = NULL
    cdef uint64_t *tab = NULL
    cdef const uint32_t *ids_p
    cdef const int64_t *ts_p
    cdef const double *vals_p
    cdef const uint8_t *qs_p
    check_column(point_ids, "I", b"point_ids")
    check_column(timestamps, "q", b"timestamps")
    check_column(values, "d", b"values")
    check_column(quality, "B", b"quality")
    if point_ids.ob_descr.itemsize != 4 or timestamps.ob_descr.itemsize != 8:
        raise TypeError("encode_body: this platform's I/q typecodes are not 32/64-bit")
    if len(timestamps) != n or len(values) != n or len(quality) != n:
        raise ValueError("encode_body: columns differ in length")
    if n >= 0xFFFFFFFF:
        raise ValueError(f"encode_body: {n} readings are too many for one message")
    if n == 0:
        return prefix + b"\x00"
    ids_p = <const uint32_t *>point_ids.data.as_voidptr
    ts_p = <const int64_t *>timestamps.data.as_voidptr
    vals_p = <const double *>values.data.as_voidptr
    qs_p = <const uint8_t *>quality.data.as_voidptr
    # worst case: 10 + 20 a series + per block 2 + 2 + 8m (ts) and 1 + 69m/8 (values)
    # + 2 a reading of quality runs; 72 a reading covers all of it, plus the slack that
    # the 8-byte stores after a stream's end need
    cap = npre + 72 * n + 64
    try:
        with nogil:
            grouped = group_rows(&ids_p, &ts_p, &vals_p, &qs_p, n, &scratch)
            out = <uint8_t *>malloc(cap)
            jpos = <uint32_t *>malloc(n * sizeof(uint32_t))
            tab = <uint64_t *>malloc(2 * n * sizeof(uint64_t))
        if out == NULL or jpos == NULL or tab == NULL or grouped < 0:
            raise MemoryError()
        if npre:
            memcpy(out, <const char *>prefix, npre)
        with nogil:
            size = encode_all(out + npre, ids_p, ts_p, vals_p, qs_p, jpos, tab, n)
        return PyBytes_FromStringAndSize(<char *>out, npre + size)
    finally:
        free(scratch)
        free(out)
        free(jpos)
        free(tab)


# -- decode ---------------------------------------------------------------------------------

cdef int decode_blocks(const uint8_t *buf, Py_ssize_t *pos, Py_ssize_t end, Py_ssize_t n,
                       const uint32_t *jpos, int64_t *ts_out, uint64_t *vb, uint8_t *qs,
                       int qflag, uint8_t *modes) noexcept nogil:
    cdef uint64_t u[BLOCK]
    cdef int64_t s[BLOCK]
    cdef uint64_t *ts = <uint64_t *>ts_out
    cdef uint64_t v, t, first = 0, p_state = 0, P = 0, dbase = 0, base = 0, prev_bits
    cdef uint64_t x
    cdef Py_ssize_t i0, i
    cdef int m, k, err, grid, have_base, mode, dk, order2, lead = NO_LEAD, nb = 0
    cdef const uint32_t *js
    cdef uint32_t h
    cdef int64_t pred, e
    cdef double p10
    i0 = 0
    while i0 < n:
        m = <int>min(<Py_ssize_t>BLOCK, n - i0)
        js = jpos + i0
        if pos[0] >= end:
            return ERR_TRUNC_TS
        grid = buf[pos[0]] == GRID
        if grid:
            pos[0] += 1
            err = read_varint(buf, pos, end, &v, ERR_TRUNC_TS)
            if err:
                return err
            P = p_state + unzz(v)
            p_state = P
            err = read_varint(buf, pos, end, &dbase, ERR_TRUNC_TS)
            if err:
                return err
        err = pfor_read(buf, pos, end, m, u, ERR_TRUNC_TS)
        if err:
            return err
        have_base = 0
        for k in range(m):
            i = i0 + k
            if js[k] == 0:
                t = first + unzz(u[k])
                first = t
            elif grid:
                if not have_base:
                    base = ts[i - 1] + <uint64_t>(<int64_t>(1 - k)) * P + unzz(dbase)
                    have_base = 1
                t = base + <uint64_t>k * P + u[k]
            elif js[k] == 1:
                t = ts[i - 1] + unzz(u[k])
            else:
                t = 2 * ts[i - 1] - ts[i - 2] + unzz(u[k])
            ts[i] = t
        if grid and not have_base:
            return ERR_GRID
        i0 += m
    i0 = 0
    while i0 < n:
        m = <int>min(<Py_ssize_t>BLOCK, n - i0)
        js = jpos + i0
        if pos[0] >= end:
            return ERR_TRUNC_VALUES
        mode = buf[pos[0]]
        pos[0] += 1
        if modes != NULL:
            modes[nb] = <uint8_t>mode
            nb += 1
        prev_bits = vb[i0 - 1] if i0 else 0
        if mode == MODE_XOR:
            err = xor_read(buf, pos, end, js, m, prev_bits, &lead, vb + i0)
            if err:
                return err
        elif (mode & ~ORDER2) <= MAX_DECIMALS:
            dk = mode & ~ORDER2
            order2 = mode & ORDER2
            p10 = POW10[dk]
            err = pfor_read(buf, pos, end, m, u, ERR_TRUNC_VALUES)
            if err:
                return err
            pred = predict(cg_bitsd(prev_bits), dk) if js[0] else 0
            for k in range(m):
                h = js[k] if js[k] < <uint32_t>k else <uint32_t>k
                if h == 0:
                    x = unzz(u[k]) + (<uint64_t>pred if js[k] else 0)
                elif h == 1 or not order2:
                    x = unzz(u[k]) + <uint64_t>s[k - 1]
                else:
                    x = unzz(u[k]) + 2 * <uint64_t>s[k - 1] - <uint64_t>s[k - 2]
                e = <int64_t>x
                if not (-<int64_t>9007199254740992 < e < <int64_t>9007199254740992):
                    return ERR_DEC_RANGE
                s[k] = e
                vb[i0 + k] = cg_dbits(<double>e / p10)
        else:
            return ERR_MODE
        i0 += m
    if qflag:
        return read_quality_runs(buf, pos, end, n, qs)
    elif n:
        memset(qs, 0, n)
    return ERR_NONE


cdef array _IDS = array("I")
cdef array _TS = array("q")
cdef array _VALS = array("d")
cdef array _QS = array("B")


def decode_payload(const uint8_t[::1] data, Py_ssize_t start, Py_ssize_t end, modes=None):
    """See codec_py.decode_payload."""
    cdef Py_ssize_t size, pos = 0, nblocks
    cdef uint8_t *buf = NULL
    cdef uint32_t *jpos = NULL
    cdef uint8_t *mbuf = NULL
    cdef uint64_t nseries = 0, total = 0
    cdef uint64_t *tab = NULL
    cdef int qflag = 0, err = ERR_NONE
    cdef array out_ids, out_ts, out_vals, out_q
    cdef uint32_t *ids_p
    cdef uint64_t seq = 0
    cdef Py_ssize_t glen
    cdef str gateway
    if not 0 <= start <= end <= data.shape[0]:
        raise ValueError("decode_payload: bad range")
    size = end - start
    buf = <uint8_t *>malloc(size + SLACK)
    if buf == NULL:
        raise MemoryError()
    try:
        if size:
            memcpy(buf, &data[start], size)
        memset(buf + size, 0, SLACK)
        glen = buf[0] if size else 0
        if size < 1 + glen:
            raise ValueError("truncated: the payload ends inside the gateway id")
        try:
            gateway = PyUnicode_DecodeUTF8(<char *>buf + 1, glen, NULL)
        except UnicodeDecodeError:
            raise ValueError("corrupt: the gateway id is not UTF-8") from None
        pos = 1 + glen
        err = read_varint(buf, &pos, size, &seq, ERR_TRUNC_SEQ)
        if err:
            raise ValueError(_ERRORS[err])
        read_series_table(buf, &pos, size, <uint64_t>(MAX_READS_PER_BYTE * size), &tab,
                          &nseries, &total, &qflag)
        out_ids = clone(_IDS, <Py_ssize_t>total, False)
        out_ts = clone(_TS, <Py_ssize_t>total, False)
        out_vals = clone(_VALS, <Py_ssize_t>total, False)
        out_q = clone(_QS, <Py_ssize_t>total, False)
        ids_p = <uint32_t *>out_ids.data.as_voidptr
        jpos = <uint32_t *>malloc(total * sizeof(uint32_t) + 4)
        nblocks = <Py_ssize_t>((total + BLOCK - 1) // BLOCK)
        if modes is not None:
            mbuf = <uint8_t *>malloc(nblocks + 1)
        if jpos == NULL or (modes is not None and mbuf == NULL):
            raise MemoryError()
        with nogil:
            fill_series(tab, nseries, ids_p, jpos)
            err = decode_blocks(buf, &pos, size, <Py_ssize_t>total, jpos,
                                <int64_t *>out_ts.data.as_voidptr,
                                <uint64_t *>out_vals.data.as_voidptr,
                                <uint8_t *>out_q.data.as_voidptr, qflag, mbuf)
            if not err and pos != size:
                err = ERR_TRAILING
        if err:
            raise ValueError(_ERRORS[err])
        if modes is not None:
            modes.extend(PyBytes_FromStringAndSize(<char *>mbuf, nblocks))
        return gateway, seq, out_ids, out_ts, out_vals, out_q
    finally:
        free(buf)
        free(jpos)
        free(mbuf)
        free(tab)
