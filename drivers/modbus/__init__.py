"""The ``modbus`` driver (Modbus TCP, RTU on a serial line, RTU over TCP).

- settings.py: config models; profiles.py, checks.py: register maps and cross-point checks
- datatypes.py, planner.py: decoding and request planning (sans-I/O)
- client.py: the pymodbus adapter (connections, errors, `probe` for scans)
- scan.py: the register-map search of `citygw modbus scan` (sans-I/O)
- driver.py: `ModbusDriver`, `device_plans`, `ModbusWriteError`
- simulator.py: `ModbusSimulator`, `RegisterImage` (demo, bench, tests)

Importing this package does not import pymodbus: the names below load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from drivers.modbus.settings import ModbusDeviceSettings, ModbusPointSettings

if TYPE_CHECKING:
    from drivers.modbus.driver import ModbusDriver, ModbusWriteError, device_plans

__all__ = [
    "ModbusDeviceSettings",
    "ModbusDriver",
    "ModbusPointSettings",
    "ModbusWriteError",
    "device_plans",
]


def __getattr__(name: str) -> Any:
    if name in ("ModbusDriver", "ModbusWriteError", "device_plans"):
        from drivers.modbus import driver

        return getattr(driver, name)
    raise AttributeError(f"module 'drivers.modbus' has no attribute {name!r}")
