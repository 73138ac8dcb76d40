"""Config models of the ``mqtt`` driver: the keys of a ``driver = "mqtt"`` device table
(its connection to the site broker) and of its point tables (topic and payload format),
besides the generic ones in agent/config.py."""

from __future__ import annotations

import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from common.mqtt_url import BrokerAddress, BrokerUrl, ClientId
from common.units import Duration, Offset, Scale, physical_unit
from drivers.mqtt.topics import TopicPattern, TopicPatternError

Format = Literal["number", "json", "csv", "binary"]
BinaryType = Literal["u8", "i8", "u16", "i16", "u32", "i32", "f32", "f64"]
TimestampFormat = Literal["auto", "epoch_s", "epoch_ms", "iso8601"]
#: what a point does when its payload's timestamp is missing or unusable
TimestampFallback = Literal["reject", "reception"]

#: what a retained message (the broker's copy of an older publish) becomes
RetainedPolicy = Literal["ignore", "once"]
MqttVersion = Literal["5", "3.1.1"]
#: one step of a JSON path: a key or a list index
PathStep = str | int

#: error type agent/config.py shows as the plain message (at ctx["key"] when set)
_AT_KEY = "citygw_at_key"
_STEP = re.compile(r"([^.\[\]]*)((?:\[\d+\])*)")
_INDEX = re.compile(r"\[(\d+)\]")


def _problem(message: str, key: str = "") -> PydanticCustomError:
    return PydanticCustomError(_AT_KEY, "{message}", {"key": key, "message": message})


def parse_path(text: str) -> tuple[PathStep, ...]:
    """``data.values[2].pm25`` -> ``("data", "values", 2, "pm25")``; ValueError if malformed."""
    steps: list[PathStep] = []
    if not text or text != text.strip():
        raise ValueError(f"{text!r} is not a JSON path; write keys with dots: 'data.pm25'")
    for i, segment in enumerate(text.split(".")):
        m = _STEP.fullmatch(segment)
        if m is None or (not m.group(1) and not (i == 0 and m.group(2))):
            raise ValueError(
                f"{text!r} is not a JSON path; write keys with dots and list indexes in "
                "brackets: 'data.pm25', 'values[2]', 'data.sensors[0].value'"
            )
        if m.group(1):
            steps.append(m.group(1))
        steps.extend(int(n) for n in _INDEX.findall(m.group(2)))
    return tuple(steps)


@lru_cache(maxsize=64)
def zone(name: str) -> ZoneInfo:
    """The IANA time zone `name` (cached); ValueError with a hint if unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r}; give an IANA name such as 'Europe/Berlin' or 'UTC'"
        ) from None


def _check_timezone(value: str | None) -> str | None:
    if value is not None:
        try:
            zone(value)
        except ValueError as exc:
            raise _problem(str(exc)) from None
    return value


def _check_file(value: Path | None, info: ValidationInfo) -> Path | None:
    if value is None:
        return None
    try:
        path = value.expanduser()
    except RuntimeError:  # "~user/..." of a user without a home (found by fuzzing)
        raise _problem(f"cannot expand {str(value)!r}: no such user's home") from None
    relative = not path.is_absolute()
    if relative:
        base = (info.context or {}).get("base_dir") or Path.cwd()
        path = Path(base) / path
    if not path.is_file():
        hint = " (relative to the config file's folder)" if relative else ""
        raise _problem(f"file not found: {value}{hint}")
    return path


class MqttDeviceSettings(BaseModel):
    """Keys a ``driver = "mqtt"`` device accepts: its connection to the site broker
    (devices with the same broker, credentials and client id share one connection)."""

    model_config = ConfigDict(extra="forbid")

    broker: BrokerUrl
    username: str | None = None
    password: SecretStr | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    #: "" -> "citygw-mqtt-<random>" (a clean session: the id need not be stable)
    client_id: ClientId = ""
    qos: Literal[0, 1, 2] = 1
    keepalive: Duration = Field(60.0, ge=5.0, le=65535.0)
    #: put in front of every point's topic: "sensors/street-7" + "air/pm25"
    topic_prefix: str = ""
    #: what a {device} capture must equal (default: the device's name)
    device_value: str | None = None
    #: IANA time zone of the payload timestamps that carry no offset (default UTC);
    #: a point's own `timezone` overrides it
    timezone: str | None = None

    @field_validator("timezone")
    @classmethod
    def _check_device_timezone(cls, v: str | None) -> str | None:
        return _check_timezone(v)

    #: "5" (subscription identifiers tell overlapping filters' copies apart) or "3.1.1"
    #: for a broker that does not speak MQTT 5 (filters covered by another are dropped)
    mqtt_version: MqttVersion = "5"
    #: retained messages (sent at every (re)connect, possibly long dead): "ignore" them,
    #: or take each retained value "once" (quality uncertain unless the payload dates it)
    retained: RetainedPolicy = "ignore"
    #: topic filters (behind topic_prefix) whose messages are expected and not wanted:
    #: neither read by this device's points nor counted as unmatched
    ignore_topics: list[str] = Field(default_factory=list, max_length=100)
    #: the device's availability (LWT) topic, behind topic_prefix: its words set the
    #: device's health ("tele/{device}/LWT", "zigbee2mqtt/{device}/availability")
    availability_topic: str | None = None
    #: in a JSON availability payload, where the word is (default: "state")
    availability_path: str | None = None
    #: the words that say online / offline (compared ignoring case)
    availability_online: list[str] = Field(default_factory=lambda: ["online"], min_length=1)
    availability_offline: list[str] = Field(default_factory=lambda: ["offline"], min_length=1)

    _availability_path: tuple[PathStep, ...] = PrivateAttr(default=("state",))

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _check_files(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return _check_file(v, info)

    @field_validator("topic_prefix")
    @classmethod
    def _check_prefix(cls, v: str) -> str:
        if v:
            try:
                TopicPattern(v)
            except TopicPatternError as exc:
                raise _problem(str(exc)) from None
            if v.rstrip("/").endswith("#"):
                raise _problem("topic_prefix must not end with '#' (points' topics follow it)")
        return v

    @field_validator("device_value")
    @classmethod
    def _check_device_value(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or "+" in v or "#" in v):
            raise _problem(f"{v!r} cannot be a topic level; no '/', '+' or '#', not empty")
        return v

    @field_validator("availability_online", "availability_offline")
    @classmethod
    def _check_words(cls, v: list[str]) -> list[str]:
        if any(not w.strip() for w in v):
            raise _problem("a word must not be empty")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> MqttDeviceSettings:
        fields = self.model_fields_set
        if self.availability_topic is None:
            for key in ("availability_path", "availability_online", "availability_offline"):
                if key in fields:
                    raise _problem(f"{key} needs availability_topic (the LWT topic)", key)
        if self.availability_path is not None:
            try:
                self._availability_path = parse_path(self.availability_path)
            except ValueError as exc:
                raise _problem(str(exc), "availability_path") from None
        both = self.online_words & self.offline_words
        if both:
            raise _problem(
                f"{sorted(both)[0]!r} is both an online and an offline word", "availability_offline"
            )
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            given = "cert_file" if missing == "key_file" else "key_file"
            raise _problem(
                f"required because {given} is set; give both cert_file and key_file or neither",
                missing,
            )
        if self.password is not None and self.username is None:
            raise _problem("a password needs a username", "username")
        return self

    @property
    def address(self) -> BrokerAddress:
        return BrokerAddress.parse(self.broker)

    @property
    def online_words(self) -> frozenset[str]:
        return frozenset(w.strip().casefold() for w in self.availability_online)

    @property
    def offline_words(self) -> frozenset[str]:
        return frozenset(w.strip().casefold() for w in self.availability_offline)

    @property
    def availability_json_path(self) -> tuple[PathStep, ...]:
        return self._availability_path


class MqttPointSettings(BaseModel):
    """Where a point's readings arrive (topic) and how to read them (format)."""

    model_config = ConfigDict(extra="forbid")

    #: pattern with + # and captures {device} {point} (and any other {name})
    topic: str
    #: what a {point} capture must equal (default: the point's name)
    point_value: str | None = None
    format: Format = "number"
    #: json: where the value is ("data.pm25", "values[2]")
    path: str | None = None
    #: csv: 0-based column of the value, and the separator
    column: int | None = Field(None, ge=0, le=1000)
    delimiter: str = ","
    #: binary: where the value starts, its type and byte order
    byte_offset: int = Field(0, ge=0, le=65535)
    datatype: BinaryType | None = None
    endian: Literal["big", "little"] = "big"
    #: value = raw * scale + offset
    scale: Scale = 1.0
    offset: Offset = 0.0
    #: "reception" (when the gateway got it), a JSON path (json) or a column (csv)
    timestamp: str | int = "reception"
    timestamp_format: TimestampFormat = "auto"
    #: IANA time zone of a payload timestamp without an offset (default: the device's,
    #: else UTC)
    timezone: str | None = None
    #: a missing or unusable payload timestamp: "reject" the reading, or stamp it with
    #: the "reception" time, quality UNCERTAIN (counted as timestamp_fallback)
    timestamp_fallback: TimestampFallback = "reject"
    #: words the payload may carry instead of a number, matched ignoring case and
    #: surrounding spaces: { Online = 1, Offline = 0 }; nan = a missing value (BAD)
    values: dict[str, float] | None = None
    #: json: the path may be absent from a message (no reading, not an error)
    optional: bool = False
    #: json: where the payload states the value's unit ("TempUnit"); the value is
    #: converted to the point's `unit`, or refused if it cannot be
    unit_path: str | None = None

    _path: tuple[PathStep, ...] = PrivateAttr(default=())
    _ts_path: tuple[PathStep, ...] | None = PrivateAttr(default=None)
    _unit_path: tuple[PathStep, ...] | None = PrivateAttr(default=None)
    _words: dict[str, float] = PrivateAttr(default_factory=dict)

    @field_validator("topic")
    @classmethod
    def _check_topic(cls, v: str) -> str:
        try:
            TopicPattern(v)
        except TopicPatternError as exc:
            raise _problem(str(exc)) from None
        return v

    @field_validator("point_value")
    @classmethod
    def _check_point_value(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or "+" in v or "#" in v):
            raise _problem(f"{v!r} cannot be a topic level; no '/', '+' or '#', not empty")
        return v

    @field_validator("timezone")
    @classmethod
    def _check_point_timezone(cls, v: str | None) -> str | None:
        return _check_timezone(v)

    @field_validator("values")
    @classmethod
    def _check_values(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return None
        if not v:
            raise _problem("values needs at least one word, e.g. { Online = 1, Offline = 0 }")
        seen: dict[str, str] = {}
        for word, number in v.items():
            key = word.strip().casefold()
            if not key:
                raise _problem("an empty word cannot be matched; remove it")
            if key in seen:
                raise _problem(f"{seen[key]!r} and {word!r} are the same word (case is ignored)")
            seen[key] = word
            if math.isinf(number):
                raise _problem(f"{word!r} = {number}: give a finite number, or nan for missing")
        return v

    @field_validator("path", "unit_path")
    @classmethod
    def _check_path(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                parse_path(v)
            except ValueError as exc:
                raise _problem(str(exc)) from None
        return v

    @field_validator("delimiter")
    @classmethod
    def _check_delimiter(cls, v: str) -> str:
        if len(v) != 1 or v in '\r\n"':
            raise _problem(f"delimiter must be one character (',', ';', '\\t'...), got {v!r}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _no_bool_timestamp(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("timestamp"), bool):
            raise _problem("expected 'reception', a JSON path or a CSV column", "timestamp")
        return data

    @model_validator(mode="after")
    def _check_format(self) -> MqttPointSettings:
        given = self.model_fields_set
        fmt = self.format
        only = {
            "path": "json",
            "column": "csv",
            "delimiter": "csv",
            "byte_offset": "binary",
            "datatype": "binary",
            "endian": "binary",
            "optional": "json",
            "unit_path": "json",
        }
        for key, owner in only.items():
            if key in given and fmt != owner:
                raise _problem(f"{key} is only for format = {owner!r}; this point has {fmt!r}", key)
        if fmt == "binary" and "values" in given:
            raise _problem("values (words) is for text formats, not binary payloads", "values")
        if fmt == "json" and self.path is None:
            raise _problem(
                "format = 'json' needs path: where the value is in the document, e.g. "
                "'data.pm25' or 'values[2]'",
                "path",
            )
        if fmt == "csv" and self.column is None:
            raise _problem(
                "format = 'csv' needs column: the value's column, 0 = the first", "column"
            )
        if fmt == "binary" and self.datatype is None:
            raise _problem(
                "format = 'binary' needs datatype: u8, i8, u16, i16, u32, i32, f32 or f64",
                "datatype",
            )
        ts = self.timestamp
        if isinstance(ts, int):
            if fmt != "csv":
                raise _problem(
                    "a column number as timestamp is only for format = 'csv'; "
                    "use 'reception' or, for json, a path",
                    "timestamp",
                )
            if ts < 0:
                raise _problem(f"a column number starts at 0, got {ts}", "timestamp")
            self._ts_path = ()
        elif ts != "reception":
            if fmt != "json":
                raise _problem(
                    f"timestamp {ts!r}: a JSON path is only for format = 'json'; use "
                    "'reception'" + (" or a column number" if fmt == "csv" else ""),
                    "timestamp",
                )
            try:
                self._ts_path = parse_path(ts)
            except ValueError as exc:
                raise _problem(str(exc), "timestamp") from None
        else:
            for key in ("timestamp_format", "timezone", "timestamp_fallback"):
                if key in given:
                    raise _problem(
                        f"{key} is only for a timestamp taken from the payload "
                        "(timestamp = a JSON path or a CSV column)",
                        key,
                    )
        if self.path is not None:
            self._path = parse_path(self.path)
        if self.unit_path is not None:
            self._unit_path = parse_path(self.unit_path)
        if self.values is not None:
            self._words = {w.strip().casefold(): n for w, n in self.values.items()}
        return self

    @property
    def json_path(self) -> tuple[PathStep, ...]:
        return self._path

    @property
    def timestamp_path(self) -> tuple[PathStep, ...] | None:
        """None: reception time; a JSON path (json); () for a CSV column (csv)."""
        return self._ts_path

    @property
    def unit_json_path(self) -> tuple[PathStep, ...] | None:
        return self._unit_path

    @property
    def zone(self) -> ZoneInfo | None:
        """The point's own time zone (None: the device's, else UTC)."""
        return zone(self.timezone) if self.timezone else None

    @property
    def words(self) -> dict[str, float]:
        """`values` with each word trimmed and case-folded (how payload words are matched)."""
        return self._words


def check_point_unit(point: MqttPointSettings, unit: str) -> str | None:
    """Why a point's `unit` does not suit its settings (None: it does): a unit taken from
    the payload needs a configured unit that it can be converted to."""
    if point.unit_path is not None and physical_unit(unit) is None:
        return (
            f"unit_path needs the point's unit to be one citygw converts to (°C, °F, K, hPa, "
            f"mmHg, m/s, km/h, W, kWh, V, A...); got {unit!r}"
        )
    return None
