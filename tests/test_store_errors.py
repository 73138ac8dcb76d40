"""`central/store_errors.classify` on real errors of both stores: what the ingest
worker retries (transient), dead-letters (refused) or retries a bounded number of times
(unknown)."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from central.store_errors import StoreFault, classify
from tests.helpers import wait_until


def real_error(fn: Callable[[], object]) -> BaseException:
    try:
        fn()
    except Exception as e:
        return e
    raise AssertionError("no error")


def test_classify_sqlite_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    a = sqlite3.connect(path, isolation_level=None, timeout=0)
    b = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        a.execute("CREATE TABLE t (k TEXT PRIMARY KEY NOT NULL)")
        a.execute("INSERT INTO t VALUES ('x')")
        a.execute("BEGIN EXCLUSIVE")
        locked = real_error(lambda: b.execute("BEGIN IMMEDIATE"))
        a.execute("COMMIT")
        assert classify(locked) is StoreFault.TRANSIENT, locked
        assert classify(real_error(lambda: a.execute("INSERT INTO t VALUES ('x')"))) is (
            StoreFault.REFUSED
        )
        surrogate = real_error(lambda: a.execute("INSERT INTO t VALUES (?)", ("\ud800",)))
        assert classify(surrogate) is StoreFault.REFUSED
        big = real_error(lambda: a.execute("INSERT INTO t VALUES (?)", (2**64,)))
        assert classify(big) is StoreFault.REFUSED
        assert classify(sqlite3.OperationalError("disk I/O error")) is StoreFault.TRANSIENT
    finally:
        a.close()
        b.close()
    closed = real_error(lambda: a.execute("SELECT 1"))
    assert classify(closed) is StoreFault.UNKNOWN


def backend_alive(db: psycopg.Connection[Any], pid: int) -> bool:
    row = db.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return row is not None and row[0] > 0


def test_classify_postgresql_errors(pg_url: str) -> None:
    conninfo = pg_url.split("?")[0]
    with psycopg.connect(conninfo, autocommit=True) as db:
        db.execute("CREATE TEMP TABLE t (k text PRIMARY KEY, n integer, j jsonb)")

        def insert(*row: object) -> Callable[[], object]:
            return lambda: db.execute("INSERT INTO t VALUES (%s, %s, %s::jsonb)", row)

        refused = [
            insert("a\x00b", 1, None),  # client side: text cannot hold NUL
            insert("a", 2**31, None),  # integer out of range
            insert("a", 1, '{"a": "\\u0000"}'),  # jsonb refuses an escaped NUL
            insert(secrets.token_hex(3000), 1, None),  # btree entry too large
            insert("\ud800", 1, None),  # not UTF-8
        ]
        for fn in refused:
            e = real_error(fn)
            assert classify(e) is StoreFault.REFUSED, repr(e)
        insert("dup", 1, None)()
        assert classify(real_error(insert("dup", 1, None))) is StoreFault.REFUSED
        # the connection is usable after each refusal
        assert db.execute("SELECT count(*) FROM t").fetchone() == (1,)
        with psycopg.connect(conninfo, autocommit=True) as victim:
            pid = victim.info.backend_pid
            db.execute("SELECT pg_terminate_backend(%s)", (pid,))
            asyncio.run(wait_until(lambda: not backend_alive(db, pid)))
            gone = real_error(lambda: victim.execute("SELECT 1"))
        assert classify(gone) is StoreFault.TRANSIENT, repr(gone)
    refused_port = real_error(
        lambda: psycopg.connect("postgresql://postgres@127.0.0.1:1/test", connect_timeout=2)
    )
    assert classify(refused_port) is StoreFault.TRANSIENT
    for code in ("40001", "40P01", "53100", "57P01", "57P03", "58030", "08006", "42P01"):
        assert classify(psycopg.errors.lookup(code)("x")) is StoreFault.TRANSIENT, code
    for code in ("XX000", "53200", "57014"):
        assert classify(psycopg.errors.lookup(code)("x")) is StoreFault.UNKNOWN, code
    assert classify(RuntimeError("?")) is StoreFault.UNKNOWN
    assert classify(ConnectionResetError()) is StoreFault.TRANSIENT
