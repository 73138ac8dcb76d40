"""Where adverts come from: a small protocol, the bleak scanner behind it, and a
replay of a recorded JSONL file (for tests, demos and technicians without a radio).

This module and gatt.py are the only bleak-facing code of the ``ble`` driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal, Protocol

import orjson

from drivers.ble.advert import Advertisement
from drivers.ble.settings import normalize_address, normalize_uuid

log = logging.getLogger("citygw.drivers.ble")

#: adverts waiting for the driver; beyond this the scanner's callback drops them
QUEUE_SIZE = 2000


class AdvertSource(Protocol):
    def adverts(self) -> AsyncIterator[Advertisement]:
        """Adverts as they are heard, until cancelled. Raises when the adapter fails
        (the driver reports it and calls again after a backoff)."""
        ...


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class BleakSource:
    """A BleakScanner with a detection callback, as an async iterator of adverts.

    Passive scanning on BlueZ needs "or patterns" (advertising-monitor filters); the
    ones here match every advert that carries a flags field, like Home Assistant's."""

    def __init__(
        self, mode: Literal["passive", "active"] = "passive", adapter: str | None = None
    ) -> None:
        self.mode = mode
        self.adapter = adapter
        self.dropped = 0

    def _scanner(self, callback: Any) -> Any:
        from bleak import BleakScanner

        bluez: dict[str, Any] = {}
        if self.adapter:
            bluez["adapter"] = self.adapter
        if self.mode == "passive":
            from bleak.args.bluez import OrPattern
            from bleak.assigned_numbers import AdvertisementDataType

            bluez["or_patterns"] = [
                OrPattern(0, AdvertisementDataType.FLAGS, bytes([flags]))
                for flags in (0x02, 0x06, 0x1A)
            ]
        return BleakScanner(detection_callback=callback, scanning_mode=self.mode, bluez=bluez)  # type: ignore[arg-type]

    async def adverts(self) -> AsyncIterator[Advertisement]:
        queue: asyncio.Queue[Advertisement] = asyncio.Queue(QUEUE_SIZE)

        def on_advert(device: Any, data: Any) -> None:
            adv = Advertisement(
                address=device.address.upper(),
                time_ms=now_ms(),
                rssi=data.rssi,
                name=data.local_name or device.name,
                service_data={k.lower(): bytes(v) for k, v in data.service_data.items()},
                manufacturer_data={int(k): bytes(v) for k, v in data.manufacturer_data.items()},
                service_uuids=tuple(u.lower() for u in data.service_uuids),
            )
            try:
                queue.put_nowait(adv)
            except asyncio.QueueFull:
                self.dropped += 1

        scanner = self._scanner(on_advert)
        await scanner.start()
        try:
            while True:
                yield await queue.get()
        finally:
            with contextlib.suppress(Exception):
                await scanner.stop()


def parse_record(record: dict[str, Any], time_ms: int) -> Advertisement:
    """One line of a recording (``{"t", "address", "rssi", "name", "service_data":
    {uuid: hex}, "manufacturer_data": {company id: hex}}``) as an advert at time_ms."""
    service_data = {
        normalize_uuid(str(k)): bytes.fromhex(v)
        for k, v in (record.get("service_data") or {}).items()
    }
    manufacturer = {
        int(k, 0) if isinstance(k, str) else int(k): bytes.fromhex(v)
        for k, v in (record.get("manufacturer_data") or {}).items()
    }
    rssi = record.get("rssi")
    return Advertisement(
        address=normalize_address(str(record["address"])),
        time_ms=time_ms,
        rssi=None if rssi is None else int(rssi),
        name=record.get("name"),
        service_data=service_data,
        manufacturer_data=manufacturer,
        service_uuids=tuple(normalize_uuid(str(u)) for u in record.get("service_uuids") or ()),
    )


def load_recording(path: Path) -> list[tuple[float, dict[str, Any]]]:
    """The records of a JSONL recording with their offsets `t` (s), in file order.
    Raises ValueError naming the line of a bad record, OSError if unreadable."""
    records: list[tuple[float, dict[str, Any]]] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            record = orjson.loads(line)
            t = float(record.get("t", 0.0))
            parse_record(record, 0)  # check it now, not in the middle of a replay
        except (orjson.JSONDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}:{lineno}: not a recorded advert: {exc}") from None
        records.append((t, record))
    return records


class ReplaySource:
    """Replays a JSONL recording with its timing (divided by `speed`), stamping each
    advert with the time it is emitted; with `loop`, starts over after the last one."""

    def __init__(self, path: Path | str, speed: float = 1.0, loop: bool = True) -> None:
        if speed <= 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        self.path = Path(path)
        self.speed = speed
        self.loop = loop

    async def adverts(self) -> AsyncIterator[Advertisement]:
        records = await asyncio.to_thread(load_recording, self.path)
        if not records:
            raise ValueError(f"{self.path}: no adverts recorded")
        loop = asyncio.get_running_loop()
        span = max(t for t, _ in records) + 1.0  # one second of silence between rounds
        start = loop.time()
        while True:
            for t, record in records:
                delay = start + t / self.speed - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                yield parse_record(record, now_ms())
            if not self.loop:
                return
            start += span / self.speed
