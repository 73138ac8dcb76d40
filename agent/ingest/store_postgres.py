"""The platform store on PostgreSQL (or TimescaleDB), with psycopg 3.

URL: ``postgresql://user[:password]@host[:port]/dbname[?schema=name&...]``. The schema
(default ``public``) and its tables are created idempotently (``CREATE ... IF NOT
EXISTS`` under an advisory lock, so several workers may start at once); other query
parameters are passed to libpq.

Per uplink, in one transaction: ``INSERT INTO uplinks ... ON CONFLICT DO NOTHING`` on
the dedup key (gateway, stream, seq); if that inserted a row, the readings go in with
binary ``COPY`` (values as float8: NaN, ±inf and -0.0 round-trip bit-exactly; `readings`
reads in binary format too, since the text format would lose NaN payloads), and the events
of an alarm-lane uplink go into ``alarms``. Two
workers storing the same uplink at once serialise on the unique key: the second one
waits for the first to commit and then inserts nothing.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
import psycopg
from psycopg import sql

from agent.ingest.store import (
    ALARM_COLUMNS,
    STATS_COLUMNS,
    Body,
    StoreCounts,
    alarm_from_row,
    alarm_row,
    check_batch,
    point_rows,
    points_upsert,
    seq_to_db,
    split_bodies,
    stats_from_row,
    stats_row,
    stats_upsert,
)
from agent.wire import Envelope, GatewayStats, Meta
from native.stages import AlarmEvent

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_LOCK_KEY = 0x63677731  # advisory lock id for schema creation ("cgw1")

SCHEMA = """
CREATE TABLE IF NOT EXISTS uplinks (
    gateway     text     NOT NULL,
    stream      text     NOT NULL,
    seq         bigint   NOT NULL,
    lane        smallint NOT NULL,
    n_points    integer  NOT NULL,
    received_ms bigint   NOT NULL,
    PRIMARY KEY (gateway, stream, seq)
);
CREATE TABLE IF NOT EXISTS readings (
    id       bigint GENERATED ALWAYS AS IDENTITY,
    gateway  text             NOT NULL,
    point_id bigint           NOT NULL,
    ts       bigint           NOT NULL,
    value    double precision NOT NULL,
    quality  smallint         NOT NULL
);
ALTER TABLE readings ADD COLUMN IF NOT EXISTS seq bigint;
CREATE INDEX IF NOT EXISTS readings_gateway_point_ts ON readings (gateway, point_id, ts);
CREATE TABLE IF NOT EXISTS points (
    gateway    text   NOT NULL,
    point_id   bigint NOT NULL,
    key        text   NOT NULL,
    device     text   NOT NULL,
    name       text   NOT NULL,
    unit       text   NOT NULL,
    driver     text   NOT NULL,
    type       text   NOT NULL,
    updated_ms bigint NOT NULL,
    PRIMARY KEY (gateway, point_id)
);
CREATE INDEX IF NOT EXISTS points_gateway_key ON points (gateway, key);
CREATE TABLE IF NOT EXISTS gateways (
    gateway    text PRIMARY KEY,
    site       text,
    location   jsonb,
    stream     text,
    updated_ms bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS alarms (
    id          bigint GENERATED ALWAYS AS IDENTITY,
    gateway     text     NOT NULL,
    point_id    bigint   NOT NULL,
    rule        text     NOT NULL,
    severity    text     NOT NULL,
    raised      boolean  NOT NULL,
    ts          bigint   NOT NULL,
    value       double precision,
    since_ms    bigint   NOT NULL,
    received_ms bigint   NOT NULL
);
CREATE INDEX IF NOT EXISTS alarms_gateway_point_ts ON alarms (gateway, point_id, ts);
CREATE TABLE IF NOT EXISTS gateway_stats (
    gateway          text PRIMARY KEY,
    ts               bigint NOT NULL,
    appended_points  bigint NOT NULL,
    evicted_points   bigint NOT NULL,
    evicted_messages bigint NOT NULL,
    backlog_points   bigint NOT NULL,
    backlog_messages bigint NOT NULL,
    lost_points      bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name  text PRIMARY KEY,
    value bigint NOT NULL
);
INSERT INTO counters (name, value)
    VALUES ('readings', 0), ('batches', 0), ('duplicates_dropped', 0)
    ON CONFLICT (name) DO NOTHING;
"""


def split_url(url: str) -> tuple[str, str]:
    """-> (libpq conninfo URL without ``schema``, schema name)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = "public"
    rest = []
    for k, v in query:
        if k == "schema":
            schema = v
        else:
            rest.append((k, v))
    if not _IDENT.fullmatch(schema):
        raise ValueError(f"invalid schema name {schema!r} in store URL")
    scheme = "postgresql" if parts.scheme == "postgres" else parts.scheme
    return urlunsplit((scheme, parts.netloc, parts.path, urlencode(rest), "")), schema


class PostgresStore:
    def __init__(self, url: str) -> None:
        self._conninfo, self.schema = split_url(url)
        self._lock = threading.Lock()
        self._db = self._connect()

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        db = psycopg.connect(self._conninfo, autocommit=True)
        try:
            with db.transaction(), db.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                cur.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema))
                )
                cur.execute(
                    sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(self.schema))
                )
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        cur.execute(stmt.encode())
            db.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
        except BaseException:
            db.close()
            raise
        return db

    def _conn(self) -> psycopg.Connection[tuple[Any, ...]]:
        """The connection, reopened if the server dropped it (the failed call raised,
        so its uplinks were not acked and will be stored on redelivery)."""
        if self._db.closed or self._db.broken:
            self._db = self._connect()
        return self._db

    # -- writes ---------------------------------------------------------------------------

    def store_batch(self, gateway: str, env: Envelope, body: Body) -> bool:
        return self.store_batches([(gateway, env, body)])[0]

    def store_batches(self, items: Sequence[tuple[str, Envelope, Body]]) -> list[bool]:
        for _, env, body in items:
            check_batch(env, body)
        now = time.time_ns() // 1_000_000
        results: list[bool] = []
        readings = batches = dups = 0
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            fresh: list[tuple[str, Envelope, Body]] = []
            for gateway, env, body in items:
                cur.execute(
                    "INSERT INTO uplinks (gateway, stream, seq, lane, n_points, received_ms) "
                    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    (gateway, env.stream, seq_to_db(env.seq), env.lane, env.n_points, now),
                )
                if cur.rowcount != 1:
                    dups += 1
                    results.append(False)
                    continue
                fresh.append((gateway, env, body))
                batches += 1
                results.append(True)
            fresh_batches, fresh_alarms = split_bodies(fresh)
            readings = sum(len(b) for _, _, b in fresh_batches)
            if fresh_alarms:
                cur.executemany(
                    f"INSERT INTO alarms ({ALARM_COLUMNS}) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    [alarm_row(g, e, now) for g, e in fresh_alarms],
                )
            if readings:
                with cur.copy(
                    "COPY readings (gateway, point_id, ts, value, quality, seq) "
                    "FROM STDIN (FORMAT BINARY)"
                ) as copy:
                    copy.set_types(["text", "int8", "int8", "float8", "int2", "int8"])
                    for gateway, seq, batch in fresh_batches:
                        for pid, ts, v, q in batch.rows():
                            copy.write_row((gateway, pid, ts, v, q, seq))
            for gateway in {g for g, _, _ in fresh}:
                cur.execute(
                    "INSERT INTO gateways (gateway, updated_ms) VALUES (%s, %s) "
                    "ON CONFLICT DO NOTHING",
                    (gateway, now),
                )
            cur.executemany(
                "UPDATE counters SET value = value + %s WHERE name = %s",
                [(readings, "readings"), (batches, "batches"), (dups, "duplicates_dropped")],
            )
        return results

    def store_meta(self, gateway: str, meta: Meta) -> None:
        now = time.time_ns() // 1_000_000
        location = orjson.dumps(meta.location).decode() if meta.location is not None else None
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(
                "INSERT INTO gateways (gateway, site, location, stream, updated_ms) "
                "VALUES (%s, %s, %s::jsonb, %s, %s) ON CONFLICT (gateway) DO UPDATE SET "
                "site = excluded.site, location = excluded.location, "
                "stream = excluded.stream, updated_ms = excluded.updated_ms",
                (gateway, meta.site, location, meta.stream, now),
            )
            if meta.points:
                cur.executemany(points_upsert("%s"), point_rows(gateway, meta, now))

    def store_stats(self, stats: GatewayStats) -> None:
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(stats_upsert("%s"), stats_row(stats))

    # -- reads ----------------------------------------------------------------------------

    def counts(self) -> StoreCounts:
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute("SELECT name, value FROM counters")
            c = {str(k): int(v) for k, v in cur.fetchall()}
            cur.execute("SELECT count(*) FROM gateways")
            row = cur.fetchone()
        return StoreCounts(
            readings=c.get("readings", 0),
            batches=c.get("batches", 0),
            duplicates_dropped=c.get("duplicates_dropped", 0),
            gateways=int(row[0]) if row else 0,
        )

    def alarms(self, gateway: str) -> list[AlarmEvent]:
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(
                "SELECT point_id, rule, severity, raised, ts, value, since_ms FROM alarms "
                "WHERE gateway = %s ORDER BY id",
                (gateway,),
            )
            rows = cur.fetchall()
        return [alarm_from_row(r) for r in rows]

    def stats(self, gateway: str) -> GatewayStats | None:
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(f"SELECT {STATS_COLUMNS} FROM gateway_stats WHERE gateway = %s", (gateway,))
            row = cur.fetchone()
        return stats_from_row(row) if row else None

    def duplicate_readings(self) -> int:
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(
                "SELECT COALESCE(SUM(c - 1), 0) FROM (SELECT count(*) AS c FROM readings "
                "GROUP BY gateway, point_id, ts HAVING count(*) > 1) AS d"
            )
            row = cur.fetchone()
        return int(row[0]) if row else 0

    def readings(
        self, gateway: str, point_key: str | None = None
    ) -> list[tuple[int, int, float, int]]:
        with self._lock, self._conn().transaction(), self._db.cursor(binary=True) as cur:
            if point_key is None:
                cur.execute(
                    "SELECT point_id, ts, value, quality FROM readings "
                    "WHERE gateway = %s ORDER BY seq, id",
                    (gateway,),
                )
            else:
                cur.execute(
                    "SELECT point_id, ts, value, quality FROM readings WHERE gateway = %s "
                    "AND point_id IN (SELECT point_id FROM points WHERE gateway = %s "
                    "AND key = %s) ORDER BY seq, id",
                    (gateway, gateway, point_key),
                )
            rows = cur.fetchall()
        return [(int(p), int(t), float(v), int(q)) for p, t, v, q in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
