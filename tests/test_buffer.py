"""The SQLite store-and-forward queue, on real database files."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import buffer.queue as queue_mod
from buffer import (
    SCHEMA_VERSION,
    Buffer,
    BufferCorrupt,
    BufferReadOnly,
    BufferVersionError,
    BufferWriteError,
    Lane,
    SyncMode,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "buffer.db"


def depth(buf: Buffer) -> dict[Lane, int]:
    return {lane: s.messages for lane, s in buf.stats().lanes.items()}


# -- basics ----------------------------------------------------------------------


def test_append_peek_and_persistence_across_reopen(db: Path) -> None:
    payloads = [bytes(range(256)), b"", b"\x00" * 1000, os.urandom(5000)]
    with Buffer(db, 1_000_000) as buf:
        seqs = buf.append_many([(Lane.TELEMETRY, p, i + 1) for i, p in enumerate(payloads)])
        assert seqs == sorted(seqs) and len(set(seqs)) == 4
    with Buffer(db, 1_000_000) as buf:
        msgs = buf.peek(10)
        assert [m.seq for m in msgs] == seqs
        assert [m.payload for m in msgs] == payloads
        assert [m.n_points for m in msgs] == [1, 2, 3, 4]
        assert all(m.lane is Lane.TELEMETRY for m in msgs)
        stats = buf.stats()
        assert stats.total_bytes == sum(map(len, payloads))
        assert stats.lanes[Lane.TELEMETRY].points == 10
        assert stats.appended_points == 10


def test_pragmas_and_schema_version(db: Path) -> None:
    for mode, level in ((SyncMode.NORMAL, 1), ("full", 2), ("FULL", 2)):
        with Buffer(db, 1000, mode) as buf:
            conn = buf._db.conn
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == level
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_peek_lane_priority_then_seq(db: Path) -> None:
    with Buffer(db, 1_000_000) as buf:
        t1 = buf.append(Lane.TELEMETRY, b"t1", 1)
        e1 = buf.append(Lane.EVENT, b"e1", 1)
        t2 = buf.append(Lane.TELEMETRY, b"t2", 1)
        a1 = buf.append(Lane.ALARM, b"a1", 1)
        e2 = buf.append(Lane.EVENT, b"e2", 1)
        a2 = buf.append(Lane.ALARM, b"a2", 1)
        assert [m.seq for m in buf.peek(10)] == [a1, a2, e1, e2, t1, t2]
        assert [m.lane for m in buf.peek(3)] == [Lane.ALARM, Lane.ALARM, Lane.EVENT]
        assert buf.peek(0) == []


def test_peek_exclude(db: Path) -> None:
    with Buffer(db, 1_000_000) as buf:
        seqs = buf.append_many([(Lane.TELEMETRY, b"x", 1)] * 6)
        inflight = {seqs[0], seqs[2], 999_999}
        got = [m.seq for m in buf.peek(3, exclude=inflight)]
        assert got == [seqs[1], seqs[3], seqs[4]]
        # the in-flight set of a full window, as the uplink passes it (a dict's keys)
        window = dict.fromkeys(seqs[:5], None)
        assert [m.seq for m in buf.peek(32, window.keys())] == [seqs[5]]


def test_ack_deletes_and_returns_points(db: Path) -> None:
    with Buffer(db, 1_000_000) as buf:
        assert buf.stats().last_ack_ms is None
        s1, s2, s3 = buf.append_many(
            [(Lane.TELEMETRY, b"aaaa", 10), (Lane.EVENT, b"bb", 3), (Lane.ALARM, b"c", 1)]
        )
        assert buf.ack([s1, s3, 12345]) == 11  # unknown seq ignored
        assert buf.ack([s1]) == 0  # already acked
        assert buf.ack([]) == 0
        assert [m.seq for m in buf.peek(10)] == [s2]
        stats = buf.stats()
        assert stats.total_bytes == 2
        assert stats.acked_points == 11
        assert stats.last_ack_ms is not None
        last_ack = stats.last_ack_ms
    with Buffer(db, 1_000_000) as buf:
        stats = buf.stats()
        assert stats.last_ack_ms == last_ack
        assert stats.acked_points == 11
        assert stats.total_bytes == 2


def test_seq_never_reused_after_ack_and_reopen(db: Path) -> None:
    with Buffer(db, 1_000_000) as buf:
        seqs = buf.append_many([(Lane.TELEMETRY, b"x", 1)] * 3)
        buf.ack(seqs)  # the table is now empty: max(rowid) alone would restart at 1
    with Buffer(db, 1_000_000) as buf:
        new = buf.append(Lane.ALARM, b"y", 1)
    assert new > max(seqs)


def test_stream_id_stable_across_reopen(db: Path, tmp_path: Path) -> None:
    with Buffer(db, 1000) as buf:
        sid = buf.stream_id
    assert len(sid) == 32 and int(sid, 16) >= 0
    with Buffer(db, 1000) as buf:
        assert buf.stream_id == sid
    with Buffer.open_readonly(db) as ro:
        assert ro.stream_id == sid
    with Buffer(tmp_path / "other.db", 1000) as other:
        assert other.stream_id != sid


def test_append_many_is_one_transaction(db: Path) -> None:
    with Buffer(db, 1_000_000) as buf:
        statements: list[str] = []
        buf._db.conn.set_trace_callback(statements.append)
        buf.append_many([(Lane.TELEMETRY, b"x" * 10, 5)] * 50)
        buf._db.conn.set_trace_callback(None)
    assert sum(s.startswith("BEGIN") for s in statements) == 1
    assert sum(s.startswith("COMMIT") for s in statements) == 1


def test_state_roundtrip(db: Path) -> None:
    snap = {"pid": 1, "uplink": {"state": "online", "last_error": None}, "devices": {"a": [1.5]}}
    with Buffer(db, 1000) as buf:
        assert buf.get_state() == {}
        buf.put_state("agent", snap)
        buf.put_state("n", 1)
        buf.put_state("n", 2)  # overwrite
        assert buf.get_state() == {"agent": snap, "n": 2}
    with Buffer(db, 1000) as buf:
        assert buf.get_state() == {"agent": snap, "n": 2}


def test_payload_made_from_its_seq_and_state_in_the_same_transaction(db: Path) -> None:
    with Buffer(db, 1_000_000) as buf:
        buf.ack(buf.append_many([(Lane.TELEMETRY, b"x", 1)] * 3))  # seqs 1..3, gone
        seqs = buf.append_many(
            [(Lane.TELEMETRY, lambda seq: b"seq=%d" % seq, 1)] * 2, state={"0:sdt:7": b"s1"}
        )
        assert seqs == [4, 5]
        assert [(m.seq, m.payload) for m in buf.peek(10)] == [(4, b"seq=4"), (5, b"seq=5")]
        buf.append_many([], state={"0:sdt:7": b"s2", "1:alarm:7": b"a"})  # state alone
        assert buf.pipeline_state() == {"0:sdt:7": b"s2", "1:alarm:7": b"a"}
        conn = buf._db.conn
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + 2}")  # the next append cannot fit
        with pytest.raises(BufferWriteError):
            buf.append_many([(Lane.TELEMETRY, os.urandom(50_000), 1)], state={"0:sdt:7": b"s3"})
        conn.execute("PRAGMA max_page_count = 1073741823")
        assert buf.pipeline_state()["0:sdt:7"] == b"s2"  # rolled back with the messages
        assert buf.append(Lane.TELEMETRY, b"y", 1) == 6  # the failed seq is not burnt
    with Buffer(db, 1_000_000) as buf:
        assert buf.pipeline_state()["0:sdt:7"] == b"s2"


@pytest.mark.parametrize("version", [1, 2])
def test_older_database_is_migrated(db: Path, version: int) -> None:
    with Buffer(db, 1_000_000) as buf:
        buf.append(Lane.TELEMETRY, b"old", 1)
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE intake")  # added by version 3
    if version == 1:
        conn.execute("DROP TABLE pipeline_state")  # added by version 2
    conn.execute(f"PRAGMA user_version = {version}")
    conn.commit()
    conn.close()
    with Buffer(db, 1_000_000) as buf:
        assert [m.payload for m in buf.peek(10)] == [b"old"]
        assert buf.pipeline_state() == {}
        buf.append_many([], state={"k": b"v"})
        assert buf.pipeline_state() == {"k": b"v"}
        assert buf.intake_load() == []
        assert buf.append(Lane.TELEMETRY, b"new", 1) == 2
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    conn.close()


def test_threads_share_one_buffer(db: Path) -> None:
    with Buffer(db, 10_000_000) as buf:
        seqs: list[int] = []
        lock = threading.Lock()

        def work() -> None:
            for _ in range(20):
                got = buf.append_many([(Lane.TELEMETRY, b"p" * 100, 2)] * 5)
                with lock:
                    seqs.extend(got)
                buf.peek(5)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(seqs) == len(set(seqs)) == 400
        stats = buf.stats()
        assert stats.total_bytes == 40_000 == buf._total_bytes
        assert stats.lanes[Lane.TELEMETRY].points == 800


# -- capacity and eviction -------------------------------------------------------


def test_eviction_order_and_counts_persist(db: Path) -> None:
    with Buffer(db, 1000) as buf:
        a1 = buf.append(Lane.ALARM, b"a" * 100, 1)
        t1 = buf.append(Lane.TELEMETRY, b"t" * 200, 20)
        e1 = buf.append(Lane.EVENT, b"e" * 100, 2)
        t2 = buf.append(Lane.TELEMETRY, b"t" * 200, 30)
        a2 = buf.append(Lane.ALARM, b"a" * 100, 3)
        e2 = buf.append(Lane.EVENT, b"e" * 100, 4)
        assert buf.stats().total_bytes == 800
        assert buf.stats().evicted_messages == 0

        # +150 -> 950: fits
        t3 = buf.append(Lane.TELEMETRY, b"t" * 150, 15)
        # +250 -> 1200: the oldest telemetry (t1, 200) goes, nothing else
        a3 = buf.append(Lane.ALARM, b"a" * 250, 5)
        held = {m.seq for m in buf.peek(100)}
        assert held == {a1, e1, t2, a2, e2, t3, a3}
        assert t1 not in held
        s = buf.stats()
        assert (s.evicted_messages, s.evicted_points, s.total_bytes) == (1, 20, 1000)

        # +500 -> 1500: all telemetry goes first (t2 200, t3 150), then oldest event (e1 100),
        # then e2 (100): 1500 - 550 = 950
        a4 = buf.append(Lane.ALARM, b"a" * 500, 7)
        held = {m.seq for m in buf.peek(100)}
        assert held == {a1, a2, a3, a4}
        s = buf.stats()
        assert (s.evicted_messages, s.evicted_points, s.total_bytes) == (5, 71, 950)

        # only alarms left: the oldest alarms go
        a5 = buf.append(Lane.ALARM, b"a" * 200, 9)
        assert {m.seq for m in buf.peek(100)} == {a3, a4, a5}
        s = buf.stats()
        assert s.total_bytes == 950
        assert (s.evicted_messages, s.evicted_points) == (7, 71 + 1 + 3)  # a1, a2
        assert s.appended_points == 1 + 20 + 2 + 30 + 3 + 4 + 15 + 5 + 7 + 9

    with Buffer(db, 1000) as buf:  # counters are persistent
        s = buf.stats()
        assert (s.evicted_messages, s.evicted_points, s.total_bytes) == (7, 75, 950)
    with Buffer.open_readonly(db) as ro:
        s = ro.stats()
        assert (s.evicted_messages, s.evicted_points, s.capacity_bytes) == (7, 75, 1000)


def test_new_telemetry_never_displaces_events(db: Path) -> None:
    with Buffer(db, 300) as buf:
        e = buf.append_many([(Lane.EVENT, b"e" * 100, 1)] * 3)
        t = buf.append(Lane.TELEMETRY, b"t" * 50, 5)
        assert [m.seq for m in buf.peek(10)] == e  # the new telemetry itself was evicted
        assert t not in {m.seq for m in buf.peek(10)}
        assert buf.stats().evicted_points == 5


def test_eviction_within_one_append_many(db: Path) -> None:
    with Buffer(db, 250) as buf:
        seqs = buf.append_many([(Lane.TELEMETRY, b"t" * 100, i) for i in range(1, 6)])
        assert [m.seq for m in buf.peek(10)] == seqs[3:]
        s = buf.stats()
        assert (s.evicted_messages, s.evicted_points, s.total_bytes) == (3, 6, 200)


def test_oversized_alarm_is_kept_everything_else_evicted(db: Path) -> None:
    with Buffer(db, 1000) as buf:
        a1 = buf.append(Lane.ALARM, b"a" * 100, 1)
        buf.append(Lane.EVENT, b"e" * 100, 2)
        buf.append(Lane.TELEMETRY, b"t" * 100, 3)
        big = buf.append(Lane.ALARM, b"B" * 5000, 4)
        msgs = buf.peek(10)
        assert [m.seq for m in msgs] == [big]
        assert msgs[0].payload == b"B" * 5000
        s = buf.stats()
        assert (s.total_bytes, s.evicted_messages, s.evicted_points) == (5000, 3, 6)
        assert a1 not in {m.seq for m in msgs}
        # while it waits, incoming telemetry is what gets dropped
        buf.append(Lane.TELEMETRY, b"t" * 10, 1)
        assert [m.seq for m in buf.peek(10)] == [big]
        assert buf.ack([big]) == 4
        assert buf.stats().total_bytes == 0
        buf.append(Lane.TELEMETRY, b"t" * 10, 1)
        assert buf.stats().total_bytes == 10


def test_oversized_telemetry_is_dropped_without_evicting_others(db: Path) -> None:
    with Buffer(db, 1000) as buf:
        keep = buf.append_many([(Lane.TELEMETRY, b"t" * 400, 4), (Lane.EVENT, b"e" * 400, 2)])
        s_big, s_after = buf.append_many(
            [(Lane.TELEMETRY, b"X" * 1001, 99), (Lane.TELEMETRY, b"t" * 100, 1)]
        )
        assert held_seqs(buf) == sorted([*keep, s_after])
        s = buf.stats()
        assert (s.evicted_messages, s.evicted_points, s.total_bytes) == (1, 99, 900)
        assert s_big not in {m.seq for m in buf.peek(10)}
        assert buf.append(Lane.EVENT, b"y", 1) > s_after  # its seq is consumed, not reused


def held_seqs(buf: Buffer) -> list[int]:
    return sorted(m.seq for m in buf.peek(100))


def test_lowered_capacity_enforced_at_open(db: Path) -> None:
    with Buffer(db, 1000) as buf:
        buf.append_many([(Lane.TELEMETRY, b"t" * 100, 1)] * 8)
    with Buffer(db, 500) as buf:
        s = buf.stats()
        assert (s.total_bytes, s.capacity_bytes, s.evicted_messages) == (500, 500, 3)


def test_eviction_warning_is_structured_and_rate_limited(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="citygw.buffer")
    with Buffer(db, 100) as buf:
        for _ in range(5):
            buf.append(Lane.TELEMETRY, b"t" * 100, 10)  # each evicts the previous one
        lines = [r for r in caplog.records if r.name == "citygw.buffer"]
        assert len(lines) == 1  # first eviction at once, the rest held back
        assert lines[0].levelno == logging.WARNING
        assert lines[0].__dict__["evicted_points"] == 10
        assert lines[0].__dict__["evicted_messages"] == 1
        assert lines[0].__dict__["buffer"] == str(db)
    # the count since the last line is reported at close
    lines = [r for r in caplog.records if r.name == "citygw.buffer"]
    assert len(lines) == 2
    assert lines[1].__dict__["evicted_points"] == 30
    assert lines[1].__dict__["evicted_by_lane"] == {"telemetry": 3}


def test_eviction_warning_after_interval(
    db: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Buffer, "EVICTION_LOG_INTERVAL_S", 0.0)
    caplog.set_level(logging.WARNING, logger="citygw.buffer")
    with Buffer(db, 100) as buf:
        for _ in range(4):
            buf.append(Lane.TELEMETRY, b"t" * 100, 10)
    assert len([r for r in caplog.records if r.name == "citygw.buffer"]) == 3


# -- failures ----------------------------------------------------------------------


def test_write_failure_rolls_back_and_names_path(db: Path) -> None:
    with Buffer(db, 100_000_000) as buf:
        buf.append(Lane.TELEMETRY, b"x" * 100, 1)
        before = buf.stats()
        conn = buf._db.conn
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + 2}")  # a "disk" that is nearly full
        with pytest.raises(BufferWriteError, match=str(db)) as err:
            buf.append_many([(Lane.TELEMETRY, os.urandom(50_000), 7)] * 3)
        assert isinstance(err.value, BufferError)
        assert "FULL" in str(err.value)
        assert buf.stats() == before
        assert buf._total_bytes == before.total_bytes
        assert not conn.in_transaction
        conn.execute("PRAGMA max_page_count = 1073741823")
        buf.append(Lane.TELEMETRY, b"y" * 10, 1)
        assert buf.stats().total_bytes == 110


def test_missing_parent_directory_is_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "buffer.db"
    with Buffer(path, 1000) as buf:
        buf.append(Lane.EVENT, b"e", 1)
    assert path.is_file()


def _aside_files(db: Path) -> list[Path]:
    return sorted(db.parent.glob(db.name + ".corrupt-*"))


def _assert_recovered(db: Path, original: bytes, caplog: pytest.LogCaptureFixture) -> None:
    with Buffer(db, 1000) as buf:
        aside = [p for p in _aside_files(db) if not p.name.endswith(("-wal", "-shm"))]
        assert len(aside) == 1
        assert aside[0].read_bytes() == original  # moved, never deleted
        assert buf.get_state() == {"buffer_recovered": str(aside[0])}
        assert buf.recovered_from == aside[0]
        assert buf.peek(10) == []
        buf.append(Lane.ALARM, b"works", 1)
    assert any(
        r.levelno == logging.ERROR and r.__dict__.get("moved_to") == str(aside[0])
        for r in caplog.records
    )
    with Buffer(db, 1000) as buf:  # the fresh database is fine now: nothing more moved
        assert [m.payload for m in buf.peek(10)] == [b"works"]
    assert len([p for p in _aside_files(db) if not p.name.endswith(("-wal", "-shm"))]) == 1


def test_not_sqlite_file_moved_aside(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    garbage = b"this is not a database, just some bytes\n" * 200
    db.write_bytes(garbage)
    _assert_recovered(db, garbage, caplog)


def test_foreign_schema_moved_aside(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE something_else (x)")
    conn.commit()
    conn.close()
    _assert_recovered(db, db.read_bytes(), caplog)


def test_wrong_columns_moved_aside(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Buffer(db, 1000):
        pass
    conn = sqlite3.connect(db)
    conn.execute("ALTER TABLE state DROP COLUMN updated_ms")
    conn.commit()
    conn.close()
    _assert_recovered(db, db.read_bytes(), caplog)


def test_damaged_pages_moved_aside(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Buffer(db, 10_000_000) as buf:
        buf.append_many([(Lane.TELEMETRY, os.urandom(500), 1)] * 200)
    size = db.stat().st_size
    with db.open("r+b") as f:  # keep the header page, trash the b-tree pages
        f.seek(4096)
        f.write(b"\xff" * (size - 8192))
    damaged = db.read_bytes()
    _assert_recovered(db, damaged, caplog)


def test_wal_moved_aside_with_its_database(db: Path) -> None:
    db.write_bytes(b"garbage" * 1000)
    Path(f"{db}-wal").write_bytes(b"old wal")
    with Buffer(db, 1000) as buf:
        aside = buf.recovered_from
    assert aside is not None
    assert Path(f"{aside}-wal").read_bytes() == b"old wal"


def test_newer_schema_is_refused_not_moved(db: Path) -> None:
    with Buffer(db, 1000):
        pass
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(BufferVersionError):
        Buffer(db, 1000)
    assert _aside_files(db) == []


def test_locked_database_is_not_treated_as_corrupt(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue_mod, "BUSY_TIMEOUT_S", 0.05)
    with Buffer(db, 1000) as buf:
        buf.append(Lane.EVENT, b"e", 1)
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    try:
        with pytest.raises(BufferWriteError, match="locked"):
            Buffer(db, 1000)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert _aside_files(db) == []
    with Buffer(db, 1000) as buf:
        assert len(buf.peek(10)) == 1


# -- read-only ---------------------------------------------------------------------


def test_readonly_does_not_block_writer_and_cannot_write(db: Path) -> None:
    with Buffer(db, 1_000_000) as buf:
        buf.registry.ensure([{"key": "dev/p", "unit": "m"}])
        s1 = buf.append(Lane.TELEMETRY, b"one", 1)
        buf.put_state("agent", {"pid": 42})
        with Buffer.open_readonly(db) as ro:
            assert ro.readonly
            assert [m.seq for m in ro.peek(10)] == [s1]
            assert ro.get_state() == {"agent": {"pid": 42}}
            assert ro.registry.all() == [{"id": 1, "key": "dev/p", "unit": "m"}]
            # the writer goes on while a read transaction is open on the reader
            with ro._db.read("test") as rconn:
                rconn.execute("SELECT count(*) FROM messages").fetchone()
                s2 = buf.append(Lane.ALARM, b"two", 2)
                assert buf.ack([s1]) == 1
                buf.put_state("agent", {"pid": 43})
            assert [m.seq for m in ro.peek(10)] == [s2]
            assert ro.stats().lanes[Lane.ALARM].points == 2
            assert ro.stats().capacity_bytes == 1_000_000
            for write in (
                lambda: ro.append(Lane.ALARM, b"x", 1),
                lambda: ro.append_many([(Lane.ALARM, b"x", 1)]),
                lambda: ro.ack([s2]),
                lambda: ro.put_state("k", 1),
                lambda: ro.registry.ensure([{"key": "dev/q"}]),
            ):
                with pytest.raises(BufferReadOnly):
                    write()
            # even SQL behind the API's back cannot write
            with pytest.raises(sqlite3.OperationalError):
                ro._db.conn.execute("DELETE FROM messages")
        assert [m.seq for m in buf.peek(10)] == [s2]


def test_readonly_after_writer_closed(db: Path) -> None:
    with Buffer(db, 1000) as buf:
        buf.append(Lane.EVENT, b"e", 3)
    before = db.read_bytes()
    with Buffer.open_readonly(db) as ro:
        assert ro.stats().lanes[Lane.EVENT].points == 3
    assert db.read_bytes() == before


def test_readonly_missing_or_corrupt(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Buffer.open_readonly(tmp_path / "nope.db")
    assert not (tmp_path / "nope.db").exists()
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not sqlite" * 100)
    with pytest.raises(BufferCorrupt):
        Buffer.open_readonly(bad)
    assert bad.read_bytes() == b"not sqlite" * 100  # a reader never moves files


def test_closed_buffer_raises(db: Path) -> None:
    buf = Buffer(db, 1000)
    buf.close()
    buf.close()  # idempotent
    with pytest.raises(BufferError, match="closed"):
        buf.peek(1)


# -- durability --------------------------------------------------------------------

_CRASH_SCRIPT = """
import os, sys
from buffer import Buffer, Lane
buf = Buffer(sys.argv[1], 10_000_000, sys.argv[2])
seqs = buf.append_many([(Lane.TELEMETRY, bytes([i]) * 1000, i) for i in range(1, 51)])
buf.append(Lane.ALARM, b"alarm", 1)
buf.ack(seqs[:10])
print(seqs[-1], flush=True)
os._exit(0)  # a crash: no close, no checkpoint
"""


@pytest.mark.parametrize("sync", ["normal", "full"])
def test_committed_data_survives_process_crash(db: Path, sync: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _CRASH_SCRIPT, str(db), sync],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    last = int(out.stdout.strip())
    assert Path(f"{db}-wal").exists()  # the data is still only in the WAL
    with Buffer(db, 10_000_000) as buf:
        msgs = buf.peek(100)
        assert msgs[0].payload == b"alarm"
        assert [m.payload for m in msgs[1:]] == [bytes([i]) * 1000 for i in range(11, 51)]
        stats = buf.stats()
        assert stats.acked_points == sum(range(1, 11))
        assert buf.append(Lane.EVENT, b"next", 1) > last + 1


def test_checkpoint_moves_the_wal_into_the_database(tmp_path: Path) -> None:
    path = tmp_path / "buf.db"
    with Buffer(path, 1 << 20) as buf:
        buf.append_many([(Lane.TELEMETRY, b"x" * 1000, 1) for _ in range(50)])
        wal = path.with_name(path.name + "-wal")
        size_before = path.stat().st_size
        assert wal.stat().st_size > 0
        buf.checkpoint()
        assert path.stat().st_size > size_before  # the pages are in the main file now
        assert len(buf.peek(100)) == 50
    with Buffer.open_readonly(path) as ro, pytest.raises(BufferReadOnly):
        ro.checkpoint()


def test_crash_skips_the_reserved_seqs_once_and_a_clean_close_skips_none(db: Path) -> None:
    """A seq handed out may have been published and stored by the platform before a
    power cut rolled its append back; after an unclean stop the next seq is therefore
    above the synced reservation. A clean close gives the reservation back."""
    with Buffer(db, 1_000_000) as buf:
        assert buf.append(Lane.TELEMETRY, b"a", 1) == 1
    with Buffer(db, 1_000_000) as buf:
        assert buf.append(Lane.TELEMETRY, b"b", 1) == 2  # clean: no gap
    for _ in range(2):  # two crashes in a row, the second before any append
        subprocess.run(
            [sys.executable, "-c", _CRASH_SCRIPT.replace("51)", "4)"), str(db), "normal"],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            timeout=60,
            check=True,
        )
    with Buffer(db, 1_000_000) as buf:
        stats = buf.stats()
        assert stats.unclean_starts == 2
        # each crashed run appended 3 messages (reserving 3 + a block), then an alarm
        block = queue_mod.SEQ_RESERVE_BLOCK
        first = 2 + 3 + block
        second = first + 3 + block
        assert buf.append(Lane.TELEMETRY, b"c", 1) == second + 1
        assert stats.seq_skipped == (first - 6) + (second - (first + 4))


def test_claimed_messages_are_never_evicted(db: Path) -> None:
    """A message the uplink is publishing may be delivered: evicting it would report
    delivered readings as evicted. Claims hold until the ack or a release."""
    with Buffer(db, 1000) as buf:
        a, _ = buf.append_many([(Lane.TELEMETRY, b"a" * 400, 4), (Lane.TELEMETRY, b"b" * 400, 5)])
        assert [m.seq for m in buf.peek(1, claim=True)] == [a]
        c = buf.append(Lane.TELEMETRY, b"c" * 400, 6)  # over capacity: evicts b, not a
        assert [m.seq for m in buf.peek(10)] == [a, c]
        assert buf.stats().evicted_points == 5
        assert buf.ack([a]) == 4  # the PUBACK came: delivered, not evicted
        assert buf.stats().acked_points == 4
        assert [m.seq for m in buf.peek(1, claim=True)] == [c]
        buf.release()  # the session ended: c may go now
        buf.append(Lane.TELEMETRY, b"d" * 700, 7)
        assert buf.stats().evicted_points == 5 + 6


def test_intake_roundtrip_and_deleted_by_the_append(db: Path) -> None:
    with Buffer(db, 1_000_000, "full") as buf:
        ids = buf.intake_put([(b"one", 3), (b"two", 4)])
        assert buf.stats().intake_points == 7
    with Buffer(db, 1_000_000) as buf:
        assert buf.intake_load() == list(zip(ids, [b"one", b"two"], strict=True))
        with pytest.raises(BufferWriteError):  # a failed append keeps the intake rows
            conn = buf._db.conn
            conn.execute("PRAGMA max_page_count = 1")
            try:
                buf.append_many([(Lane.TELEMETRY, os.urandom(20_000), 3)], intake_done=ids[:1])
            finally:
                conn.execute("PRAGMA max_page_count = 1073741823")
        assert [i for i, _ in buf.intake_load()] == ids
        buf.append_many([(Lane.TELEMETRY, b"out", 3)], intake_done=ids[:1])
        assert buf.intake_load() == [(ids[1], b"two")]
        buf.append_many([], intake_done=ids[1:])  # all suppressed by the pipeline
        assert buf.stats().intake_points == 0
        buf.sync_point()
        assert buf.stats().last_sync_ms is not None


_INTAKE_CRASH = """
import os, sys
from buffer import Buffer
buf = Buffer(sys.argv[1], 10_000_000, sys.argv[2])
buf.intake_put([(b"raw", 5)])
os._exit(0)
"""


@pytest.mark.parametrize(
    ("sync", "rebooted", "replayed"),
    [("normal", False, True), ("full", True, True), ("normal", True, False)],
)
def test_intake_after_a_crash_is_replayed_unless_a_power_cut_made_it_unsafe(
    db: Path, monkeypatch: pytest.MonkeyPatch, sync: str, rebooted: bool, replayed: bool
) -> None:
    """After a process crash (same boot) the intake is exact: replay it. After a power
    cut with sync=normal a surviving row may belong to a flush whose messages reached the
    platform before the cut rolled it back: dropped (counted), never stored twice."""
    subprocess.run(
        [sys.executable, "-c", _INTAKE_CRASH, str(db), sync],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
        timeout=60,
    )
    if rebooted:
        monkeypatch.setattr(queue_mod, "boot_id", lambda: "another-boot")
    with Buffer(db, 1_000_000, sync) as buf:
        assert buf.unclean and buf.power_lost == rebooted
        rows, dropped = buf.intake_recover()
        assert ([d for _, d in rows], dropped) == (([b"raw"], 0) if replayed else ([], 5))
        assert buf.stats().intake_dropped == (0 if replayed else 5)
    with Buffer(db, 1_000_000, sync) as buf:  # a clean close in between: nothing unclean
        assert not buf.unclean and not buf.power_lost
