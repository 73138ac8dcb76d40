"""The BTHome v2 object table (https://bthome.io/format/): one row per object id.

Adding an object type is a row here, not a branch in the parser. Each row:
``object id: (name, size in bytes, signed, factor, unit)``; the value is
``int.from_bytes(bytes, "little", signed) * factor``. Size `LENGTH_PREFIXED` means the
first byte after the id is the length of the data (text, raw).

Names are citygw's measurement names (a second object of the same name in one advert
becomes "<name>_2"). Binary sensors are 0/1; events are their event code (button: 0 none,
1 press, 2 double press, 3 triple press, 4 long press, 5 long double, 6 long triple,
0x80 hold press); the dimmer event (2 bytes: direction, steps) becomes a signed number of
steps (left negative, right positive). An event code the page does not define is dropped
(`BUTTON_EVENTS`, `DIMMER_DIRECTIONS`).

Text (0x53, UTF-8), raw (0x54, shown as lower-case hex, as the page says) and the device
information objects (0xF0 device type id, 0xF1/0xF2 firmware version) are not numbers:
they are device information (`INFO_OBJECTS`), not measurements.

Checked against the published v2 format page (and cross-checked with bthome-ble's table).
Ids 0x62-0x64 are the most recent additions to the page; their factors are as published
there to the best of my knowledge (speed/acceleration sint32 x 0.000001, light level u8).
"""

from __future__ import annotations

from typing import Final

LENGTH_PREFIXED: Final = -1

#: name, size, signed, factor, unit
ObjectSpec = tuple[str, int, bool, float, str]

UG_M3: Final = "µg/m³"

OBJECTS: Final[dict[int, ObjectSpec]] = {
    # -- sensors ----------------------------------------------------------------------
    0x00: ("packet_id", 1, False, 1, ""),
    0x01: ("battery", 1, False, 1, "%"),
    0x02: ("temperature", 2, True, 0.01, "°C"),
    0x03: ("humidity", 2, False, 0.01, "%"),
    0x04: ("pressure", 3, False, 0.01, "hPa"),
    0x05: ("illuminance", 3, False, 0.01, "lx"),
    0x06: ("mass", 2, False, 0.01, "kg"),
    0x07: ("mass_lb", 2, False, 0.01, "lb"),
    0x08: ("dewpoint", 2, True, 0.01, "°C"),
    0x09: ("count", 1, False, 1, ""),
    0x0A: ("energy", 3, False, 0.001, "kWh"),
    0x0B: ("power", 3, False, 0.01, "W"),
    0x0C: ("voltage", 2, False, 0.001, "V"),
    0x0D: ("pm2_5", 2, False, 1, UG_M3),
    0x0E: ("pm10", 2, False, 1, UG_M3),
    # -- binary sensors (0/1) -----------------------------------------------------------
    0x0F: ("generic_boolean", 1, False, 1, ""),
    0x10: ("power_on", 1, False, 1, ""),
    0x11: ("opening", 1, False, 1, ""),
    # -- sensors ----------------------------------------------------------------------
    0x12: ("co2", 2, False, 1, "ppm"),
    0x13: ("tvoc", 2, False, 1, UG_M3),
    0x14: ("moisture", 2, False, 0.01, "%"),
    # -- binary sensors (0/1) -----------------------------------------------------------
    0x15: ("battery_low", 1, False, 1, ""),
    0x16: ("battery_charging", 1, False, 1, ""),
    0x17: ("carbon_monoxide", 1, False, 1, ""),
    0x18: ("cold", 1, False, 1, ""),
    0x19: ("connectivity", 1, False, 1, ""),
    0x1A: ("door", 1, False, 1, ""),
    0x1B: ("garage_door", 1, False, 1, ""),
    0x1C: ("gas_detected", 1, False, 1, ""),
    0x1D: ("heat", 1, False, 1, ""),
    0x1E: ("light", 1, False, 1, ""),
    0x1F: ("lock", 1, False, 1, ""),
    0x20: ("moisture_detected", 1, False, 1, ""),
    0x21: ("motion", 1, False, 1, ""),
    0x22: ("moving", 1, False, 1, ""),
    0x23: ("occupancy", 1, False, 1, ""),
    0x24: ("plug", 1, False, 1, ""),
    0x25: ("presence", 1, False, 1, ""),
    0x26: ("problem", 1, False, 1, ""),
    0x27: ("running", 1, False, 1, ""),
    0x28: ("safety", 1, False, 1, ""),
    0x29: ("smoke", 1, False, 1, ""),
    0x2A: ("sound", 1, False, 1, ""),
    0x2B: ("tamper", 1, False, 1, ""),
    0x2C: ("vibration", 1, False, 1, ""),
    0x2D: ("window", 1, False, 1, ""),
    # -- sensors ----------------------------------------------------------------------
    0x2E: ("humidity", 1, False, 1, "%"),
    0x2F: ("moisture", 1, False, 1, "%"),
    # -- events -------------------------------------------------------------------------
    0x3A: ("button", 1, False, 1, ""),
    0x3C: ("dimmer", 2, False, 1, ""),  # special-cased: direction byte, steps byte
    # -- sensors ----------------------------------------------------------------------
    0x3D: ("count", 2, False, 1, ""),
    0x3E: ("count", 4, False, 1, ""),
    0x3F: ("rotation", 2, True, 0.1, "°"),
    0x40: ("distance", 2, False, 1, "mm"),
    0x41: ("distance", 2, False, 0.1, "m"),
    0x42: ("duration", 3, False, 0.001, "s"),
    0x43: ("current", 2, False, 0.001, "A"),
    0x44: ("speed", 2, False, 0.01, "m/s"),
    0x45: ("temperature", 2, True, 0.1, "°C"),
    0x46: ("uv_index", 1, False, 0.1, ""),
    0x47: ("volume", 2, False, 0.1, "L"),
    0x48: ("volume", 2, False, 1, "mL"),
    0x49: ("volume_flow_rate", 2, False, 0.001, "m³/h"),
    0x4A: ("voltage", 2, False, 0.1, "V"),
    0x4B: ("gas", 3, False, 0.001, "m³"),
    0x4C: ("gas", 4, False, 0.001, "m³"),
    0x4D: ("energy", 4, False, 0.001, "kWh"),
    0x4E: ("volume", 4, False, 0.001, "L"),
    0x4F: ("water", 4, False, 0.001, "L"),
    0x50: ("timestamp", 4, False, 1, "s"),  # Unix time (UTC)
    0x51: ("acceleration", 2, False, 0.001, "m/s²"),
    0x52: ("gyroscope", 2, False, 0.001, "°/s"),
    0x53: ("text", LENGTH_PREFIXED, False, 1, ""),  # device information
    0x54: ("raw", LENGTH_PREFIXED, False, 1, ""),  # device information
    0x55: ("volume_storage", 4, False, 0.001, "L"),
    0x56: ("conductivity", 2, False, 1, "µS/cm"),
    0x57: ("temperature", 1, True, 1, "°C"),
    0x58: ("temperature", 1, True, 0.35, "°C"),
    0x59: ("count", 1, True, 1, ""),
    0x5A: ("count", 2, True, 1, ""),
    0x5B: ("count", 4, True, 1, ""),
    0x5C: ("power", 4, True, 0.01, "W"),
    0x5D: ("current", 2, True, 0.001, "A"),
    0x5E: ("direction", 2, False, 0.01, "°"),
    0x5F: ("precipitation", 2, False, 0.1, "mm"),
    0x60: ("channel", 1, False, 1, ""),
    0x61: ("rotational_speed", 2, False, 1, "rpm"),
    0x62: ("speed", 4, True, 0.000001, "m/s"),
    0x63: ("acceleration", 4, True, 0.000001, "m/s²"),
    0x64: ("light_level", 1, False, 1, ""),
    0x65: ("settings_revision", 1, False, 1, ""),  # 6503 -> 3
    # -- device information (https://bthome.io/format/ "Device information") ------------
    0xF0: ("device_type_id", 2, False, 1, ""),
    0xF1: ("firmware_version", 4, False, 1, ""),  # F1 00010204 -> "4.2.1.0"
    0xF2: ("firmware_version", 3, False, 1, ""),  # F2 000106 -> "6.1.0"
}

PACKET_ID: Final = 0x00
BUTTON: Final = 0x3A
DIMMER: Final = 0x3C
TEXT: Final = 0x53
RAW: Final = 0x54
DEVICE_TYPE_ID: Final = 0xF0

#: objects that are device information (a string), not a measurement
INFO_OBJECTS: Final = frozenset({TEXT, RAW, DEVICE_TYPE_ID, 0xF1, 0xF2})

#: the event codes the format page defines ("Events" table); bthome-ble (src/bthome_ble/
#: event.py) fires no event for any other code. 0x00 is "None": no event for this button
#: (a multi-button device names the one pressed by position: 3A00 3A01).
BUTTON_EVENTS: Final = frozenset({0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x80})
#: dimmer direction byte: 0x00 none, 0x01 rotate left, 0x02 rotate right
DIMMER_DIRECTIONS: Final = frozenset({0x00, 0x01, 0x02})
