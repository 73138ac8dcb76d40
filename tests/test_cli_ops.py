"""The operating commands of the CLI: run, status, buffer inspect, demo and ingest."""

from __future__ import annotations

import io
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from rich.console import Console
from typer.testing import CliRunner

from agent.status import render_status
from buffer import Buffer, BufferStats, Lane, LaneStats
from cli import main as cli
from common import wire
from native import codec
from native.batch import Batch
from native.stages import AlarmEvent

# wide enough that rich never wraps a table cell
runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})

BORDERS = "│┃║|"


def row(output: str, first: str) -> list[str]:
    """The cells of the table row whose first cell is `first`."""
    for line in output.splitlines():
        cells = [c.strip() for c in _split(line)]
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{output}")


def _split(line: str) -> list[str]:
    for b in BORDERS[1:]:
        line = line.replace(b, BORDERS[0])
    return [c for c in line.split(BORDERS[0])[1:-1]] if BORDERS[0] in line else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(folder: Path, buffer: str = "buf.db", devices: str = "") -> Path:
    path = folder / "gateway.toml"
    path.write_text(
        '[gateway]\nid = "gw-ops"\n'
        f'[uplink]\nbroker = "mqtt://127.0.0.1:{free_port()}"\n'
        'backoff_min = "100ms"\nbackoff_max = "300ms"\n'
        f'[buffer]\npath = "{buffer}"\nflush_interval = "100ms"\n' + devices,
        encoding="utf-8",
    )
    return path


def encoded(n: int, t0_ms: int, span_ms: int = 1000) -> bytes:
    return codec.encode(Batch.from_rows([(i, t0_ms + i * span_ms, float(i), 0) for i in range(n)]))


def snapshot(
    now_ms: int, uplink_state: str = "backoff", state: str = "running"
) -> dict[str, object]:
    """Shaped like agent.runtime.Agent.snapshot()."""
    return {
        "pid": 4242,
        "state": state,
        "started_ms": now_ms - 60_000,
        "updated_ms": now_ms,
        "counters": {
            "read": 1234,
            "refused": 5,
            "flagged": 6,
            "dropped": 7,
            "sent": 1222,
            "encoded_bytes": 999,
            "flushes": 60,
            "suppressed": 400,
            "alarms_raised": 3,
            "alarms_cleared": 2,
            "flush_failures": 4,
        },
        "uplink": {
            "state": uplink_state,
            "connected_since_ms": None,
            "last_puback_ms": None,
            "last_error": "[Errno 111] Connection refused",
            "connects": 0,
            "published_messages": 0,
            "published_points": 0,
            "published_bytes": 0,
            "resent_messages": 0,
        },
        "devices": {
            "pump-3": {
                "last_success_ms": None,
                "last_error_ms": now_ms - 500,
                "last_error": "simulated timeout: device did not answer",
                "errors": 17,
                "consecutive_failures": 9,
                "polls": 40,
                "skipped_polls": 2,
                "readings": 23,
                "rejected": {"truncated": 1, "bad_crc": 3},
            },
            "bridge-7": {
                "last_success_ms": now_ms - 1000,
                "last_error_ms": None,
                "last_error": None,
                "errors": 0,
                "consecutive_failures": 0,
                "polls": 31,
                "skipped_polls": 0,
                "readings": 93,
            },
        },
    }


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    """A config whose buffer holds messages in all lanes, one eviction and a snapshot."""
    now = time.time_ns() // 1_000_000
    buf = Buffer(tmp_path / "buf.db", capacity_bytes=1000)
    try:
        buf.append(Lane.TELEMETRY, encoded(5, now - 60_000), 5)
        alarm = AlarmEvent(3, "high", "critical", True, now, 7.5, now - 5000)
        buf.append(Lane.ALARM, wire.encode_alarms("gw-test", [alarm]), 1)
        buf.append(Lane.TELEMETRY, encoded(7, now - 30_000, span_ms=500), 7)
        buf.append(Lane.EVENT, encoded(3, now), 3)
        buf.append(Lane.TELEMETRY, b"\x00" * 2000, 50)  # larger than the buffer: evicted
        buf.append(Lane.EVENT, b"not a batch", 2)
        buf.put_state("agent", snapshot(now))
    finally:
        buf.close()
    return write_config(tmp_path)


# -- status --------------------------------------------------------------------------------


def test_status_shows_lanes_evictions_uplink_and_devices(filled: Path) -> None:
    result = runner.invoke(cli.app, ["status", "-c", str(filled)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    # lanes: batches, readings
    assert row(out, "alarm")[1:3] == ["1", "1"]
    assert row(out, "event")[1:3] == ["2", "5"]
    assert row(out, "telemetry")[1:3] == ["2", "12"]
    assert row(out, "alarm")[4].endswith("s ago")
    assert "evicted: 50 readings in 1 batches" in out
    assert "of 1000 bytes used" in out
    assert "last ack: never" in out
    # agent and uplink
    assert row(out, "agent")[1] == "running"
    assert row(out, "uplink")[1] == "backoff — last error: [Errno 111] Connection refused"
    assert row(out, "last PUBACK")[1] == "never"
    assert row(out, "read")[1] == "1234"
    assert row(out, "sent")[1] == "1222"
    assert row(out, "refused")[1] == "5"
    assert row(out, "dropped")[1] == "7"
    assert row(out, "suppressed")[1] == "400"
    assert row(out, "alarms raised / cleared")[1] == "3 / 2"
    assert row(out, "failed flushes")[1] == "4"
    # devices: name, last success, polls, errors, in a row, skipped
    pump = row(out, "pump-3")
    assert pump[1:] == ["never", "40", "17", "9", "2"]
    bridge = row(out, "bridge-7")
    assert bridge[1].endswith("s ago") and bridge[2:] == ["31", "0", "0", "0"]
    # device errors: name, when, last error, and the junk it sent by reason
    errors = out.split("device errors", 1)[1]
    when, error = row(errors, "pump-3")[1:]
    assert when.endswith("s ago") and error == "simulated timeout: device did not answer"
    assert "rejected: bad_crc 3, truncated 1" in errors
    assert "bridge-7" not in errors
    assert result.stderr == ""


def test_buffer_inspect_lists_the_next_batches(filled: Path) -> None:
    result = runner.invoke(cli.app, ["buffer", "inspect", "-c", str(filled)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert row(out, "evicted")[1] == "50 readings in 1 batches"
    assert row(out, "payload bytes held")[1].endswith("of 1000")
    assert len(row(out, "stream id")[1]) >= 16
    assert "next 5 batches to send" in out
    # sending order: alarm, events, telemetry; seq, lane, readings, bytes, created, span, note
    lines = [_split(line) for line in out.splitlines()]
    rows = [[c.strip() for c in cells] for cells in lines if len(cells) == 7]
    body = [r for r in rows if r[0].isdigit()]
    assert [(r[0], r[1], r[2]) for r in body] == [
        ("2", "alarm", "1"),
        ("4", "event", "3"),
        ("6", "event", "2"),
        ("1", "telemetry", "5"),
        ("3", "telemetry", "7"),
    ]
    assert body[0][5:] == ["", "high raised"]
    assert body[3][5] == "4.0 s" and body[4][5] == "3.0 s"
    assert body[2][6].startswith("undecodable:")
    assert body[1][6] == ""

    limited = runner.invoke(cli.app, ["buffer", "inspect", "-c", str(filled), "--limit", "2"])
    assert limited.exit_code == 0, limited.output
    assert "next 2 batches to send" in limited.stdout


def test_status_of_a_buffer_the_agent_never_wrote(tmp_path: Path) -> None:
    Buffer(tmp_path / "buf.db", capacity_bytes=10_000).close()
    result = runner.invoke(cli.app, ["status", "-c", str(write_config(tmp_path))])
    assert result.exit_code == 0, result.output
    assert row(result.stdout, "agent")[1] == "not running (last seen never)"
    assert row(result.stdout, "uplink")[1] == "unknown"
    for lane in ("alarm", "event", "telemetry"):
        assert row(result.stdout, lane)[1:5] == ["0", "0", "0", "never"]


def test_status_without_buffer_file_exits_2(tmp_path: Path) -> None:
    config = write_config(tmp_path, buffer="missing/buf.db")
    for args in (["status"], ["buffer", "inspect"]):
        result = runner.invoke(cli.app, [*args, "-c", str(config)])
        assert result.exit_code == 2, result.output
        assert "no buffer database yet" in result.stderr
        assert str(tmp_path / "missing" / "buf.db") in result.stderr
        assert result.stdout == ""
    assert not (tmp_path / "missing").exists()  # status did not create anything


def test_status_of_a_corrupt_buffer_exits_2_with_a_message(tmp_path: Path) -> None:
    (tmp_path / "buf.db").write_bytes(b"this is not an sqlite database, " * 64)
    config = write_config(tmp_path)
    for args in (["status"], ["buffer", "inspect"]):
        result = runner.invoke(cli.app, [*args, "-c", str(config)])
        assert result.exit_code == 2, result.output
        assert "not a usable buffer" in result.stderr
        assert "Traceback" not in result.output
    assert (tmp_path / "buf.db").read_bytes().startswith(b"this is not")  # left alone


def test_malformed_config_exits_1_listing_the_problems(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[gateway]\nid = "gw bad"\n[uplink]\nbroker = "mqtt://h"\nwindow = 0\n',
        encoding="utf-8",
    )
    for args in (["status"], ["buffer", "inspect"], ["run"]):
        result = runner.invoke(cli.app, [*args, "-c", str(path)])
        assert result.exit_code == 1, (args, result.output)
        assert "gateway.id" in result.stderr
        assert "uplink.window" in result.stderr
        assert "2 problems found" in result.stderr
        assert result.stdout == ""


def test_missing_config_exits_2(tmp_path: Path) -> None:
    for args in (["status"], ["buffer", "inspect"], ["run"]):
        result = runner.invoke(cli.app, [*args, "-c", str(tmp_path / "nope.toml")])
        assert result.exit_code == 2, (args, result.output)
        assert "file not found" in result.stderr


def empty_stats(**counters: int) -> BufferStats:
    """The stats of an empty buffer, with the given counters."""
    return BufferStats(
        lanes={lane: LaneStats(0, 0, 0, None) for lane in Lane},
        total_bytes=0,
        capacity_bytes=100,
        evicted_points=0,
        evicted_messages=0,
        last_ack_ms=None,
        appended_points=0,
        acked_points=0,
        **counters,
    )


def test_render_status_running_stale_and_stopped() -> None:
    stats = empty_stats()
    now = 1_700_000_000_000

    def agent_cell(state: dict[str, object]) -> str:
        console = Console(width=250, record=True, file=io.StringIO())
        console.print(render_status(stats, state, now_ms=now))
        return row(console.export_text(), "agent")[1]

    assert agent_cell({"agent": snapshot(now - 2000)}) == "running"
    assert agent_cell({"agent": snapshot(now - 600_000)}) == "not running (last seen 10.0 min ago)"
    assert (
        agent_cell({"agent": snapshot(now - 3 * 3600_000)}) == "not running (last seen 3.0 h ago)"
    )
    # the last snapshot of a graceful stop is recent, but the agent is gone
    stopped = snapshot(now - 1000, uplink_state="stopped", state="stopped")
    assert agent_cell({"agent": stopped}) == "stopped (last seen 1.0 s ago)"
    assert agent_cell({"agent": {**snapshot(now), "uplink": None}}) == "running"


def test_render_status_ages_are_measured_when_shown() -> None:
    # the snapshot holds times; how long ago is worked out by the reader, a minute later
    now = 1_700_000_000_000
    taken = now - 60_000
    console = Console(width=250, record=True, file=io.StringIO())
    console.print(render_status(empty_stats(), {"agent": snapshot(taken)}, now_ms=now))
    text = console.export_text()
    assert row(text, "status written")[1] == "60.0 s ago (every 5 s)"
    assert row(text, "bridge-7")[1] == "61.0 s ago"  # last success, 1 s before the snapshot
    errors = text.split("device errors", 1)[1]
    assert row(errors, "pump-3")[1:] == ["60.5 s ago", "simulated timeout: device did not answer"]


def test_render_status_wraps_errors_at_80_columns() -> None:
    now = 1_700_000_000_000
    state = snapshot(now)
    long_error = (
        "192.168.10.40:502 unit 3: no answer within 1.0 s to a read of input registers "
        "10..17 after 2 retries; exception 0x0B (gateway target device failed to respond)"
    )
    devices = state["devices"]
    assert isinstance(devices, dict)
    devices["pump-3"]["last_error"] = long_error
    devices["kiosk-7-climate-sensor"] = {**devices["bridge-7"], "last_error": "no advertisement"}
    state["tasks"] = {
        "uplink": {
            "state": "backoff",
            "failures": 3,
            "last_error": "BufferWriteError: ack failed: database or disk is full (SQLITE_FULL)",
            "last_failure_ms": now - 1000,
        }
    }
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(render_status(empty_stats(), {"agent": state}, now_ms=now))
    text = console.export_text()
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines), text
    assert "…" not in text  # nothing cut: names, ages and counts whole, words wrapped
    errors = text.split("device errors", 1)[1]
    # the error's lines, read down its cell, are the error
    cells = [_split(line) for line in errors.splitlines()]
    error_text = " ".join(c[-1].strip() for c in cells if len(c) == 3 and c[-1].strip())
    assert long_error in error_text
    assert row(text, "kiosk-7-climate-sensor")[1] == "1.0 s ago"
    assert "(SQLITE_FULL)" in text


def test_render_status_shows_failed_tasks_with_when() -> None:
    stats = empty_stats(seq_skipped=1024, unclean_starts=1)
    now = 1_700_000_000_000
    tasks = {
        "uplink": {
            "state": "running",
            "failures": 2,
            "last_error": "BufferWriteError: ack failed: SQLITE_FULL",
            "last_failure_ms": now - 30_000,
            "restarts": 2,
        },
        "flush": {"state": "running", "failures": 0, "last_error": None, "restarts": 0},
    }
    console = Console(width=250, record=True, file=io.StringIO())
    console.print(render_status(stats, {"agent": {**snapshot(now), "tasks": tasks}}, now_ms=now))
    text = console.export_text()
    cells = row(text, "uplink")  # the first "uplink" row is the agent's uplink state
    failed = [line for line in text.splitlines() if "SQLITE_FULL" in line]
    assert len(failed) == 1 and "30.0 s ago" in failed[0] and " 2 " in failed[0], cells
    assert "flush" not in text.split("tasks that failed")[1].split("devices")[0]
    # the caption wraps to the table's width
    assert "1 unclean stops (1024 sequence numbers skipped)" in " ".join(text.split())


# -- help texts ----------------------------------------------------------------------------


def test_render_status_shows_the_last_reload() -> None:
    now = 1_700_000_000_000

    def reload_cell(record: dict[str, object]) -> str:
        console = Console(width=250, record=True, file=io.StringIO())
        console.print(render_status(empty_stats(), {"agent": snapshot(now), "reload": record}, now))
        return row(console.export_text(), "last reload")[1]

    diff = {
        "added": ["d"],
        "removed": ["b"],
        "changed": ["c"],
        "unchanged": ["a", "e"],
        "uplink_changed": False,
        "stages_kept": 2,
        "stages_reset": 1,
        "restart_needed": [],
        "restarted": [],
    }
    applied = {"ts_ms": now - 3000, "ok": True, "source": "sighup", "version": "v7", "diff": diff}
    assert reload_cell(applied) == (
        "3.0 s ago (sighup) applied version v7: added d; removed b; changed c; "
        "2 devices untouched; stage state kept for 2 points, reset for 1"
    )
    refused = {
        "ts_ms": now - 1000,
        "ok": False,
        "source": "sighup",
        "error": "gateway.toml: devices[0].poll: must be >= 10ms, got -1s\nsecond problem",
    }
    assert reload_cell(refused) == (
        "1.0 s ago (sighup) refused: gateway.toml: devices[0].poll: must be >= 10ms, got -1s "
        "(and 1 more problems)"
    )


def test_reload_without_a_running_agent_exits_3(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    Buffer(tmp_path / "buf.db", capacity_bytes=10_000).close()  # never ran
    result = runner.invoke(cli.app, ["reload", "-c", str(config)])
    assert result.exit_code == 3, result.output
    assert "no agent is running on this buffer" in result.stderr


def test_reload_of_an_invalid_config_exits_1_and_signals_nothing(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[gateway]\nid = "gw bad"\n[uplink]\nbroker = "mqtt://h"\n')
    result = runner.invoke(cli.app, ["reload", "-c", str(path)])
    assert result.exit_code == 1, result.output
    assert "gateway.id" in result.stderr and "1 problem found" in result.stderr


def test_demo_and_ingest_help() -> None:
    demo = runner.invoke(cli.app, ["demo", "--help"])
    assert demo.exit_code == 0, demo.output
    assert "--duration" in demo.stdout and "simulated street block" in demo.stdout
    ingest = runner.invoke(cli.app, ["ingest", "--help"])
    assert ingest.exit_code == 0, ingest.output
    for option in ("--broker", "--db", "--group", "--prefix", "--client-id", "--session-expiry"):
        assert option in ingest.stdout
    missing = runner.invoke(cli.app, ["ingest"])
    assert missing.exit_code == 2
    assert "--broker" in missing.output
    bad = runner.invoke(cli.app, ["demo", "--duration", "0"])
    assert bad.exit_code == 2  # min=1


# -- run -------------------------------------------------------------------------------------

DEVICES = (
    '[[devices]]\nname = "dev-a"\ndriver = "sim"\npoll = "50ms"\nseed = 1\n'
    '[[devices.points]]\nname = "level"\nbase = 5.0\nresolution = 0.1\n'
    '[[devices.points]]\nname = "temp"\nbase = 20.0\n'
    '[[devices]]\nname = "dev-dead"\ndriver = "sim"\npoll = "50ms"\nfail_probability = 1.0\n'
    '[[devices.points]]\nname = "x"\n'
)


def test_run_with_unreachable_broker_buffers_and_stops_on_sigterm(tmp_path: Path) -> None:
    config = write_config(tmp_path, devices=DEVICES)
    log = tmp_path / "agent.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "run", "-c", str(config), "--json-logs"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=tmp_path,
        )
        try:
            deadline = time.monotonic() + 30
            # running: the uplink has failed at least twice (it keeps retrying)
            while log.read_text().count("uplink down, retrying") < 2:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            time.sleep(0.3)  # a few polls of dev-a
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    entries = [orjson.loads(line) for line in log.read_text().splitlines()]
    msgs = [e["msg"] for e in entries]
    assert msgs[0] == "agent started" and msgs[-1] == "agent stopped"
    down = next(e for e in entries if e["msg"] == "uplink down, retrying")
    assert down["level"] == "warning" and "refused" in down["error"].lower()

    # a graceful stop flushed what was read into the buffer: nothing was sent
    with Buffer.open_readonly(tmp_path / "buf.db") as buf:
        stats = buf.stats()
        state = buf.get_state()
    read = entries[-1]["read"]
    assert read > 0 and stats.appended_points == read == entries[-1]["sent"]
    assert stats.lanes[Lane.TELEMETRY].points == read and stats.acked_points == 0
    agent = state["agent"]
    assert agent["uplink"]["state"] == "stopped"
    assert agent["devices"]["dev-a"]["readings"] == read
    dead = agent["devices"]["dev-dead"]
    assert dead["errors"] == dead["polls"] > 0 and dead["readings"] == 0

    result = runner.invoke(cli.app, ["status", "-c", str(config)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert row(out, "agent")[1].startswith("stopped (last seen")
    assert row(out, "uplink")[1].startswith("stopped — last error:")
    assert row(out, "telemetry")[2] == str(read)
    errors = out.split("device errors", 1)[1]
    assert row(errors, "dev-dead")[2] == "simulated timeout: device did not answer"
    assert row(out, "dev-a")[3] == "0"
