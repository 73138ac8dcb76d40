"""The platform store on PostgreSQL (or TimescaleDB), with psycopg 3.

URL: ``postgresql://user[:password]@host[:port]/dbname[?schema=name&...]``. The schema
(default ``public``) and its tables are created and migrated by the tool (under an
advisory lock, so several workers may start at once); other query parameters go to libpq.

Readings are stored as **blocks**: one ``reading_blocks`` row per uplink, its readings as
four parallel arrays (point ids, timestamps, values, qualities), the way a gateway sends
them. A row per reading costs PostgreSQL a heap tuple and an index entry per reading;
with the (gateway, point, time) index a query needs, that tops out near 400k rows/s on a
2-core machine, while blocks take the same readings at the rate of a few thousand rows a
second. The ``readings`` view unnests them (one row per reading), and `query` reads a
point's blocks through the (gateway, t_max) index. ``reading_blocks`` is partitioned by
day on ``t_min`` (declarative range partitions, made as days arrive; far-off times from a
gateway with a broken clock go to the default partition), or is a TimescaleDB hypertable
where that extension is available.

Per group of uplinks, in one transaction: one ``INSERT INTO uplinks ... ON CONFLICT DO
NOTHING RETURNING`` on the dedup key (gateway, stream, seq) tells which are new; their
readings go in with one binary ``COPY`` (`pg_copy`: float8 bits kept exactly, NaN
payloads and -0.0 included; reads use the binary format too), their alarm events into
``alarms`` (a clear is paired with its raise), their local rules' actions into
``rule_actions``. Two workers storing the same uplink at
once serialise on the unique key: the second waits for the first to commit and then
inserts nothing. Keys are inserted in sorted order so that two workers never deadlock.

A point's series over a month would read every block of its gateway in that month, so
`series` reads a rollup, ``point_rollup`` (per point and ten minutes), for buckets of ten
minutes or more, and reads blocks (only the point's positions in them) for shorter ones
while that costs at most RAW_BLOCK_BUDGET blocks.
It is kept off the hot path: the store transaction only adds each fresh block's identity
to ``rollup_queue`` (one statement per group); the ingest worker's roll-up task calls
`roll_up` every second, which takes queued blocks no other worker holds (FOR UPDATE SKIP
LOCKED), folds their readings in (counts add, min/max merge: a late batch lands in
slots rolled up already) and deletes their queue rows, in one transaction: exactly
once. Blocks still queued are read directly, so a series never misses the newest readings.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql

from central import configs, events, pg_copy, sessions
from central.configs import ConfigPushRecord, ConfigSeen
from central.events import Event, EventAction, EventSummary
from central.series import (
    ROLLUP_MS,
    Series,
    aggregates,
    bucket_span,
    bucketed_series,
    choose_bucket,
    counted,
    floor_sql,
    raw_series,
)
from central.sessions import Session
from central.store import (
    ALARM_COLUMNS,
    CHANGE_KINDS,
    CHANGES_CHANNEL,
    GATEWAYS_QUERY,
    PRUNE_DELETES,
    STATS_COLUMNS,
    UPLINK_POINTS_QUERY,
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

log = logging.getLogger("citygw.ingest")

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_LOCK_KEY = 0x63677731  # advisory lock id for schema changes ("cgw1")
#: 1 a row per reading, 2 reading blocks, 3 device_info, 4 the console's tables, 5 the
#: config history (central/configs.py), 6 rule_actions (the gateways' local rules)
SCHEMA_VERSION: Final = 6
DAY_MS: Final = 86_400_000
#: day partitions are made for readings this close to now; the rest go to the default
PARTITION_PAST_DAYS: Final = 400
PARTITION_FUTURE_DAYS: Final = 2

TABLES = """
CREATE TABLE IF NOT EXISTS schema_info (version integer NOT NULL);
CREATE TABLE IF NOT EXISTS uplinks (
    gateway     text     NOT NULL,
    stream      text     NOT NULL,
    seq         bigint   NOT NULL,
    lane        smallint NOT NULL,
    n_points    integer  NOT NULL,
    received_ms bigint   NOT NULL,
    PRIMARY KEY (gateway, stream, seq)
);
-- the console's readings per minute: a range of received_ms (BRIN: a few pages, and
-- nearly free to keep, as uplinks arrive in received order)
CREATE INDEX IF NOT EXISTS uplinks_received ON uplinks USING brin (received_ms);
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
CREATE INDEX IF NOT EXISTS points_key ON points (key);
CREATE TABLE IF NOT EXISTS gateways (
    gateway    text PRIMARY KEY,
    site       text,
    location   jsonb,
    stream     text,
    updated_ms bigint NOT NULL
);
ALTER TABLE gateways ADD COLUMN IF NOT EXISTS state text;
ALTER TABLE gateways ADD COLUMN IF NOT EXISTS state_ms bigint;
ALTER TABLE gateways ADD COLUMN IF NOT EXISTS last_seen_ms bigint;
ALTER TABLE gateways ADD COLUMN IF NOT EXISTS software text;
ALTER TABLE gateways ADD COLUMN IF NOT EXISTS locations jsonb;
ALTER TABLE gateways ADD COLUMN IF NOT EXISTS config_version text;
ALTER TABLE gateways ADD COLUMN IF NOT EXISTS config_hash text;
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
ALTER TABLE alarms ADD COLUMN IF NOT EXISTS cleared_ts bigint;
CREATE INDEX IF NOT EXISTS alarms_gateway_point_ts ON alarms (gateway, point_id, ts);
CREATE INDEX IF NOT EXISTS alarms_active ON alarms (gateway) WHERE raised AND cleared_ts IS NULL;
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
CREATE TABLE IF NOT EXISTS device_info (
    gateway  text   NOT NULL,
    device   text   NOT NULL,
    name     text   NOT NULL,
    value    text   NOT NULL,
    since_ms bigint NOT NULL,
    PRIMARY KEY (gateway, device, name)
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_ms bigint NOT NULL,
    topic       text   NOT NULL,
    reason      text   NOT NULL,
    error       text   NOT NULL,
    payload     bytea  NOT NULL,
    size        bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name  text PRIMARY KEY,
    value bigint NOT NULL
);
INSERT INTO counters (name, value)
    VALUES ('readings', 0), ('batches', 0), ('duplicates_dropped', 0)
    ON CONFLICT (name) DO NOTHING
"""

DEVICE_HEALTH = """
CREATE TABLE IF NOT EXISTS device_health (
    gateway  text    NOT NULL,
    device   text    NOT NULL,
    healthy  boolean NOT NULL,
    since_ms bigint  NOT NULL,
    error    text    NOT NULL,
    PRIMARY KEY (gateway, device)
)
"""

#: the console's plots (`series`): per point and ROLLUP_MS slot (ts // ROLLUP_MS), n,
#: n_bad, vmin, vmax and vsum of its readings (central/series.py says which count),
#: folded in off the ingest's hot path by `roll_up` from the blocks the ingest queued in
#: `rollup_queue` (a block's full identity: two streams of a gateway may reuse a seq).
#: No index on slot alone: `prune` (rare) scans, `roll_up` (always) stays cheaper. A slot
#: of a point read once a minute is updated ten times: fillfactor leaves room on its page
#: for the new versions (HOT updates, no index entry each, dead ones pruned in place).
#: point_latest: each point's newest good or uncertain finite reading (the vital signs)
SERIES_TABLES = """
CREATE TABLE IF NOT EXISTS point_rollup (
    gateway  text    NOT NULL,
    point_id bigint  NOT NULL,
    slot     bigint  NOT NULL,
    n        integer NOT NULL,
    n_bad    integer NOT NULL,
    vmin     double precision,
    vmax     double precision,
    vsum     double precision NOT NULL,
    PRIMARY KEY (gateway, point_id, slot)
) WITH (fillfactor = 70);
CREATE TABLE IF NOT EXISTS point_latest (
    gateway  text   NOT NULL,
    point_id bigint NOT NULL,
    ts       bigint NOT NULL,
    value    double precision NOT NULL,
    PRIMARY KEY (gateway, point_id)
);
CREATE TABLE IF NOT EXISTS rollup_queue (
    gateway     text   NOT NULL,
    seq         bigint NOT NULL,
    t_min       bigint NOT NULL,
    t_max       bigint NOT NULL,
    received_ms bigint NOT NULL,
    PRIMARY KEY (gateway, t_max, seq, t_min, received_ms)
)
"""

#: what the gateways' local rules did (the alarm lane's "actions"); value and written NULL
#: for NaN (none), inputs the wire's JSON list; stored with the message's dedup key
RULE_ACTIONS = """
CREATE TABLE IF NOT EXISTS rule_actions (
    gateway     text    NOT NULL,
    stream      text    NOT NULL,
    seq         bigint  NOT NULL,
    idx         integer NOT NULL,
    rule        text    NOT NULL,
    ts          bigint  NOT NULL,
    transition  text    NOT NULL,
    action      text    NOT NULL,
    outcome     text    NOT NULL,
    target      text    NOT NULL,
    value       double precision,
    written     double precision,
    detail      text    NOT NULL,
    attempts    bigint  NOT NULL,
    inputs      jsonb   NOT NULL,
    received_ms bigint  NOT NULL,
    PRIMARY KEY (gateway, stream, seq, idx)
);
CREATE INDEX IF NOT EXISTS rule_actions_rule ON rule_actions (rule, gateway);
CREATE INDEX IF NOT EXISTS rule_actions_ts ON rule_actions (ts)
"""

#: a block's arrays stay uncompressed in its row up to a page: the console reads a point's
#: positions in a block by subscript, which decompresses a compressed array once per
#: position (10x slower for a block of 100 readings; arrays of numbers barely compress)
BLOCK_STORAGE: Final = "toast_tuple_target = 8160"

#: tables added by later features (the console's events, sessions, rollups...): each a
#: DDL string of CREATE ... IF NOT EXISTS statements, run after TABLES
EXTRA_TABLES: tuple[str, ...] = (
    DEVICE_HEALTH,
    SERIES_TABLES,
    sessions.POSTGRES_TABLES,
    events.POSTGRES_TABLES,
    configs.POSTGRES_TABLES,
    RULE_ACTIONS,
    # change_marks "gateways" (alarms and events have their tables' identity sequences)
    "CREATE SEQUENCE IF NOT EXISTS gateway_changes",
)

BLOCKS_COLUMNS = """
    gateway     text     NOT NULL,
    seq         bigint   NOT NULL,
    t_min       bigint   NOT NULL,
    t_max       bigint   NOT NULL,
    received_ms bigint   NOT NULL,
    point_ids   bigint[] NOT NULL,
    timestamps  bigint[] NOT NULL,
    vals        double precision[] NOT NULL,
    qualities   smallint[] NOT NULL
"""

READINGS_VIEW = """
CREATE OR REPLACE VIEW readings AS
SELECT b.gateway, r.point_id, r.ts, r.value, r.quality, b.seq, r.pos
FROM reading_blocks b
CROSS JOIN LATERAL unnest(b.point_ids, b.timestamps, b.vals, b.qualities)
    WITH ORDINALITY AS r(point_id, ts, value, quality, pos)
"""

#: in a transaction that changed a gateway's state, stats or meta: change_marks, NOTIFY
_GATEWAYS_CHANGED: Final = (
    f"SELECT nextval('gateway_changes'), pg_notify('{CHANGES_CHANNEL}', 'gateways')"
).encode()
_EVENTS_CHANGED: Final = f"SELECT pg_notify('{CHANGES_CHANNEL}', 'events')".encode()
#: identity sequences grow with every alarm event and event action; a sequence moves when
#: its value is taken (before the commit, and whether or not it commits): on PostgreSQL,
#: the NOTIFY (sent at the commit) is the signal, the marks only tell what moved
_CHANGE_MARKS: Final = (
    "SELECT (SELECT COALESCE(sum(readings), 0) FROM ingest_counters), "
    "(SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM alarms_id_seq), "
    "(SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM event_actions_id_seq), "
    "(SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM gateway_changes)"
)

_UNNEST = (
    "CROSS JOIN LATERAL unnest(b.point_ids, b.timestamps, b.vals, b.qualities) "
    "WITH ORDINALITY AS r(point_id, ts, value, quality, pos)"
)

#: a queued block (q) and its reading_blocks row (b)
_QUEUED_BLOCK = (
    "b.gateway = q.gateway AND b.t_min = q.t_min AND b.t_max = q.t_max AND b.seq = q.seq "
    "AND b.received_ms = q.received_ms"
)

_QUEUE_COLUMNS = "gateway, seq, t_min, t_max, received_ms"
#: queued blocks (q: %(q_gateway)s... column arrays, as `_queued` gives them) and their
#: rows (b); the list of t_min lets the planner read only the partitions that hold them
_QUEUED = (
    "unnest(%(q_gateway)s::text[], %(q_seq)s::bigint[], %(q_t_min)s::bigint[], "
    "%(q_t_max)s::bigint[], %(q_received_ms)s::bigint[]) "
    f"AS q({_QUEUE_COLUMNS}) JOIN reading_blocks b ON {_QUEUED_BLOCK} "
    "AND b.t_min = ANY(%(q_t_min)s::bigint[])"
)
#: up to %(limit)s queued blocks nobody else holds, taken off the queue (in the
#: transaction that folds them in: exactly once)
_TAKE = (
    "DELETE FROM rollup_queue WHERE ctid = ANY(ARRAY(SELECT ctid FROM rollup_queue "
    f"LIMIT %(limit)s FOR UPDATE SKIP LOCKED)) RETURNING {_QUEUE_COLUMNS}"
)
#: their readings (unnested once) folded into point_rollup (counts add, min/max merge)
#: and point_latest (each point's newest good or uncertain finite reading, for the vital
#: signs: a newer one replaces it), in key order so that two roll-ups never deadlock
_FOLD = f"""
WITH got AS MATERIALIZED (
    SELECT b.gateway, b.seq, r.point_id, r.ts, r.value, r.quality, r.pos
    FROM {_QUEUED} {_UNNEST}
), folded AS (
    INSERT INTO point_rollup AS m (gateway, point_id, slot, n, n_bad, vmin, vmax, vsum)
    SELECT gateway, point_id, {floor_sql("ts", str(ROLLUP_MS), "%%")} / {ROLLUP_MS},
        {aggregates("value", "quality")}
    FROM got GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (gateway, point_id, slot) DO UPDATE SET n = m.n + excluded.n,
        n_bad = m.n_bad + excluded.n_bad, vmin = LEAST(m.vmin, excluded.vmin),
        vmax = GREATEST(m.vmax, excluded.vmax), vsum = m.vsum + excluded.vsum
)
INSERT INTO point_latest AS l (gateway, point_id, ts, value)
SELECT DISTINCT ON (gateway, point_id) gateway, point_id, ts, value FROM got
WHERE {counted("value", "quality")} ORDER BY gateway, point_id, ts DESC, seq DESC, pos DESC
ON CONFLICT (gateway, point_id) DO UPDATE SET ts = excluded.ts, value = excluded.value
    WHERE excluded.ts >= l.ts
"""
#: the queued blocks of %(gateway)s that may hold readings in [%(lo)s, %(hi)s)
_PENDING_KEYS = (
    f"SELECT {_QUEUE_COLUMNS} FROM rollup_queue WHERE gateway = %(gateway)s "
    "AND t_max >= %(lo)s AND t_min < %(hi)s"
)
#: their rows: readings not yet in point_rollup
_PENDING = f"SELECT b.point_ids, b.timestamps, b.vals, b.qualities FROM {_QUEUED}"


def _queued(rows: Sequence[Sequence[Any]]) -> dict[str, list[Any]]:
    """Queue rows (`_QUEUE_COLUMNS`) as the column arrays `_QUEUED` reads."""
    columns = [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in range(5)]
    return {f"q_{name}": c for name, c in zip(_QUEUE_COLUMNS.split(", "), columns, strict=True)}


_POINT_ROLLUP = (
    "FROM point_rollup WHERE gateway = %(gateway)s AND point_id = %(point)s "
    "AND slot >= {lo} AND slot < {hi}"
)
#: bounds of the point's reading count in [%(lo)s, %(hi)s): the rolled-up slots that
#: overlap it, those wholly inside it, and the exact count in the pending blocks. A slot
#: row holds one reading at least, so %(cap)s rows (max_points + 1) are enough to tell
#: "more than max_points": a month of slots is not summed to learn that
_SERIES_COUNTS = (
    f"WITH pending AS ({_PENDING}) SELECT "
    "(SELECT COALESCE(sum(n + n_bad), 0) FROM (SELECT n, n_bad "
    + _POINT_ROLLUP.format(lo="%(m_lo)s", hi="%(m_hi)s")
    + " LIMIT %(cap)s) c), (SELECT COALESCE(sum(n + n_bad), 0) FROM (SELECT n, n_bad "
    + _POINT_ROLLUP.format(lo="%(m_in_lo)s", hi="%(m_in_hi)s")
    + " LIMIT %(cap)s) c), (SELECT count(*) FROM pending b "
    "CROSS JOIN LATERAL unnest(b.point_ids, b.timestamps) AS r(point_id, ts) "
    "WHERE r.point_id = %(point)s AND r.ts >= %(lo)s AND r.ts < %(hi)s)"
)
#: the point's readings of every block in [%(lo)s, %(hi)s): only its positions in each
#: block are read (array_positions scans the ids in C), not the whole block unnested. The
#: readings are made scalars at once (OFFSET 0 keeps the planner from carrying the
#: block's arrays up to the grouping: its sort then spilled 90 MB to disk for a day at 1 Hz)
_BLOCK_READINGS = (
    "FROM reading_blocks b CROSS JOIN LATERAL (SELECT array_positions(b.point_ids, "
    "%(point)s::bigint) AS ps, b.timestamps AS ta, b.vals AS va, b.qualities AS qa) a "
    "CROSS JOIN LATERAL unnest(a.ps) AS i(pos) CROSS JOIN LATERAL "
    "(SELECT a.ta[i.pos] AS ts, a.va[i.pos] AS value, a.qa[i.pos] AS quality OFFSET 0) r "
    "WHERE b.gateway = %(gateway)s AND b.t_max >= %(lo)s AND b.t_min < %(hi)s "
    "AND r.ts >= %(lo)s AND r.ts < %(hi)s"
)
_SERIES_RAW = f"SELECT r.ts, r.value, r.quality {_BLOCK_READINGS} ORDER BY r.ts, b.seq, i.pos"
#: how many of the gateway's blocks end in [%(lo)s, %(hi)s), up to %(budget)s + 1: an
#: index-only count that says whether reading them is affordable
_BLOCK_COUNT = (
    "SELECT count(*) FROM (SELECT 1 FROM reading_blocks WHERE gateway = %(gateway)s "
    "AND t_max >= %(lo)s AND t_max < %(hi)s LIMIT %(budget)s + 1) c"
)
#: a series reads at most this many blocks (about 4 µs each): beyond, the rollup's
#: slots serve it, coarser (a week of a 1 Hz point flushed every 10 s: 10-minute buckets)
RAW_BLOCK_BUDGET: Final = 20_000
#: buckets below ROLLUP_MS, from the blocks
_SERIES_BLOCKS = (
    f"SELECT {floor_sql('r.ts', '%(bucket)s', '%%')} AS t, {aggregates('r.value', 'r.quality')} "
    f"{_BLOCK_READINGS} GROUP BY t ORDER BY t"
)
#: buckets of whole slots: the rolled-up slots and the pending blocks' readings
_SERIES_ROLLUP = (
    f"WITH pending AS ({_PENDING}), parts AS ("
    "SELECT slot, n, n_bad, vmin, vmax, vsum "
    + _POINT_ROLLUP.format(lo="%(m_lo)s", hi="%(m_hi)s")
    + f" UNION ALL SELECT {floor_sql('r.ts', str(ROLLUP_MS), '%%')} / {ROLLUP_MS}, "
    f"{aggregates('r.value', 'r.quality')} FROM pending b {_UNNEST} "
    "WHERE r.point_id = %(point)s AND r.ts >= %(lo)s AND r.ts < %(hi)s GROUP BY 1) "
    f"SELECT {floor_sql(f'slot * {ROLLUP_MS}', '%(bucket)s', '%%')} AS t, sum(n), sum(n_bad), "
    "min(vmin), max(vmax), sum(vsum) FROM parts GROUP BY t ORDER BY t"
)


def _day(ts_ms: int) -> int:
    return ts_ms // DAY_MS


def partition_name(day: int) -> str:
    return "reading_blocks_" + dt.datetime.fromtimestamp(day * 86400, dt.UTC).strftime("%Y%m%d")


def _partition_day(name: str) -> int:
    """The day of a `partition_name`."""
    when = dt.datetime.strptime(name.removeprefix("reading_blocks_"), "%Y%m%d")
    return int(when.replace(tzinfo=dt.UTC).timestamp()) // 86400


#: libpq settings the URL may override: a server that went away (host down, cable cut)
#: must fail the store call within seconds, so that the worker retries instead of hanging
CONNECTION_DEFAULTS: Final = {
    "application_name": "citygw",
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
}


def split_url(url: str) -> tuple[str, str]:
    """-> (libpq conninfo URL without ``schema``, with `CONNECTION_DEFAULTS` for what
    the URL does not set; schema name)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = "public"
    rest = []
    for k, v in query:
        if k == "schema":
            schema = v
        else:
            rest.append((k, v))
    given = {k for k, _ in rest}
    rest += [(k, v) for k, v in CONNECTION_DEFAULTS.items() if k not in given]
    if not _IDENT.fullmatch(schema):
        raise ValueError(f"invalid schema name {schema!r} in store URL")
    scheme = "postgresql" if parts.scheme == "postgres" else parts.scheme
    return urlunsplit((scheme, parts.netloc, parts.path, urlencode(rest), "")), schema


class PostgresStore:
    def __init__(self, url: str, create: bool = True) -> None:
        self._conninfo, self.schema = split_url(url)
        self._create = create
        self._lock = threading.Lock()
        self._days: set[int] = set()  # day partitions known to exist (or not wanted)
        self._partitioned = False
        self._readings_notified_ms = 0  # "readings" is notified at most once a second
        self._db = self._connect()

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        db = psycopg.connect(self._conninfo, autocommit=True)
        if not self._create:
            try:
                self._check_current(db)
            except BaseException:
                db.close()
                raise
            return db
        try:
            with db.transaction(), db.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                cur.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema))
                )
                cur.execute(
                    sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(self.schema))
                )
                self._migrate(db, cur)
            db.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
            try:  # lz4 packs the arrays faster than the default pglz; not every build has it
                with db.transaction():
                    db.execute("SET default_toast_compression = lz4")
            except psycopg.Error:
                log.info("ingest: PostgreSQL without lz4, arrays use pglz compression")
        except BaseException:
            db.close()
            raise
        return db

    def _check_current(self, db: psycopg.Connection[tuple[Any, ...]]) -> None:
        """For readers: the schema must hold a store at this version; nothing changed."""
        with db.cursor() as cur:
            if self._relkind(cur, "uplinks") is None:
                raise StoreMissing(f"no citygw platform store in schema {self.schema!r}")
            version = None
            if self._relkind(cur, "schema_info") is not None:
                cur.execute(
                    sql.SQL("SELECT max(version) FROM {}.schema_info").format(
                        sql.Identifier(self.schema)
                    )
                )
                row = cur.fetchone()
                version = row[0] if row else None
            if version != SCHEMA_VERSION:
                raise StoreMissing(
                    f"the store in schema {self.schema!r} is at version {version or 1}, this "
                    f"citygw reads version {SCHEMA_VERSION} (`citygw ingest` upgrades it)"
                )
        db.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))

    def _relkind(self, cur: psycopg.Cursor[tuple[Any, ...]], name: str) -> str | None:
        cur.execute(
            "SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s",
            (self.schema, name),
        )
        row = cur.fetchone()
        return str(row[0]) if row else None

    def _migrate(
        self, db: psycopg.Connection[tuple[Any, ...]], cur: psycopg.Cursor[tuple[Any, ...]]
    ) -> None:
        """Create or upgrade the schema (inside the caller's locked transaction).
        Version 1 kept a row per reading in a ``readings`` table; version 2 keeps blocks;
        version 3 adds ``device_info`` (made by TABLES, like every added table or column);
        version 4 the console's tables (EXTRA_TABLES): the blocks stored before the
        rollup existed are queued for it; version 5 the config history (its tables and
        the gateways' config columns; a gateway's history starts with its next up/meta);
        version 6 ``rule_actions`` (EXTRA_TABLES; empty until gateways send actions)."""
        new_rollup = self._relkind(cur, "point_rollup") is None
        for stmt in (TABLES + ";" + ";".join(EXTRA_TABLES)).split(";"):
            if stmt.strip():
                cur.execute(stmt.encode())
        cur.execute("SELECT max(version) FROM schema_info")
        row = cur.fetchone()
        version = int(row[0]) if row and row[0] is not None else None
        if version is not None and version > SCHEMA_VERSION:
            raise RuntimeError(
                f"schema {self.schema!r} is at version {version}, newer than this citygw "
                f"understands ({SCHEMA_VERSION}): upgrade citygw"
            )
        if self._relkind(cur, "reading_blocks") is None:
            self._create_blocks(db, cur)
        self._partitioned = self._relkind(cur, "reading_blocks") == "p"
        if self._relkind(cur, "readings") == "r":  # version 1: convert rows to blocks
            cur.execute("SELECT DISTINCT ts / %s FROM readings", (DAY_MS,))
            self._create_partitions(db, cur, {int(d) for (d,) in cur.fetchall()})
            cur.execute(
                "INSERT INTO reading_blocks (gateway, seq, t_min, t_max, received_ms, "
                "point_ids, timestamps, vals, qualities) "
                "SELECT gateway, COALESCE(seq, 0), min(ts), max(ts), "
                "(extract(epoch FROM now()) * 1000)::bigint, array_agg(point_id ORDER BY id), "
                "array_agg(ts ORDER BY id), array_agg(value ORDER BY id), "
                "array_agg(quality ORDER BY id) FROM readings GROUP BY gateway, seq"
            )
            cur.execute("DROP TABLE readings")
        if self._relkind(cur, "counters") == "r":  # version 1: one row per counter
            cur.execute(
                "INSERT INTO ingest_counters (shard, readings, batches, duplicates_dropped) "
                "SELECT -1, COALESCE(sum(value) FILTER (WHERE name = 'readings'), 0), "
                "COALESCE(sum(value) FILTER (WHERE name = 'batches'), 0), "
                "COALESCE(sum(value) FILTER (WHERE name = 'duplicates_dropped'), 0) "
                "FROM counters ON CONFLICT (shard) DO NOTHING"
            )
            cur.execute("DROP TABLE counters")
        cur.execute(READINGS_VIEW.encode())
        if new_rollup:
            cur.execute(
                f"INSERT INTO rollup_queue ({_QUEUE_COLUMNS}) "
                f"SELECT {_QUEUE_COLUMNS} FROM reading_blocks ON CONFLICT DO NOTHING"
            )
        cur.execute("DELETE FROM schema_info")
        cur.execute("INSERT INTO schema_info (version) VALUES (%s)", (SCHEMA_VERSION,))

    def _create_blocks(
        self, db: psycopg.Connection[tuple[Any, ...]], cur: psycopg.Cursor[tuple[Any, ...]]
    ) -> None:
        cur.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'")
        if cur.fetchone() is not None:
            try:  # a savepoint: the extension may be installed but not preloaded
                with db.transaction():
                    cur.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
                    cur.execute(
                        f"CREATE TABLE reading_blocks ({BLOCKS_COLUMNS}) "
                        f"WITH ({BLOCK_STORAGE})".encode()
                    )
                    cur.execute(
                        "SELECT create_hypertable('reading_blocks', 't_min', "
                        "chunk_time_interval => %s::bigint)",
                        (DAY_MS,),
                    )
                log.info("ingest: reading_blocks is a TimescaleDB hypertable")
            except psycopg.Error as e:
                log.warning(
                    "ingest: TimescaleDB is available but could not be used; "
                    "using declarative partitions",
                    extra={"error": str(e)},
                )
        if self._relkind(cur, "reading_blocks") is None:
            cur.execute(
                f"CREATE TABLE reading_blocks ({BLOCKS_COLUMNS}) "
                "PARTITION BY RANGE (t_min)".encode()
            )
            cur.execute(
                "CREATE TABLE reading_blocks_default PARTITION OF reading_blocks DEFAULT "
                f"WITH ({BLOCK_STORAGE})".encode()
            )
        cur.execute(
            "CREATE INDEX IF NOT EXISTS reading_blocks_gateway_t_max "
            "ON reading_blocks (gateway, t_max)"
        )
        cur.execute(
            "CREATE TABLE IF NOT EXISTS ingest_counters (shard integer PRIMARY KEY, "
            "readings bigint NOT NULL, batches bigint NOT NULL, "
            "duplicates_dropped bigint NOT NULL)"
        )

    def _create_partitions(
        self,
        db: psycopg.Connection[tuple[Any, ...]],
        cur: psycopg.Cursor[tuple[Any, ...]],
        days: set[int],
    ) -> None:
        """Day partitions for the days near now; a day whose readings already sit in the
        default partition stays there (PostgreSQL refuses to split it out)."""
        if not self._partitioned:
            return
        today = _day(time.time_ns() // 1_000_000)
        for day in sorted(days - self._days):
            self._days.add(day)
            if not today - PARTITION_PAST_DAYS <= day <= today + PARTITION_FUTURE_DAYS:
                continue
            name = partition_name(day)
            try:
                with db.transaction():
                    cur.execute(
                        sql.SQL(
                            "CREATE TABLE IF NOT EXISTS {} PARTITION OF reading_blocks "
                            "FOR VALUES FROM ({}) TO ({}) WITH (" + BLOCK_STORAGE + ")"
                        ).format(
                            sql.Identifier(name),
                            sql.Literal(day * DAY_MS),
                            sql.Literal((day + 1) * DAY_MS),
                        )
                    )
            except psycopg.errors.CheckViolation:
                log.warning(
                    "ingest: readings of this day are in the default partition already; "
                    "it keeps them",
                    extra={"partition": name},
                )

    def _ensure_partitions(self, days: set[int]) -> None:
        if not self._partitioned or days <= self._days:
            return
        db = self._conn()
        known = set(self._days)
        try:
            with db.transaction(), db.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                self._create_partitions(db, cur, days)
        except BaseException:  # rolled back: those days have no partition yet
            self._days = known
            raise

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
        keys = [(g, env.stream, seq_to_db(env.seq)) for g, env, _ in items]
        order = sorted(range(len(items)), key=keys.__getitem__)  # lock order: no deadlocks
        days = {_day(min(b.timestamps)) for _, _, b in items if isinstance(b, Batch) and len(b)}
        with self._lock:
            self._ensure_partitions(days)
            with self._conn().transaction(), self._db.cursor() as cur:
                cur.execute(
                    "INSERT INTO uplinks (gateway, stream, seq, lane, n_points, received_ms) "
                    "SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[], "
                    "%s::smallint[], %s::integer[], %s::bigint[]) "
                    "ON CONFLICT DO NOTHING RETURNING gateway, stream, seq",
                    (
                        [keys[i][0] for i in order],
                        [keys[i][1] for i in order],
                        [keys[i][2] for i in order],
                        [items[i][1].lane for i in order],
                        [items[i][1].n_points for i in order],
                        [now] * len(items),
                    ),
                )
                new = {(str(g), str(s), int(q)) for g, s, q in cur.fetchall()}
                results: list[bool] = []
                fresh: list[tuple[str, Envelope, Body]] = []
                for key, item in zip(keys, items, strict=True):
                    results.append(key in new)
                    if key in new:
                        new.discard(key)  # the same uplink twice in one group: once
                        fresh.append(item)
                fresh_batches, fresh_alarms, fresh_actions = split_bodies(fresh)
                readings = sum(len(b) for _, _, b in fresh_batches)
                changes = []
                if fresh_alarms or fresh_actions:
                    changes.append("alarms")
                if fresh_alarms and self._store_alarms(cur, fresh_alarms, now):
                    changes.append("events")
                if fresh_actions:
                    cur.executemany(
                        rule_action_insert("%s", "::jsonb").encode(),
                        [rule_action_row(a, now) for a in fresh_actions],
                    )
                notify_readings = readings > 0 and now - self._readings_notified_ms >= 1000
                if notify_readings:
                    changes.append("readings")
                if readings:
                    data = pg_copy.copy_data(
                        pg_copy.block_row(g, seq, b, now) for g, seq, b in fresh_batches if len(b)
                    )
                    with cur.copy(
                        f"COPY reading_blocks ({', '.join(pg_copy.COLUMNS)}) "
                        "FROM STDIN (FORMAT BINARY)"
                    ) as copy:
                        copy.write(data)
                    self._queue_roll_up(cur, fresh_batches, now)
                cur.execute(
                    "INSERT INTO ingest_counters AS c "
                    "(shard, readings, batches, duplicates_dropped) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT (shard) DO UPDATE SET "
                    "readings = c.readings + excluded.readings, "
                    "batches = c.batches + excluded.batches, "
                    "duplicates_dropped = c.duplicates_dropped + excluded.duplicates_dropped",
                    (self._shard(), readings, len(fresh), len(items) - len(fresh)),
                )
                if changes:
                    cur.execute(
                        "SELECT pg_notify(%s, k) FROM unnest(%s::text[]) AS k",
                        (CHANGES_CHANNEL, changes),
                    )
            if notify_readings:
                self._readings_notified_ms = now
            if fresh:
                # after the commit and in key order: the gateway rows are hot when several
                # workers store at once, so their locks are held for one statement only.
                # The uplinks are committed: a failure here must not make the caller store
                # them again (they would come back as duplicates), it only misses a
                # last_seen that the next uplink sets.
                try:
                    self._db.execute(
                        "INSERT INTO gateways AS g (gateway, updated_ms, last_seen_ms) "
                        "SELECT n, %s, %s FROM unnest(%s::text[]) AS n ORDER BY n "
                        "ON CONFLICT (gateway) DO UPDATE SET last_seen_ms = "
                        "GREATEST(g.last_seen_ms, excluded.last_seen_ms)",
                        (now, now, sorted({g for g, _, _ in fresh})),
                    )
                except psycopg.Error as e:
                    log.warning(
                        "ingest: gateways' last_seen not updated (the uplinks are stored)",
                        extra={"error": str(e)[:300]},
                    )
        return results

    @staticmethod
    def _queue_roll_up(
        cur: psycopg.Cursor[tuple[Any, ...]], batches: Sequence[tuple[str, int, Batch]], now: int
    ) -> None:
        """The fresh blocks, for `roll_up` (in key order; a block stored twice in one
        group under the same identity is one entry, which folds both in once)."""
        queued = sorted((g, *pg_copy.time_range(b), seq) for g, seq, b in batches if len(b))
        cur.execute(
            "INSERT INTO rollup_queue (gateway, t_min, t_max, seq, received_ms) "
            "SELECT *, %s FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::bigint[]) "
            "ON CONFLICT DO NOTHING",
            (now, *(list(column) for column in zip(*queued, strict=True))),
        )

    def _shard(self) -> int:
        """This connection's counters row: workers add to their own rows, so that their
        transactions do not queue on one hot row; `counts` sums them."""
        return self._db.info.backend_pid % 64

    def _store_alarms(
        self,
        cur: psycopg.Cursor[tuple[Any, ...]],
        alarms: Sequence[tuple[str, AlarmEvent]],
        now: int,
    ) -> bool:
        """The alarm events and their events' side (central/events.py); True if an event
        changed."""
        for gateway, e in alarms:  # in order: a clear finds the raise sent before it
            cur.execute(
                f"INSERT INTO alarms ({ALARM_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                alarm_row(gateway, e, now),
            )
            if not e.raised:
                cur.execute(alarm_clear("%s"), alarm_clear_args(gateway, e))
        # events in key order (a stable sort: a key's raises and clears stay in order), so
        # that two workers lock their rows in the same order and never deadlock
        changed = False
        for gateway, e in sorted(alarms, key=lambda a: (a[0], a[1].point_id, a[1].rule)):
            changed |= events.record_alarm(cur, "%s", gateway, e, now)
        return changed

    def store_meta(self, gateway: str, meta: Meta) -> None:
        now = time.time_ns() // 1_000_000
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(gateway_meta_upsert("%s", "::jsonb"), gateway_meta_args(gateway, meta, now))
            if meta.points:
                cur.executemany(points_upsert("%s"), point_rows(gateway, meta, now))
            if meta.config is not None:
                cur.execute(configs.seen_upsert("%s"), configs.seen_args(gateway, meta.config, now))
            cur.execute(_GATEWAYS_CHANGED)

    def store_stats(self, stats: GatewayStats) -> None:
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(stats_upsert("%s"), stats_row(stats))
            if cur.rowcount == 1:  # the newest report
                if stats.devices is not None:
                    store_device_info(cur, "%s", stats)
                if stats.health is not None:
                    store_device_health(cur, "%s", stats)
                cur.execute(_GATEWAYS_CHANGED)

    def store_state(self, gateway: str, online: bool, now_ms: int) -> None:
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(state_upsert("%s"), state_args(gateway, online, now_ms))
            if cur.rowcount == 1:  # the state changed
                cur.execute(_GATEWAYS_CHANGED)

    def store_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.executemany(dead_letter_insert("%s"), [dead_letter_row(d) for d in letters])

    def prune(self, before_ms: int) -> dict[str, int]:
        """Readings go by whole day partitions that end at or before the cut (dropped:
        cheap, no dead tuples, nothing read; a block belongs to the day of its first
        reading), and by the blocks of the default partition that end before it; a
        hypertable's chunks go with drop_chunks. Counted as partitions and blocks."""
        dropped = {"partitions": 0, "reading_blocks": 0}
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            blocks = "reading_blocks"
            if self._relkind(cur, "reading_blocks") == "p":
                blocks = "reading_blocks_default"
                cur.execute(
                    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                    "WHERE i.inhparent = 'reading_blocks'::regclass AND c.relname <> %s",
                    (blocks,),
                )
                for (name,) in cur.fetchall():
                    day = _partition_day(str(name))
                    if (day + 1) * DAY_MS <= before_ms:
                        cur.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
                        self._days.discard(day)
                        dropped["partitions"] += 1
            else:
                cur.execute(
                    "SELECT count(*) FROM drop_chunks('reading_blocks', older_than => %s::bigint)",
                    (before_ms,),
                )
                row = cur.fetchone()
                dropped["partitions"] = int(row[0]) if row else 0
            cur.execute(
                sql.SQL("DELETE FROM {} WHERE t_max < %s").format(sql.Identifier(blocks)),
                (before_ms,),
            )
            dropped["reading_blocks"] = cur.rowcount
            for table, condition in PRUNE_DELETES:
                cur.execute(
                    f"DELETE FROM {table} WHERE {condition.format(ph='%s')}".encode(), (before_ms,)
                )
                dropped[table] = cur.rowcount
            # the slots wholly before the cut; queue entries of blocks dropped above
            cur.execute("DELETE FROM point_rollup WHERE slot < %s", (before_ms // ROLLUP_MS,))
            dropped["point_rollup"] = cur.rowcount
            cur.execute("DELETE FROM point_latest WHERE ts < %s", (before_ms,))
            dropped["point_latest"] = cur.rowcount
            cur.execute(
                "DELETE FROM rollup_queue q WHERE NOT EXISTS "
                f"(SELECT 1 FROM reading_blocks b WHERE {_QUEUED_BLOCK})".encode()
            )
            dropped["rollup_queue"] = cur.rowcount
        return dropped

    def roll_up(self, limit: int) -> int:
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(_TAKE.encode(), {"limit": limit})
            taken = cur.fetchall()
            if taken:
                cur.execute("SET LOCAL work_mem = '64MB'")  # the fold's sort, in memory
                cur.execute(_FOLD.encode(), _queued(taken))
        return len(taken)

    # -- reads ----------------------------------------------------------------------------

    def counts(self) -> StoreCounts:
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(
                "SELECT COALESCE(sum(readings), 0), COALESCE(sum(batches), 0), "
                "COALESCE(sum(duplicates_dropped), 0), (SELECT count(*) FROM gateways) "
                "FROM ingest_counters"
            )
            row = cur.fetchone()
        assert row is not None
        return StoreCounts(*(int(v) for v in row))

    def alarms(self, gateway: str) -> list[AlarmEvent]:
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(
                "SELECT point_id, rule, severity, raised, ts, value, since_ms FROM alarms "
                "WHERE gateway = %s ORDER BY id",
                (gateway,),
            )
            rows = cur.fetchall()
        return [alarm_from_row(r) for r in rows]

    def rule_actions(
        self, gateway: str | None = None, rule: str | None = None, limit: int = 1000
    ) -> list[tuple[str, RuleAction]]:
        sql_, args = rule_actions_query("%s", gateway, rule, limit)
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(sql_.encode(), args)
            rows = cur.fetchall()
        return [rule_action_from_row(r) for r in reversed(rows)]

    def point_keys(self, gateway: str | None = None) -> list[str]:
        text = "SELECT DISTINCT key FROM points"
        args: tuple[str, ...] = ()
        if gateway is not None:
            text, args = text + " WHERE gateway = %s", (gateway,)
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute((text + " ORDER BY key").encode(), args)
            rows = cur.fetchall()
        return [str(k) for (k,) in rows]

    def alarm_episodes(
        self, gateway: str | None = None, active: bool = False, since_ms: int | None = None
    ) -> list[AlarmEpisode]:
        sql_, args = alarm_episodes_query("%s", gateway, active, "a.id", since_ms)
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(sql_.encode(), args)
            rows = cur.fetchall()
        return [episode_from_row(r) for r in rows]

    def stats(self, gateway: str) -> GatewayStats | None:
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(f"SELECT {STATS_COLUMNS} FROM gateway_stats WHERE gateway = %s", (gateway,))
            row = cur.fetchone()
        return stats_from_row(row) if row else None

    def gateways(self) -> list[GatewayInfo]:
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(GATEWAYS_QUERY.encode())
            rows = cur.fetchall()
        return [gateway_from_row(r) for r in rows]

    def device_info(self, gateway: str | None = None) -> list[DeviceInfoEntry]:
        text, args = device_info_query("%s", gateway)
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(text.encode(), args)
            rows = cur.fetchall()
        return [device_info_from_row(r) for r in rows]

    def fleet(self, gateway: str | None = None) -> list[FleetRow]:
        text, args = fleet_query("%s", gateway)
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(text.encode(), args)
            rows = cur.fetchall()
        return [fleet_from_row(r) for r in rows]

    def gateway_devices(self, gateway: str) -> list[DeviceRow]:
        points, health, locations = gateway_devices_queries("%s")
        info, info_args = device_info_query("%s", gateway)
        # one transaction: the four reads see the same report
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(points.encode(), (gateway,))
            point_rows_ = cur.fetchall()
            cur.execute(health.encode(), (gateway,))
            health_rows = cur.fetchall()
            cur.execute(locations.encode(), (gateway,))
            where = cur.fetchone()
            cur.execute(info.encode(), info_args)
            infos = [device_info_from_row(r) for r in cur.fetchall()]
        return device_rows(point_rows_, health_rows, infos, where[0] if where else None)

    def latest_values(
        self, since_ms: int, gateways: str = "*", points: str = "*", site: str | None = None
    ) -> list[LatestValue]:
        # from point_latest, which roll_up keeps (a second behind the ingest at most):
        # the blocks of a window of the whole fleet would be a million readings to unnest
        text = (
            f"WITH p AS ({selected_points('%s', gateways, points, site)}) "
            "SELECT p.gateway, p.key, l.ts, l.value FROM p JOIN point_latest l "
            "ON l.gateway = p.gateway AND l.point_id = p.point_id WHERE l.ts >= %s"
        )
        args = [*latest_args(gateways, points, site), since_ms]
        with self._lock, self._conn().transaction(), self._db.cursor(binary=True) as cur:
            cur.execute(text.encode(), args)
            rows = cur.fetchall()
        found = [LatestValue(str(g), str(k), int(t), float(v)) for g, k, t, v in rows]
        return sorted(found, key=lambda x: (x.gateway, x.key))

    def uplink_points(self, since_ms: int) -> int:
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(UPLINK_POINTS_QUERY.format(ph="%s").encode(), (since_ms,))
            row = cur.fetchone()
        return int(row[0]) if row else 0

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(dead_letters_query("%s", order="id"), (limit,))
            rows = cur.fetchall()
        return [dead_letter_from_row(r) for r in rows]

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
        where = "b.gateway = %s"
        args: tuple[Any, ...] = (gateway,)
        if point_key is not None:
            where += (
                " AND r.point_id IN (SELECT point_id FROM points WHERE gateway = %s AND key = %s)"
            )
            args = (gateway, gateway, point_key)
        with self._lock, self._conn().transaction(), self._db.cursor(binary=True) as cur:
            cur.execute(
                "SELECT r.point_id, r.ts, r.value, r.quality FROM reading_blocks b "
                f"{_UNNEST} WHERE {where} ORDER BY b.seq, r.pos".encode(),
                args,
            )
            rows = cur.fetchall()
        return [(int(p), int(t), float(v), int(q)) for p, t, v, q in rows]

    def query(
        self,
        point_key: str,
        since_ms: int,
        until_ms: int | None = None,
        gateway: str | None = None,
        limit: int | None = None,
    ) -> list[PointReading]:
        # blocks first by the (gateway, t_max) index, then the point's readings in them
        until = until_ms if until_ms is not None else 2**63 - 1
        points = "SELECT gateway, point_id, key FROM points WHERE key = %s"
        args: list[Any] = [point_key]
        if gateway is not None:
            points += " AND gateway = %s"
            args.append(gateway)
        args += [since_ms, until, since_ms, until]
        text = (
            f"WITH p AS ({points}) SELECT b.gateway, p.key, r.ts, r.value, r.quality "
            "FROM p JOIN reading_blocks b ON b.gateway = p.gateway "
            f"AND b.t_max >= %s AND b.t_min < %s {_UNNEST} "
            "WHERE r.point_id = p.point_id AND r.ts >= %s AND r.ts < %s "
            "ORDER BY b.gateway, r.ts, b.seq, r.pos"
        )
        if limit is not None:
            text += " LIMIT %s"
            args.append(limit)
        with self._lock, self._conn().transaction(), self._db.cursor(binary=True) as cur:
            cur.execute(text.encode(), args)
            rows = cur.fetchall()
        return [PointReading(str(g), str(k), int(t), float(v), int(q)) for g, k, t, v, q in rows]

    # -- events ---------------------------------------------------------------------------

    def events(
        self,
        state: str | None = None,
        gateway: str | None = None,
        limit: int = 200,
        before_id: int | None = None,
    ) -> list[Event]:
        text, args = events.events_query("%s", state, gateway, limit, before_id)
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(text.encode(), args)
            rows = cur.fetchall()
        return [events.event_from_row(r) for r in rows]

    def event(self, event_id: int) -> Event | None:
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            return events.select_event(cur, "%s", event_id)

    def event_actions(self, event_id: int) -> list[EventAction]:
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(events.actions_query("%s").encode(), (event_id,))
            rows = cur.fetchall()
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
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            event = events.act(cur, "%s", event_id, action, user, now_ms, assignee, note)
            if event is not None:
                cur.execute(_EVENTS_CHANGED)
        if event is None:
            raise StoreMissing(f"no event {event_id}")
        return event

    def event_summary(self, since_ms: int) -> EventSummary:
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(events.OPEN_COUNTS_QUERY.encode())
            open_rows = cur.fetchall()
            cur.execute(events.durations_query("%s").encode(), (since_ms,))
            durations = cur.fetchall()
        return events.summary_from_rows(since_ms, open_rows, durations)

    def change_marks(self) -> dict[str, int]:
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(_CHANGE_MARKS)
            row = cur.fetchone()
        assert row is not None
        return dict(zip(CHANGE_KINDS, (int(v) for v in row), strict=True))

    # -- console sessions ---------------------------------------------------------------

    def config_push_record(self, push: ConfigPushRecord) -> int:
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(configs.push_insert("%s").encode(), configs.push_args(push))
            row = cur.fetchone()
        assert row is not None
        return int(row[0])

    def config_push_answered(
        self, push_id: int, outcome: str, error: str | None, now_ms: int
    ) -> None:
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(configs.push_answered("%s").encode(), (outcome, error, now_ms, push_id))

    def configs_seen(self, gateway: str | None = None) -> list[ConfigSeen]:
        text, args = configs.seen_query("%s", gateway)
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(text.encode(), args)
            rows = cur.fetchall()
        return [configs.seen_from_row(r) for r in rows]

    def config_pushes(self, gateway: str | None = None, limit: int = 100) -> list[ConfigPushRecord]:
        text, args = configs.pushes_query("%s", gateway, limit)
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(text.encode(), args)
            rows = cur.fetchall()
        return [configs.push_from_row(r) for r in rows]

    def session_open(self, id_hash: str, session: Session, now_ms: int) -> None:
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(
                sessions.session_insert("%s"),
                (id_hash, session.user, session.role, session.csrf, now_ms, session.expires_ms),
            )
            cur.execute(sessions.sessions_expired("%s"), (now_ms,))

    def session_get(self, id_hash: str, now_ms: int) -> Session | None:
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(sessions.session_select("%s"), (id_hash, now_ms))
            row = cur.fetchone()
        return Session(str(row[0]), str(row[1]), str(row[2]), int(row[3])) if row else None

    def session_close(self, id_hash: str) -> None:
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(sessions.session_delete("%s"), (id_hash,))

    # -- series ----------------------------------------------------------------------------

    def series(
        self, gateway: str, point_id: int, since_ms: int, until_ms: int, max_points: int
    ) -> Series:
        """Raw if the point has at most `max_points` readings in the range (decided from
        the rollup's counts where they tell: the slots that overlap the range and those
        wholly in it bound it, else by reading them) and reading them costs at most
        RAW_BLOCK_BUDGET blocks. Buckets of ROLLUP_MS or more from the rollup and the
        blocks it has not folded in yet; shorter ones from the blocks, within the same
        budget, else ROLLUP_MS. One snapshot (repeatable read): a roll-up committing
        meanwhile is seen entirely or not at all."""
        if until_ms <= since_ms:
            return Series(0)
        args: dict[str, Any] = {
            "gateway": gateway,
            "point": point_id,
            "lo": since_ms,
            "hi": until_ms,
            "m_lo": since_ms // ROLLUP_MS,
            "m_hi": (until_ms - 1) // ROLLUP_MS + 1,
            "m_in_lo": -(-since_ms // ROLLUP_MS),
            "m_in_hi": until_ms // ROLLUP_MS,
            "cap": max_points + 1,
            "budget": RAW_BLOCK_BUDGET,
        }

        def affordable(cur: psycopg.Cursor[tuple[Any, ...]]) -> bool:
            cur.execute(_BLOCK_COUNT.encode(), args)
            row = cur.fetchone()
            return row is not None and int(row[0]) <= RAW_BLOCK_BUDGET

        with self._lock, self._conn().transaction(), self._db.cursor(binary=True) as cur:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            cur.execute(_PENDING_KEYS.encode(), args)
            args.update(_queued(cur.fetchall()))
            cur.execute(_SERIES_COUNTS.encode(), args)
            row = cur.fetchone()
            assert row is not None
            overlapping, inside, pending = (int(v) for v in row)
            if inside + pending <= max_points and affordable(cur):  # may be raw: read them
                limit = "" if overlapping + pending <= max_points else f" LIMIT {max_points + 1}"
                cur.execute((_SERIES_RAW + limit).encode(), args)
                rows = cur.fetchall()
                if len(rows) <= max_points:
                    return raw_series(rows)
            bucket = choose_bucket(since_ms, until_ms, max_points)
            lo, hi = bucket_span(since_ms, until_ms, bucket)
            args.update(lo=lo, hi=hi)
            if bucket < ROLLUP_MS and not affordable(cur):
                bucket = ROLLUP_MS
                lo, hi = bucket_span(since_ms, until_ms, bucket)
                args.update(lo=lo, hi=hi)
            args.update(bucket=bucket, m_lo=lo // ROLLUP_MS, m_hi=hi // ROLLUP_MS)
            if bucket < ROLLUP_MS:
                cur.execute(_SERIES_BLOCKS.encode(), args)
            else:
                cur.execute(_PENDING_KEYS.encode(), args)
                args.update(_queued(cur.fetchall()))
                cur.execute(_SERIES_ROLLUP.encode(), args)
            rows = cur.fetchall()
        return bucketed_series(bucket, rows)

    def point_alarms(
        self, gateway: str, point_id: int, since_ms: int, until_ms: int
    ) -> list[AlarmEpisode]:
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(point_alarms_query("%s").encode(), (gateway, point_id, until_ms, since_ms))
            rows = cur.fetchall()
        return [episode_from_row(r) for r in rows]

    def find_points(
        self, text: str, gateway: str | None = None, limit: int = 50
    ) -> list[PointInfo]:
        query, args = find_points_query("%s", "strpos", text, gateway, limit)
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(query.encode(), args)
            rows = cur.fetchall()
        return [point_from_row(r) for r in rows]

    def point(self, gateway: str, key: str) -> PointInfo | None:
        with self._lock, self._conn().transaction(), self._db.cursor() as cur:
            cur.execute(point_query("%s").encode(), (gateway, key))
            row = cur.fetchone()
        return None if row is None else point_from_row(row)

    def close(self) -> None:
        with self._lock:
            self._db.close()
