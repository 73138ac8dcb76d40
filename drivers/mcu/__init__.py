"""The ``mcu`` driver: sensors behind the gateway's microcontroller on a serial link
(docs/firmware-protocol.md). `driver.py` holds `McuDriver` and its settings."""

from __future__ import annotations

from drivers.mcu.driver import McuDeviceSettings, McuDriver, McuPointSettings

__all__ = ["McuDeviceSettings", "McuDriver", "McuPointSettings"]
