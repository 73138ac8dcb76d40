"""One check per configured device, by driver: a Modbus unit answers a read of its first
point; a serial port (Modbus RTU, mcu) exists and the agent's user may read and write it; a
Bluetooth adapter is present (ble); the site broker takes a connection (mqtt); the
microcontroller answers HELLO (mcu); a simulated device always passes.

While the agent runs, it holds the devices' links (a serial port, a bus, a device that
takes one TCP connection): the doctor then reports what the agent last recorded for
each device instead of talking to it (ports and adapters are still checked: that opens
nothing). The devices are checked concurrently (one at a time per serial bus or Modbus
TCP gateway), each bounded by the timeout."""

from __future__ import annotations

import asyncio
import datetime
import getpass
import grp
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import Config, DeviceConfig
from agent.doctor.broker import BrokerTarget, probe_broker
from agent.doctor.check import Check, passed, skipped
from common.cli import age
from common.mqtt_url import BrokerAddress

#: a device that has not answered for this many of its poll periods (and 60 s) is a warn
STALE_POLLS = 10


@dataclass(frozen=True)
class DeviceEnv:
    """What the device checks need besides the config (the tests replace the system's)."""

    timeout: float
    now_ms: int
    #: the running agent's status snapshot ("devices": health by name); None: not running
    agent: dict[str, Any] | None = None
    sysfs: Path = Path("/sys")
    #: whether the agent's user may open a path (R_OK, W_OK), and that user's name
    access: Callable[[str, int], bool] = field(default=os.access)
    user: str = field(default_factory=getpass.getuser)


def serial_port_check(
    name: str, port: str, access: Callable[[str, int], bool], user: str
) -> Check | None:
    """A fail if the serial port is missing or `user` may not read and write it."""
    path = Path(port)
    if not path.exists():
        return Check(
            name,
            "fail",
            f"serial port {port} does not exist",
            "plug the adapter in and check its cable; `ls -l /dev/serial/by-id/` lists the "
            "ports: put that stable name in the config",
        )
    if not access(port, os.R_OK | os.W_OK):
        try:
            group = grp.getgrgid(path.stat().st_gid).gr_name
        except (KeyError, OSError):
            group = "dialout"
        return Check(
            name,
            "fail",
            f"serial port {port} is not readable and writable by user {user} (its group: {group})",
            f"add the agent's user to group {group}: usermod -aG {group} {user} (then "
            "restart the service)",
        )
    return None


def ble_adapter_check(name: str, adapter: str | None, sysfs: Path) -> Check | None:
    """A fail if the Bluetooth adapter (or, unnamed, any adapter) is absent."""
    root = sysfs / "class" / "bluetooth"
    present = sorted(p.name for p in root.glob("hci*")) if root.is_dir() else []
    if (adapter is None and present) or adapter in present:
        return None
    wanted = f"adapter {adapter}" if adapter else "Bluetooth adapter"
    return Check(
        name,
        "fail",
        f"no {wanted} ({', '.join(present) or 'none'} in {root})",
        "plug in or enable the adapter (rfkill unblock bluetooth; `hciconfig` or "
        "`bluetoothctl list` lists them); check `adapter` in the config",
    )


def health_check(name: str, health: dict[str, Any] | None, poll_s: float, now_ms: int) -> Check:
    """What the running agent last recorded for a device."""
    note = "as the running agent reports (the doctor leaves the agent's link alone)"
    if health is None:
        return Check(name, "warn", f"no record of it {note}", "see `citygw status`")
    last = health.get("last_success_ms")
    if health.get("consecutive_failures"):
        return Check(
            name,
            "fail",
            f"failing: {health.get('last_error')} ({health['consecutive_failures']} in a row, "
            f"last reading {age(last, now_ms)}), {note}",
            "the error names the link or the device; stop the agent and run the doctor "
            "again to test the device directly",
        )
    if health.get("online") is False:
        return Check(
            name,
            "warn",
            f"the device reports itself offline (its availability topic), {note}",
            "check the device itself",
        )
    if last is None:
        return Check(name, "warn", f"no reading yet, {note}", "wait a poll period, or see logs")
    if now_ms - last > max(60_000, STALE_POLLS * poll_s * 1000) and health.get("messages") is None:
        return Check(
            name,
            "warn",
            f"last reading {age(last, now_ms)}, {note}",
            "see the agent's log (journalctl -u citygw-agent)",
        )
    return passed(name, f"last reading {age(last, now_ms)}, {note}")


async def _modbus(name: str, d: DeviceConfig, timeout: float) -> Check:
    from drivers.modbus.client import (
        EXCEPTION_NAMES,
        ModbusConnection,
        ModbusExceptionResponse,
        ModbusLinkError,
        ModbusTimeout,
    )
    from drivers.modbus.settings import (
        BIT_TABLES,
        ModbusDeviceSettings,
        ModbusPointSettings,
        register_count,
    )

    s = d.settings
    assert isinstance(s, ModbusDeviceSettings)
    if not d.points:
        return skipped(name, "no points to read")
    point = d.points[0]
    p = point.settings
    assert isinstance(p, ModbusPointSettings)
    count = 1 if p.table in BIT_TABLES else register_count(p.datatype, p.length)
    conn = ModbusConnection.for_device(s)
    conn.timeout = min(s.timeout, timeout)
    what = f"{conn.label} unit {s.unit_id}"
    read = f"{point.name} ({p.table} {p.address})"
    try:
        values = await conn.read(p.table, p.address, count, s.unit_id)
    except ModbusExceptionResponse as exc:
        code = exc.exception_code
        said = f"exception {code} ({EXCEPTION_NAMES.get(code, 'unknown')})"
        if code in (10, 11):  # the gateway's: the unit is not on its bus
            return Check(
                name,
                "fail",
                f"{what}: no such unit — the gateway answered {said}",
                "check unit_id against the device's own address setting, and that the device "
                "is powered and wired to the gateway's RS-485 side",
            )
        return Check(
            name,
            "warn",
            f"{what} answers, but refused the read of {read}: {said}",
            "check the point's table and address (citygw modbus scan shows what it holds)",
        )
    except ModbusTimeout:
        return Check(
            name,
            "fail",
            f"{what}: no answer to a read of {read} within {conn.timeout:g} s",
            "check unit_id, the wiring (A/B, termination), baudrate and parity; on TCP, that "
            "the host is the device (or its gateway)",
        )
    except ModbusLinkError as exc:
        return Check(
            name,
            "fail",
            str(exc),
            "is the device (or its TCP gateway) on, and host/port right? a serial port: see "
            "its permissions",
        )
    finally:
        conn.close()
    return passed(name, f"{what} answered: {read} = {list(values)}")


async def _mcu(name: str, d: DeviceConfig, timeout: float) -> Check:
    from drivers.mcu.driver import McuDeviceSettings
    from firmware_bridge.bridge import BridgeError, McuBridge

    s = d.settings
    assert isinstance(s, McuDeviceSettings)
    try:
        async with McuBridge(s.port, s.baud, max_frame=s.max_frame) as bridge:
            caps = await bridge.wait_up(timeout)
    except TimeoutError:
        return Check(
            name,
            "fail",
            f"no answer to HELLO on {s.port} at {s.baud} baud within {timeout:g} s",
            "is the microcontroller powered and running citygw firmware? check the baud rate "
            "and the TX/RX wiring (crossed, common ground)",
        )
    except (BridgeError, OSError, ValueError) as exc:
        return Check(name, "fail", f"{s.port}: {exc}", "check the serial port and its cable")
    hw = f", hardware {caps.hardware_id}" if caps.hardware_id else ""
    return passed(
        name,
        f"HELLO answered on {s.port}: firmware {caps.firmware}{hw}, up "
        f"{caps.uptime_ms / 1000:.0f} s",
    )


async def _mqtt(name: str, d: DeviceConfig, index: int, env: DeviceEnv) -> Check:
    from drivers.mqtt.settings import MqttDeviceSettings

    s = d.settings
    assert isinstance(s, MqttDeviceSettings)
    target = BrokerTarget(
        name=name,
        section=f"devices[{index}]",
        address=BrokerAddress.parse(s.broker),
        username=s.username,
        password=s.password.get_secret_value() if s.password else None,
        ca_file=str(s.ca_file) if s.ca_file else None,
        cert_file=str(s.cert_file) if s.cert_file else None,
        key_file=str(s.key_file) if s.key_file else None,
        # an id of its own: the driver's session is not taken over
        client_id=f"citygw-doctor-{secrets.token_hex(4)}",
        v5=s.mqtt_version == "5",
    )
    now = datetime.datetime.fromtimestamp(env.now_ms / 1000, datetime.UTC)
    steps = await probe_broker(target, env.timeout, now)
    where = f"site broker {target.address.host}:{target.address.port}"
    bad = next((c for c in steps if c.status in ("fail", "warn")), None)
    if bad is not None:
        return Check(name, bad.status, f"{where}: {bad.message}", bad.fix)
    return passed(name, f"{where}: {steps[-1].message}")


async def _device(d: DeviceConfig, index: int, env: DeviceEnv) -> Check:
    name = f"device {d.name}"
    if not d.enabled:
        return skipped(name, "disabled in the config")
    from drivers.ble.settings import BleDeviceSettings
    from drivers.mcu.driver import McuDeviceSettings
    from drivers.modbus.settings import ModbusDeviceSettings

    s = d.settings
    running = env.agent is not None
    health = (env.agent or {}).get("devices", {}).get(d.name)
    if d.driver == "sim":
        return passed(name, "simulated device (no hardware to check)")
    if d.driver == "mqtt":
        return await _mqtt(name, d, index, env)
    if isinstance(s, BleDeviceSettings):
        if s.source == "replay":
            return passed(name, "replays a recording (no adapter needed)")
        absent = ble_adapter_check(name, s.adapter, env.sysfs)
        if absent is not None:
            return absent
        if running:
            return health_check(name, health, d.poll, env.now_ms)
        return passed(name, "Bluetooth adapter present (whether the device is heard shows "
                      "once the agent runs: citygw status)")  # fmt: skip
    if isinstance(s, McuDeviceSettings):
        port: str | None = s.port
    elif isinstance(s, ModbusDeviceSettings):
        port = s.serial_port if s.transport == "rtu" else None
    else:
        return skipped(name, f"no doctor check for driver {d.driver!r}")
    if (
        port is not None
        and (bad := serial_port_check(name, port, env.access, env.user)) is not None
    ):
        return bad
    if running:
        return health_check(name, health, d.poll, env.now_ms)
    if d.driver == "mcu":
        return await _mcu(name, d, env.timeout)
    return await _modbus(name, d, env.timeout)


def _link(d: DeviceConfig) -> str:
    """What a device's check talks over: devices on one serial bus or one Modbus TCP
    gateway are checked one after the other (two masters on a bus collide; many
    gateways take one connection), the rest each on its own."""
    from drivers.modbus.client import Endpoint
    from drivers.modbus.settings import ModbusDeviceSettings

    if d.driver == "modbus" and isinstance(d.settings, ModbusDeviceSettings):
        return Endpoint.of(d.settings).label
    return f"device {d.name}"


async def _bounded(
    d: DeviceConfig, index: int, env: DeviceEnv, links: dict[str, asyncio.Lock]
) -> Check:
    limit = env.timeout * 3 + 1
    async with links.setdefault(_link(d), asyncio.Lock()):
        try:
            async with asyncio.timeout(limit):
                return await _device(d, index, env)
        except TimeoutError:
            return Check(
                f"device {d.name}",
                "fail",
                f"no result within {limit:g} s",
                "the device or its link hangs: check it by hand",
            )


async def check_devices(cfg: Config, env: DeviceEnv) -> list[Check]:
    """One check per configured device, in config order (concurrently, but one at a time
    per link)."""
    links: dict[str, asyncio.Lock] = {}
    return list(
        await asyncio.gather(*(_bounded(d, i, env, links) for i, d in enumerate(cfg.devices)))
    )
