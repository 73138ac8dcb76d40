"""Platform ingest: the SQLite and PostgreSQL stores, and the worker against a real
mosquitto (fake gateways publish with aiomqtt)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from central.store import AlarmBody, DeadLetter, Store, StoreCounts, StoreMissing
from central.store_postgres import partition_name, split_url
from central.stores import open_store
from central.worker import IngestWorker
from common import wire
from common.broker import Mosquitto
from common.wire import Envelope, GatewayStats, Meta, PointMeta
from native import codec
from native.batch import GOOD, Batch
from native.stages import AlarmEvent
from tests.helpers import GW, STREAM, Gateway, make_batch, wait_until


def bits(v: float) -> bytes:
    return struct.pack("<d", v)


def env_for(
    batch: Batch, seq: int, stream: str = STREAM, lane: int = wire.LANE_TELEMETRY
) -> Envelope:
    return Envelope(lane, stream, seq, len(batch), b"")


def make_meta(gateway: str = GW, unit: str = "µε") -> Meta:
    return Meta(
        gateway=gateway,
        stream=STREAM,
        site="block-12",
        location={"lat": 52.5},
        points=(
            PointMeta(1, "bridge-7/strain_1", "bridge-7", "strain_1", unit, "sim", "float"),
            PointMeta(2, "bridge-7/strain_2", "bridge-7", "strain_2", unit, "sim", "float"),
            PointMeta(3, "bridge-7/temperature", "bridge-7", "temperature", "°C", "sim"),
        ),
    )


# -- stores ---------------------------------------------------------------------------------


def test_open_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = open_store("sqlite:///rel/platform.db")
    s.close()
    assert (tmp_path / "rel" / "platform.db").exists()
    s = open_store(f"sqlite:///{tmp_path}/abs.db")  # sqlite:////abs/path
    s.close()
    assert (tmp_path / "abs.db").exists()
    open_store("sqlite:///:memory:").close()
    with pytest.raises(ValueError, match="unsupported store URL"):
        open_store("mysql://x")
    with pytest.raises(ValueError, match="no database path"):
        open_store("sqlite:///")
    assert split_url("postgresql://u@h:5/db?schema=s1&sslmode=disable&connect_timeout=3") == (
        "postgresql://u@h:5/db?sslmode=disable&connect_timeout=3&application_name=citygw"
        "&keepalives=1"
        "&keepalives_idle=10&keepalives_interval=5&keepalives_count=3",
        "s1",
    )
    assert split_url("postgres://u@h/db")[1] == "public"
    with pytest.raises(ValueError, match="invalid schema"):
        split_url("postgresql://u@h/db?schema=a;drop")


def test_store_and_dedup(store: Store) -> None:
    b = make_batch(10)
    assert store.counts() == StoreCounts(0, 0, 0, 0)
    assert store.store_batch(GW, env_for(b, 1), b) is True
    assert store.readings(GW) == list(b.rows())
    # the same (gateway, stream, seq) again: dropped, nothing stored
    other = make_batch(5, start_ts=1)
    assert store.store_batch(GW, env_for(other, 1), other) is False
    assert store.readings(GW) == list(b.rows())
    assert store.counts() == StoreCounts(readings=10, batches=1, duplicates_dropped=1, gateways=1)
    # same seq on another stream (a replaced buffer) or another gateway: new data
    assert store.store_batch(GW, env_for(other, 1, stream=uuid.uuid4().hex), other) is True
    assert store.store_batch("gw-2", env_for(other, 1), other) is True
    assert store.counts() == StoreCounts(readings=20, batches=3, duplicates_dropped=1, gateways=2)
    assert store.readings("gw-2") == list(other.rows())
    assert store.readings("nope") == []
    assert store.duplicate_readings() == 0


def test_store_batches_one_transaction(store: Store) -> None:
    b1, b2 = make_batch(4), make_batch(3, start_ts=5)
    results = store.store_batches(
        [(GW, env_for(b1, 1), b1), (GW, env_for(b2, 2), b2), (GW, env_for(b1, 1), b1)]
    )
    assert results == [True, True, False]
    assert store.readings(GW) == list(b1.rows()) + list(b2.rows())
    assert store.counts().duplicates_dropped == 1
    # a bad item fails the whole group: nothing of it is stored
    with pytest.raises(ValueError, match="envelope says"):
        store.store_batches([(GW, env_for(b1, 3), b1), (GW, Envelope(2, STREAM, 4, 99, b""), b2)])
    assert store.counts().batches == 2
    assert store.store_batch(GW, env_for(b1, 3), b1) is True


def test_empty_batch_and_huge_seq(store: Store) -> None:
    empty = Batch()
    assert store.store_batch(GW, env_for(empty, 2**64 - 1), empty) is True
    assert store.store_batch(GW, env_for(empty, 2**64 - 1), empty) is False
    assert store.store_batch(GW, env_for(empty, 2**63 - 1), empty) is True
    assert store.counts() == StoreCounts(readings=0, batches=2, duplicates_dropped=1, gateways=1)


def test_meta_upsert_and_readings_by_key(store: Store) -> None:
    store.store_meta(GW, make_meta())
    b = make_batch(9)  # point ids 1, 2, 3
    store.store_batch(GW, env_for(b, 1), b)
    strain_2 = [r for r in b.rows() if r[0] == 2]
    assert store.readings(GW, "bridge-7/strain_2") == strain_2
    assert store.readings(GW, "bridge-7/none") == []
    assert store.readings("gw-2", "bridge-7/strain_2") == []
    # upsert: the gateway renamed point 2
    m = make_meta(unit="mm/m")
    renamed = PointMeta(2, "bridge-7/strain_b", "bridge-7", "strain_b", "mm/m", "sim")
    store.store_meta(GW, Meta(m.gateway, m.stream, (m.points[0], renamed, m.points[2])))
    assert store.readings(GW, "bridge-7/strain_b") == strain_2
    assert store.readings(GW, "bridge-7/strain_2") == []
    assert store.counts().gateways == 1
    store.store_meta("gw-2", make_meta("gw-2"))
    assert store.counts().gateways == 2


def test_duplicate_readings(store: Store) -> None:
    b = make_batch(6)
    store.store_batch(GW, env_for(b, 1), b)
    assert store.duplicate_readings() == 0
    # the same readings under another seq (a gateway bug): visible as duplicates
    store.store_batch(GW, env_for(b.slice(0, 2), 2), b.slice(0, 2))
    assert store.duplicate_readings() == 2


SPECIAL = [
    0.0,
    -0.0,
    math.inf,
    -math.inf,
    5e-324,
    -5e-324,
    2.2250738585072014e-308,
    1.7976931348623157e308,
    0.1,
    -1e-300,
    math.pi,
    123456789.123456789,
]
NANS = [
    math.nan,
    struct.unpack("<d", bytes.fromhex("010000000000f87f"))[0],  # quiet NaN with payload
    struct.unpack("<d", bytes.fromhex("000000000000f8ff"))[0],  # negative NaN
]


def test_bit_exact_values(store: Store) -> None:
    """Finite values (incl. -0.0), ±inf and NaNs come back bit-exact from both stores.
    (SQLite's REAL column alone would turn NaN into NULL and -0.0 into 0.0; the SQLite
    store keeps the exact bytes of those two cases on the side.)"""
    b = Batch()
    for i, v in enumerate(SPECIAL + NANS):
        b.append(i, 1000 + i, v, GOOD)
    assert store.store_batch(GW, env_for(b, 1), b)
    got = store.readings(GW)
    assert [(p, t, q) for p, t, _, q in got] == [(p, t, q) for p, t, _, q in b.rows()]
    assert [bits(v) for _, _, v, _ in got[: len(SPECIAL)]] == [bits(v) for v in SPECIAL]
    for (_, _, v, _), want in zip(got[len(SPECIAL) :], NANS, strict=True):
        assert math.isnan(v)
        assert bits(v) == bits(want)


def test_sqlite_real_column_nan_and_negative_zero(tmp_path: Path) -> None:
    """What SQLite's REAL does on its own: NaN -> NULL, -0.0 -> 0.0 (documented)."""
    db = tmp_path / "p.db"
    s = open_store(f"sqlite:///{db}")
    b = Batch.from_rows([(1, 1, math.nan, GOOD), (1, 2, -0.0, GOOD), (1, 3, 1.5, GOOD)])
    s.store_batch(GW, env_for(b, 1), b)
    s.close()
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT value, raw FROM readings ORDER BY rowid").fetchall()
    assert rows[0] == (None, bits(math.nan))
    assert bits(rows[1][0]) == bits(0.0) and rows[1][1] == bits(-0.0)
    assert rows[2] == (1.5, None)


def test_sqlite_counters_persist(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    s = open_store(url)
    b = make_batch(3)
    s.store_batch(GW, env_for(b, 1), b)
    s.store_batch(GW, env_for(b, 1), b)
    s.close()
    s = open_store(url)
    assert s.counts() == StoreCounts(readings=3, batches=1, duplicates_dropped=1, gateways=1)
    assert s.store_batch(GW, env_for(b, 1), b) is False
    s.close()


def test_postgres_two_stores_same_schema(pg_url: str) -> None:
    """Two workers' stores on one schema: creation is idempotent, dedup is shared."""
    a, b = open_store(pg_url), open_store(pg_url)
    try:
        batch = make_batch(4)
        assert a.store_batch(GW, env_for(batch, 1), batch) is True
        assert b.store_batch(GW, env_for(batch, 1), batch) is False
        assert b.counts() == StoreCounts(4, 1, 1, 1)
    finally:
        a.close()
        b.close()


def test_gateway_state_and_last_seen(store: Store) -> None:
    store.store_state(GW, True, 1000)
    store.store_state(GW, True, 2000)  # a retained "online" seen again: still online since 1000
    (info,) = store.gateways()
    assert (info.state, info.state_ms, info.last_seen_ms, info.stats) == (
        "online",
        1000,
        None,
        None,
    )
    store.store_state(GW, False, 3000)
    b = make_batch(3)
    store.store_batch(GW, env_for(b, 1), b)
    stats = GatewayStats(GW, 2500, 100, 7, 1, 40, 2, 0)
    store.store_stats(stats)
    store.store_stats(GatewayStats("gw-0", 10, 1, 0, 0, 0, 0, 0))  # stats only: listed too
    gw0, gw1 = store.gateways()
    assert gw0.gateway == "gw-0" and gw0.state is None and gw0.stats is not None
    assert (gw1.state, gw1.state_ms, gw1.stats) == ("offline", 3000, stats)
    assert gw1.last_seen_ms is not None and gw1.last_seen_ms > 1_700_000_000_000


def test_device_information_per_gateway_and_device(store: Store) -> None:
    """up/stats `devices` (issue 13): the newest report's is the whole of a gateway's
    device information; an unchanged value keeps its since; an older report, or one from
    a gateway that sends no `devices`, changes nothing."""

    def report(gateway: str, ts: int, devices: wire.DeviceInfo | None) -> None:
        store.store_stats(GatewayStats(gateway, ts, 100, 0, 0, 0, 0, 0, devices))

    def entries(gateway: str | None = None) -> list[tuple[str, str, str, str, int]]:
        return [
            (e.gateway, e.device, e.name, e.value, e.since_ms) for e in store.device_info(gateway)
        ]

    assert entries() == []
    report(GW, 1000, {"meter": {"serial": "SN-4711", "firmware": "1.02"}, "ble": {"text": "hi"}})
    long_text = "\u00b5\u03b5-\u2603" + "x" * 1016  # 1024 bytes in UTF-8, 1020 characters
    report("gw-0", 1000, {"meter": {"serial": long_text}})
    assert entries(GW) == [
        (GW, "ble", "text", "hi", 1000),
        (GW, "meter", "firmware", "1.02", 1000),
        (GW, "meter", "serial", "SN-4711", 1000),
    ]
    assert [e[0] for e in entries()] == ["gw-0", GW, GW, GW]
    # new firmware, the text gone, a raw object heard: since moves only where it changed
    report(GW, 2000, {"meter": {"serial": "SN-4711", "firmware": "1.03"}, "ble": {"raw": "beef"}})
    assert entries(GW) == [
        (GW, "ble", "raw", "beef", 2000),
        (GW, "meter", "firmware", "1.03", 2000),
        (GW, "meter", "serial", "SN-4711", 1000),
    ]
    report(GW, 1500, {"meter": {"serial": "older"}})  # a report older than the stored one
    report(GW, 3000, None)  # counters only (a gateway before issue 13): nothing known changes
    assert [e[3] for e in entries(GW)] == ["beef", "1.03", "SN-4711"]
    stats = store.stats(GW)
    assert stats is not None and stats.ts == 3000 and stats.devices is None
    report(GW, 4000, {})  # no device has any now
    assert entries(GW) == []
    assert entries("gw-0") == [("gw-0", "meter", "serial", long_text, 1000)]  # kept whole


def test_sqlite_readers_need_the_device_info_table(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    open_store(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE device_info")  # a store of a citygw before issue 13
    with pytest.raises(StoreMissing, match="older citygw"):
        open_store(f"sqlite:///{path}", create=False)
    open_store(f"sqlite:///{path}").close()  # the ingest upgrades it
    store = open_store(f"sqlite:///{path}", create=False)
    try:
        assert store.device_info() == []
    finally:
        store.close()


def test_postgres_upgrades_a_version_2_schema(pg_url: str) -> None:
    import psycopg
    from psycopg import sql

    from central.store_postgres import SCHEMA_VERSION

    open_store(pg_url).close()
    conninfo, schema = split_url(pg_url)
    with psycopg.connect(conninfo, autocommit=True) as db:  # as a citygw before issue 13 left it
        db.execute(sql.SQL("DROP TABLE {}.device_info").format(sql.Identifier(schema)))
        db.execute(sql.SQL("UPDATE {}.schema_info SET version = 2").format(sql.Identifier(schema)))
    with pytest.raises(StoreMissing, match="at version 2"):  # readers change nothing
        open_store(pg_url, create=False)
    open_store(pg_url).close()
    store = open_store(pg_url, create=False)
    try:
        assert SCHEMA_VERSION == 6 and store.device_info() == []
        store.store_stats(GatewayStats(GW, 1, 0, 0, 0, 0, 0, 0, {"d": {"serial": "SN"}}))
        assert [e.value for e in store.device_info(GW)] == ["SN"]
    finally:
        store.close()


def test_alarm_raise_clear_pairing(store: Store) -> None:
    store.store_meta(GW, make_meta())

    def alarm(seq: int, *events: AlarmEvent) -> None:
        env = Envelope(wire.LANE_ALARM, STREAM, seq, len(events), b"")
        assert store.store_batch(GW, env, AlarmBody(list(events))) is True

    raise_1 = AlarmEvent(1, "high", "critical", True, 100, 9.0, 90)
    raise_2 = AlarmEvent(2, "high", "warning", True, 150, 5.0, 150)
    alarm(1, raise_1, raise_2)
    assert [e.cleared_ts for e in store.alarm_episodes()] == [None, None]
    alarm(2, AlarmEvent(1, "high", "critical", False, 300, 1.0, 100))  # clears raise_1
    alarm(3, AlarmEvent(1, "high", "critical", True, 400, 9.5, 400))  # again
    alarm(4, AlarmEvent(3, "low", "warning", False, 500, 0.0, 450))  # a clear without raise
    episodes = store.alarm_episodes()
    assert [(e.point_id, e.raised_ts, e.cleared_ts) for e in episodes] == [
        (1, 100, 300),
        (2, 150, None),
        (1, 400, None),
    ]
    assert episodes[0].key == "bridge-7/strain_1" and episodes[0].value == 9.0
    assert [(e.point_id, e.raised_ts) for e in store.alarm_episodes(active=True)] == [
        (2, 150),
        (1, 400),
    ]
    assert store.alarm_episodes("gw-2") == []
    assert [e.raised_ts for e in store.alarm_episodes(GW, since_ms=150)] == [150, 400]
    assert len(store.alarms(GW)) == 5  # the events themselves stay as they came


def test_query_by_point_name(store: Store) -> None:
    for gateway in (GW, "gw-2"):
        store.store_meta(gateway, make_meta(gateway))
    b1 = make_batch(30)  # ts 0..29 after start, points 1, 2, 3 in turn
    b2 = make_batch(6, start_ts=1_700_000_000_100)
    store.store_batch(GW, env_for(b1, 1), b1)
    store.store_batch(GW, env_for(b2, 2), b2)
    store.store_batch("gw-2", env_for(b2, 1), b2)
    t0 = 1_700_000_000_000
    got = store.query("bridge-7/strain_2", since_ms=t0 + 5, until_ms=t0 + 200)
    want = [(GW, r) for r in (*b1.rows(), *b2.rows()) if r[0] == 2 and r[1] >= t0 + 5]
    want += [("gw-2", r) for r in b2.rows() if r[0] == 2]
    assert [(p.gateway, (2, p.ts, p.value, p.quality)) for p in got] == want
    assert {p.key for p in got} == {"bridge-7/strain_2"}
    assert [p.gateway for p in store.query("bridge-7/strain_2", t0, gateway="gw-2")] == ["gw-2"] * 2
    assert len(store.query("bridge-7/strain_2", t0, limit=3)) == 3
    assert store.query("bridge-7/strain_2", t0 + 10_000) == []
    assert store.query("bridge-7/nothing", 0) == []


def test_postgres_partitions_by_day(pg_url: str) -> None:
    import psycopg

    store = open_store(pg_url)
    schema = split_url(pg_url)[1]
    now = int(time.time() * 1000)
    fresh, old = make_batch(4, start_ts=now), make_batch(2, start_ts=1_000_000)  # 1970: default
    try:
        store.store_batch(GW, env_for(fresh, 1), fresh)
        store.store_batch(GW, env_for(old, 2), old)
        assert store.readings(GW) == [*fresh.rows(), *old.rows()]
    finally:
        store.close()
    with psycopg.connect(split_url(pg_url)[0]) as db:
        rows = db.execute(
            "SELECT c.relname, count(*) FILTER (WHERE true) FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s GROUP BY c.relname ORDER BY c.relname",
            (schema,),
        ).fetchall()
        names = [r[0] for r in rows]
        day = partition_name(now // 86_400_000)
        assert day in names and "reading_blocks_default" in names
        placed = db.execute(
            f'SELECT tableoid::regclass::text, seq FROM "{schema}".reading_blocks ORDER BY seq'
        ).fetchall()
    assert [(t.split(".")[-1].strip('"'), q) for t, q in placed] == [
        (day, 1),
        ("reading_blocks_default", 2),
    ]


def test_prune_keeps_what_is_recent_and_active_alarms(store_url: str) -> None:
    store = open_store(store_url)
    now = int(time.time() * 1000)
    day = 86_400_000
    old, recent = make_batch(4, start_ts=now - 10 * day), make_batch(3, start_ts=now - 1000)
    try:
        store.store_batch(GW, env_for(old, 1), old)
        store.store_batch(GW, env_for(recent, 2), recent)
        events = [
            AlarmEvent(1, "high", "critical", True, now - 9 * day, 9.0, now - 9 * day),
            AlarmEvent(1, "high", "critical", False, now - 8 * day, 1.0, now - 9 * day),
            AlarmEvent(2, "low", "warning", True, now - 9 * day, 0.1, now - 9 * day),  # active
        ]
        store.store_batch(GW, Envelope(wire.LANE_ALARM, STREAM, 3, 3, b""), AlarmBody(events))
        dead = DeadLetter(now - 9 * day, "t", "codec", "bad", b"x", 1)
        store.store_dead_letters([dead, DeadLetter(now, "t", "codec", "bad", b"y", 1)])
        dropped = store.prune(now - 5 * day)
        assert store.readings(GW) == list(recent.rows())
        assert [(e.point_id, e.cleared_ts) for e in store.alarm_episodes()] == [(2, None)]
        assert [d.payload for d in store.dead_letters()] == [b"y"]
        # the old uplink keys went too (received now, so not these) and nothing else
        assert dropped["alarms"] == 2 and dropped["dead_letters"] == 1
        assert dropped["uplinks"] == 0
        assert store.prune(now + 1000)["uplinks"] == 3
    finally:
        store.close()


def test_postgres_prune_drops_day_partitions(pg_url: str) -> None:
    store = open_store(pg_url)
    now = int(time.time() * 1000)
    day = 86_400_000
    try:
        for seq, days_ago in enumerate((3, 2, 0), 1):
            b = make_batch(2, start_ts=now - days_ago * day)
            store.store_batch(GW, env_for(b, seq), b)
        ancient = make_batch(2, start_ts=1_000_000)  # in the default partition
        store.store_batch(GW, env_for(ancient, 9), ancient)
        dropped = store.prune((now // day - 1) * day)  # the start of yesterday
        assert (dropped["partitions"], dropped["reading_blocks"]) == (2, 1)
        assert [ts for _, ts, _, _ in store.readings(GW)] == [now, now + 1]
        assert store.store_batch(GW, env_for(ancient, 10), ancient)  # days are made again
        b = make_batch(1, start_ts=now - 3 * day)
        assert store.store_batch(GW, env_for(b, 11), b)
        assert len(store.readings(GW)) == 5
    finally:
        store.close()


V1_SCHEMA = """
CREATE TABLE uplinks (gateway text NOT NULL, stream text NOT NULL, seq bigint NOT NULL,
    lane smallint NOT NULL, n_points integer NOT NULL, received_ms bigint NOT NULL,
    PRIMARY KEY (gateway, stream, seq));
CREATE TABLE readings (id bigint GENERATED ALWAYS AS IDENTITY, gateway text NOT NULL,
    point_id bigint NOT NULL, ts bigint NOT NULL, value double precision NOT NULL,
    quality smallint NOT NULL, seq bigint);
CREATE TABLE counters (name text PRIMARY KEY, value bigint NOT NULL);
INSERT INTO counters VALUES ('readings', 5), ('batches', 2), ('duplicates_dropped', 1);
INSERT INTO uplinks VALUES ('gw-1', 'aa', 1, 2, 3, 0), ('gw-1', 'aa', 2, 2, 2, 0);
INSERT INTO readings (gateway, point_id, ts, value, quality, seq) VALUES
    ('gw-1', 2, 1700000000002, 2.5, 0, 1), ('gw-1', 1, 1700000000001, 'NaN', 0, 1),
    ('gw-1', 1, 1700000000003, '-0', 1, 1), ('gw-1', 1, 1700000001000, 4.0, 0, 2),
    ('gw-1', 3, 1700000001000, 5.0, 0, 2)
"""


def test_postgres_migrates_a_version_1_schema(pg_url: str) -> None:
    """The first release kept a row per reading; opening the store converts them into
    blocks in the same order, and keeps the counters and the dedup keys."""
    import psycopg
    from psycopg import sql

    conninfo, schema = split_url(pg_url)
    with psycopg.connect(conninfo, autocommit=True) as db:
        db.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        db.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        for stmt in V1_SCHEMA.split(";"):
            db.execute(stmt.encode())
    with pytest.raises(StoreMissing, match="at version 1"):  # readers change nothing
        open_store(pg_url, create=False)
    store = open_store(pg_url)
    try:
        got = store.readings(GW)
        assert [(p, t, bits(v), q) for p, t, v, q in got] == [
            (2, 1_700_000_000_002, bits(2.5), 0),
            (1, 1_700_000_000_001, bits(math.nan), 0),
            (1, 1_700_000_000_003, bits(-0.0), 1),
            (1, 1_700_000_001_000, bits(4.0), 0),
            (3, 1_700_000_001_000, bits(5.0), 0),
        ]
        assert store.counts() == StoreCounts(
            readings=5, batches=2, duplicates_dropped=1, gateways=0
        )
        b = make_batch(2)
        assert store.store_batch(GW, Envelope(2, "aa", 2, 2, b""), b) is False  # seen before
    finally:
        store.close()
    reopened = open_store(pg_url)  # idempotent: nothing converted twice
    try:
        assert len(reopened.readings(GW)) == 5
    finally:
        reopened.close()


# -- worker ---------------------------------------------------------------------------------


async def with_workers(workers: list[IngestWorker], body: Callable[[], Awaitable[None]]) -> None:
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        for w in workers:
            await asyncio.wait_for(w.connected.wait(), 10)
        await body()
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for t in tasks:  # a worker must not have died on its own
            assert t.cancelled()


def test_worker_stores_batches_and_meta(mosquitto: Mosquitto, store: Store) -> None:
    gw = Gateway(mosquitto)
    worker = IngestWorker(mosquitto.url, store, group="test")

    async def body() -> None:
        meta = wire.encode_meta(make_meta().to_dict())
        await gw.publish([(wire.meta_topic(GW), meta), (wire.state_topic(GW), b"online")])
        sent = await gw.send(list(range(1, 11)))
        events = [
            AlarmEvent(
                1, "overstrain", "critical", True, 1_700_000_000_500, 612.5, 1_700_000_000_000
            ),
            AlarmEvent(2, "stale", "warning", True, 1_700_000_000_600, math.nan, 1_699_999_000_000),
            AlarmEvent(
                1, "overstrain", "critical", False, 1_700_000_009_000, 550.0, 1_700_000_000_500
            ),
        ]
        alarm = wire.wrap(wire.LANE_ALARM, STREAM, 11, 3, wire.encode_alarms(GW, events))
        await gw.publish([(wire.alarm_topic(GW), alarm)])
        await wait_until(lambda: store.counts().batches == 11 and worker.counters.metas_stored >= 1)
        # each uplink's readings grouped by point (codec v2), uplinks in order
        expected = [r for b in sent for r in sorted(b.rows(), key=lambda r: r[0])]
        assert store.readings(GW) == expected
        assert store.readings(GW, "bridge-7/strain_1") == [r for r in expected if r[0] == 1]
        stored = store.alarms(GW)
        assert [e for e in stored if e.point_id != 2] == [events[0], events[2]]
        assert stored[1].rule == "stale" and math.isnan(stored[1].value)
        # the clear is paired with its raise; the stale alarm is still active
        episodes = store.alarm_episodes(GW)
        assert [(e.key, e.rule, e.raised_ts, e.cleared_ts) for e in episodes] == [
            ("bridge-7/strain_1", "overstrain", 1_700_000_000_500, 1_700_000_009_000),
            ("bridge-7/strain_2", "stale", 1_700_000_000_600, None),
        ]
        await wait_until(lambda: worker.counters.states_stored >= 1)
        (info,) = store.gateways()
        assert (info.gateway, info.site, info.state) == (GW, "block-12", "online")
        assert info.last_seen_ms is not None and info.state_ms is not None
        c = worker.counters
        assert (c.batches_stored, c.readings_stored, c.alarms_stored, c.rejected) == (
            11,
            200,
            3,
            {},
        )

    asyncio.run(with_workers([worker], body))


def test_retained_topics_replayed_only_to_a_new_subscription(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """A worker resuming its session is not sent every gateway's retained meta again;
    an empty retained message (a retired gateway's meta cleared) is not a dead letter."""
    store = open_store(f"sqlite:///{tmp_path / 'p.db'}")
    gw = Gateway(mosquitto)

    def worker() -> IngestWorker:
        return IngestWorker(mosquitto.url, store, group="g", client_id="w1", session_expiry=60)

    async def first() -> None:
        await gw.publish([(wire.meta_topic(GW), wire.encode_meta(make_meta().to_dict()))], True)
        await wait_until(lambda: first_worker.counters.metas_stored == 1)

    async def resumed() -> None:
        await gw.send([1])  # the session is live once this is stored
        await wait_until(lambda: store.counts().batches == 1)
        await gw.publish([(wire.meta_topic("gw-gone"), b"")], retain=True)
        await wait_until(lambda: second_worker.counters.retained_cleared == 1)
        assert second_worker.counters.metas_stored == 0
        assert second_worker.counters.rejected == {} and store.dead_letters() == []

    try:
        first_worker = worker()
        asyncio.run(with_workers([first_worker], first))
        second_worker = worker()
        asyncio.run(with_workers([second_worker], resumed))
        # a clean session gets the retained meta again
        fresh = IngestWorker(mosquitto.url, store, group="g")
        asyncio.run(
            with_workers([fresh], lambda: wait_until(lambda: fresh.counters.metas_stored == 1))
        )
    finally:
        store.close()


def test_worker_drops_duplicate_seq(mosquitto: Mosquitto, tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'p.db'}")
    gw = Gateway(mosquitto)
    worker = IngestWorker(mosquitto.url, store, group=None)

    async def body() -> None:
        payload, b = gw.uplink(5)
        await gw.publish([(wire.batch_topic(GW), payload)] * 3)
        await gw.send([6])
        await wait_until(lambda: worker.counters.messages == 4)
        assert store.counts() == StoreCounts(
            readings=40, batches=2, duplicates_dropped=2, gateways=1
        )
        assert worker.counters.duplicates_dropped == 2
        # codec v2 keeps each point's order and groups the points
        assert store.readings(GW)[:20] == sorted(b.rows(), key=lambda r: r[0])
        assert store.duplicate_readings() == 0

    asyncio.run(with_workers([worker], body))
    store.close()


def test_worker_survives_garbage(
    mosquitto: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'p.db'}")
    gw = Gateway(mosquitto)
    worker = IngestWorker(mosquitto.url, store, group=None)
    good, _ = gw.uplink(1)
    alarm_on_batch, _ = gw.uplink(2, lane=wire.LANE_ALARM)
    env = wire.unwrap(good)
    short_count = wire.wrap(env.lane, env.stream, 1, env.n_points + 1, env.body)
    bad_body = wire.wrap(env.lane, env.stream, 4, 1, b"\xff\x00garbage")
    # a body made for another seq, and one that claims to come from another gateway
    other_seq = wire.wrap(env.lane, env.stream, 5, env.n_points, env.body)
    b = make_batch(3)
    other_gw = wire.wrap(env.lane, env.stream, 6, 3, codec.encode(b, gateway="gw-9", seq=6))
    alarms = [AlarmEvent(1, "high", "critical", True, 1, 2.0, 1)]
    alarm_other_gw = wire.wrap(
        wire.LANE_ALARM, env.stream, 7, 1, wire.encode_alarms("gw-9", alarms)
    )
    alarm_garbage = wire.wrap(wire.LANE_ALARM, env.stream, 8, 1, b'{"v": 1, "events": 3}')
    newer_body = bytearray(env.body)
    newer_body[len(codec.MAGIC)] = 9
    newer_codec = wire.wrap(env.lane, env.stream, 9, env.n_points, bytes(newer_body))
    garbage: list[tuple[str, bytes]] = [
        (wire.batch_topic(GW), b""),  # envelope: short
        (wire.batch_topic(GW), b"\x00" * 64),  # envelope: magic
        (wire.batch_topic(GW), good[:2] + b"\x09" + good[3:]),  # version (envelope)
        (wire.batch_topic(GW), newer_codec),  # version (codec)
        (wire.batch_topic(GW), alarm_on_batch),  # lane on the wrong topic
        (wire.batch_topic(GW), short_count),  # n_points
        (wire.batch_topic(GW), bad_body),  # codec
        (wire.batch_topic(GW), other_seq),  # seq
        (wire.batch_topic(GW), other_gw),  # gateway
        (wire.alarm_topic(GW), alarm_other_gw),  # gateway
        (wire.alarm_topic(GW), alarm_garbage),  # alarm
        (wire.meta_topic(GW), b"{nope"),  # meta
        (wire.meta_topic(GW), wire.encode_meta(make_meta("gw-9").to_dict())),  # meta_gateway
        (wire.state_topic(GW), b"sleepy"),  # state
    ]

    async def body() -> None:
        with caplog.at_level("WARNING", logger="citygw.ingest"):
            await gw.publish(garbage)
            await gw.send([10, 11])
            await wait_until(lambda: store.counts().batches == 2)
        expected = {
            "envelope": 2,
            "version": 2,
            "lane": 1,
            "n_points": 1,
            "codec": 1,
            "seq": 1,
            "gateway": 2,
            "alarm": 1,
            "meta": 1,
            "meta_gateway": 1,
            "state": 1,
        }
        assert worker.counters.rejected == expected
        # each kept aside with its reason and the exact payload, then acknowledged
        letters = store.dead_letters(limit=100)
        assert worker.counters.dead_letters_stored == len(letters) == len(garbage)
        assert {d.reason for d in letters} == set(expected)
        by_payload = {(d.topic, d.payload) for d in letters}
        assert by_payload == set(garbage)
        assert all(d.size == len(d.payload) and d.error for d in letters)
        reasons = {getattr(r, "reason", None) for r in caplog.records}
        assert {"envelope", "codec", "meta"} <= reasons
        assert all(r.levelname == "WARNING" for r in caplog.records if hasattr(r, "reason"))

    asyncio.run(with_workers([worker], body))
    store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_workers_share_a_group(
    backend: str, mosquitto: Mosquitto, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'p.db'}"
    else:
        url = str(request.getfixturevalue("pg_url"))
    stores = [open_store(url), open_store(url)]  # two processes' worth
    workers = [IngestWorker(mosquitto.url, s, group="shared") for s in stores]
    gws = [Gateway(mosquitto, f"gw-{i}", uuid.uuid4().hex) for i in range(3)]

    async def body() -> None:
        sent: dict[str, list[Batch]] = {}
        for g in gws:
            sent[g.gateway] = await g.send(list(range(1, 41)), n=10)
        # and a gateway resending a window after a reconnect
        await gws[0].send(list(range(30, 41)), n=10)
        # counted once committed (`messages` counts at decode time, before the commit)
        await wait_until(
            lambda: (
                sum(w.counters.batches_stored + w.counters.duplicates_dropped for w in workers)
                == 131
            )
        )
        c = stores[0].counts()
        assert (c.batches, c.readings, c.duplicates_dropped) == (120, 1200, 11)
        assert sum(w.counters.batches_stored for w in workers) == 120
        assert all(w.counters.messages > 0 for w in workers)  # the load was shared
        for g in gws:
            got = sorted(stores[0].readings(g.gateway))
            assert got == sorted(r for b in sent[g.gateway] for r in b.rows())
        assert stores[0].duplicate_readings() == 0

    try:
        asyncio.run(with_workers(workers, body))
    finally:
        for s in stores:
            s.close()


def test_worker_reconnects_after_broker_outage(mosquitto: Mosquitto, tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'p.db'}")
    gw = Gateway(mosquitto)
    worker = IngestWorker(mosquitto.url, store, group="test", backoff_min=0.05, backoff_max=0.5)

    async def body() -> None:
        await gw.send([1, 2])
        await wait_until(lambda: store.counts().batches == 2)
        for round_ in range(2):
            await asyncio.to_thread(mosquitto.stop)
            await wait_until(lambda: not worker.connected.is_set())
            await asyncio.sleep(0.3)  # a few failed reconnect attempts
            await asyncio.to_thread(mosquitto.start)
            await asyncio.wait_for(worker.connected.wait(), 15)
            await gw.send([3 + round_])
        await wait_until(lambda: store.counts().batches == 4)
        assert worker.counters.connects >= 3
        assert store.duplicate_readings() == 0

    asyncio.run(with_workers([worker], body))
    store.close()


class FailingStore:
    """Wraps a store; its batch writes fail while `failing` is set, as a store that is down
    does (a transient error: retried, never dead-lettered)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.failing = True
        self.attempts = 0

    def store_batches(self, items: Any) -> list[bool]:
        self.attempts += 1
        if self.failing:
            raise ConnectionRefusedError("database is down")
        return self.inner.store_batches(items)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_unstored_messages_are_not_acknowledged(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """PUBACK only after commit: a worker whose store fails, then dies, loses nothing;
    the broker redelivers to the next worker on the same persistent session."""
    inner = open_store(f"sqlite:///{tmp_path / 'p.db'}")
    failing = FailingStore(inner)
    gw = Gateway(mosquitto)
    kw: dict[str, Any] = {
        "group": None,
        "client_id": "ingest-1",
        "session_expiry": 60,
        "backoff_min": 0.05,
        "backoff_max": 0.1,
    }
    first = IngestWorker(mosquitto.url, failing, **kw)

    async def broken() -> None:
        await gw.send([1, 2, 3])
        await wait_until(lambda: first.counters.store_errors >= 2)
        assert inner.counts().batches == 0

    asyncio.run(with_workers([first], broken))
    second = IngestWorker(mosquitto.url, inner, **kw)

    async def healthy() -> None:
        await wait_until(lambda: inner.counts().batches == 3)

    asyncio.run(with_workers([second], healthy))
    assert inner.duplicate_readings() == 0
    inner.close()


def test_store_errors_are_retried(mosquitto: Mosquitto, tmp_path: Path) -> None:
    inner = open_store(f"sqlite:///{tmp_path / 'p.db'}")
    failing = FailingStore(inner)
    gw = Gateway(mosquitto)
    worker = IngestWorker(
        mosquitto.url,
        failing,
        group="g",
        backoff_min=0.05,
        backoff_max=0.1,
    )

    async def body() -> None:
        await gw.send([1, 2])
        await wait_until(lambda: failing.attempts >= 3)
        failing.failing = False
        await wait_until(lambda: inner.counts().batches == 2)

    asyncio.run(with_workers([worker], body))
    inner.close()


class _SubackWithCancel:
    """A broker session whose first SUBACK arrives with a cancel, and the subscribe returns
    it: what Python 3.11's asyncio.wait_for (inside aiomqtt's subscribe) does."""

    def __init__(self) -> None:
        self.subscribing = asyncio.Event()
        self.subscribed: list[str] = []

    async def __aenter__(self) -> _SubackWithCancel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def subscribe(self, topic: str, **kwargs: Any) -> None:
        if not self.subscribed:
            self.subscribing.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()  # the SUBACK: it comes with the cancel
        self.subscribed.append(topic)

    @property
    def messages(self) -> Any:
        async def never() -> Any:
            await asyncio.Event().wait()
            yield

        return never()


def test_a_cancel_that_a_subscribe_swallowed_still_stops_the_worker(tmp_path: Path) -> None:
    """`citygw ingest` stopping while it subscribes: the worker ends (it waited for
    messages for ever, and the stop with it)."""
    store = open_store(f"sqlite:///{tmp_path / 'platform.db'}")
    worker = IngestWorker("mqtt://127.0.0.1:1", store, group=None)
    session = _SubackWithCancel()
    worker._client = lambda: session  # type: ignore[assignment,method-assign,return-value]

    async def main() -> None:
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(session.subscribing.wait(), 5)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)  # bounded: it hung here
        assert done == {task} and task.cancelled()
        assert not worker.connected.is_set() and worker.counters.connects == 0

    try:
        asyncio.run(main())
    finally:
        store.close()
    assert session.subscribed == wire.ingest_filters("citygw", None)
