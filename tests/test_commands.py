"""Downlink commands: checked against the config before any device is touched, then
executed by the point's driver, answered on up/resp."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiomqtt
import orjson
import pytest

from agent.commands import (
    CommandRefused,
    ConfigPushCommand,
    FirmwareUpdateCommand,
    parse_command,
)
from agent.config import parse_config
from agent.runtime import Agent
from common import wire
from common.broker import Mosquitto
from drivers.base import NoSettings, PointSpec


def spec(key: str, writable: bool = True, lo: float | None = 0.0, hi: float | None = 100.0):  # type: ignore[no-untyped-def]
    name = key.split("/")[1]
    return PointSpec(1, key, name, "", "float", writable, NoSettings(), lo, hi)


POINTS = {
    "pump/setpoint": spec("pump/setpoint"),
    "pump/level": spec("pump/level", writable=False),
    "pump/open": spec("pump/open", lo=None, hi=None),
}


def cmd(**fields: object) -> bytes:
    return orjson.dumps({"id": "c1", "op": "write", **fields})


def test_a_valid_write_is_accepted() -> None:
    c = parse_command(cmd(point="pump/setpoint", value=42), POINTS, {})
    assert (c.id, c.point.key, c.value) == ("c1", "pump/setpoint", 42.0)
    assert parse_command(cmd(point="pump/open", value=True), POINTS, {}).value == 1.0


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"{not json", "command is not JSON"),
        (b"[1, 2]", "command must be a JSON object"),
        (orjson.dumps({"op": "write"}), "command needs an 'id'"),
        (
            orjson.dumps({"id": "c1", "op": "reboot"}),
            "unknown op 'reboot'; allowed: write, firmware_update",
        ),
        (cmd(point="pump/nope", value=1), "unknown point 'pump/nope'"),
        (cmd(point="pump/level", value=1), "point 'pump/level' is not writable"),
        (cmd(point="pump/setpoint", value="12"), "must be a finite number, got '12'"),
        (cmd(point="pump/setpoint", value=None), "must be a finite number, got None"),
        (cmd(point="pump/setpoint", value=100.5), "outside its declared range [0, 100]"),
        (cmd(point="pump/setpoint", value=-1), "outside its declared range [0, 100]"),
        (cmd(point="pump/setpoint", value=1, pad="x" * 5000), "command larger than 4096 bytes"),
        (b"x" * 5000, "command is not JSON"),
        (b"x" * (256 * 1024 + 1), "command larger than 262144 bytes"),
    ],
)
def test_refusals_say_why(payload: bytes, message: str) -> None:
    with pytest.raises(CommandRefused, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_command(payload, POINTS, {})


def push_cmd(**fields: object) -> bytes:
    return orjson.dumps({"id": "p1", "op": "config_push", "config": "[gateway]\n", **fields})


def test_a_config_push_may_be_bigger_than_other_commands() -> None:
    """A whole config travels in a config_push: up to 256 KiB, for this op only."""
    text = "# " + "x" * (200 * 1024) + "\n[gateway]\n"
    c = parse_command(push_cmd(config=text, deadline_s=30), POINTS, {})
    assert isinstance(c, ConfigPushCommand)
    assert (c.id, c.config, c.deadline_s) == ("p1", text, 30.0)
    default = parse_command(push_cmd(), POINTS, {})
    assert isinstance(default, ConfigPushCommand) and default.deadline_s == 300.0
    with pytest.raises(CommandRefused, match="larger than 262144 bytes"):
        parse_command(push_cmd(config="x" * (256 * 1024)), POINTS, {})


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (push_cmd(config=""), "'config' must be the config's TOML text"),
        (push_cmd(config=7), "'config' must be the config's TOML text"),
        (
            push_cmd(deadline_s=29),
            "'deadline_s' must be a number of seconds from 30 to 3600, got 29",
        ),
        (push_cmd(deadline_s=3601), "from 30 to 3600, got 3601"),
        (push_cmd(deadline_s="300"), "from 30 to 3600, got '300'"),
        (push_cmd(deadline_s=True), "from 30 to 3600, got True"),
    ],
)
def test_config_push_refusals_say_why(payload: bytes, message: str) -> None:
    with pytest.raises(CommandRefused, match=message) as info:
        parse_command(payload, POINTS, {})
    answer = orjson.loads(info.value.response())
    assert answer["id"] == "p1" and answer["ok"] is False and answer["outcome"] == "refused"


FIRMWARE = {"mcu": None, "mcu-2": "it has no firmware_key configured"}


def fw_cmd(**fields: object) -> bytes:
    body = {"id": "f1", "op": "firmware_update", "device": "mcu", "url": "https://fw.example/a"}
    return orjson.dumps({**body, **fields})


def test_a_valid_firmware_update_is_accepted() -> None:
    c = parse_command(fw_cmd(sha256="ab" * 32, force=True), POINTS, FIRMWARE, {"mcu"})
    assert isinstance(c, FirmwareUpdateCommand)
    assert (c.id, c.device, c.url, c.sha256, c.force) == (
        "f1",
        "mcu",
        "https://fw.example/a",
        bytes([0xAB]) * 32,
        True,
    )
    plain = parse_command(fw_cmd(), POINTS, FIRMWARE)
    assert isinstance(plain, FirmwareUpdateCommand) and plain.sha256 is None and not plain.force


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (fw_cmd(device="nope"), "unknown device 'nope'"),
        (fw_cmd(device=None), "unknown device None"),
        (fw_cmd(device="mcu-2"), "device 'mcu-2' cannot take firmware updates: it has no firm"),
        (fw_cmd(url="http://fw.example/a"), "'url' must be an https:// URL"),
        (fw_cmd(url="https://"), "'url' must be an https:// URL"),
        (fw_cmd(url="https://[::1/x"), "'url' must be an https:// URL"),
        (fw_cmd(url=7), "'url' must be a string of at most 2048 characters"),
        (fw_cmd(url="https://h/" + "a" * 2048), "'url' must be a string of at most 2048"),
        (fw_cmd(sha256="abc"), "'sha256' must be 64 hex digits"),
        (fw_cmd(sha256="zz" * 32), "'sha256' must be 64 hex digits"),
        (fw_cmd(force="yes"), "'force' must be true or false"),
    ],
)
def test_firmware_update_refusals_say_why(payload: bytes, message: str) -> None:
    with pytest.raises(CommandRefused, match=message.replace("[", r"\[")) as info:
        parse_command(payload, POINTS, FIRMWARE)
    answer = orjson.loads(info.value.response())
    assert answer["id"] == "f1" and answer["ok"] is False and answer["outcome"] == "refused"


def test_a_forced_update_needs_the_devices_own_setting() -> None:
    """A forced update (a downgrade or a reinstall) is not the command's to decide: refused
    unless the device's config allows it, whoever sent it; without force, the setting
    changes nothing."""
    forced = fw_cmd(force=True)
    for allowed in (set(), {"mcu-2"}):  # not allowed, or allowed for another device only
        with pytest.raises(CommandRefused) as info:
            parse_command(forced, POINTS, FIRMWARE, allowed)
        assert str(info.value) == (
            "device 'mcu' does not allow a forced update (downgrade or reinstall) from the "
            "platform; only its own config can (allow_downgrade = true on the device)"
        )
        assert orjson.loads(info.value.response())["outcome"] == "refused"
    c = parse_command(forced, POINTS, FIRMWARE, {"mcu"})
    assert isinstance(c, FirmwareUpdateCommand) and c.force
    for allowed in (set(), {"mcu"}):
        c = parse_command(fw_cmd(force=False), POINTS, FIRMWARE, allowed)
        assert isinstance(c, FirmwareUpdateCommand) and not c.force


CONFIG = """
[gateway]
id = "gw-cmd"
[uplink]
broker = "{broker}"
backoff_min = "100ms"
[buffer]
path = "{buffer}"
flush_interval = "100ms"
[[devices]]
name = "pump"
driver = "sim"
poll = "50ms"
  [[devices.points]]
  name = "setpoint"
  writable = true
  min = 0.0
  max = 50.0
  base = 10.0
  [[devices.points]]
  name = "level"
  base = 3.0
"""


def test_commands_over_mqtt_write_and_answer(mosquitto: Mosquitto, tmp_path: Path) -> None:
    cfg = parse_config(CONFIG.format(broker=mosquitto.url, buffer=tmp_path / "buf.db"))
    down = wire.topic("citygw", "gw-cmd", "down/cmd")
    resp = wire.topic("citygw", "gw-cmd", "up/resp")

    async def scenario() -> list[dict[str, object]]:
        agent = Agent(cfg)
        await agent.start()
        answers: list[dict[str, object]] = []
        try:
            async with aiomqtt.Client("127.0.0.1", mosquitto.port) as platform:
                await platform.subscribe(resp, qos=1)
                for _ in range(100):  # until the agent is connected and subscribed
                    if agent.uplink and agent.uplink.status.state == "online":
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)
                for body in (
                    cmd(id="w1", point="pump/setpoint", value=33.5),
                    cmd(id="w2", point="pump/level", value=1),
                    cmd(id="w3", point="pump/setpoint", value=99),
                    b"garbage",
                ):
                    await platform.publish(down, body, qos=1)
                async with asyncio.timeout(10):
                    async for message in platform.messages:
                        assert isinstance(message.payload, bytes)
                        answers.append(orjson.loads(message.payload))
                        if len(answers) == 4:
                            break
        finally:
            await agent.stop_drivers()
            with contextlib.suppress(Exception):
                await agent.stop()
        return answers

    answers = asyncio.run(scenario())
    by_id = {a["id"]: a for a in answers}
    assert by_id["w1"]["ok"] is True
    assert by_id["w2"] == {
        **by_id["w2"],
        "ok": False,
        "error": "point 'pump/level' is not writable",
    }
    assert by_id["w3"]["ok"] is False and "outside its declared range" in str(by_id["w3"]["error"])
    assert by_id[None]["ok"] is False and "not JSON" in str(by_id[None]["error"])
    # the simulated actuator took the setpoint: the answer carries the value read back
    # (the readings that follow are not checked here: the flusher may have taken them
    # from the memory queue at any moment)
    assert by_id["w1"]["written"] == 33.5
