"""Config models of the ``ble`` driver: the keys of a ``driver = "ble"`` device table
and of its point tables (besides the generic ones in agent/config.py).

Driver-wide settings (the advert source, scan mode, adapter) sit on every device table;
the driver merges them: devices with the same source share one scanner.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from common.units import Duration, Offset, Scale

Format = Literal["auto", "bthome", "ruuvi", "ibeacon", "eddystone-tlm", "generic"]
GattType = Literal["u8", "i8", "u16", "i16", "u24", "i24", "u32", "i32", "f32"]
Endian = Literal["little", "big"]

#: bytes a GATT value of each datatype takes
TYPE_SIZES: dict[str, int] = {
    "u8": 1, "i8": 1, "u16": 2, "i16": 2, "u24": 3, "i24": 3, "u32": 4, "i32": 4, "f32": 4,
}  # fmt: skip

_MAC = re.compile(r"^[0-9A-F]{2}(:[0-9A-F]{2}){5}$")
_HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")
_UUID128 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_BASE_UUID = "-0000-1000-8000-00805f9b34fb"

#: error type agent/config.py shows as the plain message (at ctx["key"] when set)
_AT_KEY = "citygw_at_key"


def _problem(message: str, key: str = "") -> PydanticCustomError:
    return PydanticCustomError(_AT_KEY, "{message}", {"key": key, "message": message})


def normalize_address(value: str) -> str:
    """``aa-bb-cc-dd-ee-ff`` / ``aabbccddeeff`` / ``aa:bb:...`` -> ``AA:BB:CC:DD:EE:FF``;
    ValueError if it is not a MAC address."""
    text = value.strip().upper().replace("-", ":")
    if ":" not in text and len(text) == 12:
        text = ":".join(text[i : i + 2] for i in range(0, 12, 2))
    if not _MAC.match(text):
        raise ValueError(f"{value!r} is not a Bluetooth address like 'AA:BB:CC:DD:EE:FF'")
    return text


def normalize_uuid(value: str) -> str:
    """A 16-bit (``fcd2``), 32-bit or 128-bit UUID as bleak writes it: 128-bit, lower case."""
    text = value.strip().lower()
    if text.startswith("0x"):
        text = text[2:]
    if re.fullmatch(r"[0-9a-f]{4}", text):
        return f"0000{text}{_BASE_UUID}"
    if re.fullmatch(r"[0-9a-f]{8}", text):
        return f"{text}{_BASE_UUID}"
    if _UUID128.match(text):
        return text
    raise ValueError(f"{value!r} is not a UUID (e.g. 'fcd2' or '0000fcd2-0000-1000-8000-...')")


#: validated and normalised on load: "aa:bb:..." -> "AA:BB:...", "fcd2" -> the full UUID
MacAddress = Annotated[str, AfterValidator(normalize_address)]
Uuid = Annotated[str, AfterValidator(normalize_uuid)]


class GenericFieldSettings(BaseModel):
    """One value in a generic advert payload."""

    model_config = ConfigDict(extra="forbid")

    name: str
    offset: int = Field(ge=0, le=255, description="byte offset in the payload")
    type: GattType = "u16"
    endian: Endian = "little"
    scale: Scale = 1.0
    offset_value: float = 0.0
    unit: str = ""


class GenericLayoutSettings(BaseModel):
    """Where the generic decoder finds a device's values: the manufacturer data of
    `company_id` or the service data of `service_uuid`."""

    model_config = ConfigDict(extra="forbid")

    company_id: int | None = Field(None, ge=0, le=0xFFFF)
    service_uuid: Uuid | None = None
    fields: list[GenericFieldSettings] = Field(min_length=1)
    min_length: int = Field(0, ge=0, le=255)

    @model_validator(mode="after")
    def _one_source(self) -> GenericLayoutSettings:
        if (self.company_id is None) == (self.service_uuid is None):
            raise _problem("a generic layout needs exactly one of company_id or service_uuid")
        return self


class BleDeviceSettings(BaseModel):
    """Keys a ``driver = "ble"`` device accepts besides the common ones."""

    model_config = ConfigDict(extra="forbid")

    # -- driver-wide: where adverts come from (devices with equal values share a scanner)
    source: Literal["bleak", "replay"] = "bleak"
    #: a JSONL recording (source = "replay"); relative to the config file's folder
    replay_file: str | None = None
    replay_speed: float = Field(1.0, gt=0.0, le=10000.0)
    replay_loop: bool = True
    scan_mode: Literal["passive", "active"] = "passive"
    #: the Bluetooth adapter, e.g. "hci0" (default: the system's default adapter)
    adapter: str | None = None
    #: most GATT connections at once on this adapter
    max_connections: int = Field(2, ge=1, le=10)

    # -- which adverts belong to this device (all given keys must match)
    address: MacAddress | None = None
    name_pattern: str | None = None
    service_uuid: Uuid | None = None

    # -- how to decode them
    format: Format = "auto"
    bind_key: SecretStr | None = None
    generic: GenericLayoutSettings | None = None
    #: no advert (or GATT reading) for this long: a health failure
    stale_after: Duration | None = Field(None, gt=0.0)
    #: identical payloads without a packet id closer than this are one advert
    dedupe_window: Duration = Field(1.0, ge=0.0, le=3600.0)

    mode: Literal["advert", "gatt"] = "advert"
    #: GATT: seconds to find and connect to the device
    connect_timeout: Duration = Field(20.0, gt=0.0, le=300.0)

    @field_validator("name_pattern", "adapter", "replay_file")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise _problem("must not be empty")
        return v

    @field_validator("replay_file")
    @classmethod
    def _replay_file(cls, v: str | None) -> str | None:
        if v is not None and "\0" in v:
            raise _problem("a file path cannot contain a NUL character")
        return v

    @field_validator("bind_key")
    @classmethod
    def _key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not _HEX32.match(v.get_secret_value()):
            raise _problem("bind_key must be 32 hex digits (the device's 16-byte AES key)")
        return v

    @model_validator(mode="after")
    def _check(self) -> BleDeviceSettings:
        if self.address is None and self.name_pattern is None and self.service_uuid is None:
            raise _problem(
                "a ble device needs address, name_pattern or service_uuid to tell its "
                "adverts from the others'",
                "address",
            )
        if self.source == "replay" and self.replay_file is None:
            raise _problem(
                "source = 'replay' needs replay_file (a .jsonl recording)", "replay_file"
            )
        if self.format == "generic" and self.generic is None:
            raise _problem("format = 'generic' needs a generic layout", "generic")
        if self.mode == "gatt" and self.address is None:
            raise _problem("mode = 'gatt' needs the device's address", "address")
        return self

    def bind_key_bytes(self) -> bytes | None:
        return None if self.bind_key is None else bytes.fromhex(self.bind_key.get_secret_value())


class BlePointSettings(BaseModel):
    """An advert measurement (mode = "advert") or a GATT characteristic (mode = "gatt")."""

    model_config = ConfigDict(extra="forbid")

    #: the decoder's measurement name ("temperature", "humidity_2", "rssi", ...)
    measurement: str | None = None
    #: GATT: the characteristic's UUID
    characteristic: Uuid | None = None
    datatype: GattType = "u16"
    endian: Endian = "little"
    #: GATT: subscribe to notifications instead of reading every `poll`
    notify: bool = False
    #: value = raw * scale + offset
    scale: Scale = 1.0
    offset: Offset = 0.0

    @model_validator(mode="after")
    def _one_kind(self) -> BlePointSettings:
        if self.measurement is None and self.characteristic is None:
            raise _problem(
                "a ble point needs measurement (advert mode, e.g. 'temperature') or "
                "characteristic (GATT mode)",
                "measurement",
            )
        if self.measurement is not None and self.characteristic is not None:
            raise _problem("give measurement or characteristic, not both", "characteristic")
        return self

    @property
    def size(self) -> int:
        return TYPE_SIZES[self.datatype]


def resolve_replay_file(table: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """The device table with a relative `replay_file` made absolute against base_dir."""
    path = table.get("replay_file")
    # (a NUL cannot be in a path: left as it is, for the field's check to refuse)
    if isinstance(path, str) and path.strip() and "\0" not in path and not Path(path).is_absolute():
        return {**table, "replay_file": str((base_dir / path).resolve())}
    return table
