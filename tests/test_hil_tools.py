"""The hardware-in-the-loop rig's tools: the MQTT fault proxy (against a real mosquitto),
the process faults (prlimit, a corrupt buffer, libfaketime, SIGKILL) and the simulators.

No assertion depends on how fast the machine is: waits are bounded polls for a condition
(`eventually`), and "nothing arrives" is only asserted where nothing can arrive."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest

from buffer import Buffer, Lane
from common.broker import Mosquitto
from drivers.ble.decoders import DecodeError, Decoders
from drivers.ble.source import ReplaySource, load_recording, parse_record
from drivers.modbus.client import Endpoint, ModbusConnection, ModbusError
from drivers.modbus.datatypes import decode
from drivers.mqtt.payloads import PayloadError, parse
from drivers.mqtt.settings import MqttPointSettings
from hil.__main__ import main as hil_main
from hil.faults import (
    FakeClock,
    corrupt_file,
    find_libfaketime,
    kill_at_random,
    limit_file_size,
)
from hil.garbage import MQTT_REASONS, UPLINK_JUNK, compare_counts, uplink_junk
from hil.mqtt_packets import connect_packet, publish_packet
from hil.proxy import MalformedPacket, MqttProxy, read_packet
from hil.sim_ble import BleTagsSim, write_replay
from hil.sim_modbus import (
    CabinetSimulator,
    GarbageRtuFront,
    GarbageRtuServer,
    _has_frame,
    _junk,
)
from hil.sim_mqtt import GARBAGE_KINDS, MqttSensors

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 15.0  # the most any condition is waited for (a loaded CI machine is slow)


def run(coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def eventually(cond: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.01)


CONNACK_OK = b"\x20\x02\x00\x00"


def puback(mid: int) -> bytes:
    return b"\x40\x02" + mid.to_bytes(2, "big")


async def subscriber(broker: Mosquitto, topic: str, got: list[Any]) -> None:
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier=f"sub-{topic}") as c:
        await c.subscribe(topic, qos=1)
        got.append(None)  # marker: subscribed
        async for message in c.messages:
            got.append(message)


async def subscribed(broker: Mosquitto, topic: str) -> tuple[asyncio.Task[None], list[Any]]:
    got: list[Any] = []
    task = asyncio.create_task(subscriber(broker, topic, got))
    await eventually(lambda: len(got) >= 1, "subscribed")
    got.clear()
    return task, got


async def cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# -- proxy -------------------------------------------------------------------------------


def test_read_packet_frames_any_chunking() -> None:
    async def main() -> None:
        reader = asyncio.StreamReader()
        big = publish_packet("a/b", b"x" * 20_000, 7)  # 3-byte remaining length
        stream = connect_packet("c", keepalive=60) + big + b"\xc0\x00" + b"\xe0\x00"
        for i in range(0, len(stream), 5):  # 5-byte reads: every packet split
            reader.feed_data(stream[i : i + 5])
        reader.feed_eof()
        assert await read_packet(reader) == (1, connect_packet("c", keepalive=60))
        assert await read_packet(reader) == (3, big)
        assert await read_packet(reader) == (12, b"\xc0\x00")
        assert await read_packet(reader) == (14, b"\xe0\x00")
        assert await read_packet(reader) is None
        bad = asyncio.StreamReader()
        bad.feed_data(b"\x30\xff\xff\xff\xff\x01")
        with pytest.raises(MalformedPacket):
            await read_packet(bad)

    run(main())


def test_proxy_pass_delivers_with_puback(mosquitto: Mosquitto) -> None:
    async def main() -> None:
        async with MqttProxy("127.0.0.1", mosquitto.port) as proxy:
            sub, got = await subscribed(mosquitto, "hil/pass")
            async with aiomqtt.Client("127.0.0.1", proxy.port, identifier="pub") as c:
                await c.publish("hil/pass", b"hello", qos=1, timeout=WAIT_S)  # PUBACK came
            await eventually(lambda: len(got) == 1, "delivered")
            assert got[0].payload == b"hello"
            await cancel(sub)
            fwd_b, fwd_c = proxy.counters.to_broker.forwarded, proxy.counters.to_client.forwarded
            assert fwd_b["CONNECT"] == 1 and fwd_b["PUBLISH"] == 1
            assert fwd_c["CONNACK"] == 1 and fwd_c["PUBACK"] == 1
            assert proxy.counters.connections == 1
            assert not proxy.counters.to_client.dropped

    run(main())


def test_proxy_frames_split_and_coalesced_packets(mosquitto: Mosquitto) -> None:
    async def main() -> None:
        async with MqttProxy("127.0.0.1", mosquitto.port) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            connect = connect_packet("raw-split", keepalive=60)
            for part in (connect[:1], connect[1:3], connect[3:]):  # one packet, three writes
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0.02)
            assert await asyncio.wait_for(reader.readexactly(4), WAIT_S) == CONNACK_OK
            # four packets in one write, one with a 2-byte remaining length
            payloads = [b"a", b"b" * 300, b"c", b"d" * 20]
            packets = [publish_packet("hil/raw", p, i + 1) for i, p in enumerate(payloads)]
            writer.write(b"".join(packets))
            await writer.drain()
            acks = await asyncio.wait_for(reader.readexactly(16), WAIT_S)
            assert acks == b"".join(puback(i + 1) for i in range(4))
            assert proxy.counters.to_broker.forwarded["PUBLISH"] == 4
            assert proxy.counters.to_client.forwarded["PUBACK"] == 4
            writer.close()

    run(main())


def test_proxy_no_ack_delivers_but_withholds_puback(mosquitto: Mosquitto) -> None:
    async def main() -> None:
        async with MqttProxy("127.0.0.1", mosquitto.port) as proxy:
            sub, got = await subscribed(mosquitto, "hil/noack")
            async with aiomqtt.Client("127.0.0.1", proxy.port, identifier="pub-noack") as c:
                proxy.mode = "no_ack"
                publish = asyncio.create_task(c.publish("hil/noack", b"m", qos=1, timeout=120))
                await eventually(lambda: len(got) == 1, "the broker delivered it")
                await eventually(
                    lambda: proxy.counters.to_client.dropped["PUBACK"] == 1, "PUBACK dropped"
                )
                await asyncio.sleep(0.05)  # the publish would finish now, had a PUBACK come
                assert not publish.done()  # ...and none can come: the proxy dropped it
                await cancel(publish)
            await cancel(sub)
            assert proxy.counters.to_client.forwarded["PUBACK"] == 0

    run(main())


def test_proxy_down_drops_connections_and_refuses_new_ones(mosquitto: Mosquitto) -> None:
    async def main() -> None:
        async with MqttProxy("127.0.0.1", mosquitto.port) as proxy:
            async with aiomqtt.Client("127.0.0.1", proxy.port, identifier="pub-down") as c:
                await c.subscribe("hil/down")
                assert proxy.active_connections == 1
                proxy.mode = "down"
                with pytest.raises(aiomqtt.MqttError):
                    async for _ in c.messages:  # ends with the lost connection
                        pass
                assert proxy.counters.cut == 1
                with pytest.raises(aiomqtt.MqttError):
                    await c.publish("hil/down", b"x", qos=1, timeout=WAIT_S)
            # nothing listens while down: a new connection is refused at once
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", proxy.port)
            with pytest.raises(aiomqtt.MqttError):
                async with aiomqtt.Client("127.0.0.1", proxy.port, timeout=WAIT_S):
                    pass
            proxy.mode = "pass"  # the link is back
            async with aiomqtt.Client("127.0.0.1", proxy.port, identifier="pub-up") as c:
                await c.publish("hil/down", b"y", qos=1, timeout=WAIT_S)

    run(main())


def test_proxy_blackhole_hangs_the_connect(mosquitto: Mosquitto) -> None:
    async def main() -> None:
        async with MqttProxy("127.0.0.1", mosquitto.port, mode="blackhole") as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(connect_packet("into-the-hole"))
            await writer.drain()
            await eventually(
                lambda: proxy.counters.to_broker.dropped["CONNECT"] == 1, "CONNECT swallowed"
            )
            with pytest.raises(TimeoutError):  # nothing ever comes back
                await asyncio.wait_for(reader.read(1), 0.3)
            assert not reader.at_eof() and proxy.active_connections == 1
            assert not proxy.counters.to_broker.forwarded  # the broker never heard of it
            with pytest.raises(aiomqtt.MqttError):  # a real client times out
                async with aiomqtt.Client("127.0.0.1", proxy.port, timeout=0.5):
                    pass
            proxy.mode = "pass"
            async with aiomqtt.Client("127.0.0.1", proxy.port, identifier="after-hole") as c:
                await c.publish("hil/hole", b"z", qos=1, timeout=WAIT_S)
            writer.close()

    run(main())


def test_proxy_flap_cuts_and_restores(mosquitto: Mosquitto) -> None:
    async def main() -> None:
        async with MqttProxy("127.0.0.1", mosquitto.port) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(connect_packet("flapper"))
            assert await asyncio.wait_for(reader.readexactly(4), WAIT_S) == CONNACK_OK
            await proxy.flap(period_s=0.1, down_s=0.05, count=2)
            assert [m for _, m in proxy.mode_changes] == ["pass", "down", "pass", "down", "pass"]
            assert proxy.mode == "pass" and proxy.counters.cut == 1
            assert await asyncio.wait_for(reader.read(10), WAIT_S) == b""
            with pytest.raises(ValueError):
                await proxy.flap(period_s=0.1, down_s=0.2, count=1)

    run(main())


# -- faults: a full disk -----------------------------------------------------------------

_FULL_DISK_CHILD = r"""
import os, signal, sys
from buffer import Buffer, BufferWriteError, Lane
print(signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN, flush=True)
buf = Buffer(sys.argv[1], 100_000_000)
buf.append(Lane.TELEMETRY, b"x" * 100, 1)
print("ready", flush=True)
sys.stdin.readline()  # the limit is set
ok, err = 0, "none"
for _ in range(1000):
    try:
        buf.append(Lane.TELEMETRY, os.urandom(8000), 1)
        ok += 1
    except BufferWriteError as exc:
        err = type(exc).__name__ + ": " + str(exc)
        break
print(ok, flush=True)
print(err, flush=True)
try:
    with open(sys.argv[1] + ".probe", "wb") as f:
        f.write(b"x" * (1 << 20))
    print("written", flush=True)
except OSError as exc:
    print(exc.errno, flush=True)
sys.stdin.readline()  # the limit is lifted
buf.append(Lane.TELEMETRY, os.urandom(8000), 1)
print(len(buf.peek(10_000)), flush=True)
buf.close()
"""


def test_limit_file_size_fails_buffer_writes_without_killing(tmp_path: Path) -> None:
    db = tmp_path / "buffer.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", _FULL_DISK_CHILD, str(db)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "True"  # Python ignores SIGXFSZ
        assert proc.stdout.readline().strip() == "ready"
        before = limit_file_size(proc.pid, 256 * 1024)
        assert resource.prlimit(proc.pid, resource.RLIMIT_FSIZE)[0] == 256 * 1024
        proc.stdin.write("\n")
        proc.stdin.flush()
        ok = int(proc.stdout.readline())
        err = proc.stdout.readline().strip()
        assert ok < 1000
        assert err.startswith("BufferWriteError: ") and str(db) in err, err
        assert "SQLITE_IOERR" in err or "SQLITE_FULL" in err, err
        assert int(proc.stdout.readline()) == errno.EFBIG
        limit_file_size(proc.pid, None)
        assert resource.prlimit(proc.pid, resource.RLIMIT_FSIZE) == (before[1], before[1])
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert int(proc.stdout.readline()) == 1 + ok + 1  # nothing lost, writes work again
        assert proc.wait(timeout=WAIT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- faults: a corrupt database ----------------------------------------------------------


def _fill(db: Path) -> None:
    with Buffer(db, 10_000_000) as buf:
        buf.append_many([(Lane.TELEMETRY, os.urandom(700), 1)] * 60)


def _assert_moved_aside(db: Path, damaged: bytes) -> None:
    with Buffer(db, 10_000_000) as buf:
        assert buf.recovered_from is not None
        assert buf.recovered_from.read_bytes() == damaged
        assert buf.peek(10) == []
        buf.append(Lane.ALARM, b"fresh", 1)


@pytest.mark.parametrize("keep_header", [True, False])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_corrupt_file_is_detected_and_moved_aside(
    tmp_path: Path, seed: int, keep_header: bool
) -> None:
    db = tmp_path / "buffer.db"
    _fill(db)
    original = db.read_bytes()
    damage = corrupt_file(db, seed, keep_header=keep_header)
    damaged = db.read_bytes()
    assert len(damaged) == len(original) and damaged != original
    assert (damaged[:4096] == original[:4096]) is keep_header
    assert damage.page_size == 4096 and damage.pages[-1] == len(original) // 4096
    _assert_moved_aside(db, damaged)


def test_corrupt_file_is_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    _fill(a)
    b.write_bytes(a.read_bytes())
    corrupt_file(a, 42)
    corrupt_file(b, 42)
    assert a.read_bytes() == b.read_bytes()


def test_corrupt_file_after_a_crash_folds_the_wal_first(tmp_path: Path) -> None:
    db = tmp_path / "buffer.db"
    crash = (
        "import os, sys\nfrom buffer import Buffer, Lane\n"
        "buf = Buffer(sys.argv[1], 10_000_000)\n"
        "buf.append_many([(Lane.TELEMETRY, os.urandom(700), 1)] * 60)\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", crash, str(db)], cwd=ROOT, check=True, timeout=60)
    assert Path(f"{db}-wal").stat().st_size > 0  # the crash left the WAL behind
    damage = corrupt_file(db, 7)
    assert damage.wal_folded
    _assert_moved_aside(db, db.read_bytes())


# -- faults: wall-clock steps ------------------------------------------------------------

_CLOCK_CHILD = r"""
import asyncio, sys, threading, time
for line in sys.stdin:
    time.sleep(0.001)  # broken under libfaketime 0.9.10 without FakeClock's fix
    threading.Event().wait(0.001)
    asyncio.run(asyncio.sleep(0.001))
    print(repr(time.time()), repr(time.monotonic()), flush=True)
"""


def test_fake_clock_steps_the_wall_clock_only(tmp_path: Path) -> None:
    if find_libfaketime() is None:
        pytest.fail("libfaketime is not installed (Debian: apt-get install faketime)")
    clock = FakeClock(tmp_path / "clock")
    env = clock.env
    assert env["FAKETIME_DONT_FAKE_MONOTONIC"] == "1" and env["FAKETIME_NO_CACHE"] == "1"
    assert env["LD_PRELOAD"].startswith(clock.library)
    proc = subprocess.Popen(
        [sys.executable, "-c", _CLOCK_CHILD],
        cwd=ROOT,
        env={**os.environ, **env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        for expected in (0.0, -3600.0, 7200.0, -1_780_000_000.0, 0.0):  # 1970, then right
            clock.step(expected)
            mono_before = time.monotonic()
            real = time.time()
            proc.stdin.write("\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            assert line, proc.communicate(timeout=WAIT_S)[1]
            wall, mono = map(float, line.split())
            mono_after = time.monotonic()
            # the wall clock is off by the offset (30 s slack for a slow machine)
            assert abs(wall - real - expected) < 30.0, (wall - real, expected)
            # the monotonic clock is the machine's own: no step, no offset
            assert mono_before <= mono <= mono_after
        assert (tmp_path / "clock").read_text().strip() == "+0"
        assert [o for _, o in clock.steps] == [0.0, 0.0, -3600.0, 7200.0, -1_780_000_000.0, 0.0]
    finally:
        proc.stdin.close()
        if proc.wait(timeout=WAIT_S) != 0:
            pytest.fail(f"child failed: {proc.stderr.read() if proc.stderr else ''}")


# -- faults: a crash ---------------------------------------------------------------------


def test_kill_at_random_sigkills_after_a_drawn_delay() -> None:
    async def main() -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import time; time.sleep(60)"
        )
        kill = await kill_at_random(proc, random.Random(3), 0.01, 0.05)
        assert kill.killed and 0.01 <= kill.delay_s <= 0.05
        assert kill.delay_s == random.Random(3).uniform(0.01, 0.05)
        assert await asyncio.wait_for(proc.wait(), WAIT_S) == -9
        # already gone: nothing is sent
        again = await kill_at_random(proc, random.Random(3), 0.0, 0.0)
        assert not again.killed
        popen = subprocess.Popen([sys.executable, "-c", "pass"])
        popen.wait(timeout=WAIT_S)
        assert not (await kill_at_random(popen, random.Random(1), 0.0, 0.01)).killed

    run(main())


# -- simulators: modbus ------------------------------------------------------------------


def test_cabinet_serves_moving_profile_values_and_records_them() -> None:
    async def main() -> None:
        async with CabinetSimulator(tick_s=None) as cabinet:
            conn = ModbusConnection(Endpoint("tcp", "127.0.0.1", cabinet.port), timeout=WAIT_S)
            try:
                volts = []
                for t in (0.0, 22.5):  # a quarter of the wave's period apart
                    for image in cabinet.devices.values():
                        image.tick(t)
                    regs = await conn.read("input_register", 0, 2, unit=1)
                    served = cabinet.served[-1]
                    assert (served.unit, served.table, served.address) == (1, "input_register", 0)
                    assert served.registers == tuple(regs)
                    volts.append(float(decode(list(regs), "float32", "ABCD")))
                assert volts[0] != volts[1]
                assert all(220.0 < v < 240.0 for v in volts)  # the sdm120's voltage
                level = await conn.read("holding_register", 0, 1, unit=2)
                assert cabinet.served[-1].unit == 2 and cabinet.served[-1].registers == (level[0],)
            finally:
                conn.close()
            cabinet.silent = True  # silent: nothing served, nothing recorded
            n = len(cabinet.served)
            conn = ModbusConnection(Endpoint("tcp", "127.0.0.1", cabinet.port), timeout=0.2)
            try:
                with pytest.raises(ModbusError):
                    await conn.read("input_register", 0, 2, unit=1)
            finally:
                conn.close()
            assert len(cabinet.served) == n and len(cabinet.requests) > n
        assert cabinet.profiles == {1: "sdm120", 2: "adam4017-level"}

    run(main())


@pytest.mark.parametrize("kind", ["random", "truncated", "bad_crc"])
def test_garbage_front_answers_garbage_and_the_link_recovers(kind: str) -> None:
    async def main() -> None:
        async with (
            CabinetSimulator(transport="rtu-over-tcp", tick_s=None) as cabinet,
            GarbageRtuFront(cabinet.port, probability=0.0, kinds=[kind], seed=1) as front,  # type: ignore[list-item]
        ):
            endpoint = Endpoint("rtu-over-tcp", "127.0.0.1", front.port)
            conn = ModbusConnection(endpoint, timeout=1.0)
            try:
                regs = await conn.read("input_register", 0, 2, unit=1)
                assert cabinet.served[-1].registers == tuple(regs)
                assert front.counts == {"valid": 1}
                front.probability = 1.0
                with pytest.raises(ModbusError):
                    await conn.read("input_register", 0, 2, unit=1)
                assert front.counts[kind] == 1
                assert front.injected[-1].kind == kind
                assert front.injected[-1].request[:2] == b"\x01\x04"
                front.probability = 0.0
                for _ in range(5):  # the master resynchronises within a few requests
                    try:
                        regs = await conn.read("input_register", 0, 2, unit=1)
                        break
                    except ModbusError:
                        continue
                else:
                    raise AssertionError("the link did not recover")
                assert list(cabinet.served[-1].registers) == list(regs)
            finally:
                conn.close()

    run(main())


def test_underpass_floods_the_pump_drains_and_the_record_holds_what_was_served() -> None:
    """The sump's physics (level += (inflow - pump * outflow) * dt), a flap that holds the
    level whatever the pump does, and the record: each level served, each coil write."""
    from hil.sim_modbus import LEVEL_REGISTER, PUMP_COIL, UnderpassSimulator

    async def main() -> None:
        async with UnderpassSimulator(level=0.1, outflow=2.0, tick_s=0.01) as sump:
            conn = ModbusConnection(Endpoint("tcp", "127.0.0.1", sump.port), timeout=WAIT_S)
            try:
                sump.flood(1.0, 60.0)
                await eventually(lambda: sump.level > 0.5, "the flood fills the sump")
                [mm] = await conn.read("holding_register", LEVEL_REGISTER, 1, unit=1)
                assert sump.served[-1].registers == (mm,) and mm > 500
                assert sump.level_reads()[-1][1] == pytest.approx(mm / 1000)
                await conn.write("coil", PUMP_COIL, [True], unit=1)  # net -1 m/s
                assert (sump.pump, [w.value for w in sump.pump_writes]) == (1, [1])
                write = sump.pump_writes[0]
                assert write.received <= write.acked <= time.time()
                await eventually(lambda: sump.level == 0.0, "the pump drains the sump")
                sump.flap(high=1.0, low=0.2, up=0.2, down=0.2, count=3)
                sump.step()
                assert sump.level == 1.0  # held, the pump on notwithstanding
                await eventually(lambda: sump._flap is None, "the flap ends")
                await conn.write("coil", PUMP_COIL, [False], unit=1)
                await eventually(lambda: sump.level > 0.3, "the flood goes on from low")
            finally:
                conn.close()
        assert [w.value for w in sump.pump_writes] == [1, 0]
        assert sump.ticks > 10 and sump.max_tick_gap < 5.0

    run(main())
    with pytest.raises(ValueError, match="tick_s"):
        UnderpassSimulator(tick_s=0.1)  # the physics moves at least every 50 ms


def test_local_action_latency_runs_from_the_condition_or_the_interlocks_end() -> None:
    """The condition of a transition is the first moment after the previous write from
    which the sump's level (its changes) satisfies it, no earlier than the interlock's
    end."""
    from hil.local_action import _became_true
    from hil.sim_modbus import CoilWrite

    levels = [(10.0, 0.5), (10.1, 0.9), (10.2, 0.95), (10.9, 0.1), (11.1, 0.9), (13.0, 0.1)]
    above = lambda x: x > 0.8  # noqa: E731
    start = CoilWrite(received=20.0, acked=20.0, value=1)  # the write whose latency it is
    assert _became_true(levels, None, 1.0, above, start) == 10.1  # the first: a change
    stop = CoilWrite(received=10.95, acked=10.96, value=0)
    assert _became_true(levels, stop, 0.0, above, start) == 11.1  # no interlock: a change
    assert _became_true(levels, stop, 0.5, above, start) == 11.45  # min_off ends, above
    assert _became_true(levels, stop, 2.5, above, start) is None  # low at min_off's end
    # the level rose before the stop reached the pump and stayed: min_off's end
    late_stop = CoilWrite(received=11.15, acked=11.2, value=0)
    assert _became_true(levels, late_stop, 0.5, above, start) == 11.65
    # the rule's timer ran from its decision: the start reached the simulator before
    # min_off after the stop did; it ended then
    early = CoilWrite(received=11.4, acked=11.41, value=1)
    assert _became_true(levels, stop, 0.5, above, early) == 11.4


def test_garbage_rtu_server_is_self_contained_and_its_junk_hides_no_frame() -> None:
    async def main() -> None:
        async with GarbageRtuServer(probability=0.5, seed=4, tick_s=None) as server:
            conn = ModbusConnection(Endpoint("rtu-over-tcp", "127.0.0.1", server.port), timeout=0.5)
            good = 0
            try:
                for _ in range(8):
                    try:
                        regs = await conn.read("input_register", 0, 2, unit=1)
                    except ModbusError:
                        continue
                    assert tuple(regs) in {r.registers for r in server.cabinet.served}
                    good += 1
            finally:
                conn.close()
            assert good >= 1 and server.counts["valid"] >= good
            assert server.counts["valid"] < sum(server.counts.values())  # and garbage
            assert len(server.injected) == sum(server.counts.values()) - server.counts["valid"]

    run(main())
    rng = random.Random(0)
    body = bytes([1, 4, 0, 0, 0, 2])
    assert _has_frame(body + bytes([0x71, 0xCB]))  # a real request, CRC low byte first
    assert not any(_has_frame(_junk(rng)) for _ in range(200))


def test_sim_modbus_cli_runs_for_a_duration(tmp_path: Path) -> None:
    record = tmp_path / "served.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "hil", "sim", "modbus", "--port", "0", "--duration", "0.2",
         "--record", str(record)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "units 1 (sdm120), 2 (adam4017-level)" in proc.stdout
    assert record.exists()
    bad = subprocess.run(
        [sys.executable, "-m", "hil", "sim", "modbus", "--port", "0", "--garbage", "0.5"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "rtu-over-tcp" in bad.stdout


# -- simulators: mqtt --------------------------------------------------------------------


def _json_point(quantity: str) -> MqttPointSettings:
    return MqttPointSettings.model_validate(
        {"topic": "sensors/{device}/air", "format": "json", "path": f"data.{quantity}",
         "timestamp": "ts", "timestamp_format": "epoch_s"}
    )  # fmt: skip


def test_mqtt_sensors_publish_and_record_every_message(mosquitto: Mosquitto) -> None:
    async def main() -> None:
        sub, got = await subscribed(mosquitto, "sensors/+/air")
        sensors = MqttSensors(mosquitto.url, 3, rate_hz=100.0, garbage=0.4, seed=5)
        await sensors.run(rounds=12)
        assert len(sensors.sent) == 36 and all(m.acked for m in sensors.sent)
        await eventually(lambda: len(got) == 36, "all delivered")
        await cancel(sub)
        received = sorted((str(m.topic), bytes(m.payload)) for m in got)
        assert received == sorted((m.topic, m.payload) for m in sensors.sent)
        assert {m.sensor for m in sensors.sent} == {"airbox-1", "airbox-2", "airbox-3"}
        kinds = {m.garbage for m in sensors.sent}
        assert None in kinds and len(kinds - {None}) >= 2
        points = {q: _json_point(q) for q in ("pm25", "no2")}
        for m in sensors.sent:  # what the agent's mqtt driver makes of each
            for q, spec in points.items():
                if m.garbage is None:
                    assert m.values is not None
                    reading = parse(m.payload, spec)
                    assert reading is not None
                    assert reading.value == m.values[q] and reading.timestamp_ms is not None
                else:
                    with pytest.raises(PayloadError) as info:
                        parse(m.payload, spec)
                    assert info.value.reason == MQTT_REASONS[m.garbage]  # what garbage-input counts
        assert sum(sensors.counts.values()) == 36 and sensors.counts["failed"] == 0
        assert set(GARBAGE_KINDS) >= set(sensors.counts) - {"valid"}

    run(main())


def test_mqtt_sensors_survive_a_broker_outage(mosquitto: Mosquitto) -> None:
    async def main() -> None:
        sensors = MqttSensors(mosquitto.url, 1, rate_hz=50.0, seed=1)
        await sensors.start()
        await eventually(lambda: len(sensors.sent) >= 3, "publishing")
        await asyncio.to_thread(mosquitto.stop)
        await eventually(lambda: sensors.connection_errors >= 1, "noticed the outage")
        await asyncio.to_thread(mosquitto.start)
        n = len(sensors.sent)
        await eventually(lambda: sum(m.acked for m in sensors.sent[n:]) >= 3, "publishing again")
        await sensors.stop()

    run(main())


# -- simulators: ble ---------------------------------------------------------------------


def test_ble_replay_file_decodes_to_the_record(tmp_path: Path) -> None:
    sim = BleTagsSim(garbage=0.2, duplicates=0.2, seed=11)
    path = sim.write(tmp_path / "adverts.jsonl", duration_s=60.0)
    records = load_recording(path)  # the replay source accepts the whole file
    assert len(records) == len(sim.adverts)
    counts = sim.counts
    assert counts["valid"] > 60 and counts["duplicate"] > 5
    assert {k for k in counts if k.startswith("garbage:")} == {
        "garbage:truncated", "garbage:unsupported_version", "garbage:unknown_object"
    }  # fmt: skip
    decoders = Decoders()
    last_id: dict[str, int | None] = {}
    for (t, record), adv in zip(records, sim.adverts, strict=True):
        assert t == adv.t and record == adv.record
        parsed = parse_record(record, 0)
        if adv.garbage is not None:
            with pytest.raises(DecodeError) as err:
                decoders.decode(parsed, adv.format)
            assert err.value.reason == adv.garbage
            continue
        decoded = decoders.decode(parsed, adv.format)
        assert decoded is not None
        assert {m.name: m.value for m in decoded.measurements} == adv.measurements
        assert decoded.packet_id == adv.packet_id
        if adv.duplicate:
            assert last_id[adv.address] == adv.packet_id
        else:
            assert last_id.get(adv.address) != adv.packet_id
        last_id[adv.address] = adv.packet_id
    assert [a.t for a in sim.adverts] == sorted(a.t for a in sim.adverts)


def test_write_replay_by_number_of_adverts(tmp_path: Path) -> None:
    path = tmp_path / "n.jsonl"
    record = write_replay(path, adverts=25, garbage=0.3, duplicates=0.3, seed=4)
    assert sum(not a.duplicate for a in record) == 25
    assert len(load_recording(path)) == len(record)
    assert any(a.garbage for a in record) and any(a.duplicate for a in record)


def test_ble_replay_plays_through_replay_source(tmp_path: Path) -> None:
    sim = BleTagsSim(seed=2)
    path = sim.write(tmp_path / "adverts.jsonl", duration_s=5.0)

    async def main() -> list[str]:
        out = []
        async for adv in ReplaySource(path, speed=1000.0, loop=False).adverts():
            out.append(adv.address)
        return out

    assert run(main()) == [a.address for a in sim.adverts]


def test_sim_cli_ble_and_mqtt(tmp_path: Path, mosquitto: Mosquitto) -> None:
    out, rec = tmp_path / "a.jsonl", tmp_path / "a.rec"
    assert hil_main(["sim", "ble", "--out", str(out), "--duration", "4", "--record", str(rec)]) == 0
    assert len(out.read_text().splitlines()) == len(rec.read_text().splitlines()) == 8
    sent = tmp_path / "sent.jsonl"
    args = ["sim", "mqtt", "--broker", mosquitto.url, "--sensors", "2", "--rate", "20",
            "--duration", "0.5", "--record", str(sent)]  # fmt: skip
    assert hil_main(args) == 0
    rows = [orjson.loads(line) for line in sent.read_text().splitlines()]
    assert rows and {r["sensor"] for r in rows} == {"airbox-1", "airbox-2"}


# -- the garbage-input verdict ------------------------------------------------------------


def test_each_kind_of_uplink_junk_gets_its_one_reason_from_the_ingest(tmp_path: Path) -> None:
    from central.stores import open_store
    from central.worker import IngestWorker
    from common import wire

    store = open_store(f"sqlite:///{tmp_path / 'platform.db'}")
    try:
        worker = IngestWorker("mqtt://127.0.0.1:1", store)
        for i, (kind, (topic_kind, reason)) in enumerate(UPLINK_JUNK.items()):
            topic = wire.topic(wire.DEFAULT_PREFIX, "gw-1", topic_kind)
            run(worker.deliver(topic, uplink_junk(kind, "gw-1", i + 1)))
            assert worker.counters.rejected == {reason: 1}, kind
            worker.counters.rejected.clear()
        assert store.readings("gw-1") == []
    finally:
        store.close()


def test_compare_counts_checks_each_reason_against_the_kinds_that_get_it() -> None:
    from hil.runner import Verdict

    reason_of = {"not_json": "bad_json", "cut_json": "bad_json", "no_field": "missing_path"}
    injected = {"not_json": 2, "cut_json": 1, "no_field": 0}
    ok = Verdict("x")
    compare_counts(ok, "mqtt", injected, {"bad_json": 3}, reason_of)
    assert ok.passed, ok.failures
    assert ok.figures == {
        "injected_mqtt_not_json": 2, "injected_mqtt_cut_json": 1, "injected_mqtt_no_field": 0,
        "rejected_mqtt_bad_json": 3, "rejected_mqtt_missing_path": 0,
    }  # fmt: skip
    off = Verdict("x")  # one junk message missed, one good message rejected
    compare_counts(off, "mqtt", injected, {"bad_json": 2, "not_numeric": 1}, reason_of)
    assert len(off.failures) == 2
    assert "2 rejected as 'bad_json', 3 injected (cut_json, not_json)" in off.failures[0]
    none = Verdict("x")
    compare_counts(none, "mqtt", {"no_field": 0}, {}, reason_of)
    assert none.failures == ["mqtt: no junk was injected"]


def test_hil_run_names_the_scenario_it_cannot_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m hil run NAME` takes a scenario's name; a missing or broken one is a
    clear error naming the scenarios, not a traceback."""
    assert hil_main(["run", "no-such-scenario"]) == 2
    out = capsys.readouterr().out
    assert "cannot load scenario no-such-scenario" in out and "hostile-clients" in out
    broken = tmp_path / "broken.toml"
    broken.write_text('name = "x"\nduration = "soon"\n')
    assert hil_main(["run", str(broken)]) == 2
    assert f"cannot load scenario {broken}" in capsys.readouterr().out


def test_read_loss_by_count_lets_the_windows_explain_a_shortfall() -> None:
    """Under a faked clock readings are matched by count: a poll abandoned at a stop
    (inside its window) is read_lost by design, a shortfall beyond the requests served
    inside the windows is lost outside them."""
    from types import SimpleNamespace

    from drivers.modbus.simulator import SimRequest
    from hil.produced import Window, modbus_read_loss

    plan = {"meter": (1, [(3, 0, 2, "meter/v"), (3, 2, 2, "meter/i")])}
    # five polls of both points, one request each; the last one inside the stop window
    sim = SimpleNamespace(
        requests=[SimRequest(1, 3, 0, 4, time=float(t), wall=1000.0 + t) for t in range(5)]
    )
    stop = [Window(3.5, 5.0, "stop")]
    four = {"meter/v": [1, 2, 3, 4], "meter/i": [1, 2, 3, 4]}
    loss = modbus_read_loss(plan, sim, four, stop, by_count=True)  # type: ignore[arg-type]
    assert (loss.produced, loss.stored, loss.read_lost, loss.lost_outside) == (10, 8, 2, 0)
    three = {"meter/v": [1, 2, 3], "meter/i": [1, 2, 3, 4]}
    loss = modbus_read_loss(plan, sim, three, stop, by_count=True)  # type: ignore[arg-type]
    assert (loss.read_lost, loss.lost_outside) == (2, 1)
    loss = modbus_read_loss(plan, sim, four, [], by_count=True)  # type: ignore[arg-type]
    assert (loss.read_lost, loss.lost_outside) == (0, 2)


def test_the_rig_reads_the_backlog_in_a_child_that_may_die(tmp_path: Path) -> None:
    """A power cut under a mapped WAL index raises SIGBUS in whoever reads it: the rig's
    backlog sampler reads in a child, so the child dies (one sample lost), not the rig."""
    import signal

    from hil.runner import Rig
    from hil.scenario import load_scenario

    root = Path(__file__).resolve().parents[1]
    rig = Rig(load_scenario(root / "hil" / "scenarios" / "outage.toml"), tmp_path)

    async def main() -> list[int]:
        seen = [await rig._backlog()]  # no buffer yet
        with Buffer(rig.buffer_path, 10_000_000) as buf:
            buf.append_many([(Lane.TELEMETRY, b"x" * 10, 3)])
        seen.append(await rig._backlog())
        assert rig._reader is not None
        for pid in list(rig._reader._processes):  # type: ignore[attr-defined]
            os.kill(pid, signal.SIGBUS)
        await asyncio.sleep(0.5)
        seen.append(await rig._backlog())  # the dead child: this sample is lost
        seen.append(await rig._backlog())  # a new child reads again
        await rig.stack.aclose()
        assert rig._reader is None
        return seen

    assert asyncio.run(main()) == [-1, 3, -1, 3]
