"""common.timers: the event loop `citygw run` uses (timers to the microsecond)."""

from __future__ import annotations

import asyncio
import selectors
import socket
import time

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
