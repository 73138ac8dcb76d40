"""The ingest worker under systemd: READY=1 once subscribed, STATUS= for
`systemctl status`, and the watchdog's keep-alive while the store loop makes progress
(common/watchdog.py). A worker waiting for messages is idle, not stuck; one whose
store loop has not turned for the watchdog interval on top of its longest retry wait
(a store call that never returns) stops the pings, and systemd restarts it."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import TYPE_CHECKING

from common import watchdog
from common.sdnotify import Notifier

if TYPE_CHECKING:
    from central.worker import IngestWorker


def stalled_store(worker: IngestWorker, interval: float, now: float) -> dict[str, float]:
    if worker.store_turned is None:
        return {}
    return watchdog.stalled(
        {"store": worker.store_turned}, {"store": interval + worker.backoff_max}, now
    )


def service_status(worker: IngestWorker) -> str:
    c = worker.counters
    state = "subscribed" if worker.connected.is_set() else "connecting"
    return (
        f"{state}; since start: {c.readings_stored} readings in {c.batches_stored} batches "
        f"stored, {c.duplicates_dropped} duplicates, {c.rejected_total} rejected"
    )


async def notify_service(worker: IngestWorker, notifier: Notifier) -> None:
    """Until cancelled: the keep-alive (if systemd watches), READY=1 once subscribed."""
    interval = notifier.watchdog_s
    pinger = (
        asyncio.create_task(
            watchdog.keep_alive(
                notifier,
                interval,
                partial(stalled_store, worker, interval),
                partial(service_status, worker),
            )
        )
        if interval is not None
        else None
    )
    try:
        await worker.connected.wait()
        notifier.ready(service_status(worker))
        if pinger is not None:
            await pinger
    finally:
        if pinger is not None:
            pinger.cancel()
