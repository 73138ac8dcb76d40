"""`citygw modbus …`: the technician's Modbus tools on site.

- `plan -c FILE`: the requests each device's poll groups make (merged reads).
- `read`: one read from a device, raw and decoded, no config needed; a "not available"
  marker (--invalid, by default the datatype's common ones) is shown as such.
- `write -c FILE --point dev/point --value V`: one verified write through the driver
  (writable points only, within their declared range).
- `scan`: which unit ids answer and exactly which address ranges are readable (the
  search is drivers/modbus/scan.py); optionally writes a starting config.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer
from pydantic import ValidationError
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from agent.runtime import device_specs
from cli.config import ConfigOption, load_or_exit
from common.cli import err_console, fail, out_console
from drivers.base import DeviceSpec, PointSpec
from drivers.modbus.planner import Request
from drivers.modbus.settings import DataType, ModbusDeviceSettings, ModbusPointSettings, Order
from drivers.modbus.settings import Table as ModbusTable

if TYPE_CHECKING:
    from drivers.modbus.scan import ScanResult
    from drivers.modbus.settings import AddressBase

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
def plan(
    config: ConfigOption = Path("gateway.toml"),
    probe: Annotated[
        bool,
        typer.Option(
            help="Poll each device once now and show what it refused: the splits and "
            "dropped optional points the driver learns at run time (the agent learns the "
            "same on its first poll). It talks to the devices: on a serial line, stop the "
            "agent first."
        ),
    ] = False,
) -> None:
    """Print each Modbus device's requests per poll group, merged as the driver reads."""
    from drivers.modbus.driver import device_plans
    from drivers.modbus.planner import describe

    cfg = load_or_exit(config)
    ids = {f"{d.name}/{p.name}": i for i, (d, p) in enumerate(
        (d, p) for d in cfg.devices for p in d.points)}  # fmt: skip
    devices = device_specs(cfg, ids).get("modbus", [])
    if not devices:
        fail(f"{config}: no enabled device with driver = 'modbus'")
    learned: dict[str, list[tuple[str, list[Request]]]] = {}
    notes: dict[str, list[str]] = {}
    if probe:
        learned, notes = _probe(devices)
    out = out_console()
    total = naive = after = 0
    for device in devices:
        s = device.settings
        assert isinstance(s, ModbusDeviceSettings)
        periods = {"": device.poll_s, **s.poll_groups}
        out.print(Text(f"{device.name} (unit {s.unit_id})", style="bold"))
        working = dict(learned.get(device.name, []))
        for group, requests in device_plans([device])[device.name]:
            members = _group_points(device, group)
            points = sum(len(r.spans) for r in requests)
            out.print(Text(
                f"  group {group or 'poll'} every {periods[group]:g} s: "
                f"{len(requests)} requests for {points} points"))  # fmt: skip
            for r, line in zip(requests, describe(requests), strict=True):
                out.print(Text(f"    {_written(r, members, line)}"))
            total += len(requests)
            naive += points
            if group in working:
                now = working[group]
                after += len(now)
                for line in _learned(requests, now):
                    out.print(Text(f"    {line}"))
        for line in notes.get(device.name, []):
            out.print(Text(f"  {line}"))
    out.print(Text(f"{total} requests per cycle in all ({naive} if each point were read alone)"))
    if probe:
        failed = sum(line.startswith("probe failed") for lines in notes.values() for line in lines)
        untried = f" ({failed} poll groups could not be probed: as planned)" if failed else ""
        out.print(Text(f"{after} requests per cycle after the probe{untried}"))


def _group_points(device: DeviceSpec, group: str) -> list[PointSpec]:
    """The points of a poll group, in the order its requests' span keys count them."""
    from drivers.modbus.driver import device_groups

    return next((pts for g, _period, pts in device_groups(device) if g == group), [])


def _written(request: Request, points: Sequence[PointSpec], line: str) -> str:
    """A request's line with the addresses as the points' sources write them, when they
    do not write protocol addresses: ``input_register 30001..30072 (PDU 0..71, ...)``."""
    from drivers.modbus.settings import written_number

    settings = [cast(ModbusPointSettings, points[s.key].settings) for s in request.spans]
    bases = {p.address_base for p in settings}
    if len(bases) != 1 or 0 in bases:
        return line
    (base,) = bases
    six = any(p.six_digits for p in settings)
    first = written_number(request.table, request.address, base, six)
    last = written_number(request.table, request.end - 1, base, six)
    head = f"{request.table} {request.address}..{request.end - 1} ("
    pdu = f"PDU {request.address}..{request.end - 1}, "
    return line.replace(head, f"{request.table} {first}..{last} ({pdu}", 1)


def _learned(planned: list[Request], now: list[Request]) -> list[str]:
    """What a probe changed in a group's plan: requests split after a refusal, with the
    parts they became."""
    lines = []
    kept = set(now)
    for r in planned:
        if r in kept:
            continue
        keys = {s.key for s in r.spans}
        parts = [p for p in now if {s.key for s in p.spans} <= keys]
        where = ", ".join(f"{p.address}..{p.end - 1}" for p in parts) or "nothing (all dropped)"
        lines.append(f"learned: {r.table} {r.address}..{r.end - 1} was refused; split into {where}")
    return lines


def _probe(
    devices: Sequence[DeviceSpec],
) -> tuple[dict[str, list[tuple[str, list[Request]]]], dict[str, list[str]]]:
    """Polls each device once through the driver: its working plans afterwards and what
    to say about it (refused requests, dropped optional points, failed polls)."""
    from drivers.modbus.driver import ModbusDriver

    async def go() -> tuple[dict[str, list[tuple[str, list[Request]]]], dict[str, list[str]]]:
        driver = ModbusDriver(devices)
        plans: dict[str, list[tuple[str, list[Request]]]] = {}
        notes: dict[str, list[str]] = {}
        try:
            for d in devices:
                errors = await driver.poll_once(d.name)
                plans[d.name] = driver.working_plans(d.name)
                lines = [f"probe failed: {e}" for e in errors]
                for group, r, _n in driver.refused(d.name):
                    members = _group_points(d, group)
                    names = ", ".join(members[s.key].name for s in r.spans)
                    lines.append(
                        f"refused: {r.table} {r.address}..{r.end - 1} (group "
                        f"{group or 'poll'}): {names} read BAD, retried with backoff"
                    )
                dropped = driver.dropped_points(d.name)
                if dropped:
                    lines.append(
                        f"dropped {len(dropped)} optional point(s) the device refuses: "
                        + ", ".join(dropped)
                    )
                notes[d.name] = lines
        finally:
            driver.close()
        return plans, notes

    return asyncio.run(go())


@app.command()
def read(
    table: Annotated[ModbusTable, typer.Option(help="Register table.")],
    address: Annotated[
        int,
        typer.Option(help="The address, as written in the --address-base convention.", min=0),
    ],
    unit: Annotated[int, typer.Option(help="Unit id.", min=0, max=255)] = 1,
    address_base: Annotated[
        str,
        typer.Option(
            help="How --address is written, as a point's address_base: 0 = the protocol "
            "(PDU) address, 1 = a register number counted from 1, modicon = a "
            "30001/40001-style number."
        ),
    ] = "0",
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
    from drivers.modbus.settings import pdu_address

    base: AddressBase
    if address_base in ("0", "1"):
        base = int(address_base)  # type: ignore[assignment]
    elif address_base == "modicon":
        base = "modicon"
    else:
        fail(f"--address-base {address_base!r}: use 0, 1 or modicon")
    try:
        pdu = pdu_address(address, base, table)[1]
    except ValueError as exc:
        fail(f"--address {exc}")
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
            return await conn.read(table, pdu, n, unit)
        finally:
            conn.close()

    try:
        values = asyncio.run(go())
    except ModbusError as exc:
        fail(str(exc))
    out = out_console()
    span = f"{address}..{address + n - 1}"
    if base != 0:
        span += f" (PDU {pdu}..{pdu + n - 1})"
    out.print(Text(f"{table} {span} unit {unit}: {list(values)}"))
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
    block: Annotated[
        int,
        typer.Option(
            help="Registers/bits of the first read at each step. A refused read is "
            "bisected down to single registers (and even-aligned pairs), so ranges "
            "smaller than the block are found with exact edges; the block only sets "
            "how many requests that takes.",
            min=1,
            max=125,
        ),
    ] = 10,
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
    """Which unit ids answer, and exactly which address ranges they let you read."""
    from drivers.modbus.client import (
        EXCEPTION_NAMES,
        ModbusConnection,
        ModbusExceptionResponse,
        ModbusLinkError,
        ModbusTimeout,
        probe,
    )
    from drivers.modbus.datatypes import BIT_TABLES
    from drivers.modbus.scan import MapScan, Outcome, merge, outcome_of_exception

    link = _link(transport, host, port, serial_port, baudrate, parity, timeout)
    unit_ids = _range(units, "units", 0, 255)
    span = _range(addresses, "addresses", 0, 65535)
    registers = table not in BIT_TABLES
    #: unit -> what its scan found, and the exception code of its last answer (None: none)
    results: dict[int, tuple[ScanResult, int | None]] = {}

    async def go(progress: Progress) -> None:
        conn = ModbusConnection.for_device(link)
        task = progress.add_task("scanning", total=None)
        try:
            for unit in unit_ids:
                search = MapScan(span.start, span.stop, block, registers=registers)
                code: int | None = None
                while (p := search.next_probe()) is not None:
                    progress.update(task, description=f"unit {unit} @ {p.address}+{p.count}")
                    outcome: Outcome
                    try:
                        got = await probe(conn, unit, table, p.address, p.count)
                    except ModbusTimeout:
                        outcome, code = "silent", None
                    else:
                        if isinstance(got, ModbusExceptionResponse):
                            code = got.exception_code
                            outcome = outcome_of_exception(code)
                        else:
                            outcome = "read"
                    search.feed(p, outcome)
                results[unit] = (search.result, code)
        except ModbusLinkError as exc:
            fail(str(exc))
        finally:
            conn.close()

    with Progress(console=err_console(), transient=True) as progress:
        asyncio.run(go(progress))
    found = {unit: r for unit, (r, _) in results.items() if r.present}
    absent = {unit: code for unit, (r, code) in results.items() if not r.present}
    what = "registers" if registers else "bits"
    result = Table(title=f"{table} {span.start}-{span.stop - 1} on {_where(link)}")
    result.add_column("unit")
    result.add_column("readable ranges (end exclusive)")
    for unit, r in found.items():
        text = ", ".join(f"{a}-{b}" for a, b in r.readable) or "answers, nothing readable here"
        result.add_row(str(unit), text)
    out = out_console()
    out.print(result if found else Text("no unit answered"))
    for unit, r in found.items():
        if r.unanswered:
            ranges = ", ".join(f"{a}-{b}" for a, b in r.unanswered)
            out.print(Text(f"unit {unit}: no answer for {ranges}: not known whether readable"))
        if r.even_only:
            rules = [
                *(["start on an even address"] if r.even_start else []),
                *(["cover an even number of registers"] if r.even_count else []),
            ] or ["read whole even-aligned register pairs"]
            out.print(Text(
                f"unit {unit}: reads must {' and '.join(rules)} (whole 32-bit values): "
                "set even_address_only = true for it"))  # fmt: skip
    for code in sorted({c for c in absent.values()}, key=lambda c: -1 if c is None else c):
        ids = ", ".join(
            f"{a}-{b - 1}" if b - a > 1 else f"{a}"
            for a, b in merge([(u, u + 1) for u, c in absent.items() if c == code])
        )
        why = (
            f"no answer within {timeout:g} s"
            if code is None
            else f"no such unit: the gateway answered exception {code} "
            f"({EXCEPTION_NAMES.get(code, 'unknown')})"
        )
        out.print(Text(f"unit{'s' if ',' in ids or '-' in ids else ''} {ids}: {why}"))
    requests = sum(r.requests for r, _ in results.values())
    out.print(Text(
        f"{requests} requests. Probed {block} {what} at a time (--block); a refused read "
        f"was bisected down to single {what}"
        + (" and even-aligned pairs" if registers else "")
        + ", so the edges above are exact where the unit answered."))  # fmt: skip
    if write_config is not None and found:
        write_config.write_text(_starting_config(link, table, found), encoding="utf-8")
        out.print(Text(f"wrote {write_config}: check names, types and units, then validate it"))


def _where(link: ModbusDeviceSettings) -> str:
    if link.transport == "rtu":
        return f"{link.serial_port} at {link.baudrate} baud"
    return f"{link.host}:{link.port} ({link.transport})"


def _starting_config(link: ModbusDeviceSettings, table: str, found: dict[int, ScanResult]) -> str:
    """A config to start from: one device per unit that answered, one uint16 (or bool)
    point per readable address — one uint32 per even-aligned pair on a unit that reads
    only whole pairs — at most 50 per device."""
    lines = [
        "# Written by `citygw modbus scan`: every readable address as a raw uint16 (or bool;",
        "# uint32 pairs where the unit reads only whole pairs).",
        "# Replace names, datatypes, scale and units from the device's register map.",
        '[gateway]\nid = "gw-CHANGE-ME"\n',
        '[uplink]\nbroker = "mqtts://platform.example.city:8883"\n',
    ]
    conn = (
        f'serial_port = "{link.serial_port}"\nbaudrate = {link.baudrate}\nparity = "{link.parity}"'
        if link.transport == "rtu"
        else f'host = "{link.host}"\nport = {link.port}'
    )
    from drivers.modbus.datatypes import BIT_TABLES

    bits = table in BIT_TABLES
    for unit, result in found.items():
        pairs = result.even_only and not bits
        lines.append(
            f'[[devices]]\nname = "unit-{unit}"\ndriver = "modbus"\n'
            f'transport = "{link.transport}"\n{conn}\nunit_id = {unit}\npoll = "10s"\n'
            + ("even_address_only = true\n" if pairs else "")
        )
        step = 2 if pairs else 1
        datatype = "bool" if bits else "uint32" if pairs else "uint16"
        addresses = [
            a for lo, hi in result.readable for a in range(lo + lo % step, hi - step + 1, step)
        ][:50]
        for a in addresses:
            lines.append(
                f'  [[devices.points]]\n  name = "{table[:2]}_{a}"\n  table = "{table}"\n'
                f'  address = {a}\n  datatype = "{datatype}"\n'
            )
    return "\n".join(lines)
