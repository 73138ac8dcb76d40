"""Shared fixtures: a private mosquitto per test, a private PostgreSQL schema per test.

Both fail (never skip) when the service is missing: a skipped integration test looks
like a passing one in CI.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from central.store import Store
from central.stores import open_store
from common.broker import Mosquitto
from hil.powerfs import PowerFs, PowerFsUnavailable, check_available
from tests.helpers import running_broker

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A mosquitto on a free loopback port (config in tmp_path). `.port`, `.url`,
    `.stop()`, `.start()` (same port again: simulated outages); killed at teardown."""
    with running_broker(tmp_path / "mosquitto") as broker:
        yield broker


@pytest.fixture
def pg_url() -> Iterator[str]:
    """``postgresql://postgres@127.0.0.1:5432/test?schema=<unique>``, dropped afterwards."""
    import psycopg
    from psycopg import sql

    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.Error as e:
        pytest.fail(
            f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {e}\n"
            "Set it up with `bash tests/setup-system.sh` (Debian; the README's test command "
            "runs it): trust auth for user postgres and a database named `test`.",
            pytrace=False,
        )
    schema = f"t_{uuid.uuid4().hex[:16]}"
    try:
        yield f"{PG_ADMIN_URL}?schema={schema}"
    finally:
        with admin:
            admin.execute("SET lock_timeout = '10s'")
            admin.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
            )


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """An open platform store at `store_url` (SQLite, then PostgreSQL), closed afterwards."""
    s = open_store(store_url)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A platform store URL: a SQLite file, then a private PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'platform.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[PowerFs]:
    """A hil/powerfs.py mount (tmp_path / "mnt", backed by tmp_path / "disk") whose unsynced
    data a `cut()` drops: a power cut. Fails (never skips) where FUSE is unusable."""
    try:
        check_available()
    except PowerFsUnavailable as exc:
        pytest.fail(
            f"FUSE is not usable here, so power cuts cannot be tested: {exc}. Install "
            "Debian's fuse3 and the test extras (mfusepy), and run as root with /dev/fuse.",
            pytrace=False,
        )
    disk = tmp_path / "disk"
    disk.mkdir()
    with PowerFs(disk, tmp_path / "mnt") as powerfs:
        yield powerfs
