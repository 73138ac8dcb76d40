"""Faults for the process under test: a full disk, a corrupt buffer database, wall-clock
steps, a crash at a random moment.

- `limit_file_size(pid, max_bytes)`: RLIMIT_FSIZE of a running process (prlimit). A write
  at or beyond `max_bytes` into any regular file fails with EFBIG (Python ignores SIGXFSZ,
  so the process is not killed); pipes and sockets are not affected. 0 fails every
  write to a regular file (appends and overwrites alike); N lets no file grow past N
  bytes. SQLite reports SQLITE_IOERR_WRITE (or SQLITE_FULL), which the citygw Buffer
  raises as BufferWriteError; with the limit lifted (None) its writes work again.
  Give the agent pipes, not files, for stdout/stderr while a limit is on.
- `corrupt_file(path, seed)`: random bytes over the pages of a SQLite file, so that the
  Buffer's open check finds it corrupt and moves it aside. Use it while no process has
  the file open.
- `FakeClock(path)`: libfaketime (Debian package ``faketime``) for a subprocess: its wall
  clock (time.time(), datetime.now(), ...) is offset from the real one by what `step()`
  writes to a file the library reads at every call; its monotonic clock is untouched.
  A FAKETIME variable in the subprocess's environment would override the file.
- `kill_at_random(proc, rng, lo_s, hi_s)`: SIGKILL after a delay drawn from rng.
"""

from __future__ import annotations

import asyncio
import glob
import os
import random
import resource
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = [
    "Damage",
    "FakeClock",
    "FakeTimeUnavailable",
    "Kill",
    "corrupt_file",
    "find_libfaketime",
    "kill_at_random",
    "limit_file_size",
]

# -- a full disk ------------------------------------------------------------------------


def limit_file_size(pid: int, max_bytes: int | None) -> tuple[int, int]:
    """Sets the soft RLIMIT_FSIZE of process `pid` to `max_bytes` (None: back to the hard
    limit, normally unlimited); the hard limit is left alone, so this can be undone
    without privileges. Returns the (soft, hard) limits it had before. Raises
    ProcessLookupError if there is no such process, PermissionError if it is not ours."""
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
    soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    new_soft = hard if max_bytes is None else max_bytes
    if hard != resource.RLIM_INFINITY and new_soft > hard:
        new_soft = hard
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (new_soft, hard))
    return soft, hard


# -- a corrupt database -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Damage:
    """What `corrupt_file` did."""

    path: Path
    page_size: int
    #: 1-based page numbers overwritten with random bytes
    pages: tuple[int, ...]
    header_kept: bool
    #: a -wal was beside the file and was checkpointed into it first
    wal_folded: bool


_SQLITE_MAGIC = b"SQLite format 3\x00"


def _page_size(header: bytes) -> int:
    if len(header) >= 18 and header.startswith(_SQLITE_MAGIC):
        size = int.from_bytes(header[16:18], "big")
        return 65536 if size == 1 else size if size >= 512 else 4096
    return 4096


def _fold_wal(path: Path) -> bool:
    """Checkpoints a -wal beside `path` into it (what a clean close does), so that newer
    copies of pages in the WAL cannot mask the damage. False if there is none or SQLite
    cannot read the file."""
    wal = Path(f"{path}-wal")
    if not wal.exists() or wal.stat().st_size == 0:
        return False
    try:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return False
    return True


def corrupt_file(path: str | Path, seed: int, *, keep_header: bool = True) -> Damage:
    """Overwrites every page of the SQLite file `path` after the first (with
    `keep_header=False`: the first too, so it is no longer recognised as SQLite) with
    random bytes from `random.Random(seed)`. Page 1 holds the header and the schema,
    whose tables then point at garbage: `PRAGMA quick_check` or the first read fails
    with SQLITE_CORRUPT (SQLITE_NOTADB without the header), and the citygw Buffer moves
    the file aside at open. A -wal beside it is checkpointed into the file first.
    Call it while no process has the database open."""
    path = Path(path)
    folded = _fold_wal(path)
    rng = random.Random(seed)
    with path.open("r+b") as f:
        header = f.read(100)
        page_size = _page_size(header)
        size = os.fstat(f.fileno()).st_size
        n_pages = max(1, -(-size // page_size))
        first = 1 if keep_header else 0
        pages = tuple(range(first + 1, n_pages + 1))
        if keep_header and n_pages == 1:  # a one-page file: keep only the 100-byte header
            f.seek(100)
            f.write(rng.randbytes(max(0, size - 100)))
            pages = (1,)
        else:
            for page in pages:
                offset = (page - 1) * page_size
                f.seek(offset)
                f.write(rng.randbytes(min(page_size, size - offset)))
        f.flush()
        os.fsync(f.fileno())
    return Damage(path, page_size, pages, keep_header, folded)


# -- wall-clock steps -------------------------------------------------------------------


class FakeTimeUnavailable(RuntimeError):
    """libfaketime is not installed (Debian: apt-get install faketime)."""


_LIBFAKETIME_GLOBS = (
    "/usr/lib/*/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
    "/usr/local/lib/faketime/libfaketime.so.1",
    "/usr/lib64/faketime/libfaketime.so.1",
)


def find_libfaketime() -> str | None:
    """The path of libfaketime.so.1 ($CITYGW_LIBFAKETIME first), or None."""
    explicit = os.environ.get("CITYGW_LIBFAKETIME")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for pattern in _LIBFAKETIME_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


# libfaketime 0.9.10 (Debian bookworm) breaks clock_nanosleep(CLOCK_MONOTONIC,
# TIMER_ABSTIME) when the monotonic clock is not faked: it passes a negative time to the
# kernel, so Python >= 3.11's time.sleep() raises OSError EINVAL for any duration
# (wolfcw/libfaketime#426, fixed after 0.9.10). The subprocess gets this sitecustomize,
# which replaces time.sleep by an equivalent select() wait when, and only when, the probe
# fails; it then imports any other sitecustomize further down sys.path.
_SITECUSTOMIZE = '''\
"""Written by hil.faults.FakeClock; see the comment above _SITECUSTOMIZE there."""
import os as _os
import sys as _sys


def _fix_sleep():
    import errno
    import select
    import time

    try:
        time.sleep(0)
        return
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            return
    monotonic = time.monotonic

    def sleep(secs, /):
        secs = float(secs)
        if not secs >= 0:
            raise ValueError("sleep length must be non-negative")
        deadline = monotonic() + secs
        while True:
            left = deadline - monotonic()
            if left <= 0:
                return
            select.select([], [], [], left)

    sleep.__doc__ = time.sleep.__doc__
    time.sleep = sleep


def _chain():
    import importlib

    here = _os.path.dirname(_os.path.abspath(__file__))
    me = _sys.modules.pop("sitecustomize", None)
    saved = _sys.path[:]
    _sys.path[:] = [p for p in saved if _os.path.abspath(p or ".") != here]
    try:
        importlib.import_module("sitecustomize")
    except ImportError:
        if me is not None:
            _sys.modules["sitecustomize"] = me
    finally:
        _sys.path[:] = saved


_fix_sleep()
_chain()
'''


def _format_offset(seconds: float) -> str:
    text = f"{seconds:+.6f}".rstrip("0").rstrip(".")
    return "+0" if text in ("+", "-", "+0", "-0") else text


class FakeClock:
    """The wall clock of a subprocess, steppable while it runs.

        clock = FakeClock(tmp / "clock")          # offset 0: the real time
        proc = subprocess.Popen([...], env={**os.environ, **clock.env})
        clock.step(-3600)                          # its time.time() is now an hour back
        clock.step(+7200)                          # two hours ahead of the real time
        clock.step(0)                              # the right time again

    `step(seconds)` sets the offset from the real clock (libfaketime's relative offsets:
    "+0", "-3600", "+7200"), written atomically to `path`, which libfaketime reads at
    every time call of the subprocess (FAKETIME_NO_CACHE=1, about 5 µs per call). The
    monotonic clock is not faked (FAKETIME_DONT_FAKE_MONOTONIC=1), so asyncio's timers
    keep running normally. With `fix_sleep`, a sitecustomize beside the file works around
    libfaketime 0.9.10's broken time.sleep() under Python >= 3.11 (see _SITECUSTOMIZE).
    Raises FakeTimeUnavailable if no libfaketime is found (or `library` does not exist)."""

    def __init__(
        self, path: str | Path, *, library: str | None = None, fix_sleep: bool = True
    ) -> None:
        lib = library or find_libfaketime()
        if lib is None or not Path(lib).is_file():
            where = library or "searched " + ", ".join(_LIBFAKETIME_GLOBS)
            raise FakeTimeUnavailable(
                f"libfaketime not found ({where}); "
                "install it (Debian/Ubuntu: apt-get install faketime)"
            )
        self.library = lib
        self.path = Path(path).resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.site_dir: Path | None = None
        if fix_sleep:
            self.site_dir = self.path.with_name(self.path.name + ".site")
            self.site_dir.mkdir(exist_ok=True)
            (self.site_dir / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        #: the current offset from the real wall clock, seconds
        self.offset = 0.0
        #: (real wall time, offset) of every change, the initial 0 first
        self.steps: list[tuple[float, float]] = []
        self._write()

    @property
    def env(self) -> dict[str, str]:
        """The variables to add to a subprocess's environment (LD_PRELOAD and PYTHONPATH
        include what os.environ has now)."""
        env = {
            "LD_PRELOAD": f"{self.library} {os.environ.get('LD_PRELOAD', '')}".strip(),
            "FAKETIME_TIMESTAMP_FILE": str(self.path),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }
        if self.site_dir is not None:
            parts = [str(self.site_dir), os.environ.get("PYTHONPATH", "")]
            env["PYTHONPATH"] = os.pathsep.join(p for p in parts if p)
        return env

    def step(self, seconds: float) -> None:
        """From its next time call on, the subprocess's wall clock is the real one +
        `seconds` (negative: behind); 0 puts it right again."""
        self.offset = float(seconds)
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(_format_offset(self.offset) + "\n")
        os.replace(tmp, self.path)
        self.steps.append((time.time(), self.offset))


# -- a crash ----------------------------------------------------------------------------


class _Process(Protocol):
    """subprocess.Popen or asyncio.subprocess.Process."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    def kill(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Kill:
    delay_s: float
    #: False: the process had exited before the delay was over (nothing was sent)
    killed: bool
    #: wall time of the kill (or of the check that found it gone)
    at: float


def _exited(proc: _Process) -> bool:
    poll = getattr(proc, "poll", None)  # Popen updates returncode only when polled
    if callable(poll):
        poll()
    return proc.returncode is not None


async def kill_at_random(proc: _Process, rng: random.Random, lo_s: float, hi_s: float) -> Kill:
    """Waits rng.uniform(lo_s, hi_s) seconds, then SIGKILLs `proc` (a subprocess.Popen or
    an asyncio subprocess) unless it has already exited. Does not reap it."""
    if not 0 <= lo_s <= hi_s:
        raise ValueError(f"need 0 <= lo_s <= hi_s, got {lo_s} and {hi_s}")
    delay = rng.uniform(lo_s, hi_s)
    await asyncio.sleep(delay)
    if _exited(proc):
        return Kill(delay, False, time.time())
    killed = True
    try:
        proc.kill()
    except ProcessLookupError:
        killed = False
    return Kill(delay, killed, time.time())
