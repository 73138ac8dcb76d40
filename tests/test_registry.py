"""The point registry: stable small integer ids in the buffer's database."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from buffer import Buffer, BufferReadOnly


def meta(key: str, unit: str = "m") -> dict[str, str]:
    device, name = key.split("/")
    return {"key": key, "device": device, "name": name, "unit": unit, "driver": "sim"}


def test_ids_assigned_in_order_with_metadata(tmp_path: Path) -> None:
    with Buffer(tmp_path / "b.db", 1000) as buf:
        ids = buf.registry.ensure([meta("bridge-7/strain_1"), meta("bridge-7/strain_2")])
        assert ids == {"bridge-7/strain_1": 1, "bridge-7/strain_2": 2}
        assert buf.registry.all() == [
            {"id": 1, "key": "bridge-7/strain_1", "device": "bridge-7", "name": "strain_1",
             "unit": "m", "driver": "sim"},
            {"id": 2, "key": "bridge-7/strain_2", "device": "bridge-7", "name": "strain_2",
             "unit": "m", "driver": "sim"},
        ]  # fmt: skip
        assert buf.registry.ensure([]) == {}


def test_ids_stable_across_reopen_new_points_appended(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    with Buffer(path, 1000) as buf:
        first = buf.registry.ensure([meta("a/x"), meta("a/y"), meta("b/z")])
    with Buffer(path, 1000) as buf:
        # reordered, one unit changed, one new point
        again = buf.registry.ensure([meta("b/z"), meta("c/new"), meta("a/x", unit="cm")])
        assert again == {"b/z": first["b/z"], "c/new": 4, "a/x": first["a/x"]}
        by_key = {p["key"]: p for p in buf.registry.all()}
        assert by_key["a/x"]["unit"] == "cm"  # metadata updated, id kept
        assert by_key["a/y"]["id"] == first["a/y"]  # not in this ensure: still registered
    with Buffer.open_readonly(path) as ro:
        assert [p["id"] for p in ro.registry.all()] == [1, 2, 3, 4]


def test_removed_ids_never_reused(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    with Buffer(path, 1000) as buf:
        buf.registry.ensure([meta("a/x"), meta("a/y")])
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM points WHERE key = 'a/y'")  # e.g. a later prune of old points
    conn.commit()
    conn.close()
    with Buffer(path, 1000) as buf:
        assert buf.registry.ensure([meta("a/w")]) == {"a/w": 3}


def test_duplicates_and_reserved_keys(tmp_path: Path) -> None:
    with Buffer(tmp_path / "b.db", 1000) as buf:
        ids = buf.registry.ensure([meta("a/x"), {"key": "a/x", "id": 77, "unit": "V"}])
        assert ids == {"a/x": 1}
        assert buf.registry.all() == [{"id": 1, "key": "a/x", "unit": "V"}]


def test_invalid_entry_writes_nothing(tmp_path: Path) -> None:
    with Buffer(tmp_path / "b.db", 1000) as buf:
        with pytest.raises(ValueError, match="key"):
            buf.registry.ensure([meta("a/x"), {"name": "no key"}])
        with pytest.raises(TypeError):
            buf.registry.ensure([meta("a/x"), {"key": "a/y", "unit": object()}])
        assert buf.registry.all() == []
        assert buf.registry.ensure([meta("a/x")]) == {"a/x": 1}


def test_readonly_registry_cannot_write(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    with Buffer(path, 1000) as buf:
        buf.registry.ensure([meta("a/x")])
        with Buffer.open_readonly(path) as ro:
            with pytest.raises(BufferReadOnly):
                ro.registry.ensure([meta("a/y")])
            assert [p["key"] for p in ro.registry.all()] == ["a/x"]
