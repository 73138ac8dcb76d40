"""Payload parsers (sans-I/O): the bytes of one MQTT message and a point's settings in,
a ``Reading`` (value, timestamp ms or None, quality, note) out, None when an optional
path is absent, or a ``PayloadError`` with a short reason.

Formats: ``number`` (ASCII number, or true/false/on/off), ``json`` (a value at a path),
``csv`` (a column of the first line), ``binary`` (a fixed-size number at a byte offset).
A word of the point's ``values`` is its value as given; any other value = raw * scale +
offset, then converted from the payload's unit (``unit_path``) to the point's. A device's
"no value" (``nan``, ``inf`` in any case and form, JSON ``null``, a float NaN, a mapped
word = nan) is a missing value (NaN) of quality BAD, never a number. The timestamp is
None (use the reception time) unless the point takes it from the payload; a timestamp
without an offset is wall time in the point's zone (default UTC). Nothing here raises
anything but PayloadError.
"""

from __future__ import annotations

import math
import re
import struct
from datetime import UTC, datetime, tzinfo
from typing import NamedTuple

import orjson

from common.units import convert
from drivers.mqtt.settings import MqttPointSettings, PathStep
from drivers.scale import engineering
from native.batch import BAD, GOOD, UNCERTAIN

__all__ = ["NOTES", "REASONS", "PayloadError", "Reading", "parse"]

#: every reason a PayloadError may carry
REASONS = (
    "not_a_number",
    "bad_json",
    "missing_path",
    "not_numeric",
    "unmapped_word",
    "bad_csv",
    "missing_column",
    "short_binary",
    "missing_unit",
    "bad_unit",
    "missing_timestamp",
    "bad_timestamp",
)
#: every note a kept reading may carry (counted by the driver, the reading is stored):
#: its timestamp was unusable and the reception time stands in (UNCERTAIN), or its local
#: time occurs twice (clocks going back) and the earlier instant was taken (UNCERTAIN)
NOTES = ("timestamp_fallback", "timestamp_ambiguous")

_BOOL_WORDS = {"true": 1.0, "on": 1.0, "false": 0.0, "off": 0.0}
_STRUCT = {"u8": "B", "i8": "b", "u16": "H", "i16": "h", "u32": "I", "i32": "i", "f32": "f",
           "f64": "d"}  # fmt: skip
#: plausible timestamps: 2000-01-01 .. 2100-01-01 (catches seconds given as ms and so on)
_TS_MIN_MS = 946_684_800_000
_TS_MAX_MS = 4_102_444_800_000
#: "auto": a number above this is in milliseconds (1e11 s is the year 5138)
_AUTO_MS_ABOVE = 1e11
#: bare nan / inf / infinity (any case, signed) outside JSON strings: invalid JSON that
#: C firmwares print for a failed sensor; quoted so the document parses (only on failure)
_BARE_NONFINITE = re.compile(
    r'"(?:[^"\\]|\\.)*"|(?<![\w.])([-+]?(?:nan|inf(?:inity)?))(?![\w.])', re.IGNORECASE
)


#: a timestamp field the payload lacks (the fallback may stand in)
_ABSENT = object()


class Reading(NamedTuple):
    """What one payload says for one point."""

    value: float
    timestamp_ms: int | None = None
    quality: int = GOOD
    #: one of NOTES: the reading is kept but its time is not the device's own
    note: str | None = None


class PayloadError(ValueError):
    """A payload that does not give a reading; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _number(text: str, reason: str) -> float:
    """An ASCII number or bool word (nan / inf come out as they are); PayloadError(reason)
    otherwise."""
    word = text.strip().lower()
    if word in _BOOL_WORDS:
        return _BOOL_WORDS[word]
    if not word or not word.isascii() or "_" in word:
        raise PayloadError(reason, repr(text[:40]))
    try:
        return float(word)
    except ValueError:
        raise PayloadError(reason, repr(text[:40])) from None


def _text_value(text: str, spec: MqttPointSettings, reason: str) -> tuple[float, bool]:
    """(value, is_word): a word of the point's `values`, else a number; an unmapped word
    names itself and the words the point knows."""
    words = spec.words
    if words:
        word = words.get(text.strip().casefold())
        if word is not None:
            return word, True
        try:
            return _number(text, reason), False
        except PayloadError:
            known = ", ".join(spec.values or ())
            raise PayloadError("unmapped_word", f"{text[:40]!r} is not one of: {known}") from None
    return _number(text, reason), False


def _json_value(value: object, spec: MqttPointSettings) -> tuple[float, bool]:
    """A JSON value as (number, is_word): numbers, bools, strings holding a number or a
    word of `values`; null is a missing value."""
    if value is None:
        return math.nan, False
    if isinstance(value, bool):
        return (1.0 if value else 0.0), False
    if isinstance(value, int | float):
        try:
            return float(value), False
        except OverflowError:
            raise PayloadError("not_numeric", "number too large") from None
    if isinstance(value, str):
        return _text_value(value, spec, "not_numeric")
    raise PayloadError("not_numeric", f"found {type(value).__name__}")


def _loads(payload: bytes) -> object:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        pass
    # a failed sensor's bare nan/inf (invalid JSON): quote it and try once more
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadError("bad_json", repr(payload[:40])) from None
    quoted = _BARE_NONFINITE.sub(
        lambda m: m.group(0) if m.group(1) is None else f'"{m.group(1)}"', text
    )
    if quoted != text:
        try:
            return orjson.loads(quoted)
        except orjson.JSONDecodeError:
            pass
    raise PayloadError("bad_json", repr(payload[:40]))


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


def _local_ms(dt: datetime, zone: tzinfo, raw: str) -> tuple[int, bool]:
    """A wall time in `zone` as (ms, ambiguous). A time the clocks skip (the hour lost
    when DST starts) never happened: bad_timestamp. A time that occurs twice (the hour
    repeated when DST ends) is taken as the earlier instant (fold = 0), and said so."""
    first = dt.replace(tzinfo=zone, fold=0)
    try:
        ms = round(first.timestamp() * 1000)
        if first.utcoffset() == dt.replace(tzinfo=zone, fold=1).utcoffset():
            return ms, False
        back = first.astimezone(UTC).astimezone(zone).replace(tzinfo=None)
    except (OverflowError, OSError, ValueError):  # year 1 or 9999 near the edge
        raise PayloadError("bad_timestamp", repr(raw[:40])) from None
    if back != dt:
        raise PayloadError("bad_timestamp", f"{raw[:40]!r} does not exist in {zone} (DST gap)")
    return ms, True


def _timestamp(raw: object, fmt: str, zone: tzinfo | None) -> tuple[int, bool]:
    """(milliseconds since the epoch, ambiguous local time) from a payload's timestamp."""
    if isinstance(raw, str) and fmt in ("auto", "iso8601"):
        try:
            number: float | None = float(raw) if fmt == "auto" and raw.strip() else None
        except ValueError:
            number = None
        if number is None:
            ambiguous = False
            try:
                dt = datetime.fromisoformat(raw.strip())
            except ValueError:
                raise PayloadError("bad_timestamp", repr(raw[:40])) from None
            if dt.tzinfo is None and zone is not None:
                ms, ambiguous = _local_ms(dt, zone, raw)
            else:
                try:
                    ms = round(dt.replace(tzinfo=dt.tzinfo or UTC).timestamp() * 1000)
                except (OverflowError, OSError, ValueError):
                    raise PayloadError("bad_timestamp", repr(raw[:40])) from None
            return _plausible(ms, raw), ambiguous
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
    return _plausible(round(value), raw), False


def _plausible(ms: int, raw: object) -> int:
    if not _TS_MIN_MS <= ms <= _TS_MAX_MS:
        raise PayloadError(
            "bad_timestamp", f"{raw!r} is not between 2000 and 2100 (check timestamp_format)"
        )
    return ms


def _unit_of(doc: object, spec: MqttPointSettings) -> str | None:
    path = spec.unit_json_path
    if path is None:
        return None
    unit = _at(doc, path, "missing_unit")
    if not isinstance(unit, str) or not unit.strip():
        raise PayloadError("bad_unit", f"{_show_path(path)} is {unit!r}, not a unit"[:80])
    return unit


def parse(
    payload: bytes, spec: MqttPointSettings, *, unit: str = "", zone: tzinfo | None = None
) -> Reading | None:
    """The reading in `payload` as `spec` describes it, None if its optional path is
    absent. `unit` is the point's configured unit (the target of unit_path), `zone` the
    device's time zone of timestamps without an offset (the point's own `timezone` wins;
    neither: UTC)."""
    ts_raw: object = _ABSENT
    has_ts = False
    payload_unit: str | None = None
    word = False
    fmt = spec.format
    if fmt == "number":
        try:
            text = payload.decode("ascii")
        except UnicodeDecodeError:
            raise PayloadError("not_a_number", repr(payload[:40])) from None
        raw, word = _text_value(text, spec, "not_a_number")
    elif fmt == "json":
        doc = _loads(payload)
        try:
            node = _at(doc, spec.json_path, "missing_path")
        except PayloadError:
            if spec.optional:
                return None
            raise
        raw, word = _json_value(node, spec)
        if not word:
            payload_unit = _unit_of(doc, spec)
        ts_path = spec.timestamp_path
        if ts_path is not None:
            has_ts = True
            try:
                ts_raw = _at(doc, ts_path, "missing_timestamp")
            except PayloadError:
                if spec.timestamp_fallback == "reject":
                    raise
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
        raw, word = _text_value(cells[column].strip().strip('"'), spec, "not_a_number")
        if isinstance(spec.timestamp, int):
            has_ts = True
            if spec.timestamp < len(cells):
                ts_raw = cells[spec.timestamp].strip().strip('"')
            elif spec.timestamp_fallback == "reject":
                raise PayloadError("missing_timestamp", f"column {spec.timestamp}")
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
    if word:
        value = raw
    elif fmt == "binary" and isinstance(number, int):
        # an integer field with a decimal scale divides: 2301 × 0.1 gives 230.1, not
        # 230.10000000000002 (drivers/scale.py)
        value = engineering(spec.scale, spec.offset, True)(number)
    else:
        value = raw * spec.scale + spec.offset
    if payload_unit is not None and math.isfinite(value):
        try:
            value = convert(value, payload_unit, unit)
        except ValueError as exc:
            raise PayloadError("bad_unit", str(exc)) from None
    quality = GOOD
    if not math.isfinite(value):
        value, quality = math.nan, BAD
    ts: int | None = None
    note: str | None = None
    if has_ts:
        try:
            if ts_raw is _ABSENT:
                raise PayloadError("missing_timestamp")
            ts, ambiguous = _timestamp(ts_raw, spec.timestamp_format, spec.zone or zone)
        except PayloadError:
            if spec.timestamp_fallback == "reject":
                raise
            note = "timestamp_fallback"
        else:
            note = "timestamp_ambiguous" if ambiguous else None
        if note is not None and quality == GOOD:
            quality = UNCERTAIN
    return Reading(value, ts, quality, note)
