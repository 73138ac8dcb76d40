"""`citygw mqtt …`: the technician's MQTT tools on site.

- `sniff`: the messages on a site broker as they arrive (time, topic, payload) and,
  with a config, what each becomes ("→ street-7/pm25 = 12.3") or why it becomes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.text import Text

from agent.cli_common import EXIT_NO_FILE, fail, load_or_exit, out_console

app = typer.Typer(help="MQTT tools: sniff a site broker.", no_args_is_help=True)

PREVIEW = 80


def preview(payload: bytes) -> str:
    """Printable text as is (shortened), anything else as hex."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.isprintable():
        return text if len(text) <= PREVIEW else text[: PREVIEW - 1] + "…"
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        flat = text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
        return flat if len(flat) <= PREVIEW else flat[: PREVIEW - 1] + "…"
    shown = payload[:32].hex(" ")
    return f"hex {shown}{' …' if len(payload) > 32 else ''} ({len(payload)} bytes)"


@app.command()
def sniff(
    broker: Annotated[
        str | None,
        typer.Option(help="mqtt://host:port or mqtts://host:port (default: the config's)."),
    ] = None,
    topic: Annotated[
        list[str] | None, typer.Option("--topic", "-t", help="Topic filter; repeatable.")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="Show how each message maps to its points.", dir_okay=False
        ),
    ] = None,
    count: Annotated[int | None, typer.Option(help="Stop after N messages.", min=1)] = None,
    seconds: Annotated[float | None, typer.Option(help="Stop after S seconds.", min=0.1)] = None,
    username: Annotated[str | None, typer.Option(help="Broker user name.")] = None,
    password: Annotated[
        str | None, typer.Option(help="Broker password.", envvar="CITYGW_MQTT_PASSWORD")
    ] = None,
    ca_file: Annotated[Path | None, typer.Option(help="CA certificate (mqtts).")] = None,
) -> None:
    """Show messages as they arrive; with -c, how each maps to the config's points."""
    import aiomqtt

    from agent.runtime import device_specs
    from drivers.mqtt.driver import Router, client_for, payload_bytes, routes_of
    from drivers.mqtt.settings import MqttDeviceSettings
    from native.batch import GOOD, QUALITY_NAMES

    router: Router | None = None
    link: MqttDeviceSettings | None = None
    if config is not None:
        cfg = load_or_exit(config)
        ids = {f"{d.name}/{p.name}": i for i, (d, p) in enumerate(
            (d, p) for d in cfg.devices for p in d.points)}  # fmt: skip
        devices = device_specs(cfg, ids).get("mqtt", [])
        if not devices:
            fail(f"{config}: no enabled device with driver = 'mqtt'")
        router = Router(routes_of(devices))
        if broker is None:
            first = devices[0].settings
            assert isinstance(first, MqttDeviceSettings)
            link = first.model_copy(update={"client_id": ""})
    if link is None:
        if broker is None:
            fail("give --broker mqtt://host:port (or -c with a config that has mqtt devices)")
        fields: dict[str, object] = {"broker": broker, "username": username}
        if password is not None:
            fields["password"] = password
        if ca_file is not None:
            fields["ca_file"] = ca_file
        try:
            link = MqttDeviceSettings.model_validate(fields)
        except ValidationError as exc:
            fail("; ".join(e["msg"] for e in exc.errors()))
    filters = topic or ["#"]
    out = out_console()
    where = f"{link.address.host}:{link.address.port}"

    async def go() -> int:
        seen = 0
        client = client_for(link, f"citygw-sniff-{secrets.token_hex(4)}")
        async with client:
            for f in filters:
                await client.subscribe(f, 0)
            out.print(Text(f"listening on {where} to {', '.join(filters)}", style="dim"))
            async for message in client.messages:
                payload = payload_bytes(message)
                name = message.topic.value
                stamp = time.strftime("%H:%M:%S") + f".{time.time_ns() // 1_000_000 % 1000:03d}"
                out.print(Text(f"{stamp} {name} {preview(payload)}"))
                if router is not None:
                    outcomes = router.route(name, payload)
                    if not outcomes:
                        out.print(Text("  → no point's topic matches", style="yellow"))
                    for o in outcomes:
                        key = o.route.point.key
                        if o.absent:
                            out.print(Text(f"  → {key}: not in this message", style="dim"))
                        elif o.ok:
                            line = f"  → {key} = {o.value:g}"
                            if o.quality != GOOD:
                                line += f" ({QUALITY_NAMES[o.quality]}"
                                line += f", {o.note})" if o.note else ")"
                            if o.timestamp_ms is not None:
                                iso = time.strftime(
                                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime(o.timestamp_ms / 1000)
                                )
                                line += f" at {iso}"
                            out.print(Text(line, style="green"))
                        else:
                            why = f"{o.reason}: {o.detail}" if o.detail else o.reason
                            out.print(Text(f"  → matches {key} but: {why}", style="red"))
                seen += 1
                if count is not None and seen >= count:
                    break
        return seen

    async def bounded() -> int:
        if seconds is None:
            return await go()
        task = asyncio.ensure_future(go())
        done, _ = await asyncio.wait({task}, timeout=seconds)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return -1

    try:
        seen = asyncio.run(bounded())
    except aiomqtt.MqttError as exc:
        fail(f"broker {where}: {exc}", EXIT_NO_FILE)
    except KeyboardInterrupt:
        seen = -1
    if seen == -1:
        out.print(Text("stopped", style="dim"))
    else:
        out.print(Text(f"{seen} message{'s' if seen != 1 else ''}", style="dim"))
