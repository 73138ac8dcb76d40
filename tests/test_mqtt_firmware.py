"""Documented MQTT payloads of six firmwares (Tasmota, Zigbee2MQTT, Shelly Gen1 and
Gen2, Home Assistant statestream, ESPHome) through the real config path and the mqtt
driver's routing and message handling.

The corpus is tests/data/mqtt_firmware/<firmware>/: a config.toml as a technician writes
it and a cases.txt of messages, each with the source it comes from (the firmware's docs
or source repository) and what each point must make of it; the format is described in
tests/data/mqtt_firmware/README.md.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

from agent.config import ConfigError, parse_config
from agent.runtime import device_specs
from drivers.mqtt.driver import MqttDriver
from native.batch import QUALITY_NAMES
from tests.helpers import Sink

CORPUS = Path(__file__).parent / "data" / "mqtt_firmware"
FIRMWARES = sorted(p.name for p in CORPUS.iterdir() if p.is_dir())
QUALITY = {name: code for code, name in QUALITY_NAMES.items()}


@dataclass
class Case:
    """One message of a cases.txt and the outcomes it must have."""

    line: int
    topic: str
    payload: bytes
    readings: dict[str, tuple[float, str, str]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    absent: set[str] = field(default_factory=set)
    unmatched: bool = False


def load_cases(path: Path) -> list[Case]:
    cases: list[Case] = []
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        kind, _, rest = line.partition(" ")
        if kind == ">":
            topic, _, payload = rest.partition(" ")
            cases.append(Case(n, topic, payload.encode()))
            continue
        assert cases, f"{path}:{n}: an expectation before any message"
        case = cases[-1]
        words = rest.split()
        if kind == "=":
            key, value, quality, stamp = words
            case.readings[key] = (float(value), quality, stamp)
        elif kind == "!":
            key, reason = words
            case.rejected[key] = reason
        elif kind == "-":
            case.absent.add(words[0])
        elif kind == "?":
            case.unmatched = True
        else:
            raise AssertionError(f"{path}:{n}: unknown line {line!r}")
    return cases


def driver_for(firmware: str) -> tuple[MqttDriver, dict[int, str]]:
    path = CORPUS / firmware / "config.toml"
    cfg = parse_config(path.read_text(encoding="utf-8"), str(path), path.parent)
    keys = [f"{d.name}/{p.name}" for d in cfg.devices for p in d.points]
    ids = {key: i + 1 for i, key in enumerate(keys)}
    return MqttDriver(device_specs(cfg, ids)["mqtt"]), {i: k for k, i in ids.items()}


def iso_ms(text: str) -> int:
    return round(datetime.fromisoformat(text).timestamp() * 1000)


@pytest.mark.parametrize("firmware", FIRMWARES)
def test_documented_payloads(firmware: str) -> None:
    driver, names = driver_for(firmware)
    assert len(driver.links) == 1  # one site broker
    link = driver.links[0]
    cases = load_cases(CORPUS / firmware / "cases.txt")
    assert cases
    sink = Sink()
    fallbacks: dict[str, int] = {}
    for case in cases:
        where = f"{firmware}/cases.txt:{case.line}"
        outcomes = link.router.route(case.topic, case.payload).outcomes
        if case.unmatched:
            unmatched = link.unmatched
            assert outcomes == [], where
            assert driver.handle(link, case.topic, case.payload, sink) is None
            assert link.unmatched == unmatched + 1, where
            continue
        rejected = {o.route.point.key: o.reason for o in outcomes if o.reason}
        absent = {o.route.point.key for o in outcomes if o.absent}
        assert rejected == case.rejected, where
        assert absent == case.absent, where
        before = time.time_ns() // 1_000_000
        batch = driver.handle(link, case.topic, case.payload, sink)
        after = time.time_ns() // 1_000_000
        rows = {} if batch is None else {names[pid]: (ts, v, q) for pid, ts, v, q in batch.rows()}
        assert set(rows) == set(case.readings), where
        for key, (value, quality, stamp) in case.readings.items():
            ts, got, q = rows[key]
            if math.isnan(value):
                assert math.isnan(got), f"{where}: {key} = {got}"
            else:
                assert got == pytest.approx(value, rel=1e-9, abs=1e-6), f"{where}: {key}"
            assert q == QUALITY[quality], f"{where}: {key} quality {QUALITY_NAMES[q]}"
            if stamp == "reception":
                assert before <= ts <= after, f"{where}: {key} not stamped at reception"
            else:
                assert ts == iso_ms(stamp), f"{where}: {key} at {ts}, not {stamp}"
            if quality == "uncertain" and stamp == "reception":
                device = key.split("/")[0]
                fallbacks[device] = fallbacks.get(device, 0) + 1
    for device, health in driver.health().items():
        counted = health.rejected.get("timestamp_fallback", 0)
        assert counted == fallbacks.get(device, 0), device


def test_the_corpus_covers_six_firmwares() -> None:
    assert FIRMWARES == [
        "esphome",
        "ha_statestream",
        "shelly_gen1",
        "shelly_gen2",
        "tasmota",
        "zigbee2mqtt",
    ]
    for firmware in FIRMWARES:
        text = (CORPUS / firmware / "cases.txt").read_text(encoding="utf-8")
        blocks = text.split("\n\n")
        for block in blocks:  # every message block says where its payloads come from
            if ">" in block:
                assert block.lstrip().startswith("#"), f"{firmware}: uncited {block[:60]!r}"


# -- what the driver counts and says ---------------------------------------------------


def test_unmapped_word_is_a_counted_rejection_naming_word_and_point(
    caplog: pytest.LogCaptureFixture,
) -> None:
    driver, _names = driver_for("esphome")
    link = driver.links[0]
    sink = Sink()
    with caplog.at_level("WARNING", logger="citygw.drivers.mqtt"):
        topic = "livingroom/binary_sensor/motion/state"
        assert driver.handle(link, topic, b"Standby", sink) is None
    health = driver.health()["livingroom"]
    assert health.rejected == {"unmapped_word": 1}
    assert health.last_error is not None and "'Standby'" in health.last_error
    assert "livingroom/motion" in caplog.text and "'Standby' is not one of: ON, OFF" in caplog.text
    assert link.rejected == 1 and sink.rows() == []


def test_absent_optional_paths_are_neither_readings_nor_errors() -> None:
    driver, _names = driver_for("shelly_gen2")
    link = driver.links[0]
    cloud_only = (
        b'{"src": "shellypro4pm-f008d1d8b8b8", "method": "NotifyStatus",'
        b' "params": {"ts": 1624348482.25, "cloud": {"connected": false}}}'
    )
    batch = driver.handle(link, "shellypro4pm-f008d1d8b8b8/events/rpc", cloud_only, Sink())
    assert batch is not None and len(batch) == 1
    health = driver.health()["pump_room"]
    assert health.errors == 0 and health.rejected == {} and health.readings == 1
    assert link.unmatched == 0 and link.rejected == 0


HEAD = '[gateway]\nid = "gw"\n[uplink]\nbroker = "mqtt://h"\n'


@pytest.mark.parametrize(
    ("device", "point", "where", "needle"),
    [
        ('timezone = "Europe/Berln"', 'topic = "a"', "devices[0].timezone", "unknown time zone"),
        ("", 'topic = "a"\nformat = "json"\npath = "v"\nunit_path = "U"',
         "devices[0].points[0].unit", "unit_path needs the point's unit"),
        ("", 'topic = "a"\nunit = "furlong"\nformat = "json"\npath = "v"\nunit_path = "U"',
         "devices[0].points[0].unit", "got 'furlong'"),
        ("", 'topic = "a"\nvalues = { On = 1, ON = 0 }', "devices[0].points[0].values",
         "same word"),
        ("", 'topic = "a"\noptional = true', "devices[0].points[0].optional",
         "only for format = 'json'"),
        ("", 'topic = "a"\nformat = "json"\npath = "v"\ntimezone = "UTC"',
         "devices[0].points[0].timezone", "only for a timestamp taken from the payload"),
    ],
)  # fmt: skip
def test_config_errors(device: str, point: str, where: str, needle: str) -> None:
    text = HEAD + f'[[devices]]\nname = "d"\ndriver = "mqtt"\nbroker = "mqtt://h"\n{device}\n'
    text += f'[[devices.points]]\nname = "p"\n{point}\n'
    with pytest.raises(ConfigError) as exc:
        parse_config(text)
    issues = {i.key_path: i.message for i in exc.value.issues}
    assert where in issues, issues
    assert needle in issues[where]
