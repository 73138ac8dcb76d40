"""BTHome v2 (https://bthome.io/format/): service data 0xFCD2, table-driven.

``device-info`` byte (bit 0 encrypted, bit 1 MAC included (reversed, 6 bytes follow),
bit 2 trigger-based, bits 5-7 version = 2), then objects: an id byte and its data, sizes
from the table in `bthome_const`. An id that is not in the table stops the parse
("unknown_object"): its size is unknown, so nothing after it can be read.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from drivers.ble.advert import Decoded, DecodeError, Measurement
from drivers.ble.decoders import bthome_encryption
from drivers.ble.decoders.bthome_const import DIMMER, OBJECTS, PACKET_ID

FORMAT = "bthome"
UUID = "0000fcd2-0000-1000-8000-00805f9b34fb"

ENCRYPTED = 0x01
MAC_INCLUDED = 0x02
TRIGGER_BASED = 0x04

#: name, size, signed, multiplier, divisor, unit. value = raw * multiplier / divisor:
#: decimal factors (0.01, 0.001) divide by an integer so 2506 -> 25.06 exactly as printed.
_Row = tuple[str, int, bool, float, int, str]


def _row(spec: tuple[str, int, bool, float, str]) -> _Row:
    name, size, signed, factor, unit = spec
    mul: float = factor
    div = 1
    if 0 < factor < 1:
        d = round(1 / factor)
        if abs(1 / d - factor) < 1e-15:
            mul, div = 1, d
    return (name, size, signed, mul, div, unit)


TABLE: tuple[_Row | None, ...] = tuple(
    _row(OBJECTS[i]) if i in OBJECTS else None for i in range(256)
)

_SUFFIXED: dict[str, tuple[str, ...]] = {
    spec[0]: (spec[0], *(f"{spec[0]}_{k}" for k in range(2, 10))) for spec in OBJECTS.values()
}


def parse_objects(
    data: bytes, start: int, where: str = ""
) -> tuple[tuple[Measurement, ...], int | None]:
    """The measurements and packet id of the objects in ``data[start:]``."""
    table = TABLE
    suffixed = _SUFFIXED
    out: list[Measurement] = []
    seen: dict[str, int] = {}
    packet_id: int | None = None
    n = len(data)
    i = start
    while i < n:
        oid = data[i]
        row = table[oid]
        if row is None:
            raise DecodeError(FORMAT, "unknown_object", f"object id 0x{oid:02X}{where}", offset=i)
        name, size, signed, mul, div, unit = row
        j = i + 1
        if size < 0:  # length-prefixed (text, raw): skipped
            if j >= n:
                raise DecodeError(FORMAT, "truncated", f"{name} without length{where}", i)
            end = j + 1 + data[j]
            if end > n:
                raise DecodeError(
                    FORMAT, "truncated", f"{name} of {data[j]} bytes{where}", offset=i
                )
            i = end
            continue
        end = j + size
        if end > n:
            raise DecodeError(
                FORMAT, "truncated", f"object 0x{oid:02X} needs {size} bytes{where}", offset=i
            )
        if oid == PACKET_ID:
            packet_id = data[j]
            i = end
            continue
        value: float
        if oid == DIMMER:
            direction, steps = data[j], data[j + 1]
            value = float(-steps if direction == 1 else steps if direction == 2 else 0)
        else:
            value = int.from_bytes(data[j:end], "little", signed=signed) * mul / div
        k = seen.get(name, 0)
        seen[name] = k + 1
        names = suffixed[name]
        out.append(Measurement(names[k] if k < 9 else f"{name}_{k + 1}", value, unit))
        i = end
    return tuple(out), packet_id


def mac_of(address: str) -> bytes:
    """``"AA:BB:CC:DD:EE:FF"`` as 6 bytes (natural order), DecodeError if not a MAC."""
    try:
        mac = bytes.fromhex(address.replace(":", "").replace("-", ""))
    except ValueError:
        mac = b""
    if len(mac) != 6:
        raise DecodeError(
            FORMAT, "bad_address", f"{address!r} is not a MAC address (needed for the nonce)"
        )
    return mac


def decode(
    data: bytes,
    address: str,
    cipher: AESCCM | None = None,
    last_counter: int | None = None,
) -> tuple[Decoded, int | None]:
    """One BTHome v2 service data payload: the decoded advert and its encryption counter.

    ``cipher``: the bind key's AES-CCM (needed if the advert is encrypted); ``last_counter``:
    the last accepted counter of that device (a counter not above it: "replayed_counter").
    """
    if not data:
        raise DecodeError(FORMAT, "truncated", "empty service data", offset=0)
    info = data[0]
    version = info >> 5
    if version != 2:
        raise DecodeError(
            FORMAT, "unsupported_version", f"device info 0x{info:02X}: version {version}", 0
        )
    start = 1
    mac: bytes | None = None
    if info & MAC_INCLUDED:
        if len(data) < 7:
            raise DecodeError(FORMAT, "truncated", "MAC included but missing", offset=1)
        mac = data[6:0:-1]
        start = 7
    if not info & ENCRYPTED:
        measurements, packet_id = parse_objects(data, start)
        return Decoded(FORMAT, measurements, packet_id, False), None
    if cipher is None:
        raise DecodeError(FORMAT, "no_key", f"encrypted advert from {address}, no bind key")
    if mac is None:
        mac = mac_of(address)
    plain, counter = bthome_encryption.decrypt(cipher, mac, info, data, start)
    if last_counter is not None and counter <= last_counter:
        raise DecodeError(
            FORMAT,
            "replayed_counter",
            f"counter {counter} not above the last accepted {last_counter}",
            offset=len(data) - 8,
        )
    measurements, packet_id = parse_objects(plain, 0, " (in the decrypted data)")
    return Decoded(FORMAT, measurements, counter if packet_id is None else packet_id, True), counter
