"""Engineering values from a device's raw numbers: ``raw * scale + offset``, computed so
that a decimal scale gives the decimal the device means (the Modbus and MQTT drivers)."""

from __future__ import annotations

from collections.abc import Callable

#: decimal scales (0.1 ... 1e-9) -> their power of ten
_DECIMAL_SCALES = {float(f"1e-{k}"): 10**k for k in range(1, 10)}


def engineering(scale: float, offset: float, integer: bool) -> Callable[[int | float], float]:
    """The function `raw -> raw * scale + offset` of a point. For an integer raw value
    and a decimal scale it divides instead: 2301 × 0.1 is 230.10000000000002 in binary
    floating point, 2301 / 10 is 230.1, the decimal the device means (and the one the
    codec stores in a few bits; 230.10000000000002 costs it 40). An offset that is not
    a whole number of the scale's steps keeps the product."""
    power = _DECIMAL_SCALES.get(scale) if integer else None
    steps = offset * power if power is not None else 0.5
    # whole steps only, and within the doubles' exact integers (an offset of -1e308
    # would make them infinite)
    if power is not None and abs(steps) < 2**53 and steps == int(steps):
        shift, divisor = int(steps), power
        return lambda raw: (int(raw) + shift) / divisor
    if scale == 1.0 and offset == 0.0:
        return float
    return lambda raw: float(raw * scale + offset)
