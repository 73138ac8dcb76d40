"""BTHome v2 (https://bthome.io/format/): service data 0xFCD2, table-driven.

``device-info`` byte (bit 0 encrypted, bit 1 MAC included (reversed, 6 bytes follow),
bit 2 trigger-based, bits 5-7 version = 2), then objects: an id byte and its data, sizes
from the table in `bthome_const`. An id that is not in the table stops the parse
("unknown_object"): its size is unknown, so nothing after it can be read; the objects
before it are kept (as bthome-ble does, tests/test_parser_v2.py
test_bthome_battery_wrong_object_id_humidity): the page adds ids over time (in ascending
order, so a newer firmware's new object comes last) and one new object must not lose
the readings in front of it. A truncated object is different -- the payload is damaged
-- and rejects the whole advert ("truncated").

What is not a number is device information (`Info`): text (UTF-8), raw (as hex), the
device type id and the firmware version. One object that cannot be taken is dropped and
reported in `Decoded.dropped` while the rest of the advert is kept: an event code the
format page does not define ("unknown_event"; bthome-ble fires no event for it either),
an unknown object id (with everything after it), and text that is not UTF-8
("bad_text": the page says text "has to be encoded in UTF-8"; replacing bytes would
store a string the device never sent). An advert that leaves nothing (no object at
all, only a packet id, or only dropped objects) is a DecodeError: "no_objects", or the
reason of the first dropped object.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from drivers.ble.advert import Decoded, DecodeError, Info, Measurement
from drivers.ble.decoders import bthome_encryption
from drivers.ble.decoders.bthome_const import (
    BUTTON,
    BUTTON_EVENTS,
    DEVICE_TYPE_ID,
    DIMMER,
    DIMMER_DIRECTIONS,
    INFO_OBJECTS,
    OBJECTS,
    PACKET_ID,
    RAW,
    TEXT,
)

FORMAT = "bthome"
UUID = "0000fcd2-0000-1000-8000-00805f9b34fb"

ENCRYPTED = 0x01
#: an encryption counter below this, after one at or above it, is a device that started
#: counting again (battery change, wrap after 2**32 - 1) and is accepted, as bthome-ble
#: does (src/bthome_ble/parser.py _check_encryption_counter; its test
#: test_reset_encryption_counter: 0xFFFFFFFF, then 0). The cost: adverts captured with such
#: a low counter can be replayed while the device's counter is high.
COUNTER_RESTART = 100
MAC_INCLUDED = 0x02
TRIGGER_BASED = 0x04

#: name, size, signed, multiplier, divisor, unit, special. value = raw * multiplier /
#: divisor: decimal factors (0.01, 0.001) divide by an integer so 2506 -> 25.06 exactly as
#: printed. special: the object is not a plain number (packet id, events, information).
_Row = tuple[str, int, bool, float, int, str, bool]

_SPECIAL = INFO_OBJECTS | {PACKET_ID, BUTTON, DIMMER}


def _row(oid: int, spec: tuple[str, int, bool, float, str]) -> _Row:
    name, size, signed, factor, unit = spec
    mul: float = factor
    div = 1
    if 0 < factor < 1:
        d = round(1 / factor)
        if abs(1 / d - factor) < 1e-15:
            mul, div = 1, d
    return (name, size, signed, mul, div, unit, oid in _SPECIAL)


TABLE: tuple[_Row | None, ...] = tuple(
    _row(i, OBJECTS[i]) if i in OBJECTS else None for i in range(256)
)

_SUFFIXED: dict[str, tuple[str, ...]] = {
    spec[0]: (spec[0], *(f"{spec[0]}_{k}" for k in range(2, 10))) for spec in OBJECTS.values()
}


def _info_text(oid: int, body: bytes) -> str:
    """The text of an information object; UnicodeDecodeError for text that is not UTF-8."""
    if oid == TEXT:
        return body.decode("utf-8")
    if oid == RAW:
        return body.hex()
    if oid == DEVICE_TYPE_ID:
        return str(int.from_bytes(body, "little"))
    return ".".join(str(b) for b in reversed(body))  # firmware version, most significant last


class Objects:
    """What the objects of one payload carried."""

    __slots__ = ("dropped", "info", "measurements", "packet_id")

    def __init__(self) -> None:
        self.measurements: list[Measurement] = []
        self.info: list[Info] = []
        self.dropped: list[DecodeError] = []
        self.packet_id: int | None = None


def parse_objects(data: bytes, start: int, where: str = "") -> Objects:
    """The measurements, information, dropped objects and packet id in ``data[start:]``."""
    table = TABLE
    suffixed = _SUFFIXED
    out = Objects()
    measurements = out.measurements
    seen: dict[str, int] = {}
    n = len(data)
    i = start
    while i < n:
        oid = data[i]
        row = table[oid]
        if row is None:  # its size is unknown: the objects from here on cannot be read
            out.dropped.append(
                DecodeError(
                    FORMAT,
                    "unknown_object",
                    f"object id 0x{oid:02X}, {n - i} bytes left unread{where}",
                    offset=i,
                )
            )
            break
        name, size, signed, mul, div, unit, special = row
        j = i + 1
        if size < 0:  # length-prefixed (text, raw)
            if j >= n:
                raise DecodeError(FORMAT, "truncated", f"{name} without length{where}", i)
            j += 1
            end = j + data[i + 1]
        else:
            end = j + size
        if end > n:
            raise DecodeError(
                FORMAT, "truncated", f"object 0x{oid:02X} needs {end - j} bytes{where}", offset=i
            )
        value: float
        if special:
            if oid == PACKET_ID:
                out.packet_id = data[j]
                i = end
                continue
            if oid in INFO_OBJECTS:
                try:
                    text = _info_text(oid, data[j:end])
                except UnicodeDecodeError as exc:
                    out.dropped.append(
                        DecodeError(
                            FORMAT,
                            "bad_text",
                            f"{name} of {end - j} bytes is not UTF-8 ({exc.reason}){where}",
                            offset=i,
                        )
                    )
                    i = end
                    continue
                k = seen.get(name, 0)
                seen[name] = k + 1
                out.info.append(Info(name if k == 0 else f"{name}_{k + 1}", text))
                i = end
                continue
            code = data[j]
            if oid == BUTTON and code not in BUTTON_EVENTS:
                out.dropped.append(
                    DecodeError(
                        FORMAT, "unknown_event", f"button event 0x{code:02X}{where}", offset=i
                    )
                )
                i = end
                continue
            if oid == DIMMER:
                if code not in DIMMER_DIRECTIONS:
                    out.dropped.append(
                        DecodeError(
                            FORMAT,
                            "unknown_event",
                            f"dimmer direction 0x{code:02X}{where}",
                            offset=i,
                        )
                    )
                    i = end
                    continue
                steps = data[j + 1]
                value = float(-steps if code == 1 else steps if code == 2 else 0)
            else:
                value = float(code)
        else:
            value = int.from_bytes(data[j:end], "little", signed=signed) * mul / div
        k = seen.get(name, 0)
        seen[name] = k + 1
        names = suffixed[name]
        measurements.append(Measurement(names[k] if k < 9 else f"{name}_{k + 1}", value, unit))
        i = end
    return out


def _decoded(objects: Objects, packet_id: int | None, encrypted: bool, where: str) -> Decoded:
    """The advert's Decoded; DecodeError if nothing in it can be kept."""
    if not objects.measurements and not objects.info:
        if objects.dropped:
            first = objects.dropped[0]
            if len(objects.dropped) > 1:
                raise DecodeError(
                    FORMAT,
                    first.reason,
                    f"{first.detail}; {len(objects.dropped)} objects dropped, nothing left",
                    first.offset,
                )
            raise first
        what = "only a packet id" if objects.packet_id is not None else "no object"
        raise DecodeError(FORMAT, "no_objects", f"{what}{where}")
    return Decoded(
        FORMAT,
        tuple(objects.measurements),
        packet_id,
        encrypted,
        tuple(objects.info),
        tuple(objects.dropped),
    )


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
    the last accepted counter of that device (a counter not above it: "replayed_counter",
    unless the device restarted: `COUNTER_RESTART`).
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
        objects = parse_objects(data, start)
        return _decoded(objects, objects.packet_id, False, ""), None
    if cipher is None:
        raise DecodeError(FORMAT, "no_key", f"encrypted advert from {address}, no bind key")
    if mac is None:
        mac = mac_of(address)
    plain, counter = bthome_encryption.decrypt(cipher, mac, info, data, start)
    if (
        last_counter is not None
        and counter <= last_counter
        and not counter < COUNTER_RESTART <= last_counter
    ):
        raise DecodeError(
            FORMAT,
            "replayed_counter",
            f"counter {counter} not above the last accepted {last_counter}",
            offset=len(data) - 8,
        )
    where = " (in the decrypted data)"
    objects = parse_objects(plain, 0, where)
    packet_id = counter if objects.packet_id is None else objects.packet_id
    return _decoded(objects, packet_id, True, where), counter
