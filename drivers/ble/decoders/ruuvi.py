"""Ruuvi RAWv2 (data format 5, https://docs.ruuvi.com/communication/bluetooth-advertisements/data-format-5-rawv2).

Manufacturer data of company 0x0499, 24 bytes (big-endian): format (5), temperature
i16 x 0.005 °C, humidity u16 x 0.0025 %, pressure u16 + 50000 Pa, acceleration x/y/z
i16 mG, power info u16 (battery: top 11 bits + 1600 mV; tx power: low 5 bits x 2 - 40
dBm), movement counter u8, measurement sequence u16, MAC 6. A value at its "not
available" code (0x8000 signed, 0xFFFF u16, 0xFF u8, 2047/31 power fields) is omitted.

Pressure is given in hPa (like BTHome's "pressure"), battery voltage in V.
"""

from __future__ import annotations

import struct

from drivers.ble.advert import Decoded, DecodeError, Measurement

FORMAT = "ruuvi"
COMPANY_ID = 0x0499
DATA_FORMAT = 5
LENGTH = 24

_LAYOUT = struct.Struct(">BhHHhhhHBH6s")


def decode(data: bytes) -> Decoded:
    if not data:
        raise DecodeError(FORMAT, "truncated", "empty manufacturer data", offset=0)
    if data[0] != DATA_FORMAT:
        raise DecodeError(
            FORMAT, "unsupported_version", f"data format {data[0]} (only 5 is decoded)", 0
        )
    if len(data) < LENGTH:
        raise DecodeError(FORMAT, "truncated", f"{len(data)} of {LENGTH} bytes", offset=len(data))
    _, temp, hum, pres, ax, ay, az, power, moves, seq, _mac = _LAYOUT.unpack_from(data)
    out: list[Measurement] = []
    if temp != -0x8000:
        out.append(Measurement("temperature", temp * 5 / 1000, "°C"))
    if hum != 0xFFFF:
        out.append(Measurement("humidity", hum * 25 / 10000, "%"))
    if pres != 0xFFFF:
        out.append(Measurement("pressure", (pres + 50000) / 100, "hPa"))
    for axis, acc in (("x", ax), ("y", ay), ("z", az)):
        if acc != -0x8000:
            out.append(Measurement(f"acceleration_{axis}", float(acc), "mG"))
    volt, tx = power >> 5, power & 0x1F
    if volt != 2047:
        out.append(Measurement("voltage", (volt + 1600) / 1000, "V"))
    if tx != 31:
        out.append(Measurement("tx_power", float(tx * 2 - 40), "dBm"))
    if moves != 0xFF:
        out.append(Measurement("movement_counter", float(moves)))
    return Decoded(FORMAT, tuple(out), None if seq == 0xFFFF else seq)
