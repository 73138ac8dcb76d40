"""An in-process stand-in for the broker and the network, for `citygw demo` on a
machine without a `mosquitto` binary.

The uplink publishes to it exactly as to a broker; a publish returns (the PUBACK)
once the platform ingest has decoded and committed the message, so the buffer's
delete-on-ack, the sequence numbers and the ingest's dedup all run for real. Only
the sockets are missing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType

from common import wire


class LoopbackSession:
    """One 'connection': what `Uplink` needs of an MQTT client."""

    def __init__(self, deliver: Callable[[str, bytes], Awaitable[None]], prefix: str) -> None:
        self._deliver = deliver
        self._prefix = prefix

    async def __aenter__(self) -> LoopbackSession:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        *,
        timeout: float | None = None,
    ) -> None:
        _, kind = wire.parse_topic(topic, self._prefix)
        if kind in (wire.KIND_BATCH, wire.KIND_ALARM, wire.KIND_META, wire.KIND_STATS):
            await self._deliver(topic, payload)


class LoopbackLink:
    def __init__(
        self, deliver: Callable[[str, bytes], Awaitable[None]], prefix: str = wire.DEFAULT_PREFIX
    ) -> None:
        self._deliver = deliver
        self._prefix = prefix

    def connect(self) -> LoopbackSession:
        return LoopbackSession(self._deliver, self._prefix)
