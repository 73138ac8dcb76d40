"""`citygw ble …`: the technician's Bluetooth LE tools on site.

- `scan`: which devices advertise nearby, what format they speak and what they
  measure (a live table); optionally writes a starting config for them. `--replay FILE`
  replays a recording instead of using the radio.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer
from rich.live import Live
from rich.table import Table
from rich.text import Text

from common.cli import EXIT_NO_FILE, err_console, fail, out_console

app = typer.Typer(help="Bluetooth LE tools: scan.", no_args_is_help=True)


@dataclass(slots=True)
class Heard:
    """What the scan learned about one address."""

    address: str
    name: str | None = None
    rssi: int | None = None
    format: str = ""
    encrypted: bool = False
    error: str = ""
    adverts: int = 0
    values: dict[str, tuple[float, str]] = field(default_factory=dict)


def _table(heard: dict[str, Heard], title: str) -> Table:
    table = Table(title=title)
    for col in ("address", "name", "rssi", "format", "values", "adverts"):
        table.add_column(col, justify="right" if col in ("rssi", "adverts") else "left")
    for h in sorted(heard.values(), key=lambda h: -(h.rssi if h.rssi is not None else -999)):
        values = ", ".join(f"{k}={v:g}{(' ' + u) if u else ''}" for k, (v, u) in h.values.items())
        if h.error:
            values = (values + "; " if values else "") + f"error: {h.error}"
        fmt = h.format + (" (encrypted)" if h.encrypted else "")
        table.add_row(
            h.address,
            h.name or "",
            "" if h.rssi is None else str(h.rssi),
            fmt,
            values,
            str(h.adverts),
        )
    return table


@app.command()
def scan(
    seconds: Annotated[float, typer.Option(help="How long to listen.", min=0.1)] = 10.0,
    replay: Annotated[
        Path | None, typer.Option(help="Replay a JSONL recording instead of the radio.")
    ] = None,
    speed: Annotated[float, typer.Option(help="Replay speed (with --replay).", min=0.01)] = 1.0,
    active: Annotated[bool, typer.Option("--active", help="Active scanning.")] = False,
    adapter: Annotated[str | None, typer.Option(help="Bluetooth adapter, e.g. hci0.")] = None,
    address: Annotated[
        list[str] | None, typer.Option(help="Only these devices in --write-config (repeatable).")
    ] = None,
    write_config: Annotated[
        Path | None, typer.Option(help="Write a starting config for the devices heard.")
    ] = None,
) -> None:
    """Devices advertising nearby: address, name, RSSI, format, decoded values."""
    from drivers.ble.decoders import DecodeError, Decoders
    from drivers.ble.settings import normalize_address
    from drivers.ble.source import AdvertSource, BleakSource, ReplaySource, load_recording

    chosen: set[str] | None = None
    if address:
        try:
            chosen = {normalize_address(a) for a in address}
        except ValueError as exc:
            fail(str(exc))
    source: AdvertSource
    if replay is not None:
        try:
            load_recording(replay)
        except OSError as exc:
            fail(f"{replay}: cannot read: {exc.strerror or exc}", EXIT_NO_FILE)
        except ValueError as exc:
            fail(str(exc))
        source = ReplaySource(replay, speed=speed, loop=True)
        where = str(replay)
    else:
        source = BleakSource("active" if active else "passive", adapter)
        where = adapter or "default adapter"
    decoders = Decoders()
    heard: dict[str, Heard] = {}
    title = f"BLE devices heard on {where}"

    async def listen(live: Live) -> None:
        last_draw = 0.0
        async for adv in source.adverts():
            h = heard.setdefault(adv.address, Heard(adv.address))
            h.adverts += 1
            h.name = adv.name or h.name
            h.rssi = adv.rssi if adv.rssi is not None else h.rssi
            try:
                decoded = decoders.decode(adv)
            except DecodeError as exc:
                h.error = str(getattr(exc, "reason", "") or exc)
                h.format = str(getattr(exc, "format", "") or h.format)
            else:
                if decoded is not None:
                    h.error = ""
                    h.format = decoded.format
                    h.encrypted = decoded.encrypted
                    for m in decoded.measurements:
                        h.values[m.name] = (m.value, m.unit)
            if time.monotonic() - last_draw > 0.25:
                live.update(_table(heard, title))
                last_draw = time.monotonic()

    async def go(live: Live) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(listen(live), seconds)

    with Live(_table(heard, title), console=err_console(), transient=True) as live:
        try:
            asyncio.run(go(live))
        except Exception as exc:  # the adapter: missing, powered off, no permission
            fail(f"bluetooth adapter: {type(exc).__name__}: {exc}")
    out = out_console()
    out.print(_table(heard, title) if heard else Text("no device heard"))
    if write_config is not None:
        picked = [h for h in heard.values() if chosen is None or h.address in chosen]
        if not picked:
            fail("no device to write a config for (none heard, or none of --address)")
        write_config.write_text(starting_config(picked, replay), encoding="utf-8")
        out.print(Text(f"wrote {write_config}: check names and units, then validate it"))


def _device_name(h: Heard) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", h.name or "").strip("-")[:40]
    suffix = h.address.replace(":", "")[-6:].lower()
    return f"{base}-{suffix}" if base else f"ble-{suffix}"


def starting_config(devices: list[Heard], replay: Path | None = None) -> str:
    """A config to start from: one ble device per address, one point per measurement
    it was heard with, plus its RSSI."""
    lines = [
        "# Written by `citygw ble scan`: one device per address heard, its measurements as points.",
        "# Rename devices and points, then check it with `citygw validate`.",
        '[gateway]\nid = "gw-CHANGE-ME"\n',
        '[uplink]\nbroker = "mqtts://platform.example.city:8883"\n',
    ]
    for h in devices:
        dev = [
            f'[[devices]]\nname = "{_device_name(h)}"\ndriver = "ble"\naddress = "{h.address}"',
            'poll = "60s"\nstale_after = "10m"',
        ]
        if replay is not None:
            dev.append(f'source = "replay"\nreplay_file = "{replay.resolve()}"')
        if h.format:
            dev.append(f'format = "{h.format}"')
        if h.encrypted or "key" in h.error:
            dev.append('bind_key = "00000000000000000000000000000000"  # CHANGE-ME: the device key')
        lines.append("\n".join(dev) + "\n")
        for name, (_value, unit) in h.values.items():
            point = f'  [[devices.points]]\n  name = "{name}"\n  measurement = "{name}"'
            if unit:
                point += f'\n  unit = "{unit}"'
            lines.append(point + "\n")
        lines.append(
            '  [[devices.points]]\n  name = "rssi"\n  measurement = "rssi"\n  unit = "dBm"\n'
        )
    return "\n".join(lines)
