"""The buffer checks: the database's integrity, the free disk against its capacity, and
how old the oldest unsent batch of each lane is. The database is opened read-only
(`Buffer.open_readonly`): a running agent is not disturbed. Also returns the state the
agent records in it, which tells the other checks whether the agent is running."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

from agent.config import BufferConfig
from agent.doctor.check import Check, passed, skipped
from buffer import Buffer, BufferStats, Lane
from buffer.queue import JOURNAL_SIZE_LIMIT
from common.cli import age

#: an unsent batch older than this is a warn: the uplink is not getting through
BACKLOG_WARN_S = 3600.0
#: the disk must hold this many times the capacity (SQLite's pages and index hold more
#: than the payload bytes the capacity counts), plus a full WAL, or it is a warn
DISK_MARGIN = 1.5


def size(n: float) -> str:
    if n >= 1024**3:
        return f"{n / 1024**3:.1f} GiB"
    return f"{n / 1024**2:.1f} MiB"


def disk_check(free_bytes: int, held_bytes: int, capacity: int, where: Path) -> Check:
    """Whether a full buffer fits: the free space plus what the buffer's files already
    take, against its capacity (fail: it cannot fit; warn: not with the margin)."""
    room = free_bytes + held_bytes
    need = int(capacity * DISK_MARGIN) + JOURNAL_SIZE_LIMIT
    found = (
        f"{size(free_bytes)} free on {where} ({size(held_bytes)} held by the buffer) for a "
        f"capacity of {size(capacity)}"
    )
    if room < capacity:
        return Check(
            "buffer.disk",
            "fail",
            f"{found}: a full buffer cannot fit; writes will fail when the disk fills",
            f"free space on {where}, or lower buffer.capacity below {size(room / DISK_MARGIN)}",
        )
    if room < need:
        return Check(
            "buffer.disk",
            "warn",
            f"{found}: less than the {size(need)} a full buffer may take on disk",
            f"free space on {where}, or lower buffer.capacity to "
            f"{size(room / DISK_MARGIN)} or less",
        )
    return passed("buffer.disk", found)


def backlog_check(stats: BufferStats, now_ms: int) -> Check:
    """The oldest unsent batch per lane: older than BACKLOG_WARN_S is a warn."""
    lanes = []
    late = []
    for lane in Lane:
        ls = stats.lanes[lane]
        if not ls.messages:
            continue
        name = lane.name.lower()
        lanes.append(f"{name}: {ls.messages} batches, oldest {age(ls.oldest_created_ms, now_ms)}")
        oldest = ls.oldest_created_ms
        if oldest is not None and now_ms - oldest > BACKLOG_WARN_S * 1000:
            late.append(name)
    if not lanes:
        return passed("buffer.backlog", "nothing waiting to be sent")
    text = "; ".join(lanes)
    if late:
        return Check(
            "buffer.backlog",
            "warn",
            f"unsent for over {BACKLOG_WARN_S / 3600:g} h ({', '.join(late)}): {text}",
            "the uplink is not getting through: see the broker checks and `citygw status`",
        )
    return passed("buffer.backlog", text)


def _existing_dir(path: Path) -> Path:
    """The buffer's folder, or its nearest existing parent (no buffer yet)."""
    for folder in (path.parent, *path.parent.parents):
        if folder.is_dir():
            return folder
    return Path("/")


def _held_bytes(path: Path) -> int:
    total = 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(OSError):  # no -wal or -shm now
            total += Path(f"{path}{suffix}").stat().st_size
    return total


def check_buffer(
    cfg: BufferConfig, now_ms: int, free_bytes: int | None = None
) -> tuple[list[Check], dict[str, Any]]:
    """The buffer's checks and the state the agent recorded in it ({} without one).
    `free_bytes` replaces the free space found on the buffer's filesystem."""
    path = cfg.path
    where = _existing_dir(path)
    if free_bytes is None:
        free_bytes = shutil.disk_usage(where).free
    disk = disk_check(free_bytes, _held_bytes(path), cfg.capacity, where)
    try:
        with Buffer.open_readonly(path, check=True) as buf:
            stats, state = buf.stats(), buf.get_state()
    except FileNotFoundError:
        return [
            Check(
                "buffer.integrity",
                "warn",
                f"no buffer database at {path} yet: the agent has never run with this config",
                "start the agent (systemctl start citygw-agent); it creates the buffer",
            ),
            disk,
            skipped("buffer.backlog", "no buffer yet"),
        ], {}
    except (BufferError, OSError) as exc:  # corrupt, from a newer citygw, unreadable
        return [
            Check(
                "buffer.integrity",
                "fail",
                str(exc),
                "restart the agent: it moves a corrupt buffer aside (<path>.corrupt-<time>) "
                "and starts a fresh one; a buffer from a newer citygw needs that version; "
                "an unreadable one, the agent user's permissions on its folder",
            ),
            disk,
            skipped("buffer.backlog", "the buffer cannot be read"),
        ], {}
    integrity = passed(
        "buffer.integrity",
        f"{path}: integrity ok, {size(stats.total_bytes)} of {size(cfg.capacity)} used",
    )
    return [integrity, disk, backlog_check(stats, now_ms)], state
