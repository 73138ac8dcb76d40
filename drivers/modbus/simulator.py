"""A Modbus server with register images that change over time: the devices of the demo,
the benchmark and the tests.

`ModbusSimulator` serves one `RegisterImage` per unit id over Modbus TCP, RTU over TCP,
or RTU on a serial port (pymodbus's server does the protocol). An image holds the four
tables, answers exception 2 (illegal data address) on declared holes (or everywhere but
the addresses a table is limited to, `only()`), can refuse register reads and writes that
do not start on an even address or cover an odd count (`even_only`, as some meters with
32-bit values do), can ignore writes (a device that acknowledges and does nothing), and
`tick()` moves the registers declared with `wave()`. The simulator can stop answering
(`silent`), answer late (`delay`), answer for absent unit ids with a gateway's exception
(`absent_exception`, e.g. 11), and records every request it served (`requests`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pymodbus import FramerType
from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.exceptions import NoSuchIdException
from pymodbus.server import ModbusSerialServer, ModbusTcpServer

from drivers.modbus.settings import BIT_TABLES, DataType, ModbusPointSettings, Order

__all__ = ["ModbusSimulator", "RegisterImage", "SimRequest"]


class _GatewayAnswer(Exception):
    """An absent unit, answered for by the gateway with exception `code`."""

    def __init__(self, code: int) -> None:
        super().__init__(f"gateway exception {code}")
        self.code = code


_TABLE_OF_FUNCTION = {
    1: "coil",
    5: "coil",
    15: "coil",
    2: "discrete_input",
    3: "holding_register",
    6: "holding_register",
    16: "holding_register",
    22: "holding_register",
    23: "holding_register",
    4: "input_register",
}
_TABLES = ("coil", "discrete_input", "holding_register", "input_register")


@dataclass(frozen=True, slots=True)
class _Wave:
    table: str
    address: int
    datatype: DataType
    order: Order
    base: float
    amplitude: float
    period: float
    scale: float
    offset: float


class RegisterImage:
    """The four tables of one simulated device. Every address reads as 0 (or False)
    until set, except declared holes, which answer exception 2."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[int, int]] = {t: {} for t in _TABLES}
        self.holes: dict[str, set[int]] = {t: set() for t in _TABLES}
        #: tables limited to these addresses (`only()`): any other answers exception 2
        self.extent: dict[str, set[int]] = {}
        #: register reads/writes must start on an even address and have an even count
        self.even_only = False
        #: acknowledge writes without storing them (for read-back checks)
        self.ignore_writes = False
        self._waves: list[_Wave] = []

    # -- setting values --------------------------------------------------------------

    def set(self, table: str, address: int, values: Sequence[int] | Sequence[bool]) -> None:
        """Raw values: registers (0..65535) or bits, from `address` on."""
        store = self.tables[table]
        bits = table in BIT_TABLES
        for i, v in enumerate(values):
            if not bits and not 0 <= int(v) <= 0xFFFF:
                raise ValueError(f"register value {v} at {table} {address + i} is not 16-bit")
            store[address + i] = int(bool(v)) if bits else int(v)

    def set_value(
        self,
        table: str,
        address: int,
        value: float | str,
        datatype: DataType = "uint16",
        order: Order = "ABCD",
        *,
        scale: float = 1.0,
        offset: float = 0.0,
        length: int | None = None,
    ) -> None:
        """An engineering value, encoded as a point with these settings would read it."""
        from drivers.modbus.datatypes import encode, from_engineering

        if table in BIT_TABLES:
            self.set(table, address, [bool(value)])
            return
        if datatype == "string":
            text = str(value).encode("ascii")
            n = length if length is not None else (len(text) + 1) // 2
            data = text.ljust(2 * n, b"\0")[: 2 * n]
            self.set(table, address, [int.from_bytes(data[i : i + 2]) for i in range(0, 2 * n, 2)])
            return
        assert not isinstance(value, str)
        raw = from_engineering(value, scale, offset, datatype, exact=False)
        self.set(table, address, encode(raw, datatype, order))

    def hole(self, table: str, address: int, count: int = 1) -> None:
        """Addresses that do not exist: reads and writes touching them get exception 2."""
        self.holes[table].update(range(address, address + count))

    def only(self, table: str, ranges: Iterable[tuple[int, int]]) -> None:
        """The table exists only at these (first, end exclusive) ranges: a request
        touching any other address gets exception 2 (a device that refuses the addresses
        its register map does not document)."""
        self.extent[table] = {a for lo, hi in ranges for a in range(lo, hi)}

    def wave(
        self,
        table: str,
        address: int,
        *,
        datatype: DataType = "int16",
        order: Order = "ABCD",
        base: float = 0.0,
        amplitude: float = 1.0,
        period: float = 60.0,
        scale: float = 1.0,
        offset: float = 0.0,
    ) -> None:
        """A value that `tick()` moves along base + amplitude * sin(2πt / period)."""
        self._waves.append(
            _Wave(table, address, datatype, order, base, amplitude, period, scale, offset)
        )
        self.tick()

    def tick(self, t: float | None = None) -> None:
        """Moves the waves to time t (s, default: now)."""
        now = time.time() if t is None else t
        for w in self._waves:
            v = w.base + w.amplitude * math.sin(2.0 * math.pi * now / w.period)
            if w.datatype not in ("float32", "float64"):
                v = round(v / w.scale) * w.scale  # stay on the register's grid
            self.set_value(
                w.table, w.address, v, w.datatype, w.order, scale=w.scale, offset=w.offset
            )

    @classmethod
    def from_points(
        cls, points: Iterable[tuple[ModbusPointSettings, float | str]]
    ) -> RegisterImage:
        """An image in which each point reads as the given engineering value."""
        image = cls()
        for p, value in points:
            image.set_value(
                p.table,
                p.address,
                value,
                p.datatype,
                p.order,
                scale=p.scale,
                offset=p.offset,
                length=p.length,
            )
        return image

    # -- serving ----------------------------------------------------------------------

    def read(self, table: str, address: int, count: int) -> list[int] | None:
        """Raw values, or None when the image refuses the range (a hole, an address
        outside `only()`, an odd start or count when `even_only`) or it leaves the
        address space."""
        if address + count > 0x10000 or self._refuses(table, address, count):
            return None
        store = self.tables[table]
        return [store.get(a, 0) for a in range(address, address + count)]

    def write(self, table: str, address: int, values: Sequence[int] | Sequence[bool]) -> bool:
        """False when the image refuses the range, as `read` does (exception 2)."""
        if address + len(values) > 0x10000 or self._refuses(table, address, len(values)):
            return False
        if not self.ignore_writes:
            self.set(table, address, values)
        return True

    def _refuses(self, table: str, address: int, count: int) -> bool:
        """The device answers exception 2 to a request for this range."""
        if self.even_only and table not in BIT_TABLES and (address % 2 or count % 2):
            return True
        extent = self.extent.get(table)
        if extent is not None and any(a not in extent for a in range(address, address + count)):
            return True
        holes = self.holes[table]
        return bool(holes) and any(a in holes for a in range(address, address + count))


@dataclass(frozen=True, slots=True)
class SimRequest:
    """One request the simulator served: unit, function code, address, count."""

    unit: int
    function_code: int
    address: int
    count: int
    time: float  # loop time at arrival
    wall: float = 0.0  # wall-clock time at arrival (time.time())


class _Context(ModbusServerContext):
    """pymodbus's server calls these for every request (the pymodbus datastore classes are
    bypassed: the images are ours)."""

    def __init__(self, sim: ModbusSimulator) -> None:  # no super(): it builds a datastore
        self._sim = sim
        self.simdevices = []
        self.old_simulator = True  # pymodbus: call async_getValues/async_setValues here

    def device_ids(self) -> list[int]:
        return list(self._sim.devices)

    async def async_getValues(
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> list[int] | list[bool] | ExcCodes:
        if func_code in (1, 2, 3, 4):
            try:
                image = await self._sim._serve(device_id, func_code, address, count)
            except _GatewayAnswer as exc:
                return ExcCodes(exc.code)
        else:  # pymodbus reads back what a write request just set: not a request
            image = self._sim.devices[device_id]
        table = _TABLE_OF_FUNCTION.get(func_code)
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        values = image.read(table, address, count)
        if values is None:
            return ExcCodes.ILLEGAL_ADDRESS
        if table in BIT_TABLES:
            return [bool(v) for v in values]
        return values

    async def async_setValues(
        self,
        device_id: int,
        func_code: int,
        address: int,
        values: Sequence[int] | Sequence[bool],
    ) -> ExcCodes | None:
        try:
            image = await self._sim._serve(device_id, func_code, address, len(values))
        except _GatewayAnswer as exc:
            return ExcCodes(exc.code)
        table = _TABLE_OF_FUNCTION.get(func_code)
        if table not in ("coil", "holding_register"):
            return ExcCodes.ILLEGAL_FUNCTION
        if not image.write(table, address, values):
            return ExcCodes.ILLEGAL_ADDRESS
        return None


class ModbusSimulator:
    """Serves `devices` (unit id -> image). transport "tcp" (default) or "rtu-over-tcp"
    listen on host:port (port 0: a free one, see `.port` after start()); "rtu" serves on
    `serial_port`. `tick_s` moves the images' waves every tick_s seconds."""

    def __init__(
        self,
        devices: Mapping[int, RegisterImage],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        transport: str = "tcp",
        serial_port: str | None = None,
        baudrate: int = 9600,
        tick_s: float | None = None,
    ) -> None:
        if transport not in ("tcp", "rtu-over-tcp", "rtu"):
            raise ValueError(f"unknown transport {transport!r}")
        if transport == "rtu" and not serial_port:
            raise ValueError("transport 'rtu' needs serial_port")
        self.devices = dict(devices)
        self.host = host
        self.port = port
        self.transport = transport
        self.serial_port = serial_port
        self.baudrate = baudrate
        self.tick_s = tick_s
        #: stop answering (requests are still recorded): the master times out
        self.silent = False
        #: seconds to wait before each answer
        self.delay = 0.0
        #: answer requests for absent unit ids with this exception, as a TCP-to-RTU
        #: gateway does (10: path unavailable, 11: target device failed to respond);
        #: None: send nothing (the master times out)
        self.absent_exception: int | None = None
        self.requests: list[SimRequest] = []
        self.max_requests = 100_000  # the record is bounded: oldest dropped
        self._server: ModbusTcpServer | ModbusSerialServer | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._busy = 0
        #: most requests being answered at the same time (1 on a serial bus)
        self.max_concurrent = 0

    async def _serve(self, unit: int, func_code: int, address: int, count: int) -> RegisterImage:
        """Records the request, applies the delay; raises NoSuchIdException (pymodbus
        then sends nothing) in silent mode and for unknown units, or _GatewayAnswer for
        unknown units when `absent_exception` is set."""
        if len(self.requests) >= self.max_requests:
            del self.requests[: self.max_requests // 2]
        self.requests.append(
            SimRequest(
                unit, func_code, address, count, asyncio.get_running_loop().time(), time.time()
            )
        )
        image = self.devices.get(unit)
        if image is None and not self.silent and self.absent_exception is not None:
            raise _GatewayAnswer(self.absent_exception)
        if image is None or self.silent:
            raise NoSuchIdException(f"unit {unit} does not answer")
        self._busy += 1
        self.max_concurrent = max(self.max_concurrent, self._busy)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            self._busy -= 1
        return image

    def reads(self, unit: int | None = None) -> list[SimRequest]:
        """The read requests (functions 1-4) served so far, of one unit or all."""
        return [
            r
            for r in self.requests
            if r.function_code in (1, 2, 3, 4) and (unit is None or r.unit == unit)
        ]

    async def start(self) -> None:
        context = _Context(self)
        server: ModbusTcpServer | ModbusSerialServer
        if self.transport == "rtu":
            assert self.serial_port is not None
            server = ModbusSerialServer(
                context,
                framer=FramerType.RTU,
                port=self.serial_port,
                baudrate=self.baudrate,
                ignore_missing_devices=True,
            )
        else:
            server = ModbusTcpServer(
                context,
                framer=FramerType.RTU if self.transport == "rtu-over-tcp" else FramerType.SOCKET,
                address=(self.host, self.port),
                ignore_missing_devices=True,
            )
        await server.serve_forever(background=True)
        self._server = server
        if self.transport != "rtu":
            listener: Any = server.transport
            self.port = int(listener.sockets[0].getsockname()[1])
        if self.tick_s:
            self._ticker = asyncio.create_task(self._tick_loop(self.tick_s))

    async def _tick_loop(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            for image in self.devices.values():
                image.tick()

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self._server is not None:
            await self._server.shutdown()
            self._server = None

    async def __aenter__(self) -> ModbusSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
