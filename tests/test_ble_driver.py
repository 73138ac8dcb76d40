"""The ``ble`` driver without a radio: adverts from a fake source or the replay of
drivers/ble/replay/demo.jsonl, GATT through a fake client, `citygw ble scan --replay`
through typer's CliRunner."""

from __future__ import annotations

import asyncio
import itertools
import struct
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESCCM
from typer.testing import CliRunner

from agent.config import parse_config
from cli import main as cli
from drivers.base import DeviceSpec, PointSpec
from drivers.ble.advert import Advertisement
from drivers.ble.driver import BleDriver, SourceConfig
from drivers.ble.gatt import GattClient
from drivers.ble.settings import BleDeviceSettings, BlePointSettings
from drivers.ble.source import ReplaySource, load_recording
from tests.helpers import Sink, run_driver_until

BLE = Path(__file__).resolve().parent.parent / "drivers" / "ble"
DEMO = BLE / "replay" / "demo.jsonl"
BTHOME = "0000fcd2-0000-1000-8000-00805f9b34fb"
MAC = "A4:C1:38:A1:B2:C3"
KEY = bytes.fromhex("231d39c1d7cc1ab1aee224cd096db932")
runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})

pytestmark = pytest.mark.timeout(60)


# -- helpers ---------------------------------------------------------------------------


_next_id = iter(range(1, 10_000))


def device(
    name: str, points: dict[str, dict[str, Any]], poll: float = 1.0, **settings: Any
) -> DeviceSpec:
    specs = tuple(
        PointSpec(
            id=next(_next_id),
            key=f"{name}/{p}",
            name=p,
            unit="",
            kind="float",
            writable=False,
            settings=BlePointSettings.model_validate(s),
        )
        for p, s in points.items()
    )
    return DeviceSpec(name, poll, BleDeviceSettings.model_validate(settings), specs)


def pid(dev: DeviceSpec, point: str) -> int:
    return next(p.id for p in dev.points if p.name == point)


def bthome_objects(packet_id: int, temp: float, hum: float = 50.0) -> bytes:
    return (
        bytes([0x00, packet_id, 0x02])
        + struct.pack("<h", round(temp * 100))
        + bytes([0x03])
        + struct.pack("<H", round(hum * 100))
    )


def bthome(packet_id: int, temp: float, hum: float = 50.0) -> bytes:
    return bytes([0x40]) + bthome_objects(packet_id, temp, hum)


def bthome_encrypted(mac: str, key: bytes, counter: int, temp: float) -> bytes:
    """BTHome v2 encrypted service data: info | ciphertext | counter(4) | MIC(4), AES-CCM
    with nonce = MAC + uuid16 (d2 fc) + device info + counter."""
    info = 0x41
    count = counter.to_bytes(4, "little")
    nonce = bytes.fromhex(mac.replace(":", "")) + b"\xd2\xfc" + bytes([info]) + count
    plain = bytes([0x02]) + struct.pack("<h", round(temp * 100))
    sealed = AESCCM(key, tag_length=4).encrypt(nonce, plain, None)
    return bytes([info]) + sealed[:-4] + count + sealed[-4:]


def adv(
    address: str = MAC,
    *,
    t_ms: int | None = None,
    rssi: int | None = -60,
    name: str | None = None,
    service: dict[str, bytes] | None = None,
    manufacturer: dict[int, bytes] | None = None,
) -> Advertisement:
    return Advertisement(
        address=address,
        time_ms=time.time_ns() // 1_000_000 if t_ms is None else t_ms,
        rssi=rssi,
        name=name,
        service_data=service or {},
        manufacturer_data=manufacturer or {},
        service_uuids=tuple(service or ()),
    )


class ListSource:
    """Yields the given adverts (a callable is called first: it may raise), then idles."""

    def __init__(self, items: Sequence[Advertisement | Callable[[], None]]) -> None:
        self.items = items
        self.calls = 0

    async def adverts(self) -> AsyncIterator[Advertisement]:
        self.calls += 1
        for item in self.items:
            if isinstance(item, Advertisement):
                yield item
            else:
                item()
        await asyncio.Event().wait()


def fake_sources(source: Any) -> Callable[[SourceConfig], Any]:
    return lambda _config: source


def run(driver: BleDriver, sink: Sink, done: Callable[[], bool], timeout: float = 20.0) -> None:
    asyncio.run(run_driver_until(driver, sink, done, timeout))


# -- adverts -----------------------------------------------------------------------------


def test_allow_list_by_address_name_pattern_and_service_uuid() -> None:
    by_address = device(
        "by-address",
        {"t": {"measurement": "temperature"}},
        address=MAC.lower(),
        source="replay",
        replay_file=str(DEMO),
        replay_speed=20,
        replay_loop=False,
    )
    by_name = device(
        "by-name",
        {"t": {"measurement": "temperature"}},
        name_pattern="Ruuvi *",
        source="replay",
        replay_file=str(DEMO),
        replay_speed=20,
        replay_loop=False,
    )
    by_uuid = device(
        "by-uuid",
        {"h": {"measurement": "humidity"}},
        service_uuid="fcd2",
        source="replay",
        replay_file=str(DEMO),
        replay_speed=20,
        replay_loop=False,
    )
    driver = BleDriver([by_address, by_name, by_uuid])
    assert len(driver._adverts) == 1, "one scanner for devices with the same source"
    sink = Sink()
    run(
        driver,
        sink,
        lambda: (
            len(sink.values(pid(by_name, "t"))) >= 10
            and len(sink.values(pid(by_address, "t"))) >= 5
        ),
    )
    assert sink.values(pid(by_address, "t"))[:2] == [21.5, 21.6]
    assert sink.values(pid(by_uuid, "h"))[:2] == [45.0, 45.5]
    assert 18.2 <= sink.values(pid(by_name, "t"))[0] <= 18.3
    # the phone and the beacon matched nobody: every reading is one of these points
    ids = {p for b in sink.batches for p in b.point_ids}
    assert ids == {pid(by_address, "t"), pid(by_name, "t"), pid(by_uuid, "h")}
    health = driver.health()
    assert all(h.errors == 0 and h.readings > 0 for h in health.values())


def test_dedupe_by_packet_id_and_identical_payloads() -> None:
    dev = device(
        "tag", {"t": {"measurement": "temperature"}, "rssi": {"measurement": "rssi"}}, address=MAC
    )
    beacon = device("beacon", {"rssi": {"measurement": "rssi"}}, address="F0:0D:CA:FE:00:07")
    driver = BleDriver([dev, beacon], source_factory=fake_sources(ListSource([])))
    devices = next(iter(driver._adverts.values()))
    sink = Sink()
    t0 = 1_700_000_000_000
    for a in [
        adv(service={BTHOME: bthome(1, 20.0)}, t_ms=t0, rssi=-60),
        adv(service={BTHOME: bthome(1, 20.0)}, t_ms=t0 + 5000, rssi=-61),  # repeat, later
        adv(service={BTHOME: bthome(1, 20.5)}, t_ms=t0 + 6000, rssi=-62),  # same id, new bytes
        adv(service={BTHOME: bthome(2, 21.0)}, t_ms=t0 + 7000, rssi=-63),
    ]:
        driver.handle(a, devices, sink)
    assert sink.values(pid(dev, "t")) == [20.0, 21.0]
    assert sink.values(pid(dev, "rssi")) == [-60.0, -63.0]
    # no packet id: identical payloads within dedupe_window (1 s) are one advert
    ib = bytes.fromhex("0215e2c56db5dffb48d2b060d0f5a71096e00007002ac5")
    for dt in (0, 400, 900, 1500):
        driver.handle(
            adv("F0:0D:CA:FE:00:07", manufacturer={76: ib}, t_ms=t0 + dt, rssi=-80 - dt // 100),
            devices,
            sink,
        )
    assert sink.values(pid(beacon, "rssi")) == [-80.0, -95.0]
    assert driver.duplicates == 4


def test_rssi_point_and_scale_offset() -> None:
    dev = device(
        "tag",
        {
            "rssi": {"measurement": "rssi"},
            "t_f": {"measurement": "temperature", "scale": 1.8, "offset": 32},
        },
        address=MAC,
    )
    sink = Sink()
    source = ListSource([adv(service={BTHOME: bthome(7, 25.0)}, rssi=-42)])
    driver = BleDriver([dev], source_factory=fake_sources(source))
    run(driver, sink, lambda: len(sink.batches) >= 1)
    assert sink.values(pid(dev, "rssi")) == [-42.0]
    assert sink.values(pid(dev, "t_f")) == [pytest.approx(77.0)]
    (batch,) = sink.batches
    assert len(set(batch.timestamps)) == 1


@pytest.mark.parametrize("right_key", [True, False])
def test_encrypted_bthome_with_right_and_wrong_key(right_key: bool) -> None:
    key = KEY if right_key else bytes(16)
    dev = device(
        "secret",
        {"t": {"measurement": "temperature"}},
        address=MAC,
        format="bthome",
        bind_key=key.hex(),
    )
    sink = Sink()
    source = ListSource(
        [
            adv(service={BTHOME: bthome_encrypted(MAC, KEY, 1, 19.5)}),
            adv(service={BTHOME: bthome_encrypted(MAC, KEY, 2, 19.75)}),
        ]
    )
    driver = BleDriver([dev], source_factory=fake_sources(source))
    health = driver.health()["secret"]
    if right_key:
        run(driver, sink, lambda: len(sink.batches) >= 2)
        assert sink.values(pid(dev, "t")) == [19.5, 19.75]
        assert health.errors == 0
    else:
        run(driver, sink, lambda: health.errors >= 2)
        assert sink.batches == []
        assert health.last_error is not None and health.last_error.startswith("decode error")


def test_decode_error_counted_in_health_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    dev = device("broken", {"t": {"measurement": "temperature"}}, address=MAC, format="bthome")
    bad = [adv(service={BTHOME: bytes([0x40, 0x02, i])}) for i in range(3)]
    good = adv(service={BTHOME: bthome(9, 22.0)})
    sink = Sink()
    driver = BleDriver([dev], source_factory=fake_sources(ListSource([*bad, good])))
    health = driver.health()["broken"]
    with caplog.at_level("WARNING", logger="citygw.drivers.ble"):
        run(driver, sink, lambda: len(sink.batches) >= 1)
    assert health.errors == 3
    assert health.as_dict()["rejected"] == {"truncated": 3}
    assert health.consecutive_failures == 0  # the good advert came after
    assert sink.values(pid(dev, "t")) == [22.0]
    assert len([r for r in caplog.records if "cannot decode" in r.getMessage()]) == 1


def test_undefined_event_and_empty_frames_are_decode_errors_with_a_reason() -> None:
    dev = device(
        "button",
        {"b": {"measurement": "battery"}, "p": {"measurement": "button"}},
        address=MAC,
        format="bthome",
    )
    items = [
        adv(service={BTHOME: bytes.fromhex("4000010164" + "3afe")}),  # battery + event 0xFE
        adv(service={BTHOME: bytes.fromhex("40")}),  # nothing after the device info
        adv(service={BTHOME: bytes.fromhex("42c3b2a138c1a4")}),  # the MAC and nothing else
        adv(service={BTHOME: bytes.fromhex("4000033a01")}),  # a press
    ]
    sink = Sink()
    driver = BleDriver([dev], source_factory=fake_sources(ListSource(items)))
    health = driver.health()["button"]
    run(driver, sink, lambda: len(sink.values(pid(dev, "p"))) >= 1)
    assert sink.values(pid(dev, "b")) == [100.0]  # the rest of the first advert is kept
    assert sink.values(pid(dev, "p")) == [1.0]  # never 254.0
    assert health.as_dict()["rejected"] == {"unknown_event": 1, "no_objects": 2}
    assert health.errors == 3


def test_text_objects_are_device_information() -> None:
    dev = device("display", {"t": {"measurement": "temperature"}}, address=MAC, format="bthome")
    items = [
        adv(service={BTHOME: bytes.fromhex("40000102ca09530c48656c6c6f20576f726c6421")}),
        adv(service={BTHOME: bytes.fromhex("4000025402beeff2000106")}),  # raw, firmware
        adv(service={BTHOME: bytes.fromhex("400003530187")}),  # not UTF-8: dropped, counted
    ]
    sink = Sink()
    driver = BleDriver([dev], source_factory=fake_sources(ListSource(items)))
    health = driver.health()["display"]
    run(driver, sink, lambda: health.errors >= 1)
    assert sink.values(pid(dev, "t")) == [25.06]
    assert driver.device_info("display") == {
        "text": "Hello World!",
        "raw": "beef",
        "firmware_version": "6.1.0",
    }
    assert health.as_dict()["rejected"] == {"bad_text": 1}
    with pytest.raises(KeyError):
        driver.device_info("nope")


def test_a_text_measurement_cannot_be_a_point() -> None:
    from agent.config import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_config(
            '[gateway]\nid = "gw"\n[uplink]\nbroker = "mqtt://localhost"\n'
            '[[devices]]\nname = "a"\ndriver = "ble"\naddress = "AA:BB:CC:DD:EE:FF"\n'
            '  [[devices.points]]\n  name = "x"\n  measurement = "text_2"\n'
        )
    assert "devices[0].points[0].measurement" in str(info.value)
    assert "device_info" in str(info.value)


def test_stale_device_is_a_failure() -> None:
    heard = device("heard", {"t": {"measurement": "temperature"}}, address=MAC, stale_after=0.3)
    silent = device(
        "silent",
        {"t": {"measurement": "temperature"}},
        address="00:11:22:33:44:55",
        stale_after=0.2,
    )
    source = ListSource([adv(service={BTHOME: bthome(1, 20.0)})])
    driver = BleDriver([heard, silent], source_factory=fake_sources(source))
    health = driver.health()
    run(driver, Sink(), lambda: health["silent"].errors >= 2 and health["heard"].errors >= 1)
    # the same text at every failure: an age in it would be stale in the status snapshot
    assert (
        health["silent"].last_error
        == "no advertisement within stale_after (0.2s); none since start"
    )
    assert health["heard"].last_error == "no advertisement within stale_after (0.3s)"
    assert health["heard"].readings == 1
    assert health["silent"].rejected == {}  # silence is no junk


def test_adapter_error_is_retried_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    from bleak.exc import BleakError

    fails = {"n": 0}

    def flaky() -> None:
        if fails["n"] < 2:
            fails["n"] += 1
            raise BleakError("No Bluetooth adapters found.")

    dev = device("tag", {"t": {"measurement": "temperature"}}, address=MAC)
    source = ListSource([flaky, adv(service={BTHOME: bthome(3, 23.0)})])
    driver = BleDriver([dev], source_factory=fake_sources(source))
    driver.adapter_backoff = (0.01, 0.05)
    sink = Sink()
    health = driver.health()["tag"]
    with caplog.at_level("WARNING", logger="citygw.drivers.ble"):
        run(driver, sink, lambda: len(sink.batches) >= 1)
    assert source.calls == 3
    assert health.errors == 2
    assert health.last_error == "bluetooth adapter: BleakError: No Bluetooth adapters found."
    assert any("No Bluetooth adapters found" in r.getMessage() for r in caplog.records)


def test_replay_source_timing_and_loop() -> None:
    async def go() -> list[Advertisement]:
        got: list[Advertisement] = []
        source = ReplaySource(DEMO, speed=50.0, loop=True)
        n = len(load_recording(DEMO))
        async for a in source.adverts():
            got.append(a)
            if len(got) == n + 3:
                break
        return got

    start = time.monotonic()
    got = asyncio.run(go())
    assert time.monotonic() - start < 10
    assert got[0].address == MAC and BTHOME in got[0].service_data
    assert got[1].manufacturer_data[0x0499][0] == 5
    assert got[-3].address == got[0].address  # looped
    assert all(b.time_ms >= a.time_ms for a, b in itertools.pairwise(got))


# -- config ----------------------------------------------------------------------------


def test_sample_config_validates_and_resolves_replay_file(tmp_path: Path) -> None:
    text = (BLE / "sample.toml").read_text(encoding="utf-8")
    cfg = parse_config(text, base_dir=BLE)
    ble = [d for d in cfg.devices if d.driver == "ble"]
    assert ble
    s = ble[0].settings
    assert isinstance(s, BleDeviceSettings)
    assert s.replay_file == str(DEMO)


def test_config_problems() -> None:
    base = '[gateway]\nid = "gw"\n[uplink]\nbroker = "mqtt://localhost"\n'
    from agent.config import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_config(
            base
            + '[[devices]]\nname = "a"\ndriver = "ble"\naddress = "nope"\n'
            + '[[devices]]\nname = "b"\ndriver = "ble"\nformat = "bthome"\n'
            + '[[devices]]\nname = "c"\ndriver = "ble"\naddress = "AA:BB:CC:DD:EE:FF"\n'
            + 'mode = "gatt"\n  [[devices.points]]\n  name = "x"\n  measurement = "temperature"\n'
        )
    text = str(info.value)
    assert "not a Bluetooth address" in text
    assert "needs address, name_pattern or service_uuid" in text
    assert "needs characteristic" in text


# -- GATT ------------------------------------------------------------------------------


class FakeClient:
    def __init__(self, factory: FakeFactory, address: str) -> None:
        self.factory = factory
        self.address = address
        self.callbacks: dict[str, Callable[[Any, bytearray], None]] = {}
        self.connected = True

    async def read_gatt_char(self, char: str) -> bytearray:
        await asyncio.sleep(0.005)
        return bytearray(self.factory.chars[char])

    async def start_notify(self, char: str, callback: Callable[[Any, bytearray], None]) -> None:
        self.callbacks[char] = callback
        self.factory.notifiers.append(self)

    async def disconnect(self) -> bool:
        if self.connected:
            self.connected = False
            self.factory.active -= 1
            self.factory.disconnects += 1
        return True


class FakeFactory:
    def __init__(self, chars: dict[str, bytes], fail_first: int = 0, hold: float = 0.0) -> None:
        self.chars = chars
        self.fail_first = fail_first
        self.hold = hold
        self.attempts = 0
        self.active = 0
        self.max_active = 0
        self.disconnects = 0
        self.notifiers: list[FakeClient] = []

    async def connect(self, address: str, adapter: str | None, timeout: float) -> GattClient:
        self.attempts += 1
        if self.attempts <= self.fail_first:
            raise ConnectionError(f"{address}: le-connection-abort-by-local")
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.hold)
        except asyncio.CancelledError:  # an attempt cancelled never connected
            self.active -= 1
            raise
        return FakeClient(self, address)


TEMP_CHAR = "00002a6e-0000-1000-8000-00805f9b34fb"
HUM_CHAR = "00002a6f-0000-1000-8000-00805f9b34fb"


def test_gatt_polling_after_a_connection_failure() -> None:
    dev = device(
        "gatt-tag",
        {
            "t": {"characteristic": "2a6e", "datatype": "i16", "scale": 0.01},
            "h": {"characteristic": "2a6f", "datatype": "u16", "endian": "big", "scale": 0.01},
        },
        poll=0.05,
        address=MAC,
        mode="gatt",
    )
    factory = FakeFactory(
        {TEMP_CHAR: struct.pack("<h", -512), HUM_CHAR: struct.pack(">H", 4550)}, fail_first=1
    )
    driver = BleDriver([dev], gatt_factory=factory)
    driver.gatt_backoff = (0.01, 0.05)
    sink = Sink()
    health = driver.health()["gatt-tag"]
    run(driver, sink, lambda: len(sink.batches) >= 3)
    assert health.errors == 1 and "le-connection-abort" in (health.last_error or "")
    assert sink.values(pid(dev, "t"))[0] == pytest.approx(-5.12)
    assert sink.values(pid(dev, "h"))[0] == pytest.approx(45.5)
    assert factory.active == 0, "disconnected after each poll and on cancel"


def test_gatt_notifications() -> None:
    dev = device(
        "notifier",
        {"t": {"characteristic": TEMP_CHAR, "datatype": "i16", "scale": 0.1, "notify": True}},
        address=MAC,
        mode="gatt",
    )
    factory = FakeFactory({})
    driver = BleDriver([dev], gatt_factory=factory)
    sink = Sink()

    async def go() -> None:
        task = asyncio.create_task(driver.run(sink))
        try:
            for _ in range(2000):
                if factory.notifiers:
                    break
                await asyncio.sleep(0.005)
            (client,) = factory.notifiers
            client.callbacks[TEMP_CHAR](None, bytearray(struct.pack("<h", 215)))
            client.callbacks[TEMP_CHAR](None, bytearray(b"\x01"))  # too short: a failure
            client.callbacks[TEMP_CHAR](None, bytearray(struct.pack("<h", -3)))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(go())
    assert sink.values(pid(dev, "t")) == [pytest.approx(21.5), pytest.approx(-0.3)]
    assert driver.health()["notifier"].errors == 1
    assert factory.active == 0, "disconnected on cancel"


def test_gatt_connections_are_bounded() -> None:
    devs = [
        device(
            f"g{i}",
            {"t": {"characteristic": TEMP_CHAR, "datatype": "u8"}},
            poll=0.05,
            address=f"AA:BB:CC:DD:EE:0{i}",
            mode="gatt",
        )
        for i in range(5)
    ]
    factory = FakeFactory({TEMP_CHAR: b"\x07"}, hold=0.02)
    driver = BleDriver(devs, gatt_factory=factory)
    sink = Sink()
    run(driver, sink, lambda: all(driver.health()[d.name].readings >= 2 for d in devs))
    assert factory.max_active == 2
    assert factory.active == 0


def test_gatt_device_never_answering_goes_stale() -> None:
    dev = device(
        "mute",
        {"t": {"characteristic": TEMP_CHAR, "datatype": "u8"}},
        poll=0.05,
        address=MAC,
        mode="gatt",
        stale_after=0.2,
    )
    factory = FakeFactory({TEMP_CHAR: b"\x07"}, hold=3600.0)  # connecting forever
    driver = BleDriver([dev], gatt_factory=factory)
    health = driver.health()["mute"]
    run(driver, Sink(), lambda: health.errors >= 2)
    assert health.last_error == "no reading within stale_after (0.2s); none since start"
    assert factory.active == 0


# -- citygw ble scan -----------------------------------------------------------------------


def test_ble_scan_replay_writes_a_config(tmp_path: Path) -> None:
    out = tmp_path / "ble.toml"
    result = runner.invoke(
        cli.app,
        [
            "ble",
            "scan",
            "--replay",
            str(DEMO),
            "--seconds",
            "1.5",
            "--speed",
            "10",
            "--write-config",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert MAC in result.output and "C8:25:64:3E:9A:01" in result.output
    assert "bthome" in result.output and "temperature=" in result.output
    cfg = parse_config(out.read_text(encoding="utf-8"), base_dir=tmp_path)
    names = {d.name: d for d in cfg.devices}
    assert len(names) == 4
    tag = next(d for d in cfg.devices if d.settings.address == MAC)  # type: ignore[attr-defined]
    assert {p.name for p in tag.points} >= {"temperature", "humidity", "rssi"}

    # --address picks devices
    result = runner.invoke(
        cli.app,
        [
            "ble",
            "scan",
            "--replay",
            str(DEMO),
            "--seconds",
            "0.5",
            "--speed",
            "20",
            "--address",
            MAC.lower(),
            "--write-config",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(parse_config(out.read_text(encoding="utf-8"), base_dir=tmp_path).devices) == 1


def test_ble_scan_missing_replay_file(tmp_path: Path) -> None:
    result = runner.invoke(cli.app, ["ble", "scan", "--replay", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 2
