"""Planning per table and what the device refuses (issue 13): `table_limits` override
the device's max_registers/max_bits/max_gap for one table; `citygw modbus plan --probe`
shows the splits and dropped points the driver learns at run time; an `optional` point
the device refuses is dropped from the plan instead of reading BAD forever; the shipped
SDM630 profile reads its blocks in as few requests as its document allows."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from agent.config import ConfigError, load_config
from agent.runtime import device_specs
from drivers.modbus.driver import ModbusDriver, device_plans
from drivers.modbus.planner import Span, plan
from drivers.modbus.simulator import RegisterImage
from native.batch import BAD, GOOD
from tests.helpers import run_driver_until
from tests.test_cli_modbus import citygw, write_config
from tests.test_cli_modbus import serving as serving_in_thread
from tests.test_modbus_driver import HR, Sink, mdevice, mpoint, serving

IR = "input_register"


# -- per-table limits ------------------------------------------------------------------


def test_planner_takes_limits_per_table() -> None:
    # a 12-register gap in the input registers, holding registers one apart
    spans = [
        Span(0, IR, 0, 48),
        Span(1, IR, 60, 36),
        Span(2, HR, 0, 1),
        Span(3, HR, 2, 1),
    ]
    # device-wide: max_gap 10 splits the input block and merges the holding registers
    assert [(r.table, r.address, r.count) for r in plan(spans, max_gap=10)] == [
        (HR, 0, 3),
        (IR, 0, 48),
        (IR, 60, 36),
    ]
    per_table = plan(spans, max_gap=10, tables={IR: (125, 20), HR: (125, 0)})
    assert [(r.table, r.address, r.count) for r in per_table] == [
        (HR, 0, 1),
        (HR, 2, 1),
        (IR, 0, 96),
    ]
    # the size limit of one table
    assert [r.count for r in plan(spans, tables={IR: (80, 20)}) if r.table == IR] == [48, 36]


DEVICE = """
[[devices]]
name = "dev"
driver = "modbus"
host = "127.0.0.1"
max_gap = 10
{extra}
  [[devices.points]]
  name = "block_a"
  table = "input_register"
  address = 0
  datatype = "string"
  length = 48
  [[devices.points]]
  name = "block_b"
  table = "input_register"
  address = 60
  datatype = "string"
  length = 36
  [[devices.points]]
  name = "h0"
  address = 0
  [[devices.points]]
  name = "h2"
  address = 2
"""


def requests_of(tmp_path: Path, extra: str) -> list[tuple[str, int, int]]:
    cfg = load_config(write_config(tmp_path, DEVICE.format(extra=extra)))
    specs = device_specs(cfg, {f"dev/{p.name}": i for i, p in enumerate(cfg.devices[0].points)})
    ((_group, requests),) = device_plans(specs["modbus"])["dev"]
    return [(r.table, r.address, r.count) for r in requests]


def test_table_limits_in_the_config(tmp_path: Path) -> None:
    assert requests_of(tmp_path, "") == [(HR, 0, 3), (IR, 0, 48), (IR, 60, 36)]
    extra = (
        "table_limits = { holding_register = { max_gap = 0 }, input_register = { max_gap = 20 } }"
    )
    assert requests_of(tmp_path, extra) == [(HR, 0, 1), (HR, 2, 1), (IR, 0, 96)]


def test_table_limits_are_checked(tmp_path: Path) -> None:
    # a value larger than its table's own request size
    extra = "table_limits = { input_register = { max_registers = 40 } }"
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, DEVICE.format(extra=extra)))
    assert (
        "devices[0].points[0].length: points[0] 'block_a' takes 48 registers, more than one "
        "request may read (table_limits.input_register.max_registers = 40)"
    ) in str(info.value)
    # a bit limit on a register table
    extra = "table_limits = { holding_register = { max_bits = 100 } }"
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, DEVICE.format(extra=extra)))
    assert "max_bits does not apply to a holding_register" in str(info.value)
    assert "table_limits" in str(info.value)


# -- the shipped SDM630 profile ----------------------------------------------------------


def test_sdm630_reads_each_block_in_one_request(tmp_path: Path) -> None:
    # Eastron's SDM630 input registers: 0x0000..0x0046 (voltages to frequency) with
    # unlisted addresses between them, 0x00C8..0x00E0 (line-to-line volts, neutral
    # current), energy totals at 0x0048.. and 0x0156..; at most 80 registers a request.
    # Source: Eastron, "SDM630 Modbus Smart Meter - Modbus Protocol Implementation",
    # section 1.2 and table 1.2.1 (https://manualshive.com/en/manual/eastron/
    # sdm630-modbus-mid-v2/522581, page 25). The default max_gap split the first block at
    # the 12- and 16-register gaps and the second at the 16-register one.
    devices = '[[devices]]\nname = "meter"\ndriver = "modbus"\nhost = "127.0.0.1"\n'
    cfg = load_config(write_config(tmp_path, devices + 'profile = "sdm630"\n'))
    specs = device_specs(cfg, {f"meter/{p.name}": i for i, p in enumerate(cfg.devices[0].points)})
    (meter,) = specs["modbus"]
    plans = dict(device_plans([meter])["meter"])

    def request_of(point: str) -> tuple[int, int]:
        """(first, end) of the request that reads `point`."""
        group = next(p.settings.group for p in meter.points if p.name == point)  # type: ignore[attr-defined]
        members = [p.name for p in meter.points if p.settings.group == group]  # type: ignore[attr-defined]
        return next(
            (r.address, r.end)
            for r in plans[group]
            if any(members[s.key] == point for s in r.spans)
        )

    assert request_of("l1_voltage") == request_of("frequency")
    assert request_of("l1_l2_voltage") == request_of("neutral_current")
    assert all(r.count <= 80 for rs in plans.values() for r in rs)
    assert len(plans[""]) == 2


# -- optional points ---------------------------------------------------------------------


def test_an_optional_point_the_device_refuses_is_dropped() -> None:
    image = RegisterImage()
    image.set(HR, 0, list(range(100, 110)))
    image.hole(HR, 3)  # this model lacks register 3: the optional point
    image.hole(HR, 7)  # and register 7, which the config says it has
    points = [mpoint(i + 1, f"r{i}", address=i, optional=(i == 3)) for i in range(10)]
    polls = 12

    async def main() -> None:
        async with serving({1: image}) as sim:
            driver = ModbusDriver([mdevice("dev", sim.port, points)])
            sink = Sink()
            await run_driver_until(driver, sink, lambda: len(sink.batches) >= polls)
            reads = sim.reads()
            status = driver.device_status("dev")
        assert status["dropped_points"] == ["r3"]
        assert status["bad_points"] == ["r7"]
        # the first poll's batch still has the optional point's row (BAD); then it is gone
        later = sink.batches[1:polls]
        for b in later:
            rows = {pid: (v, q) for pid, _ts, v, q in b.rows()}
            assert 4 not in rows  # r3 (id 4): dropped
            v, q = rows[8]  # r7: not optional, reads BAD as before
            assert q == BAD and math.isnan(v)
            assert rows[1] == (100.0, GOOD) and rows[10] == (109.0, GOOD)
        # register 3 alone was asked for once (in the first poll); register 7 is retried
        assert len([r for r in reads if (r.address, r.count) == (3, 1)]) == 1
        assert len([r for r in reads if (r.address, r.count) == (7, 1)]) >= 2

    asyncio.run(main())


# -- plan --probe ------------------------------------------------------------------------

PROBED = """
[[devices]]
name = "dev"
driver = "modbus"
host = "127.0.0.1"
port = {port}
timeout = "500ms"
retries = 0
  [[devices.points]]
  name = "a"
  address = 0
  [[devices.points]]
  name = "b"
  address = 1
  [[devices.points]]
  name = "c"
  address = 2
  [[devices.points]]
  name = "d"
  address = 3
  [[devices.points]]
  name = "thd"
  address = 4
  optional = true
"""


def test_plan_probe_shows_what_the_device_refused(tmp_path: Path) -> None:
    image = RegisterImage()
    image.set(HR, 0, [1, 2, 3, 4, 5])
    image.hole(HR, 1)
    image.hole(HR, 4)
    with serving_in_thread({1: image}) as sim:
        config = str(write_config(tmp_path, PROBED.format(port=sim.port)))
        plain = citygw("modbus", "plan", "-c", config)
        probed = citygw("modbus", "plan", "-c", config, "--probe")
    assert plain.exit_code == 0, plain.output
    assert "holding_register 0..4 (5 registers, 5 points)" in plain.stdout
    assert "learned" not in plain.stdout
    assert probed.exit_code == 0, probed.output
    lines = probed.stdout.splitlines()
    assert "    holding_register 0..4 (5 registers, 5 points)" in lines  # as planned
    learned = [line.strip() for line in lines if line.strip().startswith("learned")]
    assert learned == [
        "learned: holding_register 0..4 was refused; split into 0..0, 1..1, 2..2, 3..3"
    ]
    assert (
        "  refused: holding_register 1..1 (group poll): b read BAD, retried with backoff" in lines
    )
    assert "  dropped 1 optional point(s) the device refuses: thd" in lines
    assert lines[-2:] == [
        "1 requests per cycle in all (5 if each point were read alone)",
        "4 requests per cycle after the probe",
    ]
