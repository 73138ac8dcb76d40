# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True
"""Compiled tumbling-window aggregates; ``aggregate_py.py`` is the twin and the reference
(the algorithm and every array are described there). Same signatures, same results bit
for bit: the same float operations in the same order, pow/log10/sqrt from libm as Python's
math module calls them, and no fused multiply-add (setup.py builds with -ffp-contract=off).
"""

from libc.math cimport INFINITY, NAN, isfinite, log10, pow, sqrt
from libc.stdint cimport INT64_MAX, INT64_MIN, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

# Same values as in aggregate_py.
cdef enum:
    FN_MIN = 0
    FN_MAX = 1
    FN_MEAN = 2
    FN_SUM = 3
    FN_COUNT = 4
    FN_LAST = 5
    FN_STD = 6
    FN_LAEQ = 7
    MAX_FN = 8
    NEVER = 0
    OPEN = 1
    CLOSED = 2
    ACC = 7
    A_SUM = 0
    A_MIN = 1
    A_MAX = 2
    A_LAST = 3
    A_MEAN = 4
    A_M2 = 5
    A_ENERGY = 6
    GOOD = 0

# error codes of the nogil loops, raised as ValueError once the GIL is back
cdef enum:
    ERR_NONE = 0
    ERR_SLOT = 1
    ERR_ROOM = 2
    ERR_MEMORY = 3

FUNCTIONS = ("min", "max", "mean", "sum", "count", "last", "std", "laeq")


cdef inline int64_t window_start(int64_t ts, int64_t w) noexcept nogil:
    """aggregate_py.window_start: floor to a multiple of w, clamped to INT64_MIN."""
    cdef int64_t r = ts % w  # C remainder: sign of ts
    if r < 0:
        r += w
    if ts < INT64_MIN + r:
        return INT64_MIN
    return ts - r


cdef inline int64_t deadline_of(int64_t ts, int64_t st, int64_t w, int64_t g, int64_t now,
                                int64_t elapsed) noexcept nogil:
    """aggregate_py.deadline_of, exactly: unsigned arithmetic where int64 could overflow
    (0 <= ts - st < w, so the time to the end is in (0, w] and that plus grace < 2**64)."""
    cdef uint64_t rem = <uint64_t>w - (<uint64_t>ts - <uint64_t>st)
    cdef uint64_t lag = 0
    if now != 0 and now > ts:
        lag = <uint64_t>now - <uint64_t>ts
        if lag > <uint64_t>g:
            lag = <uint64_t>g
    rem += <uint64_t>g - lag
    # elapsed + rem < INT64_MAX, else INT64_MAX (never); the headroom is exact in uint64
    if rem >= <uint64_t>INT64_MAX - <uint64_t>elapsed:
        return INT64_MAX
    return <int64_t>(<uint64_t>elapsed + rem)


cdef inline bint closes_by_time(int64_t deadline, int64_t now, int64_t elapsed) noexcept nogil:
    """aggregate_py.closes_by_time."""
    return now != 0 and deadline != INT64_MAX and elapsed >= deadline


cdef inline double energy(double x) noexcept nogil:
    return pow(10.0, x / 10.0)


cdef inline Py_ssize_t emit(
    Py_ssize_t slot,
    const uint8_t* nfn,
    const uint8_t* fcode,
    const uint32_t* fout,
    const int64_t* start,
    const int64_t* count,
    const double* acc,
    uint32_t* out_ids,
    int64_t* out_ts,
    double* out_values,
    uint8_t* out_quality,
    Py_ssize_t n_out,
) noexcept nogil:
    """aggregate_py._emit: the window's aggregates at n_out; returns the new n_out."""
    cdef const double* a = acc + slot * ACC
    cdef int64_t cnt = count[slot]
    cdef int64_t ts = start[slot]
    cdef Py_ssize_t k
    cdef uint8_t code
    cdef double v, var, e
    for k in range(nfn[slot]):
        code = fcode[slot * MAX_FN + k]
        if code == FN_MIN:
            v = a[A_MIN]
        elif code == FN_MAX:
            v = a[A_MAX]
        elif code == FN_MEAN:
            v = a[A_MEAN]
        elif code == FN_SUM:
            v = a[A_SUM]
        elif code == FN_COUNT:
            v = <double>cnt
        elif code == FN_LAST:
            v = a[A_LAST]
        elif code == FN_STD:
            var = a[A_M2] / <double>cnt
            v = NAN if var < 0.0 else sqrt(var)
        else:
            e = a[A_ENERGY] / <double>cnt
            v = 10.0 * log10(e) if e > 0.0 else -INFINITY
        out_ids[n_out] = fout[slot * MAX_FN + k]
        out_ts[n_out] = ts
        out_values[n_out] = v
        out_quality[n_out] = GOOD
        n_out += 1
    return n_out


cdef check_slots(
    Py_ssize_t n,
    const int64_t[::1] timestamps,
    const double[::1] values,
    const uint8_t[::1] quality,
    const int64_t[::1] window_ms,
    const int64_t[::1] grace_ms,
    const uint8_t[::1] raw,
    const uint8_t[::1] nfn,
    const uint8_t[::1] phase,
    const int64_t[::1] start,
    const int64_t[::1] deadline,
):
    cdef Py_ssize_t ns = window_ms.shape[0], s
    if timestamps.shape[0] != n or values.shape[0] != n or quality.shape[0] != n:
        raise ValueError("aggregate: columns differ in length")
    if (
        grace_ms.shape[0] != ns or raw.shape[0] != ns or nfn.shape[0] != ns
        or phase.shape[0] != ns or start.shape[0] != ns or deadline.shape[0] != ns
    ):
        raise ValueError("aggregate: slot arrays differ in length")
    for s in range(ns):
        if window_ms[s] <= 0 or grace_ms[s] < 0:
            raise ValueError("aggregate: window must be > 0 and grace >= 0")
        if nfn[s] > MAX_FN:
            raise ValueError("aggregate: more than 8 functions for a slot")


cdef raise_error(int err):
    if err == ERR_SLOT:
        raise ValueError("aggregate: slot_of points past the slot arrays")
    if err == ERR_ROOM:
        raise ValueError("aggregate: output columns shorter than aggregate_size")
    if err == ERR_MEMORY:
        raise MemoryError()


def aggregate_size(
    const uint32_t[::1] point_ids,
    const int64_t[::1] timestamps,
    const double[::1] values,
    const uint8_t[::1] quality,
    const int32_t[::1] slot_of,
    const int64_t[::1] window_ms,
    const int64_t[::1] grace_ms,
    const uint8_t[::1] raw,
    const uint8_t[::1] nfn,
    const uint8_t[::1] phase,
    const int64_t[::1] start,
    const int64_t[::1] deadline,
    int64_t now_ms,
    int64_t elapsed_ms,
    bint close_by_time=True,
):
    """See aggregate_py.aggregate_size: the exact row count of ``aggregate``."""
    cdef Py_ssize_t n = point_ids.shape[0]
    cdef Py_ssize_t ns = window_ms.shape[0]
    cdef Py_ssize_t n_slot_of = slot_of.shape[0]
    cdef Py_ssize_t i, n_out = 0
    cdef int32_t slot
    cdef uint32_t pid
    cdef int64_t s, ts, st
    cdef uint8_t p
    cdef int err = ERR_NONE
    cdef uint8_t* ph
    cdef int64_t* sts
    cdef int64_t* dls
    check_slots(
        n, timestamps, values, quality, window_ms, grace_ms, raw, nfn, phase, start, deadline
    )
    ph = <uint8_t*>malloc(ns + 1)
    sts = <int64_t*>malloc((ns + 1) * sizeof(int64_t))
    dls = <int64_t*>malloc((ns + 1) * sizeof(int64_t))
    if ph == NULL or sts == NULL or dls == NULL:
        free(ph)
        free(sts)
        free(dls)
        raise MemoryError()
    with nogil:
        if ns:
            memcpy(ph, &phase[0], ns)
            memcpy(sts, &start[0], ns * sizeof(int64_t))
            memcpy(dls, &deadline[0], ns * sizeof(int64_t))
        for i in range(n):
            pid = point_ids[i]
            slot = slot_of[pid] if pid < n_slot_of else -1
            if slot >= ns:
                err = ERR_SLOT
                break
            if slot < 0 or quality[i] != GOOD or not isfinite(values[i]):
                n_out += 1
                continue
            p = ph[slot]
            ts = timestamps[i]
            st = sts[slot]
            if (
                p == OPEN and st != INT64_MIN and ts >= st
                and <uint64_t>ts - <uint64_t>st < <uint64_t>window_ms[slot]
            ):
                n_out += raw[slot] != 0  # fast path: the open window
                continue
            s = window_start(ts, window_ms[slot])
            if p == NEVER or s > st:
                if p == OPEN:
                    n_out += nfn[slot]
                ph[slot] = OPEN
                sts[slot] = s
                dls[slot] = deadline_of(
                    ts, s, window_ms[slot], grace_ms[slot], now_ms, elapsed_ms
                )
                n_out += raw[slot] != 0
            elif p == OPEN and s == st:
                n_out += raw[slot] != 0
            else:
                n_out += 1  # late
        if err == ERR_NONE and now_ms != 0 and close_by_time:
            for slot in range(ns):
                if ph[slot] == OPEN and closes_by_time(dls[slot], now_ms, elapsed_ms):
                    n_out += nfn[slot]
    free(ph)
    free(sts)
    free(dls)
    raise_error(err)
    return n_out


def aggregate(
    const uint32_t[::1] point_ids,
    const int64_t[::1] timestamps,
    const double[::1] values,
    const uint8_t[::1] quality,
    const int32_t[::1] slot_of,
    const int64_t[::1] window_ms,
    const int64_t[::1] grace_ms,
    const uint8_t[::1] raw,
    const uint8_t[::1] nfn,
    const uint8_t[::1] fcode,
    const uint32_t[::1] fout,
    uint8_t[::1] phase,
    int64_t[::1] start,
    int64_t[::1] count,
    double[::1] acc,
    int64_t[::1] deadline,
    int64_t now_ms,
    int64_t elapsed_ms,
    uint32_t[::1] out_ids,
    int64_t[::1] out_ts,
    double[::1] out_values,
    uint8_t[::1] out_quality,
    bint close_by_time=True,
):
    """See aggregate_py.aggregate: returns (n_out, windows, late, suppressed)."""
    cdef Py_ssize_t n = point_ids.shape[0]
    cdef Py_ssize_t ns = window_ms.shape[0]
    cdef Py_ssize_t n_slot_of = slot_of.shape[0]
    cdef Py_ssize_t cap = out_ids.shape[0]
    cdef Py_ssize_t i, k, n_out = 0, windows = 0, late = 0, suppressed = 0
    cdef int32_t slot
    cdef uint32_t pid
    cdef int64_t s, ts, st, cnt
    cdef uint8_t p
    cdef bint aggregated
    cdef double x, d, mean
    cdef double* a
    cdef int err = ERR_NONE
    cdef uint8_t* has_laeq
    # raw pointers for emit() (a memoryview argument would cost a refcount per call)
    cdef const uint8_t* nfn_p = NULL
    cdef const uint8_t* fcode_p = NULL
    cdef const uint32_t* fout_p = NULL
    cdef int64_t* start_p = NULL
    cdef int64_t* count_p = NULL
    cdef double* acc_p = NULL
    cdef uint32_t* oid_p = NULL
    cdef int64_t* ots_p = NULL
    cdef double* oval_p = NULL
    cdef uint8_t* oq_p = NULL
    check_slots(
        n, timestamps, values, quality, window_ms, grace_ms, raw, nfn, phase, start, deadline
    )
    if fcode.shape[0] != ns * MAX_FN or fout.shape[0] != ns * MAX_FN:
        raise ValueError("aggregate: fcode/fout must hold 8 entries per slot")
    if count.shape[0] != ns or acc.shape[0] != ns * ACC:
        raise ValueError("aggregate: state arrays differ in length")
    if out_ts.shape[0] != cap or out_values.shape[0] != cap or out_quality.shape[0] != cap:
        raise ValueError("aggregate: output columns differ in length")
    if ns:
        nfn_p = &nfn[0]
        fcode_p = &fcode[0]
        fout_p = &fout[0]
        start_p = &start[0]
        count_p = &count[0]
        acc_p = &acc[0]
    if cap:
        oid_p = &out_ids[0]
        ots_p = &out_ts[0]
        oval_p = &out_values[0]
        oq_p = &out_quality[0]
    has_laeq = <uint8_t*>malloc(ns + 1)
    if has_laeq == NULL:
        raise MemoryError()
    with nogil:
        for slot in range(ns):
            has_laeq[slot] = 0
            for k in range(nfn[slot]):
                if fcode[slot * MAX_FN + k] == FN_LAEQ:
                    has_laeq[slot] = 1
        for i in range(n):
            pid = point_ids[i]
            x = values[i]
            slot = slot_of[pid] if pid < n_slot_of else -1
            if slot >= ns:
                err = ERR_SLOT
                break
            aggregated = False
            if slot >= 0 and quality[i] == GOOD and isfinite(x):
                ts = timestamps[i]
                p = phase[slot]
                st = start[slot]
                a = acc_p + slot * ACC
                if (
                    p == OPEN and st != INT64_MIN and ts >= st
                    and <uint64_t>ts - <uint64_t>st < <uint64_t>window_ms[slot]
                ):
                    s = st  # fast path: the open window, no division
                else:
                    s = window_start(ts, window_ms[slot])
                if p == NEVER or s > st:
                    if p == OPEN:
                        if n_out + nfn[slot] > cap:
                            err = ERR_ROOM
                            break
                        n_out = emit(
                            slot, nfn_p, fcode_p, fout_p, start_p, count_p, acc_p,
                            oid_p, ots_p, oval_p, oq_p, n_out,
                        )
                        windows += 1
                    phase[slot] = OPEN
                    start[slot] = s
                    deadline[slot] = deadline_of(
                        ts, s, window_ms[slot], grace_ms[slot], now_ms, elapsed_ms
                    )
                    count[slot] = 1
                    a[A_SUM] = x
                    a[A_MIN] = x
                    a[A_MAX] = x
                    a[A_LAST] = x
                    a[A_MEAN] = x
                    a[A_M2] = 0.0
                    a[A_ENERGY] = energy(x) if has_laeq[slot] else 0.0
                    aggregated = True
                elif p == OPEN and s == st:
                    cnt = count[slot] + 1
                    count[slot] = cnt
                    a[A_SUM] += x
                    if x < a[A_MIN]:
                        a[A_MIN] = x
                    if x > a[A_MAX]:
                        a[A_MAX] = x
                    a[A_LAST] = x
                    d = x - a[A_MEAN]
                    mean = a[A_MEAN] + d / <double>cnt
                    a[A_MEAN] = mean
                    a[A_M2] += d * (x - mean)
                    if has_laeq[slot]:
                        a[A_ENERGY] += energy(x)
                    aggregated = True
                else:
                    late += 1
            if aggregated and raw[slot] == 0:
                suppressed += 1
                continue
            if n_out >= cap:
                err = ERR_ROOM
                break
            oid_p[n_out] = pid
            ots_p[n_out] = timestamps[i]
            oval_p[n_out] = x
            oq_p[n_out] = quality[i]
            n_out += 1
        if err == ERR_NONE and now_ms != 0 and close_by_time:
            for slot in range(ns):
                if phase[slot] == OPEN and closes_by_time(deadline[slot], now_ms, elapsed_ms):
                    if n_out + nfn[slot] > cap:
                        err = ERR_ROOM
                        break
                    n_out = emit(
                        slot, nfn_p, fcode_p, fout_p, start_p, count_p, acc_p,
                        oid_p, ots_p, oval_p, oq_p, n_out,
                    )
                    windows += 1
                    phase[slot] = CLOSED
    free(has_laeq)
    raise_error(err)
    return n_out, windows, late, suppressed
