"""GATT polling for ``mode = "gatt"`` devices: connect (bleak-retry-connector), read
characteristics every `poll` or subscribe to their notifications, decode each value by
datatype/endian/scale, push a batch.

Connections are few on a Bluetooth adapter, so a semaphore bounds them (the devices'
`max_connections`, default 2). A device without notify points connects for each poll
and disconnects after reading; a device with notify points stays connected (it holds
its slot) and reads its polled points on that connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from common.logs import Throttle
from drivers.base import BatchSink, DeviceHealth, DeviceSpec, PointSpec
from drivers.ble.settings import BleDeviceSettings, BlePointSettings
from drivers.schedule import FixedRate, phase_for
from native.batch import Batch

log = logging.getLogger("citygw.drivers.ble")

_STRUCT = {
    "u8": "B",
    "i8": "b",
    "u16": "H",
    "i16": "h",
    "u32": "I",
    "i32": "i",
    "f32": "f",
}


def decode_value(data: bytes, point: BlePointSettings) -> float:
    """A characteristic's bytes as a number: its datatype at offset 0, then scaled.
    ValueError if too short."""
    size = point.size
    if len(data) < size:
        raise ValueError(
            f"characteristic {point.characteristic}: {len(data)} bytes, "
            f"{point.datatype} needs {size}"
        )
    if point.datatype in ("u24", "i24"):
        raw: float = int.from_bytes(data[:3], point.endian, signed=point.datatype == "i24")
    else:
        prefix = "<" if point.endian == "little" else ">"
        raw = struct.unpack(prefix + _STRUCT[point.datatype], data[:size])[0]
    return raw * point.scale + point.offset


class GattClient(Protocol):
    async def read_gatt_char(self, char: str, /) -> bytes | bytearray: ...

    async def start_notify(
        self, char: str, callback: Callable[[Any, bytearray], None], /
    ) -> None: ...

    async def disconnect(self) -> Any: ...


class GattClientFactory(Protocol):
    async def connect(self, address: str, adapter: str | None, timeout: float) -> GattClient:
        """A connected client; raises on failure (any exception: retried)."""
        ...


class BleakGattFactory:
    """Finds the device with a scan, then connects with bleak-retry-connector."""

    async def connect(self, address: str, adapter: str | None, timeout: float) -> GattClient:
        from bleak import BleakScanner
        from bleak_retry_connector import BleakClientWithServiceCache, establish_connection

        kwargs: dict[str, Any] = {"bluez": {"adapter": adapter}} if adapter else {}
        device = await BleakScanner.find_device_by_address(address, timeout=timeout, **kwargs)
        if device is None:
            raise ConnectionError(f"{address} not found within {timeout:g}s")
        client = await establish_connection(
            BleakClientWithServiceCache, device, address, max_attempts=3, timeout=timeout
        )
        return client


class GattPoller:
    """Reads (or listens to) one GATT device until cancelled."""

    #: retry backoff after a failed connection or read: first, cap (seconds)
    backoff = (1.0, 60.0)

    def __init__(
        self,
        device: DeviceSpec,
        factory: GattClientFactory,
        slots: asyncio.Semaphore,
        health: DeviceHealth,
        sink: BatchSink,
        throttle: Throttle,
    ) -> None:
        settings = device.settings
        assert isinstance(settings, BleDeviceSettings)
        assert settings.address is not None
        self.device = device
        self.settings = settings
        self.address = settings.address
        self.factory = factory
        self.slots = slots
        self.health = health
        self.sink = sink
        self.throttle = throttle
        self.polled: list[tuple[PointSpec, BlePointSettings]] = []
        self.notified: list[tuple[PointSpec, BlePointSettings]] = []
        for p in device.points:
            ps = p.settings
            assert isinstance(ps, BlePointSettings)
            if ps.characteristic is None:
                continue
            (self.notified if ps.notify else self.polled).append((p, ps))
        self.last_heard: float | None = None  # time.monotonic() of the last reading

    def heard(self) -> float | None:
        return self.last_heard

    async def run(self) -> None:
        delay = self.backoff[0]
        while True:
            try:
                if self.notified:
                    await self._connected_session()
                else:
                    await self._poll_session()
                delay = self.backoff[0]
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._fail(f"gatt: {type(exc).__name__}: {exc}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff[1])

    def _fail(self, reason: str) -> None:
        self.health.failure(reason)
        n = self.throttle.ready(f"gatt:{self.device.name}")
        if n is not None:
            log.warning(
                "ble device %s (%s): %s",
                self.device.name,
                self.address,
                reason,
                extra={"device": self.device.name, "count": n},
            )

    async def _connect(self) -> GattClient:
        return await asyncio.wait_for(
            self.factory.connect(
                self.address, self.settings.adapter, self.settings.connect_timeout
            ),
            self.settings.connect_timeout * 2,
        )

    async def _poll_session(self) -> None:
        """Connect for each poll, read every point, disconnect; returns after a
        failure (the caller backs off)."""
        schedule = FixedRate(self.device.poll_s, phase_for(self.device.name, self.device.poll_s))
        while True:
            self.health.skipped_polls += await schedule.wait()
            async with self.slots:
                client = await self._connect()
                try:
                    await self._read_all(client)
                finally:
                    await _disconnect(client)

    async def _connected_session(self) -> None:
        """Stay connected: notifications push batches, polled points are read every
        `poll`. Holds a connection slot while connected."""
        async with self.slots:
            client = await self._connect()
            try:
                for p, ps in self.notified:
                    assert ps.characteristic is not None
                    await client.start_notify(ps.characteristic, self._on_notify(p, ps))
                if not self.polled:
                    await asyncio.Event().wait()  # until cancelled or disconnected
                schedule = FixedRate(
                    self.device.poll_s, phase_for(self.device.name, self.device.poll_s)
                )
                while True:
                    self.health.skipped_polls += await schedule.wait()
                    await self._read_all(client)
            finally:
                await _disconnect(client)

    def _on_notify(self, p: PointSpec, ps: BlePointSettings) -> Callable[[Any, bytearray], None]:
        def callback(_sender: Any, data: bytearray) -> None:
            try:
                value = decode_value(bytes(data), ps)
            except ValueError as exc:
                self._fail(str(exc))
                return
            self._push([(p.id, value)])

        return callback

    async def _read_all(self, client: GattClient) -> None:
        values: list[tuple[int, float]] = []
        for p, ps in self.polled:
            assert ps.characteristic is not None
            data = await client.read_gatt_char(ps.characteristic)
            values.append((p.id, decode_value(bytes(data), ps)))
        if values:
            self._push(values)

    def _push(self, values: Sequence[tuple[int, float]]) -> None:
        ts = time.time_ns() // 1_000_000
        n = len(values)
        batch = Batch.at(ts, [i for i, _ in values], [v for _, v in values])
        self.last_heard = time.monotonic()
        if self.sink.push(batch):
            self.health.success(n)
        else:
            self.health.skipped_polls += 1


async def _disconnect(client: GattClient) -> None:
    with contextlib.suppress(Exception):
        await asyncio.shield(asyncio.wait_for(client.disconnect(), 10.0))
