"""Modbus devices as a technician meets them in the field, for `ModbusSimulator`: register
maps with holes the device refuses, reads it takes only in whole 32-bit pairs, and a
TCP-to-RTU gateway that answers for absent units with exception 11.

- `sdm630_image()`: an Eastron SDM630 three-phase meter. Its input registers (function
  4) and holding registers (function 3) exist only at the parameters its protocol
  document lists; every other address answers exception 2, and every read or write must
  start on an even address and cover whole parameters (`even_only`). Each parameter is
  a float32 (2 registers, ABCD) holding its parameter number, so a read shows what it
  covered.
- `block_device_image()`: a device with one 96-register block of input registers,
  refused on both sides, whose edges fall inside the scan's blocks.
- `field_gateway(host, port)`: both behind one gateway (units 1 and 2) that answers
  exception 11 (gateway target device failed to respond) for any other unit id.

The SDM630 map is taken from public sources (addresses are the 0-based "Hex" column of
Eastron's table; the 3xxxx/4xxxx numbers are these plus 30001/40001):
- input registers: Eastron, "SDM630 Modbus Protocol" (parameters 1-191), as tabulated in
  github.com/nielsbasjes/energy modbus-parsers/src/main/java/nl/basjes/energy/sdm630/
  SDM630Reader.java and github.com/nmakel/sdm_modbus src/sdm_modbus/sdm.py (class
  SDM630); the first parameters also in github.com/volkszaehler/mbmd
  meters/rs485/sdm.go;
- holding registers: github.com/nmakel/sdm_modbus src/sdm_modbus/sdm.py (class SDM630,
  registerType.HOLDING), from Eastron's document (4X table).
The document gives every parameter as two registers (a float32) but does not say what
a meter does with a read of an undocumented address or of half a parameter; firmwares
differ (some answer 0). The model takes the strict case, exception 2 for both, which is
the one a scan must get right.
"""

from __future__ import annotations

from drivers.modbus.scan import merge
from drivers.modbus.simulator import ModbusSimulator, RegisterImage

__all__ = [
    "BLOCK_96",
    "SDM630_HOLDING_PARAMETERS",
    "SDM630_INPUT_PARAMETERS",
    "block_device_image",
    "field_gateway",
    "sdm630_image",
]

#: first address of each documented input-register parameter (2 registers each)
SDM630_INPUT_PARAMETERS: tuple[int, ...] = (
    *range(0x0000, 0x002A + 1, 2),  # 1-22: phase volts, currents, W, VA, var, PF, angle, avg V
    0x002E, 0x0030,  # 24-25: average line current, sum of line currents
    0x0034,  # 27: total system power
    0x0038,  # 29: total system VA
    0x003C, 0x003E,  # 31-32: total system var, total system power factor
    0x0042,  # 34: total system phase angle
    *range(0x0046, 0x0056 + 1, 2),  # 36-44: frequency, import/export kWh and kvarh, VAh, Ah, demand
    *range(0x0064, 0x006A + 1, 2),  # 51-54: VA demand, neutral current demand (and maxima)
    *range(0x00C8, 0x00CE + 1, 2),  # 101-104: line-to-line volts and their average
    0x00E0,  # 113: neutral current
    *range(0x00EA, 0x00F4 + 1, 2),  # 118-123: phase volts THD, phase current THD
    0x00F8, 0x00FA,  # 125-126: average volts THD, average current THD
    0x00FE,  # 128: total system power factor (sign inverted)
    *range(0x0102, 0x010C + 1, 2),  # 130-135: phase current demand (and maxima)
    *range(0x014E, 0x017C + 1, 2),  # 168-191: line volts THD, total and per-phase kWh/kvarh
)  # fmt: skip

#: first address of each documented holding-register parameter (2 registers each)
SDM630_HOLDING_PARAMETERS: tuple[int, ...] = (
    0x0000, 0x0002,  # demand time, demand period
    0x0006, 0x0008, 0x000A, 0x000C,  # system voltage, system current, system type, pulse width
    0x0012, 0x0014,  # network parity/stop, meter id
    0x001C,  # baud rate
    0x0024,  # system power
    0xF910,  # pulse 1 divisor
)  # fmt: skip

#: the 96-register block of `block_device_image()`: (first, end exclusive)
BLOCK_96: tuple[int, int] = (1003, 1099)


def _parameters(table: str, image: RegisterImage, starts: tuple[int, ...]) -> None:
    image.only(table, merge([(a, a + 2) for a in starts]))
    for number, a in enumerate(starts, 1):
        image.set_value(table, a, float(number), "float32")


def sdm630_image() -> RegisterImage:
    """The SDM630 as described in the module doc."""
    image = RegisterImage()
    _parameters("input_register", image, SDM630_INPUT_PARAMETERS)
    _parameters("holding_register", image, SDM630_HOLDING_PARAMETERS)
    image.even_only = True
    return image


def block_device_image() -> RegisterImage:
    """Input registers BLOCK_96 only, each holding its own address."""
    image = RegisterImage()
    lo, hi = BLOCK_96
    image.only("input_register", [BLOCK_96])
    image.set("input_register", lo, list(range(lo, hi)))
    return image


def field_gateway(host: str = "127.0.0.1", port: int = 0) -> ModbusSimulator:
    """Unit 1 an SDM630, unit 2 the 96-register device, behind a gateway that answers
    exception 11 for every other unit id (start it, or use it as a context manager)."""
    sim = ModbusSimulator({1: sdm630_image(), 2: block_device_image()}, host, port)
    sim.absent_exception = 11
    return sim
