"""Times as the platform side reads and shows them: ms since the epoch (UTC)."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime

from common.units import parse_duration


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def parse_when(text: str, now: int) -> int:
    """ms UTC from a duration ago (``90s``, ``15m``, ``1h``, ``2d``: common.units), an ISO
    8601 time (``2026-05-01T12:00:00Z``; without a zone it is UTC) or ms since the epoch.
    ValueError names what is accepted."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        return now - round(parse_duration(text) * 1000)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r}: give a duration ago (90s, 15m, 1h, 2d), an ISO 8601 time "
            "(2026-05-01T12:00:00Z) or ms since the epoch"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return math.floor(when.timestamp() * 1000)


def iso(ms: int | None) -> str:
    """``2026-05-01T12:00:00.250Z`` (UTC, milliseconds), "" for None."""
    if ms is None:
        return ""
    t = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
