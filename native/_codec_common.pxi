# Shared C helpers of the body codecs: ``include``d by _codec.pyx (version 2) and
# _codec3.pyx (version 3), never compiled on its own (setup.py builds native/_*.pyx).
# What both versions write alike lives here: zigzag, varints, LSB-first bit streams, the
# PFOR integer blocks, the stable grouping by point id, the series table and the quality
# runs (codec_py.write_series_table / write_quality_runs / read_series_table /
# read_quality_runs are the reference). Nothing here holds the GIL but the two functions
# that raise (read_series_table) and the error-message table.

from cpython.array cimport array
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
    MAX_SERIES_PER_BYTE = 64
    SLACK = 32  # zeroed bytes after a copied body, for 8-byte loads past a read

# Error codes of the shared nogil readers; each codec numbers its own from 32 on, and
# raises ValueError with the message once the GIL is back.
cdef enum:
    ERR_NONE = 0
    ERR_VARINT = 1
    ERR_WIDTH = 2
    ERR_NEXC = 3
    ERR_EXC_POS = 4
    ERR_EXC_VALUE = 5
    ERR_TRUNC_TABLE = 6
    ERR_TRUNC_QUALITY = 7
    ERR_QCOUNT = 8

_COMMON_ERRORS = {
    ERR_VARINT: "corrupt: varint over 64 bits",
    ERR_WIDTH: "corrupt: bit width > 64 in an integer block",
    ERR_NEXC: "corrupt: more exceptions than values in an integer block",
    ERR_EXC_POS: "corrupt: exception position out of order in an integer block",
    ERR_EXC_VALUE: "corrupt: exception value out of range in an integer block",
    ERR_TRUNC_TABLE: "truncated: the body ends inside the series table",
    ERR_TRUNC_QUALITY: "truncated: the body ends inside the quality runs",
    ERR_QCOUNT: "corrupt: quality runs do not add up to the count",
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


cdef inline int vlen(uint64_t v) noexcept nogil:
    """Bytes of the varint of v."""
    cdef int b = cg_bitlen(v)
    return (b + 6) // 7 if b else 1


cdef struct BitWriter:
    uint8_t *p
    uint64_t acc
    int nb


cdef inline void bw_init(BitWriter *bw, uint8_t *p) noexcept nogil:
    bw.p = p
    bw.acc = 0
    bw.nb = 0


cdef inline void bw_put(BitWriter *bw, uint64_t v, int n) noexcept nogil:
    """Appends the n (0..64) low bits of v; v must have no bits above them."""
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


# -- grouping by point id ---------------------------------------------------------------------

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


cdef inline int check_column(array col, str typecode, const char *name) except -1:
    if col.ob_descr.typecode != ord(typecode):
        raise TypeError(f"encode_body: column {name.decode()} has typecode "
                        f"{chr(col.ob_descr.typecode)!r}, need {typecode!r}")
    return 0


# -- series table and quality runs -----------------------------------------------------------

cdef uint8_t *write_series_table(uint8_t *p, const uint32_t *ids, const uint8_t *qs,
                                 uint32_t *jpos, uint64_t *tab, Py_ssize_t n,
                                 int *qflag_out) noexcept nogil:
    """The series head and table (see codec_py.write_series_table) at p; returns its end.
    Fills jpos (each row's position in its series) and qflag_out (1 when some quality is
    not 0); tab: scratch of 2n elements. Needs n * 20 + 16 bytes at p."""
    cdef Py_ssize_t i, j, nseries = 0, prev_start = 0, var_size = 0, pfor_size = 0
    cdef int qflag = 0, m, table, w, c
    cdef uint32_t jj = 0
    cdef uint64_t *id_el = tab
    cdef uint64_t *cnt_el = tab + n
    cdef uint64_t *col
    if n == 0:
        qflag_out[0] = 0
        return put_varint(p, 0)
    for i in range(n):
        if i and ids[i] == ids[i - 1]:
            jj += 1
        else:
            jj = 0
            if nseries:
                id_el[nseries] = <uint64_t>(ids[i] - ids[prev_start] - 1)
                cnt_el[nseries - 1] = <uint64_t>(i - prev_start - 1)
            else:
                id_el[0] = ids[i]
            prev_start = i
            nseries += 1
        jpos[i] = jj
        qflag |= qs[i]
    cnt_el[nseries - 1] = <uint64_t>(n - prev_start - 1)
    qflag = 1 if qflag else 0
    qflag_out[0] = qflag
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
    return p


cdef uint8_t *write_quality_runs(uint8_t *p, const uint8_t *qs, Py_ssize_t n) noexcept nogil:
    """The quality runs (see codec_py.write_quality_runs); n >= 1."""
    cdef Py_ssize_t i, a, b, nruns = 1
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
    return p


cdef int read_series_table(const uint8_t *buf, Py_ssize_t *pos, Py_ssize_t size,
                           uint64_t max_reads, uint64_t **tab_out, uint64_t *nseries_out,
                           uint64_t *total_out, int *qflag_out) except -1:
    """The series table of a body of ``size`` bytes (buf[0:size], read from pos) that can
    hold at most ``max_reads`` readings (see codec_py.read_series_table). Raises
    ValueError. *tab_out (malloc'd, the caller frees it, also after an error): the
    point ids, then the counts (both nseries long)."""
    cdef uint64_t head, nseries, delta, count, total = 0, pid = 0, k, j, nxt
    cdef uint64_t *tab
    cdef int table, c, m, err = ERR_NONE
    err = read_varint(buf, pos, size, &head, ERR_TRUNC_TABLE)
    if err:
        raise ValueError(_COMMON_ERRORS[err])
    nseries = head >> 2
    table = <int>((head >> 1) & 1)
    qflag_out[0] = <int>(head & 1)
    if nseries > <uint64_t>(MAX_SERIES_PER_BYTE * size):
        raise ValueError(f"corrupt: {nseries} series in a body of {size} bytes")
    tab = <uint64_t *>malloc(2 * nseries * sizeof(uint64_t) + 16)
    if tab == NULL:
        raise MemoryError()
    tab_out[0] = tab
    if table:
        for c in range(2):
            k = <uint64_t>c * nseries
            j = 0
            while j < nseries:
                m = <int>min(<uint64_t>BLOCK, nseries - j)
                err = pfor_read(buf, pos, size, m, tab + k + j, ERR_TRUNC_TABLE)
                if err:
                    raise ValueError(_COMMON_ERRORS[err])
                j += <uint64_t>m
    else:
        for k in range(nseries):
            err = read_varint(buf, pos, size, tab + k, ERR_TRUNC_TABLE)
            if not err:
                err = read_varint(buf, pos, size, tab + nseries + k, ERR_TRUNC_TABLE)
            if err:
                raise ValueError(_COMMON_ERRORS[err])
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
        if count >= max_reads - total:
            raise ValueError(
                f"corrupt: the series table claims over {total + count + 1} readings, "
                f"more than a body of {size} bytes can hold"
            )
        count += 1
        tab[nseries + k] = count
        total += count
    if total >= 0xFFFFFFFF:
        raise ValueError(f"corrupt: {total} readings are too many for one message")
    nseries_out[0] = nseries
    total_out[0] = total
    return 0


cdef void fill_series(const uint64_t *tab, uint64_t nseries, uint32_t *ids,
                      uint32_t *jpos) noexcept nogil:
    """Each row's point id and position in its series, from read_series_table's tab."""
    cdef uint64_t k, j, count
    cdef uint32_t pid
    cdef Py_ssize_t i = 0
    for k in range(nseries):
        pid = <uint32_t>tab[k]
        count = tab[nseries + k]
        for j in range(count):
            ids[i] = pid
            jpos[i] = <uint32_t>j
            i += 1


cdef int read_quality_runs(const uint8_t *buf, Py_ssize_t *pos, Py_ssize_t end,
                           Py_ssize_t n, uint8_t *qs) noexcept nogil:
    """The quality runs of n rows into qs (see codec_py.read_quality_runs)."""
    cdef uint64_t nruns, run
    cdef Py_ssize_t done = 0
    cdef int err
    cdef uint8_t q
    err = read_varint(buf, pos, end, &nruns, ERR_TRUNC_QUALITY)
    if err:
        return err
    if nruns == 0 or nruns > <uint64_t>n:
        return ERR_QCOUNT
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
    return ERR_NONE


cdef int group_rows(const uint32_t **ids, const int64_t **ts, const double **vals,
                    const uint8_t **qs, Py_ssize_t n, uint8_t **scratch) noexcept nogil:
    """Points the columns at the rows grouped by point id (a stable sort, as
    codec_py.encode_body's sorted()): unchanged when already grouped, else at copies in
    *scratch (malloc'd, the caller frees it). -1 when out of memory."""
    cdef Py_ssize_t i
    cdef uint32_t *order
    cdef uint8_t *buf
    cdef uint32_t *g_ids
    cdef int64_t *g_ts
    cdef double *g_vals
    cdef uint8_t *g_qs
    cdef uint32_t r
    for i in range(1, n):
        if ids[0][i] < ids[0][i - 1]:
            break
    else:
        return 0
    order = stable_order(ids[0], n)
    if order == NULL:
        return -1
    buf = <uint8_t *>malloc(n * (4 + 8 + 8 + 1) + 8)
    if buf == NULL:
        free(order)
        return -1
    scratch[0] = buf
    g_vals = <double *>buf
    g_ts = <int64_t *>(buf + 8 * n)
    g_ids = <uint32_t *>(buf + 16 * n)
    g_qs = buf + 20 * n
    for i in range(n):
        r = order[i]
        g_ids[i] = ids[0][r]
        g_ts[i] = ts[0][r]
        g_vals[i] = vals[0][r]
        g_qs[i] = qs[0][r]
    free(order)
    ids[0] = g_ids
    ts[0] = g_ts
    vals[0] = g_vals
    qs[0] = g_qs
    return 0
