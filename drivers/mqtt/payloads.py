"""Payload parsers (sans-I/O): the bytes of one MQTT message and a point's settings in,
``(value, timestamp ms or None)`` out, or a ``PayloadError`` with a short reason.

Formats: ``number`` (ASCII number, or true/false/on/off), ``json`` (a value at a path),
``csv`` (a column of the first line), ``binary`` (a fixed-size number at a byte offset).
Then value = raw * scale + offset. The timestamp is None (use the reception time) unless
the point takes it from the payload. Nothing here raises anything but PayloadError.
"""

from __future__ import annotations

import math
import struct
from datetime import UTC, datetime

import orjson

from drivers.mqtt.settings import MqttPointSettings, PathStep

__all__ = ["REASONS", "PayloadError", "parse"]

#: every reason a PayloadError may carry
REASONS = (
    "not_a_number",
    "bad_json",
    "missing_path",
    "not_numeric",
    "bad_csv",
    "missing_column",
    "short_binary",
    "missing_timestamp",
    "bad_timestamp",
)

_BOOL_WORDS = {"true": 1.0, "on": 1.0, "false": 0.0, "off": 0.0}
_STRUCT = {"u8": "B", "i8": "b", "u16": "H", "i16": "h", "u32": "I", "i32": "i", "f32": "f",
           "f64": "d"}  # fmt: skip
#: plausible timestamps: 2000-01-01 .. 2100-01-01 (catches seconds given as ms and so on)
_TS_MIN_MS = 946_684_800_000
_TS_MAX_MS = 4_102_444_800_000
#: "auto": a number above this is in milliseconds (1e11 s is the year 5138)
_AUTO_MS_ABOVE = 1e11


class PayloadError(ValueError):
    """A payload that does not give a reading; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _number(text: str, reason: str) -> float:
    """An ASCII number or bool word; PayloadError(reason) otherwise."""
    word = text.strip().lower()
    if word in _BOOL_WORDS:
        return _BOOL_WORDS[word]
    if not word or not word.isascii() or "_" in word:
        raise PayloadError(reason, repr(text[:40]))
    try:
        return float(word)
    except ValueError:
        raise PayloadError(reason, repr(text[:40])) from None


def _numeric(value: object) -> float:
    """A JSON value as a number: numbers, bools, numeric strings."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError:
            raise PayloadError("not_numeric", "number too large") from None
    if isinstance(value, str):
        return _number(value, "not_numeric")
    raise PayloadError("not_numeric", f"found {type(value).__name__}")


def _at(doc: object, path: tuple[PathStep, ...], reason: str) -> object:
    node = doc
    for step in path:
        if isinstance(step, int):
            if not isinstance(node, list) or step >= len(node):
                raise PayloadError(reason, _show_path(path))
            node = node[step]
        else:
            if not isinstance(node, dict) or step not in node:
                raise PayloadError(reason, _show_path(path))
            node = node[step]
    return node


def _show_path(path: tuple[PathStep, ...]) -> str:
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else step)
    return out


def _timestamp(raw: object, fmt: str) -> int:
    """Milliseconds since the epoch from a payload's timestamp field."""
    if isinstance(raw, str) and fmt in ("auto", "iso8601"):
        try:
            number: float | None = float(raw) if fmt == "auto" and raw.strip() else None
        except ValueError:
            number = None
        if number is None:
            try:
                dt = datetime.fromisoformat(raw.strip())
            except ValueError:
                raise PayloadError("bad_timestamp", repr(raw[:40])) from None
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=UTC)
            try:
                ms = round(dt.timestamp() * 1000)
            except (OverflowError, OSError, ValueError):
                raise PayloadError("bad_timestamp", repr(raw[:40])) from None
            return _plausible(ms, raw)
        raw = number
    if fmt == "iso8601":
        raise PayloadError("bad_timestamp", f"expected ISO 8601 text, got {raw!r}"[:80])
    if isinstance(raw, bool):
        raise PayloadError("bad_timestamp", repr(raw))
    if isinstance(raw, str):
        text = raw
        try:
            raw = float(text)
        except ValueError:
            raise PayloadError("bad_timestamp", repr(text[:40])) from None
    if not isinstance(raw, int | float):
        raise PayloadError("bad_timestamp", f"found {type(raw).__name__}")
    try:
        seconds = fmt == "epoch_s" or (fmt == "auto" and abs(raw) < _AUTO_MS_ABOVE)
        value = float(raw) * 1000.0 if seconds else float(raw)
    except OverflowError:
        raise PayloadError("bad_timestamp", "number too large") from None
    if not math.isfinite(value):
        raise PayloadError("bad_timestamp", repr(raw))
    return _plausible(round(value), raw)


def _plausible(ms: int, raw: object) -> int:
    if not _TS_MIN_MS <= ms <= _TS_MAX_MS:
        raise PayloadError(
            "bad_timestamp", f"{raw!r} is not between 2000 and 2100 (check timestamp_format)"
        )
    return ms


def parse(payload: bytes, spec: MqttPointSettings) -> tuple[float, int | None]:
    """The reading in `payload` as `spec` describes it: (value, timestamp ms or None)."""
    ts: int | None = None
    fmt = spec.format
    if fmt == "number":
        try:
            text = payload.decode("ascii")
        except UnicodeDecodeError:
            raise PayloadError("not_a_number", repr(payload[:40])) from None
        raw = _number(text, "not_a_number")
    elif fmt == "json":
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise PayloadError("bad_json", repr(payload[:40])) from None
        raw = _numeric(_at(doc, spec.json_path, "missing_path"))
        ts_path = spec.timestamp_path
        if ts_path is not None:
            ts = _timestamp(_at(doc, ts_path, "missing_timestamp"), spec.timestamp_format)
    elif fmt == "csv":
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise PayloadError("bad_csv", "not UTF-8 text") from None
        line = next((ln for ln in text.splitlines() if ln.strip()), None)
        if line is None:
            raise PayloadError("bad_csv", "empty")
        cells = line.split(spec.delimiter)
        column = spec.column or 0
        if column >= len(cells):
            raise PayloadError("missing_column", f"column {column} of {len(cells)}")
        raw = _number(cells[column].strip().strip('"'), "not_a_number")
        if isinstance(spec.timestamp, int):
            if spec.timestamp >= len(cells):
                raise PayloadError("missing_timestamp", f"column {spec.timestamp}")
            ts = _timestamp(cells[spec.timestamp].strip().strip('"'), spec.timestamp_format)
    else:  # binary
        code = _STRUCT[spec.datatype or "u8"]
        order = ">" if spec.endian == "big" else "<"
        try:
            (number,) = struct.unpack_from(order + code, payload, spec.byte_offset)
        except struct.error:
            raise PayloadError(
                "short_binary",
                f"{len(payload)} bytes, need {spec.byte_offset + struct.calcsize(code)}",
            ) from None
        raw = float(number)
    return raw * spec.scale + spec.offset, ts
