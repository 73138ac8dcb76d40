"""The data model of the BLE decoders: what a scanner hands in, what a decoder hands out.

Pure data, no I/O and no bleak import: a driver builds an `Advertisement` from whatever its
scanner gives (bleak's ``AdvertisementData``, a replay file, a test) and the decoders in
`drivers.ble.decoders` turn it into `Measurement` values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

BASE_UUID_SUFFIX = "-0000-1000-8000-00805f9b34fb"


def uuid16(short: int) -> str:
    """The full 128-bit, lower-case UUID of a 16-bit SIG UUID (0xFCD2 -> "0000fcd2-...")."""
    return f"0000{short:04x}{BASE_UUID_SUFFIX}"


def normalize_uuid(uuid: str) -> str:
    """A 16-bit ("fcd2", "0xFCD2"), 32-bit or 128-bit UUID as the full lower-case form."""
    u = uuid.strip().lower()
    if u.startswith("0x"):
        u = u[2:]
    if len(u) == 4:
        return f"0000{u}{BASE_UUID_SUFFIX}"
    if len(u) == 8:
        return f"{u}{BASE_UUID_SUFFIX}"
    return u


@dataclass(frozen=True, slots=True)
class Advertisement:
    """One received advertisement (with its scan response merged in, as bleak gives it)."""

    address: str  # "AA:BB:CC:DD:EE:FF" upper-case
    time_ms: int  # reception time
    rssi: int | None = None
    name: str | None = None
    #: key: full 128-bit UUID, lower-case, e.g. "0000fcd2-0000-1000-8000-00805f9b34fb"
    service_data: Mapping[str, bytes] = field(default_factory=dict)
    #: company id -> payload (without the id), as bleak gives it
    manufacturer_data: Mapping[int, bytes] = field(default_factory=dict)
    service_uuids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Measurement:
    """One decoded value. A second object of the same name in one advert is "<name>_2"."""

    name: str
    value: float
    unit: str = ""


@dataclass(frozen=True, slots=True)
class Info:
    """One piece of device information an advert carried as text (BTHome text, raw as hex,
    firmware version): kept per device, not a reading. Named like `Measurement`."""

    name: str
    value: str


@dataclass(frozen=True, slots=True)
class Decoded:
    """What one advert of a known format carried."""

    format: str
    measurements: tuple[Measurement, ...]
    #: BTHome packet id (else the encryption counter), Ruuvi measurement sequence
    packet_id: int | None = None
    encrypted: bool = False
    info: tuple[Info, ...] = ()
    #: objects left out of an advert that was otherwise decoded (an undefined event code,
    #: text that is not UTF-8): the driver counts each as a decode error
    dropped: tuple[DecodeError, ...] = ()


class DecodeError(ValueError):
    """A payload of a known format that is malformed, undecryptable or replayed.

    ``reason`` is short and machine-friendly ("truncated", "bad_mic", "replayed_counter",
    "unknown_object", "unsupported_version", "no_key", ...); ``offset`` is the byte offset
    in the payload where the problem was found, if any; the message says both.
    """

    def __init__(self, format: str, reason: str, detail: str = "", offset: int | None = None):
        self.format = format
        self.reason = reason
        self.detail = detail
        self.offset = offset
        where = f" at byte {offset}" if offset is not None else ""
        msg = f"{format}: {reason}{where}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)

    def __reduce__(self) -> tuple[type[DecodeError], tuple[str, str, str, int | None]]:
        return (DecodeError, (self.format, self.reason, self.detail, self.offset))
