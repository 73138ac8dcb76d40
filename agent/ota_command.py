"""The platform's firmware update command: fetch a signed package from an HTTPS URL,
check it, push it to the microcontroller (docs/firmware-ota.md, "Platform-triggered
updates").

    {"id": "c-77", "op": "firmware_update", "url": "https://fw.example/mcu/2.1.0.cgfw",
     "sha256": "<optional hex SHA-256 of the image>", "force": false}

`parse_ota_command` is sans-I/O (a dict in, a checked command or CommandRefused out);
`ota_command` runs one and returns the `up/resp` body when the update is over. The
download and the push are passed in, so the agent supplies its bridge and the tests a
fake.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.commands import CommandRefused
from firmware_bridge.image import FirmwareError, Package, UpdatePolicy, parse
from firmware_bridge.ota import OtaResult, Outcome

__all__ = [
    "MAX_PACKAGE_BYTES",
    "OtaCommand",
    "fetch_https",
    "ota_command",
    "parse_ota_command",
]

OP = "firmware_update"
MAX_PACKAGE_BYTES = 4 * 1024 * 1024
MAX_URL = 2048
FETCH_TIMEOUT_S = 60.0

Fetch = Callable[[str], Awaitable[bytes]]
Push = Callable[[Package, UpdatePolicy], Awaitable[OtaResult]]


@dataclass(frozen=True, slots=True)
class OtaCommand:
    id: str
    url: str
    sha256: bytes | None
    force: bool


def parse_ota_command(obj: dict[str, Any]) -> OtaCommand:
    """The checked command (`obj` is the parsed JSON whose op is firmware_update)."""
    cid = obj.get("id")
    if not isinstance(cid, str) or not cid or len(cid) > 128:
        raise CommandRefused("command needs an 'id': a string of 1 to 128 characters")
    url = obj.get("url")
    if not isinstance(url, str) or len(url) > MAX_URL:
        raise CommandRefused(f"'url' must be a string of at most {MAX_URL} characters", cid)
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise CommandRefused(f"'url' must be an https:// URL, got {url!r}", cid)
    sha = obj.get("sha256")
    digest: bytes | None = None
    if sha is not None:
        try:
            digest = bytes.fromhex(sha) if isinstance(sha, str) else b""
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise CommandRefused("'sha256' must be 64 hex digits", cid)
    force = obj.get("force", False)
    if not isinstance(force, bool):
        raise CommandRefused("'force' must be true or false", cid)
    return OtaCommand(cid, url, digest, force)


async def fetch_https(url: str, ca_file: Path | None = None) -> bytes:
    """The body at `url` (verified TLS; at most MAX_PACKAGE_BYTES), in a worker thread."""

    def get() -> bytes:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        req = urllib.request.Request(url, headers={"User-Agent": "citygw-ota"})
        with urllib.request.urlopen(req, timeout=FETCH_TIMEOUT_S, context=ctx) as resp:
            data: bytes = resp.read(MAX_PACKAGE_BYTES + 1)
        if len(data) > MAX_PACKAGE_BYTES:
            raise ValueError(f"larger than {MAX_PACKAGE_BYTES} bytes")
        return data

    return await asyncio.to_thread(get)


def _answer(cid: str | None, result: OtaResult | None = None, error: str = "") -> bytes:
    body: dict[str, Any] = {
        "id": cid,
        "ok": result is not None and result.outcome is Outcome.UPDATED,
    }
    if result is not None:
        body["outcome"] = str(result.outcome)
        if result.from_version:
            body["from"] = result.from_version
        if result.to_version:
            body["to"] = result.to_version
        error = error or result.reason
    if error and not body["ok"]:
        body["error"] = error
    body["ts"] = time.time_ns() // 1_000_000
    return orjson.dumps(body)


async def ota_command(
    obj: dict[str, Any], public_key: Ed25519PublicKey, push: Push, fetch: Fetch = fetch_https
) -> bytes:
    """Runs one firmware_update command; the response body for `up/resp`.

    The package is refused (and never reaches `push`) unless it parses, matches the
    command's sha256 when given, and its signature verifies with `public_key`; `push`
    then applies the device checks (hardware id, version rule) and transfers it."""
    try:
        cmd = parse_ota_command(obj)
    except CommandRefused as exc:
        return _answer(exc.command_id, error=str(exc))
    try:
        data = await fetch(cmd.url)
    except Exception as exc:  # any download failure is the command's answer, not a crash
        return _answer(cmd.id, error=f"cannot fetch {cmd.url}: {type(exc).__name__}: {exc}")
    try:
        package = parse(data)
        if cmd.sha256 is not None and cmd.sha256 != package.manifest.sha256:
            return _answer(
                cmd.id, error="the package is not the image the command names (sha256 differs)"
            )
        package.verify_signature(public_key)
    except FirmwareError as exc:
        return _answer(cmd.id, error=str(exc))
    result = await push(package, UpdatePolicy(public_key, cmd.force))
    return _answer(cmd.id, result)
