"""`citygw platform push-config` and `citygw platform configs`: a gateway's config from
the centre, and which gateways run which config.

- `push-config --gateway gw-12 gateway.toml --broker URL [--deadline 300] [--wait S |
  --no-wait] [--db URL]`: validates the file here first, sends it as a `config_push`
  command (down/cmd, QoS 1, not retained; the broker user must be allowed to publish
  there and read up/resp: `role.commands`, docs/broker-security.md), waits for the
  gateway's answer and prints it. The gateway tries the config and rolls back by itself
  if its uplink is not healthy again within the deadline (agent/config_push.py). With
  `--db` the push (text, who, when, outcome) goes into the store's config history.
- `configs --db URL [--gateway G]`: every gateway's running config version and hash; with
  `--gateway`, that gateway's history: the configs it reported running and the pushes.

Exit codes of push-config: 0 applied (or sent, with --no-wait), 1 invalid input (the file
does not validate, another gateway's config), 2 file, broker or store unusable,
3 refused by the gateway, 4 rolled back by the gateway, 5 no answer within --wait.
"""

from __future__ import annotations

import asyncio
import getpass
import socket
import uuid
from pathlib import Path
from typing import Annotated, Any

import aiomqtt
import orjson
import typer
from rich.text import Text

from agent.commands import (
    CONFIG_PUSH,
    DEADLINE_DEFAULT_S,
    DEADLINE_MAX_S,
    DEADLINE_MIN_S,
    MAX_CONFIG_PUSH_BYTES,
)
from agent.config import Config, ConfigError, parse_config
from central.cli import DbOption, FormatOption, GatewayOption, _run, emit
from central.configs import NOT_SENT, SENT, ConfigPushRecord
from central.store import Store
from central.times import iso, now_ms
from common import wire
from common.cli import EXIT_NO_FILE, err_console, fail, out_console
from common.mqtt_url import BrokerAddress, tls_context
from common.reconnect import MqttClient
from common.redact import redact

EXIT_REFUSED, EXIT_ROLLED_BACK, EXIT_NO_ANSWER = 3, 4, 5
OUTCOME_EXIT = {"applied": 0, "refused": EXIT_REFUSED, "rolled_back": EXIT_ROLLED_BACK}
#: how long past the deadline the answer may take by default (a rollback reconnects)
ANSWER_MARGIN_S = 60.0
CONNECT_TIMEOUT_S = 10.0


def push_config(
    path: Annotated[Path, typer.Argument(help="The config file to send.", dir_okay=False)],
    gateway: Annotated[str, typer.Option("--gateway", help="The gateway to send it to.")],
    broker: Annotated[
        str,
        typer.Option(
            envvar="CITYGW_BROKER",
            help="The platform broker as role.commands: mqtts://role.commands:pw@host:8885.",
        ),
    ],
    deadline: Annotated[
        int,
        typer.Option(
            help="Seconds the gateway's uplink has to be healthy again before it rolls back.",
            min=DEADLINE_MIN_S,
            max=DEADLINE_MAX_S,
        ),
    ] = DEADLINE_DEFAULT_S,
    wait: Annotated[
        float | None,
        typer.Option(help="Seconds to wait for the answer (default: the deadline + 60).", min=1),
    ] = None,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Send and exit; the answer is not awaited.")
    ] = False,
    db: Annotated[
        str | None,
        typer.Option("--db", envvar="CITYGW_DB", help="Record the push in this store's history."),
    ] = None,
    prefix: Annotated[str, typer.Option(help="Topic prefix.")] = "citygw",
    ca_file: Annotated[
        Path | None, typer.Option(help="CA of the broker's certificate (mqtts://).")
    ] = None,
    by: Annotated[
        str | None, typer.Option(help="Who pushes, for the history (default: user@host).")
    ] = None,
) -> None:
    """Send a config to a gateway; it keeps it only if its uplink is healthy again in time."""
    text = _read(path)
    config = _validate(path, text)
    if config.gateway.id != gateway:
        fail(
            f"{path}: its gateway.id is {config.gateway.id!r}, not {gateway!r}; "
            "a push does not change a gateway's identity"
        )
    try:
        wire.check_gateway_id(gateway)
        BrokerAddress.parse(broker)
    except (wire.WireError, ValueError) as exc:
        fail(str(exc))
    cid = f"push-{uuid.uuid4().hex[:16]}"
    command = orjson.dumps({"id": cid, "op": CONFIG_PUSH, "config": text, "deadline_s": deadline})
    if len(command) > MAX_CONFIG_PUSH_BYTES:
        fail(
            f"{path}: too big to push ({len(command)} bytes as a command; "
            f"at most {MAX_CONFIG_PUSH_BYTES})"
        )
    err_console().print(
        Text(
            f"{path}: valid here; the gateway validates it again with its own files: every file "
            "it names by a relative path (a Modbus profile, ca_file...) must exist next to the "
            "gateway's config, and ${VAR}s come from the gateway's environment",
            style="yellow",
        )
    )
    push_id: int | None = None
    if db is not None:
        record = ConfigPushRecord(
            0, gateway, cid, config.version, config.hash, text, by or _who(), now_ms(), SENT,
            None, None,
        )  # fmt: skip
        push_id = _run(db, lambda store: store.config_push_record(record))
    timeout = None if no_wait else (wait if wait is not None else deadline + ANSWER_MARGIN_S)
    try:
        answer = asyncio.run(_exchange(broker, ca_file, prefix, gateway, cid, command, timeout))
    except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
        error = f"{redact(broker)}: cannot send the command: {exc}"
        _record_outcome(db, push_id, NOT_SENT, error)
        fail(error, EXIT_NO_FILE)
    out = out_console()
    if no_wait:
        out.print(
            Text(f"sent {cid} to {gateway} (config {config.version}); not waiting for the answer")
        )
        return
    if answer is None:
        out.print(Text(f"{gateway}: no answer to {cid} within {timeout:g} s", style="bold red"))
        raise typer.Exit(EXIT_NO_ANSWER)
    outcome = str(answer.get("outcome", "refused" if not answer.get("ok") else "applied"))
    said = answer.get("error")
    _record_outcome(db, push_id, outcome, None if said is None else str(said))
    _show(gateway, answer, outcome)
    raise typer.Exit(OUTCOME_EXIT.get(outcome, EXIT_REFUSED))


def _record_outcome(db: str | None, push_id: int | None, outcome: str, error: str | None) -> None:
    if db is not None and push_id is not None:
        pid = push_id
        _run(db, lambda store: store.config_push_answered(pid, outcome, error, now_ms()))


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        fail(f"{path}: file not found", EXIT_NO_FILE)
    except UnicodeDecodeError as exc:
        fail(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8")
    except OSError as exc:
        fail(f"{path}: cannot read: {exc.strerror or exc}", EXIT_NO_FILE)


def _validate(path: Path, text: str) -> Config:
    try:
        return parse_config(text, source=str(path), base_dir=path.resolve().parent)
    except ConfigError as exc:
        console = err_console()
        for issue in exc.issues:
            console.print(Text(str(issue)))
        fail(f"{path}: not pushed: {len(exc.issues)} problem(s) found")


def _who() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


async def _exchange(
    broker: str,
    ca_file: Path | None,
    prefix: str,
    gateway: str,
    cid: str,
    command: bytes,
    timeout: float | None,
) -> dict[str, Any] | None:
    """Publishes the command (after subscribing to up/resp, so the answer cannot be
    missed) and returns the answer naming `cid`; None if none came within `timeout`
    (None: not awaited)."""
    a = BrokerAddress.parse(broker)
    async with MqttClient(
        a.host,
        a.port,
        identifier=f"citygw-{cid}",
        username=a.username,
        password=a.password,
        protocol=aiomqtt.ProtocolVersion.V5,  # a PUBACK says whether the ACL took it
        tls_context=tls_context(str(ca_file) if ca_file else None) if a.tls else None,
        timeout=CONNECT_TIMEOUT_S,
    ) as client:
        if timeout is not None:
            await client.subscribe(wire.topic(prefix, gateway, wire.KIND_RESP), qos=1)
        await client.publish(wire.topic(prefix, gateway, wire.KIND_CMD), command, qos=1)
        if timeout is None:
            return None
        try:
            async with asyncio.timeout(timeout):
                async for message in client.messages:
                    try:
                        body = orjson.loads(message.payload)
                    except (orjson.JSONDecodeError, TypeError):
                        continue
                    if isinstance(body, dict) and body.get("id") == cid:
                        return body
        except TimeoutError:
            return None
    return None


def _show(gateway: str, answer: dict[str, Any], outcome: str) -> None:
    out = out_console()
    version = answer.get("version")
    if outcome == "applied":
        out.print(
            Text(
                f"{gateway}: applied, now running config {version} ({answer.get('hash')})",
                style="green",
            )
        )
        diff = answer.get("diff")
        if diff:
            changes = {k: v for k, v in diff.items() if k in ("added", "removed", "changed") and v}
            for what, names in changes.items():
                out.print(Text(f"  devices {what}: {', '.join(map(str, names))}"))
            if diff.get("uplink_changed"):
                out.print(Text("  uplink: reconnected with the new settings"))
    elif outcome == "rolled_back":
        out.print(
            Text(
                f"{gateway}: rolled back to config {version}: {answer.get('error')}",
                style="bold red",
            )
        )
    else:
        out.print(Text(f"{gateway}: {outcome}: {answer.get('error')}", style="bold red"))


def configs(db: DbOption, gateway: GatewayOption = None, fmt: FormatOption = "table") -> None:
    """Which gateways run which config; with --gateway, that gateway's config history."""
    if gateway is None:
        _fleet_configs(db, fmt)
        return

    def read(store: Store) -> tuple[Any, Any]:
        return store.configs_seen(gateway), store.config_pushes(gateway)

    seen, pushes = _run(db, read)
    emit(
        fmt,
        f"{gateway}: configs reported running",
        ("version", "hash", "running", "first seen", "last seen"),
        [
            (
                c.version,
                c.hash,
                "yes" if c.running else "",
                iso(c.first_seen_ms),
                iso(c.last_seen_ms),
            )
            for c in seen
        ],
        [
            {
                "kind": "seen",
                "version": c.version,
                "hash": c.hash,
                "running": c.running,
                "first_seen": iso(c.first_seen_ms),
                "last_seen": iso(c.last_seen_ms),
            }
            for c in seen
        ],
    )
    emit(
        fmt,
        f"{gateway}: configs pushed",
        ("pushed", "by", "version", "outcome", "error", "command"),
        [
            (iso(p.pushed_ms), p.pushed_by, p.version, p.outcome, p.error or "", p.command_id)
            for p in pushes
        ],
        [
            {
                "kind": "pushed",
                "pushed": iso(p.pushed_ms),
                "by": p.pushed_by,
                "version": p.version,
                "hash": p.hash,
                "outcome": p.outcome,
                "error": p.error,
                "answered": iso(p.answered_ms) if p.answered_ms else None,
                "command": p.command_id,
            }
            for p in pushes
        ],
    )


def _fleet_configs(db: str, fmt: Any) -> None:
    rows = _run(db, lambda store: store.fleet())
    counts: dict[str, int] = {}
    for r in rows:
        key = r.config_version or "unknown"
        counts[key] = counts.get(key, 0) + 1
    summary = ", ".join(f"{v}: {n}" for v, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    emit(
        fmt,
        f"{len(rows)} gateway{'s' if len(rows) != 1 else ''} ({summary or 'none'})",
        ("gateway", "site", "config version", "config hash"),
        [(r.gateway, r.site or "", r.config_version or "-", r.config_hash or "-") for r in rows],
        [
            {
                "gateway": r.gateway,
                "site": r.site,
                "config_version": r.config_version,
                "config_hash": r.config_hash,
            }
            for r in rows
        ],
    )
