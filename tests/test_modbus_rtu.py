"""Modbus RTU on a serial line: two pseudo-terminals bridged like a null-modem cable
(the driver opens one slave tty, the simulator's pymodbus serial server the other), two
unit ids on the bus. The bridge sees every byte on the wire, so it can tell whether the
master ever sent a request before the previous answer was complete."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import Iterator

import pytest

from drivers.base import DeviceSpec, PointSpec
from drivers.modbus import ModbusDeviceSettings, ModbusPointSettings
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.simulator import ModbusSimulator, RegisterImage
from native.batch import GOOD
from tests.helpers import Sink

POLL_S = 0.05
INTER_FRAME_S = 0.01

pytestmark = pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs pseudo-terminals")


class NullModem:
    """Two pty pairs whose master ends are joined: bytes written to one slave tty come
    out of the other. Records (direction, loop time, bytes) of every chunk."""

    def __init__(self) -> None:
        self.master_a, slave_a = os.openpty()
        self.master_b, slave_b = os.openpty()
        self.tty_a, self.tty_b = os.ttyname(slave_a), os.ttyname(slave_b)
        # the slaves stay open here too, so a master never reads EOF/EIO between opens
        self._slaves = (slave_a, slave_b)
        self.chunks: list[tuple[str, float, bytes]] = []
        for fd in (self.master_a, self.master_b):
            os.set_blocking(fd, False)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.master_a, self._pump, self.master_a, self.master_b, "a>b")
        loop.add_reader(self.master_b, self._pump, self.master_b, self.master_a, "b>a")

    def _pump(self, src: int, dst: int, direction: str) -> None:
        try:
            data = os.read(src, 4096)
        except (BlockingIOError, OSError):
            return
        if data:
            self.chunks.append((direction, asyncio.get_running_loop().time(), data))
            os.write(dst, data)

    def stop(self) -> None:
        loop = asyncio.get_running_loop()
        for fd in (self.master_a, self.master_b):
            loop.remove_reader(fd)
        for fd in (self.master_a, self.master_b, *self._slaves):
            with contextlib.suppress(OSError):
                os.close(fd)

    def runs(self) -> list[tuple[str, float, float, bytes]]:
        """Consecutive chunks of one direction joined: (direction, start, end, bytes)."""
        out: list[tuple[str, float, float, bytes]] = []
        for direction, t, data in self.chunks:
            if out and out[-1][0] == direction:
                d, start, _end, prev = out[-1]
                out[-1] = (d, start, t, prev + data)
            else:
                out.append((direction, t, t, data))
        return out


@contextlib.contextmanager
def null_modem() -> Iterator[NullModem]:
    modem = NullModem()
    try:
        yield modem
    finally:
        with contextlib.suppress(RuntimeError):
            modem.stop()


def point(pid: int, device: str, name: str, **settings: object) -> PointSpec:
    return PointSpec(
        id=pid,
        key=f"{device}/{name}",
        name=name,
        unit="",
        kind="float",
        writable=False,
        settings=ModbusPointSettings.model_validate(settings),
    )


def rtu_device(name: str, tty: str, unit: int, points: tuple[PointSpec, ...]) -> DeviceSpec:
    return DeviceSpec(
        name=name,
        poll_s=POLL_S,
        settings=ModbusDeviceSettings.model_validate(
            {
                "transport": "rtu",
                "serial_port": tty,
                "baudrate": 19200,
                "unit_id": unit,
                "timeout": 0.5,
                "retries": 1,
                "inter_frame_delay": INTER_FRAME_S,
            }
        ),
        points=points,
    )


def test_two_units_on_one_rtu_bus_are_read_in_turn() -> None:
    one, two = RegisterImage(), RegisterImage()
    one.set("holding_register", 0, [1234, 0xFFFE])  # uint16, int16 -2
    one.set("input_register", 10, [0x4148, 0x0000])  # float32 12.5
    two.set("holding_register", 0, [4321, 7])
    two.set("coil", 5, [True])

    async def main() -> None:
        with null_modem() as modem:
            modem.start()
            sim = ModbusSimulator({1: one, 2: two}, transport="rtu", serial_port=modem.tty_b)
            await sim.start()
            try:
                driver = ModbusDriver(
                    [
                        rtu_device(
                            "u1",
                            modem.tty_a,
                            1,
                            (
                                point(1, "u1", "a", address=0),
                                point(2, "u1", "b", address=1, datatype="int16"),
                                point(
                                    3,
                                    "u1",
                                    "f",
                                    table="input_register",
                                    address=10,
                                    datatype="float32",
                                ),
                            ),
                        ),
                        rtu_device(
                            "u2",
                            modem.tty_a,
                            2,
                            (
                                point(4, "u2", "a", address=0),
                                point(5, "u2", "b", address=1),
                                point(6, "u2", "c", table="coil", address=5),
                            ),
                        ),
                    ]
                )
                sink = Sink()
                task = asyncio.create_task(driver.run(sink))
                try:
                    deadline = time.monotonic() + 15
                    while (
                        sum(1 in b.point_ids for b in sink.batches) < 5
                        or sum(4 in b.point_ids for b in sink.batches) < 5
                    ):
                        assert not task.done(), task.exception()
                        assert time.monotonic() < deadline, "no readings from the bus"
                        await asyncio.sleep(0.01)
                finally:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            finally:
                await sim.stop()

            latest = {pid: (v, q) for b in sink.batches for pid, _ts, v, q in b.rows()}
            assert latest == {
                1: (1234.0, GOOD),
                2: (-2.0, GOOD),
                3: (12.5, GOOD),
                4: (4321.0, GOOD),
                5: (7.0, GOOD),
                6: (1.0, GOOD),
            }
            assert {r.unit for r in sim.reads()} == {1, 2}
            assert all(h.errors == 0 for h in driver.health().values())
            # serialized: on the wire, requests (a>b) and answers (b>a) alternate, one
            # answer per request, and the bus is silent for the inter-frame delay after
            # each answer before the next request starts
            runs = modem.runs()
            assert runs[0][0] == "a>b"
            directions = [r[0] for r in runs]
            assert all(d != e for d, e in itertools.pairwise(directions))
            requests = [r for r in runs if r[0] == "a>b"]
            assert len(requests) == len(sim.reads())
            assert sim.max_concurrent == 1
            silences = [
                nxt[1] - prev[2] for prev, nxt in itertools.pairwise(runs) if prev[0] == "b>a"
            ]
            assert silences and min(silences) >= INTER_FRAME_S * 0.8, min(silences)

    asyncio.run(main())


def test_rtu_over_tcp_gateway_with_two_units() -> None:
    one, two = RegisterImage(), RegisterImage()
    one.set("holding_register", 3, [111])
    two.set("holding_register", 3, [222])

    async def main() -> None:
        sim = ModbusSimulator({1: one, 2: two}, transport="rtu-over-tcp")
        await sim.start()
        try:
            devices = [
                DeviceSpec(
                    name=f"u{unit}",
                    poll_s=POLL_S,
                    settings=ModbusDeviceSettings.model_validate(
                        {
                            "transport": "rtu-over-tcp",
                            "host": "127.0.0.1",
                            "port": sim.port,
                            "unit_id": unit,
                            "timeout": 0.5,
                            "inter_frame_delay": INTER_FRAME_S,
                        }
                    ),
                    points=(point(unit, f"u{unit}", "v", address=3),),
                )
                for unit in (1, 2)
            ]
            driver = ModbusDriver(devices)
            sink = Sink()
            task = asyncio.create_task(driver.run(sink))
            try:
                deadline = time.monotonic() + 10
                while {pid for b in sink.batches for pid in b.point_ids} != {1, 2}:
                    assert not task.done(), task.exception()
                    assert time.monotonic() < deadline, "no readings through the gateway"
                    await asyncio.sleep(0.01)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        finally:
            await sim.stop()
        latest = {pid: (v, q) for b in sink.batches for pid, _ts, v, q in b.rows()}
        assert latest == {1: (111.0, GOOD), 2: (222.0, GOOD)}
        assert sim.max_concurrent == 1

    asyncio.run(main())
