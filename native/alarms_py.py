"""Pure-Python twin of the alarm kernel in ``_alarms.pyx``, and its reference.

One call of ``evaluate`` runs every alarm rule of one table (one pipeline depth) over a
batch: each reading goes to the rule of its point (``slot_of[pid]``), then the stale
rules check the clock. Readings are never modified. Two clocks: ``now_ms`` is the wall
clock (0 means "no clock": no stale check), which only stamps what the stale check
decides; ``elapsed_ms`` is the pipeline's monotonic clock (native/pipeline.py), on which
silence is measured, so a step of the wall clock neither fakes nor hides one. Raises
and clears come out as event columns (slot, raised flag, ts, value, since) written from
index 0; the return value is how many were written.

Rules by slot (``rule``, with ``level``, ``clear_level`` and ``span``):

- RULE_ABOVE / RULE_BELOW (threshold): level = above/below, clear_level = above -
  hysteresis / below + hysteresis, span = min duration. A GOOD finite reading beyond
  level continues (or starts, t0 = its ts) the condition run; the alarm raises when
  ts - t0 >= span (since = t0). A raised alarm clears on a GOOD finite reading back at
  clear_level or beyond (since = the raise ts). A GOOD finite reading inside the level, or
  any non-GOOD or non-finite reading, ends a pending (not yet raised) run; the latter two
  neither raise nor clear.
- RULE_RATE: level = max rate per second. Between a GOOD finite reading and the point's
  previous one (t0, v0) with ts > t0: rate = |v - v0| / ((ts - t0) / 1000). Raises when
  rate > level (since = t0), clears at the first pair with rate <= level. Non-GOOD and
  non-finite readings are skipped; every GOOD finite one becomes the previous reading,
  whatever its ts (pairs with ts <= t0 are just not judged).
- RULE_STALE: span = after. Every reading (any quality or value) sets t0 = its ts and
  seen = elapsed_ms (its arrival), and clears a raised alarm. After the readings, when
  ``now_ms`` != 0, a point never heard of gets t0 = now_ms and seen = elapsed_ms, and one
  with elapsed_ms - seen >= span raises (ts = now_ms, value = NaN, since = t0).
- RULE_FLATLINE: level = tolerance, span = duration. Over GOOD finite readings only:
  a reading within level of the run's reference v0 (|v - v0| <= level) continues the
  run, which raises once ts - t0 >= span (since = t0); one outside starts a new run
  (v0 = v, t0 = ts) and clears a raised alarm.
- RULE_BAD_QUALITY: span = count. ``count`` counts consecutive non-GOOD readings (t0 =
  ts of the first, the counter stops at span); the alarm raises when it reaches span
  (since = t0). A GOOD reading resets the counter and clears a raised alarm.

State by slot: ``raised`` (0/1), ``active`` (a run / previous reading / last ts is
held), ``t0``, ``v0``, ``count``, ``raised_at`` (the raise ts: a clear's since), ``seen``
(stale only: elapsed_ms at the last reading's arrival).

Durations are compared as ``ts >= t0 and ts - t0 >= span`` (unsigned in C, so no int64
overflow): repeated timestamps make 0, backwards ones never reach a duration. Each reading
makes at most one event and the clock check at most one per slot, so the event columns
need ``len(point_ids) + len(rule)`` rows. Only + - / and fabs are used, in the same order
as the compiled kernel, so both give the same results bit for bit.
"""

from __future__ import annotations

import math
from array import array

GOOD = 0  # native.batch.GOOD; repeated so the kernels import nothing

# Rule type codes by slot (0: no rule, the slot's readings pass unjudged).
RULE_NONE = 0
RULE_ABOVE = 1
RULE_BELOW = 2
RULE_RATE = 3
RULE_STALE = 4
RULE_FLATLINE = 5
RULE_BAD_QUALITY = 6


def _elapsed(ts: int, t0: int, span: int) -> bool:
    """ts - t0 >= span, never for a backwards ts."""
    return ts >= t0 and (span <= 0 or ts - t0 >= span)


def evaluate(
    point_ids: array[int],
    timestamps: array[int],
    values: array[float],
    quality: array[int],
    now_ms: int,
    elapsed_ms: int,
    slot_of: array[int],
    rule: array[int],
    level: array[float],
    clear_level: array[float],
    span: array[int],
    raised: array[int],
    active: array[int],
    t0: array[int],
    v0: array[float],
    count: array[int],
    raised_at: array[int],
    seen: array[int],
    ev_slot: array[int],
    ev_raised: array[int],
    ev_ts: array[int],
    ev_value: array[float],
    ev_since: array[int],
) -> int:
    """Runs the rules over a batch and the stale rules over the clocks (see the module
    docstring); updates the state arrays and returns the number of events written."""
    n = len(point_ids)
    if not (len(timestamps) == len(values) == len(quality) == n):
        raise ValueError("alarms.evaluate: columns differ in length")
    n_slots = len(rule)
    for arr in (level, clear_level, span, raised, active, t0, v0, count, raised_at, seen):
        if len(arr) != n_slots:
            raise ValueError("alarms.evaluate: parameter and state arrays differ in length")
    cap = n + n_slots
    for arr in (ev_slot, ev_raised, ev_ts, ev_value, ev_since):
        if len(arr) < cap:
            raise ValueError("alarms.evaluate: event arrays shorter than readings + slots")
    n_table = len(slot_of)
    k = 0

    def emit(s: int, up: int, ts: int, v: float, since: int) -> None:
        nonlocal k
        ev_slot[k] = s
        ev_raised[k] = up
        ev_ts[k] = ts
        ev_value[k] = v
        ev_since[k] = since
        k += 1

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
        if r in (RULE_ABOVE, RULE_BELOW):
            if not (good and math.isfinite(v)):
                active[s] = 0  # interrupts a pending run; a raised alarm stays
            elif raised[s]:
                if (v <= clear_level[s]) if r == RULE_ABOVE else (v >= clear_level[s]):
                    raised[s] = 0
                    emit(s, 0, ts, v, raised_at[s])
            elif (v > level[s]) if r == RULE_ABOVE else (v < level[s]):
                if not active[s]:
                    active[s] = 1
                    t0[s] = ts
                if _elapsed(ts, t0[s], span[s]):
                    raised[s] = 1
                    raised_at[s] = ts
                    active[s] = 0  # after the clear, a new run starts afresh
                    emit(s, 1, ts, v, t0[s])
            else:
                active[s] = 0
        elif r == RULE_RATE:
            if not (good and math.isfinite(v)):
                continue
            if active[s] and ts > t0[s]:
                dt = float(ts - t0[s])
                rate = abs(v - v0[s]) / (dt / 1000.0)
                if rate > level[s]:
                    if not raised[s]:
                        raised[s] = 1
                        raised_at[s] = ts
                        emit(s, 1, ts, v, t0[s])
                elif raised[s]:
                    raised[s] = 0
                    emit(s, 0, ts, v, raised_at[s])
            active[s] = 1
            t0[s] = ts
            v0[s] = v
        elif r == RULE_STALE:
            active[s] = 1
            t0[s] = ts
            seen[s] = elapsed_ms
            if raised[s]:
                raised[s] = 0
                emit(s, 0, ts, v, raised_at[s])
        elif r == RULE_FLATLINE:
            if not (good and math.isfinite(v)):
                continue
            if active[s] and abs(v - v0[s]) <= level[s]:
                if not raised[s] and _elapsed(ts, t0[s], span[s]):
                    raised[s] = 1
                    raised_at[s] = ts
                    emit(s, 1, ts, v, t0[s])
            else:
                active[s] = 1
                v0[s] = v
                t0[s] = ts
                if raised[s]:
                    raised[s] = 0
                    emit(s, 0, ts, v, raised_at[s])
        elif r == RULE_BAD_QUALITY:
            if not good:
                if count[s] == 0:
                    t0[s] = ts
                if count[s] < span[s]:
                    count[s] += 1
                if not raised[s] and count[s] >= span[s]:
                    raised[s] = 1
                    raised_at[s] = ts
                    emit(s, 1, ts, v, t0[s])
            else:
                count[s] = 0
                if raised[s]:
                    raised[s] = 0
                    emit(s, 0, ts, v, raised_at[s])

    if now_ms != 0:
        for s in range(n_slots):
            if rule[s] != RULE_STALE:
                continue
            if not active[s]:
                active[s] = 1
                t0[s] = now_ms
                seen[s] = elapsed_ms
            if not raised[s] and _elapsed(elapsed_ms, seen[s], span[s]):
                raised[s] = 1
                raised_at[s] = now_ms
                emit(s, 1, now_ms, math.nan, t0[s])
    return k
