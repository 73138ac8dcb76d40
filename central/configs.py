"""Every gateway's config history in the platform store.

Two sources: the config each gateway says it runs, in its retained up/meta
(`{"version", "hash"}`: `gateway_configs`, one row per gateway and hash with when it was
first and last seen), and the configs pushed to it with `citygw platform push-config`
(`config_pushes`: the text, who pushed it when, and the gateway's answer). The fleet row
carries the running config's version and hash (columns of `gateways`, set from up/meta).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SQLITE_TABLES = """
CREATE TABLE IF NOT EXISTS gateway_configs (
    gateway       TEXT    NOT NULL,
    hash          TEXT    NOT NULL,
    version       TEXT    NOT NULL,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms  INTEGER NOT NULL,
    PRIMARY KEY (gateway, hash)
);
CREATE TABLE IF NOT EXISTS config_pushes (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    gateway     TEXT    NOT NULL,
    command_id  TEXT    NOT NULL,
    version     TEXT    NOT NULL,
    hash        TEXT    NOT NULL,
    text        TEXT    NOT NULL,
    pushed_by   TEXT    NOT NULL,
    pushed_ms   INTEGER NOT NULL,
    outcome     TEXT    NOT NULL,
    error       TEXT,
    answered_ms INTEGER
);
CREATE INDEX IF NOT EXISTS config_pushes_gateway ON config_pushes (gateway, pushed_ms);
"""

POSTGRES_TABLES = """
CREATE TABLE IF NOT EXISTS gateway_configs (
    gateway       text   NOT NULL,
    hash          text   NOT NULL,
    version       text   NOT NULL,
    first_seen_ms bigint NOT NULL,
    last_seen_ms  bigint NOT NULL,
    PRIMARY KEY (gateway, hash)
);
CREATE TABLE IF NOT EXISTS config_pushes (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    gateway     text   NOT NULL,
    command_id  text   NOT NULL,
    version     text   NOT NULL,
    hash        text   NOT NULL,
    text        text   NOT NULL,
    pushed_by   text   NOT NULL,
    pushed_ms   bigint NOT NULL,
    outcome     text   NOT NULL,
    error       text,
    answered_ms bigint
);
CREATE INDEX IF NOT EXISTS config_pushes_gateway ON config_pushes (gateway, pushed_ms)
"""

#: a push's outcome before the gateway answered (and for good if it never does)
SENT = "sent"
#: the broker could not be reached or refused the command
NOT_SENT = "not_sent"


@dataclass(frozen=True, slots=True)
class ConfigSeen:
    """A config a gateway reported running (up/meta)."""

    gateway: str
    version: str
    hash: str
    first_seen_ms: int
    last_seen_ms: int
    running: bool  # the one its latest up/meta names


@dataclass(frozen=True, slots=True)
class ConfigPushRecord:
    """A config sent with `citygw platform push-config` and what became of it."""

    id: int
    gateway: str
    command_id: str
    version: str
    hash: str
    text: str
    pushed_by: str
    pushed_ms: int
    outcome: str  # sent (no answer yet, or none came) | not_sent | applied | refused | rolled_back
    error: str | None
    answered_ms: int | None


def seen_upsert(ph: str) -> str:
    return (
        "INSERT INTO gateway_configs (gateway, hash, version, first_seen_ms, last_seen_ms) "
        f"VALUES ({ph}, {ph}, {ph}, {ph}, {ph}) ON CONFLICT (gateway, hash) DO UPDATE SET "
        "version = excluded.version, last_seen_ms = excluded.last_seen_ms"
    )


def seen_args(gateway: str, config: dict[str, str], now_ms: int) -> tuple[Any, ...]:
    return (gateway, config["hash"], config["version"], now_ms, now_ms)


def seen_query(ph: str, gateway: str | None) -> tuple[str, tuple[str, ...]]:
    where, args = (f" WHERE c.gateway = {ph}", (gateway,)) if gateway is not None else ("", ())
    return (
        "SELECT c.gateway, c.version, c.hash, c.first_seen_ms, c.last_seen_ms, "
        "CASE WHEN g.config_hash = c.hash THEN 1 ELSE 0 END "
        f"FROM gateway_configs c LEFT JOIN gateways g ON g.gateway = c.gateway{where} "
        # within a millisecond (a push applied at once): the running one first
        "ORDER BY c.gateway, c.last_seen_ms DESC, "
        "CASE WHEN g.config_hash = c.hash THEN 1 ELSE 0 END DESC, c.first_seen_ms DESC",
        args,
    )


def seen_from_row(row: Sequence[Any]) -> ConfigSeen:
    gateway, version, hash_, first, last, running = row
    return ConfigSeen(str(gateway), str(version), str(hash_), int(first), int(last), bool(running))


PUSH_COLUMNS = (
    "gateway, command_id, version, hash, text, pushed_by, pushed_ms, outcome, error, answered_ms"
)


def push_insert(ph: str) -> str:
    return (
        f"INSERT INTO config_pushes ({PUSH_COLUMNS}) VALUES ({', '.join([ph] * 10)}) RETURNING id"
    )


def push_args(p: ConfigPushRecord) -> tuple[Any, ...]:
    return (
        p.gateway,
        p.command_id,
        p.version,
        p.hash,
        p.text,
        p.pushed_by,
        p.pushed_ms,
        p.outcome,
        p.error,
        p.answered_ms,
    )


def push_answered(ph: str) -> str:
    return (
        f"UPDATE config_pushes SET outcome = {ph}, error = {ph}, answered_ms = {ph} WHERE id = {ph}"
    )


def pushes_query(ph: str, gateway: str | None, limit: int) -> tuple[str, tuple[Any, ...]]:
    where, args = (f" WHERE gateway = {ph}", (gateway,)) if gateway is not None else ("", ())
    return (
        f"SELECT id, {PUSH_COLUMNS} FROM config_pushes{where} "
        f"ORDER BY pushed_ms DESC, id DESC LIMIT {ph}",
        (*args, limit),
    )


def push_from_row(row: Sequence[Any]) -> ConfigPushRecord:
    id_, gateway, cid, version, hash_, text, by, pushed, outcome, error, answered = row
    return ConfigPushRecord(
        id=int(id_),
        gateway=str(gateway),
        command_id=str(cid),
        version=str(version),
        hash=str(hash_),
        text=str(text),
        pushed_by=str(by),
        pushed_ms=int(pushed),
        outcome=str(outcome),
        error=None if error is None else str(error),
        answered_ms=None if answered is None else int(answered),
    )
