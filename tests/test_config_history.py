"""The platform's config history (issue 15): the configs each gateway reports in up/meta
and the ones pushed to it, in both stores; the fleet row's running config; the PostgreSQL
schema's upgrade from version 4; `citygw platform configs`; the console's API."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from central.configs import SENT, ConfigPushRecord
from central.store import Store
from central.stores import open_store
from cli.main import app
from common import wire

GW = "gw-cfg"
STREAM = "0123456789abcdef0123456789abcdef"
OLD = {"version": "2026-11", "hash": "sha256:" + "a" * 64}
NEW = {"version": "2026-12", "hash": "sha256:" + "b" * 64}


def meta(config: dict[str, str] | None, gateway: str = GW) -> wire.Meta:
    points = (wire.PointMeta(1, "meter/power", "meter", "power", "W", "modbus"),)
    return wire.Meta(gateway=gateway, stream=STREAM, points=points, config=config)


def push(outcome: str = SENT, ms: int = 1_000) -> ConfigPushRecord:
    return ConfigPushRecord(
        0, GW, f"push-{ms}", NEW["version"], NEW["hash"], "[gateway]\n", "ops@desk", ms, outcome,
        None, None,
    )  # fmt: skip


def test_history_of_reported_and_pushed_configs(store: Store) -> None:
    store.store_meta(GW, meta(OLD))
    store.store_meta(GW, meta(OLD))  # the same config again: one row, last seen moves
    store.store_meta("gw-old", meta(None, "gw-old"))  # a gateway before issue 15
    [row] = store.fleet(GW)
    assert (row.config_version, row.config_hash) == (OLD["version"], OLD["hash"])
    assert store.fleet("gw-old")[0].config_version is None

    pid = store.config_push_record(push())
    store.config_push_answered(pid, "applied", None, 2_000)
    store.store_meta(GW, meta(NEW))
    seen = store.configs_seen(GW)
    assert [(c.version, c.running) for c in seen] == [("2026-12", True), ("2026-11", False)]
    assert seen[1].first_seen_ms <= seen[1].last_seen_ms <= seen[0].first_seen_ms
    assert store.configs_seen() == seen  # gw-old reported none
    [p] = store.config_pushes(GW)
    assert (p.id, p.outcome, p.answered_ms, p.text, p.pushed_by) == (
        pid,
        "applied",
        2_000,
        "[gateway]\n",
        "ops@desk",
    )
    second = store.config_push_record(push(ms=5_000))
    store.config_push_answered(second, "rolled_back", "the uplink was not healthy", 6_000)
    assert [(q.id, q.outcome, q.error) for q in store.config_pushes(GW)] == [
        (second, "rolled_back", "the uplink was not healthy"),
        (pid, "applied", None),
    ]
    assert store.config_pushes(GW, limit=1)[0].id == second
    assert store.config_pushes("gw-old") == []


def test_sqlite_store_before_the_config_history_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    open_store(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as db:  # as a citygw before issue 15 left it
        db.execute("DROP TABLE gateway_configs")
        db.execute("DROP TABLE config_pushes")
        db.execute("ALTER TABLE gateways DROP COLUMN config_version")
        db.execute("ALTER TABLE gateways DROP COLUMN config_hash")
    store = open_store(f"sqlite:///{path}")
    try:
        store.store_meta(GW, meta(OLD))
        assert store.fleet(GW)[0].config_version == OLD["version"]
        assert [c.hash for c in store.configs_seen(GW)] == [OLD["hash"]]
    finally:
        store.close()


def test_postgres_upgrades_a_version_4_schema(pg_url: str) -> None:
    import psycopg
    from psycopg import sql

    from central.store import StoreMissing
    from central.store_postgres import SCHEMA_VERSION, split_url

    open_store(pg_url).close()
    conninfo, schema = split_url(pg_url)
    with psycopg.connect(conninfo, autocommit=True) as db:  # as a citygw before issue 15 left it
        ident = sql.Identifier(schema)
        db.execute(sql.SQL("DROP TABLE {}.gateway_configs, {}.config_pushes").format(ident, ident))
        db.execute(
            sql.SQL("ALTER TABLE {}.gateways DROP COLUMN config_version, DROP COLUMN config_hash")
            .format(ident)
        )  # fmt: skip
        db.execute(sql.SQL("UPDATE {}.schema_info SET version = 4").format(ident))
    try:
        open_store(pg_url, create=False)
    except StoreMissing as exc:  # readers change nothing
        assert "at version 4" in str(exc)
    else:
        raise AssertionError("a reader opened a version 4 store")
    open_store(pg_url).close()  # the ingest upgrades it
    store = open_store(pg_url, create=False)
    try:
        assert SCHEMA_VERSION == 6
        store.store_meta(GW, meta(NEW))
        assert store.fleet(GW)[0].config_hash == NEW["hash"]
        assert store.config_pushes(GW) == [] and len(store.configs_seen(GW)) == 1
    finally:
        store.close()


def test_platform_configs_lists_versions_and_a_gateways_history(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'platform.db'}"
    store = open_store(url)
    try:
        store.store_meta(GW, meta(OLD))
        store.store_meta("gw-2", meta(OLD, "gw-2"))
        pid = store.config_push_record(push())
        store.config_push_answered(pid, "refused", "uplink.broker: not a broker URL", 2_000)
    finally:
        store.close()
    runner = CliRunner()
    fleet = runner.invoke(app, ["platform", "configs", "--db", url, "--format", "json"])
    assert fleet.exit_code == 0, fleet.output
    assert [(r["gateway"], r["config_version"]) for r in orjson.loads(fleet.output)] == [
        ("gw-2", "2026-11"),
        (GW, "2026-11"),
    ]
    table = runner.invoke(app, ["platform", "configs", "--db", url], env={"COLUMNS": "200"})
    assert "2 gateways (2026-11: 2)" in table.output
    history = runner.invoke(app, ["platform", "configs", "--db", url, "--gateway", GW])
    assert history.exit_code == 0, history.output
    text = " ".join(history.output.split())
    assert "configs reported running" in text and "2026-11" in text and "yes" in text
    assert "configs pushed" in text and "refused" in text and "ops@desk" in text


def test_configs_reported_within_one_millisecond_list_the_running_one_first(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a push applied at once: the old and the new config seen in the same millisecond
    monkeypatch.setattr(time, "time_ns", lambda: 1_800_000_000_000_000_000)
    store.store_meta(GW, meta(OLD))
    store.store_meta(GW, meta(NEW))
    seen = store.configs_seen(GW)
    assert [(c.version, c.running) for c in seen] == [("2026-12", True), ("2026-11", False)]
