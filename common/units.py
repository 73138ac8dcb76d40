"""Human units in config files: durations (``250ms``, ``1s``, ``5m``, ``1h``) and
sizes (``512KB``, ``64MB``, ``1GB``), as pydantic types that validate to float
seconds and int bytes (plain numbers are accepted as seconds / bytes); and the scale and
offset of the drivers' linear conversions."""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}
_NUMBER_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_duration(value: object) -> float:
    """Seconds from ``250ms`` / ``1s`` / ``5m`` / ``2h`` / ``1d`` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like '250ms', '1s', '5m', '2h'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _NUMBER_UNIT.match(value)
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _DURATION_UNITS:
            raise ValueError(
                f"{value!r} is not a duration; use a number with one of "
                "ms, s, m, h, d (e.g. '250ms', '1s', '5m')"
            )
        seconds = float(m.group(1)) * _DURATION_UNITS[unit]
    else:
        raise ValueError("expected a duration like '250ms', '1s', '5m', '2h'")
    if not math.isfinite(seconds):
        raise ValueError(f"a duration must be a finite number of seconds, got {seconds}")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from ``512KB`` / ``64MB`` / ``1GB`` (binary multiples) or a number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size like '512KB', '64MB', '1GB'")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        m = _NUMBER_UNIT.match(value)
        unit = (m.group(2).lower() or "b") if m else ""
        if not m or unit not in _SIZE_UNITS:
            raise ValueError(
                f"{value!r} is not a size; use a number with one of B, KB, MB, GB (e.g. '64MB')"
            )
        size = int(float(m.group(1)) * _SIZE_UNITS[unit])
    else:
        raise ValueError("expected a size like '512KB', '64MB', '1GB'")
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


def check_finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")
    return value


def check_scale(value: float) -> float:
    check_finite(value)
    if value == 0:
        raise ValueError("must not be 0 (value = raw * scale + offset)")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
#: the linear conversion of drivers: value = raw * scale + offset
Scale = Annotated[float, AfterValidator(check_scale)]
Offset = Annotated[float, AfterValidator(check_finite)]


# -- physical units of readings -------------------------------------------------------
# A reading's unit as a device states it ("F", "°F", "degF") -> (quantity, factor, offset)
# with value_in_base = value * factor + offset; base units: K, Pa, m, m/s, J, W, V, A, Hz,
# m3, s. Exact spellings (case matters: "mV" is not "MV"); a unit missing here cannot be
# converted, and a reading in it is refused rather than stored under the wrong unit.
_PHYSICAL: dict[str, tuple[str, float, float]] = {}


def _units(quantity: str, factor: float, offset: float, *names: str) -> None:
    for name in names:
        _PHYSICAL[name] = (quantity, factor, offset)


_units("temperature", 1.0, 273.15, "°C", "degC", "C", "℃", "Celsius", "celsius")
_units("temperature", 5 / 9, 273.15 - 32 * 5 / 9, "°F", "degF", "F", "℉", "Fahrenheit",
       "fahrenheit")  # fmt: skip
_units("temperature", 1.0, 0.0, "K", "kelvin", "Kelvin")
_units("pressure", 1.0, 0.0, "Pa")
_units("pressure", 100.0, 0.0, "hPa", "mbar")
_units("pressure", 1000.0, 0.0, "kPa")
_units("pressure", 1e5, 0.0, "bar")
_units("pressure", 133.322387415, 0.0, "mmHg")
_units("pressure", 3386.389, 0.0, "inHg")
_units("pressure", 6894.757293168, 0.0, "psi")
_units("length", 1e-3, 0.0, "mm")
_units("length", 1e-2, 0.0, "cm")
_units("length", 1.0, 0.0, "m")
_units("length", 1e3, 0.0, "km")
_units("length", 0.0254, 0.0, "in")
_units("length", 0.3048, 0.0, "ft")
_units("length", 1609.344, 0.0, "mi")
_units("speed", 1.0, 0.0, "m/s")
_units("speed", 1 / 3.6, 0.0, "km/h", "kmh")
_units("speed", 0.44704, 0.0, "mph")
_units("speed", 1852 / 3600, 0.0, "kn", "kt", "kts")
_units("speed", 0.3048, 0.0, "ft/s")
_units("speed", 0.9144, 0.0, "yd/s")
_units("energy", 1.0, 0.0, "J")
_units("energy", 3600.0, 0.0, "Wh")
_units("energy", 3.6e6, 0.0, "kWh")
_units("energy", 3.6e9, 0.0, "MWh")
_units("power", 1e-3, 0.0, "mW")
_units("power", 1.0, 0.0, "W")
_units("power", 1e3, 0.0, "kW")
_units("power", 1e6, 0.0, "MW")
_units("voltage", 1e-3, 0.0, "mV")
_units("voltage", 1.0, 0.0, "V")
_units("voltage", 1e3, 0.0, "kV")
_units("current", 1e-3, 0.0, "mA")
_units("current", 1.0, 0.0, "A")
_units("frequency", 1.0, 0.0, "Hz")
_units("frequency", 1e3, 0.0, "kHz")
_units("volume", 1e-3, 0.0, "L", "l")
_units("volume", 1.0, 0.0, "m3", "m³")
_units("time", 1e-3, 0.0, "ms")
_units("time", 1.0, 0.0, "s")
_units("time", 60.0, 0.0, "min")
_units("time", 3600.0, 0.0, "h")


def physical_unit(name: str) -> tuple[str, float, float] | None:
    """(quantity, factor, offset) of a unit `convert` knows, else None."""
    return _PHYSICAL.get(name.strip())


def convert(value: float, from_unit: str, to_unit: str) -> float:
    """`value` in `from_unit` expressed in `to_unit`; ValueError naming both if either is
    unknown or they measure different quantities (°F -> °C yes, °F -> hPa no)."""
    a = physical_unit(from_unit)
    b = physical_unit(to_unit)
    if a is None or b is None:
        unknown = from_unit if a is None else to_unit
        raise ValueError(f"unknown unit {unknown!r}")
    if a[0] != b[0]:
        raise ValueError(f"{from_unit!r} ({a[0]}) cannot be converted to {to_unit!r} ({b[0]})")
    if from_unit.strip() == to_unit.strip() or a[1:] == b[1:]:
        return value
    return (value * a[1] + a[2] - b[2]) / b[1]
