"""The driver interface: the one contract every southbound protocol implements.

A driver owns all configured devices of its kind (so that, say, Modbus devices on
one serial bus can share it). It validates its own part of the config through two
pydantic models, pushes columnar batches into a sink until cancelled, and keeps a
health record per device. Drivers know nothing about the buffer or the uplink.

A config reload adds, removes and restarts devices. A driver with `live_devices`
does it while it runs (`add_device`, `remove_device`): its other devices go on
without a gap. `PerDeviceDriver` gives that to any driver whose devices each run in
tasks of their own. The agent stops a driver without it and starts it again with its
new devices, all of them (logged, and listed in the reload's `restarted`).
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

from native.batch import Batch

if TYPE_CHECKING:
    from firmware_bridge.ota import OtaResult
    from firmware_bridge.ota_push import ProgressCallback


class NoSettings(BaseModel):
    """Driver settings model for drivers that take no extra keys."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True, slots=True)
class PointSpec:
    """One configured point, as a driver sees it."""

    id: int  # stable id from the point registry
    key: str  # "<device>/<point>"
    name: str
    unit: str
    kind: str  # "float" | "int" | "bool"
    writable: bool
    settings: BaseModel  # validated by the driver's point_model
    min: float | None = None  # declared range: writes outside it are refused
    max: float | None = None


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One configured device with its points."""

    name: str
    poll_s: float
    settings: BaseModel  # validated by the driver's device_model
    points: tuple[PointSpec, ...]


class BatchSink(Protocol):
    def push(self, batch: Batch) -> bool:
        """Hand over a batch. False means the agent is saturated: the batch was not
        taken and the driver must count a skipped poll (back-pressure)."""
        ...


@dataclass(slots=True)
class DeviceHealth:
    last_success_ms: int | None = None
    last_error_ms: int | None = None
    last_error: str | None = None
    errors: int = 0
    consecutive_failures: int = 0
    polls: int = 0
    skipped_polls: int = 0
    readings: int = 0
    #: inputs the device sent that were refused as malformed, by reason (a frame with a
    #: bad CRC, a payload that does not parse...); `errors` mixes them with timeouts and
    #: lost links, this says exactly how much junk arrived
    rejected: dict[str, int] = field(default_factory=dict)
    #: event-driven drivers (mqtt): the messages the device sent (None: a polled device)
    messages: int | None = None
    #: what the device's own availability signal (an MQTT LWT) last said; None: no signal
    online: bool | None = None

    def success(self, n_readings: int) -> None:
        self.polls += 1
        self.readings += n_readings
        self.consecutive_failures = 0
        self.last_success_ms = time.time_ns() // 1_000_000

    def failure(self, error: str) -> None:
        self.polls += 1
        self.errors += 1
        self.consecutive_failures += 1
        self.last_error = error
        self.last_error_ms = time.time_ns() // 1_000_000

    def reject(self, reason: str) -> None:
        """Counts one refused input by reason; the failure it may also be is recorded
        by the caller as before."""
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def as_dict(self) -> dict[str, object]:
        return {
            "last_success_ms": self.last_success_ms,
            "last_error_ms": self.last_error_ms,
            "last_error": self.last_error,
            "errors": self.errors,
            "consecutive_failures": self.consecutive_failures,
            "polls": self.polls,
            "skipped_polls": self.skipped_polls,
            "readings": self.readings,
            "rejected": dict(self.rejected),
            "messages": self.messages,
            "online": self.online,
        }


class DeviceConfigProblem(ValueError):
    """A problem a driver found in a device's config; `key_path` is relative to the
    device's table (e.g. ``("profile",)`` or ``("points", 3, "address")``)."""

    def __init__(self, key_path: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.key_path = key_path
        self.message = message


class Driver(ABC):
    """Base class of all drivers. Subclasses set the class attributes and run()."""

    name: ClassVar[str]
    #: whether add_device and remove_device work while run() runs (module docstring)
    live_devices: ClassVar[bool] = False
    #: validates the driver-specific keys of a [[devices]] table
    device_model: ClassVar[type[BaseModel]] = NoSettings
    #: validates the driver-specific keys of a [[devices.points]] table
    point_model: ClassVar[type[BaseModel]] = NoSettings

    @classmethod
    def expand_device(cls, table: dict[str, Any], base_dir: Path) -> dict[str, Any]:
        """The device's raw config table with whatever it references filled in (a
        Modbus device profile's points, say), before anything is validated. Raises
        DeviceConfigProblem. The default changes nothing."""
        return table

    @classmethod
    def check_device(
        cls,
        device: BaseModel,
        points: Sequence[BaseModel],
        tables: Sequence[Mapping[str, Any]],
    ) -> list[DeviceConfigProblem]:
        """Problems that only show across a device's points (overlapping registers,
        say), given the validated driver settings of the device and of its points in
        config order, and the points' raw tables (for the generic keys: name,
        writable...). The default finds none."""
        return []

    def __init__(self, devices: Sequence[DeviceSpec]) -> None:
        self.devices = tuple(devices)
        self._health: dict[str, DeviceHealth] = {d.name: DeviceHealth() for d in self.devices}

    @abstractmethod
    async def run(self, sink: BatchSink) -> None:
        """Poll or listen and push batches into sink until cancelled. A failing
        device must never stall another device."""

    def health(self) -> dict[str, DeviceHealth]:
        return self._health

    async def add_device(self, device: DeviceSpec) -> None:
        """Starts polling or serving one more device, while run() runs or not (then
        run() starts it with the others). Only drivers with `live_devices`."""
        raise NotImplementedError(f"driver {self.name!r} cannot add a device while it runs")

    async def remove_device(self, name: str) -> None:
        """Stops a device (returns once its tasks ended) and forgets it, its health
        included. Only drivers with `live_devices`."""
        raise NotImplementedError(f"driver {self.name!r} cannot remove a device while it runs")

    def device_info(self, name: str) -> dict[str, str]:
        """Latest text a device reported that is not a reading (serial number, firmware
        version, a BTHome text object...), by name. The default: none."""
        return {}

    async def write(self, point: PointSpec, value: float) -> float:
        """Writes `value` to a writable point and returns the value the point now holds
        (what was really written, which the caller reports): a value the device cannot
        hold exactly is refused, not rounded silently."""
        raise NotImplementedError(f"driver {self.name!r} does not support writes")

    async def publish(self, device: str, topic: str, payload: bytes, retain: bool) -> None:
        """Publishes on the broker `device` is read from (a local rule's publish action),
        QoS 1, returning once the broker has it."""
        raise NotImplementedError(f"driver {self.name!r} does not publish")

    def firmware_updates(self, device: str) -> str | None:
        """None if `device` takes firmware updates (`update_firmware`), else why not,
        in words for the platform's command response."""
        return f"its driver {self.name!r} does not update firmware"

    def firmware_downgrades(self, device: str) -> bool:
        """Whether `device`'s own config lets the platform force an update (a downgrade
        or a reinstall): off unless the driver has a setting that turns it on."""
        return False

    async def update_firmware(
        self,
        device: str,
        package: bytes,
        force: bool = False,
        progress: ProgressCallback | None = None,
    ) -> OtaResult:
        """Installs a signed firmware package (docs/firmware-ota.md) on `device`; the
        result says updated, rolled_back, refused or failed."""
        raise NotImplementedError(f"driver {self.name!r} does not update firmware")


class PerDeviceDriver(Driver):
    """A driver whose every device runs in tasks of its own (`device_tasks`), in one
    task group, so devices can be added and removed while it runs. A task that raises
    ends run() (the agent restarts the driver); one cancelled by `remove_device` does
    not. Subclasses keep their per-device state in `attach_device`/`detach_device`."""

    live_devices = True

    def __init__(self, devices: Sequence[DeviceSpec]) -> None:
        super().__init__(devices)
        self._group: asyncio.TaskGroup | None = None  # while run() runs
        self._sink: BatchSink | None = None
        self._running: dict[str, list[asyncio.Task[None]]] = {}  # device -> its tasks
        for device in self.devices:
            self.attach_device(device)

    @abstractmethod
    def device_tasks(
        self, device: DeviceSpec, sink: BatchSink
    ) -> dict[str, Coroutine[Any, Any, None]]:
        """The coroutines that poll or serve `device`, by task name."""

    def attach_device(self, device: DeviceSpec) -> None:
        """Sets up the driver's state for a device (at construction and add_device)."""

    def detach_device(self, name: str) -> None:
        """Drops the driver's state of a device whose tasks have ended."""

    async def run(self, sink: BatchSink) -> None:
        self._sink = sink
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                for device in self.devices:
                    self._spawn(device)
                # open until cancelled, so that add_device can start tasks in it
                await asyncio.get_running_loop().create_future()
        finally:
            self._group, self._sink = None, None
            self._running.clear()

    def _spawn(self, device: DeviceSpec) -> None:
        assert self._group is not None and self._sink is not None
        self._running[device.name] = [
            self._group.create_task(coro, name=name)
            for name, coro in self.device_tasks(device, self._sink).items()
        ]

    async def add_device(self, device: DeviceSpec) -> None:
        if device.name in self._health:
            raise ValueError(f"driver {self.name!r} already has a device {device.name!r}")
        self.devices = (*self.devices, device)
        self._health[device.name] = DeviceHealth()
        self.attach_device(device)
        if self._group is not None:
            self._spawn(device)

    async def remove_device(self, name: str) -> None:
        if name not in self._health:
            raise LookupError(f"driver {self.name!r} has no device {name!r}")
        tasks = self._running.pop(name, [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.detach_device(name)
        self.devices = tuple(d for d in self.devices if d.name != name)
        del self._health[name]
