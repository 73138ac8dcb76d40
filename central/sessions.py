"""Console sessions in the store: several `citygw platform serve` processes behind a load
balancer share nothing but the store, so a session opened on one is valid on every other,
and a logout ends it everywhere.

The cookie holds a random session id; the store keeps only its SHA-256, so a copy of the
database cannot be replayed as a login. Each session has its own CSRF token."""

from __future__ import annotations

from dataclasses import dataclass

SQLITE_TABLES = """
CREATE TABLE IF NOT EXISTS console_sessions (
    id_hash    TEXT    PRIMARY KEY,
    user_name  TEXT    NOT NULL,
    role       TEXT    NOT NULL,
    csrf       TEXT    NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
);
"""

POSTGRES_TABLES = """
CREATE TABLE IF NOT EXISTS console_sessions (
    id_hash    text   PRIMARY KEY,
    user_name  text   NOT NULL,
    role       text   NOT NULL,
    csrf       text   NOT NULL,
    created_ms bigint NOT NULL,
    expires_ms bigint NOT NULL
)
"""


@dataclass(frozen=True, slots=True)
class Session:
    user: str
    role: str
    csrf: str
    expires_ms: int


def session_insert(ph: str) -> str:
    return (
        "INSERT INTO console_sessions (id_hash, user_name, role, csrf, created_ms, expires_ms) "
        f"VALUES ({ph}, {ph}, {ph}, {ph}, {ph}, {ph})"
    )


def session_select(ph: str) -> str:
    return (
        "SELECT user_name, role, csrf, expires_ms FROM console_sessions "
        f"WHERE id_hash = {ph} AND expires_ms > {ph}"
    )


def session_delete(ph: str) -> str:
    """One session: a logout."""
    return f"DELETE FROM console_sessions WHERE id_hash = {ph}"


def sessions_expired(ph: str) -> str:
    """The expired ones, dropped at every login: the table holds few more than the live
    sessions, and needs no sweeper."""
    return f"DELETE FROM console_sessions WHERE expires_ms <= {ph}"
