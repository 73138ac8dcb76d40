"""A few open stores for the console's requests. A store object serialises its calls on its
own connection, so one store would make every page wait for the slowest query; the pool
hands each call a free store and runs it in a thread (the stores are synchronous)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from starlette.concurrency import run_in_threadpool

from central.store import Store
from central.stores import open_store

T = TypeVar("T")


class StorePool:
    def __init__(self, url: str, size: int) -> None:
        self.url = url
        self._stores: list[Store] = []
        self._free: asyncio.Queue[Store] = asyncio.Queue()
        try:
            for _ in range(size):
                self._stores.append(open_store(url, create=False))
        except BaseException:
            self.close()
            raise
        for s in self._stores:
            self._free.put_nowait(s)

    async def run(self, call: Callable[[Store], T]) -> T:
        store = await self._free.get()
        try:
            return await run_in_threadpool(call, store)
        finally:
            self._free.put_nowait(store)

    def close(self) -> None:
        for s in self._stores:
            s.close()
        self._stores.clear()
