"""`citygw mqtt …`: the technician's MQTT tools on site.

- `sniff`: the messages on a site broker as they arrive (time, topic, payload, whether
  retained) and, with a config, what each becomes ("→ street-7/pm25 = 12.3") or why it
  becomes nothing (the path missing, a retained copy not taken, a topic ignored). A
  message two overlapping filters both match is shown once.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.text import Text

from cli.config import load_or_exit
from common.cli import EXIT_NO_FILE, fail, out_console
from native.batch import GOOD, QUALITY_NAMES

if TYPE_CHECKING:
    from drivers.mqtt.driver import Outcome

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


def outcome_line(o: Outcome) -> Text:
    """ "→ street-7/pm25 = 12.3 at …", or why the message gives this point nothing."""
    key = o.route.point.key
    if o.absent:
        return Text(f"  → {key}: not in this message", style="dim")
    if not o.ok:
        why = f"{o.reason} ({o.detail})" if o.detail else str(o.reason)
        if o.reason == "missing_path":
            why = f"missing_path (no {o.detail} in it)"
        return Text(f"  → matches {key} but: {why}", style="red")
    text = f"  → {key} = {o.value:g}"
    if o.timestamp_ms is not None:
        text += " at " + time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(o.timestamp_ms / 1000))
    if o.quality != GOOD:
        text += f" ({QUALITY_NAMES[o.quality]}" + (f": {o.note})" if o.note else ")")
    return Text(text, style="green" if o.quality == GOOD else "yellow")


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
    from drivers.mqtt.driver import (
        Outcome,
        Router,
        client_for,
        payload_bytes,
        routes_of,
        subscribe_properties,
        subscription_ids,
    )
    from drivers.mqtt.payloads import PayloadError, parse
    from drivers.mqtt.settings import MqttDeviceSettings
    from drivers.mqtt.topics import TopicPattern, TopicPatternError

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

    try:
        patterns = [TopicPattern(f) for f in filters]
    except TopicPatternError as exc:
        fail(f"--topic: {exc}")
    v5 = link.mqtt_version == "5"

    def show(name: str, payload: bytes, retained: bool) -> None:
        stamp = time.strftime("%H:%M:%S") + f".{time.time_ns() // 1_000_000 % 1000:03d}"
        line = Text(f"{stamp} {name} {preview(payload)}")
        if retained:  # the broker's stored copy of an older publish, not news
            line.append("  (retained)", style="magenta")
        out.print(line)
        if router is None:
            return
        d = router.route(name, payload, retained)
        if d.unmatched:
            out.print(Text("  → no point's topic matches", style="yellow"))
        for o in d.outcomes:
            out.print(outcome_line(o))
        for r, why in d.retained_skipped:  # what it would have been, and why it is not
            try:
                reading = parse(payload, r.point.settings, unit=r.point.unit, zone=r.zone)  # type: ignore[arg-type]
                o = (
                    Outcome(r, absent=True)
                    if reading is None
                    else Outcome(r, reading.value, reading.timestamp_ms, quality=reading.quality)
                )
            except PayloadError as exc:
                o = Outcome(r, reason=exc.reason, detail=exc.detail)
            line = outcome_line(o)
            line.append(
                ' (retained copy, not taken: retained = "ignore")'
                if why == "ignore"
                else " (retained copy of a value already taken: not taken again)"
            )
            line.stylize("dim")
            out.print(line)
        for device, online, word in d.availability:
            state = {True: "online", False: "offline", None: "availability not understood"}
            out.print(
                Text(
                    f"  → {device} {state[online]} ({word})",
                    style="green" if online else "red",
                )
            )
        if d.ignored_by and not d.outcomes:
            out.print(Text(f"  → ignored (ignore_topics of {', '.join(d.ignored_by)})", "dim"))

    async def go() -> int:
        seen = 0
        client = client_for(link, f"citygw-sniff-{secrets.token_hex(4)}")
        async with client:
            tagged = v5 and client.subscription_ids  # (the broker's CONNACK says)
            for i, f in enumerate(filters):
                props = subscribe_properties(i + 1) if tagged else None
                await client.subscribe(f, 0, properties=props)
            out.print(Text(f"listening on {where} to {', '.join(filters)}", style="dim"))
            async for message in client.messages:
                name = message.topic.value
                ids = subscription_ids(message)
                matching = [i + 1 for i, p in enumerate(patterns) if p.match(name) is not None]
                if ids is not None and matching and min(matching) not in ids:
                    continue  # another copy of this message, for an overlapping filter
                show(name, payload_bytes(message), bool(message.retain))
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
