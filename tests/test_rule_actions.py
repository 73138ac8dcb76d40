"""Local rule actions on the alarm lane: the wire (`encode_alarms`/`decode_alarms` with
"actions"), both stores' `rule_actions` table (stored once with the message's dedup key,
in order, pruned), the migration of a store from before it, the ingest's counters and
`citygw platform actions`."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from central.cli import app
from central.store import AlarmBody, Store, StoreMissing
from central.stores import open_store
from central.worker import IngestWorker
from common import wire
from common.wire import Envelope, RuleAction, RuleInput
from native.stages import AlarmEvent
from tests.helpers import GW, STREAM

T0 = 1_700_000_000_000
runner = CliRunner(env={"COLUMNS": "300", "NO_COLOR": "1"})

LEVEL = RuleInput("level", "underpass/level", 0.83, T0 - 500, 0)


def action(
    ts: int = T0,
    rule: str = "pump-on-flood",
    transition: str = "start",
    act: str = "write",
    outcome: str = "done",
    value: float = 1.0,
    written: float = 1.0,
    detail: str = "",
    inputs: tuple[RuleInput, ...] = (LEVEL,),
    attempts: int = 1,
    target: str = "pump/run",
) -> RuleAction:
    return RuleAction(
        rule, ts, transition, act, outcome, target, value, written, detail, inputs, attempts
    )


def raise_(ts: int = T0) -> AlarmEvent:
    return AlarmEvent(1, "high", "critical", True, ts, 0.9, ts)


def same(a: RuleAction, b: RuleAction) -> bool:
    """Equal, NaN equal to NaN (dataclass equality says NaN != NaN)."""

    def key(x: RuleAction) -> Any:
        return orjson.dumps(wire.rule_action_dict(x))

    return key(a) == key(b)


def alarm_body(actions: list[dict[str, Any]], events: list[Any] | None = None) -> bytes:
    return orjson.dumps({"v": 1, "gateway": GW, "events": events or [], "actions": actions})


def action_dict(**changes: Any) -> dict[str, Any]:
    return wire.rule_action_dict(action()) | changes


# -- wire ------------------------------------------------------------------------------


def test_round_trip_with_nan_empty_inputs_and_unicode() -> None:
    actions = [
        action(),
        action(
            act="",
            outcome="suppressed",
            value=math.nan,
            written=math.nan,
            detail="interlock: gate-open is on",
            inputs=(),
            attempts=0,
            target="",
        ),
        action(
            transition="override",
            act="",
            outcome="done",
            detail="operator Jürgen ☃",
            inputs=(RuleInput("Pegel", "Unterführung/Pegel", math.nan, 0, 3),),
            value=math.nan,
            written=math.nan,
            target="",
        ),
        action(
            act="publish",
            target="site/pump/cmd",
            value=math.nan,
            written=math.nan,
            detail='{"run": true}',
            ts=-1,
        ),
        action(outcome="failed", written=math.nan, detail="timeout", attempts=3),
    ]
    events = [raise_()]
    gateway, got_events, got = wire.decode_alarms(wire.encode_alarms(GW, events, actions))
    assert gateway == GW and got_events == events
    assert len(got) == len(actions) and all(same(a, b) for a, b in zip(got, actions, strict=True))
    assert math.isnan(got[1].value) and math.isnan(got[2].inputs[0].value)
    body = orjson.loads(wire.encode_alarms(GW, [], actions[1:2]))
    assert body["events"] == [] and body["actions"][0]["value"] is None
    assert body["actions"][0]["written"] is None and body["actions"][0]["inputs"] == []
    assert set(body["actions"][0]) == {
        "rule",
        "ts",
        "transition",
        "action",
        "outcome",
        "target",
        "value",
        "written",
        "detail",
        "attempts",
        "inputs",
    }
    # actions and no events
    assert wire.decode_alarms(wire.encode_alarms(GW, [], actions))[1] == []


def test_alarm_only_body_is_unchanged_and_an_old_body_decodes() -> None:
    events = [raise_()]
    old = orjson.dumps(
        {
            "v": 1,
            "gateway": GW,
            "events": [
                {
                    "point": 1,
                    "rule": "high",
                    "severity": "critical",
                    "state": "raise",
                    "ts": T0,
                    "value": 0.9,
                    "since": T0,
                }
            ],
        }
    )
    assert wire.encode_alarms(GW, events) == old == wire.encode_alarms(GW, events, [])
    assert wire.decode_alarms(old) == (GW, events, [])


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"rule": ""}, r"actions\[0\]: 'rule' must be a non-empty string"),
        ({"rule": 7}, r"actions\[0\]: 'rule' must be a non-empty string"),
        ({"rule": "a\x00b"}, r"actions\[0\]: 'rule' contains a NUL"),
        ({"detail": "x" * 1025}, r"'detail' is 1025 bytes long"),
        ({"target": None}, r"'target' must be a string"),
        ({"transition": "begin"}, r"'transition' must be one of 'start', 'stop'"),
        ({"transition": ["start"]}, r"'transition' must be one of"),
        ({"action": "delete"}, r"'action' must be one of 'write', 'publish', 'event', ''"),
        ({"outcome": "ok"}, r"'outcome' must be one of 'done', 'dry_run'"),
        ({"outcome": {}}, r"'outcome' must be one of"),
        ({"value": "1"}, r"'value' must be a number or null"),
        ({"written": True}, r"'written' must be a number or null"),
        ({"ts": 1.5}, r"'ts' must be an integer in"),
        ({"ts": 2**63}, r"'ts' must be an integer in"),
        ({"attempts": -1}, r"'attempts' must be an integer in 0\.\."),
        ({"attempts": None}, r"'attempts' must be an integer"),
        ({"inputs": None}, r"'inputs' must be a list"),
        ({"inputs": [1]}, r"actions\[0\] inputs\[0\]: must be an object"),
        (
            {"inputs": [wire.rule_input_dict(LEVEL)] * 65},
            r"'inputs' has 65 entries, at most 64 allowed",
        ),
        (
            {"inputs": [wire.rule_input_dict(LEVEL) | {"quality": 4}]},
            r"inputs\[0\]: 'quality' must be an integer in 0\.\.3",
        ),
        (
            {"inputs": [wire.rule_input_dict(LEVEL) | {"point": "d/\x00"}]},
            r"inputs\[0\]: 'point' contains a NUL",
        ),
        (
            {"inputs": [wire.rule_input_dict(LEVEL) | {"name": ""}]},
            r"inputs\[0\]: 'name' must be a non-empty string",
        ),
        (
            {"inputs": [wire.rule_input_dict(LEVEL) | {"value": [1]}]},
            r"inputs\[0\]: 'value' must be a number or null",
        ),
    ],
)
def test_strict_refusals(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(wire.WireError, match=match):
        wire.decode_alarms(alarm_body([action_dict(**changes)]))


def test_refusals_of_the_list_and_missing_fields() -> None:
    with pytest.raises(wire.WireError, match="'actions' must be a list"):
        wire.decode_alarms(orjson.dumps({"v": 1, "gateway": GW, "events": [], "actions": {}}))
    with pytest.raises(wire.WireError, match=r"actions\[1\]: must be an object"):
        wire.decode_alarms(alarm_body([action_dict(), "start"]))
    for field in wire.rule_action_dict(action()):
        body = action_dict()
        del body[field]
        with pytest.raises(wire.WireError, match=f"'{field}'"):
            wire.decode_alarms(alarm_body([body]))
    # 64 inputs are fine; so is a lone input of 0 (never read) and quality 3
    ok = [wire.rule_input_dict(RuleInput("n", "d/p", math.nan, 0, 3))] * 64
    (got,) = wire.decode_alarms(alarm_body([action_dict(inputs=ok)]))[2]
    assert len(got.inputs) == 64 and got.inputs[0].quality == 3


# -- stores ----------------------------------------------------------------------------


def alarm_env(seq: int, body: AlarmBody, stream: str = STREAM) -> Envelope:
    return Envelope(wire.LANE_ALARM, stream, seq, len(body), b"")


def test_store_round_trip_redelivery_and_order(store: Store) -> None:
    first = AlarmBody(
        [raise_()],
        [
            action(
                ts=T0,
                value=math.nan,
                written=math.nan,
                act="",
                outcome="suppressed",
                detail="interlock",
                inputs=(),
                attempts=0,
                target="",
            ),
            action(ts=T0 + 1, detail="Jürgen ☃", inputs=(LEVEL, RuleInput("x", "a/b", -2.5, 1, 2))),
        ],
    )
    assert store.store_batch(GW, alarm_env(1, first), first) is True
    # redelivered: stored nothing twice
    assert store.store_batch(GW, alarm_env(1, first), first) is False
    # actions and no events; the gateway's clock stepped back: the stream's order holds
    second = AlarmBody([], [action(ts=T0 - 60_000, transition="stop", value=0.0, written=0.0)])
    assert store.store_batch(GW, alarm_env(2, second), second) is True
    # another gateway, later, and a new stream of this gateway (its buffer was replaced)
    other = AlarmBody([], [action(ts=T0 + 10, rule="gate")])
    assert store.store_batch("gw-2", alarm_env(1, other), other) is True
    fresh_stream = uuid.UUID(int=0x99).hex
    third = AlarmBody([], [action(ts=T0 + 20, rule="pump-on-flood", transition="override")])
    assert store.store_batch(GW, alarm_env(1, third, fresh_stream), third) is True

    got = store.rule_actions()
    expected = [
        (GW, first.actions[0]),
        (GW, first.actions[1]),
        (GW, second.actions[0]),
        ("gw-2", other.actions[0]),
        (GW, third.actions[0]),
    ]
    assert [g for g, _ in got] == [g for g, _ in expected]
    assert all(same(a, b) for (_, a), (_, b) in zip(got, expected, strict=True))
    assert math.isnan(got[0][1].value) and math.isnan(got[0][1].written)
    assert got[1][1].inputs == first.actions[1].inputs
    assert [a.ts_ms for _, a in store.rule_actions(gateway=GW)] == [
        T0,
        T0 + 1,
        T0 - 60_000,
        T0 + 20,
    ]
    assert [g for g, _ in store.rule_actions(rule="gate")] == ["gw-2"]
    assert store.rule_actions(gateway="gw-2", rule="pump-on-flood") == []
    # the newest `limit`, newest last
    assert [a.ts_ms for _, a in store.rule_actions(limit=2)] == [T0 + 10, T0 + 20]
    # the alarm event went with them, once
    assert store.alarms(GW) == [raise_()]
    # several messages in one transaction, one of them again: stored once
    a4 = AlarmBody([], [action(ts=T0 + 30)])
    a5 = AlarmBody([], [action(ts=T0 + 31), action(ts=T0 + 32)])
    items = [(GW, alarm_env(4, a4), a4), (GW, alarm_env(5, a5), a5), (GW, alarm_env(4, a4), a4)]
    assert store.store_batches(items) == [True, True, False]
    assert [a.ts_ms for _, a in store.rule_actions(limit=3)] == [T0 + 30, T0 + 31, T0 + 32]
    assert len(store.rule_actions()) == 8
    # the change marks move when actions arrive
    marks = store.change_marks()
    a6 = AlarmBody([], [action(ts=T0 + 40)])
    store.store_batch(GW, alarm_env(6, a6), a6)
    if "sqlite" in type(store).__name__.lower():
        assert store.change_marks()["alarms"] > marks["alarms"]


def test_the_largest_rule_action_the_decoder_takes_is_stored(store: Store) -> None:
    text = "é" * 512  # 1024 bytes
    inputs = tuple(RuleInput(text, text, 1e308, -(2**63), 3) for _ in range(wire.MAX_RULE_INPUTS))
    big = action(rule=text, target=text, detail=text, inputs=inputs, attempts=2**32 - 1)
    body = wire.encode_alarms("g" * 64, [], [big])
    _, events, actions = wire.decode_alarms(body)
    alarm = AlarmBody(events, actions)
    assert store.store_batch("g" * 64, alarm_env(1, alarm), alarm)
    ((gateway, got),) = store.rule_actions()
    assert gateway == "g" * 64 and same(got, big)


def test_prune_drops_old_actions(store: Store) -> None:
    body = AlarmBody([], [action(ts=T0 - 10), action(ts=T0 + 10)])
    store.store_batch(GW, alarm_env(1, body), body)
    dropped = store.prune(T0)
    assert dropped["rule_actions"] == 1
    assert [a.ts_ms for _, a in store.rule_actions()] == [T0 + 10]


def test_sqlite_store_before_rule_actions_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    open_store(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as db:  # as a citygw before local rules left it
        db.execute("DROP TABLE rule_actions")
    with pytest.raises(StoreMissing, match="older citygw"):  # readers change nothing
        open_store(f"sqlite:///{path}", create=False)
    store = open_store(f"sqlite:///{path}")  # the ingest upgrades it
    try:
        body = AlarmBody([], [action()])
        assert store.store_batch(GW, alarm_env(1, body), body)
    finally:
        store.close()
    reader = open_store(f"sqlite:///{path}", create=False)
    try:
        assert [a.rule for _, a in reader.rule_actions()] == ["pump-on-flood"]
    finally:
        reader.close()


def test_postgres_upgrades_a_version_5_schema(pg_url: str) -> None:
    import psycopg
    from psycopg import sql

    from central.store_postgres import SCHEMA_VERSION, split_url

    open_store(pg_url).close()
    conninfo, schema = split_url(pg_url)
    with psycopg.connect(conninfo, autocommit=True) as db:  # as a citygw before local rules
        ident = sql.Identifier(schema)
        db.execute(sql.SQL("DROP TABLE {}.rule_actions").format(ident))
        db.execute(sql.SQL("UPDATE {}.schema_info SET version = 5").format(ident))
    with pytest.raises(StoreMissing, match="at version 5"):  # readers change nothing
        open_store(pg_url, create=False)
    open_store(pg_url).close()  # the ingest upgrades it
    store = open_store(pg_url, create=False)
    try:
        assert SCHEMA_VERSION == 6 and store.rule_actions() == []
    finally:
        store.close()
    store = open_store(pg_url)
    try:
        body = AlarmBody([], [action()])
        assert store.store_batch(GW, alarm_env(1, body), body)
        assert len(store.rule_actions(GW)) == 1
    finally:
        store.close()


# -- the ingest ------------------------------------------------------------------------


def test_ingest_stores_counts_and_logs_actions(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    worker = IngestWorker("mqtt://127.0.0.1", store, group=None)
    actions = [action(), action(ts=T0 + 1, outcome="suppressed", act="", detail="override")]
    payload = wire.encode_alarms(GW, [raise_()], actions)
    uplink = wire.wrap(wire.LANE_ALARM, STREAM, 1, 3, payload)
    only_actions = wire.wrap(wire.LANE_ALARM, STREAM, 2, 1, wire.encode_alarms(GW, [], actions[:1]))
    old_count = wire.wrap(wire.LANE_ALARM, STREAM, 3, 1, payload)  # n_points must count both

    async def body() -> None:
        for payload in (uplink, uplink, only_actions, old_count):
            await worker.deliver(wire.alarm_topic(GW), payload)

    with caplog.at_level(logging.INFO, logger="citygw.ingest"):
        asyncio.run(body())
    c = worker.counters
    assert (c.batches_stored, c.alarms_stored, c.actions_stored) == (2, 1, 3)
    assert c.duplicates_dropped == 1 and c.rejected == {"n_points": 1}
    assert len(store.rule_actions(GW)) == 3 and len(store.alarms(GW)) == 1
    logged = [r for r in caplog.records if r.getMessage() == "ingest: rule action stored"]
    assert len(logged) == 3
    r = logged[1]
    assert (r.gateway, r.rule, r.transition, r.action, r.outcome) == (  # type: ignore[attr-defined]
        GW,
        "pump-on-flood",
        "start",
        "",
        "suppressed",
    )


# -- citygw platform actions -------------------------------------------------------------


def test_cli_actions(store_url: str) -> None:
    store = open_store(store_url)
    try:
        a = AlarmBody(
            [],
            [
                action(inputs=(LEVEL, RuleInput("gate", "gate/open", math.nan, 0, 3))),
                action(
                    ts=T0 + 1_000,
                    transition="stop",
                    act="",
                    outcome="suppressed",
                    value=math.nan,
                    written=math.nan,
                    detail="interlock: gate open",
                    inputs=(),
                    attempts=0,
                    target="",
                ),
            ],
        )
        store.store_batch(GW, alarm_env(1, a), a)
        b = AlarmBody([], [action(ts=T0 + 2_000, rule="gate-close", target="gate/cmd")])
        store.store_batch("gw-2", alarm_env(1, b), b)
    finally:
        store.close()

    result = runner.invoke(app, ["actions", "--db", store_url])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "3 rule actions (newest last)" in out
    for text in (
        "pump-on-flood",
        "gate-close",
        "suppressed",
        "interlock: gate open",
        "level=0.83",
        "gate=none (unavailable)",
        "pump/run",
    ):
        assert text in out, text
    assert out.index("interlock") < out.index("gate-close")

    result = runner.invoke(app, ["actions", "--db", store_url, "--gateway", GW, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [d["transition"] for d in data] == ["start", "stop"]
    assert data[0]["gateway"] == GW and data[0]["time"].startswith("2023-11-14T22:13:20")
    assert data[0]["inputs"][1] == {
        "name": "gate",
        "point": "gate/open",
        "value": None,
        "ts": 0,
        "quality": 3,
    }
    assert data[1]["value"] is None and data[1]["action"] == "" and data[1]["attempts"] == 0

    result = runner.invoke(app, ["actions", "--db", store_url, "--rule", "gate-close", "--json"])
    assert [d["gateway"] for d in json.loads(result.stdout)] == ["gw-2"]
    result = runner.invoke(app, ["actions", "--db", store_url, "--limit", "1", "--json"])
    assert [d["rule"] for d in json.loads(result.stdout)] == ["gate-close"]
    result = runner.invoke(app, ["actions", "--db", store_url, "--rule", "nothing"])
    assert result.exit_code == 0 and "0 rule actions (newest last): none" in result.stdout


def test_cli_actions_never_creates_a_store(tmp_path: Path) -> None:
    path = tmp_path / "none.db"
    result = runner.invoke(app, ["actions", "--db", f"sqlite:///{path}"])
    assert result.exit_code == 2 and not path.exists()
