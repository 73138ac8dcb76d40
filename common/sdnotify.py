"""systemd's service notification protocol (sd_notify(3)), spoken directly.

A service started with `Type=notify` finds a datagram socket's path in $NOTIFY_SOCKET
and sends it newline-separated ``KEY=value`` lines: READY=1 once it serves, STATUS=
for `systemctl status`, WATCHDOG=1 as the keep-alive `WatchdogSec=` asks for,
RELOADING=1 / STOPPING=1 around a reload and a stop. A path starting with ``@`` is in
the abstract namespace (a leading NUL byte). Without $NOTIFY_SOCKET (a terminal, a
test, another supervisor) every call does nothing.

The protocol is a few lines and stable, and systemd documents it for reimplementation;
the PyPI packages are unmaintained (`sdnotify`, `sd-notify`) or bind libsystemd, which
a gateway image would need headers or a C extension for (`systemd-python`, `cysystemd`).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

from common.logs import Throttle

log = logging.getLogger("citygw.sdnotify")


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """The watchdog's timeout in seconds (WatchdogSec=), or None when this process is
    not watched: $WATCHDOG_USEC unset or not a positive number, or $WATCHDOG_PID naming
    another process (a parent that passed its environment on)."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


def _one_line(text: str) -> str:
    """A newline in a value would start another KEY=value."""
    return " ".join(text.split())


class Notifier:
    """Sends notifications to the service manager at $NOTIFY_SOCKET; `watchdog_s` is
    the watchdog's timeout, or None (both read from `environ` when made; `Notifier({})`
    is a silent one). A failed send is logged (at most once a minute) and otherwise
    ignored: the service runs on, and a watchdog that hears nothing restarts it, which
    is the right outcome."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        path = environ.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None
        if not path:
            self.address = None
        elif path.startswith("@"):  # abstract namespace: a NUL, then the name
            self.address = b"\0" + path[1:].encode()
        elif path.startswith("/"):
            self.address = path
        else:  # vsock:… and other forms systemd may pass: not for us
            log.warning("NOTIFY_SOCKET not a unix socket path, ignored", extra={"path": path})
            self.address = None
        self.watchdog_s = watchdog_interval(environ) if self.address is not None else None
        self._sock: socket.socket | None = None
        self._throttle = Throttle(60.0)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Sends ``KEY=value`` lines (keyword names as they are, e.g. READY=1); False if
        nothing was sent (no socket, or the send failed)."""
        if self.address is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            if self._sock is None:
                # non-blocking: a manager that does not read (its queue full) must never
                # stall the caller's event loop; that notification is lost instead
                kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                self._sock = socket.socket(socket.AF_UNIX, kind)
            self._sock.sendto(message, self.address)
        except OSError as exc:  # gone, or not reading (EAGAIN)
            if (failures := self._throttle.ready("send")) is not None:
                log.error(
                    "service manager notification failed",
                    extra={"socket": repr(self.address), "error": str(exc), "failures": failures},
                )
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify(READY=1, **({"STATUS": _one_line(status)} if status else {}))

    def status(self, text: str) -> bool:
        return self.notify(STATUS=_one_line(text))

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def reloading(self) -> bool:
        """Before a reload; READY=1 when it is over. MONOTONIC_USEC lets
        `Type=notify-reload` match the two."""
        return self.notify(
            RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        )

    def stopping(self) -> bool:
        return self.notify(STOPPING=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
