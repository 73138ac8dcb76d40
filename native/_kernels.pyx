# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Compiled kernels; ``kernels_py.py`` is the pure-Python twin and the reference.

Columns arrive as ``array.array`` (buffer protocol, no copy). Loops release the GIL so
the agent's event loop keeps running while the buffer thread filters a batch.
"""

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

# Same values as kernels_py.ACTION_* and native.batch's quality codes.
cdef enum:
    ACTION_NONE = 0
    ACTION_FLAG = 1
    ACTION_DROP = 2
    GOOD = 0
    BAD = 1
    UNCERTAIN = 2
    UNAVAILABLE = 3


def range_check(
    uint32_t[::1] point_ids,
    int64_t[::1] timestamps,
    double[::1] values,
    uint8_t[::1] quality,
    const double[::1] lo,
    const double[::1] hi,
    const uint8_t[::1] action,
):
    """See kernels_py.range_check: returns (kept, flagged, dropped), compacts in place."""
    cdef Py_ssize_t n = point_ids.shape[0]
    cdef Py_ssize_t n_table = action.shape[0]
    cdef Py_ssize_t i, kept = 0, flagged = 0, dropped = 0
    cdef uint32_t pid
    cdef uint8_t act, q
    cdef double v
    if timestamps.shape[0] != n or values.shape[0] != n or quality.shape[0] != n:
        raise ValueError("range_check: columns differ in length")
    if lo.shape[0] < n_table or hi.shape[0] < n_table:
        raise ValueError("range_check: lo/hi shorter than the action table")
    with nogil:
        for i in range(n):
            pid = point_ids[i]
            act = action[pid] if pid < n_table else ACTION_NONE
            q = quality[i]
            # only readings that claim a value are judged (BAD/UNAVAILABLE pass as they are)
            if act != ACTION_NONE and (q == GOOD or q == UNCERTAIN):
                v = values[i]
                # written as not(a and b) so that NaN fails the check
                if not (lo[pid] <= v and v <= hi[pid]):
                    if act == ACTION_DROP:
                        dropped += 1
                        continue
                    flagged += 1
                    quality[i] = BAD
            if kept != i:
                point_ids[kept] = pid
                timestamps[kept] = timestamps[i]
                values[kept] = values[i]
                quality[kept] = quality[i]
            kept += 1
    return kept, flagged, dropped


ctypedef fused uint_t:
    uint32_t
    uint64_t


def delta_encode(uint_t[::1] col):
    """In place: each value becomes its difference to the one before (first: to 0),
    wrapping like the unsigned type (mod 2**32 or 2**64)."""
    cdef Py_ssize_t i
    cdef uint_t prev = 0, cur
    with nogil:
        for i in range(col.shape[0]):
            cur = col[i]
            col[i] = cur - prev
            prev = cur


def delta_decode(uint_t[::1] col):
    """In place: undo delta_encode (running sum, wrapping)."""
    cdef Py_ssize_t i
    cdef uint_t acc = 0
    with nogil:
        for i in range(col.shape[0]):
            acc += col[i]
            col[i] = acc


def flag_timestamps(const int64_t[::1] timestamps, uint8_t[::1] quality, int64_t lo, int64_t hi):
    """See kernels_py.flag_timestamps: GOOD readings stamped outside [lo, hi) become
    UNCERTAIN; returns how many."""
    cdef Py_ssize_t i, n = timestamps.shape[0], flagged = 0
    if quality.shape[0] != n:
        raise ValueError("flag_timestamps: columns differ in length")
    with nogil:
        for i in range(n):
            if (timestamps[i] < lo or timestamps[i] >= hi) and quality[i] == GOOD:
                quality[i] = UNCERTAIN
                flagged += 1
    return flagged
