"""The durable store-and-forward queue: encoded batches wait here, on SQLite in WAL
mode, until the platform has acknowledged them.

Messages sit in three lanes (alarm, event, telemetry); the uplink takes them in lane
order, then by sequence number, and deletes them only on acknowledgement. The
sequence number is the platform's dedup key (with the stream id), so it is never
reused. The buffer holds at most `capacity_bytes` of payload: when an append would
go over, the oldest telemetry is evicted first, then events, alarms last, and every
evicted reading is counted persistently and logged (rate-limited).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeAlias, TypeVar

import orjson

from buffer import schema
from buffer.registry import PointRegistry
from buffer.schema import (
    BufferCorrupt,
    BufferReadOnly,
    BufferVersionError,
    BufferWriteError,
    Db,
    SchemaProblem,
)

log = logging.getLogger("citygw.buffer")
T = TypeVar("T")

BUSY_TIMEOUT_S = 5.0
# Sequence numbers are reserved this many at a time with a synced commit, so that no seq
# a power cut could roll back is ever handed out twice (see Buffer.append_many).
SEQ_RESERVE_BLOCK = 1024
# Truncate the WAL back to this size after a checkpoint, so that a burst does not
# leave a large -wal file on the flash for good.
JOURNAL_SIZE_LIMIT = 8 * 1024 * 1024


class Lane(IntEnum):
    """Priority lanes: a lower value is sent first and evicted last."""

    ALARM = 0
    EVENT = 1
    TELEMETRY = 2


# Eviction takes lanes in the reverse of sending order.
_EVICTION_ORDER = (Lane.TELEMETRY, Lane.EVENT, Lane.ALARM)


class SyncMode(StrEnum):
    """How durable a commit is (the database is in WAL mode either way).

    NORMAL: survives a crash of the agent; a power cut may lose the last commits
    (never corrupts). FULL: an fsync per commit, survives a power cut too."""

    NORMAL = "normal"
    FULL = "full"


@dataclass(frozen=True, slots=True)
class Message:
    seq: int
    lane: Lane
    payload: bytes
    n_points: int
    created_ms: int


@dataclass(frozen=True, slots=True)
class LaneStats:
    messages: int
    points: int
    bytes: int
    oldest_created_ms: int | None


@dataclass(frozen=True, slots=True)
class BufferStats:
    lanes: dict[Lane, LaneStats]
    total_bytes: int  # payload bytes held, all lanes
    capacity_bytes: int
    evicted_points: int  # since the database was created
    evicted_messages: int
    last_ack_ms: int | None
    appended_points: int
    acked_points: int
    seq_skipped: int = 0  # sequence numbers never used: reserved before an unclean stop
    unclean_starts: int = 0  # opens that found the previous run had not closed the buffer
    intake_dropped: int = 0  # intake readings dropped after a power cut (sync=normal)
    last_sync_ms: int | None = None  # the last commit made durable against a power cut
    intake_points: int = 0  # readings waiting in the intake for the pipeline


@dataclass(slots=True)
class _Evicted:
    points: int = 0
    messages: int = 0
    bytes: int = 0
    by_lane: dict[Lane, int] | None = None  # messages per lane

    def add(self, lane: Lane, n_points: int, nbytes: int) -> None:
        self.points += n_points
        self.messages += 1
        self.bytes += nbytes
        if self.by_lane is None:
            self.by_lane = {}
        self.by_lane[lane] = self.by_lane.get(lane, 0) + 1


#: a message payload, or a function making it from the seq the message gets
Payload: TypeAlias = bytes | Callable[[int], bytes]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    """This boot of the machine (Linux; "" elsewhere): a power cut means a new one."""
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""


def _seq_list(seqs: Iterable[int]) -> str:
    # One JSON array parameter (read with json_each) instead of a placeholder per seq.
    return orjson.dumps([int(s) for s in seqs]).decode()


class Buffer:
    """The durable queue. Thread-safe: one connection behind one lock.

    Capacity: the payload bytes held never exceed `capacity_bytes`, with one
    exception: the newest alarm is never evicted. So an alarm larger than the whole
    capacity is still stored (alarms are why the gateway exists; a capacity
    configured too small must not silently eat them); every other message is then
    evicted, and the buffer stays over capacity by that one alarm until it is acked
    or a newer alarm arrives. A telemetry or event payload larger than the whole
    capacity can never be held: it gets a sequence number, is counted as evicted at
    once (without evicting anything else) and is never returned by peek.
    """

    #: at most one eviction warning per this many seconds (the line carries the count)
    EVICTION_LOG_INTERVAL_S = 10.0

    def __init__(
        self, path: str | Path, capacity_bytes: int, sync: SyncMode | str = SyncMode.NORMAL
    ) -> None:
        """Opens (or creates) the buffer database read-write.

        A missing parent directory is created. A file that is not a usable buffer
        (not SQLite, fails `PRAGMA quick_check`, unknown schema) is moved aside to
        `<path>.corrupt-<UTC timestamp>` (with its -wal/-shm), an ERROR is logged, a
        fresh database is started and the state key "buffer_recovered" names the
        moved file. A database from a newer citygw raises BufferVersionError."""
        if int(capacity_bytes) <= 0:
            raise ValueError(f"buffer capacity must be positive, got {capacity_bytes!r}")
        self.path = Path(path)
        self.capacity_bytes = int(capacity_bytes)
        self.sync = SyncMode(str(sync).lower())
        self.readonly = False
        #: where a corrupt database found at open was moved to, if that happened
        self.recovered_from: Path | None = None
        self._init_log_state()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = Db(
            self._open_writer(), self.path, readonly=False, synchronous=self.sync.value.upper()
        )
        self.registry = PointRegistry(self._db)
        try:
            self._finish_open()
        except BaseException:
            self._db.close()
            raise

    def _finish_open(self) -> None:
        with self._db.lock:
            conn = self._db.conn
            self._stream_id = self._meta(conn, "stream_id")
            self._total_bytes = int(
                conn.execute("SELECT coalesce(sum(nbytes), 0) FROM messages").fetchone()[0]
            )
            last = self._last_used_seq(conn)
            reserved = int(self._meta(conn, "seq_reserved", "0"))
            skipped = max(0, reserved - last)
            #: the last run did not close the buffer (a crash, a kill, a power cut)
            self.unclean = self._meta(conn, "open", "0") == "1"
            boot, last_boot = boot_id(), self._meta(conn, "boot_id", "")
            #: ... and the machine has booted since: commits not yet synced may be gone
            self.power_lost = self.unclean and bool(boot and last_boot and boot != last_boot)
            # Synced: the skip (and a lowered capacity's evictions) must not be undone by
            # the next power cut, or the skipped seqs would be counted twice.
            with self._db.write("open", sync=bool(skipped)) as wconn:
                self._set_meta(wconn, "capacity_bytes", self.capacity_bytes)
                self._set_meta(wconn, "open", "1")
                if boot:
                    self._set_meta(wconn, "boot_id", boot)
                if self.unclean:
                    self._add_counter(wconn, "unclean_starts", 1)
                if skipped:
                    # The last run stopped without close(): appends up to `reserved` may
                    # have been published and then rolled back by a power cut. Their seqs
                    # are the platform's dedup keys, so new messages start above them.
                    self._set_last_seq(wconn, reserved)
                    self._add_counter(wconn, "seq_skipped", skipped)
                if self.recovered_from is not None:
                    self._put_state(wconn, "buffer_recovered", str(self.recovered_from))
                # The capacity may have been lowered since the last run.
                evicted = _Evicted()
                if self._total_bytes > self.capacity_bytes:
                    total = self._evict(wconn, self._total_bytes, evicted)
                    self._count_evictions(wconn, evicted)
                else:
                    total = self._total_bytes
            self._total_bytes = total
            self._last_seq = max(last, reserved)
            self._seq_reserved = self._last_seq
            self._note_evicted(evicted)
            if skipped:
                log.warning(
                    "buffer was not closed cleanly: sequence numbers skipped",
                    extra={"buffer": str(self.path), "from_seq": last + 1, "to_seq": reserved},
                )

    @classmethod
    def open_readonly(cls, path: str | Path, check: bool = False) -> Self:
        """Opens an existing buffer for `citygw status` / `buffer inspect` while the
        agent runs. Read-only at the SQLite level (`mode=ro`), and in WAL mode a reader
        never blocks the writer. stats/peek/get_state/registry.all work; every write
        raises BufferReadOnly. Raises FileNotFoundError if there is no database and
        BufferCorrupt if it is not a usable buffer (nothing is moved aside); `check`
        runs `PRAGMA quick_check` too (`citygw doctor`), as a read-write open does."""
        self = cls.__new__(cls)
        self.path = Path(path)
        self.sync = SyncMode.NORMAL
        self.readonly = True
        self.recovered_from = None
        self._init_log_state()
        if not self.path.is_file():
            raise FileNotFoundError(f"no buffer database at {self.path}")
        uri = self.path.resolve().as_uri() + "?mode=ro"
        conn = sqlite3.connect(
            uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute("PRAGMA query_only = ON")
            version = schema.inspect(conn, full_check=check)
            if version != schema.SCHEMA_VERSION:
                raise SchemaProblem(f"schema version {version}, expected {schema.SCHEMA_VERSION}")
            self._stream_id = self._meta(conn, "stream_id")
            self.capacity_bytes = int(self._meta(conn, "capacity_bytes", "0"))
            self._total_bytes = int(
                conn.execute("SELECT coalesce(sum(nbytes), 0) FROM messages").fetchone()[0]
            )
        except (SchemaProblem, sqlite3.Error) as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error) and not schema.is_corruption(exc):
                raise schema.read_error(exc, self.path, "read-only open") from exc
            raise BufferCorrupt(f"buffer {self.path} is not a usable buffer: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        self._db = Db(conn, self.path, readonly=True)
        self.registry = PointRegistry(self._db)
        return self

    # -- opening ---------------------------------------------------------------

    def _init_log_state(self) -> None:
        self._log_at: float | None = None  # monotonic time of the last eviction line
        self._log_pending = _Evicted()
        # seqs handed to the uplink and not yet acked or released: never evicted, since a
        # PUBACK for them may be on its way (see peek(claim=True))
        self._claimed: set[int] = set()
        self._claims_lock = threading.Lock()
        self._last_seq = 0  # the highest seq handed out (or skipped)
        self._seq_reserved = 0  # the highest seq covered by a synced reservation
        self.unclean = False
        self.power_lost = False

    @staticmethod
    def _meta(conn: sqlite3.Connection, key: str, default: str | None = None) -> str:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            if default is None:
                raise SchemaProblem(f"meta key {key!r} missing")
            return default
        return str(row[0])

    def _open_writer(self) -> sqlite3.Connection:
        try:
            return self._connect_checked()
        except SchemaProblem as problem:
            reason = str(problem)
        aside = self._move_aside()
        log.error(
            "buffer database is corrupt: moved aside, starting a fresh one",
            extra={"buffer": str(self.path), "moved_to": str(aside), "reason": reason},
        )
        self.recovered_from = aside
        # A fresh file now; if even this fails, the error is real and goes up.
        return self._connect_checked()

    def _connect_checked(self) -> sqlite3.Connection:
        """Checks, connects and configures the database, creating or migrating the
        schema. Raises SchemaProblem when the file must be moved aside."""
        if self.path.exists():
            # Check through a read-only connection first: a read-write one would turn a
            # foreign database to WAL, and closing it deletes a -wal we want to keep.
            probe = self._connect(readonly=True)
            try:
                self._checked(lambda: schema.inspect(probe, full_check=True))
            finally:
                probe.close()
        conn = self._connect(readonly=False)
        try:
            mode = self._checked(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            if str(mode).lower() != "wal":
                log.warning(
                    "buffer database could not switch to WAL",
                    extra={"buffer": str(self.path), "journal_mode": mode},
                )
            conn.execute(f"PRAGMA synchronous = {self.sync.value.upper()}")
            conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
            version = self._checked(lambda: schema.inspect(conn, full_check=False))
            if version == 0:
                self._checked(lambda: schema.create(conn, uuid.uuid4().hex, _now_ms()))
            elif version < schema.SCHEMA_VERSION:
                self._checked(lambda: schema.migrate(conn, version))
            self._meta(conn, "stream_id")
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect(self, readonly: bool) -> sqlite3.Connection:
        target = self.path.resolve().as_uri() + "?mode=ro" if readonly else str(self.path)
        try:
            return sqlite3.connect(
                target,
                uri=readonly,
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise BufferWriteError(f"buffer {self.path}: cannot open: {exc}") from exc

    def _checked(self, fn: Callable[[], T]) -> T:
        """Runs fn, sorting SQLite errors into "the file is damaged" (SchemaProblem:
        move it aside) and everything else (busy, read-only, I/O, permissions: not the
        file's fault, so never move it)."""
        try:
            return fn()
        except sqlite3.Error as exc:
            if schema.is_corruption(exc):
                raise SchemaProblem(str(exc)) from exc
            raise BufferWriteError(f"buffer {self.path}: cannot open: {exc}") from exc

    def _move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            n += 1
        # Side files first: a stale -wal next to a fresh database would be replayed into it.
        for suffix in ("-wal", "-shm", "-journal", ""):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                os.replace(src, f"{aside}{suffix}")
        return aside

    # -- public API ------------------------------------------------------------

    @property
    def stream_id(self) -> str:
        """Random id made once with the database. The platform dedups on
        (gateway, stream, seq), so a replaced database never collides with the old."""
        return self._stream_id

    def append(self, lane: Lane, payload: bytes, n_points: int) -> int:
        """Appends one message and returns its seq; durable (per sync mode) on return."""
        return self.append_many([(lane, payload, n_points)])[0]

    def append_many(
        self,
        items: Sequence[tuple[Lane, Payload, int]],
        state: Mapping[str, bytes] | None = None,
        intake_done: Collection[int] = (),
    ) -> list[int]:
        """Appends messages in ONE transaction, durable (per sync mode) on return,
        evicting old messages in the same transaction if capacity requires. Returns
        the seqs in order. A payload may be a function of the message's seq (for
        self-describing payloads). ``state`` upserts pipeline state and
        ``intake_done`` deletes the intake rows these messages were made from, in the
        same transaction (see `pipeline_state`, `intake_put`). Raises BufferWriteError
        (nothing stored) on disk full or I/O errors.

        Sequence numbers: a seq is only handed out once a synced commit has reserved
        it (`seq_reserved`, SEQ_RESERVE_BLOCK at a time; the commit that takes a new
        block is itself synced). A power cut with sync=normal can roll back appends
        whose messages were already published and stored by the platform; the next
        open starts above the reservation, so their seqs never label other readings."""
        rows: list[tuple[Lane, Payload, int]] = []
        for lane, payload, n_points in items:
            if n_points < 0:
                raise ValueError(f"n_points must be >= 0, got {n_points}")
            rows.append((Lane(lane), payload, int(n_points)))
        if not rows and not state and not intake_done:
            return []
        now = _now_ms()
        cap = self.capacity_bytes
        seqs: list[int] = []
        evicted = _Evicted()
        with self._db.lock:
            total = self._total_bytes
            seq = self._last_seq
            reserve = seq + len(rows) > self._seq_reserved
            new_reserved = seq + len(rows) + SEQ_RESERVE_BLOCK if reserve else self._seq_reserved
            with self._db.write("append", sync=True if reserve else None) as conn:
                if reserve:
                    self._set_meta(conn, "seq_reserved", new_reserved)
                too_big: list[int] = []
                for lane, make, n_points in rows:
                    seq += 1
                    payload = bytes(make(seq) if callable(make) else make)
                    # A non-alarm larger than the whole capacity can never be held: it takes
                    # a seq (never reused) and is dropped at once, without first evicting
                    # everything else for nothing.
                    fits = lane == Lane.ALARM or len(payload) <= cap
                    stored = payload if fits else b""
                    conn.execute(
                        "INSERT INTO messages (seq, lane, n_points, nbytes, created_ms, payload) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (seq, lane, n_points, len(stored), now, stored),
                    )
                    seqs.append(seq)
                    if fits:
                        total += len(payload)
                    else:
                        too_big.append(seq)
                        evicted.add(lane, n_points, len(payload))
                if too_big:
                    conn.execute(
                        "DELETE FROM messages WHERE seq IN (SELECT value FROM json_each(?))",
                        (_seq_list(too_big),),
                    )
                if total > cap:
                    total = self._evict(conn, total, evicted)
                if state:
                    conn.executemany(
                        "INSERT INTO pipeline_state (key, value) VALUES (?, ?) "
                        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        state.items(),
                    )
                if intake_done:
                    conn.execute(
                        "DELETE FROM intake WHERE id IN (SELECT value FROM json_each(?))",
                        (_seq_list(intake_done),),
                    )
                self._add_counter(conn, "appended_points", sum(r[2] for r in rows))
                self._count_evictions(conn, evicted)
                if reserve:
                    self._set_counter(conn, "last_sync_ms", now)
            # Only after the commit: a failed append leaves the running state as it was.
            self._total_bytes = total
            self._last_seq = seq
            self._seq_reserved = new_reserved
            self._note_evicted(evicted)
        return seqs

    def peek(self, limit: int, exclude: Collection[int] = (), claim: bool = False) -> list[Message]:
        """Up to `limit` messages in sending order (lane priority, then seq),
        skipping the seqs in `exclude` (the uplink's in-flight set). Nothing is removed.
        With `claim` (the uplink, about to publish them) the messages returned are not
        evicted until they are acked or `release`d: their PUBACK may be on its way, and
        a delivered message must not be reported as evicted."""
        if limit <= 0:
            return []
        cols = "seq, lane, payload, n_points, created_ms"
        with self._db.read("peek") as conn:
            if exclude:
                rows = conn.execute(
                    f"SELECT {cols} FROM messages "
                    "WHERE seq NOT IN (SELECT value FROM json_each(?)) "
                    "ORDER BY lane, seq LIMIT ?",
                    (_seq_list(exclude), limit),
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {cols} FROM messages ORDER BY lane, seq LIMIT ?", (limit,)
                ).fetchall()
        if claim:
            with self._claims_lock:
                self._claimed.update(int(r[0]) for r in rows)
        return [Message(s, Lane(ln), p, n, c) for s, ln, p, n, c in rows]

    def release(self, seqs: Iterable[int] | None = None) -> None:
        """Gives claimed messages back to eviction (None: all of them): the uplink lost
        its connection, so their PUBACKs will not come. Memory only, never blocks on the
        database, so the event loop may call it."""
        with self._claims_lock:
            if seqs is None:
                self._claimed.clear()
            else:
                self._claimed.difference_update(seqs)

    def ack(self, seqs: Iterable[int]) -> int:
        """Deletes the acknowledged messages in one transaction and returns how many
        points they held. Unknown seqs (already acked or evicted) are ignored. Any
        non-empty ack records the time as last_ack_ms: the link worked."""
        seqs = [int(s) for s in seqs]
        seq_json = _seq_list(seqs)
        if seq_json == "[]":
            return 0
        with self._db.lock:
            with self._db.write("ack") as conn:
                gone = conn.execute(
                    "DELETE FROM messages WHERE seq IN (SELECT value FROM json_each(?)) "
                    "RETURNING n_points, nbytes",
                    (seq_json,),
                ).fetchall()
                points = sum(int(r[0]) for r in gone)
                freed = sum(int(r[1]) for r in gone)
                self._add_counter(conn, "acked_points", points)
                self._set_counter(conn, "last_ack_ms", _now_ms())
            self._total_bytes -= freed
        self.release(seqs)
        return points

    def stats(self) -> BufferStats:
        """Depth per lane, bytes held, and the persistent counters."""
        lanes = {lane: LaneStats(0, 0, 0, None) for lane in Lane}
        with self._db.read("stats") as conn:
            for lane, msgs, pts, nbytes, oldest in conn.execute(
                "SELECT lane, count(*), sum(n_points), sum(nbytes), min(created_ms) "
                "FROM messages GROUP BY lane"
            ):
                lanes[Lane(lane)] = LaneStats(int(msgs), int(pts), int(nbytes), oldest)
            counters = {str(k): v for k, v in conn.execute("SELECT name, value FROM counters")}
            intake = conn.execute("SELECT coalesce(sum(n_points), 0) FROM intake").fetchone()
        return BufferStats(
            lanes=lanes,
            total_bytes=sum(ls.bytes for ls in lanes.values()),
            capacity_bytes=self.capacity_bytes,
            evicted_points=int(counters.get("evicted_points", 0)),
            evicted_messages=int(counters.get("evicted_messages", 0)),
            last_ack_ms=counters.get("last_ack_ms"),
            appended_points=int(counters.get("appended_points", 0)),
            acked_points=int(counters.get("acked_points", 0)),
            seq_skipped=int(counters.get("seq_skipped", 0)),
            intake_dropped=int(counters.get("intake_dropped", 0)),
            unclean_starts=int(counters.get("unclean_starts", 0)),
            last_sync_ms=counters.get("last_sync_ms"),
            intake_points=int(intake[0]),
        )

    def checkpoint(self) -> None:
        """Copies the WAL into the database file (PASSIVE: never waits for readers), so
        the WAL stays small. Durability comes from `sync_point`, not from this."""
        self._db.checkpoint()

    def sync_point(self) -> None:
        """Makes every commit so far durable against a power cut, also with sync=normal
        (where a commit alone is not): one tiny commit with synchronous=FULL, which syncs
        the whole WAL. The agent calls it on a timer, which bounds what a power cut can
        roll back to that interval (a checkpoint alone syncs nothing when a reader holds
        it back, so it cannot be the bound)."""
        with self._db.write("sync_point", sync=True) as conn:
            self._set_counter(conn, "last_sync_ms", _now_ms())

    # -- intake: readings not yet through the pipeline ------------------------------

    def intake_put(self, blobs: Sequence[tuple[bytes, int]]) -> list[int]:
        """Stores raw reading batches (their bytes, their reading count) in one commit
        that is never synced by itself (the fsync policy stays the flush's), and returns
        their ids for `append_many(intake_done=...)`. A process crash after this loses
        none of them: the next start takes them from `intake_load`."""
        if not blobs:
            return []
        now = _now_ms()
        with self._db.write("intake", sync=False) as conn:
            return [
                int(
                    conn.execute(
                        "INSERT INTO intake (created_ms, n_points, data) VALUES (?, ?, ?) "
                        "RETURNING id",
                        (now, n, data),
                    ).fetchone()[0]
                )
                for data, n in blobs
            ]

    def intake_load(self) -> list[tuple[int, bytes]]:
        """(id, bytes) of every intake row, oldest first: what a crashed run had read
        and not yet put through the pipeline."""
        with self._db.read("intake_load") as conn:
            rows = conn.execute("SELECT id, data FROM intake ORDER BY id").fetchall()
        return [(int(i), bytes(d)) for i, d in rows]

    def intake_recover(self) -> tuple[list[tuple[int, bytes]], int]:
        """The intake a crashed run left, to put through the pipeline first, and the
        readings dropped instead.

        After a process crash every commit is there: an intake row that is still
        present was never consumed, so it is replayed. After a power cut with
        sync=normal it is not that simple: the flush that consumed a row (unsynced) may
        be gone while the row (synced by a sync point, or written back by the OS) is
        not, and that flush's messages may already be on the platform; replaying the row
        would store its readings twice. So then the intake is dropped: those readings
        are within what sync=normal may lose. With sync=full a flush is synced before
        its messages can leave, so a row that survived was never sent: replayed."""
        rows = self.intake_load()
        if not (rows and self.power_lost and self.sync is SyncMode.NORMAL):
            return rows, 0
        with self._db.write("intake_recover", sync=True) as conn:
            gone = conn.execute("DELETE FROM intake RETURNING n_points").fetchall()
            dropped = sum(int(r[0]) for r in gone)
            self._add_counter(conn, "intake_dropped", dropped)
        return [], dropped

    def intake_drop(self, ids: Collection[int]) -> None:
        """Deletes intake rows that cannot be read back (counted by the caller)."""
        if ids:
            with self._db.write("intake_drop") as conn:
                conn.execute(
                    "DELETE FROM intake WHERE id IN (SELECT value FROM json_each(?))",
                    (_seq_list(ids),),
                )

    def put_state(self, key: str, value: Any) -> None:
        """Stores one JSON value (orjson) of the agent's status snapshot under `key`."""
        with self._db.write("put_state") as conn:
            self._put_state(conn, key, value)

    def get_state(self) -> dict[str, Any]:
        """Every stored state value, decoded."""
        with self._db.read("get_state") as conn:
            rows = conn.execute("SELECT key, value FROM state ORDER BY key").fetchall()
        return {str(k): orjson.loads(v) for k, v in rows}

    def pipeline_state(self) -> dict[str, bytes]:
        """The pipeline state stored by `append_many`, by key."""
        with self._db.read("pipeline_state") as conn:
            rows = conn.execute("SELECT key, value FROM pipeline_state").fetchall()
        return {str(k): bytes(v) for k, v in rows}

    def close(self) -> None:
        """Closes the database (idempotent); reports evictions not yet logged.

        A clean close gives back the unused part of the seq reservation (synced), so
        the next open continues without a gap; without it (crash, power cut) the next
        open skips to the reservation."""
        with self._db.lock:
            if self._db.closed:
                return
            if not self.readonly:
                try:
                    with self._db.write("close", sync=True) as conn:
                        self._set_meta(conn, "seq_reserved", self._last_seq)
                        self._set_meta(conn, "open", "0")
                except BufferError as exc:  # the next open treats it as unclean: safe
                    log.warning("buffer close not recorded", extra={"error": str(exc)})
            self._flush_eviction_log()
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "ro" if self.readonly else "rw"
        return f"<Buffer {self.path} {mode} {self._total_bytes}/{self.capacity_bytes} bytes>"

    # -- internals -------------------------------------------------------------

    @staticmethod
    def _put_state(conn: sqlite3.Connection, key: str, value: Any) -> None:
        text = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
        conn.execute(
            "INSERT INTO state (key, value, updated_ms) VALUES (?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
            "updated_ms = excluded.updated_ms",
            (key, text, _now_ms()),
        )

    @staticmethod
    def _last_used_seq(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def _set_last_seq(conn: sqlite3.Connection, seq: int) -> None:
        """AUTOINCREMENT's high-water mark, so that even an insert without a seq never
        takes a skipped one."""
        if (
            conn.execute(
                "UPDATE sqlite_sequence SET seq = ? WHERE name = 'messages'", (seq,)
            ).rowcount
            == 0
        ):
            conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('messages', ?)", (seq,))

    @staticmethod
    def _set_meta(conn: sqlite3.Connection, key: str, value: int | str) -> None:
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, str(value)),
        )

    @staticmethod
    def _set_counter(conn: sqlite3.Connection, name: str, value: int) -> None:
        conn.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

    @staticmethod
    def _add_counter(conn: sqlite3.Connection, name: str, n: int) -> None:
        if n:
            conn.execute(
                "INSERT INTO counters (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                (name, n),
            )

    def _count_evictions(self, conn: sqlite3.Connection, evicted: _Evicted) -> None:
        self._add_counter(conn, "evicted_points", evicted.points)
        self._add_counter(conn, "evicted_messages", evicted.messages)

    def _evict(self, conn: sqlite3.Connection, total: int, evicted: _Evicted) -> int:
        """Inside the caller's transaction: deletes oldest telemetry, then events, then
        alarms until `total` fits the capacity, never the newest alarm nor a message in
        flight (claimed: the buffer then stays over capacity by at most the uplink's
        window until the PUBACKs or the release). Returns the new total and adds what
        went to `evicted`."""
        over = total - self.capacity_bytes
        newest_alarm = conn.execute(
            "SELECT max(seq) FROM messages WHERE lane = ?", (Lane.ALARM,)
        ).fetchone()[0]
        with self._claims_lock:
            claimed = set(self._claimed)
        victims: list[int] = []
        for lane in _EVICTION_ORDER:
            if over <= 0:
                break
            # An index-only scan that stops at the break; closed before the delete below.
            cur = conn.execute(
                "SELECT seq, nbytes, n_points FROM messages WHERE lane = ? ORDER BY seq",
                (lane,),
            )
            for seq, nbytes, n_points in cur:
                if seq == newest_alarm or seq in claimed:
                    continue
                victims.append(seq)
                evicted.add(lane, int(n_points), int(nbytes))
                over -= int(nbytes)
                total -= int(nbytes)
                if over <= 0:
                    break
            cur.close()
        if victims:
            conn.execute(
                "DELETE FROM messages WHERE seq IN (SELECT value FROM json_each(?))",
                (_seq_list(victims),),
            )
        return total

    def _note_evicted(self, evicted: _Evicted) -> None:
        """Rate-limited WARNING: the first eviction logs at once, later ones at most
        once per EVICTION_LOG_INTERVAL_S with the counts since the previous line."""
        if not evicted.messages:
            return
        pending = self._log_pending
        pending.points += evicted.points
        pending.messages += evicted.messages
        pending.bytes += evicted.bytes
        for lane, n in (evicted.by_lane or {}).items():
            pending.by_lane = pending.by_lane or {}
            pending.by_lane[lane] = pending.by_lane.get(lane, 0) + n
        now = time.monotonic()
        if self._log_at is None or now - self._log_at >= self.EVICTION_LOG_INTERVAL_S:
            self._log_at = now
            self._flush_eviction_log()

    def _flush_eviction_log(self) -> None:
        pending = self._log_pending
        if not pending.messages:
            return
        log.warning(
            "buffer full: oldest messages evicted",
            extra={
                "buffer": str(self.path),
                "evicted_points": pending.points,
                "evicted_messages": pending.messages,
                "evicted_bytes": pending.bytes,
                "evicted_by_lane": {
                    lane.name.lower(): n for lane, n in sorted((pending.by_lane or {}).items())
                },
                "capacity_bytes": self.capacity_bytes,
            },
        )
        self._log_pending = _Evicted()


__all__ = [
    "Buffer",
    "BufferCorrupt",
    "BufferReadOnly",
    "BufferStats",
    "BufferVersionError",
    "BufferWriteError",
    "Lane",
    "LaneStats",
    "Message",
    "SyncMode",
]
