# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Compiled alarm kernel; ``alarms_py.py`` is the pure-Python twin and the reference
(the rules, the state and the event columns are documented there)."""

from libc.math cimport NAN, fabs, isfinite
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t

# Same values as alarms_py.RULE_* and native.batch.GOOD.
cdef enum:
    RULE_NONE = 0
    RULE_ABOVE = 1
    RULE_BELOW = 2
    RULE_RATE = 3
    RULE_STALE = 4
    RULE_FLATLINE = 5
    RULE_BAD_QUALITY = 6
    GOOD = 0


cdef struct Events:
    int32_t *slot
    uint8_t *raised
    int64_t *ts
    double *value
    int64_t *since
    Py_ssize_t n


cdef inline void _emit(Events *e, int32_t s, uint8_t up, int64_t ts, double v,
                       int64_t since) noexcept nogil:
    cdef Py_ssize_t k = e.n
    e.slot[k] = s
    e.raised[k] = up
    e.ts[k] = ts
    e.value[k] = v
    e.since[k] = since
    e.n = k + 1


cdef inline bint _elapsed(int64_t ts, int64_t t0, int64_t span) noexcept nogil:
    # ts - t0 >= span without int64 overflow: the unsigned difference is exact when ts >= t0
    return ts >= t0 and (span <= 0 or <uint64_t>ts - <uint64_t>t0 >= <uint64_t>span)


def evaluate(
    const uint32_t[::1] point_ids,
    const int64_t[::1] timestamps,
    const double[::1] values,
    const uint8_t[::1] quality,
    int64_t now_ms,
    int64_t elapsed_ms,
    const int32_t[::1] slot_of,
    const uint8_t[::1] rule,
    const double[::1] level,
    const double[::1] clear_level,
    const int64_t[::1] span,
    uint8_t[::1] raised,
    uint8_t[::1] active,
    int64_t[::1] t0,
    double[::1] v0,
    int64_t[::1] count,
    int64_t[::1] raised_at,
    int64_t[::1] seen,
    int32_t[::1] ev_slot,
    uint8_t[::1] ev_raised,
    int64_t[::1] ev_ts,
    double[::1] ev_value,
    int64_t[::1] ev_since,
):
    """See alarms_py.evaluate: returns the number of events written."""
    cdef Py_ssize_t n = point_ids.shape[0]
    cdef Py_ssize_t n_slots = rule.shape[0]
    cdef Py_ssize_t n_table = slot_of.shape[0]
    cdef Py_ssize_t cap = n + n_slots
    cdef Py_ssize_t i
    cdef int32_t s
    cdef uint32_t pid
    cdef uint8_t r
    cdef bint good, hit
    cdef int64_t ts
    cdef double v, dt, rate
    cdef Events e
    if timestamps.shape[0] != n or values.shape[0] != n or quality.shape[0] != n:
        raise ValueError("alarms.evaluate: columns differ in length")
    if (
        level.shape[0] != n_slots or clear_level.shape[0] != n_slots
        or span.shape[0] != n_slots or raised.shape[0] != n_slots
        or active.shape[0] != n_slots or t0.shape[0] != n_slots
        or v0.shape[0] != n_slots or count.shape[0] != n_slots
        or raised_at.shape[0] != n_slots or seen.shape[0] != n_slots
    ):
        raise ValueError("alarms.evaluate: parameter and state arrays differ in length")
    if (
        ev_slot.shape[0] < cap or ev_raised.shape[0] < cap or ev_ts.shape[0] < cap
        or ev_value.shape[0] < cap or ev_since.shape[0] < cap
    ):
        raise ValueError("alarms.evaluate: event arrays shorter than readings + slots")
    e.n = 0
    if cap == 0:
        return 0
    e.slot = &ev_slot[0]
    e.raised = &ev_raised[0]
    e.ts = &ev_ts[0]
    e.value = &ev_value[0]
    e.since = &ev_since[0]
    with nogil:
        for i in range(n):
            pid = point_ids[i]
            if pid >= n_table:
                continue
            s = slot_of[pid]
            if s < 0 or s >= n_slots:
                continue
            r = rule[s]
            ts = timestamps[i]
            v = values[i]
            good = quality[i] == GOOD
            if r == RULE_ABOVE or r == RULE_BELOW:
                if not (good and isfinite(v)):
                    active[s] = 0  # interrupts a pending run; a raised alarm stays
                elif raised[s]:
                    if r == RULE_ABOVE:
                        hit = v <= clear_level[s]
                    else:
                        hit = v >= clear_level[s]
                    if hit:
                        raised[s] = 0
                        _emit(&e, s, 0, ts, v, raised_at[s])
                else:
                    if r == RULE_ABOVE:
                        hit = v > level[s]
                    else:
                        hit = v < level[s]
                    if hit:
                        if not active[s]:
                            active[s] = 1
                            t0[s] = ts
                        if _elapsed(ts, t0[s], span[s]):
                            raised[s] = 1
                            raised_at[s] = ts
                            active[s] = 0
                            _emit(&e, s, 1, ts, v, t0[s])
                    else:
                        active[s] = 0
            elif r == RULE_RATE:
                if not (good and isfinite(v)):
                    continue
                if active[s] and ts > t0[s]:
                    dt = <double>(<uint64_t>ts - <uint64_t>t0[s])
                    rate = fabs(v - v0[s]) / (dt / 1000.0)
                    if rate > level[s]:
                        if not raised[s]:
                            raised[s] = 1
                            raised_at[s] = ts
                            _emit(&e, s, 1, ts, v, t0[s])
                    elif raised[s]:
                        raised[s] = 0
                        _emit(&e, s, 0, ts, v, raised_at[s])
                active[s] = 1
                t0[s] = ts
                v0[s] = v
            elif r == RULE_STALE:
                active[s] = 1
                t0[s] = ts
                seen[s] = elapsed_ms
                if raised[s]:
                    raised[s] = 0
                    _emit(&e, s, 0, ts, v, raised_at[s])
            elif r == RULE_FLATLINE:
                if not (good and isfinite(v)):
                    continue
                if active[s] and fabs(v - v0[s]) <= level[s]:
                    if not raised[s] and _elapsed(ts, t0[s], span[s]):
                        raised[s] = 1
                        raised_at[s] = ts
                        _emit(&e, s, 1, ts, v, t0[s])
                else:
                    active[s] = 1
                    v0[s] = v
                    t0[s] = ts
                    if raised[s]:
                        raised[s] = 0
                        _emit(&e, s, 0, ts, v, raised_at[s])
            elif r == RULE_BAD_QUALITY:
                if not good:
                    if count[s] == 0:
                        t0[s] = ts
                    if count[s] < span[s]:
                        count[s] += 1
                    if not raised[s] and count[s] >= span[s]:
                        raised[s] = 1
                        raised_at[s] = ts
                        _emit(&e, s, 1, ts, v, t0[s])
                else:
                    count[s] = 0
                    if raised[s]:
                        raised[s] = 0
                        _emit(&e, s, 0, ts, v, raised_at[s])

        if now_ms != 0:
            for s in range(<int32_t>n_slots):
                if rule[s] != RULE_STALE:
                    continue
                if not active[s]:
                    active[s] = 1
                    t0[s] = now_ms
                    seen[s] = elapsed_ms
                if not raised[s] and _elapsed(elapsed_ms, seen[s], span[s]):
                    raised[s] = 1
                    raised_at[s] = now_ms
                    _emit(&e, s, 1, now_ms, NAN, t0[s])
    return e.n
