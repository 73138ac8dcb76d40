"""Downlink commands from the platform (`<prefix>/<gateway>/down/cmd`) and their
responses (`up/resp`).

A command is a JSON object with an `id` (1 to 128 characters) and an `op`:

- ``write``: a value to a writable point, through the point's driver.

      {"id": "c-42", "op": "write", "point": "pump-3/setpoint", "value": 12.5}

  The point must exist and be marked `writable`, and the value must be a finite number
  within the point's declared `min`/`max`. The driver refuses a value the device cannot
  hold exactly (10.5 to an integer register with scale 1: the error names the raw value
  it would need and the nearest writable values); the answer's `written` is the value
  the point holds after the write, read back (a float32 register holds the nearest
  float32).

- ``firmware_update``: a signed firmware package for a device's microcontroller,
  fetched from an https URL (docs/firmware-ota.md, "Platform-triggered updates").

      {"id": "c-77", "op": "firmware_update", "device": "mcu", "force": false,
       "url": "https://fw.city.example/mcu/2.1.0.cgfw", "sha256": "<optional, 64 hex>"}

  The device must exist and take firmware updates (an `mcu` device with a
  `firmware_key`); the URL must be https, at most 2048 characters; `sha256`, if given,
  names the image the package must hold. `"force": true` (a downgrade, or a reinstall
  of the running version) is refused unless the device's own config allows it
  (`allow_downgrade = true`): whoever can publish on down/cmd cannot roll a device back
  to an older, perhaps vulnerable, firmware on their own.

Everything is checked against the config before anything touches a device or the
network. The response names the command and says what happened:

    {"id": "c-42", "ok": true, "written": 12.5, "ts": 1764400000000}
    {"id": "c-43", "ok": false, "error": "point 'pump-3/level' is not writable", "ts": ...}
    {"id": "c-77", "ok": true, "outcome": "updated", "from": "2.0.3", "to": "2.1.0", "ts": ...}
    {"id": "c-78", "ok": false, "outcome": "refused", "error": "bad_signature: ...", "ts": ...}

- ``rule_override``: takes a local rule (agent/rules.py) over, or gives it back. While
  overridden the rule acts on nothing and reports what it would have done as suppressed;
  released, it decides again from its conditions as they are.

      {"id": "c-91", "op": "rule_override", "rule": "underpass-pump", "override": true}

- ``config_push``: a whole new gateway config (TOML text), tried and kept only if the
  uplink is healthy again within `deadline_s` (30 to 3600 s, default 300), else rolled
  back by the gateway itself (agent/config_push.py).

      {"id": "c-90", "op": "config_push", "config": "<TOML text>", "deadline_s": 300}

  A command is at most 4096 bytes, a config_push at most 256 KiB.

A firmware_update's answer always has an `outcome` (updated, rolled_back, refused,
failed) and comes when the update is over; a config_push's too (applied, refused,
rolled_back); other commands are answered meanwhile.

Parsing and checking are sans-I/O (bytes in, a command or a refusal out); the agent
runs the command (agent/runtime.py, agent/ota_command.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson

from common.redact import redact
from drivers.base import PointSpec

MAX_COMMAND_BYTES = 4096
MAX_CONFIG_PUSH_BYTES = 256 * 1024  # a whole config travels in a config_push
MAX_URL = 2048
DEADLINE_MIN_S, DEADLINE_MAX_S, DEADLINE_DEFAULT_S = 30, 3600, 300
WRITE = "write"
FIRMWARE_UPDATE = "firmware_update"
CONFIG_PUSH = "config_push"
RULE_OVERRIDE = "rule_override"
OPS = (WRITE, FIRMWARE_UPDATE, CONFIG_PUSH, RULE_OVERRIDE)
#: the ops whose answer comes when they are over, with an `outcome`
LONG_OPS = (FIRMWARE_UPDATE, CONFIG_PUSH)


class CommandRefused(ValueError):
    """A command that is malformed or not allowed; the message says why."""

    def __init__(self, message: str, command_id: str | None = None, op: str | None = None) -> None:
        super().__init__(message)
        self.command_id = command_id
        self.op = op

    def response(self) -> bytes:
        """The up/resp body; a refused firmware_update or config_push says its outcome too."""
        extra = {"outcome": "refused"} if self.op in LONG_OPS else None
        return response(self.command_id, str(self), extra)


@dataclass(frozen=True, slots=True)
class WriteCommand:
    id: str
    point: PointSpec
    value: float


@dataclass(frozen=True, slots=True)
class FirmwareUpdateCommand:
    id: str
    device: str
    url: str
    sha256: bytes | None  # the image's SHA-256 the package must name, if given
    force: bool  # allow a downgrade or a reinstall of the running version


@dataclass(frozen=True, slots=True)
class ConfigPushCommand:
    id: str
    config: str  # TOML text, validated by the agent against its running config
    deadline_s: float  # the uplink must be healthy again within this, else roll back


@dataclass(frozen=True, slots=True)
class RuleOverrideCommand:
    id: str
    rule: str
    override: bool  # True: take the rule over; False: give it back


Command = WriteCommand | FirmwareUpdateCommand | ConfigPushCommand | RuleOverrideCommand


def parse_command(
    payload: bytes,
    points: Mapping[str, PointSpec],
    devices: Mapping[str, str | None],
    downgrades: Collection[str] = frozenset(),
    rules: Collection[str] = frozenset(),
) -> Command:
    """The checked command, or CommandRefused naming what is wrong. `points` maps
    "device/point" to its spec; `devices` maps every device name to None if it takes
    firmware updates, else the reason it does not; `downgrades` names the devices whose
    config allows a forced update (`Driver.firmware_downgrades`); `rules` the local
    rules' ids."""
    if len(payload) > MAX_CONFIG_PUSH_BYTES:
        raise CommandRefused(f"command larger than {MAX_CONFIG_PUSH_BYTES} bytes")
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
    if op == CONFIG_PUSH:
        return _config_push(cid, obj)
    if len(payload) > MAX_COMMAND_BYTES:
        # only a config_push may be bigger (checked after the JSON to know the op)
        raise CommandRefused(f"command larger than {MAX_COMMAND_BYTES} bytes", cid)
    if op == WRITE:
        return _write(cid, obj, points)
    if op == FIRMWARE_UPDATE:
        return _firmware_update(cid, obj, devices, downgrades)
    if op == RULE_OVERRIDE:
        return _rule_override(cid, obj, rules)
    raise CommandRefused(f"unknown op {op!r}; allowed: {', '.join(OPS)}", cid)


def _write(cid: str, obj: dict[str, Any], points: Mapping[str, PointSpec]) -> WriteCommand:
    key = obj.get("point")
    if not isinstance(key, str) or key not in points:
        raise CommandRefused(f"unknown point {key!r} (give 'device/point')", cid, WRITE)
    point = points[key]
    if not point.writable:
        raise CommandRefused(f"point {key!r} is not writable", cid, WRITE)
    value = obj.get("value")
    if isinstance(value, bool):
        value = float(value)
    if not isinstance(value, int | float):
        raise CommandRefused(
            f"value for {key!r} must be a finite number, got {value!r}", cid, WRITE
        )
    if (refused := write_refusal(key, point, float(value))) is not None:
        raise CommandRefused(refused, cid, WRITE)
    return WriteCommand(cid, point, float(value))


class WritablePoint(Protocol):
    """What a write is checked against: a point's spec or its config."""

    @property
    def writable(self) -> bool: ...
    @property
    def min(self) -> float | None: ...
    @property
    def max(self) -> float | None: ...


def write_refusal(key: str, point: WritablePoint, value: float) -> str | None:
    """Why `value` may not be written to the point `key` (a downlink write or a local
    rule's), or None."""
    if not point.writable:
        return f"point {key!r} is not writable"
    if not math.isfinite(value):
        return f"value for {key!r} must be a finite number, got {value!r}"
    if (point.min is not None and value < point.min) or (
        point.max is not None and value > point.max
    ):
        return (
            f"value {value:g} for {key!r} is outside its declared range "
            f"[{_bound(point.min)}, {_bound(point.max)}]"
        )
    return None


def _rule_override(cid: str, obj: dict[str, Any], rules: Collection[str]) -> RuleOverrideCommand:
    rule = obj.get("rule")
    if not isinstance(rule, str) or rule not in rules:
        known = ", ".join(sorted(rules)) or "none configured"
        raise CommandRefused(f"unknown rule {rule!r}; rules: {known}", cid, RULE_OVERRIDE)
    override = obj.get("override")
    if not isinstance(override, bool):
        raise CommandRefused(
            "'override' must be true (take over) or false (release)", cid, RULE_OVERRIDE
        )
    return RuleOverrideCommand(cid, rule, override)


def _firmware_update(
    cid: str, obj: dict[str, Any], devices: Mapping[str, str | None], downgrades: Collection[str]
) -> FirmwareUpdateCommand:
    def refused(message: str) -> CommandRefused:
        return CommandRefused(message, cid, FIRMWARE_UPDATE)

    device = obj.get("device")
    if not isinstance(device, str) or device not in devices:
        raise refused(f"unknown device {device!r} (give the name of an enabled device)")
    why_not = devices[device]
    if why_not is not None:
        raise refused(f"device {device!r} cannot take firmware updates: {why_not}")
    url = obj.get("url")
    if not isinstance(url, str) or len(url) > MAX_URL:
        raise refused(f"'url' must be a string of at most {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        scheme, host = parts.scheme, parts.hostname
    except ValueError:  # an unbalanced IPv6 bracket, say
        scheme, host = "", None
    if scheme != "https" or not host:
        raise refused(f"'url' must be an https:// URL, got {redact(url)!r}")
    sha = obj.get("sha256")
    digest: bytes | None = None
    if sha is not None:
        try:
            digest = bytes.fromhex(sha) if isinstance(sha, str) else b""
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise refused("'sha256' must be 64 hex digits (the image's SHA-256)")
    force = obj.get("force", False)
    if not isinstance(force, bool):
        raise refused("'force' must be true or false")
    if force and device not in downgrades:
        raise refused(
            f"device {device!r} does not allow a forced update (downgrade or reinstall) from "
            "the platform; only its own config can (allow_downgrade = true on the device)"
        )
    return FirmwareUpdateCommand(cid, device, url, digest, force)


def _config_push(cid: str, obj: dict[str, Any]) -> ConfigPushCommand:
    text = obj.get("config")
    if not isinstance(text, str) or not text.strip():
        raise CommandRefused("'config' must be the config's TOML text", cid, CONFIG_PUSH)
    deadline = obj.get("deadline_s", DEADLINE_DEFAULT_S)
    if (
        isinstance(deadline, bool)
        or not isinstance(deadline, int | float)
        or not DEADLINE_MIN_S <= deadline <= DEADLINE_MAX_S
    ):
        raise CommandRefused(
            f"'deadline_s' must be a number of seconds from {DEADLINE_MIN_S} to "
            f"{DEADLINE_MAX_S}, got {deadline!r}",
            cid,
            CONFIG_PUSH,
        )
    return ConfigPushCommand(cid, text, float(deadline))


def _bound(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"


def response(
    command_id: str | None, error: str | None = None, extra: Mapping[str, Any] | None = None
) -> bytes:
    """An up/resp body: ok unless `error`, with `extra` fields (a firmware outcome)."""
    body: dict[str, Any] = {"id": command_id, "ok": error is None}
    if extra:
        body.update(extra)
    if error is not None:
        body["error"] = error
    body["ts"] = time.time_ns() // 1_000_000
    return orjson.dumps(body)
