"""The console's HTTP API (central/console/app.py) on both stores: who may do what, every
refusal (401, 403, 404, 400, 409, 415, 429; never a trace), and what each view returns for
data fed through the ingest's own store calls."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from starlette.testclient import TestClient

from central.configs import ConfigPushRecord
from central.console.app import create_app
from central.console.auth import Accounts, hash_password, token_hash
from central.console.config import ConsoleConfig, load_console_config
from central.console.serve import Listen, ServeRefused, build, check_exposure
from central.store import AlarmBody, Store
from central.stores import open_store
from common import wire
from common.wire import Envelope, GatewayStats, Meta, PointMeta
from native.batch import BAD, GOOD, UNAVAILABLE, Batch
from native.stages import AlarmEvent
from tests.helpers import GW, STREAM

CONFIG_HASH = "sha256:" + "c" * 64

PASSWORDS = {"vera": "viewer-pass-1", "otto": "operator-pass-1"}
TOKEN = "tok-" + "x" * 40
T0 = 1_800_000_000_000  # readings at T0 + i minutes
MINUTE = 60_000


@pytest.fixture(scope="module")
def hashes() -> dict[str, str]:
    return {name: hash_password(pw) for name, pw in PASSWORDS.items()}


def write_config(path: Path, hashes: dict[str, str]) -> Path:
    path.write_text(
        f"""
[[users]]
name = "vera"
role = "viewer"
password_hash = "{hashes["vera"]}"

[[users]]
name = "otto"
role = "operator"
password_hash = "{hashes["otto"]}"

[[tokens]]
name = "scada-bridge"
role = "operator"
token_hash = "{token_hash(TOKEN)}"
"""
    )
    return path


def feed(store: Store) -> None:
    """A gateway with a level point (and its :max aggregate), readings over an hour, an
    alarm raised and cleared, stats; a second gateway that was never heard from but named."""
    store.store_meta(
        GW,
        Meta(
            gateway=GW,
            stream=STREAM,
            site="district-3",
            location={"lat": 52.52, "lon": 13.40},
            points=(
                PointMeta(1, "kerb-1/level", "kerb-1", "level", "cm", "sim"),
                PointMeta(2, "kerb-1/level:max", "kerb-1", "level:max", "cm", "sim"),
            ),
            config={"version": "2026-12", "hash": CONFIG_HASH},
        ),
    )
    pushed = ConfigPushRecord(
        0, GW, "push-1", "2026-12", CONFIG_HASH, "[gateway]\n", "ops@desk", T0, "sent", None, None
    )
    store.config_push_answered(store.config_push_record(pushed), "applied", None, T0 + 1)
    b = Batch()
    for i in range(60):
        q = BAD if i == 10 else UNAVAILABLE if i == 11 else GOOD
        b.append(1, T0 + i * MINUTE, math.nan if q == UNAVAILABLE else float(i), q)
    b.append(2, T0 + 59 * MINUTE, 59.0, GOOD)
    assert store.store_batch(GW, Envelope(wire.LANE_TELEMETRY, STREAM, 1, len(b), b""), b)
    events = [
        AlarmEvent(1, "high", "critical", True, T0 + 30 * MINUTE, 30.0, T0 + 30 * MINUTE),
        AlarmEvent(1, "high", "critical", False, T0 + 40 * MINUTE, 5.0, T0 + 30 * MINUTE),
    ]
    env = Envelope(wire.LANE_ALARM, STREAM, 2, len(events), b"")
    assert store.store_batch(GW, env, AlarmBody(events))
    store.store_stats(GatewayStats(GW, T0 + 60 * MINUTE, 100, 3, 1, 7, 1, 2))
    store.store_state(GW, True, T0)


def fed(url: str) -> None:
    """The store at `url`, created as the ingest does and fed."""
    s = open_store(url)
    try:
        feed(s)
    finally:
        s.close()


@pytest.fixture
def client(store_url: str, tmp_path: Path, hashes: dict[str, str]) -> Iterator[TestClient]:
    fed(store_url)
    config = load_console_config(write_config(tmp_path / "console.toml", hashes))
    console = build(store_url, config, connections=2)
    try:
        app = create_app(console)
        with TestClient(app, base_url="http://127.0.0.1:8080", raise_server_exceptions=False) as c:
            yield c
    finally:
        console.pool.close()


def login(client: TestClient, user: str) -> str:
    r = client.post("/api/login", json={"user": user, "password": PASSWORDS[user]})
    assert r.status_code == 200, r.text
    assert r.json()["user"] == user
    return str(r.json()["csrf"])


def error(r: httpx2.Response, status: int) -> str:
    """The refusal's message; it must have the status and no trace of the server's code."""
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text and 'File "' not in r.text
    return str(r.json()["error"])


def event_id(client: TestClient) -> int:
    r = client.get("/api/events", params={"state": "open"})
    assert r.status_code == 200, r.text
    (event,) = r.json()["events"]
    return int(event["id"])


# -- who may do what --------------------------------------------------------------------------


def test_everything_needs_a_login(client: TestClient) -> None:
    for path in ("/api/overview", "/api/gateways", "/api/events", "/api/points", "/api/session"):
        assert "log in" in error(client.get(path), 401)
    assert client.get("/api/health").status_code == 200  # the load balancer's probe
    r = client.get("/")
    assert r.status_code == 200 and "<html" in r.text.lower()
    assert "default-src 'self'" in r.headers["content-security-policy"]


def test_login_session_csrf_and_logout(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="citygw.console")
    assert "wrong user name or password" in error(
        client.post("/api/login", json={"user": "otto", "password": "nope-nope"}), 401
    )
    assert "wrong user name" in error(
        client.post("/api/login", json={"user": "nobody", "password": "x"}), 401
    )
    csrf = login(client, "otto")
    cookie = client.cookies.get("citygw_session")
    assert cookie
    assert client.get("/api/session").json() == {"user": "otto", "role": "operator", "csrf": csrf}
    eid = event_id(client)
    # a change without the session's CSRF token is refused, with a wrong one too
    assert "CSRF" in error(client.post(f"/api/events/{eid}/ack", json={}), 403)
    assert "CSRF" in error(
        client.post(f"/api/events/{eid}/ack", json={}, headers={"x-csrf-token": "forged"}), 403
    )
    r = client.post(f"/api/events/{eid}/ack", json={}, headers={"x-csrf-token": csrf})
    assert r.status_code == 200, r.text
    assert r.json()["event"]["acked_by"] == "otto"
    assert client.post("/api/logout", headers={"x-csrf-token": csrf}).status_code == 200
    client.cookies.set("citygw_session", cookie)  # the old cookie is worth nothing now
    error(client.get("/api/session"), 401)
    logged = caplog.text
    assert "nope-nope" not in logged and PASSWORDS["otto"] not in logged
    assert "login refused" in logged and cookie not in logged


def test_a_viewer_only_looks(client: TestClient) -> None:
    csrf = login(client, "vera")
    eid = event_id(client)
    for action in ("ack", "resolve"):
        message = error(
            client.post(f"/api/events/{eid}/{action}", json={}, headers={"x-csrf-token": csrf}),
            403,
        )
        assert message == "vera is a viewer; this needs the role operator"
    assert client.get(f"/api/events/{eid}").json()["event"]["state"] == "raised"


def test_bearer_tokens(client: TestClient) -> None:
    auth = {"authorization": f"Bearer {TOKEN}"}
    eid = event_id_with(client, auth)
    r = client.post(f"/api/events/{eid}/ack", json={}, headers=auth)  # no cookie: no CSRF
    assert r.status_code == 200 and r.json()["event"]["acked_by"] == "scada-bridge"
    assert "invalid bearer token" in error(
        client.get("/api/overview", headers={"authorization": "Bearer nope"}), 401
    )


def event_id_with(client: TestClient, headers: dict[str, str]) -> int:
    r = client.get("/api/events", headers=headers)
    assert r.status_code == 200, r.text
    return int(r.json()["events"][0]["id"])


def test_failed_logins_are_throttled(client: TestClient) -> None:
    for _ in range(5):
        error(client.post("/api/login", json={"user": "otto", "password": "guess"}), 401)
    assert "too many failed logins" in error(
        client.post("/api/login", json={"user": "otto", "password": PASSWORDS["otto"]}), 429
    )


def test_listening_beyond_loopback_needs_users(hashes: dict[str, str], tmp_path: Path) -> None:
    nobody = Accounts([], [])
    check_exposure(Listen.parse("127.0.0.1:8080"), nobody)
    check_exposure(Listen.parse("localhost:8080"), nobody)
    with pytest.raises(ServeRefused, match=r"refusing to listen on 0\.0\.0\.0"):
        check_exposure(Listen.parse("0.0.0.0:8080"), nobody)
    config = load_console_config(write_config(tmp_path / "c.toml", hashes))
    check_exposure(Listen.parse("0.0.0.0:8080"), Accounts(config.users, config.tokens))
    with pytest.raises(ValueError, match="HOST:PORT"):
        Listen.parse("8080")


# -- the event lifecycle through the API ------------------------------------------------------


def test_event_lifecycle(client: TestClient) -> None:
    csrf = login(client, "otto")
    h = {"x-csrf-token": csrf}
    eid = event_id(client)
    event = client.get(f"/api/events/{eid}").json()["event"]
    assert (event["state"], event["cleared_ts"]) == ("raised", T0 + 40 * MINUTE)  # clear: shown
    assert client.post(f"/api/events/{eid}/ack", json={}, headers=h).status_code == 200
    assert "acknowledged" in error(client.post(f"/api/events/{eid}/ack", json={}, headers=h), 409)
    assert "assignee: required" in error(
        client.post(f"/api/events/{eid}/assign", json={}, headers=h), 400
    )
    r = client.post(
        f"/api/events/{eid}/assign", json={"assignee": "crew-4", "note": "pump truck"}, headers=h
    )
    assert r.json()["event"]["state"] == "handling"
    assert "note: required" in error(
        client.post(f"/api/events/{eid}/note", json={}, headers=h), 400
    )
    assert "longer than 2000" in error(
        client.post(f"/api/events/{eid}/note", json={"note": "x" * 2001}, headers=h), 400
    )
    r = client.post(f"/api/events/{eid}/resolve", json={"note": "drained"}, headers=h)
    assert r.json()["event"]["state"] == "resolved" and r.json()["event"]["resolved_by"] == "otto"
    detail = client.get(f"/api/events/{eid}").json()
    assert [a["action"] for a in detail["actions"]] == [
        "raised",
        "cleared",
        "acknowledged",
        "assigned",
        "resolved",
    ]
    assert "resolved" in error(
        client.post(f"/api/events/{eid}/note", json={"note": "x"}, headers=h), 409
    )
    assert client.get("/api/events").json()["events"] == []  # open ones by default
    assert len(client.get("/api/events", params={"state": "resolved"}).json()["events"]) == 1
    assert "no event 999999" in error(client.get("/api/events/999999"), 404)
    assert "no event 999999" in error(
        client.post("/api/events/999999/ack", json={}, headers=h), 404
    )
    assert "not a number" in error(client.get("/api/events/abc"), 400)
    assert "no event action 'close'" in error(
        client.post(f"/api/events/{eid}/close", json={}, headers=h), 404
    )
    assert "JSON" in error(
        client.post(f"/api/events/{eid}/note", content=b"note=x", headers=h), 415
    )
    assert "not valid JSON" in error(
        client.post(
            f"/api/events/{eid}/note",
            content=b"{nope",
            headers={**h, "content-type": "application/json"},
        ),
        400,
    )


# -- views and their parameters ---------------------------------------------------------------


def test_overview_and_fleet(client: TestClient) -> None:
    login(client, "vera")
    o = client.get("/api/overview").json()
    assert o["fleet"]["gateways"] == 1 and o["fleet"]["online"] == 1
    assert o["vitals"] and all(v["level"] in ("ok", "warn", "alarm", "none") for v in o["vitals"])
    assert o["events"]["open_by_severity"] == {"critical": 1}
    (row,) = client.get("/api/gateways").json()["gateways"]
    assert row["gateway"] == GW and row["stats"]["lost_points"] == 2 and row["open_events"] == 1
    assert client.get("/api/gateways", params={"q": "nomatch"}).json()["gateways"] == []
    assert client.get("/api/gateways", params={"state": "offline"}).json()["gateways"] == []
    assert "sort: 'size' is not one of" in error(
        client.get("/api/gateways", params={"sort": "size"}), 400
    )
    assert (row["config_version"], row["config_hash"]) == ("2026-12", CONFIG_HASH)
    assert client.get("/api/gateways", params={"q": "2026-12"}).json()["gateways"] == [row]
    page = client.get(f"/api/gateways/{GW}").json()
    assert page["gateway"]["location"] == {"lat": 52.52, "lon": 13.40}
    [seen] = page["configs"]["seen"]
    assert (seen["version"], seen["running"]) == ("2026-12", True)
    [push] = page["configs"]["pushes"]
    assert (push["outcome"], push["pushed_by"]) == ("applied", "ops@desk")
    assert "text" not in push  # up to 256 KiB each: `citygw platform configs` has them
    assert [e["rule"] for e in page["events"]] == ["high"]
    assert "no gateway 'gw-nope'" in error(client.get("/api/gateways/gw-nope"), 404)


def test_points_series_and_csv(client: TestClient) -> None:
    login(client, "vera")
    found = client.get("/api/points", params={"q": "LEVEL"}).json()["points"]
    assert {p["key"] for p in found} == {"kerb-1/level", "kerb-1/level:max"}
    q = {"gateway": GW, "point": "kerb-1/level", "since": str(T0), "until": str(T0 + 3_600_000)}
    raw = client.get("/api/series", params={**q, "width": "1000"}).json()
    assert raw["bucket_ms"] == 0 and len(raw["t"]) == 60 and raw["unit"] == "cm"
    assert raw["min"][10] is None and raw["min"][11] is None and raw["max"][59] == 59.0
    assert raw["related"] == ["kerb-1/level:max"]
    assert [(a["raised_ts"], a["cleared_ts"]) for a in raw["alarms"]] == [
        (T0 + 30 * MINUTE, T0 + 40 * MINUTE)
    ]
    r = client.get("/api/series.csv", params=q)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    lines = r.text.splitlines()
    assert lines[0] == "time,ts_ms,value,quality" and len(lines) == 61
    assert lines[12].endswith(",,unavailable")
    for params, status, message in (
        ({**q, "since": "yesterday-ish"}, 400, "since: 'yesterday-ish': give a duration"),
        ({**q, "until": str(T0 - 1)}, 400, "is not after since"),
        ({**q, "width": "5"}, 400, "width: 5 is outside 100..4000"),
        ({**q, "width": "wide"}, 400, "width: 'wide' is not an integer"),
        ({"point": "kerb-1/level"}, 400, "gateway: required"),
        ({**q, "point": "kerb-1/nope"}, 404, f"no point 'kerb-1/nope' on gateway '{GW}'"),
        ({**q, "gateway": "gw-nope"}, 404, "no gateway 'gw-nope'"),
    ):
        assert message in error(client.get("/api/series", params=params), status)
    assert "no point" in error(client.get("/api/series.csv", params={**q, "point": "x/y"}), 404)
    assert error(client.get("/api/nothing-here"), 404)


def test_series_downsampled(store_url: str, client: TestClient) -> None:
    s = open_store(store_url)
    try:
        b = Batch()
        for i in range(5000):  # 1 Hz after the minute series
            b.append(1, T0 + 3_600_000 + i * 1000, float(i % 100), GOOD)
        assert s.store_batch(GW, Envelope(wire.LANE_TELEMETRY, STREAM, 3, len(b), b""), b)
        for _ in range(10):
            if s.roll_up(10_000) == 0:
                break
    finally:
        s.close()
    login(client, "vera")
    r = client.get(
        "/api/series",
        params={
            "gateway": GW,
            "point": "kerb-1/level",
            "since": str(T0 + 3_600_000),
            "until": str(T0 + 3_600_000 + 5_000_000),
            "width": "100",
        },
    ).json()
    assert r["bucket_ms"] == 60_000 and len(r["t"]) <= 100
    assert min(x for x in r["min"] if x is not None) == 0.0
    assert max(x for x in r["max"] if x is not None) == 99.0
    assert sum(r["n"]) == 5000


def test_an_internal_error_is_logged_not_shown(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    login(client, "vera")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire at /var/secret/path")

    from central.store_postgres import PostgresStore
    from central.store_sqlite import SqliteStore

    monkeypatch.setattr(SqliteStore, "find_points", broken)
    monkeypatch.setattr(PostgresStore, "find_points", broken)
    r = client.get("/api/points", params={"q": "x"})
    assert error(r, 500) == "internal error (logged on the server)"
    assert "disk on fire" not in r.text
    assert "disk on fire" in caplog.text


def test_without_users_on_loopback_everyone_is_the_local_admin(store_url: str) -> None:
    fed(store_url)
    console = build(store_url, ConsoleConfig(), connections=1)
    try:
        with TestClient(create_app(console), base_url="http://127.0.0.1:8080") as client:
            assert client.get("/api/session").json() == {
                "user": "local",
                "role": "admin",
                "csrf": None,
            }
            assert "no users are configured" in error(
                client.post("/api/login", json={"user": "x", "password": "y"}), 400
            )
            eid = event_id(client)
            # what a page of another site would send: refused by its Origin
            r = client.post(
                f"/api/events/{eid}/ack", json={}, headers={"origin": "http://evil.example"}
            )
            assert "another site (http://evil.example)" in error(r, 403)
            r = client.post(
                f"/api/events/{eid}/ack", json={}, headers={"origin": "http://127.0.0.1:8080"}
            )
            assert r.status_code == 200 and r.json()["event"]["acked_by"] == "local"
    finally:
        console.pool.close()


def test_the_cli_makes_password_hashes_and_tokens() -> None:
    from argon2 import PasswordHasher
    from typer.testing import CliRunner

    from central.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["hash-password"], input="long-enough-1\nlong-enough-1\n")
    assert r.exit_code == 0, r.output
    assert PasswordHasher().verify(r.output.strip().splitlines()[-1], "long-enough-1")
    r = runner.invoke(app, ["hash-password"], input="short\nshort\n")
    assert r.exit_code == 1 and "shorter than 8" in r.output
    r = runner.invoke(app, ["new-token", "scada", "--role", "operator"])
    assert r.exit_code == 0, r.output
    token = r.output.split("token (shown once): ")[1].split()[0]
    assert f'token_hash = "{token_hash(token)}"' in r.output and 'role = "operator"' in r.output
    assert runner.invoke(app, ["new-token", "x", "--role", "boss"]).exit_code == 1


def test_sessions_expire_and_the_expired_go(store: Store) -> None:
    from central.sessions import Session

    store.session_open("old", Session("ana", "viewer", "c1", 1_000), 500)
    assert store.session_get("old", 999) is not None
    assert store.session_get("old", 1_000) is None  # expired: worth nothing
    store.session_open("new", Session("bob", "operator", "c2", 9_000), 2_000)  # sweeps
    store.session_close("new")
    for sid in ("old", "new"):
        assert store.session_get(sid, 0) is None  # gone from the store, not just expired
