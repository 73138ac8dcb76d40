"""The agent's runtime without a broker: back-pressure, flush failures, graceful stop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.runtime import Agent, Counters, MemoryQueue
from buffer import BufferWriteError
from native.batch import Batch


def config(buffer: Path, max_memory_points: int = 500_000) -> str:
    # port 9 (discard) on loopback: the uplink never connects, readings stay buffered
    return f"""
[gateway]
id = "gw-rt"
[uplink]
broker = "mqtt://127.0.0.1:9"
backoff_min = "1s"
[buffer]
path = "{buffer}"
flush_interval = "60s"
max_memory_points = {max_memory_points}
[[devices]]
name = "d"
driver = "sim"
poll = "20ms"
  [[devices.points]]
  name = "a"
  base = 1.0
  [[devices.points]]
  name = "b"
  base = 2.0
  pipeline = [{{ type = "range", max = 1.5, action = "drop" }}]
"""


def batch(n: int) -> Batch:
    return Batch.from_rows((1, i, float(i), 0) for i in range(n))


def test_memory_queue_is_bounded_and_counts_refusals() -> None:
    counters = Counters()
    q = MemoryQueue(10, counters)
    assert q.push(batch(6))
    assert not q.push(batch(6))  # would exceed the bound: refused whole
    assert q.push(batch(4))
    assert (counters.read, counters.refused) == (10, 6)
    assert [len(b) for b in q.take()] == [6, 4]
    assert q.take() == []


def test_failed_flush_keeps_readings_for_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> tuple[Agent, int, int]:
        agent = Agent(parse_config(config(tmp_path / "buf.db"), source="t.toml"))
        await agent.start()
        await asyncio.sleep(0.3)
        assert agent.buffer is not None
        real_append = agent.buffer.append_many

        def disk_full(*args: object) -> list[int]:
            raise BufferWriteError("database or disk is full")

        monkeypatch.setattr(agent.buffer, "append_many", disk_full)
        assert await agent.flush() == 0
        sent_after_failure = agent.counters.sent
        monkeypatch.setattr(agent.buffer, "append_many", real_append)
        await agent.stop()  # the final flush succeeds and takes everything
        return agent, sent_after_failure, agent.counters.read

    agent, sent_after_failure, read = asyncio.run(scenario())
    assert sent_after_failure == 0
    # point b (2.0 > 1.5) is dropped by its range stage, point a passes: half of read
    assert agent.counters.sent == agent.counters.dropped == read // 2 > 0
    from buffer import Buffer

    with Buffer.open_readonly(tmp_path / "buf.db") as buf:
        assert sum(s.points for s in buf.stats().lanes.values()) == agent.counters.sent


def test_graceful_stop_writes_final_status(tmp_path: Path) -> None:
    async def scenario() -> Agent:
        agent = Agent(parse_config(config(tmp_path / "buf.db"), source="t.toml"))
        await agent.start()
        await asyncio.sleep(0.2)
        await agent.stop()
        return agent

    agent = asyncio.run(scenario())
    from buffer import Buffer

    with Buffer.open_readonly(tmp_path / "buf.db") as buf:
        state = buf.get_state()["agent"]
    assert state["counters"]["read"] == agent.counters.read > 0
    assert state["devices"]["d"]["polls"] > 0
    assert state["state"] == state["uplink"]["state"] == "stopped"
