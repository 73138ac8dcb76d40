"""No secret in any log line or printed output: the redaction helper (common/redact.py), the
log formatters' safety net (common/logs.py), and every `citygw` command run as a
subprocess with passwords in URLs, in the environment and in a config, its output and the
status snapshot grepped for them.

The command list is checked against the CLI's command tree, so a command added later
fails here until it is exercised too."""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import typer.main

from cli.main import app
from common.broker import Mosquitto, free_port, write_password_file
from common.logs import ConsoleFormatter, JsonFormatter
from tests.helpers import running_broker

ROOT = Path(__file__).resolve().parent.parent
BLE_REPLAY = ROOT / "drivers" / "ble" / "replay" / "demo.jsonl"

BROKER_PW = "S3cr3t-broker"  # the ingest's broker user "u", in URLs and CITYGW_BROKER
DB_PW = "S3cr3t-db"  # in postgresql://postgres:...@ URLs (trust auth: accepted, ignored)
DB_QUERY_PW = "S3cr3t-dbquery"  # libpq ?password=...
PG_ENV_PW = "S3cr3t-pgenv"  # PGPASSWORD
MQTT_ENV_PW = "S3cr3t-mqttenv"  # MQTT_PASSWORD, the config's password = "${MQTT_PASSWORD}"
PW_FILE_PW = "S3cr3t-pwfile"  # in a config's password_file
TLS_KEY = "S3cr3t-tlskey"  # the content of a config's key_file
BIND_KEY = "5ec2e7c0ffee5ec2e7c0ffee5ec2e7c0"  # a BLE device's bind_key
SECRETS = [BROKER_PW, DB_PW, DB_QUERY_PW, PG_ENV_PW, MQTT_ENV_PW, PW_FILE_PW, TLS_KEY, BIND_KEY]


# -- the helper -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("mqtt://ingest:pw@broker:1883", "mqtt://ingest:***@broker:1883"),
        ("mqtts://ingest:pw@broker", "mqtts://ingest:***@broker"),
        ("postgresql://citygw:pw@db/city?schema=a", "postgresql://citygw:***@db/city?schema=a"),
        (
            "postgresql://citygw@db/city?password=pw&schema=a",
            "postgresql://citygw@db/city?password=***&schema=a",
        ),
        ("host=db password=pw dbname=city", "host=db password=*** dbname=city"),
        ("host=db password='p w' dbname=city", "host=db password='***' dbname=city"),
        ("PGPASSWORD=pw", "PGPASSWORD=***"),
        # a raw "@" or "/" in a password: urlsplit reads up to the last "@"
        ("mqtt://u:p@ss@host:1", "mqtt://u:***@host:1"),
        ("mqtt://u:a/b+c=@host", "mqtt://u:***@host"),
        ("mqtt://:pw@host", "mqtt://:***@host"),
        (
            "broker=mqtt://u:pw@h:1 db=postgresql://p:q@d/x",
            "broker=mqtt://u:***@h:1 db=postgresql://p:***@d/x",
        ),
        ("{'password': 'pw', 'n': 1}", "{'password': '***', 'n': 1}"),
        ('{"mqtt_password":"pw","n":1}', '{"mqtt_password":"***","n":1}'),
        # not secrets: left as they are
        ("mqtt://ingest@broker:1883", "mqtt://ingest@broker:1883"),
        ("mqtt://127.0.0.1:1883", "mqtt://127.0.0.1:1883"),
        ("https://fw.city.example/mcu/2.1.0.cgfw", "https://fw.city.example/mcu/2.1.0.cgfw"),
        ("password_file=/etc/citygw/mqtt-password", "password_file=/etc/citygw/mqtt-password"),
        ("uplink.password: must be a string", "uplink.password: must be a string"),
        ("bad username or password (5)", "bad username or password (5)"),
    ],
)
def test_redact_hides_passwords_and_keeps_the_rest(text: str, shown: str) -> None:
    from common.redact import redact  # here, so that the other tests run without it too

    assert redact(text) == shown
    assert redact(shown) == shown


def test_secret_key_names() -> None:
    from common.redact import is_secret_key

    for name in ("password", "mqtt_password", "uplink.password", "bind_key", "token", "psk"):
        assert is_secret_key(name), name
    for name in ("password_file", "key", "key_file", "username", "passwords", "broker"):
        assert not is_secret_key(name), name


# -- the formatters' safety net --------------------------------------------------------------


def _formatted(formatter: logging.Formatter, emit: Any) -> str:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    log = logging.getLogger("citygw.test-secrets")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG)
    try:
        emit(log)
    finally:
        log.handlers[:] = []
    return out.getvalue()


def _emit_everywhere(log: logging.Logger) -> None:
    log.warning(
        "connecting to %s",
        f"mqtt://ingest:{BROKER_PW}@broker:1883",
        extra={
            "db": f"postgresql://citygw:{DB_PW}@db/city",
            "nested": {"urls": [f"postgresql://citygw@db/city?password={DB_QUERY_PW}"]},
            "password": PG_ENV_PW,
            "settings": {"mqtt_password": MQTT_ENV_PW, "password_file": "/etc/pw"},
            "count": 3,
        },
    )
    try:
        raise ConnectionError(f"refused: mqtt://u:{PW_FILE_PW}@broker")
    except ConnectionError:
        log.exception("lost")


@pytest.mark.parametrize("formatter", [JsonFormatter, ConsoleFormatter])
def test_formatters_mask_secrets_in_message_extra_and_exception(
    formatter: type[logging.Formatter],
) -> None:
    text = _formatted(formatter(), _emit_everywhere)
    for secret in (BROKER_PW, DB_PW, DB_QUERY_PW, PG_ENV_PW, MQTT_ENV_PW, PW_FILE_PW):
        assert secret not in text, (secret, text)
    # what is not a secret is still there to read
    for kept in ("mqtt://ingest:***@broker:1883", "postgresql://citygw:***@db/city", "/etc/pw"):
        assert kept in text, (kept, text)
    if formatter is JsonFormatter:
        first = orjson.loads(text.splitlines()[0])
        assert first["password"] == "***"
        assert first["count"] == 3
        assert first["settings"] == {"mqtt_password": "***", "password_file": "/etc/pw"}


# -- every command, with secrets everywhere ---------------------------------------------------


@dataclass
class Call:
    """One `citygw` invocation; `expect` must show in its output (proof it did what we
    meant). `until` makes it long-running: SIGINT once `until` showed (plus `linger`)."""

    args: list[str]
    expect: str
    until: str | None = None
    linger: float = 1.0
    stdin: str | None = None
    phase: int = 1  # 2: after phase 1 finished (needs its buffer, key or package)
    output: str = ""


def _run(call: Call, env: dict[str, str], work: Path) -> None:
    argv = [sys.executable, "-m", "cli", *call.args]
    if call.until is None:
        proc = subprocess.run(
            argv,
            env=env,
            cwd=work,
            input=call.stdin or "",
            capture_output=True,
            text=True,
            timeout=60,
        )
        call.output = proc.stdout + proc.stderr
        return
    log = work / f"out-{id(call)}.txt"
    with log.open("w") as out:
        running = subprocess.Popen(
            argv, env=env, cwd=work, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
        try:
            deadline = time.monotonic() + 20.0
            while time.monotonic() < deadline and running.poll() is None:
                if call.until in log.read_text(errors="replace"):
                    time.sleep(call.linger)
                    break
                time.sleep(0.1)
            running.send_signal(signal.SIGINT)
            running.wait(timeout=15)
        finally:
            if running.poll() is None:
                running.kill()
                running.wait()
    call.output = log.read_text(errors="replace")


def _commands() -> dict[str, Any]:
    """Every leaf command of the CLI, by its path ("platform query")."""
    found: dict[str, Any] = {}

    def walk(cmd: Any, path: list[str]) -> None:
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, [*path, name])
        else:
            found[" ".join(path)] = cmd

    walk(typer.main.get_command(app), [])
    return found


def _config(path: Path, broker: str, site_port: int, extra_uplink: str = "") -> Path:
    """A gateway config with a secret in every place a config can hold one: the uplink's
    password_file, a device's password from the environment, a BLE bind_key."""
    path.write_text(f"""
[gateway]
id = "gw-secrets"

[uplink]
broker = "{broker}"
username = "gw-secrets"
password_file = "{path.parent / "uplink-password"}"
backoff_min = "200ms"
backoff_max = "1s"
{extra_uplink}

[buffer]
path = "{path.with_suffix(".db")}"

[[devices]]
name = "counter"
driver = "sim"
poll = "200ms"
  [[devices.points]]
  name = "level"
  base = 1.0

[[devices]]
name = "site"
driver = "mqtt"
broker = "mqtt://127.0.0.1:{site_port}"
username = "site"
password = "${{MQTT_PASSWORD}}"
  [[devices.points]]
  name = "pm25"
  topic = "sensors/{{device}}/{{point}}"

[[devices]]
name = "kiosk"
driver = "ble"
source = "replay"
replay_file = "{BLE_REPLAY}"
replay_speed = 50.0
address = "A4:C1:38:A1:B2:C3"
format = "bthome"
bind_key = "{BIND_KEY}"
  [[devices.points]]
  name = "temperature"
  measurement = "temperature"

[[devices]]
name = "meter"
driver = "modbus"
host = "127.0.0.1"
port = {free_port()}
timeout = "200ms"
retries = 0
  [[devices.points]]
  name = "power"
  table = "holding_register"
  address = 0
""")
    return path


@pytest.fixture
def auth_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A mosquitto that wants a password: u (the ingest, sniff), gw-secrets (the uplink),
    site (the mqtt device)."""
    work = tmp_path / "broker"
    work.mkdir()
    users = {"u": BROKER_PW, "gw-secrets": PW_FILE_PW, "site": MQTT_ENV_PW}
    passwords = write_password_file(work / "passwd", users)
    with running_broker(work, allow_anonymous=False, password_file=passwords) as broker:
        yield broker


def test_no_command_prints_a_secret(tmp_path: Path, auth_broker: Mosquitto, pg_url: str) -> None:
    from buffer import Buffer
    from central.stores import open_store
    from firmware_bridge import image as fw

    work = tmp_path
    port, closed = auth_broker.port, free_port()
    db = pg_url.replace("postgresql://postgres@", f"postgresql://postgres:{DB_PW}@", 1)
    db_query = f"{pg_url}&password={DB_QUERY_PW}"
    dead_db = f"postgresql://postgres:{DB_PW}@127.0.0.1:{closed}/test"
    open_store(pg_url).close()  # the platform commands read an existing store

    (work / "uplink-password").write_text(PW_FILE_PW + "\n")
    (work / "uplink-password").chmod(0o600)
    for name in ("ca.pem", "gw.pem"):
        (work / name).write_text("not a certificate\n")
    (work / "gw.key").write_text(f"-----BEGIN PRIVATE KEY-----\n{TLS_KEY}\n")
    (work / "gw.key").chmod(0o600)
    good = _config(work / "good.toml", f"mqtt://127.0.0.1:{port}", port)
    down = _config(work / "down.toml", f"mqtt://127.0.0.1:{closed}", closed)
    tls = _config(
        work / "tls.toml",
        f"mqtts://127.0.0.1:{closed}",
        port,
        f'ca_file = "{work / "ca.pem"}"\ncert_file = "{work / "gw.pem"}"\n'
        f'key_file = "{work / "gw.key"}"',
    )
    bad = work / "bad.toml"
    bad.write_text(
        good.read_text()
        .replace(
            f'broker = "mqtt://127.0.0.1:{port}"',
            f'broker = "mqtt://gw:{BROKER_PW}@127.0.0.1:0"',
            1,
        )
        .replace(f'bind_key = "{BIND_KEY}"', f'bind_key = "{BIND_KEY}{PG_ENV_PW}"')
    )
    signing_key, signing_pub = fw.generate_keypair(work / "fw")
    (work / "image.bin").write_bytes(b"\x01" * 1000)

    env = {
        **os.environ,
        # the code under test, wherever the package is installed from
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "CITYGW_BROKER": f"mqtt://u:{BROKER_PW}@127.0.0.1:{closed}",
        "CITYGW_DB": db,
        "PGPASSWORD": PG_ENV_PW,
        "MQTT_PASSWORD": MQTT_ENV_PW,
        "CITYGW_MQTT_PASSWORD": BROKER_PW,
        "COLUMNS": "250",
        "NO_COLOR": "1",
    }
    ingest = ["ingest", "--client-id", "secrets", "--report-every", "0.5", "--log-level"]
    calls: dict[str, list[Call]] = {
        "init": [Call(["init", str(work / "init" / "gateway.toml")], "wrote")],
        "validate": [
            Call(["validate", "-c", str(good)], "OK"),
            Call(["validate", "-c", str(bad)], "problem"),
        ],
        "run": [
            Call(
                ["run", "-c", str(good), "--log-level", "debug"],
                "uplink connected",
                until="uplink connected",
            ),
            Call(
                ["run", "-c", str(down), "--log-level", "debug", "--json-logs"],
                "uplink down",
                until="uplink down",
                linger=1.5,
            ),
            Call(["run", "-c", str(tls), "--log-level", "debug"], "uplink", until="uplink down"),
            Call(["run", "-c", str(bad)], "problem"),
        ],
        "demo": [Call(["demo", "--duration", "1"], "demo:")],
        "ingest": [
            Call(
                [
                    *ingest,
                    "debug",
                    "--broker",
                    f"mqtt://u:{BROKER_PW}@127.0.0.1:{port}",
                    "--db",
                    db,
                ],
                "ingest: subscribed",
                until="ingest: throughput",
            ),
            # from the environment, to a broker that is not there: the reconnect lines
            Call([*ingest, "debug", "--db", db_query], "reconnecting", until="reconnecting"),
            Call([*ingest, "info", "--broker", f"mqtt://u:{BROKER_PW}@127.0.0.1:0"], "not a valid"),
            Call([*ingest, "info", "--db", f"mysql://root:{DB_PW}@db/city"], "unsupported store"),
        ],
        "status": [
            Call(["status", "-c", str(good)], "uplink", phase=2),
            Call(["status", "-c", str(down)], "uplink", phase=2),
            Call(["status", "-c", str(tls)], "uplink", phase=2),
        ],
        "buffer inspect": [Call(["buffer", "inspect", "-c", str(good)], "stream id", phase=2)],
        "modbus plan": [Call(["modbus", "plan", "-c", str(good)], "meter")],
        "modbus read": [
            Call(
                [
                    "modbus",
                    "read",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(closed),
                    "--table",
                    "holding_register",
                    "--address",
                    "0",
                    "--timeout",
                    "0.2",
                ],
                "127.0.0.1",
            ),
        ],
        "modbus write": [
            Call(
                ["modbus", "write", "-c", str(good), "--point", "meter/power", "--value", "1"],
                "meter",
            ),
        ],
        "modbus scan": [
            Call(
                [
                    "modbus",
                    "scan",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(closed),
                    "--units",
                    "1",
                    "--addresses",
                    "0-0",
                    "--timeout",
                    "0.2",
                ],
                "127.0.0.1",
            ),
        ],
        "ble scan": [
            Call(
                [
                    "ble",
                    "scan",
                    "--replay",
                    str(BLE_REPLAY),
                    "--speed",
                    "50",
                    "--seconds",
                    "1",
                    "--write-config",
                    str(work / "ble.toml"),
                ],
                "wrote",
            ),
        ],
        "mqtt sniff": [
            Call(
                [
                    "mqtt",
                    "sniff",
                    "--broker",
                    f"mqtt://127.0.0.1:{port}",
                    "--username",
                    "u",
                    "--seconds",
                    "1",
                ],
                "listening",
            ),
            Call(["mqtt", "sniff", "-c", str(good), "--seconds", "1"], "listening"),
            Call(
                ["mqtt", "sniff", "--broker", f"mqtt://u:{BROKER_PW}@127.0.0.1:{port}"],
                "credentials",
            ),
            Call(["mqtt", "sniff", "--broker", f"mqtt://u:{BROKER_PW}@127.0.0.1:0"], "not a valid"),
            Call(
                [
                    "mqtt",
                    "sniff",
                    "--broker",
                    f"mqtt://127.0.0.1:{closed}",
                    "--username",
                    "u",
                    "--password",
                    BROKER_PW,
                    "--seconds",
                    "1",
                ],
                "broker",
            ),
        ],
        "firmware keygen": [Call(["firmware", "keygen", "--out", str(work / "k")], "wrote")],
        "firmware sign": [
            Call(
                [
                    "firmware",
                    "sign",
                    str(work / "image.bin"),
                    "--key",
                    str(signing_key),
                    "--version",
                    "1.2.3",
                    "--hardware",
                    "hw-1",
                    "--out",
                    str(work / "fw.cgfw"),
                ],
                "fw.cgfw",
            ),
        ],
        "firmware verify": [
            Call(
                [
                    "firmware",
                    "verify",
                    str(work / "fw.cgfw"),
                    "--pubkey",
                    str(signing_pub),
                    "--hardware",
                    "hw-1",
                ],
                "1.2.3",
                phase=2,
            ),
        ],
        "firmware push": [
            Call(
                [
                    "firmware",
                    "push",
                    str(work / "fw.cgfw"),
                    "--port",
                    str(work / "no-tty"),
                    "--pubkey",
                    str(signing_pub),
                    "--timeout",
                    "1",
                ],
                "no-tty",
                phase=2,
            ),
        ],
        "platform query": [
            Call(["platform", "query", "--point", "counter/level"], "counter/level")
        ],
        "platform gateways": [
            Call(["platform", "gateways", "--db", db], "gateway"),
            Call(["platform", "gateways", "--db", dead_db], "cannot open"),
        ],
        "platform alarms": [
            Call(["platform", "alarms", "--db", db_query, "--format", "json"], "[")
        ],
        "platform actions": [
            Call(["platform", "actions", "--db", db_query, "--json"], "["),
            Call(["platform", "actions", "--db", dead_db], "cannot open"),
        ],
        "platform devices": [
            Call(["platform", "devices", "--db", db], "device information"),
            Call(["platform", "devices", "--db", dead_db], "cannot open"),
        ],
        "platform dead-letters": [
            Call(
                ["platform", "dead-letters", "--db", db, "--dump", str(work / "dl")], "dead letter"
            )
        ],
        "platform serve": [
            Call(
                [
                    *("platform", "serve", "--db", db, "--log-level", "debug"),
                    *("--listen", f"127.0.0.1:{free_port()}"),
                ],
                "console: serving",
                until="console: serving",
            ),
            Call(["platform", "serve", "--db", dead_db], "cannot open"),
        ],
        # the password typed is a secret too: never echoed, never in the hash's line
        "platform hash-password": [
            Call(["platform", "hash-password"], "$argon2id$", stdin=f"{DB_PW}\n{DB_PW}\n")
        ],
        "platform new-token": [Call(["platform", "new-token", "scada"], "token (shown once)")],
        # CITYGW_BROKER (a password, a closed port) and the config's own secrets
        "platform push-config": [
            Call(
                ["platform", "push-config", "--gateway", "gw-secrets", str(good), "--wait", "2"],
                "cannot send the command",
            )
        ],
        "platform configs": [Call(["platform", "configs", "--db", db], "config version")],
        # after the agents stopped: the doctor's broker steps log in with the password
        "doctor": [
            Call(
                ["doctor", "-c", str(good), "--skip", "devices", "--timeout", "2"],
                "result:",
                phase=2,
            ),
            Call(["doctor", "-c", str(tls), "--timeout", "2"], "result:", phase=2),
            Call(["doctor", "-c", str(bad)], "result:"),
        ],
        "install-service": [Call(["install-service", "-c", str(good), "--dry-run"], "ExecStart")],
        "reload": [
            Call(["reload", "-c", str(bad)], "problem"),
            Call(["reload", "-c", str(good)], "no agent", phase=2),
        ],
        "platform prune": [
            Call(["platform", "prune", "--db", db, "--older-than", "30d", "--yes"], "pruned"),
            Call(["platform", "prune", "--db", db, "--older-than", "30d"], "Delete", stdin="n\n"),
        ],
    }

    tree = _commands()
    assert sorted(set(tree) - set(calls)) == [], "commands this test does not run (add them)"
    assert sorted(set(calls) - set(tree)) == [], "commands this test runs that do not exist"
    for name, cmd in tree.items():
        if any("--log-level" in getattr(p, "opts", ()) for p in cmd.params):
            assert any("debug" in c.args for c in calls[name]), (
                f"{name}: run with --log-level debug"
            )

    everything = [c for group in calls.values() for c in group]
    with ThreadPoolExecutor(max_workers=6) as pool:
        for phase in (1, 2):
            list(
                pool.map(lambda c: _run(c, env, work), [c for c in everything if c.phase == phase])
            )

    # the keys the firmware commands made or read are secrets too
    secrets = [*SECRETS]
    for key_file in (signing_key, work / "k.key"):
        assert key_file.exists(), key_file
        secrets += [line for line in key_file.read_text().splitlines() if not line.startswith("-")]

    problems = []
    for group in calls.values():
        for c in group:
            shown = f"citygw {' '.join(c.args)}"
            if c.expect not in c.output:
                problems.append(f"{shown}: expected {c.expect!r} in its output:\n{c.output}")
            for secret in secrets:
                for line in c.output.splitlines():
                    if secret in line:
                        problems.append(f"{shown}: prints a secret: {line}")
    for config in (good, down, tls):
        path = config.with_suffix(".db")
        if not path.exists():
            problems.append(f"{config.name}: the agent wrote no buffer at {path}")
            continue
        with Buffer.open_readonly(path) as buf:
            snapshot = orjson.dumps(buf.get_state(), default=str).decode()
        if '"agent"' not in snapshot:
            problems.append(f"{config.name}: no agent status snapshot in {snapshot}")
        problems += [f"status snapshot of {config.name}: {s}" for s in secrets if s in snapshot]
    assert not problems, "\n".join(problems)
