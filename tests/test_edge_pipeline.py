"""The edge pipeline inside the agent: stages from the config, alarms on their own lane
to the platform, aggregate series in the registry, state across a restart and across a
failed flush. The uplink is the in-process link to a real ingest (no broker needed)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.runtime import Agent, point_meta
from buffer import Buffer, BufferWriteError
from central.cli import quality_name
from central.store import Store
from central.stores import open_store
from central.worker import IngestWorker
from cli.loopback import LoopbackLink
from drivers.modbus.simulator import ModbusSimulator, RegisterImage
from native.batch import BAD, UNAVAILABLE

GW = "gw-edge"


def config(buffer: Path, points: str, poll: str = "50ms") -> str:
    return f"""
[gateway]
id = "{GW}"
[uplink]
broker = "mqtt://127.0.0.1"
backoff_min = "50ms"
stats_interval = "100ms"
[buffer]
path = "{buffer}"
flush_interval = "100ms"
[[devices]]
name = "kerb"
driver = "sim"
poll = "{poll}"
{points}
"""


POINTS = """
  [[devices.points]]
  name = "level"
  unit = "m"
  base = 3.0
  pipeline = [
    { type = "threshold", id = "low-water", below = 5.0, severity = "critical" },
    { type = "deadband", band = 0.5 },
  ]
  [[devices.points]]
  name = "noise"
  unit = "dB(A)"
  base = 60.0
  pipeline = [{ type = "aggregate", window = "200ms", functions = ["laeq", "count"], grace = "0s" }]
"""


async def run_agent(buffer: Path, store: Store, points: str, seconds: float) -> Agent:
    worker = IngestWorker("mqtt://127.0.0.1", store, group=None)
    cfg = parse_config(config(buffer, points), source="edge.toml")
    agent = Agent(cfg, connect=LoopbackLink(worker.deliver).connect)
    await agent.start()
    await asyncio.sleep(seconds)
    await agent.stop_drivers()
    # the last aggregate window closes by the clock: its end (grace 0) after its first
    # reading arrived, so up to a flush interval (100 ms) after the end itself
    await asyncio.sleep(0.4)
    await agent.flush()
    assert await agent.drain(timeout=10)
    await agent.stop()
    return agent


def test_alarms_aggregates_and_deadband_reach_the_platform(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'platform.db'}")
    agent = asyncio.run(run_agent(tmp_path / "buf.db", store, POINTS, 1.5))
    ids = {m["key"]: i for i, m in enumerate(point_meta(agent.config), start=1)}
    assert list(ids) == ["kerb/level", "kerb/noise", "kerb/noise:laeq", "kerb/noise:count"]
    c = agent.counters
    # the level never moves: its deadband sends the first reading only
    level = store.readings(GW, "kerb/level")
    assert [v for _, _, v, _ in level] == [3.0]
    # the raise went on the alarm lane, once, with its rule and severity
    (alarm,) = store.alarms(GW)
    assert (alarm.point_id, alarm.rule, alarm.severity, alarm.raised) == (
        ids["kerb/level"],
        "low-water",
        "critical",
        True,
    )
    assert alarm.value == 3.0 and alarm.ts_ms == level[0][1]
    assert (c.alarms_raised, c.alarms_cleared) == (1, 0)
    # noise is sent only as its aggregate series, one reading per 200 ms window
    assert store.readings(GW, "kerb/noise") == []
    laeq = store.readings(GW, "kerb/noise:laeq")
    count = store.readings(GW, "kerb/noise:count")
    assert len(laeq) == len(count) == c.windows >= 5
    assert all(ts % 200 == 0 and v == pytest.approx(60.0) for _, ts, v, _ in laeq)
    n_noise = c.read // 2
    assert sum(v for _, _, v, _ in count) == n_noise  # every noise reading in one window
    assert c.sent == len(level) + len(laeq) + len(count) == store.counts().readings
    # all but the level's first reading were held back (the latest may still be held)
    assert c.read - 2 <= c.suppressed <= c.read - 1
    # the gateway's buffer counters reached the platform (retained up/stats)
    stats = store.stats(GW)
    assert stats is not None and stats.gateway == GW
    assert stats.evicted_points == stats.lost_points == 0
    assert 0 < stats.appended_points <= c.sent + c.alarms_raised
    store.close()


def test_stage_state_survives_a_restart(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'platform.db'}")
    buf = tmp_path / "buf.db"
    first = asyncio.run(run_agent(buf, store, POINTS, 0.6))
    with Buffer.open_readonly(buf) as b:
        saved = b.pipeline_state()
    assert any(":deadband:" in k for k in saved) and any(":alarm:" in k for k in saved)
    second = asyncio.run(run_agent(buf, store, POINTS, 0.6))
    assert second.counters.read > 0
    # the deadband resumed at the value it last sent, the alarm stayed raised
    assert [v for _, _, v, _ in store.readings(GW, "kerb/level")] == [3.0]
    assert len(store.alarms(GW)) == first.counters.alarms_raised == 1
    assert second.counters.alarms_raised == 0
    # a changed stage spec does not resume the old state: the deadband starts afresh
    changed = POINTS.replace("band = 0.5", "band = 0.25")
    asyncio.run(run_agent(buf, store, changed, 0.3))
    assert [v for _, _, v, _ in store.readings(GW, "kerb/level")] == [3.0, 3.0]
    store.close()


def test_failed_flush_keeps_the_pipeline_output_not_its_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readings go through the stateful stages once: after a failed append their output
    (not the raw readings) waits in memory, so nothing is suppressed or counted twice."""
    store = open_store(f"sqlite:///{tmp_path / 'platform.db'}")

    async def scenario() -> Agent:
        worker = IngestWorker("mqtt://127.0.0.1", store, group=None)
        cfg = parse_config(config(tmp_path / "buf.db", POINTS), source="edge.toml")
        agent = Agent(cfg, connect=LoopbackLink(worker.deliver).connect)
        await agent.start()
        assert agent.buffer is not None
        real = agent.buffer.append_many

        def disk_full(*args: object, **kwargs: object) -> list[int]:
            raise BufferWriteError("database or disk is full")

        monkeypatch.setattr(agent.buffer, "append_many", disk_full)
        await asyncio.sleep(0.6)  # several flushes fail
        assert agent.counters.sent == 0 and agent._pending_alarms
        monkeypatch.setattr(agent.buffer, "append_many", real)
        await agent.stop_drivers()
        await asyncio.sleep(0.4)
        await agent.flush()
        assert await agent.drain(timeout=10)
        await agent.stop()
        return agent

    agent = asyncio.run(scenario())
    assert [v for _, _, v, _ in store.readings(GW, "kerb/level")] == [3.0]
    assert len(store.alarms(GW)) == 1
    count = store.readings(GW, "kerb/noise:count")
    assert sum(v for _, _, v, _ in count) == agent.counters.read // 2
    store.close()


MODBUS_DEVICE = """
[gateway]
id = "{gw}"
[uplink]
broker = "mqtt://127.0.0.1"
backoff_min = "50ms"
[buffer]
path = "{buffer}"
flush_interval = "100ms"
[[devices]]
name = "station"
driver = "modbus"
host = "127.0.0.1"
port = {port}
poll = "50ms"
timeout = "2s"
  [[devices.points]]
  name = "temperature"
  unit = "°C"
  address = 0
  datatype = "int32"
  scale = 0.1
  invalid = [0x7FFFFFFF]
  pipeline = [{{ type = "range", min = -40.0, max = 60.0, action = "flag" }}]
  [[devices.points]]
  name = "humidity"
  unit = "%"
  address = 2
  datatype = "int32"
  scale = 0.1
  invalid = [0x7FFFFFFF]
  pipeline = [{{ type = "range", min = 0.0, max = 100.0, action = "drop" }}]
  [[devices.points]]
  name = "pressure"
  unit = "hPa"
  address = 4
  datatype = "int32"
  scale = 0.1
  pipeline = [{{ type = "range", min = 800.0, max = 1100.0, action = "flag" }}]
  [[devices.points]]
  name = "wind"
  unit = "m/s"
  address = 6
  datatype = "float32"
  pipeline = [{{ type = "range", min = 0.0, max = 75.0, action = "drop" }}]
"""


def test_a_not_available_marker_reaches_the_platform_as_unavailable(tmp_path: Path) -> None:
    """Issue 13: a weather station's 0x7FFFFFFF ("no value") in an int32 with scale 0.1
    came out as 214748364.7 °C, quality good. End to end (Modbus simulator -> driver ->
    pipeline -> buffer -> codec -> ingest): a declared marker or a NaN float is stored
    as NaN with quality "unavailable", which no range stage re-flags or drops; an
    undeclared one is an ordinary number that a flagging range marks bad, keeping the
    number for diagnosis (README, "Edge processing")."""
    image = RegisterImage()
    for address in (0, 2, 4):
        image.set("holding_register", address, [0x7FFF, 0xFFFF])  # int32 0x7FFFFFFF
    image.set("holding_register", 6, [0x7FC0, 0x0000])  # float32 NaN
    store = open_store(f"sqlite:///{tmp_path / 'platform.db'}")

    async def scenario() -> Agent:
        async with ModbusSimulator({1: image}) as sim:
            worker = IngestWorker("mqtt://127.0.0.1", store, group=None)
            text = MODBUS_DEVICE.format(gw=GW, buffer=tmp_path / "buf.db", port=sim.port)
            agent = Agent(parse_config(text, source="edge.toml"), connect=LoopbackLink(
                worker.deliver).connect)  # fmt: skip
            await agent.start()
            async with asyncio.timeout(10):  # three polls of the four points
                while agent.counters.read < 12:
                    await asyncio.sleep(0.02)
            await agent.stop_drivers()
            await agent.flush()
            assert await agent.drain(timeout=10)
            await agent.stop()
            return agent

    agent = asyncio.run(scenario())
    polls = agent.counters.read // 4
    for key in ("station/temperature", "station/humidity", "station/wind"):
        rows = store.readings(GW, key)
        assert len(rows) == polls, key  # none dropped by the "drop" ranges
        assert all(math.isnan(v) and q == UNAVAILABLE for _, _, v, q in rows), (key, rows[:2])
    pressure = store.readings(GW, "station/pressure")
    assert len(pressure) == polls
    assert all(v == pytest.approx(214748364.7) and q == BAD for _, _, v, q in pressure)
    assert agent.counters.flagged == polls and agent.counters.dropped == 0
    assert quality_name(UNAVAILABLE) == "unavailable"  # as `citygw platform query` shows it
    store.close()
