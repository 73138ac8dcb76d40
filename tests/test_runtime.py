"""The agent's runtime without a broker: back-pressure, flush failures, graceful stop."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.runtime import Agent, Counters, MemoryQueue, build_pipeline
from buffer import BufferWriteError
from common.logs import Throttle
from native.batch import BAD, GOOD, Batch


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
    assert [len(h.batch) for h in q.take()] == [6, 4]
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


def test_a_flush_cancelled_while_its_buffer_work_waits_still_lands(tmp_path: Path) -> None:
    """A stop cancels the flush loop; its flush may have taken the queue and still be
    waiting for the buffer thread (behind an intake commit). The work must run anyway:
    dropped, its readings would be gone from memory and from the buffer."""

    async def scenario() -> Agent:
        agent = Agent(parse_config(config(tmp_path / "buf.db"), source="t.toml"))
        await agent.start()
        await asyncio.sleep(0.2)
        await agent.stop_drivers()
        agent._executor.submit(time.sleep, 0.3)  # the buffer thread busy for a while
        flushing = asyncio.create_task(agent.flush())
        await asyncio.sleep(0.05)  # the queue taken, its work queued behind the sleep
        assert agent.queue.points == 0
        flushing.cancel()
        await asyncio.gather(flushing, return_exceptions=True)
        await agent.stop()
        return agent

    agent = asyncio.run(scenario())
    from buffer import Buffer

    with Buffer.open_readonly(tmp_path / "buf.db") as buf:
        stats = buf.stats()
    assert sum(s.points for s in stats.lanes.values()) == agent.counters.sent > 0
    assert agent.counters.sent + agent.counters.dropped == agent.counters.read
    assert stats.intake_points == 0


def broker_config(buffer: Path, broker_url: str) -> str:
    return (
        config(buffer)
        .replace("mqtt://127.0.0.1:9", broker_url)
        .replace('flush_interval = "60s"', 'flush_interval = "100ms"')
    )


def test_uplink_survives_a_buffer_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mosquitto,  # type: ignore[no-untyped-def]
) -> None:
    """One failed ack (disk full, I/O error) must not end the uplink for good: it is
    logged, counted, shown in the status, and the uplink comes back with backoff and
    empties the buffer (the unacked batches are resent; the platform drops the copies)."""

    async def scenario() -> tuple[bool, dict[str, object]]:
        agent = Agent(parse_config(broker_config(tmp_path / "buf.db", mosquitto.url), "t.toml"))
        await agent.start()
        assert agent.buffer is not None
        real_ack = agent.buffer.ack
        failed: list[int] = []

        def ack_once_failing(seqs: list[int]) -> int:
            if not failed:
                failed.append(1)
                raise BufferWriteError("buffer b.db: ack failed: SQLITE_FULL")
            return real_ack(seqs)

        monkeypatch.setattr(agent.buffer, "ack", ack_once_failing)
        await asyncio.sleep(1.0)
        await agent.stop_drivers()
        await agent.flush()
        drained = await agent.drain(timeout=15)
        snapshot = agent.snapshot()
        await agent.stop()
        assert failed
        return drained, snapshot

    drained, snapshot = asyncio.run(scenario())
    assert drained, "the uplink never came back after the buffer error"
    uplink = snapshot["uplink"]  # type: ignore[index]
    # the buffer's trouble is not the broker's: same connection, the batches of the failed
    # ack acked again (not published again), the error counted and shown
    assert uplink["buffer_errors"] == 1 and "SQLITE_FULL" in uplink["last_buffer_error"]
    assert uplink["connects"] == 1 and uplink["resent_messages"] == 0
    assert snapshot["tasks"]["uplink"]["failures"] == 0  # type: ignore[index]


def test_failed_status_snapshot_does_not_stop_the_sync_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The status loop also makes the buffer durable (sync point, checkpoint): a
    snapshot the buffer refuses must not stop that, or the power-cut bound of
    sync = "normal" silently goes away."""
    import agent.runtime as runtime

    monkeypatch.setattr(runtime, "STATUS_INTERVAL_S", 0.05)

    async def scenario() -> tuple[Agent, int]:
        agent = Agent(parse_config(config(tmp_path / "buf.db"), source="t.toml"))
        await agent.start()
        assert agent.buffer is not None
        checkpoints: list[int] = []
        real_checkpoint = agent.buffer.checkpoint

        def refuse(*args: object) -> None:
            raise BufferWriteError("buffer b.db: put_state failed: SQLITE_IOERR")

        def count_checkpoint() -> None:
            checkpoints.append(1)
            real_checkpoint()

        monkeypatch.setattr(agent.buffer, "put_state", refuse)
        monkeypatch.setattr(agent.buffer, "checkpoint", count_checkpoint)
        await asyncio.sleep(1.0)
        n = len(checkpoints)
        monkeypatch.undo()
        await agent.stop()
        return agent, n

    agent, checkpoints = asyncio.run(scenario())
    assert checkpoints >= 5
    assert agent.counters.status_failures >= 5


def test_a_crashing_driver_is_restarted_and_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common import supervise
    from drivers.sim import SimDriver

    calls: list[int] = []
    real_run = SimDriver.run

    async def crash_once(self: SimDriver, sink: object) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("driver bug")
        await real_run(self, sink)  # type: ignore[arg-type]

    monkeypatch.setattr(SimDriver, "run", crash_once)
    monkeypatch.setattr(supervise, "STABLE_AFTER_S", 60.0)

    async def scenario() -> dict[str, object]:
        agent = Agent(parse_config(config(tmp_path / "buf.db"), source="t.toml"))
        await agent.start()
        await asyncio.sleep(2.5)  # the first backoff is at most 1 s
        snapshot = agent.snapshot()
        await agent.stop()
        return snapshot

    snapshot = asyncio.run(scenario())
    task = snapshot["tasks"]["driver:sim"]  # type: ignore[index]
    assert len(calls) == 2
    assert task["failures"] == 1 and task["restarts"] == 1 and task["state"] == "running"
    assert task["last_error"] == "RuntimeError: driver bug"
    assert snapshot["counters"]["read"] > 0  # type: ignore[index]


def test_pipeline_warning_names_the_points_and_says_flagged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = parse_config(
        config(tmp_path / "buf.db")
        + '  [[devices.points]]\n  name = "c"\n'
        + '  pipeline = [{ type = "range", max = 2.5, action = "flag" }]\n',
        source="t.toml",
    )
    ids = {"d/a": 1, "d/b": 2, "d/c": 3}
    agent = Agent(cfg)
    agent.pipeline = build_pipeline(cfg, ids)
    agent._key_of = {pid: key for key, pid in ids.items()}

    def flush(rows: list[tuple[int, int, float, int]]) -> None:
        _, counts = agent.pipeline.process(Batch.from_rows(rows))
        agent._count(counts)

    # b: 2 over its max, dropped; c: 3 over its max, sent flagged bad; a: no stage
    rows = [(2, 1, 2.0, GOOD), (2, 2, 1.0, GOOD), (2, 3, 9.0, GOOD), (3, 1, 3.0, GOOD)]
    rows += [(3, 2, 3.0, GOOD), (3, 3, 3.0, GOOD), (3, 4, 2.0, GOOD), (1, 1, 99.0, GOOD)]
    with caplog.at_level(logging.WARNING, logger="citygw.agent"):
        flush(rows)
        flush([(3, 5, 7.0, GOOD), (2, 5, 7.0, GOOD)])  # within 10 s: held, not lost
        agent._throttle = Throttle(interval=0.0)
        flush([(3, 6, 7.0, GOOD), (3, 7, 1.0, BAD)])  # a bad reading is not flagged again
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pipeline")]
    assert lines == [
        "pipeline: flagged 3 readings (d/c 3); dropped 2 readings (d/b 2)",
        "pipeline: flagged 2 readings (d/c 2); dropped 1 reading (d/b 1)",
    ]
    first = next(r for r in caplog.records if r.getMessage() == lines[0])
    assert (first.flagged, first.flagged_points) == (3, {"d/c": 3})  # type: ignore[attr-defined]
    assert (first.dropped, first.dropped_points) == (2, {"d/b": 2})  # type: ignore[attr-defined]
    assert (agent.counters.flagged, agent.counters.dropped) == (5, 3)
