"""The sim driver: reproducible waveforms, quantisation, health and back-pressure."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time

import pytest

from drivers.base import DeviceSpec, PointSpec
from drivers.sim import SimDeviceSettings, SimDriver, SimPointSettings, Waveform
from native.batch import Batch
from tests.helpers import run_driver_until

POLL_S = 0.02


def point(pid: int, name: str = "p", **settings: object) -> PointSpec:
    return PointSpec(
        id=pid,
        key=f"dev/{name}",
        name=name,
        unit="",
        kind="float",
        writable=False,
        settings=SimPointSettings(**settings),  # type: ignore[arg-type]
    )


def device(
    name: str, points: tuple[PointSpec, ...], poll_s: float = POLL_S, **settings: object
) -> DeviceSpec:
    return DeviceSpec(
        name=name,
        poll_s=poll_s,
        settings=SimDeviceSettings(**settings),  # type: ignore[arg-type]
        points=points,
    )


class Sink:
    """Collects pushed batches (with the wall time of each push); `accept=False`
    refuses them all, like a full memory queue."""

    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.batches: list[Batch] = []
        self.push_ms: list[int] = []
        self.calls = 0

    def push(self, batch: Batch) -> bool:
        self.calls += 1
        if not self.accept:
            return False
        self.batches.append(batch)
        self.push_ms.append(time.time_ns() // 1_000_000)
        return True


def values(sink: Sink, n: int) -> list[list[float]]:
    return [list(b.values) for b in sink.batches[:n]]


def noisy_points() -> tuple[PointSpec, ...]:
    # no time-dependent terms: the readings depend only on the seed and the poll count
    return (
        point(1, "a", base=10.0, noise=2.0),
        point(2, "b", base=-3.0, noise=0.5, step_probability=0.2, step_size=1.0),
        point(3, "c", spike_probability=0.3, spike_size=100.0, noise=1.0),
    )


async def readings(name: str, seed: int, n: int = 5) -> list[list[float]]:
    sink = Sink()
    driver = SimDriver([device(name, noisy_points(), seed=seed)])
    await run_driver_until(driver, sink, lambda: len(sink.batches) >= n)
    return values(sink, n)


# -- reproducibility -------------------------------------------------------------------


def test_same_seed_same_readings_different_seed_different() -> None:
    async def main() -> None:
        first = await readings("dev", seed=7)
        again = await readings("dev", seed=7)
        other_seed = await readings("dev", seed=8)
        other_name = await readings("dev-2", seed=7)
        assert first == again
        assert first != other_seed
        assert first != other_name  # the seed is per device

    asyncio.run(main())


def test_waveform_is_reproducible_per_rng_seed() -> None:
    s = SimPointSettings(base=1.0, amplitude=2.0, period=60.0, noise=0.3, drift=0.5)
    ts = [1000.0 + i * 0.7 for i in range(50)]
    a = [Waveform(s, random.Random(1), 1000.0).sample(t) for t in ts]
    b = [Waveform(s, random.Random(1), 1000.0).sample(t) for t in ts]
    c = [Waveform(s, random.Random(2), 1000.0).sample(t) for t in ts]
    assert a == b
    assert a != c


# -- waveform shape ----------------------------------------------------------------------


def _decimals_of(v: float) -> int:
    text = repr(v)
    assert "e" not in text, text
    if text.endswith(".0"):
        return 0
    return len(text.split(".")[1]) if "." in text else 0


@pytest.mark.parametrize(
    ("resolution", "decimals"),
    [(0.1, 1), (0.25, 2), (1.0, 0), (0.01, 2), (0.5, 1), (5.0, 0), (0.001, 3)],
)
def test_quantised_to_resolution(resolution: float, decimals: int) -> None:
    s = SimPointSettings(base=12.3, amplitude=40.0, period=7.0, noise=3.0, resolution=resolution)
    w = Waveform(s, random.Random(3), 0.0)
    samples = [w.sample(i * 0.013) for i in range(2000)]
    assert len(set(samples)) > 10  # the values really vary
    for v in samples:
        steps = v / resolution
        assert abs(steps - round(steps)) < 1e-6, (v, resolution)
        assert _decimals_of(v) <= decimals, (v, resolution)


def test_resolution_point_one_gives_short_reprs() -> None:
    # the classic case: 123 * 0.1 == 12.299999999999999
    s = SimPointSettings(base=12.3, resolution=0.1)
    assert repr(Waveform(s, random.Random(0), 0.0).sample(5.0)) == "12.3"
    s = SimPointSettings(base=0.7, resolution=0.1)
    assert repr(Waveform(s, random.Random(0), 0.0).sample(5.0)) == "0.7"


def test_sine_within_base_plus_minus_amplitude() -> None:
    s = SimPointSettings(base=20.0, amplitude=5.0, period=10.0)
    w = Waveform(s, random.Random(4), 0.0)
    ts = [i * 0.01 for i in range(3000)]  # three periods
    samples = [w.sample(t) for t in ts]
    assert all(15.0 - 1e-9 <= v <= 25.0 + 1e-9 for v in samples)
    # it is a sine of that amplitude: it reaches both extremes ...
    assert max(samples) > 24.99 and min(samples) < 15.01
    # ... and repeats with the period
    for t in (0.3, 2.7, 8.1):
        assert w.sample(t + 10.0) == pytest.approx(w.sample(t), abs=1e-9)
    # half a period later it is mirrored around the base
    for t in (0.3, 2.7, 8.1):
        assert w.sample(t + 5.0) - 20.0 == pytest.approx(20.0 - w.sample(t), abs=1e-9)


def test_drift_moves_the_level_linearly() -> None:
    s = SimPointSettings(base=100.0, drift=6.0)  # per hour
    t0 = 5000.0
    w = Waveform(s, random.Random(5), t0)
    assert w.sample(t0) == pytest.approx(100.0)
    assert w.sample(t0 + 1800) == pytest.approx(103.0)
    assert w.sample(t0 + 3600) == pytest.approx(106.0)
    assert w.sample(t0 + 36_000) == pytest.approx(160.0)
    down = Waveform(SimPointSettings(base=0.0, drift=-2.0), random.Random(5), t0)
    assert down.sample(t0 + 7200) == pytest.approx(-4.0)


def test_spikes_at_roughly_the_configured_probability() -> None:
    s = SimPointSettings(base=0.0, noise=1.0, spike_probability=0.1, spike_size=1000.0)
    w = Waveform(s, random.Random(6), 0.0)
    samples = [w.sample(float(i)) for i in range(2000)]
    spikes = sum(v > 500.0 for v in samples)
    assert 140 <= spikes <= 260  # expected 200, sd ~13
    assert all(abs(v) < 10 or abs(v - 1000.0) < 10 for v in samples)  # one-off, not steps
    none = Waveform(SimPointSettings(spike_size=1000.0), random.Random(6), 0.0)
    assert all(none.sample(float(i)) == 0.0 for i in range(200))


def test_steps_move_the_level_by_step_size() -> None:
    s = SimPointSettings(base=50.0, step_probability=1.0, step_size=1.0)
    w = Waveform(s, random.Random(7), 0.0)
    samples = [w.sample(float(i)) for i in range(200)]
    # a random walk of +-1: each reading is one step from the previous one
    assert abs(samples[0] - 50.0) == 1.0
    assert all(abs(b - a) == 1.0 for a, b in itertools.pairwise(samples))
    assert len(set(samples)) > 3
    # with no further steps the level stays where the walk ended
    w._step_p = 0.0  # type: ignore[attr-defined]
    assert w.sample(999.0) == samples[-1]


# -- the driver ----------------------------------------------------------------------------


def test_driver_pushes_one_batch_per_poll_with_one_timestamp() -> None:
    points = (point(11, "x", base=1.0, resolution=0.1), point(12, "y", base=2.5))
    driver = SimDriver([device("dev", points, seed=1)])
    sink = Sink()
    before_ms = time.time_ns() // 1_000_000

    async def main() -> None:
        await run_driver_until(driver, sink, lambda: len(sink.batches) >= 5)

    asyncio.run(main())
    after_ms = time.time_ns() // 1_000_000
    assert len(sink.batches) >= 5
    last_ts = before_ms - 1
    for batch, pushed_ms in zip(sink.batches, sink.push_ms, strict=True):
        assert list(batch.point_ids) == [11, 12]
        assert list(batch.values) == [1.0, 2.5]
        assert list(batch.quality) == [0, 0]
        ts = set(batch.timestamps)
        assert len(ts) == 1  # one poll, one timestamp
        (t,) = ts
        assert before_ms <= t <= pushed_ms <= after_ms
        assert t > last_ts  # a new timestamp per poll
        last_ts = t
    h = driver.health()["dev"]
    assert h.readings == 2 * len(sink.batches)
    assert h.polls == len(sink.batches)
    assert h.errors == 0 and h.consecutive_failures == 0 and h.last_error is None
    assert h.last_success_ms is not None and before_ms <= h.last_success_ms <= after_ms


def test_polls_faster_than_a_millisecond_still_get_distinct_timestamps() -> None:
    driver = SimDriver([device("fast", (point(1, "x"),), poll_s=0.0002)])
    sink = Sink()
    asyncio.run(run_driver_until(driver, sink, lambda: len(sink.batches) >= 50))
    stamps = [b.timestamps[0] for b in sink.batches]
    assert all(b > a for a, b in itertools.pairwise(stamps)), stamps


def test_failing_device_records_failures_and_pushes_nothing() -> None:
    dead = device("dead", (point(1, base=1.0),), fail_probability=1.0)
    alive = device("alive", (point(2, base=2.0),), seed=3)
    driver = SimDriver([dead, alive])
    sink = Sink()

    async def main() -> None:
        health = driver.health()
        await run_driver_until(
            driver, sink, lambda: health["dead"].errors >= 4 and len(sink.batches) >= 4
        )

    asyncio.run(main())
    h = driver.health()["dead"]
    assert h.errors >= 4
    assert h.consecutive_failures == h.errors == h.polls
    assert h.last_error is not None and "timeout" in h.last_error
    assert h.last_error_ms is not None
    assert h.readings == 0 and h.last_success_ms is None
    # the dead device did not stall the other one, and pushed nothing itself
    assert all(list(b.point_ids) == [2] for b in sink.batches)
    assert driver.health()["alive"].errors == 0


def test_refused_batches_count_as_skipped_polls() -> None:
    driver = SimDriver([device("dev", (point(1), point(2)))])
    sink = Sink(accept=False)

    async def main() -> None:
        await run_driver_until(driver, sink, lambda: sink.calls >= 4)

    asyncio.run(main())
    h = driver.health()["dev"]
    assert h.skipped_polls >= sink.calls >= 4
    assert h.readings == 0
    assert h.last_success_ms is None
    assert h.errors == 0


def test_latency_delays_the_reading_not_its_timestamp_window() -> None:
    driver = SimDriver([device("slow", (point(1, base=4.0),), poll_s=0.05, latency=0.03)])
    sink = Sink()
    start_ms = time.time_ns() // 1_000_000

    async def main() -> None:
        await run_driver_until(driver, sink, lambda: len(sink.batches) >= 2)

    asyncio.run(main())
    # the timestamp is taken when the (slow) device answers, not before
    (first,) = set(sink.batches[0].timestamps)
    assert first >= start_ms + 30
    assert all(math.isclose(v, 4.0) for b in sink.batches for v in b.values)


def test_a_replaying_device_repeats_its_sampled_polls_with_fresh_timestamps() -> None:
    """replay = N: the device samples N polls once, then pushes them in a loop, each
    with the poll's own timestamp; its points refuse writes (nothing to set)."""
    points = (point(1, "a", base=20.0, amplitude=5.0, period=1.0, noise=0.5, resolution=0.01),
              point(2, "b", base=-3.0, noise=1.0))  # fmt: skip
    driver = SimDriver([device("dev", points, poll_s=0.005, replay=3)])
    sink = Sink()
    asyncio.run(run_driver_until(driver, sink, lambda: len(sink.batches) >= 7))
    values = [list(b.values) for b in sink.batches]
    assert values[0] != values[1] != values[2]  # three different sampled polls
    assert values[3:7] == values[0:4]  # then the same ones again, in order
    for b in sink.batches:
        assert list(b.point_ids) == [1, 2] and list(b.quality) == [0, 0]
        assert len(set(b.timestamps)) == 1
    stamps = [b.timestamps[0] for b in sink.batches]
    assert stamps == sorted(set(stamps))  # every poll its own, later, timestamp
    # a pushed batch is the agent's: changing one changes no later poll
    sink.batches[0].values[0] = 1e9
    assert all(b.values[0] != 1e9 for b in sink.batches[1:])
    with pytest.raises(NotImplementedError, match="replays"):
        asyncio.run(driver.write(points[0], 1.0))
