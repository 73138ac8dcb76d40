"""A point's readings for a plot: raw when few, else min/max/mean per time bucket.

`Store.series` returns the raw readings of a range when it holds at most `max_points` of
them, else one row per non-empty bucket of the smallest `LADDER_MS` step that gives at
most `max_points` buckets. Buckets are multiples of the step since the epoch and whole: a
bucketed series covers every reading of each bucket that overlaps [since, until), so a
bucket reads the same whichever range shows it (panning does not change the edges), and
PostgreSQL serves steps of `ROLLUP_MS` and more from whole rows of its ``point_rollup``.

Only readings of quality GOOD or UNCERTAIN with a finite value count in vmin / vmax /
vmean / n; the others (BAD, UNAVAILABLE, NaN, ±inf) are counted in n_bad.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from native.batch import GOOD, UNCERTAIN

MINUTE_MS: Final = 60_000
#: PostgreSQL's rollup slot. Ten minutes: a point read once a minute (most city sensors)
#: costs a rollup row per ten readings, not one per reading as a minute rollup would
ROLLUP_MS: Final = 10 * MINUTE_MS
#: the bucket steps, smallest first: 1 s ... 1 d; from ROLLUP_MS up, multiples of it
LADDER_MS: Final = (
    *(s * 1000 for s in (1, 2, 5, 10, 15, 30)),
    *(m * MINUTE_MS for m in (1, 2, 5, 10, 20, 30)),
    *(h * 3_600_000 for h in (1, 2, 3, 6, 12, 24)),
)
#: the qualities whose (finite) values count in min / max / mean
COUNTED_QUALITIES: Final = (GOOD, UNCERTAIN)
#: the largest finite double: ``abs(value) <= it`` is false for NaN and ±inf, in SQLite
#: (NaN is stored as NULL) and in PostgreSQL (NaN sorts above every number) alike
_MAX_FINITE: Final = "1.7976931348623157e308"
_MAX_FLOAT: Final = float(_MAX_FINITE)


@dataclass(frozen=True, slots=True)
class Series:
    """`bucket_ms` 0: raw readings (t = reading times; vmin = vmax = vmean = the value,
    None where it does not count; n / n_bad 1 or 0). Else t = bucket starts, only
    non-empty buckets; vmin / vmax / vmean None where no reading of the bucket counts."""

    bucket_ms: int
    t: list[int] = field(default_factory=list)
    vmin: list[float | None] = field(default_factory=list)
    vmax: list[float | None] = field(default_factory=list)
    vmean: list[float | None] = field(default_factory=list)
    n: list[int] = field(default_factory=list)
    n_bad: list[int] = field(default_factory=list)


def floor_to(ts: int, step: int) -> int:
    return ts - ts % step  # Python's % floors: right for times before the epoch too


def bucket_count(since_ms: int, until_ms: int, bucket_ms: int) -> int:
    """How many buckets of `bucket_ms` overlap [since_ms, until_ms) (until > since)."""
    return (until_ms - 1) // bucket_ms - since_ms // bucket_ms + 1


def choose_bucket(since_ms: int, until_ms: int, max_points: int) -> int:
    """The smallest ladder step giving at most `max_points` buckets over the range; the
    largest step (1 d) when none does."""
    for step in LADDER_MS:
        if bucket_count(since_ms, until_ms, step) <= max_points:
            return step
    return LADDER_MS[-1]


def bucket_span(since_ms: int, until_ms: int, bucket_ms: int) -> tuple[int, int]:
    """[lo, hi): the whole buckets that overlap [since_ms, until_ms)."""
    return floor_to(since_ms, bucket_ms), floor_to(until_ms - 1, bucket_ms) + bucket_ms


def raw_series(rows: Sequence[tuple[int, float, int]]) -> Series:
    """From (ts, value, quality) in time order."""
    s = Series(0)
    for ts, value, quality in rows:
        counted = quality in COUNTED_QUALITIES and abs(value) <= _MAX_FLOAT
        v = float(value) if counted else None
        s.t.append(int(ts))
        s.vmin.append(v)
        s.vmax.append(v)
        s.vmean.append(v)
        s.n.append(int(counted))
        s.n_bad.append(int(not counted))
    return s


def bucketed_series(bucket_ms: int, rows: Sequence[Sequence[Any]]) -> Series:
    """From (bucket start, n, n_bad, vmin, vmax, vsum) in time order (`bucket_query`)."""
    s = Series(bucket_ms)
    for t, n, n_bad, vmin, vmax, vsum in rows:
        s.t.append(int(t))
        s.n.append(int(n))
        s.n_bad.append(int(n_bad))
        s.vmin.append(None if not n else float(vmin))
        s.vmax.append(None if not n else float(vmax))
        s.vmean.append(None if not n else float(vsum) / int(n))
    return s


# -- SQL shared by the two stores (`ph` is the driver's placeholder: "?" or "%s") ---------


def counted(value: str = "value", quality: str = "quality") -> str:
    """The condition under which a reading counts in min / max / mean."""
    qualities = ", ".join(str(q) for q in COUNTED_QUALITIES)
    return f"({quality} IN ({qualities}) AND abs({value}) <= {_MAX_FINITE})"


def floor_sql(ts: str, step: str, mod: str = "%") -> str:
    """`ts` floored to a multiple of `step` (SQL's % truncates towards zero); `mod` is
    the modulo operator as the query text spells it ("%%" for psycopg with parameters)."""
    return f"({ts} - (({ts} {mod} {step}) + {step}) {mod} {step})"


def aggregates(value: str = "value", quality: str = "quality") -> str:
    """n, n_bad, vmin, vmax, vsum of a group of readings (vsum 0 when n is 0)."""
    ok = counted(value, quality)
    return (
        f"sum(CASE WHEN {ok} THEN 1 ELSE 0 END), sum(CASE WHEN {ok} THEN 0 ELSE 1 END), "
        f"min(CASE WHEN {ok} THEN {value} END), max(CASE WHEN {ok} THEN {value} END), "
        f"COALESCE(sum(CASE WHEN {ok} THEN {value} END), 0)"
    )
