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

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    /* GCC cannot see that every block has m >= 1 rows filled before a const pointer to
       it is passed on, and warns; the arrays are always filled first. */
    #if defined(__GNUC__) && !defined(__clang__)
    #pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
    #endif
    static inline int cg_bitlen(uint64_t v) {
    #if defined(__GNUC__) || defined(__clang__)
        return v ? 64 - __builtin_clzll(v) : 0;
    #else
        int n = 0; while (v) { n++; v >>= 1; } return n;
    #endif
    }
    static inline int cg_ctz(uint64_t v) {  /* v != 0 */
    #if defined(__GNUC__) || defined(__clang__)
        return __builtin_ctzll(v);
    #else
        int n = 0; while (!(v & 1)) { n++; v >>= 1; } return n;
    #endif
    }
    static inline uint64_t cg_load64(const uint8_t *p) {
        uint64_t v; memcpy(&v, p, 8);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap64(v);
    #endif
        return v;
    }
    static inline void cg_store64(uint8_t *p, uint64_t v) {
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap64(v);
    #endif
        memcpy(p, &v, 8);
    }
    static inline uint64_t cg_dbits(double d) { uint64_t u; memcpy(&u, &d, 8); return u; }
    static inline double cg_bitsd(uint64_t u) { double d; memcpy(&d, &u, 8); return d; }
    """
    int cg_bitlen(uint64_t v) nogil
    int cg_ctz(uint64_t v) nogil
    uint64_t cg_load64(const uint8_t *p) nogil
    void cg_store64(uint8_t *p, uint64_t v) nogil
    uint64_t cg_dbits(double d) nogil
    double cg_bitsd(uint64_t u) nogil

# Same values as in codec_py.
cdef enum:
    BLOCK = 128
    MAX_DECIMALS = 9
    ORDER2 = 0x10
    MODE_XOR = 0x40
    GRID = 0xFF
    MAX_READS_PER_BYTE = 43
    MAX_SERIES_PER_BYTE = 64
    NO_LEAD = 255
    SLACK = 32  # zeroed bytes after the copied body, for 8-byte loads past a read


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

# error codes of the nogil decoder, raised as ValueError once the GIL is back
cdef enum:
    ERR_NONE = 0
    ERR_TRUNC_SEQ
    ERR_TRUNC_TABLE
    ERR_TRUNC_TS
    ERR_TRUNC_VALUES
    ERR_TRUNC_XOR
    ERR_TRUNC_QUALITY
    ERR_GRID
    ERR_VARINT
    ERR_WIDTH
    ERR_NEXC
    ERR_EXC_POS
    ERR_EXC_VALUE
    ERR_XOR_LEN
    ERR_XOR_LEAD
    ERR_DEC_RANGE
    ERR_MODE
    ERR_QCOUNT
    ERR_TRAILING

_ERRORS = {
    ERR_TRUNC_SEQ: "truncated: the payload ends inside the seq",
    ERR_TRUNC_TABLE: "truncated: the body ends inside the series table",
    ERR_TRUNC_TS: "truncated: the body ends inside a timestamp block",
    ERR_TRUNC_VALUES: "truncated: the body ends inside a value block",
    ERR_TRUNC_XOR: "truncated: the body ends inside an XOR value block",
    ERR_TRUNC_QUALITY: "truncated: the body ends inside the quality runs",
    ERR_GRID: "corrupt: a grid timestamp block without a grid row",
    ERR_VARINT: "corrupt: varint over 64 bits",
    ERR_WIDTH: "corrupt: bit width > 64 in an integer block",
    ERR_NEXC: "corrupt: more exceptions than values in an integer block",
    ERR_EXC_POS: "corrupt: exception position out of order in an integer block",
    ERR_EXC_VALUE: "corrupt: exception value out of range in an integer block",
    ERR_XOR_LEN: "corrupt: XOR length out of range",
    ERR_XOR_LEAD: "corrupt: XOR value reuses a leading-zero count it lacks",
    ERR_DEC_RANGE: "corrupt: decimal value out of range",
    ERR_MODE: "corrupt: unknown value block mode",
    ERR_QCOUNT: "corrupt: quality runs do not add up to the count",
    ERR_TRAILING: "corrupt: trailing data after the last block",
}


# -- small helpers -------------------------------------------------------------------------

cdef inline uint64_t zz(uint64_t x) noexcept nogil:
    """Zigzag of x read as a signed 64-bit integer."""
    return (x << 1) ^ (<uint64_t>0 - (x >> 63))


cdef inline uint64_t unzz(uint64_t u) noexcept nogil:
    return (u >> 1) ^ (<uint64_t>0 - (u & 1))


cdef inline uint8_t *put_varint(uint8_t *p, uint64_t v) noexcept nogil:
    while v >= 0x80:
        p[0] = <uint8_t>((v & 0x7F) | 0x80)
        p += 1
        v >>= 7
    p[0] = <uint8_t>v
    return p + 1


cdef struct BitWriter:
    uint8_t *p
    uint64_t acc
    int nb


cdef inline void bw_init(BitWriter *bw, uint8_t *p) noexcept nogil:
    bw.p = p
    bw.acc = 0
    bw.nb = 0


cdef inline void bw_put(BitWriter *bw, uint64_t v, int n) noexcept nogil:
    """Appends the n (1..64) low bits of v; v must have no bits above them."""
    bw.acc |= v << bw.nb
    bw.nb += n
    if bw.nb >= 64:
        cg_store64(bw.p, bw.acc)
        bw.p += 8
        bw.nb -= 64
        bw.acc = (v >> (n - bw.nb)) if bw.nb else 0


cdef inline uint8_t *bw_flush(BitWriter *bw) noexcept nogil:
    """Writes the pending bits; returns the end of the stream (8 bytes of slack needed)."""
    cg_store64(bw.p, bw.acc)
    return bw.p + ((bw.nb + 7) >> 3)


cdef inline uint64_t get_bits(const uint8_t *base, uint64_t bp, int n) noexcept nogil:
    """n (1..64) bits at bit position bp of a buffer with slack after it."""
    cdef const uint8_t *q = base + (bp >> 3)
    cdef int sh = <int>(bp & 7)
    cdef uint64_t v = cg_load64(q) >> sh
    if sh + n > 64:
        v |= cg_load64(q + 8) << (64 - sh)
    if n < 64:
        v &= (<uint64_t>1 << n) - 1
    return v


# -- integer blocks (PFOR) -----------------------------------------------------------------

cdef int pfor_choose(const uint64_t *u, int m, int *w_out) noexcept nogil:
    """Width and byte size of the cheapest encoding (see codec_py.pfor_choose)."""
    cdef uint64_t orv = 0
    cdef int j, b, w, maxbl, nbins = 0, best, best_w, cost, exc, i
    cdef int hist[65]
    cdef int bins[64]
    for j in range(m):
        orv |= u[j]
    maxbl = cg_bitlen(orv)
    if maxbl == 0:
        w_out[0] = 0
        return 1
    memset(hist, 0, sizeof(hist))
    for j in range(m):
        hist[cg_bitlen(u[j])] += 1
    for b in range(1, maxbl + 1):
        if hist[b]:
            bins[nbins] = b
            nbins += 1
    best_w = maxbl
    best = 1 + (m * maxbl + 7) // 8
    w = maxbl - 1
    while w >= 0:
        exc = 0
        i = nbins - 1
        while i >= 0 and bins[i] > w:
            exc += hist[bins[i]] * (1 + (bins[i] - w + 6) // 7)
            i -= 1
        cost = 2 + (m * w + 7) // 8 + exc
        if cost < best:
            best = cost
            best_w = w
        w -= 1
    w_out[0] = best_w
    return best


cdef uint8_t *pfor_write(uint8_t *p, const uint64_t *u, int m, int w) noexcept nogil:
    cdef int j, ne = 0
    cdef uint64_t mask = (<uint64_t>1 << w) - 1 if w < 64 else <uint64_t>0xFFFFFFFFFFFFFFFF
    cdef BitWriter bw
    if w < 64:
        for j in range(m):
            if u[j] >> w:
                ne += 1
    p[0] = <uint8_t>(w | (0x80 if ne else 0))
    p += 1
    if ne:
        p[0] = <uint8_t>(ne - 1)
        p += 1
    if w:
        bw_init(&bw, p)
        for j in range(m):
            bw_put(&bw, u[j] & mask, w)
        p = bw_flush(&bw)
    if ne:
        for j in range(m):
            if u[j] >> w:
                p[0] = <uint8_t>j
                p = put_varint(p + 1, u[j] >> w)
    return p


cdef int read_varint(const uint8_t *buf, Py_ssize_t *pos, Py_ssize_t end, uint64_t *out,
                     int err_trunc) noexcept nogil:
    cdef uint64_t v = 0
    cdef int shift = 0
    cdef uint8_t b
    cdef Py_ssize_t p = pos[0]
    while True:
        if p >= end:
            return err_trunc
        b = buf[p]
        p += 1
        if shift == 63 and b > 1:
            return ERR_VARINT
        v |= (<uint64_t>(b & 0x7F)) << shift
        if b < 0x80:
            break
        shift += 7
    pos[0] = p
    out[0] = v
    return ERR_NONE


cdef int pfor_read(const uint8_t *buf, Py_ssize_t *pos, Py_ssize_t end, int m, uint64_t *u,
                   int err_trunc) noexcept nogil:
    cdef Py_ssize_t p = pos[0]
    cdef int w, ne = 0, j, last, k, err
    cdef uint8_t h
    cdef uint64_t mask, hi, bp
    cdef Py_ssize_t nbytes
    cdef const uint8_t *q
    if p >= end:
        return err_trunc
    h = buf[p]
    p += 1
    w = h & 0x7F
    if w > 64:
        return ERR_WIDTH
    if h & 0x80:
        if p >= end:
            return err_trunc
        ne = buf[p] + 1
        p += 1
        if ne > m or w == 64:
            return ERR_NEXC
    nbytes = (m * w + 7) >> 3
    if nbytes > end - p:
        return err_trunc
    if w == 0:
        memset(u, 0, m * sizeof(uint64_t))
    elif w <= 56:
        mask = (<uint64_t>1 << w) - 1
        q = buf + p
        bp = 0
        for j in range(m):
            u[j] = (cg_load64(q + (bp >> 3)) >> (bp & 7)) & mask
            bp += w
    else:
        bp = 0
        for j in range(m):
            u[j] = get_bits(buf + p, bp, w)
            bp += w
    p += nbytes
    last = -1
    for k in range(ne):
        if p >= end:
            return err_trunc
        j = buf[p]
        p += 1
        if j <= last or j >= m:
            return ERR_EXC_POS
        err = read_varint(buf, &p, end, &hi, err_trunc)
        if err:
            return err
        if hi == 0 or (w and (hi >> (64 - w))):
            return ERR_EXC_VALUE
        u[j] |= hi << w
        last = j
    pos[0] = p
    return ERR_NONE


# -- timestamps --------------------------------------------------------------------------

cdef inline int vlen(uint64_t v) noexcept nogil:
    cdef int b = cg_bitlen(v)
    return (b + 6) // 7 if b else 1


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

cdef uint32_t *stable_order(const uint32_t *ids, Py_ssize_t n) noexcept nogil:
    """Row indices sorted by id, stable (LSD radix sort, bytes that vary only);
    NULL when out of memory."""
    cdef uint32_t *idx = <uint32_t *>malloc(n * sizeof(uint32_t) + 4)
    cdef uint32_t *tmp = <uint32_t *>malloc(n * sizeof(uint32_t) + 4)
    cdef uint32_t *sw
    cdef uint32_t orv = 0, andv = 0xFFFFFFFF
    cdef Py_ssize_t i
    cdef Py_ssize_t count[256]
    cdef Py_ssize_t acc, c
    cdef int shift, b
    if idx == NULL or tmp == NULL:
        free(idx)
        free(tmp)
        return NULL
    for i in range(n):
        idx[i] = <uint32_t>i
        orv |= ids[i]
        andv &= ids[i]
    for shift in range(0, 32, 8):
        if ((orv ^ andv) >> shift) & 0xFF == 0:
            continue
        memset(count, 0, sizeof(count))
        for i in range(n):
            count[(ids[idx[i]] >> shift) & 0xFF] += 1
        acc = 0
        for b in range(256):
            c = count[b]
            count[b] = acc
            acc += c
        for i in range(n):
            b = (ids[idx[i]] >> shift) & 0xFF
            tmp[count[b]] = idx[i]
            count[b] += 1
        sw = idx
        idx = tmp
        tmp = sw
    free(tmp)
    return idx


cdef Py_ssize_t encode_all(uint8_t *out, const uint32_t *ids, const int64_t *ts,
                           const double *vals, const uint8_t *qs, uint32_t *jpos,
                           uint64_t *tab, Py_ssize_t n) noexcept nogil:
    """The body (see codec_py.encode_body); tab: scratch of 2n table elements."""
    cdef uint8_t *p = out
    cdef Py_ssize_t i, a, b, i0, nseries = 0, nruns, prev_start = 0, var_size = 0
    cdef Py_ssize_t pfor_size = 0, j
    cdef int qflag = 0, m, table, w, c
    cdef uint64_t cur_first = 0, p_state = 0
    cdef int lead = NO_LEAD
    cdef const uint64_t *vbits = <const uint64_t *>vals
    cdef uint64_t *id_el = tab
    cdef uint64_t *cnt_el = tab + n
    cdef uint64_t *col
    for i in range(n):
        if i and ids[i] == ids[i - 1]:
            jpos[i] = jpos[i - 1] + 1
        else:
            jpos[i] = 0
            if nseries:
                id_el[nseries] = <uint64_t>(ids[i] - ids[prev_start] - 1)
                cnt_el[nseries - 1] = <uint64_t>(i - prev_start - 1)
            else:
                id_el[0] = ids[i]
            prev_start = i
            nseries += 1
        qflag |= qs[i]
    cnt_el[nseries - 1] = <uint64_t>(n - prev_start - 1)
    qflag = 1 if qflag else 0
    for i in range(nseries):
        var_size += vlen(id_el[i]) + vlen(cnt_el[i])
    for c in range(2):
        col = tab + c * n
        j = 0
        while j < nseries:
            m = <int>min(<Py_ssize_t>BLOCK, nseries - j)
            pfor_size += pfor_choose(col + j, m, &w)
            j += m
    table = 1 if pfor_size < var_size else 0
    p = put_varint(p, (<uint64_t>nseries << 2) | <uint64_t>(table << 1) | <uint64_t>qflag)
    if table:
        for c in range(2):
            col = tab + c * n
            j = 0
            while j < nseries:
                m = <int>min(<Py_ssize_t>BLOCK, nseries - j)
                pfor_choose(col + j, m, &w)
                p = pfor_write(p, col + j, m, w)
                j += m
    else:
        for i in range(nseries):
            p = put_varint(p, id_el[i])
            p = put_varint(p, cnt_el[i])
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
        nruns = 1
        for i in range(1, n):
            if qs[i] != qs[i - 1]:
                nruns += 1
        p = put_varint(p, <uint64_t>nruns)
        a = 0
        while a < n:
            b = a + 1
            while b < n and qs[b] == qs[a]:
                b += 1
            p[0] = qs[a]
            p = put_varint(p + 1, <uint64_t>(b - a))
            a = b
    return p - out


cdef inline int _column(array col, str typecode, const char *name) except -1:
    if col.ob_descr.typecode != ord(typecode):
        raise TypeError(f"encode_body: column {name.decode()} has typecode "
                        f"{chr(col.ob_descr.typecode)!r}, need {typecode!r}")
    return 0


def encode_body(array point_ids, array timestamps, array values, array quality,
                bytes prefix=b""):
    """See codec_py.encode_body. The columns are array.array of typecodes I, q, d, B."""
    cdef Py_ssize_t n = len(point_ids), i, cap, size = 0, npre = len(prefix)
    cdef int grouped = 1
    cdef uint32_t *order = NULL
    cdef uint8_t *out = NULL
    cdef uint8_t *scratch = NULL
    cdef uint32_t *jpos = NULL
    cdef uint64_t *tab = NULL
    cdef uint32_t *g_ids
    cdef int64_t *g_ts
    cdef double *g_vals
    cdef uint8_t *g_qs
    cdef const uint32_t *ids_p
    cdef const int64_t *ts_p
    cdef const double *vals_p
    cdef const uint8_t *qs_p
    cdef uint32_t r
    _column(point_ids, "I", b"point_ids")
    _column(timestamps, "q", b"timestamps")
    _column(values, "d", b"values")
    _column(quality, "B", b"quality")
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
            for i in range(1, n):
                if ids_p[i] < ids_p[i - 1]:
                    grouped = 0
                    break
            if not grouped:
                order = stable_order(ids_p, n)
                scratch = <uint8_t *>malloc(n * (4 + 8 + 8 + 1) + 8)
            out = <uint8_t *>malloc(cap)
            jpos = <uint32_t *>malloc(n * sizeof(uint32_t))
            tab = <uint64_t *>malloc(2 * n * sizeof(uint64_t))
        if (out == NULL or jpos == NULL or tab == NULL
                or (not grouped and (order == NULL or scratch == NULL))):
            raise MemoryError()
        if npre:
            memcpy(out, <const char *>prefix, npre)
        with nogil:
            if not grouped:
                g_vals = <double *>scratch
                g_ts = <int64_t *>(scratch + 8 * n)
                g_ids = <uint32_t *>(scratch + 16 * n)
                g_qs = scratch + 20 * n
                for i in range(n):
                    r = order[i]
                    g_ids[i] = ids_p[r]
                    g_ts[i] = ts_p[r]
                    g_vals[i] = vals_p[r]
                    g_qs[i] = qs_p[r]
                ids_p = g_ids
                ts_p = g_ts
                vals_p = g_vals
                qs_p = g_qs
            size = encode_all(out + npre, ids_p, ts_p, vals_p, qs_p, jpos, tab, n)
        return PyBytes_FromStringAndSize(<char *>out, npre + size)
    finally:
        free(order)
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
    cdef uint64_t nruns, run, x
    cdef Py_ssize_t i0, i, done
    cdef int m, k, err, grid, have_base, mode, dk, order2, lead = NO_LEAD, nb = 0
    cdef const uint32_t *js
    cdef uint32_t h
    cdef int64_t pred, e
    cdef double p10
    cdef uint8_t q
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
        err = read_varint(buf, pos, end, &nruns, ERR_TRUNC_QUALITY)
        if err:
            return err
        if nruns == 0 or nruns > <uint64_t>n:
            return ERR_QCOUNT
        done = 0
        while nruns:
            if pos[0] >= end:
                return ERR_TRUNC_QUALITY
            q = buf[pos[0]]
            pos[0] += 1
            err = read_varint(buf, pos, end, &run, ERR_TRUNC_QUALITY)
            if err:
                return err
            if run == 0 or run > <uint64_t>(n - done):
                return ERR_QCOUNT
            memset(qs + done, q, run)
            done += <Py_ssize_t>run
            nruns -= 1
        if done != n:
            return ERR_QCOUNT
    elif n:
        memset(qs, 0, n)
    return ERR_NONE


cdef array _IDS = array("I")
cdef array _TS = array("q")
cdef array _VALS = array("d")
cdef array _QS = array("B")


def decode_payload(const uint8_t[::1] data, Py_ssize_t start, Py_ssize_t end, modes=None):
    """See codec_py.decode_payload."""
    cdef Py_ssize_t size, pos = 0, i, o, nblocks
    cdef uint8_t *buf = NULL
    cdef uint32_t *jpos = NULL
    cdef uint8_t *mbuf = NULL
    cdef uint64_t head, nseries, delta = 0, count = 0, total = 0, pid = 0, k, j
    cdef uint64_t *tab = NULL
    cdef uint64_t nxt
    cdef int table, m
    cdef int qflag, err = ERR_NONE
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
        err = read_varint(buf, &pos, size, &head, ERR_TRUNC_TABLE)
        if err:
            raise ValueError(_ERRORS[err])
        nseries = head >> 2
        table = <int>((head >> 1) & 1)
        qflag = <int>(head & 1)
        if nseries > <uint64_t>(MAX_SERIES_PER_BYTE * size):
            raise ValueError(f"corrupt: {nseries} series in a body of {size} bytes")
        tab = <uint64_t *>malloc(2 * nseries * sizeof(uint64_t) + 16)
        if tab == NULL:
            raise MemoryError()
        if table:
            for table in range(2):
                k = <uint64_t>table * nseries
                j = 0
                while j < nseries:
                    m = <int>min(<uint64_t>BLOCK, nseries - j)
                    err = pfor_read(buf, &pos, size, m, tab + k + j, ERR_TRUNC_TABLE)
                    if err:
                        raise ValueError(_ERRORS[err])
                    j += <uint64_t>m
        else:
            for k in range(nseries):
                err = read_varint(buf, &pos, size, tab + k, ERR_TRUNC_TABLE)
                if not err:
                    err = read_varint(buf, &pos, size, tab + nseries + k, ERR_TRUNC_TABLE)
                if err:
                    raise ValueError(_ERRORS[err])
        for k in range(nseries):
            delta = tab[k]
            nxt = pid + 1 if k else 0  # the smallest id this series may have
            if delta > 0xFFFFFFFF or nxt + delta > 0xFFFFFFFF:
                raise ValueError(
                    f"corrupt: point id {<object>nxt + <object>delta} does not fit 32 bits"
                )
            pid = nxt + delta
            tab[k] = pid
            count = tab[nseries + k]
            if count >= <uint64_t>(MAX_READS_PER_BYTE * size) - total:
                raise ValueError(
                    f"corrupt: the series table claims over {total + count + 1} readings, "
                    f"more than a body of {size} bytes can hold"
                )
            count += 1
            tab[nseries + k] = count
            total += count
        if total >= 0xFFFFFFFF:
            raise ValueError(f"corrupt: {total} readings are too many for one message")
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
            i = 0
            for k in range(nseries):
                pid = tab[k]
                count = tab[nseries + k]
                for j in range(count):
                    ids_p[i] = <uint32_t>pid
                    jpos[i] = <uint32_t>j
                    i += 1
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
