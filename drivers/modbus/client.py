"""A thin async adapter on pymodbus: the only code of the driver that talks to pymodbus
(besides the simulator).

One `ModbusConnection` per link: a TCP connection to one host:port (several unit ids
behind a gateway share it), an RTU-over-TCP gateway, or a serial RS-485 bus. Every
transaction on a connection holds the connection's lock, so the requests of all devices
on one bus are serialized, and on RTU links the lock is kept for `inter_frame_delay` of
silence after each answer. Separate connections run concurrently. The connection is
opened on demand and reopened after a link error.

Errors are raised as `ModbusExceptionResponse` (the device answered with an exception
code), `ModbusTimeout` (no answer), its subclass `ModbusGarbledAnswer` (on an RTU link,
bytes came but no valid answer: truncated, bad CRC or junk, see garbled.py) or
`ModbusLinkError` (no connection, an answer that makes no sense), each naming the link,
unit id, function code, address and count.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from drivers.modbus.garbled import GarbledKind, garbled_kind
from drivers.modbus.settings import ModbusDeviceSettings

log = logging.getLogger("citygw.drivers.modbus")

# pymodbus logs every timeout at ERROR with a dump of the last frames; the driver reports
# the same with the device's context (rate-limited), so pymodbus stays quiet unless the
# application configured its logger
_pymodbus_log = logging.getLogger("pymodbus")
if _pymodbus_log.level == logging.NOTSET:
    _pymodbus_log.setLevel(logging.CRITICAL)

__all__ = [
    "EXCEPTION_NAMES",
    "READ_FUNCTION",
    "ConnectionPool",
    "Endpoint",
    "ModbusConnection",
    "ModbusError",
    "ModbusExceptionResponse",
    "ModbusGarbledAnswer",
    "ModbusLinkError",
    "ModbusTimeout",
    "probe",
    "write_function",
]

#: function code of a read per table
READ_FUNCTION: dict[str, int] = {
    "coil": 1,
    "discrete_input": 2,
    "holding_register": 3,
    "input_register": 4,
}

#: what the exception codes of the Modbus spec mean
EXCEPTION_NAMES: dict[int, str] = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    7: "negative acknowledge",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}


def write_function(table: str, n: int) -> int:
    """Function code of a write of n values: 5/15 for coils, 6/16 for holding registers."""
    if table == "coil":
        return 5 if n == 1 else 15
    if table == "holding_register":
        return 6 if n == 1 else 16
    raise ValueError(f"a {table} cannot be written (only coils and holding registers)")


class ModbusError(Exception):
    """Base of the errors of a Modbus transaction."""

    def __init__(
        self, message: str, *, link: str, unit: int, function_code: int, address: int, count: int
    ) -> None:
        super().__init__(message)
        self.link = link
        self.unit = unit
        self.function_code = function_code
        self.address = address
        self.count = count


class ModbusExceptionResponse(ModbusError):
    """The device answered with an exception code (2: illegal data address, ...)."""

    def __init__(
        self,
        function_code: int,
        exception_code: int,
        *,
        link: str = "?",
        unit: int = 0,
        address: int = 0,
        count: int = 0,
    ) -> None:
        name = EXCEPTION_NAMES.get(exception_code, "unknown exception")
        super().__init__(
            f"{link} unit {unit}: exception {exception_code} ({name}) to function "
            f"{function_code} at address {address} count {count}",
            link=link,
            unit=unit,
            function_code=function_code,
            address=address,
            count=count,
        )
        self.exception_code = exception_code


class ModbusTimeout(ModbusError):
    """The device did not answer in time."""


class ModbusGarbledAnswer(ModbusTimeout):
    """No valid answer in time, but bytes came (an RTU link): the answer was garbled on
    the line. `kind`: "truncated", "bad_crc" or "junk"; `received`: the bytes."""

    def __init__(
        self,
        message: str,
        *,
        kind: GarbledKind,
        received: bytes,
        link: str,
        unit: int,
        function_code: int,
        address: int,
        count: int,
    ) -> None:
        super().__init__(
            message,
            link=link,
            unit=unit,
            function_code=function_code,
            address=address,
            count=count,
        )
        self.kind = kind
        self.received = received


class ModbusLinkError(ModbusError):
    """No connection to the device, or an answer that makes no sense."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a link goes. Devices with equal endpoints share one connection."""

    transport: str  # "tcp" | "rtu" | "rtu-over-tcp"
    host: str  # host name, or the serial port for "rtu"
    port: int = 0  # 0 for "rtu"
    baudrate: int = 9600
    parity: str = "N"
    stopbits: int = 1
    bytesize: int = 8

    @classmethod
    def of(cls, s: ModbusDeviceSettings) -> Endpoint:
        if s.transport == "rtu":
            assert s.serial_port is not None  # the settings' validator insists
            return cls("rtu", s.serial_port, 0, s.baudrate, s.parity, s.stopbits, s.bytesize)
        assert s.host is not None
        return cls(s.transport, s.host, s.port)

    @property
    def key(self) -> tuple[str, str, int]:
        """What identifies the link: the serial line settings do not (one bus, one port)."""
        return (self.transport, self.host, self.port)

    @property
    def label(self) -> str:
        if self.transport == "rtu":
            return f"rtu {self.host}"
        return f"{self.transport} {self.host}:{self.port}"


class ModbusConnection:
    """One link (see the module doc). Not connected until the first request."""

    def __init__(
        self, endpoint: Endpoint, *, timeout: float = 1.0, inter_frame_delay: float = 0.0
    ) -> None:
        self.endpoint = endpoint
        self.label = endpoint.label
        self.timeout = timeout
        #: silence after each transaction (RTU framing only)
        self.inter_frame_delay = inter_frame_delay if endpoint.transport != "tcp" else 0.0
        self._lock = asyncio.Lock()
        self._client: AsyncModbusTcpClient | AsyncModbusSerialClient | None = None
        self.transactions = 0
        self._rx = bytearray()  # what arrived since the last request went out
        self._rx_shown = b""  # pymodbus's receive buffer as the trace last showed it

    @classmethod
    def for_device(cls, settings: ModbusDeviceSettings) -> ModbusConnection:
        """A connection of its own for one device (the CLI's scan/read/write)."""
        return cls(
            Endpoint.of(settings),
            timeout=settings.timeout,
            inter_frame_delay=settings.inter_frame_delay,
        )

    def _make_client(self) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        e = self.endpoint
        # retries=0 and no automatic reconnect: the driver retries with its own backoff
        # (without holding the bus) and the connection reconnects on demand
        if e.transport == "rtu":
            return AsyncModbusSerialClient(
                e.host,
                framer=FramerType.RTU,
                baudrate=e.baudrate,
                parity=e.parity,
                stopbits=e.stopbits,
                bytesize=e.bytesize,
                timeout=self.timeout,
                retries=0,
                reconnect_delay=0,
                trace_packet=self._trace,
            )
        return AsyncModbusTcpClient(
            e.host,
            port=e.port,
            framer=FramerType.RTU if e.transport == "rtu-over-tcp" else FramerType.SOCKET,
            timeout=self.timeout,
            retries=0,
            reconnect_delay=0,
            trace_packet=self._trace,
        )

    def _trace(self, sending: bool, data: bytes) -> bytes:
        """pymodbus's packet trace: keeps the bytes received for the current request.
        pymodbus clears its receive buffer with each request and shows the whole buffer
        on every arrival; its RTU framer keeps all of it or none, so new bytes are what
        extends the buffer shown last (a buffer it dropped starts afresh)."""
        if sending:
            self._rx.clear()
            self._rx_shown = b""
        else:
            shown = self._rx_shown
            self._rx += data[len(shown) :] if shown and data.startswith(shown) else data
            self._rx_shown = bytes(data)
        return data

    async def _connected(
        self, unit: int, fc: int, address: int, count: int
    ) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        client = self._client
        if client is not None and client.connected:
            return client
        if client is not None:
            client.close()
        client = self._client = self._make_client()
        try:
            ok = await client.connect()
        except (OSError, ModbusException) as exc:  # serial ports raise on open
            ok = False
            reason = f": {exc}"
        else:
            reason = ""
        if not ok:
            client.close()
            self._client = None
            raise ModbusLinkError(
                f"cannot connect to {self.label}{reason} (unit {unit}, function {fc}, "
                f"address {address}, count {count})",
                link=self.label,
                unit=unit,
                function_code=fc,
                address=address,
                count=count,
            )
        return client

    async def _transact(self, fc: int, unit: int, address: int, count: int, call: Any) -> Any:
        """Runs one request under the link's lock; returns the response PDU."""
        where = dict(link=self.label, unit=unit, function_code=fc, address=address, count=count)
        async with self._lock:
            try:
                client = await self._connected(unit, fc, address, count)
                self.transactions += 1
                try:
                    response = await call(client)
                except ConnectionException as exc:
                    self._drop()
                    raise ModbusLinkError(
                        f"{self.label} unit {unit}: connection lost ({exc}) on function {fc} "
                        f"address {address} count {count}",
                        **where,  # type: ignore[arg-type]
                    ) from exc
                except ModbusIOException as exc:
                    if "no response" in str(exc).lower():
                        received = bytes(self._rx)
                        if received and self.endpoint.transport != "tcp":
                            kind = garbled_kind(received, unit, fc, count)
                            raise ModbusGarbledAnswer(
                                f"{self.label} unit {unit}: garbled answer ({kind}, "
                                f"{len(received)} bytes {received[:16].hex()}) to function "
                                f"{fc} address {address} count {count}",
                                kind=kind,
                                received=received,
                                **where,  # type: ignore[arg-type]
                            ) from exc
                        raise ModbusTimeout(
                            f"{self.label} unit {unit}: no response within {self.timeout:g}s "
                            f"to function {fc} address {address} count {count}",
                            **where,  # type: ignore[arg-type]
                        ) from exc
                    self._drop()
                    raise ModbusLinkError(
                        f"{self.label} unit {unit}: bad response to function {fc} address "
                        f"{address} count {count}: {exc}",
                        **where,  # type: ignore[arg-type]
                    ) from exc
                except (ModbusException, OSError) as exc:
                    self._drop()
                    raise ModbusLinkError(
                        f"{self.label} unit {unit}: {exc} (function {fc}, address {address}, "
                        f"count {count})",
                        **where,  # type: ignore[arg-type]
                    ) from exc
                if response.isError():
                    raise ModbusExceptionResponse(
                        fc,
                        int(getattr(response, "exception_code", 0)),
                        link=self.label,
                        unit=unit,
                        address=address,
                        count=count,
                    )
                return response
            finally:
                if self.inter_frame_delay:
                    await asyncio.sleep(self.inter_frame_delay)

    def _drop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def read(self, table: str, address: int, count: int, unit: int) -> list[int] | list[bool]:
        """Registers (ints 0..65535) or bits (bools) of one read request."""
        fc = READ_FUNCTION[table]

        async def call(client: AsyncModbusTcpClient | AsyncModbusSerialClient) -> Any:
            if fc == 1:
                return await client.read_coils(address, count=count, device_id=unit)
            if fc == 2:
                return await client.read_discrete_inputs(address, count=count, device_id=unit)
            if fc == 3:
                return await client.read_holding_registers(address, count=count, device_id=unit)
            return await client.read_input_registers(address, count=count, device_id=unit)

        response = await self._transact(fc, unit, address, count, call)
        if fc in (1, 2):
            bits = [bool(b) for b in response.bits[:count]]
            got = len(bits)
        else:
            regs = list(response.registers)
            got = len(regs)
        if got != count:
            raise ModbusLinkError(
                f"{self.label} unit {unit}: asked for {count} values at address {address} "
                f"(function {fc}), got {got}",
                link=self.label,
                unit=unit,
                function_code=fc,
                address=address,
                count=count,
            )
        return bits if fc in (1, 2) else regs

    async def write(
        self, table: str, address: int, values: Sequence[int] | Sequence[bool], unit: int
    ) -> None:
        """Writes coils (bools) or holding registers (ints): function 5/15 or 6/16."""
        n = len(values)
        fc = write_function(table, n)

        async def call(client: AsyncModbusTcpClient | AsyncModbusSerialClient) -> Any:
            if fc == 5:
                return await client.write_coil(address, bool(values[0]), device_id=unit)
            if fc == 15:
                return await client.write_coils(address, [bool(v) for v in values], device_id=unit)
            if fc == 6:
                return await client.write_register(address, int(values[0]), device_id=unit)
            return await client.write_registers(address, [int(v) for v in values], device_id=unit)

        await self._transact(fc, unit, address, n, call)

    def close(self) -> None:
        self._drop()


class ConnectionPool:
    """Connections by endpoint: devices behind one gateway or on one bus share one.

    The pool is built once for all devices of a driver, so that a shared link takes the
    longest timeout and inter-frame delay of its devices. Each `get` is a user of the
    link until its `release`: the last one's release closes the link (a device removed
    by a reload), while the other devices on it go on sharing it."""

    def __init__(self) -> None:
        self._connections: dict[tuple[str, str, int], ModbusConnection] = {}
        self._first: dict[tuple[str, str, int], Endpoint] = {}
        self._users: dict[tuple[str, str, int], int] = {}

    def get(self, settings: ModbusDeviceSettings) -> ModbusConnection:
        endpoint = Endpoint.of(settings)
        key = endpoint.key
        conn = self._connections.get(key)
        self._users[key] = self._users.get(key, 0) + 1
        if conn is None:
            conn = ModbusConnection(
                endpoint, timeout=settings.timeout, inter_frame_delay=settings.inter_frame_delay
            )
            self._connections[key] = conn
            self._first[key] = endpoint
            return conn
        if endpoint != self._first[key]:
            log.error(
                "modbus devices on one link disagree on its settings; using the first",
                extra={"link": conn.label, "using": str(self._first[key])},
            )
        conn.timeout = max(conn.timeout, settings.timeout)
        if endpoint.transport != "tcp":
            conn.inter_frame_delay = max(conn.inter_frame_delay, settings.inter_frame_delay)
        return conn

    def release(self, settings: ModbusDeviceSettings) -> None:
        """One user of the link is gone; the last one closes it and forgets it (the
        next `get` opens it afresh, with that device's settings)."""
        key = Endpoint.of(settings).key
        self._users[key] -= 1
        if self._users[key] == 0:
            del self._users[key], self._first[key]
            self._connections.pop(key).close()

    def connections(self) -> list[ModbusConnection]:
        return list(self._connections.values())

    def close(self) -> None:
        for conn in self._connections.values():
            conn.close()


async def probe(
    connection: ModbusConnection, unit: int, table: str, address: int, count: int = 1
) -> list[int] | list[bool] | ModbusExceptionResponse:
    """One read for scanning a register map: the values, or the exception response the
    device gave (returned, not raised). Timeouts and link errors are raised."""
    try:
        return await connection.read(table, address, count, unit)
    except ModbusExceptionResponse as exc:
        return exc
