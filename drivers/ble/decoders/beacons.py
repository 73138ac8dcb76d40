"""iBeacon (Apple manufacturer data) and Eddystone-TLM (service data 0xFEAA, frame 0x20).

iBeacon: company 0x004C, ``0x02 0x15 | proximity UUID (16) | major (u16 BE) | minor
(u16 BE) | measured power (i8, dBm at 1 m)`` -> "major", "minor", "tx_power" (presence and
RSSI uses). Other Apple adverts are not iBeacons: None.

Eddystone-TLM, unencrypted (version 0x00): ``0x20 | 0x00 | battery mV (u16 BE, 0 = not
supported) | temperature (8.8 signed fixed point, 0x8000 = not supported) | advert count
(u32) | seconds since boot (u32, 0.1 s)`` -> "voltage" (V), "temperature" (°C),
"adv_count", "uptime" (s). Other Eddystone frames (UID, URL, EID): None.
"""

from __future__ import annotations

import struct

from drivers.ble.advert import Decoded, DecodeError, Measurement

IBEACON = "ibeacon"
APPLE = 0x004C
IBEACON_PREFIX = b"\x02\x15"
IBEACON_LENGTH = 23
_IBEACON = struct.Struct(">16sHHb")

EDDYSTONE_TLM = "eddystone-tlm"
EDDYSTONE_UUID = "0000feaa-0000-1000-8000-00805f9b34fb"
TLM_FRAME = 0x20
TLM_LENGTH = 14
_TLM = struct.Struct(">BBHhII")


def decode_ibeacon(data: bytes) -> Decoded | None:
    """None if the Apple payload is not an iBeacon."""
    if data[:2] != IBEACON_PREFIX:
        return None
    if len(data) < IBEACON_LENGTH:
        raise DecodeError(
            IBEACON, "truncated", f"{len(data)} of {IBEACON_LENGTH} bytes", offset=len(data)
        )
    _uuid, major, minor, power = _IBEACON.unpack_from(data, 2)
    return Decoded(
        IBEACON,
        (
            Measurement("major", float(major)),
            Measurement("minor", float(minor)),
            Measurement("tx_power", float(power), "dBm"),
        ),
    )


def decode_eddystone_tlm(data: bytes) -> Decoded | None:
    """None if the Eddystone frame is not TLM."""
    if not data or data[0] != TLM_FRAME:
        return None
    if len(data) < 2:
        raise DecodeError(EDDYSTONE_TLM, "truncated", "no version byte", offset=1)
    if data[1] != 0x00:
        raise DecodeError(
            EDDYSTONE_TLM,
            "unsupported_version",
            f"TLM version 0x{data[1]:02X} (0x01 is encrypted eTLM)",
            offset=1,
        )
    if len(data) < TLM_LENGTH:
        raise DecodeError(
            EDDYSTONE_TLM, "truncated", f"{len(data)} of {TLM_LENGTH} bytes", offset=len(data)
        )
    _, _, vbatt, temp, advs, secs = _TLM.unpack_from(data)
    out: list[Measurement] = []
    if vbatt:
        out.append(Measurement("voltage", vbatt / 1000, "V"))
    if temp != -0x8000:
        out.append(Measurement("temperature", temp / 256, "°C"))
    out.append(Measurement("adv_count", float(advs)))
    out.append(Measurement("uptime", secs / 10, "s"))
    return Decoded(EDDYSTONE_TLM, tuple(out))
