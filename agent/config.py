"""The gateway configuration: TOML edited by technicians, validated into pydantic models.

Loading runs in two phases so that every problem in a file is reported at once:

1. the generic models below (gateway, uplink, buffer, devices, points, pipeline);
   ``${VAR}`` references in string values are replaced from the environment first;
2. for each device whose driver is installed, the driver-specific keys of the device
   and of its points (the keys the generic models do not know) are validated with
   the driver's ``device_model`` / ``point_model``. The results are
   ``DeviceConfig.settings`` and ``PointConfig.settings``. Their validation context
   holds ``base_dir`` (the config file's folder: relative paths start there) and
   ``buffer_dir`` (the buffer database's folder: state files default to it).

Problems are collected as ``ConfigIssue(source, key_path, message)`` and raised
together as one ``ConfigError``; ``str(error)`` is one line per issue, in file order::

    gateway.toml: devices[3].points[7].pipeline[0].min: must be less than max (10), got 20

Pydantic's messages are rewritten in plain words for the technician at the cabinet.
Secrets (``password``) are ``SecretStr`` and never appear in messages.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import logging
import os
import re
import tomllib
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from agent.local_config import DerivedConfig, RuleConfig, check_local
from agent.stage_config import STAGE_MODELS, STAGE_TYPES, PipelineStage, check_pipeline
from common import wire
from common.keypath import AT_KEY as _AT_KEY
from common.keypath import ConfigError, ConfigIssue, key_path
from common.keypath import Section as _Section
from common.keypath import at as _at
from common.keypath import fail as _fail
from common.mqtt_url import BrokerUrl, ClientId
from common.redact import is_secret_key
from common.units import Duration, Size, parse_duration, parse_size
from common.wire import GATEWAY_ID as _GATEWAY_ID
from drivers import registry
from drivers.base import DeviceConfigProblem, Driver

__all__ = [
    "BufferConfig",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "DeviceConfig",
    "GatewayConfig",
    "Location",
    "MetricsConfig",
    "PipelineStage",
    "PointConfig",
    "UplinkConfig",
    "load_config",
    "parse_config",
]

Loc = tuple[str | int, ...]

_log = logging.getLogger("citygw.config")

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ENV_REF = re.compile(r"\$(\$?)\{([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# -- shared field checks -------------------------------------------------------------


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Relative paths are relative to the config file's directory."""
    try:
        path = value.expanduser()
    except RuntimeError:  # "~user/..." of a user without a home (found by fuzzing)
        raise _fail(
            f"cannot expand {str(value)!r}: no such user's home; write the full path"
        ) from None
    if not path.is_absolute():
        ctx = info.context or {}
        base = ctx.get("base_dir") or Path.cwd()
        path = Path(base) / path
    return path


def _existing_file(value: Path | None, info: ValidationInfo) -> Path | None:
    if value is None:
        return None
    path = _resolve_path(value, info)
    if not path.is_file():
        hint = "" if value.expanduser().is_absolute() else " (relative to the config file's folder)"
        raise _fail(f"file not found: {value}{hint}")
    return path


def _read_password_file(path: Path) -> str:
    """The password in ``path``: its text without one trailing newline. The errors never
    show the file's content."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _at("password_file", f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _at("password_file", f"{path} is not UTF-8 text") from None
    password = text.removesuffix("\n").removesuffix("\r")
    if not password:
        raise _at("password_file", f"{path} is empty; write the password in it")
    if "\n" in password or "\r" in password:
        raise _at("password_file", f"{path} must hold the password alone, on one line")
    return password


def _warn_if_exposed(path: Path, key: str, forbidden: int, chmod: str) -> None:
    """A WARNING when a secret file's mode grants ``forbidden`` bits (0o077: any access by
    group or others; 0o007: any access by others)."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return  # the existence check has reported it
    if mode & forbidden:
        who = "group or others" if forbidden & 0o070 else "others"
        _log.warning(
            f"{key} {path} is accessible by {who} (mode {mode:04o}); run: chmod {chmod} {path}",
            extra={"key": key, "path": str(path), "mode": f"{mode:04o}"},
        )


# -- sections ------------------------------------------------------------------------


class Location(_Section):
    lat: float = Field(ge=-90.0, le=90.0, allow_inf_nan=False)
    lon: float = Field(ge=-180.0, le=180.0, allow_inf_nan=False)


class GatewayConfig(_Section):
    id: str
    site: str = ""
    location: Location | None = None
    #: what up/meta and the platform call this config (default: the start of its hash)
    config_version: str = ""

    @field_validator("site")
    @classmethod
    def _check_site(cls, v: str) -> str:
        return _storable(v, "site")

    @field_validator("config_version")
    @classmethod
    def _check_config_version(cls, v: str) -> str:
        if len(v) > 64:
            raise _fail(f"config_version is {len(v)} characters long; at most 64")
        return _storable(v, "config_version")

    @field_validator("id")
    @classmethod
    def _check_id(cls, v: str) -> str:
        if not _GATEWAY_ID.fullmatch(v):
            raise _fail(
                f"{v!r} is not a valid gateway id; use 1 to 64 letters, digits, '-' or '_' "
                "(it becomes part of MQTT topics)"
            )
        return v


class UplinkConfig(_Section):
    broker: BrokerUrl
    client_id: ClientId = ""  # "" -> "citygw-<gateway id>", filled in by parse_config
    username: str | None = None
    password: SecretStr | None = None
    #: a file holding the password (read at load, one trailing newline stripped)
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    topic_prefix: str = "citygw"
    window: int = Field(8, ge=1, le=20)
    keepalive: Duration = Field(30.0, ge=1.0, le=65535.0)
    ack_timeout: Duration = Field(10.0, ge=0.1, le=3600.0)
    backoff_min: Duration = Field(1.0, ge=0.01, le=3600.0)
    backoff_max: Duration = Field(60.0, ge=0.01, le=86400.0)
    #: while backing off, the broker's port is probed about this often (TCP connect and
    #: close); N gateways send N / probe_interval SYNs a second while it is down
    probe_interval: Duration = Field(5.0, ge=0.1, le=3600.0)
    #: a probe that finds the broker back cuts the wait to a random delay within this, so
    #: N gateways come back at most N / max(probe_interval, reconnect_spread) a second
    reconnect_spread: Duration = Field(10.0, ge=0.0, le=3600.0)
    max_batch_points: int = Field(10_000, ge=100, le=100_000)
    #: how often the retained up/stats message (evictions, backlog) is refreshed
    stats_interval: Duration = Field(60.0, ge=0.1, le=86400.0)

    @field_validator("topic_prefix")
    @classmethod
    def _check_topic_prefix(cls, v: str) -> str:
        if not v or "+" in v or "#" in v or "" in v.split("/") or any(c.isspace() for c in v):
            raise _fail(
                f"{v!r} is not a valid topic prefix; use topic levels separated by '/', "
                "without spaces, wildcards (+ #) or empty levels (e.g. 'citygw')"
            )
        return v

    @field_validator("ca_file", "cert_file", "key_file", "password_file")
    @classmethod
    def _check_files(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return _existing_file(v, info)

    @model_validator(mode="after")
    def _cross_checks(self) -> UplinkConfig:
        if self.password_file is not None:
            if self.password is not None:
                raise _at("password_file", "give either password or password_file, not both")
            self.password = SecretStr(_read_password_file(self.password_file))
            _warn_if_exposed(self.password_file, "uplink.password_file", 0o007, "o-rwx")
        if self.key_file is not None:
            _warn_if_exposed(self.key_file, "uplink.key_file", 0o077, "600")
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            given = "cert_file" if missing == "key_file" else "key_file"
            raise _at(
                missing,
                f"required because {given} is set; give both cert_file and key_file or neither",
            )
        if self.backoff_max < self.backoff_min:
            raise _at(
                "backoff_max",
                f"must be >= backoff_min ({format_duration(self.backoff_min)}), "
                f"got {format_duration(self.backoff_max)}",
            )
        return self


class BufferConfig(_Section):
    path: Path = Field(Path("buffer.db"), validate_default=True)
    capacity: Size = Field(64 * 1024**2, ge=64 * 1024)
    flush_interval: Duration = Field(1.0, ge=0.01, le=60.0)
    #: readings are committed (unsynced) to the intake this soon after a driver hands
    #: them over: what a process crash can lose
    intake_delay: Duration = Field(0.01, ge=0.0, le=10.0)
    sync: Literal["normal", "full"] = "normal"
    max_memory_points: int = Field(500_000, ge=1_000, le=100_000_000)

    @field_validator("path")
    @classmethod
    def _check_path(cls, v: Path, info: ValidationInfo) -> Path:
        return _resolve_path(v, info)


class MetricsConfig(_Section):
    """The Prometheus endpoint (agent/metrics.py)."""

    enabled: bool = True
    #: loopback by default: a fleet scrapes through a node-local collector (README)
    address: str = "127.0.0.1"
    port: int = Field(9465, ge=1, le=65535)

    @field_validator("address")
    @classmethod
    def _check_address(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError:
            raise _fail(
                f"{v!r} is not an IP address; use 127.0.0.1 (this machine only), "
                "0.0.0.0 (every IPv4 interface) or ::1"
            ) from None
        return v


# -- devices and points ----------------------------------------------------------------


def _storable(v: str, what: str) -> str:
    """Text the platform can store (it travels in up/meta): no NUL, bounded length."""
    try:
        wire.check_text(v, what)
    except wire.WireError as exc:
        raise _fail(str(exc)) from None
    return v


def _check_name(v: str, what: str) -> str:
    if not _NAME.fullmatch(v):
        raise _fail(
            f"{v!r} is not a valid {what} name; use 1 to 64 letters, digits, '.', '-' or '_'"
        )
    return v


class PointConfig(BaseModel):
    """A ``[[devices.points]]`` table. Keys not declared here belong to the driver."""

    model_config = ConfigDict(extra="allow")

    name: str
    unit: str = ""
    type: Literal["float", "int", "bool"] = "float"
    writable: bool = False
    #: the declared range of the quantity: a write outside it is refused
    min: float | None = None
    max: float | None = None
    pipeline: list[PipelineStage] = Field(default_factory=list)

    _settings: BaseModel | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check_range(self) -> PointConfig:
        check_pipeline(self.pipeline, self.min, self.max)
        return self

    @field_validator("name")
    @classmethod
    def _check_point_name(cls, v: str) -> str:
        return _check_name(v, "point")

    @field_validator("unit")
    @classmethod
    def _check_unit(cls, v: str) -> str:
        return _storable(v, "unit")

    @property
    def settings(self) -> BaseModel:
        """The driver-specific keys, validated by the driver's ``point_model``."""
        if self._settings is None:
            raise RuntimeError("point settings are set by load_config/parse_config")
        return self._settings


class DeviceConfig(BaseModel):
    """A ``[[devices]]`` table. Keys not declared here belong to the driver."""

    model_config = ConfigDict(extra="allow")

    name: str
    driver: str
    poll: Duration = Field(1.0, ge=0.01)
    enabled: bool = True
    #: where the device is, if not at the gateway (the platform's map shows it)
    location: Location | None = None
    points: list[PointConfig] = Field(default_factory=list)

    _settings: BaseModel | None = PrivateAttr(default=None)

    @field_validator("name")
    @classmethod
    def _check_device_name(cls, v: str) -> str:
        return _check_name(v, "device")

    @property
    def settings(self) -> BaseModel:
        """The driver-specific keys, validated by the driver's ``device_model``."""
        if self._settings is None:
            raise RuntimeError("device settings are set by load_config/parse_config")
        return self._settings


class Config(_Section):
    gateway: GatewayConfig
    uplink: UplinkConfig
    # validated from {} when [buffer] is absent, so the default path gets resolved too
    buffer: BufferConfig = Field(default_factory=dict, validate_default=True)
    metrics: MetricsConfig = Field(default_factory=dict, validate_default=True)
    devices: list[DeviceConfig] = Field(default_factory=list)
    derived: list[DerivedConfig] = Field(default_factory=list)
    rules: list[RuleConfig] = Field(default_factory=list)

    _source: str = PrivateAttr(default="<string>")
    _hash: str = PrivateAttr(default="")

    @property
    def source(self) -> str:
        """Where the config came from: the path given to load_config, or parse_config's source."""
        return self._source

    @property
    def hash(self) -> str:
        """``sha256:<hex>`` of the config's text as it was read (before ${ENV} substitution)."""
        return self._hash

    @property
    def version(self) -> str:
        """`gateway.config_version`, else the hash's first 12 hex digits."""
        return self.gateway.config_version or self._hash.removeprefix("sha256:")[:12]

    def point_count(self) -> int:
        return sum(len(d.points) for d in self.devices) + len(self.derived)

    def staged_points(self) -> Iterator[tuple[str, PointConfig | DerivedConfig]]:
        """(key, point) of every point with a pipeline that runs: the enabled devices'
        points and the derived points."""
        for d in self.devices:
            if d.enabled:
                yield from ((f"{d.name}/{p.name}", p) for p in d.points if p.pipeline)
        yield from ((dv.key, dv) for dv in self.derived if dv.pipeline)

    @model_validator(mode="after")
    def _warn_identity(self) -> Config:
        _warn_if_not_gateway_identity(self.gateway.id, self.uplink)
        return self


def _warn_if_not_gateway_identity(gateway_id: str, uplink: UplinkConfig) -> None:
    """A WARNING when the gateway's MQTT identity (its username, or its client
    certificate's CN, which a broker with `use_identity_as_username` takes as the
    username) is not its gateway id: the shipped broker ACL (deploy/mosquitto) lets a
    gateway publish only under its own id, and over MQTT 3.1.1 the broker acknowledges
    what it refuses, so the gateway would lose its readings without an error."""
    acl = "a broker with citygw's ACL (deploy/mosquitto/citygw.acl) drops its uplinks"
    if uplink.username is not None and uplink.username != gateway_id:
        _log.warning(
            f"uplink.username {uplink.username!r} differs from gateway.id {gateway_id!r}: "
            f"{acl}; set username = {gateway_id!r} (and the broker user of that name)",
            extra={"key": "uplink.username", "gateway": gateway_id},
        )
    cn = _certificate_cn(uplink.cert_file)
    if cn is not None and cn != gateway_id:
        _log.warning(
            f"uplink.cert_file {uplink.cert_file}: its CN {cn!r} differs from gateway.id "
            f"{gateway_id!r}: {acl} when it takes the CN as the username; issue the "
            f"certificate for CN={gateway_id}",
            extra={"key": "uplink.cert_file", "gateway": gateway_id},
        )


def _certificate_cn(path: Path | None) -> str | None:
    """The CN of the (first) PEM certificate in `path`; None if there is none to read
    (a file that is not a certificate fails later, at the TLS setup, with its reason)."""
    if path is None:
        return None
    from cryptography import x509  # only for a config with a client certificate
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except (OSError, ValueError):
        return None
    value = names[0].value if names else None
    return value if isinstance(value, str) else None


# -- loading -------------------------------------------------------------------------


class _Issues:
    """Issues collected while loading, each with its location for sorting."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[tuple[Loc, str]] = []

    def add(self, loc: Loc, message: str) -> None:
        self.items.append((loc, message))

    def sorted(self, raw: dict[str, Any]) -> list[ConfigIssue]:
        ordered = sorted(self.items, key=lambda item: _file_order(raw, item[0]))
        return [ConfigIssue(self.source, key_path(loc), msg) for loc, msg in ordered]


def _file_order(raw: Any, loc: Loc) -> list[int]:
    """Sort key that puts issues in the order their keys appear in the file
    (keys missing from the file go after the existing keys of their table)."""
    out: list[int] = []
    node = raw
    for item in loc:
        if isinstance(item, int):
            out.append(item)
            node = node[item] if isinstance(node, list) and 0 <= item < len(node) else None
        elif isinstance(node, dict):
            keys = list(node)
            out.append(keys.index(item) if item in node else len(keys))
            node = node.get(item)
        else:
            out.append(0)
            node = None
    return out


def load_config(path: str | Path) -> Config:
    """Load and validate a config file.

    Raises FileNotFoundError (or another OSError) if it cannot be read, and
    ConfigError listing every problem if it is invalid."""
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [ConfigIssue(str(path), "", f"not UTF-8 text (byte {exc.start}); save it as UTF-8")]
        ) from None
    return parse_config(text, source=str(path), base_dir=path.resolve().parent)


def parse_config(text: str, source: str = "<string>", base_dir: Path | None = None) -> Config:
    """Validate config text; relative paths resolve against ``base_dir`` (default: cwd)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_syntax_issue(source, exc)]) from None

    issues = _Issues(source)
    unresolved: set[Loc] = set()
    raw = _substitute_env(raw, (), issues, unresolved)
    context = {"base_dir": base_dir if base_dir is not None else Path.cwd()}

    # drivers fill in what a device references (e.g. a Modbus profile's points)
    drivers = _Drivers()
    _expand_devices(raw, drivers, issues, context["base_dir"])

    # phase 1: the generic models
    config: Config | None = None
    try:
        config = Config.model_validate(raw, context=context)
    except ValidationError as exc:
        for err in exc.errors():
            loc, message = _translate(err, Config, ())
            if not any(loc[: len(u)] == u for u in unresolved):
                issues.add(loc, message)
    _check_unique_names(raw, issues)

    # phase 2: the driver-specific keys
    buffer_path = config.buffer.path if config is not None else context["base_dir"] / "buffer.db"
    context["buffer_dir"] = buffer_path.parent
    settings = _validate_driver_settings(raw, drivers, issues, context)
    _check_devices(raw, drivers, settings, issues)

    # phase 3: derived points and rules, against the points they read and write
    if config is not None:
        for loc, message in check_local(config):
            issues.add(loc, message)

    if issues.items:
        raise ConfigError(issues.sorted(raw))
    assert config is not None
    config._source = source
    config._hash = "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    if not config.uplink.client_id:
        config.uplink.client_id = f"citygw-{config.gateway.id}"
    for i, device in enumerate(config.devices):
        device_settings, point_settings = settings[i]
        device._settings = device_settings
        for j, point in enumerate(device.points):
            point._settings = point_settings[j]
    return config


def _syntax_issue(source: str, exc: tomllib.TOMLDecodeError) -> ConfigIssue:
    msg = str(exc)
    m = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", msg, re.DOTALL)
    if m:
        where = f"line {m.group(2)}, column {m.group(3)}"
        return ConfigIssue(source, where, f"TOML syntax error: {m.group(1)}")
    m = re.fullmatch(r"(.*) \(at end of document\)", msg, re.DOTALL)
    if m:
        return ConfigIssue(source, "end of file", f"TOML syntax error: {m.group(1)}")
    return ConfigIssue(source, "", f"TOML syntax error: {msg}")


def _substitute_env(value: Any, loc: Loc, issues: _Issues, unresolved: set[Loc]) -> Any:
    """Replace ``${VAR}`` in every string value; ``$${VAR}`` stays a literal ``${VAR}``."""
    if isinstance(value, dict):
        return {k: _substitute_env(v, (*loc, k), issues, unresolved) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute_env(v, (*loc, i), issues, unresolved) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def replace(m: re.Match[str]) -> str:
        escaped, name = m.group(1), m.group(2)
        if escaped:
            return "${" + name + "}"
        if not _ENV_NAME.fullmatch(name):
            issues.add(loc, f"'${{{name}}}' is not a valid environment variable reference")
            unresolved.add(loc)
            return m.group(0)
        env = os.environ.get(name)
        if env is None:
            issues.add(
                loc,
                f"environment variable {name} is not set; set it in the gateway's environment "
                "(e.g. the service's EnvironmentFile) or write the value here",
            )
            unresolved.add(loc)
            return m.group(0)
        return env

    return _ENV_REF.sub(replace, value)


def _check_unique_names(raw: dict[str, Any], issues: _Issues) -> None:
    devices = raw.get("devices")
    if not isinstance(devices, list):
        return
    seen: dict[str, int] = {}
    for i, dev in enumerate(devices):
        if not isinstance(dev, dict):
            continue
        name = dev.get("name")
        if isinstance(name, str):
            if name in seen:
                issues.add(
                    ("devices", i, "name"),
                    f"duplicate device name {name!r} (also devices[{seen[name]}]); "
                    "device names must be unique",
                )
            else:
                seen[name] = i
        points = dev.get("points")
        if not isinstance(points, list):
            continue
        seen_points: dict[str, int] = {}
        for j, point in enumerate(points):
            pname = point.get("name") if isinstance(point, dict) else None
            if not isinstance(pname, str):
                continue
            if pname in seen_points:
                issues.add(
                    ("devices", i, "points", j, "name"),
                    f"duplicate point name {pname!r} (also points[{seen_points[pname]}]); "
                    "point names must be unique within a device",
                )
            else:
                seen_points[pname] = j


_DeviceSettings = tuple[BaseModel | None, list[BaseModel | None]]


class _Drivers:
    """The drivers a file names, each loaded once per parse (an entry-point lookup costs
    milliseconds, and every device is looked at in three phases)."""

    def __init__(self) -> None:
        self._found: dict[str, type[Driver] | registry.DriverNotFound | ImportError] = {}

    def load(self, name: str) -> type[Driver]:
        """Raises DriverNotFound or DriverLoadError, as registry.load_driver does."""
        if name not in self._found:
            try:
                self._found[name] = registry.load_driver(name)
            except (registry.DriverNotFound, registry.DriverLoadError) as exc:
                self._found[name] = exc
        found = self._found[name]
        if isinstance(found, Exception):
            raise found
        return found

    def of(self, dev: Any) -> type[Driver] | None:
        """The driver class of a raw device table, or None (reported by phase 2)."""
        if not isinstance(dev, dict) or not isinstance(dev.get("driver"), str):
            return None
        try:
            return self.load(dev["driver"])
        except (registry.DriverNotFound, registry.DriverLoadError):
            return None


def _expand_devices(
    raw: dict[str, Any], drivers: _Drivers, issues: _Issues, base_dir: Path
) -> None:
    devices = raw.get("devices")
    if not isinstance(devices, list):
        return
    for i, dev in enumerate(devices):
        driver = drivers.of(dev)
        if driver is None:
            continue
        try:
            devices[i] = driver.expand_device(dev, base_dir)
        except DeviceConfigProblem as problem:
            issues.add(("devices", i, *problem.key_path), problem.message)


def _check_devices(
    raw: dict[str, Any], drivers: _Drivers, settings: dict[int, _DeviceSettings], issues: _Issues
) -> None:
    """Each driver's cross-point checks, on devices whose settings all validated."""
    for i, (device_settings, point_settings) in settings.items():
        driver = drivers.of(raw["devices"][i])
        if driver is None or device_settings is None or None in point_settings:
            continue
        points = [p for p in point_settings if p is not None]
        tables = raw["devices"][i].get("points") or []
        for problem in driver.check_device(device_settings, points, tables):
            issues.add(("devices", i, *problem.key_path), problem.message)


def _validate_driver_settings(
    raw: dict[str, Any], drivers: _Drivers, issues: _Issues, context: dict[str, Any]
) -> dict[int, _DeviceSettings]:
    """Phase 2: each device's and point's extra keys against its driver's models."""
    out: dict[int, _DeviceSettings] = {}
    devices = raw.get("devices")
    if not isinstance(devices, list):
        return out
    for i, dev in enumerate(devices):
        if not isinstance(dev, dict) or not isinstance(dev.get("driver"), str):
            continue  # reported by phase 1
        name = dev["driver"]
        try:
            driver = drivers.load(name)
        except registry.DriverNotFound as exc:
            installed = ", ".join(exc.installed) if exc.installed else "none"
            issues.add(("devices", i, "driver"), f"unknown driver {name!r}; installed: {installed}")
            continue
        except registry.DriverLoadError as exc:
            issues.add(("devices", i, "driver"), str(exc))
            continue
        device_settings = _validate_extras(
            driver.device_model, DeviceConfig, dev, ("devices", i), issues, context
        )
        point_settings: list[BaseModel | None] = []
        points = dev.get("points")
        if isinstance(points, list):
            for j, point in enumerate(points):
                point_settings.append(
                    _validate_extras(
                        driver.point_model,
                        PointConfig,
                        point,
                        ("devices", i, "points", j),
                        issues,
                        context,
                    )
                    if isinstance(point, dict)
                    else None
                )
        out[i] = (device_settings, point_settings)
    return out


def _validate_extras(
    model: type[BaseModel],
    generic: type[BaseModel],
    table: dict[str, Any],
    loc: Loc,
    issues: _Issues,
    context: dict[str, Any],
) -> BaseModel | None:
    extras = {k: v for k, v in table.items() if k not in generic.model_fields}
    try:
        return model.model_validate(extras, context=context)
    except ValidationError as exc:
        allowed = [*generic.model_fields, *(k for k in model.model_fields)]
        for err in exc.errors():
            issues.add(*_translate(err, model, loc, allowed))
        return None


# -- pydantic errors in technician English ------------------------------------------


def _unwrap(tp: Any) -> Any:
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin is Union or origin is types.UnionType:
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _is_stage(tp: Any) -> bool:
    if tp in STAGE_MODELS:
        return True
    return get_origin(tp) is Union and all(a in STAGE_MODELS for a in get_args(tp))


def _walk(root: type[BaseModel], loc: Loc) -> tuple[Loc, type[BaseModel] | None, FieldInfo | None]:
    """The key path of a pydantic error location (union tags removed), the model of the
    table holding the last key and that key's field."""
    tp: Any = root
    out: list[str | int] = []
    parent: type[BaseModel] | None = None
    field: FieldInfo | None = None
    for item in loc:
        tp = _unwrap(tp)
        if isinstance(item, int):
            out.append(item)
            tp = get_args(tp)[0] if get_origin(tp) is list and get_args(tp) else Any
            continue
        if _is_stage(tp) and item in STAGE_TYPES:
            # the discriminated union's tag: not a key of the file
            model = STAGE_TYPES[item]
            if model is tp or get_origin(tp) is Union:
                tp = model
                continue
        out.append(item)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            parent = tp
            field = tp.model_fields.get(item)
            tp = field.annotation if field is not None else Any
        else:
            parent, field, tp = None, None, Any
    return tuple(out), parent, field


def _has_validator(field: FieldInfo | None, func: Any) -> bool:
    return field is not None and any(getattr(m, "func", None) is func for m in field.metadata)


def format_duration(seconds: float) -> str:
    """1.0 -> '1s', 0.01 -> '10ms', 300 -> '5m' (what a technician would write)."""
    if seconds != 0 and seconds < 1:
        return f"{seconds * 1000:g}ms"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def format_size(n: int) -> str:
    for unit, size in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n} bytes"


def _show(value: Any) -> str:
    """A value from the file, as the technician wrote it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _suggest(key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


_COMPARISONS = {
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),
    "less_than_equal": ("<=", "le"),
    "less_than": ("<", "lt"),
}


def _translate(
    err: ErrorDetails,
    root: type[BaseModel],
    prefix: Loc,
    allowed_keys: Sequence[str] | None = None,
) -> tuple[Loc, str]:
    loc, parent, field = _walk(root, tuple(err["loc"]))
    kind = err["type"]
    ctx: dict[str, Any] = dict(err.get("ctx") or {})
    value = err.get("input")
    if any(isinstance(k, str) and is_secret_key(k) for k in loc):  # never shown
        shown = "(hidden)"
    else:
        shown = _show(value)

    def bound(x: Any) -> str:
        if _has_validator(field, parse_duration) and isinstance(x, int | float):
            return format_duration(float(x))
        if _has_validator(field, parse_size) and isinstance(x, int):
            return format_size(x)
        return _show(x)

    if kind == "missing":
        message = "required key is missing"
    elif kind == "extra_forbidden":
        allowed = (
            list(allowed_keys) if allowed_keys else list(parent.model_fields) if parent else []
        )
        key = str(loc[-1]) if loc else "?"
        message = f"unknown key {key!r}{_suggest(key, allowed)}; allowed: {', '.join(allowed)}"
    elif kind in ("float_type", "float_parsing"):
        message = f"expected a number, got {shown}"
    elif kind in ("int_type", "int_parsing", "int_from_float"):
        message = f"expected a whole number, got {shown}"
    elif kind in ("bool_type", "bool_parsing"):
        message = f"expected true or false, got {shown}"
    elif kind in ("string_type", "path_type"):
        message = f"expected text in quotes, got {shown}"
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        message = f"expected a table, got {shown}"
    elif kind == "list_type":
        message = f"expected a list, got {shown}"
        if isinstance(value, dict):
            table = ".".join(k for k in loc if isinstance(k, str))
            message += f"; write each entry as a [[{table}]] table (double brackets)"
    elif kind == "finite_number":
        message = f"must be a finite number, got {shown}"
    elif kind in _COMPARISONS:
        op, limit_key = _COMPARISONS[kind]
        got = shown if shown == "(hidden)" else bound(value)
        message = f"must be {op} {bound(ctx.get(limit_key))}, got {got}"
    elif kind == "literal_error":
        options = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        message = f"must be one of: {', '.join(options)}, got {shown}"
    elif kind == "union_tag_invalid":
        loc = (*loc, "type")
        tag = ctx.get("tag")
        message = f"unknown stage type {tag!r}; allowed: {', '.join(STAGE_TYPES)}"
    elif kind == "union_tag_not_found":
        loc = (*loc, "type")
        message = f"required key is missing; a stage needs a type: {', '.join(STAGE_TYPES)}"
    elif kind == _AT_KEY:
        if ctx.get("key"):
            loc = (*loc, ctx["key"])
        message = str(ctx.get("message", err["msg"]))
    elif kind == "value_error":
        message = err["msg"].removeprefix("Value error, ")
    else:
        message = err["msg"]
    return (*prefix, *loc), message
