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
