"""The clock check: the wall clock is synchronised (what systemd's timedatectl says, else
the kernel's own flag, which chrony, ntpd and timesyncd clear once they discipline it)
and not absurdly early (before 2020: a board without a real-time clock that booted
without network). Readings are stamped with this clock."""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import shutil
import subprocess

from agent.doctor.check import Check, passed

NAME = "clock"
#: the kernel's "clock not synchronised" status bit (linux/timex.h)
STA_UNSYNC = 0x0040
#: any clock before this is certainly wrong
EARLIEST = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)


class _Timex(ctypes.Structure):
    """struct timex (linux/timex.h), read with adjtimex(2) and modes = 0 (no change)."""

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long),
        ("time_usec", ctypes.c_long),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("reserved", ctypes.c_int * 11),
    ]


def parse_timedatectl(output: str) -> bool | None:
    """`timedatectl show -p NTPSynchronized` prints "NTPSynchronized=yes" (or no)."""
    for line in output.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "NTPSynchronized":
            return value.strip() == "yes"
    return None


def synced_from_status(status: int) -> bool:
    """The kernel's clock status word (struct timex .status): synchronised unless
    STA_UNSYNC is set."""
    return not status & STA_UNSYNC


def kernel_status() -> int | None:
    """The kernel's clock status word, by adjtimex(2); None where it cannot be read."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    tx = _Timex()
    if libc.adjtimex(ctypes.byref(tx)) < 0:
        return None
    return int(tx.status)


def synchronised(timeout: float) -> tuple[bool | None, str]:
    """(synchronised or None if unknown, where that was read)."""
    tool = shutil.which("timedatectl")
    if tool is not None:
        try:
            done = subprocess.run(
                [tool, "show", "-p", "NTPSynchronized"],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            done = None
        if done is not None and done.returncode == 0:
            found = parse_timedatectl(done.stdout)
            if found is not None:
                return found, "timedatectl"
    status = kernel_status()
    if status is None:
        return None, "nothing (no timedatectl, no adjtimex)"
    return synced_from_status(status), "the kernel (adjtimex)"


def clock_check(now: datetime.datetime, synced: bool | None, source: str) -> Check:
    shown = now.strftime("%Y-%m-%d %H:%M:%S UTC")
    if now < EARLIEST:
        return Check(
            NAME,
            "fail",
            f"the clock says {shown}: readings would be stamped years off",
            "set the time (timedatectl set-time, or let NTP reach its servers: UDP 123); "
            "a board without a battery-backed clock needs NTP at every boot",
        )
    if synced is None:
        return Check(
            NAME,
            "warn",
            f"{shown}; whether it is synchronised is unknown (asked {source})",
            "check the time against a reference; install and enable chrony or systemd-timesyncd",
        )
    if not synced:
        return Check(
            NAME,
            "warn",
            f"{shown}, not synchronised (per {source}): timestamps may drift",
            "enable NTP (timedatectl set-ntp true) and let it reach its servers (UDP 123); "
            "`chronyc tracking` or `timedatectl timesync-status` shows why it is not",
        )
    return passed(NAME, f"{shown}, synchronised (per {source})")
