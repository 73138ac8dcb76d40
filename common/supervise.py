"""Supervision of long-lived tasks: the agent's (drivers, uplink, flusher, intake, status)
and the platform's (the ingest's rollups, the console's live updates).

A street cabinet nobody visits must heal itself: a task that raises something nobody
planned for is logged with its traceback, counted, shown in `citygw status` (what failed
and when), and started again after an exponential backoff, never in a tight loop and
never given up. Errors a task knows how to handle (a lost broker, a refused flush) it
handles itself; this is the net below them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from common.reconnect import backoff_delay

log = logging.getLogger("citygw.agent")

#: a run that lasted this long, or longer than the backoff before it, made progress: the
#: next failure backs off from the start (a task that fails at once backs off to the max)
STABLE_AFTER_S = 60.0


@dataclass(slots=True)
class TaskHealth:
    """What `citygw status` shows of one supervised task."""

    name: str
    state: str = "running"  # running | backoff | finished
    failures: int = 0
    last_error: str | None = None
    last_failure_ms: int | None = None
    restarts: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "failures": self.failures,
            "last_error": self.last_error,
            "last_failure_ms": self.last_failure_ms,
            "restarts": self.restarts,
        }


def describe(exc: BaseException) -> str:
    """``Type: message``; an exception group (a TaskGroup's) by its first leaf."""
    if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        first = exc.exceptions[0]
        more = len(exc.exceptions) - 1
        return describe(first) + (f" (and {more} more)" if more else "")
    return f"{type(exc).__name__}: {exc}"


async def supervise(
    health: TaskHealth,
    run: Callable[[], Awaitable[None]],
    *,
    backoff_min: float = 1.0,
    backoff_max: float = 60.0,
    restart_on_return: bool = False,
    rng: random.Random | None = None,
) -> None:
    """Runs `run()` until cancelled, restarting it after an unexpected exception with
    full-jitter exponential backoff (reset after a run of STABLE_AFTER_S). A `run()` that
    returns is finished, unless `restart_on_return` (a loop that must never end)."""
    rng = rng or random.Random()
    attempt = 0
    delay = 0.0
    while True:
        health.state = "running"
        started = time.monotonic()
        failure: Exception | None = None
        try:
            await run()
            if not restart_on_return:
                health.state = "finished"
                return
            error = "returned, but it must run until stopped"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the net: anything the task did not handle itself
            failure = exc
            error = describe(exc)
        ran = time.monotonic() - started
        if ran >= STABLE_AFTER_S or ran > delay:
            attempt = 0
        delay = backoff_delay(attempt, backoff_min, backoff_max, rng)
        attempt += 1
        health.failures += 1
        health.last_error = error[:500]
        health.last_failure_ms = time.time_ns() // 1_000_000
        health.state = "backoff"
        log.error(
            "task failed, restarting",
            extra={"task": health.name, "error": health.last_error, "retry_in_s": round(delay, 2)},
            exc_info=failure,
        )
        await asyncio.sleep(delay)
        health.restarts += 1
