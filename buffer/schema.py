"""The buffer database: its schema and version, the checks run at open, the
exceptions, and the one connection handle that the queue and the point registry
share (one lock, one write-transaction helper that turns SQLite errors into the
buffer's exceptions).

Schema changes bump SCHEMA_VERSION (kept in ``PRAGMA user_version``) and add a
migration from the previous version to MIGRATIONS.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

SCHEMA_VERSION = 3

# The pipeline's per-point stage state (deadband, SDT, aggregate windows, alarms), written
# in the same transaction as the messages it produced, so a restart resumes consistently.
_PIPELINE_STATE = "CREATE TABLE pipeline_state (key TEXT PRIMARY KEY, value BLOB NOT NULL)"
# Readings handed over by the drivers and not yet through the pipeline (one row per
# batch, its columns' bytes): committed within milliseconds of the read, so a process
# crash loses almost nothing; deleted in the transaction that appends their output.
_INTAKE = """CREATE TABLE intake (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        created_ms INTEGER NOT NULL,
        n_points INTEGER NOT NULL,
        data BLOB NOT NULL
    )"""

DDL = (
    # Small key/value facts about the database itself: stream_id, created_ms, capacity_bytes,
    # seq_reserved (no seq up to it may be handed out again; synced before it is used).
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # AUTOINCREMENT: a seq is the platform's dedup key, so it must never be reused, not
    # even after the newest rows were acked and the database reopened.
    # payload goes last so the small columns stay on the b-tree page and a large blob
    # overflows behind them.
    """CREATE TABLE messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        lane INTEGER NOT NULL CHECK (lane IN (0, 1, 2)),
        n_points INTEGER NOT NULL,
        nbytes INTEGER NOT NULL,
        created_ms INTEGER NOT NULL,
        payload BLOB NOT NULL
    )""",
    # Covers peek's order, eviction's scan and stats without touching the payloads.
    "CREATE INDEX messages_by_lane ON messages (lane, seq, nbytes, n_points, created_ms)",
    # Persistent counters: evicted_points, evicted_messages, appended_points,
    # acked_points, last_ack_ms, seq_skipped, unclean_starts, last_sync_ms.
    "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    # The agent's status snapshot (JSON values) for `citygw status`.
    "CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_ms INTEGER NOT NULL)",
    # Point registry; AUTOINCREMENT so ids of removed points are never handed out again.
    """CREATE TABLE points (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key TEXT NOT NULL UNIQUE,
        meta TEXT NOT NULL
    )""",
    _PIPELINE_STATE,
    _INTAKE,
)

COLUMNS: dict[str, frozenset[str]] = {
    "meta": frozenset({"key", "value"}),
    "messages": frozenset({"seq", "lane", "n_points", "nbytes", "created_ms", "payload"}),
    "counters": frozenset({"name", "value"}),
    "state": frozenset({"key", "value", "updated_ms"}),
    "points": frozenset({"id", "key", "meta"}),
    "pipeline_state": frozenset({"key", "value"}),
    "intake": frozenset({"id", "created_ms", "n_points", "data"}),
}

COUNTERS = ("evicted_points", "evicted_messages", "appended_points", "acked_points")

#: version -> statements that take a database from that version to version + 1
MIGRATIONS: dict[int, tuple[str, ...]] = {1: (_PIPELINE_STATE,), 2: (_INTAKE,)}


class BufferCorrupt(BufferError):
    """The database file is damaged or is not a citygw buffer. At a read-write open
    this is handled (the file is moved aside); it is raised by a read-only open and
    by operations that hit damage later."""


class BufferWriteError(BufferError):
    """A write failed (disk full, read-only file system, I/O error, locked) and was
    rolled back: nothing of it is stored and the buffer's state is unchanged."""


class BufferReadOnly(BufferWriteError):
    """A write was attempted on a buffer opened with Buffer.open_readonly()."""


class BufferVersionError(BufferError):
    """The database was written by a newer citygw (schema version unknown here).
    It is left alone: it is not corrupt, this citygw is just too old for it."""


class SchemaProblem(Exception):
    """Internal: the file is SQLite but not a usable buffer (treated as corrupt)."""


def is_corruption(exc: sqlite3.Error) -> bool:
    """True for errors that mean the file itself is damaged, as opposed to busy,
    full, read-only or unreadable (those must never make us move a file aside)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))


def _describe(exc: sqlite3.Error) -> str:
    name = getattr(exc, "sqlite_errorname", None)
    return f"{name}: {exc}" if name else f"{type(exc).__name__}: {exc}"


def write_error(exc: sqlite3.Error, path: Path, what: str) -> BufferError:
    if is_corruption(exc):
        return BufferCorrupt(f"buffer {path}: database is corrupt ({what}): {_describe(exc)}")
    return BufferWriteError(f"buffer {path}: {what} failed: {_describe(exc)}")


def read_error(exc: sqlite3.Error, path: Path, what: str) -> BufferError:
    if is_corruption(exc):
        return BufferCorrupt(f"buffer {path}: database is corrupt ({what}): {_describe(exc)}")
    return BufferError(f"buffer {path}: {what} failed: {_describe(exc)}")


def inspect(conn: sqlite3.Connection, *, full_check: bool) -> int:
    """Returns the schema version of the open database (0: empty, needs create).

    Raises SchemaProblem if it is not a usable buffer, BufferVersionError if it is
    from a newer citygw, sqlite3.DatabaseError if SQLite cannot read it at all."""
    if full_check:
        rows = conn.execute("PRAGMA quick_check").fetchall()
        if rows != [("ok",)]:
            raise SchemaProblem("quick_check: " + "; ".join(str(r[0]) for r in rows[:5]))
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    tables = {
        str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    if version == 0:
        if tables - {"sqlite_sequence"}:
            raise SchemaProblem(f"unversioned database with tables {sorted(tables)}")
        return 0
    if version > SCHEMA_VERSION:
        raise BufferVersionError(
            f"buffer schema version {version} is newer than this citygw knows ({SCHEMA_VERSION})"
        )
    if version < 0 or (version < SCHEMA_VERSION and version not in MIGRATIONS):
        raise SchemaProblem(f"unknown schema version {version}")
    if version == SCHEMA_VERSION:
        check_columns(conn)
    return version


def check_columns(conn: sqlite3.Connection) -> None:
    for table, expected in COLUMNS.items():
        # table names are our constants, not input
        found = {str(r[1]) for r in conn.execute(f"PRAGMA table_info({table})")}
        if found != expected:
            raise SchemaProblem(f"table {table!r} has columns {sorted(found)}")


def create(conn: sqlite3.Connection, stream_id: str, created_ms: int) -> None:
    """Creates the schema in one transaction (a crash leaves an empty database)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for stmt in DDL:
            conn.execute(stmt)
        conn.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?)",
            [("stream_id", stream_id), ("created_ms", str(created_ms))],
        )
        conn.executemany(
            "INSERT INTO counters (name, value) VALUES (?, 0)", [(c,) for c in COUNTERS]
        )
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def migrate(conn: sqlite3.Connection, version: int) -> None:
    """Brings a database from `version` up to SCHEMA_VERSION, one transaction per step."""
    while version < SCHEMA_VERSION:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in MIGRATIONS[version]:
                conn.execute(stmt)
            version += 1
            conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    check_columns(conn)


class Db:
    """The one SQLite connection of a Buffer, shared with its PointRegistry.

    The runtime calls from its buffer thread and tools from the main thread, so every
    use goes through `lock` (re-entrant, so that the queue can keep it across a
    transaction and the in-memory bookkeeping that follows the commit)."""

    def __init__(
        self, conn: sqlite3.Connection, path: Path, readonly: bool, synchronous: str = "NORMAL"
    ) -> None:
        self.conn = conn
        self.path = path
        self.readonly = readonly
        #: the connection's own PRAGMA synchronous (NORMAL or FULL); see `write(sync=)`
        self.synchronous = synchronous
        self.lock = threading.RLock()
        self.closed = False

    def _live(self) -> sqlite3.Connection:
        if self.closed:
            raise BufferError(f"buffer {self.path} is closed")
        return self.conn

    @contextlib.contextmanager
    def write(self, what: str, sync: bool | None = None) -> Iterator[sqlite3.Connection]:
        """One write transaction; on any failure it is rolled back and SQLite errors
        become BufferWriteError / BufferCorrupt naming the path.

        `sync` overrides the connection's durability for this one commit: True syncs
        the WAL at commit (synchronous=FULL; in WAL mode that makes every earlier commit
        durable too), False does not (NORMAL), None keeps the connection's mode."""
        if self.readonly:
            raise BufferReadOnly(f"buffer {self.path} was opened read-only ({what})")
        mode = None if sync is None else ("FULL" if sync else "NORMAL")
        if mode == self.synchronous:
            mode = None
        with self.lock:
            conn = self._live()
            try:
                if mode is not None:
                    conn.execute(f"PRAGMA synchronous = {mode}")
                # IMMEDIATE takes the write lock up front: no lock upgrade half way through.
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                # SQLite may already have rolled back (e.g. on SQLITE_FULL).
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise write_error(exc, self.path, what) from exc
                raise
            finally:
                if mode is not None:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute(f"PRAGMA synchronous = {self.synchronous}")

    @contextlib.contextmanager
    def read(self, what: str) -> Iterator[sqlite3.Connection]:
        """One read transaction: a consistent snapshot across several queries."""
        with self.lock:
            conn = self._live()
            try:
                conn.execute("BEGIN")
                yield conn
            except sqlite3.Error as exc:
                raise read_error(exc, self.path, what) from exc
            finally:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")

    def checkpoint(self) -> None:
        """Copies the WAL into the database file without waiting for readers (PASSIVE),
        which keeps the WAL small. It is not what makes commits durable: a checkpoint
        blocked by a reader syncs nothing (see Buffer.sync_point)."""
        if self.readonly:
            raise BufferReadOnly(f"buffer {self.path} was opened read-only (checkpoint)")
        with self.lock:
            try:
                self._live().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as exc:
                raise write_error(exc, self.path, "checkpoint") from exc

    def close(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                self.conn.close()
