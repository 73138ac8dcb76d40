# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True
"""Compiled body of a version-3 batch message; ``codec3_py.py`` is the twin and the
reference (the model and the encoder's choices are documented there, the wire format in
``native.codec``). Same signatures, byte-identical output, identical decoded columns:
the same float operations in the same order (setup.py builds with -ffp-contract=off, so
``v * p + 0.5`` rounds twice as in Python), every integer step in wrapping unsigned
64-bit arithmetic, the same cost estimates and the same tie-breaking.

Everything per row is C. The encoder models a block (cost estimates, choices,
residuals) into a list of symbols, then codes them in one loop; the range coder (C, in
one struct, forced inline) keeps its state in registers there; the probabilities are
``uint16_t`` arrays, set lazily (a model's 18 probabilities of a previous bucket at the
bucket's first use); the raw bits go through a 64-bit accumulator into a buffer; the
range-coded bytes into a buffer that grows as it fills (a decision emits one byte at
most). Where the twin's work is costly and its result is certain, the same result is
had cheaper: a decimal candidate or a grid period stops costing once it cannot win,
most exactness tests at k are settled without a division, a fraction is looked for only
where it may win, divisions by the timestamp unit of exact multiples are
multiplications by its inverse.

The decoder reads the range-coded stream from a copy with ``RC_PAD`` zeroed bytes after
it: a read past the stream's end is checked after each integer and row (at most ~80
reads later, within the zeroed bytes) and before any other error is reported, so the
error raised is the one the twin raises at that read. The work is bounded as in the
twin: the rows by the series table's check, each row's decisions by its integers' (a
bucket moves 64 steps at most).
"""

from cpython.array cimport array, clone
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.math cimport INFINITY, fabs
from libc.stdint cimport (INT64_MAX, int8_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t,
                          uint64_t)
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memset

# zigzag, varints, bit streams, PFOR integer blocks, the grouping by point id, the series
# table and the quality runs, shared with _codec.pyx
include "_codec_common.pxi"

cdef extern from *:
    """
    #include <float.h>
    #include <math.h>
    /* cg_bitlen without a branch: the bit lengths of residuals (often 0 or not at
       random) are summed in the cost estimates, where a branch is mispredicted often. */
    static inline int c3_bitlen(uint64_t v) {
    #if defined(__GNUC__) || defined(__clang__)
        return (v != 0) + 63 - __builtin_clzll(v | 1);
    #else
        return cg_bitlen(v);
    #endif
    }
    /* The float32 bits of v when v is exactly a float32, NaN payloads included (as
       codec3_py._f32_bits: the cast is only done where it is defined). */
    static inline int c3_f32_bits(double v, uint64_t bits, uint32_t *out) {
        float f;
        if (v == v && fabs(v) > (double)FLT_MAX && fabs(v) != HUGE_VAL) return 0;
        f = (float)v;
        if (cg_dbits((double)f) != bits) return 0;
        memcpy(out, &f, 4);
        return 1;
    }
    /* The double bits of the float32 with bits x. */
    static inline uint64_t c3_f32_to_f64(uint32_t x) {
        float f;
        memcpy(&f, &x, 4);
        return cg_dbits((double)f);
    }
    """
    int bitlen "c3_bitlen" (uint64_t v) nogil
    int c3_f32_bits(double v, uint64_t bits, uint32_t *out) nogil
    uint64_t c3_f32_to_f64(uint32_t x) nogil

# Same values as in codec3_py.
cdef enum:
    MAX_K = 15
    MAX_READS_PER_BYTE = 400
    MAX_READS = 1048576
    MAX_PAD = 4
    PROB_INIT = 1024
    PB_STRIDE = 18
    MANT = 1170  # 65 * PB_STRIDE
    INT_PROBS = 1235  # MANT + 65
    F_TSMODE = 0
    F_VMODE = 2
    F_KNEW = 4
    F_ORDER2 = 5
    F_ESC = 6
    F_WIDTH = 7
    F_CLASS = 8  # 4 contexts (previous class) x 3 tree nodes
    F_FRACTION = 20
    F_SEASON = 21
    N_FLAGS = 22
    MAX_DIV = 17  # the fraction form's largest divisor
    MAX_ADJ = 65536  # the fraction form's largest adjustment (ordered bits) the encoder takes
    VM_DEC = 0
    VM_ORD = 1
    RC_PAD = 128  # zeroed bytes after the decoder's copy of the range-coded stream

cdef uint64_t CANONICAL_NAN = 0x7FF8000000000000
cdef uint32_t TOP = 1 << 24
cdef double TWO53 = 9007199254740992.0
cdef int64_t TWO51 = 2251799813685248
cdef double POW10[16]
POW10[:] = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13,
            1e14, 1e15]  # exact doubles
cdef uint64_t IPOW10[16]
# the largest |skr| whose skr * 10**e is under 2**50 (exact_k)
cdef int64_t EXACT_LIM[MAX_K + 1]
# the fraction form's denominators d * 10**k (exact): FDEN[k][d - 2], for d <= NDIV[k] + 1
# (d * 10**k <= 2**53)
cdef double FDEN[MAX_K + 1][MAX_DIV - 1]
cdef int NDIV[MAX_K + 1]


cdef void _init_tables() noexcept:
    cdef int k, d
    IPOW10[0] = 1
    for k in range(1, 16):
        IPOW10[k] = IPOW10[k - 1] * 10
    for k in range(MAX_K + 1):
        EXACT_LIM[k] = ((<int64_t>1 << 50) - 1) // <int64_t>IPOW10[k]
        NDIV[k] = 0
        for d in range(2, MAX_DIV + 1):
            FDEN[k][d - 2] = <double>(d * IPOW10[k])
            if d * IPOW10[k] <= (<uint64_t>1 << 53):
                NDIV[k] += 1


_init_tables()

# error codes of the nogil decoder (the shared ones: _codec_common.pxi)
cdef enum:
    ERR_TRUNC_SEQ = 32
    ERR_TRUNC_UNIT
    ERR_TRUNC_RC
    ERR_TRUNC_RAW
    ERR_BUCKET
    ERR_F32
    ERR_DEC_RANGE
    ERR_DIGITS
    ERR_TRAILING
    ERR_FRACTION
    ERR_NUMERATOR
    ERR_FRAC_SPECIAL
    ERR_FRAC_RANGE
    ERR_SEASON

_ERRORS = {
    **_COMMON_ERRORS,
    ERR_TRUNC_SEQ: "truncated: the body ends inside the seq",
    ERR_TRUNC_UNIT: "truncated: the body ends inside the timestamp unit",
    ERR_TRUNC_RC: "truncated: the body ends inside the range-coded stream",
    ERR_TRUNC_RAW: "truncated: the body ends inside the raw bit stream",
    ERR_BUCKET: "corrupt: an integer's bit length is out of range",
    ERR_F32: "corrupt: a float32 difference over 32 bits",
    ERR_DEC_RANGE: "corrupt: decimal value out of range",
    ERR_TRAILING: "corrupt: trailing data after the raw bit stream",
    ERR_NUMERATOR: "corrupt: a fraction's numerator out of range",
    ERR_FRAC_SPECIAL: "corrupt: a fraction adjusted to a special value",
    # codec3_py raises OverflowError here (math.floor of an infinity): see decode_value_block
    ERR_FRAC_RANGE: "corrupt: a fraction adjusted out of range",
}


# -- the range coder (C) -------------------------------------------------------------------
#
# Forced inline where it runs, so that its state stays in registers: the encoder's in
# emit, the decoder's in each block's decoder (in a local copy of the struct).

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define C3_INLINE static inline __attribute__((always_inline))
    #else
    #define C3_INLINE static inline
    #endif
    /* the module's constants of the same names without C3_ (checked at import) */
    #define C3_PB_STRIDE 18
    #define C3_MANT 1170
    #define C3_INT_PROBS 1235
    #define C3_PROB_INIT 1024
    #define C3_N_FLAGS 22
    #define C3_N_MODELS 12

    /* LZMA's range encoder (codec3_py.RangeEncoder) and the raw bit stream. */
    typedef struct {
        uint64_t low;
        uint32_t rng;
        uint32_t cache;
        Py_ssize_t cache_size;
        uint8_t *out;       /* the range-coded bytes (the first, always 0, not sent) */
        Py_ssize_t n;
        Py_ssize_t cap;
        uint64_t acc;       /* raw bits not stored yet */
        int nb;
        uint8_t *rawp;      /* where acc goes (8 bytes at a time) */
        uint8_t *raw;
        Py_ssize_t raw_cap;
    } c3_enc;

    C3_INLINE void c3_shift_low(c3_enc *e) {
        uint64_t low = e->low;
        if (low < 0xFF000000u || low > 0xFFFFFFFFu) {
            uint32_t carry = (uint32_t)(low >> 32);
            e->out[e->n++] = (uint8_t)(e->cache + carry);
            while (--e->cache_size)
                e->out[e->n++] = (uint8_t)(0xFF + carry);
            e->cache = (uint32_t)((low >> 24) & 0xFF);
        }
        e->cache_size++;
        e->low = (low & 0x00FFFFFF) << 8;
    }

    /* RangeEncoder.bit, without a branch on b (a mantissa bit is a coin toss: a branch
       on it would be mispredicted half the time). */
    C3_INLINE void c3_bit(c3_enc *e, uint16_t *probs, int i, int b) {
        uint32_t p = probs[i];
        uint32_t bound = (e->rng >> 11) * p;
        uint32_t r1 = e->rng - bound;
        uint32_t mask = 0u - (uint32_t)b;
        e->low += bound & mask;
        e->rng = b ? r1 : bound;
        probs[i] = (uint16_t)(p + ((((2048 - p) >> 4) & ~mask) - ((p >> 4) & mask)));
        if (e->rng < (1u << 24)) {  /* once at most: a decision keeps >= 15/2048 of a
                                       range >= 2**24 */
            e->rng <<= 8;
            c3_shift_low(e);
        }
    }

    /* RangeEncoder.put_raw: the n (0..64) low bits of v (none above them). */
    C3_INLINE void c3_raw(c3_enc *e, uint64_t v, int n) {
        e->acc |= v << e->nb;
        e->nb += n;
        if (e->nb >= 64) {
            cg_store64(e->rawp, e->acc);
            e->rawp += 8;
            e->nb -= 64;
            e->acc = e->nb ? v >> (n - e->nb) : 0;
        }
    }

    /* Sets a model's probabilities of previous bucket pb, and the one below the top bit
       of bucket pb, when pb becomes the previous bucket for the first time (bucket 0:
       at the start of a message; a bucket is the previous one before its mantissa
       probability is used): not all 8 * 1235 for every message. */
    C3_INLINE void c3_use_row(uint16_t *probs, uint8_t *row_set, int pb) {
        if (!row_set[pb]) {
            int i;
            row_set[pb] = 1;
            for (i = 0; i < C3_PB_STRIDE; i++)
                probs[pb * C3_PB_STRIDE + i] = C3_PROB_INIT;
            probs[C3_MANT + pb] = C3_PROB_INIT;
        }
    }

    /* IntModel.put; probs, *pbp, row_set: the model's. */
    C3_INLINE void c3_put(c3_enc *e, uint16_t *probs, int *pbp, uint8_t *row_set,
                          uint64_t u) {
        int b = c3_bitlen(u), pb = *pbp, base = pb * C3_PB_STRIDE;
        if (b == pb) {
            c3_bit(e, probs, base, 0);
        } else {
            int d, lim, off, s;
            c3_bit(e, probs, base, 1);
            if (b > pb) {
                c3_bit(e, probs, base + 1, 1);
                d = b - pb; lim = 64 - pb; off = base + 2;
            } else {
                c3_bit(e, probs, base + 1, 0);
                d = pb - b; lim = pb; off = base + 10;
            }
            for (s = 1; s < d; s++)
                c3_bit(e, probs, off + (s < 8 ? s - 1 : 7), 1);
            if (d < lim)
                c3_bit(e, probs, off + (d < 8 ? d - 1 : 7), 0);
            c3_use_row(probs, row_set, b);
        }
        *pbp = b;
        if (b >= 2) {
            c3_bit(e, probs, C3_MANT + b, (int)((u >> (b - 2)) & 1));
            c3_raw(e, u & (((uint64_t)1 << (b - 2)) - 1), b - 2);
        }
    }

    /* A symbol (see Sym): an integer in model kind (< C3_N_MODELS), a decision u on flag
       arg (kind C3_N_MODELS), or the arg low bits of u, raw. probs, pb, row_set: the
       message's (State's). */
    C3_INLINE void c3_sym(c3_enc *e, uint16_t *probs, int *pb, uint8_t *row_set,
                          uint64_t u, int kind, int arg) {
        if (kind < C3_N_MODELS)
            c3_put(e, probs + C3_N_FLAGS + kind * C3_INT_PROBS, pb + kind,
                   row_set + kind * 65, u);
        else if (kind == C3_N_MODELS)
            c3_bit(e, probs, arg, (int)u);
        else
            c3_raw(e, u, arg);
    }
    """
    ctypedef struct c3_enc:
        uint64_t low
        uint32_t rng
        uint32_t cache
        Py_ssize_t cache_size
        uint8_t *out
        Py_ssize_t n
        Py_ssize_t cap
        uint64_t acc
        int nb
        uint8_t *rawp
        uint8_t *raw
        Py_ssize_t raw_cap
    void c3_shift_low(c3_enc *e) nogil
    void c3_bit(c3_enc *e, uint16_t *probs, int i, int b) nogil
    void c3_raw(c3_enc *e, uint64_t v, int n) nogil
    void c3_use_row(uint16_t *probs, uint8_t *row_set, int pb) nogil
    void c3_put(c3_enc *e, uint16_t *probs, int *pbp, uint8_t *row_set, uint64_t u) nogil
    void c3_sym(c3_enc *e, uint16_t *probs, int *pb, uint8_t *row_set, uint64_t u, int kind,
                int arg) nogil
    enum:
        C3_PB_STRIDE
        C3_MANT
        C3_INT_PROBS
        C3_PROB_INIT
        C3_N_FLAGS
        C3_N_MODELS

if ((C3_PB_STRIDE, C3_MANT, C3_INT_PROBS, C3_PROB_INIT, C3_N_FLAGS, C3_N_MODELS)
        != (PB_STRIDE, MANT, INT_PROBS, PROB_INIT, N_FLAGS, N_MODELS)):
    raise ImportError("native._codec3: the C coder's constants differ from the module's")

ctypedef c3_enc Enc


cdef extern from *:
    """
    #define C3_ERR_TRUNC_RC 34
    #define C3_ERR_TRUNC_RAW 35
    #define C3_ERR_BUCKET 36

    /* LZMA's range decoder (codec3_py.RangeDecoder) and the raw bit stream. */
    typedef struct {
        uint32_t code;
        uint32_t rng;
        const uint8_t *buf;  /* a copy of the stream, with zeroed bytes after it */
        Py_ssize_t pos;      /* bytes read */
        Py_ssize_t lim;      /* the stream's length + MAX_PAD: pos > lim means a read
                                the twin refuses (checked after each integer, row and
                                error: at most ~80 reads later) */
        const uint8_t *raw;  /* the raw bit stream (with SLACK zeroed bytes after it) */
        uint64_t raw_pos;
        uint64_t raw_end;
        int err_k;           /* details of an ERR_DIGITS, ERR_FRACTION or ERR_SEASON */
        uint64_t err_u;
    } c3_dec;

    /* err, unless the twin would already have refused a read past the stream */
    C3_INLINE int c3_rc_err(const c3_dec *d, int err) {
        return d->pos > d->lim ? C3_ERR_TRUNC_RC : err;
    }

    /* RangeDecoder.bit, without a branch on the bit (a mantissa bit is a coin toss) */
    C3_INLINE int c3_rd_bit(c3_dec *d, uint16_t *probs, int i) {
        uint32_t p = probs[i];
        uint32_t bound = (d->rng >> 11) * p;
        uint32_t b = d->code >= bound;
        uint32_t mask = 0u - b;
        uint32_t r1 = d->rng - bound;
        d->code -= bound & mask;
        d->rng = b ? r1 : bound;
        probs[i] = (uint16_t)(p + ((((2048 - p) >> 4) & ~mask) - ((p >> 4) & mask)));
        if (d->rng < (1u << 24)) {  /* once at most, as in the encoder */
            d->rng <<= 8;
            d->code = (d->code << 8) | d->buf[d->pos++];
        }
        return (int)b;
    }

    /* RangeDecoder.get_raw */
    C3_INLINE int c3_rd_raw(c3_dec *d, int n, uint64_t *out) {
        uint64_t v = 0;
        if (d->raw_pos + (uint64_t)n > d->raw_end)
            return c3_rc_err(d, C3_ERR_TRUNC_RAW);
        if (n) {
            const uint8_t *q = d->raw + (d->raw_pos >> 3);
            int sh = (int)(d->raw_pos & 7);
            v = cg_load64(q) >> sh;
            if (sh + n > 64)
                v |= cg_load64(q + 8) << (64 - sh);
            if (n < 64)
                v &= ((uint64_t)1 << n) - 1;
        }
        d->raw_pos += (uint64_t)n;
        *out = v;
        return 0;
    }

    /* IntModel.get; probs, *pbp, row_set: the model's. */
    C3_INLINE int c3_get(c3_dec *d, uint16_t *probs, int *pbp, uint8_t *row_set,
                         uint64_t *out) {
        int pb = *pbp, base = pb * C3_PB_STRIDE, b;
        if (c3_rd_bit(d, probs, base)) {
            int lim, off, up, dd = 1;
            if (c3_rd_bit(d, probs, base + 1)) {
                lim = 64 - pb; off = base + 2; up = 1;
            } else {
                lim = pb; off = base + 10; up = 0;
            }
            if (lim == 0)
                return c3_rc_err(d, C3_ERR_BUCKET);
            while (dd < lim && c3_rd_bit(d, probs, off + (dd < 8 ? dd - 1 : 7)))
                dd++;
            b = up ? pb + dd : pb - dd;
            c3_use_row(probs, row_set, b);
        } else {
            b = pb;
        }
        *pbp = b;
        if (b < 2) {
            *out = (uint64_t)b;
        } else {
            uint64_t hi = (uint64_t)(2 | c3_rd_bit(d, probs, C3_MANT + b)), lo;
            int err = c3_rd_raw(d, b - 2, &lo);
            if (err)
                return err;
            *out = (hi << (b - 2)) | lo;
        }
        return d->pos > d->lim ? C3_ERR_TRUNC_RC : 0;
    }
    """
    ctypedef struct c3_dec:
        uint32_t code
        uint32_t rng
        const uint8_t *buf
        Py_ssize_t pos
        Py_ssize_t lim
        const uint8_t *raw
        uint64_t raw_pos
        uint64_t raw_end
        int err_k
        uint64_t err_u
    int rc_err "c3_rc_err" (const c3_dec *d, int err) nogil
    int rd_bit "c3_rd_bit" (c3_dec *d, uint16_t *probs, int i) nogil
    int rd_raw "c3_rd_raw" (c3_dec *d, int n, uint64_t *out) nogil
    int c3_get(c3_dec *d, uint16_t *probs, int *pbp, uint8_t *row_set, uint64_t *out) nogil
    enum:
        C3_ERR_TRUNC_RC
        C3_ERR_TRUNC_RAW
        C3_ERR_BUCKET

if (C3_ERR_TRUNC_RC, C3_ERR_TRUNC_RAW, C3_ERR_BUCKET) != (ERR_TRUNC_RC, ERR_TRUNC_RAW, ERR_BUCKET):
    raise ImportError("native._codec3: the C decoder's error codes differ from the module's")

ctypedef c3_dec Dec


# the coder on the message's State (macros: no function of Cython's between the coder
# and its callers, whose inlining GCC could decline)
cdef extern from *:
    """
    /* a Sym */
    #define c3_code_sym(e, S, sy) c3_sym((e), (S)->probs, (S)->pb, (S)->row_set, (sy)->u, \
                                         (sy)->kind, (sy)->arg)
    /* IntModel.get in model mi */
    #define c3_im_get(d, S, mi, out) c3_get((d), (S)->probs + C3_N_FLAGS + (mi) * C3_INT_PROBS, \
                                            (S)->pb + (mi), (S)->row_set + (mi) * 65, (out))
    """
    void code_sym "c3_code_sym" (Enc *e, State *S, const Sym *sy) nogil
    int im_get "c3_im_get" (Dec *d, State *S, int mi, uint64_t *out) nogil


# -- models and coder state ------------------------------------------------------------------

# the integer models of a message, by index (codec3_py: _TsState.models, _ValState.models)
cdef enum:
    M_T0 = 0  # a series' first timestamp
    M_T1 = 1  # a series' first delta
    M_T2 = 2  # delta-of-delta
    M_TG = 3  # grid residual
    M_TP = 4  # grid parameters
    M_V = 5  # value residuals (decimal, and ordered-bits differences) of rows with j >= 1
    M_VX = 6  # extra digits
    M_VXR = 7  # class-1 residuals
    M_V0 = 8  # value residuals of rows with j == 0 (a series' first value)
    M_VXD = 9  # a fraction's divisor - 2
    M_VA = 10  # a fraction's adjustment
    M_SEASON = 11  # a block's season (zz of the change)
    N_MODELS = 12
    # every probability of a message in one array: the flags, then each model's
    N_PROBS = 14842  # N_FLAGS + N_MODELS * INT_PROBS


cdef struct TsState:
    uint64_t first  # the current series' first timestamp
    uint64_t grid_p  # the previous grid block's period
    uint64_t prev_delta  # the previous series' first delta / unit
    int mode  # the previous block's mode (0 D, 1 G)


cdef struct ValState:
    int mode  # the previous block's value mode
    int k  # the previous decimal block's k
    int cls  # the previous row's class
    int has_good  # last_good is not None
    uint64_t esc  # bits of the last escaped value
    double last_good  # the current series' last decimal (or finite) value
    int64_t season  # the last decimal block's season with one (0 before any)


cdef struct State:
    uint16_t probs[N_PROBS]
    int pb[N_MODELS]  # each model's previous bucket (bit length)
    # whether each model's probabilities of a previous bucket are set yet (c3_use_row):
    # they are set at first use, not for every message (most are never used)
    uint8_t row_set[N_MODELS * 65]
    TsState ts
    ValState val


cdef inline int model_base(int mi) noexcept nogil:
    """Index of model mi's first probability in State.probs."""
    return N_FLAGS + mi * INT_PROBS


cdef void state_init(State *s) noexcept nogil:
    cdef int i
    for i in range(N_FLAGS):
        s.probs[i] = PROB_INIT
    memset(s.row_set, 0, sizeof(s.row_set))
    for i in range(N_MODELS):
        s.pb[i] = 0
        c3_use_row(s.probs + model_base(i), s.row_set + i * 65, 0)
    s.ts.first = 0
    s.ts.grid_p = 0
    s.ts.prev_delta = 0
    s.ts.mode = 0
    s.val.mode = VM_DEC
    s.val.k = 0
    s.val.cls = 0
    s.val.has_good = 0
    s.val.esc = CANONICAL_NAN
    s.val.last_good = 0.0
    s.val.season = 0


# -- division by the timestamp unit ----------------------------------------------------------

cdef struct UnitDiv:
    uint64_t unit  # 1 .. 2**63
    int shift  # trailing zero bits of the unit
    uint64_t low  # mask of those bits
    uint64_t inv  # inverse of the unit's odd part mod 2**64
    int64_t qmin, qmax  # quotients of exact multiples lie in [qmin, qmax]


cdef void unit_init(UnitDiv *u, uint64_t unit) noexcept nogil:
    cdef uint64_t d, x, lim
    cdef int i
    u.unit = unit
    u.shift = cg_ctz(unit)
    u.low = (<uint64_t>1 << u.shift) - 1
    d = unit >> u.shift
    x = d  # correct to 3 bits (d * d == 1 mod 8); each Newton step doubles that
    for i in range(6):
        x *= 2 - d * x
    u.inv = x
    lim = <uint64_t>1 << (63 - u.shift)
    u.qmax = <int64_t>((lim - 1) // d)
    u.qmin = <int64_t>(<uint64_t>0 - lim // d)  # -2**63 for the unit 1: no overflow


cdef inline int64_t exact_div(const UnitDiv *u, uint64_t x) noexcept nogil:
    """x (a signed 64-bit multiple of the unit) / the unit: Python's // on an exact
    multiple, by the odd part's inverse (no division instruction)."""
    return <int64_t>(<uint64_t>(<int64_t>x >> u.shift) * u.inv)


cdef int64_t floor_div_slow(const UnitDiv *u, int64_t x) noexcept nogil:
    cdef int64_t q, r
    if u.unit >> 63:
        return -1 if x < 0 else 0
    q = x // <int64_t>u.unit  # truncating (cdivision), divisor >= 1: never undefined
    r = x % <int64_t>u.unit
    if r < 0:
        q -= 1
    return q


cdef inline int64_t floor_div(const UnitDiv *u, uint64_t x) noexcept nogil:
    """Python's ``_s64(x) // unit``; fast when x is an exact multiple (valid streams)."""
    cdef int64_t q
    if (x & u.low) == 0:
        q = <int64_t>(<uint64_t>(<int64_t>x >> u.shift) * u.inv)
        if u.qmin <= q <= u.qmax:
            return q
    return floor_div_slow(u, <int64_t>x)


cdef inline uint64_t gcd64(uint64_t a, uint64_t b) noexcept nogil:
    cdef int shift
    cdef uint64_t t
    if a == 0:
        return b
    if b == 0:
        return a
    shift = cg_ctz(a | b)
    a >>= cg_ctz(a)
    while True:
        b >>= cg_ctz(b)
        if a > b:
            t = a
            a = b
            b = t
        b -= a
        if b == 0:
            break
    return a << shift


cdef uint64_t ts_unit(const int64_t *ts, const uint32_t *jpos, Py_ssize_t n) noexcept nogil:
    """codec3_py._ts_unit: the gcd of every delta within a series (1 if none is nonzero)."""
    cdef uint64_t g = 0, d
    cdef Py_ssize_t i
    for i in range(1, n):
        if jpos[i]:
            d = <uint64_t>ts[i] - <uint64_t>ts[i - 1]
            if d >> 63:
                d = <uint64_t>0 - d
            if d != g:
                g = gcd64(g, d)
                if g == 1:
                    return 1
    return g if g else 1


# -- values: helpers -------------------------------------------------------------------------

cdef inline int64_t ifloor(double y) noexcept nogil:
    """floor(y) for |y| < 2**53 (the callers check it, or know it), as an integer: libm's
    floor() is a call on baseline x86-64 (no rounding instruction before SSE4.1)."""
    cdef int64_t i = <int64_t>y  # truncates toward 0, exactly below 2**63
    return i - (<double>i > y)


cdef double MAGIC = 6755399441055744.0  # 1.5 * 2**52
cdef double TWO51_F = 2251799813685248.0  # 2**51
cdef double TWO_M50 = 8.881784197001252e-16  # 2**-50


cdef inline int exact_at(double v, uint64_t bits, int k, int64_t *s_out) noexcept nogil:
    """codec3_py._exact: 1 and s when v is exactly s / 10**k, else 0. Most k are ruled out
    without a division: if s / p rounds to v then t = fl(v * p) = s * (1+e1) * (1+e2)
    with |e| <= 2**-53, so the integer m nearest to t has |t - m| <= |t - s| < |t| * 2**-50
    (and t - m is exact: Sterbenz's lemma); (t + MAGIC) - MAGIC is that m while
    |t| < 2**51."""
    cdef double p = POW10[k]
    cdef double t = v * p
    cdef double a = fabs(t)
    cdef double y
    cdef int64_t si
    if a < TWO51_F and fabs(t - ((t + MAGIC) - MAGIC)) > a * TWO_M50:
        return 0
    y = t + 0.5
    if not (fabs(y) < TWO53):  # also NaN and +-inf
        return 0
    si = ifloor(y)
    if cg_dbits(<double>si / p) != bits:  # also -0.0, which comes back as +0.0
        return 0
    s_out[0] = si
    return 1


cdef inline int dec_k(double v, uint64_t bits, int64_t *s_out) noexcept nogil:
    """codec3_py._dec_k, and s at that k."""
    cdef int k
    for k in range(MAX_K + 1):
        if exact_at(v, bits, k, s_out):
            return k
    return MAX_K + 1


cdef inline int dec_k_near(double v, uint64_t bits, int k0, int64_t *s_out) noexcept nogil:
    """dec_k, starting from a guess k0 (the previous value's): values of a series mostly
    share their decimals. If v is exactly s0 / 10**k0 with |s0| <= 2**51, two decimals
    that both round to v differ by at most ulp(v) <= |s0| * 2**-52 / 10**k0 < 10**-k0, so
    v is exact at a k < k0 only if s0 ends in k0 - k decimal zeros. With z such zeros
    (s0 = x * 10**z), v is exact at k0 - z with s = x (dec_costs: |x| < 2**50, and v is
    the double nearest x / 10**(k0 - z), the same number as s0 / 10**k0)."""
    cdef int64_t s0, x
    cdef int z = 0
    if k0 > MAX_K or not exact_at(v, bits, k0, &s0) or not (-TWO51 <= s0 <= TWO51):
        return dec_k(v, bits, s_out)
    x = s0
    if x == 0:
        z = k0
    else:
        while z < k0 and x % 10 == 0:
            x //= 10
            z += 1
    s_out[0] = x
    return k0 - z


cdef inline int exact_k(double v, uint64_t bits, int kr, int64_t skr, int k,
                        int64_t *s_out) noexcept nogil:
    """exact_at at k of a value whose fewest decimals are kr (s = skr there): not below
    kr; above it, mostly without a division: exact with s = skr * 10**(k - kr) when
    |s| < 2**50 (v is the double nearest s / 10**k, the same number as skr / 10**kr, so
    t = fl(v * 10**k) is within |s| * 2**-52 < 1/4 of s and fl(t + 0.5) within 1/16 of
    t + 0.5: its floor is s)."""
    cdef int e = k - kr
    if e == 0:
        s_out[0] = skr
        return 1
    if e < 0:
        return 0
    if -EXACT_LIM[e] <= skr <= EXACT_LIM[e]:
        s_out[0] = skr * <int64_t>IPOW10[e]
        return 1
    return exact_at(v, bits, k, s_out)


cdef inline int64_t scale(double v, int k) noexcept nogil:
    """codec3_py._scale."""
    cdef double y = v * POW10[k] + 0.5
    if fabs(y) < TWO53:
        return ifloor(y)
    return 0


cdef inline uint32_t f32_pred(uint64_t prev) noexcept nogil:
    cdef uint32_t x
    if c3_f32_bits(cg_bitsd(prev), prev, &x):
        return x
    return 0


cdef inline uint64_t ord64(uint64_t b) noexcept nogil:
    return b ^ <uint64_t>0xFFFFFFFFFFFFFFFF if b >> 63 else b | (<uint64_t>1 << 63)


cdef inline uint64_t unord64(uint64_t o) noexcept nogil:
    return o & ((<uint64_t>1 << 63) - 1) if o >> 63 else o ^ <uint64_t>0xFFFFFFFFFFFFFFFF


cdef inline uint32_t ord32(uint32_t b) noexcept nogil:
    return b ^ <uint32_t>0xFFFFFFFF if b >> 31 else b | (<uint32_t>1 << 31)


cdef inline uint32_t unord32(uint32_t o) noexcept nogil:
    return o & ((<uint32_t>1 << 31) - 1) if o >> 31 else o ^ <uint32_t>0xFFFFFFFF


cdef inline uint32_t zz32(uint32_t x) noexcept nogil:
    return (x << 1) ^ (<uint32_t>0 - (x >> 31))


cdef inline uint32_t unzz32(uint32_t u) noexcept nogil:
    return (u >> 1) ^ (<uint32_t>0 - (u & 1))


cdef inline void track_finite(ValState *st, uint32_t j, double v) noexcept nogil:
    """codec3_py._track_finite."""
    if j == 0:
        st.has_good = 0
    if v == v and fabs(v) != INFINITY:
        st.last_good = v
        st.has_good = 1


# -- encoder ---------------------------------------------------------------------------------
#
# The modelling of a block (cost estimates, choices, residuals) appends symbols to a
# list: an integer in a model, a flag decision, raw bits; then ``emit`` codes them.

cdef enum:
    SYM_FLAG = N_MODELS  # symbol kinds 0 .. N_MODELS - 1: an integer in that model
    SYM_RAW = N_MODELS + 1
    # symbols of a block: 1 + 2 + 128 (timestamps), 7 + 128 * 6 (values)
    MAX_SYMS = 906
    EMIT_RUN = 128  # symbols coded between two checks of the output's room


cdef struct Sym:
    uint64_t u  # the integer, the flag's bit, or the raw bits
    int32_t kind
    int32_t arg  # the flag's probability index, or the number of raw bits


cdef int enc_reserve(Enc *e, Py_ssize_t nsym, Py_ssize_t ndec) noexcept nogil:
    """Room for the raw bits of nsym symbols, and for ndec decisions and the final flush;
    -1 when out of memory. Every byte pending in the cache may go out, one more a
    decision."""
    cdef Py_ssize_t need = e.n + e.cache_size + ndec + 16, used = e.rawp - e.raw, cap
    cdef uint8_t *p
    if need > e.cap:
        cap = 2 * e.cap if 2 * e.cap > need else need
        p = <uint8_t *>realloc(e.out, cap)
        if p == NULL:
            return -1
        e.out = p
        e.cap = cap
    need = used + 8 * nsym + 16
    if need > e.raw_cap:
        cap = 2 * e.raw_cap if 2 * e.raw_cap > need else need
        p = <uint8_t *>realloc(e.raw, cap)
        if p == NULL:
            return -1
        e.raw = p
        e.raw_cap = cap
        e.rawp = p + used
    return 0


cdef void emit_run(Enc *e, State *S, const Sym *syms, int ns) noexcept nogil:
    """Codes symbols (the coder's state in a local copy: registers)."""
    cdef Enc c = e[0]
    cdef int i
    for i in range(ns):
        code_sym(&c, S, &syms[i])
    e[0] = c


cdef int emit(Enc *e, State *S, const Sym *syms, int ns) noexcept nogil:
    """Codes a block's symbols; -1 when out of memory. The room for the range-coded bytes
    is made for EMIT_RUN symbols at a time (66 decisions each at most): the buffer grows
    with the stream, not by a block's worst case (the encoder's memory stays small, under
    the heap's trim threshold: else every message may cost the heap a shrink and a
    growth, page faults included)."""
    cdef int i0 = 0, m
    while i0 < ns:
        m = min(ns - i0, <int>EMIT_RUN)
        if enc_reserve(e, 0, 66 * m):
            return -1
        emit_run(e, S, syms + i0, m)
        i0 += m
    return 0


cdef Py_ssize_t rc_finish(Enc *e) noexcept nogil:
    """codec3_py.RangeEncoder.finish: the number of bytes of e.out to send, from e.out + 1;
    the raw stream's last bits are stored."""
    cdef int nbytes, i
    cdef uint64_t mask, v
    cdef Py_ssize_t cut = 0
    for nbytes in range(4, 0, -1):
        mask = (<uint64_t>1 << (8 * nbytes)) - 1
        v = (e.low + mask) & ~mask
        if v < e.low + e.rng:
            e.low = v
            break
    for i in range(5):
        c3_shift_low(e)
    while cut < MAX_PAD and e.n - cut > 1 and e.out[e.n - 1 - cut] == 0:
        cut += 1
    cg_store64(e.rawp, e.acc)
    e.rawp += (e.nb + 7) >> 3
    return e.n - cut - 1


cdef inline int sym(Sym *syms, int ns, int kind, int arg, uint64_t u) noexcept nogil:
    """Appends a symbol; returns the new count."""
    syms[ns].u = u
    syms[ns].kind = kind
    syms[ns].arg = arg
    return ns + 1


cdef int model_ts_block(Sym *syms, int ns, const int64_t *tsb, const uint32_t *js, int m,
                        const UnitDiv *ud, TsState *st) noexcept nogil:
    """codec3_py._encode_ts_block, as symbols appended at syms[ns]; returns their count.
    tsb: the block's first timestamp (rows before it are read where a series continues).
    The rows' symbols are written in D mode while D's cost is summed, and rewritten if a
    grid wins; the mode flag and the grid's two parameters go before them (slots kept
    for them hold no-op symbols, raw bits of length 0, in D mode)."""
    cdef int64_t du[BLOCK + 1]  # du[k + 1]: row k's delta / unit (rows with j >= 1)
    cdef const uint64_t *t = <const uint64_t *>tsb
    cdef int k, f = -1, last, c, ncand, grid = 0, best, cost, rows
    cdef uint32_t j
    cdef uint64_t d, a, q, p_est, P, base, bpred, gp = 0, gbase = 0, gbpred = 0
    cdef uint64_t first = st.first, prev_delta = st.prev_delta
    cdef uint64_t cand[2]
    cdef int64_t g, gmin
    for k in range(m):
        if js[k]:
            f = k
            break
    if f < 0:  # every row starts a series
        for k in range(m):
            ns = sym(syms, ns, M_T0, 0, zz(t[k] - first))
            first = t[k]
        st.first = first
        return ns
    if js[f] >= 2:  # f == 0, continuing a series
        du[0] = exact_div(ud, (t - 1)[0] - (t - 2)[0])
    rows = ns + 3
    # in one pass: the rows' symbols in D mode; each delta / unit; D's cost (bit lengths;
    # a row with j == 1 against the running prev_delta, as in the twin); the end of the
    # first run of one series (last)
    best = 0
    last = -1
    for k in range(m):
        j = js[k]
        if j == 0:
            sym(syms, rows + k, M_T0, 0, zz(t[k] - first))
            first = t[k]
        else:
            du[k + 1] = exact_div(ud, t[k] - t[k - 1])
            if j >= 2:
                d = zz(<uint64_t>du[k + 1] - <uint64_t>du[k])
                best += bitlen(d)
                sym(syms, rows + k, M_T2, 0, d)
            else:
                d = zz(<uint64_t>du[k + 1] - prev_delta)
                best += bitlen(d)
                sym(syms, rows + k, M_T1, 0, d)
                prev_delta = <uint64_t>du[k + 1]
        if last < 0 and k > f and j != js[k - 1] + 1:
            last = k - 1
    if last < 0:
        last = m - 1
    if last > f:
        d = t[last] - t[f]
        a = (<uint64_t>0 - d) if d >> 63 else d
        q = (a + <uint64_t>((last - f) // 2)) // <uint64_t>(last - f)
        p_est = (<uint64_t>0 - q) if d >> 63 else q
    else:
        p_est = t[f] - t[f - 1]
    cand[0] = p_est
    ncand = 1
    if st.grid_p != 0 and st.grid_p != p_est:
        cand[1] = st.grid_p
        ncand = 2
    for c in range(ncand):
        P = cand[c]
        # the costs only add up: a candidate stops where it reaches the best
        cost = bitlen(zz(P - st.grid_p))
        if cost >= best:
            continue
        gmin = INT64_MAX  # the grid base: the least t - k * P of the rows with j >= 1
        for k in range(f, m):
            g = <int64_t>(t[k] - <uint64_t>k * P) if js[k] else INT64_MAX
            gmin = g if g < gmin else gmin
        base = <uint64_t>gmin
        bpred = t[f - 1] + <uint64_t>(<int64_t>(1 - f)) * P
        cost += bitlen(zz(base - bpred))
        for k in range(f, m):
            if js[k]:
                cost += bitlen(t[k] - <uint64_t>k * P - base)
                if cost >= best:
                    break
        if cost < best:
            best = cost
            grid = 1
            gp = P
            gbase = base
            gbpred = bpred
    sym(syms, ns, SYM_FLAG, F_TSMODE + st.mode, <uint64_t>grid)
    st.mode = grid
    if grid:
        sym(syms, ns + 1, M_TP, 0, zz(gp - st.grid_p))
        sym(syms, ns + 2, M_TP, 0, zz(gbase - gbpred))
        st.grid_p = gp
        for k in range(f, m):
            if js[k]:
                sym(syms, rows + k, M_TG, 0, t[k] - <uint64_t>k * gp - gbase)
    else:
        sym(syms, ns + 1, SYM_RAW, 0, 0)
        sym(syms, ns + 2, SYM_RAW, 0, 0)
    st.first = first
    st.prev_delta = prev_delta
    return rows + m


cdef struct VScratch:
    int8_t kr[BLOCK]  # each value's fewest exact decimals (MAX_K + 1: none)
    int64_t skr[BLOCK]  # its scaled integer at kr
    uint32_t f32[BLOCK]  # its float32 bits (while the block is all float32)
    int64_t s[BLOCK]  # each row's scaled integer at a candidate k (dec_class0's seasons)
    int64_t sea[BLOCK]  # the seasonal term of each row at a candidate k (season_terms)
    uint8_t cls[BLOCK]  # the rows of a decimal candidate (dec_costs): class;
    # by pass (first differences, second, first plus the seasonal term): class 0 the zz
    # residual, class 1 b; class 1 the form (-1 more decimals, else the divisor) and c
    uint64_t u[3][BLOCK]
    int8_t form[3][BLOCK]
    uint64_t adj[3][BLOCK]
    uint64_t ords[BLOCK]  # ordered-bits differences
    Sym syms[MAX_SYMS]  # a block's symbols


cdef int64_t DAY_MS = 86400000


cdef inline int period(int64_t delta) noexcept nogil:
    """codec3_py._period."""
    if 28 * DAY_MS <= delta <= 31 * DAY_MS:
        return 12
    if delta == DAY_MS:
        return 7
    if 0 < delta < DAY_MS and DAY_MS % delta == 0 and DAY_MS // delta <= 1440:
        return <int>(DAY_MS // delta)
    return 0


cdef inline int finite_bits(uint64_t b) noexcept nogil:
    return (b & <uint64_t>0x7FF0000000000000) != <uint64_t>0x7FF0000000000000


cdef void season_terms(const double *v, const uint64_t *bits, const uint32_t *js, int m,
                       int season, int k, int64_t *sea) noexcept nogil:
    """codec3_py._seasonal at k of each row with j > season, 0 for the others (v, bits:
    the block's first row; the rows before it are read where a series continues). Each
    value is scaled once: a row's earlier lookback is the previous row's later one."""
    cdef int idx, i, pi = -0x40000000, af, bf, paf = 0
    cdef int64_t a, b, pa = 0
    for idx in range(m):
        if js[idx] > <uint32_t>season:
            i = idx - season
            if i - 1 == pi:
                b = pa
                bf = paf
            else:
                bf = finite_bits(bits[i - 1])
                b = scale(v[i - 1], k)
            af = finite_bits(bits[i])
            a = scale(v[i], k)
            pa = a
            paf = af
            pi = i
            sea[idx] = a - b if af and bf else 0
        else:
            sea[idx] = 0


cdef struct Frac:
    int n  # the fractions that pass, by divisor ascending:
    int d[MAX_DIV - 1]  # the divisor,
    uint64_t num[MAX_DIV - 1]  # N (signed),
    uint64_t a[MAX_DIV - 1]  # the zz adjustment,
    int c[MAX_DIV - 1]  # the cost but N's: bl(a) + 10


cdef double TWO_M30 = 9.313225746154785e-10  # 2**-30
cdef uint64_t TWO53_U = 9007199254740992


cdef int frac_need(double x, int64_t pred, uint64_t mu) noexcept nogil:
    """The largest divisor whose fraction may cost less than more decimals (b = mu) at a
    prediction, for a value v with x = fl(v * 10**k): 1 if none. A fraction d's N is
    floor(fl(fl(v * den) + 0.5)) with |v * den| < 2**53: within 1/2 + |v * den| * 2**-51
    of d * X (X = v * 10**k), so |N - pred * d| >= d * E - 1/2 with E below
    |X - pred| - |X| * 2**-51 (x is within |x| * 2**-53 of X; |x - pred| rounds by a
    relative 2**-53 and pred is exact below 2**53). The fraction costs 10 +
    bl(zz(N - pred * d)) + bl(c) or more: to beat mc = bl(mu) + 8 it needs
    zz(N - pred * d) < 2**(mc - 11), so |N - pred * d| <= 2**(mc - 12) (0 when mc = 11),
    and d <= (2**(mc - 12) + 1/2) / E (with a margin for the rounding of this test: E is
    smaller by a relative 2**-50, the bound larger by 1/2)."""
    cdef int mc = bitlen(mu) + 8
    cdef double e, bound
    if mc <= 10:
        return 1
    if not (-TWO53 < <double>pred < TWO53):
        return MAX_DIV
    e = fabs(x - <double>pred) * (1.0 - TWO_M50) - fabs(x) * TWO_M50 * 2.0
    bound = cg_bitsd(<uint64_t>(1023 + mc - 12) << 52) + 1.0  # 2**(mc - 12) + 1
    if not (e * MAX_DIV > bound):  # (also x NaN: no fraction then)
        return MAX_DIV
    if e * 2.0 > bound:
        return 1
    return <int>(bound / e)


cdef void frac_forms(double v, uint64_t bits, int k, int dmax, Frac *fr) noexcept nogil:
    """The fractions of codec3_py._near for v at k that pass (adjustment < 2**16), with a
    divisor up to dmax: they do not depend on the prediction. A first loop (no branch but
    its end) marks the divisors whose division may pass: when |t| >= 1 (t = fl(v * den);
    n = the integer nearest), |t - n| > |t| * 2**-30 (exact: Sterbenz) puts v and n / den
    more than 2**-31 |v| apart, over 2**20 doubles (both normal, of one sign, within a
    factor 2); the divisions are done for the marked ones alone, but for a multiple q * d
    of a marked d with q * N: the same fraction, the same adjustment, a residual q times
    larger (it never costs less, and ties go to the smaller divisor)."""
    cdef int i, j, nd = min(NDIV[k], dmax - 1)
    cdef uint32_t marked = 0
    cdef uint64_t o, adj
    cdef double t, y
    cdef int64_t n
    cdef int64_t num[MAX_DIV - 1]
    cdef const double *fden = FDEN[k]
    fr.n = 0
    if not (fabs(v) < INFINITY):  # NaN, +-inf
        return
    for i in range(nd):
        t = v * fden[i]
        y = t + 0.5
        if not (fabs(y) < TWO53):  # (and for every larger divisor)
            nd = i
            break
        n = ifloor(y)
        num[i] = n
        marked |= <uint32_t>((fabs(t) < 1.0) | (fabs(t - <double>n) <= fabs(t) * TWO_M30)) << i
    o = ord64(bits)
    while marked:
        i = cg_ctz(marked)
        marked &= marked - 1
        j = 2 * i + 2  # the multiples (i + 2) * q of the divisor i + 2
        while j < nd:
            if num[j] == num[i] * ((j + 2) // (i + 2)):
                marked &= ~(<uint32_t>1 << j)
            j += i + 2
        adj = o - ord64(cg_dbits(<double>num[i] / fden[i]))
        if adj + <uint64_t>(MAX_ADJ - 1) < <uint64_t>(2 * MAX_ADJ - 1):  # |adj| < 2**16
            fr.d[fr.n] = i + 2
            fr.num[fr.n] = <uint64_t>num[i]
            fr.a[fr.n] = zz(adj)
            fr.c[fr.n] = bitlen(fr.a[fr.n]) + 10
            fr.n += 1


cdef inline int near_pass(const Frac *fr, int md, uint64_t mu, int64_t pred, int8_t *form,
                          uint64_t *b_out, uint64_t *c_out) noexcept nogil:
    """codec3_py._near's cheapest form at a prediction: its cost; form (-1 more decimals,
    else the divisor), b and c. md: more decimals are possible (mu: their b); fr: the
    fractions that pass (frac_forms), or none where none can win (cost >= 10)."""
    cdef int best = 0x7FFFFFFF, i, c
    cdef uint64_t u
    if md:
        best = bitlen(mu) + 8
        form[0] = -1
        b_out[0] = mu
        c_out[0] = 0
    for i in range(fr.n):
        if fr.c[i] < best:
            u = zz(fr.num[i] - <uint64_t>pred * <uint64_t>fr.d[i])
            c = bitlen(u) + fr.c[i]
            if c < best:
                best = c
                form[0] = <int8_t>fr.d[i]
                b_out[0] = u
                c_out[0] = fr.a[i]
    return best


cdef void dec_costs_any(const double *v, const uint64_t *bits, const uint32_t *js, int m,
                        VScratch *w, int k, int npass, const ValState *st, int64_t pred0,
                        int limit, int *costs, int *escapes_out) noexcept nogil:
    """codec3_py._dec_rows at k with npass predictions in one pass (the rows' classes do
    not depend on the prediction): first differences (costs[0]), second differences
    (costs[1], npass >= 2), first differences plus w.sea (costs[2], npass == 3, without
    the season's 8 bits). The rows go to w.cls and, by pass, w.u, w.form, w.adj. A pass
    stops costing where its cost reaches its limit (limit; limit - 8 for the seasonal
    one): it cannot win, its later rows are not set; the loop stops when every pass has.
    pred0: _scale(st.last_good, k), the prediction of every row with h == 0 while the
    block's first series continues without a decimal row yet (afterwards h > 0 until a
    series starts, which clears last_good)."""
    cdef int idx, c1 = 0, c2 = 0, c3 = 0, h = 0, lg = st.has_good, escapes = 0, kr, ok, md
    cdef int dmax
    cdef double x
    cdef int l1 = limit, l2 = -1, l3 = -1, seas = npass == 3
    cdef uint32_t j
    cdef int64_t s1 = 0, s2 = 0, s = 0, p1, p2, p3
    cdef uint64_t esc = st.esc, u1, u2, u3, mul, m1 = 0, m2 = 0, m3 = 0
    cdef Frac fr
    if npass >= 2:
        l2 = limit
    if seas:
        l3 = limit - 8
    for idx in range(m):
        kr = w.kr[idx]
        ok = exact_k(v[idx], bits[idx], kr, w.skr[idx], k, &s)
        j = js[idx]
        if j == 0 or idx == 0:
            h = 0
            if j == 0:
                lg = 0
        if h == 0:
            p1 = pred0 if lg else 0
            p2 = p1
        else:
            p1 = s1
            p2 = s1 if h == 1 else 2 * s1 - s2
        p3 = p1 + w.sea[idx] if seas else p1
        if ok:  # class 0: the residual at k
            w.cls[idx] = 0
            u1 = zz(<uint64_t>(s - p1))
            u2 = zz(<uint64_t>(s - p2))
            u3 = zz(<uint64_t>(s - p3))
            w.u[0][idx] = u1
            w.u[1][idx] = u2
            w.u[2][idx] = u3
            c1 += bitlen(u1) + 1
            c2 += bitlen(u2) + 1
            c3 += bitlen(u3) + 1
        elif bits[idx] == esc:  # class 2: the last escaped value
            w.cls[idx] = 2
            c1 += 3
            c2 += 3
            c3 += 3
            escapes = 1
            if c1 >= l1 and c2 >= l2 and c3 >= l3:
                break
            continue
        else:
            # class 1 (codec3_py._near: more decimals, or a fraction) or 3 (raw bits);
            # the fractions are looked for up to the largest divisor that may win
            md = k < kr <= MAX_K
            dmax = MAX_DIV
            if md:
                mul = IPOW10[kr - k]
                m1 = zz(<uint64_t>w.skr[idx] - <uint64_t>p1 * mul)
                m2 = zz(<uint64_t>w.skr[idx] - <uint64_t>p2 * mul)
                m3 = zz(<uint64_t>w.skr[idx] - <uint64_t>p3 * mul)
                x = v[idx] * POW10[k]
                dmax = frac_need(x, p1, m1) if c1 < l1 else 1
                if c2 < l2:
                    dmax = max(dmax, frac_need(x, p2, m2))
                if c3 < l3:
                    dmax = max(dmax, frac_need(x, p3, m3))
            fr.n = 0
            if dmax >= 2:
                frac_forms(v[idx], bits[idx], k, dmax, &fr)
            escapes = 1
            esc = bits[idx]
            if not md and fr.n == 0:  # class 3: raw bits
                w.cls[idx] = 3
                c1 += 66
                c2 += 66
                c3 += 66
                if c1 >= l1 and c2 >= l2 and c3 >= l3:
                    break
                continue
            w.cls[idx] = 1
            if c1 < l1:
                c1 += near_pass(&fr, md, m1, p1, &w.form[0][idx], &w.u[0][idx],
                                &w.adj[0][idx])
            if c2 < l2:
                c2 += near_pass(&fr, md, m2, p2, &w.form[1][idx], &w.u[1][idx],
                                &w.adj[1][idx])
            if c3 < l3:
                c3 += near_pass(&fr, md, m3, p3, &w.form[2][idx], &w.u[2][idx],
                                &w.adj[2][idx])
            s = ifloor(v[idx] * POW10[k] + 0.5)
        if c1 >= l1 and c2 >= l2 and c3 >= l3:
            break
        s2 = s1
        s1 = s
        h += 1
    else:
        if escapes:
            c1 += (m + 3) // 4
            c2 += (m + 3) // 4
            c3 += (m + 3) // 4
    costs[0] = c1
    costs[1] = c2
    costs[2] = c3
    escapes_out[0] = escapes


ctypedef fused season_t:
    uint8_t  # no seasonal pass (0)
    uint16_t  # the season (2 .. 1440)


cdef int dec_class0(const double *v, const uint64_t *bits, const uint32_t *js, int m,
                    VScratch *w, int k, int npass, season_t season, int64_t p0, int limit,
                    int *costs) noexcept nogil:
    """dec_costs for a block whose rows are all of class 0 at k; -1 at the first row of
    another class. Its passes are costed in one loop (h is the rows since the series' or
    the block's start; the seasonal term of a row is the difference of two rows' s when
    both are in the block), compiled apart without the seasonal pass and with it: fewer
    variables are live."""
    cdef int idx, c1 = 0, c2 = 0, c3 = 0, l2 = limit if npass >= 2 else -1, l3 = -1
    cdef uint32_t j
    cdef int64_t sv, p1, p2, p3, s1 = 0, s2 = 0
    cdef uint64_t u1, u2, u3
    cdef int64_t *s = w.s
    if season_t is uint16_t:
        l3 = limit - 8
        # the seasonal terms that read rows before the block (or its first row)
        season_terms(v, bits, js, min(m, season + 1), season, k, w.sea)
    for idx in range(m):
        if not exact_k(v[idx], bits[idx], w.kr[idx], w.skr[idx], k, &sv):
            return -1
        j = js[idx]
        if j == 0:
            p1 = p2 = 0
        elif idx == 0:
            p1 = p2 = p0
        else:
            p1 = p2 = s1
            if j >= 2 and idx >= 2:
                p2 = 2 * s1 - s2
        u1 = zz(<uint64_t>(sv - p1))
        u2 = zz(<uint64_t>(sv - p2))
        w.u[0][idx] = u1
        w.u[1][idx] = u2
        c1 += bitlen(u1) + 1
        c2 += bitlen(u2) + 1
        if season_t is uint16_t:
            s[idx] = sv
            p3 = p1
            if j > season:
                p3 += (s[idx - season] - s[idx - season - 1]) if idx > season else w.sea[idx]
            u3 = zz(<uint64_t>(sv - p3))
            w.u[2][idx] = u3
            c3 += bitlen(u3) + 1
            if c1 >= limit and c2 >= l2 and c3 >= l3:
                break
        else:
            if c1 >= limit and c2 >= l2:
                break
        s2 = s1
        s1 = sv
    costs[0] = c1
    costs[1] = c2
    costs[2] = c3
    return 0


cdef void dec_costs(const double *v, const uint64_t *bits, const uint32_t *js, int m,
                    VScratch *w, int k, int npass, int season, const ValState *st,
                    int64_t pred0, int limit, int *costs, int *escapes_out) noexcept nogil:
    """dec_costs_any's results (w.sea set when npass == 3), by dec_class0 where it can."""
    cdef int r
    cdef int64_t p0 = pred0 if st.has_good else 0
    if npass == 3:
        r = dec_class0(v, bits, js, m, w, k, npass, <uint16_t>season, p0, limit, costs)
    else:
        r = dec_class0(v, bits, js, m, w, k, npass, <uint8_t>0, p0, limit, costs)
    if r == 0:
        escapes_out[0] = 0
        return
    if npass == 3:
        season_terms(v, bits, js, m, season, k, w.sea)
    dec_costs_any(v, bits, js, m, w, k, npass, st, pred0, limit, costs, escapes_out)


cdef int dec_emit(Sym *syms, int ns, const double *v, const uint64_t *bits,
                  const uint32_t *js, int m, VScratch *w, int k, int p,
                  int escapes, ValState *st) noexcept nogil:
    """The rows of pass p of the chosen decimal block (dec_costs') as symbols, updating
    the value state (codec3_py._encode_value_block's loop over the rows)."""
    cdef int idx, cls, f, prev_cls = st.cls, has_good = st.has_good
    cdef uint64_t esc = st.esc
    cdef double last_good = st.last_good
    cdef const uint64_t *u = w.u[p]
    cdef const int8_t *form = w.form[p]
    cdef const uint64_t *adj = w.adj[p]
    if not escapes:  # every row of class 0 (m >= 1: the last is the series' last_good)
        for idx in range(m):
            ns = sym(syms, ns, M_V + (M_V0 - M_V) * (js[idx] == 0), 0, u[idx])
        last_good = v[m - 1]
        has_good = 1
    else:
        for idx in range(m):
            if js[idx] == 0:
                has_good = 0
            cls = w.cls[idx]
            ns = sym(syms, ns, SYM_FLAG, F_CLASS + 3 * prev_cls, <uint64_t>(cls >> 1))
            ns = sym(syms, ns, SYM_FLAG, F_CLASS + 3 * prev_cls + 1 + (cls >> 1),
                     <uint64_t>(cls & 1))
            prev_cls = cls
            if cls == 0:
                ns = sym(syms, ns, M_V0 if js[idx] == 0 else M_V, 0, u[idx])
            elif cls == 1:
                f = form[idx]
                ns = sym(syms, ns, SYM_FLAG, F_FRACTION, <uint64_t>(f >= 0))
                if f >= 0:
                    ns = sym(syms, ns, M_VXD, 0, <uint64_t>(f - 2))
                    ns = sym(syms, ns, M_VXR, 0, u[idx])
                    ns = sym(syms, ns, M_VA, 0, adj[idx])
                else:
                    ns = sym(syms, ns, M_VX, 0, <uint64_t>(w.kr[idx] - k - 1))
                    ns = sym(syms, ns, M_VXR, 0, u[idx])
            elif cls == 3:
                ns = sym(syms, ns, SYM_RAW, 32, bits[idx] & <uint64_t>0xFFFFFFFF)
                ns = sym(syms, ns, SYM_RAW, 32, bits[idx] >> 32)
            if cls == 1 or cls == 3:
                esc = bits[idx]
            if cls <= 1:
                last_good = v[idx]
                has_good = 1
    st.cls = prev_cls
    st.has_good = has_good
    st.esc = esc
    st.last_good = last_good
    return ns


cdef int model_value_block(Sym *syms, int ns, const double *v, const uint64_t *bits,
                           const uint32_t *js, int m, uint64_t prev_bits, int64_t delta,
                           ValState *st, VScratch *w) noexcept nogil:
    """codec3_py._encode_value_block, as symbols appended at syms[ns]; delta: the block's
    first delta within a series (0 if none)."""
    cdef int idx, k, q, c, ncand = 0, nd, width32 = 1, has_h2 = 0, cum, esc, npass = 1
    cdef int best = 0, have_best = 0, best_k = 0, best_p = 0, best_esc = 0, season = 0
    cdef int ord_cost, use_ord
    cdef int hist[MAX_K + 2]
    cdef int cands[4]
    cdef int qs[4]
    cdef int costs[3]
    cdef int64_t pred0
    cdef uint64_t prev, u
    cdef uint32_t pf
    memset(hist, 0, sizeof(hist))
    k = 0  # the previous value's decimals: dec_k_near's guess
    for idx in range(m):
        if idx and bits[idx] == bits[idx - 1]:  # a repeated value (common): the same
            k = w.kr[idx - 1]
            w.skr[idx] = w.skr[idx - 1]
            w.f32[idx] = w.f32[idx - 1]
        else:
            k = dec_k_near(v[idx], bits[idx], k, &w.skr[idx])
            if width32:
                width32 = c3_f32_bits(v[idx], bits[idx], &w.f32[idx])
        w.kr[idx] = <int8_t>k
        hist[k] += 1
    for idx in range(2, m):
        if js[idx] >= 2:
            has_h2 = 1
            break
    nd = m - hist[MAX_K + 1]
    if nd:
        # candidate digit counts: those covering all, 7/8, 3/4 and half of the values
        qs[0] = nd - 1
        qs[1] = (7 * nd - 1) // 8
        qs[2] = (3 * nd - 1) // 4
        qs[3] = (nd - 1) // 2
        for q in range(4):
            cum = 0
            for k in range(MAX_K + 1):
                cum += hist[k]
                if cum > qs[q]:
                    break
            for c in range(ncand):
                if cands[c] == k:
                    break
            else:
                cands[ncand] = k
                ncand += 1
        # the seasonal candidates: first differences plus the change a period before
        season = period(delta)
        if season and js[m - 1] <= <uint32_t>season:  # (mostly: the last row's j is over)
            for idx in range(m - 1):
                if js[idx] > <uint32_t>season:
                    break
            else:
                season = 0
        if has_h2:
            npass = 3 if season else 2
        for c in range(ncand):
            k = cands[c]
            pred0 = scale(st.last_good, k) if st.has_good else 0
            dec_costs(v, bits, js, m, w, k, npass, season, st, pred0,
                      best if have_best else 0x7FFFFFFF, costs, &esc)
            if not have_best or costs[0] < best:
                have_best = 1
                best = costs[0]
                best_k = k
                best_p = 0
                best_esc = esc
            if npass >= 2 and costs[1] < best:
                best = costs[1]
                best_k = k
                best_p = 1
                best_esc = esc
            if npass == 3 and costs[2] + 8 < best:
                best = costs[2] + 8
                best_k = k
                best_p = 2
                best_esc = esc
    # ordered-bits differences, as float32 when every value is one; a row costs at least
    # 1, so the pass is skipped when a decimal block costs m or less
    use_ord = not have_best or best > m
    ord_cost = 0
    prev = prev_bits
    for idx in range(m if use_ord else 0):
        if width32:
            if js[idx]:
                pf = w.f32[idx - 1] if idx else f32_pred(prev_bits)
            else:
                pf = 0
            u = zz32(ord32(w.f32[idx]) - ord32(pf))
        else:
            u = zz(ord64(bits[idx]) - ord64(prev if js[idx] else 0))
            prev = bits[idx]
        w.ords[idx] = u
        ord_cost += bitlen(u) + 1
        if have_best and ord_cost >= best:
            use_ord = 0
            break
    if use_ord:
        ns = sym(syms, ns, SYM_FLAG, F_VMODE + st.mode, 1)
        st.mode = VM_ORD
        ns = sym(syms, ns, SYM_FLAG, F_WIDTH, <uint64_t>width32)
        for idx in range(m):
            ns = sym(syms, ns, M_V0 if js[idx] == 0 else M_V, 0, w.ords[idx])
            track_finite(st, js[idx], v[idx])
        return ns
    k = best_k
    if k != cands[ncand - 1]:  # the rows at k, overwritten by a later candidate's
        pred0 = scale(st.last_good, k) if st.has_good else 0
        dec_costs(v, bits, js, m, w, k, npass, season, st, pred0, 0x7FFFFFFF, costs, &esc)
    ns = sym(syms, ns, SYM_FLAG, F_VMODE + st.mode, 0)
    st.mode = VM_DEC
    ns = sym(syms, ns, SYM_FLAG, F_KNEW, <uint64_t>(k != st.k))
    if k != st.k:
        ns = sym(syms, ns, SYM_RAW, 4, <uint64_t>k)
    if has_h2:
        ns = sym(syms, ns, SYM_FLAG, F_ORDER2, <uint64_t>(best_p == 1))
        if best_p != 1:
            ns = sym(syms, ns, SYM_FLAG, F_SEASON, <uint64_t>(best_p == 2))
            if best_p == 2:
                ns = sym(syms, ns, M_SEASON, 0, zz(<uint64_t>(season - st.season)))
                st.season = season
    ns = sym(syms, ns, SYM_FLAG, F_ESC, <uint64_t>best_esc)
    st.k = k
    return dec_emit(syms, ns, v, bits, js, m, w, k, best_p, best_esc, st)


cdef int encode_blocks(Enc *e, const int64_t *ts, const double *vals, const uint32_t *jpos,
                       Py_ssize_t n, uint64_t unit, State *S, VScratch *w) noexcept nogil:
    """Every block into e's streams; -1 when out of memory."""
    cdef UnitDiv ud
    cdef Py_ssize_t i0 = 0, i
    cdef int m, ns
    cdef int64_t delta
    cdef const uint64_t *vbits = <const uint64_t *>vals
    unit_init(&ud, unit)
    while i0 < n:
        m = <int>min(<Py_ssize_t>BLOCK, n - i0)
        ns = model_ts_block(w.syms, 0, ts + i0, jpos + i0, m, &ud, &S.ts)
        delta = 0
        for i in range(i0, i0 + m):
            if jpos[i]:
                delta = <int64_t>(<uint64_t>ts[i] - <uint64_t>ts[i - 1])
                break
        ns = model_value_block(w.syms, ns, vals + i0, vbits + i0, jpos + i0, m,
                               vbits[i0 - 1] if i0 else 0, delta, &S.val, w)
        if enc_reserve(e, ns, 0) or emit(e, S, w.syms, ns):
            return -1
        i0 += m
    return enc_reserve(e, 0, 0)


def encode_body(array point_ids, array timestamps, array values, array quality,
                bytes prefix=b""):
    """See codec3_py.encode_body. The columns are array.array of typecodes I, q, d, B."""
    cdef Py_ssize_t n = len(point_ids), npre = len(prefix), hlen = 0, rc_len = 0, raw_len = 0
    cdef Py_ssize_t total
    cdef int grouped = 0, qflag = 0, failed = 0
    cdef uint8_t *head
    cdef uint8_t *scratch = NULL
    cdef uint8_t *mem = NULL
    cdef uint32_t *jpos
    cdef uint64_t *tab
    cdef State *S
    cdef VScratch *w
    cdef Py_ssize_t o_w, o_tab, o_jpos, o_head
    cdef uint8_t *p
    cdef uint8_t lenbuf[16]
    cdef Py_ssize_t lenlen
    cdef const uint32_t *ids_p
    cdef const int64_t *ts_p
    cdef const double *vals_p
    cdef const uint8_t *qs_p
    cdef uint64_t unit
    cdef Enc e
    cdef bytes result
    cdef char *r
    check_column(point_ids, "I", b"point_ids")
    check_column(timestamps, "q", b"timestamps")
    check_column(values, "d", b"values")
    check_column(quality, "B", b"quality")
    if point_ids.ob_descr.itemsize != 4 or timestamps.ob_descr.itemsize != 8:
        raise TypeError("encode_body: this platform's I/q typecodes are not 32/64-bit")
    if len(timestamps) != n or len(values) != n or len(quality) != n:
        raise ValueError("encode_body: columns differ in length")
    if n > MAX_READS:
        raise ValueError(f"encode_body: {n} readings, a message holds at most {MAX_READS}")
    ids_p = <const uint32_t *>point_ids.data.as_voidptr
    ts_p = <const int64_t *>timestamps.data.as_voidptr
    vals_p = <const double *>values.data.as_voidptr
    qs_p = <const uint8_t *>quality.data.as_voidptr
    e.out = NULL
    e.raw = NULL
    try:
        with nogil:
            grouped = group_rows(&ids_p, &ts_p, &vals_p, &qs_p, n, &scratch)
            # one allocation: the state, the block scratch, the table scratch (2n), the
            # positions (n), the head (the series table <= 15 a series + 10 and 8 of
            # slack, the quality runs <= 4 a reading + 10, the unit 10)
            o_w = (sizeof(State) + 15) & ~15
            o_tab = o_w + ((sizeof(VScratch) + 15) & ~15)
            o_jpos = o_tab + 16 * n + 16
            o_head = o_jpos + 4 * n + 16
            mem = <uint8_t *>malloc(o_head + npre + 20 * n + 64)
            e.cap = 66 * EMIT_RUN + 4096 + n  # (a stream of 0.1 to 1 byte a reading, mostly)
            e.out = <uint8_t *>malloc(e.cap)
            e.raw_cap = 8192
            e.raw = <uint8_t *>malloc(e.raw_cap)
        if grouped < 0 or mem == NULL or e.out == NULL or e.raw == NULL:
            raise MemoryError()
        S = <State *>mem
        w = <VScratch *>(mem + o_w)
        tab = <uint64_t *>(mem + o_tab)
        jpos = <uint32_t *>(mem + o_jpos)
        head = mem + o_head
        if npre:
            memcpy(head, <const char *>prefix, npre)
        with nogil:
            p = write_series_table(head + npre, ids_p, qs_p, jpos, tab, n, &qflag)
            if qflag:
                p = write_quality_runs(p, qs_p, n)
            unit = ts_unit(ts_p, jpos, n)
            p = put_varint(p, unit)
            hlen = p - head
            e.low = 0
            e.rng = 0xFFFFFFFF
            e.cache = 0
            e.cache_size = 1
            e.n = 0
            e.acc = 0
            e.nb = 0
            e.rawp = e.raw
            state_init(S)
            failed = encode_blocks(&e, ts_p, vals_p, jpos, n, unit, S, w)
            if not failed:
                rc_len = rc_finish(&e)
                raw_len = e.rawp - e.raw
        if failed:
            raise MemoryError()
        lenlen = put_varint(lenbuf, <uint64_t>rc_len) - lenbuf
        total = hlen + lenlen + rc_len + raw_len
        result = PyBytes_FromStringAndSize(NULL, total)
        r = PyBytes_AS_STRING(result)
        memcpy(r, head, hlen)
        memcpy(r + hlen, lenbuf, lenlen)
        memcpy(r + hlen + lenlen, e.out + 1, rc_len)
        memcpy(r + hlen + lenlen + rc_len, e.raw, raw_len)
        return result
    finally:
        free(scratch)
        free(mem)
        free(e.out)
        free(e.raw)


# -- decoder ---------------------------------------------------------------------------------

cdef inline int put_back(Dec *dst, const Dec *d, int err) noexcept nogil:
    """Stores the decoder's state (from its local copy) and passes err on."""
    dst[0] = d[0]
    return err


cdef int decode_ts_block(Dec *dst, uint64_t *ts, const uint32_t *js, Py_ssize_t i0, int m,
                         const UnitDiv *ud, State *S) noexcept nogil:
    """codec3_py._decode_ts_block."""
    cdef Dec c = dst[0]  # the decoder's state in a local copy (registers)
    cdef Dec *d = &c
    cdef TsState *st = &S.ts
    cdef int k, f = -1, grid = 0, err
    cdef uint32_t j
    cdef uint64_t u, t, P = 0, base = 0, dbase = 0
    cdef uint64_t *out = ts + i0
    for k in range(m):
        if js[k]:
            f = k
            break
    if f >= 0:
        grid = rd_bit(d, S.probs, F_TSMODE + st.mode)
        st.mode = grid
        if grid:
            err = im_get(d, S, M_TP, &u)
            if err:
                return put_back(dst, d, err)
            P = st.grid_p + unzz(u)
            st.grid_p = P
            err = im_get(d, S, M_TP, &u)
            if err:
                return put_back(dst, d, err)
            dbase = unzz(u)
    for k in range(m):
        j = js[k]
        if j == 0:
            err = im_get(d, S, M_T0, &u)
            if err:
                return put_back(dst, d, err)
            t = st.first + unzz(u)
            st.first = t
        elif grid:
            if k == f:  # the grid base is predicted from the row before the first grid row
                base = out[k - 1] + <uint64_t>(<int64_t>(1 - f)) * P + dbase
            err = im_get(d, S, M_TG, &u)
            if err:
                return put_back(dst, d, err)
            t = base + <uint64_t>k * P + u
        elif j == 1:
            err = im_get(d, S, M_T1, &u)
            if err:
                return put_back(dst, d, err)
            t = out[k - 1] + (st.prev_delta + unzz(u)) * ud.unit
        else:
            err = im_get(d, S, M_T2, &u)
            if err:
                return put_back(dst, d, err)
            t = out[k - 1] + (<uint64_t>floor_div(ud, out[k - 1] - out[k - 2])
                              + unzz(u)) * ud.unit
        if j == 1:
            st.prev_delta = <uint64_t>floor_div(ud, t - out[k - 1])
        out[k] = t
    return put_back(dst, d, ERR_NONE)


cdef inline uint64_t floor_mod64(double y) noexcept nogil:
    """math.floor(y) mod 2**64 for a finite y (from 2**53 on, y is an integer: its
    significand shifted by its exponent)."""
    cdef uint64_t b, r
    cdef int e
    if fabs(y) < TWO53:
        return <uint64_t>ifloor(y)
    b = cg_dbits(y)
    e = <int>((b >> 52) & 0x7FF) - 1075  # >= 1
    r = 0 if e >= 64 else ((b & <uint64_t>0xFFFFFFFFFFFFF) | (<uint64_t>1 << 52)) << e
    return <uint64_t>0 - r if b >> 63 else r


cdef int decode_value_block(Dec *dst, uint64_t *vb, Py_ssize_t i0, int m, const uint32_t *js,
                            State *S, uint32_t *rec, Py_ssize_t *nrec) noexcept nogil:
    """codec3_py._decode_value_block; the block's mode goes to rec[nrec] (0x100 | width32,
    or k | order2 << 4 | escapes << 5 | season << 9) at the point where the twin appends
    it. The scaled integers (s1, s2, pred) wrap mod 2**64 as the twin's every use of them
    does (after a corrupt fraction, the twin's s may be any integer)."""
    cdef Dec c = dst[0]  # the decoder's state in a local copy (registers)
    cdef Dec *d = &c
    cdef ValState *st = &S.val
    cdef int idx, has_h2 = 0, width32, k, order2, escapes, err, h = 0, cls, hi
    cdef uint32_t j, pf, x, season = 0
    cdef int64_t sv, big
    cdef uint64_t u, u2, b, prev, kk, lo, hb, den, s1 = 0, s2 = 0, s = 0, pred
    cdef double p10, v, y
    cdef uint64_t *out = vb + i0
    for idx in range(2, m):
        if js[idx] >= 2:
            has_h2 = 1
            break
    if rd_bit(d, S.probs, F_VMODE + st.mode):
        st.mode = VM_ORD
        width32 = rd_bit(d, S.probs, F_WIDTH)
        if d.pos > d.lim:
            return put_back(dst, d, ERR_TRUNC_RC)
        rec[nrec[0]] = <uint32_t>(0x100 | width32)
        nrec[0] += 1
        for idx in range(m):
            # (the model by a branch: a constant index keeps its state in registers)
            if js[idx]:
                err = im_get(d, S, M_V, &u)
            else:
                err = im_get(d, S, M_V0, &u)
            if err:
                return put_back(dst, d, err)
            prev = out[idx - 1] if js[idx] else 0
            if width32:
                if u >> 32:
                    return put_back(dst, d, ERR_F32)
                pf = f32_pred(prev) if js[idx] else 0
                x = unord32(ord32(pf) + unzz32(<uint32_t>u))
                b = c3_f32_to_f64(x)
            else:
                b = unord64(ord64(prev) + unzz(u))
            out[idx] = b
            track_finite(st, js[idx], cg_bitsd(b))
        return put_back(dst, d, ERR_NONE)
    st.mode = VM_DEC
    if rd_bit(d, S.probs, F_KNEW):
        err = rd_raw(d, 4, &kk)
        if err:
            return put_back(dst, d, err)
        st.k = <int>kk  # 0..15: never over MAX_K
    k = st.k
    order2 = rd_bit(d, S.probs, F_ORDER2) if has_h2 else 0
    if has_h2 and not order2 and rd_bit(d, S.probs, F_SEASON):
        err = im_get(d, S, M_SEASON, &u)
        if err:
            return put_back(dst, d, err)
        sv = <int64_t>(<uint64_t>st.season + unzz(u))
        if not (2 <= sv <= MAX_READS):
            d.err_u = <uint64_t>sv
            return put_back(dst, d, ERR_SEASON)
        season = <uint32_t>sv
        st.season = sv
    escapes = rd_bit(d, S.probs, F_ESC)
    if d.pos > d.lim:
        return put_back(dst, d, ERR_TRUNC_RC)
    rec[nrec[0]] = <uint32_t>k | <uint32_t>order2 << 4 | <uint32_t>escapes << 5 | season << 9
    nrec[0] += 1
    p10 = POW10[k]
    for idx in range(m):
        j = js[idx]
        if j == 0 or idx == 0:
            h = 0
            if j == 0:
                st.has_good = 0
        cls = 0
        if escapes:
            hi = rd_bit(d, S.probs, F_CLASS + 3 * st.cls)
            cls = hi << 1 | rd_bit(d, S.probs, F_CLASS + 3 * st.cls + 1 + hi)
            st.cls = cls
            if cls >= 2:
                if cls == 2:
                    out[idx] = st.esc
                else:
                    err = rd_raw(d, 32, &lo)
                    if err:
                        return put_back(dst, d, err)
                    err = rd_raw(d, 32, &hb)
                    if err:
                        return put_back(dst, d, err)
                    out[idx] = lo | hb << 32
                    st.esc = out[idx]
                if d.pos > d.lim:
                    return put_back(dst, d, ERR_TRUNC_RC)
                continue
        if h == 0:
            pred = <uint64_t>scale(st.last_good, k) if st.has_good else 0
        elif h == 1 or not order2:
            pred = s1
        else:
            pred = 2 * s1 - s2
        if season and j > season:  # codec3_py._seasonal (of the decoded values)
            b = out[idx - <int>season]
            u = out[idx - <int>season - 1]
            if finite_bits(b) and finite_bits(u):
                pred += <uint64_t>scale(cg_bitsd(b), k) - <uint64_t>scale(cg_bitsd(u), k)
        if cls == 0:
            if j:
                err = im_get(d, S, M_V, &u)
            else:
                err = im_get(d, S, M_V0, &u)
            if err:
                return put_back(dst, d, err)
            s = pred + unzz(u)
            if not (-<int64_t>9007199254740992 < <int64_t>s < <int64_t>9007199254740992):
                return put_back(dst, d, ERR_DEC_RANGE)
            v = <double><int64_t>s / p10
        elif rd_bit(d, S.probs, F_FRACTION):
            err = im_get(d, S, M_VXD, &u)
            if err:
                return put_back(dst, d, err)
            # the divisor u + 2 is checked before den is computed (no overflow)
            if u > <uint64_t>(MAX_DIV - 2) or (u + 2) * IPOW10[k] > TWO53_U:
                d.err_k = k
                d.err_u = u
                return put_back(dst, d, ERR_FRACTION)
            den = (u + 2) * IPOW10[k]
            err = im_get(d, S, M_VXR, &u2)
            if err:
                return put_back(dst, d, err)
            big = <int64_t>(pred * (u + 2) + unzz(u2))
            if not (-<int64_t>9007199254740992 < big < <int64_t>9007199254740992):
                return put_back(dst, d, ERR_NUMERATOR)
            b = ord64(cg_dbits(<double>big / <double>den))
            err = im_get(d, S, M_VA, &u)
            if err:
                return put_back(dst, d, err)
            v = cg_bitsd(unord64(b + unzz(u)))
            if not (fabs(v) < INFINITY):
                return put_back(dst, d, ERR_FRAC_SPECIAL)
            y = v * p10 + 0.5
            if fabs(y) == INFINITY:  # the twin: OverflowError (see ERR_FRAC_RANGE)
                return put_back(dst, d, ERR_FRAC_RANGE)
            s = floor_mod64(y)
        else:
            err = im_get(d, S, M_VX, &u)
            if err:
                return put_back(dst, d, err)
            if u >= <uint64_t>(MAX_K - k):  # k + u + 1 > MAX_K
                d.err_k = k
                d.err_u = u
                return put_back(dst, d, ERR_DIGITS)
            err = im_get(d, S, M_VXR, &u2)
            if err:
                return put_back(dst, d, err)
            big = <int64_t>(pred * IPOW10[u + 1] + unzz(u2))
            if not (-<int64_t>9007199254740992 < big < <int64_t>9007199254740992):
                return put_back(dst, d, ERR_DEC_RANGE)
            v = <double>big / POW10[k + u + 1]
            s = <uint64_t>ifloor(v * p10 + 0.5)
        b = cg_dbits(v)
        out[idx] = b
        if cls == 1:
            st.esc = b
        s2 = s1
        s1 = s
        h += 1
        st.last_good = v
        st.has_good = 1
    return put_back(dst, d, ERR_NONE)


cdef int decode_blocks(Dec *d, Py_ssize_t n, const uint32_t *jpos, uint64_t *ts,
                       uint64_t *vb, uint64_t unit, State *S, uint32_t *rec,
                       Py_ssize_t *nrec) noexcept nogil:
    cdef UnitDiv ud
    cdef Py_ssize_t i0 = 0
    cdef int m, err
    unit_init(&ud, unit)
    while i0 < n:
        m = <int>min(<Py_ssize_t>BLOCK, n - i0)
        err = decode_ts_block(d, ts, jpos + i0, i0, m, &ud, S)
        if err:
            return err
        err = decode_value_block(d, vb, i0, m, jpos + i0, S, rec, nrec)
        if err:
            return err
        i0 += m
    if d.pos > d.lim:
        return ERR_TRUNC_RC
    if d.raw_end - d.raw_pos >= 8:
        return ERR_TRAILING
    return ERR_NONE


cdef array _IDS = array("I")
cdef array _TS = array("q")
cdef array _VALS = array("d")
cdef array _QS = array("B")


cdef str _mode_name(uint32_t r):
    if r & 0x100:
        return "float32" if r & 1 else "float64"
    return (f"decimal {r & 0x0F}" + (" order 2" if r & 0x10 else "")
            + (f" season {r >> 9}" if r >> 9 else "") + (" esc" if r & 0x20 else ""))


def decode_payload(const uint8_t[::1] data, Py_ssize_t start, Py_ssize_t end, modes=None):
    """See codec3_py.decode_payload."""
    cdef Py_ssize_t size, pos = 0, nblocks, glen, nrec = 0, i, o_jpos, o_rec, o_rc
    cdef uint8_t *buf = NULL
    cdef uint8_t *mem = NULL
    cdef uint8_t *rcbuf
    cdef uint32_t *jpos
    cdef uint32_t *rec
    cdef uint64_t *tab = NULL
    cdef State *S
    cdef uint64_t nseries = 0, total = 0, seq = 0, unit = 0, rc_len = 0, max_reads
    cdef int qflag = 0, err = ERR_NONE
    cdef array out_ids, out_ts, out_vals, out_q
    cdef str gateway
    cdef Dec d
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
            raise ValueError("truncated: the body ends inside the gateway id")
        try:
            gateway = PyUnicode_DecodeUTF8(<char *>buf + 1, glen, NULL)
        except UnicodeDecodeError:
            raise ValueError("corrupt: the gateway id is not UTF-8") from None
        pos = 1 + glen
        err = read_varint(buf, &pos, size, &seq, ERR_TRUNC_SEQ)
        if err:
            raise ValueError(_ERRORS[err])
        max_reads = <uint64_t>MAX_READS_PER_BYTE * <uint64_t>(size + 16)
        if max_reads > MAX_READS:
            max_reads = MAX_READS
        read_series_table(buf, &pos, size, max_reads, &tab, &nseries, &total, &qflag)
        out_ids = clone(_IDS, <Py_ssize_t>total, False)
        out_ts = clone(_TS, <Py_ssize_t>total, False)
        out_vals = clone(_VALS, <Py_ssize_t>total, False)
        out_q = clone(_QS, <Py_ssize_t>total, False)
        with nogil:
            if qflag:
                err = read_quality_runs(buf, &pos, size, <Py_ssize_t>total,
                                        <uint8_t *>out_q.data.as_voidptr)
            elif total:
                memset(out_q.data.as_voidptr, 0, total)
            if not err:
                err = read_varint(buf, &pos, size, &unit, ERR_TRUNC_UNIT)
        if err:
            raise ValueError(_ERRORS[err])
        if unit == 0 or unit > (<uint64_t>1 << 63):
            raise ValueError(f"corrupt: timestamp unit {unit}")
        err = read_varint(buf, &pos, size, &rc_len, ERR_TRUNC_RC)
        if err:
            raise ValueError(_ERRORS[err])
        if rc_len > <uint64_t>(size - pos):
            raise ValueError(_ERRORS[ERR_TRUNC_RC])
        # one allocation: the state, the positions in series, the block modes, a copy of
        # the range-coded stream with RC_PAD zeroed bytes after it
        nblocks = <Py_ssize_t>((total + BLOCK - 1) // BLOCK)
        o_jpos = (sizeof(State) + 15) & ~15
        o_rec = o_jpos + ((4 * <Py_ssize_t>total + 19) & ~15)
        o_rc = o_rec + ((4 * nblocks + 19) & ~15)
        mem = <uint8_t *>malloc(o_rc + <Py_ssize_t>rc_len + RC_PAD)
        if mem == NULL:
            raise MemoryError()
        S = <State *>mem
        jpos = <uint32_t *>(mem + o_jpos)
        rec = <uint32_t *>(mem + o_rec)
        rcbuf = mem + o_rc
        with nogil:
            fill_series(tab, nseries, <uint32_t *>out_ids.data.as_voidptr, jpos)
            memcpy(rcbuf, buf + pos, rc_len)
            memset(rcbuf + rc_len, 0, RC_PAD)
            d.buf = rcbuf
            d.pos = 4
            d.lim = <Py_ssize_t>rc_len + MAX_PAD
            d.rng = 0xFFFFFFFF
            d.code = (<uint32_t>rcbuf[0] << 24 | <uint32_t>rcbuf[1] << 16
                      | <uint32_t>rcbuf[2] << 8 | rcbuf[3])
            d.raw = buf + pos + rc_len
            d.raw_pos = 0
            d.raw_end = 8 * (<uint64_t>size - <uint64_t>pos - rc_len)
            state_init(S)
            err = decode_blocks(&d, <Py_ssize_t>total, jpos,
                                <uint64_t *>out_ts.data.as_voidptr,
                                <uint64_t *>out_vals.data.as_voidptr, unit, S, rec, &nrec)
        if modes is not None:
            for i in range(nrec):
                modes.append(_mode_name(rec[i]))
        if err == ERR_DIGITS:
            raise ValueError(f"corrupt: a value of {d.err_k + <object>d.err_u + 1} decimals")
        if err == ERR_FRACTION:
            raise ValueError(f"corrupt: a fraction of {<object>d.err_u + 2} * 10**{d.err_k}")
        if err == ERR_SEASON:
            raise ValueError(f"corrupt: a season of {<int64_t>d.err_u} rows")
        if err:
            raise ValueError(_ERRORS[err])
        return gateway, seq, out_ids, out_ts, out_vals, out_q
    finally:
        free(buf)
        free(mem)
        free(tab)
