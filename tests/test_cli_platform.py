"""`citygw platform query|gateways|alarms|dead-letters` through typer's CliRunner, on a
SQLite store and a PostgreSQL store filled through the Store API."""

from __future__ import annotations

import csv
import io
import json
import math
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import psycopg
import pytest
from typer.testing import CliRunner, Result

from central.cli import app, iso, parse_time
from central.store import AlarmBody, DeadLetter, Store
from central.stores import open_store
from common import wire
from common.broker import free_port
from common.wire import Envelope, GatewayStats, Meta, PointMeta
from native.batch import BAD, GOOD, UNCERTAIN, Batch
from native.stages import AlarmEvent
from tests.conftest import PG_ADMIN_URL

# wide enough that rich never wraps a line or a table cell
runner = CliRunner(env={"COLUMNS": "300", "NO_COLOR": "1"})

STREAM = uuid.UUID(int=0xC1).hex
MINUTE = 60_000
HOUR = 60 * MINUTE


def invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


def meta(gateway: str) -> Meta:
    return Meta(
        gateway=gateway,
        stream=STREAM,
        site=f"site-of-{gateway}",
        points=(
            PointMeta(1, "bridge-7/strain_1", "bridge-7", "strain_1", "µε", "sim"),
            PointMeta(2, "bridge-7/strain_2", "bridge-7", "strain_2", "µε", "sim"),
            PointMeta(3, "bridge-7/temperature", "bridge-7", "temperature", "°C", "sim"),
        ),
    )


def telemetry(seq: int, batch: Batch) -> Envelope:
    return Envelope(wire.LANE_TELEMETRY, STREAM, seq, len(batch), b"")


def alarm_uplink(seq: int, events: list[AlarmEvent]) -> Envelope:
    return Envelope(wire.LANE_ALARM, STREAM, seq, len(events), b"")


@dataclass
class Filled:
    url: str
    now: int
    #: (gateway, ts, value, quality) of bridge-7/strain_1 within the last hour, by gateway/time
    recent_strain_1: list[tuple[str, int, float, int]]
    letters: list[DeadLetter]


def fill(store: Store, now: int) -> Filled:
    """Two gateways with the same point names; readings 3 h ago and in the last 30 min;
    NaN and -0.0 among them; stats, states, two alarm episodes (one active), dead letters."""
    recent: list[tuple[str, int, float, int]] = []
    for g, gateway in enumerate(("gw-1", "gw-2")):
        store.store_meta(gateway, meta(gateway))
        old = Batch.from_rows([(1, now - 3 * HOUR + i, 100.0 + i, GOOD) for i in range(3)])
        store.store_batch(gateway, telemetry(1, old), old)
        rows: list[tuple[int, int, float, int]] = []
        for i in range(10):
            ts = now - 30 * MINUTE + i * MINUTE + g
            value = [0.5 * i, math.nan, -0.0][i % 3] if i < 3 else 10.0 * i + g
            quality = (GOOD, BAD, UNCERTAIN)[i % 3]
            rows.append((1, ts, value, quality))
            rows.append((2, ts, -value, GOOD))
            recent.append((gateway, ts, value, quality))
        b = Batch.from_rows(rows)
        store.store_batch(gateway, telemetry(2, b), b)
    store.store_stats(GatewayStats("gw-1", now - 20_000, 5000, 7, 1, 40, 2, 3))
    store.store_state("gw-1", True, now - 60_000)
    store.store_state("gw-2", True, now - 2 * HOUR)
    store.store_state("gw-2", False, now - HOUR)
    cleared = [
        AlarmEvent(1, "overstrain", "critical", True, now - 50 * MINUTE, 612.5, now - 51 * MINUTE),
        AlarmEvent(1, "overstrain", "critical", False, now - 40 * MINUTE, 550.0, now - 50 * MINUTE),
    ]
    store.store_batch("gw-1", alarm_uplink(3, cleared), AlarmBody(cleared))
    active = [AlarmEvent(2, "stale", "warning", True, now - 5 * MINUTE, math.nan, now - 6 * MINUTE)]
    store.store_batch("gw-2", alarm_uplink(3, active), AlarmBody(active))
    letters = [
        DeadLetter(now - 10_000, "citygw/gw-1/up/batch", "codec", "bad magic", b"\x00garbage", 8),
        DeadLetter(now - 5_000, "citygw/gw-9/up/batch", "envelope", "too short", b"CG", 2),
        DeadLetter(now - 1_000, "citygw/gw-1/up/batch", "gateway", "claims gw-9", b"x" * 64, 10**6),
    ]
    store.store_dead_letters(letters)
    recent.sort(key=lambda r: (r[0], r[1]))
    return Filled("", now, recent, letters)


@pytest.fixture
def filled(store_url: str) -> Iterator[Filled]:
    store = open_store(store_url)
    try:
        f = fill(store, time.time_ns() // 1_000_000)
    finally:
        store.close()
    f.url = store_url
    yield f


def csv_rows(result: Result) -> list[list[str]]:
    assert result.exit_code == 0, result.output
    return list(csv.reader(io.StringIO(result.stdout)))


def json_out(result: Result) -> list[dict[str, object]]:
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert isinstance(data, list)
    return data


# -- query -----------------------------------------------------------------------------------


def test_query_csv_exact(filled: Filled) -> None:
    rows = csv_rows(
        invoke(
            "query",
            "--db",
            filled.url,
            "--point",
            "bridge-7/strain_1",
            "--since",
            "1h",
            "--format",
            "csv",
        )
    )
    assert rows[0] == ["gateway", "point", "time", "value", "quality"]
    names = {GOOD: "good", BAD: "bad", UNCERTAIN: "uncertain"}
    assert rows[1:] == [
        [g, "bridge-7/strain_1", iso(ts), repr(v), names[q]]
        for g, ts, v, q in filled.recent_strain_1
    ]
    assert ["gw-1", "bridge-7/strain_1", iso(filled.recent_strain_1[1][1]), "nan", "bad"] in rows
    assert "-0.0" in [r[3] for r in rows]  # the sign of zero survives both stores


def test_query_json_gateway_limit_and_window(filled: Filled) -> None:
    recent = [r for r in filled.recent_strain_1 if r[0] == "gw-2"]
    got = json_out(
        invoke(
            "query",
            "--db",
            filled.url,
            "--point",
            "bridge-7/strain_1",
            "--since",
            "1h",
            "--gateway",
            "gw-2",
            "--limit",
            "4",
            "--format",
            "json",
        )
    )
    assert [(d["gateway"], d["ts_ms"]) for d in got] == [("gw-2", r[1]) for r in recent[:4]]
    assert got[3]["value"] == recent[3][2] and got[3]["time"] == iso(recent[3][1])
    assert got[1]["value"] is None  # NaN has no JSON spelling
    # an ISO window: the readings of 3 h ago only, --until excluded
    since, until = iso(filled.now - 4 * HOUR), iso(filled.now - 3 * HOUR + 2)
    got = json_out(
        invoke(
            "query",
            "--db",
            filled.url,
            "--point",
            "bridge-7/strain_1",
            "--since",
            since,
            "--until",
            until,
            "--format",
            "json",
        )
    )
    assert [(d["gateway"], d["value"]) for d in got] == [
        ("gw-1", 100.0),
        ("gw-1", 101.0),
        ("gw-2", 100.0),
        ("gw-2", 101.0),
    ]


def test_query_table(filled: Filled) -> None:
    result = invoke("query", "--db", filled.url, "--point", "bridge-7/strain_2", "--since", "2h")
    assert result.exit_code == 0, result.output
    assert "bridge-7/strain_2" in result.stdout and "20 readings" in result.stdout
    assert iso(filled.recent_strain_1[-1][1]) in result.stdout
    # a known point with nothing in the window is not an error
    result = invoke("query", "--db", filled.url, "--point", "bridge-7/temperature")
    assert result.exit_code == 0, result.output
    assert "0 readings" in result.stdout and "none" in result.stdout


def _store_more(url: str, seq: int, rows: list[tuple[int, int, float, int]]) -> None:
    store = open_store(url)
    try:
        b = Batch.from_rows(rows)
        store.store_batch("gw-1", telemetry(seq, b), b)
    finally:
        store.close()


def test_query_table_keeps_numbers_whole_at_80_columns(filled: Filled) -> None:
    # full float64 reprs, the widest a value gets: none may lose a digit to the terminal
    values = [-1234.5678901234567, 0.30000000000000004, 6.02214076e23, -2.2250738585072014e-308]
    ts = filled.now - 10 * MINUTE
    _store_more(filled.url, 10, [(3, ts + i, v, GOOD) for i, v in enumerate(values)])
    narrow = CliRunner(env={"COLUMNS": "80", "NO_COLOR": "1"})
    result = narrow.invoke(
        app, ["query", "--db", filled.url, "--point", "bridge-7/temperature", "--since", "1h"]
    )
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout
    for v in values:
        assert repr(v) in result.stdout


def test_query_until_defaults_to_now(filled: Filled) -> None:
    # a reading stamped an hour ahead (a device clock in the wrong zone) is not "until now"
    ahead = filled.now + HOUR
    _store_more(filled.url, 11, [(3, ahead, 42.25, GOOD)])
    args = ["query", "--db", filled.url, "--point", "bridge-7/temperature", "--since", "2h"]
    assert json_out(invoke(*args, "--format", "json")) == []
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "0 readings" in result.stdout and " .. now" not in result.stdout
    later = json_out(invoke(*args, "--until", iso(ahead + 1), "--format", "json"))
    assert [(d["ts_ms"], d["value"]) for d in later] == [(ahead, 42.25)]


def test_query_unknown_point_suggests(filled: Filled) -> None:
    result = invoke("query", "--db", filled.url, "--point", "bridge-7/strain1")
    assert result.exit_code == 1
    assert "unknown point 'bridge-7/strain1'" in result.stderr
    assert "bridge-7/strain_1" in result.stderr
    assert result.stdout == ""
    result = invoke("query", "--db", filled.url, "--point", "pump-3/level", "--gateway", "gw-1")
    assert result.exit_code == 1 and "unknown point 'pump-3/level' on gateway 'gw-1'" in (
        result.stderr
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--point", "strain_1"], "give device/point"),
        (["--point", "bridge-7/strain_1", "--since", "yesterday"], "--since 'yesterday'"),
        (["--point", "bridge-7/strain_1", "--since", "-5m"], "--since '-5m'"),
        (["--point", "bridge-7/strain_1", "--since", "1h", "--until", "2h"], "must be after"),
    ],
)
def test_query_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'p.db'}")
    store.close()
    result = invoke("query", "--db", f"sqlite:///{tmp_path / 'p.db'}", *args)
    assert result.exit_code == 1, result.output
    assert message in result.stderr


def test_parse_time() -> None:
    now = 1_800_000_000_000
    assert parse_time("90s", now, "--since") == now - 90_000
    assert parse_time("15m", now, "--since") == now - 15 * MINUTE
    assert parse_time("2d", now, "--since") == now - 48 * HOUR
    assert parse_time("250ms", now, "--since") == now - 250
    assert parse_time("2027-01-15T08:00:00Z", now, "--since") == 1_800_000_000_000
    assert parse_time("2027-01-15T09:00:00+01:00", now, "--since") == 1_800_000_000_000
    assert parse_time("2027-01-15T08:00:00", now, "--since") == 1_800_000_000_000  # UTC
    assert iso(1_800_000_000_250) == "2027-01-15T08:00:00.250Z"


# -- the database: missing, unreachable, not a store -------------------------------------------


def test_missing_sqlite_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "platform.db"
    for command in (["query", "--point", "a/b"], ["gateways"], ["alarms"], ["dead-letters"]):
        result = invoke(*command, "--db", f"sqlite:///{path}")
        assert result.exit_code == 2, result.output
        assert f"{path}: no such database" in result.stderr
    assert not path.parent.exists()
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    result = invoke("gateways", "--db", f"sqlite:///{other}")
    assert result.exit_code == 2 and "not a citygw platform store" in result.stderr


def test_bad_urls() -> None:
    result = invoke("gateways", "--db", "mysql://u:secret@h/db")
    assert result.exit_code == 1
    assert "unsupported store URL" in result.stderr and "secret" not in result.stderr
    result = invoke("gateways", "--db", "sqlite:///:memory:")
    assert result.exit_code == 2 and "no such database file" in result.stderr
    result = invoke("gateways", "--db", f"{PG_ADMIN_URL}?schema=a;drop")
    assert result.exit_code == 1 and "invalid schema" in result.stderr


def test_postgres_unreachable_or_not_a_store(pg_url: str) -> None:
    port = free_port()  # nothing listens there
    result = invoke("gateways", "--db", f"postgresql://postgres:pw@127.0.0.1:{port}/test")
    assert result.exit_code == 2, result.output
    assert "cannot open the store" in result.stderr and ":pw@" not in result.stderr
    result = invoke("gateways", "--db", "postgresql://postgres@127.0.0.1:5432/no_such_db_x")
    assert result.exit_code == 2 and "cannot open the store" in result.stderr
    # a schema without a store is reported and left alone (not created)
    result = invoke("alarms", "--db", pg_url)
    assert result.exit_code == 2 and "no citygw platform store in schema" in result.stderr
    schema = pg_url.rsplit("schema=", 1)[1]
    with psycopg.connect(PG_ADMIN_URL) as db:
        row = db.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
    assert row is None


# -- gateways, alarms, dead letters ----------------------------------------------------------


def test_gateways(filled: Filled) -> None:
    result = invoke("gateways", "--db", filled.url)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    gw1 = next(line for line in lines if "gw-1" in line)
    gw2 = next(line for line in lines if "gw-2" in line)
    assert "online since" in gw1 and "site-of-gw-1" in gw1
    assert [c.strip() for c in gw1.split("│")][5:8] == ["40", "7", "3"]
    assert "offline since " + iso(filled.now - HOUR) in gw2
    got = {
        d["gateway"]: d
        for d in json_out(invoke("gateways", "--db", filled.url, "--format", "json"))
    }
    assert set(got) == {"gw-1", "gw-2"}
    assert got["gw-1"]["state"] == "online" and got["gw-1"]["state_since"] == iso(
        filled.now - 60_000
    )
    assert (got["gw-1"]["backlog_points"], got["gw-1"]["evicted_points"]) == (40, 7)
    assert got["gw-1"]["lost_points"] == 3 and got["gw-1"]["last_seen"] is not None
    assert got["gw-2"]["state"] == "offline" and got["gw-2"]["backlog_points"] is None


def test_alarms(filled: Filled) -> None:
    every = json_out(invoke("alarms", "--db", filled.url, "--format", "json"))
    assert [(d["gateway"], d["point"], d["rule"], d["active"]) for d in every] == [
        ("gw-1", "bridge-7/strain_1", "overstrain", False),
        ("gw-2", "bridge-7/strain_2", "stale", True),
    ]
    assert every[0]["duration_ms"] == 10 * MINUTE
    assert every[0]["raised"] == iso(filled.now - 50 * MINUTE)
    assert every[0]["cleared"] == iso(filled.now - 40 * MINUTE)
    active = json_out(invoke("alarms", "--db", filled.url, "--active", "--format", "json"))
    assert [d["gateway"] for d in active] == ["gw-2"]
    result = invoke("alarms", "--db", filled.url, "--gateway", "gw-1")
    assert result.exit_code == 0, result.output
    assert "overstrain" in result.stdout and "10.0 min" in result.stdout
    assert "stale" not in result.stdout
    result = invoke("alarms", "--db", filled.url, "--active")
    assert "active" in result.stdout and "so far" in result.stdout


def test_dead_letters(filled: Filled, tmp_path: Path) -> None:
    rows = csv_rows(invoke("dead-letters", "--db", filled.url, "--format", "csv"))
    assert rows[0] == ["received", "topic", "reason", "error", "size"]
    newest_first = filled.letters[::-1]
    assert [r[2] for r in rows[1:]] == [d.reason for d in newest_first]
    assert rows[1][4] == "1000000 (first 64 kept)" and rows[3][4] == "8"
    result = invoke(
        "dead-letters", "--db", filled.url, "--limit", "2", "--dump", str(tmp_path / "d")
    )
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "d").iterdir())
    assert [f.read_bytes() for f in files] == [d.payload for d in newest_first[:2]]
    assert files[0].name.startswith("0001-") and "-gateway-citygw_gw-1_up_batch" in files[0].name
    assert "wrote 2 payload file(s)" in result.stdout and "claims gw-9" in result.stdout


def test_prune(filled: Filled) -> None:
    def strain_1(since: str) -> list[dict[str, object]]:
        args = ["--point", "bridge-7/strain_1", "--since", since, "--format", "json"]
        result = invoke("query", "--db", filled.url, *args)
        assert result.exit_code == 0, result.output
        return list(orjson.loads(result.stdout))

    before = strain_1("4h")
    assert len(before) == len(filled.recent_strain_1) + 6  # 3 h old ones on both gateways
    # asks first, and a "no" deletes nothing
    result = runner.invoke(app, ["prune", "--db", filled.url, "--older-than", "2h"], input="n\n")
    assert result.exit_code == 1 and "Aborted" in result.output
    assert strain_1("4h") == before
    result = invoke("prune", "--db", filled.url, "--older-than", "2h", "--yes")
    assert result.exit_code == 0, result.output
    assert "dead_letters" in result.stdout and "alarms" in result.stdout
    # the recent readings and the active alarm stay (whether the 3 h old readings go
    # depends on PostgreSQL's day partitions: prune drops whole days only)
    assert len(strain_1("1h")) == len(filled.recent_strain_1)
    assert "stale" in invoke("alarms", "--db", filled.url, "--active").stdout
    assert invoke("prune", "--db", filled.url, "--older-than", "0s", "--yes").exit_code == 1
    assert invoke("prune", "--db", filled.url, "--older-than", "soon", "--yes").exit_code == 1


def test_devices(store_url: str) -> None:
    """`citygw platform devices` (issue 13): what the gateways last reported of their
    devices' information in up/stats."""
    store = open_store(store_url)
    try:
        assert "device information: 0 entries of 0 devices: none" in (
            invoke("devices", "--db", store_url).stdout
        )
        store.store_stats(
            GatewayStats(
                "gw-1",
                1_800_000_000_000,
                0,
                0,
                0,
                0,
                0,
                0,
                {"meter-1": {"serial": "SN-4711", "firmware": "1.02"}, "display": {"raw": "beef"}},
            )
        )
        store.store_stats(
            GatewayStats("gw-2", 1_800_000_000_500, 0, 0, 0, 0, 0, 0, {"tag": {"text": "µε ☃"}})
        )
    finally:
        store.close()
    rows = csv_rows(invoke("devices", "--db", store_url, "--format", "csv"))
    t1, t2 = iso(1_800_000_000_000), iso(1_800_000_000_500)
    assert rows == [
        ["gateway", "device", "name", "value", "since"],
        ["gw-1", "display", "raw", "beef", t1],
        ["gw-1", "meter-1", "firmware", "1.02", t1],
        ["gw-1", "meter-1", "serial", "SN-4711", t1],
        ["gw-2", "tag", "text", "µε ☃", t2],
    ]
    got = json_out(invoke("devices", "--db", store_url, "--gateway", "gw-2", "--format", "json"))
    assert got == [
        {
            "gateway": "gw-2",
            "device": "tag",
            "name": "text",
            "value": "µε ☃",
            "since": t2,
            "since_ms": 1_800_000_000_500,
        }
    ]
    table = invoke("devices", "--db", store_url)
    assert table.exit_code == 0, table.output
    assert "device information: 4 entries of 3 devices" in table.stdout
    assert "SN-4711" in table.stdout and "µε ☃" in table.stdout
