"""The driver interface: the one contract every southbound protocol implements.

A driver owns all configured devices of its kind (so that, say, Modbus devices on
one serial bus can share it). It validates its own part of the config through two
pydantic models, pushes columnar batches into a sink until cancelled, and keeps a
health record per device. Drivers know nothing about the buffer or the uplink.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
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

    def device_info(self, name: str) -> dict[str, str]:
        """Latest text a device reported that is not a reading (serial number, firmware
        version, a BTHome text object...), by name. The default: none."""
        return {}

    async def write(self, point: PointSpec, value: float) -> float:
        """Writes `value` to a writable point and returns the value the point now holds
        (what was really written, which the caller reports): a value the device cannot
        hold exactly is refused, not rounded silently."""
        raise NotImplementedError(f"driver {self.name!r} does not support writes")

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
