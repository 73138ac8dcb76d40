"""A flush in bounded parts: whatever its size, no step of it works on more than
FLUSH_PART_ROWS readings at once (so none holds the GIL long), and the buffer gets
exactly what one pass over all of it gives."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import weakref
from array import array
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from agent import runtime
from agent.config import parse_config
from agent.runtime import Agent
from buffer import Lane
from native import codec
from native.batch import Batch
from tests.helpers import make_batch

HOUR_MS = 3_600_000


@settings(max_examples=200, deadline=None)
@given(hs.lists(hs.integers(0, 40), max_size=12), hs.integers(1, 25))
def test_regroup_is_slicing_the_concatenation(sizes: list[int], rows: int) -> None:
    batches = [make_batch(n, pid0=10 * k) for k, n in enumerate(sizes)]
    whole = Batch.concat(batches)
    parts = Batch.regroup(batches, rows)
    assert [list(p.rows()) for p in parts] == [
        list(whole.slice(i, i + rows).rows()) for i in range(0, len(whole), rows)
    ]
    before = [list(b.rows()) for b in batches]
    for part in parts:  # new arrays: a part may be modified, the batches stay as they were
        part.values[0] = -1.0
    assert [list(b.rows()) for b in batches] == before


def test_regroup_refuses_empty_parts() -> None:
    with pytest.raises(ValueError, match="rows must be > 0"):
        Batch.regroup([make_batch(3)], 0)


def config(buffer: Path) -> str:
    # port 9 (discard): the uplink never connects, the flush's messages stay buffered
    return f"""
[gateway]
id = "gw-parts"
[uplink]
broker = "mqtt://127.0.0.1:9"
max_batch_points = 5000
[buffer]
path = "{buffer}"
flush_interval = "60s"
intake_delay = "10s"
[[devices]]
name = "d"
driver = "sim"
poll = "1h"
  [[devices.points]]
  name = "a"
  pipeline = [{{ type = "range", max = 150.0, action = "drop" }},
              {{ type = "deadband", band = 0.5 }},
              {{ type = "threshold", id = "hot", above = 120.0 }},
              {{ type = "stale", after = "1h" }},
              {{ type = "aggregate", window = "1m", functions = ["mean", "max"], raw = true }}]
  [[devices.points]]
  name = "b"
  pipeline = [{{ type = "range", min = 0.0 }}]
"""


async def flushed(path: Path, batches: list[Batch]) -> tuple[list[Any], dict[str, bytes]]:
    """The messages and the stage state a fresh agent's flush of ``batches`` leaves."""
    agent = Agent(parse_config(config(path), source="t.toml"))
    await agent.start()
    await agent.stop_drivers()
    for b in with_ids(batches, agent):
        assert agent.queue.push(b)
    assert agent.buffer is not None
    await agent.flush()
    messages = await agent._on_buffer(agent.buffer.peek, 1000)
    state = await agent._on_buffer(agent.buffer.pipeline_state)
    await agent.stop()
    return [
        (m.lane, m.n_points, m.payload if m.lane == Lane.ALARM else codec.decode(m.payload))
        for m in messages
    ], state


def with_ids(batches: list[Batch], agent: Agent) -> list[Batch]:
    """The batches with the test's point ids 0 and 1 made the config's points a and b."""
    ids = [agent.points["d/a"].id, agent.points["d/b"].id]
    for b in batches:
        b.point_ids[:] = array("I", (ids[p] for p in b.point_ids))
    return batches


def readings(n: int, start_ms: int) -> list[Batch]:
    """Polls of the two points, an hour old, with values that cross every stage."""
    out = []
    for k in range(0, n, 2):
        ts = start_ms + k * 50
        out.append(
            Batch.from_rows(
                [
                    (0, ts, 5.0 + (k // 1000) * 10 % 160 + (k % 3) * 0.4, 0),
                    (1, ts, float(k % 11) - 2.0, 0),
                ]
            )
        )
    return out


def test_a_big_flush_runs_in_bounded_parts_and_buffers_what_one_pass_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 3 * runtime.FLUSH_PART_ROWS + 6
    start_ms = time.time_ns() // 1_000_000 - HOUR_MS
    sizes: list[tuple[int, bool]] = []
    real = runtime.Pipeline.process

    def process(self: Any, batch: Batch, *args: Any, **kw: Any) -> Any:
        sizes.append((len(batch), kw.get("last", True)))
        return real(self, batch, *args, **kw)

    monkeypatch.setattr(runtime.Pipeline, "process", process)
    switch = sys.getswitchinterval()
    try:
        in_parts = asyncio.run(flushed(tmp_path / "parts.db", readings(n, start_ms)))
        assert sys.getswitchinterval() <= runtime.SWITCH_INTERVAL_S
    finally:
        sys.setswitchinterval(switch)
    del sizes[len(sizes) - 1 :]  # the stop's flush: a timed pipeline runs without readings too
    assert sum(s for s, _ in sizes) == n
    assert all(s <= runtime.FLUSH_PART_ROWS for s, _ in sizes)
    assert [last for _, last in sizes] == [False] * (len(sizes) - 1) + [True]

    monkeypatch.setattr(runtime, "FLUSH_PART_ROWS", 10 * n)  # one part: one pass
    sizes.clear()
    whole = asyncio.run(flushed(tmp_path / "whole.db", readings(n, start_ms)))
    assert sizes == [(n, True), (0, True)]
    assert in_parts == whole
    lanes = [lane for lane, _, _ in whole[0]]
    assert Lane.ALARM in lanes and lanes.count(Lane.TELEMETRY) > 1  # it did get through


def test_intake_rows_hold_whole_batches_of_about_a_part(tmp_path: Path) -> None:
    async def scenario() -> list[int]:
        agent = Agent(parse_config(config(tmp_path / "buf.db"), source="t.toml"))
        await agent.start()
        await agent.stop_drivers()
        assert agent.buffer is not None
        agent.queue.on_push = None  # the intake commit is made by hand below
        for b in with_ids(readings(2 * runtime.FLUSH_PART_ROWS + 100, 1_700_000_000_000), agent):
            assert agent.queue.push(b)
        held = agent.queue.take_unsaved()
        await agent._on_buffer(agent._intake_sync, held)
        loaded = agent.buffer.intake_load()
        rows = [len(Batch.from_bytes(data)) for _, data in loaded]
        assert {h.intake_id for h in held} == {intake_id for intake_id, _ in loaded}
        await agent.stop()  # the flush takes them all: the intake is empty again
        return rows

    rows = asyncio.run(scenario())
    assert rows == [runtime.FLUSH_PART_ROWS, runtime.FLUSH_PART_ROWS, 100]


def test_the_flush_frees_the_taken_batches_on_the_buffer_thread(tmp_path: Path) -> None:
    """Freed with the list at the end of flush(), thousands of batches would stall the
    event loop for milliseconds: the buffer thread drops them one at a time."""
    freed_on: list[tuple[str, bool]] = []

    async def scenario() -> None:
        agent = Agent(parse_config(config(tmp_path / "buf.db"), source="t.toml"))
        await agent.start()
        await agent.stop_drivers()
        batches = with_ids(readings(2000, 1_700_000_000_000), agent)
        refs = [weakref.ref(b.values) for b in batches]
        for b in batches:
            assert agent.queue.push(b)
        del batches, b
        real = agent._flush_sync

        def flush_sync(*args: Any) -> int:
            n = real(*args)
            alive = any(ref() is not None for ref in refs)
            freed_on.append((threading.current_thread().name, alive))
            return n

        agent._flush_sync = flush_sync  # type: ignore[method-assign,assignment]
        assert await agent.flush() > 0
        await agent.stop()

    asyncio.run(scenario())
    (thread, alive), *_ = freed_on
    assert thread.startswith("citygw-buffer") and not alive
