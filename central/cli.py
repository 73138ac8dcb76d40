"""`citygw platform …`: what the platform's store holds, for the people who run it.

- `query --db URL --point device/point --since 1h`: a point's readings, on every gateway
  that has it (or on `--gateway`), between `--since` and `--until` (a duration ago or an
  ISO 8601 time).
- `gateways --db URL`: every gateway with its state (online/offline, since when), its
  last stored uplink, and what it last reported of its buffer (backlog, evicted, lost).
- `alarms --db URL [--active] [--gateway G]`: alarm episodes, each raise paired with its
  clear.
- `actions --db URL [--gateway G] [--rule R] [--limit N]`: what the gateways' local rules
  did or were kept from doing (rule actions from the alarm lane), oldest of the newest N
  first.
- `devices --db URL [--gateway G]`: what each device says it is (serial number, firmware
  version, a BTHome text...), as its gateway last reported it in up/stats.
- `dead-letters --db URL [--limit N] [--dump DIR]`: rejected uplinks kept aside by the
  ingest, newest first; `--dump` writes their payloads to files.
- `prune --db URL --older-than 90d`: retention, the one command that deletes.
- `push-config` and `configs`: a gateway's config from the centre, and which gateways
  run which config (cli/platform_config.py: they validate a gateway config, so they
  live above both agent/ and central/).

Every command prints a table, or CSV or JSON with `--format`. No command creates or
migrates a store: a SQLite file that does not exist or a PostgreSQL schema without a
current store in it is an error.

Exit codes (as every `citygw` command): 0 success, 1 invalid input (a bad URL, time or
point name), 2 the database is missing, unreachable or not a citygw store.
"""

from __future__ import annotations

import csv
import difflib
import io
import math
import re
import sys
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import orjson
import typer
from rich.table import Table
from rich.text import Text

from central.store import (
    AlarmEpisode,
    DeadLetter,
    DeviceInfoEntry,
    GatewayInfo,
    PointReading,
    Store,
)
from central.times import iso, now_ms, parse_when
from common.cli import EXIT_NO_FILE, age, fail, out_console
from common.redact import redact
from common.units import parse_duration
from common.wire import RuleAction, rule_action_dict
from native.batch import QUALITY_NAMES

app = typer.Typer(
    help="Look into the platform's store: readings, gateways, devices, alarms, rule actions, "
    "dead letters.",
    no_args_is_help=True,
)

Format = Literal["table", "csv", "json"]

DbOption = Annotated[
    str,
    typer.Option(
        "--db",
        envvar="CITYGW_DB",
        help="The store: sqlite:///path.db or postgresql://...[?schema=name].",
    ),
]
FormatOption = Annotated[Format, typer.Option("--format", help="table, csv or json.")]
GatewayOption = Annotated[str | None, typer.Option("--gateway", help="Only this gateway.")]

#: how many close names `query` suggests for a point it does not know
SUGGESTIONS = 5


# -- opening the store, read-only in spirit ------------------------------------------------


def open_existing(url: str) -> Store:
    """The store at `url`, which must exist already (nothing is created or migrated);
    exits with a clear message if not."""
    from central.store import StoreMissing
    from central.stores import open_store

    if not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        fail(f"unsupported store URL {redact(url)!r}: use sqlite:///path.db or postgresql://...")
    try:
        return open_store(url, create=False)
    except StoreMissing as exc:
        fail(f"{redact(url)}: {exc}", EXIT_NO_FILE)
    except ValueError as exc:
        fail(str(exc))
    except Exception as exc:  # the driver's own errors: unreadable, refused, dropped
        fail(f"{redact(url)}: cannot open the store: {str(exc).strip()}", EXIT_NO_FILE)


def _run(url: str, read: Callable[[Store], Any]) -> Any:
    store = open_existing(url)
    try:
        return read(store)
    except Exception as exc:
        fail(f"{redact(url)}: {type(exc).__name__}: {exc}", EXIT_NO_FILE)
    finally:
        store.close()


# -- times ---------------------------------------------------------------------------------


def parse_time(text: str, now: int, option: str) -> int:
    try:
        return parse_when(text, now)
    except ValueError as exc:
        fail(f"{option} {exc}")


def span(ms: int) -> str:
    """A duration for people: ``45.0 s``, ``12.5 min``, ``3.2 h``, ``4.0 d``."""
    s = max(0.0, ms / 1000.0)
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def quality_name(q: int) -> str:
    return QUALITY_NAMES.get(q, str(q))


# -- output ----------------------------------------------------------------------------------


def emit(
    fmt: Format,
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    records: Sequence[dict[str, Any]],
    numbers: Collection[str] = (),
) -> None:
    """`rows` (strings) as a rich table or CSV; `records` (machine values) as JSON.

    In a table nothing is cut to fit the terminal: text wraps inside its cell, and the
    `numbers` columns keep their widest value whole on one line (a cut number reads as
    another number)."""
    if fmt == "json":
        sys.stdout.write(orjson.dumps(list(records), option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
        sys.stdout.write(buf.getvalue())
        return
    out = out_console()
    if not rows:
        out.print(Text(f"{title}: none"))
        return
    table = Table(title=title)
    for i, c in enumerate(columns):
        if c in numbers:
            widest = max(len(r[i]) for r in rows)
            table.add_column(c, justify="right", no_wrap=True, min_width=widest)
        else:
            table.add_column(c, overflow="fold")
    for r in rows:
        table.add_row(*r)
    out.print(table)


def value_text(v: float) -> str:
    """Shortest round-trip text of a float: nothing lost (nan, inf, -0.0 as Python says)."""
    return repr(v)


# -- commands --------------------------------------------------------------------------------


def _unknown_point(url: str, point: str, gateway: str | None) -> NoReturn:
    keys = _run(url, lambda s: s.point_keys(gateway))
    where = f" on gateway {gateway!r}" if gateway else ""
    close = difflib.get_close_matches(point, keys, n=SUGGESTIONS, cutoff=0.6)
    if not close:  # a device or a point name right, the rest wrong: keys that share it
        parts = [p for p in point.lower().split("/") if p]
        close = [k for k in keys if any(p in k.lower() for p in parts)][:SUGGESTIONS]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    if not keys:
        hint = " (its registry is empty: no gateway has sent up/meta)"
    fail(f"unknown point {point!r}{where}{hint}")


@app.command()
def query(
    point: Annotated[
        str, typer.Option("--point", help="The point as device/point, e.g. bridge-7/strain_1.")
    ],
    db: DbOption,
    since: Annotated[
        str, typer.Option("--since", help="Start: a duration ago (90s, 15m, 1h, 2d) or ISO time.")
    ] = "1h",
    until: Annotated[
        str | None, typer.Option("--until", help="End (excluded), like --since; default now.")
    ] = None,
    gateway: GatewayOption = None,
    limit: Annotated[
        int | None, typer.Option("--limit", help="At most this many readings.", min=1)
    ] = None,
    fmt: FormatOption = "table",
) -> None:
    """A point's readings (by its name in the gateways' registry), oldest first per gateway."""
    if "/" not in point.strip("/"):
        fail(f"--point {point!r}: give device/point, e.g. bridge-7/strain_1")
    now = now_ms()
    since_ms = parse_time(since, now, "--since")
    # without --until: up to now, so that readings stamped in the future stay out
    until_ms = parse_time(until, now, "--until") if until is not None else now
    if until_ms <= since_ms:
        fail(f"--until ({iso(until_ms)}) must be after --since ({iso(since_ms)})")

    def read(store: Store) -> list[PointReading]:
        return store.query(point, since_ms, until_ms, gateway=gateway, limit=limit)

    readings: list[PointReading] = _run(db, read)
    if not readings and point not in _run(db, lambda s: s.point_keys(gateway)):
        _unknown_point(db, point, gateway)
    window = f"{iso(since_ms)} .. {iso(until_ms)}"
    emit(
        fmt,
        f"{point}, {window}: {len(readings)} reading{'s' if len(readings) != 1 else ''}",
        ("gateway", "point", "time", "value", "quality"),
        [
            (r.gateway, r.key, iso(r.ts), value_text(r.value), quality_name(r.quality))
            for r in readings
        ],
        [
            {
                "gateway": r.gateway,
                "point": r.key,
                "time": iso(r.ts),
                "ts_ms": r.ts,
                "value": r.value,
                "quality": quality_name(r.quality),
            }
            for r in readings
        ],
        numbers=("value",),
    )


def _state_text(g: GatewayInfo, now: int) -> str:
    if g.state is None:
        return "unknown"
    if g.state_ms is None:
        return g.state
    return f"{g.state} since {iso(g.state_ms)} ({span(now - g.state_ms)})"


@app.command()
def gateways(db: DbOption, fmt: FormatOption = "table") -> None:
    """Every gateway: state, last uplink stored, backlog, evicted and lost readings."""
    infos: list[GatewayInfo] = _run(db, lambda store: store.gateways())
    now = now_ms()

    def stat(g: GatewayInfo, field: str) -> int | None:
        return None if g.stats is None else int(getattr(g.stats, field))

    def text(v: int | None) -> str:
        return "-" if v is None else str(v)

    emit(
        fmt,
        f"{len(infos)} gateway{'s' if len(infos) != 1 else ''}",
        (
            "gateway",
            "site",
            "state",
            "last seen",
            "backlog points",
            "evicted points",
            "lost points",
            "stats reported",
        ),
        [
            (
                g.gateway,
                g.site or "",
                _state_text(g, now),
                age(g.last_seen_ms, now),
                text(stat(g, "backlog_points")),
                text(stat(g, "evicted_points")),
                text(stat(g, "lost_points")),
                age(g.stats.ts if g.stats else None, now),
            )
            for g in infos
        ],
        [
            {
                "gateway": g.gateway,
                "site": g.site,
                "state": g.state,
                "state_since": iso(g.state_ms) or None,
                "last_seen": iso(g.last_seen_ms) or None,
                "backlog_points": stat(g, "backlog_points"),
                "evicted_points": stat(g, "evicted_points"),
                "lost_points": stat(g, "lost_points"),
                "stats_time": iso(g.stats.ts) if g.stats else None,
            }
            for g in infos
        ],
        numbers=("backlog points", "evicted points", "lost points"),
    )


@app.command()
def alarms(
    db: DbOption,
    active: Annotated[bool, typer.Option("--active", help="Only alarms not cleared.")] = False,
    gateway: GatewayOption = None,
    fmt: FormatOption = "table",
) -> None:
    """Alarm episodes: when each was raised, and cleared or still active, for how long."""
    episodes: list[AlarmEpisode] = _run(
        db, lambda store: store.alarm_episodes(gateway=gateway, active=active)
    )
    now = now_ms()

    def duration(e: AlarmEpisode) -> int:
        return (e.cleared_ts if e.cleared_ts is not None else now) - e.raised_ts

    kind = "active alarm" if active else "alarm episode"
    emit(
        fmt,
        f"{len(episodes)} {kind}{'s' if len(episodes) != 1 else ''}",
        ("gateway", "point", "rule", "severity", "raised", "value", "cleared", "duration"),
        [
            (
                e.gateway,
                e.key or f"#{e.point_id}",
                e.rule,
                e.severity,
                iso(e.raised_ts),
                value_text(e.value),
                iso(e.cleared_ts) if e.cleared_ts is not None else "active",
                span(duration(e)) + ("" if e.cleared_ts is not None else " so far"),
            )
            for e in episodes
        ],
        [
            {
                "gateway": e.gateway,
                "point_id": e.point_id,
                "point": e.key,
                "rule": e.rule,
                "severity": e.severity,
                "raised": iso(e.raised_ts),
                "value": e.value,
                "cleared": iso(e.cleared_ts) if e.cleared_ts is not None else None,
                "active": e.cleared_ts is None,
                "duration_ms": duration(e),
            }
            for e in episodes
        ],
        numbers=("value",),
    )


def _inputs_text(a: RuleAction) -> str:
    return ", ".join(
        f"{i.name}={'none' if math.isnan(i.value) else value_text(i.value)}"
        + ("" if i.quality == 0 else f" ({quality_name(i.quality)})")
        for i in a.inputs
    )


def _opt_value(v: float) -> str:
    return "" if math.isnan(v) else value_text(v)


@app.command()
def actions(
    db: DbOption,
    gateway: GatewayOption = None,
    rule: Annotated[str | None, typer.Option("--rule", help="Only this rule.")] = None,
    limit: Annotated[int, typer.Option("--limit", help="The newest N.", min=1)] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="JSON (as --format json).")] = False,
    fmt: FormatOption = "table",
) -> None:
    """Rule actions: what the gateways' local rules did (a write, a publish, an event) or
    were kept from doing (an interlock, a manual override), in the order they happened,
    newest last."""
    found: list[tuple[str, RuleAction]] = _run(
        db, lambda store: store.rule_actions(gateway=gateway, rule=rule, limit=limit)
    )
    emit(
        "json" if as_json else fmt,
        f"{len(found)} rule action{'s' if len(found) != 1 else ''} (newest last)",
        (
            "time",
            "gateway",
            "rule",
            "transition",
            "action",
            "outcome",
            "target",
            "value",
            "written",
            "attempts",
            "detail",
            "inputs",
        ),
        [
            (
                iso(a.ts_ms),
                g,
                a.rule,
                a.transition,
                a.action or "-",
                a.outcome,
                a.target,
                _opt_value(a.value),
                _opt_value(a.written),
                str(a.attempts),
                a.detail,
                _inputs_text(a),
            )
            for g, a in found
        ],
        [{"gateway": g, "time": iso(a.ts_ms), **rule_action_dict(a)} for g, a in found],
        numbers=("time", "value", "written", "attempts"),
    )


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def dump_name(i: int, letter: DeadLetter) -> str:
    """``0001-20260501T120000.250Z-codec-citygw_gw-1_up_batch.bin``: sortable, safe."""
    when = iso(letter.received_ms).replace("-", "").replace(":", "")
    topic = _UNSAFE.sub("_", letter.topic)[:80]
    return f"{i:04d}-{when}-{_UNSAFE.sub('_', letter.reason)}-{topic}.bin"


@app.command("dead-letters")
def dead_letters(
    db: DbOption,
    limit: Annotated[int, typer.Option("--limit", help="The newest N.", min=1)] = 20,
    dump: Annotated[
        Path | None,
        typer.Option(
            "--dump", help="Write each payload to a file in this directory.", file_okay=False
        ),
    ] = None,
    fmt: FormatOption = "table",
) -> None:
    """Uplinks the ingest rejected (and acknowledged), newest first, with the reason."""
    letters: list[DeadLetter] = _run(db, lambda store: store.dead_letters(limit))
    files: list[str] = []
    if dump is not None:
        try:
            dump.mkdir(parents=True, exist_ok=True)
            for i, letter in enumerate(letters, 1):
                target = dump / dump_name(i, letter)
                target.write_bytes(letter.payload)
                files.append(str(target))
        except OSError as exc:
            fail(f"{dump}: cannot write: {exc.strerror or exc}", EXIT_NO_FILE)

    def size(d: DeadLetter) -> str:
        kept = len(d.payload)
        return str(d.size) if kept >= d.size else f"{d.size} (first {kept} kept)"

    emit(
        fmt,
        f"{len(letters)} dead letter{'s' if len(letters) != 1 else ''} (newest first)",
        ("received", "topic", "reason", "error", "size", *(("file",) if dump else ())),
        [
            (
                iso(d.received_ms),
                d.topic,
                d.reason,
                d.error,
                size(d),
                *((files[i],) if dump else ()),
            )
            for i, d in enumerate(letters)
        ],
        [
            {
                "received": iso(d.received_ms),
                "topic": d.topic,
                "reason": d.reason,
                "error": d.error,
                "size": d.size,
                "kept": len(d.payload),
                **({"file": files[i]} if dump else {}),
            }
            for i, d in enumerate(letters)
        ],
    )
    if dump is not None and fmt == "table":
        out_console().print(Text(f"wrote {len(files)} payload file(s) to {dump}"))


@app.command()
def prune(
    db: DbOption,
    older_than: Annotated[
        str, typer.Option("--older-than", help="Keep this much: a duration (30d, 12h).")
    ],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Retention: delete readings, uplink keys, dead letters, rule actions and cleared
    alarms older than --older-than (active alarms stay). A gateway that resends an uplink older than
    that has it stored again: keep more than the longest gateway backlog."""
    try:
        keep_s = parse_duration(older_than)
    except ValueError as exc:
        fail(f"--older-than {older_than!r}: {exc}")
    if keep_s <= 0:
        fail(f"--older-than {older_than!r}: must be more than 0")
    before = now_ms() - round(keep_s * 1000)
    if not yes:
        typer.confirm(f"Delete what {redact(db)} holds from before {iso(before)}?", abort=True)
    dropped: dict[str, int] = _run(db, lambda store: store.prune(before))
    table = Table(title=f"pruned: before {iso(before)}")
    table.add_column("what")
    table.add_column("dropped", justify="right")
    for what, n in dropped.items():
        table.add_row(what, str(n))
    out_console().print(table)


@app.command()
def devices(db: DbOption, gateway: GatewayOption = None, fmt: FormatOption = "table") -> None:
    """Device information: Modbus string points (serial number, firmware...), BTHome
    text, raw (as hex) and firmware objects, by gateway and device, with the gateway's time
    of the first report of each value."""
    entries: list[DeviceInfoEntry] = _run(db, lambda store: store.device_info(gateway))
    n_devices = len({(e.gateway, e.device) for e in entries})
    emit(
        fmt,
        f"device information: {len(entries)} entr{'ies' if len(entries) != 1 else 'y'} of "
        f"{n_devices} device{'s' if n_devices != 1 else ''}",
        ("gateway", "device", "name", "value", "since"),
        [(e.gateway, e.device, e.name, e.value, iso(e.since_ms)) for e in entries],
        [
            {
                "gateway": e.gateway,
                "device": e.device,
                "name": e.name,
                "value": e.value,
                "since": iso(e.since_ms),
                "since_ms": e.since_ms,
            }
            for e in entries
        ],
    )


# -- the console ---------------------------------------------------------------------------


@app.command()
def serve(
    db: DbOption,
    listen: Annotated[
        str, typer.Option(help="HOST:PORT to listen on; beyond loopback only with users.")
    ] = "127.0.0.1:8080",
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            envvar="CITYGW_CONSOLE_CONFIG",
            help="The console config (TOML): users, tokens, vital signs.",
        ),
    ] = None,
    connections: Annotated[
        int, typer.Option(help="Store connections for requests.", min=1, max=64)
    ] = 4,
    forwarded_allow_ips: Annotated[
        str,
        typer.Option(
            help="Addresses of the reverse proxies whose X-Forwarded-* headers are trusted "
            "(comma separated, '*' for any)."
        ),
    ] = "127.0.0.1",
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """The console: an HTTP API and a web page over the store (vital signs, fleet, events,
    points), live. Refuses to listen beyond loopback without users or tokens."""
    import asyncio
    import contextlib
    import signal

    from central.console.config import ConsoleConfig, load_console_config
    from central.console.serve import Listen, ServeRefused, build, check_exposure
    from common.keypath import ConfigError
    from common.logs import setup_logging

    setup_logging(log_level)
    try:
        where = Listen.parse(listen)
        settings = load_console_config(config) if config is not None else ConsoleConfig()
    except ValueError as exc:
        fail(str(exc))
    except ConfigError as exc:
        fail(f"{config}:\n{exc}")
    except OSError as exc:
        fail(f"{config}: cannot read it: {exc.strerror or exc}", EXIT_NO_FILE)
    console = _run_open(db, lambda: build(db, settings, connections))
    try:
        check_exposure(where, console.accounts)
    except (ServeRefused, ValueError) as exc:
        console.pool.close()
        fail(str(exc))

    async def main() -> None:
        from central.console.serve import serve as run_console

        task = asyncio.ensure_future(
            run_console(console, where, forwarded_allow_ips=forwarded_allow_ips)
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        asyncio.run(main())
    except ServeRefused as exc:
        fail(str(exc))


def _run_open(url: str, make: Callable[[], Any]) -> Any:
    """`make()`, which opens the store at `url`, with open_existing's messages."""
    open_existing(url).close()
    try:
        return make()
    except Exception as exc:
        fail(f"{redact(url)}: cannot open the store: {str(exc).strip()}", EXIT_NO_FILE)


@app.command("hash-password")
def hash_password_cmd() -> None:
    """Asks for a password (twice) and prints its argon2 hash for a [[users]] entry."""
    from central.console.auth import hash_password

    password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    if len(password) < 8:
        fail("the password is shorter than 8 characters")
    sys.stdout.write(hash_password(password) + "\n")


@app.command("new-token")
def new_token_cmd(
    name: Annotated[str, typer.Argument(help="Who uses it (an API client's name).")],
    role: Annotated[str, typer.Option(help="viewer, operator or admin.")] = "viewer",
) -> None:
    """Makes an API token: prints the token once (give it to the client) and the
    [[tokens]] entry for the console config, which holds only its hash."""
    from central.console.auth import ROLES, new_token, token_hash

    if role not in ROLES:
        fail(f"--role {role!r}: one of {', '.join(ROLES)}")
    token = new_token()
    sys.stdout.write(
        f"token (shown once): {token}\n\n[[tokens]]\nname = {orjson.dumps(name).decode()}\n"
        f'role = "{role}"\ntoken_hash = "{token_hash(token)}"\n'
    )
