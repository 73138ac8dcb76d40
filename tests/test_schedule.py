"""FixedRate schedules: no drift, skipped (and counted) ticks after an overrun, stable phases."""

from __future__ import annotations

import asyncio
import time
import types

import pytest

from drivers import schedule
from drivers.schedule import FixedRate, phase_for

# -- on a fake clock: exact semantics ---------------------------------------------------


class FakeClock:
    """Stands in for the event loop's clock; `sleep` advances it instantly."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(
        schedule,
        "asyncio",
        types.SimpleNamespace(get_running_loop=lambda: fake, sleep=fake.sleep),
    )
    return fake


def test_ticks_are_on_the_grid_whatever_the_work_takes(clock: FakeClock) -> None:
    async def main() -> list[float]:
        rate = FixedRate(1.0)
        start = clock.now
        fired = []
        for work in (0.0, 0.3, 0.9, 0.1, 0.5, 0.99, 0.0):
            assert await rate.wait() == 0
            fired.append(clock.now - start)
            clock.now += work  # the poll
        assert rate.missed == 0
        return fired

    assert asyncio.run(main()) == pytest.approx([0, 1, 2, 3, 4, 5, 6])


def test_phase_offsets_every_tick(clock: FakeClock) -> None:
    async def main() -> list[float]:
        start = clock.now
        rate = FixedRate(2.0, phase=0.5)
        fired = []
        for _ in range(3):
            await rate.wait()
            fired.append(clock.now - start)
        return fired

    assert asyncio.run(main()) == pytest.approx([0.5, 2.5, 4.5])


def test_overrun_skips_the_missed_ticks_and_counts_them(clock: FakeClock) -> None:
    async def main() -> None:
        start = clock.now
        rate = FixedRate(1.0)
        assert await rate.wait() == 0  # tick 0 at 0
        clock.now = start + 5.5  # the poll took 5.5 periods: ticks 1..4 are gone
        assert await rate.wait() == 4  # tick 5 fires at once (late, not back to back)
        assert clock.now == pytest.approx(start + 5.5)
        assert rate.missed == 4
        assert await rate.wait() == 0  # and the schedule is back on the grid
        assert clock.now == pytest.approx(start + 6.0)
        clock.now = start + 9.0  # exactly three periods late: ticks 7 and 8 are missed
        assert await rate.wait() == 2
        assert clock.now == pytest.approx(start + 9.0)
        assert rate.missed == 6
        assert await rate.wait() == 0
        assert clock.now == pytest.approx(start + 10.0)

    asyncio.run(main())


def test_overrun_of_up_to_half_a_period_fires_late_beyond_it_skips(clock: FakeClock) -> None:
    async def main() -> None:
        start = clock.now
        rate = FixedRate(1.0)
        await rate.wait()
        clock.now = start + 1.4  # tick 1 is 0.4 late: still fired, nothing missed
        assert await rate.wait() == 0
        assert clock.now == pytest.approx(start + 1.4)
        assert await rate.wait() == 0
        assert clock.now == pytest.approx(start + 2.0)
        clock.now = start + 3.9  # tick 3 is 0.9 late: skipped, not fired back to back
        assert await rate.wait() == 1
        assert clock.now == pytest.approx(start + 4.0)
        assert rate.missed == 1

    asyncio.run(main())


def test_period_must_be_positive() -> None:
    async def main() -> None:
        for bad in (0.0, -1.0):
            with pytest.raises(ValueError, match="period"):
                FixedRate(bad)

    asyncio.run(main())


# -- in real time ----------------------------------------------------------------------


def test_no_drift_in_real_time() -> None:
    """A 20 ms period with 5 ms of (blocking) work per tick: a schedule that slept a
    period after each poll would need 25 ms a tick; this one keeps 20 ms."""
    period, n, work = 0.02, 40, 0.005

    async def main() -> tuple[float, int]:
        loop = asyncio.get_running_loop()
        rate = FixedRate(period)
        start = loop.time()
        for _ in range(n):
            await rate.wait()
            time.sleep(work)
        return loop.time() - start, rate.missed

    elapsed, missed = asyncio.run(main())
    # n waits return at ticks 0 .. n-1 (+ any skipped on a loaded machine), then one work
    ideal = (n - 1 + missed) * period + work
    drifting = (n - 1) * (period + work)  # 0.975 s against 0.785 s
    assert elapsed >= ideal - 0.002
    assert elapsed < ideal + 0.08 < drifting


def test_real_overrun_is_counted() -> None:
    period = 0.02

    async def main() -> tuple[int, int, float]:
        loop = asyncio.get_running_loop()
        rate = FixedRate(period)
        await rate.wait()
        time.sleep(6 * period)  # a poll that hangs for 6 periods
        returned = await rate.wait()
        t = loop.time()
        await rate.wait()
        return returned, rate.missed, loop.time() - t

    returned, missed, gap = asyncio.run(main())
    assert 4 <= returned <= 8
    assert missed == returned
    assert gap < 2 * period  # no burst of catch-up ticks, no extra delay either


# -- phases ------------------------------------------------------------------------------


def test_phase_for_is_stable_and_within_the_period() -> None:
    names = [f"device-{i}" for i in range(200)]
    for period in (0.02, 1.0, 60.0):
        phases = [phase_for(n, period) for n in names]
        assert all(0.0 <= p < period for p in phases)
        assert phases == [phase_for(n, period) for n in names]  # stable
        assert len(set(phases)) > 150  # spread out, not all in one instant
    # scales with the period, and does not depend on the process (crc32, not hash())
    assert phase_for("bridge-7", 10.0) == pytest.approx(10 * phase_for("bridge-7", 1.0))
    assert phase_for("bridge-7", 1.0) == pytest.approx(0.571)
    assert phase_for("bridge-8", 1.0) == pytest.approx(0.874)


def test_the_observer_gets_each_ticks_lateness(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[float] = []
    monkeypatch.setattr(FixedRate, "observer", seen.append)

    async def main() -> None:
        rate = FixedRate(1.0)
        await rate.wait()  # on time
        clock.now += 1.25  # the poll overran its period by a quarter
        assert await rate.wait() == 0  # less than half a period late: polled at once
        clock.now += 0.5
        await rate.wait()  # on time again

    asyncio.run(main())
    assert seen == pytest.approx([0.0, 0.25, 0.0])
