"""Pure-Python twin of ``_aggregate.pyx``: tumbling-window aggregates, the reference.

Same signatures, same in-place effects, same results bit for bit as the compiled module;
``native.impl.kernels("aggregate")`` picks one and ``native.aggregate.AggregateTable``
calls it. The kernels know nothing of specs: the table compiles them into arrays by slot.

Windows. A point's windows are ``[k * window_ms, (k + 1) * window_ms)`` for integer k
(aligned to the epoch; the start of a reading's window is ``ts - (ts mod window_ms)``
with the floor modulo, so negative timestamps fall in the window below them too). A start
below INT64_MIN (only for timestamps within one window of it) is clamped to INT64_MIN.

State per slot. ``phase``: NEVER (no window yet), OPEN (a window at ``start`` holds
``count`` >= 1 readings) or CLOSED (the window at ``start`` was emitted and nothing is open).
``acc[slot * ACC : (slot + 1) * ACC]``: sum, min, max, last, mean, M2 (Welford), energy
(sum of pow(10, L / 10), kept only when the slot has ``laeq``, else 0). ``deadline``: when
the open window closes by time, on the pipeline's monotonic clock (see below).

Two clocks: ``now_ms`` is the wall clock (0 means "no clock": then only readings close
windows), ``elapsed_ms`` the pipeline's monotonic clock (native/pipeline.py). Windows are
in the readings' time; the timed close is measured on the monotonic clock, so a step of
the wall clock neither closes windows early nor holds them open.

Per reading, in input order:

* point without the stage (id past ``slot_of`` or slot -1), quality not GOOD, or value not
  finite: copied to the output unchanged; the window is not touched (faults stay visible).
* otherwise, with ``s`` its window start:

  - ``s`` is after ``start`` (or the point has no window yet): the open window, if any, is
    closed (its aggregates are written first), and a window at ``s`` opens with this value,
    its ``deadline`` set by ``deadline_of``;
  - ``s == start`` and the window is open: the value is added to it;
  - else (``s`` before ``start``, or ``s == start`` of a window already emitted): *late*,
    counted and not aggregated; it passes through unchanged (whatever ``raw`` says: a late
    reading is never lost silently, and a window is never emitted twice).

  An aggregated reading is copied to the output too when its slot's ``raw`` is set; when
  not, it is counted as suppressed.

After the readings, when ``now_ms != 0`` and ``close_by_time`` (False: a part of a run
that more parts follow, native/pipeline.py), every OPEN window whose deadline has come
(``closes_by_time``) is closed, in slot order. ``phase`` becomes CLOSED, so readings for it
that come later are late. A window opened in a run never closes by time in that run (its
deadline is past ``elapsed_ms``).

Closing writes one reading per function of the slot, in the slot's order of functions
(``fcode[slot * MAX_FN + k]`` for k < ``nfn[slot]``), under ``fout[slot * MAX_FN + k]``,
stamped ``start``, quality GOOD:

  min, max, sum, last (the last value aggregated, by arrival), count (as float),
  mean = Welford's running mean, std = sqrt(M2 / count) (population; 0 for one reading;
  NaN if M2 went negative, which only overflow can cause),
  laeq = 10 * log10(energy / count) (-inf when every pow underflowed to 0).

``aggregate_size`` computes the exact number of output rows a call of ``aggregate`` with
the same arguments will write (without changing any state), so the caller sizes the
output columns exactly.
"""

from __future__ import annotations

import math
from array import array

# function codes: index in this tuple (same order as native.stages.AGGREGATE_FUNCTIONS)
FUNCTIONS = ("min", "max", "mean", "sum", "count", "last", "std", "laeq")
FN_MIN, FN_MAX, FN_MEAN, FN_SUM, FN_COUNT, FN_LAST, FN_STD, FN_LAEQ = range(8)
MAX_FN = 8  # function slots per point in fcode/fout (padded)

# phase of a slot's window
NEVER = 0
OPEN = 1
CLOSED = 2

# acc layout per slot
ACC = 7
A_SUM, A_MIN, A_MAX, A_LAST, A_MEAN, A_M2, A_ENERGY = range(ACC)

GOOD = 0  # native.batch.GOOD; repeated so the kernels import nothing
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def window_start(ts: int, window_ms: int) -> int:
    """Start of the epoch-aligned window of ``window_ms`` holding ``ts`` (floor), clamped
    to INT64_MIN."""
    s = ts - ts % window_ms  # Python's % is the floor modulo
    return s if s >= INT64_MIN else INT64_MIN


def deadline_of(
    ts: int, start: int, window_ms: int, grace_ms: int, now_ms: int, elapsed_ms: int
) -> int:
    """The monotonic deadline of the window at ``start`` that the reading at ``ts``, arriving
    at ``elapsed_ms``, opens: the time left until the window's end as the reading's own
    timestamp sees it, plus the grace less the reading's delay (its age by the wall clock,
    counted only up to the grace). So the wall clock moves the close within the grace at
    most; without a step it closes when the wall clock passes end + grace, as long as
    readings arrive within the grace. INT64_MAX (past int64): never by time."""
    lag = 0 if now_ms == 0 or now_ms <= ts else min(now_ms - ts, grace_ms)
    deadline = elapsed_ms + (window_ms - (ts - start)) + (grace_ms - lag)
    return deadline if deadline < INT64_MAX else INT64_MAX


def closes_by_time(deadline: int, now_ms: int, elapsed_ms: int) -> bool:
    """Whether the clock closes a window with this ``deadline`` (never without a clock)."""
    return now_ms != 0 and deadline != INT64_MAX and elapsed_ms >= deadline


def _energy(x: float) -> float:
    try:
        return math.pow(10.0, x / 10.0)
    except OverflowError:  # libm returns inf there, and so does the compiled kernel
        return math.inf


def _check(
    point_ids: array[int],
    timestamps: array[int],
    values: array[float],
    quality: array[int],
    slot_of: array[int],
    window_ms: array[int],
    grace_ms: array[int],
    raw: array[int],
    nfn: array[int],
    phase: array[int],
    start: array[int],
    deadline: array[int],
) -> None:
    n = len(point_ids)
    if not (len(timestamps) == len(values) == len(quality) == n):
        raise ValueError("aggregate: columns differ in length")
    ns = len(window_ms)
    sizes = (len(grace_ms), len(raw), len(nfn), len(phase), len(start), len(deadline))
    if any(k != ns for k in sizes):
        raise ValueError("aggregate: slot arrays differ in length")
    if any(w <= 0 for w in window_ms) or any(g < 0 for g in grace_ms):
        raise ValueError("aggregate: window must be > 0 and grace >= 0")
    if any(k > MAX_FN for k in nfn):
        raise ValueError("aggregate: more than 8 functions for a slot")


def aggregate_size(
    point_ids: array[int],
    timestamps: array[int],
    values: array[float],
    quality: array[int],
    slot_of: array[int],
    window_ms: array[int],
    grace_ms: array[int],
    raw: array[int],
    nfn: array[int],
    phase: array[int],
    start: array[int],
    deadline: array[int],
    now_ms: int,
    elapsed_ms: int,
    close_by_time: bool = True,
) -> int:
    """The number of rows ``aggregate`` will write for these arguments. Changes nothing:
    it plays the window decisions on copies of ``phase``, ``start`` and ``deadline``."""
    _check(
        point_ids, timestamps, values, quality, slot_of, window_ms, grace_ms, raw, nfn,
        phase, start, deadline,
    )  # fmt: skip
    ph = phase.tolist()
    st = start.tolist()
    dl = deadline.tolist()
    n_slot_of = len(slot_of)
    n_out = 0
    for i in range(len(point_ids)):
        pid = point_ids[i]
        slot = slot_of[pid] if pid < n_slot_of else -1
        if slot >= len(ph):
            raise ValueError("aggregate: slot_of points past the slot arrays")
        if slot < 0 or quality[i] != GOOD or not math.isfinite(values[i]):
            n_out += 1
            continue
        s = window_start(timestamps[i], window_ms[slot])
        p = ph[slot]
        if p == NEVER or s > st[slot]:
            if p == OPEN:
                n_out += nfn[slot]
            ph[slot] = OPEN
            st[slot] = s
            dl[slot] = deadline_of(
                timestamps[i], s, window_ms[slot], grace_ms[slot], now_ms, elapsed_ms
            )
            n_out += raw[slot] != 0
        elif p == OPEN and s == st[slot]:
            n_out += raw[slot] != 0
        else:
            n_out += 1  # late
    for slot in range(len(ph) if close_by_time else 0):
        if ph[slot] == OPEN and closes_by_time(dl[slot], now_ms, elapsed_ms):
            n_out += nfn[slot]
    return n_out


def _emit(
    slot: int,
    nfn: array[int],
    fcode: array[int],
    fout: array[int],
    start: array[int],
    count: array[int],
    acc: array[float],
    out_ids: array[int],
    out_ts: array[int],
    out_values: array[float],
    out_quality: array[int],
    n_out: int,
) -> int:
    """Writes the aggregates of ``slot``'s window at ``n_out``; returns the new ``n_out``."""
    a = slot * ACC
    cnt = count[slot]
    ts = start[slot]
    for k in range(nfn[slot]):
        code = fcode[slot * MAX_FN + k]
        if code == FN_MIN:
            v = acc[a + A_MIN]
        elif code == FN_MAX:
            v = acc[a + A_MAX]
        elif code == FN_MEAN:
            v = acc[a + A_MEAN]
        elif code == FN_SUM:
            v = acc[a + A_SUM]
        elif code == FN_COUNT:
            v = float(cnt)
        elif code == FN_LAST:
            v = acc[a + A_LAST]
        elif code == FN_STD:
            var = acc[a + A_M2] / cnt
            v = math.nan if var < 0.0 else math.sqrt(var)
        else:  # FN_LAEQ
            e = acc[a + A_ENERGY] / cnt
            v = 10.0 * math.log10(e) if e > 0.0 else -math.inf
        out_ids[n_out] = fout[slot * MAX_FN + k]
        out_ts[n_out] = ts
        out_values[n_out] = v
        out_quality[n_out] = GOOD
        n_out += 1
    return n_out


def aggregate(
    point_ids: array[int],
    timestamps: array[int],
    values: array[float],
    quality: array[int],
    slot_of: array[int],
    window_ms: array[int],
    grace_ms: array[int],
    raw: array[int],
    nfn: array[int],
    fcode: array[int],
    fout: array[int],
    phase: array[int],
    start: array[int],
    count: array[int],
    acc: array[float],
    deadline: array[int],
    now_ms: int,
    elapsed_ms: int,
    out_ids: array[int],
    out_ts: array[int],
    out_values: array[float],
    out_quality: array[int],
    close_by_time: bool = True,
) -> tuple[int, int, int, int]:
    """Runs the windows over one batch (see the module docstring); returns
    ``(n_out, windows, late, suppressed)``. Writes the output rows to the ``out_*``
    columns (which must hold ``aggregate_size(...)`` rows; more are left as they are) and
    updates ``phase``, ``start``, ``count``, ``acc`` and ``deadline`` in place.

    Slot arrays: ``window_ms``/``grace_ms`` (int64), ``raw`` (uint8, 0/1), ``nfn``
    (uint8, 1..8), ``fcode`` (uint8, MAX_FN per slot), ``fout`` (uint32, MAX_FN per slot),
    state ``phase`` (uint8), ``start`` (int64), ``count`` (int64), ``acc`` (double, ACC
    per slot), ``deadline`` (int64). ``slot_of``: int32 by point id, -1 for points without
    the stage."""
    _check(
        point_ids, timestamps, values, quality, slot_of, window_ms, grace_ms, raw, nfn,
        phase, start, deadline,
    )  # fmt: skip
    ns = len(window_ms)
    if len(fcode) != ns * MAX_FN or len(fout) != ns * MAX_FN:
        raise ValueError("aggregate: fcode/fout must hold 8 entries per slot")
    if len(count) != ns or len(acc) != ns * ACC:
        raise ValueError("aggregate: state arrays differ in length")
    cap = len(out_ids)
    if not (len(out_ts) == len(out_values) == len(out_quality) == cap):
        raise ValueError("aggregate: output columns differ in length")
    # which slots keep the laeq energy (pow per reading only where it is wanted)
    has_laeq = [FN_LAEQ in fcode[s * MAX_FN : s * MAX_FN + nfn[s]] for s in range(ns)]

    def room(k: int) -> None:
        if n_out + k > cap:
            raise ValueError("aggregate: output columns shorter than aggregate_size")

    n_slot_of = len(slot_of)
    n_out = windows = late = suppressed = 0
    for i in range(len(point_ids)):
        pid = point_ids[i]
        x = values[i]
        slot = slot_of[pid] if pid < n_slot_of else -1
        if slot >= ns:
            raise ValueError("aggregate: slot_of points past the slot arrays")
        aggregated = False
        if slot >= 0 and quality[i] == GOOD and math.isfinite(x):
            s = window_start(timestamps[i], window_ms[slot])
            p = phase[slot]
            a = slot * ACC
            if p == NEVER or s > start[slot]:
                if p == OPEN:
                    room(nfn[slot])
                    n_out = _emit(
                        slot, nfn, fcode, fout, start, count, acc,
                        out_ids, out_ts, out_values, out_quality, n_out,
                    )  # fmt: skip
                    windows += 1
                phase[slot] = OPEN
                start[slot] = s
                deadline[slot] = deadline_of(
                    timestamps[i], s, window_ms[slot], grace_ms[slot], now_ms, elapsed_ms
                )
                count[slot] = 1
                acc[a + A_SUM] = x
                acc[a + A_MIN] = x
                acc[a + A_MAX] = x
                acc[a + A_LAST] = x
                acc[a + A_MEAN] = x
                acc[a + A_M2] = 0.0
                acc[a + A_ENERGY] = _energy(x) if has_laeq[slot] else 0.0
                aggregated = True
            elif p == OPEN and s == start[slot]:
                cnt = count[slot] + 1
                count[slot] = cnt
                acc[a + A_SUM] += x
                if x < acc[a + A_MIN]:
                    acc[a + A_MIN] = x
                if x > acc[a + A_MAX]:
                    acc[a + A_MAX] = x
                acc[a + A_LAST] = x
                # Welford: mean += d / n; M2 += d * (x - new mean)
                d = x - acc[a + A_MEAN]
                mean = acc[a + A_MEAN] + d / cnt
                acc[a + A_MEAN] = mean
                acc[a + A_M2] += d * (x - mean)
                if has_laeq[slot]:
                    acc[a + A_ENERGY] += _energy(x)
                aggregated = True
            else:
                late += 1
        if aggregated and not raw[slot]:
            suppressed += 1
            continue
        room(1)
        out_ids[n_out] = pid
        out_ts[n_out] = timestamps[i]
        out_values[n_out] = x
        out_quality[n_out] = quality[i]
        n_out += 1
    for slot in range(ns if close_by_time else 0):
        if phase[slot] == OPEN and closes_by_time(deadline[slot], now_ms, elapsed_ms):
            room(nfn[slot])
            n_out = _emit(
                slot, nfn, fcode, fout, start, count, acc,
                out_ids, out_ts, out_values, out_quality, n_out,
            )  # fmt: skip
            windows += 1
            phase[slot] = CLOSED
    return n_out, windows, late, suppressed
