"""The pure parts of the uplink: backoff delays and the status record.
(The uplink against a real broker: tests/test_e2e.py and tests/test_uplink.py.)"""

from __future__ import annotations

import random

import orjson
import pytest

from agent.uplink import UplinkStatus, backoff_delay


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
