"""The point registry: a stable small integer id for every point, kept in the
buffer's database so that batches carry ids and the names, units and the rest
travel once, in the metadata message."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from buffer.schema import Db

# Keys of an entry that the registry owns; they are not stored as metadata.
_RESERVED = ("key", "id")


class PointRegistry:
    """Stable ids for points ("device/point" keys), sharing the buffer's database."""

    def __init__(self, db: Db) -> None:
        self._db = db

    def ensure(self, points: Sequence[Mapping[str, Any]]) -> dict[str, int]:
        """Registers points and returns {key: id} for every entry given.

        Each mapping has a "key" ("device/point") plus metadata (name, unit, device,
        driver, type...). A known key keeps its id and gets the new metadata; a new key
        gets the next id, never one that a removed point had. One transaction."""
        prepared: list[tuple[str, str]] = []
        for entry in points:
            key = entry.get("key")
            if not isinstance(key, str) or not key:
                raise ValueError(f"point registry entry without a string 'key': {entry!r}")
            meta = {k: v for k, v in entry.items() if k not in _RESERVED}
            # sorted keys: the stored text is canonical, so unchanged metadata is not rewritten
            prepared.append((key, orjson.dumps(meta, option=orjson.OPT_SORT_KEYS).decode()))
        ids: dict[str, int] = {}
        if not prepared:
            return ids
        with self._db.write("point registry update") as conn:
            for key, meta_json in prepared:
                row = conn.execute("SELECT id, meta FROM points WHERE key = ?", (key,)).fetchone()
                if row is None:
                    cur = conn.execute(
                        "INSERT INTO points (key, meta) VALUES (?, ?)", (key, meta_json)
                    )
                    assert cur.lastrowid is not None
                    ids[key] = cur.lastrowid
                else:
                    if row[1] != meta_json:
                        conn.execute("UPDATE points SET meta = ? WHERE id = ?", (meta_json, row[0]))
                    ids[key] = int(row[0])
        return ids

    def all(self) -> list[dict[str, Any]]:
        """Every registered point as {"id": ..., "key": ..., **metadata}, ordered by id."""
        with self._db.read("point registry read") as conn:
            rows = conn.execute("SELECT id, key, meta FROM points ORDER BY id").fetchall()
        return [{"id": int(i), "key": k, **orjson.loads(m)} for i, k, m in rows]
