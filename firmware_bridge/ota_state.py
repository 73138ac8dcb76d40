"""The gateway's record of an unfinished OTA transfer, so a restarted gateway resumes it.

One small JSON file per package in a state directory, named by the image's SHA-256 and
holding the transfer id the device knows it by. It is replaced atomically (temp file,
fsync, rename, fsync of the directory): a power cut leaves the old or the new record,
never a torn one. The device's own offset is authoritative on resume; the recorded
offset is what the gateway last saw acknowledged (for the operator and the logs).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class TransferState:
    transfer_id: int
    sha256: str  # hex, of the image
    size: int
    version: str
    hardware_id: str
    acked: int = 0


class OtaStateStore:
    """Transfer records in `directory` (created on first save)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, sha256: str) -> Path:
        return self.directory / f"ota-{sha256[:32]}.json"

    def load(self, sha256: str) -> TransferState | None:
        """The record for this image, or None (also for an unreadable or foreign one: a
        fresh transfer is always safe, the device starts it over)."""
        try:
            raw = json.loads(self._path(sha256).read_text(encoding="utf-8"))
            state = TransferState(**raw)
        except (OSError, ValueError, TypeError):
            return None
        return state if state.sha256 == sha256 else None

    def begin(self, sha256: str, size: int, version: str, hardware_id: str) -> TransferState:
        """The record to use for this image: the saved one, or a new one with a random id."""
        saved = self.load(sha256)
        if saved is not None and saved.size == size:
            return saved
        state = TransferState(secrets.randbits(32), sha256, size, version, hardware_id)
        self.save(state)
        return state

    def save(self, state: TransferState) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(state.sha256)
        tmp = path.with_suffix(".tmp")
        data = json.dumps(asdict(state), sort_keys=True).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        # the rename itself is durable only once the directory entry is synced
        dfd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def clear(self, sha256: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(sha256).unlink()
