"""Modbus config: profiles, per-table validators and cross-point checks.

Malformed configs are data: each folder in drivers/modbus/testcases/ holds a
gateway.toml and expected.err, the exact error text loading it must give. To add a
case, add a folder; to see what a case gives now, run this file with
CITYGW_REGEN_EXPECTED=1 (then read the diff before committing it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import PointConfig, load_config, parse_config
from drivers.base import DeviceConfigProblem
from drivers.modbus import checks, profiles
from drivers.modbus.settings import ModbusDeviceSettings, ModbusPointSettings
from tests.helpers import check_config_case

MODBUS = Path(profiles.__file__).parent
CASES = MODBUS / "testcases"
HEAD = '[gateway]\nid = "gw"\n[uplink]\nbroker = "mqtt://h"\n'


# -- malformed configs (data-driven) ---------------------------------------------------


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir() if p.is_dir()))
def test_malformed_modbus_config(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    check_config_case(CASES / case, monkeypatch)


def test_enough_malformed_cases() -> None:
    assert len([p for p in CASES.iterdir() if p.is_dir()]) >= 12


# -- valid configs ------------------------------------------------------------------------

PROFILED = (
    HEAD
    + """
[[devices]]
name = "meter"
driver = "modbus"
host = "10.0.0.5"
profile = "sdm630"
points_exclude = ["l1_l2_voltage", "l2_l3_voltage", "l3_l1_voltage", "neutral_current"]
poll_groups = { totals = "5m", slow = "1h" }

  [[devices.points]]
  name = "total_power"            # override: unit and pipeline
  unit = "kW"
  scale = 0.001
  pipeline = [ { type = "range", min = -500.0, max = 500.0 } ]

  [[devices.points]]
  name = "serial_number"          # a new point
  type = "int"
  table = "holding_register"
  address = 0xFC00
  datatype = "uint32"
  group = "slow"
"""
)


def test_profile_override_and_exclude() -> None:
    cfg = parse_config(PROFILED)
    (meter,) = cfg.devices
    settings = meter.settings
    assert isinstance(settings, ModbusDeviceSettings)
    # config keys win; poll groups merge group by group; profile defaults fill the rest
    assert settings.poll_groups == {"totals": 300.0, "slow": 3600.0}
    assert settings.max_registers == 80
    names = [p.name for p in meter.points]
    sdm630 = profiles.load_profile("sdm630", Path("."))
    assert len(meter.points) == len(sdm630.points) - 4 + 1
    assert names[:2] == ["total_power", "serial_number"]  # own tables first, in file order
    rest = [n for n in sdm630.point_names() if n not in (*settings.points_exclude, "total_power")]
    assert names[2:] == rest  # then the profile's, in profile order
    assert "neutral_current" not in names
    power = meter.points[0]
    ps = power.settings
    assert isinstance(ps, ModbusPointSettings)
    assert power.unit == "kW" and len(power.pipeline) == 1
    assert (ps.table, ps.address, ps.datatype, ps.scale) == (
        "input_register",
        0x34,
        "float32",
        0.001,
    )
    serial = meter.points[1].settings
    assert isinstance(serial, ModbusPointSettings) and serial.group == "slow"
    total = next(p for p in meter.points if p.name == "total_energy")
    assert isinstance(total.settings, ModbusPointSettings)
    assert total.unit == "kWh" and total.settings.group == "totals"


def test_profile_from_a_path(tmp_path: Path) -> None:
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "pump.toml").write_text(
        'name = "pump"\ndescription = "a pump"\nsource = "the pump maker\'s manual, p. 12"\n'
        "[device]\nmax_registers = 16\n"
        '[[points]]\nname = "running"\ntable = "coil"\naddress = 3\n'
        'writable = true\ntype = "bool"\n',
        encoding="utf-8",
    )
    (tmp_path / "gateway.toml").write_text(
        HEAD + '[[devices]]\nname = "pump"\ndriver = "modbus"\ntransport = "rtu"\n'
        'serial_port = "/dev/ttyUSB0"\nunit_id = 7\nprofile = "maps/pump.toml"\n',
        encoding="utf-8",
    )
    cfg = load_config(tmp_path / "gateway.toml")
    (point,) = cfg.devices[0].points
    assert point.writable and point.type == "bool"
    assert isinstance(point.settings, ModbusPointSettings)
    assert (point.settings.table, point.settings.datatype) == ("coil", "bool")
    settings = cfg.devices[0].settings
    assert isinstance(settings, ModbusDeviceSettings) and settings.max_registers == 16


@pytest.mark.parametrize("name", profiles.available_profiles())
def test_shipped_profiles_load_and_check(name: str) -> None:
    profile = profiles.load_profile(name, Path("."))
    assert profile.name == name
    assert "http" in profile.source and profile.description
    cfg = parse_config(
        HEAD + f'[[devices]]\nname = "d"\ndriver = "modbus"\nhost = "h"\nprofile = "{name}"\n'
    )
    assert [p.name for p in cfg.devices[0].points] == profile.point_names()
    device = cfg.devices[0].settings
    points = [p.settings for p in cfg.devices[0].points]
    assert isinstance(device, ModbusDeviceSettings)
    assert checks.check_device(device, points, profile.points) == []  # type: ignore[arg-type]


def test_at_least_three_profiles() -> None:
    assert {"sdm630", "sdm120", "adam4017-level"} <= set(profiles.available_profiles())
    assert len(profiles.available_profiles()) >= 3


def test_sdm630_addresses_from_the_protocol_document() -> None:
    points = {p["name"]: p for p in profiles.load_profile("sdm630", Path(".")).points}
    assert points["l1_voltage"]["address"] == 0x0000
    assert points["l1_current"]["address"] == 0x0006
    assert points["l1_power"]["address"] == 0x000C
    assert points["frequency"]["address"] == 0x0046
    assert points["total_energy"]["address"] == 0x0156
    assert all(p["table"] == "input_register" for p in points.values())
    assert all(p["datatype"] == "float32" for p in points.values())


def test_sample_config_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITYGW_PASSWORD", "x")
    cfg = load_config(MODBUS / "sample.toml")
    transports = {
        d.settings.transport for d in cfg.devices if isinstance(d.settings, ModbusDeviceSettings)
    }
    assert transports == {"tcp", "rtu", "rtu-over-tcp"}
    rtu = [
        d.settings
        for d in cfg.devices
        if isinstance(d.settings, ModbusDeviceSettings) and d.settings.transport == "rtu"
    ]
    assert len({s.serial_port for s in rtu}) == 1 and len({s.unit_id for s in rtu}) == 2
    assert any(
        d.settings.profile for d in cfg.devices if isinstance(d.settings, ModbusDeviceSettings)
    )


def test_generic_point_keys_in_step_with_config() -> None:
    assert set(profiles.GENERIC_POINT_KEYS) == set(PointConfig.model_fields)


def test_bool_is_the_default_datatype_of_bit_tables() -> None:
    p = ModbusPointSettings.model_validate({"table": "discrete_input", "address": 4})
    assert p.datatype == "bool" and p.size == 1
    assert ModbusPointSettings.model_validate({"address": 4}).datatype == "uint16"


def test_a_word_and_its_bits_may_share_a_register() -> None:
    device = ModbusDeviceSettings.model_validate({"host": "h"})
    points = [
        ModbusPointSettings.model_validate({"address": 10}),
        ModbusPointSettings.model_validate({"address": 10, "datatype": "bit", "bit": 0}),
        ModbusPointSettings.model_validate({"address": 10, "datatype": "bit", "bit": 1}),
        ModbusPointSettings.model_validate({"address": 10, "datatype": "bool"}),
    ]
    assert checks.check_device(device, points) == []
    same_bit = [
        *points,
        ModbusPointSettings.model_validate({"address": 10, "datatype": "bit", "bit": 1}),
    ]
    (problem,) = checks.check_device(device, same_bit)
    assert problem.key_path == ("points", 4, "address")
    assert problem.message == "points[4] (holding_register 10) reads the same register as points[2]"


# -- checks that need the generic keys (names, writable) -------------------------------


def test_check_device_names_points_and_refuses_writable_read_only_tables() -> None:
    device = ModbusDeviceSettings.model_validate({"host": "h"})
    tables = [
        {"name": "level", "table": "input_register", "address": 0, "writable": True},
        {"name": "setpoint", "table": "holding_register", "address": 0, "writable": True},
        {"name": "alarm", "table": "discrete_input", "address": 0, "writable": True},
        {"name": "pump", "table": "coil", "address": 0, "writable": True},
        {"name": "total", "table": "input_register", "address": 0, "datatype": "float32"},
    ]
    points = [
        ModbusPointSettings.model_validate(
            {k: v for k, v in t.items() if k not in ("name", "writable")}
        )
        for t in tables
    ]
    problems = checks.check_device(device, points, tables)
    assert [(p.key_path, p.message) for p in problems] == [
        (
            ("points", 0, "writable"),
            "input_register points cannot be written; only coil and holding_register points "
            "may be writable",
        ),
        (
            ("points", 2, "writable"),
            "discrete_input points cannot be written; only coil and holding_register points "
            "may be writable",
        ),
        (
            ("points", 4, "address"),
            "points[4] 'total' (input_register 0-1, float32) overlaps points[0] 'level' "
            "(input_register 0, uint16)",
        ),
    ]


# -- profile loading -----------------------------------------------------------------------


def test_unknown_profile_lists_the_available_ones() -> None:
    with pytest.raises(DeviceConfigProblem) as info:
        profiles.load_profile("sdm999", Path("."))
    assert info.value.key_path == ("profile",)
    assert "sdm630" in info.value.message and "sdm120" in info.value.message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name = 'x'\n[[points]\n", "TOML syntax error"),
        ("name = 'x'\ndescription = 'd'\n", "source: required text is missing"),
        (
            "name = 'x'\ndescription = 'd'\nsource = 's'\nvendor = 'v'\n",
            "unknown key 'vendor'",
        ),
        (
            "name = 'x'\ndescription = 'd'\nsource = 's'\n[device]\nhost = 'h'\n",
            "device.host: not a device default a profile may set",
        ),
        ("name = 'x'\ndescription = 'd'\nsource = 's'\n", "points: a profile needs [[points]]"),
        (
            "name = 'x'\ndescription = 'd'\nsource = 's'\n[[points]]\nname = 'a'\naddress = 0\n"
            "datatype = 'float'\n",
            "points[0].datatype: Input should be",
        ),
        (
            "name = 'x'\ndescription = 'd'\nsource = 's'\n[[points]]\nname = 'a'\naddress = 0\n"
            "datatype = 'string'\n",
            "points[0].length: datatype = 'string' needs length",
        ),
        (
            "name = 'x'\ndescription = 'd'\nsource = 's'\n[[points]]\nname = 'a'\naddress = 0\n"
            "group = 'slow'\n",
            "points[0].group: poll group 'slow' is not in [device] poll_groups",
        ),
    ],
)
def test_broken_profile_names_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "p.toml").write_text(text, encoding="utf-8")
    with pytest.raises(DeviceConfigProblem) as info:
        profiles.load_profile("p.toml", tmp_path)
    assert info.value.key_path == ("profile",)
    assert info.value.message.startswith("profile file p.toml: ")
    assert message in info.value.message


def test_expand_leaves_devices_without_profile_alone() -> None:
    table = {"name": "d", "driver": "modbus", "points": [{"name": "a", "address": 1}]}
    assert profiles.expand_device(table, Path(".")) is table
