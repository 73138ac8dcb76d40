"""`McuBridge`: the asyncio controller of one microcontroller link.

It owns a port, a `HostLink` and its `SerialTransport`, and turns link events into
awaitables: `wait_up()`, `send()` (until ACKed), `request()` (until the reply that
names the request's seq), `command()`, `wait_for()` a message type, and `events()`
for a consumer (the mcu driver). OTA code (`firmware_bridge/ota.py`) builds on
`request()`, `send(..., reliable=False)`, `wait_for()` and `link.max_payload`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

from firmware_bridge import messages as m
from firmware_bridge.link import (
    Delivered,
    Event,
    HostLink,
    LinkLost,
    LinkUp,
    MessageReceived,
    SendFailed,
    Timers,
)
from firmware_bridge.serial_io import PortClosed, SerialTransport, open_port

__all__ = ["BridgeError", "McuBridge", "SendError"]

M = TypeVar("M", bound=m.Message)
T = TypeVar("T")

EVENT_QUEUE = 1000  # per subscriber; beyond it the oldest events are dropped (counted)


class BridgeError(Exception):
    """The bridge is closed or the port died."""


class SendError(BridgeError):
    """A reliable message was not acknowledged; `reason` as in link.SendFailed."""

    def __init__(self, message: m.Message, reason: str) -> None:
        super().__init__(f"{type(message).__name__} not delivered: {reason}")
        self.reason = reason


class McuBridge:
    """``async with McuBridge(port) as b: caps = await b.wait_up(); ...``"""

    def __init__(
        self,
        port: str,
        baud: int = 115200,
        *,
        timers: Timers | None = None,
        max_frame: int = 1024,
        pace_baud: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.port = port
        self.baud = baud
        self.clock = clock
        self.link = HostLink(max_frame=max_frame, timers=timers, now=clock())
        self._pace_baud = pace_baud
        self._fd: int | None = None
        self._transport: SerialTransport | None = None
        self._task: asyncio.Task[None] | None = None
        self._up = asyncio.Event()
        self._delivery: dict[int, asyncio.Future[None]] = {}
        self._replies: dict[tuple[int, int], asyncio.Future[m.Message]] = {}
        self._waiters: list[tuple[type[m.Message], asyncio.Future[m.Message]]] = []
        self._subscribers: list[asyncio.Queue[Event | None]] = []
        self.dropped_events = 0
        self.error: BaseException | None = None

    # -- lifetime -------------------------------------------------------------------------

    async def open(self) -> None:
        """Opens the port and starts the link (HELLO goes out at once). Raises OSError."""
        self._fd = open_port(self.port, self.baud)
        self.link = HostLink(
            max_frame=self.link.max_frame, timers=self.link.timers, now=self.clock()
        )
        self._transport = SerialTransport(
            self.link, self._fd, self._on_event, clock=self.clock, pace_baud=self._pace_baud
        )
        self._task = asyncio.create_task(self._run(self._transport), name=f"mcu:{self.port}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._fail_all(BridgeError("bridge closed"))

    async def __aenter__(self) -> McuBridge:
        await self.open()
        return self

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        ev: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _run(self, transport: SerialTransport) -> None:
        try:
            await transport.run()
        except PortClosed as e:
            self.error = e
            self._fail_all(BridgeError(f"serial port {self.port}: {e}"))

    async def wait_closed(self) -> None:
        """Returns when the port died (then `error` says why) or the bridge was closed."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._task)

    # -- state ----------------------------------------------------------------------------

    @property
    def is_up(self) -> bool:
        return self._up.is_set()

    @property
    def capabilities(self) -> m.Capabilities | None:
        return self.link.capabilities

    @property
    def transport(self) -> SerialTransport | None:
        return self._transport

    async def wait_up(self, timeout: float | None = None) -> m.Capabilities:
        """Waits until the device answered HELLO; raises TimeoutError or BridgeError."""
        self._check_open()
        await self._race(self._up.wait(), timeout)
        caps = self.link.capabilities
        assert caps is not None
        return caps

    # -- sending --------------------------------------------------------------------------

    def send_nowait(self, message: m.Message, reliable: bool = False) -> int:
        """Queues a message and writes it now; returns its seq (no waiting)."""
        self._check_open()
        assert self._transport is not None
        seq = self.link.send(message, self.clock(), reliable=reliable)
        self._transport.poke()
        return seq

    async def send(self, message: m.Message, timeout: float | None = None) -> int:
        """Sends reliably and waits for the ACK; raises SendError or TimeoutError."""
        fut = asyncio.get_running_loop().create_future()
        seq = self.send_nowait(message, reliable=True)
        self._delivery[seq] = fut
        try:
            await self._race(fut, timeout)
        except SendError:
            raise
        finally:
            self._delivery.pop(seq, None)
        return seq

    async def request(self, message: m.Message, timeout: float = 10.0) -> m.Message:
        """Sends a request reliably and returns the reply naming its seq (a
        CAPABILITIES, COMMAND_RESULT, OTA_BEGIN_RESULT, OTA_END_RESULT or OTA_STATUS).
        Raises SendError if it was not delivered, TimeoutError if no reply came."""
        reply_type = m.REPLY_TYPES[message.TYPE]
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[m.Message] = loop.create_future()
        delivered: asyncio.Future[None] = loop.create_future()
        seq = self.send_nowait(message, reliable=True)
        key = (int(reply_type), seq)
        self._replies[key] = reply
        self._delivery[seq] = delivered
        delivered.add_done_callback(lambda f: _forward_error(f, reply))
        try:
            return await self._race(reply, timeout)
        finally:
            self._replies.pop(key, None)
            self._delivery.pop(seq, None)

    async def command(self, command: m.Command, timeout: float = 10.0) -> m.CommandResult:
        reply = await self.request(command, timeout)
        assert isinstance(reply, m.CommandResult)
        return reply

    async def wait_for(self, kind: type[M], timeout: float | None = None) -> M:
        """The next message of a type (registered now: call before what provokes it)."""
        fut: asyncio.Future[m.Message] = asyncio.get_running_loop().create_future()
        entry = (kind, fut)
        self._waiters.append(entry)  # type: ignore[arg-type]
        try:
            msg = await self._race(fut, timeout)
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)  # type: ignore[arg-type]
        assert isinstance(msg, kind)
        return msg

    async def events(self) -> AsyncIterator[Event]:
        """Every link event from now on; ends (raising BridgeError) when the port dies."""
        q: asyncio.Queue[Event | None] = asyncio.Queue(EVENT_QUEUE)
        self._subscribers.append(q)
        try:
            while True:
                ev = await q.get()
                if ev is None:
                    raise BridgeError(f"serial port {self.port}: {self.error or 'closed'}")
                yield ev
        finally:
            self._subscribers.remove(q)

    # -- internals ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._task is None or self._task.done():
            why = self.error or "not open"
            raise BridgeError(f"serial port {self.port}: {why}")

    async def _race(self, aw: Awaitable[T], timeout: float | None) -> T:
        """Awaits `aw` unless the port dies first (BridgeError) or time runs out."""
        assert self._task is not None
        target = asyncio.ensure_future(aw)
        dead = asyncio.ensure_future(asyncio.shield(self._task))
        try:
            done, _ = await asyncio.wait(
                (target, dead), timeout=timeout, return_when="FIRST_COMPLETED"
            )
        finally:
            dead.cancel()
        if target in done:
            return target.result()
        target.cancel()
        if dead in done or self._task.done():
            raise BridgeError(f"serial port {self.port}: {self.error or 'closed'}")
        raise TimeoutError

    def _on_event(self, ev: Event) -> None:
        if isinstance(ev, LinkUp):
            self._up.set()
        elif isinstance(ev, LinkLost):
            self._up.clear()
        elif isinstance(ev, Delivered):
            fut = self._delivery.get(ev.seq)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif isinstance(ev, SendFailed):
            fut = self._delivery.get(ev.seq)
            if fut is not None and not fut.done():
                fut.set_exception(SendError(m.Ack(), ev.reason))
        elif isinstance(ev, MessageReceived):
            self._on_message(ev.message)
        for q in self._subscribers:
            if q.full():
                q.get_nowait()
                self.dropped_events += 1
            q.put_nowait(ev)

    def _on_message(self, msg: m.Message) -> None:
        seq = getattr(msg, "request_seq", None)
        if seq is not None:
            fut = self._replies.get((int(msg.TYPE), seq))
            if fut is not None and not fut.done():
                fut.set_result(msg)
        for kind, waiter in list(self._waiters):
            if isinstance(msg, kind) and not waiter.done():
                waiter.set_result(msg)

    def _fail_all(self, exc: BaseException) -> None:
        self._up.clear()
        futures: list[asyncio.Future[Any]] = [*self._delivery.values(), *self._replies.values()]
        for fut in futures:
            if not fut.done():
                fut.set_exception(exc)
        for _, waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(exc)
        for q in self._subscribers:
            if q.full():
                q.get_nowait()
            q.put_nowait(None)


def _forward_error(delivered: asyncio.Future[None], reply: asyncio.Future[m.Message]) -> None:
    """A request that was never delivered will get no reply: fail the reply too (but a
    reply that came although the ACK was lost wins)."""
    if delivered.cancelled() or reply.done():
        return
    exc = delivered.exception()
    if exc is not None:
        reply.set_exception(exc)
