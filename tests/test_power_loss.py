"""The buffer across a real power cut (hil/powerfs.py drops what was not synced), not a
process kill: what each `sync` mode keeps, and that no sequence number the platform may
already hold is handed out again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import buffer.queue as queue_mod
from buffer import Buffer, Lane
from hil.powerfs import PowerFs

ROOT = Path(__file__).resolve().parents[1]

# Appends "durable" (then makes the buffer durable as the agent's timer does), then
# "published": the batch the uplink had sent and the platform stored before the cut.
_WRITER = """
import sys, time
from buffer import Buffer, Lane
buf = Buffer(sys.argv[1], 1_000_000, sys.argv[2])
buf.append(Lane.TELEMETRY, b"durable", 1)
getattr(buf, "sync_point", buf.checkpoint)()
seq = buf.append(Lane.TELEMETRY, b"published", 1)
sys.stdout.write(f"{seq}\\n")
sys.stdout.flush()
time.sleep(60)
"""


def write_then_cut(fs: PowerFs, sync: str) -> tuple[Path, int]:
    """Runs the writer on the mount, cuts the power under it and kills it (a new boot
    follows). Returns the database path and the seq of the published batch."""
    db = fs.mountpoint / "buffer.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(db), sync],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        published = int(proc.stdout.readline())
        fs.cut(stay_off=True)
    finally:
        proc.kill()
        proc.wait(30)
    fs.power_on()
    return db, published


def test_normal_never_hands_out_a_seq_a_power_cut_rolled_back(
    fs: PowerFs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With sync=normal the cut rolls the published batch back. Its seq is the platform's
    dedup key for a batch the platform stored: given to new readings, the platform would
    drop them as duplicates after acknowledging them (silent loss)."""
    db, published = write_then_cut(fs, "normal")
    monkeypatch.setattr(queue_mod, "boot_id", lambda: "the-next-boot", raising=False)
    with Buffer(db, 1_000_000, "normal") as buf:
        assert [m.payload for m in buf.peek(10)] == [b"durable"]  # the cut took "published"
        assert buf.append(Lane.TELEMETRY, b"new", 1) > published
        assert buf.power_lost and buf.stats().seq_skipped > 0


def test_full_keeps_every_append_that_returned(fs: PowerFs) -> None:
    db, published = write_then_cut(fs, "full")
    with Buffer(db, 1_000_000, "full") as buf:
        msgs = buf.peek(10)
        assert [m.payload for m in msgs] == [b"durable", b"published"]
        assert msgs[-1].seq == published
        assert buf.append(Lane.TELEMETRY, b"new", 1) > published
