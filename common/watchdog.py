"""The systemd watchdog's keep-alive, sent only while the process makes progress.

`WatchdogSec=` restarts a service that stops sending WATCHDOG=1. A timer that pings
on its own would only prove that the event loop runs; so each loop that must keep
turning (the agent's flusher and uplink, the ingest's consumer) records
`time.monotonic()` when it completes a turn, and the keep-alive pings only while every
one of them turned recently enough: within the watchdog's interval plus that loop's own
longest legitimate pause (a flush interval, a bounded connect). A blocked event loop
runs nothing, this included; a loop stuck in an await that never ends (a hung SQLite
call on the buffer thread) stops its heartbeat: either way the pings stop and systemd
restarts the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import time
from collections.abc import Callable, Mapping

from common.sdnotify import Notifier

log = logging.getLogger("citygw.watchdog")

#: STATUS= (the line `systemctl status` shows) is refreshed this often, if it changed
STATUS_EVERY_S = 10.0


def stalled(
    heartbeats: Mapping[str, float], allowed: Mapping[str, float], now: float
) -> dict[str, float]:
    """The loops whose last turn is older than they are allowed, with its age (s). A
    heartbeat missing from `heartbeats` has not turned yet and is not judged."""
    return {
        name: round(now - last, 1)
        for name, last in heartbeats.items()
        if now - last > allowed.get(name, 0.0)
    }


async def keep_alive(
    notifier: Notifier,
    interval: float,
    check: Callable[[float], dict[str, float]],
    status: Callable[[], str] | None = None,
) -> None:
    """Every interval/2: WATCHDOG=1 if `check(time.monotonic())` finds nothing stalled,
    else nothing (and a log line when what is stalled changes). STATUS= from `status()`
    every STATUS_EVERY_S when it changed. Until cancelled.

    systemd kills a service that stops pinging with SIGABRT: faulthandler then writes
    every thread's traceback to stderr (the journal), which shows where it was stuck."""
    with contextlib.suppress(OSError, ValueError, RuntimeError):  # stderr has no fd
        faulthandler.enable()
    shown = ""
    shown_at = float("-inf")
    last_stalled: set[str] = set()
    while True:
        now = time.monotonic()
        late = check(now)
        if not late:
            notifier.watchdog()
            if last_stalled:
                log.warning("progress again, watchdog pings resumed")
        elif set(late) != last_stalled:
            log.error(
                "no progress: watchdog pings withheld (systemd restarts the service if this lasts)",
                extra={"stalled_s": late, "watchdog_s": interval},
            )
        last_stalled = set(late)
        if status is not None and now - shown_at >= STATUS_EVERY_S:
            line = status()
            if late:
                line += "; stalled: " + ", ".join(f"{k} {v:g} s" for k, v in late.items())
            if line != shown:
                notifier.status(line)
                shown = line
            shown_at = now
        await asyncio.sleep(interval / 2)
