"""The ``mcu`` driver: readings from the gateway's microcontroller over the serial link.

One task per device keeps an `McuBridge` open: HELLO, then every READINGS frame
becomes one batch. Device timestamps are uptime milliseconds; they become wall-clock
ms with the session's offset, ``offset = wall ms when the HELLO it answers was sent -
its uptime_ms``, taken again at every HELLO (so a device reboot, which restarts uptime at
0 and forces a new HELLO, re-bases it) and corrected when a HEARTBEAT shows more than
`max_skew` of drift. A port that cannot be opened or dies is reported in health and
retried with exponential backoff; frames the link rejects (bad CRC, cut short, junk)
are health errors, logged throttled; a reading the link delivers twice (a READINGS
frame in flight when a session ends is sent again) is dropped by its uptime, which only
grows within a boot; sensor ids without a point are counted and logged
(throttled), never fatal.

Firmware updates (docs/firmware-ota.md): a device with `firmware_key` takes them
through `update_firmware`, over the bridge this driver already holds for it (the port is
never opened twice); the transfer record goes to `ota_state_dir`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, model_validator

from common.keypath import at
from common.logs import Throttle
from common.units import Duration
from drivers.base import BatchSink, DeviceConfigProblem, DeviceSpec, PerDeviceDriver
from firmware_bridge import image as fw
from firmware_bridge import messages as m
from firmware_bridge.bridge import BridgeError, McuBridge
from firmware_bridge.link import FrameRejected, LinkLost, LinkUp, MessageReceived, Timers
from firmware_bridge.ota import OtaResult, Outcome
from firmware_bridge.ota_push import ProgressCallback, push_firmware
from native.batch import BAD, GOOD, Batch

log = logging.getLogger("citygw.drivers.mcu")

__all__ = ["McuDeviceSettings", "McuDriver", "McuPointSettings"]

_LOG_LEVELS = {
    m.LogLevel.DEBUG: logging.DEBUG,
    m.LogLevel.INFO: logging.INFO,
    m.LogLevel.WARNING: logging.WARNING,
    m.LogLevel.ERROR: logging.ERROR,
}


class McuDeviceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    port: str = Field(description="serial device of the microcontroller, e.g. /dev/ttyAMA0")
    baud: int = Field(115200, gt=0)
    heartbeat: Duration = Field(1.0, gt=0.0, le=60.0, description="heartbeat interval")
    max_frame: int = Field(1024, ge=64, le=65535, description="largest frame accepted")
    sampling_interval: Duration | None = Field(
        None, description="set on the device at every HELLO (default: keep the device's)"
    )
    max_skew: Duration = Field(0.5, gt=0.0, description="clock drift that re-bases timestamps")
    retry_max: Duration = Field(30.0, gt=0.0, description="longest wait before reopening")
    firmware_key: Path | None = Field(
        None,
        description="Ed25519 public key (PEM, or 64 hex digits) firmware packages must be "
        "signed for; without it the device takes no firmware updates",
    )
    ota_state_dir: Path | None = Field(
        None,
        description="where an unfinished transfer is recorded "
        "(default: the folder 'ota' beside the buffer database)",
    )
    allow_downgrade: bool = Field(
        False,
        description="let a platform firmware_update with force install an older version "
        "or reinstall the running one (off: the platform can only move the device forward)",
    )

    _public_key: Ed25519PublicKey | None = PrivateAttr(None)

    @property
    def public_key(self) -> Ed25519PublicKey | None:
        """The loaded `firmware_key`."""
        return self._public_key

    @model_validator(mode="after")
    def _load_firmware_key(self, info: ValidationInfo) -> McuDeviceSettings:
        """Relative paths are relative to the config file's folder; the key is read and
        checked now, so that a bad one is a config error, not a failed update."""
        ctx = info.context or {}
        base = Path(ctx.get("base_dir") or Path.cwd())
        if self.ota_state_dir is not None:
            self.ota_state_dir = base / self.ota_state_dir.expanduser()
        if self.firmware_key is None:
            if self.allow_downgrade:
                raise at("allow_downgrade", "needs firmware_key: without it no update is taken")
            return self
        path = base / self.firmware_key.expanduser()
        try:
            self._public_key = fw.public_key_from_bytes(path.read_bytes(), str(path))
        except FileNotFoundError:
            raise at("firmware_key", f"file not found: {path}") from None
        except OSError as exc:
            raise at("firmware_key", f"cannot read {path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise at("firmware_key", str(exc)) from None
        self.firmware_key = path
        if self.ota_state_dir is None:
            buffer_dir = ctx.get("buffer_dir")
            if buffer_dir is None:
                raise at("ota_state_dir", "needed with firmware_key: the transfer record's folder")
            self.ota_state_dir = Path(buffer_dir) / "ota"
        return self


class McuPointSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sensor_id: int = Field(ge=0, le=65535, description="the device's sensor id")


class McuDriver(PerDeviceDriver):
    name = "mcu"
    device_model = McuDeviceSettings
    point_model = McuPointSettings

    @classmethod
    def check_device(
        cls,
        device: BaseModel,
        points: Sequence[BaseModel],
        tables: Sequence[Mapping[str, Any]],
    ) -> list[DeviceConfigProblem]:
        seen: dict[int, int] = {}
        problems = []
        for i, p in enumerate(points):
            assert isinstance(p, McuPointSettings)
            if p.sensor_id in seen:
                problems.append(
                    DeviceConfigProblem(
                        ("points", i, "sensor_id"),
                        f"sensor_id {p.sensor_id} is already point {seen[p.sensor_id] + 1}",
                    )
                )
            seen.setdefault(p.sensor_id, i)
        return problems

    def __init__(self, devices: Sequence[DeviceSpec]) -> None:
        self.bridges: dict[str, McuBridge] = {}  # device name -> open bridge
        self._settings: dict[str, BaseModel] = {}
        self.counters: dict[str, Counter[str]] = {}
        self._clocks: dict[str, _DeviceClock] = {}
        self._throttle = Throttle(60.0)
        self._tasks: set[asyncio.Task[None]] = set()
        super().__init__(devices)

    def attach_device(self, device: DeviceSpec) -> None:
        self._settings[device.name] = device.settings
        self.counters[device.name] = Counter()
        self._clocks[device.name] = _DeviceClock()

    def detach_device(self, name: str) -> None:
        # its bridge was closed as its task ended
        del self._settings[name], self.counters[name], self._clocks[name]

    def firmware_updates(self, device: str) -> str | None:
        s = self._settings[device]
        assert isinstance(s, McuDeviceSettings)
        return None if s.public_key is not None else "it has no firmware_key configured"

    def firmware_downgrades(self, device: str) -> bool:
        s = self._settings[device]
        assert isinstance(s, McuDeviceSettings)
        return s.allow_downgrade

    async def update_firmware(
        self,
        device: str,
        package: bytes,
        force: bool = False,
        progress: ProgressCallback | None = None,
    ) -> OtaResult:
        """Installs a signed package on `device`'s microcontroller over the driver's own
        bridge. The signature is checked against `firmware_key` before anything else,
        then hardware id and version against the device (`force` allows a downgrade or
        a reinstall): nothing is sent unless all hold. Never raises for what the
        package, the device or the link decide: the result says so."""
        s = self._settings[device]
        assert isinstance(s, McuDeviceSettings)
        key = s.public_key
        if key is None:
            return OtaResult(Outcome.REFUSED, f"device {device!r} has no firmware_key configured")
        try:
            pkg = fw.parse(package)
            pkg.verify_signature(key)
        except fw.FirmwareError as exc:
            return OtaResult(Outcome.REFUSED, str(exc))
        bridge = self.bridges.get(device)
        if bridge is None:
            why = self._health[device].last_error or "not open yet"
            return OtaResult(
                Outcome.FAILED,
                f"serial port {s.port} is not open: {why}",
                to_version=str(pkg.manifest.version),
            )
        return await push_firmware(
            bridge,
            pkg,
            fw.UpdatePolicy(key, force),
            state_dir=s.ota_state_dir,
            progress=progress,
        )

    def device_tasks(
        self, device: DeviceSpec, sink: BatchSink
    ) -> dict[str, Coroutine[Any, Any, None]]:
        return {f"mcu:{device.name}": self._serve(device, sink)}

    async def _serve(self, device: DeviceSpec, sink: BatchSink) -> None:
        s = device.settings
        assert isinstance(s, McuDeviceSettings)
        health = self._health[device.name]
        delay = 0.5
        while True:
            bridge = McuBridge(
                s.port, s.baud, timers=Timers(heartbeat=s.heartbeat), max_frame=s.max_frame
            )
            try:
                await bridge.open()
            except (OSError, ValueError) as e:
                health.failure(f"serial port {s.port}: {e}")
                self._warn(device.name, "open", f"mcu {device.name}: cannot open {s.port}: {e}")
            else:
                self.bridges[device.name] = bridge
                try:
                    if await self._session(device, s, bridge, sink):
                        delay = 0.5  # it worked for a while: start the backoff afresh
                except BridgeError as e:
                    health.failure(str(e))
                    log.warning("mcu %s: %s", device.name, e)
                finally:
                    self.bridges.pop(device.name, None)
                    await bridge.close()
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, s.retry_max)

    async def _session(
        self, device: DeviceSpec, s: McuDeviceSettings, bridge: McuBridge, sink: BatchSink
    ) -> bool:
        """Consumes the bridge's events until the port dies (BridgeError); returns
        whether the link came up at least once."""
        health = self._health[device.name]
        counters = self.counters[device.name]
        points = {}
        for p in device.points:
            assert isinstance(p.settings, McuPointSettings)
            points[p.settings.sensor_id] = p.id
        clock = self._clocks[device.name]
        was_up = False
        async for ev in bridge.events():
            if isinstance(ev, LinkUp):
                was_up = True
                caps = ev.capabilities
                clock.session(_wall_ms() - round(ev.since_hello * 1000), caps.uptime_ms)
                counters["sessions"] += 1
                log.info(
                    "mcu %s: up, firmware %s slot %d (%s), boot %s%s",
                    device.name,
                    caps.firmware,
                    caps.active_slot,
                    caps.slot_state.name.lower(),
                    caps.boot_reason.name.lower(),
                    f", rolled back from {caps.failed_version}"
                    if caps.boot_reason is m.BootReason.ROLLED_BACK
                    else "",
                )
                if s.sampling_interval is not None:
                    ms = round(s.sampling_interval * 1000)
                    if ms != caps.sampling_interval_ms:
                        task = asyncio.create_task(self._set_interval(device.name, bridge, ms))
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
            elif isinstance(ev, LinkLost):
                health.failure(f"link lost: {ev.reason}")
                counters["link_lost"] += 1
            elif isinstance(ev, FrameRejected):
                # a frame the link dropped (bad CRC, cut, junk...): the device resends it
                # if it was reliable; counted in health like any other bad input
                health.failure(f"bad frame: {ev.reason}")
                health.reject(ev.reason)
                self._warn(device.name, "frame", f"mcu {device.name}: bad frame ({ev.reason})")
            elif isinstance(ev, MessageReceived) and clock.offset_ms is not None:
                msg = ev.message
                if isinstance(msg, m.Readings):
                    batch = self._batch(device.name, msg, points)
                    if len(batch) == 0:
                        continue
                    if sink.push(batch):
                        health.success(len(batch))
                    else:
                        health.skipped_polls += 1
                elif isinstance(msg, m.Heartbeat):
                    if clock.heartbeat(_wall_ms(), msg.uptime_ms, round(s.max_skew * 1000)):
                        counters["clock_rebased"] += 1
                elif isinstance(msg, m.Log):
                    counters["device_logs"] += 1
                    log.log(_LOG_LEVELS[msg.level], "mcu %s: %s", device.name, msg.text)
        return was_up

    def _batch(self, device: str, msg: m.Readings, points: dict[int, int]) -> Batch:
        clock = self._clocks[device]
        assert clock.offset_ms is not None
        offset_ms, taken = clock.offset_ms, clock.last_taken
        batch = Batch()
        unknown = 0
        for r in msg.readings:
            pid = points.get(r.sensor_id)
            if pid is None:
                unknown += 1
                continue
            if r.uptime_ms <= taken.get(r.sensor_id, -1):
                self.counters[device]["repeated_readings"] += 1  # sent again: had it
                continue
            taken[r.sensor_id] = r.uptime_ms
            batch.append(pid, offset_ms + r.uptime_ms, float(r.value), BAD if r.fault else GOOD)
        if unknown:
            self.counters[device]["unknown_sensor_readings"] += unknown
            ids = sorted({r.sensor_id for r in msg.readings if r.sensor_id not in points})
            self._warn(
                device,
                "unknown",
                f"mcu {device}: readings of sensor ids without a point: {ids}",
                unknown,
            )
        return batch

    async def _set_interval(self, device: str, bridge: McuBridge, ms: int) -> None:
        with contextlib.suppress(BridgeError, TimeoutError):
            result = await bridge.command(m.Command.set_interval(ms), timeout=10.0)
            if result.status is not m.CommandStatus.OK:
                log.warning("mcu %s: sampling interval %d ms refused: %s", device, ms,
                            result.status.name.lower())  # fmt: skip

    def _warn(self, device: str, key: str, text: str, count: int = 1) -> None:
        n = self._throttle.ready(f"{device}:{key}", count)
        if n is not None:
            log.warning("%s (%d times since the last report)", text, n)


#: heartbeats in a row that must all show the device behind before the offset moves later
SKEW_HEARTBEATS = 5

#: an offset estimate this much later than the current one means the device rebooted
#: (uptime restarted); within a boot, estimates differ by the link's delays only
REBOOT_STEP_MS = 2000


@dataclass
class _DeviceClock:
    """A device's uptime -> wall-clock mapping, kept across sessions and port reopens."""

    offset_ms: int | None = None
    # the latest heartbeats' skews (host clock - device time): a late arrival (a busy
    # host) looks like a device behind, never like one ahead
    skews: deque[int] = field(default_factory=lambda: deque(maxlen=SKEW_HEARTBEATS))
    # sensor id -> the uptime of its last reading taken: the link delivers at least once
    # (a READINGS frame in flight when a session ends is sent again in the next one),
    # and uptime, monotonic within a boot, tells a repeat apart
    last_taken: dict[int, int] = field(default_factory=dict)

    def session(self, hello_sent_ms: int, uptime_ms: int) -> None:
        """A new session: its CAPABILITIES says `uptime_ms`, in answer to a HELLO sent
        at `hello_sent_ms` (wall clock)."""
        estimate = hello_sent_ms - uptime_ms
        rebooted = self.offset_ms is not None and (
            estimate > self.offset_ms + REBOOT_STEP_MS
            or (bool(self.last_taken) and uptime_ms < max(self.last_taken.values()))
        )
        if rebooted:  # uptime restarted: a new mapping, and its readings are all new
            self.last_taken.clear()
            self.offset_ms = estimate
        elif self.offset_ms is None or estimate > self.offset_ms:
            # within a boot the true offset stays put and every estimate errs early
            # (see LinkUp): keep the largest, so that a point's times never step back
            # from one session to the next
            self.offset_ms = estimate
        self.skews.clear()

    def heartbeat(self, wall_ms: int, uptime_ms: int, max_skew_ms: int) -> bool:
        """Re-bases the offset on drift beyond `max_skew_ms`; True if it did. A device
        ahead of the host is corrected at once (no delay explains it); one behind only
        when `SKEW_HEARTBEATS` heartbeats in a row all say so, by the least of them, so
        that a host busy for a second does not shift the times of what follows."""
        assert self.offset_ms is not None
        skew = wall_ms - (self.offset_ms + uptime_ms)
        self.skews.append(skew)
        if skew < -max_skew_ms:
            correction = skew
        elif len(self.skews) == SKEW_HEARTBEATS and min(self.skews) > max_skew_ms:
            correction = min(self.skews)
        else:
            return False
        self.offset_ms += correction
        self.skews.clear()
        return True


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000
