"""A config's identity (issue 15): its hash and version, as up/meta carries them."""

from __future__ import annotations

import hashlib

import orjson
import pytest

from agent.config import ConfigError, parse_config
from common import wire

TEXT = """
[gateway]
id = "gw-1"
{version}
[uplink]
broker = "mqtt://127.0.0.1:1883"
"""


def test_hash_is_of_the_text_and_version_defaults_to_its_start() -> None:
    text = TEXT.format(version="")
    cfg = parse_config(text)
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert cfg.hash == f"sha256:{digest}"
    assert cfg.version == digest[:12]
    named = parse_config(TEXT.format(version='config_version = "2026-12-07.1"'))
    assert named.version == "2026-12-07.1"
    assert named.hash != cfg.hash  # a comment or a space is a different config too


def test_config_version_is_bounded() -> None:
    with pytest.raises(ConfigError, match=r"gateway\.config_version"):
        parse_config(TEXT.format(version=f'config_version = "{"v" * 65}"'))


def test_meta_carries_the_config_identity() -> None:
    obj = {"v": 1, "gateway": "gw-1", "stream": "00" * 16, "points": []}
    ident = {"version": "v7", "hash": "sha256:" + "ab" * 32}
    got = wire.decode_meta(wire.encode_meta({**obj, "config": ident}))
    assert got.config == ident
    assert wire.decode_meta(wire.encode_meta(got)).config == ident
    assert wire.decode_meta(orjson.dumps(obj)).config is None  # a gateway before issue 15
    with pytest.raises(wire.WireError, match=r"config\.hash"):
        wire.encode_meta({**obj, "config": {"version": "v7"}})
