"""Device information end to end (issue 13): a Modbus string point (a serial number) and
BTHome text/raw objects -> agent -> up/stats `devices` over a private mosquitto -> ingest
-> store -> `citygw platform devices`; and how the agent bounds what a driver hands it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from rich.console import Console
from typer.testing import CliRunner

from agent.config import parse_config
from agent.runtime import Agent
from agent.status import collect, render_device_info
from central.cli import app as platform_app
from central.store import Store
from central.stores import open_store
from central.worker import IngestWorker
from cli.loopback import LoopbackLink
from cli.main import app as cli_app
from common import wire
from drivers.modbus.simulator import ModbusSimulator, RegisterImage
from tests.helpers import running_broker

GW = "gw-info"
HR = "holding_register"
SERIAL_AT = 100  # the serial number: 4 registers, 2 ASCII characters each
# Real BTHome v2 adverts (service data, UUID 0xFCD2) from the tests of bthome-ble,
# https://github.com/Bluetooth-Devices/bthome-ble tests/test_parser_v2.py (test_bthome_text,
# test_bthome_raw, test_bthome_double_temperature), as kept in tests/data/ble_adverts.
CORPUS = Path(__file__).parent / "data" / "ble_adverts" / "bthome_ble_v2.json"
ADVERTS = ("test_bthome_double_temperature", "test_bthome_text", "test_bthome_raw")
TIMEOUT_S = 20.0

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})


def registers(text: str) -> list[int]:
    raw = text.encode("ascii").ljust(8, b"\0")
    return [int.from_bytes(raw[i : i + 2]) for i in range(0, 8, 2)]


def recording(path: Path) -> str:
    """A BLE replay file of the corpus adverts (address and payload as recorded)."""
    corpus = {a["test"]: a for a in json.loads(CORPUS.read_text())["adverts"]}
    lines = [
        orjson.dumps(
            {
                "t": 0.05 * i,
                "address": corpus[name]["address"],
                "rssi": -60,
                "service_data": {"fcd2": corpus[name]["service_data"]},
            }
        ).decode()
        for i, name in enumerate(ADVERTS)
    ]
    path.write_text("\n".join(lines) + "\n")
    return corpus[ADVERTS[0]]["address"]


def config(broker_url: str, tmp: Path, modbus_port: int) -> str:
    address = recording(tmp / "adverts.jsonl")
    return f"""
[gateway]
id = "{GW}"
[uplink]
broker = "{broker_url}"
backoff_min = "100ms"
backoff_max = "500ms"
# longer than the test: the information must go when it changes, not with the period
stats_interval = "1h"
[buffer]
path = "{tmp / "buf.db"}"
flush_interval = "100ms"

[[devices]]
name = "meter"
driver = "modbus"
poll = "100ms"
host = "127.0.0.1"
port = {modbus_port}
unit_id = 1
timeout = "500ms"
  [[devices.points]]
  name = "power"
  address = 0
  datatype = "uint16"
  [[devices.points]]
  name = "serial_number"
  address = {SERIAL_AT}
  datatype = "string"
  length = 4

[[devices]]
name = "display"
driver = "ble"
address = "{address}"
format = "bthome"
source = "replay"
replay_file = "{tmp / "adverts.jsonl"}"
replay_speed = 1.0
  [[devices.points]]
  name = "temperature"
  measurement = "temperature"
"""


async def until(what: Callable[[], Any], timeout: float = TIMEOUT_S) -> Any:
    """Polls `what` (run in a thread: the store blocks) until it is truthy."""
    for _ in range(int(timeout / 0.05)):
        got = await asyncio.to_thread(what)
        if got:
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def info(store: Store) -> dict[tuple[str, str], str]:
    return {(e.device, e.name): e.value for e in store.device_info(GW)}


async def with_worker(store: Store, url: str, body: Callable[[], Awaitable[None]]) -> None:
    worker = IngestWorker(url, store, group=None)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.connected.wait(), TIMEOUT_S)
        await body()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


WANT = {
    ("meter", "serial_number"): "SN-4711",
    ("display", "text"): "Hello World!",
    ("display", "raw"): "48656c6c6f20576f726c6421",
}


def test_device_information_reaches_the_platform(tmp_path: Path) -> None:
    image = RegisterImage()
    image.set(HR, 0, [230])
    image.set(HR, SERIAL_AT, registers("SN-4711"))
    url = f"sqlite:///{tmp_path / 'platform.db'}"
    store = open_store(url)

    async def scenario(broker_url: str) -> Agent:
        sim = ModbusSimulator({1: image})
        await sim.start()
        agent = Agent(parse_config(config(broker_url, tmp_path, sim.port), source="gw.toml"))
        try:

            async def body() -> None:
                await agent.start()
                assert agent.uplink is not None
                uplink = agent.uplink
                # online first: a stop while the uplink connects may hang (Python 3.11's
                # wait_for in aiomqtt's connect can lose the cancel), which would turn a
                # failed assertion below into a timeout
                await until(lambda: uplink.status.state == "online")
                assert await until(lambda: info(store) == WANT)
                # a device's information changes (a meter swapped behind the same address):
                # the platform has the new serial number within a flush, not an hour
                image.set(HR, SERIAL_AT, registers("SN-0815"))
                new = {**WANT, ("meter", "serial_number"): "SN-0815"}
                assert await until(lambda: info(store) == new)

            await with_worker(store, broker_url, body)
        finally:
            await agent.stop()
            await sim.stop()
        return agent

    with running_broker(tmp_path / "broker") as broker:
        agent = asyncio.run(scenario(broker.url))
        assert agent.counters.info_refused == agent.counters.info_truncated == 0
        assert agent.snapshot()["info"]["meter"] == {"serial_number": "SN-0815"}
        store.close()

        # a platform that starts afresh learns it all again from the retained up/stats
        fresh_url = f"sqlite:///{tmp_path / 'fresh.db'}"
        fresh = open_store(fresh_url)

        async def learn() -> None:
            async def body() -> None:
                await until(lambda: len(info(fresh)) == 3)

            await with_worker(fresh, broker.url, body)

        asyncio.run(learn())
        assert info(fresh)[("meter", "serial_number")] == "SN-0815"
        fresh.close()

    # and `citygw platform devices` shows it
    result = runner.invoke(platform_app, ["devices", "--db", url, "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = [line.split(",")[:4] for line in result.stdout.splitlines()]
    assert rows == [
        ["gateway", "device", "name", "value"],
        [GW, "display", "raw", "48656c6c6f20576f726c6421"],
        [GW, "display", "text", "Hello World!"],
        [GW, "meter", "serial_number", "SN-0815"],
    ]
    table = runner.invoke(platform_app, ["devices", "--db", url])
    assert table.exit_code == 0 and "Hello World!" in table.stdout


SIM_CONFIG = """
[gateway]
id = "{gw}"
[uplink]
broker = "mqtt://127.0.0.1"
stats_interval = "1h"
[buffer]
path = "{buffer}"
flush_interval = "100ms"
[[devices]]
name = "a"
driver = "sim"
  [[devices.points]]
  name = "p"
[[devices]]
name = "b"
driver = "sim"
  [[devices.points]]
  name = "p"
"""


def test_agent_bounds_what_drivers_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A string with a NUL or too long is cut, a bad name left out, a driver that raises
    skipped: each counted once per change and logged; up/stats still goes and decodes."""
    store = open_store(f"sqlite:///{tmp_path / 'platform.db'}")
    worker = IngestWorker("mqtt://127.0.0.1", store, group=None)
    cfg = parse_config(SIM_CONFIG.format(gw=GW, buffer=tmp_path / "buf.db"), source="gw.toml")
    agent = Agent(cfg, connect=LoopbackLink(worker.deliver).connect)
    reports: dict[str, dict[str, str]] = {
        "a": {"serial": "SN-4711\x00\x00\xff\xfe", "fw": "é" * 600, "bad\x00name": "x"}
    }

    def device_info(name: str) -> dict[str, str]:
        if name == "b":
            raise RuntimeError("a driver bug")
        return reports[name]

    async def main() -> None:
        await agent.start()
        try:
            monkeypatch.setattr(agent.drivers[0], "device_info", device_info)
            want = {"a": {"serial": "SN-4711", "fw": "é" * 512}}
            with caplog.at_level(logging.WARNING, logger="citygw.agent"):
                assert agent.refresh_device_info() is True
                assert agent.refresh_device_info() is False  # unchanged: counted once
            assert agent.device_info == want
            c = agent.counters
            assert (c.info_truncated, c.info_refused) == (2, 1)
            messages = [r.getMessage() for r in caplog.records]
            assert "device information unreadable" in messages  # the raising driver
            (cut,) = [
                r for r in caplog.records if r.getMessage().startswith("device information cut")
            ]
            assert cut.entries == [  # type: ignore[attr-defined]
                "a/bad\x00name: name contains a NUL character, which the platform cannot store",
                f"a/fw: value cut at over {wire.MAX_INFO_VALUE_BYTES} bytes",
                "a/serial: value cut at a NUL",
            ]
            assert wire.decode_stats(await agent._stats()).devices == want
            assert agent.uplink is not None
            agent.uplink.report_now()
            assert await until(
                lambda: info(store) == {("a", "serial"): "SN-4711", ("a", "fw"): "é" * 512}
            )
        finally:
            await agent.stop()

    asyncio.run(main())
    store.close()
    # `citygw status` shows what was sent, from the agent's last snapshot in the buffer
    _, state = collect(tmp_path / "buf.db")
    assert state["agent"]["info"] == {"a": {"serial": "SN-4711", "fw": "é" * 512}}
    table = render_device_info(state)
    assert table is not None and table.row_count == 2
    console = Console(width=120, record=True)
    console.print(table)
    shown = console.export_text()
    assert "SN-4711" in shown and "values cut: 2 · entries left out: 1" in shown
    gw_toml = tmp_path / "gw.toml"
    gw_toml.write_text(SIM_CONFIG.format(gw=GW, buffer=tmp_path / "buf.db"))
    status = runner.invoke(cli_app, ["status", "--config", str(gw_toml)])
    assert status.exit_code == 0, status.output
    assert "device information" in status.stdout and "SN-4711" in status.stdout
    assert render_device_info({"agent": {"info": {}}}) is None
    assert render_device_info({}) is None  # a snapshot of an agent before issue 13
