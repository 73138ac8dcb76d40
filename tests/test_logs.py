"""Structured logging: the throttle, the JSON and the console formatter."""

from __future__ import annotations

import io
import logging
import time
import types
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from common import logs
from common.logs import ConsoleFormatter, JsonFormatter, Throttle

# -- Throttle ----------------------------------------------------------------------------


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """common.logs' monotonic clock, set by assigning now[0]."""
    now = [1000.0]
    fake_time = types.SimpleNamespace(
        monotonic=lambda: now[0], strftime=time.strftime, localtime=time.localtime
    )
    monkeypatch.setattr(logs, "time", fake_time)
    return now


def test_throttle_first_passes_then_suppresses_then_reports_count(clock: list[float]) -> None:
    t = Throttle(interval=10.0)
    assert t.ready("dead-sensor") == 1
    clock[0] += 1.0
    assert t.ready("dead-sensor") is None
    clock[0] += 5.0
    assert t.ready("dead-sensor") is None
    clock[0] += 3.9  # 9.9 s after the line that passed
    assert t.ready("dead-sensor") is None
    clock[0] += 0.1  # the interval is over: this one plus the three suppressed
    assert t.ready("dead-sensor") == 4
    clock[0] += 1.0
    assert t.ready("dead-sensor") is None  # a new interval started with the report
    clock[0] += 10.0
    assert t.ready("dead-sensor") == 2
    clock[0] += 60.0
    assert t.ready("dead-sensor") == 1  # nothing suppressed in between


def test_throttle_keys_are_independent_and_counts_add_up(clock: list[float]) -> None:
    t = Throttle(interval=10.0)
    assert t.ready("full", 500) == 500
    assert t.ready("other") == 1  # another key is not held back
    clock[0] += 2.0
    assert t.ready("full", 200) is None
    assert t.ready("full", 300) is None
    assert t.ready("other") is None
    clock[0] += 10.0
    assert t.ready("full", 7) == 507  # readings, not lines
    assert t.ready("other") == 2


def test_throttle_real_clock_short_interval() -> None:
    t = Throttle(interval=0.05)
    assert t.ready("k") == 1
    assert t.ready("k") is None
    time.sleep(0.06)
    assert t.ready("k") == 2


# -- formatters ------------------------------------------------------------------------


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("citygw.test.logs")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        yield logger, stream, handler
    finally:
        logger.handlers.clear()
        logger.propagate = True


def test_json_formatter_one_object_with_extra_fields(
    capture: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, handler = capture
    handler.setFormatter(JsonFormatter())
    before = time.time()
    logger.warning(
        "device %s not answering",
        "pump-3",
        extra={"device": "pump-3", "errors": 4, "ratio": 0.5, "path": Path("/var/x")},
    )
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    entry = orjson.loads(lines[0])
    assert entry == {
        "ts": entry["ts"],
        "level": "warning",
        "logger": "citygw.test.logs",
        "msg": "device pump-3 not answering",
        "device": "pump-3",
        "errors": 4,
        "ratio": 0.5,
        "path": "/var/x",  # not JSON: written as str()
    }
    assert before - 0.01 <= entry["ts"] <= time.time() + 0.01


def test_json_formatter_exception_and_no_extras(
    capture: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, handler = capture
    handler.setFormatter(JsonFormatter())
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        logger.exception("flush failed")
    logger.info("plain")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # the traceback stays inside the one JSON line
    first, second = (orjson.loads(line) for line in lines)
    assert first["level"] == "error" and first["msg"] == "flush failed"
    assert "RuntimeError: boom" in first["exc"] and "Traceback" in first["exc"]
    assert set(second) == {"ts", "level", "logger", "msg"}


def test_console_formatter_shows_extra_fields(
    capture: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, handler = capture
    handler.setFormatter(ConsoleFormatter())
    logger.warning("uplink down, retrying", extra={"broker": "mqtt://h:1883", "retry_in_s": 1.5})
    logger.info("no extras")
    first, second = stream.getvalue().splitlines()
    assert "WARNING" in first and "citygw.test.logs: uplink down, retrying" in first
    assert first.endswith("[broker=mqtt://h:1883 retry_in_s=1.5]")
    assert second.endswith("citygw.test.logs: no extras")
    assert "[" not in second
