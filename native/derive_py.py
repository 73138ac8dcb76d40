"""Pure-Python twin of the derive kernel in ``_derive.pyx``, and its reference.

One call of ``process`` walks a batch's readings from ``start``: a reading of a point with
a slot (``slot_of[pid]``) sets the slot's last value/ts/quality (any quality), pushes a
GOOD finite reading into the slot's ring if it has one, and marks the specs that use the
slot dirty (``dep_spec[dep_start[s]:dep_start[s + 1]]``). Where the next reading's ts
differs, and at the end, the dirty specs run in spec order; a spec with an output slot
updates that slot as a reading would (dirtying later specs, run in the same pass). Each
run writes one row (out id, T, value, quality) to the output columns, or (spec, T,
value, quality) to the condition columns for a spec without an output (``out_id`` -1).
Before a group of readings the kernel checks that both column sets have room for
``n_specs`` more rows; if not it stops there and returns the index of the group's first
reading (nothing of it applied), otherwise ``len(point_ids)``. ``counts`` holds the rows
written so far to each column set ([outputs, conditions]) and is advanced.

A spec's run: T is the newest last ts among its inputs seen; quality is the worst of its
inputs' by rank GOOD < UNCERTAIN < BAD < UNAVAILABLE (a quality code beyond 3 counts as
BAD), an input never seen or with T - ts > max_age (max_age > 0) counting as BAD; a
result not finite while the quality ranks below BAD becomes BAD.

The VM: ``code[code_off[j]:code_off[j + 1]]`` over a stack of doubles, with the spec's
constants at ``const_off[j]``, its inputs' slots at ``in_off[j]`` and its windows at
``win_off[j]``:

    CONST k       push consts[k]
    LOAD k        push input k's last value (NaN never seen)
    AGE k         push (T - input k's last ts) / 1000 (NaN never seen)
    WIN w         push window w's function over its input's ring (see ``_window``)
    NEG NOT ABS SQRT EXP LN LOG10         one operand
    ADD SUB MUL DIV LT LE GT GE EQ NE AND OR POW    two operands
    MIN n / MAX n n operands; CLAMP x lo hi; IF c a b (c != 0 ? a : b)
    INTERP k n    x -> piecewise linear over xs = consts[k:k+n], ys = consts[k+n:k+2n]

Every pushed value whose result is NaN is the positive quiet NaN, and nothing raises:
each operation gives what C's gives (x/0 = ±inf, ln 0 = -inf, pow overflow = ±inf, ...),
with the operations in the same order as the compiled kernel, so both agree bit for bit.
"""

from __future__ import annotations

import math
from array import array

GOOD = 0  # native.batch qualities; repeated so the kernels import nothing
BAD = 1
#: ring capacity per point with a window function (readings)
RING = 4096

OP_CONST = 0
OP_LOAD = 1
OP_AGE = 2
OP_WIN = 3
OP_NEG = 4
OP_NOT = 5
OP_ADD = 6
OP_SUB = 7
OP_MUL = 8
OP_DIV = 9
OP_LT = 10
OP_LE = 11
OP_GT = 12
OP_GE = 13
OP_EQ = 14
OP_NE = 15
OP_AND = 16
OP_OR = 17
OP_ABS = 18
OP_SQRT = 19
OP_EXP = 20
OP_LN = 21
OP_LOG10 = 22
OP_POW = 23
OP_MIN = 24
OP_MAX = 25
OP_CLAMP = 26
OP_IF = 27
OP_INTERP = 28

#: window function codes, by name (the order is the code)
WINDOW_FUNCTIONS = ("mean_over", "min_over", "max_over", "sum_over", "count_over", "delta_over")
WIN_MEAN, WIN_MIN, WIN_MAX, WIN_SUM, WIN_COUNT, WIN_DELTA = range(6)

#: rank of a quality code (0..3), and the quality of a rank
RANK = (0, 2, 1, 3)
QUALITY_OF_RANK = (0, 2, 1, 3)
_RANK_BAD = 2

NAN = math.nan  # float("nan") is the positive quiet NaN, 0x7ff8000000000000
INF = math.inf


def _odd_integer(y: float) -> bool:
    return math.isfinite(y) and y == math.floor(y) and math.fmod(y, 2.0) != 0.0


def _pow(x: float, y: float) -> float:
    try:
        return math.pow(x, y)
    except OverflowError:  # C gives inf, negative for a negative base to an odd power
        return -INF if x < 0.0 and _odd_integer(y) else INF
    except ValueError:  # C: (±0)**negative is a pole (±inf), (negative)**fraction NaN
        if x == 0.0:
            return -INF if math.copysign(1.0, x) < 0.0 and _odd_integer(y) else INF
        return NAN


def _div(a: float, b: float) -> float:
    if b != 0.0:
        return a / b
    if a != a or a == 0.0:
        return NAN
    return math.copysign(INF, math.copysign(1.0, a) * math.copysign(1.0, b))


def _ln(x: float) -> float:
    if x > 0.0:
        return math.log(x)
    return -INF if x == 0.0 else NAN


def _log10(x: float) -> float:
    if x > 0.0:
        return math.log10(x)
    return -INF if x == 0.0 else NAN


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return INF


def _window(
    fn: int,
    ms: int,
    t_eval: int,
    base: int,
    head: int,
    count: int,
    ring_ts: array[int],
    ring_v: array[float],
) -> float:
    """fn over the ring's readings with ts in (t_eval - ms, t_eval], walked from the
    newest back to the first one out of the window (a newer-than-T one is skipped)."""
    n = 0
    acc = 0.0
    lo = hi = newest = oldest = 0.0
    pos = head
    for _ in range(count):
        pos = pos - 1 if pos > 0 else RING - 1
        t = ring_ts[base + pos]
        if t > t_eval:
            continue
        if t_eval - t >= ms:
            break
        v = ring_v[base + pos]
        if n == 0:
            newest = lo = hi = v
        else:
            if v < lo:
                lo = v
            if v > hi:
                hi = v
        acc = acc + v
        oldest = v
        n += 1
    if fn == WIN_SUM:
        return acc
    if fn == WIN_COUNT:
        return float(n)
    if n == 0:
        return NAN
    if fn == WIN_MEAN:
        return acc / float(n)
    if fn == WIN_MIN:
        return lo
    if fn == WIN_MAX:
        return hi
    return newest - oldest


def _run(
    code: array[int],
    c0: int,
    c1: int,
    consts: array[float],
    k0: int,
    in_slot: array[int],
    i0: int,
    win_in: array[int],
    win_fn: array[int],
    win_ms: array[int],
    w0: int,
    t_eval: int,
    last_v: array[float],
    last_ts: array[int],
    seen: array[int],
    ring_base: array[int],
    ring_head: array[int],
    ring_n: array[int],
    ring_ts: array[int],
    ring_v: array[float],
    stack: array[float],
) -> float:
    sp = 0  # the stack's size
    pc = c0
    while pc < c1:
        op = code[pc]
        pc += 1
        if op == OP_CONST:
            r = consts[k0 + code[pc]]
            pc += 1
            sp += 1
        elif op == OP_LOAD:
            r = last_v[in_slot[i0 + code[pc]]]
            pc += 1
            sp += 1
        elif op == OP_AGE:
            s = in_slot[i0 + code[pc]]
            pc += 1
            r = float(t_eval - last_ts[s]) / 1000.0 if seen[s] else NAN
            sp += 1
        elif op == OP_WIN:
            w = w0 + code[pc]
            pc += 1
            s = in_slot[i0 + win_in[w]]
            base = ring_base[s]
            if base < 0:
                r = _window(win_fn[w], win_ms[w], t_eval, 0, 0, 0, ring_ts, ring_v)
            else:
                r = _window(
                    win_fn[w], win_ms[w], t_eval, base, ring_head[s], ring_n[s], ring_ts, ring_v
                )
            sp += 1
        elif op <= OP_NOT:
            a = stack[sp - 1]
            r = -a if op == OP_NEG else (1.0 if a == 0.0 else 0.0)
        elif op <= OP_OR:
            a = stack[sp - 2]
            b = stack[sp - 1]
            sp -= 1
            if op == OP_ADD:
                r = a + b
            elif op == OP_SUB:
                r = a - b
            elif op == OP_MUL:
                r = a * b
            elif op == OP_DIV:
                r = _div(a, b)
            elif op == OP_LT:
                r = 1.0 if a < b else 0.0
            elif op == OP_LE:
                r = 1.0 if a <= b else 0.0
            elif op == OP_GT:
                r = 1.0 if a > b else 0.0
            elif op == OP_GE:
                r = 1.0 if a >= b else 0.0
            elif op == OP_EQ:
                r = 1.0 if a == b else 0.0
            elif op == OP_NE:
                r = 1.0 if a != b else 0.0
            elif op == OP_AND:
                r = 1.0 if (a != 0.0 and b != 0.0) else 0.0
            else:
                r = 1.0 if (a != 0.0 or b != 0.0) else 0.0
        elif op <= OP_LOG10:
            a = stack[sp - 1]
            if op == OP_ABS:
                r = math.fabs(a)
            elif op == OP_SQRT:
                r = NAN if a < 0.0 else math.sqrt(a)
            elif op == OP_EXP:
                r = _exp(a)
            elif op == OP_LN:
                r = _ln(a)
            else:
                r = _log10(a)
        elif op == OP_POW:
            r = _pow(stack[sp - 2], stack[sp - 1])
            sp -= 1
        elif op in (OP_MIN, OP_MAX):
            n = code[pc]
            pc += 1
            sp -= n
            r = stack[sp]
            for k in range(sp, sp + n):
                a = stack[k]
                if a != a:
                    r = NAN
                    break
                if (a < r) if op == OP_MIN else (a > r):
                    r = a
            sp += 1
        elif op == OP_CLAMP:
            sp -= 2
            x = stack[sp - 1]
            lo = stack[sp]
            hi = stack[sp + 1]
            if x != x or lo != lo or hi != hi:
                r = NAN
            elif x < lo:
                r = lo
            else:
                r = hi if x > hi else x
        elif op == OP_IF:
            sp -= 2
            r = stack[sp] if stack[sp - 1] != 0.0 else stack[sp + 1]
        else:  # OP_INTERP
            k = k0 + code[pc]
            n = code[pc + 1]
            pc += 2
            x = stack[sp - 1]
            if x != x:
                r = NAN
            elif x <= consts[k]:
                r = consts[k + n]
            elif x >= consts[k + n - 1]:
                r = consts[k + 2 * n - 1]
            else:
                j = 0
                while x >= consts[k + j + 1]:
                    j += 1
                x0 = consts[k + j]
                x1 = consts[k + j + 1]
                y0 = consts[k + n + j]
                y1 = consts[k + n + j + 1]
                r = y0 + (x - x0) * (y1 - y0) / (x1 - x0)
        stack[sp - 1] = NAN if r != r else r
    return stack[0]


def _rank(q: int) -> int:
    return RANK[q] if q < 4 else _RANK_BAD


_Slots = tuple[
    "array[float]",
    "array[int]",
    "array[int]",
    "array[int]",
    "array[int]",
    "array[int]",
    "array[int]",
    "array[int]",
    "array[float]",
]


def _update(s: int, ts: int, v: float, q: int, slots: _Slots) -> None:
    """A reading of slot `s` (an input's, or a derived output's): its last value, and its
    ring if a window reads it and the reading is GOOD and finite."""
    last_v, last_ts, last_q, seen, ring_base, ring_head, ring_n, ring_ts, ring_v = slots
    last_v[s] = v
    last_ts[s] = ts
    last_q[s] = q
    seen[s] = 1
    base = ring_base[s]
    if base >= 0 and q == GOOD and math.isfinite(v):
        h = ring_head[s]
        ring_ts[base + h] = ts
        ring_v[base + h] = v
        ring_head[s] = h + 1 if h + 1 < RING else 0
        if ring_n[s] < RING:
            ring_n[s] += 1


def process(
    start: int,
    point_ids: array[int],
    timestamps: array[int],
    values: array[float],
    quality: array[int],
    slot_of: array[int],
    dep_start: array[int],
    dep_spec: array[int],
    last_v: array[float],
    last_ts: array[int],
    last_q: array[int],
    seen: array[int],
    ring_base: array[int],
    ring_head: array[int],
    ring_n: array[int],
    ring_ts: array[int],
    ring_v: array[float],
    code: array[int],
    code_off: array[int],
    consts: array[float],
    const_off: array[int],
    in_slot: array[int],
    in_off: array[int],
    win_in: array[int],
    win_fn: array[int],
    win_ms: array[int],
    win_off: array[int],
    max_age: array[int],
    out_id: array[int],
    out_slot: array[int],
    dirty: array[int],
    stack: array[float],
    o_id: array[int],
    o_ts: array[int],
    o_v: array[float],
    o_q: array[int],
    c_spec: array[int],
    c_ts: array[int],
    c_v: array[float],
    c_q: array[int],
    counts: array[int],
) -> int:
    """Walks the readings from ``start`` (see the module docstring); returns where it
    stopped: ``len(point_ids)``, or the first reading of a group it had no room for."""
    n = len(point_ids)
    if not (len(timestamps) == len(values) == len(quality) == n):
        raise ValueError("derive.process: columns differ in length")
    n_specs = len(max_age)
    n_slots = len(last_v)
    n_table = len(slot_of)
    o_cap = min(len(o_id), len(o_ts), len(o_v), len(o_q))
    c_cap = min(len(c_spec), len(c_ts), len(c_v), len(c_q))
    n_out = counts[0]
    n_cond = counts[1]
    slots = (last_v, last_ts, last_q, seen, ring_base, ring_head, ring_n, ring_ts, ring_v)
    i = start
    while i < n:
        if o_cap - n_out < n_specs or c_cap - n_cond < n_specs:
            break
        t_group = timestamps[i]
        lo = n_specs
        hi = -1
        while i < n and timestamps[i] == t_group:
            pid = point_ids[i]
            s = slot_of[pid] if pid < n_table else -1
            if 0 <= s < n_slots:
                _update(s, t_group, values[i], quality[i], slots)
                for d in range(dep_start[s], dep_start[s + 1]):
                    j = dep_spec[d]
                    dirty[j] = 1
                    if j < lo:
                        lo = j
                    if j > hi:
                        hi = j
            i += 1
        j = lo
        while j <= hi:
            if not dirty[j]:
                j += 1
                continue
            dirty[j] = 0
            a = in_off[j]
            b = in_off[j + 1]
            t_eval = 0
            found = False
            for k in range(a, b):
                s = in_slot[k]
                if seen[s] and (not found or last_ts[s] > t_eval):
                    t_eval = last_ts[s]
                    found = True
            rank = 0
            age_max = max_age[j]
            for k in range(a, b):
                s = in_slot[k]
                if not seen[s] or (age_max > 0 and t_eval - last_ts[s] > age_max):
                    r = _RANK_BAD
                else:
                    r = _rank(last_q[s])
                if r > rank:
                    rank = r
            v = _run(
                code,
                code_off[j],
                code_off[j + 1],
                consts,
                const_off[j],
                in_slot,
                a,
                win_in,
                win_fn,
                win_ms,
                win_off[j],
                t_eval,
                last_v,
                last_ts,
                seen,
                ring_base,
                ring_head,
                ring_n,
                ring_ts,
                ring_v,
                stack,
            )
            if rank < _RANK_BAD and not math.isfinite(v):
                rank = _RANK_BAD
            q = QUALITY_OF_RANK[rank]
            oid = out_id[j]
            if oid < 0:
                c_spec[n_cond] = j
                c_ts[n_cond] = t_eval
                c_v[n_cond] = v
                c_q[n_cond] = q
                n_cond += 1
            else:
                o_id[n_out] = oid
                o_ts[n_out] = t_eval
                o_v[n_out] = v
                o_q[n_out] = q
                n_out += 1
                s = out_slot[j]
                if s >= 0:
                    _update(s, t_eval, v, q, slots)
                    for d in range(dep_start[s], dep_start[s + 1]):
                        dirty[dep_spec[d]] = 1
                        if dep_spec[d] > hi:
                            hi = dep_spec[d]
            j += 1
    counts[0] = n_out
    counts[1] = n_cond
    return i
