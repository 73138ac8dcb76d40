"""Device profiles: a device's published register map as a TOML file, so that a
technician writes ``profile = "sdm630"`` instead of forty point tables.

A profile lives in drivers/modbus/profiles/<name>.toml (package data) or at a path
relative to the config file. It has a header (``name``, ``description``, ``source``:
the published document the map was taken from), optional ``[device]`` defaults for the
device's Modbus keys, and ``[[points]]`` tables in exactly the config's point format.

``expand_device`` is the body of the driver's hook: it runs on the raw device table
before anything is validated and returns the table with the profile filled in:

- the device's own ``[[devices.points]]`` come first, in file order (so their indices
  in error messages match the file); a table whose ``name`` is a profile point's
  overrides that point key by key, any other table adds a point;
- then the profile's remaining points, in profile order, minus ``points_exclude``;
- device keys from the config win over the profile's ``[device]`` defaults
  (``poll_groups`` merge group by group, ``table_limits`` table by table);
- addresses: every point takes the ``address_base`` of its source (the profile's
  ``[device]`` for its points, the device's for the device's own points and for an
  address an own table overrides), so each is written as its own document prints it.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from drivers.base import DeviceConfigProblem
from drivers.modbus.settings import ModbusDeviceSettings, ModbusPointSettings

__all__ = [
    "DEVICE_DEFAULT_KEYS",
    "GENERIC_POINT_KEYS",
    "Profile",
    "available_profiles",
    "expand_device",
    "load_profile",
]

#: the generic point keys of agent/config.py's PointConfig (a test keeps them in step)
GENERIC_POINT_KEYS = ("name", "unit", "type", "writable", "min", "max", "pipeline")
#: device keys a profile's [device] table may set: properties of the device model, not
#: of how it is wired (transport, address, serial settings belong to the installation)
DEVICE_DEFAULT_KEYS = (
    "max_registers",
    "max_bits",
    "max_gap",
    "even_address_only",
    "table_limits",
    "address_base",
    "poll_groups",
    "timeout",
    "retries",
)
_HEADER_KEYS = ("name", "description", "source", "device", "points")
_PACKAGE = "drivers.modbus"
_FOLDER = "profiles"


@dataclass(frozen=True, slots=True)
class Profile:
    """A register map: points in the config's point format, device defaults and where
    the map comes from."""

    name: str
    #: the published register map it was taken from: title, version/date, URL
    source: str
    description: str
    points: list[dict[str, Any]]
    #: defaults for the device's Modbus keys (DEVICE_DEFAULT_KEYS)
    device: dict[str, Any] = field(default_factory=dict)
    #: where it was loaded from, as shown in messages
    origin: str = ""

    def point_names(self) -> list[str]:
        return [p["name"] for p in self.points]


def available_profiles() -> list[str]:
    """Names of the profiles shipped with citygw, sorted."""
    folder = resources.files(_PACKAGE).joinpath(_FOLDER)
    return sorted(
        entry.name.removesuffix(".toml")
        for entry in folder.iterdir()
        if entry.is_file() and entry.name.endswith(".toml")
    )


def _is_path(name_or_path: str) -> bool:
    return name_or_path.endswith(".toml") or "/" in name_or_path or "\\" in name_or_path


def load_profile(name_or_path: str, base_dir: Path) -> Profile:
    """A shipped profile by name, or a profile file (``*.toml`` or a path, relative to
    ``base_dir``: the config file's folder).

    Raises DeviceConfigProblem at ``("profile",)`` if there is no such profile or the
    file is broken; the message names the file and the key."""
    if _is_path(name_or_path):
        try:
            path = Path(name_or_path).expanduser()
        except RuntimeError:  # "~user/..." of a user without a home (found by fuzzing)
            raise DeviceConfigProblem(
                ("profile",), f"cannot expand {name_or_path!r}: no such user's home"
            ) from None
        if not path.is_absolute():
            path = base_dir / path
        origin = f"profile file {name_or_path}"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise DeviceConfigProblem(
                ("profile",),
                f"profile file not found: {name_or_path} (relative to the config file's folder)",
            ) from None
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise DeviceConfigProblem(
                ("profile",), f"cannot read profile file {name_or_path}: {reason}"
            ) from None
    else:
        names = available_profiles()
        if name_or_path not in names:
            raise DeviceConfigProblem(
                ("profile",),
                f"unknown profile {name_or_path!r}; available: {', '.join(names)} "
                "(or give the path of a .toml file, relative to the config file)",
            )
        origin = f"profile {name_or_path!r} (drivers/modbus/profiles/{name_or_path}.toml)"
        resource = resources.files(_PACKAGE).joinpath(_FOLDER).joinpath(f"{name_or_path}.toml")
        data = resource.read_bytes()
    return parse_profile(data, origin)


def parse_profile(data: bytes, origin: str) -> Profile:
    """A profile from the bytes of its file; ``origin`` names the file in messages."""

    def problem(message: str) -> DeviceConfigProblem:
        return DeviceConfigProblem(("profile",), f"{origin}: {message}")

    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise problem(f"not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise problem(f"TOML syntax error: {exc}") from None

    for key in raw:
        if key not in _HEADER_KEYS:
            raise problem(f"unknown key {key!r}; allowed: {', '.join(_HEADER_KEYS)}")
    for key in ("name", "description", "source"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise problem(f"{key}: required text is missing")

    device = raw.get("device", {})
    if not isinstance(device, dict):
        raise problem("device: expected a table ([device])")
    for key in device:
        if key not in DEVICE_DEFAULT_KEYS:
            raise problem(
                f"device.{key}: not a device default a profile may set; allowed: "
                f"{', '.join(DEVICE_DEFAULT_KEYS)}"
            )
    _validate(ModbusDeviceSettings, {"transport": "tcp", "host": "x", **device}, "device", problem)

    points = raw.get("points")
    if not isinstance(points, list) or not points:
        raise problem("points: a profile needs [[points]] tables")
    seen: set[str] = set()
    allowed = (*GENERIC_POINT_KEYS, *ModbusPointSettings.model_fields)
    for j, point in enumerate(points):
        where = f"points[{j}]"
        if not isinstance(point, dict):
            raise problem(f"{where}: expected a table ([[points]])")
        name = point.get("name")
        if not isinstance(name, str) or not name:
            raise problem(f"{where}.name: required key is missing")
        if name in seen:
            raise problem(f"{where}.name: duplicate point name {name!r}")
        seen.add(name)
        for key in point:
            if key not in allowed:
                raise problem(f"{where}.{key}: unknown key {key!r}; allowed: {', '.join(allowed)}")
        extras = {k: v for k, v in point.items() if k not in GENERIC_POINT_KEYS}
        if "address_base" in device and "address_base" not in extras:
            extras["address_base"] = device["address_base"]
        _validate(ModbusPointSettings, extras, where, problem)
        group = point.get("group", "")
        groups = device.get("poll_groups", {})
        if group and (not isinstance(groups, dict) or group not in groups):
            raise problem(f"{where}.group: poll group {group!r} is not in [device] poll_groups")

    return Profile(
        name=raw["name"],
        source=raw["source"].strip(),
        description=raw["description"].strip(),
        points=points,
        device=device,
        origin=origin,
    )


def _validate(model: type[BaseModel], data: dict[str, Any], where: str, problem: Any) -> None:
    try:
        model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(x) for x in err["loc"]]
        ctx = err.get("ctx") or {}
        if ctx.get("key"):
            loc.append(str(ctx["key"]))
        message = str(ctx["message"]) if "message" in ctx else err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        raise problem(f"{'.'.join([where, *loc])}: {message}") from None


def _with_base(point: Any, base: Any) -> Any:
    """A point table with the address convention of its source, unless it states its
    own (or its source uses the default, 0)."""
    if not isinstance(point, dict) or "address_base" in point or base == 0:
        return point
    return {**point, "address_base": base}


def expand_device(table: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """The raw device table with its profile filled in (see the module docstring).

    Tables without ``profile`` come back unchanged, except that ``points_exclude``
    without a profile is an error. Raises DeviceConfigProblem."""
    name = table.get("profile")
    if name is None:
        if "points_exclude" in table:
            raise DeviceConfigProblem(
                ("points_exclude",), "points_exclude only applies to a device with a profile"
            )
        own = table.get("points")
        if "address_base" not in table or not isinstance(own, list):
            return table
        return {**table, "points": [_with_base(p, table["address_base"]) for p in own]}
    if not isinstance(name, str):
        return table  # the device model reports the type
    profile = load_profile(name, base_dir)

    exclude = table.get("points_exclude", [])
    if not isinstance(exclude, list):
        return table  # the device model reports the type
    known = profile.point_names()
    for k, excluded in enumerate(exclude):
        if excluded not in known:
            raise DeviceConfigProblem(
                ("points_exclude", k),
                f"{excluded!r} is not a point of {profile.origin}; its points: {', '.join(known)}",
            )

    out = dict(table)
    for key, value in profile.device.items():
        if key == "address_base":
            continue  # the convention of the profile's points, not of the device's own
        if key not in out:
            out[key] = value
        elif key in ("poll_groups", "table_limits") and isinstance(out[key], dict):
            out[key] = {**value, **out[key]}

    own = table.get("points", [])
    if not isinstance(own, list):
        return out  # the generic model reports the type
    # each source's addresses in its own convention: the profile's points in the
    # profile's, the device's own points (and the addresses they override) in the device's
    device_base = table.get("address_base", 0)
    profile_base = profile.device.get("address_base", 0)
    by_name = {
        p["name"]: _with_base(p, profile_base) for p in profile.points if p["name"] not in exclude
    }
    merged: list[Any] = []
    used: set[str] = set()
    for point in own:
        pname = point.get("name") if isinstance(point, dict) else None
        if isinstance(pname, str) and pname in by_name and pname not in used:
            override = point
            if "address" in point and "address_base" not in point:
                override = {**point, "address_base": device_base}  # even 0: not the profile's
            merged.append({**by_name[pname], **override})
            used.add(pname)
        else:
            merged.append(_with_base(point, device_base))
    merged.extend(dict(p) for n, p in by_name.items() if n not in used)
    out["points"] = merged
    return out
