"""The agent's timed stages under a stepped wall clock (issue 12, defect 8).

The gateway's wall clock can step (an NTP step, an RTC back in 1970, a technician);
readings keep the wall-clock time they were taken, but a stale alarm ("no reading for
5 min") and the timed close of an aggregate window measure real time. Here the agent
runs with a fake clock in place of `agent.runtime`'s `time` module (a wall clock that
steps and a monotonic one that does not) and readings pushed by hand, flushed by hand:
no sleeping, and no driver ever produces a reading (its every poll fails).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from agent import runtime
from agent.config import parse_config
from agent.runtime import Agent, point_meta
from native.batch import GOOD, Batch

MIN = 60_000
HOUR = 3_600_000


class FakeTime:
    """Stands in for the `time` module: `time`/`time_ns` read a wall clock that `step`
    moves, `monotonic`/`monotonic_ns` one that only `advance` moves; the rest is real."""

    def __init__(self, wall_ms: int, monotonic_ms: int = 5_000) -> None:
        self.wall_ms, self.monotonic_ms = wall_ms, monotonic_ms

    def advance(self, ms: int, step_ms: int = 0) -> None:
        """`ms` of real time pass, and the wall clock steps by `step_ms` on top."""
        self.wall_ms += ms + step_ms
        self.monotonic_ms += ms

    def time_ns(self) -> int:
        return self.wall_ms * 1_000_000

    def time(self) -> float:
        return self.wall_ms / 1000

    def monotonic_ns(self) -> int:
        return self.monotonic_ms * 1_000_000

    def monotonic(self) -> float:
        return self.monotonic_ms / 1000

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def config(buffer: Path) -> str:
    # port 9 (discard): the uplink never connects; the device's every poll fails
    return f"""
[gateway]
id = "gw-clock"
[uplink]
broker = "mqtt://127.0.0.1:9"
backoff_min = "1s"
[buffer]
path = "{buffer}"
flush_interval = "1m"
[[devices]]
name = "kerb"
driver = "sim"
poll = "1h"
fail_probability = 1.0
  [[devices.points]]
  name = "a"
  pipeline = [{{ type = "stale", after = "5m" }}]
  [[devices.points]]
  name = "b"
  pipeline = [{{ type = "stale", after = "5m" }}]
  [[devices.points]]
  name = "noise"
  pipeline = [{{ type = "aggregate", window = "1m", functions = ["count"], grace = "2s" }}]
"""


def minute_start() -> int:
    """A minute's start on the real clock, an hour ago (the fake wall clock's origin)."""
    now = time.time_ns() // 1_000_000 - HOUR
    return now - now % MIN


async def with_agent(buffer: Path, scenario: Callable[[Agent], Awaitable[None]]) -> Agent:
    agent = Agent(parse_config(config(buffer), source="clock.toml"))
    await agent.start()
    await agent.stop_drivers()
    try:
        await scenario(agent)
    finally:
        await agent.stop()
    return agent


class Gateway:
    """Pushes readings of named points at a given time, and flushes."""

    def __init__(self, agent: Agent, clock: FakeTime) -> None:
        self.agent, self.clock = agent, clock
        ids = {m["key"]: i for i, m in enumerate(point_meta(agent.config), start=1)}
        self.ids = {key.split("/")[1]: i for key, i in ids.items()}

    async def flush(self, *points: str, ts: int | None = None) -> None:
        at = self.clock.wall_ms if ts is None else ts
        rows = [(self.ids[p], at, 1.0, GOOD) for p in points]
        if rows:
            assert self.agent.queue.push(Batch.from_rows(rows))
        await self.agent.flush()


def test_stale_alarm_ignores_wall_clock_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """+2 h: no point looks silent for those 2 h; then -1 h: a real silence is raised 5
    min after the point's last reading arrived, not an hour late."""
    clock = FakeTime(minute_start())
    monkeypatch.setattr(runtime, "time", clock)

    async def scenario(agent: Agent) -> None:
        gw = Gateway(agent, clock)
        c = agent.counters
        for _ in range(3):  # both points report every minute
            await gw.flush("a", "b")
            clock.advance(MIN)
        clock.advance(1000, step_ms=2 * HOUR)
        await gw.flush()
        assert c.alarms_raised == 0, "the wall clock's step made the points look silent"
        for _ in range(10):
            await gw.flush("a", "b")
            clock.advance(MIN)
        await gw.flush("a", "b")  # b's last reading
        clock.advance(1000, step_ms=-3 * HOUR)  # an hour behind the right time
        for _ in range(4):
            await gw.flush("a")
            clock.advance(MIN)
        clock.advance(MIN - 1001)
        await gw.flush("a")
        assert c.alarms_raised == 0
        clock.advance(1)
        await gw.flush("a")
        assert c.alarms_raised == 1, "b's silence of 5 min was not raised on time"

    asyncio.run(with_agent(tmp_path / "buf.db", scenario))


def test_stale_silence_resumes_after_a_reboot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Across a restart on another boot (the monotonic clock starts again) a silence
    resumes where it stopped: the 10 min the gateway was down do not raise every stale
    rule at the first flush, and 2 more minutes of silence do."""
    clock = FakeTime(minute_start(), monotonic_ms=9 * HOUR)
    monkeypatch.setattr(runtime, "time", clock)

    async def before(agent: Agent) -> None:
        gw = Gateway(agent, clock)
        await gw.flush("a", "b")
        clock.advance(3 * MIN)
        await gw.flush()

    async def after(agent: Agent) -> None:
        gw = Gateway(agent, clock)
        await gw.flush()
        assert agent.counters.alarms_raised == 0, "the downtime counted as silence"
        clock.advance(2 * MIN - 1)
        await gw.flush()
        assert agent.counters.alarms_raised == 0
        clock.advance(1)
        await gw.flush()
        assert agent.counters.alarms_raised == 2

    buffer = tmp_path / "buf.db"
    asyncio.run(with_agent(buffer, before))
    clock.wall_ms += 10 * MIN
    clock.monotonic_ms = 2_000
    asyncio.run(with_agent(buffer, after))


@pytest.mark.parametrize("step_ms", [2 * HOUR, -HOUR])
def test_aggregate_window_ignores_wall_clock_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step_ms: int
) -> None:
    """A window open when the wall clock steps is neither closed at once (+2 h: the
    readings its device stamps afterwards still belong to it) nor held open for the
    step (-1 h): it closes when its end plus grace has passed in real time."""
    start = minute_start()
    clock = FakeTime(start + 10_000)
    monkeypatch.setattr(runtime, "time", clock)

    async def scenario(agent: Agent) -> None:
        gw = Gateway(agent, clock)
        c = agent.counters
        real = clock.wall_ms
        await gw.flush("noise")
        clock.advance(1000, step_ms=step_ms)
        real += 1000
        await gw.flush()
        assert c.windows == 0, "the wall clock's step closed the open window"
        clock.advance(20_000)
        real += 20_000
        await gw.flush("noise", ts=real)  # stamped by the device's own clock
        assert (c.windows, c.late) == (0, 0)
        clock.advance(start + MIN + 2000 - real - 1)
        await gw.flush()
        assert c.windows == 0
        clock.advance(1)
        await gw.flush()
        assert c.windows == 1, "the window was held open past its end plus grace"
        assert c.suppressed == 2  # both readings went into it

    asyncio.run(with_agent(tmp_path / "buf.db", scenario))
