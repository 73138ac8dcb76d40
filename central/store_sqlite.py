"""The embedded platform store: one SQLite file in WAL mode.

Schema::

    uplinks(gateway, stream, seq, lane, n_points, received_ms,
            PRIMARY KEY (gateway, stream, seq))      -- the dedup key
    readings(gateway, point_id, ts, value REAL, quality, raw BLOB, seq)
            INDEX (gateway, point_id, ts)
    points(gateway, point_id, key, device, name, unit, driver, type, updated_ms,
           PRIMARY KEY (gateway, point_id))
    gateways(gateway PRIMARY KEY, site, location, stream, updated_ms,
             state, state_ms, last_seen_ms, software, locations)
    alarms(gateway, point_id, rule, severity, raised, ts, value, since_ms, received_ms,
           cleared_ts)                               -- a raise's cleared_ts: its clear
    gateway_stats(gateway PRIMARY KEY, ts, appended_points, ...)  -- the latest up/stats
    device_info(gateway, device, name, value, since_ms,
                PRIMARY KEY (gateway, device, name))  -- up/stats `devices`
    device_health(gateway, device, healthy, since_ms, error,
                  PRIMARY KEY (gateway, device))     -- up/stats `health`
    rule_actions(gateway, stream, seq, idx, rule, ts, transition, action, outcome, target,
                 value REAL, written REAL, detail, attempts, inputs TEXT (JSON),
                 received_ms, PRIMARY KEY (gateway, stream, seq, idx))
                                                     -- the alarm lane's local rule actions
    dead_letters(id, received_ms, topic, reason, error, payload, size)
    counters(name PRIMARY KEY, value)                -- readings, batches, duplicates_dropped;
                                                     -- alarms, events, gateways: change_marks
    events(id, gateway, point_id, rule, state, ...), event_actions(event_id, ...)
                                                     -- central/events.py

What a SQLite REAL column does to IEEE doubles, and how this store keeps them exact:

* NaN is stored as NULL (SQLite has no NaN; binding one gives NULL, any payload is lost).
* -0.0 comes back as 0.0: SQLite stores integral REAL values as integers on disk, so the
  sign of zero is lost.
* ±inf, subnormals and every other finite value round-trip bit-exactly.

For the two lossy cases the reading's exact 8 bytes (little-endian IEEE 754) go into
``raw`` (NULL otherwise), and `readings` returns them from there, so values are
bit-exact through this store too. A tool reading ``value`` directly sees NULL for NaN
and 0.0 for -0.0.

Readings of one uplink are inserted with ``executemany`` in the same transaction as
the ``INSERT OR IGNORE`` on ``uplinks``; `store_batches` puts several uplinks in one
transaction. The connection is shared between threads behind a lock.
"""

from __future__ import annotations

import math
import sqlite3
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from itertools import repeat
from pathlib import Path

from central import configs, events, sessions
from central.configs import ConfigPushRecord, ConfigSeen
from central.events import Event, EventAction, EventSummary
from central.series import (
    Series,
    aggregates,
    bucket_span,
    bucketed_series,
    choose_bucket,
    floor_sql,
    raw_series,
)
from central.sessions import Session
from central.store import (
    ALARM_COLUMNS,
    CHANGE_KINDS,
    FINITE,
    GATEWAYS_QUERY,
    PRUNE_DELETES,
    STATS_COLUMNS,
    UPLINK_POINTS_QUERY,
    USABLE,
    AlarmEpisode,
    Body,
    DeadLetter,
    DeviceInfoEntry,
    DeviceRow,
    FleetRow,
    GatewayInfo,
    LatestValue,
    PointInfo,
    PointReading,
    StoreCounts,
    StoreMissing,
    alarm_clear,
    alarm_clear_args,
    alarm_episodes_query,
    alarm_from_row,
    alarm_row,
    check_batch,
    dead_letter_from_row,
    dead_letter_insert,
    dead_letter_row,
    dead_letters_query,
    device_info_from_row,
    device_info_query,
    device_rows,
    episode_from_row,
    find_points_query,
    fleet_from_row,
    fleet_query,
    gateway_devices_queries,
    gateway_from_row,
    gateway_meta_args,
    gateway_meta_upsert,
    latest_args,
    point_alarms_query,
    point_from_row,
    point_query,
    point_rows,
    points_upsert,
    rule_action_from_row,
    rule_action_insert,
    rule_action_row,
    rule_actions_query,
    selected_points,
    seq_to_db,
    split_bodies,
    state_args,
    state_upsert,
    stats_from_row,
    stats_row,
    stats_upsert,
    store_device_health,
    store_device_info,
)
from common.wire import Envelope, GatewayStats, Meta, RuleAction
from native.batch import Batch
from native.stages import AlarmEvent

_D = struct.Struct("<d")

SCHEMA = """
CREATE TABLE IF NOT EXISTS uplinks (
    gateway     TEXT    NOT NULL,
    stream      TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    lane        INTEGER NOT NULL,
    n_points    INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (gateway, stream, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS readings (
    gateway  TEXT    NOT NULL,
    point_id INTEGER NOT NULL,
    ts       INTEGER NOT NULL,
    value    REAL,
    quality  INTEGER NOT NULL,
    raw      BLOB,
    seq      INTEGER             -- the uplink's seq: readings in sending order
);
CREATE INDEX IF NOT EXISTS readings_gateway_point_ts ON readings (gateway, point_id, ts);
CREATE TABLE IF NOT EXISTS points (
    gateway    TEXT    NOT NULL,
    point_id   INTEGER NOT NULL,
    key        TEXT    NOT NULL,
    device     TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    unit       TEXT    NOT NULL,
    driver     TEXT    NOT NULL,
    type       TEXT    NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (gateway, point_id)
);
CREATE INDEX IF NOT EXISTS points_gateway_key ON points (gateway, key);
CREATE TABLE IF NOT EXISTS gateways (
    gateway    TEXT PRIMARY KEY,
    site       TEXT,
    location   TEXT,
    stream     TEXT,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS alarms (
    gateway     TEXT    NOT NULL,
    point_id    INTEGER NOT NULL,
    rule        TEXT    NOT NULL,
    severity    TEXT    NOT NULL,
    raised      INTEGER NOT NULL,
    ts          INTEGER NOT NULL,
    value       REAL,
    since_ms    INTEGER NOT NULL,
    received_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS alarms_gateway_point_ts ON alarms (gateway, point_id, ts);
CREATE TABLE IF NOT EXISTS gateway_stats (
    gateway          TEXT PRIMARY KEY,
    ts               INTEGER NOT NULL,
    appended_points  INTEGER NOT NULL,
    evicted_points   INTEGER NOT NULL,
    evicted_messages INTEGER NOT NULL,
    backlog_points   INTEGER NOT NULL,
    backlog_messages INTEGER NOT NULL,
    lost_points      INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS device_info (
    gateway  TEXT    NOT NULL,
    device   TEXT    NOT NULL,
    name     TEXT    NOT NULL,
    value    TEXT    NOT NULL,
    since_ms INTEGER NOT NULL,
    PRIMARY KEY (gateway, device, name)
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    received_ms INTEGER NOT NULL,
    topic       TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    error       TEXT    NOT NULL,
    payload     BLOB    NOT NULL,
    size        INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS points_key ON points (key);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO counters (name, value)
    VALUES ('readings', 0), ('batches', 0), ('duplicates_dropped', 0);
"""

DEVICE_HEALTH = """
CREATE TABLE IF NOT EXISTS device_health (
    gateway  TEXT    NOT NULL,
    device   TEXT    NOT NULL,
    healthy  INTEGER NOT NULL,
    since_ms INTEGER NOT NULL,
    error    TEXT    NOT NULL,
    PRIMARY KEY (gateway, device)
);
"""

#: what the gateways' local rules did (the alarm lane's "actions"); value and written NULL
#: for NaN (none), inputs the wire's JSON list; stored with the message's dedup key
RULE_ACTIONS = """
CREATE TABLE IF NOT EXISTS rule_actions (
    gateway     TEXT    NOT NULL,
    stream      TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    idx         INTEGER NOT NULL,
    rule        TEXT    NOT NULL,
    ts          INTEGER NOT NULL,
    transition  TEXT    NOT NULL,
    action      TEXT    NOT NULL,
    outcome     TEXT    NOT NULL,
    target      TEXT    NOT NULL,
    value       REAL,
    written     REAL,
    detail      TEXT    NOT NULL,
    attempts    INTEGER NOT NULL,
    inputs      TEXT    NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (gateway, stream, seq, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rule_actions_rule ON rule_actions (rule, gateway);
CREATE INDEX IF NOT EXISTS rule_actions_ts ON rule_actions (ts);
"""

#: tables added by later features (the console's events, sessions...): each a DDL string of
#: CREATE ... IF NOT EXISTS statements, run after SCHEMA
EXTRA_TABLES: tuple[str, ...] = (
    DEVICE_HEALTH,
    RULE_ACTIONS,
    sessions.SQLITE_TABLES,
    events.SQLITE_TABLES,
    configs.SQLITE_TABLES,
    # change_marks: the counters of the kinds that have none of their own
    "INSERT OR IGNORE INTO counters (name, value) VALUES ('alarms', 0), ('events', 0), "
    "('gateways', 0);",
)
#: tables a reader (create=False) needs: a store without them is an older citygw's
REQUIRED_TABLES = {
    "dead_letters",
    "device_info",
    "device_health",
    "console_sessions",
    "events",
    "event_actions",
    "gateway_configs",
    "config_pushes",
    "rule_actions",
}

_ADDED_COLUMNS = (
    ("readings", "seq INTEGER"),
    ("gateways", "state TEXT"),
    ("gateways", "state_ms INTEGER"),
    ("gateways", "last_seen_ms INTEGER"),
    ("alarms", "cleared_ts INTEGER"),
    ("gateways", "software TEXT"),
    ("gateways", "locations TEXT"),  # JSON: device -> {lat, lon}
    ("gateways", "config_version TEXT"),
    ("gateways", "config_hash TEXT"),
)

_BUMP = "UPDATE counters SET value = value + ? WHERE name = ?"


def _lossy(v: float) -> bool:
    return v != v or (v == 0.0 and math.copysign(1.0, v) < 0)


def _rows(
    gateway: str, seq: int, batch: Batch
) -> Iterator[tuple[str, int, int, float | None, int, bytes | None, int]]:
    values = batch.values
    # fast path: no NaN and no zero at all (checked in C)
    if not any(map(math.isnan, values)) and 0.0 not in values:
        return zip(
            repeat(gateway),
            batch.point_ids,
            batch.timestamps,
            values,
            batch.quality,
            repeat(None),
            repeat(seq),
            strict=False,
        )
    return (
        (gateway, pid, ts, None if v != v else v, q, _D.pack(v) if _lossy(v) else None, seq)
        for pid, ts, v, q in batch.rows()
    )


def _value(v: float | None, raw: bytes | None) -> float:
    """A stored reading's exact value (see the module doc)."""
    return _D.unpack(raw)[0] if raw is not None else (math.nan if v is None else float(v))


class SqliteStore:
    def __init__(
        self, path: str | Path, create: bool = True, *, busy_timeout: float = 30.0
    ) -> None:
        """`busy_timeout`: how long a write waits for another connection's lock before
        it fails with "database is locked" (the ingest retries it)."""
        self.path = str(path)
        self._lock = threading.Lock()
        self._busy_timeout = busy_timeout
        if not create:
            self._db = self._open_existing()
            return
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=busy_timeout
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # the readings index is the hot spot of bulk inserts: give it room (64 MiB)
        self._db.execute("PRAGMA cache_size=-65536")
        self._db.executescript("BEGIN IMMEDIATE;" + SCHEMA + "".join(EXTRA_TABLES) + "COMMIT;")
        # columns added since the first release (SQLite has no ADD COLUMN IF NOT EXISTS)
        for table, column in _ADDED_COLUMNS:
            if column.split()[0] not in self._columns(table):
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
        # active alarms (the console's vital signs), once cleared_ts exists
        self._db.execute(
            "CREATE INDEX IF NOT EXISTS alarms_active ON alarms (gateway) "
            "WHERE raised AND cleared_ts IS NULL"
        )

    def _columns(self, table: str) -> set[str]:
        return {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}

    def _open_existing(self) -> sqlite3.Connection:
        """An existing store only (mode=rw creates nothing), with every current column."""
        path = Path(self.path)
        if self.path == ":memory:" or not path.is_file():
            raise StoreMissing(f"{self.path}: no such database file")
        self._db = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=rw",
            uri=True,
            check_same_thread=False,
            timeout=self._busy_timeout,
        )
        try:
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master")}
            if "uplinks" not in tables:
                raise StoreMissing(f"{self.path}: not a citygw platform store (no uplinks table)")
            missing = [
                f"{t}.{c.split()[0]}"
                for t, c in _ADDED_COLUMNS
                if c.split()[0] not in self._columns(t)
            ]
            if not tables >= REQUIRED_TABLES or missing:
                raise StoreMissing(
                    f"{self.path}: a store of an older citygw (run `citygw ingest` on it once "
                    "to upgrade it)"
                )
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise StoreMissing(f"{self.path}: cannot read it as SQLite: {e}") from None
        except BaseException:
            self._db.close()
            raise
        return self._db

    # -- writes ---------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Cursor]:
        """One write transaction, taken eagerly (BEGIN IMMEDIATE) under the lock. On any
        error nothing of it stays and the connection is ready for the next one; the
        error raised is the one that failed the transaction (SQLite may have rolled back
        already, after a full disk or an I/O error, and a second ROLLBACK would fail)."""
        with self._lock:
            cur = self._db.cursor()
            try:
                cur.execute("BEGIN IMMEDIATE")
                yield cur
                cur.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    with suppress(sqlite3.Error):
                        cur.execute("ROLLBACK")
                raise
            finally:
                cur.close()

    def store_batch(self, gateway: str, env: Envelope, body: Body) -> bool:
        return self.store_batches([(gateway, env, body)])[0]

    def store_batches(self, items: Sequence[tuple[str, Envelope, Body]]) -> list[bool]:
        for _, env, body in items:
            check_batch(env, body)
        now = time.time_ns() // 1_000_000
        results: list[bool] = []
        readings = batches = dups = 0
        with self._write() as cur:
            seen: set[str] = set()
            fresh: list[tuple[str, Envelope, Body]] = []
            for gateway, env, body in items:
                cur.execute(
                    "INSERT OR IGNORE INTO uplinks "
                    "(gateway, stream, seq, lane, n_points, received_ms) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (gateway, env.stream, seq_to_db(env.seq), env.lane, env.n_points, now),
                )
                if cur.rowcount != 1:
                    dups += 1
                    results.append(False)
                    continue
                fresh.append((gateway, env, body))
                if gateway not in seen:
                    seen.add(gateway)
                    cur.execute(
                        "INSERT INTO gateways (gateway, updated_ms, last_seen_ms) "
                        "VALUES (?, ?, ?) ON CONFLICT (gateway) DO UPDATE SET "
                        "last_seen_ms = max(COALESCE(last_seen_ms, 0), excluded.last_seen_ms)",
                        (gateway, now, now),
                    )
                batches += 1
                results.append(True)
            fresh_batches, fresh_alarms, fresh_actions = split_bodies(fresh)
            for gateway, seq, batch in fresh_batches:
                if len(batch):
                    cur.executemany(
                        "INSERT INTO readings "
                        "(gateway, point_id, ts, value, quality, raw, seq) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        _rows(gateway, seq, batch),
                    )
                readings += len(batch)
            changed_events = 0
            for gateway, e in fresh_alarms:  # in order: a clear finds the raise before it
                cur.execute(
                    f"INSERT INTO alarms ({ALARM_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    alarm_row(gateway, e, now),
                )
                if not e.raised:
                    cur.execute(alarm_clear("?", "rowid"), alarm_clear_args(gateway, e))
                changed_events += events.record_alarm(cur, "?", gateway, e, now)
            if fresh_actions:
                cur.executemany(
                    rule_action_insert("?"), [rule_action_row(a, now) for a in fresh_actions]
                )
            bumps = [(readings, "readings"), (batches, "batches"), (dups, "duplicates_dropped")]
            if fresh_alarms or fresh_actions:
                bumps += [(len(fresh_alarms) + len(fresh_actions), "alarms")]
                bumps += [(changed_events, "events")]
            cur.executemany(_BUMP, bumps)
        return results

    def store_meta(self, gateway: str, meta: Meta) -> None:
        now = time.time_ns() // 1_000_000
        with self._write() as cur:
            cur.execute(gateway_meta_upsert("?"), gateway_meta_args(gateway, meta, now))
            cur.executemany(points_upsert("?"), point_rows(gateway, meta, now))
            if meta.config is not None:
                cur.execute(configs.seen_upsert("?"), configs.seen_args(gateway, meta.config, now))
            cur.execute(_BUMP, (1, "gateways"))

    def store_stats(self, stats: GatewayStats) -> None:
        with self._write() as cur:
            cur.execute(stats_upsert("?"), stats_row(stats))
            if cur.rowcount == 1:  # the newest report
                if stats.devices is not None:
                    store_device_info(cur, "?", stats)
                if stats.health is not None:
                    store_device_health(cur, "?", stats)
                cur.execute(_BUMP, (1, "gateways"))

    def store_state(self, gateway: str, online: bool, now_ms: int) -> None:
        with self._write() as cur:
            cur.execute(state_upsert("?"), state_args(gateway, online, now_ms))
            if cur.rowcount == 1:  # the state changed
                cur.execute(_BUMP, (1, "gateways"))

    def store_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        if letters:
            with self._write() as cur:
                cur.executemany(dead_letter_insert("?"), [dead_letter_row(d) for d in letters])

    def prune(self, before_ms: int) -> dict[str, int]:
        dropped = {}
        with self._write() as cur:
            cur.execute("DELETE FROM readings WHERE ts < ?", (before_ms,))
            dropped["readings"] = cur.rowcount
            for table, condition in PRUNE_DELETES:
                cur.execute(f"DELETE FROM {table} WHERE {condition.format(ph='?')}", (before_ms,))
                dropped[table] = cur.rowcount
        return dropped

    # -- reads ----------------------------------------------------------------------------

    def counts(self) -> StoreCounts:
        with self._lock:
            c = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
            (gateways,) = self._db.execute("SELECT count(*) FROM gateways").fetchone()
        return StoreCounts(
            readings=int(c.get("readings", 0)),
            batches=int(c.get("batches", 0)),
            duplicates_dropped=int(c.get("duplicates_dropped", 0)),
            gateways=int(gateways),
        )

    def alarms(self, gateway: str) -> list[AlarmEvent]:
        with self._lock:
            rows = self._db.execute(
                "SELECT point_id, rule, severity, raised, ts, value, since_ms FROM alarms "
                "WHERE gateway = ? ORDER BY rowid",
                (gateway,),
            ).fetchall()
        return [alarm_from_row(r) for r in rows]

    def rule_actions(
        self, gateway: str | None = None, rule: str | None = None, limit: int = 1000
    ) -> list[tuple[str, RuleAction]]:
        sql, args = rule_actions_query("?", gateway, rule, limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [rule_action_from_row(r) for r in reversed(rows)]

    def stats(self, gateway: str) -> GatewayStats | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {STATS_COLUMNS} FROM gateway_stats WHERE gateway = ?", (gateway,)
            ).fetchone()
        return stats_from_row(row) if row else None

    def point_keys(self, gateway: str | None = None) -> list[str]:
        sql = "SELECT DISTINCT key FROM points"
        args: tuple[str, ...] = ()
        if gateway is not None:
            sql, args = sql + " WHERE gateway = ?", (gateway,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY key", args).fetchall()
        return [str(k) for (k,) in rows]

    def alarm_episodes(
        self, gateway: str | None = None, active: bool = False, since_ms: int | None = None
    ) -> list[AlarmEpisode]:
        sql, args = alarm_episodes_query("?", gateway, active, "a.rowid", since_ms)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [episode_from_row(r) for r in rows]

    def gateways(self) -> list[GatewayInfo]:
        with self._lock:
            rows = self._db.execute(GATEWAYS_QUERY).fetchall()
        return [gateway_from_row(r) for r in rows]

    def device_info(self, gateway: str | None = None) -> list[DeviceInfoEntry]:
        sql, args = device_info_query("?", gateway)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [device_info_from_row(r) for r in rows]

    def fleet(self, gateway: str | None = None) -> list[FleetRow]:
        sql, args = fleet_query("?", gateway)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [fleet_from_row(r) for r in rows]

    def gateway_devices(self, gateway: str) -> list[DeviceRow]:
        points, health, locations = gateway_devices_queries("?")
        info, info_args = device_info_query("?", gateway)
        with self._lock:
            point_rows_ = self._db.execute(points, (gateway,)).fetchall()
            health_rows = self._db.execute(health, (gateway,)).fetchall()
            where = self._db.execute(locations, (gateway,)).fetchone()
            infos = [device_info_from_row(r) for r in self._db.execute(info, info_args)]
        return device_rows(point_rows_, health_rows, infos, where[0] if where else None)

    def latest_values(
        self, since_ms: int, gateways: str = "*", points: str = "*", site: str | None = None
    ) -> list[LatestValue]:
        sql = (
            f"WITH p AS ({selected_points('?', gateways, points, site)}) "
            "SELECT p.gateway, p.key, r.ts, r.value, r.raw FROM p JOIN readings r "
            "ON r.rowid = (SELECT rowid FROM readings WHERE gateway = p.gateway "
            f"AND point_id = p.point_id AND ts >= ? AND quality {USABLE} AND value {FINITE} "
            "ORDER BY ts DESC, seq DESC, rowid DESC LIMIT 1) ORDER BY p.gateway, p.key"
        )
        args = [*latest_args(gateways, points, site), since_ms]
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [LatestValue(g, k, ts, _value(v, raw)) for g, k, ts, v, raw in rows]

    def uplink_points(self, since_ms: int) -> int:
        with self._lock:
            (n,) = self._db.execute(UPLINK_POINTS_QUERY.format(ph="?"), (since_ms,)).fetchone()
        return int(n)

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        with self._lock:
            rows = self._db.execute(dead_letters_query("?", order="id"), (limit,)).fetchall()
        return [dead_letter_from_row(r) for r in rows]

    def query(
        self,
        point_key: str,
        since_ms: int,
        until_ms: int | None = None,
        gateway: str | None = None,
        limit: int | None = None,
    ) -> list[PointReading]:
        sql = (
            "SELECT r.gateway, p.key, r.ts, r.value, r.quality, r.raw FROM points p "
            "JOIN readings r ON r.gateway = p.gateway AND r.point_id = p.point_id "
            "WHERE p.key = ? AND r.ts >= ? AND r.ts < ?"
        )
        args: list[object] = [point_key, since_ms, until_ms if until_ms is not None else 2**63 - 1]
        if gateway is not None:
            sql += " AND p.gateway = ?"
            args.append(gateway)
        sql += " ORDER BY r.gateway, r.ts, r.seq, r.rowid"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [PointReading(g, k, ts, _value(v, raw), q) for g, k, ts, v, q, raw in rows]

    def series(
        self, gateway: str, point_id: int, since_ms: int, until_ms: int, max_points: int
    ) -> Series:
        if until_ms <= since_ms:
            return Series(0)
        where = "gateway = ? AND point_id = ? AND ts >= ? AND ts < ?"
        with self._lock:
            (n,) = self._db.execute(
                f"SELECT count(*) FROM (SELECT 1 FROM readings WHERE {where} LIMIT ?)",
                (gateway, point_id, since_ms, until_ms, max_points + 1),
            ).fetchone()
            if n <= max_points:
                rows = self._db.execute(
                    f"SELECT ts, value, quality, raw FROM readings WHERE {where} "
                    "ORDER BY ts, seq, rowid",
                    (gateway, point_id, since_ms, until_ms),
                ).fetchall()
                return raw_series([(ts, _value(v, raw), q) for ts, v, q, raw in rows])
            bucket = choose_bucket(since_ms, until_ms, max_points)
            lo, hi = bucket_span(since_ms, until_ms, bucket)
            rows = self._db.execute(
                f"SELECT {floor_sql('ts', str(bucket))} AS t, {aggregates()} FROM readings "
                f"WHERE {where} GROUP BY t ORDER BY t",
                (gateway, point_id, lo, hi),
            ).fetchall()
        return bucketed_series(bucket, rows)

    def roll_up(self, limit: int) -> int:
        return 0  # series read the readings table: no rollup to keep

    def point_alarms(
        self, gateway: str, point_id: int, since_ms: int, until_ms: int
    ) -> list[AlarmEpisode]:
        with self._lock:
            rows = self._db.execute(
                point_alarms_query("?"), (gateway, point_id, until_ms, since_ms)
            ).fetchall()
        return [episode_from_row(r) for r in rows]

    def find_points(
        self, text: str, gateway: str | None = None, limit: int = 50
    ) -> list[PointInfo]:
        sql, args = find_points_query("?", "instr", text, gateway, limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [point_from_row(r) for r in rows]

    def point(self, gateway: str, key: str) -> PointInfo | None:
        with self._lock:
            row = self._db.execute(point_query("?"), (gateway, key)).fetchone()
        return None if row is None else point_from_row(row)

    def duplicate_readings(self) -> int:
        with self._lock:
            (n,) = self._db.execute(
                "SELECT COALESCE(SUM(c - 1), 0) FROM (SELECT count(*) AS c FROM readings "
                "GROUP BY gateway, point_id, ts HAVING count(*) > 1)"
            ).fetchone()
        return int(n)

    def readings(
        self, gateway: str, point_key: str | None = None
    ) -> list[tuple[int, int, float, int]]:
        sql = "SELECT point_id, ts, value, quality, raw FROM readings WHERE gateway = ?"
        args: tuple[object, ...] = (gateway,)
        if point_key is not None:
            sql += " AND point_id IN (SELECT point_id FROM points WHERE gateway = ? AND key = ?)"
            args = (gateway, gateway, point_key)
        sql += " ORDER BY seq, rowid"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [(pid, ts, _value(v, raw), q) for pid, ts, v, q, raw in rows]

    # -- console sessions ---------------------------------------------------------------

    def config_push_record(self, push: ConfigPushRecord) -> int:
        with self._write() as cur:
            cur.execute(configs.push_insert("?"), configs.push_args(push))
            row = cur.fetchone()
        return int(row[0])

    def config_push_answered(
        self, push_id: int, outcome: str, error: str | None, now_ms: int
    ) -> None:
        with self._write() as cur:
            cur.execute(configs.push_answered("?"), (outcome, error, now_ms, push_id))

    def configs_seen(self, gateway: str | None = None) -> list[ConfigSeen]:
        sql, args = configs.seen_query("?", gateway)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [configs.seen_from_row(r) for r in rows]

    def config_pushes(self, gateway: str | None = None, limit: int = 100) -> list[ConfigPushRecord]:
        sql, args = configs.pushes_query("?", gateway, limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [configs.push_from_row(r) for r in rows]

    def session_open(self, id_hash: str, session: Session, now_ms: int) -> None:
        with self._write() as cur:
            cur.execute(
                sessions.session_insert("?"),
                (id_hash, session.user, session.role, session.csrf, now_ms, session.expires_ms),
            )
            cur.execute(sessions.sessions_expired("?"), (now_ms,))

    def session_get(self, id_hash: str, now_ms: int) -> Session | None:
        with self._lock:
            row = self._db.execute(sessions.session_select("?"), (id_hash, now_ms)).fetchone()
        return Session(str(row[0]), str(row[1]), str(row[2]), int(row[3])) if row else None

    def session_close(self, id_hash: str) -> None:
        with self._write() as cur:
            cur.execute(sessions.session_delete("?"), (id_hash,))

    # -- events ---------------------------------------------------------------------------

    def events(
        self,
        state: str | None = None,
        gateway: str | None = None,
        limit: int = 200,
        before_id: int | None = None,
    ) -> list[Event]:
        sql, args = events.events_query("?", state, gateway, limit, before_id)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [events.event_from_row(r) for r in rows]

    def event(self, event_id: int) -> Event | None:
        with self._lock:
            row = self._db.execute(events.event_query("?"), (event_id,)).fetchone()
        return events.event_from_row(row) if row else None

    def event_actions(self, event_id: int) -> list[EventAction]:
        with self._lock:
            rows = self._db.execute(events.actions_query("?"), (event_id,)).fetchall()
        return [events.action_from_row(r) for r in rows]

    def event_act(
        self,
        event_id: int,
        action: str,
        user: str,
        now_ms: int,
        *,
        assignee: str | None = None,
        note: str | None = None,
    ) -> Event:
        with self._write() as cur:
            event = events.act(cur, "?", event_id, action, user, now_ms, assignee, note)
            if event is not None:
                cur.execute(_BUMP, (1, "events"))
        if event is None:
            raise StoreMissing(f"no event {event_id}")
        return event

    def event_summary(self, since_ms: int) -> EventSummary:
        with self._lock:
            open_rows = self._db.execute(events.OPEN_COUNTS_QUERY).fetchall()
            durations = self._db.execute(events.durations_query("?"), (since_ms,)).fetchall()
        return events.summary_from_rows(since_ms, open_rows, durations)

    def change_marks(self) -> dict[str, int]:
        with self._lock:
            counters = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
        return {kind: int(counters.get(kind, 0)) for kind in CHANGE_KINDS}

    def close(self) -> None:
        with self._lock:
            self._db.close()
