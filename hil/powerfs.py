"""A FUSE passthrough filesystem that loses what was not synced: the rig's power cut.

A SIGKILL is not a power cut: the kernel still writes every page the process had written.
Here, a file's written-but-unsynced data lives only in this daemon's memory until the
file is synced, and `cut()` throws it away, as a power loss would.

    with PowerFs(backing_dir, mountpoint) as fs:     # daemon started, mounted
        ... the agent writes its buffer under mountpoint ...
        report = fs.cut(keep_fraction=0.3, seed=7)   # then SIGKILL the agent at once
        ... restart the agent on the same mountpoint ...
    # unmounted (fusermount3 -u, lazily if busy) and the daemon stopped, also on errors

The daemon (hil/powerfs_daemon.py) is its own process (``python -m hil.powerfs BACKING
MOUNTPOINT --control SOCKET``, foreground), so neither the rig's event loop nor its GIL
is shared with the filesystem; `PowerFs` starts it and talks to it over the control
socket (one JSON line each way per request). `cut`, `stats` and `set_errors` block for a
few milliseconds: call them from a thread (`asyncio.to_thread`) in an event loop.

The model, per file (identified by its backing inode, so renames and hard links follow it):

- Volatile state: dirty 4 KiB pages and a logical size, in the daemon's memory. A write
  dirties the pages it touches; truncate and extend (ftruncate, O_TRUNC) change only the
  logical size (a shrink drops the dirty pages beyond it and hides the backing bytes
  beyond it, so a later extension reads zeros). Reads merge the backing file with the
  dirty pages, up to the logical size; getattr reports the logical size.
- `fsync`/`fdatasync` of a file (through any of its handles) writes its pending
  truncation and dirty pages to the backing file; from then on they are durable. The
  backing file is the simulated disk: the host never loses power, so the daemon does not
  fsync the backing file itself. `flush`/`close` do not sync (as on Linux), and neither
  does anything else: there is no background writeback.
- Metadata passes through at once: create (an empty file), mkdir, unlink, rmdir, rename,
  link, symlink, chmod, chown, utimens are done on the backing directory before the call
  returns, and survive any cut (a documented limit; ext4's journal commits metadata
  within seconds anyway). `fsyncdir` is a no-op. A rename moves the file's dirty state
  with it, since the state belongs to the inode. Unlinking an open file renames it to
  ``.fuse_hiddenN`` (libfuse), removed at its last close.
- `cut(keep_fraction, seed)`, atomic with respect to every filesystem operation (one lock
  covers them all): first the OS "had written back" a random subset of the dirty pages,
  round(keep_fraction × all dirty pages), drawn uniformly over every file and written to
  the backing files in random order, each clipped to its file's logical size (a kept
  page past the backing file's end extends it); pending truncations are never applied.
  Then every dirty state is dropped. Every handle opened before the cut is dead: each
  operation on it (read, write, ftruncate, flush and so close, fsync) fails with EIO;
  fstat does not, since the kernel asks for attributes by inode, not by handle (it
  reports the backing file). The rig kills the process right after the cut. New opens
  see the backing files; with `stay_off=True` the power stays off instead: every
  operation but release fails with EIO (so nothing a writer does between the cut and its
  SIGKILL can reach the disk) until `power_on()`.

What the kernel may cache, so that it never serves data a cut dropped:

- No writeback cache (writes reach the daemon before write() returns). Regular files are
  opened with FOPEN_DIRECT_IO, so their data never sits in the page cache.
- Except files whose name ends with a cached suffix (default ``-shm``, SQLite's WAL index,
  which SQLite maps MAP_SHARED: this kernel refuses a shared mapping of a direct-I/O FUSE
  file with ENODEV, and libfuse 3.14 cannot ask for FUSE_DIRECT_IO_ALLOW_MMAP). They use
  the page cache, so every process that maps them shares the same pages; every open
  (keep_cache off) drops the inode's cached pages, and the dirty mapped pages a killed
  process leaves are written back through its dead handle and refused. SQLite also
  truncates the -shm when the first connection after a crash opens it.
- Entry, attribute and negative-lookup timeouts are 0: sizes are never stale after a cut.
- POSIX (fcntl) and flock locks are the kernel's own (the daemon implements no lock
  operation), so they work between processes on this mount as on a local filesystem.

Error injection (`set_errors`): with probability p each read fails with EIO, each write
with ENOSPC (nothing written), each fsync with EIO (nothing synced; the data stays dirty),
on files opened in direct-I/O mode only (a failed page-in of a mapped -shm would be a
SIGBUS).

Not modelled: torn pages (a kept page is written whole), metadata loss, O_APPEND races
between processes, fallocate (EOPNOTSUPP: glibc falls back to writing zeros).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "PAGE_SIZE",
    "CutReport",
    "FileCut",
    "FileStats",
    "PowerFs",
    "PowerFsError",
    "PowerFsUnavailable",
    "Stats",
    "check_available",
    "main",
]

log = logging.getLogger("hil.powerfs")

PAGE_SIZE = 4096
DEFAULT_CACHED_SUFFIXES = ("-shm",)
_REPO_ROOT = Path(__file__).resolve().parents[1]


class PowerFsError(RuntimeError):
    """The daemon failed to start, answer or stop; the message says what and where."""


class PowerFsUnavailable(PowerFsError):
    """FUSE cannot work on this machine (no /dev/fuse, fusermount3, libfuse3 or mfusepy)."""


# -- reports ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileCut:
    """What a cut did to one file. Bytes count page bytes within the logical size."""

    path: str  # relative to the mount, as last opened or renamed through it
    kept_pages: int
    dropped_pages: int
    kept_bytes: int
    dropped_bytes: int
    size_before: int  # the logical size the file had
    size_after: int  # the backing file's size afterwards


@dataclass(frozen=True, slots=True)
class CutReport:
    kept_pages: int
    dropped_pages: int
    kept_bytes: int
    dropped_bytes: int
    dead_handles: int  # handles opened before the cut and not yet released
    cuts: int  # cuts so far, this one included
    files: tuple[FileCut, ...]  # every file that had volatile state


@dataclass(frozen=True, slots=True)
class FileStats:
    path: str
    dirty_pages: int
    size: int  # logical
    durable_size: int  # the backing file's


@dataclass(frozen=True, slots=True)
class Stats:
    dirty_pages: int
    dirty_bytes: int
    open_handles: int  # live handles
    dead_handles: int  # handles killed by a cut, not yet released
    cuts: int
    reads: int
    writes: int
    bytes_written: int
    syncs: int
    injected_errors: int
    dead_handle_ops: int  # operations refused with EIO on handles a cut killed
    powered: bool  # False from cut(stay_off=True) until power_on()
    refused_while_off: int  # operations refused with EIO while the power was off
    files: tuple[FileStats, ...]  # files with volatile state


# -- the daemon's command line ------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hil.powerfs", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("backing", type=Path, help="the directory that plays the disk")
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--control", type=Path, required=True, help="Unix socket to listen on")
    parser.add_argument(
        "--cached-suffix",
        action="append",
        dest="cached_suffixes",
        help=f"file name suffix served through the page cache (default {DEFAULT_CACHED_SUFFIXES})",
    )
    parser.add_argument("--debug", action="store_true", help="libfuse's request trace")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    if not args.backing.is_dir():
        parser.error(f"backing directory {args.backing} does not exist")
    from hil.powerfs_daemon import serve  # here: it imports this module

    serve(
        args.backing,
        args.mountpoint,
        args.control,
        args.cached_suffixes or DEFAULT_CACHED_SUFFIXES,
        debug=args.debug,
    )
    return 0


# -- the rig's side -------------------------------------------------------------------------


def check_available() -> None:
    """Raises PowerFsUnavailable naming what is missing for a FUSE mount here."""
    if not os.path.exists("/dev/fuse"):
        raise PowerFsUnavailable("no /dev/fuse (load the fuse module; in a container: --device)")
    if shutil.which("fusermount3") is None:
        raise PowerFsUnavailable("no fusermount3 (Debian package fuse3)")
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:
        raise PowerFsUnavailable(f"mfusepy cannot load libfuse3 ({exc})") from exc


def _mounted(mountpoint: str) -> bool:
    """Whether mountpoint is in this mount namespace's table (no stat: a hung FUSE
    daemon would block it)."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            target = line.split(" ", 5)[4]
            if _unescape_mount(target) == mountpoint:
                return True
    return False


def _unescape_mount(field_text: str) -> str:
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field_text = field_text.replace(code, chr(int(code[1:], 8)))
    return field_text


class PowerFs:
    """The daemon for one mount: start it (or use the context manager), cut, stop.

    `workdir` holds the control socket and the daemon's log (`log_path`); by default a
    fresh temporary directory, removed at stop."""

    START_TIMEOUT_S = 15.0
    STOP_TIMEOUT_S = 10.0
    REQUEST_TIMEOUT_S = 30.0

    def __init__(
        self,
        backing: Path | str,
        mountpoint: Path | str,
        *,
        workdir: Path | str | None = None,
        cached_suffixes: Sequence[str] = DEFAULT_CACHED_SUFFIXES,
    ) -> None:
        self.backing = Path(backing).resolve()
        self.mountpoint = Path(mountpoint).resolve()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else None
        self.cached_suffixes = tuple(cached_suffixes)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def control_path(self) -> Path:
        return self._workdir() / "control.sock"

    @property
    def log_path(self) -> Path:
        return self._workdir() / "powerfs.log"

    def _workdir(self) -> Path:
        if self.workdir is None:
            raise PowerFsError("powerfs is not started")
        return self.workdir

    def __enter__(self) -> PowerFs:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Starts the daemon and returns once the mount serves and the control socket
        answers. Raises PowerFsUnavailable or PowerFsError (with the daemon's log)."""
        if self._proc is not None:
            raise PowerFsError(f"powerfs on {self.mountpoint} is already started")
        check_available()
        if _mounted(str(self.mountpoint)):
            raise PowerFsError(f"{self.mountpoint} is already a mount point")
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="powerfs-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "hil.powerfs", str(self.backing), str(self.mountpoint)]
        cmd += ["--control", str(self.control_path)]
        for suffix in self.cached_suffixes:
            cmd += [f"--cached-suffix={suffix}"]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        with self.log_path.open("wb") as log_file:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a ^C at the rig does not unmount under it
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.START_TIMEOUT_S
        delay = 0.01
        while True:
            if self._proc.poll() is not None:
                raise PowerFsError(
                    f"powerfs daemon for {self.mountpoint} exited with {self._proc.returncode}"
                    f" before mounting: {self._log_tail()}"
                )
            if _mounted(str(self.mountpoint)) and self.control_path.exists():
                with contextlib.suppress(OSError):
                    self._request({"op": "ping"})
                    return
            if time.monotonic() > deadline:
                raise PowerFsError(
                    f"powerfs on {self.mountpoint} not ready after {self.START_TIMEOUT_S} s:"
                    f" {self._log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return " | ".join(text.strip().splitlines()[-lines:]) or "(empty log)"

    def stop(self) -> None:
        """Unmounts (lazily if something still has files open) and stops the daemon."""
        proc, self._proc = self._proc, None
        try:
            if _mounted(str(self.mountpoint)):
                done = subprocess.run(
                    ["fusermount3", "-u", str(self.mountpoint)],
                    capture_output=True,
                    timeout=self.STOP_TIMEOUT_S,
                    check=False,
                )
                if done.returncode != 0:
                    # Files still open: detach the mount; the daemon would serve them
                    # until they are closed, so stop it (they get ENOTCONN).
                    log.warning(
                        "powerfs mount busy, unmounting lazily",
                        extra={"mountpoint": str(self.mountpoint), "error": done.stderr.decode()},
                    )
                    self._lazy_unmount()
                    if proc is not None:
                        proc.send_signal(signal.SIGTERM)
            if proc is not None:
                try:
                    proc.wait(timeout=self.STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            if _mounted(str(self.mountpoint)):
                self._lazy_unmount()
            if self._own_workdir and self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
                self.workdir = None

    def _lazy_unmount(self) -> None:
        subprocess.run(
            ["fusermount3", "-u", "-z", str(self.mountpoint)],
            capture_output=True,
            timeout=self.STOP_TIMEOUT_S,
            check=False,
        )

    def _request(self, request: dict[str, Any]) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.REQUEST_TIMEOUT_S)
            sock.connect(str(self.control_path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            with sock.makefile("rb") as reply_file:
                line = reply_file.readline()
        if not line:
            raise PowerFsError(
                f"powerfs on {self.mountpoint}: no reply to {request['op']}: {self._log_tail()}"
            )
        reply = json.loads(line)
        if not reply["ok"]:
            raise PowerFsError(f"powerfs on {self.mountpoint}: {request['op']}: {reply['error']}")
        result: dict[str, Any] = reply["result"]
        return result

    def cut(
        self, keep_fraction: float = 0.0, seed: int | None = None, *, stay_off: bool = False
    ) -> CutReport:
        """The power cut (see the module docstring). Kill the writers right after; with
        `stay_off`, every operation fails until `power_on()`."""
        request = {"op": "cut", "keep_fraction": keep_fraction, "seed": seed, "stay_off": stay_off}
        result = self._request(request)
        files = tuple(FileCut(**f) for f in result.pop("files"))
        return CutReport(files=files, **result)

    def power_on(self) -> None:
        """Ends a `cut(stay_off=True)`: the filesystem serves again."""
        self._request({"op": "power_on"})

    def stats(self) -> Stats:
        result = self._request({"op": "stats"})
        files = tuple(FileStats(**f) for f in result.pop("files"))
        return Stats(files=files, **result)

    def set_errors(
        self,
        *,
        write_enospc: float = 0.0,
        read_eio: float = 0.0,
        fsync_eio: float = 0.0,
        seed: int | None = None,
    ) -> None:
        """Injected error probabilities from now on (all 0: none)."""
        self._request(
            {
                "op": "set_errors",
                "write_enospc": write_enospc,
                "read_eio": read_eio,
                "fsync_eio": fsync_eio,
                "seed": seed,
            }
        )


if __name__ == "__main__":
    sys.exit(main())
