"""Downlink commands from the platform (`<prefix>/<gateway>/down/cmd`) and their
responses (`up/resp`).

A command is a JSON object; today the only operation is a write:

    {"id": "c-42", "op": "write", "point": "pump-3/setpoint", "value": 12.5}

It is checked against the config before anything touches a device: the point must
exist, be marked `writable`, and the value must be a finite number within the point's
declared `min`/`max`. The response names the command and says what happened:

    {"id": "c-42", "ok": true, "ts": 1764400000000}
    {"id": "c-43", "ok": false, "error": "point 'pump-3/level' is not writable", "ts": ...}

Parsing and checking are sans-I/O (bytes in, a command or a refusal out); the agent
runs the write through the point's driver.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import orjson

from drivers.base import PointSpec

MAX_COMMAND_BYTES = 4096


class CommandRefused(ValueError):
    """A command that is malformed or not allowed; the message says why."""

    def __init__(self, message: str, command_id: str | None = None) -> None:
        super().__init__(message)
        self.command_id = command_id


@dataclass(frozen=True, slots=True)
class WriteCommand:
    id: str
    point: PointSpec
    value: float


def parse_command(payload: bytes, points: dict[str, PointSpec]) -> WriteCommand:
    """The checked command, or CommandRefused naming what is wrong."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandRefused(f"command larger than {MAX_COMMAND_BYTES} bytes")
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise CommandRefused(f"command is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise CommandRefused("command must be a JSON object")
    cid = obj.get("id")
    if not isinstance(cid, str) or not cid or len(cid) > 128:
        raise CommandRefused("command needs an 'id': a string of 1 to 128 characters")
    op = obj.get("op")
    if op != "write":
        raise CommandRefused(f"unknown op {op!r}; allowed: write", cid)
    key = obj.get("point")
    if not isinstance(key, str) or key not in points:
        raise CommandRefused(f"unknown point {key!r} (give 'device/point')", cid)
    point = points[key]
    if not point.writable:
        raise CommandRefused(f"point {key!r} is not writable", cid)
    value = obj.get("value")
    if isinstance(value, bool):
        value = float(value)
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise CommandRefused(f"value for {key!r} must be a finite number, got {value!r}", cid)
    if (point.min is not None and value < point.min) or (
        point.max is not None and value > point.max
    ):
        raise CommandRefused(
            f"value {value:g} for {key!r} is outside its declared range "
            f"[{_bound(point.min)}, {_bound(point.max)}]",
            cid,
        )
    return WriteCommand(cid, point, float(value))


def _bound(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"


def response(command_id: str | None, error: str | None = None) -> bytes:
    body: dict[str, Any] = {"id": command_id, "ok": error is None}
    if error is not None:
        body["error"] = error
    body["ts"] = time.time_ns() // 1_000_000
    return orjson.dumps(body)
