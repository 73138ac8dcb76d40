"""The durable store-and-forward queue on SQLite, and the point registry that
shares its database. Knows nothing about MQTT."""

from buffer.queue import (
    Buffer,
    BufferStats,
    Lane,
    LaneStats,
    Message,
    SyncMode,
)
from buffer.registry import PointRegistry
from buffer.schema import (
    SCHEMA_VERSION,
    BufferCorrupt,
    BufferReadOnly,
    BufferVersionError,
    BufferWriteError,
)

__all__ = [
    "SCHEMA_VERSION",
    "Buffer",
    "BufferCorrupt",
    "BufferReadOnly",
    "BufferStats",
    "BufferVersionError",
    "BufferWriteError",
    "Lane",
    "LaneStats",
    "Message",
    "PointRegistry",
    "SyncMode",
]
