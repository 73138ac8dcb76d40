"""The console config (central/console/config.py): a valid file, the defaults, and every
problem reported at once with its key path."""

from __future__ import annotations

from pathlib import Path

import pytest
from argon2 import PasswordHasher

from central.console.auth import token_hash
from central.console.config import ConfigError, load_console_config

HASH = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("s3cret")
TOKEN = token_hash("api-token")

VALID = f"""
[console]
session_ttl = "8h"

[[users]]
name = "ana"
role = "admin"
password_hash = "{HASH}"

[[users]]
name = "ben"
role = "viewer"
password_hash = "{HASH}"

[[tokens]]
name = "scada"
role = "operator"
token_hash = "{TOKEN}"

[[vitals]]
id = "hot"
name = "Street heat"
kind = "share_above"
select = {{ gateways = "street-*", points = "*/temperature", site = "north" }}
window = "15m"
threshold = 30
warn = 10
alarm = 25

[[vitals]]
id = "coldest"
name = "Coldest"
kind = "min"
unit = "°C"
warn = 2
alarm = -5
direction = "low"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "console.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_valid_config(tmp_path: Path) -> None:
    cfg = load_console_config(write(tmp_path, VALID))
    assert cfg.console.session_ttl == 8 * 3600
    assert [(u.name, u.role) for u in cfg.users] == [("ana", "admin"), ("ben", "viewer")]
    assert PasswordHasher().verify(cfg.users[0].password_hash, "s3cret")
    assert cfg.tokens[0].token_hash == TOKEN and TOKEN.startswith("sha256:") and len(TOKEN) == 71
    hot, coldest = cfg.vitals
    assert (hot.kind, hot.window, hot.threshold, hot.direction) == ("share_above", 900, 30, "high")
    assert (hot.select.gateways, hot.select.points, hot.select.site) == (
        "street-*",
        "*/temperature",
        "north",
    )
    assert (coldest.select.gateways, coldest.select.site, coldest.window) == ("*", None, 600)


def test_defaults(tmp_path: Path) -> None:
    cfg = load_console_config(write(tmp_path, ""))
    assert cfg.console.session_ttl == 12 * 3600
    assert (cfg.users, cfg.tokens, cfg.vitals) == ([], [], [])


BAD = f"""
[console]
session_ttl = "10s"
colour = "blue"

[[users]]
name = "ana"
role = "boss"
password_hash = "$2b$12$abcdefghijklmnopqrstuv"

[[users]]
name = "ana"
role = "admin"
password_hash = "{HASH}"

[[users]]
role = "viewer"
password_hash = "{HASH}"

[[tokens]]
name = "ana"
role = "viewer"
token_hash = "sha256:ABC"

[[tokens]]
name = "bad name"
role = "viewer"
token_hash = "{TOKEN.upper()}"

[[vitals]]
id = "share"
name = "Share"
kind = "share_below"

[[vitals]]
id = "share"
name = "Order"
kind = "max"
warn = 10
alarm = 5

[[vitals]]
id = "low"
name = "Low"
kind = "min"
direction = "sideways"
window = "soon"
select = {{ gateway = "x" }}

[[vitals]]
id = "odd"
name = "Odd"
kind = "median"
warn = "high"
"""


def test_every_problem_with_its_key_path(tmp_path: Path) -> None:
    path = write(tmp_path, BAD)
    with pytest.raises(ConfigError) as caught:
        load_console_config(path)
    got = {(i.key_path, i.message.split(";")[0]) for i in caught.value.issues}
    assert {i.source for i in caught.value.issues} == {str(path)}
    assert got == {
        ("console.session_ttl", "Input should be greater than or equal to 60"),
        ("console.colour", "unknown key 'colour'"),
        ("users[0].role", "must be one of: viewer, operator, admin"),
        ("users[0].password_hash", "not an argon2id hash ($argon2id$...)"),
        ("users[1].name", "duplicate 'ana' (also users[0])"),
        ("users[2].name", "required key is missing"),
        ("tokens[0].name", "duplicate 'ana' (also users[0])"),
        (
            "tokens[0].token_hash",
            "must be 'sha256:' and 64 lowercase hex digits (the token's SHA-256)",
        ),
        ("tokens[1].name", "'bad name' is not a valid name"),
        (
            "tokens[1].token_hash",
            "must be 'sha256:' and 64 lowercase hex digits (the token's SHA-256)",
        ),
        ("vitals[0].threshold", "required for kind 'share_below'"),
        ("vitals[1].id", "duplicate 'share' (also vitals[0])"),
        ("vitals[1].alarm", "must be >= warn (10) with direction 'high'"),
        ("vitals[2].direction", "must be one of: high, low"),
        ("vitals[2].window", "'soon' is not a duration"),
        ("vitals[2].select.gateway", "unknown key 'gateway'"),
        ("vitals[3].kind", f"must be one of: {', '.join(KINDS)}"),
        ("vitals[3].warn", "expected a number"),
    }
    assert HASH not in str(caught.value)  # a hash is never echoed


KINDS = (
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
)


def test_a_low_direction_wants_the_alarm_below_the_warning(tmp_path: Path) -> None:
    text = (
        '[[vitals]]\nid = "a"\nname = "A"\nkind = "min"\ndirection = "low"\nwarn = 1\nalarm = 2\n'
    )
    with pytest.raises(ConfigError, match=r"vitals\[0\]\.alarm: must be <= warn \(1\)"):
        load_console_config(write(tmp_path, text))


def test_syntax_and_encoding_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TOML syntax error"):
        load_console_config(write(tmp_path, "[[users]\n"))
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"[console]\n# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_console_config(path)
