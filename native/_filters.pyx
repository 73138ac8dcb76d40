# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True
"""Compiled filter kernels; ``filters_py.py`` is the pure-Python twin and the reference
(read its docstrings for the algorithms). Same signatures, same effects, same bits.

Time differences are computed on ordered int64 operands as uint64 (exact, no overflow)
and converted to double only for arithmetic; every divisor is a positive time
difference or a positive tau, so ``cdivision`` never meets a zero.
"""

from libc.math cimport exp, fabs, isfinite, isinf, INFINITY
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t

# Same values as filters_py.GOOD/BAD/ACTION_*.
cdef enum:
    GOOD = 0
    BAD = 1
    ACTION_FIX = 0
    ACTION_FLAG = 1
    ACTION_DROP = 2


cdef inline Py_ssize_t check_columns(
    str name, Py_ssize_t n_ids, Py_ssize_t n_ts, Py_ssize_t n_values, Py_ssize_t n_quality
) except -1:
    if n_ts != n_ids or n_values != n_ids or n_quality != n_ids:
        raise ValueError(f"{name}: columns differ in length")
    return n_ids


cdef inline int check_per_slot(str name, Py_ssize_t n_slots, tuple lengths) except -1:
    for length in lengths:
        if length < n_slots:
            raise ValueError(f"{name}: parameter or state arrays shorter than the slot count")
    return 0


cdef inline int check_window(str name, const int32_t[::1] window, Py_ssize_t stride) except -1:
    cdef Py_ssize_t s
    for s in range(window.shape[0]):
        if window[s] < 1 or window[s] > stride:
            raise ValueError(f"{name}: a window is outside 1..stride")
    return 0


# -- sorted window (hampel, median): see filters_py ------------------------------------


cdef inline Py_ssize_t window_push(
    double* ring, double* srt, Py_ssize_t w, int32_t* cnt_p, int32_t* pos_p, double x
) noexcept nogil:
    """Adds x to the window; updates *cnt_p and *pos_p, returns the new count."""
    cdef Py_ssize_t cnt = cnt_p[0], pos = pos_p[0], j, last
    cdef double old
    if cnt < 0 or cnt > w or pos < 0 or pos >= w:
        cnt = 0
        pos = 0
    if cnt == w:
        # full: the new value takes the oldest one's place in the sorted copy, then
        # moves to its rank (after the values equal to it, as an insertion would)
        old = ring[pos]
        j = 0
        last = cnt - 1
        while j < last and srt[j] != old:
            j += 1
        if x > old:
            while j < last and srt[j + 1] <= x:
                srt[j] = srt[j + 1]
                j += 1
        else:
            while j > 0 and srt[j - 1] > x:
                srt[j] = srt[j - 1]
                j -= 1
    else:
        j = cnt
        while j > 0 and srt[j - 1] > x:
            srt[j] = srt[j - 1]
            j -= 1
        cnt += 1
    srt[j] = x
    ring[pos] = x
    pos += 1
    if pos == w:
        pos = 0
    cnt_p[0] = <int32_t>cnt
    pos_p[0] = <int32_t>pos
    return cnt


cdef inline double mid(double a, double b) noexcept nogil:
    cdef double m = (a + b) / 2.0
    if isinf(m):
        m = a / 2.0 + b / 2.0
    return m


cdef inline double sorted_median(const double* srt, Py_ssize_t k) noexcept nogil:
    cdef Py_ssize_t h = k // 2
    if k & 1:
        return srt[h]
    return mid(srt[h - 1], srt[h])


cdef inline double sorted_mad(const double* srt, Py_ssize_t k, double m) noexcept nogil:
    cdef Py_ssize_t h = k // 2, lo = h - 1, hi = h, t
    cdef double prev = 0.0, cur = 0.0, d
    for t in range(h + 1):
        if lo >= 0 and (hi >= k or m - srt[lo] <= srt[hi] - m):
            d = m - srt[lo]
            lo -= 1
        else:
            d = srt[hi] - m
            hi += 1
        prev = cur
        cur = d
    if k & 1:
        return cur
    return mid(prev, cur)


def hampel(
    uint32_t[::1] point_ids,
    int64_t[::1] timestamps,
    double[::1] values,
    uint8_t[::1] quality,
    const int32_t[::1] slot_of,
    const int32_t[::1] window,
    const double[::1] k,
    const uint8_t[::1] action,
    double[::1] ring,
    double[::1] srt,
    int32_t[::1] count,
    int32_t[::1] pos,
    Py_ssize_t stride,
):
    """See filters_py.hampel: returns (kept, replaced, flagged, dropped)."""
    cdef Py_ssize_t n = check_columns(
        "hampel", point_ids.shape[0], timestamps.shape[0], values.shape[0], quality.shape[0]
    )
    cdef Py_ssize_t n_slots = window.shape[0]
    check_per_slot("hampel", n_slots, (k.shape[0], action.shape[0], count.shape[0], pos.shape[0]))
    check_per_slot("hampel", n_slots * stride, (ring.shape[0], srt.shape[0]))
    check_window("hampel", window, stride)
    cdef Py_ssize_t n_map = slot_of.shape[0]
    cdef Py_ssize_t i, kept = 0, replaced = 0, flagged = 0, dropped = 0, w, c, base
    cdef int32_t slot
    cdef uint32_t pid
    cdef uint8_t act
    cdef double x, m
    with nogil:
        for i in range(n):
            pid = point_ids[i]
            slot = slot_of[pid] if pid < n_map else -1
            if slot >= 0 and slot < n_slots:
                x = values[i]
                if quality[i] != GOOD or not isfinite(x):
                    count[slot] = 0
                    pos[slot] = 0
                else:
                    w = window[slot]
                    base = slot * stride
                    c = window_push(&ring[base], &srt[base], w, &count[slot], &pos[slot], x)
                    if c == w:
                        m = sorted_median(&srt[base], w)
                        if fabs(x - m) > k[slot] * sorted_mad(&srt[base], w, m):
                            act = action[slot]
                            if act == ACTION_DROP:
                                dropped += 1
                                continue
                            if act == ACTION_FLAG:
                                quality[i] = BAD
                                flagged += 1
                            else:
                                values[i] = m
                                replaced += 1
            if kept != i:
                point_ids[kept] = pid
                timestamps[kept] = timestamps[i]
                values[kept] = values[i]
                quality[kept] = quality[i]
            kept += 1
    return kept, replaced, flagged, dropped


def median(
    uint32_t[::1] point_ids,
    int64_t[::1] timestamps,
    double[::1] values,
    uint8_t[::1] quality,
    const int32_t[::1] slot_of,
    const int32_t[::1] window,
    double[::1] ring,
    double[::1] srt,
    int32_t[::1] count,
    int32_t[::1] pos,
    Py_ssize_t stride,
):
    """See filters_py.median (in place)."""
    cdef Py_ssize_t n = check_columns(
        "median", point_ids.shape[0], timestamps.shape[0], values.shape[0], quality.shape[0]
    )
    cdef Py_ssize_t n_slots = window.shape[0]
    check_per_slot("median", n_slots, (count.shape[0], pos.shape[0]))
    check_per_slot("median", n_slots * stride, (ring.shape[0], srt.shape[0]))
    check_window("median", window, stride)
    cdef Py_ssize_t n_map = slot_of.shape[0]
    cdef Py_ssize_t i, c, base
    cdef int32_t slot
    cdef uint32_t pid
    cdef double x
    with nogil:
        for i in range(n):
            pid = point_ids[i]
            slot = slot_of[pid] if pid < n_map else -1
            if slot >= 0 and slot < n_slots:
                x = values[i]
                if quality[i] != GOOD or not isfinite(x):
                    count[slot] = 0
                    pos[slot] = 0
                else:
                    base = slot * stride
                    c = window_push(
                        &ring[base], &srt[base], window[slot], &count[slot], &pos[slot], x
                    )
                    values[i] = sorted_median(&srt[base], c)


# -- in-place output with a spill (deadband, sdt): see filters_py._Output ------------------


cdef struct Sink:
    uint32_t* ids
    int64_t* ts
    double* values
    uint8_t* quality
    uint32_t* s_ids
    int64_t* s_ts
    double* s_values
    uint8_t* s_quality
    Py_ssize_t j  # next output row in the input columns
    Py_ssize_t head  # the FIFO of waiting rows: spill rows [head, tail)
    Py_ssize_t tail
    Py_ssize_t cap
    bint overflow  # cannot happen (the capacity is proven); guards memory all the same


cdef inline void sink_put(
    Sink* o, Py_ssize_t i, uint32_t pid, int64_t ts, double v, uint8_t q
) noexcept nogil:
    """Emits a row at step i (input row i already read)."""
    cdef Py_ssize_t k, m
    if o.head == o.tail and o.j <= i:
        o.ids[o.j] = pid
        o.ts[o.j] = ts
        o.values[o.j] = v
        o.quality[o.j] = q
        o.j += 1
        return
    if o.tail == o.cap:
        m = o.tail - o.head
        for k in range(m):
            o.s_ids[k] = o.s_ids[o.head + k]
            o.s_ts[k] = o.s_ts[o.head + k]
            o.s_values[k] = o.s_values[o.head + k]
            o.s_quality[k] = o.s_quality[o.head + k]
        o.head = 0
        o.tail = m
        if m == o.cap:
            o.overflow = True
            return
    o.s_ids[o.tail] = pid
    o.s_ts[o.tail] = ts
    o.s_values[o.tail] = v
    o.s_quality[o.tail] = q
    o.tail += 1


cdef inline void sink_flush(Sink* o, Py_ssize_t i) noexcept nogil:
    """Moves waiting rows into place now that input row i has been read."""
    while o.head < o.tail and o.j <= i:
        o.ids[o.j] = o.s_ids[o.head]
        o.ts[o.j] = o.s_ts[o.head]
        o.values[o.j] = o.s_values[o.head]
        o.quality[o.j] = o.s_quality[o.head]
        o.head += 1
        o.j += 1
    if o.head == o.tail:
        o.head = 0
        o.tail = 0


cdef inline Py_ssize_t sink_finish(Sink* o) noexcept nogil:
    """Moves the rows still waiting to the front of the spill; returns how many."""
    cdef Py_ssize_t k, m = o.tail - o.head
    if o.head:
        for k in range(m):
            o.s_ids[k] = o.s_ids[o.head + k]
            o.s_ts[k] = o.s_ts[o.head + k]
            o.s_values[k] = o.s_values[o.head + k]
            o.s_quality[k] = o.s_quality[o.head + k]
    return m


cdef inline int check_spill(
    str name,
    Py_ssize_t n,
    const uint8_t[::1] holding,
    Py_ssize_t n_slots,
    Py_ssize_t a,
    Py_ssize_t b,
    Py_ssize_t c,
    Py_ssize_t d,
) except -1:
    """The spill needs filters_py.spill_capacity rows: 2 min(n, holding) + 4."""
    cdef Py_ssize_t s, held = 0, need
    for s in range(n_slots):
        if holding[s] != 0:
            held += 1
    need = 2 * (held if held < n else n) + 4
    if a < need or b < need or c < need or d < need:
        raise ValueError(f"{name}: spill columns shorter than the held readings need")
    return 0


cdef inline void sink_start(
    Sink* o,
    uint32_t* ids,
    int64_t* ts,
    double* values,
    uint8_t* quality,
    uint32_t* s_ids,
    int64_t* s_ts,
    double* s_values,
    uint8_t* s_quality,
    Py_ssize_t cap,
) noexcept nogil:
    o.ids = ids
    o.ts = ts
    o.values = values
    o.quality = quality
    o.s_ids = s_ids
    o.s_ts = s_ts
    o.s_values = s_values
    o.s_quality = s_quality
    o.j = 0
    o.head = 0
    o.tail = 0
    o.cap = cap
    o.overflow = False


def deadband(
    uint32_t[::1] point_ids,
    int64_t[::1] timestamps,
    double[::1] values,
    uint8_t[::1] quality,
    uint32_t[::1] spill_ids,
    int64_t[::1] spill_ts,
    double[::1] spill_values,
    uint8_t[::1] spill_quality,
    const int32_t[::1] slot_of,
    const double[::1] band,
    const int64_t[::1] heartbeat,
    uint8_t[::1] has_sent,
    int64_t[::1] sent_ts,
    double[::1] sent_value,
    uint8_t[::1] has_held,
    int64_t[::1] held_ts,
    double[::1] held_value,
):
    """See filters_py.deadband: returns (kept, spilled, suppressed)."""
    cdef Py_ssize_t n = check_columns(
        "deadband", point_ids.shape[0], timestamps.shape[0], values.shape[0], quality.shape[0]
    )
    cdef Py_ssize_t n_slots = band.shape[0]
    check_per_slot(
        "deadband",
        n_slots,
        (heartbeat.shape[0], has_sent.shape[0], sent_ts.shape[0], sent_value.shape[0]),
    )
    check_per_slot(
        "deadband", n_slots, (has_held.shape[0], held_ts.shape[0], held_value.shape[0])
    )
    check_spill(
        "deadband", n, has_held, n_slots, spill_ids.shape[0], spill_ts.shape[0],
        spill_values.shape[0], spill_quality.shape[0],
    )
    cdef Sink o
    if n == 0:
        return 0, 0, 0
    sink_start(
        &o, &point_ids[0], &timestamps[0], &values[0], &quality[0], &spill_ids[0],
        &spill_ts[0], &spill_values[0], &spill_quality[0],
        min(spill_ids.shape[0], spill_ts.shape[0], spill_values.shape[0], spill_quality.shape[0]),
    )
    cdef Py_ssize_t n_map = slot_of.shape[0]
    cdef Py_ssize_t i, spilled, suppressed = 0
    cdef int32_t slot
    cdef uint32_t pid
    cdef int64_t ts
    cdef double x
    cdef uint8_t q
    cdef bint send
    with nogil:
        for i in range(n):
            pid = point_ids[i]
            ts = timestamps[i]
            x = values[i]
            q = quality[i]
            slot = slot_of[pid] if pid < n_map else -1
            send = True
            if slot >= 0 and slot < n_slots:
                if q != GOOD or not isfinite(x):
                    if has_held[slot]:
                        sink_put(&o, i, pid, held_ts[slot], held_value[slot], GOOD)
                        has_held[slot] = 0
                    has_sent[slot] = 0
                elif not has_sent[slot]:
                    has_sent[slot] = 1
                    sent_ts[slot] = ts
                    sent_value[slot] = x
                elif fabs(x - sent_value[slot]) > band[slot]:
                    if has_held[slot]:
                        sink_put(&o, i, pid, held_ts[slot], held_value[slot], GOOD)
                        has_held[slot] = 0
                    sent_ts[slot] = ts
                    sent_value[slot] = x
                elif heartbeat[slot] > 0 and (
                    ts < sent_ts[slot]
                    or <uint64_t>ts - <uint64_t>sent_ts[slot] >= <uint64_t>heartbeat[slot]
                ):
                    if has_held[slot]:
                        suppressed += 1
                        has_held[slot] = 0
                    sent_ts[slot] = ts
                    sent_value[slot] = x
                else:
                    if has_held[slot]:
                        suppressed += 1
                    has_held[slot] = 1
                    held_ts[slot] = ts
                    held_value[slot] = x
                    send = False
            if send:
                sink_put(&o, i, pid, ts, x, q)
            if o.head != o.tail:
                sink_flush(&o, i)
        spilled = sink_finish(&o)
    if o.overflow:
        raise ValueError("deadband: spill columns too short")
    return o.j, spilled, suppressed


def sdt(
    uint32_t[::1] point_ids,
    int64_t[::1] timestamps,
    double[::1] values,
    uint8_t[::1] quality,
    uint32_t[::1] spill_ids,
    int64_t[::1] spill_ts,
    double[::1] spill_values,
    uint8_t[::1] spill_quality,
    const int32_t[::1] slot_of,
    const double[::1] deviation,
    const int64_t[::1] max_interval,
    const int64_t[::1] min_interval,
    uint8_t[::1] has_a,
    int64_t[::1] a_ts,
    double[::1] a_value,
    uint8_t[::1] has_h,
    int64_t[::1] h_ts,
    double[::1] h_value,
    double[::1] door_lo,
    double[::1] door_hi,
):
    """See filters_py.sdt: returns (kept, spilled, suppressed)."""
    cdef Py_ssize_t n = check_columns(
        "sdt", point_ids.shape[0], timestamps.shape[0], values.shape[0], quality.shape[0]
    )
    cdef Py_ssize_t n_slots = deviation.shape[0]
    check_per_slot(
        "sdt",
        n_slots,
        (max_interval.shape[0], min_interval.shape[0], has_a.shape[0], a_ts.shape[0],
         a_value.shape[0]),
    )
    check_per_slot(
        "sdt",
        n_slots,
        (has_h.shape[0], h_ts.shape[0], h_value.shape[0], door_lo.shape[0], door_hi.shape[0]),
    )
    check_spill(
        "sdt", n, has_h, n_slots, spill_ids.shape[0], spill_ts.shape[0],
        spill_values.shape[0], spill_quality.shape[0],
    )
    cdef Sink o
    if n == 0:
        return 0, 0, 0
    sink_start(
        &o, &point_ids[0], &timestamps[0], &values[0], &quality[0], &spill_ids[0],
        &spill_ts[0], &spill_values[0], &spill_quality[0],
        min(spill_ids.shape[0], spill_ts.shape[0], spill_values.shape[0], spill_quality.shape[0]),
    )
    cdef Py_ssize_t n_map = slot_of.shape[0]
    cdef Py_ssize_t i, spilled, suppressed = 0
    cdef int32_t slot
    cdef uint32_t pid
    cdef int64_t ts, ta
    cdef uint64_t diff
    cdef double x, dt, va, s, dev, lo, hi
    cdef uint8_t q
    cdef bint send
    with nogil:
        for i in range(n):
            pid = point_ids[i]
            ts = timestamps[i]
            x = values[i]
            q = quality[i]
            slot = slot_of[pid] if pid < n_map else -1
            send = True
            if slot >= 0 and slot < n_slots:
                if q != GOOD or not isfinite(x):
                    if has_h[slot]:
                        sink_put(&o, i, pid, h_ts[slot], h_value[slot], GOOD)
                        has_h[slot] = 0
                    has_a[slot] = 0
                else:
                    send = False
                    while True:
                        ta = a_ts[slot]
                        if (
                            not has_a[slot]
                            or ts < ta
                            or (ts == ta and min_interval[slot] <= 0)
                        ):
                            if has_h[slot]:
                                sink_put(&o, i, pid, h_ts[slot], h_value[slot], GOOD)
                                has_h[slot] = 0
                            has_a[slot] = 1
                            a_ts[slot] = ts
                            a_value[slot] = x
                            door_lo[slot] = -INFINITY
                            door_hi[slot] = INFINITY
                            send = True
                            break
                        diff = <uint64_t>ts - <uint64_t>ta  # ts >= ta: exact
                        if min_interval[slot] > 0 and diff < <uint64_t>min_interval[slot]:
                            suppressed += 1
                            break
                        dt = <double>diff
                        va = a_value[slot]
                        s = (x - va) / dt
                        if has_h[slot] and (
                            s < door_lo[slot]
                            or s > door_hi[slot]
                            or (max_interval[slot] > 0 and diff > <uint64_t>max_interval[slot])
                        ):
                            sink_put(&o, i, pid, h_ts[slot], h_value[slot], GOOD)
                            has_h[slot] = 0
                            a_ts[slot] = h_ts[slot]
                            a_value[slot] = h_value[slot]
                            door_lo[slot] = -INFINITY
                            door_hi[slot] = INFINITY
                            continue
                        if has_h[slot]:
                            suppressed += 1
                        dev = deviation[slot]
                        lo = (x - dev - va) / dt
                        hi = (x + dev - va) / dt
                        if lo > door_lo[slot]:
                            door_lo[slot] = lo
                        if hi < door_hi[slot]:
                            door_hi[slot] = hi
                        has_h[slot] = 1
                        h_ts[slot] = ts
                        h_value[slot] = x
                        break
            if send:
                sink_put(&o, i, pid, ts, x, q)
            if o.head != o.tail:
                sink_flush(&o, i)
        spilled = sink_finish(&o)
    if o.overflow:
        raise ValueError("sdt: spill columns too short")
    return o.j, spilled, suppressed


def ratelimit(
    uint32_t[::1] point_ids,
    int64_t[::1] timestamps,
    double[::1] values,
    uint8_t[::1] quality,
    const int32_t[::1] slot_of,
    const double[::1] max_rate,
    const uint8_t[::1] action,
    uint8_t[::1] has_last,
    int64_t[::1] last_ts,
    double[::1] last_value,
):
    """See filters_py.ratelimit: returns (kept, clamped, flagged, dropped)."""
    cdef Py_ssize_t n = check_columns(
        "ratelimit", point_ids.shape[0], timestamps.shape[0], values.shape[0], quality.shape[0]
    )
    cdef Py_ssize_t n_slots = max_rate.shape[0]
    check_per_slot(
        "ratelimit",
        n_slots,
        (action.shape[0], has_last.shape[0], last_ts.shape[0], last_value.shape[0]),
    )
    cdef Py_ssize_t n_map = slot_of.shape[0]
    cdef Py_ssize_t i, kept = 0, clamped = 0, flagged = 0, dropped = 0
    cdef int32_t slot
    cdef uint32_t pid
    cdef uint8_t act
    cdef int64_t ts
    cdef double x, dt, v, d, step
    with nogil:
        for i in range(n):
            pid = point_ids[i]
            slot = slot_of[pid] if pid < n_map else -1
            if slot >= 0 and slot < n_slots:
                ts = timestamps[i]
                x = values[i]
                if quality[i] != GOOD or not isfinite(x):
                    has_last[slot] = 0
                elif not has_last[slot] or ts <= last_ts[slot]:
                    has_last[slot] = 1
                    last_ts[slot] = ts
                    last_value[slot] = x
                else:
                    dt = <double>(<uint64_t>ts - <uint64_t>last_ts[slot]) / 1000.0
                    v = last_value[slot]
                    d = x - v
                    if fabs(d) / dt > max_rate[slot]:
                        act = action[slot]
                        if act == ACTION_DROP:
                            dropped += 1
                            continue
                        if act == ACTION_FLAG:
                            quality[i] = BAD
                            flagged += 1
                        else:
                            step = max_rate[slot] * dt
                            x = v + step if d > 0.0 else v - step
                            values[i] = x
                            last_ts[slot] = ts
                            last_value[slot] = x
                            clamped += 1
                    else:
                        last_ts[slot] = ts
                        last_value[slot] = x
            if kept != i:
                point_ids[kept] = pid
                timestamps[kept] = timestamps[i]
                values[kept] = values[i]
                quality[kept] = quality[i]
            kept += 1
    return kept, clamped, flagged, dropped


def ema(
    const uint32_t[::1] point_ids,
    const int64_t[::1] timestamps,
    double[::1] values,
    const uint8_t[::1] quality,
    const int32_t[::1] slot_of,
    const double[::1] alpha,
    const double[::1] tau,
    uint8_t[::1] has_y,
    int64_t[::1] last_ts,
    double[::1] y,
):
    """See filters_py.ema (in place)."""
    cdef Py_ssize_t n = check_columns(
        "ema", point_ids.shape[0], timestamps.shape[0], values.shape[0], quality.shape[0]
    )
    cdef Py_ssize_t n_slots = alpha.shape[0]
    check_per_slot(
        "ema", n_slots, (tau.shape[0], has_y.shape[0], last_ts.shape[0], y.shape[0])
    )
    cdef Py_ssize_t n_map = slot_of.shape[0]
    cdef Py_ssize_t i
    cdef int32_t slot
    cdef uint32_t pid
    cdef int64_t ts
    cdef double x, yy, t
    with nogil:
        for i in range(n):
            pid = point_ids[i]
            slot = slot_of[pid] if pid < n_map else -1
            if slot >= 0 and slot < n_slots:
                x = values[i]
                if quality[i] != GOOD or not isfinite(x):
                    has_y[slot] = 0
                    continue
                ts = timestamps[i]
                if not has_y[slot]:
                    has_y[slot] = 1
                    yy = x
                else:
                    yy = y[slot]
                    t = tau[slot]
                    if t <= 0.0:
                        yy = yy + alpha[slot] * (x - yy)
                    elif ts > last_ts[slot]:
                        yy = yy + (
                            1.0 - exp(-(<double>(<uint64_t>ts - <uint64_t>last_ts[slot])) / t)
                        ) * (x - yy)
                    if not isfinite(yy):
                        yy = x
                y[slot] = yy
                last_ts[slot] = ts
                values[i] = yy
