"""The mcu driver and McuBridge against the simulated microcontroller on a pty."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from pathlib import Path

import pytest

from drivers.base import DeviceSpec, PointSpec
from drivers.mcu import McuDeviceSettings, McuDriver, McuPointSettings
from drivers.mcu.simulator import SimMcu
from firmware_bridge import messages as m
from firmware_bridge.bridge import McuBridge, SendError
from firmware_bridge.link import LinkLost, LinkUp, Timers
from tests.helpers import Sink, run_driver_until, wait_until

pytestmark = pytest.mark.timeout(60)

FAST = Timers(rto=0.3, rto_max=1.0, retries=4, heartbeat=0.3, lost_after=3, hello_interval=0.3)


def running_sim(**kwargs: object) -> contextlib.AbstractAsyncContextManager[SimMcu]:
    return SimMcu.on_pty(**kwargs).running()


def mcu_device(port: str, sensors: dict[int, str], **settings: object) -> DeviceSpec:
    points = tuple(
        PointSpec(
            id=100 + sid,
            key=f"mcu/{name}",
            name=name,
            unit="",
            kind="float",
            writable=False,
            settings=McuPointSettings(sensor_id=sid),
        )
        for sid, name in sensors.items()
    )
    s = McuDeviceSettings(port=port, heartbeat=0.3, **settings)  # type: ignore[arg-type]
    return DeviceSpec(name="mcu", poll_s=1.0, settings=s, points=points)


async def _readings_flow_through_the_driver_as_batches() -> None:
    async with running_sim(interval=0.1, seed=3) as sim:
        # sensor 4 (supply) has no point: counted, not fatal
        driver = McuDriver([mcu_device(sim.port, {1: "level", 2: "tilt", 3: "temperature"})])
        sink = Sink()
        t0 = time.time_ns() // 1_000_000
        await run_driver_until(driver, sink, lambda: len(sink.rows()) >= 60, timeout=20)
        t1 = time.time_ns() // 1_000_000
    rows = sink.rows()
    by_point: dict[int, list[tuple[int, float, int]]] = {}
    for pid, ts, value, q in rows:
        by_point.setdefault(pid, []).append((ts, value, q))
    assert set(by_point) == {101, 102, 103}
    for series in by_point.values():
        stamps = [ts for ts, _, _ in series]
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
        # uptime + hello offset: within the run (a little slack for the offset estimate)
        assert t0 - 1000 <= stamps[0] and stamps[-1] <= t1 + 1000
    assert all(0.0 <= v <= 5.0 and q == 0 for _, v, q in by_point[101])  # level, m
    assert all(v in (0.0, 1.0) for _, v, _ in by_point[102])  # tilt switch
    assert all(5.0 < v < 25.0 for _, v, _ in by_point[103])  # temperature
    # samples of one sweep share a timestamp across points
    assert {ts for ts, _, _ in by_point[101]} == {ts for ts, _, _ in by_point[103]}
    assert driver.counters["mcu"]["unknown_sensor_readings"] > 0
    health = driver.health()["mcu"]
    assert health.readings == len(rows) and health.errors == 0


async def _readings_over_a_garbled_line_arrive_once_in_order() -> None:
    async with running_sim(interval=0.1, seed=5, timers=FAST) as sim:
        sim.faults.garbage_tx = 0.3  # a frame in three bit-flipped, cut short or after junk
        driver = McuDriver([mcu_device(sim.port, {1: "level", 2: "tilt", 3: "temp", 4: "mv"})])
        sink = Sink()
        sampled_at_quiet: list[int] = []

        def garbled_then_quiet() -> bool:
            if not sampled_at_quiet and len(sink.rows()) >= 200:
                sim.faults.garbage_tx = 0.0
                sampled_at_quiet.append(sim.counts["sampled"])
            # a reading sampled after the line went quiet reached the sink: every garbled
            # piece before it has been through the driver
            return bool(sampled_at_quiet) and len(sink.rows()) > sampled_at_quiet[0]

        await run_driver_until(driver, sink, garbled_then_quiet, timeout=30)
    health = driver.health()["mcu"]
    garbled = {k: n for k, n in sim.counts.items() if k.startswith("garbage_")}
    # how many of each kind depends on how many frames 200 readings took: at least some
    assert set(garbled) <= {"garbage_flip", "garbage_cut", "garbage_junk"}, garbled
    assert sum(garbled.values()) >= 5, garbled
    assert health.errors >= 5 and "bad frame" in (health.last_error or "")
    # each garbled piece rejected and counted once, for the reason the line made it get
    expected: dict[str, int] = {}
    for (_kind, reason), n in sim.garbled.items():
        expected[reason] = expected.get(reason, 0) + n
    assert sum(expected.values()) == sum(garbled.values()) and "accepted" not in expected
    assert health.as_dict()["rejected"] == expected
    by_point: dict[int, list[int]] = {}
    for pid, ts, _, _ in sink.rows():
        by_point.setdefault(pid, []).append(ts)
    for stamps in by_point.values():
        # resent frames are never overtaken (one READINGS in flight): in order, once each
        assert stamps == sorted(set(stamps))
    # a frame that failed (retries used up, or NACKed no_session while the host was
    # between sessions) went back to the head of the device's queue: resent, not lost
    assert sim.counts["readings_sent"] - sim.counts["readings_requeued"] >= 200, sim.counts


async def _command_retried_after_a_dropped_frame_and_acknowledged() -> None:
    async with running_sim(interval=1.0) as sim, McuBridge(sim.port, timers=FAST) as bridge:
        caps = await bridge.wait_up(10)
        assert caps.firmware == m.Version(1, 0, 0) and caps.hardware_id == "citygw-mcu-r1"
        sim.faults.drop_rx_types[m.MsgType.COMMAND] = 2  # the first two tries are lost
        result = await bridge.command(m.Command.set_interval(250), timeout=15)
        assert result.status is m.CommandStatus.OK
        assert sim.interval == 0.25
        assert bridge.link.counters["retransmits"] >= 2
        assert len(sim.commands) == 1  # executed once
        cfg = await bridge.command(m.Command(m.Opcode.READ_CONFIG), timeout=15)
        report = m.ConfigReport.decode(cfg.data)
        assert report.sampling_interval_ms == 250 and len(report.sensors) == 4
        bad = await bridge.command(m.Command.set_interval(5), timeout=15)
        assert bad.status is m.CommandStatus.INVALID_ARGUMENT
        odd = await bridge.command(m.Command(99), timeout=15)
        assert odd.status is m.CommandStatus.UNSUPPORTED


async def _command_to_a_stalled_device_fails_then_link_recovers() -> None:
    async with running_sim(interval=1.0) as sim, McuBridge(sim.port, timers=FAST) as bridge:
        await bridge.wait_up(10)
        sim.faults.stall = True
        with pytest.raises(SendError):
            await bridge.command(m.Command(m.Opcode.READ_CONFIG), timeout=20)
        assert not bridge.is_up
        sim.faults.stall = False
        await bridge.wait_up(10)
        result = await bridge.command(m.Command(m.Opcode.READ_CONFIG), timeout=15)
        assert result.status is m.CommandStatus.OK


async def _reboot_command_and_corrupted_frames() -> None:
    async with running_sim(interval=0.1) as sim, McuBridge(sim.port, timers=FAST) as bridge:
        await bridge.wait_up(10)
        sim.faults.corrupt_tx = 0.2  # one frame in five from the device has a bit error
        seen: list[object] = []

        async def watch() -> None:
            async for ev in bridge.events():
                if isinstance(ev, LinkUp | LinkLost):
                    seen.append(ev)

        watcher = asyncio.create_task(watch())
        result = await bridge.command(m.Command(m.Opcode.REBOOT), timeout=15)
        assert result.status is m.CommandStatus.OK
        deadline = time.monotonic() + 15
        while not any(isinstance(e, LinkUp) for e in seen):
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.05)
        watcher.cancel()
        assert sim.boots[-1] is m.BootReason.RESET
        up = [e for e in seen if isinstance(e, LinkUp)][-1]
        assert up.capabilities.boot_reason is m.BootReason.RESET
        # readings flow again; the corrupted ones are rejected by CRC/COBS and resent
        c = bridge.link.counters
        deadline = time.monotonic() + 15
        while c["rejected_bad_crc"] + c["rejected_cobs"] < 2 or sim.counts["readings_sent"] < 40:
            assert time.monotonic() < deadline, (c, sim.counts)
            await asyncio.sleep(0.05)
        assert sim.counts["corrupted_frames"] >= 2


async def _driver_reports_a_dead_port_and_recovers(tmp_path: Path) -> None:
    link = tmp_path / "ttyMCU"  # the port appears later (plugged in), as a symlink
    driver = McuDriver([mcu_device(str(link), {1: "level"}, retry_max=0.5)])
    sink = Sink()
    health = driver.health()["mcu"]
    task = asyncio.create_task(driver.run(sink))
    try:
        deadline = time.monotonic() + 10
        while health.errors < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert "ttyMCU" in (health.last_error or "")
        async with running_sim(interval=0.1) as sim:
            link.symlink_to(sim.port)
            deadline = time.monotonic() + 15
            while health.readings < 10:
                assert time.monotonic() < deadline, health
                await asyncio.sleep(0.02)
            link.unlink()
        # the sim is gone (pty closed): the port dies, reopening fails, health says so
        failures = health.errors
        deadline = time.monotonic() + 15
        while health.errors <= failures:
            assert time.monotonic() < deadline, health
            await asyncio.sleep(0.02)
        assert health.consecutive_failures >= 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_a_reading_delivered_twice_is_stored_once() -> None:
    """A READINGS frame in flight when a session ends comes again in the next session
    (at least once); the driver knows it by the sensor's uptime, until a reboot. The
    offset only moves later within a boot, so times never step back."""
    driver = McuDriver([mcu_device("/dev/null", {1: "level", 2: "tilt"})])
    points = {1: 101, 2: 102}
    clock = driver._clocks["mcu"]

    def readings(*uptimes: int) -> m.Readings:
        return m.Readings(
            tuple(m.Reading(sid, up, m.ValueType.F32, 1.0) for up in uptimes for sid in (1, 2))
        )

    def stamps(*uptimes: int) -> list[int]:
        return list(driver._batch("mcu", readings(*uptimes), points).timestamps)

    clock.session(hello_sent_ms=10_500, uptime_ms=500)
    assert stamps(1000, 2000) == [11_000, 11_000, 12_000, 12_000]
    # a new session whose HELLO was answered late: its estimate is earlier, not taken;
    # the frame sent again is dropped, the new reading kept
    clock.session(hello_sent_ms=12_400, uptime_ms=2_450)
    assert stamps(1000, 2000, 3000) == [13_000, 13_000]
    assert driver.counters["mcu"]["repeated_readings"] == 4
    # a reboot, seen by its uptime (restarted) or by an offset seconds later
    clock.session(hello_sent_ms=20_000, uptime_ms=100)
    assert stamps(200) == [20_100, 20_100]
    clock.session(hello_sent_ms=90_000, uptime_ms=5_000)  # rebooted and up for a while
    assert stamps(150, 4_000) == [85_150, 85_150, 89_000, 89_000]


def test_heartbeats_rebase_the_clock_on_drift_not_on_a_busy_host() -> None:
    driver = McuDriver([mcu_device("/dev/null", {1: "level"})])
    clock = driver._clocks["mcu"]
    clock.session(hello_sent_ms=10_000, uptime_ms=0)
    # one heartbeat read a second late (the host was busy): nothing moves
    assert not clock.heartbeat(wall_ms=12_000, uptime_ms=1_000, max_skew_ms=500)
    assert not clock.heartbeat(wall_ms=12_000, uptime_ms=2_000, max_skew_ms=500)
    assert clock.offset_ms == 10_000
    # the device's crystal runs slow: every heartbeat says so, the least skew is taken
    skews = [900, 800, 850, 700, 950]
    moved = [
        clock.heartbeat(13_000 + i * 1000 + k, 3_000 + i * 1000, 500) for i, k in enumerate(skews)
    ]
    assert moved == [False] * 4 + [True] and clock.offset_ms == 10_700
    # a device ahead of the host (or the host's clock stepped back): at once
    assert clock.heartbeat(wall_ms=17_000, uptime_ms=8_000, max_skew_ms=500)
    assert clock.offset_ms == 9_000


def test_a_flipped_bit_always_changes_the_frame_and_never_makes_a_delimiter() -> None:
    sim = SimMcu(-1, seed=9)
    frame = bytes(1 << i for i in range(8))  # bytes with one bit set: the hard case
    for _ in range(400):
        flipped = sim._flip_bit(frame)
        assert flipped != frame and b"\x00" not in flipped
        assert sum(bin(a ^ b).count("1") for a, b in zip(frame, flipped, strict=True)) == 1


def test_config_rejects_duplicate_sensor_ids() -> None:
    dev = McuDeviceSettings.model_validate({"port": "/dev/null"})
    problems = McuDriver.check_device(
        dev, [McuPointSettings(sensor_id=1), McuPointSettings(sensor_id=1)], [{}, {}]
    )
    assert [p.key_path for p in problems] == [("points", 1, "sensor_id")]
    assert math.isclose(dev.heartbeat, 1.0)


def test_readings_flow_through_the_driver_as_batches() -> None:
    asyncio.run(_readings_flow_through_the_driver_as_batches())


def test_readings_over_a_garbled_line_arrive_once_in_order() -> None:
    asyncio.run(_readings_over_a_garbled_line_arrive_once_in_order())


def test_command_retried_after_a_dropped_frame_and_acknowledged() -> None:
    asyncio.run(_command_retried_after_a_dropped_frame_and_acknowledged())


def test_command_to_a_stalled_device_fails_then_link_recovers() -> None:
    asyncio.run(_command_to_a_stalled_device_fails_then_link_recovers())


def test_reboot_command_and_corrupted_frames() -> None:
    asyncio.run(_reboot_command_and_corrupted_frames())


def test_driver_reports_a_dead_port_and_recovers(tmp_path: Path) -> None:
    asyncio.run(_driver_reports_a_dead_port_and_recovers(tmp_path))


def test_a_device_added_while_the_driver_runs_is_served_and_a_removed_one_let_go() -> None:
    def named(spec: DeviceSpec, name: str, first_id: int) -> DeviceSpec:
        points = tuple(
            dataclasses.replace(p, id=first_id + i, key=f"{name}/{p.name}")
            for i, p in enumerate(spec.points)
        )
        return dataclasses.replace(spec, name=name, points=points)

    async def main() -> None:
        async with running_sim(interval=0.1, seed=3) as one, running_sim(interval=0.1) as two:
            driver = McuDriver([named(mcu_device(one.port, {1: "level"}), "a", 1)])
            sink = Sink()
            task = asyncio.create_task(driver.run(sink))
            try:
                await wait_until(lambda: 1 in {r[0] for r in sink.rows()})
                await driver.add_device(named(mcu_device(two.port, {1: "level"}), "b", 2))
                await wait_until(lambda: 2 in {r[0] for r in sink.rows()})
                await driver.remove_device("a")
                assert "a" not in driver.bridges and "a" not in driver.health()
                since = len(sink.rows())
                await wait_until(lambda: len(sink.rows()) >= since + 10)
                assert {r[0] for r in sink.rows()[since:]} == {2}  # b goes on, alone
                assert not task.done()
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    asyncio.run(main())
