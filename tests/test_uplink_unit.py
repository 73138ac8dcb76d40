"""The pure parts of the uplink: backoff delays and the status record.
(The uplink against a real broker: tests/test_e2e.py and tests/test_uplink.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable

import orjson
import pytest

from agent.uplink import BufferPort, Uplink, UplinkSettings, UplinkStatus, backoff_delay
from buffer import Message


@pytest.mark.parametrize(("lo", "hi"), [(1.0, 60.0), (0.1, 0.5), (2.0, 2.0), (0.25, 1000.0)])
def test_backoff_delay_within_bounds(lo: float, hi: float) -> None:
    rng = random.Random(42)
    for attempt in range(40):
        cap = min(hi, lo * 2**attempt)
        delays = [backoff_delay(attempt, lo, hi, rng) for _ in range(200)]
        assert all(lo <= d <= cap for d in delays), (attempt, min(delays), max(delays))
        if cap > lo:
            # full jitter: spread over the range, not pinned to an end
            assert min(delays) < lo + 0.2 * (cap - lo)
            assert max(delays) > lo + 0.8 * (cap - lo)


def test_backoff_first_attempt_is_the_minimum() -> None:
    rng = random.Random(1)
    assert all(backoff_delay(0, 1.5, 60.0, rng) == 1.5 for _ in range(20))


def test_backoff_grows_then_reaches_the_cap() -> None:
    rng = random.Random(7)
    lo, hi = 1.0, 60.0
    worst = [max(backoff_delay(a, lo, hi, rng) for _ in range(300)) for a in range(10)]
    assert worst[1] <= 2.0 and worst[2] <= 4.0 and worst[3] <= 8.0
    assert worst[3] > 6.0  # it does grow
    assert all(55.0 < w <= 60.0 for w in worst[6:])  # 2**6 > 60: capped
    # a very long outage neither overflows nor exceeds the cap
    for attempt in (100, 10_000, 10**9):
        assert lo <= backoff_delay(attempt, lo, hi, rng) <= hi


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    a = [backoff_delay(i, 1.0, 60.0, random.Random(3)) for i in range(10)]
    b = [backoff_delay(i, 1.0, 60.0, random.Random(3)) for i in range(10)]
    assert a == b


def test_uplink_status_as_dict() -> None:
    st = UplinkStatus()
    st.seen_seqs.update({1, 2, 3})
    d = st.as_dict()
    assert set(d) == {
        "state",
        "connected_since_ms",
        "last_puback_ms",
        "last_error",
        "connects",
        "published_messages",
        "published_points",
        "published_bytes",
        "resent_messages",
        "buffer_errors",
        "last_buffer_error",
    }
    assert d["state"] == "starting"
    assert d["connects"] == 0 and d["last_error"] is None
    # it goes into the buffer's state table as JSON: plain values only, no seq set
    assert orjson.loads(orjson.dumps(d)) == d
    st.state, st.last_error, st.published_points = "backoff", "refused", 12
    d = st.as_dict()
    assert (d["state"], d["last_error"], d["published_points"]) == ("backoff", "refused", 12)


class _AckWithCancel:
    """A session whose meta publish gets its acknowledgement in the same instant the task
    is cancelled, and returns it: what Python 3.11's asyncio.wait_for (inside aiomqtt's
    publish and subscribe) does with a cancel that meets a completed wait."""

    def __init__(self) -> None:
        self.in_meta = asyncio.Event()
        self.topics: list[str] = []

    async def __aenter__(self) -> _AckWithCancel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def publish(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, *, timeout=None
    ) -> None:  # type: ignore[no-untyped-def]
        self.topics.append(topic)
        if topic.endswith("/up/meta"):
            self.in_meta.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()  # the PUBACK: it comes with the cancel


async def stop_in_meta(
    session: _AckWithCancel, stats: Callable[[], Awaitable[bytes]] | None = None
) -> None:
    """An uplink over an empty buffer on `session`, cancelled while its meta publish is
    under way; it must end within 5 s, cancelled."""

    async def peek(limit: int, exclude: object) -> list[Message]:
        return []

    async def ack(seqs: object) -> int:
        return 0

    up = Uplink(
        UplinkSettings(broker="mqtt://127.0.0.1:1", gateway_id="gw", client_id="c"),
        BufferPort(peek, ack),
        "0" * 32,
        b"{}",
        lambda: session,
        stats=stats,
    )
    task = asyncio.create_task(up.run())
    await asyncio.wait_for(session.in_meta.wait(), 5)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert done == {task} and task.cancelled()


def test_a_cancel_that_a_publish_swallowed_still_stops_the_uplink() -> None:
    """`citygw` stopping while the uplink connects: the cancel must end the session even
    when the publish it met returned normally (the agent's stop waited forever)."""

    async def main() -> list[str]:
        session = _AckWithCancel()
        stats_calls = 0

        async def stats() -> bytes:
            nonlocal stats_calls
            stats_calls += 1
            return b"{}"

        # bounded: without the check the session went on and pumped forever
        await stop_in_meta(session, stats)
        assert stats_calls == 0  # nothing of the session ran after the cancel
        return session.topics

    topics = asyncio.run(main())
    assert topics == ["citygw/gw/state", "citygw/gw/up/meta", "citygw/gw/state"]  # offline


class _MetaHangs(_AckWithCancel):
    """A session whose meta publish never gets its acknowledgement: the cancel of a
    stop arrives in it and is raised, as usual."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, bytes]] = []

    async def publish(
        self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, *, timeout=None
    ) -> None:  # type: ignore[no-untyped-def]
        self.sent.append((topic, payload))
        if topic.endswith("/up/meta"):
            self.in_meta.set()
            await asyncio.Event().wait()


def test_a_stop_while_the_session_starts_still_says_offline() -> None:
    """A stop that lands after the retained "online" went out but before the session
    was under way (its meta publish, its subscribe) must still say "offline": the clean
    disconnect that follows fires no will, so "online" would stay retained for ever."""

    async def main() -> list[tuple[str, bytes]]:
        session = _MetaHangs()

        await stop_in_meta(session)
        return session.sent

    sent = asyncio.run(main())
    states = [payload for topic, payload in sent if topic == "citygw/gw/state"]
    assert states == [b"online", b"offline"]
