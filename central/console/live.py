"""Live updates: what changed in the store reaches every open page within about a second.

The store is the only thing `platform serve` processes share, so the changes come from it:
`Store.change_marks()` gives, per kind (readings, alarms, events, gateways), a number that
grows when that kind changes. One task per process reads them every `interval_s` and
tells its subscribers (the server-sent event streams) which kinds moved. On PostgreSQL the
writers also NOTIFY in their transactions, and a LISTEN passes each kind on as it comes:
a notification arrives after its commit, so the page that refetches sees the change,
while a mark may move before (sequences do) — there the marks are the backstop for a
notification lost with a dropped connection, read every `backstop_s`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Final

from central.console.pool import StorePool
from central.store import CHANGE_KINDS, CHANGES_CHANNEL
from common.supervise import TaskHealth, supervise

log = logging.getLogger("citygw.console")

#: a subscriber that does not read keeps only the union of what it missed
_QUEUE_SIZE: Final = 1


class LiveHub:
    def __init__(
        self,
        pool: StorePool,
        *,
        interval_s: float = 0.5,
        backstop_s: float = 1.0,
        listen_url: str | None = None,
    ) -> None:
        self._pool = pool
        self._listen_url = listen_url  # a PostgreSQL store: LISTEN there too
        self.interval_s = backstop_s if listen_url is not None else interval_s
        self._subscribers: set[asyncio.Queue[frozenset[str]]] = set()
        self._wake = asyncio.Event()
        self._marks: dict[str, int] | None = None
        self.health = {name: TaskHealth(name) for name in ("live-marks", "live-listen")}

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    async def run(self) -> None:
        """The hub's tasks, supervised, until cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(supervise(self.health["live-marks"], self._poll, restart_on_return=True))
            if self._listen_url is not None:
                tg.create_task(
                    supervise(self.health["live-listen"], self._listen, restart_on_return=True)
                )

    async def _poll(self) -> None:
        while True:
            marks = await self._pool.run(lambda s: s.change_marks())
            if self._marks is not None:
                changed = frozenset(k for k, v in marks.items() if self._marks.get(k) != v)
                if changed:
                    self.publish(changed)
            self._marks = marks
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)

    async def _listen(self) -> None:
        import psycopg

        from central.store_postgres import split_url

        assert self._listen_url is not None
        conninfo, _ = split_url(self._listen_url)
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as db:
            await db.execute(f"LISTEN {CHANGES_CHANNEL}")
            async for n in db.notifies():
                if n.payload in CHANGE_KINDS:
                    self.publish(frozenset((n.payload,)))

    def wake(self) -> None:
        """Read the marks now (this process changed the store: its own pages need not
        wait for the next round)."""
        self._wake.set()

    def publish(self, kinds: frozenset[str]) -> None:
        for q in self._subscribers:
            missed = q.get_nowait() if q.full() else frozenset()
            q.put_nowait(kinds | missed)  # a slow page refreshes once for all it missed

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[frozenset[str]]]:
        q: asyncio.Queue[frozenset[str]] = asyncio.Queue(_QUEUE_SIZE)
        self._subscribers.add(q)
        try:
            yield q
        finally:
            self._subscribers.discard(q)
