"""The console's config (`citygw platform serve --config console.toml`; optional): who may
sign in (users with an argon2 password hash), which API clients may call it (tokens, kept
as their SHA-256), the vital signs the overview shows, and a few settings::

    [console]
    session_ttl = "12h"

    [[users]]
    name = "ana"
    role = "operator"                  # viewer | operator | admin
    password_hash = "$argon2id$v=19$m=65536,t=3,p=4$..."

    [[tokens]]
    name = "scada-bridge"
    role = "viewer"
    token_hash = "sha256:<64 hex digits>"   # `citygw platform new-token` makes one

    [[vitals]]
    id = "air-temp"
    name = "Hottest street sensor"
    kind = "max"
    select = { gateways = "street-*", points = "*/temperature", site = "north" }
    window = "10m"
    unit = "°C"
    warn = 30
    alarm = 35
    direction = "high"                 # which side is bad

Every problem is reported at once, each with its key path, as the gateway config does
(`ConfigError` / `ConfigIssue` from common/keypath.py)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from argon2 import Type, extract_parameters
from argon2.exceptions import InvalidHashError
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from common.keypath import AT_KEY, ConfigError, ConfigIssue, Section, at, fail, key_path
from common.units import Duration

Role = Literal["viewer", "operator", "admin"]
Direction = Literal["high", "low"]
#: max/min/mean: of the selected points' latest values in the window; share_above/below:
#: the share of them above/below `threshold`; share_healthy: of the selected gateways'
#: devices, healthy; online_share: of the selected gateways, online; active_alarms: raised
#: and not cleared, by severity; readings_per_minute: what the uplinks brought over the
#: window; data_loss: readings the selected gateways' buffers evicted or their agents lost
VitalKind = Literal[
    "max",
    "min",
    "mean",
    "share_above",
    "share_below",
    "share_healthy",
    "online_share",
    "active_alarms",
    "readings_per_minute",
    "data_loss",
]
SHARE_KINDS = frozenset({"share_above", "share_below"})

_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_TOKEN_HASH = re.compile(r"sha256:[0-9a-f]{64}")


def _check_name(v: str) -> str:
    if not _NAME.fullmatch(v):
        raise fail(f"{v!r} is not a valid name; use 1 to 64 letters, digits, '.', '@', '-' or '_'")
    return v


class ConsoleSettings(Section):
    #: a session ends this long after sign-in
    session_ttl: Duration = Field(12 * 3600.0, ge=60.0, le=30 * 86400.0)


class User(Section):
    name: str
    role: Role
    password_hash: str

    _name = field_validator("name")(_check_name)

    @field_validator("password_hash")
    @classmethod
    def _argon2(cls, v: str) -> str:
        try:
            params = extract_parameters(v)
        except InvalidHashError:
            params = None
        if params is None or params.type is not Type.ID:
            raise fail(
                "not an argon2id hash ($argon2id$...); make one with argon2-cffi: "
                "argon2.PasswordHasher().hash(password)"
            )
        return v


class Token(Section):
    name: str
    role: Role
    token_hash: str

    _name = field_validator("name")(_check_name)

    @field_validator("token_hash")
    @classmethod
    def _sha256(cls, v: str) -> str:
        if not _TOKEN_HASH.fullmatch(v):
            raise fail("must be 'sha256:' and 64 lowercase hex digits (the token's SHA-256)")
        return v


class Select(Section):
    """Which gateways and points a vital looks at: globs (`*`, `?`, case-insensitive) on
    the gateway id and the point key ("device/point"), and a site (exact)."""

    gateways: str = "*"
    points: str = "*"
    site: str | None = None


class VitalConfig(Section):
    id: str
    name: str
    kind: VitalKind
    select: Select = Field(default_factory=dict, validate_default=True)
    window: Duration = Field(default=600.0, gt=0.0, le=30 * 86400.0)
    #: the level share_above / share_below compare each point's latest value with
    threshold: float | None = Field(default=None, allow_inf_nan=False)
    unit: str = ""
    warn: float | None = Field(default=None, allow_inf_nan=False)
    alarm: float | None = Field(default=None, allow_inf_nan=False)
    direction: Direction = "high"

    _id = field_validator("id")(_check_name)

    @model_validator(mode="after")
    def _check(self) -> VitalConfig:
        if self.kind in SHARE_KINDS and self.threshold is None:
            raise at("threshold", f"required for kind {self.kind!r}")
        if self.warn is not None and self.alarm is not None:
            if self.direction == "high" and self.alarm < self.warn:
                raise at("alarm", f"must be >= warn ({self.warn:g}) with direction 'high'")
            if self.direction == "low" and self.alarm > self.warn:
                raise at("alarm", f"must be <= warn ({self.warn:g}) with direction 'low'")
        return self


class ConsoleConfig(Section):
    console: ConsoleSettings = Field(default_factory=dict, validate_default=True)
    users: list[User] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    vitals: list[VitalConfig] = Field(default_factory=list)


def load_console_config(path: str | Path) -> ConsoleConfig:
    """Load and validate a console config file. Raises OSError if it cannot be read, and
    ConfigError listing every problem (each with its key path) if it is invalid."""
    path = Path(path)
    source = str(path)
    try:
        raw = tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [ConfigIssue(source, "", f"not UTF-8 text (byte {exc.start}); save it as UTF-8")]
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigIssue(source, "", f"TOML syntax error: {exc}")]) from None
    issues: list[ConfigIssue] = []
    config: ConsoleConfig | None = None
    try:
        config = ConsoleConfig.model_validate(raw)
    except ValidationError as exc:
        issues += [ConfigIssue(source, *_translate(err)) for err in exc.errors()]
    issues += _duplicates(source, raw)
    if issues:
        raise ConfigError(issues)
    assert config is not None
    return config


def _duplicates(source: str, raw: dict[str, Any]) -> list[ConfigIssue]:
    """Names (users and tokens share them: both are who did an action) and vital ids that
    are not unique."""
    out: list[ConfigIssue] = []
    for tables, field in ((("users", "tokens"), "name"), (("vitals",), "id")):
        seen: dict[str, str] = {}
        for table in tables:
            entries = raw.get(table)
            for i, entry in enumerate(entries if isinstance(entries, list) else []):
                value = entry.get(field) if isinstance(entry, dict) else None
                if not isinstance(value, str):
                    continue
                where = key_path((table, i, field))
                if value in seen:
                    out.append(
                        ConfigIssue(source, where, f"duplicate {value!r} (also {seen[value]})")
                    )
                else:
                    seen[value] = key_path((table, i))
    return out


def _translate(err: ErrorDetails) -> tuple[str, str]:
    """(key path, message in plain words) of a pydantic error; never shows a hash."""
    loc: tuple[str | int, ...] = tuple(err["loc"])
    kind = err["type"]
    ctx: dict[str, Any] = dict(err.get("ctx") or {})
    if kind == AT_KEY:
        if ctx.get("key"):
            loc = (*loc, ctx["key"])
        return key_path(loc), str(ctx.get("message", err["msg"]))
    if kind == "missing":
        message = "required key is missing"
    elif kind == "extra_forbidden":
        message = f"unknown key {loc[-1]!r}"
    elif kind == "literal_error":
        options = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        message = f"must be one of: {', '.join(options)}"
    elif kind == "list_type":
        message = f"expected a list of [[{loc[-1]}]] tables (double brackets)"
    elif kind in ("model_type", "dict_type"):
        message = "expected a table"
    elif kind == "string_type":
        message = "expected text in quotes"
    elif kind in ("float_type", "float_parsing"):
        message = "expected a number"
    elif kind == "finite_number":
        message = "must be a finite number"
    elif kind == "value_error":
        message = err["msg"].removeprefix("Value error, ")
    else:
        message = err["msg"]
    return key_path(loc), message
