# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Compiled derive kernel; ``derive_py.py`` is the pure-Python twin and the reference
(the walk, the VM, its opcodes and the quality rules are documented there)."""

from libc.math cimport NAN, INFINITY, exp, fabs, isfinite, log, log10, pow, sqrt
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t

# Same values as derive_py.OP_*, WIN_*, RING and native.batch.GOOD.
cdef enum:
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
    WIN_MEAN = 0
    WIN_MIN = 1
    WIN_MAX = 2
    WIN_SUM = 3
    WIN_COUNT = 4
    WIN_DELTA = 5
    RING = 4096
    GOOD = 0
    RANK_BAD = 2

cdef int32_t RANK[4]
RANK[:] = [0, 2, 1, 3]
cdef uint8_t QUALITY_OF_RANK[4]
QUALITY_OF_RANK[:] = [0, 2, 1, 3]


cdef struct State:
    double *last_v
    int64_t *last_ts
    uint8_t *last_q
    uint8_t *seen
    int64_t *ring_base
    int64_t *ring_head
    int64_t *ring_n
    int64_t *ring_ts
    double *ring_v
    const int32_t *code
    const double *consts
    const int32_t *in_slot
    const int32_t *win_in
    const uint8_t *win_fn
    const int64_t *win_ms
    double *stack


cdef inline double _window(const State *st, uint8_t fn, int64_t ms, int64_t t_eval,
                           int64_t base, int64_t head, int64_t count) noexcept nogil:
    cdef int64_t n = 0, k, pos = head, t
    cdef double acc = 0.0, lo = 0.0, hi = 0.0, newest = 0.0, oldest = 0.0, v
    for k in range(count):
        pos = pos - 1 if pos > 0 else RING - 1
        t = st.ring_ts[base + pos]
        if t > t_eval:
            continue
        # t_eval - t >= ms without int64 overflow: t <= t_eval here
        if <uint64_t>t_eval - <uint64_t>t >= <uint64_t>ms:
            break
        v = st.ring_v[base + pos]
        if n == 0:
            newest = v
            lo = v
            hi = v
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
        return <double>n
    if n == 0:
        return NAN
    if fn == WIN_MEAN:
        return acc / <double>n
    if fn == WIN_MIN:
        return lo
    if fn == WIN_MAX:
        return hi
    return newest - oldest


cdef inline double _pow(double x, double y) noexcept nogil:
    # glibc pow already gives the C99 results the twin reconstructs
    return pow(x, y)


cdef double _run(const State *st, Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t k0,
                 Py_ssize_t i0, Py_ssize_t w0, int64_t t_eval) noexcept nogil:
    cdef double *stack = st.stack
    cdef Py_ssize_t sp = 0, pc = c0, k, n, j, w
    cdef int32_t op, s
    cdef int64_t base
    cdef double r = 0.0, a, b, x, lo, hi, x0, x1, y0, y1
    while pc < c1:
        op = st.code[pc]
        pc += 1
        if op == OP_CONST:
            r = st.consts[k0 + st.code[pc]]
            pc += 1
            sp += 1
        elif op == OP_LOAD:
            r = st.last_v[st.in_slot[i0 + st.code[pc]]]
            pc += 1
            sp += 1
        elif op == OP_AGE:
            s = st.in_slot[i0 + st.code[pc]]
            pc += 1
            if st.seen[s]:
                r = <double>(<uint64_t>t_eval - <uint64_t>st.last_ts[s]) / 1000.0
            else:
                r = NAN
            sp += 1
        elif op == OP_WIN:
            w = w0 + st.code[pc]
            pc += 1
            s = st.in_slot[i0 + st.win_in[w]]
            base = st.ring_base[s]
            if base < 0:
                r = _window(st, st.win_fn[w], st.win_ms[w], t_eval, 0, 0, 0)
            else:
                r = _window(st, st.win_fn[w], st.win_ms[w], t_eval, base,
                            st.ring_head[s], st.ring_n[s])
            sp += 1
        elif op <= OP_NOT:
            a = stack[sp - 1]
            if op == OP_NEG:
                r = -a
            else:
                r = 1.0 if a == 0.0 else 0.0
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
                r = a / b
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
                r = fabs(a)
            elif op == OP_SQRT:
                r = NAN if a < 0.0 else sqrt(a)
            elif op == OP_EXP:
                r = exp(a)
            elif op == OP_LN:
                r = log(a)
            else:
                r = log10(a)
        elif op == OP_POW:
            r = _pow(stack[sp - 2], stack[sp - 1])
            sp -= 1
        elif op == OP_MIN or op == OP_MAX:
            n = st.code[pc]
            pc += 1
            sp -= n
            r = stack[sp]
            for k in range(sp, sp + n):
                a = stack[k]
                if a != a:
                    r = NAN
                    break
                if op == OP_MIN:
                    if a < r:
                        r = a
                elif a > r:
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
            elif x > hi:
                r = hi
            else:
                r = x
        elif op == OP_IF:
            sp -= 2
            r = stack[sp] if stack[sp - 1] != 0.0 else stack[sp + 1]
        else:  # OP_INTERP
            k = k0 + st.code[pc]
            n = st.code[pc + 1]
            pc += 2
            x = stack[sp - 1]
            if x != x:
                r = NAN
            elif x <= st.consts[k]:
                r = st.consts[k + n]
            elif x >= st.consts[k + n - 1]:
                r = st.consts[k + 2 * n - 1]
            else:
                j = 0
                while x >= st.consts[k + j + 1]:
                    j += 1
                x0 = st.consts[k + j]
                x1 = st.consts[k + j + 1]
                y0 = st.consts[k + n + j]
                y1 = st.consts[k + n + j + 1]
                r = y0 + (x - x0) * (y1 - y0) / (x1 - x0)
        stack[sp - 1] = NAN if r != r else r
    return stack[0]


cdef inline void _update(State *st, int32_t s, int64_t ts, double v, uint8_t q) noexcept nogil:
    cdef int64_t base, h
    st.last_v[s] = v
    st.last_ts[s] = ts
    st.last_q[s] = q
    st.seen[s] = 1
    base = st.ring_base[s]
    if base >= 0 and q == GOOD and isfinite(v):
        h = st.ring_head[s]
        st.ring_ts[base + h] = ts
        st.ring_v[base + h] = v
        st.ring_head[s] = h + 1 if h + 1 < RING else 0
        if st.ring_n[s] < RING:
            st.ring_n[s] += 1


def process(
    Py_ssize_t start,
    const uint32_t[::1] point_ids,
    const int64_t[::1] timestamps,
    const double[::1] values,
    const uint8_t[::1] quality,
    const int32_t[::1] slot_of,
    const int32_t[::1] dep_start,
    const int32_t[::1] dep_spec,
    double[::1] last_v,
    int64_t[::1] last_ts,
    uint8_t[::1] last_q,
    uint8_t[::1] seen,
    int64_t[::1] ring_base,
    int64_t[::1] ring_head,
    int64_t[::1] ring_n,
    int64_t[::1] ring_ts,
    double[::1] ring_v,
    const int32_t[::1] code,
    const int32_t[::1] code_off,
    const double[::1] consts,
    const int32_t[::1] const_off,
    const int32_t[::1] in_slot,
    const int32_t[::1] in_off,
    const int32_t[::1] win_in,
    const uint8_t[::1] win_fn,
    const int64_t[::1] win_ms,
    const int32_t[::1] win_off,
    const int64_t[::1] max_age,
    const int64_t[::1] out_id,
    const int32_t[::1] out_slot,
    uint8_t[::1] dirty,
    double[::1] stack,
    uint32_t[::1] o_id,
    int64_t[::1] o_ts,
    double[::1] o_v,
    uint8_t[::1] o_q,
    uint32_t[::1] c_spec,
    int64_t[::1] c_ts,
    double[::1] c_v,
    uint8_t[::1] c_q,
    int64_t[::1] counts,
):
    """See derive_py.process: returns where the walk stopped."""
    cdef Py_ssize_t n = point_ids.shape[0]
    cdef Py_ssize_t n_specs = max_age.shape[0]
    cdef Py_ssize_t n_slots = last_v.shape[0]
    cdef Py_ssize_t n_table = slot_of.shape[0]
    cdef Py_ssize_t o_cap = min(o_id.shape[0], o_ts.shape[0], o_v.shape[0], o_q.shape[0])
    cdef Py_ssize_t c_cap = min(c_spec.shape[0], c_ts.shape[0], c_v.shape[0], c_q.shape[0])
    cdef Py_ssize_t n_out = counts[0], n_cond = counts[1]
    cdef Py_ssize_t i = start, j, lo, hi, a, b, k, d
    cdef int64_t t_group, t_eval, age_max, oid
    cdef int32_t s, r, rank
    cdef uint32_t pid
    cdef uint8_t q
    cdef double v
    cdef bint found
    cdef State st
    if timestamps.shape[0] != n or values.shape[0] != n or quality.shape[0] != n:
        raise ValueError("derive.process: columns differ in length")
    if n == 0 or i >= n:
        return n
    if (n_slots == 0 or ring_ts.shape[0] == 0 or code.shape[0] == 0 or consts.shape[0] == 0
            or in_slot.shape[0] == 0 or win_in.shape[0] == 0 or win_fn.shape[0] == 0
            or win_ms.shape[0] == 0 or dep_spec.shape[0] == 0 or stack.shape[0] == 0):
        # an engine always pads these; an empty one has nothing to evaluate
        if n_slots == 0 or n_specs == 0:
            return n
        raise ValueError("derive.process: empty program or state arrays")
    st.last_v = &last_v[0]
    st.last_ts = &last_ts[0]
    st.last_q = &last_q[0]
    st.seen = &seen[0]
    st.ring_base = &ring_base[0]
    st.ring_head = &ring_head[0]
    st.ring_n = &ring_n[0]
    st.ring_ts = &ring_ts[0]
    st.ring_v = &ring_v[0]
    st.code = &code[0]
    st.consts = &consts[0]
    st.in_slot = &in_slot[0]
    st.win_in = &win_in[0]
    st.win_fn = &win_fn[0]
    st.win_ms = &win_ms[0]
    st.stack = &stack[0]
    with nogil:
        while i < n:
            if o_cap - n_out < n_specs or c_cap - n_cond < n_specs:
                break
            t_group = timestamps[i]
            lo = n_specs
            hi = -1
            while i < n and timestamps[i] == t_group:
                pid = point_ids[i]
                if pid < n_table:
                    s = slot_of[pid]
                    if s >= 0 and s < n_slots:
                        _update(&st, s, t_group, values[i], quality[i])
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
                    if st.seen[s] and (not found or st.last_ts[s] > t_eval):
                        t_eval = st.last_ts[s]
                        found = True
                rank = 0
                age_max = max_age[j]
                for k in range(a, b):
                    s = in_slot[k]
                    if not st.seen[s] or (
                        age_max > 0
                        and <uint64_t>t_eval - <uint64_t>st.last_ts[s] > <uint64_t>age_max
                    ):
                        r = RANK_BAD
                    elif st.last_q[s] < 4:
                        r = RANK[st.last_q[s]]
                    else:
                        r = RANK_BAD
                    if r > rank:
                        rank = r
                v = _run(&st, code_off[j], code_off[j + 1], const_off[j], a, win_off[j], t_eval)
                if rank < RANK_BAD and not isfinite(v):
                    rank = RANK_BAD
                q = QUALITY_OF_RANK[rank]
                oid = out_id[j]
                if oid < 0:
                    c_spec[n_cond] = <uint32_t>j
                    c_ts[n_cond] = t_eval
                    c_v[n_cond] = v
                    c_q[n_cond] = q
                    n_cond += 1
                else:
                    o_id[n_out] = <uint32_t>oid
                    o_ts[n_out] = t_eval
                    o_v[n_out] = v
                    o_q[n_out] = q
                    n_out += 1
                    s = out_slot[j]
                    if s >= 0:
                        _update(&st, s, t_eval, v, q)
                        for d in range(dep_start[s], dep_start[s + 1]):
                            dirty[dep_spec[d]] = 1
                            if dep_spec[d] > hi:
                                hi = dep_spec[d]
                j += 1
    counts[0] = n_out
    counts[1] = n_cond
    return i
