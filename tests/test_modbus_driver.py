"""The modbus driver end to end against the simulator (a real pymodbus server on a free
loopback port): decoding, merged reads, isolation of illegal addresses, dead devices,
writes, several unit ids behind one connection."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import struct
import time
from array import array
from collections.abc import AsyncIterator, Callable, Sequence

import pytest

from drivers.base import DeviceSpec, PointSpec
from drivers.modbus import ModbusDeviceSettings, ModbusPointSettings
from drivers.modbus.driver import ModbusDriver, ModbusWriteError, device_plans
from drivers.modbus.simulator import ModbusSimulator, RegisterImage
from native.batch import BAD, GOOD, UNAVAILABLE, Batch
from tests.helpers import run_driver_until

POLL_S = 0.05
HR = "holding_register"


def mpoint(
    pid: int,
    name: str,
    *,
    device: str = "dev",
    writable: bool = False,
    min: float | None = None,
    max: float | None = None,
    **settings: object,
) -> PointSpec:
    s = ModbusPointSettings.model_validate(settings)
    kind = "bool" if s.datatype in ("bool", "bit") else "float"
    return PointSpec(
        id=pid,
        key=f"{device}/{name}",
        name=name,
        unit="",
        kind=kind,
        writable=writable,
        settings=s,
        min=min,
        max=max,
    )


def mdevice(
    name: str, port: int, points: Sequence[PointSpec], poll_s: float = POLL_S, **settings: object
) -> DeviceSpec:
    base: dict[str, object] = {"host": "127.0.0.1", "port": port, "timeout": 0.5, "retries": 1}
    base.update(settings)
    return DeviceSpec(
        name=name,
        poll_s=poll_s,
        settings=ModbusDeviceSettings.model_validate(base),
        points=tuple(points),
    )


class Sink:
    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.push_times: list[float] = []  # loop time of each push

    def push(self, batch: Batch) -> bool:
        self.batches.append(batch)
        self.push_times.append(asyncio.get_running_loop().time())
        return True

    def latest(self) -> dict[int, tuple[float, int]]:
        out: dict[int, tuple[float, int]] = {}
        for b in self.batches:
            for pid, _ts, v, q in b.rows():
                out[pid] = (v, q)
        return out

    def of(self, ids: set[int]) -> list[Batch]:
        return [b for b in self.batches if set(b.point_ids) <= ids]


@contextlib.asynccontextmanager
async def serving(devices: dict[int, RegisterImage]) -> AsyncIterator[ModbusSimulator]:
    sim = ModbusSimulator(devices)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


# -- registers by hand (not through our encoder) --------------------------------------

FMT = {
    "int16": ">h",
    "uint16": ">H",
    "int32": ">i",
    "uint32": ">I",
    "int64": ">q",
    "uint64": ">Q",
    "float32": ">f",
    "float64": ">d",
}
SAMPLES: dict[str, float] = {
    "int16": -12345,
    "uint16": 54321,
    "int32": -123456789,
    "uint32": 3_000_000_000,
    "int64": -1_234_567_890_123_456_789,
    "uint64": 12_345_678_901_234_567_890,
    "float32": 123.456,
    "float64": -9876.54321,
}


def words(value: float, datatype: str, order: str) -> list[int]:
    """The registers a device sends: big-endian bytes, then reordered as `order` says
    (CDAB: words reversed; BADC: bytes swapped within each word; DCBA: both)."""
    raw = struct.pack(FMT[datatype], value)
    w = [raw[i : i + 2] for i in range(0, len(raw), 2)]
    if order in ("CDAB", "DCBA"):
        w.reverse()
    if order in ("BADC", "DCBA"):
        w = [x[::-1] for x in w]
    return [int.from_bytes(x, "big") for x in w]


def expected(value: float, datatype: str) -> float:
    if datatype == "float32":
        return float(struct.unpack(">f", struct.pack(">f", value))[0])
    return float(value)


# -- decoding ------------------------------------------------------------------------


def test_every_datatype_and_order_decodes_end_to_end() -> None:
    image = RegisterImage()
    points: list[PointSpec] = []
    want: dict[int, float] = {}
    pid = 0
    address = 0
    for datatype, value in SAMPLES.items():
        for order in ("ABCD", "CDAB", "BADC", "DCBA"):
            for table in (HR, "input_register"):
                pid += 1
                image.set(table, address, words(value, datatype, order))
                points.append(
                    mpoint(
                        pid,
                        f"{datatype}_{order}_{table}",
                        table=table,
                        address=address,
                        datatype=datatype,
                        order=order,
                    )
                )
                want[pid] = expected(value, datatype)
            address += 5
    # scale and offset: raw 655 (0x028F) * 0.1 - 40 = 25.5
    image.set(HR, 1000, [655])
    points.append(mpoint(900, "temp", address=1000, datatype="int16", scale=0.1, offset=-40))
    want[900] = 655 * 0.1 - 40
    image.set(HR, 1001, [0xFFFF])  # -1 as int16, * 2.5
    points.append(mpoint(901, "neg", address=1001, datatype="int16", scale=2.5))
    want[901] = -2.5
    # bool (register not 0), bit 3 and bit 0 of one register
    image.set(HR, 1002, [0b1000])
    points.append(mpoint(902, "flag", address=1002, datatype="bool"))
    points.append(mpoint(903, "bit3", address=1002, datatype="bit", bit=3))
    points.append(mpoint(904, "bit0", address=1002, datatype="bit", bit=0))
    want.update({902: 1.0, 903: 1.0, 904: 0.0})
    # coils and discrete inputs
    image.set("coil", 7, [True, False])
    image.set("discrete_input", 20, [False, True])
    points.append(mpoint(905, "c7", table="coil", address=7))
    points.append(mpoint(906, "c8", table="coil", address=8))
    points.append(mpoint(907, "d20", table="discrete_input", address=20))
    points.append(mpoint(908, "d21", table="discrete_input", address=21))
    want.update({905: 1.0, 906: 0.0, 907: 0.0, 908: 1.0})
    # a string point: device_info, not a reading
    image.set(
        HR, 1010, [int.from_bytes(b[i : i + 2]) for b in [b"SN-4711\0"] for i in (0, 2, 4, 6)]
    )
    points.append(mpoint(909, "serial", address=1010, datatype="string", length=4))

    async def main() -> None:
        async with serving({1: image}) as sim:
            driver = ModbusDriver([mdevice("dev", sim.port, points)])
            sink = Sink()
            await run_driver_until(driver, sink, lambda: len(sink.batches) >= 1)
            batch = sink.batches[0]
            got = {pid: (v, q) for pid, _ts, v, q in batch.rows()}
            assert 909 not in got  # strings are not pushed
            assert set(got) == set(want)
            for pid, value in want.items():
                v, q = got[pid]
                assert q == GOOD, pid
                assert v == pytest.approx(value, rel=1e-12), (pid, points[pid - 1].name)
            assert driver.device_info("dev") == {"serial": "SN-4711"}
            assert driver.health()["dev"].consecutive_failures == 0

    asyncio.run(main())


def test_not_available_markers_read_as_missing_with_quality_unavailable() -> None:
    """A device's "no value" marker came out as 214748364.7 °C with GOOD quality
    (issue 13): now a declared marker (compared on the register bits) or a NaN float is
    a NaN reading with quality UNAVAILABLE; an undeclared value still reads as itself."""
    image = RegisterImage()
    image.set(HR, 0, [0x7FFF, 0xFFFF])  # int32 0x7FFFFFFF
    image.set(HR, 2, words(215, "int32", "ABCD"))  # 21.5 °C, a real value
    image.set(HR, 4, [0xFFFF, 0xFFFF])  # uint32 0xFFFFFFFF
    image.set(HR, 6, [0x8000])  # int16 0x8000 = -32768
    image.set(HR, 7, [0x7FC0, 0x0000])  # float32 quiet NaN
    image.set(HR, 9, [0x7FFF, 0xFFFF])  # int32 0x7FFFFFFF, no marker declared
    image.set(HR, 11, [0xFFFF, 0x7FFF])  # int32 0x7FFFFFFF in word order CDAB
    image.set(HR, 13, words(-9999.0, "float32", "ABCD"))  # a float marker by value
    points = [
        mpoint(1, "temperature", address=0, datatype="int32", scale=0.1, invalid=[0x7FFFFFFF]),
        mpoint(2, "temperature_2", address=2, datatype="int32", scale=0.1, invalid=[0x7FFFFFFF]),
        mpoint(3, "energy", address=4, datatype="uint32", invalid=[-1]),  # = 0xFFFFFFFF
        mpoint(4, "level", address=6, datatype="int16", invalid=[0x8000, 0x7FFF]),
        mpoint(5, "wind", address=7, datatype="float32", scale=2.0),
        mpoint(6, "undeclared", address=9, datatype="int32", scale=0.1),
        mpoint(7, "swapped", address=11, datatype="int32", order="CDAB", invalid=[0x7FFFFFFF]),
        mpoint(8, "rain", address=13, datatype="float32", invalid=[-9999]),
    ]

    async def main() -> None:
        async with serving({1: image}) as sim:
            driver = ModbusDriver([mdevice("dev", sim.port, points)])
            sink = Sink()
            await run_driver_until(driver, sink, lambda: len(sink.batches) >= 1)
            got = {pid: (v, q) for pid, _ts, v, q in sink.batches[0].rows()}
            for pid in (1, 3, 4, 5, 7, 8):
                v, q = got[pid]
                assert math.isnan(v) and q == UNAVAILABLE, (points[pid - 1].name, v, q)
            assert got[2] == (pytest.approx(21.5), GOOD)
            assert got[6] == (pytest.approx(214748364.7), GOOD)  # nothing declared
            # the device answered: a marker is not a failure of the device
            assert driver.health()["dev"].consecutive_failures == 0
            assert driver.device_status("dev")["bad_points"] == []

    asyncio.run(main())


def test_timestamps_are_the_response_times() -> None:
    image = RegisterImage()
    image.set(HR, 0, [1])
    image.set("input_register", 0, [2])
    points = [mpoint(1, "a", address=0), mpoint(2, "b", table="input_register", address=0)]

    async def main() -> None:
        async with serving({1: image}) as sim:
            sim.delay = 0.03  # each answer 30 ms late: the two requests differ in time
            driver = ModbusDriver([mdevice("dev", sim.port, points)])
            sink = Sink()
            before = time.time_ns() // 1_000_000
            await run_driver_until(driver, sink, lambda: len(sink.batches) >= 1)
            ts = dict(zip(sink.batches[0].point_ids, sink.batches[0].timestamps, strict=True))
            assert before < ts[1] <= time.time_ns() // 1_000_000
            assert abs(ts[2] - ts[1]) >= 25  # one timestamp per response, not per poll

    asyncio.run(main())


# -- merged reads ----------------------------------------------------------------------


def test_merged_reads_give_the_same_values_as_point_reads() -> None:
    image = RegisterImage()
    layout = [(0, "uint16"), (1, "int16"), (4, "float32"), (8, "uint32"), (20, "int64")]
    for i, (address, datatype) in enumerate(layout):
        sample = SAMPLES[datatype]
        value = sample / (i + 1) if datatype.startswith("float") else int(sample) // (i + 1)
        image.set(HR, address, words(value, datatype, "ABCD"))

    def points() -> list[PointSpec]:
        return [mpoint(i + 1, f"p{i}", address=a, datatype=t) for i, (a, t) in enumerate(layout)]

    async def read(sim: ModbusSimulator, **limits: int) -> tuple[list[float], int]:
        before = len(sim.reads())
        driver = ModbusDriver([mdevice("dev", sim.port, points(), **limits)])
        sink = Sink()
        await run_driver_until(driver, sink, lambda: len(sink.batches) >= 1)
        assert all(q == GOOD for q in sink.batches[0].quality)
        return list(sink.batches[0].values), len(sim.reads()) - before

    async def main() -> None:
        async with serving({1: image}) as sim:
            merged, n_merged = await read(sim, max_gap=20)
            single, n_single = await read(sim, max_gap=0, max_registers=4)
            assert merged == single
            assert n_merged == 1
            assert n_single == 4  # 0-1 are adjacent and still go together

    asyncio.run(main())


def test_device_plans_follow_the_poll_groups() -> None:
    points = [
        mpoint(1, "a", address=0),
        mpoint(2, "b", address=1),
        mpoint(3, "c", address=2, group="slow"),
    ]
    dev = mdevice("dev", 502, points, poll_groups={"slow": 10.0})
    plans = device_plans([dev])
    assert [(g, [(r.address, r.count) for r in reqs]) for g, reqs in plans["dev"]] == [
        ("", [(0, 2)]),
        ("slow", [(2, 1)]),
    ]


# -- isolation of exception responses ------------------------------------------------


def test_illegal_address_hole_is_isolated_and_the_working_plan_remembered() -> None:
    image = RegisterImage()
    image.set(HR, 0, list(range(100, 110)))
    image.hole(HR, 5)
    points = [mpoint(i + 1, f"r{i}", address=i) for i in range(10)]
    polls = 16

    async def main() -> None:
        async with serving({1: image}) as sim:
            driver = ModbusDriver([mdevice("dev", sim.port, points)])
            sink = Sink()
            await run_driver_until(driver, sink, lambda: len(sink.batches) >= polls)
            reads = sim.reads()
        # every poll: all but the hole's point good
        for b in sink.batches[:polls]:
            rows = {pid: (v, q) for pid, _ts, v, q in b.rows()}
            for i in range(10):
                v, q = rows[i + 1]
                if i == 5:
                    assert q == BAD and math.isnan(v)
                else:
                    assert (v, q) == (100 + i, GOOD)
        # the first poll searched (the merged read failed); later polls run the working
        # plan: no read spans the hole again, and the hole alone is retried with backoff
        assert (reads[0].address, reads[0].count) == (0, 10)
        spanning = [r for r in reads[1:] if r.address <= 5 < r.address + r.count and r.count > 1]
        first_poll_spanning = [
            r for r in reads if r.address <= 5 < r.address + r.count and r.count > 1
        ]
        assert len(spanning) == len(first_poll_spanning) - 1  # all in the first poll
        plan = driver.working_plans("dev")[0][1]
        assert [(r.address, r.count) for r in plan if r.address <= 5 < r.address + r.count] == [
            (5, 1)
        ]
        hole_alone = [r for r in reads if (r.address, r.count) == (5, 1)]
        assert 2 <= len(hole_alone) <= 5  # polls 1, 3, 7, 15: not every poll
        assert driver.device_status("dev")["bad_points"] == ["r5"]
        health = driver.health()["dev"]
        assert health.consecutive_failures == 0
        assert health.last_error is not None and "exception 2" in health.last_error

    asyncio.run(main())


def test_hole_that_gets_mapped_recovers() -> None:
    image = RegisterImage()
    image.set(HR, 0, [1, 2, 3])
    image.hole(HR, 1)
    points = [mpoint(i + 1, f"r{i}", address=i) for i in range(3)]

    async def main() -> None:
        async with serving({1: image}) as sim:
            driver = ModbusDriver([mdevice("dev", sim.port, points)])
            sink = Sink()
            await run_driver_until(driver, sink, lambda: len(sink.batches) >= 2)
            image.holes[HR].clear()
            await run_driver_until(driver, sink, lambda: sink.latest().get(2) == (2.0, GOOD))
            assert driver.device_status("dev")["bad_points"] == []

    asyncio.run(main())


# -- dead devices ---------------------------------------------------------------------


def test_dead_device_fails_backs_off_and_does_not_delay_another() -> None:
    good_image, dead_image = RegisterImage(), RegisterImage()
    good_image.set(HR, 0, [7])
    dead_image.set(HR, 0, [9])

    async def main() -> None:
        async with serving({1: good_image}) as good, serving({1: dead_image}) as dead:
            driver = ModbusDriver(
                [
                    mdevice("good", good.port, [mpoint(1, "v", device="good", address=0)]),
                    mdevice(
                        "dead",
                        dead.port,
                        [mpoint(2, "v", device="dead", address=0)],
                        timeout=0.3,
                        retries=1,
                    ),
                ]
            )
            sink = Sink()
            health = driver.health()
            await run_driver_until(driver, sink, lambda: health["dead"].polls >= 2)
            dead.silent = True
            mark = sum(1 in b.point_ids for b in sink.batches)
            await run_driver_until(driver, sink, lambda: health["dead"].consecutive_failures >= 4)
            error = health["dead"].last_error
            assert error is not None
            assert "no response" in error and "unit 1" in error and "function 3" in error
            assert f"127.0.0.1:{dead.port}" in error
            # retries: each failed poll asked twice (retries = 1)
            silent_reads = [r for r in dead.reads() if r.time >= dead.requests[0].time]
            assert len(silent_reads) >= 2 * 4
            # the healthy device kept its rate while the other timed out
            good_times = [
                t for b, t in zip(sink.batches, sink.push_times, strict=True) if 1 in b.point_ids
            ]
            during = good_times[mark:]
            assert len(during) >= 10
            gaps = [b - a for a, b in itertools.pairwise(during)]
            # waiting on the dead device would show as a gap of 2 x 0.3 s (timeout, retry)
            assert max(gaps) < 0.4, gaps
            skips = driver.device_status("dead")["backoff_skips"]
            assert isinstance(skips, int) and skips > 0
            assert health["good"].consecutive_failures == 0
            # back to life
            dead.silent = False
            await run_driver_until(
                driver, sink, lambda: health["dead"].consecutive_failures == 0, timeout=15
            )
            assert sink.latest()[2] == (9.0, GOOD)

    asyncio.run(main())


def test_connection_refused_is_a_link_error() -> None:
    async def main() -> None:
        async with serving({1: RegisterImage()}) as sim:
            port = sim.port
        driver = ModbusDriver([mdevice("dev", port, [mpoint(1, "v", address=0)], retries=0)])
        sink = Sink()
        await run_driver_until(driver, sink, lambda: driver.health()["dev"].errors >= 1)
        error = driver.health()["dev"].last_error
        assert error is not None and "cannot connect" in error and f":{port}" in error

    asyncio.run(main())


# -- writes ---------------------------------------------------------------------------


def write_points() -> list[PointSpec]:
    return [
        mpoint(1, "setpoint", writable=True, min=-50, max=50,
               address=10, datatype="int16", scale=0.1),
        mpoint(2, "readonly", address=11),
        mpoint(3, "input", writable=True, table="input_register", address=12),
        mpoint(4, "gain", writable=True, address=20, datatype="float32", order="CDAB"),
        mpoint(5, "relay", writable=True, table="coil", address=3),
        mpoint(6, "small", writable=True, address=30, datatype="uint16"),
        mpoint(7, "total", writable=True, address=40, datatype="float64", order="DCBA"),
        mpoint(8, "limit", writable=True, address=50, datatype="int16", invalid=[0x7FFF]),
    ]  # fmt: skip


def test_writes_are_encoded_and_read_back() -> None:
    image = RegisterImage()

    async def main() -> None:
        async with serving({1: image}) as sim:
            pts = write_points()
            driver = ModbusDriver([mdevice("dev", sim.port, pts)])
            # each write returns the value the register holds, read back
            assert await driver.write(pts[0], -12.3) == pytest.approx(-12.3, abs=1e-12)
            assert image.read(HR, 10, 1) == [(-123) & 0xFFFF]
            assert await driver.write(pts[0], 10.5) == 10.5  # scale 0.1: raw 105, exact
            assert image.read(HR, 10, 1) == [105]
            assert await driver.write(pts[3], 1.5) == 1.5
            assert image.read(HR, 20, 2) == words(1.5, "float32", "CDAB")
            # a float32 holds the nearest float32, and that is what is reported
            assert await driver.write(pts[3], 0.1) == expected(0.1, "float32") != 0.1
            assert await driver.write(pts[3], 1.5) == 1.5
            await driver.write(pts[4], 1.0)
            assert image.read("coil", 3, 1) == [1]
            await driver.write(pts[4], 0.0)
            assert image.read("coil", 3, 1) == [0]
            await driver.write(pts[6], -0.0)  # bit-exact: the sign of zero survives
            assert image.read(HR, 40, 4) == words(-0.0, "float64", "DCBA")
            await driver.write(pts[6], 0.1)
            assert image.read(HR, 40, 4) == words(0.1, "float64", "DCBA")
            writes = [r.function_code for r in sim.requests if r.function_code in (5, 6, 15, 16)]
            assert writes == [6, 6, 16, 16, 16, 5, 5, 16, 16]

    asyncio.run(main())


@pytest.mark.parametrize(
    ("index", "value", "reason"),
    [
        (0, 50.1, "above the point's declared maximum 50"),
        (0, -60, "below the point's declared minimum -50"),
        (0, math.nan, "not a finite number"),
        (1, 1, "not writable"),
        (2, 1, "input_register is read-only"),
        (4, 0.5, "a bit takes 0 or 1"),
        (5, 70000, "does not fit uint16"),
        (5, -1, "does not fit uint16"),
        # wrote 10 and reported 10.5 (issue 13): refused, with what would fit
        (
            5,
            10.5,
            "10.5 needs raw value 10.5, which does not fit uint16 (not an integer); "
            "the nearest writable values are 10 or 11",
        ),
        (
            0,
            12.34,
            "raw value 123.4, which does not fit int16 (not an integer); "
            "the nearest writable values are 12.3 or 12.4",
        ),
        (
            5,
            70000,
            "70000 needs raw value 70000, which does not fit uint16 (range 0..65535); "
            "the nearest writable value is 65535",
        ),
        (7, 32767, 'raw value 0x7FFF is the point\'s "not available" marker'),
    ],
)
def test_writes_are_refused(index: int, value: float, reason: str) -> None:
    image = RegisterImage()

    async def main() -> None:
        async with serving({1: image}) as sim:
            pts = write_points()
            driver = ModbusDriver([mdevice("dev", sim.port, pts)])
            with pytest.raises(ModbusWriteError) as err:
                await driver.write(pts[index], value)
            assert reason in str(err.value)
            assert f"dev/{pts[index].name}" in str(err.value)
            assert not [r for r in sim.requests if r.function_code in (5, 6, 15, 16)]

    asyncio.run(main())


def test_write_that_does_not_read_back_is_an_error() -> None:
    image = RegisterImage()
    image.ignore_writes = True  # acknowledges, keeps the old value

    async def main() -> None:
        async with serving({1: image}) as sim:
            pts = write_points()
            driver = ModbusDriver([mdevice("dev", sim.port, pts)])
            with pytest.raises(ModbusWriteError, match="did not take the value"):
                await driver.write(pts[0], 10.0)

    asyncio.run(main())


def test_write_to_a_hole_names_the_exception() -> None:
    image = RegisterImage()
    image.hole(HR, 30)

    async def main() -> None:
        async with serving({1: image}) as sim:
            pts = write_points()
            driver = ModbusDriver([mdevice("dev", sim.port, pts)])
            with pytest.raises(ModbusWriteError, match=r"exception 2 \(illegal data address\)"):
                await driver.write(pts[5], 5)

    asyncio.run(main())


# -- units behind one gateway -------------------------------------------------------------


def test_two_unit_ids_share_one_connection() -> None:
    one, two = RegisterImage(), RegisterImage()
    one.set(HR, 0, [11, 12])
    two.set(HR, 0, [21, 22])

    async def main() -> None:
        async with serving({1: one, 2: two}) as sim:
            devices = [
                mdevice(
                    f"u{unit}",
                    sim.port,
                    [
                        mpoint(unit * 10, "a", device=f"u{unit}", address=0),
                        mpoint(unit * 10 + 1, "b", device=f"u{unit}", address=1),
                    ],
                    unit_id=unit,
                )
                for unit in (1, 2)
            ]
            driver = ModbusDriver(devices)
            sink = Sink()
            await run_driver_until(driver, sink, lambda: len(sink.batches) >= 6)
            assert len(driver._pool.connections()) == 1
            latest = sink.latest()
            assert latest[10] == (11.0, GOOD) and latest[11] == (12.0, GOOD)
            assert latest[20] == (21.0, GOOD) and latest[21] == (22.0, GOOD)
            assert {r.unit for r in sim.reads()} == {1, 2}

    asyncio.run(main())


# -- the simulator's moving values ---------------------------------------------------------


def test_simulator_waves_and_images_from_points() -> None:
    p = ModbusPointSettings.model_validate({"address": 4, "datatype": "float32", "order": "CDAB"})
    q = ModbusPointSettings.model_validate(
        {"address": 8, "datatype": "int16", "scale": 0.1, "offset": -40}
    )
    image = RegisterImage.from_points([(p, 21.5), (q, 12.3)])
    assert image.read(HR, 4, 2) == words(21.5, "float32", "CDAB")
    assert image.read(HR, 8, 1) == [523]  # (12.3 + 40) / 0.1
    image.wave("input_register", 0, datatype="int16", base=100, amplitude=50, period=4.0)
    image.tick(1.0)  # a quarter period: the top
    assert image.read("input_register", 0, 1) == [150]
    image.tick(3.0)
    assert image.read("input_register", 0, 1) == [50]


def test_two_polls_answered_in_one_millisecond_keep_distinct_times() -> None:
    from types import SimpleNamespace

    from drivers.modbus.driver import _distinct_times

    g = SimpleNamespace(last_ms=0)
    first = array("q", [1000, 1000, 1002])
    _distinct_times(g, first)  # type: ignore[arg-type]
    assert list(first) == [1000, 1000, 1002] and g.last_ms == 1002
    second = array("q", [1002, 1002, 1003])  # the next poll, answered in the same ms
    _distinct_times(g, second)  # type: ignore[arg-type]
    assert list(second) == [1003, 1003, 1003] and g.last_ms == 1003
    stepped = array("q", [-5000, 0])  # a wall clock stepped back: left as it is
    _distinct_times(g, stepped)  # type: ignore[arg-type]
    assert list(stepped) == [-5000, 0] and g.last_ms == 0
    # two polls in one millisecond after the step are told apart too (the last reading
    # before the step is no floor for them)
    after = array("q", [0, 0])
    _distinct_times(g, after)  # type: ignore[arg-type]
    assert list(after) == [1, 1] and g.last_ms == 1


# -- devices added and removed while the driver runs (a config reload) -------------------------


def test_device_added_to_a_running_driver_polls_and_the_others_go_on() -> None:
    one, two = RegisterImage(), RegisterImage()
    one.set(HR, 0, [11])
    two.set(HR, 0, [21])

    def unit(n: int, port: int) -> DeviceSpec:
        points = [mpoint(n * 10, "a", device=f"u{n}", address=0)]
        return mdevice(f"u{n}", port, points, unit_id=n)

    async def main() -> Sink:
        sink = Sink()
        async with serving({1: one, 2: two}) as sim:
            driver = ModbusDriver([unit(1, sim.port)])
            task = asyncio.create_task(driver.run(sink))
            try:
                await _until(lambda: len(sink.of({10})) >= 3, task)
                [conn] = driver._pool.connections()
                await driver.add_device(unit(2, sim.port))
                await _until(lambda: len(sink.of({20})) >= 3, task)
                # both units on the first one's connection, which stayed open
                assert driver._pool.connections() == [conn] and conn._client is not None
                assert sink.latest()[20] == (21.0, GOOD)
                await driver.remove_device("u2")
                assert "u2" not in driver.health() and driver._pool.connections() == [conn]
                removed_at, n = len(sink.batches), len(sink.of({10}))
                await _until(lambda: len(sink.of({10})) >= n + 3, task)
                assert all(20 not in b.point_ids for b in sink.batches[removed_at:])
                await driver.remove_device("u1")  # the last user closes the link
                assert driver._pool.connections() == [] and conn._client is None
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        return sink

    sink = asyncio.run(main())
    # u1 polled on at its period while u2 came and went
    times = [b.timestamps[0] for b in sink.of({10})]
    assert max(b - a for a, b in itertools.pairwise(times)) <= 2.5 * POLL_S * 1000


async def _until(done: Callable[[], bool], task: asyncio.Task[None], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert not task.done(), task.exception()
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.005)


def test_a_stop_keeps_the_answer_of_the_poll_under_way() -> None:
    """Cancelling the driver (a stop, a reload removing the device) while a device is
    answering: the poll gets STOP_GRACE_S to end and its readings reach the sink."""
    image = RegisterImage()
    image.set(HR, 0, [7])

    async def main() -> tuple[Sink, int]:
        sink = Sink()
        async with serving({1: image}) as sim:
            sim.delay = 0.3  # each answer takes this long
            device = mdevice("u1", sim.port, [mpoint(1, "a", device="u1", address=0)])
            task = asyncio.create_task(ModbusDriver([device]).run(sink))
            await _until(lambda: len(sim.requests) == 1, task)  # asked, not answered yet
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return sink, len(sim.requests)

    sink, asked = asyncio.run(main())
    assert asked == 1
    assert sink.latest() == {1: (7.0, GOOD)}
