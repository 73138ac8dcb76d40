"""The mqtt driver's session behaviour against a private mosquitto: retained messages,
overlapping subscriptions, availability (LWT) topics, ignored topics, message counts.

The availability words are the firmwares' documented ones: Tasmota publishes its LWT
`tele/<topic>/LWT` as `Online` / `Offline` (retained; tasmota.github.io/docs/MQTT/),
ESPHome `<name>/status` as `online` / `offline` (esphome.io/components/mqtt.html,
"birth_message" / "will_message"), Zigbee2MQTT `zigbee2mqtt/<device>/availability` as
`{"state":"online"}` (or plain `online` with legacy_availability_payload; zigbee2mqtt.io
guide/configuration/device-availability.html), Shelly Gen1 `shellies/<id>/online` as
`true` / `false` (shelly-api-docs.shelly.cloud/gen1/#mqtt)."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from rich.console import Console
from typer.testing import CliRunner

from agent.config import ConfigError, parse_config
from agent.runtime import device_specs
from agent.status import render_status
from cli.main import app
from common.broker import Mosquitto
from drivers.mqtt.driver import MqttDriver, client_for
from drivers.mqtt.settings import MqttDeviceSettings
from drivers.mqtt.topics import covers, overlap
from native.batch import GOOD, UNCERTAIN
from tests.helpers import Sink, running_broker
from tests.test_cli_ops import empty_stats
from tests.test_mqtt_driver import HEAD, T0_MS, until, with_driver


def make(text: str) -> tuple[MqttDriver, dict[str, int]]:
    cfg = parse_config(HEAD + text)
    ids = {f"{d.name}/{p.name}": i + 1 for i, (d, p) in enumerate(
        (d, p) for d in cfg.devices for p in d.points)}  # fmt: skip
    driver = MqttDriver(device_specs(cfg, ids)["mqtt"])
    driver.reconnect_min_s = 0.05
    driver.reconnect_max_s = 0.2
    return driver, ids


def device(name: str, url: str, extra: str, *points: str) -> str:
    text = f'\n[[devices]]\nname = "{name}"\ndriver = "mqtt"\nbroker = "{url}"\n{extra}\n'
    for p in points:
        text += f"  [[devices.points]]\n{p}\n"
    return text


async def publish(
    broker: Mosquitto, *messages: tuple[str, bytes], retain: bool = False, ident: str = "fake"
) -> None:
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier=ident) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1, retain=retain)


# -- retained messages ----------------------------------------------------------------


def test_retained_values_are_never_taken_as_fresh(mosquitto: Mosquitto) -> None:
    url = mosquitto.url
    driver, ids = make(
        device("ign", url, 'client_id = "citygw-t"', 'name = "t"\ntopic = "s/{device}/t"')
        + device("once", url, 'client_id = "citygw-t"\nretained = "once"',
                 'name = "t"\ntopic = "s/{device}/t"')
        + device("dated", url, 'client_id = "citygw-t"\nretained = "once"',
                 'name = "t"\ntopic = "s/{device}/j"\nformat = "json"\npath = "v"\n'
                 'timestamp = "ts"')
    )  # fmt: skip
    link = driver.links[0]
    sink = Sink()
    # a dead node's last values, kept by the broker
    asyncio.run(
        publish(
            mosquitto,
            ("s/ign/t", b"21.5"),
            ("s/once/t", b"21.5"),
            ("s/dated/j", b'{"v": 3, "ts": %d}' % T0_MS),
            retain=True,
        )
    )

    async def body() -> None:
        await until(lambda: len(sink.rows()) == 2 and link.retained_skipped == 1)
        before = time.time_ns() // 1_000_000
        # a client taking the driver's id kicks it off: it reconnects and the broker
        # sends the same retained copies again
        async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="citygw-t"):
            pass
        await until(lambda: link.connects == 2 and link.retained_skipped == 4)
        assert len(sink.rows()) == 2  # the repeats were not taken again
        # a live value, published retained: news now, a repeat at the next reconnect
        await publish(mosquitto, ("s/once/t", b"22"), retain=True)
        await until(lambda: len(sink.rows()) == 3)
        async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="citygw-t"):
            pass
        await until(lambda: link.connects == 3 and link.retained_skipped == 7)
        rows = {(pid, v): (ts, q) for pid, ts, v, q in sink.rows()}
        assert len(sink.rows()) == 3
        assert ids["ign/t"] not in {pid for pid, *_ in sink.rows()}
        ts, q = rows[(ids["once/t"], 21.5)]
        assert q == UNCERTAIN and ts < before  # flagged: the gateway cannot date it
        ts, q = rows[(ids["once/t"], 22.0)]
        assert q == GOOD and ts >= before
        assert rows[(ids["dated/t"], 3.0)] == (T0_MS, GOOD)  # dated by its payload
        assert driver.health()["ign"].rejected == {}  # (its errors: the kicks)

    asyncio.run(with_driver(driver, sink, body))


def test_retained_setting_is_checked() -> None:
    with pytest.raises(ConfigError) as exc:
        make(device("d", "mqtt://h", 'retained = "always"', 'name = "p"\ntopic = "a"'))
    issues = {i.key_path: i.message for i in exc.value.issues}
    assert "must be one of" in issues["devices[0].retained"]


# -- overlapping subscriptions ------------------------------------------------------------


@pytest.mark.parametrize("version", ["5", "3.1.1"])
def test_one_publish_is_one_reading_whatever_filters_match(version: str, tmp_path: Path) -> None:
    # a broker that sends one copy per matching subscription, as the MQTT spec allows
    # (EMQX does; so does Mosquitto with this option, and always with MQTT 5 ids)
    with running_broker(tmp_path / "b", extra_conf="allow_duplicate_messages true\n") as broker:
        url, v = broker.url, f'mqtt_version = "{version}"'
        crossing = version == "5"  # MQTT 3.1.1 cannot tell crossing filters' copies apart
        driver, ids = make(
            # nested: the second filter covers the first
            device("ha", url, v, 'name = "t"\ntopic = "homeassistant/sensor/+/state"')
            + device("any", url, v, 'name = "t"\ntopic = "+/sensor/+/state"')
            + device("end", url, v, 'name = "p"\ntopic = "end"')
            # crossing: neither covers the other, both match x/b/c
            + (device("c1", url, v, 'name = "p"\ntopic = "x/+/c"') if crossing else "")
            + (device("c2", url, v, 'name = "p"\ntopic = "x/b/+"') if crossing else "")
        )
        subscribed = {"+/sensor/+/state": 1, "end": 1}
        if crossing:
            subscribed |= {"x/+/c": 1, "x/b/+": 1}
        assert driver.links[0].router.subscriptions() == subscribed
        sink = Sink()

        async def body() -> None:
            await publish(
                broker, ("homeassistant/sensor/t1/state", b"5"), ("x/b/c", b"7"), ("end", b"0")
            )
            # copies come in order: once "end" is read, every copy before it was too
            await until(lambda: ids["end/p"] in {pid for pid, *_ in sink.rows()})
            want = [(ids["ha/t"], 5.0), (ids["any/t"], 5.0), (ids["end/p"], 0.0)]
            if crossing:
                want += [(ids["c1/p"], 7.0), (ids["c2/p"], 7.0)]
            assert sorted((pid, v) for pid, _, v, _ in sink.rows()) == sorted(want)
            health = driver.health()
            assert {d: health[d].messages for d in ("ha", "any")} == {"ha": 1, "any": 1}
            if crossing:
                assert health["c1"].messages == health["c2"].messages == 1

        asyncio.run(with_driver(driver, sink, body))


def test_router_reads_each_copy_for_its_own_subscriptions() -> None:
    driver, ids = make(
        device("c1", "mqtt://h", "", 'name = "p"\ntopic = "x/+/c"')
        + device("c2", "mqtt://h", "", 'name = "p"\ntopic = "x/b/+"')
    )
    router = driver.links[0].router
    one, two = router.subscription_id("x/+/c"), router.subscription_id("x/b/+")
    first = router.route("x/b/c", b"1", sub_ids=[one])
    second = router.route("x/b/c", b"1", sub_ids=[two])
    assert [o.route.point.id for o in first.outcomes] == [ids["c1/p"]]
    assert [o.route.point.id for o in second.outcomes] == [ids["c2/p"]]
    assert (first.counted, second.counted) == (True, False)  # message counters: once
    both = router.route("x/b/c", b"1", sub_ids=[one, two])  # a broker that sends one copy
    assert len(both.outcomes) == 2 and both.devices == ["c1", "c2"]
    # a subscription the broker refused brings no copy: the other one counts
    router.refused.add(one)
    assert router.route("x/b/c", b"1", sub_ids=[two]).counted


def test_filter_cover() -> None:
    assert covers("+/sensor/+/state", "homeassistant/sensor/+/state")
    assert covers("a/#", "a") and covers("a/#", "a/+/b") and covers("#", "a/#")
    assert not covers("a/+", "a/#") and not covers("a/+/c", "a/b/+")
    assert not covers("+/x", "$SYS/x") and not covers("#", "$SYS/#")
    assert not covers("a/b", "a/b/c") and not covers("a/+/#", "a")
    assert overlap("x/+/c", "x/b/+") and overlap("a/#", "a") and overlap("+/+", "a/#")
    assert not overlap("a/b", "a/c") and not overlap("a", "a/+") and not overlap("+", "$SYS")


def test_no_subscription_identifier_to_a_broker_without_them() -> None:
    """A broker's CONNACK may say it takes no subscription identifiers (sending one
    would then be a protocol error): the client notes it."""

    async def check(available: int | None) -> bool:
        client = client_for(MqttDeviceSettings(broker="mqtt://127.0.0.1"), "c")
        props = None
        if available is not None:
            props = Properties(PacketTypes.CONNACK)
            props.SubscriptionIdentifierAvailable = available
        client._on_connect(client._client, None, None, ReasonCode(PacketTypes.CONNACK), props)
        return client.subscription_ids

    assert asyncio.run(check(0)) is False
    assert asyncio.run(check(1)) is True
    assert asyncio.run(check(None)) is False  # MQTT 3.1.1: no properties at all


def test_sniff_shows_a_message_once_whatever_filters_match(mosquitto: Mosquitto) -> None:
    asyncio.run(
        publish(
            mosquitto,
            ("homeassistant/sensor/t1/state", b"5"),
            ("homeassistant/other", b"6"),
            ("end/x", b"0"),
            retain=True,
        )
    )
    # the broker sends each filter's retained copies after its SUBACK, in order
    result = CliRunner().invoke(
        app,
        ["mqtt", "sniff", "--broker", mosquitto.url, "-t", "homeassistant/#",
         "-t", "+/sensor/+/state", "-t", "end/#", "--count", "3", "--seconds", "20"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.count("homeassistant/sensor/t1/state 5") == 1, result.output
    assert "end/x 0  (retained)" in result.output


# -- availability --------------------------------------------------------------------------


def availability_config(url: str) -> str:
    return (
        device("tasmota", url, 'topic_prefix = "tele/tasmota"\navailability_topic = "LWT"',
               'name = "t"\ntopic = "SENSOR"\nformat = "json"\npath = "DS18B20.Temperature"')
        + device("z2m", url, 'availability_topic = "zigbee2mqtt/{device}/availability"',
                 'name = "t"\ntopic = "zigbee2mqtt/{device}"\nformat = "json"\n'
                 'path = "temperature"')
        + device("esp", url, 'availability_topic = "{device}/status"\n'
                 'availability_online = ["up"]\navailability_offline = ["down"]',
                 'name = "t"\ntopic = "{device}/sensor/t/state"')
        + device("shellyht-1", url, 'availability_topic = "shellies/{device}/online"\n'
                 'availability_online = ["true"]\navailability_offline = ["false"]',
                 'name = "temperature"\ntopic = "shellies/{device}/sensor/{point}"')
    )  # fmt: skip


def test_availability_topic_is_the_devices_health(mosquitto: Mosquitto) -> None:
    driver, ids = make(availability_config(mosquitto.url))
    health = driver.health()
    sink = Sink()
    # Tasmota's LWT is retained: a dead node's "Offline" is what the driver hears first
    asyncio.run(publish(mosquitto, ("tele/tasmota/LWT", b"Offline"), retain=True))

    async def body() -> None:
        await until(lambda: health["tasmota"].online is False)
        assert health["tasmota"].consecutive_failures == 1
        assert health["tasmota"].last_error == "offline: tele/tasmota/LWT says Offline"
        # a reading while it says offline is kept, but does not make it healthy
        await publish(mosquitto, ("tele/tasmota/SENSOR", b'{"DS18B20":{"Temperature":20.5}}'))
        await until(lambda: len(sink.rows()) == 1)
        assert health["tasmota"].online is False and health["tasmota"].consecutive_failures
        await publish(mosquitto, ("tele/tasmota/LWT", b"Online"))
        await until(lambda: health["tasmota"].online is True)
        assert health["tasmota"].consecutive_failures == 0
        # Zigbee2MQTT: JSON or plain words
        await publish(mosquitto, ("zigbee2mqtt/z2m/availability", b'{"state":"offline"}'))
        await until(lambda: health["z2m"].online is False)
        await publish(mosquitto, ("zigbee2mqtt/z2m/availability", b"online"))
        await until(lambda: health["z2m"].online is True)
        # words of one's own; a word that is neither is a counted rejection
        await publish(mosquitto, ("esp/status", b"down"))
        await until(lambda: health["esp"].online is False)
        await publish(mosquitto, ("esp/status", b"maybe"))
        await until(lambda: health["esp"].rejected == {"bad_availability": 1})
        assert health["esp"].online is False
        # Shelly Gen1: shellies/<id>/online, true / false (retained, its LWT)
        await publish(mosquitto, ("shellies/shellyht-1/online", b"false"))
        await until(lambda: health["shellyht-1"].online is False)
        assert driver.links[0].unmatched == 0

    asyncio.run(with_driver(driver, sink, body))
    assert sink.rows()[0][1:] == (sink.rows()[0][1], 20.5, GOOD)
    assert ids["tasmota/t"] == sink.rows()[0][0]


def test_availability_keys_are_checked() -> None:
    cases = [
        ('availability_online = ["up"]', "devices[0].availability_online",
         "needs availability_topic"),
        ('availability_topic = "a/#/b"', "devices[0].availability_topic", "'#' must be the last"),
        ('availability_topic = "s"\navailability_offline = ["Online"]',
         "devices[0].availability_offline", "both an online and an offline word"),
        ('ignore_topics = ["a", "b/#/c"]', "devices[0].ignore_topics[1]", "'#' must be the last"),
    ]  # fmt: skip
    for extra, where, needle in cases:
        with pytest.raises(ConfigError) as exc:
            make(device("d", "mqtt://h", extra, 'name = "p"\ntopic = "a"'))
        issues = {i.key_path: i.message for i in exc.value.issues}
        assert where in issues, issues
        assert needle in issues[where]


# -- ignored topics, status counts (sans broker: the driver's handle) -------------------------


def test_ignore_topics_silence_expected_messages() -> None:
    driver, _ids = make(
        device("tasmota", "mqtt://h", 'ignore_topics = ["tele/+/STATE", "tele/+/INFO1"]',
               'name = "t"\ntopic = "tele/{device}/#"\nformat = "json"\n'
               'path = "DS18B20.Temperature"')
    )  # fmt: skip
    link = driver.links[0]
    sink = Sink()
    for topic, payload in [
        ("tele/tasmota/STATE", b'{"Time":"2024-01-01T00:00:00","Uptime":"0T00:01:00"}'),
        ("tele/other/STATE", b'{"Uptime":"0T00:01:00"}'),  # another node on the filter
        ("tele/tasmota/SENSOR", b'{"DS18B20":{"Temperature":20.5}}'),
    ]:
        driver.handle(link, topic, payload, sink)
    assert [v for _, _, v, _ in sink.rows()] == [20.5]
    assert link.unmatched == 0 and link.ignored == 2
    assert driver.health()["tasmota"].errors == 0
    driver.handle(link, "tele/other/SENSOR", b"{}", sink)  # not ignored: still counted
    assert link.unmatched == 1


def status_row(health: dict[str, object], name: str) -> str:
    """The device's rows of `citygw status` (devices, device errors) for a snapshot
    holding only it."""
    console = Console(width=250, record=True, file=io.StringIO())
    now = time.time_ns() // 1_000_000
    state = {"agent": {"updated_ms": now, "devices": {name: health}}}
    console.print(render_status(empty_stats(), state, now_ms=now))
    text = console.export_text()
    return "\n".join(ln for ln in text.splitlines() if ln.strip("│ ").startswith(name))


def test_status_counts_messages_for_mqtt_devices() -> None:
    driver, _ids = make(
        device("air", "mqtt://h", "",
               'name = "pm25"\ntopic = "air/j"\nformat = "json"\npath = "pm25"',
               'name = "pm10"\ntopic = "air/j"\nformat = "json"\npath = "pm10"')
    )  # fmt: skip
    link = driver.links[0]
    sink = Sink()
    driver.handle(link, "air/j", b'{"pm25": 3, "pm10": 5}', sink)
    driver.handle(link, "air/j", b"{}", sink)  # one message, two points without a value
    h = driver.health()["air"].as_dict()
    assert h["messages"] == 2
    assert "2 msgs" in status_row(h, "air")


def test_status_shows_an_offline_device() -> None:
    driver, _ids = make(
        device("air", "mqtt://h", 'availability_topic = "air/LWT"', 'name = "p"\ntopic = "air/p"')
    )
    driver.handle(driver.links[0], "air/LWT", b"Offline", Sink())
    h = driver.health()["air"].as_dict()
    assert h["online"] is False and h["messages"] == 1
    row = status_row(h, "air")
    assert "air (offline)" in row and "offline: air/LWT says Offline" in row


# -- sniff ----------------------------------------------------------------------------------


def test_sniff_marks_retained_and_names_the_missing_path(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    asyncio.run(
        publish(
            mosquitto,
            ("noise/1", b'{"data": {"lafmax": 70}}'),
            ("tele/x/STATE", b"{}"),
            ("zz/end", b"1"),
            retain=True,
        )
    )
    config = tmp_path / "gateway.toml"
    config.write_text(
        HEAD
        + device("noise", mosquitto.url, 'retained = "once"\nignore_topics = ["tele/+/STATE"]',
                 'name = "laeq"\ntopic = "noise/1"\nformat = "json"\npath = "data.laeq"'),
        encoding="utf-8",
    )  # fmt: skip
    result = CliRunner().invoke(
        app,
        ["mqtt", "sniff", "-c", str(config), "-t", "noise/#", "-t", "tele/#", "-t", "zz/#",
         "--count", "3", "--seconds", "20"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = result.output
    assert 'noise/1 {"data": {"lafmax": 70}}  (retained)' in out
    assert "→ matches noise/laeq but: missing_path (no data.laeq in it)" in out
    assert "→ ignored (ignore_topics of noise)" in out
