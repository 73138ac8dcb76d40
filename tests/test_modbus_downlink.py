"""A platform command all the way to a Modbus device: down/cmd on a private mosquitto ->
the agent -> the modbus driver -> the simulator's register image, and the answer on
up/resp."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiomqtt
import orjson

from agent.config import parse_config
from agent.runtime import Agent
from common import wire
from common.broker import Mosquitto
from drivers.modbus.datatypes import encode, from_engineering
from drivers.modbus.simulator import ModbusSimulator, RegisterImage

HR = "holding_register"
GW = "gw-mb-down"
WRITE_FUNCTIONS = {5, 6, 15, 16}

CONFIG = """
[gateway]
id = "{gw}"
[uplink]
broker = "{broker}"
backoff_min = "100ms"
[buffer]
path = "{buffer}"
flush_interval = "100ms"

[[devices]]
name = "pump"
driver = "modbus"
host = "127.0.0.1"
port = {port}
unit_id = 1
poll = "200ms"
timeout = "3s"
retries = 1

  [[devices.points]]
  name = "setpoint"
  unit = "m"
  writable = true
  min = 0.0
  max = 50.0
  address = 10
  datatype = "float32"
  order = "CDAB"
  scale = 0.1

  [[devices.points]]
  name = "level"
  table = "input_register"
  address = 0
  scale = 0.01

[[devices]]
name = "stuck"
driver = "modbus"
host = "127.0.0.1"
port = {port}
unit_id = 2
poll = "200ms"
timeout = "3s"
retries = 1

  [[devices.points]]
  name = "setpoint"
  writable = true
  min = 0.0
  max = 50.0
  address = 10
"""


def registers(value: float, scale: float, datatype: str, order: str) -> list[int]:
    return encode(from_engineering(value, scale, 0.0, datatype), datatype, order)  # type: ignore[arg-type]


def test_a_write_command_reaches_the_modbus_register(mosquitto: Mosquitto, tmp_path: Path) -> None:
    pump, stuck = RegisterImage(), RegisterImage()
    pump.set_value("input_register", 0, 3.25, scale=0.01)
    pump.set_value(HR, 10, 10.0, "float32", "CDAB", scale=0.1)
    stuck.set(HR, 10, [7])
    stuck.ignore_writes = True  # acknowledges writes and keeps its 7
    down = wire.topic("citygw", GW, "down/cmd")
    resp = wire.topic("citygw", GW, "up/resp")

    async def scenario() -> tuple[dict[str, dict[str, object]], ModbusSimulator]:
        async with ModbusSimulator({1: pump, 2: stuck}) as sim:
            cfg = parse_config(
                CONFIG.format(
                    gw=GW, broker=mosquitto.url, buffer=tmp_path / "buf.db", port=sim.port
                )
            )
            agent = Agent(cfg)
            await agent.start()
            answers: dict[str, dict[str, object]] = {}
            try:
                async with aiomqtt.Client("127.0.0.1", mosquitto.port) as platform:
                    await platform.subscribe(resp, qos=1)
                    async with asyncio.timeout(10):  # until the agent is online and subscribed
                        while not (agent.uplink and agent.uplink.status.state == "online"):
                            await asyncio.sleep(0.05)
                    await asyncio.sleep(0.3)
                    commands = [
                        {"id": "w1", "op": "write", "point": "pump/setpoint", "value": 21.5},
                        {"id": "w2", "op": "write", "point": "pump/setpoint", "value": 99},
                        {"id": "w3", "op": "write", "point": "stuck/setpoint", "value": 21},
                        {"id": "w4", "op": "write", "point": "stuck/setpoint", "value": 20.5},
                    ]
                    for c in commands:
                        await platform.publish(down, orjson.dumps(c), qos=1)
                    async with asyncio.timeout(15):
                        async for message in platform.messages:
                            assert isinstance(message.payload, bytes)
                            answer = orjson.loads(message.payload)
                            answers[answer["id"]] = answer
                            if len(answers) == len(commands):
                                break
            finally:
                with contextlib.suppress(Exception):
                    await agent.stop()
        return answers, sim

    answers, sim = asyncio.run(scenario())

    assert answers["w1"]["ok"] is True and "error" not in answers["w1"]
    assert answers["w1"]["written"] == 21.5  # what the register holds, read back
    assert pump.read(HR, 10, 2) == registers(21.5, 0.1, "float32", "CDAB")
    assert registers(21.5, 0.1, "float32", "CDAB") == encode(215.0, "float32", "CDAB")

    # refused before any device is touched: one write request in all to unit 1
    assert answers["w2"]["ok"] is False
    assert (
        answers["w2"]["error"]
        == "value 99 for 'pump/setpoint' is outside its declared range [0, 50]"
    )
    unit1_writes = [r for r in sim.requests if r.unit == 1 and r.function_code in WRITE_FUNCTIONS]
    assert [(r.function_code, r.address, r.count) for r in unit1_writes] == [(16, 10, 2)]

    # the device acknowledged and kept its value: the read-back says so
    assert answers["w3"]["ok"] is False
    error = str(answers["w3"]["error"])
    assert error.startswith("ModbusWriteError: cannot write 21.0 to stuck/setpoint: ")
    assert "read back [7] from holding_register 10, wrote [21]" in error
    assert "the device did not take the value" in error
    assert stuck.read(HR, 10, 1) == [7]
    assert any(r.unit == 2 and r.function_code == 6 for r in sim.requests)

    # an integer register cannot hold 20.5: refused with what it could hold, not
    # written as 20 (issue 13), and nothing sent for it
    assert answers["w4"]["ok"] is False
    assert str(answers["w4"]["error"]) == (
        "ModbusWriteError: cannot write 20.5 to stuck/setpoint: 20.5 needs raw value 20.5, "
        "which does not fit uint16 (not an integer); the nearest writable values are 20 or 21"
    )
    unit2_writes = [r for r in sim.requests if r.unit == 2 and r.function_code in WRITE_FUNCTIONS]
    assert len(unit2_writes) == 1  # w3's
