"""A point's series for the console's plots (central/series.py), on both stores: raw or
min/max/mean buckets, checked against a brute-force computation over the same readings;
PostgreSQL's ten-minute rollup (roll_up: pending blocks, exactly once, late batches) and its
budget of blocks read per series."""

from __future__ import annotations

import asyncio
import math
import threading
import time
import uuid
from collections.abc import Sequence
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from central.series import (
    LADDER_MS,
    MINUTE_MS,
    ROLLUP_MS,
    Series,
    bucket_count,
    bucket_span,
    choose_bucket,
    floor_to,
)
from central.store import AlarmBody, PointInfo, Store
from central.store_postgres import PostgresStore, split_url
from central.stores import open_store
from central.worker import IngestWorker
from common import wire
from common.broker import Mosquitto
from common.wire import Envelope, Meta, PointMeta
from native.batch import BAD, GOOD, UNAVAILABLE, UNCERTAIN, Batch
from native.stages import AlarmEvent
from tests.helpers import GW, STREAM, wait_until

Row = tuple[int, int, float, int]  # point_id, ts, value, quality
T0 = 1_765_000_000_000 - 1_765_000_000_000 % 86_400_000  # a day's start (Dec 2025)


def feed(store: Store, gateway: str, seq: int, rows: Sequence[Row]) -> None:
    """One uplink (a block on PostgreSQL) with these readings."""
    batch = Batch.from_rows(rows)
    env = Envelope(wire.LANE_TELEMETRY, STREAM, seq, len(batch), b"")
    assert store.store_batch(gateway, env, batch)


def counted(value: float, quality: int) -> bool:
    return quality in (GOOD, UNCERTAIN) and math.isfinite(value)


def brute(rows: Sequence[Row], point: int, since: int, until: int, max_points: int) -> Series:
    """What `series` must give, from the readings in sending order."""
    mine = [(ts, v, q) for p, ts, v, q in rows if p == point]
    inside = sorted((r for r in mine if since <= r[0] < until), key=lambda r: r[0])
    if len(inside) <= max_points:
        s = Series(0)
        for ts, v, q in inside:
            ok = counted(v, q)
            s.t.append(ts)
            for column in (s.vmin, s.vmax, s.vmean):
                column.append(v if ok else None)
            s.n.append(int(ok))
            s.n_bad.append(int(not ok))
        return s
    bucket = choose_bucket(since, until, max_points)
    lo, hi = bucket_span(since, until, bucket)
    groups: dict[int, list[tuple[float, int]]] = {}
    for ts, v, q in mine:
        if lo <= ts < hi:
            groups.setdefault(floor_to(ts, bucket), []).append((v, q))
    s = Series(bucket)
    for t in sorted(groups):
        good = [v for v, q in groups[t] if counted(v, q)]
        s.t.append(t)
        s.n.append(len(good))
        s.n_bad.append(len(groups[t]) - len(good))
        s.vmin.append(min(good) if good else None)
        s.vmax.append(max(good) if good else None)
        s.vmean.append(math.fsum(good) / len(good) if good else None)
    return s


def assert_same(got: Series, want: Series) -> None:
    """Exact but for the mean (a float sum depends on its order)."""
    assert (got.bucket_ms, got.t, got.n, got.n_bad) == (
        want.bucket_ms,
        want.t,
        want.n,
        want.n_bad,
    )
    assert got.vmin == want.vmin and got.vmax == want.vmax
    assert got.vmean == [
        None if m is None else pytest.approx(m, rel=1e-9, abs=1e-6) for m in want.vmean
    ]


def queued(store: Store) -> int:
    """Blocks waiting for roll_up (PostgreSQL); 0 for SQLite."""
    if not isinstance(store, PostgresStore):
        return 0
    with store._lock:
        row = store._db.execute("SELECT count(*) FROM rollup_queue").fetchone()
    return int(row[0]) if row else 0


# -- buckets --------------------------------------------------------------------------------


def test_ladder_and_bucket_choice() -> None:
    assert LADDER_MS[0] == 1000 and LADDER_MS[-1] == 86_400_000
    assert list(LADDER_MS) == sorted(set(LADDER_MS)) and len(LADDER_MS) == 18
    assert all(b % MINUTE_MS == 0 for b in LADDER_MS if b >= MINUTE_MS)
    hour, day = 3_600_000, 86_400_000
    # buckets are counted as multiples of the step since the epoch, the edges included
    assert bucket_count(0, 1000, 1000) == 1
    assert bucket_count(999, 1001, 1000) == 2
    assert bucket_count(-1, 1, 1000) == 2  # before the epoch: floored, not truncated
    assert bucket_span(1500, 3001, 1000) == (1000, 4000)
    assert bucket_span(-1500, -999, 1000) == (-2000, 0)
    assert floor_to(-1, MINUTE_MS) == -MINUTE_MS
    assert choose_bucket(T0, T0 + day, 1000) == 120_000  # 720 buckets of 2 min
    assert choose_bucket(T0, T0 + 30 * day, 1000) == hour  # a month: 720 hours
    assert choose_bucket(T0, T0 + 1000 * 1000, 1000) == 1000
    assert choose_bucket(T0, T0 + 1000 * 1000 + 1, 1000) == 2000
    assert choose_bucket(T0 + 1, T0 + 1 + 1000 * 1000, 1000) == 2000  # 1001 buckets of 1 s
    assert choose_bucket(T0, T0 + 365 * day, 100) == day  # the ladder ends at a day
    assert choose_bucket(T0, T0 + hour, 1) == hour


# -- series against brute force -----------------------------------------------------------

SPECIAL_VALUES = [math.nan, math.inf, -math.inf, -0.0]
QUALITIES = [GOOD, GOOD, GOOD, UNCERTAIN, BAD, UNAVAILABLE]


@st.composite
def readings(draw: st.DrawFn) -> tuple[int, list[Row]]:
    """(span, rows): up to 300 readings of points 1 and 2 spread over the span (a minute
    to 3 hours: dense enough for every bucket size), some values NaN or infinite."""
    rnd = draw(st.randoms(use_true_random=False))
    span = draw(st.sampled_from([MINUTE_MS, 20 * MINUTE_MS, 3 * 3_600_000]))
    rows = []
    for _ in range(draw(st.integers(0, 300))):
        special = rnd.random() < 0.1
        value = rnd.choice(SPECIAL_VALUES) if special else rnd.uniform(-1e6, 1e6)
        rows.append((rnd.choice((1, 2)), rnd.randrange(span), value, rnd.choice(QUALITIES)))
    return span, rows


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    data=readings(),
    base=st.sampled_from([T0, -7_200_000]),  # and across the epoch: floors, not truncation
    cuts=st.lists(st.integers(0, 300), max_size=6),
    ranges=st.lists(
        st.tuples(
            st.sampled_from([0.0, -0.1]) | st.floats(-0.2, 1.0),  # start, of the span
            st.sampled_from([1.0, 0.5]) | st.floats(0.0, 1.5),  # length, of the span
            st.integers(1, 40),  # max_points
        ),
        min_size=1,
        max_size=4,
    ),
    rolled=st.integers(0, 8),
)
def test_series_matches_brute_force(
    store: Store,
    data: tuple[int, list[Row]],
    base: int,
    cuts: list[int],
    ranges: list[tuple[float, float, int]],
    rolled: int,
) -> None:
    """Readings sent in uplinks cut anywhere (out of order too), some of them folded into
    the rollup, the rest pending: every series is the brute-force one, and the same once
    all is rolled up."""
    gateway = f"gw-{uuid.uuid4().hex[:8]}"
    span, rows = data
    rows = [(p, base + dt, v, q) for p, dt, v, q in rows]
    bounds = sorted({0, len(rows), *(min(c, len(rows)) for c in cuts)})
    for seq, (a, b) in enumerate(pairwise(bounds), 1):
        feed(store, gateway, seq, rows[a:b])
    store.roll_up(rolled)  # part of it: the rest is read from the pending blocks
    for _ in range(2):  # partly rolled up, then all of it
        for start, length, max_points in ranges:
            since = base + int(start * span)
            until = since + max(1, int(length * span))
            for point in (1, 2):
                got = store.series(gateway, point, since, until, max_points)
                assert_same(got, brute(rows, point, since, until, max_points))
        while store.roll_up(3):
            pass


def test_raw_or_bucketed(store: Store) -> None:
    # a reading every 10 s for an hour, on point 1 (and point 2, which is not asked for)
    rows = [(p, T0 + i * 10_000, float(i), GOOD) for i in range(360) for p in (1, 2)]
    for seq in range(6):
        feed(store, GW, seq + 1, rows[seq * 120 : (seq + 1) * 120])
    store.roll_up(1000)
    hour = 3_600_000
    raw = store.series(GW, 1, T0, T0 + hour, 360)
    assert raw.bucket_ms == 0 and raw.t == [T0 + i * 10_000 for i in range(360)]
    assert raw.vmin == raw.vmax == raw.vmean == [float(i) for i in range(360)]
    assert raw.n == [1] * 360 and raw.n_bad == [0] * 360
    # one reading too many for raw: 15 s buckets (240 of them; 10 s would make 360)
    s = store.series(GW, 1, T0, T0 + hour, 359)
    assert s.bucket_ms == 15_000 and s.t == [T0 + k * 15_000 for k in range(240)]
    assert s.n == [2, 1] * 120 and s.vmin[:3] == [0.0, 2.0, 3.0] and s.vmax[:2] == [1.0, 2.0]
    s = store.series(GW, 1, T0, T0 + hour, 60)  # minutes: from PostgreSQL's rollup
    assert s.bucket_ms == MINUTE_MS and len(s.t) == 60 and s.n == [6] * 60
    assert s.vmin[:2] == [0.0, 6.0] and s.vmax[:2] == [5.0, 11.0] and s.vmean[0] == 2.5
    # a range cut inside minutes: raw holds exactly its readings; buckets are whole
    since, until = T0 + 95_000, T0 + 3 * MINUTE_MS + 5_000
    raw = store.series(GW, 1, since, until, 100)
    assert raw.bucket_ms == 0 and raw.t[0] == T0 + 100_000 and raw.t[-1] == T0 + 180_000
    assert len(raw.t) == 9
    assert store.series(GW, 1, since, until, 9).bucket_ms == 0
    s = store.series(GW, 1, since, until, 8)  # 90 s at most 8 buckets: 15 s
    assert s.bucket_ms == 15_000 and s.t == [T0 + k * 15_000 for k in range(6, 13)]
    assert s.n == [2, 1, 2, 1, 2, 1, 2]  # the first and last buckets are whole
    s = store.series(GW, 1, since, until, 2)  # 2-minute buckets: T0 and T0 + 2 min
    assert s.bucket_ms == 120_000 and s.t == [T0, T0 + 120_000] and s.n == [12, 12]
    # nothing in the range, or an empty range
    assert store.series(GW, 1, T0 - hour, T0, 10) == Series(0)
    assert store.series(GW, 1, T0, T0, 10) == Series(0)
    assert store.series("gw-none", 1, T0, T0 + hour, 10) == Series(0)


def test_bad_values_do_not_count(store: Store) -> None:
    rows = [
        (1, T0 + 1000, 1.0, GOOD),
        (1, T0 + 2000, math.nan, GOOD),
        (1, T0 + 3000, math.inf, UNCERTAIN),
        (1, T0 + 4000, 5.0, BAD),
        (1, T0 + 5000, math.nan, UNAVAILABLE),
        (1, T0 + 6000, 2.0, UNCERTAIN),
        (1, T0 + MINUTE_MS, 7.0, BAD),  # a minute with nothing that counts
        (1, T0 + MINUTE_MS + 1, -math.inf, GOOD),
    ]
    feed(store, GW, 1, rows)
    raw = store.series(GW, 1, T0, T0 + 2 * MINUTE_MS, 100)
    assert raw.vmin == raw.vmax == raw.vmean == [1.0, None, None, None, None, 2.0, None, None]
    assert raw.n == [1, 0, 0, 0, 0, 1, 0, 0] and raw.n_bad == [0, 1, 1, 1, 1, 0, 1, 1]
    for _ in range(2):  # pending, then rolled up
        s = store.series(GW, 1, T0, T0 + 2 * MINUTE_MS, 2)
        assert (s.bucket_ms, s.t) == (MINUTE_MS, [T0, T0 + MINUTE_MS])
        assert (s.n, s.n_bad) == ([2, 0], [4, 2])
        assert (s.vmin, s.vmax, s.vmean) == ([1.0, None], [2.0, None], [1.5, None])
        store.roll_up(10)


def test_pending_blocks_then_rolled_up(pg_url: str) -> None:
    """The newest blocks are in the series before roll_up folds them in, and after it the
    series is the same, now read from point_rollup."""
    store = open_store(pg_url)
    try:
        rows = [(1, T0 + i * 1000, float(i % 97), GOOD) for i in range(3 * 3600)]  # 3 h, 1 Hz
        for seq in range(18):
            feed(store, GW, seq + 1, rows[seq * 600 : (seq + 1) * 600])
        assert queued(store) == 18
        args = (GW, 1, T0 - 5000, T0 + 3 * 3_600_000 + 5000, 200)
        before = store.series(*args)
        assert before.bucket_ms == 60_000 and sum(before.n) == len(rows)
        assert_same(before, brute(rows, *args[1:]))
        assert store.roll_up(10) == 10 and queued(store) == 8
        assert store.series(*args) == before  # half rolled up
        assert store.roll_up(100) == 8 and store.roll_up(100) == 0
        assert store.series(*args) == before
        # a reader (create=False) sees the same
        reader = open_store(pg_url, create=False)
        try:
            assert reader.series(*args) == before
        finally:
            reader.close()
    finally:
        store.close()


def test_late_batch_merges_into_rolled_slots(store: Store) -> None:
    feed(store, GW, 1, [(1, T0 + 30_000, 5.0, GOOD), (1, T0 + 90_000, 6.0, GOOD)])
    store.roll_up(10)
    # a batch sent late: older readings in minutes that are rolled up already
    feed(store, GW, 2, [(1, T0 + 10_000, 1.0, GOOD), (1, T0 + 20_000, 9.0, BAD)])
    feed(store, GW, 3, [(1, T0 + 70_000, 8.0, UNCERTAIN), (1, T0 - 1, 4.0, GOOD)])
    for _ in range(2):  # pending, then merged
        s = store.series(GW, 1, T0 - 60_000, T0 + 120_000, 3)
        assert (s.bucket_ms, s.t) == (MINUTE_MS, [T0 - MINUTE_MS, T0, T0 + MINUTE_MS])
        assert (s.n, s.n_bad) == ([1, 2, 2], [0, 1, 0])
        assert (s.vmin, s.vmax, s.vmean) == ([4.0, 1.0, 6.0], [4.0, 5.0, 8.0], [4.0, 3.0, 7.0])
        store.roll_up(10)
    assert queued(store) == 0
    # ten-minute buckets: PostgreSQL's rolled-up slots, the late readings merged in
    s = store.series(GW, 1, T0 - ROLLUP_MS, T0 + ROLLUP_MS, 2)
    assert (s.bucket_ms, s.t) == (ROLLUP_MS, [T0 - ROLLUP_MS, T0])
    assert (s.n, s.n_bad, s.vmin, s.vmax) == ([1, 4], [0, 1], [4.0, 1.0], [4.0, 8.0])
    assert s.vmean == [4.0, 5.0]
    if isinstance(store, PostgresStore):
        with store._lock:
            slots = store._db.execute(
                "SELECT slot, n, n_bad FROM point_rollup ORDER BY slot"
            ).fetchall()
        t0 = T0 // ROLLUP_MS
        assert slots == [(t0 - 1, 1, 0), (t0, 4, 1)]


def test_roll_up_exactly_once_from_two_stores(pg_url: str) -> None:
    """Two store objects (two workers) roll up the same queue at once: every block is
    folded in once, none twice."""
    writer = open_store(pg_url)
    stores = [open_store(pg_url), open_store(pg_url)]
    try:
        rows: list[Row] = []
        for seq in range(1, 301):  # 300 blocks of 20 points, some minutes shared by blocks
            block = [(p, T0 + seq * 7_000 + p, float(seq * p % 101), GOOD) for p in range(20)]
            feed(writer, GW, seq, block)
            rows += block
        taken = [0, 0]
        start = threading.Barrier(2)

        def run(i: int) -> None:
            start.wait()
            while n := stores[i].roll_up(7):
                taken[i] += n

        threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(taken) == 300 and queued(writer) == 0
        for point in (0, 7, 19):
            args = (point, T0, T0 + 301 * 7_000 + 100, 50)
            assert_same(writer.series(GW, *args), brute(rows, *args))
        assert writer.roll_up(10) == 0
    finally:
        for s in (writer, *stores):
            s.close()


def test_roll_up_skips_blocks_another_holds(pg_url: str) -> None:
    """A roll-up does not wait for the blocks another one holds: it takes the others."""
    import psycopg

    store = open_store(pg_url)
    assert isinstance(store, PostgresStore)
    try:
        for seq in range(1, 11):
            feed(store, GW, seq, [(1, T0 + seq, 1.0, GOOD)])
        with psycopg.connect(split_url(pg_url)[0]) as other:
            other.execute(f"SET search_path TO {store.schema}")
            other.execute("SELECT 1 FROM rollup_queue ORDER BY t_max LIMIT 4 FOR UPDATE")
            assert store.roll_up(100) == 6
            other.rollback()
        assert store.roll_up(100) == 4
        assert store.series(GW, 1, T0, T0 + MINUTE_MS, 1).n == [10]
    finally:
        store.close()


def test_upgrade_queues_the_blocks_stored_before(pg_url: str) -> None:
    """A store made before the rollup existed: its blocks are queued when the ingest
    upgrades it, and rolled up like fresh ones."""
    store = open_store(pg_url)
    assert isinstance(store, PostgresStore)
    feed(store, GW, 1, [(1, T0 + 1, 1.0, GOOD), (1, T0 + MINUTE_MS, 3.0, GOOD)])
    store._db.execute("DROP TABLE point_rollup, rollup_queue")
    store.close()
    store = open_store(pg_url)
    try:
        assert queued(store) == 1 and store.roll_up(10) == 1
        s = store.series(GW, 1, T0, T0 + 2 * MINUTE_MS, 1)
        assert (s.bucket_ms, s.n, s.vmean) == (2 * MINUTE_MS, [2], [2.0])
        store.close()
        store = open_store(pg_url)  # once only
        assert queued(store) == 0
    finally:
        store.close()


# -- points and alarms ----------------------------------------------------------------------


def make_meta(gateway: str) -> Meta:
    return Meta(
        gateway=gateway,
        stream=STREAM,
        site="s",
        location=None,
        points=(
            PointMeta(1, "bridge-7/strain_1", "bridge-7", "strain_1", "µε", "sim", "float"),
            PointMeta(2, "bridge-7/Strain_2", "bridge-7", "Strain_2", "µε", "sim", "float"),
            PointMeta(3, "pump_%/temp", "pump_%", "temp", "°C", "modbus", "float"),
        ),
    )


def test_find_points_and_point(store: Store) -> None:
    store.store_meta(GW, make_meta(GW))
    store.store_meta("gw-2", make_meta("gw-2"))
    found = store.find_points("STRAIN")
    assert [(p.key, p.gateway) for p in found] == [
        ("bridge-7/Strain_2", GW),
        ("bridge-7/Strain_2", "gw-2"),
        ("bridge-7/strain_1", GW),
        ("bridge-7/strain_1", "gw-2"),
    ]
    assert [p.key for p in store.find_points("strain", gateway="gw-2", limit=1)] == [
        "bridge-7/Strain_2"
    ]
    assert len(store.find_points("gw-2/")) == 3  # the gateway/key form
    assert [p.key for p in store.find_points("GW-1/bridge-7/strain_1")] == ["bridge-7/strain_1"]
    # no wildcards: % and _ are plain characters
    assert [(p.gateway, p.key) for p in store.find_points("%", gateway=GW)] == [(GW, "pump_%/temp")]
    assert [p.key for p in store.find_points("p_%/")] == ["pump_%/temp"] * 2
    assert store.find_points("nothing") == []
    assert len(store.find_points("")) == 6
    p = store.point(GW, "pump_%/temp")
    assert isinstance(p, PointInfo)
    assert (p.gateway, p.point_id, p.device, p.name, p.unit, p.driver, p.type) == (
        GW,
        3,
        "pump_%",
        "temp",
        "°C",
        "modbus",
        "float",
    )
    assert p.updated_ms > 0
    assert store.point(GW, "pump_%/TEMP") is None and store.point("gw-3", "pump_%/temp") is None


def test_point_alarms(store: Store) -> None:
    store.store_meta(GW, make_meta(GW))
    seq = 0

    def alarm(*events: AlarmEvent) -> None:
        nonlocal seq
        seq += 1
        env = Envelope(wire.LANE_ALARM, STREAM, seq, len(events), b"")
        assert store.store_batch(GW, env, AlarmBody(list(events)))

    alarm(
        AlarmEvent(1, "high", "critical", True, 100, 9.0, 100),
        AlarmEvent(2, "high", "warning", True, 150, 5.0, 150),  # another point
    )
    alarm(AlarmEvent(1, "high", "critical", False, 300, 1.0, 100))
    alarm(AlarmEvent(1, "low", "warning", True, 500, -1.0, 500))  # active
    alarm(AlarmEvent(1, "high", "critical", True, 1000, 9.5, 1000))
    alarm(AlarmEvent(1, "high", "critical", False, 1100, 1.0, 1000))

    def spans(since: int, until: int) -> list[tuple[str, int, int | None]]:
        return [
            (a.rule, a.raised_ts, a.cleared_ts) for a in store.point_alarms(GW, 1, since, until)
        ]

    every = [("high", 100, 300), ("low", 500, None), ("high", 1000, 1100)]
    assert spans(0, 2000) == every
    assert spans(200, 400) == [("high", 100, 300)]  # cleared in the range
    assert spans(301, 450) == []  # nothing then
    assert spans(600, 700) == [("low", 500, None)]  # active across the whole range
    assert spans(1050, 1060) == [("low", 500, None), ("high", 1000, 1100)]
    assert spans(1101, 5000) == [("low", 500, None)]
    assert spans(0, 100) == []  # until is excluded
    episode = store.point_alarms(GW, 1, 0, 200)[0]
    assert (episode.key, episode.severity, episode.value) == ("bridge-7/strain_1", "critical", 9.0)
    assert store.point_alarms(GW, 3, 0, 2000) == []


# -- retention ------------------------------------------------------------------------------


def test_prune_drops_old_slots(store_url: str) -> None:
    store = open_store(store_url)
    day = 86_400_000
    now = int(time.time() * 1000)
    old, recent = floor_to(now - 10 * day, ROLLUP_MS), now - 1000
    try:
        feed(store, GW, 1, [(1, old, 1.0, GOOD), (1, old + MINUTE_MS, 2.0, GOOD)])
        feed(store, GW, 2, [(1, recent, 3.0, GOOD)])
        store.roll_up(10)
        feed(store, GW, 3, [(1, old + 1, 4.0, GOOD)])  # pending when its day is dropped
        dropped = store.prune(now - 5 * day)
        assert store.series(GW, 1, old - day, now, 2).t == [recent]
        assert store.series(GW, 1, old - day, old + day, 2) == Series(0)
        if isinstance(store, PostgresStore):
            assert dropped["point_rollup"] == 1 and dropped["rollup_queue"] == 1
            assert queued(store) == 0 and store.roll_up(10) == 0
    finally:
        store.close()


# -- the ingest worker drains the queue -----------------------------------------------------


class FlakyStore(PostgresStore):
    """Its first roll_up fails, as on a connection lost."""

    failed = False

    def roll_up(self, limit: int) -> int:
        if not self.failed:
            self.failed = True
            raise ConnectionError("the server went away")
        return super().roll_up(limit)


def test_worker_rolls_up(pg_url: str, mosquitto: Mosquitto) -> None:
    """The ingest worker's roll-up task drains what was stored, every second, on the
    store connection given for it (its failure proves it was that one); a failed call is
    counted and retried."""

    async def main() -> None:
        store = FlakyStore(pg_url)  # the roll-up's own connection (it fails once)
        writer = open_store(pg_url)
        worker = IngestWorker(mosquitto.url, writer, backoff_min=0.05, roll_up_store=store)
        task = asyncio.create_task(worker.run())
        try:
            for seq in range(1, 4):
                feed(writer, GW, seq, [(1, T0 + seq * 1000, float(seq), GOOD)])
            await wait_until(lambda: worker.counters.blocks_rolled_up == 3)
            assert queued(writer) == 0 and worker.counters.roll_up_errors == 1
            feed(writer, GW, 4, [(1, T0 + 4000, 4.0, GOOD)])
            await wait_until(lambda: worker.counters.blocks_rolled_up == 4)
            assert store.series(GW, 1, T0, T0 + MINUTE_MS, 1).n == [4]
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            store.close()
            writer.close()

    asyncio.run(main())


def test_a_series_reads_a_bounded_number_of_blocks(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond RAW_BLOCK_BUDGET blocks, raw readings and short buckets give way to the
    rollup's ten-minute slots: a plot never scans a month of a gateway's blocks."""
    import central.store_postgres

    store = open_store(pg_url)
    try:
        rows = [(1, T0 + k * MINUTE_MS, float(k % 7), GOOD) for k in range(30)]
        for seq, row in enumerate(rows, 1):  # a block a minute, as a 1-minute flush sends
            feed(store, GW, seq, [row])
        store.roll_up(100)
        assert store.series(GW, 1, T0, T0 + 30 * MINUTE_MS, 100).bucket_ms == 0  # 30 blocks
        monkeypatch.setattr(central.store_postgres, "RAW_BLOCK_BUDGET", 10)
        s = store.series(GW, 1, T0, T0 + 30 * MINUTE_MS, 100)
        assert (s.bucket_ms, s.t) == (ROLLUP_MS, [T0, T0 + ROLLUP_MS, T0 + 2 * ROLLUP_MS])
        assert s.n == [10, 10, 10] and s.vmin == [0.0, 0.0, 0.0] and s.vmax == [6.0] * 3
        s = store.series(GW, 1, T0, T0 + 30 * MINUTE_MS, 20)  # 2-minute buckets wanted
        assert s.bucket_ms == ROLLUP_MS and s.n == [10, 10, 10]
    finally:
        store.close()


def test_latest_values_keep_the_newest_reading_whatever_the_order(store: Store) -> None:
    """A late batch with older readings, rolled up after a newer one, does not replace the
    point's latest value (PostgreSQL's point_latest; SQLite reads its readings)."""
    since = T0 - 3_600_000
    store.store_meta(GW, make_meta(GW))
    feed(store, GW, 1, [(1, T0 + 2_000, 7.0, GOOD), (1, T0 + 3_000, 99.0, BAD)])
    store.roll_up(10)
    feed(store, GW, 2, [(1, T0 + 1_000, 5.0, GOOD), (1, T0 - 5_000, 4.0, UNCERTAIN)])
    store.roll_up(10)
    found = store.latest_values(since, points="bridge-7/strain_1")
    assert [(v.gateway, v.ts, v.value) for v in found] == [(GW, T0 + 2_000, 7.0)]
