"""The README's examples stay true: its config example validates, and the test command
CI runs is the one it shows."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import parse_config
from agent.stage_config import STAGE_TYPES

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def test_modbus_example_config_validates() -> None:
    block = README.split("## Modbus devices", 1)[1].split("```toml", 1)[1].split("```", 1)[0]
    config = parse_config('[gateway]\nid = "gw"\n[uplink]\nbroker = "mqtt://h"\n' + block)
    meter, pump = config.devices
    assert meter.driver == pump.driver == "modbus"
    assert any(p.name == "voltage" and p.pipeline for p in meter.points)  # override applied
    setpoint = next(p for p in pump.points if p.name == "setpoint")
    assert (setpoint.writable, setpoint.min, setpoint.max) == (True, 0.5, 4.0)


def test_ci_runs_the_readme_test_command() -> None:
    section = README.split("<!-- test-command -->", 1)[1].split("<!-- /test-command -->", 1)[0]
    command = section.split("```sh\n", 1)[1].split("```", 1)[0].strip()
    assert "pytest" in command and "pip install -e '.[test]'" in command
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "test-command" in ci  # .ci/run extracts exactly this block


def test_mqtt_example_config_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    block = README.split("## MQTT sensors", 1)[1].split("```toml", 1)[1].split("```", 1)[0]
    head = '[gateway]\nid = "gw"\n[uplink]\nbroker = "mqtt://h"\n'
    monkeypatch.setenv("SITE_MQTT_PASSWORD", "secret")
    (device,) = parse_config(head + block).devices
    assert device.driver == "mqtt"
    assert [p.name for p in device.points] == ["pm25", "laeq"]


def test_ble_example_config_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    block = README.split("## BLE sensors", 1)[1].split("```toml", 1)[1].split("```", 1)[0]
    head = '[gateway]\nid = "gw"\n[uplink]\nbroker = "mqtt://h"\n'
    monkeypatch.setenv("KIOSK7_BIND_KEY", "231d39c1d7cc1ab1aee224cd096db932")
    (device,) = parse_config(head + block).devices
    assert device.driver == "ble"
    assert [p.name for p in device.points] == ["temperature", "rssi"]


def test_edge_processing_example_config_validates() -> None:
    section = README.split("## Edge processing", 1)[1]
    block = section.split("```toml", 1)[1].split("```", 1)[0]
    config = parse_config('[gateway]\nid = "gw"\n[uplink]\nbroker = "mqtt://h"\n' + block)
    (device,) = config.devices
    level, noise = device.points
    types = [s.type for s in level.pipeline] + [s.type for s in noise.pipeline]
    # every stage type has its example
    assert sorted(set(types)) == sorted(STAGE_TYPES)


def test_mcu_example_config_validates(tmp_path: Path) -> None:
    from firmware_bridge.image import generate_keypair

    block = README.split("## The gateway's microcontroller", 1)[1]
    block = block.split("```toml", 1)[1].split("```", 1)[0]
    _, public = generate_keypair(tmp_path / "fw")
    block = block.replace("/etc/citygw/fw.pub", str(public))
    head = '[gateway]\nid = "gw"\n[uplink]\nbroker = "mqtt://h"\n'
    (device,) = parse_config(head + block).devices
    assert device.driver == "mcu" and [p.name for p in device.points] == ["level"]
