"""The daemon of hil/powerfs.py, whose docstring states the model: the filesystem
operations over per-file volatile state, and the control socket. Runs in its own process
(``python -m hil.powerfs``)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import random
import socketserver
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from hil.powerfs import PAGE_SIZE, CutReport, FileCut, FileStats, Stats

__all__ = ["PowerOps", "serve"]

log = logging.getLogger("hil.powerfs")

# libfuse 3 fuse_common.h; mfusepy does not export the capability bits.
_FUSE_CAP_WRITEBACK_CACHE = 1 << 16
# libfuse's worker threads (the operations still take one lock); also the idle-thread
# limit, which libfuse 3.14 warns about when it is left unset.
_MAX_THREADS = 4
_CONTROL_POLL_S = 0.05  # how soon the control server notices its shutdown


# -- the volatile state of one file ---------------------------------------------------------


class _Volatile:
    """One backing inode: its dirty pages and logical size, over a read-write fd.

    Invariants: `valid <= size`; the bytes of a dirty page beyond `size` are zero;
    backing bytes at or beyond `valid` are not file data (they read as zero)."""

    __slots__ = ("disk_size", "fd", "handles", "key", "pages", "path", "size", "valid")

    def __init__(self, key: tuple[int, int], fd: int, path: str, disk_size: int) -> None:
        self.key = key
        self.fd = fd
        self.path = path
        self.disk_size = disk_size  # the backing file's size
        self.size = disk_size  # the logical size
        self.valid = disk_size  # backing bytes below this are still file data
        self.pages: dict[int, bytearray] = {}
        self.handles = 0

    @property
    def dirty(self) -> bool:
        return bool(self.pages) or self.size != self.disk_size or self.valid != self.disk_size

    def page_bytes(self, index: int) -> int:
        """How many bytes of page `index` lie within the logical size."""
        return max(0, min(PAGE_SIZE, self.size - index * PAGE_SIZE))

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        out = bytearray(end - offset)
        disk_end = min(end, self.valid)
        if offset < disk_end:
            chunk = os.pread(self.fd, disk_end - offset, offset)
            out[: len(chunk)] = chunk
        if self.pages:
            for index in range(offset // PAGE_SIZE, (end - 1) // PAGE_SIZE + 1):
                page = self.pages.get(index)
                if page is None:
                    continue
                base = index * PAGE_SIZE
                lo, hi = max(offset, base), min(end, base + PAGE_SIZE)
                out[lo - offset : hi - offset] = page[lo - base : hi - base]
        return bytes(out)

    def write(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        end = offset + len(data)
        pos = offset
        while pos < end:
            index = pos // PAGE_SIZE
            base = index * PAGE_SIZE
            hi = min(end, base + PAGE_SIZE)
            page = self.pages.get(index)
            if page is None:
                whole = pos == base and hi == base + PAGE_SIZE
                page = bytearray(PAGE_SIZE) if whole else self._load(index)
                self.pages[index] = page
            page[pos - base : hi - base] = view[pos - offset : hi - offset]
            pos = hi
        self.size = max(self.size, end)

    def _load(self, index: int) -> bytearray:
        page = bytearray(PAGE_SIZE)
        base = index * PAGE_SIZE
        n = min(PAGE_SIZE, self.valid - base)
        if n > 0:
            chunk = os.pread(self.fd, n, base)
            page[: len(chunk)] = chunk
        return page

    def truncate(self, length: int) -> None:
        if length < self.size:
            first_gone = -(-length // PAGE_SIZE)
            span = -(-self.size // PAGE_SIZE) - first_gone
            # whichever is shorter: the pages past the new end, or the dirty ones
            gone = (
                [i for i in range(first_gone, first_gone + span) if i in self.pages]
                if span < len(self.pages)
                else [i for i in self.pages if i >= first_gone]
            )
            for index in gone:
                del self.pages[index]
            tail = self.pages.get(length // PAGE_SIZE) if length % PAGE_SIZE else None
            if tail is not None:
                tail[length % PAGE_SIZE :] = bytes(PAGE_SIZE - length % PAGE_SIZE)
            self.valid = min(self.valid, length)
        self.size = length

    def sync(self) -> None:
        """Makes the logical file durable: pending truncation, dirty pages, size."""
        disk_end = self.disk_size
        if self.valid < disk_end:
            os.ftruncate(self.fd, self.valid)
            disk_end = self.valid
        for start, run in _runs(self.pages):
            os.pwritev(self.fd, run, start * PAGE_SIZE)
            disk_end = max(disk_end, (start + len(run)) * PAGE_SIZE)
        if disk_end != self.size:
            os.ftruncate(self.fd, self.size)
        self.pages.clear()
        self.disk_size = self.valid = self.size

    def write_back(self, index: int) -> int:
        """The OS wrote one dirty page before the power went: returns its bytes."""
        n = self.page_bytes(index)
        if n:
            os.pwrite(self.fd, memoryview(self.pages[index])[:n], index * PAGE_SIZE)
        return n


def _runs(pages: dict[int, bytearray]) -> Iterator[tuple[int, list[bytearray]]]:
    """Consecutive dirty pages, in order, as (first index, pages)."""
    start = -2
    run: list[bytearray] = []
    for index in sorted(pages):
        if run and index == start + len(run):
            run.append(pages[index])
            continue
        if run:
            yield start, run
        start, run = index, [pages[index]]
    if run:
        yield start, run


@dataclass(slots=True)
class _Handle:
    file: _Volatile
    epoch: int
    cached: bool  # page-cache mode (mmap-able), not direct I/O


@dataclass(slots=True)
class _Errors:
    write_enospc: float = 0.0
    read_eio: float = 0.0
    fsync_eio: float = 0.0
    rng: random.Random = field(default_factory=random.Random)


class _FileInfo(Protocol):
    """The fields of libfuse's struct fuse_file_info this filesystem uses."""

    flags: int
    fh: int
    direct_io: int
    keep_cache: int


# -- the filesystem -------------------------------------------------------------------------


def _eio() -> OSError:
    return OSError(errno.EIO, os.strerror(errno.EIO))


class PowerOps:
    """The filesystem operations (mfusepy with raw_fi=True: file ops get the
    fuse_file_info). Every operation holds `_lock`, so a cut is atomic."""

    use_ns = True  # utimens and getattr times in integer nanoseconds

    def __init__(self, backing: Path, cached_suffixes: Sequence[str]) -> None:
        self._root = os.path.realpath(backing)
        self._cached_suffixes = tuple(cached_suffixes)
        self._lock = threading.Lock()
        self._files: dict[tuple[int, int], _Volatile] = {}
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self._epoch = 0  # number of cuts
        self._off = False  # after cut(stay_off=True), until power_on()
        self._errors = _Errors()
        self._counts = dict.fromkeys(
            (
                "reads",
                "writes",
                "bytes_written",
                "syncs",
                "injected",
                "dead_handle_ops",
                "refused_while_off",
            ),
            0,
        )

    @contextlib.contextmanager
    def _powered(self) -> Iterator[None]:
        """Holds the lock for a filesystem operation; EIO while the power is off."""
        with self._lock:
            if self._off:
                self._counts["refused_while_off"] += 1
                raise _eio()
            yield

    # -- helpers (call with the lock held) --

    def _real(self, path: str | None) -> str:
        if path is None:  # only for ops on an unlinked file, which go through its handle
            raise _eio()
        return self._root + path

    def _handle(self, fi: _FileInfo | None) -> _Handle | None:
        """The live handle behind fi; None if fi is not one of ours (a directory);
        EIO if a cut killed it."""
        if fi is None:
            return None
        handle = self._handles.get(fi.fh)
        if handle is not None and handle.epoch != self._epoch:
            self._counts["dead_handle_ops"] += 1
            raise _eio()
        return handle

    def _live(self, fi: _FileInfo) -> _Handle:
        handle = self._handle(fi)
        if handle is None:
            raise OSError(errno.EBADF, f"powerfs: no open file with handle {fi.fh}")
        return handle

    def _inject(self, handle: _Handle, p: float, code: int) -> None:
        if p > 0.0 and not handle.cached and self._errors.rng.random() < p:
            self._counts["injected"] += 1
            raise OSError(code, os.strerror(code))

    def _volatile(self, path: str, fd: int | None = None) -> _Volatile:
        """The state of the file at `path` (or of the open `fd` on it), created clean."""
        if fd is None:
            key_st = os.stat(self._real(path))
            found = self._files.get((key_st.st_dev, key_st.st_ino))
            if found is not None:
                return found
            try:
                fd = os.open(self._real(path), os.O_RDWR | os.O_CLOEXEC)
            except PermissionError:
                fd = os.open(self._real(path), os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        found = self._files.get(key)
        if found is not None:
            os.close(fd)
            return found
        volatile = _Volatile(key, fd, path, st.st_size)
        self._files[key] = volatile
        return volatile

    def _forget_if_idle(self, volatile: _Volatile) -> None:
        """Drops the state of a file nobody has open that is clean or deleted."""
        if volatile.handles or self._files.get(volatile.key) is not volatile:
            return
        if volatile.dirty and os.fstat(volatile.fd).st_nlink > 0:
            return
        del self._files[volatile.key]
        os.close(volatile.fd)

    def _open_handle(self, volatile: _Volatile, path: str, fi: _FileInfo) -> None:
        if fi.flags & os.O_TRUNC:
            volatile.truncate(0)
        cached = path.endswith(self._cached_suffixes)
        volatile.handles += 1
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _Handle(volatile, self._epoch, cached)
        fi.fh = fh
        fi.direct_io = 0 if cached else 1
        fi.keep_cache = 0

    def _key_at(self, path: str) -> tuple[int, int] | None:
        try:
            st = os.lstat(self._real(path))
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino)

    # -- libfuse --

    def init_with_config(self, conn: Any, config: Any) -> None:
        if config is not None:
            config.entry_timeout = 0.0
            config.attr_timeout = 0.0
            config.negative_timeout = 0.0
            config.ac_attr_timeout_set = 0
            # An open file unlinked is renamed to .fuse_hiddenN until its last close
            # (libfuse's default), so fstat on it still finds it by path.
            config.hard_remove = 0
            config.direct_io = 0  # chosen per open
            config.kernel_cache = 0
            config.auto_cache = 0
        if conn is not None:
            conn.want &= ~_FUSE_CAP_WRITEBACK_CACHE
            log.debug("powerfs mounted", extra={"capable": conn.capable, "want": conn.want})

    def destroy(self, path: str) -> None:
        with self._lock:
            for volatile in self._files.values():
                os.close(volatile.fd)
            self._files.clear()

    def getattr(self, path: str | None, fi: _FileInfo | None = None) -> dict[str, int]:
        with self._powered():
            handle = self._handle(fi)
            if handle is not None:
                st = os.fstat(handle.file.fd)
                volatile: _Volatile | None = handle.file
            else:
                st = os.lstat(self._real(path))
                volatile = self._files.get((st.st_dev, st.st_ino))
            attrs = {
                key: getattr(st, key)
                for key in ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_rdev")
            }
            attrs["st_size"] = volatile.size if volatile is not None else st.st_size
            attrs["st_blocks"] = -(-attrs["st_size"] // 512)
            attrs["st_atime"] = st.st_atime_ns
            attrs["st_mtime"] = st.st_mtime_ns
            attrs["st_ctime"] = st.st_ctime_ns
            return attrs

    def open(self, path: str, fi: _FileInfo) -> int:
        with self._powered():
            self._open_handle(self._volatile(path), path, fi)
        return 0

    def create(self, path: str, mode: int, fi: _FileInfo) -> int:
        with self._powered():
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (fi.flags & os.O_EXCL)
            fd = os.open(self._real(path), flags, mode)
            self._open_handle(self._volatile(path, fd), path, fi)
        return 0

    def read(self, path: str | None, size: int, offset: int, fi: _FileInfo) -> bytes:
        with self._powered():
            handle = self._live(fi)
            self._inject(handle, self._errors.read_eio, errno.EIO)
            self._counts["reads"] += 1
            return handle.file.read(offset, size)

    def write(self, path: str | None, data: bytes, offset: int, fi: _FileInfo) -> int:
        with self._powered():
            handle = self._live(fi)
            self._inject(handle, self._errors.write_enospc, errno.ENOSPC)
            handle.file.write(data, offset)
            self._counts["writes"] += 1
            self._counts["bytes_written"] += len(data)
            return len(data)

    def truncate(self, path: str | None, length: int, fi: _FileInfo | None = None) -> int:
        with self._powered():
            handle = self._handle(fi)
            if handle is not None:
                handle.file.truncate(length)
                return 0
            if path is None:
                raise _eio()
            volatile = self._volatile(path)
            volatile.truncate(length)
            self._forget_if_idle(volatile)
        return 0

    def flush(self, path: str | None, fi: _FileInfo) -> int:
        with self._powered():
            self._handle(fi)
        return 0

    def fsync(self, path: str | None, datasync: int, fi: _FileInfo) -> int:
        with self._powered():
            handle = self._live(fi)
            self._inject(handle, self._errors.fsync_eio, errno.EIO)
            handle.file.sync()
            self._counts["syncs"] += 1
        return 0

    def release(self, path: str | None, fi: _FileInfo) -> int:
        with self._lock:
            handle = self._handles.pop(fi.fh, None)
            if handle is not None and handle.epoch == self._epoch:
                handle.file.handles -= 1
                self._forget_if_idle(handle.file)
        return 0

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        return 0  # metadata is on the backing directory already

    def readdir(self, path: str, fh: int) -> list[str]:
        with self._powered():
            return [".", "..", *os.listdir(self._real(path))]

    def readlink(self, path: str) -> str:
        with self._powered():
            return os.readlink(self._real(path))

    def mkdir(self, path: str, mode: int) -> int:
        with self._powered():
            os.mkdir(self._real(path), mode)
        return 0

    def rmdir(self, path: str) -> int:
        with self._powered():
            os.rmdir(self._real(path))
        return 0

    def symlink(self, target: str, source: str) -> int:
        """Creates the link `target` pointing to `source` (mfusepy's argument order)."""
        with self._powered():
            os.symlink(source, self._real(target))
        return 0

    def link(self, target: str, source: str) -> int:
        """Creates the hard link `target` to the existing `source`."""
        with self._powered():
            os.link(self._real(source), self._real(target))
        return 0

    def unlink(self, path: str) -> int:
        with self._powered():
            key = self._key_at(path)
            os.unlink(self._real(path))
            volatile = self._files.get(key) if key is not None else None
            if volatile is not None:
                self._forget_if_idle(volatile)
        return 0

    def rename(self, old: str, new: str) -> int:
        with self._powered():
            moved, replaced = self._key_at(old), self._key_at(new)
            os.rename(self._real(old), self._real(new))
            volatile = self._files.get(moved) if moved is not None else None
            if volatile is not None:
                volatile.path = new
            gone = self._files.get(replaced) if replaced not in (None, moved) else None
            if gone is not None:
                self._forget_if_idle(gone)
        return 0

    def chmod(self, path: str | None, mode: int) -> int:
        with self._powered():
            if path is not None:
                os.chmod(self._real(path), mode)
        return 0

    def chown(self, path: str | None, uid: int, gid: int) -> int:
        with self._powered():
            if path is not None:
                os.chown(self._real(path), uid, gid, follow_symlinks=False)
        return 0

    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
        if path is None:
            return 0
        with self._powered():
            if times is None:
                os.utime(self._real(path), follow_symlinks=False)
            else:
                os.utime(self._real(path), ns=times, follow_symlinks=False)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self._root)
        return {
            key: getattr(st, key)
            for key in (
                "f_bsize",
                "f_frsize",
                "f_blocks",
                "f_bfree",
                "f_bavail",
                "f_files",
                "f_ffree",
                "f_favail",
                "f_flag",
                "f_namemax",
            )
        }

    # -- the control requests --

    def cut(self, keep_fraction: float, seed: int | None, stay_off: bool) -> CutReport:
        if not 0.0 <= keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be within 0..1, got {keep_fraction}")
        rng = random.Random(seed)
        with self._lock:
            files = sorted(self._files.values(), key=lambda v: (v.path, v.key))
            dirty = [(v, i) for v in files for i in sorted(v.pages)]
            kept = rng.sample(dirty, round(keep_fraction * len(dirty)))
            kept_by_file: dict[tuple[int, int], list[int]] = {}
            for volatile, index in kept:  # in random order, as writeback would
                kept_by_file.setdefault(volatile.key, []).append(volatile.write_back(index))
            report: list[FileCut] = []
            for volatile in files:
                sizes = kept_by_file.get(volatile.key, [])
                total = sum(volatile.page_bytes(i) for i in volatile.pages)
                if volatile.dirty:
                    report.append(
                        FileCut(
                            path=volatile.path,
                            kept_pages=len(sizes),
                            dropped_pages=len(volatile.pages) - len(sizes),
                            kept_bytes=sum(sizes),
                            dropped_bytes=total - sum(sizes),
                            size_before=volatile.size,
                            size_after=os.fstat(volatile.fd).st_size,
                        )
                    )
                os.close(volatile.fd)
            self._files.clear()
            dead = sum(1 for h in self._handles.values() if h.epoch == self._epoch)
            self._epoch += 1
            self._off = stay_off
            log.info("power cut", extra={"cut": self._epoch, "dead_handles": dead})
            return CutReport(
                kept_pages=sum(f.kept_pages for f in report),
                dropped_pages=sum(f.dropped_pages for f in report),
                kept_bytes=sum(f.kept_bytes for f in report),
                dropped_bytes=sum(f.dropped_bytes for f in report),
                dead_handles=dead,
                cuts=self._epoch,
                files=tuple(report),
            )

    def power_on(self) -> None:
        with self._lock:
            self._off = False

    def stats(self) -> Stats:
        with self._lock:
            files = sorted(
                (v for v in self._files.values() if v.dirty), key=lambda v: (v.path, v.key)
            )
            live = sum(1 for h in self._handles.values() if h.epoch == self._epoch)
            return Stats(
                dirty_pages=sum(len(v.pages) for v in files),
                dirty_bytes=sum(v.page_bytes(i) for v in files for i in v.pages),
                open_handles=live,
                dead_handles=len(self._handles) - live,
                cuts=self._epoch,
                reads=self._counts["reads"],
                writes=self._counts["writes"],
                bytes_written=self._counts["bytes_written"],
                syncs=self._counts["syncs"],
                injected_errors=self._counts["injected"],
                dead_handle_ops=self._counts["dead_handle_ops"],
                powered=not self._off,
                refused_while_off=self._counts["refused_while_off"],
                files=tuple(
                    FileStats(v.path, len(v.pages), v.size, os.fstat(v.fd).st_size) for v in files
                ),
            )

    def set_errors(
        self, write_enospc: float, read_eio: float, fsync_eio: float, seed: int | None
    ) -> None:
        for name, p in (
            ("write_enospc", write_enospc),
            ("read_eio", read_eio),
            ("fsync_eio", fsync_eio),
        ):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be within 0..1, got {p}")
        with self._lock:
            self._errors = _Errors(write_enospc, read_eio, fsync_eio, random.Random(seed))

    def control(self, request: dict[str, Any]) -> dict[str, Any]:
        """One control request (a decoded JSON object) to its JSON-able reply."""
        op = request.get("op")
        if op == "ping":
            return {}
        if op == "cut":
            report = self.cut(
                float(request.get("keep_fraction", 0.0)),
                request.get("seed"),
                bool(request.get("stay_off", False)),
            )
            return dataclasses.asdict(report)
        if op == "power_on":
            self.power_on()
            return {}
        if op == "stats":
            return dataclasses.asdict(self.stats())
        if op == "set_errors":
            self.set_errors(
                float(request.get("write_enospc", 0.0)),
                float(request.get("read_eio", 0.0)),
                float(request.get("fsync_eio", 0.0)),
                request.get("seed"),
            )
            return {}
        raise ValueError(f"unknown control op {op!r}")


# -- the daemon -----------------------------------------------------------------------------


class _ControlServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, ops: PowerOps) -> None:
        self.ops = ops
        super().__init__(path, _ControlHandler)


class _ControlHandler(socketserver.StreamRequestHandler):
    server: _ControlServer

    def handle(self) -> None:
        for line in self.rfile:
            try:
                reply = {"ok": True, "result": self.server.ops.control(json.loads(line))}
            except Exception as exc:  # the client gets the error; the daemon lives on
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            self.wfile.write(json.dumps(reply).encode() + b"\n")


def _fuse_class() -> Any:
    import mfusepy

    class Fuse(mfusepy.FUSE):
        """mfusepy drops the file info of a libfuse 3 truncate; ftruncate needs it."""

        def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
            name = None if path is None else path.decode(self.encoding, self.errors)
            fi = fip.contents if fip else None
            return int(self.operations.truncate(name, length, fi))

    return Fuse


def serve(
    backing: Path,
    mountpoint: Path,
    control: Path,
    cached_suffixes: Sequence[str],
    *,
    debug: bool = False,
) -> None:
    """Mounts and serves until unmounted (or SIGTERM/SIGINT); the control socket lives
    as long."""
    ops = PowerOps(backing, cached_suffixes)
    with contextlib.suppress(FileNotFoundError):
        control.unlink()
    server = _ControlServer(str(control), ops)
    thread = threading.Thread(
        target=server.serve_forever, args=(_CONTROL_POLL_S,), name="powerfs-control", daemon=True
    )
    thread.start()
    try:
        _fuse_class()(
            ops,
            str(mountpoint),
            raw_fi=True,
            foreground=True,
            debug=debug,
            fsname="powerfs",
            subtype="powerfs",
            max_threads=_MAX_THREADS,
            max_idle_threads=_MAX_THREADS,
        )
    finally:
        server.shutdown()
        server.server_close()
        with contextlib.suppress(FileNotFoundError):
            control.unlink()
