"""Fixed-rate schedules that do not drift: tick k is due at start + k * period,
whatever the previous poll took. A tick reached more than half a period late (a poll
that overran, a stalled event loop) is skipped and counted, with any others missed, so
polls never run back to back."""

from __future__ import annotations

import asyncio
import math
import zlib
from collections.abc import Callable
from typing import ClassVar


def phase_for(name: str, period: float) -> float:
    """A stable offset in [0, period) so that devices with the same period do not
    all poll in the same instant."""
    return (zlib.crc32(name.encode()) % 1000) / 1000.0 * period


class FixedRate:
    #: called with every tick's lateness in seconds (from its due time to the moment the
    #: poll starts): the benchmark's poll jitter probe (bench/e2e.py); None (the default)
    #: costs one attribute read a tick
    observer: ClassVar[Callable[[float], None] | None] = None

    def __init__(self, period: float, phase: float = 0.0) -> None:
        if period <= 0:
            raise ValueError(f"period must be > 0, got {period}")
        self.period = period
        loop = asyncio.get_running_loop()
        self._start = loop.time() + phase
        self._tick = 0
        self.missed = 0

    async def wait(self) -> int:
        """Sleeps until the next tick is due; returns how many ticks were missed."""
        loop = asyncio.get_running_loop()
        due = self._start + self._tick * self.period
        now = loop.time()
        missed = 0
        if now > due + self.period / 2:
            # more than half a period late: skip to the first tick at most half a period
            # late, so that two polls never run back to back (nor share a timestamp)
            first_ahead = math.ceil((now - self.period / 2 - self._start) / self.period)
            missed = first_ahead - self._tick
            self._tick += missed
            due = self._start + self._tick * self.period
            self.missed += missed
        self._tick += 1
        if due > now:
            await asyncio.sleep(due - now)
        if FixedRate.observer is not None:
            FixedRate.observer(loop.time() - due)
        return missed
