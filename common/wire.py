"""The wire format between a gateway and the platform, sans-I/O: bytes in, objects out.

Topics (``prefix`` is configurable, default ``citygw``)::

    <prefix>/<gateway>/up/batch   telemetry and event lanes (binary envelope)
    <prefix>/<gateway>/up/alarm   alarm lane (binary envelope)
    <prefix>/<gateway>/up/meta    retained, JSON point registry, the gateway's software
                                  and devices' locations (see `encode_meta`)
    <prefix>/<gateway>/state      retained text "online" / "offline" (last will "offline")
    <prefix>/<gateway>/up/stats   retained JSON, the buffer's counters and the devices'
                                  information and health (see `encode_stats`)

Uplink envelope: a fixed 32-byte big-endian header, then the codec body::

    offset size field
    0      2    magic b"CG"
    2      1    envelope version (1)
    3      1    lane: 0 alarm, 1 event, 2 telemetry
    4      16   stream id: raw bytes of a uuid, created once by the gateway's buffer
    20     8    seq (uint64), per stream
    28     4    n_points (uint32), readings in the body
    32     ...  codec payload (`native.codec`)

The platform deduplicates on (gateway, stream, seq). Every parser here raises only
`WireError` (a `ValueError`) on bad input, whatever the bytes, and what it accepts every
platform store can keep: no string with a NUL (PostgreSQL text refuses it) or a lone
surrogate (not UTF-8), ids and names within what a PostgreSQL index entry holds, integers
within their columns (all bigint, or wider than the wire's range), a `location` that
serialises back to JSON.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from native.stages import SEVERITIES, AlarmEvent

DEFAULT_PREFIX: Final = "citygw"

MAGIC: Final = b"CG"
VERSION: Final = 1
HEADER: Final = struct.Struct(">2sBB16sQI")
HEADER_SIZE: Final = HEADER.size  # 32

LANE_ALARM: Final = 0
LANE_EVENT: Final = 1
LANE_TELEMETRY: Final = 2
LANES: Final = frozenset({LANE_ALARM, LANE_EVENT, LANE_TELEMETRY})
LANE_NAMES: Final = {LANE_ALARM: "alarm", LANE_EVENT: "event", LANE_TELEMETRY: "telemetry"}

# topic kinds, i.e. what follows "<prefix>/<gateway>/"
KIND_BATCH: Final = "up/batch"
KIND_ALARM: Final = "up/alarm"
KIND_META: Final = "up/meta"
KIND_STATE: Final = "state"
KIND_CMD: Final = "down/cmd"  # platform -> gateway commands
KIND_RESP: Final = "up/resp"  # their answers
KIND_STATS: Final = "up/stats"  # retained JSON: the buffer's counters (evictions, backlog)
KINDS: Final = frozenset(
    {KIND_BATCH, KIND_ALARM, KIND_META, KIND_STATE, KIND_CMD, KIND_RESP, KIND_STATS}
)

STATE_ONLINE: Final = b"online"
STATE_OFFLINE: Final = b"offline"

META_VERSION: Final = 1
MAX_U32: Final = 2**32 - 1
MAX_U64: Final = 2**64 - 1

#: the longest gateway id (any topic level), in UTF-8 bytes: every store keys on it, and a
#: PostgreSQL btree entry holds at most 2704 bytes, (gateway, point key) together
MAX_ID_BYTES: Final = 256
#: the longest meta string (point key, device, name, unit, ..., site) or alarm rule id
MAX_TEXT_BYTES: Final = 1024
#: a meta's `location`: at most this deep and this large as JSON (orjson writes at most
#: 254 levels, so a deeper one would decode here and then fail in the store)
MAX_LOCATION_DEPTH: Final = 16
MAX_LOCATION_BYTES: Final = 64 * 1024

_STREAM_RE: Final = re.compile(r"[0-9a-f]{32}")
#: a gateway id (`gateway.id`), which is also its MQTT username: no '.', so the broker's
#: role users (role.ingest, ...) can never be taken for a gateway (deploy/mosquitto)
GATEWAY_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")


class WireError(ValueError):
    """Input that is not a valid citygw topic, envelope or meta message."""


class UnknownVersionError(WireError):
    """An envelope of a format version this build does not know (a newer gateway)."""


# -- topics ---------------------------------------------------------------------------------


def check_text(value: str, what: str, limit: int = MAX_TEXT_BYTES) -> None:
    """A string every store can keep, or WireError naming `what` is wrong with it."""
    if "\x00" in value:
        raise WireError(f"{what} contains a NUL character, which the platform cannot store")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise WireError(f"{what} contains a lone surrogate (not valid Unicode)") from None
    if size > limit:
        raise WireError(f"{what} is {size} bytes long (UTF-8), at most {limit} allowed")


def _check_level(value: str, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise WireError(f"{what} must be a non-empty string")
    if any(c in value for c in "/+#\x00"):
        raise WireError(f"{what} {value[:64]!r} must not contain '/', '+', '#' or NUL")
    check_text(value, what, MAX_ID_BYTES)


def check_gateway_id(gateway: str) -> None:
    """WireError unless `gateway` is a valid gateway id (GATEWAY_ID)."""
    _check_level(gateway, "gateway id")
    if not GATEWAY_ID.fullmatch(gateway):
        raise WireError(
            f"gateway id {gateway[:64]!r} is not valid: 1 to 64 letters, digits, '-' or '_'"
        )


def _check_prefix(prefix: str) -> None:
    if not isinstance(prefix, str) or not prefix:
        raise WireError("topic prefix must be a non-empty string")
    for level in prefix.split("/"):
        _check_level(level, "topic prefix level")


def topic(prefix: str, gateway: str, kind: str) -> str:
    """`topic("citygw", "gw-1", "up/batch")` -> ``"citygw/gw-1/up/batch"``."""
    _check_prefix(prefix)
    check_gateway_id(gateway)
    if kind not in KINDS:
        raise WireError(f"unknown topic kind {kind!r}; expected one of {sorted(KINDS)}")
    return f"{prefix}/{gateway}/{kind}"


def batch_topic(gateway: str, prefix: str = DEFAULT_PREFIX) -> str:
    return topic(prefix, gateway, KIND_BATCH)


def alarm_topic(gateway: str, prefix: str = DEFAULT_PREFIX) -> str:
    return topic(prefix, gateway, KIND_ALARM)


def meta_topic(gateway: str, prefix: str = DEFAULT_PREFIX) -> str:
    return topic(prefix, gateway, KIND_META)


def state_topic(gateway: str, prefix: str = DEFAULT_PREFIX) -> str:
    return topic(prefix, gateway, KIND_STATE)


def lane_topic(lane: int, gateway: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The topic a lane is published on: alarms on up/alarm, the rest on up/batch."""
    if lane not in LANES:
        raise WireError(f"unknown lane {lane!r}")
    return topic(prefix, gateway, KIND_ALARM if lane == LANE_ALARM else KIND_BATCH)


def ingest_filters(prefix: str = DEFAULT_PREFIX, group: str | None = None) -> list[str]:
    """What an ingest worker subscribes to: the batch, alarm, meta, stats and state topics
    of every gateway (not up/resp: command answers are for whoever sent the command). In
    a group: the batch and alarm topics shared (``$share/<group>/<prefix>/+/up/batch`` and
    ``.../up/alarm``: each uplink goes to one worker), and ``up/meta``, ``up/stats`` and
    ``state`` unshared, because a broker never sends retained messages to a shared
    subscription and every worker should know every gateway (the upserts are idempotent)."""
    _check_prefix(prefix)
    retained = [f"{prefix}/+/{kind}" for kind in (KIND_META, KIND_STATS, KIND_STATE)]
    if not group:
        return [f"{prefix}/+/{KIND_BATCH}", f"{prefix}/+/{KIND_ALARM}", *retained]
    _check_level(group, "shared subscription group")
    return [
        f"$share/{group}/{prefix}/+/{KIND_BATCH}",
        f"$share/{group}/{prefix}/+/{KIND_ALARM}",
        *retained,
    ]


def parse_topic(topic: str, prefix: str = DEFAULT_PREFIX) -> tuple[str, str]:
    """``"citygw/gw-1/up/batch"`` -> ``("gw-1", "up/batch")``; anything else: WireError,
    a gateway segment that is not a valid gateway id too (a broker role user's own
    topics, ``citygw/role.ingest/...``, are nobody's uplinks)."""
    if not isinstance(topic, str):
        raise WireError("topic must be a string")
    head = prefix + "/"
    if not topic.startswith(head):
        raise WireError(f"topic {topic[:200]!r} does not start with prefix {prefix!r}")
    gateway, sep, kind = topic[len(head) :].partition("/")
    if not sep or kind not in KINDS:
        raise WireError(f"topic {topic[:200]!r} is not a citygw uplink/state topic")
    check_gateway_id(gateway)
    return gateway, kind


def lane_matches_kind(lane: int, kind: str) -> bool:
    """Alarms travel on up/alarm, events and telemetry on up/batch."""
    if kind == KIND_ALARM:
        return lane == LANE_ALARM
    if kind == KIND_BATCH:
        return lane in (LANE_EVENT, LANE_TELEMETRY)
    return False


# -- envelope -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Envelope:
    lane: int
    stream: str  # 32 lowercase hex digits
    seq: int
    n_points: int
    body: bytes

    @property
    def lane_name(self) -> str:
        return LANE_NAMES.get(self.lane, str(self.lane))


def stream_bytes(stream_id_hex: str) -> bytes:
    """A uuid as 32 hex digits (dashes allowed) -> its 16 raw bytes."""
    if not isinstance(stream_id_hex, str):
        raise WireError("stream id must be a hex string")
    s = stream_id_hex.replace("-", "").lower()
    if not _STREAM_RE.fullmatch(s):
        raise WireError(f"stream id {stream_id_hex[:64]!r} is not 32 hex digits")
    return bytes.fromhex(s)


def wrap(lane: int, stream_id_hex: str, seq: int, n_points: int, body: bytes) -> bytes:
    """Header + codec body, ready to publish."""
    lane = int(lane)
    if lane not in LANES:
        raise WireError(f"unknown lane {lane}")
    if not 0 <= seq <= MAX_U64:
        raise WireError(f"seq {seq} out of uint64 range")
    if not 0 <= n_points <= MAX_U32:
        raise WireError(f"n_points {n_points} out of uint32 range")
    return HEADER.pack(MAGIC, VERSION, lane, stream_bytes(stream_id_hex), seq, n_points) + bytes(
        body
    )


def unwrap(data: bytes | bytearray | memoryview) -> Envelope:
    """Parse an uplink envelope. Raises WireError (only) on anything that is not one."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"envelope must be bytes, not {type(data).__name__}")
    raw = bytes(data)
    if len(raw) < HEADER_SIZE:
        raise WireError(f"envelope too short: {len(raw)} bytes, header needs {HEADER_SIZE}")
    magic, version, lane, stream, seq, n_points = HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise WireError(f"bad envelope magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise UnknownVersionError(
            f"unknown envelope version {version} (this platform understands {VERSION})"
        )
    if lane not in LANES:
        raise WireError(f"unknown lane {lane} in envelope")
    return Envelope(lane, stream.hex(), seq, n_points, raw[HEADER_SIZE:])


# -- meta -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PointMeta:
    id: int
    key: str  # "<device>/<name>"
    device: str
    name: str
    unit: str = ""
    driver: str = ""
    type: str = "float"


#: device -> {"lat": ..., "lon": ...} (WGS 84 degrees)
DeviceLocations = dict[str, dict[str, float]]


@dataclass(frozen=True, slots=True)
class Meta:
    gateway: str
    stream: str
    points: tuple[PointMeta, ...]
    site: str | None = None
    location: dict[str, Any] | None = None
    v: int = META_VERSION
    #: the gateway's citygw version; None: a gateway before issue 14 does not send it
    software: str | None = None
    #: the devices that have a location in the gateway's config (None: an older gateway)
    locations: DeviceLocations | None = None
    #: the config the gateway runs: {"version": ..., "hash": "sha256:<hex>"} (None: a
    #: gateway before issue 15)
    config: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.software is not None:
            extra["software"] = self.software
        if self.locations is not None:
            extra["locations"] = self.locations
        if self.config is not None:
            extra["config"] = self.config
        return {
            "v": self.v,
            "gateway": self.gateway,
            "site": self.site,
            "location": self.location,
            "stream": self.stream,
            "points": [
                {
                    "id": p.id,
                    "key": p.key,
                    "device": p.device,
                    "name": p.name,
                    "unit": p.unit,
                    "driver": p.driver,
                    "type": p.type,
                }
                for p in self.points
            ],
            **extra,
        }


def _str(obj: Mapping[str, Any], field: str, where: str, *, optional: bool = False) -> str:
    if field not in obj:
        if optional:
            return ""
        raise WireError(f"meta {where}: missing field {field!r}")
    value = obj[field]
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise WireError(f"meta {where}: field {field!r} must be a string")
    check_text(value, f"meta {where}: field {field!r}")
    return value


def _point(obj: Any, i: int) -> PointMeta:
    where = f"points[{i}]"
    if not isinstance(obj, Mapping):
        raise WireError(f"meta {where}: must be an object")
    if "id" not in obj:
        raise WireError(f"meta {where}: missing field 'id'")
    pid = obj["id"]
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid <= MAX_U32:
        raise WireError(f"meta {where}: 'id' must be an integer in 0..2**32-1")
    key = _str(obj, "key", where)
    if not key:
        raise WireError(f"meta {where}: 'key' must not be empty")
    return PointMeta(
        id=pid,
        key=key,
        device=_str(obj, "device", where),
        name=_str(obj, "name", where),
        unit=_str(obj, "unit", where, optional=True),
        driver=_str(obj, "driver", where, optional=True),
        type=_str(obj, "type", where, optional=True) or "float",
    )


def meta_from_dict(obj: Any) -> Meta:
    """Validate a decoded meta object. Unknown fields are ignored (forward compatible):
    a platform before issue 14 ignores `software` and `locations`, and this one takes a
    meta without them (an older gateway) as None."""
    if not isinstance(obj, Mapping):
        raise WireError("meta must be a JSON object")
    if "v" not in obj:
        raise WireError("meta: missing field 'v'")
    if obj["v"] != META_VERSION or isinstance(obj["v"], bool):
        raise WireError(f"meta: unknown version {obj['v']!r} (this platform understands 1)")
    gateway = _str(obj, "gateway", "")
    try:
        _check_level(gateway, "gateway id")
    except WireError as e:
        raise WireError(f"meta: {e}") from None
    stream = _str(obj, "stream", "")
    stream = stream_bytes(stream).hex()
    site = obj.get("site")
    if site is not None and not isinstance(site, str):
        raise WireError("meta: 'site' must be a string or null")
    if site is not None:
        check_text(site, "meta: field 'site'")
    location = obj.get("location")
    if location is not None and not isinstance(location, Mapping):
        raise WireError("meta: 'location' must be an object or null")
    if location is not None:
        _check_location(location)
    software = obj.get("software")
    if software is not None:
        if not isinstance(software, str):
            raise WireError("meta: 'software' must be a string or null")
        check_text(software, "meta: field 'software'")
    locations = obj.get("locations")
    if locations is not None:
        locations = _locations(locations)
    config = obj.get("config")
    if config is not None:
        config = _config_identity(config)
    if "points" not in obj:
        raise WireError("meta: missing field 'points'")
    raw_points = obj["points"]
    if not isinstance(raw_points, list):
        raise WireError("meta: 'points' must be a list")
    points = tuple(_point(p, i) for i, p in enumerate(raw_points))
    if len({p.id for p in points}) != len(points):
        raise WireError("meta: duplicate point id")
    if len({p.key for p in points}) != len(points):
        raise WireError("meta: duplicate point key")
    return Meta(
        gateway=gateway,
        stream=stream,
        points=points,
        site=site,
        location=dict(location) if location is not None else None,
        software=software,
        locations=locations,
        config=config,
    )


def _config_identity(obj: Any) -> dict[str, str]:
    if not isinstance(obj, Mapping):
        raise WireError("meta: 'config' must be an object or null")
    out = {}
    for field in ("version", "hash"):
        value = obj.get(field)
        if not isinstance(value, str) or not 0 < len(value) <= 80:
            raise WireError(f"meta: config.{field} must be a string of 1 to 80 characters")
        check_text(value, f"meta: field 'config.{field}'")
        out[field] = value
    return out


def _coordinate(obj: Mapping[str, Any], field: str, limit: float, where: str) -> float:
    v = obj.get(field)
    if isinstance(v, bool) or not isinstance(v, int | float) or not -limit <= v <= limit:
        raise WireError(f"{where}: {field!r} must be a number in -{limit:g}..{limit:g}")
    return float(v)


def _locations(value: Any) -> DeviceLocations:
    """A meta's `locations`: device -> {lat, lon} as the gateway config validates a
    device's `location` (other keys of a location are ignored, forward compatible)."""
    if not isinstance(value, Mapping):
        raise WireError("meta: 'locations' must be an object or null")
    out: DeviceLocations = {}
    for device, loc in value.items():
        if not isinstance(device, str) or not device:
            raise WireError(f"meta: a device in 'locations' ({device!r:.40}) is not a name")
        where = f"meta: locations[{device[:40]!r}]"
        check_text(device, where)
        if not isinstance(loc, Mapping):
            raise WireError(f"{where} must be an object")
        out[device] = {
            "lat": _coordinate(loc, "lat", 90.0, where),
            "lon": _coordinate(loc, "lon", 180.0, where),
        }
    return out


def _check_json(value: Any, where: str, depth: int) -> None:
    """Every string (keys too) storable, at most MAX_LOCATION_DEPTH levels of nesting."""
    if isinstance(value, str):
        check_text(value, where, MAX_LOCATION_BYTES)
    elif isinstance(value, Mapping | list | tuple):
        if depth >= MAX_LOCATION_DEPTH:
            raise WireError(f"{where} is nested deeper than {MAX_LOCATION_DEPTH} levels")
        if not isinstance(value, Mapping):
            for i, item in enumerate(value):
                _check_json(item, f"{where}[{i}]", depth + 1)
            return
        for key, item in value.items():
            if not isinstance(key, str):
                raise WireError(f"{where}: the key {key!r:.40} is not a string")
            check_text(key, f"{where}: a key", MAX_TEXT_BYTES)
            _check_json(item, f"{where}[{key[:40]!r}]", depth + 1)


def _check_location(location: Mapping[str, Any]) -> None:
    """A meta's free-form `location`: what the stores keep as JSON (jsonb refuses a NUL
    even escaped), and what serialises back within MAX_LOCATION_BYTES."""
    _check_json(location, "meta: 'location'", 0)
    try:
        size = len(orjson.dumps(location))
    except TypeError as e:  # a Python caller's value: not JSON, an int beyond 64 bits
        raise WireError(f"meta: 'location' is not JSON-serialisable: {e}") from None
    if size > MAX_LOCATION_BYTES:
        raise WireError(f"meta: 'location' is {size} bytes as JSON, at most {MAX_LOCATION_BYTES}")


def encode_meta(meta: Mapping[str, Any] | Meta) -> bytes:
    """Validate and serialise a meta message (JSON). Raises WireError if invalid."""
    if isinstance(meta, Meta):
        obj: Mapping[str, Any] = meta.to_dict()
    else:
        obj = meta
    meta_from_dict(obj)
    try:
        return orjson.dumps(obj)
    except TypeError as e:
        raise WireError(f"meta is not JSON-serialisable: {e}") from None


def decode_meta(data: bytes | bytearray | memoryview | str) -> Meta:
    """Parse and validate a meta message. Raises WireError (only) on bad input."""
    try:
        obj = orjson.loads(data)
    except (orjson.JSONDecodeError, TypeError) as e:
        raise WireError(f"meta is not valid JSON: {e}") from None
    return meta_from_dict(obj)


# -- alarms (the alarm lane's body) ---------------------------------------------------------
#
# JSON, because alarms are few and a person on the platform side may have to read one:
#   {"v": 1, "gateway": "gw-1", "events": [{"point": 12, "rule": "high", "severity":
#    "critical", "state": "raise", "ts": 1795938246112, "value": 3.7, "since": ...}]}
# "value" is null for NaN (a stale alarm has no reading). "since": when the condition
# began (raise) or when the alarm was raised (clear).
# "actions" (optional, left out when there are none, so an alarm-only body is what it was
# before rules existed): what the gateway's local rules did or were kept from doing,
#   [{"rule": "pump-on-flood", "ts": 1795938246112, "transition": "start", "action":
#     "write", "outcome": "done", "target": "pump/run", "value": 1.0, "written": 1.0,
#     "detail": "", "attempts": 1, "inputs": [{"name": "level", "point": "underpass/level",
#     "value": 0.83, "ts": 1795938246000, "quality": 0}]}]
# "value"/"written" (and an input's "value") null for NaN: none. A body may hold actions
# and no events. On the alarm lane the envelope's n_points counts events and actions.

ALARM_VERSION: Final = 1
_ALARM_STATES: Final = {"raise": True, "clear": False}
_SEVERITIES: Final = frozenset(SEVERITIES)
_INT64: Final = 2**63


#: a rule action's transition, action (""; none) and outcome
RULE_TRANSITIONS: Final = ("start", "stop", "override", "release")
RULE_ACTIONS: Final = ("write", "publish", "event", "")
RULE_OUTCOMES: Final = ("done", "dry_run", "suppressed", "failed")
#: the most inputs one rule action may carry
MAX_RULE_INPUTS: Final = 64
#: a rule input's quality: GOOD 0, BAD 1, UNCERTAIN 2, UNAVAILABLE 3 (native/batch.py)
MAX_RULE_QUALITY: Final = 3
#: the most write attempts an action may report
MAX_RULE_ATTEMPTS: Final = MAX_U32


@dataclass(frozen=True, slots=True)
class RuleInput:
    """What a rule saw of one of its inputs when it decided."""

    name: str  # the rule's name for the input, e.g. "level"
    point: str  # "device/point"
    value: float  # NaN: none
    ts_ms: int  # 0: never read
    quality: int  # 0 GOOD, 1 BAD, 2 UNCERTAIN, 3 UNAVAILABLE


@dataclass(frozen=True, slots=True)
class RuleAction:
    """An action a gateway's local rule took, or one an interlock or a manual override
    suppressed; it travels on the alarm lane (`encode_alarms`)."""

    rule: str  # the rule's id
    ts_ms: int  # gateway wall clock when it was decided/done
    transition: str  # "start" | "stop" | "override" | "release"
    # "write" | "publish" | "event" | "" (none: an override set/released, or a transition
    # suppressed before any action)
    action: str
    outcome: str  # "done" | "dry_run" | "suppressed" | "failed"
    target: str  # the point key written, the topic published, "" otherwise
    value: float  # the value to write (NaN: none)
    written: float  # the value read back after the write (NaN: none)
    detail: str  # why suppressed / the error / the event's text / who overrode
    inputs: tuple[RuleInput, ...]
    attempts: int = 1  # write attempts made


def _number(v: float) -> float | None:
    return v if math.isfinite(v) else None


def rule_input_dict(i: RuleInput) -> dict[str, Any]:
    """A rule input as its JSON object (the wire's, also what the platform stores)."""
    return {
        "name": i.name,
        "point": i.point,
        "value": _number(i.value),
        "ts": i.ts_ms,
        "quality": i.quality,
    }


def rule_action_dict(a: RuleAction) -> dict[str, Any]:
    return {
        "rule": a.rule,
        "ts": a.ts_ms,
        "transition": a.transition,
        "action": a.action,
        "outcome": a.outcome,
        "target": a.target,
        "value": _number(a.value),
        "written": _number(a.written),
        "detail": a.detail,
        "attempts": a.attempts,
        "inputs": [rule_input_dict(i) for i in a.inputs],
    }


def encode_alarms(
    gateway: str, events: Sequence[AlarmEvent], actions: Sequence[RuleAction] = ()
) -> bytes:
    body: dict[str, Any] = {
        "v": ALARM_VERSION,
        "gateway": gateway,
        "events": [
            {
                "point": e.point_id,
                "rule": e.rule,
                "severity": e.severity,
                "state": "raise" if e.raised else "clear",
                "ts": e.ts_ms,
                "value": e.value if math.isfinite(e.value) else None,
                "since": e.since_ms,
            }
            for e in events
        ],
    }
    if actions:
        body["actions"] = [rule_action_dict(a) for a in actions]
    return orjson.dumps(body)


def _int(obj: Mapping[str, Any], field: str, where: str, lo: int, hi: int) -> int:
    v = obj.get(field)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise WireError(f"{where or 'stats'}: {field!r} must be an integer in {lo}..{hi}")
    return v


def _alarm(obj: Any, i: int) -> AlarmEvent:
    where = f"events[{i}]"
    if not isinstance(obj, Mapping):
        raise WireError(f"alarm {where}: must be an object")
    rule, severity, state = obj.get("rule"), obj.get("severity"), obj.get("state")
    if not isinstance(rule, str) or not rule:
        raise WireError(f"alarm {where}: 'rule' must be a non-empty string")
    check_text(rule, f"alarm {where}: 'rule'")
    # a JSON list or object is unhashable: test the type before the membership
    if not isinstance(severity, str) or severity not in _SEVERITIES:
        raise WireError(f"alarm {where}: 'severity' must be one of {', '.join(SEVERITIES)}")
    if not isinstance(state, str) or state not in _ALARM_STATES:
        raise WireError(f"alarm {where}: 'state' must be 'raise' or 'clear'")
    value = obj.get("value")
    if value is None:
        value = math.nan
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise WireError(f"alarm {where}: 'value' must be a number or null")
    return AlarmEvent(
        point_id=_int(obj, "point", f"alarm {where}", 0, MAX_U32),
        rule=rule,
        severity=severity,
        raised=_ALARM_STATES[state],
        ts_ms=_int(obj, "ts", f"alarm {where}", -_INT64, _INT64 - 1),
        value=float(value),
        since_ms=_int(obj, "since", f"alarm {where}", -_INT64, _INT64 - 1),
    )


def _json_body(
    data: bytes | bytearray | memoryview, what: str, version: int
) -> tuple[Mapping[str, Any], str]:
    """(object, gateway) of a versioned JSON body (`what`: "alarms", "stats"), its
    version and its gateway string checked. Raises WireError."""
    try:
        obj = orjson.loads(data)
    except (orjson.JSONDecodeError, TypeError) as e:
        raise WireError(f"{what} are not valid JSON: {e}") from None
    if not isinstance(obj, Mapping):
        raise WireError(f"{what} must be a JSON object")
    if obj.get("v") != version or isinstance(obj.get("v"), bool):
        raise WireError(
            f"{what}: unknown version {obj.get('v')!r} (this platform understands {version})"
        )
    gateway = obj.get("gateway")
    if not isinstance(gateway, str):
        raise WireError(f"{what}: 'gateway' must be a string")
    check_text(gateway, f"{what}: 'gateway'", MAX_ID_BYTES)
    return obj, gateway


def _text(obj: Mapping[str, Any], field: str, where: str, *, empty: bool = True) -> str:
    v = obj.get(field)
    if not isinstance(v, str) or (not empty and not v):
        kind = "a string" if empty else "a non-empty string"
        raise WireError(f"{where}: {field!r} must be {kind}")
    check_text(v, f"{where}: {field!r}")
    return v


def _choice(obj: Mapping[str, Any], field: str, where: str, allowed: Sequence[str]) -> str:
    v = obj.get(field)
    # a JSON list or object is unhashable: test the type before the membership
    if not isinstance(v, str) or v not in allowed:
        raise WireError(f"{where}: {field!r} must be one of {', '.join(map(repr, allowed))}")
    return v


def _float_or_none(obj: Mapping[str, Any], field: str, where: str) -> float:
    """A number, or NaN for null; the field must be there."""
    v = obj.get(field, ...)
    if v is None:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise WireError(f"{where}: {field!r} must be a number or null")
    try:
        return float(v)
    except OverflowError:  # an integer beyond any double
        raise WireError(f"{where}: {field!r} is out of range") from None


def _rule_input(obj: Any, where: str) -> RuleInput:
    if not isinstance(obj, Mapping):
        raise WireError(f"{where}: must be an object")
    return RuleInput(
        name=_text(obj, "name", where, empty=False),
        point=_text(obj, "point", where, empty=False),
        value=_float_or_none(obj, "value", where),
        ts_ms=_int(obj, "ts", where, -_INT64, _INT64 - 1),
        quality=_int(obj, "quality", where, 0, MAX_RULE_QUALITY),
    )


def _rule_action(obj: Any, i: int) -> RuleAction:
    where = f"alarm actions[{i}]"
    if not isinstance(obj, Mapping):
        raise WireError(f"{where}: must be an object")
    inputs = obj.get("inputs")
    if not isinstance(inputs, list):
        raise WireError(f"{where}: 'inputs' must be a list")
    if len(inputs) > MAX_RULE_INPUTS:
        raise WireError(
            f"{where}: 'inputs' has {len(inputs)} entries, at most {MAX_RULE_INPUTS} allowed"
        )
    return RuleAction(
        rule=_text(obj, "rule", where, empty=False),
        ts_ms=_int(obj, "ts", where, -_INT64, _INT64 - 1),
        transition=_choice(obj, "transition", where, RULE_TRANSITIONS),
        action=_choice(obj, "action", where, RULE_ACTIONS),
        outcome=_choice(obj, "outcome", where, RULE_OUTCOMES),
        target=_text(obj, "target", where),
        value=_float_or_none(obj, "value", where),
        written=_float_or_none(obj, "written", where),
        detail=_text(obj, "detail", where),
        inputs=tuple(_rule_input(x, f"{where} inputs[{j}]") for j, x in enumerate(inputs)),
        attempts=_int(obj, "attempts", where, 0, MAX_RULE_ATTEMPTS),
    )


def decode_alarms(
    data: bytes | bytearray | memoryview,
) -> tuple[str, list[AlarmEvent], list[RuleAction]]:
    """(gateway, events, rule actions) of an alarm-lane body; a body without "actions" (a
    gateway before local rules) has none. Raises WireError (only) on bad input."""
    obj, gateway = _json_body(data, "alarms", ALARM_VERSION)
    events = obj.get("events")
    if not isinstance(events, list):
        raise WireError("alarms: 'events' must be a list")
    actions = obj.get("actions", [])
    if not isinstance(actions, list):
        raise WireError("alarms: 'actions' must be a list")
    return (
        gateway,
        [_alarm(e, i) for i, e in enumerate(events)],
        [_rule_action(a, i) for i, a in enumerate(actions)],
    )


# -- stats (retained, up/stats) -------------------------------------------------------------
#
#   {"v": 1, "gateway": "gw-1", "ts": 1795938246112, "appended_points": 120000,
#    "evicted_points": 0, "evicted_messages": 0, "backlog_points": 40, "backlog_messages": 2,
#    "lost_points": 0, "devices": {"meter-1": {"serial": "SN-4711"}, "display": {...}}}
# evicted_*: readings the full buffer evicted since it was created (never sent, counted);
# lost_points: readings the agent lost before the buffer (memory bound while the buffer
# refused writes), since the agent started.
# devices (optional; a gateway before issue 13 does not send it, an ingest before it
# ignores it): every device's information (`Driver.device_info`: Modbus string points,
# BTHome text/raw/firmware objects), the whole of it in each message, so the retained
# message alone tells a restarted platform everything. Devices without any are left out.
# health (optional; from issue 14 on): every device's health as the agent sees it,
#   {"meter-1": {"healthy": false, "since": 1795938246112, "error": "timeout"}}: since when
# it is in that state (the gateway's clock), the last error while it is unhealthy ("" else).

STATS_VERSION: Final = 1
STATS_FIELDS: Final = (
    "ts",
    "appended_points",
    "evicted_points",
    "evicted_messages",
    "backlog_points",
    "backlog_messages",
    "lost_points",
)
#: the longest up/stats message a platform decodes (the counters take < 1 KiB; the rest is
#: `devices`, which a gateway keeps within MAX_DEVICES_BYTES by `bound_devices`)
MAX_STATS_BYTES: Final = 256 * 1024
#: `health` takes at most this much of it (`bound_health`), `devices` the rest
MAX_HEALTH_BYTES: Final = 48 * 1024
MAX_DEVICES_BYTES: Final = MAX_STATS_BYTES - 4096 - MAX_HEALTH_BYTES
#: a device's error in `health` is cut to this many UTF-8 bytes
MAX_HEALTH_ERROR_BYTES: Final = 256
#: the longest device information value, in UTF-8 bytes (a BTHome raw object as hex or a
#: 125-register Modbus string take at most 510)
MAX_INFO_VALUE_BYTES: Final = MAX_TEXT_BYTES

#: device -> information name -> value
DeviceInfo = dict[str, dict[str, str]]


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """A device's health in up/stats: healthy or not since `since` (ms, the gateway's
    clock), and while unhealthy its last error."""

    healthy: bool
    since: int
    error: str = ""


#: device -> its health
DeviceHealthMap = dict[str, DeviceStatus]


@dataclass(frozen=True, slots=True)
class GatewayStats:
    gateway: str
    ts: int
    appended_points: int
    evicted_points: int
    evicted_messages: int
    backlog_points: int
    backlog_messages: int
    lost_points: int
    #: None: the message had no `devices` field (a gateway before issue 13)
    devices: DeviceInfo | None = None
    #: None: the message had no `health` field (a gateway before issue 14)
    health: DeviceHealthMap | None = None


@dataclass(frozen=True, slots=True)
class InfoProblem:
    """A device information entry `bound_devices` cut or left out."""

    device: str
    name: str
    truncated: bool  # True: the value was cut; False: the entry was left out
    reason: str


def _cut(value: str, limit: int) -> str:
    """`value` cut to at most `limit` UTF-8 bytes, at a character boundary."""
    return value.encode()[:limit].decode(errors="ignore")


def storable_text(value: str, limit: int = MAX_TEXT_BYTES) -> str:
    """`value` as the platform stores it (`check_text`): a NUL or a lone surrogate
    replaced, cut to `limit` UTF-8 bytes (a device's or a library's error text)."""
    clean = value.replace("\0", "\ufffd").encode("utf-8", "replace").decode()
    return _cut(clean, limit)


def bound_devices(
    devices: Mapping[str, Mapping[str, str]],
) -> tuple[DeviceInfo, list[InfoProblem]]:
    """What of the drivers' device information the wire takes, and what it did not.

    The rule (gateway side; the platform refuses any message that breaks it):
    - a value is cut at its first NUL (a device's C string ends there) and to at most
      MAX_INFO_VALUE_BYTES (at a character boundary): kept, reported as truncated;
    - an entry whose device or name is empty, holds a NUL or a lone surrogate or is longer
      than MAX_TEXT_BYTES, or whose value is not a string or holds a lone surrogate, is
      left out;
    - devices in name order, each whole, while `devices` stays within MAX_DEVICES_BYTES
      as JSON: a device that would take it over is left out (each of its entries reported).
    """
    out: DeviceInfo = {}
    problems: list[InfoProblem] = []
    size = 2  # {}
    for device in sorted(devices, key=str):
        entries: dict[str, str] = {}
        for name in sorted(devices[device], key=str):
            value = devices[device][name]
            try:
                for text, what in ((device, "device name"), (name, "name")):
                    if not isinstance(text, str) or not text:
                        raise WireError(f"{what} {text!r:.40} is not a non-empty string")
                    check_text(text, what)
                if not isinstance(value, str):
                    raise WireError(f"value is a {type(value).__name__}, not a string")
                head = value.partition("\x00")[0]
                check_text(head, "value", len(head) * 4)  # a lone surrogate, not the length
                cut = _cut(head, MAX_INFO_VALUE_BYTES)
            except WireError as e:
                problems.append(InfoProblem(str(device), str(name), False, str(e)))
                continue
            if cut != value:
                why = "a NUL" if "\x00" in value else f"over {MAX_INFO_VALUE_BYTES} bytes"
                problems.append(InfoProblem(device, name, True, f"value cut at {why}"))
            entries[name] = cut
        if not entries:
            continue
        more = len(orjson.dumps({device: entries})) - 1  # without the outer braces, + comma
        if size + more > MAX_DEVICES_BYTES:
            problems += [
                InfoProblem(device, name, False, f"up/stats full ({MAX_DEVICES_BYTES} bytes)")
                for name in entries
            ]
            continue
        size += more
        out[device] = entries
    return out, problems


def bound_health(health: Mapping[str, DeviceStatus]) -> tuple[DeviceHealthMap, list[str]]:
    """What of the devices' health the wire takes, and the devices it left out: an error
    is cut at its first NUL and to MAX_HEALTH_ERROR_BYTES (a lone surrogate replaced);
    devices in name order while `health` stays within MAX_HEALTH_BYTES as JSON (a device
    whose name the platform could not store is left out too)."""
    out: DeviceHealthMap = {}
    left_out: list[str] = []
    size = 2  # {}
    for device in sorted(health, key=str):
        status = health[device]
        try:
            if not isinstance(device, str) or not device:
                raise WireError("not a name")
            check_text(device, "device name")
        except WireError:
            left_out.append(str(device))
            continue
        error = status.error.partition("\x00")[0].encode(errors="replace")
        cut = DeviceStatus(
            status.healthy, status.since, error[:MAX_HEALTH_ERROR_BYTES].decode(errors="ignore")
        )
        more = len(orjson.dumps({device: _status_dict(cut)})) - 1
        if size + more > MAX_HEALTH_BYTES:
            left_out.append(device)
            continue
        size += more
        out[device] = cut
    return out, left_out


def _status_dict(status: DeviceStatus) -> dict[str, Any]:
    return {"healthy": status.healthy, "since": status.since, "error": status.error}


def _per_device(value: Any, field: str) -> Iterator[tuple[str, str, Mapping[str, Any]]]:
    """(device, where, entry) of a stats field that maps device names to objects."""
    if not isinstance(value, Mapping):
        raise WireError(f"stats: {field!r} must be an object")
    for device, entry in value.items():
        if not isinstance(device, str) or not device:
            raise WireError(
                f"stats: a device name in {field!r} ({device!r:.40}) is empty or not a string"
            )
        where = f"stats: {field}[{device[:40]!r}]"
        check_text(device, where)
        if not isinstance(entry, Mapping):
            raise WireError(f"{where} must be an object")
        yield device, where, entry


def _health(value: Any) -> DeviceHealthMap:
    """A decoded `health` field, checked as `bound_health` leaves it."""
    out: DeviceHealthMap = {}
    for device, where, entry in _per_device(value, "health"):
        healthy = entry.get("healthy")
        if not isinstance(healthy, bool):
            raise WireError(f"{where}: 'healthy' must be true or false")
        error = entry.get("error", "")
        if not isinstance(error, str):
            raise WireError(f"{where}: 'error' must be a string")
        check_text(error, f"{where}: 'error'", MAX_HEALTH_ERROR_BYTES)
        out[device] = DeviceStatus(healthy, _int(entry, "since", where, -_INT64, _INT64 - 1), error)
    return out


def _devices(value: Any) -> DeviceInfo:
    """A decoded `devices` field, checked as `bound_devices` leaves it."""
    out: DeviceInfo = {}
    for device, where, entries in _per_device(value, "devices"):
        for name, text in entries.items():
            if not isinstance(name, str) or not name:
                raise WireError(
                    f"{where}: an information name ({name!r:.40}) is empty or not a string"
                )
            check_text(name, f"{where}: a name")
            if not isinstance(text, str):
                raise WireError(f"{where}[{name[:40]!r}] must be a string")
            check_text(text, f"{where}[{name[:40]!r}]", MAX_INFO_VALUE_BYTES)
        out[device] = dict(entries)
    return out


def encode_stats(stats: GatewayStats) -> bytes:
    """The message; `devices` must be as `bound_devices` leaves it (WireError if not)."""
    obj: dict[str, Any] = {"v": STATS_VERSION, "gateway": stats.gateway}
    obj |= {f: getattr(stats, f) for f in STATS_FIELDS}
    if stats.devices is not None:
        obj["devices"] = _devices(stats.devices)
    if stats.health is not None:
        checked = _health({d: _status_dict(h) for d, h in stats.health.items()})
        obj["health"] = {d: _status_dict(h) for d, h in checked.items()}
    data = orjson.dumps(obj)
    if len(data) > MAX_STATS_BYTES:
        raise WireError(f"stats are {len(data)} bytes, at most {MAX_STATS_BYTES}")
    return data


def decode_stats(data: bytes | bytearray | memoryview) -> GatewayStats:
    """Raises WireError (only) on bad input."""
    if isinstance(data, bytes | bytearray | memoryview) and len(data) > MAX_STATS_BYTES:
        raise WireError(f"stats are {len(data)} bytes, at most {MAX_STATS_BYTES}")
    obj, gateway = _json_body(data, "stats", STATS_VERSION)
    values = {f: _int(obj, f, "", 0, _INT64 - 1) for f in STATS_FIELDS}
    devices = _devices(obj["devices"]) if obj.get("devices") is not None else None
    health = _health(obj["health"]) if obj.get("health") is not None else None
    return GatewayStats(gateway=gateway, devices=devices, health=health, **values)
