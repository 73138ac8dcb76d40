"""hil/powerfs.py: the FUSE filesystem that loses unsynced data on a simulated power cut,
and the SQLite facts the rig's power-loss scenario relies on, checked on the mount.

Every test mounts its own filesystem; a machine without FUSE fails them (never skips)."""

from __future__ import annotations

import errno
import fcntl
import inspect
import os
import queue
import random
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hil.powerfs import PAGE_SIZE, PowerFs, PowerFsError, check_available

WAIT_S = 15.0  # the most any condition is waited for


def write_file(path: Path, data: bytes, *, sync: bool) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


# -- the filesystem's model ---------------------------------------------------------------


def test_unsynced_write_is_lost_synced_write_survives(fs: PowerFs) -> None:
    mnt, disk = fs.mountpoint, fs.backing
    write_file(mnt / "volatile", b"v" * 10_000, sync=False)
    write_file(mnt / "durable", b"d" * 10_000, sync=True)
    # Written data is visible through the mount but not yet on the simulated disk.
    assert (mnt / "volatile").read_bytes() == b"v" * 10_000
    assert (disk / "volatile").stat().st_size == 0
    assert (disk / "durable").read_bytes() == b"d" * 10_000
    assert fs.stats().dirty_pages == 3

    report = fs.cut()

    assert report.dropped_pages == 3 and report.kept_pages == 0
    assert report.dropped_bytes == 10_000
    assert [(f.path, f.dropped_pages, f.size_before, f.size_after) for f in report.files] == [
        ("/volatile", 3, 10_000, 0)
    ]
    # The file's creation is metadata: it survives, empty.
    assert (mnt / "volatile").read_bytes() == b""
    assert (mnt / "durable").read_bytes() == b"d" * 10_000
    assert fs.stats().dirty_pages == 0


def test_truncate_and_extend_are_volatile(fs: PowerFs) -> None:
    path = fs.mountpoint / "f"
    original = bytes(range(256)) * 48  # 3 pages
    write_file(path, original, sync=True)

    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, 1000)
        assert os.fstat(fd).st_size == 1000
        os.ftruncate(fd, 5 * PAGE_SIZE)  # extending past a truncation reads zeros
        assert os.pread(fd, 5 * PAGE_SIZE, 0) == original[:1000] + bytes(5 * PAGE_SIZE - 1000)
        assert (fs.backing / "f").read_bytes() == original
    finally:
        os.close(fd)
    assert path.stat().st_size == 5 * PAGE_SIZE

    report = fs.cut()

    assert [(f.size_before, f.size_after) for f in report.files] == [(5 * PAGE_SIZE, 3 * 4096)]
    assert path.stat().st_size == len(original)  # no stale size from the kernel
    assert path.read_bytes() == original

    # A synced truncation is durable.
    fd = os.open(path, os.O_RDWR)
    try:
        os.truncate(fd, 100)
        os.fsync(fd)
    finally:
        os.close(fd)
    fs.cut()
    assert path.read_bytes() == original[:100]


def test_o_trunc_is_volatile(fs: PowerFs) -> None:
    path = fs.mountpoint / "f"
    write_file(path, b"x" * 5000, sync=True)
    with open(path, "wb") as f:  # O_TRUNC
        f.write(b"new")
    assert path.read_bytes() == b"new"
    fs.cut()
    assert path.read_bytes() == b"x" * 5000


def test_rename_carries_the_dirty_data(fs: PowerFs) -> None:
    mnt = fs.mountpoint
    write_file(mnt / "a.tmp", b"A" * 6000, sync=False)
    write_file(mnt / "c.tmp", b"C" * 6000, sync=False)
    (mnt / "a.tmp").rename(mnt / "a")
    (mnt / "c.tmp").rename(mnt / "c")
    assert (mnt / "a").read_bytes() == b"A" * 6000
    fd = os.open(mnt / "a", os.O_RDONLY)  # a handle under the new name syncs the data
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

    fs.cut()

    assert (mnt / "a").read_bytes() == b"A" * 6000
    assert (mnt / "c").read_bytes() == b""  # renamed (metadata) but never synced
    assert not (mnt / "a.tmp").exists()


def test_handles_opened_before_a_cut_fail_with_eio(fs: PowerFs) -> None:
    path = fs.mountpoint / "f"
    write_file(path, b"synced", sync=True)
    fd = os.open(path, os.O_RDWR)
    reader = os.open(path, os.O_RDONLY)
    try:
        os.write(fd, b"volatile")
        report = fs.cut()
        assert report.dead_handles == 2
        for op in (
            lambda: os.pread(reader, 10, 0),
            lambda: os.pwrite(fd, b"x", 0),
            lambda: os.ftruncate(fd, 0),
            lambda: os.fsync(fd),
        ):
            with pytest.raises(OSError) as caught:
                op()
            assert caught.value.errno == errno.EIO
        assert fs.stats().dead_handles == 2
    finally:
        for dead in (reader, fd):
            with pytest.raises(OSError) as caught:  # close's flush fails too (fd is freed)
                os.close(dead)
            assert caught.value.errno == errno.EIO
    assert path.read_bytes() == b"synced"  # new opens see the disk
    assert fs.stats().dead_handles == 0


def test_the_power_can_stay_off_until_power_on(fs: PowerFs) -> None:
    mnt = fs.mountpoint
    write_file(mnt / "f", b"volatile", sync=False)
    fs.cut(stay_off=True)
    assert not fs.stats().powered
    for op in (
        lambda: (mnt / "f").read_bytes(),
        lambda: (mnt / "new").write_bytes(b"x"),
        lambda: os.listdir(mnt),
        lambda: (mnt / "f").unlink(),
    ):
        with pytest.raises(OSError) as caught:
            op()
        assert caught.value.errno == errno.EIO
    assert fs.stats().refused_while_off >= 4
    fs.power_on()
    assert fs.stats().powered
    assert sorted(os.listdir(mnt)) == ["f"]
    assert (mnt / "f").read_bytes() == b""


def test_keep_fraction_writes_back_a_random_subset_of_pages(fs: PowerFs) -> None:
    path = fs.mountpoint / "f"
    pages = 100
    write_file(path, bytes(pages * PAGE_SIZE), sync=True)
    write_file(path, b"\xff" * (pages * PAGE_SIZE), sync=False)
    report = fs.cut(keep_fraction=0.3, seed=11)

    assert (report.kept_pages, report.dropped_pages) == (30, 70)
    data = path.read_bytes()
    kept = [i for i in range(pages) if data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] == b"\xff" * 4096]
    lost = [i for i in range(pages) if data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] == bytes(4096)]
    assert len(kept) == 30 and len(lost) == 70
    assert kept != list(range(30))  # spread over the file, not its first pages

    # The same seed keeps the same pages.
    write_file(path, b"\xee" * (pages * PAGE_SIZE), sync=False)
    fs.cut(keep_fraction=0.3, seed=11)
    data = path.read_bytes()
    assert [i for i in range(pages) if data[i * PAGE_SIZE] == 0xEE] == kept


def test_posix_locks_work_between_processes(fs: PowerFs) -> None:
    path = fs.mountpoint / "db"
    write_file(path, b"", sync=False)
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 10)
        probe = (
            "import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "try:\n"
            "    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 10)\n"
            "    print('overlap granted')\n"
            "except OSError as e:\n"
            "    print('overlap refused', e.errno)\n"
            "fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 200)\n"
            "print('disjoint granted')\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=WAIT_S
        )
    finally:
        os.close(fd)
    assert out.stdout.split("\n")[:2] == [
        f"overlap refused {errno.EAGAIN}",
        "disjoint granted",
    ], out.stderr


def test_error_injection(fs: PowerFs) -> None:
    path = fs.mountpoint / "f"
    write_file(path, b"before", sync=True)
    fs.set_errors(write_enospc=1.0, fsync_eio=1.0, read_eio=1.0, seed=1)
    fd = os.open(path, os.O_RDWR)
    try:
        for op, code in (
            (lambda: os.pwrite(fd, b"x", 0), errno.ENOSPC),
            (lambda: os.fsync(fd), errno.EIO),
            (lambda: os.pread(fd, 1, 0), errno.EIO),
        ):
            with pytest.raises(OSError) as caught:
                op()
            assert caught.value.errno == code
        assert fs.stats().injected_errors == 3
        fs.set_errors()
        os.pwrite(fd, b"after!", 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"after!"
    with pytest.raises(PowerFsError, match="keep_fraction"):
        fs.cut(keep_fraction=1.5)


def test_the_mount_is_gone_after_an_error_in_the_with_block(tmp_path: Path) -> None:
    check_available()  # raises PowerFsUnavailable, naming what is missing
    (tmp_path / "disk").mkdir()
    mnt = tmp_path / "mnt"
    busy: int | None = None
    with pytest.raises(RuntimeError, match="rig failed"), PowerFs(tmp_path / "disk", mnt):
        busy = os.open(mnt / "open-at-exit", os.O_RDWR | os.O_CREAT)  # a busy mount
        raise RuntimeError("rig failed")
    assert busy is not None
    for op in (os.fstat, os.close):  # the daemon is gone
        with pytest.raises(OSError) as caught:
            op(busy)
        assert caught.value.errno == errno.ENOTCONN
    assert not os.path.ismount(mnt)
    with pytest.raises(PowerFsError, match="exited"):
        PowerFs(tmp_path / "missing", tmp_path / "mnt2").start()


# -- SQLite on the mount ------------------------------------------------------------------


def payload(i: int) -> bytes:
    """Row i's body: its own content and length, spanning 0-2 pages."""
    return bytes([i % 251]) * (100 + i * 7919 % 6000)


# Commits rows first.. (mode per row from MODES: F = synchronous FULL, N = NORMAL),
# printing "<id> <mode>" after each commit; then holds its connection open (no checkpoint
# at close), as the agent does until the rig kills it. With "step" it waits for a line
# on stdin after each commit.
WRITER = (
    inspect.getsource(payload)
    + """
import sqlite3, sys, time
path, modes, first, count, step = sys.argv[1:6]
conn = sqlite3.connect(path, isolation_level=None, timeout=10)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("PRAGMA wal_autocheckpoint=16")
for i in range(int(first), int(first) + int(count)):
    mode = modes[i % len(modes)]
    conn.execute("PRAGMA synchronous=" + ("FULL" if mode == "F" else "NORMAL"))
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO t (id, body) VALUES (?, ?)", (i, payload(i)))
    conn.execute("COMMIT")
    sys.stdout.write(f"{i} {mode}\\n")  # one write: print() may be cut between its parts
    sys.stdout.flush()
    if step == "step":
        sys.stdin.readline()
print("done", flush=True)
time.sleep(600)
"""
)


class Writer:
    """The writer script in its own process; its output lines are collected."""

    def __init__(self, db: Path, modes: str, first: int, count: int, step: bool = False):
        args = [str(db), modes, str(first), str(count), "step" if step else "free"]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.committed: list[tuple[int, str]] = []
        self.stderr = ""  # once killed
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def next_line(self) -> str:
        try:
            line = self.lines.get(timeout=WAIT_S)
        except queue.Empty:
            self.kill()
            raise AssertionError(f"writer silent for {WAIT_S} s; stderr: {self.stderr}") from None
        if line != "done":
            i, mode = line.split()
            self.committed.append((int(i), mode))
        return line

    def go_on(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        """SIGKILL, then collects what it printed before dying."""
        self.proc.kill()
        self.proc.wait()
        self._reader.join(timeout=WAIT_S)
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line != "done":
                i, mode = line.split()
                self.committed.append((int(i), mode))
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def create_db(db: Path) -> None:
    """An empty WAL database with table t, synced and checkpointed."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def read_ids(db: Path) -> list[int]:
    """The ids in t, through a read-only connection (which does not checkpoint at
    close), after checking the database's integrity and every row's body."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = conn.execute("SELECT id, body FROM t ORDER BY id").fetchall()
    finally:
        conn.close()
    for i, body in rows:
        assert body == payload(i), f"row {i} has a wrong body"
    return [i for i, _ in rows]


@pytest.mark.parametrize(("mode", "survives"), [("N", False), ("F", True)])
def test_sqlite_wal_commit_survives_a_cut_only_with_synchronous_full(
    fs: PowerFs, mode: str, survives: bool
) -> None:
    db = fs.mountpoint / "buffer.db"
    create_db(db)
    writer = Writer(db, mode, first=1, count=1)
    try:
        assert writer.next_line() == f"1 {mode}"
        assert writer.next_line() == "done"
        assert read_ids(db) == [1]  # committed and visible to another process
        report = fs.cut()
    finally:
        writer.kill()
    assert read_ids(db) == ([1] if survives else [])
    if not survives:
        assert any(f.path == "/buffer.db-wal" and f.dropped_pages for f in report.files)


def test_sqlite_stays_consistent_through_random_cuts(fs: PowerFs) -> None:
    """30 cuts at random moments (random keep_fraction) under a writer committing rows
    with FULL and NORMAL mixed: each time the database is intact and holds a prefix of
    the committed rows that includes every row committed with FULL."""
    db = fs.mountpoint / "buffer.db"
    create_db(db)
    rng = random.Random(12)
    durable = 0  # the highest id committed with FULL so far
    total_kept = total_dropped = rows_lost = 0
    for cut in range(30):
        first = len(read_ids(db)) + 1
        writer = Writer(db, "NNF" if cut % 2 else "NNNNNNNF", first=first, count=1000)
        try:
            for _ in range(rng.randint(1, 12)):
                writer.next_line()
            time.sleep(rng.uniform(0.0, 0.01))  # a commit or a checkpoint may be under way
            report = fs.cut(keep_fraction=rng.random(), seed=cut)
        finally:
            writer.kill()
        total_kept += report.kept_pages
        total_dropped += report.dropped_pages
        ids = read_ids(db)
        last = writer.committed[-1][0]
        durable = max([durable, *(i for i, mode in writer.committed if mode == "F")])
        assert ids == list(range(1, len(ids) + 1)), f"cut {cut}: not a prefix"
        assert durable <= len(ids) <= last + 1, (
            f"cut {cut}: {len(ids)} rows; FULL-committed up to {durable}, printed up to {last}"
        )
        rows_lost += max(0, last - len(ids))
    # The cuts did bite: pages were dropped and kept, NORMAL commits were lost.
    assert total_dropped > 0 and total_kept > 0 and rows_lost > 0


def test_a_second_process_reads_the_wal_database_while_the_writer_writes(fs: PowerFs) -> None:
    db = fs.mountpoint / "buffer.db"
    create_db(db)
    writer = Writer(db, "N", first=1, count=50, step=True)
    reader = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
    try:
        for i in range(1, 51):  # in lockstep: every commit is seen at once
            assert writer.next_line() == f"{i} N"
            assert reader.execute("SELECT max(id), count(*) FROM t").fetchone() == (i, i)
            writer.go_on()
        assert writer.next_line() == "done"
        assert reader.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        reader.close()
        writer.kill()
    free = Writer(db, "N", first=51, count=200)
    reader = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
    try:
        seen = [0]
        deadline = time.monotonic() + WAIT_S
        while seen[-1] < 250:  # freely: counts only grow
            assert time.monotonic() < deadline, f"reader saw only {seen[-1]} rows"
            count = reader.execute("SELECT count(*) FROM t").fetchone()[0]
            assert count >= seen[-1]
            seen.append(count)
    finally:
        reader.close()
        free.kill()
