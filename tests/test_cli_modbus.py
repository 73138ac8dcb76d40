"""`citygw modbus plan|read|write|scan` through typer's CliRunner, against a Modbus
simulator on a free loopback port.

The commands call `asyncio.run` themselves, so the simulator serves from a thread of its
own with its own event loop (`serving`)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from cli import main as cli
from drivers.modbus.datatypes import encode, from_engineering
from drivers.modbus.planner import Request, Span, describe
from drivers.modbus.scan import merge
from drivers.modbus.simulator import ModbusSimulator, RegisterImage
from hil.sim_field import (
    SDM630_HOLDING_PARAMETERS,
    SDM630_INPUT_PARAMETERS,
    block_device_image,
    sdm630_image,
)

# wide enough that rich never wraps a line or a table cell
runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})

HR = "holding_register"
IR = "input_register"
WRITE_FUNCTIONS = {5, 6, 15, 16}


@contextlib.contextmanager
def serving(devices: Mapping[int, RegisterImage]) -> Iterator[ModbusSimulator]:
    """A simulator serving `devices` from a background thread (its own event loop);
    `.port` is set on entry; stopped and the thread joined on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="modbus-sim", daemon=True)
    thread.start()
    sim = ModbusSimulator(devices)
    try:
        asyncio.run_coroutine_threadsafe(sim.start(), loop).result(timeout=10)
        yield sim
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(sim.stop(), loop).result(timeout=10)

        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(cancel_rest(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        assert not thread.is_alive(), "the simulator's thread did not stop"
        loop.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def citygw(*args: str) -> Result:
    return runner.invoke(cli.app, list(args))


def writes(sim: ModbusSimulator) -> list[tuple[int, int, int]]:
    """(unit, function code, address) of the write requests the simulator served."""
    return [
        (r.unit, r.function_code, r.address)
        for r in sim.requests
        if r.function_code in WRITE_FUNCTIONS
    ]


HEADER = """
[gateway]
id = "gw-mb-cli"
[uplink]
broker = "mqtt://127.0.0.1:1883"
[buffer]
path = "{buffer}"
"""


def write_config(folder: Path, devices: str) -> Path:
    path = folder / "gateway.toml"
    path.write_text(HEADER.format(buffer=folder / "buf.db") + devices, encoding="utf-8")
    return path


# -- plan -----------------------------------------------------------------------------

PLAN_DEVICES = """
[[devices]]
name = "pump"
driver = "modbus"
host = "127.0.0.1"
poll = "1s"
unit_id = 7
max_gap = 4
poll_groups = { slow = "1m" }

  [[devices.points]]
  name = "run"
  type = "bool"
  table = "coil"
  address = 0
  [[devices.points]]
  name = "enable"
  type = "bool"
  table = "coil"
  address = 3
  [[devices.points]]
  name = "a"
  address = 0
  [[devices.points]]
  name = "b"
  address = 2
  datatype = "float32"
  [[devices.points]]
  name = "c"
  address = 10
  [[devices.points]]
  name = "d"
  address = 12
  datatype = "int32"
  [[devices.points]]
  name = "hours"
  table = "input_register"
  address = 100
  datatype = "uint32"
  group = "slow"
  [[devices.points]]
  name = "starts"
  table = "input_register"
  address = 104
  group = "slow"

[[devices]]
name = "meter"
driver = "modbus"
host = "127.0.0.1"
poll = "5s"
unit_id = 2
profile = "sdm120"

[[devices]]
name = "spare"
driver = "modbus"
enabled = false
host = "127.0.0.1"
  [[devices.points]]
  name = "x"
  address = 0

[[devices]]
name = "sim-dev"
driver = "sim"
  [[devices.points]]
  name = "level"
"""


def req(table: str, address: int, count: int, points: int) -> Request:
    spans = tuple(Span(i, table, address, count) for i in range(points))  # type: ignore[arg-type]
    return Request(table, address, count, spans)  # type: ignore[arg-type]


def test_plan_prints_the_merged_requests_per_group(tmp_path: Path) -> None:
    result = citygw("modbus", "plan", "-c", str(write_config(tmp_path, PLAN_DEVICES)))
    assert result.exit_code == 0, result.output
    # by hand: coils 0 and 3 (gap 2 bits); registers 0, 2..3 | 10, 12..13 (gap 6 > 4);
    # slow: 100..101, 104 (gap 2)
    pump_poll = describe([req("coil", 0, 4, 2), req(HR, 0, 4, 2), req(HR, 10, 4, 2)])
    pump_slow = describe([req("input_register", 100, 5, 2)])
    # sdm120 (max_gap 10): float32 at 0, 6, ..., 36 then 70 (gap 32); totals 72..79, 342..345
    meter_poll = describe([req("input_register", 0, 38, 7), req("input_register", 70, 2, 1)])
    meter_totals = describe([req("input_register", 72, 8, 4), req("input_register", 342, 4, 2)])
    assert pump_poll == [
        "coil 0..3 (4 bits, 2 points)",
        "holding_register 0..3 (4 registers, 2 points)",
        "holding_register 10..13 (4 registers, 2 points)",
    ]
    expected = [
        "pump (unit 7)",
        "  group poll every 1 s: 3 requests for 6 points",
        *(f"    {line}" for line in pump_poll),
        "  group slow every 60 s: 1 requests for 2 points",
        *(f"    {line}" for line in pump_slow),
        "meter (unit 2)",
        "  group poll every 5 s: 2 requests for 8 points",
        *(f"    {line}" for line in meter_poll),
        "  group totals every 60 s: 2 requests for 6 points",
        *(f"    {line}" for line in meter_totals),
        "8 requests per cycle in all (22 if each point were read alone)",
    ]
    assert result.stdout.splitlines() == expected
    assert "spare" not in result.output and "sim-dev" not in result.output


def test_plan_without_modbus_devices_fails(tmp_path: Path) -> None:
    devices = '[[devices]]\nname = "s"\ndriver = "sim"\n  [[devices.points]]\n  name = "v"\n'
    path = write_config(tmp_path, devices)
    result = citygw("modbus", "plan", "-c", str(path))
    assert result.exit_code == 1
    assert f"{path}: no enabled device with driver = 'modbus'" in result.stderr
    assert result.stdout == ""


# -- read -----------------------------------------------------------------------------


def test_read_prints_raw_hex_and_decoded() -> None:
    image = RegisterImage()
    image.set_value(HR, 10, 123.456, "float32", "CDAB")
    image.hole(HR, 50, 5)
    with serving({1: image}) as sim:
        result = citygw(
            "modbus", "read", "--host", "127.0.0.1", "--port", str(sim.port), "--unit", "1",
            "--table", HR, "--address", "10", "--datatype", "float32", "--order", "CDAB",
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    hi, lo = struct.unpack(">HH", struct.pack(">f", 123.456))
    value = struct.unpack(">f", struct.pack(">f", 123.456))[0]
    assert result.stdout.splitlines() == [
        f"holding_register 10..11 unit 1: [{lo}, {hi}]",
        "hex: E979 42F6",
        f"float32 CDAB: {value!r}",
    ]
    assert (lo, hi) == (0xE979, 0x42F6)


def test_read_says_not_available_for_a_marker() -> None:
    """`read` printed 2147483647 for a device's "no value" (issue 13): a marker, given
    with --invalid or one of the datatype's common ones, is named as such."""
    image = RegisterImage()
    image.set(HR, 0, [0x7FFF, 0xFFFF])  # int32 0x7FFFFFFF
    image.set(HR, 2, [0x8000])  # int16 0x8000
    image.set(HR, 3, [0x7FC0, 0x0000])  # float32 NaN
    image.set(HR, 5, [0x0000, 0x00D7])  # int32 215: a value

    def read(address: int, datatype: str, *extra: str) -> str:
        result = citygw(
            "modbus", "read", "--host", "127.0.0.1", "--port", str(sim.port),
            "--table", HR, "--address", str(address), "--datatype", datatype, *extra,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        return result.stdout.splitlines()[-1]

    with serving({1: image}) as sim:
        assert read(0, "int32", "--invalid", "0x7FFFFFFF") == (
            "int32 ABCD: not available (marker 0x7FFFFFFF)"
        )
        assert (
            read(2, "int16", "--invalid", "-32768") == "int16 ABCD: not available (marker 0x8000)"
        )
        assert read(3, "float32") == "float32 ABCD: not available (marker NaN)"
        assert read(0, "int32") == (
            "int32 ABCD: not available (marker 0x7FFFFFFF): a common marker of int32; "
            "if it is a real value, read with --invalid none"
        )
        assert read(0, "int32", "--invalid", "none") == "int32 ABCD: 2147483647"
        assert read(5, "int32", "--invalid", "0x7FFFFFFF") == "int32 ABCD: 215"
        bad = citygw(
            "modbus", "read", "--host", "127.0.0.1", "--port", str(sim.port), "--table", HR,
            "--address", "2", "--datatype", "uint16", "--invalid", "0x1FFFF",
        )  # fmt: skip
        assert bad.exit_code == 1
        assert "--invalid: marker 0x1FFFF does not fit uint16" in bad.stderr


def test_read_takes_the_address_as_the_register_map_prints_it() -> None:
    """The docs tell a technician to find a map's convention by reading a known register
    at the candidate addresses: `read` takes the number as printed, in any convention."""
    image = RegisterImage()
    image.set(IR, 70, [4242])
    with serving({1: image}) as sim:

        def read(address: str, *base: str) -> list[str]:
            result = citygw(
                "modbus", "read", "--host", "127.0.0.1", "--port", str(sim.port),
                "--table", IR, "--address", address, *base,
            )  # fmt: skip
            assert result.exit_code == 0, result.output
            return result.stdout.splitlines()

        assert read("70")[0] == "input_register 70..70 unit 1: [4242]"
        assert read("71", "--address-base", "1")[0] == (
            "input_register 71..71 (PDU 70..70) unit 1: [4242]"
        )
        assert read("30071", "--address-base", "modicon")[0] == (
            "input_register 30071..30071 (PDU 70..70) unit 1: [4242]"
        )
        wrong = citygw(
            "modbus", "read", "--host", "127.0.0.1", "--port", str(sim.port),
            "--table", IR, "--address", "40071", "--address-base", "modicon",
        )  # fmt: skip
        assert wrong.exit_code == 1
        assert "--address 40071 is a holding_register number" in wrong.stderr


def test_read_of_a_hole_prints_the_exception() -> None:
    image = RegisterImage()
    image.hole(HR, 50, 5)
    with serving({1: image}) as sim:
        result = citygw(
            "modbus", "read", "--host", "127.0.0.1", "--port", str(sim.port),
            "--table", HR, "--address", "52", "--timeout", "5",
        )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "error:" in result.stderr
    assert "unit 1: exception 2 (illegal data address) to function 3 at address 52" in (
        result.stderr
    )
    assert result.stdout == ""


def test_read_from_a_closed_port_fails_clearly() -> None:
    port = free_port()
    result = citygw(
        "modbus", "read", "--host", "127.0.0.1", "--port", str(port),
        "--table", HR, "--address", "0", "--timeout", "1",
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: cannot connect to tcp ")
    assert f"127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--datatype", "string"], "a string takes `length` registers"),
        (["--count", "126"], "count 126: one read of a holding_register takes 1 to 125"),
        (["--count=-1"], "count -1: one read of a holding_register takes 1 to 125"),
        (["--table", "coil", "--count", "2001"], "count 2001: one read of a coil takes 1 to 2000"),
    ],
)
def test_read_refuses_impossible_sizes(args: list[str], message: str) -> None:
    base = ["--host", "127.0.0.1", "--port", "1", "--address", "0"]
    if "--table" not in args:
        base += ["--table", HR]
    result = citygw("modbus", "read", *base, *args)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.output


# -- write ----------------------------------------------------------------------------

WRITE_DEVICES = """
[[devices]]
name = "dev"
driver = "modbus"
host = "127.0.0.1"
port = {port}
unit_id = 1
timeout = "5s"
retries = 0

  [[devices.points]]
  name = "setpoint"
  writable = true
  min = 0.0
  max = 50.0
  address = 20
  datatype = "float32"
  order = "CDAB"
  scale = 0.5

  [[devices.points]]
  name = "level"
  address = 30
"""


def test_write_sets_the_register_and_refuses_what_it_must(tmp_path: Path) -> None:
    image = RegisterImage()
    image.set(HR, 20, [0, 0])
    with serving({1: image}) as sim:
        config = str(write_config(tmp_path, WRITE_DEVICES.format(port=sim.port)))
        result = citygw(
            "modbus", "write", "-c", config, "--point", "dev/setpoint", "--value", "12.5"
        )
        assert result.exit_code == 0, result.output
        assert "wrote 12.5 to dev/setpoint (verified by reading back)" in result.stdout
        wanted = encode(from_engineering(12.5, 0.5, 0.0, "float32"), "float32", "CDAB")
        assert image.read(HR, 20, 2) == wanted
        assert wanted == encode(25.0, "float32", "CDAB")  # raw = value / scale
        assert writes(sim) == [(1, 16, 20)]

        refusals = [
            (["--point", "dev/level", "--value", "3"], "not writable"),
            (
                ["--point", "dev/setpoint", "--value", "50.5"],
                "above the point's declared maximum 50",
            ),
            (["--point", "dev/setpoint", "--value=-1"], "below the point's declared minimum 0"),
            (["--point", "dev/nope", "--value", "1"], "device 'dev' has no point 'nope'"),
            (["--point", "other/setpoint", "--value", "1"], "no enabled Modbus device 'other'"),
        ]
        for args, reason in refusals:
            result = citygw("modbus", "write", "-c", config, *args)
            assert result.exit_code == 1, (args, result.output)
            assert result.stderr.startswith("error: "), (args, result.output)
            assert reason in result.stderr, (args, result.stderr)
            assert "wrote" not in result.stdout
        assert writes(sim) == [(1, 16, 20)]  # nothing was sent for the refusals
        assert image.read(HR, 20, 2) == wanted


INTEGER_SETPOINT = """
[[devices]]
name = "dev"
driver = "modbus"
host = "127.0.0.1"
port = {port}
timeout = "5s"
retries = 0

  [[devices.points]]
  name = "speed"
  writable = true
  address = 40
  datatype = "int16"

  [[devices.points]]
  name = "temp"
  writable = true
  address = 41
  datatype = "int16"
  scale = 0.1
"""


def test_write_reports_what_was_written_and_refuses_what_does_not_fit(tmp_path: Path) -> None:
    """10.5 to an int16 printed "wrote 10.5 ... verified" and wrote 10 (issue 13)."""
    image = RegisterImage()
    with serving({1: image}) as sim:
        config = str(write_config(tmp_path, INTEGER_SETPOINT.format(port=sim.port)))
        result = citygw("modbus", "write", "-c", config, "--point", "dev/speed", "--value", "10.5")
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("error: cannot write 10.5 to dev/speed: 10.5 needs raw ")
        assert "which does not fit int16 (not an integer)" in result.stderr
        assert "the nearest writable values are 10 or 11" in result.stderr
        assert "wrote" not in result.stdout and writes(sim) == []
        # scale 0.1: 10.5 is raw 105, which fits
        result = citygw("modbus", "write", "-c", config, "--point", "dev/temp", "--value", "10.5")
        assert result.exit_code == 0, result.output
        assert "wrote 10.5 to dev/temp (verified by reading back)" in result.stdout
        assert image.read(HR, 41, 1) == [105]


# -- scan -----------------------------------------------------------------------------


@pytest.fixture
def two_units() -> Iterator[ModbusSimulator]:
    one, two = RegisterImage(), RegisterImage()
    two.hole(HR, 20, 10)
    with serving({1: one, 2: two}) as sim:
        yield sim


def scan(port: int, *extra: str) -> Result:
    # units 1 and 2 answer at once; only unit 3 (absent) waits out its one timeout, so
    # a generous timeout costs little and a busy machine cannot drop a range
    return citygw(
        "modbus", "scan", "--host", "127.0.0.1", "--port", str(port), "--units", "1-3",
        "--addresses", "0-39", "--block", "10", "--timeout", "1", *extra,
    )  # fmt: skip


def table_rows(output: str) -> dict[str, str]:
    """unit -> readable ranges, from the rich table's rows."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.replace("┃", "│").split("│")[1:-1]]
        if len(cells) == 2 and cells[0].isdigit():
            rows[cells[0]] = cells[1]
    return rows


def test_scan_lists_the_units_and_their_readable_ranges(two_units: ModbusSimulator) -> None:
    result = scan(two_units.port)
    assert result.exit_code == 0, result.output
    assert f"holding_register 0-39 on 127.0.0.1:{two_units.port} (tcp)" in result.stdout
    assert table_rows(result.stdout) == {"1": "0-40", "2": "0-20, 30-40"}
    probes = [(r.unit, r.address) for r in two_units.reads()]
    assert probes.count((3, 0)) == 1 and all(a == 0 for u, a in probes if u == 3)


def test_scan_writes_a_config_that_validates(two_units: ModbusSimulator, tmp_path: Path) -> None:
    out = tmp_path / "out.toml"
    result = scan(two_units.port, "--write-config", str(out))
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout

    valid = citygw("validate", "-c", str(out))
    assert valid.exit_code == 0, valid.output + out.read_text()

    import tomllib

    doc = tomllib.loads(out.read_text(encoding="utf-8"))
    assert doc["gateway"]["id"] == "gw-CHANGE-ME"
    devices = doc["devices"]
    assert [(d["name"], d["unit_id"], d["port"]) for d in devices] == [
        ("unit-1", 1, two_units.port),
        ("unit-2", 2, two_units.port),
    ]
    addresses = [[p["address"] for p in d["points"]] for d in devices]
    assert addresses == [list(range(40)), [*range(20), *range(30, 40)]]


def test_scan_with_nobody_home() -> None:
    with serving({1: RegisterImage()}) as sim:
        result = citygw(
            "modbus", "scan", "--host", "127.0.0.1", "--port", str(sim.port), "--units", "5",
            "--addresses", "0-9", "--timeout", "0.2",
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "no unit answered" in result.stdout


# -- scan: a meter as met in the field (hil/sim_field.py: an SDM630 on its published map,
#    a 96-register block, a gateway answering exception 11 for absent units) ------------


@pytest.fixture
def field() -> Iterator[ModbusSimulator]:
    with serving({1: sdm630_image(), 2: block_device_image()}) as sim:
        sim.absent_exception = 11  # a TCP-to-RTU gateway: "target device failed to respond"
        yield sim


def field_scan(sim: ModbusSimulator, units: str, table: str, addresses: str, *extra: str) -> Result:
    return citygw(
        "modbus", "scan", "--host", "127.0.0.1", "--port", str(sim.port), "--units", units,
        "--table", table, "--addresses", addresses, "--timeout", "1", *extra,
    )  # fmt: skip


def test_scan_finds_every_readable_block_of_the_meter_with_exact_edges(
    field: ModbusSimulator,
) -> None:
    """The default block (10) used to drop every block that shared 10 addresses with a
    hole (neutral current at 224, the power factor at 254, ...) and to cut the rest on
    multiples of 10."""
    result = field_scan(field, "1", "input_register", "0-399")
    assert result.exit_code == 0, result.output
    expected = merge([(a, a + 2) for a in SDM630_INPUT_PARAMETERS])
    assert table_rows(result.stdout) == {"1": ", ".join(f"{a}-{b}" for a, b in expected)}
    assert "224-226" in result.stdout and "254-256" in result.stdout
    assert f"{len(field.reads())} requests." in result.stdout
    assert "Probed 10 registers at a time (--block)" in result.stdout
    assert "bisected" in result.stdout


def test_scan_shows_odd_addressed_holding_registers_and_the_even_rule(
    field: ModbusSimulator,
) -> None:
    """From address 1 every read starts odd and the meter refuses it: the registers are
    readable as their even-aligned pairs, and the rule is the device's, so it is said."""
    result = field_scan(field, "1", "holding_register", "1-39")
    assert result.exit_code == 0, result.output
    assert table_rows(result.stdout) == {"1": "1-4, 6-14, 18-22, 28-30, 36-38"}
    assert (
        "unit 1: reads must start on an even address and cover an even number of registers "
        "(whole 32-bit values): set even_address_only = true for it"
    ) in result.stdout


def test_scan_takes_gateway_exception_11_as_no_such_unit(field: ModbusSimulator) -> None:
    result = field_scan(field, "1-4", "input_register", "1000-1109")
    assert result.exit_code == 0, result.output
    rows = table_rows(result.stdout)
    assert rows == {"1": "answers, nothing readable here", "2": "1003-1099"}  # 96 registers
    assert (
        "units 3-4: no such unit: the gateway answered exception 11 (gateway target device "
        "failed to respond)"
    ) in result.stdout
    assert [r.address for r in field.reads(3)] == [1000] == [r.address for r in field.reads(4)]
    assert f"{len(field.reads())} requests." in result.stdout


def test_scan_writes_pairs_for_an_even_only_unit(field: ModbusSimulator, tmp_path: Path) -> None:
    out = tmp_path / "meter.toml"
    result = field_scan(field, "1", "holding_register", "0-39", "--write-config", str(out))
    assert result.exit_code == 0, result.output
    valid = citygw("validate", "-c", str(out))
    assert valid.exit_code == 0, valid.output + out.read_text()

    import tomllib

    (device,) = tomllib.loads(out.read_text(encoding="utf-8"))["devices"]
    assert device["even_address_only"] is True
    assert [(p["address"], p["datatype"]) for p in device["points"]] == [
        (a, "uint32") for a in SDM630_HOLDING_PARAMETERS if a < 40
    ]


def test_scan_help_says_what_the_block_is() -> None:
    result = citygw("modbus", "scan", "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.replace("│", " ").split())
    assert "A refused read is bisected down to single registers" in text
