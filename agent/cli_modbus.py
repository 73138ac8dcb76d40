"""`citygw modbus …`: the technician's Modbus tools on site.

- `plan -c FILE`: the requests each device's poll groups make (merged reads).
- `read`: one read from a device, raw and decoded, no config needed; a "not available"
  marker (--invalid, by default the datatype's common ones) is shown as such.
- `write -c FILE --point dev/point --value V`: one verified write through the driver
  (writable points only, within their declared range).
- `scan`: which unit ids answer and which address ranges are readable; optionally
  writes a starting config.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from agent.cli_common import ConfigOption, err_console, fail, load_or_exit, out_console
from agent.runtime import device_specs
from drivers.modbus.settings import DataType, ModbusDeviceSettings, Order
from drivers.modbus.settings import Table as ModbusTable

app = typer.Typer(help="Modbus tools: plan, scan, read, write.", no_args_is_help=True)

TransportOption = Annotated[str, typer.Option(help="tcp, rtu or rtu-over-tcp.")]
HostOption = Annotated[str | None, typer.Option(help="Host (tcp, rtu-over-tcp).")]
PortOption = Annotated[int, typer.Option(help="TCP port.")]
SerialOption = Annotated[str | None, typer.Option(help="Serial port (rtu), e.g. /dev/ttyUSB0.")]
BaudOption = Annotated[int, typer.Option(help="Baud rate (rtu).")]
ParityOption = Annotated[str, typer.Option(help="Parity N, E or O (rtu).")]
TimeoutOption = Annotated[float, typer.Option(help="Seconds to wait for an answer.")]


def _link(
    transport: str,
    host: str | None,
    port: int,
    serial_port: str | None,
    baudrate: int,
    parity: str,
    timeout: float,
) -> ModbusDeviceSettings:
    """Connection settings from the command line, validated like a config's."""
    fields: dict[str, Any] = {"transport": transport, "timeout": timeout, "retries": 0}
    if transport == "rtu":
        fields |= {"serial_port": serial_port, "baudrate": baudrate, "parity": parity}
    else:
        fields |= {"host": host, "port": port}
    try:
        return ModbusDeviceSettings.model_validate(fields)
    except ValidationError as exc:
        fail("; ".join(e["msg"] for e in exc.errors()))


def _range(text: str, what: str, lo: int, hi: int) -> range:
    """`5` or `1-10` (inclusive) within [lo, hi]."""
    try:
        a, _, b = text.partition("-")
        first, last = int(a), int(b or a)
    except ValueError:
        fail(f"{what} {text!r}: give a number or a range like 1-10")
    if not lo <= first <= last <= hi:
        fail(f"{what} {text!r}: must be within {lo}-{hi}, first <= last")
    return range(first, last + 1)


@app.command()
def plan(config: ConfigOption = Path("gateway.toml")) -> None:
    """Print each Modbus device's requests per poll group, merged as the driver reads."""
    from drivers.modbus.driver import device_plans
    from drivers.modbus.planner import describe

    cfg = load_or_exit(config)
    ids = {f"{d.name}/{p.name}": i for i, (d, p) in enumerate(
        (d, p) for d in cfg.devices for p in d.points)}  # fmt: skip
    devices = device_specs(cfg, ids).get("modbus", [])
    if not devices:
        fail(f"{config}: no enabled device with driver = 'modbus'")
    out = out_console()
    total = naive = 0
    for device in devices:
        s = device.settings
        assert isinstance(s, ModbusDeviceSettings)
        periods = {"": device.poll_s, **s.poll_groups}
        out.print(Text(f"{device.name} (unit {s.unit_id})", style="bold"))
        for group, requests in device_plans([device])[device.name]:
            points = sum(len(r.spans) for r in requests)
            out.print(Text(
                f"  group {group or 'poll'} every {periods[group]:g} s: "
                f"{len(requests)} requests for {points} points"))  # fmt: skip
            for line in describe(requests):
                out.print(Text(f"    {line}"))
            total += len(requests)
            naive += points
    out.print(Text(f"{total} requests per cycle in all ({naive} if each point were read alone)"))


@app.command()
def read(
    table: Annotated[ModbusTable, typer.Option(help="Register table.")],
    address: Annotated[int, typer.Option(help="0-based address.", min=0, max=65535)],
    unit: Annotated[int, typer.Option(help="Unit id.", min=0, max=255)] = 1,
    count: Annotated[int | None, typer.Option(help="Registers/bits (default: the type's).")] = None,
    datatype: Annotated[DataType, typer.Option(help="How to decode.")] = "uint16",
    order: Annotated[Order, typer.Option(help="Byte/word order.")] = "ABCD",
    length: Annotated[int | None, typer.Option(help="Registers of a string.")] = None,
    bit: Annotated[
        int | None, typer.Option(help="Bit of the register (datatype bit).", min=0, max=15)
    ] = None,
    invalid: Annotated[
        list[str] | None,
        typer.Option(
            help='A raw value meaning "not available", e.g. 0x7FFFFFFF (repeat for more; '
            '"none" for none). Default: the common ones of the datatype (NaN for floats).'
        ),
    ] = None,
    transport: TransportOption = "tcp",
    host: HostOption = None,
    port: PortOption = 502,
    serial_port: SerialOption = None,
    baudrate: BaudOption = 9600,
    parity: ParityOption = "N",
    timeout: TimeoutOption = 1.0,
) -> None:
    """One read, printed raw and decoded (no config needed)."""
    from drivers.modbus.client import ModbusConnection, ModbusError
    from drivers.modbus.datatypes import BIT_TABLES, decode, register_count

    link = _link(transport, host, port, serial_port, baudrate, parity, timeout)
    if table in BIT_TABLES:
        datatype = "bool"
    absent, declared = _markers(datatype, invalid)
    try:
        n = count or (1 if table in BIT_TABLES else register_count(datatype, length))
    except ValueError as exc:  # a string without --length
        fail(f"{exc}: give --length (or --count)")
    limit = 2000 if table in BIT_TABLES else 125  # what one Modbus read may carry
    if not 1 <= n <= limit:
        fail(f"count {n}: one read of a {table} takes 1 to {limit}")

    async def go() -> list[int] | list[bool]:
        conn = ModbusConnection.for_device(link)
        try:
            return await conn.read(table, address, n, unit)
        finally:
            conn.close()

    try:
        values = asyncio.run(go())
    except ModbusError as exc:
        fail(str(exc))
    out = out_console()
    out.print(Text(f"{table} {address}..{address + n - 1} unit {unit}: {list(values)}"))
    if table not in BIT_TABLES:
        regs = [int(v) for v in values]
        out.print(Text(f"hex: {' '.join(f'{r:04X}' for r in regs)}"))
        try:
            raw = decode(regs, datatype, order, bit)
        except (ValueError, IndexError) as exc:
            err_console().print(Text(f"cannot decode as {datatype}: {exc}"))
            return
        out.print(Text(f"{datatype} {order}: {_shown(raw, datatype, absent, declared)}"))


def _markers(datatype: DataType, given: list[str] | None) -> tuple[frozenset[int | float], bool]:
    """The "not available" raw values `read` recognises, and whether they were given
    (--invalid) rather than the datatype's common ones."""
    from drivers.modbus.datatypes import COMMON_MARKERS, markers

    if not given:
        return markers(datatype, COMMON_MARKERS.get(datatype, ())), False
    numbers: list[int | float] = []
    for text in given:
        if text.lower() == "none":
            continue
        try:
            numbers.append(int(text, 0))
        except ValueError:
            try:
                numbers.append(float(text))
            except ValueError:
                fail(f"--invalid {text!r}: give a raw value such as 0x7FFFFFFF, -32768 or nan")
    try:
        return markers(datatype, numbers), True
    except ValueError as exc:
        fail(f"--invalid: {exc}")


def _shown(
    raw: int | float | str, datatype: DataType, absent: frozenset[int | float], declared: bool
) -> str:
    """The decoded raw value, or "not available (marker 0x7FFFFFFF)" for a marker."""
    from drivers.modbus.datatypes import marker_text

    if isinstance(raw, str | bool) or (raw == raw and raw not in absent):
        return repr(raw)
    said = f"not available (marker {marker_text(raw, datatype)})"
    if declared or raw != raw:
        return said
    return f"{said}: a common marker of {datatype}; if it is a real value, read with --invalid none"


@app.command()
def write(
    point: Annotated[str, typer.Option(help="The point as device/point.")],
    value: Annotated[float, typer.Option(help="Value in engineering units.")],
    config: ConfigOption = Path("gateway.toml"),
) -> None:
    """One write through the driver: refused unless the point is writable and the value
    within its declared range; verified by reading it back."""
    from drivers.modbus.driver import ModbusDriver, ModbusWriteError

    cfg = load_or_exit(config)
    device_name = point.partition("/")[0]
    ids = {f"{d.name}/{p.name}": i for i, (d, p) in enumerate(
        (d, p) for d in cfg.devices for p in d.points)}  # fmt: skip
    devices = [d for d in device_specs(cfg, ids).get("modbus", []) if d.name == device_name]
    if not devices:
        fail(f"{config}: no enabled Modbus device {device_name!r} (give --point device/point)")
    spec = next((p for p in devices[0].points if p.key == point), None)
    if spec is None:
        fail(f"{config}: device {device_name!r} has no point {point.partition('/')[2]!r}")

    async def go() -> float:
        driver = ModbusDriver(devices)
        try:
            return await driver.write(spec, value)
        finally:
            driver.close()

    try:
        written = asyncio.run(go())
    except ModbusWriteError as exc:
        fail(str(exc))
    # what the register holds, read back: `value` but for a float32's nearest value
    out_console().print(Text(f"wrote {written:.15g} to {point} (verified by reading back)"))


@app.command()
def scan(
    units: Annotated[str, typer.Option(help="Unit ids: 1-10 or 5.")] = "1-10",
    table: Annotated[ModbusTable, typer.Option(help="Table to probe.")] = "holding_register",
    addresses: Annotated[str, typer.Option(help="Address range: 0-199.")] = "0-99",
    block: Annotated[int, typer.Option(help="Registers/bits per probe.", min=1, max=125)] = 10,
    transport: TransportOption = "tcp",
    host: HostOption = None,
    port: PortOption = 502,
    serial_port: SerialOption = None,
    baudrate: BaudOption = 9600,
    parity: ParityOption = "N",
    timeout: TimeoutOption = 0.5,
    write_config: Annotated[
        Path | None, typer.Option(help="Write a starting config for what answered.")
    ] = None,
) -> None:
    """Which unit ids answer, and which address ranges they let you read."""
    from drivers.modbus.client import (
        ModbusConnection,
        ModbusExceptionResponse,
        ModbusLinkError,
        ModbusTimeout,
        probe,
    )

    link = _link(transport, host, port, serial_port, baudrate, parity, timeout)
    unit_ids = _range(units, "units", 0, 255)
    span = _range(addresses, "addresses", 0, 65535)
    starts = list(range(span.start, span.stop, block))

    async def go(progress: Progress) -> dict[int, list[tuple[int, int]]]:
        conn = ModbusConnection.for_device(link)
        found: dict[int, list[tuple[int, int]]] = {}
        task = progress.add_task("scanning", total=len(unit_ids) * len(starts))
        try:
            for unit in unit_ids:
                readable: list[tuple[int, int]] = []
                answered = False
                for start in starts:
                    n = min(block, span.stop - start)
                    progress.update(task, advance=1, description=f"unit {unit} @ {start}")
                    try:
                        got = await probe(conn, unit, table, start, n)
                    except ModbusTimeout:
                        if not answered:  # nobody home: skip the rest of this unit
                            progress.update(task, advance=len(starts) - 1 - starts.index(start))
                            break
                        continue
                    answered = True
                    if isinstance(got, ModbusExceptionResponse):
                        continue
                    if readable and readable[-1][1] == start:
                        readable[-1] = (readable[-1][0], start + n)
                    else:
                        readable.append((start, start + n))
                if answered:
                    found[unit] = readable
        except ModbusLinkError as exc:
            fail(str(exc))
        finally:
            conn.close()
        return found

    with Progress(console=err_console(), transient=True) as progress:
        found = asyncio.run(go(progress))
    result = Table(title=f"{table} {span.start}-{span.stop - 1} on {_where(link)}")
    result.add_column("unit")
    result.add_column("readable ranges (end exclusive)")
    for unit, ranges in found.items():
        text = ", ".join(f"{a}-{b}" for a, b in ranges) or "answers, nothing readable here"
        result.add_row(str(unit), text)
    out = out_console()
    out.print(result if found else Text("no unit answered"))
    if write_config is not None and found:
        write_config.write_text(_starting_config(link, table, found), encoding="utf-8")
        out.print(Text(f"wrote {write_config}: check names, types and units, then validate it"))


def _where(link: ModbusDeviceSettings) -> str:
    if link.transport == "rtu":
        return f"{link.serial_port} at {link.baudrate} baud"
    return f"{link.host}:{link.port} ({link.transport})"


def _starting_config(
    link: ModbusDeviceSettings, table: str, found: dict[int, list[tuple[int, int]]]
) -> str:
    """A config to start from: one device per unit that answered, one uint16 (or bool)
    point per readable address, at most 50 per device."""
    lines = [
        "# Written by `citygw modbus scan`: every readable address as a raw uint16 (or bool).",
        "# Replace names, datatypes, scale and units from the device's register map.",
        '[gateway]\nid = "gw-CHANGE-ME"\n',
        '[uplink]\nbroker = "mqtts://platform.example.city:8883"\n',
    ]
    conn = (
        f'serial_port = "{link.serial_port}"\nbaudrate = {link.baudrate}\nparity = "{link.parity}"'
        if link.transport == "rtu"
        else f'host = "{link.host}"\nport = {link.port}'
    )
    datatype = "bool" if table in ("coil", "discrete_input") else "uint16"
    for unit, ranges in found.items():
        lines.append(
            f'[[devices]]\nname = "unit-{unit}"\ndriver = "modbus"\n'
            f'transport = "{link.transport}"\n{conn}\nunit_id = {unit}\npoll = "10s"\n'
        )
        addresses = [a for lo, hi in ranges for a in range(lo, hi)][:50]
        for a in addresses:
            lines.append(
                f'  [[devices.points]]\n  name = "{table[:2]}_{a}"\n  table = "{table}"\n'
                f'  address = {a}\n  datatype = "{datatype}"\n'
            )
    return "\n".join(lines)
