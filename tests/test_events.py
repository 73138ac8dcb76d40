"""Events (central/events.py) on both stores: opened and folded by the ingest's alarm path,
operators' actions and their refusals, concurrency between store objects, the summary,
prune; the change marks and PostgreSQL's NOTIFY."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, cast

import psycopg
import pytest

from central.events import Event, EventConflict, EventSummary
from central.store import CHANGES_CHANNEL, AlarmBody, Store, StoreMissing
from central.store_postgres import PostgresStore, split_url
from central.stores import open_store
from common import wire
from common.wire import Envelope, GatewayStats, Meta, PointMeta
from native.stages import AlarmEvent, Severity
from tests.helpers import GW, STREAM, make_batch

T0 = 1_700_000_000_000


def meta(gateway: str = GW) -> Meta:
    return Meta(
        gateway=gateway,
        stream=STREAM,
        site="block-12",
        location=None,
        points=(
            PointMeta(1, "bridge-7/strain_1", "bridge-7", "strain_1", "µε", "sim", "float"),
            PointMeta(2, "bridge-7/strain_2", "bridge-7", "strain_2", "µε", "sim", "float"),
        ),
    )


class Feed:
    """Alarm uplinks of one gateway stream, numbered in turn (as tests/test_ingest.py)."""

    def __init__(self, store: Store, gateway: str = GW, stream: str = STREAM) -> None:
        self.store, self.gateway, self.stream, self.seq = store, gateway, stream, 0

    def envelope(self, n: int) -> Envelope:
        self.seq += 1
        return Envelope(wire.LANE_ALARM, self.stream, self.seq, n, b"")

    def __call__(self, *events: AlarmEvent) -> None:
        assert self.store.store_batch(
            self.gateway, self.envelope(len(events)), AlarmBody(list(events))
        )


def up(
    pid: int, ts: int, value: float = 9.0, rule: str = "high", sev: Severity = "critical"
) -> AlarmEvent:
    return AlarmEvent(pid, rule, sev, True, ts, value, ts)


def down(pid: int, ts: int, since: int, rule: str = "high") -> AlarmEvent:
    return AlarmEvent(pid, rule, "critical", False, ts, 1.0, since)


def history(store: Store, event_id: int) -> list[tuple[str, str, str | None, str | None]]:
    return [(a.user, a.action, a.assignee, a.note) for a in store.event_actions(event_id)]


# -- the ingest side --------------------------------------------------------------------------


def test_raise_opens_an_event_and_flapping_folds_into_it(store: Store) -> None:
    store.store_meta(GW, meta())
    feed = Feed(store)
    before = time.time_ns() // 1_000_000
    feed(up(1, T0, 9.0))
    (e,) = store.events()
    assert (e.gateway, e.point_id, e.key, e.rule, e.severity, e.state) == (
        GW,
        1,
        "bridge-7/strain_1",
        "high",
        "critical",
        "raised",
    )
    assert (e.opened_ts, e.last_raised_ts, e.raises, e.value, e.cleared_ts) == (
        T0,
        T0,
        1,
        9.0,
        None,
    )
    assert before <= e.opened_ms == e.updated_ms <= time.time_ns() // 1_000_000
    assert store.event(e.id) == e
    # a clear is noted, the state is the operator's
    feed(down(1, T0 + 100, since=T0))
    e = store.event(e.id) or pytest.fail("gone")
    assert (e.state, e.cleared_ts) == ("raised", T0 + 100)
    # flapping: raised again (and again) while the event is unresolved -> the same event
    feed(up(1, T0 + 200, 9.5))
    feed(down(1, T0 + 300, since=T0 + 200), up(1, T0 + 400, 9.7))
    (e,) = store.events()
    assert (e.state, e.opened_ts, e.last_raised_ts, e.raises, e.value, e.cleared_ts) == (
        "raised",
        T0,
        T0 + 400,
        3,
        9.7,
        None,
    )
    assert [a for _, a, _, _ in history(store, e.id)] == [
        "raised",
        "cleared",
        "re-raised",
        "cleared",
        "re-raised",
    ]
    assert {u for u, _, _, _ in history(store, e.id)} == {"gateway"}
    # another point or rule, another event; a point up/meta never named has no key; a
    # stale rule's NaN value is None
    feed(up(2, T0 + 500, rule="low", sev="warning"), up(9, T0 + 600, math.nan, rule="stale"))
    newest = store.events()
    assert [(x.point_id, x.rule, x.key, x.value) for x in newest] == [
        (9, "stale", None, None),
        (2, "low", "bridge-7/strain_2", 9.0),
        (1, "high", "bridge-7/strain_1", 9.7),
    ]
    assert [x.id for x in newest] == sorted((x.id for x in newest), reverse=True)
    # once resolved, the next raise opens a new event; a clear without any event is nothing
    store.event_act(e.id, "resolve", "alice", e.opened_ms + 1)
    feed(up(1, T0 + 700), down(3, T0 + 800, since=T0))
    assert [(x.point_id, x.state) for x in store.events("open")] == [
        (1, "raised"),
        (9, "raised"),
        (2, "raised"),
    ]
    assert [x.id for x in store.events(state="resolved")] == [e.id]
    assert store.events(gateway="gw-2") == []
    assert [x.point_id for x in store.events(limit=2)] == [1, 9]
    assert [x.point_id for x in store.events(before_id=newest[0].id)] == [2, 1]
    with pytest.raises(ValueError, match="unknown event state 'bogus'"):
        store.events("bogus")


def test_raise_and_its_clear_in_one_call(store: Store) -> None:
    feed = Feed(store)
    # in one uplink
    feed(up(1, T0), down(1, T0 + 10, since=T0))
    # in two uplinks of one store_batches call
    items: list[tuple[str, Envelope, Any]] = [
        (GW, feed.envelope(1), AlarmBody([up(2, T0 + 20)])),
        (GW, feed.envelope(1), AlarmBody([down(2, T0 + 30, since=T0 + 20)])),
    ]
    assert store.store_batches(items) == [True, True]
    got = [(e.point_id, e.state, e.raises, e.cleared_ts) for e in store.events()]
    assert got == [(2, "raised", 1, T0 + 30), (1, "raised", 1, T0 + 10)]
    for e in store.events():
        assert [a for _, a, _, _ in history(store, e.id)] == ["raised", "cleared"]
    # a redelivered uplink is a duplicate: nothing folds
    assert store.store_batches(items) == [False, False]
    assert [e.raises for e in store.events()] == [1, 1]


def test_a_clear_after_the_operator_resolved_is_still_noted(store: Store) -> None:
    feed = Feed(store)
    feed(up(1, T0))
    (e,) = store.events()
    store.event_act(e.id, "resolve", "alice", e.opened_ms + 5, note="replaced the gauge")
    feed(down(1, T0 + 50, since=T0))
    e = store.event(e.id) or pytest.fail("gone")
    assert (e.state, e.cleared_ts, e.resolved_by) == ("resolved", T0 + 50, "alice")
    assert history(store, e.id)[-1] == ("gateway", "cleared", None, None)


# -- operators' actions ---------------------------------------------------------------------

#: (state, action) -> the state after it; every other pair is refused
ALLOWED = {
    ("raised", "ack"): "acknowledged",
    ("raised", "assign"): "handling",
    ("raised", "note"): "raised",
    ("raised", "resolve"): "resolved",
    ("acknowledged", "assign"): "handling",
    ("acknowledged", "note"): "acknowledged",
    ("acknowledged", "resolve"): "resolved",
    ("handling", "assign"): "handling",
    ("handling", "note"): "handling",
    ("handling", "resolve"): "resolved",
}
REFUSED = {
    ("acknowledged", "ack"): r"it is acknowledged \(by alice\)",
    ("handling", "ack"): r"it is handling, assigned to bob \(by alice\)",
    ("resolved", "ack"): r"it is resolved \(by alice\)",
    ("resolved", "assign"): r"it is resolved \(by alice\)",
    ("resolved", "note"): r"it is resolved \(by alice\)",
    ("resolved", "resolve"): r"it is resolved \(by alice\)",
}
#: how alice brings a fresh event to each state
TO_STATE: dict[str, list[tuple[str, dict[str, str]]]] = {
    "raised": [],
    "acknowledged": [("ack", {})],
    "handling": [("assign", {"assignee": "bob"})],
    "resolved": [("resolve", {})],
}
ARGS = {"ack": {}, "assign": {"assignee": "dave", "note": "yours"}, "note": {"note": "hm"}}


def test_every_transition_allowed_or_refused(store: Store) -> None:
    assert len(ALLOWED) + len(REFUSED) == 4 * 4
    feed = Feed(store)
    for i, (state, action) in enumerate([*ALLOWED, *REFUSED]):
        feed(up(1, T0 + i, rule=f"r{i}"))
        (e,) = store.events(state="raised")
        t = e.opened_ms + 1000
        for step, kwargs in TO_STATE[state]:
            e = store.event_act(e.id, step, "alice", t, **kwargs)
        assert e.state == state
        before, actions = e, history(store, e.id)
        kwargs = ARGS.get(action, {"note": "done"})
        if (state, action) in REFUSED:
            with pytest.raises(EventConflict, match=REFUSED[state, action]) as err:
                store.event_act(e.id, action, "carol", t + 500, **kwargs)
            assert str(err.value).startswith(f"cannot {action} event {e.id}: ")
            assert store.event(e.id) == before and history(store, e.id) == actions  # nothing
            continue
        after = store.event_act(e.id, action, "carol", t + 500, **kwargs)
        assert after == store.event(e.id)
        assert after.state == ALLOWED[state, action], (state, action)
        assert after.updated_ms == t + 500
        new = history(store, e.id)[len(actions) :]
        if action == "ack":
            assert (after.acked_by, after.acked_ms) == ("carol", t + 500)
            assert new == [("carol", "acknowledged", None, None)]
        elif action == "assign":
            assert after.assignee == "dave"
            if state == "raised":  # assigning acknowledges it too
                assert (after.acked_by, after.acked_ms) == ("carol", t + 500)
                assert new == [
                    ("carol", "acknowledged", None, None),
                    ("carol", "assigned", "dave", "yours"),
                ]
            else:
                assert (after.acked_by, after.acked_ms) == (before.acked_by, before.acked_ms)
                assert new == [("carol", "assigned", "dave", "yours")]
        elif action == "note":
            assert new == [("carol", "noted", None, "hm")]
            assert after == store.event(e.id)
        else:
            assert (after.resolved_by, after.resolved_ms) == ("carol", t + 500)
            assert new == [("carol", "resolved", None, "done")]
        if action != "assign":
            assert after.assignee == before.assignee
        if after.state != "resolved":  # the next round finds one raised event
            store.event_act(e.id, "resolve", "zed", t + 900)


def test_malformed_actions_and_unknown_events(store: Store) -> None:
    Feed(store)(up(1, T0))
    (e,) = store.events()
    with pytest.raises(StoreMissing, match=f"no event {e.id + 1000}"):
        store.event_act(e.id + 1000, "ack", "alice", T0)
    assert store.event(e.id + 1000) is None and store.event_actions(e.id + 1000) == []
    with pytest.raises(ValueError, match="unknown event action 'close'"):
        store.event_act(e.id, "close", "alice", T0)
    with pytest.raises(ValueError, match="assign needs an assignee"):
        store.event_act(e.id, "assign", "alice", T0, assignee=" ")
    with pytest.raises(ValueError, match="a note needs its text"):
        store.event_act(e.id, "note", "alice", T0)
    assert store.event(e.id) == e and len(store.event_actions(e.id)) == 1


# -- two store objects on one store (two consoles, two ingest workers) ----------------------


@pytest.fixture
def two_stores(store_url: str) -> Iterator[tuple[Store, Store]]:
    """Two store objects on the same database: two SqliteStore on one file, or two
    PostgresStore on one schema."""
    first = open_store(store_url)
    second = open_store(store_url)
    try:
        yield first, second
    finally:
        first.close()
        second.close()


def both_at_once(calls: list[Callable[[], Any]]) -> list[Any]:
    """Each call in its own thread, released together; its result or its exception."""
    gate = threading.Barrier(len(calls))

    def run(call: Callable[[], Any]) -> Any:
        gate.wait()
        try:
            return call()
        except Exception as e:
            return e

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def test_only_one_ack_wins(two_stores: tuple[Store, Store]) -> None:
    s1, s2 = two_stores
    feed = Feed(s1)
    for i in range(5):
        feed(up(1, T0 + i, rule=f"r{i}"))
    for e in s2.events():
        results = both_at_once(
            [
                partial(s1.event_act, e.id, "ack", "alice", e.opened_ms + 1),
                partial(s2.event_act, e.id, "ack", "bob", e.opened_ms + 2),
            ]
        )
        won = [r for r in results if isinstance(r, Event)]
        lost = [r for r in results if isinstance(r, EventConflict)]
        assert len(won) == 1 and len(lost) == 1, results
        winner = won[0].acked_by
        assert str(lost[0]).endswith(f"it is acknowledged (by {winner})")
        assert [a.action for a in s1.event_actions(e.id)] == ["raised", "acknowledged"]
        assert s2.event(e.id) == won[0]


def test_two_ingest_workers_open_one_event(two_stores: tuple[Store, Store]) -> None:
    s1, s2 = two_stores
    f1, f2 = Feed(s1, stream="stream-a"), Feed(s2, stream="stream-b")
    for i in range(5):  # the same raise on two streams (a replaced buffer), stored at once
        both_at_once([partial(feed, up(1, T0 + i, rule=f"r{i}")) for feed in (f1, f2)])
    events = s1.events()
    assert sorted(e.rule for e in events) == [f"r{i}" for i in range(5)]
    for e in events:
        assert (e.state, e.raises) == ("raised", 2)
        assert [a.action for a in s2.event_actions(e.id)] == ["raised", "re-raised"]


# -- summary ---------------------------------------------------------------------------------


def test_summary_figures(store: Store) -> None:
    feed = Feed(store)
    start = time.time_ns() // 1_000_000
    sev = ["critical", "warning", "warning", "info", "critical", "warning", "critical"]
    for i, s in enumerate(sev):
        feed(up(1, T0 + i, rule=f"r{i}", sev=s))
    e = {x.rule: x for x in store.events()}
    act = store.event_act

    def at(rule: str, ms: int) -> int:
        return e[rule].opened_ms + ms

    # time to ack: 1, 2, 3, 4 s (r3 by an assignment); to resolve: 5, 10, 60 s (r4 unacked)
    act(e["r0"].id, "ack", "a", at("r0", 1000))
    act(e["r1"].id, "ack", "a", at("r1", 2000))
    act(e["r2"].id, "ack", "a", at("r2", 4000))
    act(e["r3"].id, "assign", "a", at("r3", 3000), assignee="b")
    act(e["r0"].id, "resolve", "a", at("r0", 5000))
    act(e["r1"].id, "resolve", "a", at("r1", 60_000))
    act(e["r4"].id, "resolve", "a", at("r4", 10_000))
    act(e["r5"].id, "note", "a", at("r5", 7000), note="looking")
    got = store.event_summary(start)
    assert got == EventSummary(
        since_ms=start,
        open=4,
        open_by_state={"raised": 2, "acknowledged": 1, "handling": 1},
        open_by_severity={"critical": 1, "info": 1, "warning": 2},
        count=7,
        acked=4,
        resolved=3,
        ack_median_ms=2500.0,  # (2000 + 3000) / 2
        ack_p90_ms=3700.0,  # rank 2.7 of 0..3: 3000 + 0.7 * 1000
        resolve_median_ms=10_000.0,
        resolve_p90_ms=50_000.0,  # rank 1.8 of 0..2: 10000 + 0.8 * 50000
    )
    later = max(x.opened_ms for x in e.values()) + 1
    assert store.event_summary(later) == EventSummary(
        later, 4, got.open_by_state, got.open_by_severity, 0, 0, 0, None, None, None, None
    )


# -- prune -----------------------------------------------------------------------------------


def test_prune_drops_resolved_events_and_their_actions(store: Store) -> None:
    feed = Feed(store)
    now = time.time_ns() // 1_000_000
    day = 86_400_000
    for i in range(3):
        feed(up(1, now + i, rule=f"r{i}"))
    old, recent, active = (store.events(state="raised")[2 - i] for i in range(3))
    store.event_act(old.id, "note", "a", now - 11 * day, note="n")
    store.event_act(old.id, "resolve", "a", now - 10 * day)
    store.event_act(recent.id, "resolve", "a", now - day)
    store.event_act(active.id, "ack", "a", now - 20 * day)
    dropped = store.prune(now - 5 * day)
    assert (dropped["events"], dropped["event_actions"]) == (1, 3)
    assert store.event(old.id) is None and store.event_actions(old.id) == []
    assert [e.id for e in store.events()] == [active.id, recent.id]
    assert len(store.event_actions(recent.id)) == 2
    # the pruned event's key raises again: a new event
    feed(up(1, now + 10, rule="r0"))
    assert store.events()[0].rule == "r0" and store.events()[0].id > active.id


# -- change notification ---------------------------------------------------------------------


def test_change_marks_grow_with_their_kind(store: Store) -> None:
    marks = store.change_marks()
    assert set(marks) == {"readings", "alarms", "events", "gateways"}

    def moved() -> set[str]:
        nonlocal marks
        new = store.change_marks()
        assert all(new[k] >= marks[k] for k in marks), (marks, new)
        grown = {k for k in marks if new[k] > marks[k]}
        marks = new
        return grown

    b = make_batch(5)
    store.store_batch(GW, Envelope(wire.LANE_TELEMETRY, STREAM, 1, 5, b""), b)
    assert moved() == {"readings"}
    feed = Feed(store, stream="alarm-stream")
    feed(up(1, T0))
    assert moved() == {"alarms", "events"}
    feed(down(7, T0, since=T0))  # a clear of no event: only the alarm
    assert moved() == {"alarms"}
    (e,) = store.events()
    store.event_act(e.id, "ack", "alice", e.opened_ms)
    assert moved() == {"events"}
    with pytest.raises(EventConflict):
        store.event_act(e.id, "ack", "bob", e.opened_ms)
    assert moved() == set()
    store.store_meta(GW, meta())
    assert moved() == {"gateways"}
    store.store_state(GW, True, T0)
    assert moved() == {"gateways"}
    store.store_state(GW, True, T0 + 1)  # no change of state
    assert moved() == set()
    store.store_stats(GatewayStats(GW, T0, 1, 0, 0, 0, 0, 0))
    assert moved() == {"gateways"}
    store.store_stats(GatewayStats(GW, T0 - 1, 1, 0, 0, 0, 0, 0))  # older: ignored
    assert moved() == set()


def notices(listener: psycopg.Connection[Any], pid: int, until: str) -> list[str]:
    """The payloads on CHANGES_CHANNEL from backend `pid` (other tests share the
    database), up to and including the first `until`."""
    got: list[str] = []
    for n in listener.notifies(timeout=30):
        assert n.channel == CHANGES_CHANNEL
        if n.pid == pid:
            got.append(n.payload)
            if n.payload == until:
                return got
    pytest.fail(f"no {until!r} notification in 30 s; got {got}")


def test_postgres_notifies_alarms_events_and_readings(pg_url: str) -> None:
    store = cast(PostgresStore, open_store(pg_url))
    listener = psycopg.connect(split_url(pg_url)[0], autocommit=True)
    try:
        listener.execute(f"LISTEN {CHANGES_CHANNEL}")
        pid = store._db.info.backend_pid
        feed = Feed(store)
        feed(up(1, T0))
        assert notices(listener, pid, until="events") == ["alarms", "events"]
        feed(down(7, T0, since=T0))  # a clear of no event
        store.store_state(GW, True, T0)
        assert notices(listener, pid, until="gateways") == ["alarms", "gateways"]
        (e,) = store.events()
        store.event_act(e.id, "ack", "alice", e.opened_ms)
        with pytest.raises(EventConflict):  # rolled back: nothing sent
            store.event_act(e.id, "ack", "bob", e.opened_ms)
        store.store_state(GW, False, T0 + 1)
        assert notices(listener, pid, until="gateways") == ["events", "gateways"]
        # readings: at most once a second, whatever the number of batches
        start = time.monotonic()
        for seq in range(1, 41):
            b = make_batch(3, start_ts=T0 + seq * 10)
            store.store_batch(GW, Envelope(wire.LANE_TELEMETRY, "readings", seq, 3, b""), b)
        elapsed = time.monotonic() - start
        store.store_state(GW, True, T0 + 2)
        readings = notices(listener, pid, until="gateways")[:-1]
        assert set(readings) == {"readings"}
        assert 1 <= len(readings) <= 1 + elapsed
    finally:
        listener.close()
        store.close()
