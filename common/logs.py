"""Structured logging: one JSON object per line for log shippers, readable lines for a
technician's terminal, the same lines with a syslog priority prefix for journald (a
service under systemd: no timestamp of our own, the journal keeps its own), and a
throttle so that a flood of identical warnings (a dead sensor, a full buffer) becomes
one line per interval with a count.

Both formatters mask secrets before a line is written (common/redact.py): URL passwords and
``password=…`` in the message, in `extra` values (nested too) and in exception text, and
the whole value of an `extra` key named like a secret (``password``, ``token``, …). Code
still shows URLs through `redact`; this is the net for what slips through."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import orjson

from common.redact import MASK, is_secret_key, redact

# Attributes every LogRecord has; anything else came in through `extra=`.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _masked(key: str, value: Any) -> Any:
    if is_secret_key(key):
        return MASK
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _masked(str(k), v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked("", v) for v in value]
    if isinstance(value, tuple):
        return tuple(_masked("", v) for v in value)
    return value  # numbers as they are; other objects are masked as text when shown


def _text(value: object) -> str:
    return redact(str(value))


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: _masked(k, v) for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
            **_fields(record),
        }
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        # dataclasses too go through `_text` (their repr), so a password field is masked
        return orjson.dumps(entry, default=_text, option=orjson.OPT_PASSTHROUGH_DATACLASS).decode()


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} "
        line += f"{record.levelname:<7} {_line(record)}"
        if record.exc_info:
            line += "\n" + redact(self.formatException(record.exc_info))
        return line


def _line(record: logging.LogRecord) -> str:
    """``logger: message [key=value ...]``."""
    extra = " ".join(f"{k}={_text(v)}" for k, v in _fields(record).items())
    line = f"{record.name}: {redact(record.getMessage())}"
    return f"{line} [{extra}]" if extra else line


#: syslog priorities (sd-daemon(3)'s <N> prefixes) of the logging levels
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6}


class JournalFormatter(logging.Formatter):
    """For stderr connected to journald: each line starts with its priority (``<3>``
    error ... ``<7>`` debug; journald's SyslogLevelPrefix= takes it off and files the
    entry under it, so `journalctl -p warning` works) and carries no timestamp. A
    traceback's lines are each prefixed too: journald makes one entry per line."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_PRIORITY.get(record.levelno, 7)}>"
        lines = [_line(record)]
        if record.exc_info:
            lines += redact(self.formatException(record.exc_info)).splitlines()
        return "\n".join(prefix + line for line in lines)


def journal_stderr() -> bool:
    """Whether stderr is journald's stream: $JOURNAL_STREAM names its device and inode
    (systemd.exec(5)); a child whose stderr was redirected inherits the variable only."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (ValueError, OSError):  # unset, malformed, or no real stderr
        return False


def setup_logging(level: str = "INFO", json: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter
    if json:
        formatter = JsonFormatter()
    elif journal_stderr():
        formatter = JournalFormatter()
    else:
        formatter = ConsoleFormatter()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # paho/aiomqtt log every packet at DEBUG; keep them at WARNING unless asked.
    if level.upper() != "DEBUG":
        logging.getLogger("mqtt").setLevel(logging.WARNING)


class Throttle:
    """Lets one log line through per `interval` seconds per key and counts the rest,
    so the line that passes can say how many were suppressed."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def ready(self, key: str, count: int = 1) -> int | None:
        """Returns the number of events to report (this one plus suppressed ones),
        or None if the line should be suppressed now."""
        now = time.monotonic()
        last = self._last.get(key)
        pending = self._suppressed.get(key, 0) + count
        if last is not None and now - last < self.interval:
            self._suppressed[key] = pending
            return None
        self._last[key] = now
        self._suppressed[key] = 0
        return pending
