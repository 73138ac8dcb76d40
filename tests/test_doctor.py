"""`citygw doctor`: every check in pass and in fail (and warn where it has one), against
real things where they are cheap (a buffer in tmp_path, one Mosquitto with TLS listeners
and a password file, the Modbus simulator, the microcontroller simulator on a pty) and
with the system's answers injected where the test machine cannot give both (free disk,
clock status, sysfs, file permissions as root, systemctl); then the CLI's exit codes
and its --json."""

from __future__ import annotations

import asyncio
import datetime
import grp
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from typer.testing import CliRunner

from agent.config import Config, parse_config
from agent.doctor import Check, Options, Status, exit_code, result, run_checks
from agent.doctor.broker import BrokerTarget, probe_broker, refusals
from agent.doctor.buffer import DISK_MARGIN, backlog_check, check_buffer, disk_check
from agent.doctor.check import passed
from agent.doctor.clock import (
    STA_UNSYNC,
    clock_check,
    kernel_status,
    parse_timedatectl,
    synced_from_status,
)
from agent.doctor.config import check_config
from agent.doctor.devices import DeviceEnv, check_devices, health_check
from agent.doctor.service import UNIT, Systemctl, read_unit, systemd_check, unit_check
from buffer import Buffer, Lane
from cli.main import app
from cli.service import render_unit
from common.broker import Mosquitto, acl_conf, free_port, tls_listener
from common.mqtt_url import BrokerAddress
from drivers.mcu.simulator import SimMcu
from drivers.modbus.simulator import ModbusSimulator, RegisterImage
from tests.helpers import running_broker
from tests.pki import LOCALHOST, issue, make_ca

GW = "gw-doc"
PASSWORD = "right horse battery"
NOW = datetime.datetime.now(datetime.UTC)
runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def config(tmp_path: Path, uplink: str = "", devices: str = "", buffer: str = "") -> Path:
    path = tmp_path / "gateway.toml"
    uplink = uplink or 'broker = "mqtt://127.0.0.1:1"'
    path.write_text(
        f'[gateway]\nid = "{GW}"\n[uplink]\n{uplink}\n'
        f'[buffer]\npath = "buffer.db"\ncapacity = "1MB"\n{buffer}\n{devices}'
    )
    return path


def loaded(path: Path) -> Config:
    return parse_config(path.read_text(), str(path), base_dir=path.parent)


# -- config --------------------------------------------------------------------------------


def test_config_pass_warn_and_fail(tmp_path: Path) -> None:
    good, cfg = check_config(config(tmp_path, f'broker = "mqtt://h"\nusername = "{GW}"'))
    assert good.status == "pass" and cfg is not None, good
    # an MQTT identity that is not the gateway id: valid, but the broker's ACL drops it
    warned, cfg = check_config(config(tmp_path, 'broker = "mqtt://h"\nusername = "someone"'))
    assert warned.status == "warn" and cfg is not None, warned
    assert "someone" in warned.message
    bad, cfg = check_config(config(tmp_path, 'broker = "http://h"\nwindow = 0'))
    assert bad.status == "fail" and cfg is None
    assert "2 problems" in bad.message and "uplink.window" in bad.message, bad.message
    missing, _ = check_config(tmp_path / "nope.toml")
    assert missing.status == "fail" and "citygw init" in missing.fix


# -- buffer --------------------------------------------------------------------------------


def test_buffer_healthy_on_disk(tmp_path: Path) -> None:
    cfg = loaded(config(tmp_path))
    with Buffer(cfg.buffer.path, cfg.buffer.capacity) as buf:
        buf.append(Lane.TELEMETRY, b"x" * 100, 5)
    checks, state = check_buffer(cfg.buffer, time.time_ns() // 1_000_000)
    found = by_name(checks)
    assert [c.status for c in checks] == ["pass", "pass", "pass"], checks
    assert "telemetry: 1 batches" in found["buffer.backlog"].message
    assert state == {}  # no agent has recorded anything


def test_buffer_missing_is_a_warn_and_corrupt_a_fail(tmp_path: Path) -> None:
    cfg = loaded(config(tmp_path))
    missing = by_name(check_buffer(cfg.buffer, 0)[0])
    assert missing["buffer.integrity"].status == "warn", missing
    assert missing["buffer.backlog"].status == "skip"
    cfg.buffer.path.write_bytes(b"this is no database" * 500)
    corrupt = by_name(check_buffer(cfg.buffer, 0)[0])
    assert corrupt["buffer.integrity"].status == "fail", corrupt
    assert "not a usable buffer" in corrupt["buffer.integrity"].message
    assert cfg.buffer.path.read_bytes().startswith(b"this is no database")  # left alone


def test_buffer_disk_against_capacity(tmp_path: Path) -> None:
    mb = 1024**2
    assert disk_check(10 * 1024 * mb, 0, 64 * mb, tmp_path).status == "pass"
    tight = disk_check(int(64 * mb * DISK_MARGIN) - 1, 0, 64 * mb, tmp_path)
    assert tight.status == "warn", tight
    short = disk_check(40 * mb, 10 * mb, 64 * mb, tmp_path)
    assert short.status == "fail" and "cannot fit" in short.message, short
    # what the buffer already holds counts as room
    assert disk_check(40 * mb, 30 * mb, 64 * mb, tmp_path).status != "fail"
    # injected into the whole check as well
    cfg = loaded(config(tmp_path))
    assert by_name(check_buffer(cfg.buffer, 0, free_bytes=1000)[0])["buffer.disk"].status == "fail"


def test_buffer_backlog_older_than_an_hour_is_a_warn(tmp_path: Path) -> None:
    cfg = loaded(config(tmp_path))
    with Buffer(cfg.buffer.path, cfg.buffer.capacity) as buf:
        buf.append(Lane.ALARM, b"a" * 10, 1)
        stats = buf.stats()
    now_ms = time.time_ns() // 1_000_000
    assert backlog_check(stats, now_ms).status == "pass"
    late = backlog_check(stats, now_ms + 2 * 3600 * 1000)
    assert late.status == "warn" and "alarm" in late.message, late


# -- clock ---------------------------------------------------------------------------------


def test_clock_sources_and_verdicts() -> None:
    assert parse_timedatectl("NTPSynchronized=yes\n") is True
    assert parse_timedatectl("NTPSynchronized=no\n") is False
    assert parse_timedatectl("") is None
    assert synced_from_status(0) is True
    assert synced_from_status(STA_UNSYNC | 0x2000) is False
    status = kernel_status()  # adjtimex(2) with modes 0 reads without privileges
    assert isinstance(status, int)
    assert clock_check(NOW, True, "timedatectl").status == "pass"
    assert clock_check(NOW, False, "timedatectl").status == "warn"
    assert clock_check(NOW, None, "nothing").status == "warn"
    early = clock_check(datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC), True, "x")
    assert early.status == "fail" and "1970-01-01" in early.message


# -- broker --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Brokers:
    broker: Mosquitto  # .port: plain, with the password file
    tls: int  # a certificate valid a year
    soon: int  # valid 10 more days
    expired: int  # expired yesterday
    mtls: int  # a certificate valid a year; a client certificate required
    ca: Path
    other_ca: Path
    client_soon: tuple[Path, Path]  # a client certificate valid 10 more days


@pytest.fixture(scope="module")
def brokers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Brokers]:
    """One Mosquitto with the shipped ACL and a password on every listener: plain, TLS
    with a good, an expiring and an expired server certificate, and mutual TLS."""
    d = tmp_path_factory.mktemp("doctor-pki")
    ca, other = make_ca(d, "city-ca"), make_ca(d, "other-ca")
    good = issue(d, ca, "good", "broker", server_names=LOCALHOST, days=365)
    soon = issue(d, ca, "soon", "broker", server_names=LOCALHOST, days=10)
    expired = issue(d, ca, "expired", "broker", server_names=LOCALHOST, days=-1)
    client_soon = issue(d, ca, "client", GW, days=10)
    ports = free_port(), free_port(), free_port(), free_port()
    work = d / "broker"
    work.mkdir()
    extra = (
        acl_conf(work, {GW: PASSWORD})
        + "".join(
            tls_listener(port, ca[2], *pair)
            for port, pair in zip(ports, (good, soon, expired), strict=False)
        )
        + tls_listener(ports[3], ca[2], *good, require_certificate=True)
    )
    with running_broker(work, extra_conf=extra) as broker:
        deadline = time.monotonic() + 15  # the TLS listeners open after the plain one
        for port in ports:
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"TLS listener {port} did not open"
                    time.sleep(0.05)
        yield Brokers(broker, *ports, ca[2], other[2], client_soon)


def target(port: int, tls: bool = False, host: str = "127.0.0.1", **kw: Any) -> BrokerTarget:
    """The test broker's target as gateway GW with its password (`kw` changes fields)."""
    t = BrokerTarget(
        "broker",
        "uplink",
        BrokerAddress.parse(f"{'mqtts' if tls else 'mqtt'}://{host}:{port}"),
        username=GW,
        password=PASSWORD,
        client_id=f"citygw-{GW}",
        subscribe=f"citygw/{GW}/down/cmd",
    )
    return replace(t, **kw)


def probe(t: BrokerTarget, note: str | None = None) -> dict[str, Check]:
    return by_name(asyncio.run(probe_broker(t, 5.0, NOW, note)))


def statuses(checks: dict[str, Check]) -> dict[str, str]:
    return {name.removeprefix("broker."): c.status for name, c in checks.items()}


ALL_PASS_TLS = {"dns": "pass", "tcp": "pass", "tls": "pass", "certificates": "pass", "auth": "pass"}


def test_broker_all_good_over_tls(brokers: Brokers) -> None:
    found = probe(target(brokers.tls, tls=True, ca_file=str(brokers.ca)))
    assert statuses(found) == ALL_PASS_TLS, found
    assert "connected as 'gw-doc'" in found["broker.auth"].message
    assert f"subscribed to citygw/{GW}/down/cmd" in found["broker.auth"].message
    assert "days" in found["broker.certificates"].message


def test_broker_unresolvable_host() -> None:
    found = probe(target(1883, host="no-such-broker.invalid"))
    assert statuses(found) == {"dns": "fail", "tcp": "skip", "auth": "skip"}, found
    assert "no-such-broker.invalid" in found["broker.dns"].message


def test_broker_closed_port() -> None:
    found = probe(target(free_port()))
    assert statuses(found) == {"dns": "pass", "tcp": "fail", "auth": "skip"}, found
    assert "refused" in found["broker.tcp"].message


def test_broker_tls_with_a_wrong_ca(brokers: Brokers) -> None:
    found = probe(target(brokers.tls, tls=True, ca_file=str(brokers.other_ca)))
    assert statuses(found)["tls"] == "fail" and statuses(found)["auth"] == "skip", found
    tls = found["broker.tls"]
    assert "not trusted" in tls.message and "city-ca" in tls.message, tls  # its issuer named
    assert "ca_file" in tls.fix


def test_broker_certificate_expiring_and_expired(brokers: Brokers) -> None:
    soon = probe(target(brokers.soon, tls=True, ca_file=str(brokers.ca)))
    assert statuses(soon) == ALL_PASS_TLS | {"certificates": "warn"}, soon
    assert "days left" in soon["broker.certificates"].message
    expired = probe(target(brokers.expired, tls=True, ca_file=str(brokers.ca)))
    assert statuses(expired)["tls"] == "fail", expired
    assert "expired" in expired["broker.tls"].message
    assert expired["broker.certificates"].status == "fail"


def test_broker_mutual_tls_without_and_with_a_client_certificate(brokers: Brokers) -> None:
    without = probe(target(brokers.mtls, tls=True, ca_file=str(brokers.ca)))
    assert statuses(without)["tls"] == "fail", without
    assert "requires a client certificate" in without["broker.tls"].message
    cert, key = brokers.client_soon
    files = {"ca_file": str(brokers.ca), "cert_file": str(cert), "key_file": str(key)}
    found = probe(target(brokers.mtls, tls=True, **files))
    assert statuses(found) == ALL_PASS_TLS | {"certificates": "warn"}, found
    assert "the client certificate" in found["broker.certificates"].message


def test_broker_suback_refusals() -> None:
    # Mosquitto's ACL file grants every subscription (it withholds the messages), so the
    # refusal an EMQX ACL gives at subscribe time is read from its reason codes here
    granted = ReasonCode(PacketTypes.SUBACK, identifier=1)
    denied = ReasonCode(PacketTypes.SUBACK, identifier=0x87)
    assert refusals([granted]) == [] and refusals([1]) == []
    assert refusals([denied]) == ["Not authorized"] and refusals([0x80]) == ["128"]


def test_broker_wrong_password(brokers: Brokers) -> None:
    found = probe(target(brokers.broker.port, password="wrong"))
    assert found["broker.tcp"].status == "pass"
    auth = found["broker.auth"]
    # Mosquitto answers a wrong password with "not authorized" (135) over MQTT 5
    assert auth.status == "fail" and "not authorized" in auth.message, auth
    assert "username and password" in auth.message


def test_broker_auth_not_retried_while_the_agent_is_connected(brokers: Brokers) -> None:
    found = probe(target(brokers.broker.port, password="wrong"), note="the agent is connected")
    assert found["broker.auth"] == passed("broker.auth", "the agent is connected")


# -- devices -------------------------------------------------------------------------------


def device_checks(cfg: Config, **env: Any) -> dict[str, Check]:
    base = DeviceEnv(timeout=1.0, now_ms=time.time_ns() // 1_000_000)
    return by_name(asyncio.run(check_devices(cfg, replace(base, **env))))


MODBUS = """
[[devices]]
name = "{name}"
driver = "modbus"
host = "127.0.0.1"
port = {port}
unit_id = {unit}
timeout = "1s"
  [[devices.points]]
  name = "flow"
  table = "holding_register"
  address = 3
"""


def test_modbus_answering_no_such_unit_and_down(tmp_path: Path) -> None:
    down = free_port()

    async def scenario() -> dict[str, Check]:
        image = RegisterImage()
        image.set("holding_register", 3, [42])
        async with ModbusSimulator({1: image, 2: image}) as sim:
            sim.absent_exception = 11  # a TCP gateway: the unit is not on its bus
            sim.delay = 0.2  # answers that would overlap if the gateway were asked at once
            devices = "".join(
                MODBUS.format(name=n, port=p, unit=u)
                for n, p, u in (
                    ("meter", sim.port, 1),
                    ("meter2", sim.port, 2),
                    ("ghost", sim.port, 7),
                    ("off", down, 1),
                )
            )
            cfg = loaded(config(tmp_path, devices=devices))
            env = DeviceEnv(1.0, time.time_ns() // 1_000_000)
            found = by_name(await check_devices(cfg, env))
            assert sim.max_concurrent == 1  # one gateway: its units asked one at a time
            return found

    found = asyncio.run(scenario())
    assert found["device meter"].status == "pass", found
    assert found["device meter2"].status == "pass", found
    assert "flow (holding_register 3) = [42]" in found["device meter"].message
    ghost, off = found["device ghost"], found["device off"]
    assert ghost.status == "fail" and "no such unit" in ghost.message, ghost
    assert off.status == "fail" and "cannot connect" in off.message, off


MCU = """
[[devices]]
name = "mcu"
driver = "mcu"
port = "{port}"
  [[devices.points]]
  name = "level"
  sensor_id = 1
"""


def test_mcu_hello_answered_and_silent(tmp_path: Path) -> None:
    async def answered() -> dict[str, Check]:
        async with SimMcu.on_pty(version="2.1.0").running() as sim:
            cfg = loaded(config(tmp_path, devices=MCU.format(port=sim.port)))
            return by_name(await check_devices(cfg, DeviceEnv(5.0, time.time_ns() // 1_000_000)))

    up = asyncio.run(answered())["device mcu"]
    assert up.status == "pass" and "firmware 2.1.0" in up.message, up
    master, slave = os.openpty()  # a port where nothing answers
    try:
        cfg = loaded(config(tmp_path, devices=MCU.format(port=os.ttyname(slave))))
        silent = device_checks(cfg, timeout=0.5)["device mcu"]
    finally:
        os.close(master)
        os.close(slave)
    assert silent.status == "fail" and "no answer to HELLO" in silent.message, silent


def test_serial_port_missing_and_not_permitted(tmp_path: Path) -> None:
    cfg = loaded(config(tmp_path, devices=MCU.format(port=tmp_path / "ttyUSB9")))
    missing = device_checks(cfg)["device mcu"]
    assert missing.status == "fail" and "does not exist" in missing.message, missing
    port = tmp_path / "ttyS7"
    port.touch()
    cfg = loaded(config(tmp_path, devices=MCU.format(port=port)))
    # the tests may run as root, for whom every file is permitted: ask a stricter access
    denied = device_checks(cfg, access=lambda path, mode: False)["device mcu"]
    assert denied.status == "fail" and "not readable and writable" in denied.message, denied
    assert "usermod -aG" in denied.fix


def test_serial_port_permissions_are_the_service_users(tmp_path: Path) -> None:
    """Run as root, the doctor asks whether the unit's User= may open the port."""
    master, slave = os.openpty()
    port = os.ttyname(slave)
    os.chmod(port, 0o660)  # a serial port's usual mode: owner and group (dialout)
    group = grp.getgrgid(os.stat(port).st_gid).gr_name
    try:
        path = config(tmp_path, devices=MCU.format(port=port))
        opts = Options(timeout=0.5, skip=frozenset({"buffer", "clock", "broker", "service"}))
        units = unit(tmp_path, path, "WatchdogSec=30\nUser=nobody")
        denied = by_name(asyncio.run(run_checks(path, replace(opts, unit_dir=units))))
        assert "not readable and writable by user nobody" in denied["device mcu"].message
        units = unit(tmp_path, path, f"WatchdogSec=30\nUser=nobody\nSupplementaryGroups={group}")
        allowed = by_name(asyncio.run(run_checks(path, replace(opts, unit_dir=units))))
        assert "no answer to HELLO" in allowed["device mcu"].message  # past the permissions
    finally:
        os.close(master)
        os.close(slave)


BLE = """
[[devices]]
name = "tag"
driver = "ble"
address = "AA:BB:CC:DD:EE:01"
format = "ruuvi"
  [[devices.points]]
  name = "t"
  measurement = "temperature"
"""


def test_ble_adapter_present_and_absent(tmp_path: Path) -> None:
    cfg = loaded(config(tmp_path, devices=BLE))
    sysfs = tmp_path / "sys"
    (sysfs / "class" / "bluetooth").mkdir(parents=True)
    absent = device_checks(cfg, sysfs=sysfs)["device tag"]
    assert absent.status == "fail" and "no Bluetooth adapter" in absent.message, absent
    (sysfs / "class" / "bluetooth" / "hci0").mkdir()
    assert device_checks(cfg, sysfs=sysfs)["device tag"].status == "pass"


SITE = """
[[devices]]
name = "site"
driver = "mqtt"
broker = "mqtt://127.0.0.1:{port}"
username = "{GW}"
password = "{password}"
  [[devices.points]]
  name = "pm25"
  topic = "air/pm25"
"""


def test_mqtt_site_broker_up_and_down(tmp_path: Path, brokers: Brokers) -> None:
    up = SITE.format(port=brokers.broker.port, GW=GW, password=PASSWORD)
    found = device_checks(loaded(config(tmp_path, devices=up)))["device site"]
    assert found.status == "pass" and "connected as 'gw-doc'" in found.message, found
    down = SITE.format(port=free_port(), GW=GW, password=PASSWORD)
    found = device_checks(loaded(config(tmp_path, devices=down)))["device site"]
    assert found.status == "fail" and "refused" in found.message, found


def test_running_agent_reports_devices_instead_of_probing(tmp_path: Path) -> None:
    now_ms = time.time_ns() // 1_000_000
    ok = {"last_success_ms": now_ms - 2000, "consecutive_failures": 0, "messages": None}
    bad = {"last_success_ms": None, "consecutive_failures": 4, "last_error": "timeout"}
    assert health_check("d", ok, 1.0, now_ms).status == "pass"
    assert health_check("d", bad, 1.0, now_ms).status == "fail"
    assert health_check("d", ok, 1.0, now_ms + 3_600_000).status == "warn"  # stale
    # no port is opened: a Modbus device on a port nobody listens on passes on the record
    cfg = loaded(config(tmp_path, devices=MODBUS.format(name="m", port=free_port(), unit=1)))
    found = device_checks(cfg, agent={"devices": {"m": ok}})["device m"]
    assert found.status == "pass" and "running agent" in found.message, found


# -- service -------------------------------------------------------------------------------


def unit(tmp_path: Path, cfg: Path, service: str) -> Path:
    d = tmp_path / "units"
    d.mkdir(exist_ok=True)
    (d / UNIT).write_text(
        "[Unit]\nDescription=citygw agent\n\n[Service]\nType=notify\n"
        f"ExecStart=/usr/bin/citygw run \\\n  -c {cfg}\n{service}\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )
    return d


def test_service_unit_with_watchdog_missing_and_without(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert unit_check(unit(tmp_path, cfg, "WatchdogSec=30"), cfg).status == "pass"
    assert unit_check(tmp_path / "empty", cfg).status == "fail"
    off = unit_check(unit(tmp_path, cfg, "Restart=on-failure"), cfg)
    assert off.status == "fail" and "watchdog is off" in off.message, off
    zero = unit_check(unit(tmp_path, cfg, "WatchdogSec=0"), cfg)
    assert zero.status == "fail"
    other = unit_check(unit(tmp_path, tmp_path / "other.toml", "WatchdogSec=30"), cfg)
    assert other.status == "fail" and "not this config" in other.message, other
    simple = tmp_path / "units" / UNIT
    simple.write_text(simple.read_text().replace("Type=notify", "Type=simple"))
    assert unit_check(simple.parent, tmp_path / "other.toml").status == "fail"
    # repeated keys are allowed, as in systemd (the last one counts)
    parsed = read_unit("[Service]\nEnvironment=A=1\nEnvironment=B=2\n")
    assert parsed["Service"]["Environment"] == "B=2"


def test_the_unit_install_service_writes_passes(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    (tmp_path / "units").mkdir()
    text = render_unit("/usr/bin/citygw", cfg, tmp_path, "citygw", ("dialout",))
    (tmp_path / "units" / UNIT).write_text(text)
    assert unit_check(tmp_path / "units", cfg).status == "pass"


def test_service_under_systemd() -> None:
    def systemctl(enabled: str, active: str) -> Systemctl:
        answers = {"is-enabled": enabled, "is-active": active}
        return lambda args: (0, answers[args[0]])

    assert systemd_check(systemctl("enabled", "active")).status == "pass"
    assert systemd_check(systemctl("disabled", "active")).status == "warn"
    assert systemd_check(systemctl("enabled", "failed")).status == "fail"
    assert systemd_check(None).status == "warn"  # not under systemd


# -- the command ---------------------------------------------------------------------------


def test_result_and_exit_codes() -> None:
    def checks(*statuses: Status) -> list[Check]:
        return [Check("c", s, "") for s in statuses]

    assert (result(checks("pass", "skip")), exit_code(checks("pass", "skip"))) == ("pass", 0)
    assert exit_code(checks("pass", "warn")) == 1
    assert exit_code(checks("warn", "fail", "pass")) == 2


def test_cli_exit_codes_and_json(tmp_path: Path, brokers: Brokers) -> None:
    uplink = f'broker = "mqtt://127.0.0.1:{brokers.broker.port}"\nusername = "{GW}"\n' + (
        f'password = "{PASSWORD}"'
    )
    path = config(tmp_path, uplink)
    skip = ["--skip", "clock", "--skip", "service", "--timeout", "3"]
    warned = runner.invoke(app, ["doctor", "-c", str(path), *skip])  # no buffer yet: a warn
    assert warned.exit_code == 1, warned.output
    assert "WARN  buffer.integrity" in warned.output and "fix: " in warned.output
    cfg = loaded(path)
    Buffer(cfg.buffer.path, cfg.buffer.capacity).close()
    ok = runner.invoke(app, ["doctor", "-c", str(path), "--json", *skip])
    assert ok.exit_code == 0, ok.output
    report = orjson.loads(ok.output)
    assert report["result"] == "pass"
    assert {c["name"] for c in report["checks"]} >= {"config", "broker.auth", "clock"}
    assert set(report["checks"][0]) == {"name", "status", "message", "fix"}
    path.write_text("[gateway]\nid = 'bad id'\n")
    failed = runner.invoke(app, ["doctor", "-c", str(path), "--json", *skip])
    assert failed.exit_code == 2, failed.output
    report = orjson.loads(failed.output)
    assert report["result"] == "fail"
    assert {c["name"]: c["status"] for c in report["checks"]} == {
        "config": "fail",
        "buffer": "skip",
        "clock": "skip",
        "broker": "skip",
        "devices": "skip",
        "service": "skip",
    }
    wrong = runner.invoke(app, ["doctor", "-c", str(path), "--skip", "everything"])
    assert wrong.exit_code == 2 and "not an area" in wrong.output


def test_a_running_agent_is_left_alone(tmp_path: Path, brokers: Brokers) -> None:
    """With the agent running and connected, the broker's auth step does not connect (the
    wrong password here would fail it) and the devices are judged by the agent's record
    (nothing listens on the Modbus port)."""
    uplink = f'broker = "mqtt://127.0.0.1:{brokers.broker.port}"\nusername = "{GW}"\n' + (
        'password = "wrong"'
    )
    path = config(tmp_path, uplink, MODBUS.format(name="m", port=free_port(), unit=1))
    cfg = loaded(path)
    now_ms = time.time_ns() // 1_000_000
    with Buffer(cfg.buffer.path, cfg.buffer.capacity) as buf:
        buf.put_state(
            "agent",
            {
                "state": "running",
                "updated_ms": now_ms,
                "uplink": {"state": "online", "last_puback_ms": now_ms - 1000},
                "devices": {"m": {"last_success_ms": now_ms - 500, "consecutive_failures": 0}},
            },
        )
    opts = Options(timeout=3.0, skip=frozenset({"clock", "service"}))
    found = by_name(asyncio.run(run_checks(path, opts)))
    assert found["broker.auth"].status == "pass", found
    assert "running agent is connected" in found["broker.auth"].message
    assert found["device m"].status == "pass" and "running agent" in found["device m"].message
