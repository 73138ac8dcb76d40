"""The platform's firmware_update command end to end, in one process: the platform
publishes on down/cmd (a private Mosquitto), the agent checks the command, fetches the
package (the download is faked: no network), the mcu driver pushes it over its own
serial link to the simulated microcontroller on a pty, and the outcome comes back on
up/resp. Other commands are answered while the update runs."""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import ConfigError, parse_config
from agent.runtime import Agent
from common import wire
from common.broker import Mosquitto
from drivers.mcu import McuDeviceSettings, McuDriver
from drivers.mcu.simulator import SimMcu
from firmware_bridge import image as fw
from firmware_bridge.link import Timers

pytestmark = pytest.mark.timeout(120)

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
HW = "citygw-mcu-r1"
IMAGE = random.Random(2).randbytes(16 * 1024)
PACKAGE = fw.sign(IMAGE, KEY, fw.Version(1, 1, 0), HW).encode()
FORGED = fw.sign(IMAGE, Ed25519PrivateKey.generate(), fw.Version(1, 1, 0), HW).encode()
IMAGE_SHA = fw.parse(PACKAGE).manifest.sha256.hex()
URL = "https://fw.example/mcu/1.1.0.cgfw"
FORGED_URL = "https://fw.example/mcu/forged.cgfw"

CONFIG = """
[gateway]
id = "gw-fw"
[uplink]
broker = "{broker}"
backoff_min = "100ms"
[buffer]
path = "{buffer}"
flush_interval = "100ms"

[[devices]]
name = "mcu"
driver = "mcu"
port = "{port}"
heartbeat = "300ms"
firmware_key = "fw.pub"
  [[devices.points]]
  name = "level"
  sensor_id = 1
  [[devices.points]]
  name = "supply"
  sensor_id = 4

[[devices]]
name = "mcu-2"              # no firmware_key: takes no updates
driver = "mcu"
port = "{missing}"
  [[devices.points]]
  name = "level"
  sensor_id = 1

[[devices]]
name = "pump"
driver = "sim"
poll = "100ms"
  [[devices.points]]
  name = "setpoint"
  writable = true
  min = 0.0
  max = 50.0
"""


def fw_cmd(cid: str, **fields: Any) -> bytes:
    return orjson.dumps({"id": cid, "op": "firmware_update", "device": "mcu", "url": URL, **fields})


def test_firmware_update_command_end_to_end(mosquitto: Mosquitto, tmp_path: Path) -> None:
    (tmp_path / "fw.pub").write_text(fw.raw_public_key(KEY.public_key()).hex())
    down = wire.topic("citygw", "gw-fw", "down/cmd")
    resp = wire.topic("citygw", "gw-fw", "up/resp")
    fetched: list[str] = []

    async def scenario() -> tuple[dict[str, dict[str, Any]], list[str], SimMcu, str | None]:
        sim = SimMcu.on_pty(
            interval=0.2,
            hardware_id=HW,
            timers=Timers(heartbeat=0.3),
            ota_public_key=KEY.public_key(),
        )
        async with sim.running():
            text = CONFIG.format(
                broker=mosquitto.url,
                buffer=tmp_path / "buf.db",
                port=sim.port,
                missing=tmp_path / "ttyNONE",
            )
            config = parse_config(text, base_dir=tmp_path)
            release = asyncio.Event()  # the good download completes when the test says so

            async def fetch(url: str) -> bytes:
                fetched.append(url)
                if url == URL:
                    await release.wait()
                    return PACKAGE
                return FORGED

            agent = Agent(config, fetch_firmware=fetch)
            await agent.start()
            answers: dict[str, dict[str, Any]] = {}
            order: list[str] = []
            running: str | None = None
            try:
                async with aiomqtt.Client("127.0.0.1", mosquitto.port) as platform:
                    await platform.subscribe(resp, qos=1)

                    async def wait_for(*ids: str) -> None:
                        async with asyncio.timeout(60):
                            async for message in platform.messages:
                                assert isinstance(message.payload, bytes)
                                body = orjson.loads(message.payload)
                                answers[body["id"]] = body
                                order.append(body["id"])
                                if all(i in answers for i in ids):
                                    return

                    for _ in range(200):  # until the agent is connected and subscribed
                        if agent.uplink and agent.uplink.status.state == "online":
                            break
                        await asyncio.sleep(0.05)
                    await asyncio.sleep(0.3)
                    driver = next(d for d in agent.drivers if isinstance(d, McuDriver))
                    for _ in range(200):  # and the mcu link is up
                        bridge = driver.bridges.get("mcu")
                        if bridge is not None and bridge.is_up:
                            break
                        await asyncio.sleep(0.05)
                    # refused by the checks, before any download
                    for body in (
                        fw_cmd("f-http", url="http://fw.example/mcu/1.1.0.cgfw"),
                        fw_cmd("f-unknown", device="nope"),
                        fw_cmd("f-nokey", device="mcu-2"),
                        fw_cmd("f-sim", device="pump"),
                    ):
                        await platform.publish(down, body, qos=1)
                    await wait_for("f-http", "f-unknown", "f-nokey", "f-sim")
                    assert fetched == []
                    # a package signed with another key: refused before any OTA message
                    await platform.publish(down, fw_cmd("f-forged", url=FORGED_URL), qos=1)
                    await wait_for("f-forged")
                    assert sim.counts["ota_messages"] == 0
                    # the real one; meanwhile a second update is refused and a write answered
                    await platform.publish(down, fw_cmd("f-ok", sha256=IMAGE_SHA), qos=1)
                    await platform.publish(down, fw_cmd("f-again"), qos=1)
                    write = {"id": "w1", "op": "write", "point": "pump/setpoint", "value": 7}
                    await platform.publish(down, orjson.dumps(write), qos=1)
                    await wait_for("f-again", "w1")
                    running = None if "f-ok" in answers else "f-ok"
                    release.set()
                    await wait_for("f-ok")
                    # the device reports the new version to the driver's own bridge, which
                    # stayed open all along (the update never opened the port a second time)
                    assert bridge is not None and driver.bridges.get("mcu") is bridge
                    caps = bridge.capabilities
                    assert caps is not None and str(caps.firmware) == "1.1.0"
            finally:
                await agent.stop()
        return answers, order, sim, running

    answers, order, sim, running = asyncio.run(scenario())
    assert running == "f-ok"  # still running when the other two were answered
    refusals = {
        "f-http": "'url' must be an https:// URL",
        "f-unknown": "unknown device 'nope'",
        "f-nokey": "device 'mcu-2' cannot take firmware updates: it has no firmware_key",
        "f-sim": "device 'pump' cannot take firmware updates: its driver 'sim' does not",
        "f-forged": "bad_signature",
        "f-again": "an update of 'mcu' is already running (command 'f-ok')",
    }
    for cid, text in refusals.items():
        a = answers[cid]
        assert a["ok"] is False and a["outcome"] == "refused", a
        assert text in a["error"], a
    assert answers["w1"]["ok"] is True
    assert order.index("w1") < order.index("f-ok")
    ok = answers["f-ok"]
    assert ok["ok"] is True and ok["outcome"] == "updated", ok
    assert (ok["from"], ok["to"]) == ("1.0.0", "1.1.0")
    assert fetched == [FORGED_URL, URL]  # f-again never downloaded anything
    assert str(sim.slots.version) == "1.1.0" and not sim.slots.trial
    assert sim.counts["ota_chunk_bytes"] >= len(IMAGE)


@pytest.mark.parametrize(
    ("key_text", "message"),
    [
        (None, "devices[0].firmware_key: file not found: "),
        ("not a key", "devices[0].firmware_key: "),
    ],
)
def test_firmware_key_is_checked_at_load(
    tmp_path: Path, key_text: str | None, message: str
) -> None:
    if key_text is not None:
        (tmp_path / "fw.pub").write_text(key_text)
    text = (
        '[gateway]\nid = "gw"\n[uplink]\nbroker = "mqtt://h"\n'
        '[[devices]]\nname = "mcu"\ndriver = "mcu"\nport = "/dev/ttyAMA0"\n'
        'firmware_key = "fw.pub"\n'
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, base_dir=tmp_path)
    assert message in str(info.value)
    assert "not a PEM public key" in str(info.value) or key_text is None


def test_ota_state_dir_defaults_beside_the_buffer(tmp_path: Path) -> None:
    (tmp_path / "fw.pub").write_text(fw.raw_public_key(KEY.public_key()).hex())
    text = (
        '[gateway]\nid = "gw"\n[uplink]\nbroker = "mqtt://h"\n'
        '[buffer]\npath = "data/buffer.db"\n'
        '[[devices]]\nname = "mcu"\ndriver = "mcu"\nport = "/dev/ttyAMA0"\n'
        'firmware_key = "fw.pub"\n'
    )
    s = parse_config(text, base_dir=tmp_path).devices[0].settings
    assert isinstance(s, McuDeviceSettings) and s.public_key is not None
    assert s.firmware_key == tmp_path / "fw.pub"
    assert s.ota_state_dir == tmp_path / "data" / "ota"
    explicit = parse_config(text + 'ota_state_dir = "/var/lib/citygw/ota"\n', base_dir=tmp_path)
    s2 = explicit.devices[0].settings
    assert isinstance(s2, McuDeviceSettings) and s2.ota_state_dir == Path("/var/lib/citygw/ota")


OLDER = fw.sign(IMAGE, KEY, fw.Version(0, 9, 0), HW).encode()
OLDER_URL = "https://fw.example/mcu/0.9.0.cgfw"


@pytest.mark.parametrize("allowed", [False, True])
def test_a_forced_update_needs_the_devices_own_setting(
    mosquitto: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture, allowed: bool
) -> None:
    """`"force": true` in a command does not make a downgrade: whoever can publish on
    down/cmd could otherwise roll the microcontroller back to an old, perhaps
    vulnerable, firmware. Only `allow_downgrade = true` on the device lets it through;
    without it the command is refused before any download, on up/resp and in the log."""
    (tmp_path / "fw.pub").write_text(fw.raw_public_key(KEY.public_key()).hex())
    fetched: list[str] = []

    async def fetch(url: str) -> bytes:
        fetched.append(url)
        return OLDER

    async def scenario() -> tuple[dict[str, Any], SimMcu]:
        sim = SimMcu.on_pty(
            interval=0.2,
            hardware_id=HW,
            timers=Timers(heartbeat=0.3),
            ota_public_key=KEY.public_key(),
        )
        async with sim.running():
            text = CONFIG.format(
                broker=mosquitto.url,
                buffer=tmp_path / "buf.db",
                port=sim.port,
                missing=tmp_path / "ttyNONE",
            )
            if allowed:
                text = text.replace(
                    'firmware_key = "fw.pub"\n',
                    'firmware_key = "fw.pub"\nallow_downgrade = true\n',
                    1,
                )
            agent = Agent(parse_config(text, base_dir=tmp_path), fetch_firmware=fetch)
            await agent.start()
            try:
                async with aiomqtt.Client("127.0.0.1", mosquitto.port) as platform:
                    await platform.subscribe(wire.topic("citygw", "gw-fw", "up/resp"), qos=1)
                    driver = next(d for d in agent.drivers if isinstance(d, McuDriver))
                    for _ in range(200):  # the mcu link up
                        bridge = driver.bridges.get("mcu")
                        if bridge is not None and bridge.is_up:
                            break
                        await asyncio.sleep(0.05)
                    down = wire.topic("citygw", "gw-fw", "down/cmd")
                    probe = {"id": "probe", "op": "write", "point": "pump/setpoint", "value": 1}
                    for _ in range(100):  # until the agent answers: it is subscribed
                        await platform.publish(down, orjson.dumps(probe), qos=1)
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(0.2):
                                async for _ in platform.messages:
                                    break
                            break
                    await platform.publish(down, fw_cmd("f-old", url=OLDER_URL, force=True), qos=1)
                    async with asyncio.timeout(60):
                        async for message in platform.messages:
                            assert isinstance(message.payload, bytes)
                            answer: dict[str, Any] = orjson.loads(message.payload)
                            if answer["id"] == "f-old":  # not a late answer to a probe
                                return answer, sim
            finally:
                await agent.stop()
        raise AssertionError("no answer")

    answer, sim = asyncio.run(scenario())
    if allowed:
        assert (answer["ok"], answer["outcome"]) == (True, "updated"), answer
        assert (answer["from"], answer["to"]) == ("1.0.0", "0.9.0")
        assert fetched == [OLDER_URL] and str(sim.slots.version) == "0.9.0"
        return
    error = (
        "device 'mcu' does not allow a forced update (downgrade or reinstall) from the "
        "platform; only its own config can (allow_downgrade = true on the device)"
    )
    assert answer == {
        "id": "f-old",
        "ok": False,
        "outcome": "refused",
        "error": error,
        "ts": answer["ts"],
    }
    assert fetched == [] and sim.counts["ota_messages"] == 0
    assert str(sim.slots.version) == "1.0.0"
    logged = [(r.getMessage(), getattr(r, "error", None)) for r in caplog.records]
    assert ("command refused", error) in logged


def test_allow_downgrade_needs_a_firmware_key(tmp_path: Path) -> None:
    text = (
        '[gateway]\nid = "gw"\n[uplink]\nbroker = "mqtt://h"\n'
        '[[devices]]\nname = "mcu"\ndriver = "mcu"\nport = "/dev/ttyAMA0"\n'
        "allow_downgrade = true\n"
    )
    with pytest.raises(ConfigError, match=r"devices\[0\]\.allow_downgrade: needs firmware_key"):
        parse_config(text, base_dir=tmp_path)
