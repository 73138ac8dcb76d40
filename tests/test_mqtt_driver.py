"""The mqtt driver against a private mosquitto: fake sensors publish with aiomqtt."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiomqtt
import pytest
from typer.testing import CliRunner

from agent.config import ConfigError, parse_config
from agent.runtime import device_specs
from cli.main import app
from common.broker import Mosquitto
from drivers.mqtt.driver import MqttDriver
from tests.helpers import Sink

HEAD = '[gateway]\nid = "gw"\n[uplink]\nbroker = "mqtt://h"\n'
T0_MS = 1_700_000_000_000


def config_text(url: str) -> str:
    """Two devices sharing one point table through {device}/{point} captures, plus a
    JSON point with its own timestamp and a binary one behind a topic_prefix."""
    return (
        HEAD
        + f"""
[[devices]]
name = "street-7"
driver = "mqtt"
broker = "{url}"

  [[devices.points]]
  name = "pm25"
  topic = "sensors/{{device}}/air/{{point}}"

  [[devices.points]]
  name = "noise"
  topic = "sensors/{{device}}/json"
  format = "json"
  path = "data.laeq"
  timestamp = "ts"
  timestamp_format = "epoch_ms"

[[devices]]
name = "street-8"
driver = "mqtt"
broker = "{url}"
topic_prefix = "lora"
device_value = "dev-0008"

  [[devices.points]]
  name = "pm25"
  topic = "sensors/{{device}}/air/{{point}}"

  [[devices.points]]
  name = "level"
  topic = "{{device}}/raw"
  format = "binary"
  datatype = "u16"
  scale = 0.1
"""
    )


def make_driver(url: str) -> tuple[MqttDriver, dict[str, int]]:
    cfg = parse_config(config_text(url))
    ids = {f"{d.name}/{p.name}": i + 1 for i, (d, p) in enumerate(
        (d, p) for d in cfg.devices for p in d.points)}  # fmt: skip
    driver = MqttDriver(device_specs(cfg, ids)["mqtt"])
    driver.reconnect_min_s = 0.1
    driver.reconnect_max_s = 0.5
    return driver, ids


async def until(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def with_driver(
    driver: MqttDriver, sink: Sink, body: Callable[[], Awaitable[None]], timeout: float = 40.0
) -> None:
    task = asyncio.create_task(driver.run(sink))
    try:
        async with asyncio.timeout(timeout):
            await until(lambda: all(link.subscribed for link in driver.links) or task.done())
            assert not task.done(), task.exception()
            await body()
            assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def publish(broker: Mosquitto, *messages: tuple[str, bytes]) -> None:
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="fake-sensor") as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1)


def test_readings_reach_the_sink(mosquitto: Mosquitto) -> None:
    driver, ids = make_driver(mosquitto.url)
    assert len(driver.links) == 1  # same broker: one connection
    assert set(driver.links[0].router.subscriptions()) == {
        "sensors/+/air/+",
        "sensors/+/json",
        "lora/sensors/+/air/+",
        "lora/+/raw",
    }
    sink = Sink()

    async def body() -> None:
        before = time.time_ns() // 1_000_000
        await publish(
            mosquitto,
            ("sensors/street-7/air/pm25", b"12.3"),
            ("sensors/street-7/json", b'{"data": {"laeq": 61.5}, "ts": %d}' % T0_MS),
            ("lora/sensors/dev-0008/air/pm25", b"4"),
            ("lora/dev-0008/raw", b"\x01\x02"),
        )
        await until(lambda: len(sink.rows()) == 4)
        after = time.time_ns() // 1_000_000
        got = {pid: (ts, v) for pid, ts, v, _q in sink.rows()}
        assert got[ids["street-7/pm25"]][1] == 12.3
        assert before <= got[ids["street-7/pm25"]][0] <= after  # reception time
        assert got[ids["street-7/noise"]] == (T0_MS, 61.5)  # the payload's time
        assert got[ids["street-8/pm25"]][1] == 4.0
        assert got[ids["street-8/level"]][1] == pytest.approx(25.8)
        health = driver.health()
        assert health["street-7"].readings == 2 and health["street-7"].errors == 0
        assert health["street-8"].readings == 2 and health["street-8"].last_success_ms

    asyncio.run(with_driver(driver, sink, body))


def test_malformed_and_unmatched_messages_are_counted(mosquitto: Mosquitto) -> None:
    driver, _ids = make_driver(mosquitto.url)
    sink = Sink()

    async def body() -> None:
        await publish(
            mosquitto,
            ("sensors/street-7/air/pm25", b"n/a"),
            ("sensors/street-7/json", b"{broken"),
            ("sensors/nobody/air/pm25", b"1"),  # no such device
            ("sensors/street-7/air/pm10", b"1"),  # no such point
            ("sensors/street-7/air/pm25", b"7"),  # and it keeps going
        )
        await until(lambda: len(sink.rows()) == 1 and driver.links[0].unmatched == 2)
        assert sink.rows()[0][2] == 7.0
        h = driver.health()["street-7"]
        assert h.errors == 2
        assert h.last_error == "sensors/street-7/json: bad_json: b'{broken'"
        assert h.as_dict()["rejected"] == {"not_a_number": 1, "bad_json": 1}
        assert driver.links[0].rejected == 2
        assert driver.health()["street-8"].errors == 0

    asyncio.run(with_driver(driver, sink, body))


def test_reconnects_and_resubscribes_after_an_outage(mosquitto: Mosquitto) -> None:
    driver, _ids = make_driver(mosquitto.url)
    sink = Sink()
    link = driver.links[0]

    async def body() -> None:
        await publish(mosquitto, ("sensors/street-7/air/pm25", b"1"))
        await until(lambda: len(sink.rows()) == 1)
        await asyncio.to_thread(mosquitto.stop)
        await until(lambda: not link.connected and driver.health()["street-8"].errors > 0)
        for name in ("street-7", "street-8"):
            error = driver.health()[name].last_error or ""
            assert error.startswith(f"broker 127.0.0.1:{mosquitto.port}:"), error
            assert driver.health()[name].rejected == {}  # a lost link is no junk
        await asyncio.to_thread(mosquitto.start)
        await until(lambda: link.connects == 2 and bool(link.subscribed))
        await publish(
            mosquitto, ("sensors/street-7/air/pm25", b"2"), ("lora/dev-0008/raw", b"\0\1")
        )
        await until(lambda: len(sink.rows()) == 3)
        assert [v for _, _, v, _ in sink.rows()] == [1.0, 2.0, pytest.approx(0.1)]

    asyncio.run(with_driver(driver, sink, body, timeout=60.0))


@pytest.mark.parametrize(
    ("device", "point", "where", "needle"),
    [
        ('broker = "http://x"', 'topic = "a"', "devices[0].broker", "not a valid broker URL"),
        ("", 'topic = "a"', "devices[0].broker", "required key is missing"),
        ('broker = "mqtt://h"', 'topic = "a"\nformat = "json"', "devices[0].points[0].path",
         "format = 'json' needs path"),
        ('broker = "mqtt://h"', 'topic = "a"\nformat = "csv"', "devices[0].points[0].column",
         "needs column"),
        ('broker = "mqtt://h"', 'topic = "a"\nformat = "binary"',
         "devices[0].points[0].datatype", "needs datatype"),
        ('broker = "mqtt://h"', 'topic = "a/#/b"', "devices[0].points[0].topic",
         "'#' must be the last level"),
        ('broker = "mqtt://h"\ntopic_prefix = "x/{device}"', 'topic = "{device}"',
         "devices[0].points[0].topic", "appears twice"),
        ('broker = "mqtt://h"\nqos = 3', 'topic = "a"', "devices[0].qos", "must be one of"),
        ('broker = "mqtt://h"', 'topic = "a"\noffset = "x"', "devices[0].points[0].offset",
         "expected a number"),
        ('broker = "mqtt://h"\ncert_file = "/nonexistent.pem"', 'topic = "a"',
         "devices[0].cert_file", "file not found"),
    ],
)  # fmt: skip
def test_config_errors(device: str, point: str, where: str, needle: str) -> None:
    text = HEAD + f'[[devices]]\nname = "d"\ndriver = "mqtt"\n{device}\n'
    text += f'[[devices.points]]\nname = "p"\n{point}\n'
    with pytest.raises(ConfigError) as exc:
        parse_config(text)
    issues = {i.key_path: i.message for i in exc.value.issues}
    assert where in issues, issues
    assert needle in issues[where]


def test_sniff_shows_how_messages_map(mosquitto: Mosquitto, tmp_path: Path) -> None:
    async def retain() -> None:
        async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="fake") as client:
            await client.publish("sensors/street-7/air/pm25", b"12.3", qos=1, retain=True)
            await client.publish("sensors/street-7/json", b"oops", qos=1, retain=True)
            await client.publish("other/thing", b"\x00\x01", qos=1, retain=True)

    asyncio.run(retain())
    config = tmp_path / "gateway.toml"
    config.write_text(config_text(mosquitto.url), encoding="utf-8")
    result = CliRunner().invoke(
        app, ["mqtt", "sniff", "-c", str(config), "--count", "3", "--seconds", "20"]
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert "sensors/street-7/air/pm25 12.3" in out
    assert "→ street-7/pm25 = 12.3" in out
    assert "→ matches street-7/noise but: bad_json" in out
    assert "hex 00 01 (2 bytes)" in out
    assert "→ no point's topic matches" in out
    assert "3 messages" in out


def test_sniff_without_config_stops_after_seconds(mosquitto: Mosquitto) -> None:
    result = CliRunner().invoke(
        app, ["mqtt", "sniff", "--broker", mosquitto.url, "-t", "nothing/here", "--seconds", "0.5"]
    )
    assert result.exit_code == 0, result.output
    assert "stopped" in result.output


def test_sniff_broker_down() -> None:
    from common.broker import free_port

    result = CliRunner().invoke(
        app, ["mqtt", "sniff", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--seconds", "5"]
    )
    assert result.exit_code == 2


def test_sample_config_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.config import load_config

    for var in ("CITYGW_PASSWORD", "SITE_MQTT_PASSWORD", "LNS_PASSWORD"):
        monkeypatch.setenv(var, "x")
    sample = Path(__file__).parent.parent / "drivers" / "mqtt" / "sample.toml"
    cfg = load_config(sample)
    ids = {f"{d.name}/{p.name}": i for i, (d, p) in enumerate(
        (d, p) for d in cfg.devices for p in d.points)}  # fmt: skip
    driver = MqttDriver(device_specs(cfg, ids)["mqtt"])
    assert len(driver.links) == 2  # the site broker (4 devices) and the LNS
