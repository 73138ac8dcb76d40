"""The store protocol the ingest worker writes to, and `open_store(url)`.

Exactly-once: every store keeps an ``uplinks`` table with a unique key on
(gateway, stream, seq) and inserts into it in the SAME transaction as the batch's
readings, so a redelivered or doubly-published uplink is stored once and counted
as a dropped duplicate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, runtime_checkable

from agent.wire import STATS_FIELDS, Envelope, GatewayStats, Meta
from native.batch import Batch
from native.stages import AlarmEvent

SEQ_SIGN_FLIP = 2**63


def seq_to_db(seq: int) -> int:
    """uint64 seq -> int64 column value (two's complement), order kept within a stream
    for seq < 2**63, which is every seq a real gateway will reach."""
    return seq - 2**64 if seq >= SEQ_SIGN_FLIP else seq


def seq_from_db(value: int) -> int:
    return value + 2**64 if value < 0 else value


@dataclass(frozen=True, slots=True)
class StoreCounts:
    readings: int  # readings stored
    batches: int  # uplinks stored (not counting duplicates)
    duplicates_dropped: int  # uplinks dropped because (gateway, stream, seq) was stored
    gateways: int  # gateways seen (batch or meta)


@runtime_checkable
class Store(Protocol):
    def store_batch(self, gateway: str, env: Envelope, body: Body) -> bool:
        """Store one uplink's readings or alarms; False (and nothing stored) if
        (gateway, env.stream, env.seq) was already stored."""
        ...

    def store_batches(self, items: Sequence[tuple[str, Envelope, Body]]) -> list[bool]:
        """`store_batch` for several uplinks in one transaction, results in order."""
        ...

    def store_meta(self, gateway: str, meta: Meta) -> None:
        """Upsert the gateway's point registry (gateway, point_id) -> key, device, ..."""
        ...

    def counts(self) -> StoreCounts: ...

    def duplicate_readings(self) -> int:
        """Readings present more than once per (gateway, point_id, ts): extra copies."""
        ...

    def readings(
        self, gateway: str, point_key: str | None = None
    ) -> list[tuple[int, int, float, int]]:
        """(point_id, ts, value, quality) in sending order (uplink seq, then position)."""
        ...

    def alarms(self, gateway: str) -> list[AlarmEvent]:
        """The gateway's alarm events in the order received, for tests and tools."""
        ...

    def store_stats(self, stats: GatewayStats) -> None:
        """Keep the gateway's latest reported buffer counters (an older report is ignored)."""
        ...

    def stats(self, gateway: str) -> GatewayStats | None:
        """The latest counters the gateway reported, if any."""
        ...

    def close(self) -> None: ...


def points_upsert(placeholder: str) -> str:
    """The upsert of a gateway's point registry; `placeholder` is the driver's ("?", "%s")."""
    values = ", ".join([placeholder] * 9)
    return (
        "INSERT INTO points "
        "(gateway, point_id, key, device, name, unit, driver, type, updated_ms) "
        f"VALUES ({values}) "
        "ON CONFLICT (gateway, point_id) DO UPDATE SET key = excluded.key, "
        "device = excluded.device, name = excluded.name, unit = excluded.unit, "
        "driver = excluded.driver, type = excluded.type, "
        "updated_ms = excluded.updated_ms"
    )


def point_rows(gateway: str, meta: Meta, now_ms: int) -> list[tuple[Any, ...]]:
    return [
        (gateway, p.id, p.key, p.device, p.name, p.unit, p.driver, p.type, now_ms)
        for p in meta.points
    ]


#: what an uplink carries: readings (batch lanes) or alarm events (alarm lane)
Body: TypeAlias = Batch | Sequence[AlarmEvent]


def check_batch(env: Envelope, body: Body) -> None:
    if env.n_points != len(body):
        raise ValueError(f"envelope says {env.n_points} points but the body has {len(body)}")


def split_bodies(
    items: Sequence[tuple[str, Envelope, Body]],
) -> tuple[list[tuple[str, int, Batch]], list[tuple[str, AlarmEvent]]]:
    """The readings (gateway, seq as stored, batch) and the alarm events of the given
    (fresh) uplinks."""
    batches: list[tuple[str, int, Batch]] = []
    alarms: list[tuple[str, AlarmEvent]] = []
    for gateway, env, body in items:
        if isinstance(body, Batch):
            batches.append((gateway, seq_to_db(env.seq), body))
        else:
            alarms.extend((gateway, e) for e in body)
    return batches, alarms


def alarm_row(gateway: str, e: AlarmEvent, now_ms: int) -> tuple[Any, ...]:
    value = e.value if math.isfinite(e.value) else None
    return (gateway, e.point_id, e.rule, e.severity, e.raised, e.ts_ms, value, e.since_ms, now_ms)


ALARM_COLUMNS = "gateway, point_id, rule, severity, raised, ts, value, since_ms, received_ms"


def alarm_from_row(row: Sequence[Any]) -> AlarmEvent:
    point_id, rule, severity, raised, ts, value, since = row
    return AlarmEvent(
        point_id=int(point_id),
        rule=str(rule),
        severity=severity,
        raised=bool(raised),
        ts_ms=int(ts),
        value=math.nan if value is None else float(value),
        since_ms=int(since),
    )


def open_store(url: str) -> Store:
    """``sqlite:///relative.db``, ``sqlite:////abs/path.db``, ``sqlite:///:memory:``
    or ``postgresql://user@host:port/db?schema=name`` (psycopg 3)."""
    if url.startswith("sqlite:///"):
        from agent.ingest.store_sqlite import SqliteStore

        path = url[len("sqlite:///") :]
        if not path:
            raise ValueError(f"no database path in {url!r}")
        return SqliteStore(path)
    if url.startswith(("postgresql://", "postgres://")):
        from agent.ingest.store_postgres import PostgresStore

        return PostgresStore(url)
    raise ValueError(f"unsupported store URL {url!r}: use sqlite:///path.db or postgresql://...")


STATS_COLUMNS = ", ".join(("gateway", *STATS_FIELDS))


def stats_upsert(placeholder: str) -> str:
    """Upsert of a gateway's latest stats; a report older than the stored one is ignored."""
    values = ", ".join([placeholder] * (1 + len(STATS_FIELDS)))
    updates = ", ".join(f"{f} = excluded.{f}" for f in STATS_FIELDS)
    return (
        f"INSERT INTO gateway_stats ({STATS_COLUMNS}) VALUES ({values}) "
        f"ON CONFLICT (gateway) DO UPDATE SET {updates} WHERE excluded.ts >= gateway_stats.ts"
    )


def stats_row(stats: GatewayStats) -> tuple[Any, ...]:
    return (stats.gateway, *(getattr(stats, f) for f in STATS_FIELDS))


def stats_from_row(row: Sequence[Any]) -> GatewayStats:
    gateway, *values = row
    return GatewayStats(str(gateway), *(int(v) for v in values))
