"""Fleet (issue 14): up/meta's software and device locations, up/stats' device health on
the wire (older gateways' messages still decode), in both stores (`fleet`,
`gateway_devices`), and sent by a running agent."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from importlib.metadata import version
from pathlib import Path

import orjson
import pytest

from agent.config import parse_config
from agent.runtime import Agent
from central.store import Store, StoreMissing
from central.stores import open_store
from central.worker import IngestWorker
from cli.loopback import LoopbackLink
from common import wire
from tests.helpers import wait_until

GW = "gw-fleet"
STREAM = "0123456789abcdef0123456789abcdef"


def meta(**extra: object) -> wire.Meta:
    return wire.Meta(
        gateway=GW,
        stream=STREAM,
        points=(
            wire.PointMeta(1, "meter/power", "meter", "power", "W", "modbus"),
            wire.PointMeta(2, "meter/energy", "meter", "energy", "kWh", "modbus"),
            wire.PointMeta(3, "lamp/level", "lamp", "level", "%", "sim"),
        ),
        site="north",
        location={"lat": 52.5, "lon": 13.4},
        **extra,  # type: ignore[arg-type]
    )


def stats(ts: int, health: wire.DeviceHealthMap | None, **counters: int) -> wire.GatewayStats:
    values = dict.fromkeys(wire.STATS_FIELDS[1:], 0) | counters
    return wire.GatewayStats(gateway=GW, ts=ts, health=health, **values)


HEALTH = {
    "meter": wire.DeviceStatus(False, 1_000, "timeout: no answer from unit 1"),
    "lamp": wire.DeviceStatus(True, 900),
}


# -- wire -----------------------------------------------------------------------------------


def test_meta_round_trip_with_software_and_locations() -> None:
    m = meta(software="1.2.3", locations={"lamp": {"lat": -33.9, "lon": 151.2}})
    got = wire.decode_meta(wire.encode_meta(m))
    assert got == m
    assert (got.software, got.locations) == ("1.2.3", {"lamp": {"lat": -33.9, "lon": 151.2}})


def test_an_older_gateways_meta_and_stats_still_decode() -> None:
    old_meta = meta().to_dict()
    assert "software" not in old_meta and "locations" not in old_meta
    got = wire.decode_meta(orjson.dumps(old_meta))
    assert (got.software, got.locations) == (None, None)
    old_stats = {"v": 1, "gateway": GW, **dict.fromkeys(wire.STATS_FIELDS, 5)}
    decoded = wire.decode_stats(orjson.dumps(old_stats))
    assert (decoded.health, decoded.devices, decoded.lost_points) == (None, None, 5)


def test_stats_round_trip_with_health() -> None:
    s = stats(2_000, HEALTH)
    assert wire.decode_stats(wire.encode_stats(s)) == s
    # an unhealthy device's error missing: empty
    obj = orjson.loads(wire.encode_stats(s))
    del obj["health"]["lamp"]["error"]
    assert wire.decode_stats(orjson.dumps(obj)).health == HEALTH


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("locations", {"lamp": {"lat": 91, "lon": 0}}, "'lat' must be a number in -90..90"),
        ("locations", {"lamp": {"lat": 1}}, "'lon' must be a number in -180..180"),
        ("locations", {"lamp": {"lat": True, "lon": 0}}, "'lat' must be a number"),
        ("locations", {"": {"lat": 1, "lon": 0}}, "is not a name"),
        ("locations", ["lamp"], "'locations' must be an object"),
        ("software", 3, "'software' must be a string"),
        ("software", "1\x00", "NUL"),
    ],
)
def test_bad_meta_fields_are_refused(field: str, value: object, message: str) -> None:
    obj = meta().to_dict() | {field: value}
    with pytest.raises(wire.WireError, match=message):
        wire.decode_meta(orjson.dumps(obj))


@pytest.mark.parametrize(
    ("health", "message"),
    [
        ({"a": {"healthy": 1, "since": 1}}, "'healthy' must be true or false"),
        ({"a": {"healthy": True}}, "'since' must be an integer"),
        ({"a": {"healthy": True, "since": 1, "error": 3}}, "'error' must be a string"),
        ({"a": {"healthy": False, "since": 1, "error": "x" * 257}}, "at most 256"),
        ({"a": "ok"}, "must be an object"),
        (["a"], "'health' must be an object"),
    ],
)
def test_bad_health_is_refused(health: object, message: str) -> None:
    obj = orjson.loads(wire.encode_stats(stats(1, None))) | {"health": health}
    with pytest.raises(wire.WireError, match=message):
        wire.decode_stats(orjson.dumps(obj))


def test_bound_health_cuts_errors_and_keeps_within_its_budget() -> None:
    long = "é" * 200 + "\x00tail"  # 400 bytes before the NUL
    got, left_out = wire.bound_health({"a": wire.DeviceStatus(False, 1, long)})
    assert left_out == [] and got["a"].error == "é" * (wire.MAX_HEALTH_ERROR_BYTES // 2)
    got, _ = wire.bound_health({"a": wire.DeviceStatus(False, 1, "bad \ud800 text")})
    assert got["a"].error == "bad ? text"
    many = {f"dev-{i:04d}": wire.DeviceStatus(False, 1, "e" * 300) for i in range(400)}
    got, left_out = wire.bound_health(many)
    assert left_out and len(got) + len(left_out) == 400
    assert sorted(got) == sorted(many)[: len(got)]  # name order, the rest left out
    assert (
        len(
            orjson.dumps(
                {d: {"healthy": False, "since": 1, "error": h.error} for d, h in got.items()}
            )
        )
        <= wire.MAX_HEALTH_BYTES
    )
    # what it leaves fits the message beside the largest device information
    wire.decode_stats(wire.encode_stats(stats(1, got)))


# -- stores ---------------------------------------------------------------------------------


def test_stores_keep_software_locations_and_health(store: Store, store_url: str) -> None:
    store.store_meta(GW, meta(software="1.2.3", locations={"lamp": {"lat": 1.5, "lon": 2.5}}))
    store.store_stats(stats(2_000, HEALTH, evicted_points=7))
    store.store_state(GW, True, 5_000)
    store.store_meta("gw-old", wire.Meta("gw-old", STREAM, ()))  # before issue 14
    store.store_stats(
        wire.GatewayStats("gw-old", 1, 0, 0, 0, 0, 0, 0, devices={"x": {"serial": "S1"}})
    )
    fleet = {row.gateway: row for row in store.fleet()}
    assert list(fleet) == [GW, "gw-old"]
    assert store.fleet("gw-old") == [fleet["gw-old"]] and store.fleet("gw-nope") == []
    row = fleet[GW]
    assert (row.site, row.location, row.software) == ("north", {"lat": 52.5, "lon": 13.4}, "1.2.3")
    assert (row.state, row.state_ms) == ("online", 5_000)
    assert row.stats is not None and row.stats.evicted_points == 7
    assert (row.devices_total, row.devices_healthy, row.open_events) == (2, 1, 0)
    old = fleet["gw-old"]
    assert (old.software, old.location, old.devices_total, old.devices_healthy) == (
        None,
        None,
        0,
        0,
    )

    devices = store.gateway_devices(GW)
    assert [d.device for d in devices] == ["lamp", "meter"]
    lamp, meter = devices
    assert (lamp.healthy, lamp.since_ms, lamp.error) == (True, 900, "")
    assert lamp.location == {"lat": 1.5, "lon": 2.5} and meter.location is None
    assert (meter.healthy, meter.error) == (False, "timeout: no answer from unit 1")
    assert [p.key for p in meter.points] == ["meter/energy", "meter/power"]
    assert meter.points[1].unit == "W" and meter.points[1].point_id == 1
    (x,) = store.gateway_devices("gw-old")  # known by its information only
    assert (x.device, x.healthy, x.since_ms, x.info, x.points) == (
        "x",
        None,
        None,
        {"serial": "S1"},
        [],
    )
    assert store.gateway_devices("nobody") == []

    # an older report changes nothing; a newer one is the whole of it
    store.store_stats(stats(1_500, {"meter": wire.DeviceStatus(True, 1_400)}))
    assert store.gateway_devices(GW)[1].healthy is False
    store.store_stats(stats(3_000, {"meter": wire.DeviceStatus(True, 2_500)}))
    assert [(d.device, d.healthy, d.since_ms) for d in store.gateway_devices(GW)] == [
        ("lamp", None, None),
        ("meter", True, 2_500),
    ]
    # a report without health (a downgraded gateway) keeps the last known health
    store.store_stats(stats(4_000, None))
    assert store.fleet()[0].devices_healthy == 1

    reader = open_store(store_url, create=False)
    try:
        assert reader.fleet() == store.fleet()
    finally:
        reader.close()


# -- the agent ------------------------------------------------------------------------------

AGENT_CONFIG = """
[gateway]
id = "{gw}"
[uplink]
broker = "mqtt://127.0.0.1"
stats_interval = "1h"
[buffer]
path = "{buffer}"
flush_interval = "50ms"
[[devices]]
name = "good"
driver = "sim"
poll = "50ms"
location = {{ lat = 48.1, lon = 11.6 }}
  [[devices.points]]
  name = "p"
[[devices]]
name = "broken"
driver = "sim"
poll = "50ms"
fail_probability = 1.0
  [[devices.points]]
  name = "p"
"""


def test_the_agent_sends_software_locations_and_health(tmp_path: Path) -> None:
    """A sim device that never answers: up/stats goes at once (not after the hour's
    stats_interval) and the platform shows it unhealthy with its error."""
    store = open_store(f"sqlite:///{tmp_path / 'platform.db'}")
    worker = IngestWorker("mqtt://127.0.0.1", store, group=None)
    cfg = parse_config(AGENT_CONFIG.format(gw=GW, buffer=tmp_path / "buf.db"), source="gw.toml")
    started = time.time_ns() // 1_000_000
    agent = Agent(cfg, connect=LoopbackLink(worker.deliver).connect)

    def unhealthy() -> bool:
        rows = store.gateway_devices(GW)
        return any(d.device == "broken" and d.healthy is False for d in rows)

    async def main() -> None:
        await agent.start()
        try:
            await wait_until(unhealthy, timeout=20.0)
        finally:
            await agent.stop()

    asyncio.run(main())
    try:
        (row,) = store.fleet()
        assert row.software == version("citygw")
        assert (row.devices_total, row.devices_healthy) == (2, 1)
        broken, good = store.gateway_devices(GW)
        assert broken.error == "simulated timeout: device did not answer"
        assert broken.since_ms is not None and broken.since_ms >= started
        assert (good.healthy, good.error, good.location) == (True, "", {"lat": 48.1, "lon": 11.6})
        assert good.since_ms is not None and started <= good.since_ms
        assert broken.location is None and [p.key for p in good.points] == ["good/p"]
    finally:
        store.close()


# -- stores of an older citygw --------------------------------------------------------------


def test_sqlite_readers_need_the_fleet_columns_and_table(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    store = open_store(f"sqlite:///{path}")
    store.store_meta(GW, meta())
    store.close()
    with sqlite3.connect(path) as db:  # as a citygw before issue 14 left it
        db.execute("DROP TABLE device_health")
        db.execute("ALTER TABLE gateways DROP COLUMN software")
        db.execute("ALTER TABLE gateways DROP COLUMN locations")
    with pytest.raises(StoreMissing, match="older citygw"):
        open_store(f"sqlite:///{path}", create=False)
    open_store(f"sqlite:///{path}").close()  # the ingest upgrades it
    reader = open_store(f"sqlite:///{path}", create=False)
    try:
        (row,) = reader.fleet()
        assert (row.gateway, row.site, row.software, row.devices_total) == (GW, "north", None, 0)
    finally:
        reader.close()


def test_postgres_ingest_adds_the_fleet_columns_and_table(pg_url: str) -> None:
    import psycopg
    from psycopg import sql

    from central.store_postgres import split_url

    store = open_store(pg_url)
    store.store_meta(GW, meta())
    store.close()
    conninfo, schema = split_url(pg_url)
    with psycopg.connect(conninfo, autocommit=True) as db:  # a schema 4 store before issue 14
        db.execute(sql.SQL("DROP TABLE {}.device_health").format(sql.Identifier(schema)))
        for column in ("software", "locations"):
            db.execute(
                sql.SQL("ALTER TABLE {}.gateways DROP COLUMN {}").format(
                    sql.Identifier(schema), sql.Identifier(column)
                )
            )
    store = open_store(pg_url)  # the ingest
    try:
        store.store_stats(stats(1, HEALTH))
        (row,) = store.fleet()
        assert (row.site, row.software, row.devices_total, row.devices_healthy) == (
            "north",
            None,
            2,
            1,
        )
    finally:
        store.close()
