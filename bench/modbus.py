"""Modbus polling: planned (merged) reads against one request per point.

50 energy meters / controllers in cabinets, each its own Modbus TCP device: one
`ModbusSimulator` per device, each on its own port of 127.0.0.1 (unit id 1), all served
by one child process (`python bench/modbus.py --serve N`), so that the simulators' CPU
is not counted. Every device has the same 100-point register map, as a fleet of one
meter model would: float32 measurements (ABCD, and a word-swapped CDAB block), uint32
energy counters (CDAB and ABCD), int16 temperatures with a scale, uint16 status words,
bits of a status register and discrete-input alarms, in blocks with small reserved gaps
between them; the CDAB counters and the temperatures declare "not available" markers
(`invalid`), so the decoding path that checks them is measured too. The simulators
move the register values every second.

The `ModbusDriver` runs in this process with a sink that only counts readings (and
their quality); its CPU is this process's CPU time (`time.process_time`) over the
measurement window. Both runs poll every POLL s, warm up, then measure over a window:

- planned: the driver's own plan (max_gap 10, max_registers 125): requests_per_cycle
  comes from `device_plans` (and is checked against the driver's working plans);
- naive (the baseline, same run, same devices, shorter window): the same driver with a
  plan of one request per point (bench-local: the driver's `_plan` is swapped for a
  per-point one while the driver is built), i.e. naive_requests_per_cycle = 5000.

The planned run must read every point GOOD and skip no poll (asserted); the naive run
reports what it achieved (it may fall behind: skipped polls are printed). The last line
(one line, the planned run's figures):

    modbus: requests_per_cycle=<N> naive_requests_per_cycle=<N> points_per_s=<N>
    cpu_s_per_kpoint=<X.XXX>

Everything is loopback and bounded: the simulator child exits on SIGTERM or after
--serve-max-s; the whole run takes WARMUP + WINDOW + NAIVE_WARMUP + NAIVE_WINDOW + ~3 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from drivers.base import DeviceSpec, PointSpec  # noqa: E402
from drivers.modbus import driver as modbus_driver  # noqa: E402
from drivers.modbus.planner import Request, Span  # noqa: E402
from drivers.modbus.settings import ModbusDeviceSettings, ModbusPointSettings  # noqa: E402
from native.batch import GOOD, Batch  # noqa: E402

if TYPE_CHECKING:
    from drivers.modbus.simulator import RegisterImage  # pymodbus: imported where used

DEVICES = 50
POINTS = 100


# -- the register map (one meter model) -----------------------------------------------


@dataclass(frozen=True, slots=True)
class MapPoint:
    name: str
    settings: ModbusPointSettings
    kind: str  # "float" | "int" | "bool"
    base: float  # the simulated value moves around base
    amplitude: float


def register_map() -> list[MapPoint]:
    """100 points in 5 blocks; reserved registers between and inside blocks are small
    gaps (<= 10 registers) that the planner reads across, blocks far apart are not."""
    out: list[MapPoint] = []

    def add(name: str, kind: str, base: float, amplitude: float, **settings: object) -> None:
        out.append(
            MapPoint(name, ModbusPointSettings.model_validate(settings), kind, base, amplitude)
        )

    # input registers 0..81: 6 blocks of 6 float32 (ABCD), 2 reserved registers after each
    quantities = ("voltage", "current", "active_power", "reactive_power", "apparent_power", "pf")
    for b, q in enumerate(quantities):
        for i in range(6):
            add(
                f"{q}_{i}", "float", 10.0 * (b + 1) + i, 2.0,
                table="input_register", address=14 * b + 2 * i, datatype="float32",
            )  # fmt: skip
    # input registers 200..225: 12 float32, word-swapped (CDAB): THD and harmonics
    for i in range(12):
        add(
            f"thd_{i}", "float", 3.0 + i, 0.5,
            table="input_register", address=200 + 2 * i + (2 if i >= 6 else 0),
            datatype="float32", order="CDAB",
        )  # fmt: skip
    # holding registers 1000..1049: 16 uint32 CDAB energy counters, 8 uint32 ABCD
    for i in range(16):
        add(
            f"energy_{i}", "int", 1_000_000.0 * (i + 1), 1000.0,
            table="holding_register", address=1000 + 2 * i, datatype="uint32", order="CDAB",
            invalid=[0xFFFFFFFF],
        )  # fmt: skip
    for i in range(8):
        add(
            f"counter_{i}", "int", 50_000.0 + i, 100.0,
            table="holding_register", address=1034 + 2 * i, datatype="uint32",
        )  # fmt: skip
    # holding registers 2000..2020: 12 int16 temperatures (0.1 °C), 4 uint16 status words,
    # 8 bits of a status register
    for i in range(12):
        add(
            f"temp_{i}", "float", 20.0 + i, 3.0,
            table="holding_register", address=2000 + i, datatype="int16", scale=0.1,
            invalid=[0x7FFF, 0x8000],
        )  # fmt: skip
    for i in range(4):
        add(
            f"status_{i}", "int", 100.0 * i, 0.0,
            table="holding_register", address=2015 + i, datatype="uint16",
        )  # fmt: skip
    for i in range(8):
        add(
            f"flag_{i}", "bool", float(i % 2), 0.0,
            table="holding_register", address=2020, datatype="bit", bit=i,
        )  # fmt: skip
    # discrete inputs 0..3: alarms
    for i in range(4):
        add(f"alarm_{i}", "bool", float(i == 1), 0.0, table="discrete_input", address=i)
    assert len(out) == POINTS, len(out)
    return out


# -- the simulator child process ------------------------------------------------------


def build_image(points: Sequence[MapPoint]) -> RegisterImage:
    from drivers.modbus.simulator import RegisterImage

    image = RegisterImage()
    flags = 0
    for k, p in enumerate(points):
        s = p.settings
        if s.table == "discrete_input":
            image.set(s.table, s.address, [bool(p.base)])
        elif s.datatype == "bit":
            flags |= int(p.base) << (s.bit or 0)
        elif p.amplitude:
            image.wave(
                s.table, s.address, datatype=s.datatype, order=s.order, base=p.base,
                amplitude=p.amplitude, period=30.0 + k, scale=s.scale,
            )  # fmt: skip
        else:
            image.set_value(s.table, s.address, p.base, s.datatype, s.order)
    image.set("holding_register", 2020, [flags])
    return image


async def serve(n: int, max_s: float) -> None:
    """n simulators on free ports of 127.0.0.1; prints their ports as one JSON line, then
    serves until SIGTERM or max_s."""
    from drivers.modbus.simulator import ModbusSimulator

    points = register_map()
    sims = [ModbusSimulator({1: build_image(points)}, tick_s=1.0) for _ in range(n)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        for sim in sims:
            await sim.start()
        print(json.dumps([sim.port for sim in sims]), flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max_s)
    finally:
        for sim in sims:
            await sim.stop()


def start_simulators(n: int, max_s: float) -> tuple[subprocess.Popen[str], list[int]]:
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve", str(n),
         "--serve-max-s", str(max_s)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30.0)
    line = proc.stdout.readline() if ready else ""
    if not line:
        stop_simulators(proc)
        raise RuntimeError("the simulators did not start within 30 s")
    return proc, [int(p) for p in json.loads(line)]


def stop_simulators(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


# -- the driver side ------------------------------------------------------------------


def device_specs(ports: Sequence[int], poll_s: float) -> list[DeviceSpec]:
    points = register_map()
    specs = []
    for d, port in enumerate(ports):
        name = f"meter-{d:02d}"
        settings = ModbusDeviceSettings.model_validate(
            {"host": "127.0.0.1", "port": port, "unit_id": 1, "timeout": 1.0, "retries": 1}
        )
        specs.append(
            DeviceSpec(
                name=name,
                poll_s=poll_s,
                settings=settings,
                points=tuple(
                    PointSpec(
                        id=d * POINTS + k,
                        key=f"{name}/{p.name}",
                        name=p.name,
                        unit="",
                        kind=p.kind,
                        writable=False,
                        settings=p.settings,
                    )
                    for k, p in enumerate(points)
                ),
            )
        )
    return specs


def _plan_per_point(settings: ModbusDeviceSettings, points: Sequence[PointSpec]) -> list[Request]:
    """The naive plan: one read request per point."""
    out = []
    for i, p in enumerate(points):
        s = p.settings
        assert isinstance(s, ModbusPointSettings)
        span = Span(i, s.table, s.address, s.size)
        out.append(Request(s.table, s.address, s.size, (span,)))
    return out


def build_driver(specs: Sequence[DeviceSpec], naive: bool) -> modbus_driver.ModbusDriver:
    if not naive:
        return modbus_driver.ModbusDriver(specs)
    planned = modbus_driver._plan
    modbus_driver._plan = _plan_per_point
    try:
        return modbus_driver.ModbusDriver(specs)
    finally:
        modbus_driver._plan = planned


class CountingSink:
    """Counts readings and the ones not GOOD; nothing else."""

    def __init__(self) -> None:
        self.n = 0
        self.not_good = 0

    def push(self, batch: Batch) -> bool:
        n = len(batch)
        self.n += n
        self.not_good += n - batch.quality.count(GOOD)
        return True


async def stop(task: asyncio.Task[None], timeout: float = 10.0) -> None:
    """Cancels the driver's task and waits (bounded) until it has ended."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        raise RuntimeError(f"the driver did not stop within {timeout} s of a cancel")
    with contextlib.suppress(asyncio.CancelledError):
        task.result()


@dataclass
class Run:
    label: str
    requests_per_cycle: int
    points_per_s: float
    cpu_s_per_kpoint: float
    readings: int
    not_good: int
    skipped_polls: int
    errors: int
    expected_points_per_s: float


async def measure(
    label: str, specs: Sequence[DeviceSpec], naive: bool, warmup: float, window: float
) -> Run:
    driver = build_driver(specs, naive)
    requests = sum(len(reqs) for d in specs for _g, reqs in driver.working_plans(d.name))
    sink = CountingSink()
    task = asyncio.create_task(driver.run(sink), name=f"bench-{label}")
    health = driver.health()

    def totals() -> tuple[int, int]:
        return (
            sum(h.skipped_polls for h in health.values()),
            sum(h.errors for h in health.values()),
        )

    try:
        await asyncio.sleep(warmup)
        assert not task.done(), task
        n0, bad0, (sk0, er0) = sink.n, sink.not_good, totals()
        c0, t0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(window)
        c1, t1 = time.process_time(), time.perf_counter()
        n1, bad1, (sk1, er1) = sink.n, sink.not_good, totals()
        assert not task.done(), task
        # the plan the driver ran is the one it started with (nothing isolated)
        after = sum(len(reqs) for d in specs for _g, reqs in driver.working_plans(d.name))
        assert after == requests, (after, requests)
    finally:
        await stop(task)
    n = n1 - n0
    return Run(
        label=label,
        requests_per_cycle=requests,
        points_per_s=n / (t1 - t0),
        cpu_s_per_kpoint=(c1 - c0) / (n / 1000) if n else float("inf"),
        readings=n,
        not_good=bad1 - bad0,
        skipped_polls=sk1 - sk0,
        errors=er1 - er0,
        expected_points_per_s=sum(len(d.points) / d.poll_s for d in specs),
    )


def show(run: Run) -> None:
    print(
        f"{run.label:>7}: requests_per_cycle={run.requests_per_cycle} "
        f"points/s={run.points_per_s:.0f} (offered {run.expected_points_per_s:.0f}) "
        f"cpu_s/kpt={run.cpu_s_per_kpoint:.4f} readings={run.readings} "
        f"not_good={run.not_good} skipped_polls={run.skipped_polls} errors={run.errors}",
        flush=True,
    )


async def bench(args: argparse.Namespace, ports: list[int]) -> tuple[Run, Run]:
    specs = device_specs(ports, args.poll)
    plans = modbus_driver.device_plans(specs)
    from drivers.modbus.planner import describe

    first = plans[specs[0].name]
    print(
        f"setup: {len(specs)} Modbus TCP devices x {POINTS} points on 127.0.0.1 "
        f"(one simulator per device, one child process), poll {args.poll:g}s",
        flush=True,
    )
    for line in describe([r for _g, reqs in first for r in reqs]):
        print(f"  plan per device: {line}", flush=True)
    planned = await measure("planned", specs, False, args.warmup, args.window)
    show(planned)
    assert planned.requests_per_cycle == sum(
        len(reqs) for dev in plans.values() for _g, reqs in dev
    )
    naive = await measure("naive", specs, True, args.naive_warmup, args.naive_window)
    show(naive)
    return planned, naive


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--devices", type=int, default=DEVICES)
    ap.add_argument("--poll", type=float, default=1.0, help="poll period (s)")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--window", type=float, default=10.0)
    ap.add_argument("--naive-warmup", type=float, default=3.0)
    ap.add_argument("--naive-window", type=float, default=5.0)
    ap.add_argument("--serve", type=int, metavar="N", help=argparse.SUPPRESS)
    ap.add_argument("--serve-max-s", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.serve_max_s or 120.0))
        return

    # the simulators outlive the runs by a margin, never the benchmark by much
    lifetime = args.warmup + args.window + args.naive_warmup + args.naive_window + 60.0
    proc, ports = start_simulators(args.devices, args.serve_max_s or lifetime)
    try:
        planned, naive = asyncio.run(bench(args, ports))
    finally:
        stop_simulators(proc)
    naive_requests = args.devices * POINTS
    assert naive.requests_per_cycle == naive_requests, naive.requests_per_cycle
    print(
        f"baseline (same run): naive points/s={naive.points_per_s:.0f} "
        f"cpu_s/kpt={naive.cpu_s_per_kpoint:.4f} skipped_polls={naive.skipped_polls}; "
        f"planned/naive: requests {planned.requests_per_cycle / naive_requests:.3f}x, "
        f"points/s {planned.points_per_s / naive.points_per_s:.2f}x, "
        f"cpu per kpoint {planned.cpu_s_per_kpoint / naive.cpu_s_per_kpoint:.3f}x "
        f"({naive.cpu_s_per_kpoint / planned.cpu_s_per_kpoint:.1f}x less)",
        flush=True,
    )
    assert planned.not_good == 0, f"planned run: {planned.not_good} readings not GOOD"
    assert planned.skipped_polls == 0, f"planned run: {planned.skipped_polls} polls skipped"
    assert planned.errors == 0, f"planned run: {planned.errors} errors"
    print(
        f"modbus: requests_per_cycle={planned.requests_per_cycle} "
        f"naive_requests_per_cycle={naive_requests} points_per_s={planned.points_per_s:.0f} "
        f"cpu_s_per_kpoint={planned.cpu_s_per_kpoint:.3f}"
    )


if __name__ == "__main__":
    main()
