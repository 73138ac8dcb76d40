"""Running the platform's `firmware_update` command (checked by agent/commands.py):
fetch the signed package from its https URL, check it names the image the command
names, hand it to the device's driver, and put the outcome in the `up/resp` answer
(docs/firmware-ota.md, "Platform-triggered updates").

The download is passed in (`Fetch`), so the agent uses `fetch_https` and the tests a
fake. The driver's `update_firmware` checks the signature against the device's
`firmware_key` before anything is sent, then the hardware id and version rule against
the device.
"""

from __future__ import annotations

import asyncio
import ssl
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

from agent.commands import FirmwareUpdateCommand, response
from common.redact import redact
from firmware_bridge.image import FirmwareError, parse
from firmware_bridge.ota import OtaResult, Outcome

__all__ = ["FETCH_TIMEOUT_S", "MAX_PACKAGE_BYTES", "Fetch", "answer", "fetch_https", "run_update"]

MAX_PACKAGE_BYTES = 4 * 1024 * 1024
FETCH_TIMEOUT_S = 60.0

#: the package's bytes at an https URL
Fetch = Callable[[str], Awaitable[bytes]]
#: update(package bytes, force) -> the outcome (a driver's update_firmware for one device)
Update = Callable[[bytes, bool], Awaitable[OtaResult]]


async def fetch_https(url: str) -> bytes:
    """The body at `url`: TLS verified against the system's CA store, at most
    MAX_PACKAGE_BYTES, FETCH_TIMEOUT_S per read; in a worker thread."""

    def get() -> bytes:
        ctx = ssl.create_default_context()
        req = urllib.request.Request(url, headers={"User-Agent": "citygw-ota"})
        with urllib.request.urlopen(req, timeout=FETCH_TIMEOUT_S, context=ctx) as resp:
            data: bytes = resp.read(MAX_PACKAGE_BYTES + 1)
        if len(data) > MAX_PACKAGE_BYTES:
            raise ValueError(f"larger than {MAX_PACKAGE_BYTES} bytes")
        return data

    return await asyncio.to_thread(get)


async def run_update(cmd: FirmwareUpdateCommand, update: Update, fetch: Fetch) -> OtaResult:
    """Fetches the package and updates the device; never raises for a download or a
    package problem (the result says `failed` or `refused`, with the reason)."""
    try:
        data = await fetch(cmd.url)
    except Exception as exc:  # any download failure is the command's answer, not a crash
        # the URL may carry credentials or a token, and the error may repeat it
        what = redact(f"cannot fetch {cmd.url}: {type(exc).__name__}: {exc}")
        return OtaResult(Outcome.FAILED, what)
    if len(data) > MAX_PACKAGE_BYTES:
        return OtaResult(Outcome.REFUSED, f"the package is larger than {MAX_PACKAGE_BYTES} bytes")
    if cmd.sha256 is not None:
        try:
            named = parse(data).manifest.sha256
        except FirmwareError as exc:
            return OtaResult(Outcome.REFUSED, str(exc))
        if named != cmd.sha256:
            return OtaResult(
                Outcome.REFUSED, "the package is not the image the command names (sha256 differs)"
            )
    return await update(data, cmd.force)


def answer(command_id: str, result: OtaResult) -> bytes:
    """The up/resp body of a finished firmware_update."""
    extra: dict[str, Any] = {"outcome": str(result.outcome)}
    if result.from_version:
        extra["from"] = result.from_version
    if result.to_version:
        extra["to"] = result.to_version
    ok = result.outcome is Outcome.UPDATED
    return response(command_id, None if ok else (result.reason or str(result.outcome)), extra)
