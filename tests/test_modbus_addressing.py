"""Addressing conventions (issue 13): a device or profile states how its points'
addresses are written (`address_base`: 0 = protocol/PDU address, 1 = counted from 1,
"modicon" = 0xxxx/1xxxx/3xxxx/4xxxx), each source in its own convention, converted to
the protocol address at config load; errors name the written number, the convention
and the valid range."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.config import ConfigError, load_config
from cli import main as cli
from drivers.modbus import settings
from drivers.modbus.settings import ModbusPointSettings

HEADER = """
[gateway]
id = "gw-addr"
[uplink]
broker = "mqtt://127.0.0.1:1883"
[buffer]
path = "{folder}/buf.db"
"""

# A profile written as Eastron's SDM630 document prints the "Address (Register)" column:
# 30001 = Phase 1 line to neutral volts (hex 0x0000), 30071 = frequency (0x0046), 40003 =
# demand period (holding 0x0002). Source: Eastron, "SDM630 Modbus Smart Meter - Modbus
# Protocol Implementation", input register table 1.2.1 and holding register table 1.3.1
# (as reproduced at https://manualshive.com/en/manual/eastron/sdm630-modbus-mid-v2/522581
# pages 25 and 28).
MODICON_PROFILE = """
name = "sdm-modicon"
description = "SDM630 points as the document's 3xxxx/4xxxx column prints them"
source = "Eastron SDM630 Modbus Protocol Implementation, tables 1.2.1 and 1.3.1"
[device]
address_base = "modicon"
[[points]]
name = "l1_voltage"
address = 30001
datatype = "float32"
[[points]]
name = "frequency"
address = 30071
datatype = "float32"
[[points]]
name = "total_kwh"
address = 300343
datatype = "float32"
[[points]]
name = "demand_period"
address = 40003
datatype = "float32"
"""


def load(tmp_path: Path, devices: str, profile: str | None = None) -> dict[str, object]:
    if profile is not None:
        (tmp_path / "prof.toml").write_text(profile, encoding="utf-8")
    path = tmp_path / "gateway.toml"
    path.write_text(HEADER.format(folder=tmp_path) + devices, encoding="utf-8")
    cfg = load_config(path)
    return {p.name: p.settings for d in cfg.devices for p in d.points}


def load_error(tmp_path: Path, devices: str, profile: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, devices, profile)
    return str(info.value)


@pytest.mark.parametrize(
    ("number", "base", "table", "expected"),
    [
        (0x0046, 0, "input_register", ("input_register", 70)),  # hex tables: as printed
        (100, 0, None, ("holding_register", 100)),
        (1, 1, "input_register", ("input_register", 0)),
        (65536, 1, None, ("holding_register", 65535)),
        (30001, "modicon", None, ("input_register", 0)),
        (30071, "modicon", "input_register", ("input_register", 70)),
        (300001, "modicon", None, ("input_register", 0)),
        (365536, "modicon", None, ("input_register", 65535)),
        (40001, "modicon", None, ("holding_register", 0)),
        (465536, "modicon", None, ("holding_register", 65535)),
        (10001, "modicon", None, ("discrete_input", 0)),
        (1, "modicon", None, ("coil", 0)),
        (9999, "modicon", "coil", ("coil", 9998)),
    ],
)
def test_numbers_to_protocol_addresses(
    number: int, base: object, table: str | None, expected: tuple[str, int]
) -> None:
    assert settings.pdu_address(number, base, table) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("number", "base", "table", "message"),
    [
        (65536, 0, None, "65536 is not a protocol (PDU) address (address_base = 0): 0..65535"),
        (0, 1, None, "0 is not a 1-based register number (address_base = 1): 1..65536"),
        (30000, "modicon", None, "30000 is not a Modicon register number"),
        (20001, "modicon", None, "20001 is not a Modicon register number"),
        (465537, "modicon", None, "465537 is not a Modicon register number"),
        (
            30001,
            "modicon",
            "holding_register",
            "30001 is a input_register number (address_base = 'modicon'), but the point says "
            "table = 'holding_register'; holding_register numbers are 40001..49999 or "
            "400001..465536",
        ),
    ],
)
def test_numbers_outside_the_convention(
    number: int, base: object, table: str | None, message: str
) -> None:
    with pytest.raises(ValueError) as info:
        settings.pdu_address(number, base, table)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_a_device_writes_its_points_in_its_own_convention(tmp_path: Path) -> None:
    points = load(
        tmp_path,
        """
[[devices]]
name = "m"
driver = "modbus"
host = "127.0.0.1"
address_base = "modicon"
  [[devices.points]]
  name = "volts"
  address = 30001
  datatype = "float32"
  [[devices.points]]
  name = "setpoint"
  address = 40101
  [[devices.points]]
  name = "relay"
  address = 3
[[devices]]
name = "one"
driver = "modbus"
host = "127.0.0.1"
address_base = 1
  [[devices.points]]
  name = "first"
  table = "input_register"
  address = 1
""",
    )
    got = {
        name: (s.table, s.address, s.shown_address)  # type: ignore[attr-defined]
        for name, s in points.items()
    }
    assert got == {
        "volts": ("input_register", 0, "30001 (PDU 0)"),
        "setpoint": ("holding_register", 100, "40101 (PDU 100)"),
        "relay": ("coil", 2, "3 (PDU 2)"),
        "first": ("input_register", 0, "1 (PDU 0)"),
    }
    assert points["relay"].datatype == "bool"  # type: ignore[attr-defined]


def test_a_profile_keeps_its_convention_and_the_device_keeps_its_own(tmp_path: Path) -> None:
    points = load(
        tmp_path,
        """
[[devices]]
name = "meter"
driver = "modbus"
host = "127.0.0.1"
profile = "prof.toml"
  [[devices.points]]
  name = "frequency"
  table = "input_register"
  address = 0x0048
  [[devices.points]]
  name = "serial"
  table = "holding_register"
  address = 0xFC00
  datatype = "uint32"
""",
        MODICON_PROFILE,
    )

    def where(name: str) -> tuple[str, int]:
        s = points[name]
        assert isinstance(s, ModbusPointSettings)
        return s.table, s.address

    # the profile's 3xxxx/4xxxx numbers, with the device at address_base = 0
    assert where("l1_voltage") == ("input_register", 0)
    assert where("demand_period") == ("holding_register", 2)
    # the device's own points and the address it overrides: in the device's convention
    assert where("frequency") == ("input_register", 0x48)
    assert where("serial") == ("holding_register", 0xFC00)


def test_profile_address_base_is_not_the_devices(tmp_path: Path) -> None:
    # a device at address_base = 1 whose profile is Modicon: the profile's points are
    # not shifted by one, the device's own are
    points = load(
        tmp_path,
        """
[[devices]]
name = "meter"
driver = "modbus"
host = "127.0.0.1"
profile = "prof.toml"
address_base = 1
  [[devices.points]]
  name = "extra"
  table = "input_register"
  address = 341
""",
        MODICON_PROFILE,
    )
    assert points["l1_voltage"].address == 0  # type: ignore[attr-defined]
    assert points["extra"].address == 340  # type: ignore[attr-defined]


def test_errors_name_the_number_the_convention_and_the_key(tmp_path: Path) -> None:
    message = load_error(
        tmp_path,
        """
[[devices]]
name = "m"
driver = "modbus"
host = "127.0.0.1"
address_base = "modicon"
  [[devices.points]]
  name = "ok"
  address = 30001
  [[devices.points]]
  name = "bad"
  table = "input_register"
  address = 40001
""",
    )
    assert (
        "devices[0].points[1].address: 40001 is a holding_register number (address_base = "
        "'modicon'), but the point says table = 'input_register'; input_register numbers "
        "are 30001..39999 or 300001..365536"
    ) in message
    # a 3xxxx number written as a protocol address: the message points at address_base
    message = load_error(
        tmp_path,
        """
[[devices]]
name = "m"
driver = "modbus"
host = "127.0.0.1"
  [[devices.points]]
  name = "v"
  table = "input_register"
  address = 300001
""",
    )
    assert "devices[0].points[0].address: 300001 is not a protocol (PDU) address" in message
    assert "address_base = 'modicon'" in message
    # a profile's point: named with the profile file
    bad_profile = MODICON_PROFILE.replace("address = 30071", "address = 30000")
    message = load_error(
        tmp_path,
        '[[devices]]\nname = "m"\ndriver = "modbus"\nhost = "h"\nprofile = "prof.toml"\n',
        bad_profile,
    )
    assert (
        "profile file prof.toml: points[1].address: 30000 is not a Modicon register number"
        in message
    )


def test_plan_shows_the_written_numbers_and_the_protocol_addresses(tmp_path: Path) -> None:
    (tmp_path / "prof.toml").write_text(MODICON_PROFILE, encoding="utf-8")
    path = tmp_path / "gateway.toml"
    path.write_text(
        HEADER.format(folder=tmp_path)
        + '[[devices]]\nname = "meter"\ndriver = "modbus"\nhost = "127.0.0.1"\n'
        'profile = "prof.toml"\nmax_gap = 0\n',
        encoding="utf-8",
    )
    runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})
    result = runner.invoke(cli.app, ["modbus", "plan", "-c", str(path)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "    holding_register 40003..40004 (PDU 2..3, 2 registers, 1 point)" in lines
    assert "    input_register 30001..30002 (PDU 0..1, 2 registers, 1 point)" in lines
    assert "    input_register 30071..30072 (PDU 70..71, 2 registers, 1 point)" in lines
    # a 6-digit number is shown as written
    assert "    input_register 300343..300344 (PDU 342..343, 2 registers, 1 point)" in lines
