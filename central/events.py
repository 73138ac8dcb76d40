"""Events: what operators see of alarms, and their lifecycle.

An event is opened by the ingest when a gateway raises an alarm, in the same transaction
that stores the alarm: raised -> acknowledged -> handling -> resolved. A raise while the
(gateway, point_id, rule) has an unresolved event is folded into it (flapping: one event,
``raises`` counts them); a clear only notes ``cleared_ts``: an operator resolves. "One
unresolved event per key" is a partial unique index, and raises are upserts on it, so two
ingest workers cannot open two. Operator actions are conditional UPDATEs (``WHERE state
IN (...)``): of two consoles acknowledging at once, one wins, the other gets
`EventConflict`. Every change is a row of ``event_actions`` (user "gateway" for the
gateway's raises and clears).

The SQL here is shared by both stores: ``ph`` is the driver's placeholder ("?" or "%s"),
and the functions taking a cursor run in the caller's transaction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from native.stages import AlarmEvent

STATES: Final = ("raised", "acknowledged", "handling", "resolved")
OPEN_STATES: Final = ("raised", "acknowledged", "handling")
#: an operator's action -> (the states it is allowed from, the state it leads to: None
#: leaves it), and the name it is recorded under in event_actions
TRANSITIONS: Final[dict[str, tuple[tuple[str, ...], str | None]]] = {
    "ack": (("raised",), "acknowledged"),
    "assign": (OPEN_STATES, "handling"),
    "note": (OPEN_STATES, None),
    "resolve": (OPEN_STATES, "resolved"),
}
RECORDED_AS: Final = {
    "ack": "acknowledged",
    "assign": "assigned",
    "note": "noted",
    "resolve": "resolved",
}
#: the recorded action that put an event in each state (for EventConflict's message)
_SET_BY: Final = {
    "raised": ("raised", "re-raised"),
    "acknowledged": ("acknowledged",),
    "handling": ("assigned",),
    "resolved": ("resolved",),
}
#: the user of the gateway's raises and clears in event_actions
GATEWAY_USER: Final = "gateway"


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    gateway: str
    point_id: int
    key: str | None  # from the registry, None if up/meta has not named the point
    rule: str
    severity: str
    state: str
    opened_ts: int  # gateway clock: the first raise
    opened_ms: int  # platform clock: when it was stored
    last_raised_ts: int
    raises: int  # raises folded into it (1: no flapping)
    value: float | None  # at the latest raise (None: not a finite number)
    cleared_ts: int | None  # the gateway's clear of the latest raise; None while active
    acked_by: str | None
    acked_ms: int | None
    assignee: str | None
    resolved_by: str | None
    resolved_ms: int | None
    updated_ms: int


@dataclass(frozen=True, slots=True)
class EventAction:
    event_id: int
    ts_ms: int  # platform clock
    user: str
    action: str  # raised|re-raised|cleared|acknowledged|assigned|noted|resolved
    assignee: str | None  # "assigned": to whom
    note: str | None


@dataclass(frozen=True, slots=True)
class EventSummary:
    """Open events now; and of the events opened since `since_ms`, how many were
    acknowledged and resolved, and how long that took (None where no event was)."""

    since_ms: int
    open: int
    open_by_state: dict[str, int]  # every open state, 0 included
    open_by_severity: dict[str, int]  # only the severities that have open events
    count: int
    acked: int
    resolved: int
    ack_median_ms: float | None
    ack_p90_ms: float | None
    resolve_median_ms: float | None
    resolve_p90_ms: float | None


class EventConflict(Exception):
    """The event's state does not allow the action (someone else acted first)."""


SQLITE_TABLES = """
CREATE TABLE IF NOT EXISTS events (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    gateway        TEXT    NOT NULL,
    point_id       INTEGER NOT NULL,
    rule           TEXT    NOT NULL,
    severity       TEXT    NOT NULL,
    state          TEXT    NOT NULL
        CHECK (state IN ('raised', 'acknowledged', 'handling', 'resolved')),
    opened_ts      INTEGER NOT NULL,
    opened_ms      INTEGER NOT NULL,
    last_raised_ts INTEGER NOT NULL,
    raises         INTEGER NOT NULL,
    value          REAL,
    cleared_ts     INTEGER,
    acked_by       TEXT,
    acked_ms       INTEGER,
    assignee       TEXT,
    resolved_by    TEXT,
    resolved_ms    INTEGER,
    updated_ms     INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS events_open_key ON events (gateway, point_id, rule)
    WHERE state <> 'resolved';
CREATE INDEX IF NOT EXISTS events_gateway_id ON events (gateway, id);
CREATE INDEX IF NOT EXISTS events_opened_ms ON events (opened_ms);
CREATE TABLE IF NOT EXISTS event_actions (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id  INTEGER NOT NULL REFERENCES events (id),
    ts_ms     INTEGER NOT NULL,
    user_name TEXT    NOT NULL,
    action    TEXT    NOT NULL,
    assignee  TEXT,
    note      TEXT
);
CREATE INDEX IF NOT EXISTS event_actions_event ON event_actions (event_id, id);
"""

POSTGRES_TABLES = """
CREATE TABLE IF NOT EXISTS events (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    gateway        text   NOT NULL,
    point_id       bigint NOT NULL,
    rule           text   NOT NULL,
    severity       text   NOT NULL,
    state          text   NOT NULL
        CHECK (state IN ('raised', 'acknowledged', 'handling', 'resolved')),
    opened_ts      bigint NOT NULL,
    opened_ms      bigint NOT NULL,
    last_raised_ts bigint NOT NULL,
    raises         bigint NOT NULL,
    value          double precision,
    cleared_ts     bigint,
    acked_by       text,
    acked_ms       bigint,
    assignee       text,
    resolved_by    text,
    resolved_ms    bigint,
    updated_ms     bigint NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS events_open_key ON events (gateway, point_id, rule)
    WHERE state <> 'resolved';
CREATE INDEX IF NOT EXISTS events_gateway_id ON events (gateway, id);
CREATE INDEX IF NOT EXISTS events_opened_ms ON events (opened_ms);
CREATE TABLE IF NOT EXISTS event_actions (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id  bigint NOT NULL REFERENCES events (id),
    ts_ms     bigint NOT NULL,
    user_name text   NOT NULL,
    action    text   NOT NULL,
    assignee  text,
    note      text
);
CREATE INDEX IF NOT EXISTS event_actions_event ON event_actions (event_id, id)
"""

#: what `prune` deletes of events, after the rest: (table, the condition on the cut)
PRUNE_DELETES: Final = (
    (
        "event_actions",
        "event_id IN (SELECT id FROM events WHERE state = 'resolved' AND resolved_ms < {ph})",
    ),
    ("events", "state = 'resolved' AND resolved_ms < {ph}"),
)

_COLUMNS = (
    "e.id, e.gateway, e.point_id, p.key, e.rule, e.severity, e.state, e.opened_ts, "
    "e.opened_ms, e.last_raised_ts, e.raises, e.value, e.cleared_ts, e.acked_by, e.acked_ms, "
    "e.assignee, e.resolved_by, e.resolved_ms, e.updated_ms FROM events e "
    "LEFT JOIN points p ON p.gateway = e.gateway AND p.point_id = e.point_id"
)
_OPEN = "state <> 'resolved'"  # the partial unique index's predicate, word for word


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


def event_from_row(row: Sequence[Any]) -> Event:
    (
        id_,
        gateway,
        point_id,
        key,
        rule,
        severity,
        state,
        opened_ts,
        opened_ms,
        last_raised,
        raises,
        value,
        cleared,
        acked_by,
        acked_ms,
        assignee,
        resolved_by,
        resolved_ms,
        updated_ms,
    ) = row
    return Event(
        id=int(id_),
        gateway=str(gateway),
        point_id=int(point_id),
        key=_opt_str(key),
        rule=str(rule),
        severity=str(severity),
        state=str(state),
        opened_ts=int(opened_ts),
        opened_ms=int(opened_ms),
        last_raised_ts=int(last_raised),
        raises=int(raises),
        value=None if value is None else float(value),
        cleared_ts=_opt_int(cleared),
        acked_by=_opt_str(acked_by),
        acked_ms=_opt_int(acked_ms),
        assignee=_opt_str(assignee),
        resolved_by=_opt_str(resolved_by),
        resolved_ms=_opt_int(resolved_ms),
        updated_ms=int(updated_ms),
    )


def events_query(
    ph: str, state: str | None, gateway: str | None, limit: int, before_id: int | None
) -> tuple[str, tuple[Any, ...]]:
    """Newest first. `state`: None all, "open" the unresolved ones, else one of STATES."""
    where: list[str] = []
    args: list[Any] = []
    if state == "open":
        where.append("e." + _OPEN)
    elif state is not None:
        if state not in STATES:
            raise ValueError(f"unknown event state {state!r}: open, {', '.join(STATES)}")
        where.append(f"e.state = {ph}")
        args.append(state)
    if gateway is not None:
        where.append(f"e.gateway = {ph}")
        args.append(gateway)
    if before_id is not None:
        where.append(f"e.id < {ph}")
        args.append(before_id)
    cond = f" WHERE {' AND '.join(where)}" if where else ""
    return f"SELECT {_COLUMNS}{cond} ORDER BY e.id DESC LIMIT {ph}", (*args, limit)


def event_query(ph: str) -> str:
    return f"SELECT {_COLUMNS} WHERE e.id = {ph}"


def select_event(cur: Any, ph: str, event_id: int) -> Event | None:
    cur.execute(event_query(ph), (event_id,))
    row = cur.fetchone()
    return event_from_row(row) if row else None


def actions_query(ph: str) -> str:
    return (
        "SELECT event_id, ts_ms, user_name, action, assignee, note FROM event_actions "
        f"WHERE event_id = {ph} ORDER BY id"
    )


def action_from_row(row: Sequence[Any]) -> EventAction:
    event_id, ts, user, action, assignee, note = row
    return EventAction(
        int(event_id), int(ts), str(user), str(action), _opt_str(assignee), _opt_str(note)
    )


def _record(
    cur: Any,
    ph: str,
    event_id: int,
    now_ms: int,
    user: str,
    action: str,
    assignee: str | None = None,
    note: str | None = None,
) -> None:
    cur.execute(
        "INSERT INTO event_actions (event_id, ts_ms, user_name, action, assignee, note) "
        f"VALUES ({ph}, {ph}, {ph}, {ph}, {ph}, {ph})",
        (event_id, now_ms, user, action, assignee, note),
    )


# -- the ingest: a gateway's raise or clear, in the transaction storing the alarm ----------


def raise_upsert(ph: str) -> str:
    """Open an event, or fold the raise into the key's unresolved one; -> (id, raises)."""
    return (
        "INSERT INTO events (gateway, point_id, rule, severity, state, opened_ts, opened_ms, "
        f"last_raised_ts, raises, value, updated_ms) VALUES ({ph}, {ph}, {ph}, {ph}, "
        f"'raised', {ph}, {ph}, {ph}, 1, {ph}, {ph}) "
        f"ON CONFLICT (gateway, point_id, rule) WHERE {_OPEN} DO UPDATE SET "
        "raises = events.raises + 1, last_raised_ts = excluded.last_raised_ts, "
        "value = excluded.value, cleared_ts = NULL, updated_ms = excluded.updated_ms "
        "RETURNING id, raises"
    )


def clear_update(ph: str) -> str:
    """The clear goes to the key's newest event if it has none yet: the unresolved one
    or, when an operator resolved it while the alarm was still active, that one; -> id."""
    return (
        f"UPDATE events SET cleared_ts = {ph}, updated_ms = {ph} WHERE id = (SELECT max(id) "
        f"FROM events WHERE gateway = {ph} AND point_id = {ph} AND rule = {ph}) "
        "AND cleared_ts IS NULL RETURNING id"
    )


def record_alarm(cur: Any, ph: str, gateway: str, e: AlarmEvent, now_ms: int) -> bool:
    """The event side of one stored alarm event; True if an event changed."""
    if e.raised:
        value = e.value if math.isfinite(e.value) else None
        cur.execute(
            raise_upsert(ph),
            (gateway, e.point_id, e.rule, e.severity, e.ts_ms, now_ms, e.ts_ms, value, now_ms),
        )
        event_id, raises = cur.fetchone()
        action = "raised" if raises == 1 else "re-raised"
    else:
        cur.execute(clear_update(ph), (e.ts_ms, now_ms, gateway, e.point_id, e.rule))
        row = cur.fetchone()
        if row is None:  # a clear without an event (raised before events existed, pruned)
            return False
        event_id, action = row[0], "cleared"
    _record(cur, ph, int(event_id), now_ms, GATEWAY_USER, action)
    return True


# -- operators' actions ---------------------------------------------------------------------


def _update(
    ph: str, action: str, event_id: int, user: str, now_ms: int, assignee: str | None
) -> tuple[str, tuple[Any, ...]]:
    """The conditional UPDATE of one action: it changes nothing (rowcount 0) when the
    event is not in a state the action is allowed from, or does not exist."""
    allowed, to = TRANSITIONS[action]
    sets = [f"updated_ms = {ph}"]
    args: list[Any] = [now_ms]
    if to is not None:
        sets.append(f"state = '{to}'")
    if action == "ack":
        sets += [f"acked_by = {ph}", f"acked_ms = {ph}"]
        args += [user, now_ms]
    elif action == "assign":
        sets.append(f"assignee = {ph}")
        args.append(assignee)
    elif action == "resolve":
        sets += [f"resolved_by = {ph}", f"resolved_ms = {ph}"]
        args += [user, now_ms]
    states = ", ".join(f"'{s}'" for s in allowed)
    return (
        f"UPDATE events SET {', '.join(sets)} WHERE id = {ph} AND state IN ({states})",
        (*args, event_id),
    )


def _check_action(action: str, assignee: str | None, note: str | None) -> None:
    if action not in TRANSITIONS:
        raise ValueError(f"unknown event action {action!r}: {', '.join(TRANSITIONS)}")
    if action == "assign" and not (assignee and assignee.strip()):
        raise ValueError("assign needs an assignee")
    if action == "note" and not (note and note.strip()):
        raise ValueError("a note needs its text")


def act(
    cur: Any,
    ph: str,
    event_id: int,
    action: str,
    user: str,
    now_ms: int,
    assignee: str | None = None,
    note: str | None = None,
) -> Event | None:
    """One operator action in the caller's transaction; None if there is no such event.
    `EventConflict` when the state does not allow it (the caller rolls back)."""
    _check_action(action, assignee, note)
    if action == "assign":  # assigning acknowledges a raised event first (time to ack)
        cur.execute(*_update(ph, "ack", event_id, user, now_ms, None))
        if cur.rowcount == 1:
            _record(cur, ph, event_id, now_ms, user, RECORDED_AS["ack"])
    cur.execute(*_update(ph, action, event_id, user, now_ms, assignee))
    if cur.rowcount != 1:
        event = select_event(cur, ph, event_id)
        if event is None:
            return None
        raise EventConflict(f"cannot {action} event {event_id}: {_how(cur, ph, event)}")
    _record(cur, ph, event_id, now_ms, user, RECORDED_AS[action], assignee, note)
    return select_event(cur, ph, event_id)


def _how(cur: Any, ph: str, event: Event) -> str:
    """ "it is <state> (by <who>)": the user of the action that put it in that state."""
    marks = ", ".join(ph for _ in _SET_BY[event.state])
    cur.execute(
        f"SELECT user_name FROM event_actions WHERE event_id = {ph} AND action IN ({marks}) "
        "ORDER BY id DESC LIMIT 1",
        (event.id, *_SET_BY[event.state]),
    )
    row = cur.fetchone()
    who = str(row[0]) if row else "unknown"
    if event.state == "handling":
        return f"it is handling, assigned to {event.assignee} (by {who})"
    return f"it is {event.state} (by {who})"


# -- summary ---------------------------------------------------------------------------------

OPEN_COUNTS_QUERY = (
    f"SELECT state, severity, count(*) FROM events WHERE {_OPEN} GROUP BY state, severity"
)


def durations_query(ph: str) -> str:
    """Time to acknowledge and to resolve of the events opened since a time."""
    return (
        f"SELECT acked_ms - opened_ms, resolved_ms - opened_ms FROM events WHERE opened_ms >= {ph}"
    )


def percentile(ordered: Sequence[int], pct: int) -> float | None:
    """The `pct` percentile of sorted samples, interpolated linearly between the two
    nearest ranks (PostgreSQL's percentile_cont): the median of 1, 2, 3, 4 is 2.5. The
    rank is kept exact (integers), so that p90 of 1000, 2000, 3000, 4000 is 3700.0."""
    if not ordered:
        return None
    lo, part = divmod(pct * (len(ordered) - 1), 100)
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * part / 100)


def summary_from_rows(
    since_ms: int, open_rows: Sequence[Sequence[Any]], durations: Sequence[Sequence[Any]]
) -> EventSummary:
    by_state = dict.fromkeys(OPEN_STATES, 0)
    by_severity: dict[str, int] = {}
    for state, severity, n in open_rows:
        by_state[str(state)] += int(n)
        by_severity[str(severity)] = by_severity.get(str(severity), 0) + int(n)
    acks = sorted(int(a) for a, _ in durations if a is not None)
    resolves = sorted(int(r) for _, r in durations if r is not None)
    return EventSummary(
        since_ms=since_ms,
        open=sum(by_state.values()),
        open_by_state=by_state,
        open_by_severity=dict(sorted(by_severity.items())),
        count=len(durations),
        acked=len(acks),
        resolved=len(resolves),
        ack_median_ms=percentile(acks, 50),
        ack_p90_ms=percentile(acks, 90),
        resolve_median_ms=percentile(resolves, 50),
        resolve_p90_ms=percentile(resolves, 90),
    )
