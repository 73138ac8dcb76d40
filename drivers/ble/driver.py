"""The ``ble`` driver: sensors that advertise their readings (BTHome, Ruuvi, iBeacon,
Eddystone TLM, or a generic layout), heard by one scanner per adapter, and sensors read
over GATT (gatt.py).

For each advert: the allow-listed device(s) it belongs to (address, name pattern,
service UUID: every key a device gives must match), a dedupe check, the decoder (one
`Decoders` instance, with the devices' bind keys and generic layouts), the device's
points filled from the measurements ("rssi" from the advert itself), one batch stamped
with the reception time.

Dedupe rule, per address:
1. an advert whose payload (all service data and manufacturer data) is byte-identical
   to the last one decoded from that address is a repeat and dropped without decoding,
   at any distance in time if that one carried a packet id (BTHome packet id, Ruuvi
   sequence, an encryption counter), within `dedupe_window` (default 1 s) if not;
2. after decoding, an advert with the same packet id as the last accepted one from
   that address is dropped too (the payload differed in something else).
Dropped repeats still count as "heard" for `stale_after`.

What a decoder hands out as text (BTHome text, raw, firmware version) is not a reading:
its latest value is kept in `device_info()`, as the Modbus driver keeps string points.
An object the decoder dropped from an otherwise good advert (an undefined BTHome event
code, text that is not UTF-8) counts as a decode error of the device; the rest of the
advert is pushed.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from common.logs import Throttle
from drivers.base import BatchSink, DeviceSpec, Driver
from drivers.ble.advert import Advertisement
from drivers.ble.decoders import Decoded, DecodeError, Decoders, GenericField, GenericLayout
from drivers.ble.decoders.bthome_const import INFO_OBJECTS, OBJECTS
from drivers.ble.gatt import BleakGattFactory, GattClientFactory, GattPoller
from drivers.ble.settings import (
    BleDeviceSettings,
    BlePointSettings,
    GenericLayoutSettings,
    resolve_replay_file,
)
from drivers.ble.source import AdvertSource, BleakSource, ReplaySource
from native.batch import Batch

log = logging.getLogger("citygw.drivers.ble")


@dataclass(frozen=True, slots=True)
class SourceConfig:
    """What a scanner is: devices with equal values share one."""

    source: str
    replay_file: str | None
    replay_speed: float
    replay_loop: bool
    scan_mode: Literal["passive", "active"]
    adapter: str | None

    @classmethod
    def of(cls, s: BleDeviceSettings) -> SourceConfig:
        if s.source == "replay":
            return cls("replay", s.replay_file, s.replay_speed, s.replay_loop, "passive", None)
        return cls("bleak", None, 1.0, True, "passive", s.adapter)


def default_source(config: SourceConfig) -> AdvertSource:
    if config.source == "replay":
        assert config.replay_file is not None
        return ReplaySource(config.replay_file, config.replay_speed, config.replay_loop)
    return BleakSource(config.scan_mode, config.adapter)


def generic_layout(s: GenericLayoutSettings) -> GenericLayout:
    return GenericLayout(
        company_id=s.company_id,
        service_uuid=s.service_uuid,
        fields=tuple(
            GenericField(
                name=f.name,
                offset=f.offset,
                type=f.type,
                endian=f.endian,
                scale=f.scale,
                offset_value=f.offset_value,
                unit=f.unit,
            )
            for f in s.fields
        ),
        min_length=s.min_length,
    )


def payload_key(adv: Advertisement) -> bytes:
    """The advert's payload bytes, in a stable order (for the repeat check)."""
    parts: list[bytes] = []
    for uuid in sorted(adv.service_data):
        parts += [uuid.encode(), b"\0", adv.service_data[uuid], b"\1"]
    for company in sorted(adv.manufacturer_data):
        parts += [company.to_bytes(2, "little"), adv.manufacturer_data[company], b"\2"]
    return b"".join(parts)


@dataclass(slots=True)
class _Seen:
    """What was last accepted from one address."""

    payload: bytes = b""
    payload_ms: int = 0
    had_packet_id: bool = False
    packet_id: int | None = None


@dataclass(slots=True)
class _Device:
    spec: DeviceSpec
    settings: BleDeviceSettings
    #: (point id, measurement name, scale, offset)
    points: list[tuple[int, str, float, float]] = field(default_factory=list)
    last_heard: float | None = None  # monotonic
    decode_errors: int = 0
    #: latest device information (text objects) by name
    info: dict[str, str] = field(default_factory=dict)

    def heard(self) -> float | None:
        return self.last_heard

    def matches(self, adv: Advertisement) -> bool:
        s = self.settings
        if s.address is not None and adv.address.upper() != s.address:
            return False
        if s.name_pattern is not None and not (
            adv.name is not None and fnmatch.fnmatchcase(adv.name, s.name_pattern)
        ):
            return False
        return s.service_uuid is None or (
            s.service_uuid in adv.service_data or s.service_uuid in adv.service_uuids
        )


class BleDriver(Driver):
    name = "ble"
    device_model = BleDeviceSettings
    point_model = BlePointSettings

    #: adapter failure backoff: first, cap (seconds)
    adapter_backoff = (2.0, 60.0)
    #: GATT retry backoff: first, cap (seconds)
    gatt_backoff = GattPoller.backoff
    #: shortest interval between stale checks (seconds)
    min_stale_check = 0.05

    @classmethod
    def expand_device(cls, table: dict[str, Any], base_dir: Path) -> dict[str, Any]:
        return resolve_replay_file(table, base_dir)

    @classmethod
    def check_device(
        cls,
        device: Any,
        points: Sequence[Any],
        tables: Sequence[Any],
    ) -> list[Any]:
        from drivers.base import DeviceConfigProblem

        problems: list[DeviceConfigProblem] = []
        gatt = device.mode == "gatt"
        for i, p in enumerate(points):
            if gatt and p.characteristic is None:
                problems.append(
                    DeviceConfigProblem(
                        ("points", i, "characteristic"),
                        "a point of a mode = 'gatt' device needs characteristic (a UUID)",
                    )
                )
            if not gatt and p.measurement is not None and _is_info(p.measurement):
                problems.append(
                    DeviceConfigProblem(
                        ("points", i, "measurement"),
                        f"{p.measurement!r} is text, not a number: it is kept as the "
                        "device's information (device_info), not as a point",
                    )
                )
            if not gatt and p.measurement is None:
                problems.append(
                    DeviceConfigProblem(
                        ("points", i, "measurement"),
                        "a point of an advert device needs measurement (e.g. 'temperature'); "
                        "characteristic is for mode = 'gatt'",
                    )
                )
        return problems

    def __init__(
        self,
        devices: Sequence[DeviceSpec],
        source_factory: Callable[[SourceConfig], AdvertSource] | None = None,
        gatt_factory: GattClientFactory | None = None,
    ) -> None:
        super().__init__(devices)
        self._source_factory = source_factory or default_source
        self._gatt_factory: GattClientFactory = gatt_factory or BleakGattFactory()
        self._throttle = Throttle(10.0)
        self._seen: dict[str, _Seen] = {}
        self.duplicates = 0
        self._adverts: dict[SourceConfig, list[_Device]] = {}
        self._gatt: list[DeviceSpec] = []
        bind_keys: dict[str, bytes] = {}
        generic: dict[str, GenericLayout] = {}
        for spec in self.devices:
            s = spec.settings
            assert isinstance(s, BleDeviceSettings)
            if s.mode == "gatt":
                self._gatt.append(spec)
                continue
            dev = _Device(spec, s)
            for p in spec.points:
                ps = p.settings
                assert isinstance(ps, BlePointSettings)
                if ps.measurement is not None:
                    dev.points.append((p.id, ps.measurement, ps.scale, ps.offset))
            self._adverts.setdefault(SourceConfig.of(s), []).append(dev)
            if s.address is not None:
                if (k := s.bind_key_bytes()) is not None:
                    bind_keys[s.address] = k
                if s.generic is not None:
                    generic[s.address] = generic_layout(s.generic)
        # one scanner per adapter: active if any of its devices asks for active scanning
        self._adverts = {
            (
                SourceConfig(**{**_fields(key), "scan_mode": "active"})
                if any(d.settings.scan_mode == "active" for d in devs) and key.source == "bleak"
                else key
            ): devs
            for key, devs in self._adverts.items()
        }
        self.decoders = Decoders(bind_keys=bind_keys, generic=generic)

    async def run(self, sink: BatchSink) -> None:
        async with asyncio.TaskGroup() as tg:
            for config, devices in self._adverts.items():
                tg.create_task(self._listen(config, devices, sink), name=f"ble:{config.source}")
                for dev in devices:
                    if dev.settings.stale_after is not None:
                        tg.create_task(
                            self._watch_stale(dev.spec.name, dev.settings.stale_after, dev.heard),
                            name=f"ble-stale:{dev.spec.name}",
                        )
            if self._gatt:
                limit = min(
                    s.max_connections
                    for s in (d.settings for d in self._gatt)
                    if isinstance(s, BleDeviceSettings)
                )
                slots = asyncio.Semaphore(limit)
                for spec in self._gatt:
                    poller = GattPoller(
                        spec,
                        self._gatt_factory,
                        slots,
                        self._health[spec.name],
                        sink,
                        self._throttle,
                    )
                    poller.backoff = self.gatt_backoff
                    if (stale := poller.settings.stale_after) is not None:
                        tg.create_task(
                            self._watch_stale(spec.name, stale, poller.heard, "reading"),
                            name=f"ble-stale:{spec.name}",
                        )
                    tg.create_task(poller.run(), name=f"ble-gatt:{spec.name}")

    # -- adverts ---------------------------------------------------------------------

    async def _listen(self, config: SourceConfig, devices: list[_Device], sink: BatchSink) -> None:
        source = self._source_factory(config)
        delay = self.adapter_backoff[0]
        while True:
            try:
                async for adv in source.adverts():
                    delay = self.adapter_backoff[0]
                    self.handle(adv, devices, sink)
                if config.source == "replay":  # a recording without loop ended
                    log.info("ble replay %s finished", config.replay_file)
                    await asyncio.Event().wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                where = config.adapter or config.replay_file or "default adapter"
                reason = f"bluetooth adapter: {type(exc).__name__}: {exc}"
                for dev in devices:
                    self._health[dev.spec.name].failure(reason)
                n = self._throttle.ready(f"adapter:{where}")
                if n is not None:
                    log.warning(
                        "ble scanner on %s failed (%s); retrying in %.0fs",
                        where,
                        reason,
                        delay,
                        extra={"adapter": where, "count": n},
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.adapter_backoff[1])

    def handle(self, adv: Advertisement, devices: Sequence[_Device], sink: BatchSink) -> None:
        """One advert: match, dedupe, decode, push."""
        matched = [d for d in devices if d.matches(adv)]
        if not matched:
            return
        now = time.monotonic()
        for dev in matched:
            dev.last_heard = now
        address = adv.address.upper()
        seen = self._seen.get(address)
        payload = payload_key(adv)
        if (
            seen is not None
            and payload == seen.payload
            and (
                seen.had_packet_id
                or adv.time_ms - seen.payload_ms < matched[0].settings.dedupe_window * 1000
            )
        ):
            self.duplicates += 1
            return
        decoded: dict[str, Decoded | None] = {}
        failed: set[str] = set()
        for dev in matched:
            fmt = dev.settings.format
            if fmt in decoded:
                continue
            try:
                decoded[fmt] = self.decoders.decode(adv, fmt)
            except DecodeError as exc:
                decoded[fmt] = None
                failed.add(fmt)
                for d in matched:
                    if d.settings.format == fmt:
                        self._decode_failed(d, adv, exc)
        ids = [r.packet_id for r in decoded.values() if r is not None and r.packet_id is not None]
        packet_id = ids[0] if ids else None
        if seen is not None and packet_id is not None and packet_id == seen.packet_id:
            self.duplicates += 1
            return
        if len(failed) < len(decoded):  # something decoded (or no known format: no packet id)
            self._seen[address] = _Seen(payload, adv.time_ms, packet_id is not None, packet_id)
        for dev in matched:
            fmt = dev.settings.format
            if fmt not in decoded or fmt in failed:
                continue  # a decode error: counted, nothing pushed
            result = decoded[fmt]
            if result is None and not _rssi_only(dev):
                continue  # no known format in this advert: nothing to report
            if result is not None:
                for dropped in result.dropped:
                    self._decode_failed(dev, adv, dropped)
                for item in result.info:
                    dev.info[item.name] = item.value
            self._push(dev, adv, result, sink)

    def device_info(self, name: str) -> dict[str, str]:
        """Latest device information of an advert device (BTHome text, raw as hex,
        firmware version...), by name ("text", "text_2", "raw", "firmware_version")."""
        for devs in self._adverts.values():
            for dev in devs:
                if dev.spec.name == name:
                    return dict(dev.info)
        if any(spec.name == name for spec in self._gatt):
            return {}
        raise KeyError(name)

    def _decode_failed(self, dev: _Device, adv: Advertisement, exc: DecodeError) -> None:
        dev.decode_errors += 1
        reason = f"{exc.format}: {exc.reason}" if getattr(exc, "reason", None) else str(exc)
        health = self._health[dev.spec.name]
        health.failure(f"decode error: {reason}")
        health.reject(exc.reason)
        n = self._throttle.ready(f"decode:{dev.spec.name}")
        if n is not None:
            log.warning(
                "ble device %s (%s): cannot decode advert: %s",
                dev.spec.name,
                adv.address,
                reason,
                extra={"device": dev.spec.name, "count": n},
            )

    def _push(
        self, dev: _Device, adv: Advertisement, result: Decoded | None, sink: BatchSink
    ) -> None:
        values: dict[str, float] = {}
        if result is not None:
            for m in result.measurements:
                values.setdefault(m.name, m.value)
        if adv.rssi is not None:
            values.setdefault("rssi", float(adv.rssi))
        batch = Batch()
        for pid, name, scale, offset in dev.points:
            v = values.get(name)
            if v is not None:
                batch.append(pid, adv.time_ms, v * scale + offset)
        health = self._health[dev.spec.name]
        if not len(batch):
            health.success(0)
            return
        if sink.push(batch):
            health.success(len(batch))
        else:
            health.skipped_polls += 1

    async def _watch_stale(
        self,
        name: str,
        stale_after: float,
        last_heard: Callable[[], float | None],
        what: str = "advertisement",
    ) -> None:
        """Records a failure every `stale_after` while nothing is heard (last_heard():
        time.monotonic() of the last advert or reading, None if none yet)."""
        started = time.monotonic()
        next_check = started + stale_after
        while True:
            await asyncio.sleep(max(self.min_stale_check, next_check - time.monotonic()))
            now = time.monotonic()
            heard = last_heard()
            last = heard if heard is not None else started
            if now - last >= stale_after:
                # no age in the text: it would be frozen in the status snapshot, while
                # `citygw status` shows the last success's age as it reads it
                self._health[name].failure(
                    f"no {what} within stale_after ({_human(stale_after)})"
                    + ("" if heard is not None else "; none since start")
                )
                next_check = now + stale_after
            else:
                next_check = last + stale_after


_INFO_NAMES = frozenset(OBJECTS[i][0] for i in INFO_OBJECTS)


def _is_info(measurement: str) -> bool:
    """Whether a measurement name is BTHome device information ("text", "raw_2"...)."""
    base, _, suffix = measurement.rpartition("_")
    return measurement in _INFO_NAMES or (suffix.isdigit() and base in _INFO_NAMES)


def _rssi_only(dev: _Device) -> bool:
    return any(name == "rssi" for _, name, _, _ in dev.points)


def _fields(config: SourceConfig) -> dict[str, Any]:
    return {k: getattr(config, k) for k in SourceConfig.__slots__}


def _human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


__all__ = ["BleDriver", "SourceConfig", "default_source"]
