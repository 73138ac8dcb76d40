"""Opening a store by URL: the embedded SQLite store or PostgreSQL."""

from __future__ import annotations

from central.store import Store
from central.store_sqlite import SqliteStore
from common.redact import redact


def open_store(url: str, *, create: bool = True) -> Store:
    """``sqlite:///relative.db``, ``sqlite:////abs/path.db``, ``sqlite:///:memory:``
    or ``postgresql://user@host:port/db?schema=name`` (psycopg 3). With `create`, the
    store is created or migrated as needed (the ingest); without it (tools that only
    read), nothing is changed and `StoreMissing` says when there is no current store."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if not path:
            raise ValueError(f"no database path in {url!r}")
        return SqliteStore(path, create=create)
    if url.startswith(("postgresql://", "postgres://")):
        from central.store_postgres import PostgresStore  # psycopg: only when asked for

        return PostgresStore(url, create=create)
    raise ValueError(
        f"unsupported store URL {redact(url)!r}: use sqlite:///path.db or postgresql://..."
    )
