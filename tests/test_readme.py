"""The README's examples stay true: its config example validates, and the test command
CI runs is the one it shows."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.stage_config import STAGE_TYPES

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
SETUP = ROOT / "tests" / "setup-system.sh"


def test_modbus_example_config_validates() -> None:
    block = README.split("## Modbus devices", 1)[1].split("```toml", 1)[1].split("```", 1)[0]
    config = parse_config('[gateway]\nid = "gw"\n[uplink]\nbroker = "mqtt://h"\n' + block)
    meter, pump = config.devices
    assert meter.driver == pump.driver == "modbus"
    assert any(p.name == "voltage" and p.pipeline for p in meter.points)  # override applied
    setpoint = next(p for p in pump.points if p.name == "setpoint")
    assert (setpoint.writable, setpoint.min, setpoint.max) == (True, 0.5, 4.0)


def readme_test_command() -> str:
    section = README.split("<!-- test-command -->", 1)[1].split("<!-- /test-command -->", 1)[0]
    return section.split("```sh\n", 1)[1].split("```", 1)[0].strip()


def test_ci_runs_the_readme_test_command() -> None:
    command = readme_test_command()
    assert "pytest" in command and "pip install -e '.[test]'" in command
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "test-command" in ci  # .ci/run extracts exactly this block


def test_readme_test_command_sets_up_the_machine_first() -> None:
    # on a fresh machine the command alone must do: the system's part comes first
    assert readme_test_command().startswith("bash tests/setup-system.sh && ")
    assert SETUP.is_file()
    # one place for it: .ci/run adds nothing of its own that the README's command lacks
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "apt-get" not in ci and "pg_ctlcluster" not in ci


#: stand-ins for the system commands tests/setup-system.sh uses; they log their calls
#: ($STUB_LOG), and dpkg-query knows the packages apt-get "installed" ($STUB_INSTALLED)
STUBS = {
    "dpkg-query": 'grep -qx "${@: -1}" "$STUB_INSTALLED" && echo -n installed || echo -n none',
    "apt-get": 'echo "apt-get $*" >> "$STUB_LOG"\n'
    '[ "$1" = install ] && for a in "$@"; do case "$a" in -*|install) ;; '
    '*) echo "$a" >> "$STUB_INSTALLED";; esac; done; exit 0',
    "sudo": 'echo "sudo $*" >> "$STUB_LOG"; exec "$@"',
    "pgrep": "exit 0",  # running
    "pg_isready": "exit 0",  # answering
    "psql": "exit 0",  # the database test opens
    "mosquitto": 'echo "mosquitto $*" >> "$STUB_LOG"',
    "pg_ctlcluster": 'echo "pg_ctlcluster $*" >> "$STUB_LOG"',
}


def run_setup(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SETUP)], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_setup_system_installs_what_is_missing_once(tmp_path: Path) -> None:
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, body in STUBS.items():
        (stubs / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (stubs / name).chmod(0o755)
    log, installed = tmp_path / "calls", tmp_path / "installed"
    installed.write_text("mosquitto\npostgresql\nprocps\nsystemd\n")  # a fresh machine of this kind
    log.touch()
    env = {
        **os.environ,
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "STUB_LOG": str(log),
        "STUB_INSTALLED": str(installed),
    }
    first = run_setup(env)
    assert first.returncode == 0, first.stderr
    assert "installing faketime fuse3 chromium" in first.stdout
    calls = [c.removeprefix("sudo ") for c in log.read_text().splitlines()]
    calls = [c.removeprefix("env DEBIAN_FRONTEND=noninteractive ") for c in calls]
    assert [c for c in calls if c.startswith("apt-get")] == [
        "apt-get update -qq",
        "apt-get install -y -qq faketime fuse3 chromium",
    ]
    # again: all there, all running, nothing done
    log.write_text("")
    again = run_setup(env)
    assert (again.returncode, again.stdout, log.read_text()) == (0, "setup-system: ready\n", "")


def test_setup_system_changes_nothing_on_a_machine_that_has_it_all(tmp_path: Path) -> None:
    # this machine ran it (the README's test command does, first): a second run finds
    # every package and service and must not reach for apt-get
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "apt-get").write_text(
        f"#!/usr/bin/env bash\ntouch {tmp_path / 'apt-called'}\nexit 1\n"
    )
    (stubs / "apt-get").chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"}
    first = run_setup(env)
    assert first.returncode == 0, first.stdout + first.stderr
    second = run_setup(env)
    assert (second.returncode, second.stdout) == (0, "setup-system: ready\n"), second.stderr
    assert not (tmp_path / "apt-called").exists()


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


def test_local_action_example_config_validates() -> None:
    block = README.split("## Acting at the lowest level", 1)[1]
    block = block.split("```toml", 1)[1].split("```", 1)[0]
    config = parse_config('[gateway]\nid = "gw"\n[uplink]\nbroker = "mqtt://h"\n' + block)
    assert [d.key for d in config.derived] == ["derived/underpass_inflow", "derived/aqi"]
    pump, sign = config.rules
    assert [a.kind for a in pump.start] == ["write", "publish", "event"]
    assert (pump.override, sign.for_) == ("underpass/hand", 300.0)
