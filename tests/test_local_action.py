"""Derived points and local rules in the running agent (agent/local_action.py): the
rule acts through the driver with the uplink down, its actions reach the buffer's alarm
lane with their inputs, its state survives a restart, and the platform can take it
over. The HIL scenario `local-action` does the same against a Modbus device."""

from __future__ import annotations

import asyncio
import io
import math
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console

from agent.config import parse_config
from agent.runtime import Agent
from agent.status import collect, render_inspect, render_status
from buffer import Buffer, Lane
from common import wire
from common.broker import free_port
from native import codec
from native.batch import BAD, GOOD
from tests.helpers import wait_until
from tests.test_metrics import Families, scrape, value


def config(
    buffer: Path, rule: str = "", level: float = 1.0, derived: str = "", metrics_port: int = 0
) -> str:
    # port 9 (discard) on loopback: the uplink never connects, as with a dead LTE link
    return f"""
[gateway]
id = "gw-la"
[uplink]
broker = "mqtt://127.0.0.1:9"
[buffer]
path = "{buffer}"
flush_interval = "100ms"
[metrics]
enabled = {"true" if metrics_port else "false"}
port = {metrics_port or 9465}
[[devices]]
name = "underpass"
driver = "sim"
poll = "50ms"
  [[devices.points]]
  name = "level"
  unit = "m"
  base = {level}
  [[devices.points]]
  name = "pump"
  writable = true
  min = 0
  max = 1
  [[devices.points]]
  name = "hand"
{derived}
[[rules]]
id = "pump"
inputs = {{ level = "underpass/level" }}
when = "level > 0.8"
until = "level < 0.3"
min_on = "1h"
retry_delay = "10ms"
start = [
  {{ write = "underpass/pump", value = 1 }},
  {{ event = "underpass flooding" }},
]
stop = [{{ write = "underpass/pump", value = 0 }}]
{rule}
"""


def buffered(
    path: Path,
) -> tuple[list[wire.RuleAction], list[tuple[int, float, int]], dict[str, int]]:
    """The rule actions and the readings (point id, value, quality) the buffer holds,
    in sending order, and the registry."""
    with Buffer(path, 1 << 30) as buffer:
        messages = buffer.peek(10_000)
        ids = {p["key"]: p["id"] for p in buffer.registry.all()}
    actions: list[wire.RuleAction] = []
    readings: list[tuple[int, float, int]] = []
    for m in messages:
        if m.lane == Lane.ALARM:
            actions += wire.decode_alarms(m.payload)[2]
        else:
            readings += [(p, v, q) for p, _, v, q in codec.decode(m.payload).rows()]
    return actions, readings, ids


def actions_in(path: Path) -> list[wire.RuleAction]:
    return buffered(path)[0]


async def start(text: str) -> Agent:
    agent = Agent(parse_config(text, source="t.toml"))
    await agent.start()
    return agent


def pump_value(agent: Agent) -> float | None:
    assert agent.local is not None
    last = agent.local.engine.last(agent.points["underpass/pump"].id)
    return None if last is None else last[0]


def test_a_rule_starts_the_pump_through_the_driver_with_the_link_down(tmp_path: Path) -> None:
    path = tmp_path / "buf.db"
    derived = """
[[derived]]
name = "inflow"
unit = "m3/h"
inputs = { h = "underpass/level", pump = "underpass/pump" }
expr = "interp(h, [0, 1, 2], [0, 40, 160]) * if(pump > 0, 0.5, 1)"
"""

    port = free_port()

    async def scenario() -> tuple[dict[str, Any], Families]:
        agent = await start(config(path, derived=derived, metrics_port=port))
        try:
            await wait_until(lambda: pump_value(agent) == 1.0)  # polled after the write
            await asyncio.sleep(0.2)
            assert agent.uplink is not None and agent.uplink.status.state != "online"
            snapshot = agent.snapshot()
            families = await asyncio.to_thread(scrape, f"http://127.0.0.1:{port}/metrics")
        finally:
            await agent.stop()
        return snapshot, families

    snapshot, families = asyncio.run(scenario())
    assert value(families, "citygw_rule_actions_total", outcome="done") == 2
    assert value(families, "citygw_rule_actions_total", outcome="failed") == 0
    assert value(families, "citygw_rule_active", rule="pump") == 1
    # scraped after the snapshot, while the level is still polled
    assert value(families, "citygw_derived_readings_total") >= snapshot["local"]["derived"] > 0
    # `citygw status` shows the rule from the buffer's status snapshot
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(render_status(*collect(path)))
    text = console.export_text().split("rules (local action)", 1)[1]
    row = next(line for line in text.splitlines() if "│ pump" in line)
    assert "│ on " in row and "holds" in row and "start: write underpass/pump done" in text
    # and `citygw buffer inspect` the buffered actions
    console = Console(width=300, record=True, file=io.StringIO())
    console.print(render_inspect(path))
    assert "rule pump: start write done, rule pump: start event done" in console.export_text()
    rule = snapshot["rules"]["pump"]
    assert rule["state"] == "on" and rule["condition"] is True
    assert [a["action"] for a in rule["last_actions"]] == ["write", "event"]
    actions = actions_in(path)
    assert [(a.transition, a.action, a.outcome) for a in actions] == [
        ("start", "write", "done"),
        ("start", "event", "done"),
    ]
    write = actions[0]
    assert (write.target, write.value, write.written, write.attempts) == ("underpass/pump", 1, 1, 1)
    [level] = write.inputs
    assert (level.name, level.point, level.value, level.quality) == (
        "level",
        "underpass/level",
        1.0,
        GOOD,
    )
    assert actions[1].detail == "underpass flooding"
    # the derived point went to the buffer like any other, 40 m3/h before the pump ran
    # and 20 m3/h after
    _, readings, ids = buffered(path)
    assert {v for p, v, q in readings if p == ids["derived/inflow"] and q == GOOD} == {40.0, 20.0}


def test_the_rule_state_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "buf.db"

    async def scenario() -> tuple[bool, int]:
        agent = await start(config(path))
        await wait_until(lambda: agent.local is not None and agent.local.rules[0].state.active)
        await agent.stop()
        # the level falls while the agent is away; min_on (1 h) holds the pump on
        again = await start(config(path, level=0.1))
        try:
            await asyncio.sleep(0.5)
            assert again.local is not None
            rule = again.local.rules[0]
            return rule.state.active, len(rule.state.starts)
        finally:
            await again.stop()

    active, starts = asyncio.run(scenario())
    assert (active, starts) == (True, 1)
    actions = actions_in(path)
    assert [(a.transition, a.outcome) for a in actions][:2] == [("start", "done")] * 2
    stop = [a for a in actions if a.transition == "stop"]
    assert stop and stop[0].outcome == "suppressed" and stop[0].detail.startswith("min_on: ")


def test_a_failed_write_is_retried_then_reported(tmp_path: Path) -> None:
    path = tmp_path / "buf.db"
    text = config(path).replace('name = "pump"\n  writable', 'name = "pump"\n  writable')
    # the sim driver takes no writes on a device that replays its polls
    text = text.replace('poll = "50ms"\n', 'poll = "50ms"\nreplay = 4\n', 1)

    async def scenario() -> None:
        agent = await start(text)
        try:
            await wait_until(lambda: bool(agent.local and agent.local.counters["failed"]))
        finally:
            await agent.stop()

    asyncio.run(scenario())
    write = actions_in(path)[0]
    assert (write.action, write.outcome, write.attempts) == ("write", "failed", 3)
    assert "replays pre-sampled polls" in write.detail
    assert math.isnan(write.written)


def test_the_platform_overrides_a_rule_and_releases_it(tmp_path: Path) -> None:
    path = tmp_path / "buf.db"

    async def command(agent: Agent, override: bool) -> dict[str, Any]:
        body = {"id": f"c-{override}", "op": "rule_override", "rule": "pump", "override": override}
        answer = await agent.handle_command(orjson.dumps(body))
        assert answer is not None
        return orjson.loads(answer)  # type: ignore[no-any-return]

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        agent = Agent(parse_config(config(path), source="t.toml"))
        await agent.start()
        try:
            taken = await command(agent, True)  # before the first poll's decision
            await asyncio.sleep(0.5)
            released = await command(agent, False)
            await wait_until(lambda: agent.local is not None and agent.local.rules[0].state.active)
            unknown = await agent.handle_command(
                orjson.dumps({"id": "c-x", "op": "rule_override", "rule": "nope", "override": True})
            )
            assert unknown is not None and b"unknown rule 'nope'; rules: pump" in unknown
        finally:
            await agent.stop()
        return taken, released

    taken, released = asyncio.run(scenario())
    assert taken["ok"] and released["ok"]
    actions = actions_in(path)
    kinds = [(a.transition, a.action, a.outcome) for a in actions]
    assert kinds[:3] == [
        ("override", "", "done"),
        ("start", "", "suppressed"),
        ("release", "", "done"),
    ]
    assert actions[0].detail == "platform (command c-True)"
    assert kinds[3:] == [("start", "write", "done"), ("start", "event", "done")]


def test_dry_run_says_what_it_would_do(tmp_path: Path) -> None:
    path = tmp_path / "buf.db"
    text = config(path).replace('min_on = "1h"', 'min_on = "1h"\ndry_run = true')

    async def scenario() -> None:
        agent = await start(text)
        try:
            await wait_until(lambda: bool(agent.local and agent.local.counters["done"] >= 2))
            await asyncio.sleep(0.3)
        finally:
            await agent.stop()

    asyncio.run(scenario())
    actions, readings, ids = buffered(path)
    pump = [v for p, v, _ in readings if p == ids["underpass/pump"]]
    assert len(pump) > 5 and set(pump) == {0.0}  # never written
    assert [(a.action, a.outcome) for a in actions] == [
        ("write", "dry_run"),
        ("event", "dry_run"),
    ]


def test_a_stale_input_makes_the_derived_point_bad(tmp_path: Path) -> None:
    """The door is polled every 300 ms, the level every 50 ms: the derived reading turns
    BAD once the door's last reading is older than max_age (100 ms), GOOD again at the
    next."""
    path = tmp_path / "buf.db"
    derived = """
[[devices]]
name = "cabinet"
driver = "sim"
poll = "300ms"
  [[devices.points]]
  name = "door"
  base = 1.0

[[derived]]
name = "open_and_flooded"
type = "bool"
inputs = { h = "underpass/level", door = "cabinet/door" }
expr = "h > 0.8 and door > 0"
max_age = "100ms"
"""

    async def scenario() -> None:
        agent = await start(config(path, derived=derived))
        await asyncio.sleep(1.0)
        await agent.stop()

    asyncio.run(scenario())
    _, rows, ids = buffered(path)
    readings = [(v, q) for p, v, q in rows if p == ids["derived/open_and_flooded"]]
    # BAD until the door's first reading (never seen: no value), GOOD while it is fresh,
    # BAD once it is older than max_age, never silently old
    assert (1.0, GOOD) in readings
    first_good = readings.index((1.0, GOOD))
    assert all(q == BAD for _, q in readings[:first_good])
    assert (1.0, BAD) in readings[first_good:]


def test_a_window_goes_on_across_a_restart(tmp_path: Path) -> None:
    """The derive engine's state is saved at a stop: a count over the last hour counts on
    where it stopped instead of from zero."""
    path = tmp_path / "buf.db"
    derived = """
[[derived]]
name = "polls"
inputs = { h = "underpass/level" }
expr = "count_over(h, 1h)"
"""

    async def run_once() -> None:
        agent = await start(config(path, derived=derived))
        await asyncio.sleep(0.5)
        await agent.stop()

    asyncio.run(run_once())
    _, rows, ids = buffered(path)
    before = [v for p, v, _ in rows if p == ids["derived/polls"]]
    asyncio.run(run_once())
    _, rows, _ = buffered(path)
    after = [v for p, v, _ in rows if p == ids["derived/polls"]][len(before) :]
    assert before[-1] >= 5 and after[0] == before[-1] + 1


def test_an_action_carries_the_inputs_its_rule_decided_on() -> None:
    """A stop decided while the start's slow write is under way waits behind it; its
    event still carries the level that decided it, not a later poll's."""
    from types import SimpleNamespace

    from agent.local_action import LocalAction
    from agent.local_config import RuleConfig
    from drivers.base import NoSettings, PointSpec
    from native.batch import Batch

    rule = RuleConfig.model_validate(
        {
            "id": "pump",
            "inputs": {"level": "u/level"},
            "when": "level > 0.8",
            "start": [{"write": "u/pump", "value": 1}],
            "stop": [{"write": "u/pump", "value": 0}],
        }
    )
    pump = PointSpec(2, "u/pump", "pump", "", "bool", writable=True, settings=NoSettings())
    recorded: list[wire.RuleAction] = []

    async def slow_write(point: PointSpec, value: float) -> float:
        await asyncio.sleep(0.3)
        return value

    async def publish(*args: object) -> None:
        raise AssertionError("no publish here")

    async def append(actions: list[wire.RuleAction], state: dict[str, bytes]) -> None:
        recorded.extend(actions)

    async def scenario() -> None:
        local = LocalAction(
            SimpleNamespace(rules=[rule], derived=[]),
            {"u/level": 1, "u/pump": 2},
            lambda key: pump if key == "u/pump" else None,
            slow_write,
            publish,
            append,
        )
        task = asyncio.create_task(local.run())
        for t, level in ((1000, 1.0), (1100, 0.1), (1200, 1.0)):
            local.process(Batch.from_rows([(1, t, level, GOOD)]))
            await asyncio.sleep(0.1)
        assert await local.idle(5.0)
        task.cancel()

    asyncio.run(scenario())
    assert [(a.transition, a.inputs[0].value) for a in recorded] == [
        ("start", 1.0),
        ("stop", 0.1),
        ("start", 1.0),
    ]


def test_a_failure_of_the_engine_costs_the_derived_readings_never_the_batch() -> None:
    from types import SimpleNamespace

    from agent.local_action import LocalAction
    from agent.runtime import Counters, MemoryQueue
    from native.batch import Batch

    async def unused(*args: object) -> Any:
        raise AssertionError("no action here")

    local = LocalAction(SimpleNamespace(rules=[], derived=[]), {}, lambda key: None, *[unused] * 3)

    def broken(batch: Batch) -> Any:
        raise RuntimeError("a bug in a kernel")

    local.engine.process = broken  # type: ignore[method-assign]
    counters = Counters()
    queue = MemoryQueue(100, counters)
    queue.derive = local.process
    assert queue.push(Batch.from_rows([(1, 1000, 1.0, GOOD), (2, 1000, 2.0, GOOD)]))
    assert [len(h.batch) for h in queue.take()] == [2] and counters.read == 2
    assert local.counters["errors"] == 1
    assert local.last_error == "RuntimeError: a bug in a kernel"


def test_a_reload_changes_rules_and_derived_points_and_keeps_the_rule_state(
    tmp_path: Path,
) -> None:
    """A reload (SIGHUP, citygw reload, a config push) takes new rules and derived points
    live: the running rule keeps its state (the pump is on whatever the new config says;
    its start counts against the new hourly limit), a new derived point starts."""
    path = tmp_path / "buf.db"
    new_derived = """
[[derived]]
name = "double"
inputs = { h = "underpass/level" }
expr = "2 * h"
"""

    async def scenario() -> tuple[bool, int, int]:
        agent = await start(config(path))
        try:
            await wait_until(lambda: agent.local is not None and agent.local.rules[0].state.active)
            changed = config(path, derived=new_derived).replace(
                'min_on = "1h"', 'min_on = "2h"\nmax_starts_per_hour = 2'
            )
            diff = await agent.reload(parse_config(changed, source="t.toml"), source="test")
            assert diff.restart_needed == []
            local = agent.local
            assert local is not None
            rule = local.rules[0]
            assert rule.config.max_starts_per_hour == 2
            await wait_until(lambda: local.counters["derived"] > 3)
            return rule.state.active, len(rule.state.starts), local.counters["derived"]
        finally:
            await agent.stop()

    active, starts, derived = asyncio.run(scenario())
    assert (active, starts) == (True, 1) and derived > 0
    actions = actions_in(path)
    # one start only: the reload did not start the pump again
    assert [(a.transition, a.action) for a in actions] == [("start", "write"), ("start", "event")]
    _, rows, ids = buffered(path)
    assert {v for p, v, _ in rows if p == ids["derived/double"]} == {2.0}


def test_an_alarm_rule_acts_on_its_alarm_with_the_reading_that_raised_it() -> None:
    from types import SimpleNamespace

    from agent.local_action import LocalAction
    from agent.local_config import RuleConfig
    from native.stages import AlarmEvent

    rule = RuleConfig.model_validate(
        {
            "id": "sign",
            "alarm": "flood",
            "alarm_point": "u/level",
            "start": [{"event": "FLOODED"}],
            "stop": [{"event": "clear"}],
        }
    )
    recorded: list[wire.RuleAction] = []

    async def unused(*args: object) -> Any:
        raise AssertionError("no write or publish here")

    async def append(actions: list[wire.RuleAction], state: dict[str, bytes]) -> None:
        recorded.extend(actions)

    async def scenario() -> None:
        local = LocalAction(
            SimpleNamespace(rules=[rule], derived=[]), {}, lambda key: None, unused, unused, append
        )
        task = asyncio.create_task(local.run())
        key_of = {7: "u/level", 8: "u/other"}
        other = AlarmEvent(8, "flood", "critical", True, 1000, 9.0, 900)  # not its point
        local.on_alarms([other], key_of)
        local.on_alarms([AlarmEvent(7, "flood", "critical", True, 2000, 6.6, 1500)], key_of)
        local.on_alarms([AlarmEvent(7, "flood", "critical", False, 3000, 6.1, 2000)], key_of)
        assert await local.idle(5.0)
        task.cancel()

    asyncio.run(scenario())
    assert [(a.transition, a.detail) for a in recorded] == [
        ("start", "FLOODED"),
        ("stop", "clear"),
    ]
    assert recorded[0].inputs == (wire.RuleInput("flood", "u/level", 6.6, 2000, GOOD),)
    assert recorded[1].inputs == (wire.RuleInput("flood", "u/level", 6.1, 3000, GOOD),)
