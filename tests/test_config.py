"""Config loading and validation, the starter template, and the init/validate commands.

Malformed configs are data: each folder in tests/configs/ holds a gateway.toml and
expected.err, the exact error text (one line per issue) that loading it must give.
To add a case, add a folder; to see what a case gives now, run this file with
CITYGW_REGEN_EXPECTED=1 (then read the diff before committing it).
"""

from __future__ import annotations

import os
import re
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, ConfigDict, SecretStr
from typer.testing import CliRunner

from agent.config import (
    BufferConfig,
    ConfigError,
    ConfigIssue,
    GatewayConfig,
    MetricsConfig,
    UplinkConfig,
    load_config,
    parse_config,
)
from agent.stage_config import STAGE_TYPES, RangeStageConfig
from cli import main as cli
from drivers import registry
from drivers.base import BatchSink, Driver
from drivers.sim.settings import SimDeviceSettings, SimPointSettings
from tests.helpers import check_config_case

CASES = Path(__file__).parent / "configs"
SECRET = "s3cr3t-Pa55word"
REAL_AVAILABLE_DRIVERS = registry.available_drivers


@pytest.fixture(autouse=True)
def _only_builtin_drivers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same drivers whatever is installed in the environment; no stray env vars."""
    monkeypatch.setattr(
        registry,
        "available_drivers",
        lambda: {
            "sim": EntryPoint(name="sim", value="drivers.sim:SimDriver", group=registry.GROUP)
        },
    )
    for name in list(os.environ):
        if name.startswith("CITYGW_TEST_"):
            monkeypatch.delenv(name)


# -- malformed configs (data-driven) ---------------------------------------------------


@pytest.mark.parametrize("case", sorted(p.name for p in CASES.iterdir() if p.is_dir()))
def test_malformed_config(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    error = check_config_case(CASES / case, monkeypatch)
    assert all(i.source == "gateway.toml" for i in error.issues)


def test_enough_malformed_cases() -> None:
    assert len([p for p in CASES.iterdir() if p.is_dir()]) >= 12


def test_several_errors_are_all_reported() -> None:
    text = (CASES / "several_errors" / "gateway.toml").read_text(encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="x.toml", base_dir=CASES)
    paths = [i.key_path for i in info.value.issues]
    assert len(paths) >= 10
    # phase 1 (generic), cross checks and phase 2 (driver keys) together, in file order
    for expected in (
        "gateway.id",
        "uplink.password",
        "uplink.backoff_max",
        "buffer.sync",
        "devices[0].poll",
        "devices[0].sed",
        "devices[0].points[0].bse",
        "devices[0].points[0].pipeline[0].min",
        "devices[0].points[1].name",
        "devices[1].name",
        "devices[1].driver",
    ):
        assert expected in paths
    assert paths.index("gateway.id") < paths.index("buffer.sync") < paths.index("devices[1].name")


def test_syntax_error_reports_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config('[gateway]\nid = "gw"\nsite = = 3\n', source="gw.toml")
    (issue,) = info.value.issues
    assert issue.source == "gw.toml"
    assert issue.key_path.startswith("line 3, column")
    assert "TOML syntax error" in issue.message


def test_issue_and_error_format() -> None:
    issue = ConfigIssue("gateway.toml", "devices[3].points[7].scale", "unknown key 'scale'")
    assert str(issue) == "gateway.toml: devices[3].points[7].scale: unknown key 'scale'"
    err = ConfigError([issue, ConfigIssue("a.toml", "", "broken")])
    assert str(err) == f"{issue}\na.toml: broken"
    assert err.issues[1].message == "broken"


# -- a valid config ----------------------------------------------------------------------

VALID = """
[gateway]
id = "gw-riverside-07"
site = "Riverside, block 7"
location = { lat = 52.52, lon = 13.40 }

[uplink]
broker = "mqtts://platform.example.city:8883"
username = "gw-riverside-07"
password = "${CITYGW_TEST_PASSWORD}"
ca_file = "certs/ca.pem"
keepalive = "30s"
ack_timeout = "1500ms"
backoff_min = "1s"
backoff_max = "2m"

[buffer]
path = "data/buffer.db"
capacity = "64MB"
flush_interval = "250ms"
sync = "full"

[[devices]]
name = "bridge-7"
driver = "sim"
poll = "1s"
seed = 7
latency = "20ms"

  [[devices.points]]
  name = "strain_1"
  unit = "µε"
  base = 120.0
  amplitude = 15.0
  resolution = 0.1
  pipeline = [ { type = "range", min = -2000.0, max = 2000.0, action = "flag" } ]

  [[devices.points]]
  name = "open"
  type = "bool"
  writable = true

[[devices]]
name = "spare"
driver = "sim"
enabled = false
"""


def test_valid_config_types(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITYGW_TEST_PASSWORD", SECRET)
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.pem").write_text("ca")
    path = tmp_path / "gateway.toml"
    path.write_text(VALID, encoding="utf-8")
    monkeypatch.chdir("/")  # relative paths must not depend on the working directory

    cfg = load_config(path)

    assert cfg.source == str(path)
    assert cfg.gateway.id == "gw-riverside-07"
    assert cfg.gateway.location is not None and cfg.gateway.location.lat == 52.52
    up = cfg.uplink
    assert up.broker == "mqtts://platform.example.city:8883"
    assert up.client_id == "citygw-gw-riverside-07"
    assert isinstance(up.password, SecretStr)
    assert up.password.get_secret_value() == SECRET
    assert SECRET not in repr(cfg) and SECRET not in str(cfg.model_dump())
    assert up.ca_file == tmp_path / "certs" / "ca.pem"
    assert up.cert_file is None and up.key_file is None
    assert (up.keepalive, up.ack_timeout, up.backoff_max) == (30.0, 1.5, 120.0)
    assert up.window == 8 and up.max_batch_points == 10_000  # defaults
    assert cfg.buffer.path == tmp_path / "data" / "buffer.db"
    assert cfg.buffer.capacity == 64 * 1024 * 1024
    assert cfg.buffer.flush_interval == 0.25
    assert cfg.buffer.sync == "full"
    assert cfg.buffer.max_memory_points == 500_000

    bridge, spare = cfg.devices
    assert bridge.poll == 1.0 and bridge.enabled and not spare.enabled
    assert isinstance(bridge.settings, SimDeviceSettings)
    assert bridge.settings.seed == 7 and bridge.settings.latency == 0.02
    strain, opened = bridge.points
    assert isinstance(strain.settings, SimPointSettings)
    assert strain.settings.amplitude == 15.0 and strain.settings.resolution == 0.1
    assert strain.unit == "µε" and strain.type == "float" and not strain.writable
    (stage,) = strain.pipeline
    assert isinstance(stage, RangeStageConfig)
    assert (stage.min, stage.max, stage.action) == (-2000.0, 2000.0, "flag")
    assert opened.type == "bool" and opened.writable and opened.pipeline == []
    assert isinstance(opened.settings, SimPointSettings) and opened.settings.base == 0.0
    assert spare.points == [] and isinstance(spare.settings, SimDeviceSettings)
    assert cfg.point_count() == 2


def test_minimal_config_defaults(tmp_path: Path) -> None:
    cfg = parse_config(
        '[gateway]\nid = "gw"\n[uplink]\nbroker = "mqtt://10.0.0.1"\n', base_dir=tmp_path
    )
    assert cfg.source == "<string>"
    assert cfg.gateway.site == "" and cfg.gateway.location is None
    assert cfg.uplink.username is None and cfg.uplink.password is None
    assert cfg.uplink.topic_prefix == "citygw"
    assert cfg.buffer.path == tmp_path / "buffer.db"
    assert cfg.devices == []


def test_env_var_in_any_string_and_escape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITYGW_TEST_HOST", "broker.local")
    monkeypatch.setenv("CITYGW_TEST_SITE", "Dock 4")
    cfg = parse_config(
        '[gateway]\nid = "gw"\nsite = "${CITYGW_TEST_SITE} / $${NOT_EXPANDED}"\n'
        '[uplink]\nbroker = "mqtt://${CITYGW_TEST_HOST}:1884"\n'
    )
    assert cfg.gateway.site == "Dock 4 / ${NOT_EXPANDED}"
    assert cfg.uplink.broker == "mqtt://broker.local:1884"


def test_undefined_env_var_gives_no_follow_up_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config('[gateway]\nid = "gw"\n[uplink]\nbroker = "${CITYGW_TEST_BROKER}"\n')
    (issue,) = info.value.issues
    assert issue.key_path == "uplink.broker"
    assert "CITYGW_TEST_BROKER is not set" in issue.message


@pytest.mark.parametrize(
    "broker",
    ["mqtt://host", "mqtts://host:8883", "mqtt://10.1.2.3:1884/", "mqtt://[::1]:1883"],
)
def test_broker_urls_accepted(broker: str) -> None:
    cfg = parse_config(f'[gateway]\nid = "gw"\n[uplink]\nbroker = "{broker}"\n')
    assert cfg.uplink.broker == broker


@pytest.mark.parametrize(
    "broker",
    ["host:1883", "mqtt://", "tcp://host", "mqtt://host:99999", "mqtt://u:pw@host", "mqtt://h/x"],
)
def test_broker_urls_rejected(broker: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f'[gateway]\nid = "gw"\n[uplink]\nbroker = "{broker}"\n')
    assert [i.key_path for i in info.value.issues] == ["uplink.broker"]


def test_secret_never_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config('[gateway]\nid = "gw"\n[uplink]\nbroker = "x"\npassword = 12345678\n')
    assert "12345678" not in str(info.value)
    assert "uplink.password: expected text in quotes, got (hidden)" in str(info.value)


# -- the starter template ----------------------------------------------------------------


@pytest.fixture
def real_drivers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped drivers: the template has an example of each."""
    monkeypatch.setattr(registry, "available_drivers", REAL_AVAILABLE_DRIVERS)


@pytest.mark.usefixtures("real_drivers")
def test_template_validates(tmp_path: Path) -> None:
    cfg = parse_config(cli.template_text(), source="gateway.toml", base_dir=tmp_path)
    enabled = [d for d in cfg.devices if d.enabled]
    assert 2 <= len(enabled) <= 3
    assert all(d.driver == "sim" for d in enabled)  # it runs as written, without hardware
    assert cfg.buffer.path == tmp_path / "buffer.db"
    assert cfg.uplink.broker.startswith("mqtts://")


@pytest.mark.usefixtures("real_drivers")
def test_template_has_an_example_of_every_driver(tmp_path: Path) -> None:
    # the real loader checks the switched-off examples too, so they cannot go stale
    cfg = parse_config(cli.template_text(), source="gateway.toml", base_dir=tmp_path)
    by_driver: dict[str, list[Any]] = {}
    for d in cfg.devices:
        by_driver.setdefault(d.driver, []).append(d.settings)
        assert d.points, f"{d.name}: an example without points"
    assert set(by_driver) == set(REAL_AVAILABLE_DRIVERS())
    assert sorted(s.transport for s in by_driver["modbus"]) == ["rtu", "tcp"]


@pytest.mark.usefixtures("real_drivers")
def test_template_local_action_example_validates_once_uncommented(tmp_path: Path) -> None:
    text = cli.template_text()
    head, example = text.split("# -- acting on site:", 1)
    lines = [line.removeprefix("# ") for line in example.splitlines()[1:]]
    # the TOML lines (tables, keys); the others are prose
    block = "\n".join(line for line in lines if re.match(r"\[\[|\w+ = ", line))
    # its Modbus device is switched off in the template, as it has no hardware there
    head = head.replace(
        'name = "pump-3"\ndriver = "modbus"\nenabled = false', 'name = "pump-3"\ndriver = "modbus"'
    )
    cfg = parse_config(head + block, source="gateway.toml", base_dir=tmp_path)
    assert [d.key for d in cfg.derived] == ["derived/pump3_inflow"]
    assert [r.id for r in cfg.rules] == ["pump-3-flood"]


def test_template_shows_every_stage_type(tmp_path: Path) -> None:
    text = cli.template_text()
    # the commented pipeline example, uncommented, is a valid pipeline
    example = text.split("#   pipeline = [\n", 1)[1].split("#   ]\n", 1)[0]
    stages = "\n".join(line.removeprefix("#") for line in example.splitlines())
    head = '[gateway]\nid = "gw"\n[uplink]\nbroker = "mqtt://h"\n'
    device = '[[devices]]\nname = "d"\ndriver = "sim"\n'
    point = f'[[devices.points]]\nname = "p"\nmin = 0.0\nmax = 8.0\npipeline = [\n{stages}\n]\n'
    (dev,) = parse_config(head + device + point, base_dir=tmp_path).devices
    assert sorted(s.type for s in dev.points[0].pipeline) == sorted(STAGE_TYPES)


def test_template_documents_every_key() -> None:
    text = cli.template_text()
    models = (GatewayConfig, UplinkConfig, BufferConfig, MetricsConfig)
    for model in (*models, SimDeviceSettings, SimPointSettings):
        for key in model.model_fields:
            assert key in text, f"{model.__name__}.{key} is not explained in the template"


# -- driver registry ---------------------------------------------------------------------


class _FakeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: int


class FakeDriver(Driver):
    name = "fake"
    device_model: ClassVar[type[BaseModel]] = _FakeSettings

    async def run(self, sink: BatchSink) -> None:  # pragma: no cover - never run here
        return None


def _register_fake(monkeypatch: pytest.MonkeyPatch) -> None:
    eps = {
        "fake": EntryPoint(name="fake", value=f"{__name__}:FakeDriver", group=registry.GROUP),
        "sim": EntryPoint(name="sim", value="drivers.sim:SimDriver", group=registry.GROUP),
        "broken": EntryPoint(name="broken", value="no_such_module:X", group=registry.GROUP),
    }
    monkeypatch.setattr(registry, "available_drivers", lambda: eps)


def test_registry_loads_and_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    _register_fake(monkeypatch)
    assert registry.load_driver("fake") is FakeDriver
    with pytest.raises(registry.DriverNotFound) as info:
        registry.load_driver("zigbee")
    assert str(info.value) == "unknown driver 'zigbee'; installed: fake, sim, broken"
    with pytest.raises(registry.DriverLoadError, match="no_such_module"):
        registry.load_driver("broken")


def test_config_uses_driver_models(monkeypatch: pytest.MonkeyPatch) -> None:
    _register_fake(monkeypatch)
    head = '[gateway]\nid = "gw"\n[uplink]\nbroker = "mqtt://h"\n'
    cfg = parse_config(head + '[[devices]]\nname = "m1"\ndriver = "fake"\naddress = 3\n')
    settings = cfg.devices[0].settings
    assert isinstance(settings, _FakeSettings) and settings.address == 3
    with pytest.raises(ConfigError) as info:
        parse_config(
            head
            + '[[devices]]\nname = "m1"\ndriver = "fake"\nbaud = 1\n'
            + '[[devices]]\nname = "m2"\ndriver = "broken"\nanything = 1\n'
        )
    assert str(info.value).splitlines() == [
        "<string>: devices[0].baud: unknown key 'baud'; allowed: name, driver, poll, "
        "enabled, location, points, address",
        "<string>: devices[0].address: required key is missing",
        "<string>: devices[1].driver: driver 'broken' (no_such_module:X) cannot be loaded: "
        "No module named 'no_such_module'",
    ]


def test_real_registry_knows_sim() -> None:
    # without the monkeypatch: built-in drivers are found even when not pip-installed
    drivers = REAL_AVAILABLE_DRIVERS()
    assert drivers["sim"].value == "drivers.sim:SimDriver"
    assert drivers["sim"].load().__name__ == "SimDriver"


# -- CLI ---------------------------------------------------------------------------------

runner = CliRunner()


def test_init_writes_refuses_and_forces(tmp_path: Path) -> None:
    target = tmp_path / "gateway.toml"
    result = runner.invoke(cli.app, ["init", str(target)])
    assert result.exit_code == 0, result.output
    assert target.read_text(encoding="utf-8") == cli.template_text()

    target.write_text("# mine\n")
    result = runner.invoke(cli.app, ["init", str(target)])
    assert result.exit_code == 1
    assert "--force" in result.output
    assert target.read_text() == "# mine\n"

    result = runner.invoke(cli.app, ["init", str(target), "--force"])
    assert result.exit_code == 0
    assert target.read_text(encoding="utf-8") == cli.template_text()


@pytest.mark.usefixtures("real_drivers")
def test_init_default_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli.app, ["init"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "gateway.toml").is_file()
    result = runner.invoke(cli.app, ["validate"])
    assert result.exit_code == 0, result.output
    # 3 sim devices and one switched-off example per real driver (a profile's points)
    assert re.fullmatch(r"gateway\.toml: OK \(8 devices, \d+ points\)", result.stdout.strip())


def test_validate_ok(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITYGW_TEST_PASSWORD", SECRET)
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.pem").write_text("ca")
    path = tmp_path / "gateway.toml"
    path.write_text(VALID, encoding="utf-8")
    result = runner.invoke(cli.app, ["validate", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{path}: OK (2 devices, 2 points)"
    assert SECRET not in result.output


def test_validate_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(CASES / "several_errors")
    result = runner.invoke(cli.app, ["validate", "-c", "gateway.toml"])
    assert result.exit_code == 1
    expected = (CASES / "several_errors" / "expected.err").read_text(encoding="utf-8")
    assert result.stderr.startswith(expected)
    assert "12 problems found" in result.stderr
    assert result.stdout == ""


def test_validate_never_shows_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITYGW_TEST_PASSWORD", SECRET)
    path = tmp_path / "gateway.toml"
    for password in ("${CITYGW_TEST_PASSWORD}", SECRET):
        path.write_text(
            f'[gateway]\nid = "gw bad"\n[uplink]\nbroker = "mqtt://h"\npassword = "{password}"\n'
            'window = 0\n[[devices]]\nname = "d"\ndriver = "sim"\nseed = "x"\n',
            encoding="utf-8",
        )
        result = runner.invoke(cli.app, ["validate", "-c", str(path)])
        assert result.exit_code == 1
        assert "uplink.window" in result.stderr and "devices[0].seed" in result.stderr
        assert SECRET not in result.output
        path.write_text(
            f'[gateway]\nid = "gw"\n[uplink]\nbroker = "mqtt://h"\npassword = "{password}"\n',
            encoding="utf-8",
        )
        result = runner.invoke(cli.app, ["validate", "-c", str(path)])
        assert result.exit_code == 0
        assert SECRET not in result.output


def test_validate_missing_file(tmp_path: Path) -> None:
    result = runner.invoke(cli.app, ["validate", "-c", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2
    assert "file not found" in result.stderr
