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

import orjson

from central import events
from central.configs import ConfigPushRecord, ConfigSeen
from central.events import Event, EventAction, EventSummary
from central.series import Series
from central.sessions import Session
from common.wire import (
    STATS_FIELDS,
    DeviceStatus,
    Envelope,
    GatewayStats,
    Meta,
    RuleAction,
    RuleInput,
    rule_input_dict,
)
from native.batch import GOOD, UNCERTAIN, Batch
from native.stages import AlarmEvent

SEQ_SIGN_FLIP = 2**63

#: PostgreSQL: writers NOTIFY this channel in their transaction, the payload a CHANGE_KIND
CHANGES_CHANNEL = "citygw_changes"
CHANGE_KINDS = ("readings", "alarms", "events", "gateways")


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


class StoreMissing(LookupError):
    """`open_store(url, create=False)` found no (current) store at the URL."""


@dataclass(frozen=True, slots=True)
class PointReading:
    """One reading found by `Store.query`, with the point's name from the registry."""

    gateway: str
    key: str  # "<device>/<point>" from up/meta
    ts: int
    value: float
    quality: int


@dataclass(frozen=True, slots=True)
class GatewayInfo:
    """What the platform knows of one gateway (`citygw platform gateways`)."""

    gateway: str
    site: str | None
    state: str | None  # "online" / "offline" as last reported, None if never
    state_ms: int | None  # when the state last changed (platform clock)
    last_seen_ms: int | None  # last stored uplink (platform clock)
    stats: GatewayStats | None  # the latest up/stats: backlog, evictions, losses


@dataclass(frozen=True, slots=True)
class DeviceInfoEntry:
    """One piece of a device's information (`citygw platform devices`): a Modbus string
    point, a BTHome text/raw/firmware object..., as the gateway last reported it."""

    gateway: str
    device: str
    name: str
    value: str
    since_ms: int  # the gateway's time of the first report with this value


@dataclass(frozen=True, slots=True)
class FleetRow:
    """A gateway as the console's fleet list shows it."""

    gateway: str
    site: str | None
    location: dict[str, Any] | None  # as the gateway's config has it ([gateway.location])
    device_locations: dict[str, Any] | None  # {device: {lat, lon}} of devices that have one
    software: str | None  # its citygw version (None: a gateway before issue 14)
    state: str | None
    state_ms: int | None
    last_seen_ms: int | None
    stats: GatewayStats | None
    devices_total: int  # devices in its latest health report (0: none sent yet)
    devices_healthy: int
    open_events: int  # unresolved events
    config_version: str | None = None  # the config it runs (None: a gateway before issue 15)
    config_hash: str | None = None


@dataclass(frozen=True, slots=True)
class DeviceRow:
    """A device of a gateway: its health, information, location and points."""

    device: str
    healthy: bool | None  # None: no health report names it (a gateway before issue 14)
    since_ms: int | None  # the gateway's clock: since when it is healthy / unhealthy
    error: str  # the last error while unhealthy, "" otherwise
    info: dict[str, str]  # `device_info`: name -> value
    location: dict[str, float] | None  # {lat, lon} if its config gives one
    points: list[PointInfo]


@dataclass(frozen=True, slots=True)
class LatestValue:
    """A point's latest good or uncertain finite reading in a window (`latest_values`)."""

    gateway: str
    key: str
    ts: int
    value: float


#: at most this much of a rejected payload is kept in the dead-letter table
DEAD_LETTER_MAX_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A rejected uplink kept aside for inspection (then acknowledged)."""

    received_ms: int
    topic: str
    reason: str  # the worker's reject reason: "codec", "version", "gateway", ...
    error: str
    payload: bytes  # the first DEAD_LETTER_MAX_BYTES bytes
    size: int  # the full payload size


@dataclass(frozen=True, slots=True)
class AlarmEpisode:
    """A raise paired with its clear (``cleared_ts`` None while the alarm is active)."""

    gateway: str
    point_id: int
    key: str | None  # from the registry, None if up/meta has not named the point
    rule: str
    severity: str
    raised_ts: int
    value: float
    cleared_ts: int | None


@dataclass(frozen=True, slots=True)
class PointInfo:
    """A point as the gateway's registry (up/meta) names it."""

    gateway: str
    point_id: int
    key: str  # "<device>/<point>"
    device: str
    name: str
    unit: str
    driver: str
    type: str
    updated_ms: int  # when the registry entry was last stored (platform clock)


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
        """Upsert the gateway's point registry (gateway, point_id) -> key, device, ...,
        and its site, location, software and devices' locations."""
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
        """Keep the gateway's latest reported buffer counters (an older report is ignored)
        and, if the report carries `devices`, its devices' information, if it carries
        `health`, its devices' health: the report's is the whole of it (an entry it no
        longer has is deleted)."""
        ...

    def stats(self, gateway: str) -> GatewayStats | None:
        """The latest counters the gateway reported, if any (`devices` None: see
        `device_info`)."""
        ...

    def device_info(self, gateway: str | None = None) -> list[DeviceInfoEntry]:
        """The devices' information (on `gateway` or all), by gateway, device, name."""
        ...

    def store_state(self, gateway: str, online: bool, now_ms: int) -> None:
        """Record the gateway's retained state; the time moves only when it changes."""
        ...

    def store_dead_letters(self, letters: Sequence[DeadLetter]) -> None: ...

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The newest rejected uplinks first."""
        ...

    def gateways(self) -> list[GatewayInfo]:
        """Every gateway seen, by id."""
        ...

    def query(
        self,
        point_key: str,
        since_ms: int,
        until_ms: int | None = None,
        gateway: str | None = None,
        limit: int | None = None,
    ) -> list[PointReading]:
        """Readings of the point named `point_key` (on any gateway, or on `gateway`)
        with since_ms <= ts < until_ms, ordered by gateway then time."""
        ...

    def point_keys(self, gateway: str | None = None) -> list[str]:
        """The point names the registry (up/meta) knows, on `gateway` or any, sorted."""
        ...

    def alarm_episodes(
        self, gateway: str | None = None, active: bool = False, since_ms: int | None = None
    ) -> list[AlarmEpisode]:
        """Raises paired with their clears, oldest first; `active`: only uncleared ones;
        `since_ms`: only those raised at or after it (the gateway's clock)."""
        ...

    def rule_actions(
        self, gateway: str | None = None, rule: str | None = None, limit: int = 1000
    ) -> list[tuple[str, RuleAction]]:
        """(gateway, action) of the gateways' local rules (on `gateway`, of `rule`) in the
        order they happened on each gateway (stream, seq, position; time across streams
        and gateways), newest last: the newest `limit`."""
        ...

    def prune(self, before_ms: int) -> dict[str, int]:
        """Retention: drop readings taken, uplink keys and dead letters received, rule
        actions taken, and alarm episodes cleared and events resolved before `before_ms`
        (active alarms and unresolved events stay); what was dropped, by table. An uplink
        resent after its key was dropped is stored again."""
        ...

    def fleet(self, gateway: str | None = None) -> list[FleetRow]:
        """Every gateway seen (or only `gateway`), by id, with its software and its
        devices' health."""
        ...

    def gateway_devices(self, gateway: str) -> list[DeviceRow]:
        """The gateway's devices (named by its points, health, information or
        locations), by name."""
        ...

    def latest_values(
        self, since_ms: int, gateways: str = "*", points: str = "*", site: str | None = None
    ) -> list[LatestValue]:
        """The latest good or uncertain finite reading taken at or after `since_ms` of
        every point whose key matches the glob `points` on a gateway matching `gateways`
        (globs: `*` and `?`, case-insensitive) at `site` (None: any), by gateway and key."""
        ...

    def uplink_points(self, since_ms: int) -> int:
        """Readings in the telemetry and event uplinks received since `since_ms`."""
        ...

    def session_open(self, id_hash: str, session: Session, now_ms: int) -> None:
        """A new session; the expired ones go."""
        ...

    def session_get(self, id_hash: str, now_ms: int) -> Session | None:
        """The unexpired session with this id hash (central/sessions.py)."""
        ...

    def session_close(self, id_hash: str) -> None:
        """Ends that session."""
        ...

    def events(
        self,
        state: str | None = None,
        gateway: str | None = None,
        limit: int = 200,
        before_id: int | None = None,
    ) -> list[Event]:
        """Newest first, ids below `before_id`; `state` None: all, "open": unresolved, or
        one state (ValueError for another word)."""
        ...

    def event(self, event_id: int) -> Event | None: ...

    def event_actions(self, event_id: int) -> list[EventAction]:
        """The event's history, oldest first."""
        ...

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
        """An operator's "ack", "assign", "note" or "resolve" (central/events.py); the event
        after it. `EventConflict` if its state does not allow it, `StoreMissing` if there is
        no such event, ValueError for a malformed action."""
        ...

    def event_summary(self, since_ms: int) -> EventSummary:
        """Open events now, and how fast the events opened since `since_ms` were handled."""
        ...

    def change_marks(self) -> dict[str, int]:
        """For each of CHANGE_KINDS a number that grows when that kind changes (cheap: the
        console polls it)."""
        ...

    def series(
        self, gateway: str, point_id: int, since_ms: int, until_ms: int, max_points: int
    ) -> Series:
        """The point's readings with since_ms <= ts < until_ms for a plot: raw if at most
        `max_points`, else min/max/mean per bucket (central/series.py)."""
        ...

    def roll_up(self, limit: int) -> int:
        """Fold up to `limit` freshly stored reading blocks into the ten-minute rollup
        `series` reads (PostgreSQL; SQLite has none: 0); how many were taken. Safe to
        run from several workers at once: each block is folded in exactly once."""
        ...

    def point_alarms(
        self, gateway: str, point_id: int, since_ms: int, until_ms: int
    ) -> list[AlarmEpisode]:
        """The point's alarm episodes that overlap [since_ms, until_ms): raised before
        until_ms and not cleared before since_ms, oldest first."""
        ...

    def find_points(
        self, text: str, gateway: str | None = None, limit: int = 50
    ) -> list[PointInfo]:
        """Points whose "gateway/key" holds `text` (case-insensitive), by key then gateway."""
        ...

    def point(self, gateway: str, key: str) -> PointInfo | None:
        """The point named `key` on `gateway` (the latest registered if several ids)."""
        ...

    def config_push_record(self, push: ConfigPushRecord) -> int:
        """Records a config push (its `id` is ignored); returns its id."""
        ...

    def config_push_answered(
        self, push_id: int, outcome: str, error: str | None, now_ms: int
    ) -> None:
        """The gateway's answer to a recorded push."""
        ...

    def configs_seen(self, gateway: str | None = None) -> list[ConfigSeen]:
        """The configs gateways reported running (up/meta), by gateway, newest first."""
        ...

    def config_pushes(self, gateway: str | None = None, limit: int = 100) -> list[ConfigPushRecord]:
        """Recorded pushes, newest first."""
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


@dataclass(frozen=True, slots=True)
class AlarmBody:
    """An alarm-lane message: its alarm events and its local rules' actions (either may
    be empty). Its length, which the envelope's n_points gives, counts both."""

    events: Sequence[AlarmEvent]
    actions: Sequence[RuleAction] = ()

    def __len__(self) -> int:
        return len(self.events) + len(self.actions)


#: what an uplink carries: readings (batch lanes), or alarm events and rule actions
#: (alarm lane)
Body: TypeAlias = Batch | AlarmBody


def check_batch(env: Envelope, body: Body) -> None:
    if env.n_points != len(body):
        raise ValueError(f"envelope says {env.n_points} points but the body has {len(body)}")


#: a rule action to store: (gateway, stream, seq as stored, position in its message, action)
ActionRow: TypeAlias = tuple[str, str, int, int, RuleAction]


def split_bodies(
    items: Sequence[tuple[str, Envelope, Body]],
) -> tuple[list[tuple[str, int, Batch]], list[tuple[str, AlarmEvent]], list[ActionRow]]:
    """The readings (gateway, seq as stored, batch), the alarm events and the rule
    actions of the given (fresh) uplinks, each in message order."""
    batches: list[tuple[str, int, Batch]] = []
    alarms: list[tuple[str, AlarmEvent]] = []
    actions: list[ActionRow] = []
    for gateway, env, body in items:
        if isinstance(body, Batch):
            batches.append((gateway, seq_to_db(env.seq), body))
        else:
            alarms.extend((gateway, e) for e in body.events)
            seq = seq_to_db(env.seq)
            actions.extend((gateway, env.stream, seq, i, a) for i, a in enumerate(body.actions))
    return batches, alarms, actions


# -- rule actions (the alarm lane's "actions") --------------------------------------------

RULE_ACTION_COLUMNS = (
    "gateway, stream, seq, idx, rule, ts, transition, action, outcome, target, value, "
    "written, detail, attempts, inputs, received_ms"
)


def rule_action_insert(ph: str, json_cast: str = "") -> str:
    values = ", ".join([ph] * 14 + [f"{ph}{json_cast}", ph])
    return f"INSERT INTO rule_actions ({RULE_ACTION_COLUMNS}) VALUES ({values})"


def rule_action_row(row: ActionRow, now_ms: int) -> tuple[Any, ...]:
    """The row of a rule action: NaN ("none") as NULL, the inputs as JSON text."""
    gateway, stream, seq, idx, a = row

    def number(v: float) -> float | None:
        return None if math.isnan(v) else v

    inputs = orjson.dumps([rule_input_dict(i) for i in a.inputs]).decode()
    return (
        gateway,
        stream,
        seq,
        idx,
        a.rule,
        a.ts_ms,
        a.transition,
        a.action,
        a.outcome,
        a.target,
        number(a.value),
        number(a.written),
        a.detail,
        a.attempts,
        inputs,
        now_ms,
    )


def rule_actions_query(
    ph: str, gateway: str | None, rule: str | None, limit: int
) -> tuple[str, tuple[Any, ...]]:
    """The newest `limit` rule actions (on `gateway`, of `rule`), newest first: within a
    gateway's stream in message order (seq, idx), across streams and gateways by time.
    A stream's order key is the running maximum of its times, so a gateway clock that
    stepped back never reorders a stream's own actions."""
    where, args = [], []
    if gateway is not None:
        where.append(f"gateway = {ph}")
        args.append(gateway)
    if rule is not None:
        where.append(f"rule = {ph}")
        args.append(rule)
    cond = f" WHERE {' AND '.join(where)}" if where else ""
    return (
        "SELECT gateway, rule, ts, transition, action, outcome, target, value, written, "
        "detail, attempts, inputs FROM (SELECT *, max(ts) OVER (PARTITION BY gateway, "
        "stream ORDER BY seq, idx ROWS UNBOUNDED PRECEDING) AS happened "
        f"FROM rule_actions{cond}) a "
        f"ORDER BY happened DESC, gateway DESC, stream DESC, seq DESC, idx DESC LIMIT {ph}",
        (*args, limit),
    )


def rule_action_from_row(row: Sequence[Any]) -> tuple[str, RuleAction]:
    gateway, rule, ts, transition, action, outcome, target, value, written, detail, n, ins = row

    def number(v: Any) -> float:
        return math.nan if v is None else float(v)

    inputs = tuple(
        RuleInput(
            name=str(i["name"]),
            point=str(i["point"]),
            value=number(i["value"]),
            ts_ms=int(i["ts"]),
            quality=int(i["quality"]),
        )
        for i in from_json(ins)
    )
    return str(gateway), RuleAction(
        rule=str(rule),
        ts_ms=int(ts),
        transition=str(transition),
        action=str(action),
        outcome=str(outcome),
        target=str(target),
        value=number(value),
        written=number(written),
        detail=str(detail),
        inputs=inputs,
        attempts=int(n),
    )


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
    gateway, ts, appended, evicted, evicted_msgs, backlog, backlog_msgs, lost = row
    return GatewayStats(
        str(gateway),
        int(ts),
        int(appended),
        int(evicted),
        int(evicted_msgs),
        int(backlog),
        int(backlog_msgs),
        int(lost),
    )


# -- SQL shared by the two stores (`ph` is the driver's placeholder: "?" or "%s") ---------


def alarm_clear(ph: str, id_column: str = "id") -> str:
    """Pair a clear with its raise: the open raise of that point and rule that began at the
    clear's ``since_ms``, else the latest open one."""
    return (
        f"UPDATE alarms SET cleared_ts = {ph} WHERE {id_column} = (SELECT {id_column} "
        f"FROM alarms WHERE gateway = {ph} AND point_id = {ph} AND rule = {ph} AND raised "
        f"AND cleared_ts IS NULL ORDER BY (ts = {ph}) DESC, ts DESC LIMIT 1)"
    )


def alarm_clear_args(gateway: str, e: AlarmEvent) -> tuple[Any, ...]:
    return (e.ts_ms, gateway, e.point_id, e.rule, e.since_ms)


def alarm_episodes_query(
    ph: str, gateway: str | None, active: bool, order: str, since_ms: int | None = None
) -> tuple[str, tuple[Any, ...]]:
    where = "a.raised"
    args: tuple[Any, ...] = ()
    if gateway is not None:
        where += f" AND a.gateway = {ph}"
        args = (gateway,)
    if since_ms is not None:
        where += f" AND a.ts >= {ph}"
        args = (*args, since_ms)
    if active:
        where += " AND a.cleared_ts IS NULL"
    return (
        "SELECT a.gateway, a.point_id, p.key, a.rule, a.severity, a.ts, a.value, a.cleared_ts "
        "FROM alarms a LEFT JOIN points p ON p.gateway = a.gateway AND p.point_id = a.point_id "
        f"WHERE {where} ORDER BY a.ts, {order}",
        args,
    )


def episode_from_row(row: Sequence[Any]) -> AlarmEpisode:
    gateway, point_id, key, rule, severity, ts, value, cleared = row
    return AlarmEpisode(
        gateway=str(gateway),
        point_id=int(point_id),
        key=None if key is None else str(key),
        rule=str(rule),
        severity=str(severity),
        raised_ts=int(ts),
        value=math.nan if value is None else float(value),
        cleared_ts=None if cleared is None else int(cleared),
    )


def point_alarms_query(ph: str) -> str:
    """Args: gateway, point_id, until_ms, since_ms (see `Store.point_alarms`)."""
    return (
        "SELECT a.gateway, a.point_id, p.key, a.rule, a.severity, a.ts, a.value, a.cleared_ts "
        "FROM alarms a LEFT JOIN points p ON p.gateway = a.gateway AND p.point_id = a.point_id "
        f"WHERE a.raised AND a.gateway = {ph} AND a.point_id = {ph} AND a.ts < {ph} "
        f"AND (a.cleared_ts IS NULL OR a.cleared_ts >= {ph}) ORDER BY a.ts"
    )


POINT_COLUMNS = "gateway, point_id, key, device, name, unit, driver, type, updated_ms"


def find_points_query(
    ph: str, find: str, text: str, gateway: str | None, limit: int
) -> tuple[str, tuple[Any, ...]]:
    """`find` is the driver's substring position function (SQLite ``instr``, PostgreSQL
    ``strpos``): no LIKE, so no wildcards to escape in `text`."""
    where = f"{find}(lower(gateway || '/' || key), lower({ph})) > 0"
    args: tuple[Any, ...] = (text,)
    if gateway is not None:
        where += f" AND gateway = {ph}"
        args += (gateway,)
    return (
        f"SELECT {POINT_COLUMNS} FROM points WHERE {where} ORDER BY key, gateway, point_id "
        f"LIMIT {ph}",
        (*args, limit),
    )


def point_query(ph: str) -> str:
    return (
        f"SELECT {POINT_COLUMNS} FROM points WHERE gateway = {ph} AND key = {ph} "
        "ORDER BY updated_ms DESC, point_id DESC LIMIT 1"
    )


def point_from_row(row: Sequence[Any]) -> PointInfo:
    gateway, point_id, key, device, name, unit, driver, type_, updated = row
    return PointInfo(
        str(gateway),
        int(point_id),
        str(key),
        str(device),
        str(name),
        str(unit),
        str(driver),
        str(type_),
        int(updated),
    )


def state_upsert(ph: str) -> str:
    """The time of a state moves only when the state changes: a retained "online"
    delivered again to a restarted worker keeps the time the gateway came online."""
    return (
        "INSERT INTO gateways (gateway, state, state_ms, updated_ms) "
        f"VALUES ({ph}, {ph}, {ph}, {ph}) ON CONFLICT (gateway) DO UPDATE SET "
        "state = excluded.state, state_ms = excluded.state_ms "
        "WHERE COALESCE(gateways.state, '') <> excluded.state"
    )


def state_args(gateway: str, online: bool, now_ms: int) -> tuple[Any, ...]:
    return (gateway, "online" if online else "offline", now_ms, now_ms)


def gateway_meta_upsert(ph: str, json_cast: str = "") -> str:
    """The gateway's row from its up/meta: site, location, stream, software, locations,
    the config it runs."""
    values = f"{ph}, {ph}, {ph}{json_cast}, {ph}, {ph}, {ph}, {ph}{json_cast}, {ph}, {ph}"
    return (
        "INSERT INTO gateways (gateway, site, location, stream, updated_ms, software, "
        f"locations, config_version, config_hash) VALUES ({values}) ON CONFLICT (gateway) "
        "DO UPDATE SET site = excluded.site, location = excluded.location, "
        "stream = excluded.stream, updated_ms = excluded.updated_ms, "
        "software = excluded.software, locations = excluded.locations, "
        "config_version = excluded.config_version, config_hash = excluded.config_hash"
    )


def gateway_meta_args(gateway: str, meta: Meta, now_ms: int) -> tuple[Any, ...]:
    def dump(value: Any) -> str | None:
        return None if value is None else orjson.dumps(value).decode()

    return (
        gateway,
        meta.site,
        dump(meta.location),
        meta.stream,
        now_ms,
        meta.software,
        dump(meta.locations),
        meta.config["version"] if meta.config else None,
        meta.config["hash"] if meta.config else None,
    )


def from_json(value: Any) -> Any:
    """A JSON column's value: SQLite gives the text, psycopg the decoded jsonb."""
    return orjson.loads(value) if isinstance(value, str) else value


GATEWAYS_QUERY = (
    f"SELECT ids.gateway, g.site, g.state, g.state_ms, g.last_seen_ms, "
    f"{', '.join('s.' + c.strip() for c in STATS_COLUMNS.split(','))} "
    "FROM (SELECT gateway FROM gateways UNION SELECT gateway FROM gateway_stats) ids "
    "LEFT JOIN gateways g ON g.gateway = ids.gateway "
    "LEFT JOIN gateway_stats s ON s.gateway = ids.gateway ORDER BY ids.gateway"
)


def gateway_from_row(row: Sequence[Any]) -> GatewayInfo:
    gateway, site, state, state_ms, last_seen, *stats = row
    return GatewayInfo(
        gateway=str(gateway),
        site=None if site is None else str(site),
        state=None if state is None else str(state),
        state_ms=None if state_ms is None else int(state_ms),
        last_seen_ms=None if last_seen is None else int(last_seen),
        stats=None if stats[0] is None else stats_from_row(stats),
    )


DEAD_LETTER_COLUMNS = "received_ms, topic, reason, error, payload, size"


def dead_letter_insert(ph: str) -> str:
    return f"INSERT INTO dead_letters ({DEAD_LETTER_COLUMNS}) VALUES ({', '.join([ph] * 6)})"


def dead_letter_row(d: DeadLetter) -> tuple[Any, ...]:
    return (d.received_ms, d.topic, d.reason, d.error, d.payload, d.size)


def dead_letters_query(ph: str, order: str) -> str:
    return f"SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters ORDER BY {order} DESC LIMIT {ph}"


def dead_letter_from_row(row: Sequence[Any]) -> DeadLetter:
    received, topic, reason, error, payload, size = row
    return DeadLetter(int(received), str(topic), str(reason), str(error), bytes(payload), int(size))


#: what `prune` deletes besides the readings: (table, the condition on `before`)
PRUNE_DELETES: tuple[tuple[str, str], ...] = (
    ("uplinks", "received_ms < {ph}"),
    ("dead_letters", "received_ms < {ph}"),
    # a whole episode once its clear is old; a clear without raise goes by its own time
    ("alarms", "COALESCE(cleared_ts, ts) < {ph} AND NOT (raised AND cleared_ts IS NULL)"),
    ("rule_actions", "ts < {ph}"),  # the gateway's time of the action
    *events.PRUNE_DELETES,
)


# -- device information (up/stats `devices`) -----------------------------------------------

DEVICE_INFO_COLUMNS = "gateway, device, name, value, since_ms"


def store_device_info(cur: Any, ph: str, stats: GatewayStats) -> None:
    """In the caller's transaction, right after the stats upsert took `stats` as the
    newest report: the gateway's entries made what `stats.devices` says, writing only what
    changed (a value's `since_ms` stays while it does not), in key order (lock order)."""
    assert stats.devices is not None
    gateway = stats.gateway
    cur.execute(f"SELECT device, name, value FROM device_info WHERE gateway = {ph}", (gateway,))
    old = {(str(d), str(n)): str(v) for d, n, v in cur.fetchall()}
    new = {(d, n): v for d, entries in stats.devices.items() for n, v in entries.items()}
    gone = sorted(old.keys() - new.keys())
    changed = sorted((k, v) for k, v in new.items() if old.get(k) != v)
    if gone:
        cur.executemany(
            f"DELETE FROM device_info WHERE gateway = {ph} AND device = {ph} AND name = {ph}",
            [(gateway, d, n) for d, n in gone],
        )
    if changed:
        cur.executemany(
            f"INSERT INTO device_info ({DEVICE_INFO_COLUMNS}) VALUES ({', '.join([ph] * 5)}) "
            "ON CONFLICT (gateway, device, name) DO UPDATE SET value = excluded.value, "
            "since_ms = excluded.since_ms",
            [(gateway, d, n, v, stats.ts) for (d, n), v in changed],
        )


def device_info_query(ph: str, gateway: str | None) -> tuple[str, tuple[str, ...]]:
    where, args = ("", ()) if gateway is None else (f" WHERE gateway = {ph}", (gateway,))
    return (
        f"SELECT {DEVICE_INFO_COLUMNS} FROM device_info{where} ORDER BY gateway, device, name",
        args,
    )


def device_info_from_row(row: Sequence[Any]) -> DeviceInfoEntry:
    gateway, device, name, value, since = row
    return DeviceInfoEntry(str(gateway), str(device), str(name), str(value), int(since))


# -- fleet (up/meta software and locations, up/stats health) -------------------------------


def store_device_health(cur: Any, ph: str, stats: GatewayStats) -> None:
    """In the caller's transaction, right after the stats upsert took `stats` as the
    newest report: the gateway's device_health rows made what `stats.health` says,
    writing only what changed, in key order (lock order)."""
    assert stats.health is not None
    gateway = stats.gateway
    cur.execute(
        f"SELECT device, healthy, since_ms, error FROM device_health WHERE gateway = {ph}",
        (gateway,),
    )
    old = {str(d): DeviceStatus(bool(h), int(s), str(e)) for d, h, s, e in cur.fetchall()}
    gone = sorted(old.keys() - stats.health.keys())
    changed = sorted((d, h) for d, h in stats.health.items() if old.get(d) != h)
    if gone:
        cur.executemany(
            f"DELETE FROM device_health WHERE gateway = {ph} AND device = {ph}",
            [(gateway, d) for d in gone],
        )
    if changed:
        cur.executemany(
            "INSERT INTO device_health (gateway, device, healthy, since_ms, error) "
            f"VALUES ({ph}, {ph}, {ph}, {ph}, {ph}) ON CONFLICT (gateway, device) DO UPDATE "
            "SET healthy = excluded.healthy, since_ms = excluded.since_ms, "
            "error = excluded.error",
            [(gateway, d, h.healthy, h.since, h.error) for d, h in changed],
        )


def fleet_query(ph: str, gateway: str | None) -> tuple[str, tuple[str, ...]]:
    """Every gateway's fleet row, or one gateway's (a gateway's page: not the whole fleet)."""
    where, args = (f" WHERE ids.gateway = {ph}", (gateway,)) if gateway is not None else ("", ())
    text = (
        "SELECT ids.gateway, g.site, g.location, g.locations, g.software, g.state, g.state_ms, "
        f"g.last_seen_ms, h.total, h.healthy, e.n, g.config_version, g.config_hash, "
        f"{', '.join('s.' + c.strip() for c in STATS_COLUMNS.split(','))} "
        "FROM (SELECT gateway FROM gateways UNION SELECT gateway FROM gateway_stats) ids "
        "LEFT JOIN gateways g ON g.gateway = ids.gateway "
        "LEFT JOIN gateway_stats s ON s.gateway = ids.gateway "
        "LEFT JOIN (SELECT gateway, count(*) AS total, "
        "sum(CASE WHEN healthy THEN 1 ELSE 0 END) AS healthy FROM device_health "
        "GROUP BY gateway) h ON h.gateway = ids.gateway "
        "LEFT JOIN (SELECT gateway, count(*) AS n FROM events WHERE state <> 'resolved' "
        f"GROUP BY gateway) e ON e.gateway = ids.gateway{where} ORDER BY ids.gateway"
    )
    return text, args


def fleet_from_row(row: Sequence[Any]) -> FleetRow:
    (
        gateway,
        site,
        location,
        locations,
        software,
        state,
        state_ms,
        last_seen,
        total,
        healthy,
        n_open,
        config_version,
        config_hash,
        *stats,
    ) = row
    return FleetRow(
        gateway=str(gateway),
        site=None if site is None else str(site),
        location=from_json(location),
        device_locations=from_json(locations),
        software=None if software is None else str(software),
        state=None if state is None else str(state),
        state_ms=None if state_ms is None else int(state_ms),
        last_seen_ms=None if last_seen is None else int(last_seen),
        stats=None if stats[0] is None else stats_from_row(stats),
        devices_total=int(total or 0),
        devices_healthy=int(healthy or 0),
        open_events=int(n_open or 0),
        config_version=None if config_version is None else str(config_version),
        config_hash=None if config_hash is None else str(config_hash),
    )


def gateway_devices_queries(ph: str) -> tuple[str, str, str]:
    """(points, health, locations) of one gateway; its information is `device_info`."""
    return (
        f"SELECT {POINT_COLUMNS} FROM points WHERE gateway = {ph} ORDER BY key",
        f"SELECT device, healthy, since_ms, error FROM device_health WHERE gateway = {ph}",
        f"SELECT locations FROM gateways WHERE gateway = {ph}",
    )


def device_rows(
    points: Sequence[Sequence[Any]],
    health: Sequence[Sequence[Any]],
    info: Sequence[DeviceInfoEntry],
    locations: Any,
) -> list[DeviceRow]:
    """A gateway's devices from the rows of `gateway_devices_queries` and its information."""
    by_device: dict[str, list[PointInfo]] = {}
    for row in points:
        point = point_from_row(row)
        by_device.setdefault(point.device, []).append(point)
    status = {str(d): (bool(h), int(s), str(e)) for d, h, s, e in health}
    infos: dict[str, dict[str, str]] = {}
    for entry in info:
        infos.setdefault(entry.device, {})[entry.name] = entry.value
    where = from_json(locations) or {}
    names = sorted(by_device.keys() | status.keys() | infos.keys() | where.keys())
    return [
        DeviceRow(
            device=name,
            healthy=status[name][0] if name in status else None,
            since_ms=status[name][1] if name in status else None,
            error=status[name][2] if name in status else "",
            info=infos.get(name, {}),
            location=where.get(name),
            points=by_device.get(name, []),
        )
        for name in names
    ]


def glob_like(pattern: str) -> str:
    """A glob (`*`, `?`) as a LIKE pattern with `\\` as its escape character."""
    out = []
    for c in pattern:
        if c in "\\%_":
            out.append("\\" + c)
        else:
            out.append({"*": "%", "?": "_"}.get(c, c))
    return "".join(out)


#: finite doubles only (NaN is NULL in SQLite and above every number in PostgreSQL)
FINITE = "BETWEEN -1.7976931348623157e308 AND 1.7976931348623157e308"
#: the qualities a vital counts: good and uncertain (not bad, not unavailable)
USABLE = f"IN ({GOOD}, {UNCERTAIN})"


def selected_points(ph: str, gateways: str, points: str, site: str | None) -> str:
    """The (gateway, point_id, key) of the points `latest_values` selects, its arguments
    `latest_args`: globs matched case-insensitively (lower(...) LIKE, several times faster
    than PostgreSQL's ILIKE over a city's registry), a "*" glob not matched at all."""
    text = "SELECT p.gateway, p.point_id, p.key FROM points p"
    where = [
        f"lower(p.{column}) LIKE {ph} ESCAPE '\\'"
        for column, glob in (("gateway", gateways), ("key", points))
        if glob != "*"
    ]
    if site is not None:
        text += " JOIN gateways g ON g.gateway = p.gateway"
        where.append(f"g.site = {ph}")
    return text + (" WHERE " + " AND ".join(where) if where else "")


def latest_args(gateways: str, points: str, site: str | None) -> list[Any]:
    globs = [glob_like(g.lower()) for g in (gateways, points) if g != "*"]
    return [*globs, *([site] if site is not None else [])]


UPLINK_POINTS_QUERY = (
    "SELECT COALESCE(sum(n_points), 0) FROM uplinks WHERE received_ms >= {ph} AND lane <> 0"
)
