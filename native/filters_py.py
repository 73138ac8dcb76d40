"""Pure-Python twins of the filter kernels in ``_filters.pyx``, and their reference.

One kernel per stage type (hampel, median, deadband, sdt, ratelimit, ema). Each makes
one pass over a batch's four columns; a point's parameters and state live in arrays
indexed by its *slot* (``slot_of[pid]``; -1, an id past the end of ``slot_of`` or a slot
past the parameter arrays means "no such stage": the reading passes through, in order).

Shared rules:

* A reading the filter cannot judge (quality not GOOD, or a NaN/inf value) passes
  through untouched and resets the point's state; deadband and sdt first emit the
  reading they were holding back, then the bad one.
* Time differences are taken exactly on the int64 timestamps (Python ints here,
  ``uint64`` differences of ordered operands in C, so nothing overflows) and turned into
  doubles only for arithmetic (slopes, rates, exp).
* Only + - * / and ``exp``/``fabs``/``isfinite`` on doubles, in the same order as the
  compiled kernels, so both give identical bits. No division by zero is possible
  (every divisor is a positive time difference or a positive tau).
* Kernels raise ValueError only on inconsistent array lengths, never on data.

All kernels work in place. Hampel and ratelimit compact the columns when they drop
readings (the first ``kept`` rows are the result). Deadband and sdt mostly drop rows
too, but can emit a held reading of an earlier batch next to the current one: the few
rows that would overtake the input wait and, when the output is longer than the input,
end up in small spill columns the caller appends (``_Output``).
"""

from __future__ import annotations

import math
from array import array
from collections import deque

GOOD = 0  # native.batch.GOOD / BAD, repeated so the kernels import nothing
BAD = 1

# Per-slot actions of hampel and ratelimit.
ACTION_FIX = 0  # hampel: replace the value by the window's median; ratelimit: clamp it
ACTION_FLAG = 1  # set quality BAD, keep the reading
ACTION_DROP = 2  # remove the reading

_INF = math.inf
_isfinite = math.isfinite
_exp = math.exp


def _columns(name: str, point_ids: array[int], *cols: array[int] | array[float]) -> int:
    n = len(point_ids)
    if any(len(c) != n for c in cols):
        raise ValueError(f"{name}: columns differ in length")
    return n


def spill_capacity(n: int, holding: array[int], n_slots: int) -> int:
    """Rows of spill columns deadband and sdt need for ``n`` input rows (see _Output)."""
    return 2 * min(n, n_slots - holding[:n_slots].count(0)) + 4


def _spill_room(
    name: str, n: int, holding: array[int], n_slots: int, *cols: array[int] | array[float]
) -> None:
    need = spill_capacity(n, holding, n_slots)
    if any(len(c) < need for c in cols):
        raise ValueError(f"{name}: spill columns shorter than the held readings need")


def _per_slot(name: str, n_slots: int, *arrays: array[int] | array[float]) -> None:
    if any(len(a) < n_slots for a in arrays):
        raise ValueError(f"{name}: parameter or state arrays shorter than the slot count")


# -- sorted window (hampel, median) ------------------------------------------------------
#
# Per slot, ``stride`` doubles of ``ring`` hold the last ``w`` good raw values in arrival
# order (``pos`` = where the next one goes, the oldest when the window is full) and the
# same stride of ``srt`` holds those values sorted ascending. While the window fills, a
# push inserts the new value (from the top, shifting right); once it is full, the new
# value overwrites the oldest one in the sorted copy (found by a linear scan) and moves
# to its rank, shifting the values in between: O(w) per reading, no allocation.


def _window_check(name: str, window: array[int], stride: int) -> None:
    if len(window) and (min(window) < 1 or max(window) > stride):
        raise ValueError(f"{name}: a window is outside 1..stride")


def _window_push(
    ring: array[float], srt: array[float], base: int, w: int, cnt: int, pos: int, x: float
) -> tuple[int, int]:
    """Adds ``x`` to the window at ``base``; returns the new (count, pos)."""
    if cnt < 0 or cnt > w or pos < 0 or pos >= w:  # never from this code: a foreign state
        cnt = 0
        pos = 0
    if cnt == w:
        # full: the new value takes the oldest one's place in the sorted copy, then
        # moves to its rank (after the values equal to it, as an insertion would)
        old = ring[base + pos]
        j = base
        last = base + cnt - 1
        while j < last and srt[j] != old:
            j += 1
        if x > old:
            while j < last and srt[j + 1] <= x:
                srt[j] = srt[j + 1]
                j += 1
        else:
            while j > base and srt[j - 1] > x:
                srt[j] = srt[j - 1]
                j -= 1
    else:
        j = base + cnt
        while j > base and srt[j - 1] > x:
            srt[j] = srt[j - 1]
            j -= 1
        cnt += 1
    srt[j] = x
    ring[base + pos] = x
    pos += 1
    if pos == w:
        pos = 0
    return cnt, pos


def _mid(a: float, b: float) -> float:
    """(a + b) / 2, or a / 2 + b / 2 when the sum overflows."""
    m = (a + b) / 2.0
    if math.isinf(m):
        m = a / 2.0 + b / 2.0
    return m


def _sorted_median(srt: array[float], base: int, k: int) -> float:
    h = k // 2
    if k & 1:
        return srt[base + h]
    return _mid(srt[base + h - 1], srt[base + h])


def _sorted_mad(srt: array[float], base: int, k: int, m: float) -> float:
    """Median of |v - m| over the ``k`` sorted values at ``base``, ``m`` their median.

    Split at h = k // 2: going down from h - 1 the deviations m - v grow, going up from
    h the deviations v - m grow, so merging the two runs from the middle outwards yields
    the deviations in ascending order; the (h)-th (and (h-1)-th) of them is the median.
    """
    h = k // 2
    lo = base + h - 1
    hi = base + h
    end = base + k
    prev = cur = 0.0
    for _ in range(h + 1):
        if lo >= base and (hi >= end or m - srt[lo] <= srt[hi] - m):
            d = m - srt[lo]
            lo -= 1
        else:
            d = srt[hi] - m
            hi += 1
        prev = cur
        cur = d
    if k & 1:
        return cur
    return _mid(prev, cur)


def hampel(
    point_ids: array[int],
    timestamps: array[int],
    values: array[float],
    quality: array[int],
    slot_of: array[int],
    window: array[int],
    k: array[float],
    action: array[int],
    ring: array[float],
    srt: array[float],
    count: array[int],
    pos: array[int],
    stride: int,
) -> tuple[int, int, int, int]:
    """Causal Hampel filter; returns (kept, replaced, flagged, dropped).

    The new good reading x joins the point's window of its last ``window[slot]`` good raw
    values; once the window is full, m = median, MAD = median |v - m|, and x is a spike
    when |x - m| > k[slot] * MAD (``k`` = threshold * 1.4826, strictly greater: with
    MAD == 0 every x != m is one). A spike is replaced by m (ACTION_FIX, quality kept),
    flagged BAD or dropped (compacting the columns in place). The window keeps raw
    values, never the replacements. Unjudgeable readings empty the window.
    """
    n = _columns("hampel", point_ids, timestamps, values, quality)
    n_slots = len(window)
    _per_slot("hampel", n_slots, k, action, count, pos)
    _per_slot("hampel", n_slots * stride, ring, srt)
    _window_check("hampel", window, stride)
    n_map = len(slot_of)
    kept = replaced = flagged = dropped = 0
    for i in range(n):
        pid = point_ids[i]
        slot = slot_of[pid] if pid < n_map else -1
        if 0 <= slot < n_slots:
            x = values[i]
            if quality[i] != GOOD or not _isfinite(x):
                count[slot] = 0
                pos[slot] = 0
            else:
                w = window[slot]
                base = slot * stride
                c, p = _window_push(ring, srt, base, w, count[slot], pos[slot], x)
                count[slot] = c
                pos[slot] = p
                if c == w:
                    m = _sorted_median(srt, base, w)
                    if abs(x - m) > k[slot] * _sorted_mad(srt, base, w, m):
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
    point_ids: array[int],
    timestamps: array[int],
    values: array[float],
    quality: array[int],
    slot_of: array[int],
    window: array[int],
    ring: array[float],
    srt: array[float],
    count: array[int],
    pos: array[int],
    stride: int,
) -> None:
    """Rolling median, in place: a good reading's value becomes the median of the point's
    last ``window[slot]`` good raw values, itself included (fewer while the window fills;
    an even count takes the mean of the two middle values). Quality is kept."""
    n = _columns("median", point_ids, timestamps, values, quality)
    n_slots = len(window)
    _per_slot("median", n_slots, count, pos)
    _per_slot("median", n_slots * stride, ring, srt)
    _window_check("median", window, stride)
    n_map = len(slot_of)
    for i in range(n):
        pid = point_ids[i]
        slot = slot_of[pid] if pid < n_map else -1
        if 0 <= slot < n_slots:
            x = values[i]
            if quality[i] != GOOD or not _isfinite(x):
                count[slot] = 0
                pos[slot] = 0
            else:
                base = slot * stride
                c, p = _window_push(ring, srt, base, window[slot], count[slot], pos[slot], x)
                count[slot] = c
                pos[slot] = p
                values[i] = _sorted_median(srt, base, c)


# -- in-place output with a spill (deadband, sdt) ----------------------------------------


class _Output:
    """Writes output rows back into the input columns, in order: row ``j`` may be
    written once input row ``i >= j`` has been read. A stage emits at most the input
    readings themselves (each once: at once, or later as the held one) plus the
    readings held since an earlier batch, at most one per slot and each released by a
    reading of its point in this batch; so the output runs ahead of the input by at
    most ``h = min(n, slots holding a reading)`` rows. Those rows wait in a FIFO and go
    into place as the input moves on; what is left at the end (only when the output
    is longer than the input) lands in the spill columns, which the caller appends.
    The compiled twin keeps the FIFO in the spill columns themselves, compacting it
    when it reaches their end (2h + 4 rows: at most h + 2 wait at any time)."""

    __slots__ = ("ids", "j", "pending", "quality", "ts", "values")

    def __init__(
        self, ids: array[int], ts: array[int], values: array[float], quality: array[int]
    ) -> None:
        self.ids, self.ts, self.values, self.quality = ids, ts, values, quality
        self.j = 0
        self.pending: deque[tuple[int, int, float, int]] = deque()

    def put(self, row: tuple[int, int, float, int]) -> None:
        self.pending.append(row)

    def flush(self, i: int) -> None:
        """Moves waiting rows into place now that input row ``i`` has been read."""
        pending, j = self.pending, self.j
        while pending and j <= i:
            self.ids[j], self.ts[j], self.values[j], self.quality[j] = pending.popleft()
            j += 1
        self.j = j

    def spill(
        self, ids: array[int], ts: array[int], values: array[float], quality: array[int]
    ) -> int:
        """Writes the rows still waiting to the spill columns; returns how many."""
        for k, (pid, t, v, q) in enumerate(self.pending):
            ids[k], ts[k], values[k], quality[k] = pid, t, v, q
        return len(self.pending)


def deadband(
    point_ids: array[int],
    timestamps: array[int],
    values: array[float],
    quality: array[int],
    spill_ids: array[int],
    spill_ts: array[int],
    spill_values: array[float],
    spill_quality: array[int],
    slot_of: array[int],
    band: array[float],
    heartbeat: array[int],
    has_sent: array[int],
    sent_ts: array[int],
    sent_value: array[float],
    has_held: array[int],
    held_ts: array[int],
    held_value: array[float],
) -> tuple[int, int, int]:
    """Deadband with heartbeat, in place; returns (kept, spilled, suppressed): the output
    is the first ``kept`` rows of the columns, then the first ``spilled`` rows of the
    spill columns (see ``_Output``).

    The first good reading after a start or reset is sent. Then a reading is sent when
    |x - sent_value| > band (the held reading, if any, goes out first: where the change
    started), or, with heartbeat > 0, when ts - sent_ts >= heartbeat or the clock went
    back (ts < sent_ts); a held reading is then dropped (within the band anyway).
    Otherwise the reading is held, replacing the one held before. ``suppressed`` counts
    held readings that will never be sent (replaced or dropped); the one held at the end
    of the batch is not counted yet.
    """
    n = _columns("deadband", point_ids, timestamps, values, quality)
    n_slots = len(band)
    _per_slot("deadband", n_slots, heartbeat, has_sent, sent_ts, sent_value)
    _per_slot("deadband", n_slots, has_held, held_ts, held_value)
    _spill_room("deadband", n, has_held, n_slots, spill_ids, spill_ts, spill_values, spill_quality)
    n_map = len(slot_of)
    out = _Output(point_ids, timestamps, values, quality)
    suppressed = 0
    for i in range(n):
        pid = point_ids[i]
        ts = timestamps[i]
        x = values[i]
        q = quality[i]
        slot = slot_of[pid] if pid < n_map else -1
        send = True
        if 0 <= slot < n_slots:
            if q != GOOD or not _isfinite(x):
                if has_held[slot]:
                    out.put((pid, held_ts[slot], held_value[slot], GOOD))
                    has_held[slot] = 0
                has_sent[slot] = 0
            elif not has_sent[slot]:
                has_sent[slot] = 1
                sent_ts[slot] = ts
                sent_value[slot] = x
            elif abs(x - sent_value[slot]) > band[slot]:
                if has_held[slot]:
                    out.put((pid, held_ts[slot], held_value[slot], GOOD))
                    has_held[slot] = 0
                sent_ts[slot] = ts
                sent_value[slot] = x
            elif heartbeat[slot] > 0 and (
                ts < sent_ts[slot] or ts - sent_ts[slot] >= heartbeat[slot]
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
            out.put((pid, ts, x, q))
        out.flush(i)
    return out.j, out.spill(spill_ids, spill_ts, spill_values, spill_quality), suppressed


def sdt(
    point_ids: array[int],
    timestamps: array[int],
    values: array[float],
    quality: array[int],
    spill_ids: array[int],
    spill_ts: array[int],
    spill_values: array[float],
    spill_quality: array[int],
    slot_of: array[int],
    deviation: array[float],
    max_interval: array[int],
    min_interval: array[int],
    has_a: array[int],
    a_ts: array[int],
    a_value: array[float],
    has_h: array[int],
    h_ts: array[int],
    h_value: array[float],
    door_lo: array[float],
    door_hi: array[float],
) -> tuple[int, int, int]:
    """Swinging-door trending (archives actual readings), in place; returns (kept,
    spilled, suppressed) like ``deadband``.

    State per point: the archived point A, the held point H (latest, not archived) and
    the door [lo, hi]: the slopes s for which the line from A with slope s passes within
    ``deviation`` of every reading after A up to H. For a new good reading p:

    1. no A, or tp < ta (the clock went back): emit H if any, emit p, A = p, no H,
       door = [-inf, inf];
    2. min_interval > 0 and tp - ta < min_interval: discard p (suppressed);
    3. tp == ta: as 1;
    4. s = (vp - va) / (tp - ta); if H exists and s is outside the door, or
       max_interval > 0 and tp - ta > max_interval: archive H (emit it, A = H, no H,
       door reset) and judge p again from 1 (it cannot archive twice);
    5. otherwise the H before (if any) is suppressed; the door narrows to
       lo = max(lo, (vp - dev - va) / dt), hi = min(hi, (vp + dev - va) / dt) and H = p.

    H always has its slope from A inside the door (it was inside when H arrived, and
    its own bounds hold it), so the line A -> H is within ``deviation`` of every reading
    between them. A reading discarded by min_interval is not covered by that bound.
    """
    n = _columns("sdt", point_ids, timestamps, values, quality)
    n_slots = len(deviation)
    _per_slot("sdt", n_slots, max_interval, min_interval, has_a, a_ts, a_value)
    _per_slot("sdt", n_slots, has_h, h_ts, h_value, door_lo, door_hi)
    _spill_room("sdt", n, has_h, n_slots, spill_ids, spill_ts, spill_values, spill_quality)
    n_map = len(slot_of)
    out = _Output(point_ids, timestamps, values, quality)
    suppressed = 0
    for i in range(n):
        pid = point_ids[i]
        ts = timestamps[i]
        x = values[i]
        q = quality[i]
        slot = slot_of[pid] if pid < n_map else -1
        send = True
        if 0 <= slot < n_slots:
            if q != GOOD or not _isfinite(x):
                if has_h[slot]:
                    out.put((pid, h_ts[slot], h_value[slot], GOOD))
                    has_h[slot] = 0
                has_a[slot] = 0
            else:
                send = False  # unless (re)started from
                while True:
                    ta = a_ts[slot]
                    if not has_a[slot] or ts < ta or (ts == ta and min_interval[slot] <= 0):
                        # (re)start from p; H, if any, goes out first
                        if has_h[slot]:
                            out.put((pid, h_ts[slot], h_value[slot], GOOD))
                            has_h[slot] = 0
                        has_a[slot] = 1
                        a_ts[slot] = ts
                        a_value[slot] = x
                        door_lo[slot] = -_INF
                        door_hi[slot] = _INF
                        send = True
                        break
                    if min_interval[slot] > 0 and ts - ta < min_interval[slot]:
                        suppressed += 1
                        break
                    dt = float(ts - ta)
                    va = a_value[slot]
                    s = (x - va) / dt
                    if has_h[slot] and (
                        s < door_lo[slot]
                        or s > door_hi[slot]
                        or (max_interval[slot] > 0 and ts - ta > max_interval[slot])
                    ):
                        # archive H, then judge p again from the new A (H is gone now,
                        # so this happens at most once per reading)
                        out.put((pid, h_ts[slot], h_value[slot], GOOD))
                        has_h[slot] = 0
                        a_ts[slot] = h_ts[slot]
                        a_value[slot] = h_value[slot]
                        door_lo[slot] = -_INF
                        door_hi[slot] = _INF
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
            out.put((pid, ts, x, q))
        out.flush(i)
    return out.j, out.spill(spill_ids, spill_ts, spill_values, spill_quality), suppressed


def ratelimit(
    point_ids: array[int],
    timestamps: array[int],
    values: array[float],
    quality: array[int],
    slot_of: array[int],
    max_rate: array[float],
    action: array[int],
    has_last: array[int],
    last_ts: array[int],
    last_value: array[float],
) -> tuple[int, int, int, int]:
    """Rate limit against the point's last passed good reading (value, ts); returns
    (kept, clamped, flagged, dropped) and compacts the columns in place on drops.

    With dt = (ts - last_ts) / 1000 s > 0 and rate = |x - last| / dt > max_rate:
    ACTION_FIX clamps x to last +/- max_rate * dt (quality kept; it becomes the new last),
    ACTION_FLAG sets quality BAD and ACTION_DROP removes it (both leave last as it was).
    The first reading, and one at or before last_ts (repeated or backwards time), pass
    and become the new last.
    """
    n = _columns("ratelimit", point_ids, timestamps, values, quality)
    n_slots = len(max_rate)
    _per_slot("ratelimit", n_slots, action, has_last, last_ts, last_value)
    n_map = len(slot_of)
    kept = clamped = flagged = dropped = 0
    for i in range(n):
        pid = point_ids[i]
        slot = slot_of[pid] if pid < n_map else -1
        if 0 <= slot < n_slots:
            ts = timestamps[i]
            x = values[i]
            if quality[i] != GOOD or not _isfinite(x):
                has_last[slot] = 0
            elif not has_last[slot] or ts <= last_ts[slot]:
                has_last[slot] = 1
                last_ts[slot] = ts
                last_value[slot] = x
            else:
                dt = float(ts - last_ts[slot]) / 1000.0
                v = last_value[slot]
                d = x - v
                if abs(d) / dt > max_rate[slot]:
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
    point_ids: array[int],
    timestamps: array[int],
    values: array[float],
    quality: array[int],
    slot_of: array[int],
    alpha: array[float],
    tau: array[float],
    has_y: array[int],
    last_ts: array[int],
    y: array[float],
) -> None:
    """Exponential moving average, in place: a good reading's value becomes y.

    The first reading after a start or reset sets y = x. Then y = y + a * (x - y) with
    a = alpha[slot] when tau[slot] <= 0, else a = 1 - exp(-dt / tau) for dt = ts - last_ts
    in ms. dt <= 0 (a repeated or backwards timestamp) counts as no time passed: a = 0,
    y is kept and output, and last_ts follows the reading (so a clock that went back
    does not freeze the average). Should y overflow to inf (values near the double
    limit), it restarts from x.
    """
    n = _columns("ema", point_ids, timestamps, values, quality)
    n_slots = len(alpha)
    _per_slot("ema", n_slots, tau, has_y, last_ts, y)
    n_map = len(slot_of)
    for i in range(n):
        pid = point_ids[i]
        slot = slot_of[pid] if pid < n_map else -1
        if 0 <= slot < n_slots:
            x = values[i]
            if quality[i] != GOOD or not _isfinite(x):
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
                    yy = yy + (1.0 - _exp(-float(ts - last_ts[slot]) / t)) * (x - yy)
                if not _isfinite(yy):
                    yy = x
            y[slot] = yy
            last_ts[slot] = ts
            values[i] = yy
