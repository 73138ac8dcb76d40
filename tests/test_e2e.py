"""End to end: sim driver -> pipeline -> buffer -> private mosquitto -> ingest.

Every reading the drivers produced must be stored by the platform exactly once,
with its value bit-exact, through broker outages and agent kills."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.runtime import Agent, MemoryQueue
from central.store import Store
from central.stores import open_store
from central.worker import IngestWorker
from native.batch import Batch
from tests.helpers import intake_points

ROOT = Path(__file__).resolve().parent.parent


def small_config(
    broker_url: str,
    buffer: Path,
    devices: int = 3,
    points: int = 5,
    poll: str = "100ms",
    sync: str = "normal",
    flush: str = "200ms",
) -> str:
    out = [
        '[gateway]\nid = "gw-test"\n',
        f'[uplink]\nbroker = "{broker_url}"\nwindow = 4\nbackoff_min = "100ms"\n'
        'backoff_max = "500ms"\nack_timeout = "2s"\nkeepalive = "2s"\n',
        f'[buffer]\npath = "{buffer}"\nflush_interval = "{flush}"\nsync = "{sync}"\n',
    ]
    for d in range(devices):
        out.append(f'[[devices]]\nname = "dev-{d}"\ndriver = "sim"\npoll = "{poll}"\nseed = {d}\n')
        for p in range(points):
            out.append(
                f'[[devices.points]]\nname = "p{p}"\nbase = {p * 10}.0\namplitude = 3.0\n'
                'period = "7s"\nnoise = 0.37\nspike_probability = 0.05\nspike_size = 1e9\n'
                'pipeline = [{ type = "range", min = -1e6, max = 1e6, action = "flag" }]\n'
            )
    return "\n".join(out)


class RecordingQueue(MemoryQueue):
    """The agent's memory queue, keeping a copy of every batch the drivers pushed."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.seen: list[Batch] = []

    def push(self, batch: Batch) -> bool:
        ok = super().push(batch)
        if ok:
            self.seen.append(batch)
        return ok


def bits(v: float) -> bytes:
    return struct.pack("<d", v)


async def wait_for(predicate, timeout: float, interval: float = 0.1) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(predicate):
            return True
        await asyncio.sleep(interval)
    return bool(await asyncio.to_thread(predicate))


async def run_pipeline(
    broker,
    store: Store,
    buffer: Path,
    seconds: float,  # type: ignore[no-untyped-def]
    during=None,
    group: str | None = "test",
) -> tuple[Agent, list[Batch]]:
    worker = IngestWorker(
        broker.url, store, group=group, client_id="ingest-test", session_expiry=600
    )
    ingest = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.connected.wait(), 10)  # subscribed before the first batch
    agent = Agent(parse_config(small_config(broker.url, buffer), source="test.toml"))
    queue = RecordingQueue(agent.queue.max_points, agent.counters, agent.queue.on_push)
    agent.queue = queue
    try:
        await agent.start()
        if during is not None:
            await during(seconds)
        else:
            await asyncio.sleep(seconds)
        await agent.stop_drivers()
        await agent.flush()
        assert await agent.drain(timeout=30), "buffer did not drain"
        sent = agent.counters.sent
        assert await wait_for(lambda: store.counts().readings >= sent, timeout=30)
    finally:
        await agent.stop()
        ingest.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ingest
    return agent, queue.seen


def assert_exactly_once(store: Store, produced: list[Batch], agent: Agent) -> None:
    expected = Counter((pid, ts, bits(v)) for b in produced for pid, ts, v, _ in b.rows())
    stored = Counter((pid, ts, bits(v)) for pid, ts, v, _ in store.readings("gw-test"))
    assert sum(expected.values()) == agent.counters.read == agent.counters.sent > 0
    assert stored == expected  # same readings, each once, values bit-exact
    assert store.duplicate_readings() == 0


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_every_reading_arrives_once_bit_exact(
    backend: str,
    mosquitto,
    pg_url: str,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    url = pg_url if backend == "postgresql" else f"sqlite:///{tmp_path / 'platform.db'}"
    store = open_store(url)
    try:
        agent, produced = asyncio.run(run_pipeline(mosquitto, store, tmp_path / "buf.db", 2.0))
        assert_exactly_once(store, produced, agent)
        # some spikes of 1e9 were out of range: flagged, still delivered, quality bad
        assert agent.counters.flagged > 0
        assert any(q == 1 for _, _, _, q in store.readings("gw-test"))
    finally:
        store.close()


def test_broker_outage_loses_nothing(mosquitto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store = open_store(f"sqlite:///{tmp_path / 'platform.db'}")

    async def outage(seconds: float) -> None:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(mosquitto.stop)
        await asyncio.sleep(5.0)
        await asyncio.to_thread(mosquitto.start)
        await asyncio.sleep(1.5)

    try:
        agent, produced = asyncio.run(
            # no shared group here: Mosquitto does not restore a shared subscription
            # from persistence after a restart (a plain one it does), so a batch the
            # gateway sends before the ingest re-subscribes would have no subscriber
            run_pipeline(mosquitto, store, tmp_path / "buf.db", 0, during=outage, group=None)
        )
        assert_exactly_once(store, produced, agent)
        assert agent.uplink is not None and agent.uplink.status.connects >= 2
    finally:
        store.close()


def _start_agent(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "run", "-c", str(cfg), "--log-level", "INFO"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
    )


def test_sigkill_loses_no_flushed_reading(mosquitto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Kill -9 mid-stream, restart on the same buffer: every reading older than the
    last flush before the kill is stored, none twice. The sim polls on a fixed-rate
    schedule, so a lost flushed reading shows as a gap in a point's series outside
    the kill window."""
    store = open_store(f"sqlite:///{tmp_path / 'platform.db'}")
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(small_config(mosquitto.url, tmp_path / "buf.db", sync="full"))

    async def scenario() -> tuple[int, int]:
        worker = IngestWorker(
            mosquitto.url, store, group="test", client_id="ingest-test", session_expiry=600
        )
        ingest = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.connected.wait(), 10)
        try:
            first = _start_agent(cfg, tmp_path / "agent.log")
            await asyncio.sleep(4.0)
            killed_ms = time.time_ns() // 1_000_000
            first.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.wait)
            second = _start_agent(cfg, tmp_path / "agent.log")
            restarted_ms = time.time_ns() // 1_000_000
            await asyncio.sleep(4.0)
            second.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(second.wait, 30) == 0
            # a third, short run drains whatever the graceful stop left unsent
            third = _start_agent(cfg, tmp_path / "agent.log")
            await asyncio.sleep(3.0)
            third.send_signal(signal.SIGTERM)
            await asyncio.to_thread(third.wait, 30)
            await asyncio.sleep(1.0)
        finally:
            ingest.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ingest
        return killed_ms, restarted_ms

    try:
        killed_ms, restarted_ms = asyncio.run(scenario())
        rows = store.readings("gw-test")
        assert store.duplicate_readings() == 0
        series: dict[int, list[int]] = {}
        for pid, ts, _, _ in rows:
            series.setdefault(pid, []).append(ts)
        assert len(series) == 15
        flush_ms, poll_ms = 200, 100
        for pid, stamps in series.items():
            stamps.sort()
            assert len(stamps) == len(set(stamps))
            for a, b in itertools.pairwise(stamps):
                if b - a > poll_ms * 1.5:  # a gap: only allowed around the kill
                    assert a >= killed_ms - flush_ms - 2 * poll_ms - 300, (pid, a, b, killed_ms)
                    assert b >= restarted_ms, (pid, a, b, restarted_ms)
    finally:
        store.close()


def test_process_crash_loses_only_the_intake_window(tmp_path: Path) -> None:
    """A process crash between two flushes (flush interval 60 s here) loses only what
    was read in the last `intake_delay` (10 ms) and the poll under way: the readings
    are committed, raw, to the intake right after they are read, and the next start
    puts them through the pipeline into the buffer. The sim polls every 50 ms on a
    fixed-rate schedule, so the device's own record is the schedule: a missing
    reading is a gap in a point's series."""
    from buffer import Buffer
    from native import codec

    cfg = tmp_path / "gateway.toml"
    cfg.write_text(
        small_config("mqtt://127.0.0.1:9", tmp_path / "buf.db", poll="50ms", flush="60s")
    )
    first = _start_agent(cfg, tmp_path / "agent.log")
    # its first readings in the intake (a busy machine starts an agent slowly), then 3.5 s more
    deadline = time.monotonic() + 60
    while not intake_points(tmp_path / "buf.db"):
        assert first.poll() is None and time.monotonic() < deadline, "the agent read nothing"
        time.sleep(0.05)
    time.sleep(3.5)
    killed_ms = time.time_ns() // 1_000_000
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    second = _start_agent(cfg, tmp_path / "agent.log")  # takes the intake, then stops
    time.sleep(2.0)
    second.send_signal(signal.SIGTERM)
    assert second.wait(30) == 0
    series: dict[int, list[int]] = {}
    with Buffer.open_readonly(tmp_path / "buf.db") as buf:
        for msg in buf.peek(10_000):
            for pid, ts, _, _ in codec.decode(msg.payload).rows():
                series.setdefault(pid, []).append(ts)
    assert len(series) == 15
    window_ms = 10 + 50 + 100  # intake_delay, one poll, scheduling slack
    for pid, stamps in series.items():
        stamps.sort()
        assert len(stamps) == len(set(stamps)), pid
        assert stamps[0] < killed_ms - 3000  # the first run's readings are there
        before = [t for t in stamps if t < killed_ms]
        assert killed_ms - before[-1] <= window_ms, (pid, killed_ms - before[-1])
        for a, b in itertools.pairwise(before):
            assert b - a <= 75, (pid, a, b)  # no poll of the first run went missing
    with Buffer.open_readonly(tmp_path / "buf.db") as buf:
        assert buf.stats().intake_points == 0  # all of it went through the pipeline


def test_sigterm_flushes_memory(mosquitto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A graceful stop puts what is in memory into the buffer (flush interval 60 s,
    so nothing would reach the buffer otherwise)."""
    from buffer import Buffer

    cfg = tmp_path / "gateway.toml"
    cfg.write_text(small_config("mqtt://127.0.0.1:9", tmp_path / "buf.db", flush="60s"))
    proc = _start_agent(cfg, tmp_path / "agent.log")
    time.sleep(2.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    with Buffer.open_readonly(tmp_path / "buf.db") as buf:
        stats = buf.stats()
        agent_state = buf.get_state()["agent"]
    held = sum(s.points for s in stats.lanes.values())
    assert held == agent_state["counters"]["sent"] == agent_state["counters"]["read"] > 0


def test_demo_delivers_everything_once(tmp_path: Path) -> None:
    from cli.demo import run_demo

    result = asyncio.run(run_demo(4.0, workdir=tmp_path, use_broker=True))
    # deadbands, swinging doors and aggregates send a fraction of what was read
    assert result.read > result.sent > 100
    assert result.ingested == result.sent
    assert result.lost == 0 and result.duplicates == 0
    assert 0 < result.bytes_per_point < 21  # less than the raw 21 bytes of a reading
    # the six manholes' batteries are low: each raised its alarm, and the platform has it
    assert result.alarms_stored == result.alarms_sent >= 6
    # the pump station on the demo's own Modbus simulator delivered too
    assert result.read_by_driver["modbus"] >= 2 * 14
    # and so did the airboxes publishing to the demo's broker
    assert result.read_by_driver["mqtt"] >= 3 * 2
    # and the BLE tags from the replay of recorded adverts
    assert result.read_by_driver["ble"] >= 3
    # and the gateway's microcontroller, simulated on a pty, over the serial protocol:
    # its four sensors every second, and the platform stored them
    assert result.read_by_driver["mcu"] >= 4 * 2
    assert result.ingested_mcu >= 4
    assert sum(result.read_by_driver.values()) == result.read
    # the underpass's derived inflow reached the platform; every action the pump rule
    # took (if the flood came within these seconds) did too
    assert result.derived_ingested >= 4
    assert len(result.rule_actions) == result.rule_actions_sent


def test_demo_without_mosquitto_uses_the_in_process_link(tmp_path: Path) -> None:
    from cli.demo import run_demo

    result = asyncio.run(run_demo(3.0, workdir=tmp_path, use_broker=False))
    assert result.read > result.sent == result.ingested > 100
    assert result.read_by_driver["mcu"] >= 4 and result.ingested_mcu >= 4
    assert result.alarms_stored == result.alarms_sent >= 6
    assert result.lost == 0 and result.duplicates == 0
