"""An asyncio event loop whose timers fire within tens of microseconds of their time.

asyncio waits for I/O and timers in epoll_wait, whose timeout is in whole milliseconds:
the selector rounds the wait for the next timer up to the next millisecond, so a timer
fires up to 1 ms late (0.5 ms on average) even on an idle loop, and a 10 ms poll
schedule inherits that as jitter. PreciseEpollSelector waits with select() on the epoll
descriptor itself, whose timeout is in microseconds, then collects the ready events
without waiting. It costs one extra system call per wait.

A timer that fires still needs the CPU: `request_short_slice` (below) lets the loop's
thread take it from a busy thread of the same process at once.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import platform
import select
import selectors
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
FD_SETSIZE = 1024  # select() takes descriptors below this (glibc)


class PreciseEpollSelector(selectors.EpollSelector):
    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout > 0:
            # wakes when an fd is ready or at the timeout, to the microsecond (the epoll
            # descriptor is readable while it has events); the events are read below
            select.select([self.fileno()], [], [], timeout)
            timeout = 0
        return super().select(timeout)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """An event loop on PreciseEpollSelector; the default loop where epoll is missing or
    its descriptor is past what select() takes (a process with over 1000 files open)."""
    if not hasattr(select, "epoll"):
        return asyncio.new_event_loop()
    selector = PreciseEpollSelector()
    if selector.fileno() >= FD_SETSIZE:
        selector.close()
        return asyncio.new_event_loop()
    return asyncio.SelectorEventLoop(selector)


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main) on a loop from new_event_loop."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)


#: sched_setattr(2) by machine (the generic table's number where the architecture has one)
_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274, "riscv64": 274, "armv7l": 380, "i686": 351}
#: the shortest slice the kernel grants a fair thread (Linux: 0.1 ms)
MIN_SLICE_NS = 100_000


class _SchedAttr(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("sched_policy", ctypes.c_uint32),
        ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32),
        ("sched_priority", ctypes.c_uint32),
        ("sched_runtime", ctypes.c_uint64),
        ("sched_deadline", ctypes.c_uint64),
        ("sched_period", ctypes.c_uint64),
    ]


def request_short_slice(slice_ns: int = MIN_SLICE_NS) -> str | None:
    """Asks the kernel for a `slice_ns` time slice for the calling thread (policy and
    nice unchanged); None when granted, else why not.

    Linux's EEVDF scheduler (6.6+) lets a thread that wakes take the CPU from a running
    one only if its deadline, a slice after it became eligible, comes first; with the
    default slice (0.75 ms or more) a poll falling due while the buffer thread flushes on
    the same core waits up to that long, whatever their nice values. A thread that asked
    for a short slice (Linux 6.12+, no privilege needed) preempts at once: in
    bench/e2e.py at 300k readings/s the poll jitter p99 went from 2.2-2.9 ms to
    0.85-1.5 ms on a 2-core VM. Older kernels refuse it (EINVAL) or ignore it, and nothing
    changes."""
    number = _SCHED_SETATTR.get(platform.machine())
    if sys.platform != "linux" or number is None:
        return f"not on this platform ({sys.platform} {platform.machine()})"
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    attr = _SchedAttr(ctypes.sizeof(_SchedAttr), os.SCHED_OTHER, 0, nice, 0, slice_ns, 0, 0)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(number, 0, ctypes.byref(attr), 0) == 0:
        return None
    code = ctypes.get_errno()
    return f"sched_setattr: {errno.errorcode.get(code, str(code))}"
