"""common.timers: the event loop `citygw run` uses (timers to the microsecond)."""

from __future__ import annotations

import asyncio
import selectors
import socket
import time
from pathlib import Path

from common import timers


def test_the_selector_waits_at_least_its_timeout_and_reports_ready_fds() -> None:
    sel = timers.PreciseEpollSelector()
    a, b = socket.socketpair()
    try:
        sel.register(a, selectors.EVENT_READ, "a")
        t0 = time.monotonic()
        assert sel.select(0.0003) == []  # nothing ready: back after the timeout, not before
        assert time.monotonic() - t0 >= 0.0003
        b.send(b"x")
        ready = sel.select(10.0)  # ready: back at once, with the event
        assert [(key.data, events) for key, events in ready] == [("a", selectors.EVENT_READ)]
        assert sel.select(0) == sel.select(None) == ready  # level-triggered, like epoll
    finally:
        sel.close()
        a.close()
        b.close()


def test_run_serves_timers_and_streams() -> None:
    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, asyncio.SelectorEventLoop)
        assert isinstance(loop._selector, timers.PreciseEpollSelector)  # type: ignore[attr-defined]
        t0 = loop.time()
        await asyncio.sleep(0.002)
        assert loop.time() - t0 >= 0.002

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readexactly(5))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hello")
        answer = await reader.readexactly(5)
        writer.close()
        server.close()
        await server.wait_closed()
        return answer

    assert timers.run(main()) == b"hello"


def test_a_thread_gets_the_short_slice_it_asks_for() -> None:
    """On Linux 6.12+ (custom slices of fair threads) the calling thread's slice is the
    one asked for, as /proc shows it; an older kernel refuses (and says why) or ignores
    it, and nothing breaks. In a thread of its own: the slice stays with the thread."""
    import os
    import threading

    seen: dict[str, str | None] = {}

    def ask() -> None:
        seen["reason"] = timers.request_short_slice()
        sched = Path(f"/proc/self/task/{threading.get_native_id()}/sched").read_text()
        seen["slice"] = next(
            (line.split(":")[1].strip() for line in sched.splitlines() if "se.slice" in line),
            None,
        )

    t = threading.Thread(target=ask)
    t.start()
    t.join()
    release = tuple(int(x) for x in os.uname().release.split(".")[:2])
    if release >= (6, 12):
        assert seen == {"reason": None, "slice": str(timers.MIN_SLICE_NS)}
    else:
        assert seen["reason"] in (None, "sched_setattr: EINVAL"), seen
