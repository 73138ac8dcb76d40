"""The asyncio adapter between a serial port (a tty or a pty) and a sans-I/O Link.

The port is opened non-blocking and in raw mode; reads come through
`loop.add_reader`, writes go out directly and wait in `add_writer` only when the
kernel buffer is full, so the event loop never blocks. Timers run from
`link.next_deadline()`. `pace_baud` throttles writes to a line rate (a pty moves
bytes at memory speed; the benchmark and tests use it to behave like a UART).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import termios
import time
import tty
from collections.abc import Callable

from firmware_bridge.link import Event, Link

__all__ = ["PortClosed", "SerialTransport", "configure", "is_gone", "open_port"]

PACE_AHEAD = 256  # paced writes: bytes handed to the kernel ahead of the line


class PortClosed(ConnectionError):
    """The port went away (unplugged, hung up, closed by the other end)."""


def open_port(path: str, baud: int = 115200) -> int:
    """Opens a tty or pty non-blocking, raw, 8N1 at `baud`, and discards what its
    receiver already held (frames sent to an earlier process, say a CAPABILITIES that
    would pass for the answer to our first HELLO); returns the fd."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        configure(fd, baud)
        termios.tcflush(fd, termios.TCIFLUSH)
    except BaseException:
        os.close(fd)
        raise
    return fd


def configure(fd: int, baud: int) -> None:
    tty.setraw(fd)
    attrs = termios.tcgetattr(fd)
    speed = getattr(termios, f"B{baud}", None)
    if speed is None:
        raise ValueError(f"unsupported baud rate {baud}")
    attrs[2] |= termios.CLOCAL | termios.CREAD  # no modem control, receiver on
    attrs[4] = attrs[5] = speed
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


class SerialTransport:
    """Feeds a Link from a fd and writes what it produces; `on_event` gets every
    event. `run()` returns never: it raises PortClosed when the port dies."""

    def __init__(
        self,
        link: Link,
        fd: int,
        on_event: Callable[[Event], None],
        *,
        clock: Callable[[], float] = time.monotonic,
        pace_baud: int | None = None,
        read_filter: Callable[[bytes], bytes] | None = None,
        write_filter: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self.link = link
        self.fd = fd
        self.clock = clock
        self._on_event = on_event
        self._wbuf = bytearray()
        self._writer_armed = False
        self._wake = asyncio.Event()
        self._dead: asyncio.Future[None] | None = None
        self._bytes_per_s = pace_baud / 10 if pace_baud else None  # 8N1: 10 bits a byte
        self._line_free_at = 0.0  # when the paced line has sent everything written
        self._pace_timer: asyncio.TimerHandle | None = None
        self._read_filter = read_filter  # the simulator's faults: drop or mangle...
        self._write_filter = write_filter  # ...what arrives and what leaves
        self.bytes_rx = 0
        self.bytes_tx = 0

    def poke(self) -> None:
        """Call after `link.send(...)`: writes the frame and re-plans the timers."""
        self._flush()
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._dead = loop.create_future()
        loop.add_reader(self.fd, self._readable)
        try:
            while True:
                self._dispatch(self.link.tick(self.clock()))
                self._flush()
                deadline = self.link.next_deadline()
                timeout = None if deadline is None else max(0.0, deadline - self.clock())
                self._wake.clear()
                waker = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait(
                        (waker, self._dead), timeout=timeout, return_when="FIRST_COMPLETED"
                    )
                finally:
                    waker.cancel()
                if self._dead.done():
                    self._dead.result()  # raises PortClosed
        finally:
            self._stop(loop)

    def _stop(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self.fd)
        if self._writer_armed:
            loop.remove_writer(self.fd)
            self._writer_armed = False
        if self._pace_timer is not None:
            self._pace_timer.cancel()

    def _die(self, why: str) -> None:
        if self._dead is not None and not self._dead.done():
            self._dead.set_exception(PortClosed(why))
        # stop polling a dead fd (a hung-up pty stays readable forever)
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.fd)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError as e:
            self._die(f"read: {e.strerror or e}")
            return
        if not data:
            self._die("end of file (hung up)")
            return
        self.bytes_rx += len(data)
        if self._read_filter is not None:
            data = self._read_filter(data)
        now = self.clock()
        self._dispatch(self.link.receive(data, now))
        self._dispatch(self.link.tick(now))  # answers due now (HELLO after a reset...)
        self._flush()
        self._wake.set()

    def _dispatch(self, events: list[Event]) -> None:
        for ev in events:
            self._on_event(ev)

    def _flush(self) -> None:
        data = self.link.data_to_send()
        if data and self._write_filter is not None:
            data = self._write_filter(data)
        self._wbuf += data
        if not self._wbuf or self._writer_armed or self._pace_timer is not None:
            return
        self._write()

    def _write(self) -> None:
        self._pace_timer = None
        n = len(self._wbuf)
        bps = self._bytes_per_s
        now = self.clock()
        if bps is not None:
            # keep at most PACE_AHEAD bytes ahead of what the line has sent by now
            free = max(self._line_free_at, now)
            ahead = (free - now) * bps
            if ahead >= PACE_AHEAD:
                self._later((ahead - PACE_AHEAD / 2) / bps)
                return
            n = min(n, max(1, int(PACE_AHEAD - ahead)))
        try:
            written = os.write(self.fd, self._wbuf[:n])
        except BlockingIOError:
            written = 0
        except OSError as e:
            self._die(f"write: {e.strerror or e}")
            return
        del self._wbuf[:written]
        self.bytes_tx += written
        if bps is not None:
            self._line_free_at = max(self._line_free_at, now) + written / bps
        if not self._wbuf:
            return
        if written < n or bps is None:
            asyncio.get_running_loop().add_writer(self.fd, self._writable)
            self._writer_armed = True
        else:
            self._later((self._line_free_at - now) - PACE_AHEAD / 2 / bps)

    def _later(self, delay: float) -> None:
        self._pace_timer = asyncio.get_running_loop().call_later(max(0.0, delay), self._write)

    def _writable(self) -> None:
        asyncio.get_running_loop().remove_writer(self.fd)
        self._writer_armed = False
        self._write()


def is_gone(exc: BaseException) -> bool:
    """Errors that mean "the port is not there" rather than a bug."""
    if isinstance(exc, PortClosed):
        return True
    return isinstance(exc, OSError) and exc.errno in (
        errno.ENOENT,
        errno.ENODEV,
        errno.ENXIO,
        errno.EIO,
        errno.EBUSY,
        errno.EACCES,
    )
