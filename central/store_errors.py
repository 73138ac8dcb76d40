"""Which store errors pass and which never will: the one place the ingest worker asks.

- TRANSIENT: the store cannot take anything now (connection lost, server restarting or
  shutting down, serialization failure or deadlock, database busy or locked, disk full,
  I/O error, schema or privileges changed under the worker). Retried with backoff for as
  long as it lasts; the broker keeps the messages meanwhile. Never a dead letter.
- REFUSED: the store refuses this data (a value its column cannot hold, a constraint,
  an index entry too large, a value the driver cannot adapt). Retrying cannot help:
  the worker finds the message that carries it and dead-letters it.
- UNKNOWN: anything else. Retried a bounded number of times, then taken as REFUSED for
  a message that still fails on its own.

psycopg is an optional extra: its errors are recognised only when it is loaded, which
it is whenever a PostgreSQL store exists to raise them.
"""

from __future__ import annotations

import enum
import sqlite3
import sys
from types import ModuleType
from typing import Final


class StoreFault(enum.Enum):
    TRANSIENT = "transient"
    REFUSED = "refused"
    UNKNOWN = "unknown"


# SQLite primary result codes (sqlite3.h)
_SQLITE_TRANSIENT: Final = frozenset(
    {
        4,  # ABORT: rolled back by another statement
        5,  # BUSY
        6,  # LOCKED
        8,  # READONLY: the file or its directory lost write permission
        9,  # INTERRUPT
        10,  # IOERR
        11,  # CORRUPT: the store needs its operator, not this message dead-lettered
        13,  # FULL
        14,  # CANTOPEN
        15,  # PROTOCOL
        17,  # SCHEMA: changed by another connection; the statement can run again
        23,  # AUTH
        26,  # NOTADB
    }
)
_SQLITE_REFUSED: Final = frozenset({18, 19, 20})  # TOOBIG, CONSTRAINT, MISMATCH

# PostgreSQL SQLSTATE classes (https://www.postgresql.org/docs/current/errcodes-appendix.html)
_PG_TRANSIENT_CLASSES: Final = frozenset(
    {
        "08",  # connection exception
        "25",  # invalid transaction state (e.g. read-only after a failover)
        "28",  # invalid authorization
        "3D",  # invalid catalog name: the database is gone
        "3F",  # invalid schema name
        # syntax error or access rule violation: every statement is static and takes its
        # data as parameters, so this is a dropped table or a revoked privilege, the same
        # for every message
        "42",
        "40",  # transaction rollback: serialization failure, deadlock
        "53",  # insufficient resources: disk full, too many connections
        "55",  # object not in prerequisite state: lock not available
        "57",  # operator intervention: shutdown, cannot connect now
        "58",  # system error: I/O error
    }
)
_PG_REFUSED_CLASSES: Final = frozenset(
    {
        "22",  # data exception: NUL in text, a value out of range, invalid JSON
        "23",  # integrity constraint (the dedup key never raises: ON CONFLICT DO NOTHING)
        "54",  # program limit exceeded: an index entry larger than a btree page allows
    }
)
# data-dependent within a transient class: a huge message can exhaust memory or time
_PG_UNKNOWN_CODES: Final = frozenset({"53200", "57014"})  # out_of_memory, query_canceled


def classify(error: BaseException) -> StoreFault:
    """What a failed store call means for the messages it carried."""
    if isinstance(error, sqlite3.Error):
        return _classify_sqlite(error)
    pg = sys.modules.get("psycopg")
    if pg is not None and isinstance(error, pg.Error):
        return _classify_postgres(error, pg)
    if isinstance(error, OSError):
        return StoreFault.TRANSIENT
    # a value the driver could not adapt (UnicodeEncodeError for a lone surrogate, an int
    # beyond 64 bits, orjson refusing a location): the data, not the store
    if isinstance(error, ValueError | TypeError | OverflowError):
        return StoreFault.REFUSED
    return StoreFault.UNKNOWN


def _classify_sqlite(error: sqlite3.Error) -> StoreFault:
    code = getattr(error, "sqlite_errorcode", None)
    if isinstance(code, int):
        primary = code & 0xFF  # extended codes carry the primary one in the low byte
        if primary in _SQLITE_TRANSIENT:
            return StoreFault.TRANSIENT
        if primary in _SQLITE_REFUSED:
            return StoreFault.REFUSED
        return StoreFault.UNKNOWN
    # raised by the sqlite3 module itself, without a result code
    if isinstance(error, sqlite3.IntegrityError | sqlite3.DataError | sqlite3.InterfaceError):
        return StoreFault.REFUSED
    if isinstance(error, sqlite3.OperationalError):
        return StoreFault.TRANSIENT
    return StoreFault.UNKNOWN  # ProgrammingError: a closed store, a binding this code never makes


def _classify_postgres(error: BaseException, pg: ModuleType) -> StoreFault:
    sqlstate = getattr(error, "sqlstate", None)
    if isinstance(sqlstate, str) and len(sqlstate) == 5:
        if sqlstate in _PG_UNKNOWN_CODES:
            return StoreFault.UNKNOWN
        if sqlstate[:2] in _PG_TRANSIENT_CLASSES:
            return StoreFault.TRANSIENT
        if sqlstate[:2] in _PG_REFUSED_CLASSES:
            return StoreFault.REFUSED
        return StoreFault.UNKNOWN
    # raised by psycopg itself: a lost or closed connection, or a value it cannot send
    # (a NUL in a text parameter is a client-side DataError)
    if isinstance(error, pg.OperationalError | pg.InterfaceError):
        return StoreFault.TRANSIENT
    if isinstance(error, pg.DataError):
        return StoreFault.REFUSED
    return StoreFault.UNKNOWN
