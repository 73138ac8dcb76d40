"""Garbled Modbus RTU answers: told apart from silence, named by kind, counted once per
answer in the device's health, and the next answer read in step."""

from __future__ import annotations

import asyncio
import random

import pytest

from drivers.base import DeviceSpec, PointSpec
from drivers.modbus import ModbusDeviceSettings, ModbusPointSettings
from drivers.modbus.client import (
    Endpoint,
    ModbusConnection,
    ModbusGarbledAnswer,
    ModbusTimeout,
)
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.garbled import answer_length, crc16, garbled_kind
from hil.sim_modbus import CabinetSimulator, GarbageRtuFront, _junk
from tests.helpers import Sink, run_driver_until

WAIT_S = 5.0
#: the front's kinds -> the client's
KINDS = {"random": "junk", "truncated": "truncated", "bad_crc": "bad_crc"}


def _frame(body: bytes) -> bytes:
    return body + crc16(body).to_bytes(2, "little")


def test_garbled_kind_names_what_came_instead_of_the_answer() -> None:
    answer = _frame(bytes([1, 4, 4, 0x43, 0x66, 0, 0]))  # unit 1, input registers, count 2
    assert len(answer) == answer_length(4, 2) == 9
    for cut in range(1, len(answer)):
        assert garbled_kind(answer[:cut], 1, 4, 2) == "truncated"
    spoiled = answer[:-2] + bytes(b ^ 0xA5 for b in answer[-2:])
    assert garbled_kind(spoiled, 1, 4, 2) == "bad_crc"
    exception = _frame(bytes([1, 0x84, 2]))
    assert garbled_kind(exception[:4], 1, 4, 2) == "truncated"
    assert garbled_kind(exception[:3] + b"\0\0", 1, 4, 2) == "bad_crc"
    assert garbled_kind(bytes([2, 4, 4]), 1, 4, 2) == "junk"  # another unit
    assert garbled_kind(bytes([1, 3, 4]), 1, 4, 2) == "junk"  # another function
    assert garbled_kind(bytes([1, 4, 6, 0, 0]), 1, 4, 2) == "junk"  # a wrong byte count
    assert garbled_kind(answer + b"\x01", 1, 4, 2) == "junk"  # longer than any answer
    assert garbled_kind(_frame(bytes([1, 6, 0, 3, 0, 7]))[:5], 1, 6, 1) == "truncated"


def test_front_junk_is_never_the_start_of_an_answer() -> None:
    rng = random.Random(3)
    for unit in (0, 1, 7, 255):
        for _ in range(300):
            assert garbled_kind(_junk(rng, unit), unit, 4, 2) == "junk"


@pytest.mark.parametrize("kind", ["random", "truncated", "bad_crc"])
def test_a_garbled_answer_is_named_and_the_next_one_read_in_step(kind: str) -> None:
    async def main() -> None:
        async with (
            CabinetSimulator(transport="rtu-over-tcp", tick_s=None) as cabinet,
            GarbageRtuFront(cabinet.port, probability=1.0, kinds=[kind], seed=2) as front,  # type: ignore[list-item]
        ):
            conn = ModbusConnection(Endpoint("rtu-over-tcp", "127.0.0.1", front.port), timeout=0.3)
            try:
                with pytest.raises(ModbusGarbledAnswer) as info:
                    await conn.read("input_register", 0, 2, unit=1)
                assert info.value.kind == KINDS[kind]
                assert info.value.received == front.injected[-1].sent
                front.probability = 0.0
                regs = await conn.read("input_register", 0, 2, unit=1)  # no collateral
                assert tuple(regs) == cabinet.served[-1].registers
                cabinet.silent = True  # silence stays a plain timeout
                with pytest.raises(ModbusTimeout) as silent:
                    await conn.read("input_register", 0, 2, unit=1)
                assert not isinstance(silent.value, ModbusGarbledAnswer)
            finally:
                conn.close()

    asyncio.run(main())


def test_the_driver_counts_every_garbled_answer_by_kind_retries_included() -> None:
    async def main() -> None:
        async with (
            CabinetSimulator(transport="rtu-over-tcp", tick_s=None) as cabinet,
            GarbageRtuFront(cabinet.port, probability=1.0, kinds=["bad_crc"], seed=1) as front,
        ):
            settings = {
                "transport": "rtu-over-tcp",
                "host": "127.0.0.1",
                "port": front.port,
                "unit_id": 1,
                "timeout": 0.2,
                "retries": 1,
            }
            point = PointSpec(
                1,
                "meter/v",
                "v",
                "V",
                "float",
                False,
                ModbusPointSettings.model_validate(
                    {"table": "input_register", "address": 0, "datatype": "float32"}
                ),
            )
            spec = DeviceSpec(
                "meter", 0.05, ModbusDeviceSettings.model_validate(settings), (point,)
            )
            driver = ModbusDriver([spec])
            health = driver.health()["meter"]

            def failed_then_read() -> bool:
                if health.errors:
                    front.probability = 0.0  # then a good answer: every garbled one is past
                return health.readings > 0

            await run_driver_until(driver, Sink(), failed_then_read, WAIT_S)
            rejected = health.as_dict()["rejected"]
            assert rejected == {"bad_crc": front.counts["bad_crc"]}
            # each failed poll: the try and its retry; the good poll maybe one more
            assert 2 * health.errors <= front.counts["bad_crc"] <= 2 * health.errors + 1

    asyncio.run(main())
