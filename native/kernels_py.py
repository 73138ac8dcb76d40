"""Pure-Python twins of the kernels in ``_kernels.pyx``.

They are the reference: same signatures, same in-place effects, same results, bit for
bit. ``native.impl`` picks the compiled module when it is built and these otherwise;
the tests run both on the same inputs and compare.
"""

from __future__ import annotations

from array import array
from itertools import accumulate

# Per-point range actions in the action lookup array. 0 means "no range stage here",
# so an all-zero table is a pass-through.
ACTION_NONE = 0
ACTION_FLAG = 1
ACTION_DROP = 2

# native.batch's quality codes; repeated so the kernels import nothing
GOOD, BAD, UNCERTAIN, UNAVAILABLE = 0, 1, 2, 3


def range_check(
    point_ids: array[int],
    timestamps: array[int],
    values: array[float],
    quality: array[int],
    lo: array[float],
    hi: array[float],
    action: array[int],
) -> tuple[int, int, int]:
    """Check each reading against its point's [lo, hi]; returns (kept, flagged, dropped).

    ``lo``/``hi``/``action`` are indexed by point id (ids past their end pass through).
    Only readings that claim a value (quality GOOD or UNCERTAIN) are judged; BAD and
    UNAVAILABLE ones already say they have none and pass untouched and uncounted (a drop
    must not hide a device fault, a flag must not turn "unavailable" into "bad"). A
    reading fails when ``not lo <= v <= hi``, which makes NaN fail too. Flag sets its
    quality to BAD and keeps its value (the number the device sent, for diagnosis); drop
    removes it by compacting all four columns in place, so the first ``kept`` entries of
    each column are the result: the caller truncates the arrays.
    """
    n = len(point_ids)
    if not (len(timestamps) == len(values) == len(quality) == n):
        raise ValueError("range_check: columns differ in length")
    n_table = len(action)
    if len(lo) < n_table or len(hi) < n_table:
        raise ValueError("range_check: lo/hi shorter than the action table")
    kept = flagged = dropped = 0
    for i in range(n):
        pid = point_ids[i]
        act = action[pid] if pid < n_table else ACTION_NONE
        # only readings that claim a value are judged (BAD/UNAVAILABLE pass as they are)
        judged = act != ACTION_NONE and quality[i] in (GOOD, UNCERTAIN)
        if judged and not (lo[pid] <= values[i] <= hi[pid]):
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


def delta_encode(col: array[int]) -> None:
    """In place: each unsigned value (typecode I or Q) becomes its difference to the one
    before (first: to 0), wrapping mod 2**32 or 2**64."""
    mask = (1 << (8 * col.itemsize)) - 1
    items = col.tolist()
    prev = [0, *items][: len(items)]
    col[:] = array(col.typecode, [(b - a) & mask for a, b in zip(prev, items, strict=True)])


def delta_decode(col: array[int]) -> None:
    """In place: undo ``delta_encode`` (running sum, wrapping)."""
    mask = (1 << (8 * col.itemsize)) - 1
    col[:] = array(col.typecode, [x & mask for x in accumulate(col)])


def flag_timestamps(timestamps: array[int], quality: array[int], lo: int, hi: int) -> int:
    """Readings stamped outside [lo, hi) by an obviously wrong clock: each GOOD one becomes
    UNCERTAIN (kept, not dropped: the value is fine, its time is not); returns how many."""
    if len(quality) != len(timestamps):
        raise ValueError("flag_timestamps: columns differ in length")
    flagged = 0
    for i, ts in enumerate(timestamps):
        if (ts < lo or ts >= hi) and quality[i] == GOOD:
            quality[i] = UNCERTAIN
            flagged += 1
    return flagged
