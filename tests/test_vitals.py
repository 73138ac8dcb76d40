"""Vital signs (central/console/vitals.py) evaluated on both stores with known data:
values, texts and levels by thresholds and direction, selections, and the defaults."""

from __future__ import annotations

import math
import time

import pytest

from central.console.config import VitalConfig
from central.console.vitals import (
    DEFAULT_VITALS,
    FLEET_KINDS,
    Vital,
    chosen,
    evaluate_one,
    level,
)
from central.store import AlarmBody, Store
from common import wire
from native.batch import BAD, GOOD, Batch
from native.stages import AlarmEvent

MIN = 60_000
STREAM = "00000000000000000000000000000001"


def evaluate(store: Store, vitals: list[VitalConfig], now: int) -> list[Vital]:
    """What the overview shows, one vital after the other (the console runs them at once)."""
    fleet = store.fleet()
    return [
        evaluate_one(store, v, now, fleet if v.kind in FLEET_KINDS else None)
        for v in chosen(vitals)
    ]


def vital(**fields: object) -> VitalConfig:
    return VitalConfig.model_validate({"id": "v", "name": "V", **fields})


def fill(store: Store, now: int) -> None:
    """gw-1 (north, online): temperature 31 (newest good finite), humidity 80; gw-2 (south,
    offline): temperature 25; gw-3 (north, online): temperature 40, older than 10 min."""
    sites = {"gw-1": "north", "gw-2": "south", "gw-3": "north"}
    for gw, site in sites.items():
        store.store_meta(
            gw,
            wire.Meta(
                gw,
                STREAM,
                (
                    wire.PointMeta(1, "s/temperature", "s", "temperature", "°C"),
                    wire.PointMeta(2, "s/humidity", "s", "humidity", "%"),
                ),
                site=site,
            ),
        )
        store.store_state(gw, gw != "gw-2", now)
    readings = {
        "gw-1": [
            (1, now - 5 * MIN, 20.0, GOOD),
            (1, now - MIN, 31.0, GOOD),
            (1, now - MIN // 2, 99.0, BAD),  # not good: left out
            (1, now - MIN // 3, math.nan, GOOD),  # not finite: left out
            (2, now - MIN, 80.0, GOOD),
        ],
        "gw-2": [(1, now - 2 * MIN, 25.0, GOOD)],
        "gw-3": [(1, now - 20 * MIN, 40.0, GOOD)],
    }
    for gw, rows in readings.items():
        batch = Batch()
        for row in rows:
            batch.append(*row)
        env = wire.Envelope(wire.LANE_TELEMETRY, STREAM, 1, len(batch), b"")
        assert store.store_batch(gw, env, batch)
    store.roll_up(100)  # PostgreSQL's latest values: the ingest worker's roll-up keeps them
    alarm = AlarmEvent(1, "high", "critical", True, now - MIN, 31.0, now - MIN)
    assert store.store_batch(
        "gw-1", wire.Envelope(wire.LANE_ALARM, STREAM, 2, 1, b""), AlarmBody([alarm])
    )
    health = {"a": wire.DeviceStatus(True, 1), "b": wire.DeviceStatus(False, 1, "timeout")}
    store.store_stats(wire.GatewayStats("gw-1", 1, 0, 0, 0, 0, 0, 0, health=health))
    store.store_stats(wire.GatewayStats("gw-2", 1, 0, 3, 1, 0, 0, 2))


def one(store: Store, now: int, **fields: object) -> Vital:
    (got,) = evaluate(store, [vital(**fields)], now)
    return got


def test_point_vitals(store: Store) -> None:
    now = time.time_ns() // 1_000_000
    fill(store, now)
    temps = {"select": {"points": "S/TEMP*"}}  # globs are case-insensitive
    v = one(store, now, kind="max", unit="°C", warn=30, alarm=35, **temps)
    assert (v.value, v.text, v.level, v.unit) == (31.0, "31 °C", "warn", "°C")
    assert v.detail == "gw-1/s/temperature of 2 points"
    v = one(store, now, kind="max", warn=40, **temps)
    assert (v.value, v.level) == (31.0, "ok")
    v = one(store, now, kind="min", direction="low", warn=26, alarm=24, **temps)
    assert (v.value, v.level, v.detail) == (25.0, "warn", "gw-2/s/temperature of 2 points")
    v = one(store, now, kind="min", direction="low", warn=26, alarm=25, **temps)
    assert v.level == "alarm"  # at the threshold counts
    v = one(store, now, kind="mean", warn=20, alarm=27, **temps)
    assert (v.value, v.level, v.detail) == (28.0, "alarm", "2 points")
    v = one(store, now, kind="mean", **temps)
    assert v.level == "none"  # no thresholds
    v = one(store, now, kind="share_above", threshold=30, warn=40, alarm=60, **temps)
    assert (v.value, v.unit, v.text, v.level) == (50.0, "%", "1 of 2 above 30", "warn")
    assert v.detail == "gw-1/s/temperature"
    v = one(store, now, kind="share_below", threshold=30, direction="low", warn=60, alarm=40)
    # humidity 80 is selected too (points "*"): 1 of 3 below 30
    assert (v.text, v.level) == ("1 of 3 below 30", "alarm")
    assert v.value == pytest.approx(100 / 3)
    # gw-3's reading is outside the window, unless the window takes it in
    v = one(store, now, kind="max", select={"site": "north", "points": "*/temperature"})
    assert (v.value, v.detail) == (31.0, "gw-1/s/temperature of 1 points")
    v = one(store, now, kind="max", window="30m", select={"gateways": "GW-?"})
    assert (v.value, v.detail) == (80.0, "gw-1/s/humidity of 4 points")
    v = one(store, now, kind="max", select={"gateways": "gw-9*"})
    assert (v.value, v.text, v.level) == (None, "no readings in the last 10 min", "none")


def test_fleet_vitals_and_the_defaults(store: Store) -> None:
    now = time.time_ns() // 1_000_000
    fill(store, now)
    online, alarms, readings, loss = evaluate(store, [], now)
    assert [v.id for v in (online, alarms, readings, loss)] == [c.id for c in DEFAULT_VITALS]
    assert online.text == "2 of 3 online" and online.value == pytest.approx(200 / 3)
    assert (online.level, online.detail) == ("alarm", "not online: gw-2")
    assert (alarms.value, alarms.text, alarms.detail, alarms.level) == (
        1.0,
        "1 active",
        "1 critical",
        "alarm",  # a critical one
    )
    assert (readings.value, readings.unit, readings.level) == (7 / 5, "/min", "none")
    assert (loss.value, loss.level) == (5.0, "warn")
    assert loss.detail == "evicted 3, lost 2 on gw-2"

    v = one(store, now, kind="share_healthy", direction="low", warn=90, alarm=50)
    assert (v.value, v.text, v.level) == (50.0, "1 of 2 devices healthy", "alarm")
    assert v.detail == "unhealthy devices on gw-1"
    v = one(store, now, kind="online_share", select={"site": "north"}, direction="low", warn=90)
    assert (v.value, v.level) == (100.0, "ok")
    v = one(store, now, kind="active_alarms", select={"gateways": "gw-2"}, warn=1)
    assert (v.value, v.level, v.detail) == (0.0, "ok", "")
    v = one(store, now, kind="data_loss", select={"gateways": "gw-1"}, warn=1)
    assert (v.value, v.level, v.detail) == (0.0, "ok", "evicted 0, lost 0")
    v = one(store, now, kind="online_share", select={"gateways": "none-*"})
    assert (v.value, v.text, v.level) == (None, "no gateways", "none")


def test_levels_by_direction() -> None:
    high = vital(kind="max", warn=10, alarm=20)
    assert [level(high, x) for x in (None, 9.9, 10, 19, 20, 99)] == [
        "none",
        "ok",
        "warn",
        "warn",
        "alarm",
        "alarm",
    ]
    low = vital(kind="min", warn=10, alarm=5, direction="low")
    assert [level(low, x) for x in (11, 10, 6, 5, -1)] == ["ok", "warn", "warn", "alarm", "alarm"]
    only_alarm = vital(kind="max", alarm=3)
    assert [level(only_alarm, x) for x in (2, 3)] == ["ok", "alarm"]
