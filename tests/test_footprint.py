"""The agent's footprint (issue 15): what keeps it small, and bench/footprint.py's CI run.

The targets themselves are the benchmark's (a quiet machine, 10-minute windows); here the
behaviour behind them and the benchmark's output format."""

from __future__ import annotations

import asyncio
import math
import re
import subprocess
import sys
from collections.abc import Collection, Sequence
from pathlib import Path

from agent.config import parse_config
from agent.runtime import Agent
from agent.uplink import BufferPort, Uplink, UplinkSettings
from buffer import Lane, Message
from native.batch import Batch
from tests.helpers import AckingSession, intake_points, wait_until

ROOT = Path(__file__).resolve().parent.parent


def config(buffer: Path, intake_delay: str) -> str:
    # a device that is never polled (disabled): the test pushes the readings itself
    return f"""
[gateway]
id = "gw-fp"
[uplink]
broker = "mqtt://127.0.0.1:9"
[buffer]
path = "{buffer}"
flush_interval = "60s"
intake_delay = "{intake_delay}"
[[devices]]
name = "d"
driver = "sim"
enabled = false
  [[devices.points]]
  name = "a"
"""


def test_a_push_after_a_quiet_intake_delay_is_committed_at_once(tmp_path: Path) -> None:
    """At street rates, polls further apart than `intake_delay`, each poll's readings go
    to the intake at once instead of after a timer (no extra wakeup per poll); a push
    within the delay of the last commit still waits for one commit per delay."""
    path = tmp_path / "buf.db"

    def rows(n: int) -> Batch:
        return Batch.from_rows((1, 1_700_000_000_000 + i, float(i), 0) for i in range(n))

    async def scenario() -> None:
        agent = Agent(parse_config(config(path, intake_delay="10s")))
        await agent.start()
        try:
            assert agent.queue.push(rows(3))
            # well before the 10 s delay: nothing else would commit it (flush: 60 s)
            await wait_until(lambda: intake_points(path) == 3, timeout=5.0)
            assert agent.queue.push(rows(2))  # within the delay of that commit
            await asyncio.sleep(0.5)
            assert intake_points(path) == 3  # waits for the delay's timer
        finally:
            await agent.stop()

    asyncio.run(scenario())


def test_the_uplink_asks_the_buffer_again_only_when_woken() -> None:
    """Once a peek found fewer batches than the window had room for, the PUBACK of the
    last one costs no further trip to the buffer thread: only the agent's wake (it
    appended) does. At street rates that is one peek per flush, not two."""
    pending: dict[int, Message] = {}
    peeks: list[int] = []
    acked: list[int] = []

    async def peek(limit: int, exclude: Collection[int]) -> list[Message]:
        peeks.append(limit)
        return [m for seq, m in sorted(pending.items()) if seq not in exclude][:limit]

    async def ack(seqs: Sequence[int]) -> int:
        for seq in seqs:
            acked.append(seq)
            del pending[seq]
        return len(acked)

    def add(seq: int) -> None:
        pending[seq] = Message(seq, Lane.TELEMETRY, b"x", 1, 0)

    async def scenario() -> None:
        up = Uplink(
            UplinkSettings(broker="mqtt://127.0.0.1:1", gateway_id="gw", client_id="c"),
            BufferPort(peek, ack),
            "0" * 32,
            b"{}",
            AckingSession,
        )
        add(1)
        task = asyncio.create_task(up.run())
        try:
            await wait_until(lambda: acked == [1], timeout=5.0)
            await asyncio.sleep(0.3)  # time for a needless peek
            assert len(peeks) == 1
            add(2)
            up.wake()  # what the agent does after a flush appended
            await wait_until(lambda: acked == [1, 2], timeout=5.0)
            await asyncio.sleep(0.3)
            assert len(peeks) == 2
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())


def test_an_alarm_alone_wakes_the_uplink(tmp_path: Path) -> None:
    """A flush whose only output is an alarm (a stale rule: the device stopped answering,
    so there is no telemetry) wakes the uplink too: the alarm leaves at once, not with the
    next telemetry, which may never come."""
    session = AckingSession()
    text = f"""
[gateway]
id = "gw-fp"
[uplink]
broker = "mqtt://127.0.0.1:9"
[buffer]
path = "{tmp_path / "buf.db"}"
flush_interval = "100ms"
[[devices]]
name = "d"
driver = "sim"
poll = "50ms"
fail_probability = 1.0
  [[devices.points]]
  name = "a"
  pipeline = [{{ type = "stale", after = "300ms" }}]
"""

    async def scenario() -> None:
        agent = Agent(parse_config(text), connect=lambda: session)
        await agent.start()
        try:
            await wait_until(lambda: any(t.endswith("/up/alarm") for t in session.topics))
        finally:
            await agent.stop()
        assert agent.counters.alarms_raised == 1 and agent.counters.read == 0

    asyncio.run(scenario())


def test_running_the_agent_does_not_import_the_firmware_code() -> None:
    """cryptography and the firmware package cost several MB of RSS: `citygw run` loads
    them only when a firmware_update command comes (or a driver that needs them)."""
    code = (
        "import sys, cli.main, agent.runtime; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('cryptography', 'firmware_bridge')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


LAST_LINE = re.compile(
    r"footprint: idle_cpu_pct=(?P<idle>\d+\.\d\d) cpu_s_per_kpoint=(?P<kpt>\d+\.\d{4}) "
    r"rss_mb=(?P<rss>\d+)"
)


def test_footprint_bench_quick_run() -> None:
    """`bench/footprint.py --quick` (about 80 s): the real agent in its three runs, and the
    last line in its form with sane values (not the targets: a CI machine is busy)."""
    out = subprocess.run(
        [sys.executable, "bench/footprint.py", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    match = LAST_LINE.fullmatch(lines[-1])
    assert match, lines[-1]
    assert 0.0 <= float(match["idle"]) < 50.0
    assert 0.0 < float(match["kpt"]) < 10.0 and math.isfinite(float(match["kpt"]))
    assert 15 <= int(match["rss"]) < 500
    # every street run read its points at its rate, without a skipped poll
    for name, rate in (("street-1s", 200), ("street-10s", 100)):
        [line] = [ln for ln in lines if ln.startswith(name)]
        per_s = int(re.search(r"readings \d+ \((\d+)/s\)", line)[1])  # type: ignore[index]
        assert 0.8 * rate <= per_s <= 1.2 * rate, line
        assert "skipped polls 0" in line, line
    [idle] = [ln for ln in lines if ln.startswith("idle")]
    assert "readings 0 " in idle, idle
